//! The archiver: a consumer group of its own (`archivers`) on the event and
//! lifecycle streams that writes every entry into PostgreSQL in batches, and
//! trims the event streams only below what every consumer group has
//! processed.
//!
//! Crash-only: an entry is acknowledged (XACK) only after its rows are
//! committed; a crash leaves it pending, and the next archiver claims it
//! (XAUTOCLAIM) and writes it again, which inserts nothing twice because rows
//! are keyed by stream entry. While PostgreSQL is away the archiver keeps the
//! batch, retries with backoff and reports the `archive` health check as
//! degraded; the entries wait in Redis.

use std::collections::HashMap;
use std::time::Duration;

use iot_core::Entry;
use iot_core::event::ENTRY_FIELD;
use iot_core::keys::{ARCHIVER_GROUP, Keys};
use iot_service::health::{Health, Status};
use iot_service::redis::RedisPool;
use redis::aio::ConnectionManager;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamInfoGroupsReply, StreamReadReply};
use tokio_util::sync::CancellationToken;

use crate::Store;
use crate::archive::{ArchivedEvent, ArchivedTransition};
use crate::commands::CommandChange;

/// How the archiver runs.
#[derive(Debug, Clone)]
pub struct ArchiverOptions {
    /// Key schema.
    pub keys: Keys,
    /// Number of event shards.
    pub shards: u16,
    /// Consumer name inside the `archivers` group.
    pub consumer: String,
    /// Entries per read.
    pub batch: usize,
    /// XREADGROUP BLOCK.
    pub block: Duration,
    /// Pending entries idle this long are claimed.
    pub claim_idle: Duration,
    /// How often to claim and trim.
    pub maintenance_interval: Duration,
}

fn metrics_describe() {
    metrics::describe_counter!(
        "iot_archive_rows_total",
        "Rows inserted into the archive, by table"
    );
    metrics::describe_counter!(
        "iot_archive_bad_entries_total",
        "Stream entries the archiver could not decode (acknowledged and skipped)"
    );
    metrics::describe_counter!(
        "iot_archive_db_errors_total",
        "Failed archive batches (retried)"
    );
    metrics::describe_counter!(
        "iot_archive_claimed_entries_total",
        "Entries claimed from idle archivers"
    );
    metrics::describe_histogram!(
        "iot_archive_batch_duration_seconds",
        metrics::Unit::Seconds,
        "Time to write one batch to PostgreSQL"
    );
    metrics::describe_counter!(
        "iot_archive_trimmed_entries_total",
        "Event stream entries trimmed after every group processed them"
    );
}

