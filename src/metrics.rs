//! Prometheus metrics of ftpsd, registered in the default registry next to libunftp's own
//! (`ftp_*`), so that one scrape of `/metrics` returns both.
//!
//! Counters with labels are created for every known label value by [`init`], so that a dashboard
//! shows 0 instead of no series before the first event.

use std::{
    sync::LazyLock,
    time::{Duration, SystemTime},
};

use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts};

fn register<T: prometheus::core::Collector + Clone + 'static>(collector: T) -> T {
    // Registration fails only for a duplicate name; each name below is registered once.
    prometheus::register(Box::new(collector.clone())).expect("metric names are unique");
    collector
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric options"))
}

fn gauge(name: &str, help: &str) -> IntGauge {
    register(IntGauge::new(name, help).expect("valid metric options"))
}

/// Transfer directions that `crate::storage` reports.
pub const DIRECTIONS: [&str; 2] = ["upload", "download"];

/// Transfer results that `crate::storage` reports.
pub const TRANSFER_RESULTS: [&str; 3] = ["ok", "failed", "incomplete"];

/// Login results: every outcome of USER and PASS that the engine reports.
pub const LOGIN_RESULTS: [&str; 6] = [
    "success",
    "bad_password",
    "unknown_user",
    "locked_out",
    "tls_missing",
    "shutting_down",
];

/// Reasons why a data connection was not made or not used.
pub const DATA_CONNECTION_FAILURES: [&str; 5] = ["timeout", "address_mismatch", "tls_handshake", "no_passive_port", "accept_failed"];

/// Channels on which a TLS handshake can fail.
pub const TLS_CHANNELS: [&str; 2] = ["control", "data"];

pub static TRANSFERS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "ftpsd_transfers_total",
        "File transfers by direction (upload, download) and result (ok, failed, incomplete).",
        &["direction", "result"],
    )
});

pub static TRANSFER_BYTES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "ftpsd_transfer_bytes_total",
        "Bytes of file content moved, by direction: upload is bytes in, download is bytes out.",
        &["direction"],
    )
});

pub static TRANSFER_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    register(
        HistogramVec::new(
            HistogramOpts::new("ftpsd_transfer_duration_seconds", "Duration of file transfers, by direction.")
                .buckets(vec![0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 1800.0]),
            &["direction"],
        )
        .expect("valid metric options"),
    )
});

pub static SESSIONS_ACTIVE: LazyLock<IntGauge> = LazyLock::new(|| gauge("ftpsd_sessions_active", "Control connections currently open."));

pub static SESSIONS: LazyLock<IntCounter> = LazyLock::new(|| {
    register(IntCounter::new("ftpsd_sessions_total", "Control connections accepted since start.").expect("valid metric options"))
});

pub static LOGINS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "ftpsd_logins_total",
        "Login attempts by result: success, bad_password, unknown_user, locked_out, tls_missing (USER or PASS before AUTH TLS), shutting_down (rejected during the drain).",
        &["result"],
    )
});

pub static DATA_CONNECTION_FAILURES_TOTAL: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "ftpsd_data_connection_failures_total",
        "Data connections that failed, by reason: timeout (no connection or no command in time), address_mismatch (connection from another address than the control connection), tls_handshake, no_passive_port (range exhausted), accept_failed.",
        &["reason"],
    )
});

pub static TLS_HANDSHAKE_FAILURES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "ftpsd_tls_handshake_failures_total",
        "Failed or timed-out TLS handshakes, by channel (control after AUTH TLS, data after PROT P).",
        &["channel"],
    )
});

pub static PASSIVE_PORTS_IN_USE: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "ftpsd_passive_ports_in_use",
        "Passive ports with a listener waiting for a client (per-session mode) or an open data connection, measured at scrape time.",
    )
});

pub static PASSIVE_PORTS_POOL_SIZE: LazyLock<IntGauge> =
    LazyLock::new(|| gauge("ftpsd_passive_ports_pool_size", "Ports in passive.ports."));

pub static CERTIFICATE_EXPIRY: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "ftpsd_certificate_expiry_timestamp_seconds",
        "Expiry (notAfter) of the certificate served to new TLS sessions, in seconds since the Unix epoch.",
    )
});

