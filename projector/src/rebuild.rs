//! `iot-projector rebuild`: re-derives the views from what the event streams
//! still hold, through the same scripts as live projection. With `reset`,
//! the views, their connection keys, the instances' connection sets (with
//! their marks) and the shard indexes are deleted first (the ingests add
//! the connections they hold back to their sets within a renewal sweep)
//! and the lifecycle stream is left alone (the index flips of a rebuild are
//! not transitions of the devices).
//!
//! When PostgreSQL is configured, the archive fills in what the streams no
//! longer hold (entries older than each shard's first entry, with event
//! times within `archive_since`: a device silent for longer than its view's
//! time-to-live has no view anyway). The merge is order-independent, so the
//! archived part and the stream part can be applied one after the other.

use std::time::{Duration, Instant};

use iot_service::startup::Context;
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, RedisResult, Value};
use uuid::Uuid;

use iot_core::{Entry, Event};
use iot_store::Store;

use crate::projection::{Item, Lifecycle, Projection};
use crate::settings::Settings;
use crate::stream::{self, StreamEntry};

/// Entries read per XRANGE.
const CHUNK: usize = 1000;

/// What a rebuild did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RebuildSummary {
    /// Views deleted first (`reset`).
    pub views_deleted: u64,
    /// Instances' connection sets and their marks deleted first (`reset`).
    pub server_keys_deleted: u64,
    /// Stream entries read.
    pub entries: u64,
    /// Events read from the PostgreSQL archive.
    pub archived: u64,
    /// Events applied.
    pub events: u64,
    /// Entries or events that could not be applied.
    pub bad: u64,
    /// Devices with a view afterwards (sum of the known indexes).
    pub devices: u64,
    /// Devices online afterwards.
    pub online: u64,
    /// Time taken.
    pub took: Duration,
}

impl std::fmt::Display for RebuildSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "rebuild done in {:.1}s: {} stream entries, {} archived events, {} events applied, {} bad, {} views deleted first; {} devices known, {} online",
            self.took.as_secs_f64(),
            self.entries,
            self.archived,
            self.events,
            self.bad,
            self.views_deleted,
            self.devices,
            self.online
        )
    }
}

/// The PostgreSQL part of a rebuild.
#[derive(Debug, Clone)]
pub struct ArchiveSource {
    /// The archive.
    pub store: Store,
    /// Only archived events at most this old are replayed.
    pub since: Duration,
}

/// Rebuilds the views from the streams, and from the archive when
/// `archive` is given (see the module doc).
pub async fn rebuild(
    ctx: &Context,
    reset: bool,
    archive: Option<ArchiveSource>,
) -> anyhow::Result<RebuildSummary> {
    let settings = std::sync::Arc::new(Settings::from_config(&ctx.config, &ctx.server_id));
    let projection = Projection::new(settings);
    let mut conn = ctx.redis.get();
    rebuild_with(&mut conn, &projection, reset, archive.as_ref()).await
}

