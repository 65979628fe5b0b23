//! Every metric of the ingest, declared in one place with its help text.
//!
//! Names carry the project prefix (`iot_`) and their unit. Label values are
//! always `&'static str` taken from the small enums of the code that counts
//! them, so a device can never create a new time series.

use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge};

/// Gauge: device connections held (CONNECT accepted, not yet closed).
pub const CONNECTIONS: &str = "iot_ingest_connections";
/// Counter: CONNECTs accepted.
pub const CONNECTS: &str = "iot_ingest_connects_total";
/// Counter by `reason`: accepted connections that ended.
pub const DISCONNECTS: &str = "iot_ingest_disconnects_total";
/// Counter by `reason`: connections refused before or at CONNECT.
pub const CONNECTS_REFUSED: &str = "iot_ingest_connects_refused_total";
/// Counter by `kind`: events written to the streams (heartbeats count one
/// per device in a batch).
pub const EVENTS_WRITTEN: &str = "iot_ingest_events_written_total";
/// Histogram: stream entries per writer flush.
pub const FLUSH_BATCH: &str = "iot_ingest_flush_batch_entries";
/// Histogram: duration of one pipelined flush.
pub const FLUSH_DURATION: &str = "iot_ingest_flush_duration_seconds";
/// Gauge: events waiting in the writer (including one heartbeat per device).
pub const BUFFERED: &str = "iot_ingest_buffered_events";
/// Counter by `reason`: events dropped without being written.
pub const EVENTS_DROPPED: &str = "iot_ingest_events_dropped_total";
/// Counter by `op`: failed Redis operations.
pub const REDIS_ERRORS: &str = "iot_ingest_redis_errors_total";
/// Counter by `kind`: protocol violations of connected devices. All close
/// the connection except `subscribe_refused` (answered with SUBACK 0x80).
pub const PROTOCOL_VIOLATIONS: &str = "iot_ingest_protocol_violations_total";
/// Counter by `scope` (`local`, `remote`): connections closed by a takeover.
pub const TAKEOVERS: &str = "iot_ingest_takeovers_total";
/// Gauge: the connection limit in force (from config or the open-file limit).
pub const CONNECTION_LIMIT: &str = "iot_ingest_connection_limit";
/// Counter by `attempt` (`first`, `retransmit`): downlink PUBLISHes written.
pub const DOWNLINK_PUBLISHES: &str = "iot_ingest_downlink_publishes_total";
/// Counter by `outcome`: what this instance decided about commands.
pub const DOWNLINK_OUTCOMES: &str = "iot_ingest_downlink_outcomes_total";
/// Gauge: commands sent and waiting for their PUBACK.
pub const DOWNLINK_INFLIGHT: &str = "iot_ingest_downlink_inflight";
/// Gauge: commands waiting for a place under the inflight limit.
pub const DOWNLINK_WAITING: &str = "iot_ingest_downlink_waiting";
/// Histogram: from the first transmission of a command to its PUBACK.
pub const DOWNLINK_ACK: &str = "iot_ingest_downlink_ack_seconds";
/// Counter: commands taken from offline queues and handed to connections.
pub const DOWNLINK_DRAINED: &str = "iot_ingest_downlink_drained_total";
/// Counter: reports that found their reporter lane full and ran on their own.
pub const REPORT_OVERFLOW: &str = "iot_ingest_downlink_report_overflow_total";
/// Counter: reports not applied because the reporter had finished (shutdown).
pub const REPORTS_DROPPED: &str = "iot_ingest_downlink_reports_dropped_total";
/// Counter by `reason`: CONNECTs refused for their credentials.
pub const AUTH_FAILURES: &str = "iot_ingest_auth_failures_total";
/// Counter by `result` (`hit`, `miss`, `stale`): credential cache lookups.
pub const AUTH_CACHE: &str = "iot_ingest_auth_cache_total";
/// Counter: connections closed because their device was disabled or deleted.
pub const AUTH_REVOKED: &str = "iot_ingest_auth_revoked_total";

