//! The session view of one device and the merge that builds it from events.
//!
//! The projection is a merge: applying the same set of events in any order,
//! any number of times, gives the same view. It is a join-semilattice:
//!
//! - timestamps merge by max (`last_seen`, `last_tcp_down` with its reason,
//!   `last_ack_timeout`);
//! - the binding (`epoch`, `conn_id`, `server_id`, `connected_at`, `ended`)
//!   belongs to the highest epoch seen. An event of a lower epoch never binds
//!   or unbinds. Within the bound epoch, `connected_at` and `ended` merge by
//!   max, so a tcp_down that arrives before its own `connected` still wins.
//!   Every kind binds at a higher epoch, heartbeats too (like `connected`
//!   but without `connected_at`): a view that lost its binding (expired, or
//!   rebuilt after the `connected` entry was trimmed) gets it back from the
//!   connection's next heartbeat.
//!
//! In Redis, `last_seen` lives in two places: the view's hash field and the
//! shard's `presence:seen:{shard}` sorted set, where the projector puts the
//! heartbeats of devices that are online at an epoch at least the
//! heartbeat's (one `ZADD GT` per batch instead of a script call per
//! heartbeat). Such a heartbeat could only move `last_seen`: its epoch is not
//! higher than the bound one, so it would not bind. The stored view is the
//! hash with `last_seen` raised to the seen score
//! ([`SessionView::fold_seen`]); both are max-merged, so the pair is a
//! semilattice as well.
//!
//! The projector applies the same rules inside Redis (a Lua script); its tests
//! check the script against [`SessionView::apply`].
//!
//! In Redis the view is the hash `session:device:{phyID}` with the fields of
//! [`field`], every value a decimal or plain string and missing values
//! absent (or empty), so any tool can read it.

use std::collections::HashMap;

use uuid::Uuid;

use crate::event::{Event, EventKind, TcpDownReason};
use crate::ids::{PhyId, ServerId};
use crate::policy::PolicyInput;

/// Hash field names of `session:device:{phyID}`.
pub mod field {
    /// The phyID.
    pub const PHY_ID: &str = "phy_id";
    /// Connection id of the bound (highest) epoch.
    pub const CONN_ID: &str = "conn_id";
    /// The bound epoch.
    pub const EPOCH: &str = "epoch";
    /// Instance holding the bound connection.
    pub const SERVER_ID: &str = "server_id";
    /// When the bound connection was accepted, ms.
    pub const CONNECTED_AT: &str = "connected_at";
    /// How the bound connection ended (a tcp_down reason or `disconnected`);
    /// empty while it is up.
    pub const ENDED: &str = "ended";
    /// When the bound connection ended, ms.
    pub const ENDED_AT: &str = "ended_at";
    /// Newest sign of life, ms.
    pub const LAST_SEEN: &str = "last_seen";
    /// Newest penalising TCP drop, ms.
    pub const LAST_TCP_DOWN: &str = "last_tcp_down";
    /// Its reason.
    pub const LAST_TCP_DOWN_REASON: &str = "last_tcp_down_reason";
    /// Newest ACK timeout, ms.
    pub const LAST_ACK_TIMEOUT: &str = "last_ack_timeout";
    /// Projected online state, `1` or `0` (written by the projector).
    pub const ONLINE: &str = "online";
    /// Reason of the projected state (see [`crate::policy::Reason::name`]).
    pub const REASON: &str = "reason";
    /// When the projected state last changed, ms.
    pub const SINCE: &str = "since";
    /// Revision of the projected state: +1 on every online/offline change.
    pub const REV: &str = "rev";
}

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Ended {
    /// The TCP connection went down.
    TcpDown(TcpDownReason),
    /// The device sent DISCONNECT.
    Disconnected,
}

impl Ended {
    /// Name stored in the `ended` field.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TcpDown(r) => r.as_str(),
            Self::Disconnected => "disconnected",
        }
    }

    /// Parses [`as_str`](Self::as_str).
    pub fn parse(s: &str) -> Option<Self> {
        if s == "disconnected" {
            Some(Self::Disconnected)
        } else {
            TcpDownReason::parse(s).map(Self::TcpDown)
        }
    }

    /// Tie-break rank for two ends with the same timestamp (higher wins).
    pub fn rank(self) -> u8 {
        match self {
            // Same order as TcpDownReason::ALL, then the clean disconnect.
            Self::TcpDown(r) => TcpDownReason::ALL
                .iter()
                .position(|x| *x == r)
                .map_or(0, |p| p as u8 + 1),
            Self::Disconnected => TcpDownReason::ALL.len() as u8 + 1,
        }
    }
}

