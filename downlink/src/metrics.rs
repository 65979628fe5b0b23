//! Downlink metrics, declared in one place.

use std::time::Duration;

use crate::command::Status;

/// Describes the metrics (call once at start).
pub fn describe() {
    metrics::describe_counter!(
        "iot_downlink_commands_total",
        "Commands that reached a terminal state, by status"
    );
    metrics::describe_histogram!(
        "iot_downlink_roundtrip_seconds",
        metrics::Unit::Seconds,
        "From command creation to the device's PUBACK"
    );
    metrics::describe_gauge!(
        "iot_downlink_deadlines",
        "Commands not yet in a terminal state, watched by the sweeper"
    );
    metrics::describe_gauge!(
        "iot_downlink_open_commands",
        "Commands in each non-terminal state, deployment-wide (status=queued is the offline queue depth)"
    );
    metrics::describe_counter!(
        "iot_downlink_sweeps_total",
        "Commands the sweeper acted on, by action"
    );
    metrics::describe_counter!(
        STALE_VERDICTS,
        "Command state changes refused because the connection reporting them is no longer the one the command is dispatched to, by op"
    );
    metrics::describe_counter!(
        REPORTS_SHED,
        "Command state changes not applied because the reporter's lane and its overflow were full (the sweeper resolves those commands)"
    );
}

/// Counter: verdicts from a connection the command has left, by `op`.
pub const STALE_VERDICTS: &str = "iot_downlink_stale_verdicts_total";
/// Counter: reports shed under overload.
pub const REPORTS_SHED: &str = "iot_downlink_reports_shed_total";

/// Counts a verdict refused as stale.
pub fn stale_verdict(op: &'static str) {
    metrics::counter!(STALE_VERDICTS, "op" => op).increment(1);
}

/// Counts a report shed under overload.
pub fn report_shed() {
    metrics::counter!(REPORTS_SHED).increment(1);
}

/// Counts a terminal state; `roundtrip` is recorded for acked commands.
pub fn terminal(status: Status, roundtrip: Option<Duration>) {
    metrics::counter!("iot_downlink_commands_total", "status" => status.as_str()).increment(1);
    if let Some(rt) = roundtrip {
        metrics::histogram!("iot_downlink_roundtrip_seconds").record(rt.as_secs_f64());
    }
}

/// Publishes the deployment-wide counts of open commands.
pub fn open(counts: &crate::store::OpenCounts) {
    for (status, n) in [
        (Status::Queued, counts.queued),
        (Status::Dispatched, counts.dispatched),
        (Status::Sent, counts.sent),
    ] {
        metrics::gauge!("iot_downlink_open_commands", "status" => status.as_str()).set(n as f64);
    }
}

/// A duration in ms.
pub fn ms(d: Duration) -> i64 {
    iot_core::config::millis(d)
}
