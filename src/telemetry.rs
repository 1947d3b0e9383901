//! Logging: one `tracing` subscriber (human text or JSON lines), and a slog drain that routes
//! libunftp's records into it with the session id, peer and user as fields.

use std::{
    fmt::{self, Write as _},
    io::IsTerminal as _,
};

use tracing_subscriber::{EnvFilter, fmt::format::FmtSpan};

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber. `RUST_LOG`, when set, replaces `log.level`.
pub fn init(config: &LogConfig) {
    let mut directives = std::env::var("RUST_LOG")
        .ok()
        .filter(|value| EnvFilter::try_new(value).is_ok())
        .unwrap_or_else(|| config.level.clone());
    // rustls warns about every client that sends an IP address as SNI, which lftp and curl do.
    if !directives.contains("rustls") {
        directives.push_str(",rustls=error");
    }
    // libunftp and unftp-sbe-fs annotate functions with tracing spans that print whole session
    // structs; their slog records, which reach us through the bridge below, carry the useful part.
    for noisy in ["libunftp", "unftp_sbe_fs", "unftp_core"] {
        if !directives.contains(noisy) {
            directives.push_str(&format!(",{noisy}=off"));
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(directives))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_span_events(FmtSpan::NONE);
    // try_init fails only when a subscriber is already installed, as in unit tests.
    let _ = match config.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).try_init(),
    };
}

/// A slog logger whose records become `tracing` events with target `ftpsd::engine`.
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
            "source" => &mut self.peer,
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