/// Counter: liveness beats that found the instance's key gone (reaped, or
/// Redis lost its data), each followed by a re-announcement.
pub const LIVENESS_LAPSES: &str = "iot_ingest_liveness_lapses_total";
/// Counter by `result` (`renewed`, `superseded`): connections re-announced
/// with a new epoch, or closed because a newer connection held the device.
pub const REANNOUNCED: &str = "iot_ingest_reannounced_sessions_total";

/// Registers help text and units with the recorder. Safe to call repeatedly.
pub fn describe() {
    describe_gauge!(CONNECTIONS, "Device connections held by this instance");
    describe_counter!(CONNECTS, "CONNECTs accepted");
    describe_counter!(
        DISCONNECTS,
        "Accepted connections that ended, by reason (disconnect, closed, reset, keepalive, takeover, server_shutdown, protocol_error)"
    );
    describe_counter!(
        CONNECTS_REFUSED,
        "Connections refused before or at CONNECT, by reason (max_connections, rate_limited, identifier_rejected, not_authorized, server_unavailable, bad_protocol, connect_timeout, malformed, closed_before_connect, shutting_down, fd_exhausted)"
    );
    describe_counter!(
        EVENTS_WRITTEN,
        "Events written to the event streams, by kind"
    );
    describe_histogram!(FLUSH_BATCH, "Stream entries per writer flush");
    describe_histogram!(
        FLUSH_DURATION,
        Unit::Seconds,
        "Duration of one pipelined XADD flush"
    );
    describe_gauge!(
        BUFFERED,
        "Events waiting in the writer, including one pending heartbeat per device"
    );
    describe_counter!(
        EVENTS_DROPPED,
        "Events dropped without being written, by reason (buffer_full, shutdown)"
    );
    describe_counter!(REDIS_ERRORS, "Failed Redis operations, by operation");
    describe_counter!(
        PROTOCOL_VIOLATIONS,
        "Protocol violations of connected devices, by kind; all close the connection except subscribe_refused (SUBACK 0x80)"
    );
    describe_counter!(
        TAKEOVERS,
        "Connections closed because a newer CONNECT took the session over, by scope (local, remote, rebind)"
    );
    describe_gauge!(CONNECTION_LIMIT, "The device connection limit in force");
    describe_counter!(
        DOWNLINK_PUBLISHES,
        "Downlink command PUBLISHes written to devices, by attempt (first, retransmit)"
    );
    describe_counter!(
        DOWNLINK_OUTCOMES,
        "What this instance decided about downlink commands, by outcome (acked, timed_out, expired, no_subscription, parked, requeued, forwarded, device_gone, rejected)"
    );
    describe_gauge!(
        DOWNLINK_INFLIGHT,
        "Downlink commands sent and waiting for the device's PUBACK"
    );
    describe_gauge!(
        DOWNLINK_WAITING,
        "Downlink commands waiting for a place under the per-device inflight limit"
    );
    describe_histogram!(
        DOWNLINK_ACK,
        Unit::Seconds,
        "From the first transmission of a downlink command to the device's PUBACK"
    );
    describe_counter!(
        DOWNLINK_DRAINED,
        "Commands taken from offline queues and handed to device connections"
    );
    describe_counter!(
        REPORT_OVERFLOW,
        "Command state changes that found their reporter lane full and ran in a task of their own"
    );
    describe_counter!(
        REPORTS_DROPPED,
        "Command state changes not applied because the reporter had finished (left to the sweeper)"
    );
    describe_counter!(
        AUTH_FAILURES,
        "CONNECTs refused for their credentials, by reason (wrong_secret, unknown_device, disabled, username_mismatch, missing_credentials)"
    );
    describe_counter!(
        AUTH_CACHE,
        "Registry credential lookups, by result (hit: answered from the cache; miss: asked PostgreSQL; stale: PostgreSQL failed and an expired positive entry answered)"
    );
    describe_counter!(
        AUTH_REVOKED,
        "Connections closed because their device was disabled or deleted"
    );
    describe_counter!(
        LIVENESS_LAPSES,
        "Liveness beats that found the instance's key gone (it was cut off from Redis for longer than the liveness TTL, or Redis lost its data)"
    );
    describe_counter!(
        REANNOUNCED,
        "Sessions re-announced after a liveness lapse, by result (renewed: new epoch and connected event; superseded: closed, the device connected elsewhere)"
    );
    iot_downlink::metrics::describe();
}

