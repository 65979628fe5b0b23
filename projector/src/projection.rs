//! Applying events to Redis: heartbeats into the shards' seen sets, the
//! device scripts, then everything outside the device's slot that follows
//! from their records (the shard index, the connection key, the instance's
//! connection set).
//!
//! Three round trips per batch, each a pipeline (see [`Projection::apply`]).
//! Every step is idempotent, so a batch that failed half-way is simply
//! applied again.

use std::collections::BTreeMap;
use std::sync::Arc;

use iot_core::keys::shard_of;
use iot_core::{Entry, Event, PhyId, ServerId};
use redis::aio::ConnectionLike;
use redis::{RedisResult, Value};
use uuid::Uuid;

use crate::metrics;
use crate::script::{Flip, IndexUpdate, Outcome, Record, Scripts, parse_flips, parse_score};
use crate::settings::Settings;
use crate::stream::event_in_range;

/// Heartbeats per `ZADD` into a seen set: bounds the time one command
/// holds Redis (well under 1 µs each).
pub const SEEN_CHUNK: usize = 500;

/// Index updates per call of the index script.
const INDEX_CHUNK: usize = 256;

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
struct FollowUp {
    outcome: Outcome,
    lease: bool,
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
    /// sets, and the seen scores of the devices with other events; (2) the
    /// device function for every other event and for every heartbeating
    /// device that was not online; (3) the index follow-ups. Heartbeats of
    /// online devices end at (1). Within a batch the heartbeats are thus
    /// merged before the other events, which the merge allows (it is
    /// order-independent).
    pub async fn apply<C: ConnectionLike>(
        &self,
        conn: &mut C,
        items: &[Item],
        lifecycle: Lifecycle,
        now_ms: i64,
    ) -> RedisResult<Applied> {
        let s = &*self.settings;
        let mut applied = Applied::default();
        let mut kinds: BTreeMap<&'static str, u64> = BTreeMap::new();
        // Heartbeats by (shard, redelivered), and the other events.
        let mut beats: BTreeMap<(u16, bool), Vec<(&str, i64)>> = BTreeMap::new();
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
                            .push((ev.phy_id.as_str(), ev.ts_ms));
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
                            .push((b.phy_id.as_str(), b.ts_ms));
                    }
                    *kinds.entry("heartbeat").or_default() += n;
                }
            }
        }
        if beats.is_empty() && events.is_empty() {
            return Ok(applied);
        }

        // (1) Seen sets (plain commands: a function call costs more than
        // the work), whether those devices are online, then the seen scores
        // of the other events' devices (after the ZADDs, so they include
        // this batch's heartbeats).
        let mut pipe = redis::pipe();
        let mut asked: Vec<&[(&str, i64)]> = Vec::new();
        // Devices that heartbeat and were not online: their newest beat.
        let mut wake: BTreeMap<&str, i64> = BTreeMap::new();
        for ((shard, redelivered), list) in &beats {
            for chunk in list.chunks(SEEN_CHUNK) {
                let zadd = pipe.cmd("ZADD").arg(s.keys.seen(*shard)).arg("GT");
                for (phy, ts) in chunk {
                    zadd.arg(*ts).arg(*phy);
                }
                zadd.ignore();
                if *redelivered {
                    // Their index update may have been lost: merge them all.
                    for (phy, ts) in chunk {
                        let e = wake.entry(phy).or_insert(*ts);
                        *e = (*e).max(*ts);
                    }
                } else {
                    pipe.cmd("ZMSCORE")
                        .arg(s.keys.online(*shard))
                        .arg(chunk.iter().map(|(p, _)| *p).collect::<Vec<_>>());
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
            let online: Vec<Option<String>> = redis::FromRedisValue::from_redis_value(reply)?;
            for ((phy, ts), on) in chunk.iter().zip(online) {
                if on.is_none() {
                    let e = wake.entry(phy).or_insert(*ts);
                    *e = (*e).max(*ts);
                }
            }
        }
        let mut seen_of: std::collections::HashMap<&str, i64> = std::collections::HashMap::new();
        for ((_, phys), reply) in event_shards.iter().zip(replies.by_ref()) {
            let scores: Vec<Option<String>> = redis::FromRedisValue::from_redis_value(reply)?;
            for (phy, score) in phys.iter().zip(scores) {
                if let Some(t) = score.as_deref().and_then(parse_score) {
                    seen_of.insert(phy, t);
                }
            }
        }

        // (2) The device function for the other events and the woken devices.
        let mut pipe = redis::pipe();
        for (ev, redelivered) in &events {
            let seen = seen_of.get(ev.phy_id.as_str()).copied();
            pipe.add_command(self.scripts.device_event(s, now_ms, ev, *redelivered, seen));
        }
        for (phy, seen) in &wake {
            match PhyId::new(*phy) {
                Ok(id) => {
                    pipe.add_command(self.scripts.device_seen(s, now_ms, &id, *seen));
                }
                Err(e) => tracing::warn!(phy = %phy, error = %e,
                    "invalid phyID in a heartbeat; ignored"),
            }
        }
        let mut follow = Vec::new();
        if !pipe.is_empty() {
            for reply in self.scripts.query(conn, &pipe).await? {
                for outcome in Outcome::parse_all("device", reply)? {
                    follow.push(FollowUp {
                        outcome,
                        lease: false,
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
                follow.push(FollowUp { outcome, lease });
            }
        }
        applied.evaluated = phys.len() as u64;
        applied.flips = self
            .follow_up(conn, follow, Lifecycle::Emit, now_ms)
            .await?;
        Ok(applied)
    }

    /// Index updates (one index call per shard and chunk) and the
    /// single-key follow-ups, in one pipeline. `now_ms` dates a view found
    /// gone.
    async fn follow_up<C: ConnectionLike>(
        &self,
        conn: &mut C,
        follow: Vec<FollowUp>,
        lifecycle: Lifecycle,
        now_ms: i64,
    ) -> RedisResult<Vec<Flip>> {
        let s = &*self.settings;
        let mut pipe = redis::pipe();
        let mut by_shard: BTreeMap<u16, Vec<IndexUpdate>> = BTreeMap::new();
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
                Outcome::TouchConn { phy, conn } => {
                    self.touch_conn(&mut pipe, &phy, &conn);
                }
                Outcome::Settled(record) => {
                    self.bindings(&mut pipe, &record);
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
        for (shard, updates) in &by_shard {
            for chunk in updates.chunks(INDEX_CHUNK) {
                pipe.add_command(self.scripts.index(
                    s,
                    *shard,
                    lifecycle == Lifecycle::Quiet,
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

    fn touch_conn(&self, pipe: &mut redis::Pipeline, phy: &str, conn: &str) {
        if let Ok(id) = Uuid::parse_str(conn) {
            pipe.cmd("SET")
                .arg(self.settings.keys.conn(&id))
                .arg(phy)
                .arg("PX")
                .arg(self.settings.ttl_ms)
                .ignore();
        }
    }

    /// The connection key and the instance's connection set of a record.
    fn bindings(&self, pipe: &mut redis::Pipeline, r: &Record) {
        let keys = &self.settings.keys;
        if let Some(conn) = &r.conn
            && r.touch_conn
        {
            self.touch_conn(pipe, &r.phy, conn);
        }
        if !r.binding {
            return;
        }
        if let (Some(conn), Some(server)) = (&r.conn, &r.server)
            && let Ok(server) = ServerId::new(server.as_str())
        {
            let key = keys.server_conns(&server);
            if r.live {
                pipe.sadd(key, conn).ignore();
            } else {
                pipe.srem(key, conn).ignore();
            }
        }
        // The binding it replaced leaves its instance's set, unless it is the
        // same connection on the same instance (a session announced again
        // with a new epoch, see the ingest's `rebind`): it stays a member.
        if let Some((conn, server)) = &r.superseded
            && (r.conn.as_ref() != Some(conn) || r.server.as_ref() != Some(server))
            && let Ok(server) = ServerId::new(server.as_str())
        {
            pipe.srem(keys.server_conns(&server), conn).ignore();
        }
    }
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
