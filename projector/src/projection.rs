//! Applying events to Redis: heartbeats into the shards' seen sets, the
//! device scripts, then everything outside the device's slot that follows
//! from their records (the shard index, the connection key, the instances'
//! connection sets).
//!
//! The connection sets follow the views under the same epoch rule as the
//! views themselves, whatever the order in which projectors' writes arrive:
//! every record of an event merged through the full path states the bound
//! connection's membership at its epoch (live: in the set; ended: out), and
//! a connection that a newer one superseded (the record's superseded
//! binding, or the event's own connection when the view binds a newer one)
//! is stated out at its epoch. The `conns` function applies the newest
//! statement per connection and keeps marks of what it applied (see
//! `lua/conns.lua`), so a late write of an older state is ignored, and a
//! replay (a redelivered entry whose writes were lost) states the same
//! again.
//!
//! Three round trips per batch (four when a heartbeat takes the device
//! function), each a pipeline (see [`Projection::apply`]).
//! Every step is idempotent, so a batch that failed half-way is simply
//! applied again.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use iot_core::keys::shard_of;
use iot_core::{Entry, Event, PhyId, ServerId};
use redis::aio::ConnectionLike;
use redis::{RedisResult, Value};
use uuid::Uuid;

use crate::metrics;
use crate::script::{
    Beat, ConnOp, Flip, IndexUpdate, Outcome, Record, Scripts, parse_flips, parse_score,
};
use crate::settings::Settings;
use crate::stream::event_in_range;

/// Heartbeats per `ZADD` into a seen set: bounds the time one command
/// holds Redis (well under 1 µs each).
pub const SEEN_CHUNK: usize = 500;

/// Index updates per call of the index script.
const INDEX_CHUNK: usize = 256;

/// Membership statements per call of the conns function.
const CONNS_CHUNK: usize = 256;

/// Shortest generation of the connection sets' marks, ms.
const MIN_MARKS_GENERATION_MS: i64 = 60_000;

/// Length of one generation of the connection sets' marks, ms: the views'
/// TTL, at least a minute. A mark lives one to two generations beyond the
/// generation it was written in; it only has to outlast the writes that
/// were on their way when it was made (a projector's round trips).
pub fn marks_generation_ms(s: &Settings) -> i64 {
    s.ttl_ms.max(MIN_MARKS_GENERATION_MS)
}

/// The generation of the connection sets' marks at `now_ms`.
pub fn marks_generation(s: &Settings, now_ms: i64) -> i64 {
    now_ms.div_euclid(marks_generation_ms(s))
}

/// One decoded stream entry to apply.
#[derive(Debug, Clone)]
pub struct Item {
    /// The entry.
    pub entry: Entry,
    /// Delivered before (claimed, or pending since a restart): its index
    /// update may have been lost, so it is always made again.
    pub redelivered: bool,
}

/// What applying a batch did.
#[derive(Debug, Default, Clone)]
pub struct Applied {
    /// Events merged.
    pub events: u64,
    /// Events skipped as out of range.
    pub bad_events: u64,
    /// Flips of the online index.
    pub flips: Vec<Flip>,
    /// Devices evaluated (due loop).
    pub evaluated: u64,
    /// Heartbeats that went to the seen set only (their device was online
    /// at an epoch at least theirs).
    pub seen_only: u64,
}

/// How index updates are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    /// Flips append lifecycle entries.
    Emit,
    /// Flips change the index only (a rebuild after a reset).
    Quiet,
}

/// The projection engine: settings and scripts.
#[derive(Debug)]
pub struct Projection {
    settings: Arc<Settings>,
    scripts: Scripts,
}

/// What to do after the device scripts.
struct FollowUp<'a> {
    outcome: Outcome,
    lease: bool,
    /// The event merged (connection, instance, epoch), if any.
    event: Option<(Uuid, &'a ServerId, u64)>,
}

