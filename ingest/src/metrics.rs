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
        "Connections closed because a newer CONNECT took the session over, by scope"
    );
    describe_gauge!(CONNECTION_LIMIT, "The device connection limit in force");
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