/// The merged state of one device.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SessionView {
    /// The bound epoch (0: no connection seen).
    pub epoch: u64,
    /// Connection of the bound epoch.
    pub conn_id: Option<Uuid>,
    /// Instance of the bound epoch.
    pub server_id: Option<ServerId>,
    /// Accept time of the bound connection, ms (if its `connected` was seen).
    pub connected_at: Option<i64>,
    /// How and when the bound connection ended; `None` while it is up.
    pub ended: Option<(i64, Ended)>,
    /// Newest sign of life, ms.
    pub last_seen: Option<i64>,
    /// Newest penalising TCP drop (ms) and its reason.
    pub last_tcp_down: Option<(i64, TcpDownReason)>,
    /// Newest ACK timeout, ms.
    pub last_ack_timeout: Option<i64>,
}

fn max_opt<T: Ord + Copy>(a: Option<T>, b: T) -> Option<T> {
    Some(a.map_or(b, |a| a.max(b)))
}

impl SessionView {
    /// Merges one event into the view. Commutative, associative, idempotent.
    pub fn apply(&mut self, ev: &Event) {
        self.apply_parts(ev.epoch, ev.conn_id, &ev.server_id, ev.ts_ms, &ev.kind);
    }

    /// [`apply`](Self::apply) without building an [`Event`].
    pub fn apply_parts(
        &mut self,
        epoch: u64,
        conn_id: Uuid,
        server_id: &ServerId,
        ts: i64,
        kind: &EventKind,
    ) {
        // Timestamps: max.
        match kind {
            EventKind::Connected { .. }
            | EventKind::Heartbeat
            | EventKind::Uplink { .. }
            | EventKind::Ack { .. }
            | EventKind::Disconnected => self.last_seen = max_opt(self.last_seen, ts),
            EventKind::TcpDown { reason } if reason.penalises() => {
                self.last_tcp_down = max_opt(self.last_tcp_down, (ts, *reason));
            }
            EventKind::TcpDown { .. } => {}
            EventKind::AckTimeout { .. } => {
                self.last_ack_timeout = max_opt(self.last_ack_timeout, ts);
            }
        }

        // Binding: highest epoch (any kind; a heartbeat leaves
        // `connected_at` unset, like every kind but `connected`).
        if epoch > self.epoch {
            self.epoch = epoch;
            self.conn_id = Some(conn_id);
            self.server_id = Some(server_id.clone());
            self.connected_at = None;
            self.ended = None;
        }
        if epoch == self.epoch && epoch > 0 {
            match kind {
                EventKind::Connected { .. } => {
                    self.connected_at = max_opt(self.connected_at, ts);
                }
                EventKind::TcpDown { reason } => {
                    self.end(ts, Ended::TcpDown(*reason));
                }
                EventKind::Disconnected => self.end(ts, Ended::Disconnected),
                _ => {}
            }
        }
    }

    /// Raises `last_seen` to `seen`, the device's score in the shard's
    /// seen set (where the projector keeps the heartbeats that could only
    /// move `last_seen`).
    pub fn fold_seen(&mut self, seen: Option<i64>) {
        if let Some(t) = seen {
            self.last_seen = max_opt(self.last_seen, t);
        }
    }

    fn end(&mut self, ts: i64, how: Ended) {
        let cand = (ts, how);
        self.ended = Some(match self.ended {
            Some(cur) if (cur.0, cur.1.rank()) >= (cand.0, cand.1.rank()) => cur,
            _ => cand,
        });
    }

    /// Whether the bound connection is up (as far as the events tell).
    pub fn connected(&self) -> bool {
        self.epoch > 0 && self.ended.is_none()
    }

    /// What the online policy looks at.
    pub fn policy_input(&self) -> PolicyInput {
        PolicyInput {
            last_seen: self.last_seen,
            last_tcp_down: self.last_tcp_down.map(|(t, _)| t),
            last_tcp_down_reason: self.last_tcp_down.map(|(_, r)| r),
            last_ack_timeout: self.last_ack_timeout,
            disconnected: matches!(self.ended, Some((_, Ended::Disconnected))),
        }
    }

