//! The weighted online policy (the seed's `WeightedPolicy`).
//!
//! ```text
//! score = 0
//! if now - last_seen <= heartbeat_timeout:                          score += 1
//! if last_tcp_down set and now - last_tcp_down <= tcp_down_window:  score -= tcp_down_penalty
//! if last_ack_timeout set and now - last_ack_timeout <= ack_window: score -= ack_timeout_penalty
//! online = score >= threshold          (policy disabled: online = heartbeat fresh)
//! ```
//!
//! One rule is added to the seed's: a device whose current connection ended
//! with a clean MQTT DISCONNECT left on purpose and is offline (reason
//! `disconnected`) until it connects again, whatever its heartbeat age.
//!
//! The projector evaluates the same formula inside Redis (Lua); the
//! projector's tests check that both give identical answers. Keep the order of
//! the floating-point operations identical in both places.

use serde::{Deserialize, Serialize};

use crate::event::TcpDownReason;

/// Policy parameters; times in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// `false`: online means heartbeat fresh, penalties are ignored.
    pub enabled: bool,
    /// A heartbeat at most this old counts as fresh.
    pub heartbeat_timeout_ms: i64,
    /// How long a TCP drop penalises the device.
    pub tcp_down_window_ms: i64,
    /// How long an ACK timeout penalises the device.
    pub ack_window_ms: i64,
    /// Subtracted from the score within the TCP drop window.
    pub tcp_down_penalty: f64,
    /// Subtracted from the score within the ACK timeout window.
    pub ack_timeout_penalty: f64,
    /// Online when the score is at least this.
    pub threshold: f64,
}

impl Default for Policy {
    /// The seed's defaults: timeout 5 min, windows 1 min, penalties 0.5 and
    /// 0.3, threshold 0.5.
    fn default() -> Self {
        Self {
            enabled: true,
            heartbeat_timeout_ms: 5 * 60_000,
            tcp_down_window_ms: 60_000,
            ack_window_ms: 60_000,
            tcp_down_penalty: 0.5,
            ack_timeout_penalty: 0.3,
            threshold: 0.5,
        }
    }
}

/// What the policy looks at, from the session view.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PolicyInput {
    /// Newest sign of life (any packet), ms.
    pub last_seen: Option<i64>,
    /// Newest penalising TCP drop, ms.
    pub last_tcp_down: Option<i64>,
    /// Its reason.
    pub last_tcp_down_reason: Option<TcpDownReason>,
    /// Newest ACK timeout, ms.
    pub last_ack_timeout: Option<i64>,
    /// The current connection ended with a clean DISCONNECT.
    pub disconnected: bool,
}

/// Why the device is in its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Reason {
    /// Online: the heartbeat is fresh and the penalties leave the score at or
    /// above the threshold.
    HeartbeatFresh,
    /// Offline: no sign of life was ever recorded.
    NeverSeen,
    /// Offline: the newest sign of life is older than the heartbeat timeout.
    HeartbeatExpired,
    /// Offline: the device sent DISCONNECT.
    Disconnected,
    /// Offline: a TCP drop's penalty pushes the score below the threshold.
    TcpDown(TcpDownReason),
    /// Offline: an ACK timeout's penalty pushes the score below the threshold.
    AckTimeout,
}

impl Reason {
    /// The name used in the API, the view and the lifecycle stream, such as
    /// `heartbeat_expired` or `tcp_down:keepalive`.
    pub fn name(self) -> String {
        match self {
            Self::HeartbeatFresh => "heartbeat_fresh".into(),
            Self::NeverSeen => "never_seen".into(),
            Self::HeartbeatExpired => "heartbeat_expired".into(),
            Self::Disconnected => "disconnected".into(),
            Self::TcpDown(r) => format!("tcp_down:{}", r.as_str()),
            Self::AckTimeout => "ack_timeout".into(),
        }
    }

    /// Parses [`name`](Self::name).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "heartbeat_fresh" => Self::HeartbeatFresh,
            "never_seen" => Self::NeverSeen,
            "heartbeat_expired" => Self::HeartbeatExpired,
            "disconnected" => Self::Disconnected,
            "ack_timeout" => Self::AckTimeout,
            _ => Self::TcpDown(TcpDownReason::parse(s.strip_prefix("tcp_down:")?)?),
        })
    }
}

