//! The Redis key schema: every key, channel and group name in one place.
//!
//! No other file spells a key by hand. Keys that belong to one device carry
//! the phyID as a Redis Cluster hash tag (`session:device:{dev-1}`), keys that
//! belong to one event shard carry the shard number (`stream:events:{7}`), so
//! every multi-key operation stays inside one hash slot. phyIDs and server ids
//! cannot contain braces (see [`crate::ids`]), so the tags are unambiguous.
//!
//! A [`Keys`] value carries an optional prefix so that tests (and several
//! deployments sharing one Redis) can keep their keys apart.

use uuid::Uuid;

use crate::ids::{PhyId, ServerId};

/// Consumer group of the projectors on the event streams.
pub const PROJECTOR_GROUP: &str = "projectors";

/// Consumer group of the PostgreSQL archiver on the event and lifecycle streams.
pub const ARCHIVER_GROUP: &str = "archivers";

/// Why a key prefix was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "key prefix {0:?} may only hold [A-Za-z0-9._:-] (braces would break Redis Cluster hash tags)"
)]
pub struct PrefixError(pub String);

/// Builds key names, with an optional prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

/// The shard (0..shards) of a device's events: FNV-1a of the phyID.
///
/// Stable across versions and platforms: changing it would send one device's
/// events to two shards during an upgrade.
pub fn shard_of(phy_id: &str, shards: u16) -> u16 {
    let mut h: u32 = 0x811c_9dc5;
    for b in phy_id.as_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h % u32::from(shards.max(1))) as u16
}