    /// The merge fields as they are stored in the Redis hash (absent values
    /// are omitted). Projection state (`online`, `reason`, `since`, `rev`) is
    /// not part of the merge and is not included.
    pub fn to_fields(&self, phy: &PhyId) -> Vec<(&'static str, String)> {
        let mut f = vec![(field::PHY_ID, phy.to_string())];
        if self.epoch > 0 {
            f.push((field::EPOCH, self.epoch.to_string()));
        }
        if let Some(c) = self.conn_id {
            f.push((field::CONN_ID, c.to_string()));
        }
        if let Some(s) = &self.server_id {
            f.push((field::SERVER_ID, s.to_string()));
        }
        if let Some(t) = self.connected_at {
            f.push((field::CONNECTED_AT, t.to_string()));
        }
        if let Some((t, how)) = self.ended {
            f.push((field::ENDED, how.as_str().to_owned()));
            f.push((field::ENDED_AT, t.to_string()));
        }
        if let Some(t) = self.last_seen {
            f.push((field::LAST_SEEN, t.to_string()));
        }
        if let Some((t, r)) = self.last_tcp_down {
            f.push((field::LAST_TCP_DOWN, t.to_string()));
            f.push((field::LAST_TCP_DOWN_REASON, r.as_str().to_owned()));
        }
        if let Some(t) = self.last_ack_timeout {
            f.push((field::LAST_ACK_TIMEOUT, t.to_string()));
        }
        f
    }

    /// Reads a view from the fields of its Redis hash. Empty values count as
    /// absent; unknown fields are ignored.
    pub fn from_fields(fields: &HashMap<String, String>) -> Result<Self, ViewError> {
        fn get<'a>(f: &'a HashMap<String, String>, k: &str) -> Option<&'a str> {
            f.get(k).map(String::as_str).filter(|v| !v.is_empty())
        }
        fn num<T: std::str::FromStr>(
            f: &HashMap<String, String>,
            k: &'static str,
        ) -> Result<Option<T>, ViewError> {
            get(f, k)
                .map(|v| {
                    v.parse().map_err(|_| ViewError {
                        field: k,
                        value: v.to_owned(),
                    })
                })
                .transpose()
        }
        let bad = |k: &'static str, v: &str| ViewError {
            field: k,
            value: v.to_owned(),
        };
        let conn_id = get(fields, field::CONN_ID)
            .map(|v| Uuid::parse_str(v).map_err(|_| bad(field::CONN_ID, v)))
            .transpose()?;
        let server_id = get(fields, field::SERVER_ID)
            .map(|v| ServerId::new(v).map_err(|_| bad(field::SERVER_ID, v)))
            .transpose()?;
        let ended = match (get(fields, field::ENDED), num(fields, field::ENDED_AT)?) {
            (Some(how), Some(t)) => {
                Some((t, Ended::parse(how).ok_or_else(|| bad(field::ENDED, how))?))
            }
            _ => None,
        };
        let last_tcp_down = match (
            num(fields, field::LAST_TCP_DOWN)?,
            get(fields, field::LAST_TCP_DOWN_REASON),
        ) {
            (Some(t), Some(r)) => Some((
                t,
                TcpDownReason::parse(r).ok_or_else(|| bad(field::LAST_TCP_DOWN_REASON, r))?,
            )),
            (Some(t), None) => Some((t, TcpDownReason::Closed)),
            _ => None,
        };
        Ok(Self {
            epoch: num(fields, field::EPOCH)?.unwrap_or(0),
            conn_id,
            server_id,
            connected_at: num(fields, field::CONNECTED_AT)?,
            ended,
            last_seen: num(fields, field::LAST_SEEN)?,
            last_tcp_down,
            last_ack_timeout: num(fields, field::LAST_ACK_TIMEOUT)?,
        })
    }
}

/// A view field holds a value that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("session view field {field} holds {value:?}, which does not parse")]
pub struct ViewError {
    /// The field.
    pub field: &'static str,
    /// Its value.
    pub value: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn srv(i: u8) -> ServerId {
        ServerId::new(format!("srv-{i}")).unwrap()
    }