/// A liveness beat found the key gone.
pub fn liveness_lapsed() {
    counter!(LIVENESS_LAPSES).increment(1);
}

/// Counts a re-announcement's connections.
pub fn rebound(renewed: usize, superseded: usize) {
    counter!(REANNOUNCED, "result" => "renewed").increment(renewed as u64);
    counter!(REANNOUNCED, "result" => "superseded").increment(superseded as u64);
}

/// Counts a downlink PUBLISH (`first` or `retransmit`).
pub fn downlink_publish(dup: bool) {
    let attempt = if dup { "retransmit" } else { "first" };
    counter!(DOWNLINK_PUBLISHES, "attempt" => attempt).increment(1);
}

/// Counts a decision about a command.
pub fn downlink_outcome(outcome: &'static str, n: u64) {
    counter!(DOWNLINK_OUTCOMES, "outcome" => outcome).increment(n);
}

/// Moves the inflight and waiting gauges by what one connection changed.
pub fn downlink_held(inflight: i64, waiting: i64) {
    if inflight != 0 {
        gauge!(DOWNLINK_INFLIGHT).increment(inflight as f64);
    }
    if waiting != 0 {
        gauge!(DOWNLINK_WAITING).increment(waiting as f64);
    }
}

/// Records the time from a command's first transmission to its PUBACK.
pub fn downlink_acked_after(d: std::time::Duration) {
    metrics::histogram!(DOWNLINK_ACK).record(d.as_secs_f64());
}

/// Counts commands handed from a queue to a connection.
pub fn drained(n: usize) {
    counter!(DOWNLINK_DRAINED).increment(n as u64);
}

/// Counts a report that ran outside its lane.
pub fn report_overflow() {
    counter!(REPORT_OVERFLOW).increment(1);
}

/// Counts reports dropped at shutdown.
pub fn reports_dropped(n: u64) {
    counter!(REPORTS_DROPPED).increment(n);
}

/// Counts a credential refusal.
pub fn auth_failure(reason: &'static str) {
    counter!(AUTH_FAILURES, "reason" => reason).increment(1);
}

/// Counts a credential cache lookup.
pub fn auth_cache(result: &'static str) {
    counter!(AUTH_CACHE, "result" => result).increment(1);
}

/// Counts a revoked connection.
pub fn auth_revoked() {
    counter!(AUTH_REVOKED).increment(1);
}

/// Counts a refused connection.
pub fn refused(reason: &'static str) {
    counter!(CONNECTS_REFUSED, "reason" => reason).increment(1);
}

/// Counts a failed Redis operation.
pub fn redis_error(op: &'static str) {
    counter!(REDIS_ERRORS, "op" => op).increment(1);
}

/// Counts a protocol violation on an established connection.
pub fn violation(kind: &'static str) {
    counter!(PROTOCOL_VIOLATIONS, "kind" => kind).increment(1);
}

/// Counts a takeover.
pub fn takeover(scope: &'static str) {
    counter!(TAKEOVERS, "scope" => scope).increment(1);
}

/// A connection was accepted.
pub fn connected() {
    counter!(CONNECTS).increment(1);
    gauge!(CONNECTIONS).increment(1.0);
}

/// An accepted connection ended.
pub fn disconnected(reason: &'static str) {
    counter!(DISCONNECTS, "reason" => reason).increment(1);
    gauge!(CONNECTIONS).decrement(1.0);
}