impl Projection {
    /// A projection with these settings.
    pub fn new(settings: Arc<Settings>) -> Self {
        Self {
            settings,
            scripts: Scripts::new(),
        }
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The scripts.
    pub fn scripts(&self) -> &Scripts {
        &self.scripts
    }

    /// Applies decoded entries at `now_ms`.
    ///
    /// Three pipelined round trips: (1) the heartbeats into the shards' seen
    /// sets (`ZADD GT`) with their devices' bound epochs (`HMGET` of the
    /// shard's bound hash), and the seen scores of the devices with other
    /// events; (2) the device function for every other event and for every
    /// heartbeat that may change more than `last_seen`; (3) the index
    /// follow-ups. A heartbeat of a device that is online at an epoch at
    /// least the heartbeat's ends at (1): applied to the view it would only
    /// move `last_seen` (it cannot bind, and a fresher heartbeat cannot make
    /// an online device offline), and the seen set holds that. The others
    /// (device not online, or a newer connection: the heartbeat binds) take
    /// the device function, after one more round trip (1b) for their seen
    /// scores, so that it evaluates them on everything seen. Within a batch
    /// the heartbeats are thus merged before the other events, which the
    /// merge allows (it is order-independent).
    pub async fn apply<'a, C: ConnectionLike>(
        &self,
        conn: &mut C,
        items: &'a [Item],
        lifecycle: Lifecycle,
        now_ms: i64,
    ) -> RedisResult<Applied> {
        let s = &*self.settings;
        let mut applied = Applied::default();
        let mut kinds: BTreeMap<&'static str, u64> = BTreeMap::new();
        // Heartbeats by (shard, redelivered), and the other events.
        let mut beats: BTreeMap<(u16, bool), Vec<Beat<'_>>> = BTreeMap::new();
        let mut events: Vec<(&Event, bool)> = Vec::new();
        for item in items {
            match &item.entry {
                Entry::Event(ev) => {
                    if !event_in_range(ev) {
                        applied.bad_events += 1;
                        tracing::warn!(phy = %ev.phy_id, ts_ms = ev.ts_ms, epoch = ev.epoch,
                            "event timestamp or epoch out of range; skipped");
                        continue;
                    }
                    *kinds.entry(ev.kind.name()).or_default() += 1;
                    if matches!(ev.kind, iot_core::EventKind::Heartbeat) {
                        beats
                            .entry((shard_of(ev.phy_id.as_str(), s.shards), item.redelivered))
                            .or_default()
                            .push(Beat {
                                phy: &ev.phy_id,
                                conn: ev.conn_id,
                                server: &ev.server_id,
                                epoch: ev.epoch,
                                ts_ms: ev.ts_ms,
                            });
                    } else {
                        events.push((ev, item.redelivered));
                    }
                }
                Entry::Heartbeats(batch) => {
                    let mut n = 0u64;
                    for b in &batch.beats {
                        if !crate::stream::in_range(b.ts_ms, b.epoch) {
                            applied.bad_events += 1;
                            continue;
                        }
                        n += 1;
                        beats
                            .entry((shard_of(b.phy_id.as_str(), s.shards), item.redelivered))
                            .or_default()
                            .push(Beat {
                                phy: &b.phy_id,
                                conn: b.conn_id,
                                server: &batch.server_id,
                                epoch: b.epoch,
                                ts_ms: b.ts_ms,
                            });
                    }
                    *kinds.entry("heartbeat").or_default() += n;
                }
            }
        }
        if beats.is_empty() && events.is_empty() {
            return Ok(applied);
        }

        // (1) Seen sets (plain commands: a function call costs more than
        // the work), the bound epochs of those devices, then the seen
        // scores of the other events' devices (after the ZADDs, so they
        // include this batch's heartbeats).
        let mut pipe = redis::pipe();
        let mut asked: Vec<&[Beat<'_>]> = Vec::new();
        // Heartbeats that may change more than last_seen, merged per device.
        let mut wake: BTreeMap<&str, Beat<'_>> = BTreeMap::new();
        let mut woken = |b: Beat<'a>| match wake.entry(b.phy.as_str()) {
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(b);
            }
            std::collections::btree_map::Entry::Occupied(mut o) => o.get_mut().absorb(b),
        };
        for ((shard, redelivered), list) in &beats {
            for chunk in list.chunks(SEEN_CHUNK) {
                let zadd = pipe.cmd("ZADD").arg(s.keys.seen(*shard)).arg("GT");
                for b in chunk {
                    zadd.arg(b.ts_ms).arg(b.phy.as_str());
                }
                zadd.ignore();
                if *redelivered {
                    // Their index update may have been lost: merge them all.
                    for b in chunk {
                        woken(*b);
                    }
                } else {
                    pipe.cmd("HMGET")
                        .arg(s.keys.bound(*shard))
                        .arg(chunk.iter().map(|b| b.phy.as_str()).collect::<Vec<_>>());
                    asked.push(chunk);
                }
            }
        }
        let mut event_shards: BTreeMap<u16, Vec<&str>> = BTreeMap::new();
        for (ev, _) in &events {
            event_shards
                .entry(shard_of(ev.phy_id.as_str(), s.shards))
                .or_default()
                .push(ev.phy_id.as_str());
        }
        for (shard, phys) in &event_shards {
            pipe.cmd("ZMSCORE").arg(s.keys.seen(*shard)).arg(phys);
        }
        let replies = pipe.query_async::<Vec<Value>>(conn).await?;
        let mut replies = replies.into_iter();
        for (chunk, reply) in asked.iter().zip(replies.by_ref()) {
            let bound: Vec<Option<String>> = redis::FromRedisValue::from_redis_value(reply)?;
            for (b, bound) in chunk.iter().zip(bound) {
                // Online at an epoch at least the heartbeat's: the view
                // would take nothing from it but last_seen, which the seen
                // set now holds.
                let covered = bound
                    .as_deref()
                    .and_then(parse_score)
                    .is_some_and(|e| u64::try_from(e).is_ok_and(|e| e >= b.epoch));
                if covered {
                    applied.seen_only += 1;
                } else {
                    woken(*b);
                }
            }
        }
        let mut seen_of: HashMap<&str, i64> = HashMap::new();
        for ((_, phys), reply) in event_shards.iter().zip(replies.by_ref()) {
            read_scores(&mut seen_of, phys, reply)?;
        }