    fn ev(epoch: u64, ts: i64, kind: EventKind) -> Event {
        Event {
            phy_id: PhyId::new("d").unwrap(),
            conn_id: Uuid::from_u128(u128::from(epoch)),
            server_id: srv((epoch % 3) as u8),
            epoch,
            ts_ms: ts,
            kind,
        }
    }

    fn connected() -> EventKind {
        EventKind::Connected {
            keepalive_secs: 30,
            peer: "127.0.0.1:1".into(),
        }
    }

    fn fold(events: &[Event]) -> SessionView {
        let mut v = SessionView::default();
        for e in events {
            v.apply(e);
        }
        v
    }

    #[test]
    fn old_tcp_down_after_new_connect_keeps_the_binding() {
        let v = fold(&[
            ev(1, 100, connected()),
            ev(2, 200, connected()),
            ev(
                1,
                250,
                EventKind::TcpDown {
                    reason: TcpDownReason::Reset,
                },
            ),
        ]);
        assert_eq!(v.epoch, 2);
        assert!(v.connected());
        assert_eq!(v.conn_id, Some(Uuid::from_u128(2)));
        // Its timestamp still counts for the policy.
        assert_eq!(v.last_tcp_down, Some((250, TcpDownReason::Reset)));
    }

    #[test]
    fn tcp_down_before_its_connected_still_ends_the_connection() {
        let v = fold(&[
            ev(
                3,
                300,
                EventKind::TcpDown {
                    reason: TcpDownReason::Keepalive,
                },
            ),
            ev(3, 100, connected()),
        ]);
        assert_eq!(v.epoch, 3);
        assert!(!v.connected());
        assert_eq!(v.connected_at, Some(100));
        assert_eq!(
            v.ended,
            Some((300, Ended::TcpDown(TcpDownReason::Keepalive)))
        );
    }

    #[test]
    fn a_heartbeat_of_a_higher_epoch_binds_without_connected_at() {
        let v = fold(&[ev(1, 100, connected()), ev(2, 150, EventKind::Heartbeat)]);
        assert_eq!(v.epoch, 2, "a heartbeat of a newer epoch binds");
        assert_eq!(v.conn_id, Some(Uuid::from_u128(2)));
        assert_eq!(v.server_id, Some(srv(2)));
        assert_eq!(v.connected_at, None);
        assert!(v.connected());
        assert_eq!(v.last_seen, Some(150));
        // A view that lost its binding gets it back from a heartbeat.
        let only = fold(&[ev(3, 10, EventKind::Heartbeat)]);
        assert_eq!(
            (only.epoch, only.conn_id, only.connected_at, only.last_seen),
            (3, Some(Uuid::from_u128(3)), None, Some(10))
        );
        // One of a lower or the same epoch only moves last_seen.
        let same = fold(&[
            ev(2, 100, connected()),
            ev(2, 120, EventKind::Heartbeat),
            ev(1, 130, EventKind::Heartbeat),
        ]);
        assert_eq!((same.epoch, same.connected_at), (2, Some(100)));
        assert_eq!(same.last_seen, Some(130));
    }

    #[test]
    fn fold_seen_only_raises_last_seen() {
        let v = fold(&[ev(1, 100, connected()), ev(1, 150, EventKind::Heartbeat)]);
        let mut folded = v.clone();
        folded.fold_seen(Some(120));
        assert_eq!(folded, v, "an older seen score changes nothing");
        folded.fold_seen(Some(170));
        assert_eq!(folded.last_seen, Some(170));
        folded.fold_seen(None);
        assert_eq!(folded.last_seen, Some(170));
    }

    #[test]
    fn takeover_drop_does_not_penalise() {
        let v = fold(&[
            ev(1, 100, connected()),
            ev(2, 200, connected()),
            ev(
                1,
                201,
                EventKind::TcpDown {
                    reason: TcpDownReason::Takeover,
                },
            ),
        ]);
        assert_eq!(v.last_tcp_down, None);
        assert!(v.connected());
    }