/// Runs the archiver until `shutdown`.
pub async fn run(
    redis: RedisPool,
    store: Store,
    health: Health,
    opts: ArchiverOptions,
    shutdown: CancellationToken,
) {
    metrics_describe();
    let streams = stream_keys(&opts);
    let mut backoff = Duration::from_millis(100);
    // Create the groups (and the streams) first; keep trying while Redis is away.
    loop {
        match ensure_groups(&mut redis.get(), &streams).await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(error = %e, "cannot create the archivers' consumer groups; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    health.set("archive", Status::Ok, None, None);
    let mut reader: Option<ConnectionManager> = None;
    let mut last_maintenance = tokio::time::Instant::now();
    tracing::info!(consumer = %opts.consumer, streams = streams.len(), "archiver started");
    while !shutdown.is_cancelled() {
        if last_maintenance.elapsed() >= opts.maintenance_interval {
            last_maintenance = tokio::time::Instant::now();
            if let Err(e) = claim(&redis, &store, &health, &opts, &streams, &shutdown).await {
                tracing::warn!(error = %e, "archiver claim failed");
            }
            if let Err(e) = trim(&mut redis.get(), &opts).await {
                tracing::warn!(error = %e, "archiver trim failed");
            }
        }
        let conn = match reader.as_mut() {
            Some(c) => c,
            None => match redis.dedicated().await {
                Ok(c) => reader.insert(c),
                Err(e) => {
                    tracing::warn!(error = %e, "archiver cannot open its Redis connection");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    continue;
                }
            },
        };
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(ARCHIVER_GROUP)
            .arg(&opts.consumer)
            .arg("COUNT")
            .arg(opts.batch)
            .arg("BLOCK")
            .arg(opts.block.as_millis() as u64)
            .arg("STREAMS")
            .arg(&streams);
        for _ in &streams {
            cmd.arg(">");
        }
        let reply: redis::RedisResult<Option<StreamReadReply>> = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = cmd.query_async(conn) => r,
        };
        match reply {
            Ok(Some(reply)) => {
                let batch: Vec<(String, Vec<StreamId>)> =
                    reply.keys.into_iter().map(|k| (k.key, k.ids)).collect();
                write_and_ack(&redis, &store, &opts.keys, &health, &batch, &shutdown).await;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "archiver read failed");
                if e.code() == Some("NOGROUP") {
                    let _ = ensure_groups(&mut redis.get(), &streams).await;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        }
    }
}

fn stream_keys(opts: &ArchiverOptions) -> Vec<String> {
    (0..opts.shards)
        .map(|s| opts.keys.events(s))
        .chain((0..opts.shards).map(|s| opts.keys.lifecycle(s)))
        .chain(std::iter::once(opts.keys.command_events()))
        .collect()
}

/// The rows of one batch.
#[derive(Default)]
struct Rows {
    events: Vec<ArchivedEvent>,
    transitions: Vec<ArchivedTransition>,
    commands: Vec<CommandChange>,
}

async fn ensure_groups(conn: &mut ConnectionManager, streams: &[String]) -> redis::RedisResult<()> {
    for key in streams {
        let r: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(key)
            .arg(ARCHIVER_GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(conn)
            .await;
        if let Err(e) = r
            && e.code() != Some("BUSYGROUP")
        {
            return Err(e);
        }
    }
    Ok(())
}

/// Turns stream entries into rows; undecodable ones are counted and skipped.
fn rows(batch: &[(String, Vec<StreamId>)], keys: &Keys) -> Rows {
    let mut out = Rows::default();
    let lifecycle_prefix = keys.lifecycle(0);
    let lifecycle_prefix = lifecycle_prefix.trim_end_matches("{0}");
    let commands_stream = keys.command_events();
    for (stream, ids) in batch {
        let is_lifecycle = stream.starts_with(lifecycle_prefix);
        let is_commands = *stream == commands_stream;
        for id in ids {
            if is_commands {
                let fields: HashMap<String, Vec<u8>> = id
                    .map
                    .iter()
                    .filter_map(|(k, v)| {
                        redis::from_redis_value::<Vec<u8>>(v.clone())
                            .ok()
                            .map(|v| (k.clone(), v))
                    })
                    .collect();
                match CommandChange::from_fields(&fields) {
                    Some(c) => out.commands.push(c),
                    None => {
                        metrics::counter!("iot_archive_bad_entries_total", "stream" => "commands")
                            .increment(1);
                        tracing::warn!(stream, id = %id.id, "undecodable command entry skipped");
                    }
                }
            } else if is_lifecycle {
                let fields: HashMap<String, String> = id
                    .map
                    .iter()
                    .filter_map(|(k, v)| {
                        redis::from_redis_value::<String>(v.clone())
                            .ok()
                            .map(|v| (k.clone(), v))
                    })
                    .collect();
                match ArchivedTransition::from_fields(stream, &id.id, &fields) {
                    Some(t) => out.transitions.push(t),
                    None => {
                        metrics::counter!("iot_archive_bad_entries_total", "stream" => "lifecycle")
                            .increment(1);
                        tracing::warn!(stream, id = %id.id, "undecodable lifecycle entry skipped");
                    }
                }
            } else {
                let decoded = id
                    .map
                    .get(ENTRY_FIELD)
                    .and_then(|v| redis::from_redis_value::<Vec<u8>>(v.clone()).ok())
                    .ok_or_else(|| "no `e` field".to_owned())
                    .and_then(|b| Entry::decode(&b).map_err(|e| e.to_string()));
                match decoded {
                    Ok(entry) => out
                        .events
                        .extend(ArchivedEvent::from_entry(stream, &id.id, entry)),
                    Err(e) => {
                        metrics::counter!("iot_archive_bad_entries_total", "stream" => "events")
                            .increment(1);
                        tracing::warn!(stream, id = %id.id, error = %e, "undecodable event entry skipped");
                    }
                }
            }
        }
    }
    out
}

/// Writes the batch (retrying until it is stored or shutdown), then XACKs.
async fn write_and_ack(
    redis: &RedisPool,
    store: &Store,
    keys: &Keys,
    health: &Health,
    batch: &[(String, Vec<StreamId>)],
    shutdown: &CancellationToken,
) {
    if batch.iter().all(|(_, ids)| ids.is_empty()) {
        return;
    }
    let rows = rows(batch, keys);
    let mut backoff = Duration::from_millis(100);
    loop {
        let start = std::time::Instant::now();
        let written = match store.archive(&rows.events, &rows.transitions).await {
            Ok(counts) => store
                .archive_commands(&rows.commands)
                .await
                .map(|commands| (counts, commands)),
            Err(e) => Err(e),
        };
        match written {
            Ok((counts, commands)) => {
                metrics::counter!("iot_archive_rows_total", "table" => "command_events")
                    .increment(commands);
                metrics::histogram!("iot_archive_batch_duration_seconds")
                    .record(start.elapsed().as_secs_f64());
                metrics::counter!("iot_archive_rows_total", "table" => "events")
                    .increment(counts.events);
                metrics::counter!("iot_archive_rows_total", "table" => "transitions")
                    .increment(counts.transitions);
                if health.status_of("archive") != Some(Status::Ok) {
                    tracing::info!("archive writes work again");
                    health.set("archive", Status::Ok, None, None);
                }
                break;
            }
            Err(e) => {
                metrics::counter!("iot_archive_db_errors_total").increment(1);
                if health.status_of("archive") == Some(Status::Ok) {
                    tracing::warn!(error = %e, "archive write failed; entries wait in Redis, retrying");
                }
                health.set("archive", Status::Degraded, Some(e.to_string()), None);
                tokio::select! {
                    // Not acknowledged: the entries stay pending and are
                    // claimed by the next archiver.
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    let mut pipe = redis::pipe();
    for (stream, ids) in batch {
        if ids.is_empty() {
            continue;
        }
        pipe.cmd("XACK")
            .arg(stream)
            .arg(ARCHIVER_GROUP)
            .arg(ids.iter().map(|i| i.id.as_str()).collect::<Vec<_>>())
            .ignore();
    }
    if let Err(e) = pipe.query_async::<()>(&mut redis.get()).await {
        // Harmless: the entries will be claimed and written again (no-ops).
        tracing::warn!(error = %e, "XACK after archiving failed");
    }
}

async fn claim(
    redis: &RedisPool,
    store: &Store,
    health: &Health,
    opts: &ArchiverOptions,
    streams: &[String],
    shutdown: &CancellationToken,
) -> redis::RedisResult<()> {
    let mut conn = redis.get();
    for stream in streams {
        let mut start = "0-0".to_owned();
        loop {
            let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
                .arg(stream)
                .arg(ARCHIVER_GROUP)
                .arg(&opts.consumer)
                .arg(opts.claim_idle.as_millis() as u64)
                .arg(&start)
                .arg("COUNT")
                .arg(opts.batch)
                .query_async(&mut conn)
                .await?;
            if !reply.deleted_ids.is_empty() {
                // Trimmed before anyone archived them: cannot happen with the
                // trimmer below, but acknowledge so they do not stay pending.
                let _: redis::RedisResult<()> = redis::cmd("XACK")
                    .arg(stream)
                    .arg(ARCHIVER_GROUP)
                    .arg(&reply.deleted_ids)
                    .query_async(&mut conn)
                    .await;
            }
            if !reply.claimed.is_empty() {
                metrics::counter!("iot_archive_claimed_entries_total")
                    .increment(reply.claimed.len() as u64);
                let batch = vec![(stream.clone(), reply.claimed)];
                write_and_ack(redis, store, &opts.keys, health, &batch, shutdown).await;
            }
            if reply.next_stream_id == "0-0" || shutdown.is_cancelled() {
                break;
            }
            start = reply.next_stream_id;
        }
    }
    Ok(())
}

/// The id just after `id` (`ms-seq` -> `ms-(seq+1)`).
fn next_id(id: &str) -> Option<String> {
    let (ms, seq) = id.split_once('-')?;
    let ms: u64 = ms.parse().ok()?;
    let seq: u64 = seq.parse().ok()?;
    Some(match seq.checked_add(1) {
        Some(s) => format!("{ms}-{s}"),
        None => format!("{}-0", ms.checked_add(1)?),
    })
}

fn id_key(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

/// Trims each archived stream (events, lifecycle, command changes) below
/// the oldest entry some group still has to process (pending, or not yet
/// delivered). With the archive on, this is the only trimming of these
/// streams (their writers add no `MAXLEN`): nothing leaves Redis before the
/// archive (and the projectors) have it.
async fn trim(conn: &mut ConnectionManager, opts: &ArchiverOptions) -> redis::RedisResult<()> {
    for key in stream_keys(opts) {
        let groups: StreamInfoGroupsReply = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&key)
            .query_async(conn)
            .await?;
        if groups.groups.iter().all(|g| g.name != ARCHIVER_GROUP) {
            continue;
        }
        let mut safe: Option<String> = None;
        for g in &groups.groups {
            let candidate = if g.pending > 0 {
                let pending: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
                    .arg(&key)
                    .arg(&g.name)
                    .arg("-")
                    .arg("+")
                    .arg(1)
                    .query_async(conn)
                    .await?;
                pending.first().map(|p| p.0.clone())
            } else {
                next_id(&g.last_delivered_id)
            };
            let Some(c) = candidate else { continue };
            if safe.as_ref().is_none_or(|s| id_key(&c) < id_key(s)) {
                safe = Some(c);
            }
        }
        if let Some(safe) = safe {
            let trimmed: u64 = redis::cmd("XTRIM")
                .arg(&key)
                .arg("MINID")
                .arg("~")
                .arg(&safe)
                .query_async(conn)
                .await?;
            metrics::counter!("iot_archive_trimmed_entries_total").increment(trimmed);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_id_steps_past_an_entry() {
        assert_eq!(next_id("5-0").as_deref(), Some("5-1"));
        assert_eq!(next_id("0-0").as_deref(), Some("0-1"));
        assert_eq!(next_id(&format!("7-{}", u64::MAX)).as_deref(), Some("8-0"));
        assert_eq!(next_id("garbage"), None);
        assert!(id_key("10-0") > id_key("9-5"));
    }
}