/// `ms-seq` as a comparable pair.
fn id_pair(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

/// Replays the archived events of `shard` older than the stream's first entry.
async fn replay_archive(
    conn: &mut ConnectionManager,
    projection: &Projection,
    lifecycle: Lifecycle,
    shard: u16,
    archive: &ArchiveSource,
    summary: &mut RebuildSummary,
) -> anyhow::Result<()> {
    let key = projection.settings().keys.events(shard);
    let first: Vec<(String, Value)> = redis::cmd("XRANGE")
        .arg(&key)
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(1)
        .query_async(conn)
        .await?;
    let first = first.first().map(|(id, _)| id_pair(id));
    let since = chrono::Utc::now()
        - chrono::Duration::from_std(archive.since).unwrap_or(chrono::Duration::days(1));
    let mut after = None;
    loop {
        let (rows, last) = archive
            .store
            .replay_events(&key, since, after.as_ref(), CHUNK as i64)
            .await?;
        let Some(last) = last else { break };
        let events: Vec<Event> = rows
            .into_iter()
            .filter(|r| first.is_none_or(|f| id_pair(&r.entry_id) < f))
            .map(|r| r.event)
            .collect();
        summary.archived += events.len() as u64;
        let items: Vec<Item> = events
            .into_iter()
            .map(|e| Item {
                entry: Entry::Event(e),
                redelivered: true,
            })
            .collect();
        let applied = projection
            .apply(conn, &items, lifecycle, iot_core::time::now_ms())
            .await?;
        summary.events += applied.events;
        summary.bad += applied.bad_events;
        after = Some(last);
    }
    Ok(())
}

/// [`rebuild`] on a given connection and projection.
pub async fn rebuild_with(
    conn: &mut ConnectionManager,
    projection: &Projection,
    reset: bool,
    archive: Option<&ArchiveSource>,
) -> anyhow::Result<RebuildSummary> {
    let started = Instant::now();
    let s = projection.settings();
    let mut summary = RebuildSummary::default();
    projection.scripts().load(conn).await?;
    if reset {
        summary.views_deleted = delete_views(conn, s).await?;
        summary.server_keys_deleted = delete_matching(conn, &s.keys.server_pattern()).await?;
        let mut pipe = redis::pipe();
        for shard in s.shard_range() {
            pipe.del(s.keys.online(shard))
                .ignore()
                .del(s.keys.known(shard))
                .ignore()
                .del(s.keys.due(shard))
                .ignore()
                .del(s.keys.presence_rev(shard))
                .ignore()
                .del(s.keys.seen(shard))
                .ignore()
                .del(s.keys.bound(shard))
                .ignore();
        }
        pipe.query_async::<()>(conn).await?;
    }
    let lifecycle = if reset {
        Lifecycle::Quiet
    } else {
        Lifecycle::Emit
    };
    for shard in s.shard_range() {
        if let Some(archive) = archive {
            replay_archive(conn, projection, lifecycle, shard, archive, &mut summary).await?;
        }
        let key = s.keys.events(shard);
        let mut from = "-".to_owned();
        loop {
            let reply: Value = redis::cmd("XRANGE")
                .arg(&key)
                .arg(&from)
                .arg("+")
                .arg("COUNT")
                .arg(CHUNK)
                .query_async(conn)
                .await?;
            let entries: Vec<StreamEntry> = stream::parse_entries(shard, reply);
            let Some(last) = entries.last() else { break };
            from = format!("({}", last.id);
            summary.entries += entries.len() as u64;
            let mut items = Vec::with_capacity(entries.len());
            for e in &entries {
                match stream::decode(&e.payload) {
                    Ok(Some(entry)) => items.push(Item {
                        entry,
                        redelivered: true,
                    }),
                    Ok(None) => {}
                    Err(err) => {
                        summary.bad += 1;
                        tracing::warn!(shard, id = %e.id, error = %err, "undecodable entry skipped");
                    }
                }
            }
            let applied = projection
                .apply(conn, &items, lifecycle, iot_core::time::now_ms())
                .await?;
            summary.events += applied.events;
            summary.bad += applied.bad_events;
            if entries.len() < CHUNK {
                break;
            }
        }
    }
    let mut pipe = redis::pipe();
    for shard in s.shard_range() {
        pipe.zcard(s.keys.known(shard)).zcard(s.keys.online(shard));
    }
    let cards: Vec<u64> = pipe.query_async(conn).await?;
    for pair in cards.chunks(2) {
        summary.devices += pair[0];
        summary.online += pair.get(1).copied().unwrap_or(0);
    }
    summary.took = started.elapsed();
    Ok(summary)
}

/// Deletes every key matching `pattern`.
async fn delete_matching(conn: &mut ConnectionManager, pattern: &str) -> RedisResult<u64> {
    let mut keys: Vec<String> = Vec::new();
    {
        let mut iter: redis::AsyncIter<'_, String> = conn.scan_match(pattern).await?;
        while let Some(k) = iter.next_item().await {
            keys.push(k?);
        }
    }
    for chunk in keys.chunks(CHUNK) {
        let mut pipe = redis::pipe();
        for k in chunk {
            pipe.del(k).ignore();
        }
        pipe.query_async::<()>(conn).await?;
    }
    Ok(keys.len() as u64)
}

/// Deletes every view and the connection key of its bound connection.
async fn delete_views(conn: &mut ConnectionManager, s: &Settings) -> RedisResult<u64> {
    let mut keys: Vec<String> = Vec::new();
    {
        let mut iter: redis::AsyncIter<'_, String> =
            conn.scan_match(s.keys.device_pattern()).await?;
        while let Some(k) = iter.next_item().await {
            keys.push(k?);
        }
    }
    let mut deleted = 0;
    for chunk in keys.chunks(CHUNK) {
        let mut pipe = redis::pipe();
        for k in chunk {
            pipe.hget(k, iot_core::view::field::CONN_ID);
        }
        let conns: Vec<Option<String>> = pipe.query_async(conn).await?;
        let mut pipe = redis::pipe();
        for (k, c) in chunk.iter().zip(conns) {
            pipe.del(k).ignore();
            if let Some(id) = c.and_then(|c| Uuid::parse_str(&c).ok()) {
                pipe.del(s.keys.conn(&id)).ignore();
            }
        }
        pipe.query_async::<()>(conn).await?;
        deleted += chunk.len() as u64;
    }
    Ok(deleted)
}
