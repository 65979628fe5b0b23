//! JSON shapes shared by several routes: the policy's explanation and the
//! projection lag.

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
}

impl From<&Lag> for LagInfo {
    fn from(l: &Lag) -> Self {
        Self {
            entries: l.pending.saturating_add(l.undelivered),
            pending: l.pending,
            undelivered: l.undelivered,
            oldest_age_ms: l.oldest_age_ms,
            consumers: l.consumers,
            updated_at: (l.updated_at_ms > 0)
                .then_some(l.updated_at_ms)
                .and_then(crate::timestamp::rfc3339),
        }
    }
}