impl Keys {
    /// Keys with `prefix` in front of every name (may be empty).
    pub fn new(prefix: impl Into<String>) -> Result<Self, PrefixError> {
        let prefix = prefix.into();
        if prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'))
        {
            Ok(Self { prefix })
        } else {
            Err(PrefixError(prefix))
        }
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn k(&self, rest: std::fmt::Arguments<'_>) -> String {
        format!("{}{}", self.prefix, rest)
    }

    /// Hash: the session view of a device.
    pub fn device(&self, phy: &PhyId) -> String {
        self.k(format_args!("session:device:{{{phy}}}"))
    }

    /// Pattern matching every device view (for SCAN; the seed's way to count).
    pub fn device_pattern(&self) -> String {
        self.k(format_args!("session:device:*"))
    }

    /// String: connection id -> phyID.
    pub fn conn(&self, conn_id: &Uuid) -> String {
        self.k(format_args!("session:conn:{{{conn_id}}}"))
    }

    /// Set: connection ids held by an instance.
    pub fn server_conns(&self, server: &ServerId) -> String {
        self.k(format_args!("session:server:{{{server}}}:conns"))
    }

    /// Hash connection id -> epoch: the newest epoch at which the
    /// projector wrote a connection's membership in the instance's
    /// [`server_conns`](Self::server_conns) set (added while live, removed
    /// once ended or superseded), so that a late write of an older state
    /// cannot undo a newer one. One hash per generation `generation` of the
    /// projector's clock (same hash tag as the set); each expires a few
    /// generations after it was created.
    pub fn server_marks(&self, server: &ServerId, generation: i64) -> String {
        self.k(format_args!(
            "session:server:{{{server}}}:marks:{generation}"
        ))
    }

    /// Pattern matching every instance's connection set and marks (for SCAN).
    pub fn server_pattern(&self) -> String {
        self.k(format_args!("session:server:*"))
    }

    /// Counter: the device's last epoch (never expires, never goes back).
    pub fn epoch(&self, phy: &PhyId) -> String {
        self.k(format_args!("session:epoch:{{{phy}}}"))
    }

    /// String `server_id epoch`: the instance that accepted the newest CONNECT.
    /// Written by ingest at CONNECT so that a takeover can find the old owner
    /// without waiting for the projection.
    pub fn owner(&self, phy: &PhyId) -> String {
        self.k(format_args!("session:owner:{{{phy}}}"))
    }

    /// Stream: events of one shard.
    pub fn events(&self, shard: u16) -> String {
        self.k(format_args!("stream:events:{{{shard}}}"))
    }

    /// Stream: online/offline transitions of the devices of one shard.
    pub fn lifecycle(&self, shard: u16) -> String {
        self.k(format_args!("stream:lifecycle:{{{shard}}}"))
    }

    /// Sorted set (all scores 0, ordered by phyID): online devices of a shard.
    pub fn online(&self, shard: u16) -> String {
        self.k(format_args!("presence:online:{{{shard}}}"))
    }

    /// Hash phyID -> revision of the newest state applied to the shard's
    /// online index (so that late updates cannot overwrite newer ones).
    pub fn presence_rev(&self, shard: u16) -> String {
        self.k(format_args!("presence:rev:{{{shard}}}"))
    }

    /// Sorted set phyID -> ms of the newest binding event: devices of a shard
    /// that have a session view (for the known-device count). Members whose
    /// view has expired are removed by the projector.
    pub fn known(&self, shard: u16) -> String {
        self.k(format_args!("presence:known:{{{shard}}}"))
    }

    /// Sorted set phyID -> ms of the newest heartbeat of each device of a
    /// shard (`ZADD GT`). Heartbeats of a device online at an epoch at least
    /// theirs (see [`bound`](Self::bound)) go only here; the view's
    /// `last_seen` is the larger of the hash field and this score (see
    /// [`crate::SessionView::fold_seen`]).
    pub fn seen(&self, shard: u16) -> String {
        self.k(format_args!("presence:seen:{{{shard}}}"))
    }

    /// Hash phyID -> the bound epoch of each device of a shard that is in
    /// the online index (a field exactly while it is online there). Written
    /// by the projector with the online index; a heartbeat whose epoch is at
    /// most this value cannot change the view beyond `last_seen`, so it goes
    /// to the [`seen`](Self::seen) set only.
    pub fn bound(&self, shard: u16) -> String {
        self.k(format_args!("presence:bound:{{{shard}}}"))
    }

    /// Sorted set phyID -> ms: when each device of a shard must be evaluated
    /// again (heartbeat expiry, end of a penalty window).
    pub fn due(&self, shard: u16) -> String {
        self.k(format_args!("presence:due:{{{shard}}}"))
    }

    /// String with a short TTL: the instance is alive.
    pub fn liveness(&self, server: &ServerId) -> String {
        self.k(format_args!("server:live:{{{server}}}"))
    }

    /// String with a short TTL: a projector is reaping this lapsed instance
    /// (`SET NX PX`), so that one projector does it.
    pub fn reaper_lock(&self, server: &ServerId) -> String {
        self.k(format_args!("server:reaping:{{{server}}}"))
    }

    /// Hash server id -> JSON description of every registered instance.
    pub fn servers(&self) -> String {
        self.k(format_args!("servers:registry"))
    }

    /// Sorted set server id -> ms of its last liveness beat.
    pub fn server_beats(&self) -> String {
        self.k(format_args!("servers:beat"))
    }

    /// Pub/Sub channel of one instance: kicks and downlink commands.
    pub fn downlink_channel(&self, server: &ServerId) -> String {
        self.k(format_args!("downlink:{server}"))
    }

    /// List: commands waiting for an offline device.
    pub fn downlink_queue(&self, phy: &PhyId) -> String {
        self.k(format_args!("downlink:queue:{{{phy}}}"))
    }

    /// Hash: one downlink command's record.
    pub fn command(&self, id: &Uuid) -> String {
        self.k(format_args!("command:{{{id}}}"))
    }

    /// List: a command's state changes (`status at_ms reason`), same slot as
    /// its record.
    pub fn command_log(&self, id: &Uuid) -> String {
        self.k(format_args!("command:{{{id}}}:log"))
    }

    /// Sorted set command id -> ms: when a command not yet in a terminal
    /// state must be looked at again (expiry, lost owner).
    pub fn command_deadlines(&self) -> String {
        self.k(format_args!("commands:deadline"))
    }

    /// Hash status -> count: commands in each non-terminal state (queued,
    /// dispatched, sent), for the queue-depth gauge and `GET /api/stats`.
    pub fn commands_open(&self) -> String {
        self.k(format_args!("commands:open"))
    }

    /// Stream of event entries the projectors gave up on (Redis refused to
    /// apply them as data, e.g. `WRONGTYPE` on a key someone overwrote):
    /// fields `shard`, `id` (the event entry), `error`, `e` (its bytes).
    /// Capped with `MAXLEN ~` by its writer.
    pub fn projector_dead_letters(&self) -> String {
        self.k(format_args!("stream:dead:projector"))
    }

    /// Stream of command state changes, archived to the command log.
    pub fn command_events(&self) -> String {
        self.k(format_args!("stream:commands"))
    }

    /// Sorted set command id -> created ms: a device's command history.
    pub fn device_commands(&self, phy: &PhyId) -> String {
        self.k(format_args!("commands:device:{{{phy}}}"))
    }

    /// Hash: the projectors' consumer-group lag, published for the API.
    pub fn projector_lag(&self) -> String {
        self.k(format_args!("projector:lag"))
    }

    /// Hash: counters the services publish for `GET /api/stats`.
    pub fn stats(&self) -> String {
        self.k(format_args!("stats:counters"))
    }

    /// String (value: the archive's consumer group, [`ARCHIVER_GROUP`]) with
    /// a TTL of days, refreshed by every running archiver: the PostgreSQL
    /// archive is on, so stream writers must not cap the archived streams
    /// with `MAXLEN` (the archiver trims them below what it stored).
    pub fn archive_marker(&self) -> String {
        self.k(format_args!("archive:on"))
    }

    /// Pub/Sub channel every ingest in auth mode `registry` subscribes to:
    /// devices disabled or deleted in the registry
    /// ([`crate::control::Revocation`]), so their cached verdicts are
    /// dropped and their connections closed at once.
    pub fn auth_revocations(&self) -> String {
        self.k(format_args!("auth:revoked"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phy() -> PhyId {
        PhyId::new("dev-1").unwrap()
    }

    #[test]
    fn device_keys_share_one_hash_tag() {
        let k = Keys::default();
        assert_eq!(k.device(&phy()), "session:device:{dev-1}");
        assert_eq!(k.epoch(&phy()), "session:epoch:{dev-1}");
        assert_eq!(k.owner(&phy()), "session:owner:{dev-1}");
        assert_eq!(k.downlink_queue(&phy()), "downlink:queue:{dev-1}");
        assert_eq!(
            k.conn(&Uuid::nil()),
            "session:conn:{00000000-0000-0000-0000-000000000000}"
        );
        let s = ServerId::new("srv-a").unwrap();
        assert_eq!(k.server_conns(&s), "session:server:{srv-a}:conns");
        assert_eq!(k.server_marks(&s, 42), "session:server:{srv-a}:marks:42");
        assert_eq!(k.downlink_channel(&s), "downlink:srv-a");
        assert_eq!(k.reaper_lock(&s), "server:reaping:{srv-a}");
    }

    #[test]
    fn archive_marker_and_revocation_channel() {
        let k = Keys::new("p:").unwrap();
        assert_eq!(k.archive_marker(), "p:archive:on");
        assert_eq!(k.auth_revocations(), "p:auth:revoked");
    }

    #[test]
    fn shard_keys_share_one_hash_tag() {
        let k = Keys::default();
        assert_eq!(k.events(7), "stream:events:{7}");
        assert_eq!(k.lifecycle(7), "stream:lifecycle:{7}");
        assert_eq!(k.projector_dead_letters(), "stream:dead:projector");
        assert_eq!(k.online(7), "presence:online:{7}");
        assert_eq!(k.presence_rev(7), "presence:rev:{7}");
        assert_eq!(k.due(7), "presence:due:{7}");
        assert_eq!(k.known(7), "presence:known:{7}");
        assert_eq!(k.seen(7), "presence:seen:{7}");
        assert_eq!(k.bound(7), "presence:bound:{7}");
    }

    #[test]
    fn prefix_goes_in_front_and_is_validated() {
        let k = Keys::new("t1:").unwrap();
        assert_eq!(k.device(&phy()), "t1:session:device:{dev-1}");
        assert!(Keys::new("bad{").is_err());
        assert!(Keys::new("a b").is_err());
    }

    #[test]
    fn shard_of_is_stable_and_in_range() {
        // Fixed values: changing the hash would split devices over shards.
        assert_eq!(shard_of("dev-1", 16), shard_of("dev-1", 16));
        assert_eq!(shard_of("", 16), (0x811c_9dc5u32 % 16) as u16);
        assert_eq!(shard_of("a", 1_000_000u32 as u16), {
            let h = (0x811c_9dc5u32 ^ 0x61).wrapping_mul(0x0100_0193);
            (h % u32::from(1_000_000u32 as u16)) as u16
        });
        assert_eq!(shard_of("x", 0), 0);
        let mut counts = [0u32; 16];
        for i in 0..16_000 {
            counts[shard_of(&format!("dev-{i}"), 16) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800 && c < 1200), "{counts:?}");
    }
}