pub static RELOADS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "ftpsd_reloads_total",
        "Reloads of the certificate and the users file, by kind (certificate, users) and result (ok, failed).",
        &["kind", "result"],
    )
});

pub static DRAINING: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "ftpsd_draining",
        "1 from SIGTERM or SIGINT until exit, while sessions drain; 0 otherwise.",
    )
});

static BUILD_INFO: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register(
        IntGaugeVec::new(
            Opts::new("ftpsd_build_info", "Always 1; the labels name the ftpsd and libunftp versions."),
            &["version", "libunftp"],
        )
        .expect("valid metric options"),
    )
});

/// libunftp version that Cargo.toml pins.
pub const LIBUNFTP_VERSION: &str = "0.24.0";

/// Registers every metric, creates every known label value at 0, and sets the values known at
/// start.
pub fn init(passive_pool_size: usize, certificate_not_after: SystemTime) {
    for direction in DIRECTIONS {
        for result in TRANSFER_RESULTS {
            TRANSFERS.with_label_values(&[direction, result]);
        }
        TRANSFER_BYTES.with_label_values(&[direction]);
        TRANSFER_SECONDS.with_label_values(&[direction]);
    }
    for result in LOGIN_RESULTS {
        LOGINS.with_label_values(&[result]);
    }
    for reason in DATA_CONNECTION_FAILURES {
        DATA_CONNECTION_FAILURES_TOTAL.with_label_values(&[reason]);
    }
    for channel in TLS_CHANNELS {
        TLS_HANDSHAKE_FAILURES.with_label_values(&[channel]);
    }
    for kind in ["certificate", "users"] {
        for result in ["ok", "failed"] {
            RELOADS.with_label_values(&[kind, result]);
        }
    }
    LazyLock::force(&SESSIONS_ACTIVE);
    LazyLock::force(&SESSIONS);
    LazyLock::force(&PASSIVE_PORTS_IN_USE);
    LazyLock::force(&DRAINING);

    PASSIVE_PORTS_POOL_SIZE.set(i64::try_from(passive_pool_size).unwrap_or(i64::MAX));
    set_certificate_expiry(certificate_not_after);
    BUILD_INFO.with_label_values(&[env!("CARGO_PKG_VERSION"), LIBUNFTP_VERSION]).set(1);
}

/// Sets the certificate expiry gauge, after start and after each certificate reload.
pub fn set_certificate_expiry(not_after: SystemTime) {
    let seconds = not_after
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| i64::try_from(since.as_secs()).unwrap_or(i64::MAX));
    CERTIFICATE_EXPIRY.set(seconds);
}

/// Counts one finished transfer.
pub fn record_transfer(direction: &str, result: &str, bytes: u64, duration: Duration) {
    TRANSFERS.with_label_values(&[direction, result]).inc();
    TRANSFER_BYTES.with_label_values(&[direction]).inc_by(bytes);
    TRANSFER_SECONDS.with_label_values(&[direction]).observe(duration.as_secs_f64());
}

/// Returns the number of transfers finished since start, whatever their result.
pub fn transfers_finished() -> u64 {
    DIRECTIONS
        .iter()
        .flat_map(|direction| TRANSFER_RESULTS.iter().map(move |result| (direction, result)))
        .map(|(direction, result)| TRANSFERS.with_label_values(&[direction, result]).get())
        .sum()
}

/// Renders every registered metric, libunftp's included, in the Prometheus text format.
pub fn render() -> String {
    let families = prometheus::gather();
    // Encoding into a String only fails for invalid metric names, and every name here is valid.
    prometheus::TextEncoder::new()
        .encode_to_string(&families)
        .expect("metric families encode as text")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_exports_every_label_value_at_zero() {
        init(20, SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000));
        let text = render();
        for line in [
            "ftpsd_logins_total{result=\"locked_out\"} 0",
            "ftpsd_data_connection_failures_total{reason=\"address_mismatch\"} 0",
            "ftpsd_tls_handshake_failures_total{channel=\"control\"} 0",
            "ftpsd_passive_ports_pool_size 20",
            "ftpsd_certificate_expiry_timestamp_seconds 1900000000",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
        assert!(text.contains("ftpsd_build_info{libunftp=\"0.24.0\",version=\""), "{text}");
    }
}
