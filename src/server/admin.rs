//! The admin HTTP listener: `/healthz` (the process is alive), `/readyz` (ready to take
//! sessions) and `/metrics` (Prometheus text format). It is separate from the FTP ports so that
//! probes and scrapes need no FTP client, and every request is logged at debug: a kubelet probes
//! every few seconds.

use std::{
    ops::RangeInclusive,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use axum::{
    Router,
    extract::{Request, State},
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};

use crate::{metrics, server::sockets, tls::CertificateStore};

/// Upper bound on the data directory probe, so that a hung volume (a stale NFS mount) makes
/// `/readyz` return 503 instead of timing out the kubelet's probe.
const DATA_DIR_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The state behind `/readyz`: the control listener, the data directory, the certificate and the
/// drain.
#[derive(Debug)]
pub struct Readiness {
    draining: AtomicBool,
    /// Set when the server starts its control listener; the fallback where /proc is missing.
    listener_started: AtomicBool,
    control_port: u16,
    data_dir: PathBuf,
    certificate: Arc<CertificateStore>,
}

/// The result of one readiness check, as a line of the `/readyz` body.
#[derive(Debug)]
struct Check {
    ok: bool,
    text: String,
}

impl Readiness {
    pub fn new(control_port: u16, data_dir: PathBuf, certificate: Arc<CertificateStore>) -> Self {
        Readiness {
            draining: AtomicBool::new(false),
            listener_started: AtomicBool::new(false),
            control_port,
            data_dir,
            certificate,
        }
    }

    /// Records that the server is about to bind its control listener.
    pub fn mark_listener_started(&self) {
        self.listener_started.store(true, Ordering::SeqCst);
    }

    /// Turns readiness off for good: the server is draining its sessions before it exits.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    async fn checks(&self) -> Vec<Check> {
        let control = match sockets::own_tcp_sockets() {
            Ok(sockets) if sockets::listening_on(&sockets, self.control_port) => Check {
                ok: true,
                text: format!("control listener on port {} is up", self.control_port),
            },
            Ok(_) => Check {
                ok: false,
                text: format!("control listener on port {} is not up", self.control_port),
            },
            // Without /proc (a chroot), a failed bind would have stopped the process, so a
            // started listener that is still running is taken as bound.
            // NOTE: this fallback cannot see the moment between the start and the bind.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let started = self.listener_started.load(Ordering::SeqCst);
                let state = if started { "was started" } else { "is not started" };
                Check {
                    ok: started,
                    text: format!(
                        "control listener on port {} {state} (no /proc to check the socket)",
                        self.control_port
                    ),
                }
            }
            Err(error) => Check {
                ok: false,
                text: format!("cannot read this process's sockets from /proc: {error}"),
            },
        };

        let data_dir = self.data_dir.clone();
        let probe = tokio::time::timeout(
            DATA_DIR_PROBE_TIMEOUT,
            tokio::task::spawn_blocking(move || super::probe_writable(&data_dir)),
        )
        .await;
        let shown = self.data_dir.display();
        let data_dir = match probe {
            Ok(Ok(Ok(()))) => Check {
                ok: true,
                text: format!("data directory {shown} is writable"),
            },
            Ok(Ok(Err(error))) => Check {
                ok: false,
                text: format!("data directory {shown} is not writable: {error}"),
            },
            Ok(Err(error)) => Check {
                ok: false,
                text: format!("data directory {shown} check failed: {error}"),
            },
            Err(_) => Check {
                ok: false,
                text: format!("data directory {shown} did not answer a write within {DATA_DIR_PROBE_TIMEOUT:?}"),
            },
        };

        let current = self.certificate.current();
        let expired = current.not_after <= SystemTime::now();
        let certificate = Check {
            // An expired certificate still serves clients that do not verify it, so it is reported
            // here and in ftpsd_certificate_expiry_timestamp_seconds but does not fail readiness.
            ok: true,
            text: format!(
                "certificate {} is loaded (serial {}{})",
                current.source.display(),
                current.serial,
                if expired { ", expired" } else { "" }
            ),
        };

        let drain = if self.is_draining() {
            Check {
                ok: false,
                text: "draining: the server received SIGTERM or SIGINT and takes no new sessions".to_string(),
            }
        } else {
            Check {
                ok: true,
                text: "not draining".to_string(),
            }
        };

        vec![control, data_dir, certificate, drain]
    }
}

/// Shared state of the admin handlers.
#[derive(Clone)]
struct AdminState {
    readiness: Arc<Readiness>,
    passive_ports: RangeInclusive<u16>,
    pooled: bool,
}

/// Serves the admin endpoints on `listener` until the process exits. The listener stays up
/// during the drain, so that `/readyz` can return 503.
pub fn spawn(
    listener: tokio::net::TcpListener,
    readiness: Arc<Readiness>,
    passive_ports: RangeInclusive<u16>,
    pooled: bool,
) -> tokio::task::JoinHandle<()> {
    let state = AdminState {
        readiness,
        passive_ports,
        pooled,
    };
    let router = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .layer(middleware::from_fn(log_request))
        .with_state(state);
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, router).await {
            tracing::error!(%error, "admin HTTP listener failed");
        }
    })
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AdminState>) -> Response {
    let checks = state.readiness.checks().await;
    let ready = checks.iter().all(|check| check.ok);
    let body: String = checks
        .iter()
        .map(|check| format!("{}: {}\n", if check.ok { "ok" } else { "failed" }, check.text))
        .collect();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, body).into_response()
}

async fn metrics_text(State(state): State<AdminState>) -> Response {
    match sockets::own_tcp_sockets() {
        Ok(sockets) => {
            let in_use = sockets::passive_ports_in_use(&sockets, &state.passive_ports, state.pooled);
            metrics::PASSIVE_PORTS_IN_USE.set(i64::try_from(in_use).unwrap_or(i64::MAX));
        }
        Err(error) => {
            // Warned once: without /proc (a chroot) every scrape would fail the same way.
            static WARNED: AtomicBool = AtomicBool::new(false);
            if !WARNED.swap(true, Ordering::Relaxed) {
                tracing::warn!(%error, "cannot count the passive ports in use: reading /proc failed; ftpsd_passive_ports_in_use stays unchanged");
            }
        }
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        metrics::render(),
    )
        .into_response()
}

/// Logs every admin request at debug, with its status and duration.
async fn log_request(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let started = Instant::now();
    let response = next.run(request).await;
    tracing::debug!(
        %method,
        path,
        status = response.status().as_u16(),
        duration_ms = started.elapsed().as_millis() as u64,
        "admin request"
    );
    response
}
