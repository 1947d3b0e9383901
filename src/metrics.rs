//! Prometheus metrics of ftpsd, registered in the default registry next to libunftp's own.

use std::{sync::LazyLock, time::Duration};

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts};

fn register<T: prometheus::core::Collector + Clone + 'static>(collector: T) -> T {
    // Registration fails only for a duplicate name; each name below is registered once.
    prometheus::register(Box::new(collector.clone())).expect("metric names are unique");
    collector
}

pub static TRANSFERS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "ftpsd_transfers_total",
                "File transfers by direction (upload, download) and result (ok, failed, incomplete).",
            ),
            &["direction", "result"],
        )
        .expect("valid metric options"),
    )
});

pub static TRANSFER_BYTES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new("ftpsd_transfer_bytes_total", "Bytes of file content moved, by direction."),
            &["direction"],
        )
        .expect("valid metric options"),
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

pub static SESSIONS_ACTIVE: LazyLock<IntGauge> = LazyLock::new(|| {
    register(IntGauge::new("ftpsd_sessions_active", "Control connections currently open.").expect("valid metric options"))
});

/// Counts one finished transfer.
pub fn record_transfer(direction: &str, result: &str, bytes: u64, duration: Duration) {
    TRANSFERS.with_label_values(&[direction, result]).inc();
    TRANSFER_BYTES.with_label_values(&[direction]).inc_by(bytes);
    TRANSFER_SECONDS.with_label_values(&[direction]).observe(duration.as_secs_f64());
}