    #[test]
    fn clean_disconnect_marks_the_policy_input() {
        let v = fold(&[ev(1, 100, connected()), ev(1, 150, EventKind::Disconnected)]);
        assert!(!v.connected());
        assert!(v.policy_input().disconnected);
        assert_eq!(v.last_seen, Some(150));
        let again = fold(&[
            ev(1, 100, connected()),
            ev(1, 150, EventKind::Disconnected),
            ev(2, 160, connected()),
        ]);
        assert!(!again.policy_input().disconnected);
    }

    #[test]
    fn fields_round_trip() {
        let v = fold(&[
            ev(2, 100, connected()),
            ev(2, 180, EventKind::Heartbeat),
            ev(
                2,
                190,
                EventKind::AckTimeout {
                    command_id: Uuid::nil(),
                },
            ),
            ev(
                2,
                200,
                EventKind::TcpDown {
                    reason: TcpDownReason::ServerLost,
                },
            ),
        ]);
        let phy = PhyId::new("d").unwrap();
        let map: HashMap<String, String> = v
            .to_fields(&phy)
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        assert_eq!(SessionView::from_fields(&map).unwrap(), v);
        assert_eq!(map[field::ENDED], "server_lost");
    }

    #[test]
    fn bad_field_values_are_named() {
        let mut map = HashMap::new();
        map.insert("last_seen".to_owned(), "soon".to_owned());
        let err = SessionView::from_fields(&map).unwrap_err();
        assert_eq!(err.field, "last_seen");
        // Empty means absent.
        map.insert("last_seen".to_owned(), String::new());
        assert_eq!(SessionView::from_fields(&map).unwrap().last_seen, None);
    }

    fn arb_kind() -> impl Strategy<Value = EventKind> {
        prop_oneof![
            Just(connected()),
            Just(EventKind::Heartbeat),
            Just(EventKind::Disconnected),
            Just(EventKind::AckTimeout {
                command_id: Uuid::nil()
            }),
            Just(EventKind::Ack {
                command_id: Uuid::nil()
            }),
            prop::sample::select(TcpDownReason::ALL.to_vec())
                .prop_map(|reason| EventKind::TcpDown { reason }),
        ]
    }

    fn arb_events() -> impl Strategy<Value = Vec<Event>> {
        prop::collection::vec(
            (1u64..5, 0i64..50, arb_kind()).prop_map(|(e, t, k)| ev(e, t, k)),
            0..30,
        )
    }

    proptest! {
        #[test]
        fn merge_is_order_and_duplicate_independent(
            events in arb_events(),
            seed in any::<u64>(),
            dups in prop::collection::vec(any::<prop::sample::Index>(), 0..10),
        ) {
            let reference = fold(&events);
            let mut shuffled = events.clone();
            for d in &dups {
                if !events.is_empty() {
                    shuffled.push(events[d.index(events.len())].clone());
                }
            }
            // Deterministic shuffle from the seed.
            let mut s = seed;
            for i in (1..shuffled.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                shuffled.swap(i, (s >> 33) as usize % (i + 1));
            }
            prop_assert_eq!(fold(&shuffled), reference);
        }

        #[test]
        fn heartbeats_kept_in_the_seen_set_fold_back_to_the_same_view(
            events in arb_events(),
            aside in prop::collection::vec(any::<bool>(), 1..31),
        ) {
            // The projector keeps some heartbeats out of the hash (in the
            // seen set): those whose epoch is not above the bound one when
            // they arrive (it checks the bound epoch the online index
            // holds, which is never above the view's). Hash + seen score
            // must give the merge of all.
            let mut v = SessionView::default();
            let mut seen: Option<i64> = None;
            for (i, e) in events.iter().enumerate() {
                if matches!(e.kind, EventKind::Heartbeat)
                    && e.epoch <= v.epoch
                    && aside[i % aside.len()]
                {
                    seen = Some(seen.map_or(e.ts_ms, |s| s.max(e.ts_ms)));
                } else {
                    v.apply(e);
                }
            }
            v.fold_seen(seen);
            prop_assert_eq!(v, fold(&events));
        }

        #[test]
        fn merge_of_views_equals_merge_of_all_events(a in arb_events(), b in arb_events()) {
            // Splitting the events between two projectors and applying the
            // second half on top of the first gives the same view.
            let mut both = a.clone();
            both.extend(b.iter().cloned());
            let mut v = fold(&a);
            for e in &b { v.apply(e); }
            prop_assert_eq!(v, fold(&both));
        }
    }
}
