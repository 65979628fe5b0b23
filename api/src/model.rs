//! JSON shapes shared by several routes: the policy's explanation and the
//! projection lag.

use std::time::Duration;

use iot_core::config::duration;
use iot_core::registry::Lag;
use iot_core::{Evaluation, Policy};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::timestamp::rfc3339_opt;

/// The terms of the score; `score` is their sum.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Terms {
    /// +1 while the heartbeat is fresh, else 0.
    pub heartbeat: f64,
    /// `-tcp_down_penalty` within the TCP drop window, else 0.
    pub tcp_down: f64,
    /// `-ack_timeout_penalty` within the ACK window, else 0.
    pub ack_timeout: f64,
}

/// The policy's answer at one instant, with its workings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Explanation {
    /// The verdict.
    pub online: bool,
    /// Sum of the terms.
    pub score: f64,
    /// Each term of the score.
    pub terms: Terms,
    /// What the score is compared with (a disabled policy: 1, heartbeat only).
    pub threshold: f64,
    /// Why: `heartbeat_fresh`, `never_seen`, `heartbeat_expired`,
    /// `disconnected`, `tcp_down:{reason}` or `ack_timeout`.
    #[schema(example = "heartbeat_fresh")]
    pub reason: String,
    /// When the answer changes with time alone (heartbeat expiry, end of a
    /// penalty window), RFC 3339; null if only a new event can change it.
    pub next_change: Option<String>,
}

impl From<&Evaluation> for Explanation {
    fn from(e: &Evaluation) -> Self {
        Self {
            online: e.online,
            score: e.score,
            terms: Terms {
                heartbeat: e.heartbeat_term,
                tcp_down: e.tcp_down_term,
                ack_timeout: e.ack_timeout_term,
            },
            threshold: e.threshold,
            reason: e.reason.name(),
            next_change: rfc3339_opt(e.next_change_ms),
        }
    }
}

/// The policy used for an answer, named like the config keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PolicyInfo {
    /// `policy.enabled`.
    pub enabled: bool,
    /// `session.heartbeat_timeout`, such as `5m`.
    pub heartbeat_timeout: String,
    /// `policy.tcp_down_window`.
    pub tcp_down_window: String,
    /// `policy.ack_window`.
    pub ack_window: String,
    /// `policy.tcp_down_penalty`.
    pub tcp_down_penalty: f64,
    /// `policy.ack_timeout_penalty`.
    pub ack_timeout_penalty: f64,
    /// `policy.threshold`.
    pub threshold: f64,
}

fn dur(ms: i64) -> String {
    duration::format(std::time::Duration::from_millis(ms.max(0) as u64))
}

impl From<&Policy> for PolicyInfo {
    fn from(p: &Policy) -> Self {
        Self {
            enabled: p.enabled,
            heartbeat_timeout: dur(p.heartbeat_timeout_ms),
            tcp_down_window: dur(p.tcp_down_window_ms),
            ack_window: dur(p.ack_window_ms),
            tcp_down_penalty: p.tcp_down_penalty,
            ack_timeout_penalty: p.ack_timeout_penalty,
            threshold: p.threshold,
        }
    }
}

/// How far the projection lags behind the event streams, as last published
/// by the projectors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LagInfo {
    /// Stream entries not yet applied: `pending + undelivered`.
    pub entries: u64,
    /// Entries delivered to a projector and not yet acknowledged.
    pub pending: u64,
    /// Entries not yet delivered to any projector.
    pub undelivered: u64,
    /// Age in ms of the oldest entry not yet applied; 0 when caught up.
    pub oldest_age_ms: i64,
    /// Projectors in the consumer group.
    pub consumers: u64,
    /// When the projectors published this, RFC 3339; null if they never did
    /// (no projector has run).
    pub updated_at: Option<String>,
    /// Age in ms of this record (the API's clock minus `updated_at`, at
    /// least 0); null if the projectors never published one.
    pub age_ms: Option<i64>,
    /// The record is older than 3 x `projector.lag_interval` (at least 10 s)
    /// or was never published: no projector is publishing, so the figures
    /// above may be frozen.
    pub stale: bool,
}

/// Age after which a lag record is `stale`: three publishing rounds
/// (`projector.lag_interval`), and at least 10 s so that a busy projector or
/// some clock skew between hosts does not flag it.
pub fn stale_after(lag_interval: Duration) -> Duration {
    lag_interval.saturating_mul(3).max(Duration::from_secs(10))
}

impl LagInfo {
    /// The answer for `l`, read at `now_ms`; stale when older than
    /// `stale_after`.
    pub fn new(l: &Lag, now_ms: i64, stale_after: Duration) -> Self {
        let published = l.updated_at_ms > 0;
        let age_ms = published.then(|| now_ms.saturating_sub(l.updated_at_ms).max(0));
        let stale_ms = i64::try_from(stale_after.as_millis()).unwrap_or(i64::MAX);
        Self {
            entries: l.pending.saturating_add(l.undelivered),
            pending: l.pending,
            undelivered: l.undelivered,
            oldest_age_ms: l.oldest_age_ms,
            consumers: l.consumers,
            updated_at: published
                .then_some(l.updated_at_ms)
                .and_then(crate::timestamp::rfc3339),
            age_ms,
            stale: age_ms.is_none_or(|a| a > stale_ms),
        }
    }
}
