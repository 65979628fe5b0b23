//! The reaper: when an ingest instance stops refreshing its liveness key,
//! every connection it held gets a `tcp_down` (server_lost) and its
//! connection set is cleared: no ghost sessions after a crash.
//!
//! An instance is lapsed when its liveness key is gone and its last beat (in
//! `servers:beat`) is older than `session.liveness_ttl`. One projector reaps
//! it (a `SET NX PX` lock). For each connection in the instance's set whose
//! device view still binds it and has not ended, the reaper appends a
//! `tcp_down` event to the device's shard, so it flows through the same
//! merge (and archive) as every other event. The event's timestamp is the
//! moment the instance was lost (last beat + liveness TTL), so a second
//! reaping of the same instance writes identical events: the merge makes
//! duplicates harmless.
//!
//! Deleting the set leaves its marks (see `lua/conns.lua`) in place: a late
//! write of a connection's live state, from a projector that merged one of
//! its events before the reaping, cannot bring it back once its end (these
//! `tcp_down` events) is projected, and the marks expire on their own.

use std::sync::Arc;
use std::time::Duration;

use iot_core::event::ENTRY_FIELD;
use iot_core::keys::shard_of;
use iot_core::{Entry, Event, EventKind, PhyId, ServerId, TcpDownReason};
use iot_service::RedisPool;
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, RedisResult};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::metrics;
use crate::settings::Settings;

/// Connections handled per round trip.
const CHUNK: usize = 256;

/// What one reaping did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reaped {
    /// Connections in the instance's set.
    pub conns: u64,
    /// `tcp_down` events appended.
    pub sessions: u64,
}

/// The reaper.
pub struct Reaper {
    settings: Arc<Settings>,
    owner: String,
}

impl Reaper {
    /// A reaper; `owner` names the lock holder (the consumer name).
    pub fn new(settings: Arc<Settings>, owner: String) -> Self {
        Self { settings, owner }
    }

    fn lock_ms(&self) -> u64 {
        let interval = u64::try_from(self.settings.reaper_interval.as_millis()).unwrap_or(1000);
        (interval * 10).max(10_000)
    }

    /// Looks for lapsed instances at `now_ms` and reaps those whose lock it
    /// gets. Returns the instances reaped.
    pub async fn sweep(
        &self,
        conn: &mut ConnectionManager,
        now_ms: i64,
    ) -> RedisResult<Vec<(ServerId, Reaped)>> {
        let k = &self.settings.keys;
        let beats: Vec<(String, f64)> = conn.zrange_withscores(k.server_beats(), 0, -1).await?;
        let mut done = Vec::new();
        for (server, beat) in beats {
            let beat_ms = beat as i64;
            if now_ms - beat_ms <= self.settings.liveness_ttl_ms {
                continue;
            }
            let Ok(server) = ServerId::new(server.as_str()) else {
                tracing::warn!(member = %server, "invalid server id in the beat set; removed");
                let _: i64 = conn.zrem(k.server_beats(), &server).await?;
                continue;
            };
            let alive: bool = conn.exists(k.liveness(&server)).await?;
            if alive {
                continue;
            }
            let locked: Option<String> = redis::cmd("SET")
                .arg(k.reaper_lock(&server))
                .arg(&self.owner)
                .arg("NX")
                .arg("PX")
                .arg(self.lock_ms())
                .query_async(conn)
                .await?;
            if locked.is_none() {
                continue;
            }
            let lost_at = beat_ms.saturating_add(self.settings.liveness_ttl_ms);
            let reaped = self.reap(conn, &server, lost_at).await?;
            tracing::warn!(server = %server, conns = reaped.conns, sessions = reaped.sessions,
                lost_at_ms = lost_at, "ingest instance lapsed; its sessions are marked server_lost");
            metrics::reaped(reaped.sessions);
            done.push((server, reaped));
        }
        Ok(done)
    }