/// The policy's answer for one device at one instant, with its workings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// The instant evaluated, ms.
    pub at_ms: i64,
    /// The verdict.
    pub online: bool,
    /// The score (sum of the terms).
    pub score: f64,
    /// +1 when the heartbeat is fresh, else 0.
    pub heartbeat_term: f64,
    /// `-tcp_down_penalty` within the TCP drop window, else 0.
    pub tcp_down_term: f64,
    /// `-ack_timeout_penalty` within the ACK window, else 0.
    pub ack_timeout_term: f64,
    /// The threshold the score was compared with (disabled policy: 1).
    pub threshold: f64,
    /// Why.
    pub reason: Reason,
    /// The next instant (ms) at which the answer may change with time alone:
    /// heartbeat expiry or the end of a penalty window. `None` if nothing
    /// will change without a new event.
    pub next_change_ms: Option<i64>,
}

/// `now - t <= window`, without overflow.
fn within(now: i64, t: i64, window: i64) -> bool {
    (now as i128 - t as i128) <= window as i128
}

/// First instant at which `within(_, t, window)` is false, if after `now`.
fn window_end(now: i64, t: i64, window: i64) -> Option<i64> {
    let end = t.saturating_add(window).saturating_add(1);
    (end > now).then_some(end)
}

impl Policy {
    /// Evaluates the policy for `input` at `now_ms`.
    pub fn evaluate(&self, input: &PolicyInput, now_ms: i64) -> Evaluation {
        let fresh = input
            .last_seen
            .is_some_and(|t| within(now_ms, t, self.heartbeat_timeout_ms));
        let tcp_active = self.enabled
            && input
                .last_tcp_down
                .is_some_and(|t| within(now_ms, t, self.tcp_down_window_ms));
        let ack_active = self.enabled
            && input
                .last_ack_timeout
                .is_some_and(|t| within(now_ms, t, self.ack_window_ms));

        // The same sequence of operations as the Lua script.
        let mut score = 0.0_f64;
        let heartbeat_term = if fresh { 1.0 } else { 0.0 };
        if fresh {
            score += 1.0;
        }
        let tcp_down_term = if tcp_active {
            score -= self.tcp_down_penalty;
            -self.tcp_down_penalty
        } else {
            0.0
        };
        let ack_timeout_term = if ack_active {
            score -= self.ack_timeout_penalty;
            -self.ack_timeout_penalty
        } else {
            0.0
        };
        let threshold = if self.enabled { self.threshold } else { 1.0 };
        let passes = if self.enabled {
            score >= self.threshold
        } else {
            fresh
        };
        let online = passes && !input.disconnected;

        let reason = if online {
            Reason::HeartbeatFresh
        } else if input.disconnected {
            Reason::Disconnected
        } else if input.last_seen.is_none() {
            Reason::NeverSeen
        } else if !fresh {
            Reason::HeartbeatExpired
        } else {
            // Fresh but penalised below the threshold: name the newest penalty
            // (a tie goes to the TCP drop).
            let tcp = tcp_active.then_some(input.last_tcp_down).flatten();
            let ack = ack_active.then_some(input.last_ack_timeout).flatten();
            match (tcp, ack) {
                (Some(t), Some(a)) if a > t => Reason::AckTimeout,
                (Some(_), _) => {
                    Reason::TcpDown(input.last_tcp_down_reason.unwrap_or(TcpDownReason::Closed))
                }
                (None, Some(_)) => Reason::AckTimeout,
                // Only reachable with a threshold above 1: never online.
                (None, None) => Reason::HeartbeatExpired,
            }
        };

        let mut next: Option<i64> = None;
        let mut consider = |t: Option<i64>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        if fresh {
            consider(
                input
                    .last_seen
                    .and_then(|t| window_end(now_ms, t, self.heartbeat_timeout_ms)),
            );
        }
        if tcp_active {
            consider(
                input
                    .last_tcp_down
                    .and_then(|t| window_end(now_ms, t, self.tcp_down_window_ms)),
            );
        }
        if ack_active {
            consider(
                input
                    .last_ack_timeout
                    .and_then(|t| window_end(now_ms, t, self.ack_window_ms)),
            );
        }

        Evaluation {
            at_ms: now_ms,
            online,
            score,
            heartbeat_term,
            tcp_down_term,
            ack_timeout_term,
            threshold,
            reason,
            next_change_ms: next,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: i64 = 1_700_000_000_000;
    const S: i64 = 1000;

    fn seed_input() -> PolicyInput {
        // Heartbeat, TCP drop and ACK timeout, all at t.
        PolicyInput {
            last_seen: Some(T),
            last_tcp_down: Some(T),
            last_tcp_down_reason: Some(TcpDownReason::Reset),
            last_ack_timeout: Some(T),
            disconnected: false,
        }
    }

    #[test]
    fn seed_example_offline_at_t_plus_10s() {
        let e = Policy::default().evaluate(&seed_input(), T + 10 * S);
        assert!(!e.online);
        assert!((e.score - 0.2).abs() < 1e-9, "{}", e.score);
        assert_eq!(e.heartbeat_term, 1.0);
        assert_eq!(e.tcp_down_term, -0.5);
        assert_eq!(e.ack_timeout_term, -0.3);
        assert_eq!(e.reason, Reason::TcpDown(TcpDownReason::Reset));
        // Both windows end at t + 1 min + 1 ms.
        assert_eq!(e.next_change_ms, Some(T + 60 * S + 1));
    }

    #[test]
    fn seed_example_online_again_at_t_plus_2min() {
        let e = Policy::default().evaluate(&seed_input(), T + 120 * S);
        assert!(e.online);
        assert_eq!(e.score, 1.0);
        assert_eq!(e.reason, Reason::HeartbeatFresh);
        // Next: the heartbeat expires at t + 5 min + 1 ms.
        assert_eq!(e.next_change_ms, Some(T + 300 * S + 1));
    }

    #[test]
    fn heartbeat_boundary_is_inclusive() {
        let p = Policy::default();
        let input = PolicyInput {
            last_seen: Some(T),
            ..Default::default()
        };
        assert!(p.evaluate(&input, T + 300 * S).online);
        let after = p.evaluate(&input, T + 300 * S + 1);
        assert!(!after.online);
        assert_eq!(after.reason, Reason::HeartbeatExpired);
        assert_eq!(after.next_change_ms, None);
    }

    #[test]
    fn penalty_window_boundaries_are_inclusive() {
        let p = Policy {
            tcp_down_penalty: 0.6,
            ..Policy::default()
        };
        let input = PolicyInput {
            last_seen: Some(T + 30 * S),
            last_tcp_down: Some(T),
            last_tcp_down_reason: Some(TcpDownReason::Closed),
            ..Default::default()
        };
        let at_end = p.evaluate(&input, T + 60 * S);
        assert!(!at_end.online);
        assert_eq!(at_end.tcp_down_term, -0.6);
        assert_eq!(at_end.next_change_ms, Some(T + 60 * S + 1));
        let after = p.evaluate(&input, T + 60 * S + 1);
        assert!(after.online);
        assert_eq!(after.tcp_down_term, 0.0);

        let ack = PolicyInput {
            last_seen: Some(T),
            last_ack_timeout: Some(T),
            ..Default::default()
        };
        let p = Policy {
            ack_timeout_penalty: 0.6,
            ..Policy::default()
        };
        assert!(!p.evaluate(&ack, T + 60 * S).online);
        assert!(p.evaluate(&ack, T + 60 * S + 1).online);
    }

    #[test]
    fn score_exactly_at_threshold_is_online() {
        // 1 - 0.5 = 0.5 >= 0.5: the seed's defaults tolerate one TCP drop.
        let input = PolicyInput {
            last_seen: Some(T),
            last_tcp_down: Some(T),
            last_tcp_down_reason: Some(TcpDownReason::Closed),
            ..Default::default()
        };
        let e = Policy::default().evaluate(&input, T);
        assert_eq!(e.score, 0.5);
        assert!(e.online);
    }

    #[test]
    fn disabled_policy_is_heartbeat_freshness() {
        let p = Policy {
            enabled: false,
            ..Policy::default()
        };
        let e = p.evaluate(&seed_input(), T + 10 * S);
        assert!(e.online);
        assert_eq!(e.tcp_down_term, 0.0);
        assert_eq!(e.ack_timeout_term, 0.0);
        assert_eq!(e.score, 1.0);
        assert_eq!(e.next_change_ms, Some(T + 300 * S + 1));
        let late = p.evaluate(&seed_input(), T + 300 * S + 1);
        assert!(!late.online);
        assert_eq!(late.reason, Reason::HeartbeatExpired);
    }

    #[test]
    fn never_seen_and_disconnected() {
        let p = Policy::default();
        let e = p.evaluate(&PolicyInput::default(), T);
        assert!(!e.online);
        assert_eq!(e.reason, Reason::NeverSeen);
        let gone = PolicyInput {
            last_seen: Some(T),
            disconnected: true,
            ..Default::default()
        };
        let e = p.evaluate(&gone, T + S);
        assert!(!e.online);
        assert_eq!(e.score, 1.0);
        assert_eq!(e.reason, Reason::Disconnected);
    }

    #[test]
    fn newest_penalty_names_the_reason() {
        let p = Policy {
            ack_timeout_penalty: 0.6,
            tcp_down_penalty: 0.6,
            ..Policy::default()
        };
        let input = PolicyInput {
            last_seen: Some(T),
            last_tcp_down: Some(T),
            last_tcp_down_reason: Some(TcpDownReason::Keepalive),
            last_ack_timeout: Some(T + S),
            disconnected: false,
        };
        assert_eq!(p.evaluate(&input, T + 2 * S).reason, Reason::AckTimeout);
    }

    #[test]
    fn extreme_timestamps_do_not_overflow() {
        let p = Policy::default();
        let input = PolicyInput {
            last_seen: Some(i64::MIN),
            last_tcp_down: Some(i64::MAX),
            last_tcp_down_reason: Some(TcpDownReason::Closed),
            last_ack_timeout: Some(i64::MAX),
            disconnected: false,
        };
        let e = p.evaluate(&input, i64::MAX);
        assert!(!e.online);
        let e = p.evaluate(&input, i64::MIN);
        assert!(e.next_change_ms.is_some());
    }

    #[test]
    fn reason_names_round_trip() {
        let all = [
            Reason::HeartbeatFresh,
            Reason::NeverSeen,
            Reason::HeartbeatExpired,
            Reason::Disconnected,
            Reason::AckTimeout,
            Reason::TcpDown(TcpDownReason::ServerLost),
        ];
        for r in all {
            assert_eq!(Reason::parse(&r.name()), Some(r));
        }
        assert_eq!(
            Reason::TcpDown(TcpDownReason::Keepalive).name(),
            "tcp_down:keepalive"
        );
        assert_eq!(Reason::parse("tcp_down:nope"), None);
    }

    #[test]
    fn next_change_is_where_the_answer_can_change() {
        use proptest::prelude::*;
        let opt_ts = || proptest::option::of(-200_000i64..200_000);
        proptest!(|(seen in opt_ts(), tcp in opt_ts(), ack in opt_ts(), now in -200_000i64..200_000,
                    p1 in 0.0f64..1.2, p2 in 0.0f64..1.2, th in 0.0f64..1.2, enabled: bool)| {
            let p = Policy { enabled, heartbeat_timeout_ms: 50_000, tcp_down_window_ms: 20_000,
                             ack_window_ms: 30_000, tcp_down_penalty: p1, ack_timeout_penalty: p2,
                             threshold: th };
            let input = PolicyInput { last_seen: seen, last_tcp_down: tcp,
                last_tcp_down_reason: tcp.map(|_| TcpDownReason::Closed),
                last_ack_timeout: ack, disconnected: false };
            let e = p.evaluate(&input, now);
            // Nothing changes strictly before next_change (or ever, if None).
            let end = e.next_change_ms.unwrap_or(now + 400_000);
            prop_assert!(end > now);
            let before = p.evaluate(&input, end - 1);
            prop_assert_eq!(before.online, e.online);
            prop_assert_eq!(before.score, e.score);
        });
    }
}
