//! The projector's metrics, declared in one place.

use std::time::Duration;

/// Events merged into views, by kind (`kind` label; a heartbeat batch counts
/// each heartbeat).
pub const EVENTS_APPLIED: &str = "iot_projector_events_applied_total";
/// Time to apply one batch of stream entries (scripts, index, ack).
pub const BATCH_DURATION: &str = "iot_projector_batch_duration_seconds";
/// Stream entries per applied batch.
pub const BATCH_ENTRIES: &str = "iot_projector_batch_entries";
/// Entries delivered to a projector and not yet acknowledged.
pub const LAG_PENDING: &str = "iot_projector_lag_pending_entries";
/// Entries not yet delivered to any projector.
pub const LAG_UNDELIVERED: &str = "iot_projector_lag_undelivered_entries";
/// Age of the oldest entry not yet applied.
pub const LAG_OLDEST_AGE: &str = "iot_projector_lag_oldest_age_seconds";
/// Online/offline transitions written to the index and lifecycle (`to`,
/// `reason` labels).
pub const TRANSITIONS: &str = "iot_projector_transitions_total";
/// Sessions marked tcp_down(server_lost) by the reaper.
pub const REAPED_SESSIONS: &str = "iot_projector_reaped_sessions_total";
/// Pending entries claimed from other consumers (XAUTOCLAIM).
pub const CLAIMED_ENTRIES: &str = "iot_projector_claimed_entries_total";
/// Entries (or events) that could not be projected and were acknowledged.
pub const BAD_ENTRIES: &str = "iot_projector_bad_entries_total";
/// Event entries Redis refused as data, moved to the dead-letter stream.
pub const DEAD_LETTERS: &str = "iot_projector_dead_letters_total";
/// Redis errors, by operation (`op` label); the operation is retried.
pub const REDIS_ERRORS: &str = "iot_projector_redis_errors_total";
/// Devices evaluated because their state may change with time.
pub const DUE_EVALUATIONS: &str = "iot_projector_due_evaluations_total";

/// Describes every metric (help text and unit) to the recorder.
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(EVENTS_APPLIED, "Events merged into session views, by kind");
    describe_histogram!(
        BATCH_DURATION,
        Unit::Seconds,
        "Time to apply one batch of stream entries"
    );
    describe_histogram!(BATCH_ENTRIES, "Stream entries per applied batch");
    describe_gauge!(
        LAG_PENDING,
        "Entries delivered to a projector and not yet acknowledged (all shards)"
    );
    describe_gauge!(
        LAG_UNDELIVERED,
        "Entries not yet delivered to any projector (all shards)"
    );
    describe_gauge!(
        LAG_OLDEST_AGE,
        Unit::Seconds,
        "Age of the oldest entry not yet applied"
    );
    describe_counter!(
        TRANSITIONS,
        "Online/offline transitions of the online index, by direction and reason"
    );
    describe_counter!(
        REAPED_SESSIONS,
        "Sessions of lapsed ingest instances marked tcp_down(server_lost)"
    );
    describe_counter!(
        CLAIMED_ENTRIES,
        "Pending entries claimed from idle consumers"
    );
    describe_counter!(
        BAD_ENTRIES,
        "Stream entries or events that could not be projected (acknowledged and skipped)"
    );
    describe_counter!(
        DEAD_LETTERS,
        "Event entries Redis refused to apply as data, moved to stream:dead:projector and acknowledged"
    );
    describe_counter!(REDIS_ERRORS, "Redis errors by operation (each is retried)");
    describe_counter!(
        DUE_EVALUATIONS,
        "Devices evaluated because their state may change with time"
    );
}

/// Counts events of `kind` applied.
pub fn events_applied(kind: &'static str, n: u64) {
    metrics::counter!(EVENTS_APPLIED, "kind" => kind).increment(n);
    crate::lag::count_events_applied(n);
}

/// Records one applied batch.
pub fn batch(entries: usize, took: Duration) {
    metrics::histogram!(BATCH_DURATION).record(took.as_secs_f64());
    metrics::histogram!(BATCH_ENTRIES).record(entries as f64);
}

/// Counts one flip of the online index.
pub fn transition(online: bool, reason: &str) {
    let to = if online { "online" } else { "offline" };
    metrics::counter!(TRANSITIONS, "to" => to, "reason" => reason.to_owned()).increment(1);
}

/// Counts bad entries.
pub fn bad_entries(n: u64) {
    metrics::counter!(BAD_ENTRIES).increment(n);
}

/// Counts one entry moved to the dead-letter stream.
pub fn dead_letter() {
    metrics::counter!(DEAD_LETTERS).increment(1);
}

/// Counts a Redis error of operation `op`.
pub fn redis_error(op: &'static str) {
    metrics::counter!(REDIS_ERRORS, "op" => op).increment(1);
}

/// Counts claimed entries.
pub fn claimed(n: u64) {
    metrics::counter!(CLAIMED_ENTRIES).increment(n);
}

/// Counts reaped sessions.
pub fn reaped(n: u64) {
    metrics::counter!(REAPED_SESSIONS).increment(n);
}

/// Counts due evaluations.
pub fn due_evaluations(n: u64) {
    metrics::counter!(DUE_EVALUATIONS).increment(n);
}

/// Sets the lag gauges.
pub fn lag(pending: u64, undelivered: u64, oldest_age_ms: i64) {
    metrics::gauge!(LAG_PENDING).set(pending as f64);
    metrics::gauge!(LAG_UNDELIVERED).set(undelivered as f64);
    metrics::gauge!(LAG_OLDEST_AGE).set(oldest_age_ms.max(0) as f64 / 1000.0);
}