    /// Reaps one instance: a `tcp_down` (server_lost, at `lost_at`) for each
    /// of its live connections, then its set and registry entries go.
    pub async fn reap(
        &self,
        conn: &mut ConnectionManager,
        server: &ServerId,
        lost_at: i64,
    ) -> RedisResult<Reaped> {
        let s = &*self.settings;
        let k = &s.keys;
        let set = k.server_conns(server);
        let mut members: Vec<String> = Vec::new();
        {
            let mut iter: redis::AsyncIter<'_, String> = conn.sscan(&set).await?;
            while let Some(m) = iter.next_item().await {
                members.push(m?);
            }
        }
        let mut reaped = Reaped::default();
        for chunk in members.chunks(CHUNK) {
            let ids: Vec<Option<Uuid>> = chunk.iter().map(|c| Uuid::parse_str(c).ok()).collect();
            let mut pipe = redis::pipe();
            for id in ids.iter().flatten() {
                pipe.get(k.conn(id));
            }
            let phys: Vec<Option<String>> = pipe.query_async(conn).await?;
            let mut found: Vec<(Uuid, PhyId)> = Vec::new();
            let mut phys = phys.into_iter();
            for id in ids.iter().flatten() {
                if let Some(Some(p)) = phys.next()
                    && let Ok(phy) = PhyId::new(p)
                {
                    found.push((*id, phy));
                }
            }
            let mut pipe = redis::pipe();
            for (_, phy) in &found {
                pipe.cmd("HMGET")
                    .arg(k.device(phy))
                    .arg(iot_core::view::field::CONN_ID)
                    .arg(iot_core::view::field::EPOCH)
                    .arg(iot_core::view::field::ENDED);
            }
            let views: Vec<(Option<String>, Option<u64>, Option<String>)> =
                pipe.query_async(conn).await?;
            let mut pipe = redis::pipe();
            for ((id, phy), (bound, epoch, ended)) in found.iter().zip(views) {
                let binds = bound.as_deref() == Some(id.to_string().as_str());
                let up = ended.as_deref().is_none_or(str::is_empty);
                let Some(epoch) = epoch.filter(|_| binds && up) else {
                    continue;
                };
                let ev = Event {
                    phy_id: phy.clone(),
                    conn_id: *id,
                    server_id: server.clone(),
                    epoch,
                    ts_ms: lost_at,
                    kind: EventKind::TcpDown {
                        reason: TcpDownReason::ServerLost,
                    },
                };
                let xadd = pipe
                    .cmd("XADD")
                    .arg(k.events(shard_of(phy.as_str(), s.shards)));
                if let Some(maxlen) = s.maxlen.get() {
                    xadd.arg("MAXLEN").arg("~").arg(maxlen);
                }
                xadd.arg("*")
                    .arg(ENTRY_FIELD)
                    .arg(Entry::Event(ev).encode())
                    .ignore();
                reaped.sessions += 1;
            }
            pipe.srem(&set, chunk).ignore();
            pipe.query_async::<()>(conn).await?;
            reaped.conns += chunk.len() as u64;
        }
        // The instance may have come back while we worked: then keep it.
        let alive: bool = conn.exists(k.liveness(server)).await?;
        if !alive {
            redis::pipe()
                .del(&set)
                .ignore()
                .zrem(k.server_beats(), server.as_str())
                .ignore()
                .hdel(k.servers(), server.as_str())
                .ignore()
                .query_async::<()>(conn)
                .await?;
        }
        Ok(reaped)
    }
}

/// Runs the reaper every `reaper_interval` until shutdown.
pub async fn run(reaper: Reaper, redis: RedisPool, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(reaper.settings.reaper_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut conn = redis.get();
        if let Err(e) = reaper.sweep(&mut conn, iot_core::time::now_ms()).await {
            metrics::redis_error("reaper");
            tracing::warn!(error = %e, "reaper round failed; retrying next round");
            // A failed round is retried at the next tick; back off a little
            // more when Redis is away.
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }
}
