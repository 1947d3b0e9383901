//! Logging: one `tracing` subscriber (human text or JSON lines, plus the optional transfer log),
//! and a slog drain that routes libunftp's records into it with the session id, peer and user as
//! fields. The drain also counts the outcomes that only the engine's records report.
//!
//! Each session runs inside a span named `session` (target `libunftp::session`, fields
//! `session_id`, `peer`, `user`), which an engine patch adds, so events that ftpsd's own code
//! emits during a session carry the same fields.

mod json;
pub mod xferlog;

use std::{
    fmt::{self, Write as _},
    io::IsTerminal as _,
};

use tracing_subscriber::{
    EnvFilter, Layer as _,
    filter::Targets,
    fmt::format::{FmtSpan, JsonFields},
    layer::SubscriberExt as _,
    util::SubscriberInitExt as _,
};

use crate::{
    config::{LogConfig, LogFormat},
    metrics,
};

/// Target of the session span that the engine patch adds.
const SESSION_SPAN_TARGET: &str = "libunftp::session";

/// Installs the global subscriber. `RUST_LOG`, when set, replaces `log.level`. The transfer log
/// layer has its own filter, so `log.level = "warn"` does not silence it.
pub fn init(config: &LogConfig) {
    let directives = std::env::var("RUST_LOG")
        .ok()
        .filter(|value| EnvFilter::try_new(value).is_ok())
        .unwrap_or_else(|| config.level.clone());
    let filter = EnvFilter::new(with_default_directives(directives));

    let log_layer = match config.format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .with_span_events(FmtSpan::NONE)
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .fmt_fields(JsonFields::new())
            .event_format(json::JsonLines)
            .with_filter(filter)
            .boxed(),
    };
    let xferlog_layer = xferlog::XferlogLayer.with_filter(Targets::new().with_target("ftpsd::storage", tracing::Level::INFO));

    // try_init fails only when a subscriber is already installed, as in unit tests.
    let _ = tracing_subscriber::registry().with(log_layer).with(xferlog_layer).try_init();
}

/// Adds the directives that every configuration needs unless it names the target itself.
fn with_default_directives(mut directives: String) -> String {
    // rustls warns about every client that sends an IP address as SNI, which lftp and curl do.
    if !directives.contains("rustls") {
        directives.push_str(",rustls=error");
    }
    // The session span carries the fields of every line of a session, so it stays on even where
    // the level would turn info spans off.
    if !directives.contains(SESSION_SPAN_TARGET) {
        directives.push_str(&format!(",{SESSION_SPAN_TARGET}=info"));
    }
    // libunftp and unftp-sbe-fs annotate functions with tracing spans that print whole session
    // structs. Their slog records, which arrive through the bridge below, carry the useful part.
    for noisy in ["libunftp", "unftp_sbe_fs", "unftp_core"] {
        if !directives
            .split(',')
            .any(|directive| directive.trim().starts_with(noisy) && !directive.contains(SESSION_SPAN_TARGET))
        {
            directives.push_str(&format!(",{noisy}=off"));
        }
    }
    directives
}

/// Returns a slog logger whose records become `tracing` events with target `ftpsd::engine`.
pub fn libunftp_logger() -> slog::Logger {
    slog::Logger::root(SlogToTracing, slog::o!())
}

/// libunftp messages that mark a session's life; they become info events with a stable message.
/// libunftp logs everything else at info too, which is debug detail for an operator.
fn promoted_message(message: &str) -> Option<&'static str> {
    if message == "Starting control loop" {
        Some("session started")
    } else if message.starts_with("PASS: User ") && message.ends_with(" logged in") {
        Some("login succeeded")
    } else {
        None
    }
}

/// libunftp warnings and errors that describe a normal client action, not a fault: a client that
/// closes its TLS control connection without close_notify, or that disconnects before the final
/// reply. They become debug events so that warn and error keep their meaning.
fn is_routine_engine_record(message: &str) -> bool {
    (message.starts_with("Control channel error") && message.contains("close_notify"))
        || message.starts_with("Could not notify control channel of successful")
        || message == "Replaced by a new data connection request"
}

