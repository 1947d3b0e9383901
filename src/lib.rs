//! ftpsd: an FTPS server for Kubernetes volumes, built on libunftp.
//!
//! - [`config`]: the typed configuration and its layers (defaults, file, environment, flags).
//! - [`tls`]: certificate loading, self-signed generation and the rustls configuration.
//! - [`auth`]: the users file, argon2id hashes, and the libunftp authenticator.
//! - [`storage`]: the unftp-sbe-fs backend wrapped for atomic uploads, modes and transfer logs.
//! - [`server`]: checks everything, then wires the pieces into a running libunftp server; its
//!   submodules serve the admin HTTP endpoints and reload certificates and users.
//! - [`telemetry`] and [`metrics`]: tracing setup, the libunftp log bridge, the xferlog file,
//!   Prometheus metrics.
//!
//! docs/architecture.md follows one session from accept to reply.

pub mod auth;
pub mod config;
pub mod metrics;
pub mod server;
pub mod storage;
pub mod telemetry;
pub mod tls;
