//! The Prometheus recorder, installed once per process.
//!
//! Every metric name starts with [`PREFIX`] and carries its unit
//! (`_seconds`, `_bytes`, `_total`). Histograms whose names end in `_seconds`
//! get latency buckets; those ending in `_entries` or `_events` get size
//! buckets. Each service declares its metrics in one module of its own.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Prefix of every metric of the project.
pub const PREFIX: &str = "iot_";

const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
const SIZE_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the global recorder on first use and returns its handle. Several
/// services started in one process (tests) share it.
pub fn handle() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("_entries".into()), SIZE_BUCKETS)
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("_events".into()), SIZE_BUCKETS)
                })
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder is installed, in which case our
            // handle renders an empty registry rather than taking the process down.
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
            }
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(Duration::from_secs(5));
                        upkeep.run_upkeep();
                    }
                })
                .ok();
            describe_process_metrics();
            handle
        })
        .clone()
}

fn describe_process_metrics() {
    metrics::describe_gauge!(
        "iot_process_resident_memory_bytes",
        metrics::Unit::Bytes,
        "Resident memory of the process"
    );
    metrics::describe_gauge!(
        "iot_process_open_fds",
        "Open file descriptors of the process"
    );
    metrics::describe_gauge!("iot_process_max_fds", "Soft limit of open file descriptors");
    metrics::describe_gauge!(
        "iot_build_info",
        "Always 1; labels carry the service and version"
    );
}

/// Resident set size of this process in bytes (Linux; 0 elsewhere).
pub fn resident_memory_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// Number of open file descriptors of this process (Linux; 0 elsewhere).
pub fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count() as u64)
        .unwrap_or(0)
}

/// Updates the process gauges, then renders the text exposition.
pub fn render(handle: &PrometheusHandle) -> String {
    metrics::gauge!("iot_process_resident_memory_bytes").set(resident_memory_bytes() as f64);
    metrics::gauge!("iot_process_open_fds").set(open_fds() as f64);
    if let Ok((soft, _)) = rlimit_nofile() {
        metrics::gauge!("iot_process_max_fds").set(soft as f64);
    }
    handle.render()
}

fn rlimit_nofile() -> std::io::Result<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/self/limits")?;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("Max open files") {
            let mut it = rest.split_whitespace();
            let soft = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            let hard = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            return Ok((soft, hard));
        }
    }
    Ok((0, 0))
}