/// An outcome that libunftp reports only in a log record.
#[derive(Debug, PartialEq, Eq)]
enum EngineOutcome {
    Login(&'static str),
    DataConnectionFailure(&'static str),
    TlsHandshakeFailure(&'static str),
}

/// Classifies an engine record by its message. The messages are libunftp 0.24.0's and those of
/// the engine patches under patches/libunftp. The unit tests below pin each one, and the
/// end-to-end tests catch a patch that rewords one.
fn engine_outcome(message: &str) -> Option<EngineOutcome> {
    use EngineOutcome::*;
    if message.starts_with("PASS: User ") && message.ends_with(" logged in") {
        return Some(Login("success"));
    }
    if let Some(rest) = message.strip_prefix("PASS: Failed login attempt for user ") {
        // The reason is AuthenticationError's Display text; ftpsd's authenticator returns
        // BadPassword for a known user with a wrong password.
        let bad_password = rest.ends_with("reason=bad password");
        return bad_password.then_some(Login("bad_password"));
    }
    if message.starts_with("PASS: Login attempt for unknown user ") {
        return Some(Login("unknown_user"));
    }
    if message.starts_with("PASS: User authenticated but currently locked out") {
        return Some(Login("locked_out"));
    }
    if message == "Login rejected: TLS is required on the control channel" {
        return Some(Login("tls_missing"));
    }
    if message == "Login rejected because the server is shutting down" {
        return Some(Login("shutting_down"));
    }
    if message.starts_with("TLS handshake on the data connection for ") {
        return Some(TlsHandshakeFailure("data"));
    }
    if message.starts_with("Closing control channel. Could not upgrade to TLS")
        || message.starts_with("Closing control channel. The client sent no complete TLS handshake")
    {
        return Some(TlsHandshakeFailure("control"));
    }
    let reason = match message.strip_prefix("No data connection: ")? {
        "Passive data port expired" => "timeout",
        "Data connection from an unexpected address" => "address_mismatch",
        "No passive port" => "no_passive_port",
        "Could not accept the data connection" => "accept_failed",
        _ => return None,
    };
    Some(DataConnectionFailure(reason))
}

fn count_engine_outcome(message: &str) {
    match engine_outcome(message) {
        Some(EngineOutcome::Login(result)) => metrics::LOGINS.with_label_values(&[result]).inc(),
        Some(EngineOutcome::DataConnectionFailure(reason)) => metrics::DATA_CONNECTION_FAILURES_TOTAL.with_label_values(&[reason]).inc(),
        Some(EngineOutcome::TlsHandshakeFailure(channel)) => {
            metrics::TLS_HANDSHAKE_FAILURES.with_label_values(&[channel]).inc();
            // A failed handshake on a data connection also means the data connection failed.
            if channel == "data" {
                metrics::DATA_CONNECTION_FAILURES_TOTAL.with_label_values(&["tls_handshake"]).inc();
            }
        }
        None if message == "Data channel connection timed out" => {
            // The client connected but sent no data command within libunftp's 5 minutes.
            metrics::DATA_CONNECTION_FAILURES_TOTAL.with_label_values(&["timeout"]).inc();
        }
        None => {}
    }
}

struct SlogToTracing;

impl slog::Drain for SlogToTracing {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &slog::Record<'_>, values: &slog::OwnedKVList) -> Result<(), slog::Never> {
        let mut fields = SessionFields::default();
        // Serializing into a String cannot fail; a failure would only drop fields, never the event.
        let _ = slog::KV::serialize(values, record, &mut fields);
        let _ = slog::KV::serialize(&record.kv(), record, &mut fields);
        let message = record.msg().to_string();
        count_engine_outcome(&message);
        let present = |value: &String| (!value.is_empty()).then(|| value.clone());
        let (session_id, peer, user, extra) = (
            present(&fields.session_id),
            present(&fields.peer),
            present(&fields.user),
            present(&fields.extra),
        );

        macro_rules! emit {
            ($level:expr, $text:expr) => {
                tracing::event!(target: "ftpsd::engine", $level, session_id = session_id, peer = peer, user = user, extra = extra, "{}", $text)
            };
        }
        match record.level() {
            slog::Level::Critical | slog::Level::Error | slog::Level::Warning if is_routine_engine_record(&message) => {
                emit!(tracing::Level::DEBUG, message)
            }
            slog::Level::Critical | slog::Level::Error => emit!(tracing::Level::ERROR, message),
            slog::Level::Warning => emit!(tracing::Level::WARN, message),
            slog::Level::Info => match promoted_message(&message) {
                Some(promoted) => emit!(tracing::Level::INFO, promoted),
                None => emit!(tracing::Level::DEBUG, message),
            },
            slog::Level::Debug => emit!(tracing::Level::DEBUG, message),
            slog::Level::Trace => emit!(tracing::Level::TRACE, message),
        }
        Ok(())
    }
}

/// The values libunftp attaches to its per-session logger.
#[derive(Default)]
struct SessionFields {
    session_id: String,
    peer: String,
    user: String,
    extra: String,
}

impl slog::Serializer for SessionFields {
    fn emit_arguments(&mut self, key: slog::Key, value: &fmt::Arguments<'_>) -> slog::Result {
        let slot = match key {
            "trace-id" => &mut self.session_id,
            "source" => {
                // libunftp's source is the client's socket address. The session span and the
                // transfer lines carry the IP address alone, so this keeps the IP address too.
                let source = value.to_string();
                if self.peer.is_empty() {
                    self.peer = match source.parse::<std::net::SocketAddr>() {
                        Ok(address) => address.ip().to_string(),
                        Err(_) => source,
                    };
                }
                return Ok(());
            }
            "username" => &mut self.user,
            _ => {
                if !self.extra.is_empty() {
                    self.extra.push(' ');
                }
                let _ = write!(self.extra, "{key}={value}");
                return Ok(());
            }
        };
        // Child loggers repeat keys; the innermost value comes first, so keep it.
        if slot.is_empty() {
            let _ = write!(slot, "{value}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_messages_map_to_outcomes() {
        use EngineOutcome::*;
        let cases = [
            ("PASS: User alice logged in", Some(Login("success"))),
            (
                "PASS: Failed login attempt for user alice, reason=bad password",
                Some(Login("bad_password")),
            ),
            ("PASS: Login attempt for unknown user mallory", Some(Login("unknown_user"))),
            (
                "PASS: User authenticated but currently locked out due to previous failed login attempts according to the policy! (Username=alice. Note: ...)",
                Some(Login("locked_out")),
            ),
            ("Login rejected: TLS is required on the control channel", Some(Login("tls_missing"))),
            ("Login rejected because the server is shutting down", Some(Login("shutting_down"))),
            (
                "TLS handshake on the data connection for stor failed: received corrupt message",
                Some(TlsHandshakeFailure("data")),
            ),
            (
                "Closing control channel. Could not upgrade to TLS: peer sent no certificates",
                Some(TlsHandshakeFailure("control")),
            ),
            (
                "Closing control channel. The client sent no complete TLS handshake within 15s after AUTH TLS",
                Some(TlsHandshakeFailure("control")),
            ),
            (
                "No data connection: Passive data port expired",
                Some(DataConnectionFailure("timeout")),
            ),
            (
                "No data connection: Data connection from an unexpected address",
                Some(DataConnectionFailure("address_mismatch")),
            ),
            (
                "No data connection: No passive port",
                Some(DataConnectionFailure("no_passive_port")),
            ),
            ("No data connection: Replaced by a new data connection request", None),
            ("Starting control loop", None),
        ];
        for (message, expected) in cases {
            assert_eq!(engine_outcome(message), expected, "{message}");
        }
    }

    #[test]
    fn default_directives_keep_the_session_span() {
        let directives = with_default_directives("info".to_string());
        assert!(directives.contains("libunftp::session=info"), "{directives}");
        assert!(directives.contains("libunftp=off"), "{directives}");

        let explicit = with_default_directives("info,libunftp=debug".to_string());
        assert!(!explicit.contains("libunftp=off"), "{explicit}");
        assert!(EnvFilter::try_new(&explicit).is_ok());
    }

    #[test]
    fn source_becomes_the_peer_address() {
        let mut fields = SessionFields::default();
        slog::Serializer::emit_arguments(&mut fields, "source", &format_args!("127.0.0.1:40123")).unwrap();
        assert_eq!(fields.peer, "127.0.0.1");
    }
}