        // (1b) Rarely: the seen scores of the heartbeating devices that take
        // the device function, so that it evaluates them on everything seen.
        if !wake.is_empty() {
            let mut wake_shards: BTreeMap<u16, Vec<&str>> = BTreeMap::new();
            for phy in wake.keys() {
                wake_shards
                    .entry(shard_of(phy, s.shards))
                    .or_default()
                    .push(phy);
            }
            let mut pipe = redis::pipe();
            for (shard, phys) in &wake_shards {
                pipe.cmd("ZMSCORE").arg(s.keys.seen(*shard)).arg(phys);
            }
            let replies = pipe.query_async::<Vec<Value>>(conn).await?;
            for ((_, phys), reply) in wake_shards.iter().zip(replies) {
                read_scores(&mut seen_of, phys, reply)?;
            }
        }

        // (2) The device function for the other events and the woken devices.
        let mut pipe = redis::pipe();
        for (ev, redelivered) in &events {
            let seen = seen_of.get(ev.phy_id.as_str()).copied();
            pipe.add_command(self.scripts.device_event(s, now_ms, ev, *redelivered, seen));
        }
        for (phy, beat) in &wake {
            let seen = seen_of
                .get(phy)
                .copied()
                .map_or(beat.ts_ms, |t| t.max(beat.ts_ms));
            pipe.add_command(self.scripts.device_beat(s, now_ms, beat, seen));
        }
        let mut follow = Vec::new();
        if !pipe.is_empty() {
            // One reply per call, in the order of the calls.
            let sources = events
                .iter()
                .map(|(ev, _)| (ev.conn_id, &ev.server_id, ev.epoch))
                .chain(wake.values().map(|b| (b.conn, b.server, b.epoch)));
            for (reply, event) in self
                .scripts
                .query(conn, &pipe)
                .await?
                .into_iter()
                .zip(sources)
            {
                for outcome in Outcome::parse_all("device", reply)? {
                    follow.push(FollowUp {
                        outcome,
                        lease: false,
                        event: Some(event),
                    });
                }
            }
        }
        applied.flips = self.follow_up(conn, follow, lifecycle, now_ms).await?;
        for (kind, n) in kinds {
            applied.events += n;
            metrics::events_applied(kind, n);
        }
        Ok(applied)
    }

    /// Evaluates devices at `now_ms` (no event), each after folding its
    /// seen score (`None`: none) into its view, and updates their index;
    /// `lease`: remove the due loop's lease.
    pub async fn evaluate<C: ConnectionLike>(
        &self,
        conn: &mut C,
        phys: &[(PhyId, Option<i64>)],
        lease: bool,
        now_ms: i64,
    ) -> RedisResult<Applied> {
        let mut applied = Applied::default();
        if phys.is_empty() {
            return Ok(applied);
        }
        let s = &*self.settings;
        let mut pipe = redis::pipe();
        for (phy, seen) in phys {
            pipe.add_command(self.scripts.device_eval(s, now_ms, phy, *seen));
        }
        let replies = self.scripts.query(conn, &pipe).await?;
        let mut follow = Vec::new();
        for reply in replies {
            for outcome in Outcome::parse_all("device", reply)? {
                follow.push(FollowUp {
                    outcome,
                    lease,
                    event: None,
                });
            }
        }
        applied.evaluated = phys.len() as u64;
        applied.flips = self
            .follow_up(conn, follow, Lifecycle::Emit, now_ms)
            .await?;
        Ok(applied)
    }

    /// Index updates (one index call per shard and chunk) and the
    /// single-key follow-ups, in one pipeline. `now_ms`: when the records
    /// were evaluated (it also dates a view found gone).
    async fn follow_up<C: ConnectionLike>(
        &self,
        conn: &mut C,
        follow: Vec<FollowUp<'_>>,
        lifecycle: Lifecycle,
        now_ms: i64,
    ) -> RedisResult<Vec<Flip>> {
        let s = &*self.settings;
        let mut pipe = redis::pipe();
        let mut by_shard: BTreeMap<u16, Vec<IndexUpdate>> = BTreeMap::new();
        let mut sets: BTreeMap<ServerId, Vec<ConnOp>> = BTreeMap::new();
        for f in follow {
            match f.outcome {
                Outcome::Gone { phy } => {
                    by_shard
                        .entry(shard_of(&phy, s.shards))
                        .or_default()
                        .push(IndexUpdate::Gone {
                            phy,
                            now_ms,
                            lease: f.lease,
                        });
                }
                Outcome::TouchConn {
                    phy,
                    conn,
                    expires_ms,
                } => {
                    self.touch_conn(&mut pipe, &phy, &conn, expires_ms - now_ms);
                }
                Outcome::Settled(record) => {
                    self.bindings(&mut pipe, &mut sets, &record, f.event, now_ms);
                    by_shard
                        .entry(shard_of(&record.phy, s.shards))
                        .or_default()
                        .push(IndexUpdate::State {
                            record,
                            lease: f.lease,
                        });
                }
            }
        }
        // Before the index updates: once an index says a device is online
        // at an epoch (so that its heartbeats skip the device function),
        // the sets follow that binding.
        let generation = marks_generation(s, now_ms);
        let marks_ttl = 3 * marks_generation_ms(s);
        for (server, ops) in &sets {
            for chunk in ops.chunks(CONNS_CHUNK) {
                pipe.add_command(self.scripts.conns(s, server, generation, marks_ttl, chunk))
                    .ignore();
            }
        }
        for (shard, updates) in &by_shard {
            for chunk in updates.chunks(INDEX_CHUNK) {
                pipe.add_command(self.scripts.index(
                    s,
                    *shard,
                    lifecycle == Lifecycle::Quiet,
                    now_ms,
                    chunk,
                ));
            }
        }
        if pipe.is_empty() {
            return Ok(Vec::new());
        }
        // Only the index calls are not ignored, so they are the replies.
        let replies = self.scripts.query(conn, &pipe).await?;
        let mut flips = Vec::new();
        for reply in replies {
            flips.extend(parse_flips(reply)?);
        }
        for f in &flips {
            metrics::transition(f.online, &f.reason);
        }
        Ok(flips)
    }

    /// Sets the connection key to expire in `ttl_ms` (with its view: the
    /// view's expiry less the `now` it was computed for).
    fn touch_conn(&self, pipe: &mut redis::Pipeline, phy: &str, conn: &str, ttl_ms: i64) {
        if let Ok(id) = Uuid::parse_str(conn) {
            pipe.cmd("SET")
                .arg(self.settings.keys.conn(&id))
                .arg(phy)
                .arg("PX")
                .arg(ttl_ms.max(1))
                .ignore();
        }
    }

    /// The connection keys and the membership statements (into `sets`, by
    /// instance) of a record evaluated at `now_ms`; `event`: the event it
    /// merged (connection, instance, epoch).
    fn bindings(
        &self,
        pipe: &mut redis::Pipeline,
        sets: &mut BTreeMap<ServerId, Vec<ConnOp>>,
        r: &Record,
        event: Option<(Uuid, &ServerId, u64)>,
        now_ms: i64,
    ) {
        if let (Some(conn), Some(expires)) = (&r.conn, r.conn_expires_ms) {
            self.touch_conn(pipe, &r.phy, conn, expires - now_ms);
        }
        if !r.binding {
            return;
        }
        let bound = match (&r.conn, &r.server) {
            (Some(conn), Some(server)) if r.epoch > 0 => Some((conn.as_str(), server.as_str())),
            _ => None,
        };
        if let Some((conn, server)) = bound
            && let Ok(server) = ServerId::new(server)
        {
            let conn = conn.to_owned();
            let epoch = r.epoch;
            sets.entry(server).or_default().push(if r.live {
                ConnOp::Live { conn, epoch }
            } else {
                ConnOp::Down { conn, epoch }
            });
        }
        // A connection the view no longer binds leaves its instance's set,
        // and its connection key goes: the binding this call replaced, and
        // the event's own connection when a newer one holds the device. Not
        // when it is the bound connection on the same instance (a session
        // announced again with a new epoch, see the ingest's `rebind`): that
        // stays a member, at the new epoch.
        let mut gone = |conn: &str, server: &str, epoch: u64| {
            if bound == Some((conn, server)) {
                return;
            }
            if let Ok(server) = ServerId::new(server) {
                sets.entry(server).or_default().push(ConnOp::Down {
                    conn: conn.to_owned(),
                    epoch,
                });
            }
            if r.conn.as_deref() != Some(conn)
                && let Ok(id) = Uuid::parse_str(conn)
            {
                pipe.del(self.settings.keys.conn(&id)).ignore();
            }
        };
        if let Some(sup) = &r.superseded {
            gone(&sup.conn, &sup.server, sup.epoch);
        }
        if let Some((conn, server, epoch)) = event
            && epoch < r.epoch
        {
            gone(&conn.to_string(), server.as_str(), epoch);
        }
    }
}

/// Reads a `ZMSCORE` reply for `phys` into `out` (devices with a score).
fn read_scores<'a>(
    out: &mut HashMap<&'a str, i64>,
    phys: &[&'a str],
    reply: Value,
) -> RedisResult<()> {
    let scores: Vec<Option<String>> = redis::FromRedisValue::from_redis_value(reply)?;
    for (phy, score) in phys.iter().zip(scores) {
        if let Some(t) = score.as_deref().and_then(parse_score) {
            out.insert(phy, t);
        }
    }
    Ok(())
}

/// Merges events into a fresh [`iot_core::SessionView`] (the pure twin of
/// what the scripts store), for tests and tools.
pub fn fold<'a>(events: impl IntoIterator<Item = &'a Event>) -> iot_core::SessionView {
    let mut v = iot_core::SessionView::default();
    for e in events {
        v.apply(e);
    }
    v
}
