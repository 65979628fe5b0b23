//! The archiver: a consumer group of its own (`archivers`) on the event and
//! lifecycle streams and the command-change stream that writes every entry
//! into PostgreSQL in batches, and trims the streams only below what every
//! consumer group has processed ([`crate::trim`]).
//!
//! Crash-only: an entry is acknowledged (XACK) only after its rows are
//! committed (or it is recorded as a dead letter); a crash leaves it
//! pending, and the next archiver claims it (XAUTOCLAIM) and writes it
//! again, which inserts nothing twice because rows are keyed by stream
//! entry.
//!
//! Errors are told apart:
//!
//! - PostgreSQL unavailable (or any error that may pass: a timeout, a
//!   missing table an operator must fix): the archiver keeps the batch,
//!   retries with backoff and reports the `archive` health check degraded;
//!   the entries wait in Redis.
//! - PostgreSQL rejects the data ([`StoreError::is_rejected_data`]): the
//!   batch is split in halves until the rejected entry is alone; it goes to
//!   the `archive_dead_letters` table with the error
//!   (`iot_archive_dead_letters_total`), the rest is stored, and the
//!   archive goes on. Entries that do not decode go there too.
//!
//! Every maintenance round also refreshes the archive marker in Redis
//! ([`crate::trim::mark_archive_on`]) and checks each stream for entries
//! removed before the archive read them (a writer that still caps the
//! streams with `MAXLEN`): they are counted in
//! `iot_archive_entries_lost_total` and the `archive_gaps` health check is
//! degraded for [`GAP_HOLD`] after the last one.

use std::collections::HashMap;
use std::ops::Range;
use std::time::Duration;

use iot_core::Entry;
use iot_core::event::ENTRY_FIELD;
use iot_core::keys::{ARCHIVER_GROUP, Keys};
use iot_service::health::{Health, Status};
use iot_service::redis::RedisPool;
use redis::aio::ConnectionManager;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::archive::{ArchivedEvent, ArchivedTransition};
use crate::commands::CommandChange;
use crate::dead_letter::{DeadLetter, fields_json};
use crate::trim::{self, GroupProgress, StreamProgress};
use crate::{Store, StoreError};

/// Name of the archive's write health check.
pub const HEALTH_CHECK: &str = "archive";

/// Name of the health check that reports entries trimmed before the
/// archive read them.
pub const GAPS_CHECK: &str = "archive_gaps";

/// How long `archive_gaps` stays degraded after the last lost entry.
pub const GAP_HOLD: Duration = Duration::from_secs(3600);

/// How often the archive marker is refreshed (its TTL is days).
const MARKER_EVERY: Duration = Duration::from_secs(60);

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
    /// How often to claim, trim and look for lost entries.
    pub maintenance_interval: Duration,
}

fn metrics_describe() {
    metrics::describe_counter!(
        "iot_archive_rows_total",
        "Rows inserted into the archive, by table"
    );
    metrics::describe_counter!(
        "iot_archive_bad_entries_total",
        "Stream entries the archiver could not decode (recorded as dead letters and acknowledged)"
    );
    metrics::describe_counter!(
        "iot_archive_dead_letters_total",
        "Stream entries recorded in archive_dead_letters instead of the archive, by stream kind and reason (rejected by PostgreSQL, undecodable)"
    );
    metrics::describe_counter!(
        "iot_archive_entries_lost_total",
        "Stream entries removed from Redis before the archive stored them (a writer capping the streams with MAXLEN, or pending entries trimmed), by stream kind"
    );
    metrics::describe_counter!(
        "iot_archive_db_errors_total",
        "Failed archive writes that are retried (PostgreSQL unavailable or failing)"
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
        "Stream entries trimmed after every group processed them"
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
    // PostgreSQL trouble shows in /health, never in readiness: nothing on
    // the device path waits for the archive.
    health.mark_optional(HEALTH_CHECK);
    health.mark_optional(GAPS_CHECK);
    health.set(HEALTH_CHECK, Status::Ok, None, None);
    health.set(GAPS_CHECK, Status::Ok, None, None);
    let mut archiver = Archiver {
        redis,
        store,
        health,
        opts,
        shutdown,
        streams,
        gaps: Gaps::default(),
        marked_at: None,
    };
    archiver.run().await;
}

fn stream_keys(opts: &ArchiverOptions) -> Vec<String> {
    (0..opts.shards)
        .map(|s| opts.keys.events(s))
        .chain((0..opts.shards).map(|s| opts.keys.lifecycle(s)))
        .chain(std::iter::once(opts.keys.command_events()))
        .collect()
}

/// Creates the `archivers` group on each stream, from its start. A new
/// group's read counter starts at what the stream already lost, so that
/// entries trimmed before the archive existed are not taken for lost ones.
async fn ensure_groups(conn: &mut ConnectionManager, streams: &[String]) -> redis::RedisResult<()> {
    for key in streams {
        let gone = trim::stream_progress(conn, key)
            .await?
            .map_or(0, |s| s.removed());
        let r: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(key)
            .arg(ARCHIVER_GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .arg("ENTRIESREAD")
            .arg(gone)
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

/// What a stream holds, for rows and metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Events,
    Lifecycle,
    Commands,
}

impl Kind {
    fn of(stream: &str, keys: &Keys) -> Self {
        let lifecycle = keys.lifecycle(0);
        let lifecycle = lifecycle.trim_end_matches("{0}");
        if stream == keys.command_events() {
            Kind::Commands
        } else if stream.starts_with(lifecycle) {
            Kind::Lifecycle
        } else {
            Kind::Events
        }
    }

    fn label(self) -> &'static str {
        match self {
            Kind::Events => "events",
            Kind::Lifecycle => "lifecycle",
            Kind::Commands => "commands",
        }
    }
}

/// The rows of a batch.
#[derive(Default)]
struct Rows {
    events: Vec<ArchivedEvent>,
    transitions: Vec<ArchivedTransition>,
    commands: Vec<CommandChange>,
}

/// One stream entry of a batch: where its rows are in [`Rows`], or why it
/// has none.
struct Unit<'a> {
    stream: &'a str,
    entry: &'a StreamId,
    kind: Kind,
    /// Ends (exclusive) of its rows in `events`, `transitions`, `commands`.
    ends: [usize; 3],
    undecodable: Option<String>,
}

/// A batch turned into rows, entry by entry, in order.
struct Prepared<'a> {
    rows: Rows,
    units: Vec<Unit<'a>>,
}

type Span<'r> = (
    &'r [ArchivedEvent],
    &'r [ArchivedTransition],
    &'r [CommandChange],
);

impl Prepared<'_> {
    /// The rows of the units in `range` (contiguous, since units are in order).
    fn span(&self, range: Range<usize>) -> Span<'_> {
        let start = match range.start {
            0 => [0; 3],
            i => self.units[i - 1].ends,
        };
        let end = match range.end {
            0 => [0; 3],
            i => self.units[i - 1].ends,
        };
        (
            &self.rows.events[start[0]..end[0]],
            &self.rows.transitions[start[1]..end[1]],
            &self.rows.commands[start[2]..end[2]],
        )
    }
}

/// First and last moments the archive takes: its day partitions are named
/// by a four-digit year.
const MIN_MS: i64 = -62_135_596_800_000; // 0001-01-01T00:00:00Z
const MAX_MS: i64 = 253_402_300_799_999; // 9999-12-31T23:59:59.999Z

fn check_time(ms: i64) -> Result<(), String> {
    if (MIN_MS..=MAX_MS).contains(&ms) {
        Ok(())
    } else {
        Err(format!(
            "timestamp {ms} ms is outside the years 1 to 9999 the archive holds"
        ))
    }
}

fn bytes_of(v: &redis::Value) -> Option<Vec<u8>> {
    redis::from_redis_value::<Vec<u8>>(v.clone()).ok()
}

/// Decodes one entry into `rows` (nothing is added on an error).
fn decode(kind: Kind, stream: &str, id: &StreamId, rows: &mut Rows) -> Result<(), String> {
    match kind {
        Kind::Commands => {
            let fields: HashMap<String, Vec<u8>> = id
                .map
                .iter()
                .filter_map(|(k, v)| bytes_of(v).map(|v| (k.clone(), v)))
                .collect();
            let change = CommandChange::from_fields(&fields)
                .ok_or_else(|| "not a command change (missing or malformed field)".to_owned())?;
            rows.commands.push(change);
        }
        Kind::Lifecycle => {
            let fields: HashMap<String, String> = id
                .map
                .iter()
                .filter_map(|(k, v)| {
                    redis::from_redis_value::<String>(v.clone())
                        .ok()
                        .map(|v| (k.clone(), v))
                })
                .collect();
            let t = ArchivedTransition::from_fields(stream, &id.id, &fields).ok_or_else(|| {
                "not a lifecycle transition (missing or malformed field)".to_owned()
            })?;
            check_time(t.at_ms)?;
            rows.transitions.push(t);
        }
        Kind::Events => {
            let bytes = id
                .map
                .get(ENTRY_FIELD)
                .and_then(bytes_of)
                .ok_or_else(|| format!("no `{ENTRY_FIELD}` field"))?;
            let entry = Entry::decode(&bytes).map_err(|e| e.to_string())?;
            let events = ArchivedEvent::from_entry(stream, &id.id, entry);
            for e in &events {
                check_time(e.ts_ms)?;
            }
            rows.events.extend(events);
        }
    }
    Ok(())
}

fn prepare<'a>(batch: &'a [(String, Vec<StreamId>)], keys: &Keys) -> Prepared<'a> {
    let mut rows = Rows::default();
    let mut units = Vec::new();
    for (stream, ids) in batch {
        let kind = Kind::of(stream, keys);
        for id in ids {
            let undecodable = decode(kind, stream, id, &mut rows).err();
            units.push(Unit {
                stream,
                entry: id,
                kind,
                ends: [
                    rows.events.len(),
                    rows.transitions.len(),
                    rows.commands.len(),
                ],
                undecodable,
            });
        }
    }
    Prepared { rows, units }
}

fn dead_letter_of(unit: &Unit<'_>, error: String) -> DeadLetter {
    let fields: Vec<(&str, Vec<u8>)> = unit
        .entry
        .map
        .iter()
        .map(|(k, v)| (k.as_str(), bytes_of(v).unwrap_or_default()))
        .collect();
    DeadLetter {
        stream: unit.stream.to_owned(),
        entry_id: unit.entry.id.clone(),
        fields: fields_json(fields.iter().map(|(k, v)| (*k, v.as_slice()))),
        error,
    }
}

/// How one write ended.
enum Attempt {
    Written,
    /// PostgreSQL rejected the data (retrying cannot help).
    Rejected(StoreError),
    /// Shutdown came first; nothing is acknowledged.
    Shutdown,
}

/// Entries removed before the archive read them, counted once each.
#[derive(Default)]
struct Gaps {
    /// Per stream: entries removed up to which losses are counted.
    counted: HashMap<String, u64>,
    total: u64,
    last: Option<Instant>,
}

impl Gaps {
    /// New losses on `key` seen now.
    fn observe(&mut self, key: &str, stream: &StreamProgress, group: &GroupProgress) -> u64 {
        let Some(unread) = trim::unread_removed(stream, group) else {
            return 0;
        };
        if unread == 0 {
            return 0;
        }
        let floor = self
            .counted
            .get(key)
            .copied()
            .unwrap_or(0)
            .max(group.entries_read.unwrap_or(0));
        self.counted.insert(key.to_owned(), stream.removed());
        stream.removed().saturating_sub(floor)
    }
}

struct Archiver {
    redis: RedisPool,
    store: Store,
    health: Health,
    opts: ArchiverOptions,
    shutdown: CancellationToken,
    streams: Vec<String>,
    gaps: Gaps,
    marked_at: Option<Instant>,
}

impl Archiver {
    async fn run(&mut self) {
        let mut reader: Option<ConnectionManager> = None;
        let mut last_maintenance: Option<Instant> = None;
        tracing::info!(consumer = %self.opts.consumer, streams = self.streams.len(), "archiver started");
        while !self.shutdown.is_cancelled() {
            if last_maintenance.is_none_or(|t| t.elapsed() >= self.opts.maintenance_interval) {
                last_maintenance = Some(Instant::now());
                self.maintain().await;
            }
            let conn = match reader.as_mut() {
                Some(c) => c,
                None => match self.redis.dedicated().await {
                    Ok(c) => reader.insert(c),
                    Err(e) => {
                        tracing::warn!(error = %e, "archiver cannot open its Redis connection");
                        if !self.pause(Duration::from_secs(1)).await {
                            return;
                        }
                        continue;
                    }
                },
            };
            let mut cmd = redis::cmd("XREADGROUP");
            cmd.arg("GROUP")
                .arg(ARCHIVER_GROUP)
                .arg(&self.opts.consumer)
                .arg("COUNT")
                .arg(self.opts.batch)
                .arg("BLOCK")
                .arg(self.opts.block.as_millis() as u64)
                .arg("STREAMS")
                .arg(&self.streams);
            for _ in &self.streams {
                cmd.arg(">");
            }
            let reply: redis::RedisResult<Option<StreamReadReply>> = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                r = cmd.query_async(conn) => r,
            };
            match reply {
                Ok(Some(reply)) => {
                    let batch: Vec<(String, Vec<StreamId>)> =
                        reply.keys.into_iter().map(|k| (k.key, k.ids)).collect();
                    self.write_and_ack(&batch).await;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "archiver read failed");
                    if e.code() == Some("NOGROUP") {
                        let _ = ensure_groups(&mut self.redis.get(), &self.streams).await;
                    }
                    if !self.pause(Duration::from_millis(500)).await {
                        return;
                    }
                }
            }
        }
    }

    /// Sleeps `d`; false if shutdown came first.
    async fn pause(&self, d: Duration) -> bool {
        tokio::select! {
            _ = self.shutdown.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }

    /// Claims idle entries, refreshes the marker, trims, looks for gaps.
    async fn maintain(&mut self) {
        if let Err(e) = self.claim().await {
            tracing::warn!(error = %e, "archiver claim failed");
        }
        if self.marked_at.is_none_or(|t| t.elapsed() >= MARKER_EVERY) {
            match trim::mark_archive_on(&mut self.redis.get(), &self.opts.keys).await {
                Ok(()) => self.marked_at = Some(Instant::now()),
                Err(e) => tracing::warn!(error = %e, "cannot refresh the archive marker"),
            }
        }
        if let Err(e) = self.trim_and_watch().await {
            tracing::warn!(error = %e, "archiver trim failed");
        }
        if self.gaps.last.is_some_and(|t| t.elapsed() >= GAP_HOLD)
            && self.health.status_of(GAPS_CHECK) != Some(Status::Ok)
        {
            self.health.set(GAPS_CHECK, Status::Ok, None, None);
        }
    }

    /// Counts `n` entries of `key` lost to the archive.
    fn lost(&mut self, key: &str, kind: Kind, n: u64, how: &str) {
        if n == 0 {
            return;
        }
        metrics::counter!("iot_archive_entries_lost_total", "stream" => kind.label()).increment(n);
        self.gaps.total += n;
        self.gaps.last = Some(Instant::now());
        let detail = format!(
            "{} stream entries left Redis before the archive stored them (latest: {n} of {key}, {how}); \
             a stream writer still caps the streams with MAXLEN: give every ingest, projector and api \
             the same database.url so that only the archiver trims",
            self.gaps.total
        );
        tracing::error!(stream = key, lost = n, total = self.gaps.total, "{detail}");
        self.health
            .set(GAPS_CHECK, Status::Degraded, Some(detail), None);
    }

    /// Per stream: entries lost before the archive read them, then the trim
    /// below every group's progress (the only trimming of these streams
    /// with the archive on: nothing leaves Redis before the archive and
    /// the projectors have it).
    async fn trim_and_watch(&mut self) -> redis::RedisResult<()> {
        let mut conn = self.redis.get();
        for key in self.streams.clone() {
            let groups = trim::group_progress(&mut conn, &key).await?;
            let Some(ours) = trim::archiver_group(&groups) else {
                continue;
            };
            if let Some(stream) = trim::stream_progress(&mut conn, &key).await? {
                let n = self.gaps.observe(&key, &stream, ours);
                let kind = Kind::of(&key, &self.opts.keys);
                self.lost(&key, kind, n, "trimmed before the archive read them");
            }
            let trimmed = trim::trim_below(&mut conn, &key, &groups).await?;
            metrics::counter!("iot_archive_trimmed_entries_total").increment(trimmed);
        }
        Ok(())
    }

    /// Writes the batch (retrying while PostgreSQL is unavailable, isolating
    /// entries it rejects), then XACKs. Nothing is acknowledged if shutdown
    /// comes first.
    async fn write_and_ack(&mut self, batch: &[(String, Vec<StreamId>)]) {
        if batch.iter().all(|(_, ids)| ids.is_empty()) {
            return;
        }
        if !self.store_batch(batch).await {
            // Not acknowledged: the entries stay pending and are claimed by
            // the next archiver.
            return;
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
        if let Err(e) = pipe.query_async::<()>(&mut self.redis.get()).await {
            // Harmless: the entries will be claimed and written again (no-ops).
            tracing::warn!(error = %e, "XACK after archiving failed");
        }
    }

    /// Stores every entry of `batch` (as rows or as a dead letter); false
    /// if shutdown came first.
    async fn store_batch(&mut self, batch: &[(String, Vec<StreamId>)]) -> bool {
        let prepared = prepare(batch, &self.opts.keys);
        let bad: Vec<&Unit<'_>> = prepared
            .units
            .iter()
            .filter(|u| u.undecodable.is_some())
            .collect();
        if !bad.is_empty() {
            let letters: Vec<DeadLetter> = bad
                .iter()
                .map(|u| {
                    let why = u.undecodable.clone().unwrap_or_default();
                    tracing::warn!(stream = u.stream, id = %u.entry.id, error = %why,
                        "undecodable stream entry recorded as a dead letter");
                    dead_letter_of(u, format!("undecodable: {why}"))
                })
                .collect();
            if !self.dead_letter(&letters).await {
                return false;
            }
            for u in bad {
                metrics::counter!("iot_archive_bad_entries_total", "stream" => u.kind.label())
                    .increment(1);
                metrics::counter!("iot_archive_dead_letters_total",
                    "stream" => u.kind.label(), "reason" => "undecodable")
                .increment(1);
            }
        }
        // Split on rejection until the rejected entry is alone.
        let mut todo: Vec<Range<usize>> = Vec::new();
        todo.push(0..prepared.units.len());
        while let Some(range) = todo.pop() {
            match self.write_range(&prepared, range.clone()).await {
                Attempt::Written => {}
                Attempt::Shutdown => return false,
                Attempt::Rejected(e) if range.len() > 1 => {
                    let mid = range.start + range.len() / 2;
                    tracing::debug!(error = %e, entries = range.len(), "PostgreSQL rejected part of a batch; splitting it");
                    todo.push(mid..range.end);
                    todo.push(range.start..mid);
                }
                Attempt::Rejected(e) => {
                    let unit = &prepared.units[range.start];
                    tracing::error!(stream = unit.stream, id = %unit.entry.id, error = %e,
                        "PostgreSQL rejected a stream entry; recorded in archive_dead_letters and skipped");
                    let letter = dead_letter_of(unit, e.to_string());
                    if !self.dead_letter(std::slice::from_ref(&letter)).await {
                        return false;
                    }
                    metrics::counter!("iot_archive_dead_letters_total",
                        "stream" => unit.kind.label(), "reason" => "rejected")
                    .increment(1);
                }
            }
        }
        true
    }

    /// Reports a write failure that will be retried; false if shutdown
    /// came first.
    async fn retry_after(&self, e: &StoreError, backoff: &mut Duration) -> bool {
        metrics::counter!("iot_archive_db_errors_total").increment(1);
        if self.health.status_of(HEALTH_CHECK) == Some(Status::Ok) {
            tracing::warn!(error = %e, "archive write failed; entries wait in Redis, retrying");
        }
        self.health
            .set(HEALTH_CHECK, Status::Degraded, Some(e.to_string()), None);
        let go_on = self.pause(*backoff).await;
        *backoff = (*backoff * 2).min(Duration::from_secs(5));
        go_on
    }

    fn healthy_again(&self) {
        if self.health.status_of(HEALTH_CHECK) != Some(Status::Ok) {
            tracing::info!("archive writes work again");
            self.health.set(HEALTH_CHECK, Status::Ok, None, None);
        }
    }

    /// Writes the rows of the units in `range`, retrying while the error
    /// may pass.
    async fn write_range(&self, prepared: &Prepared<'_>, range: Range<usize>) -> Attempt {
        let (events, transitions, commands) = prepared.span(range);
        if events.is_empty() && transitions.is_empty() && commands.is_empty() {
            return Attempt::Written;
        }
        let mut backoff = Duration::from_millis(100);
        loop {
            let start = std::time::Instant::now();
            let written = match self.store.archive(events, transitions).await {
                Ok(counts) => self
                    .store
                    .archive_commands(commands)
                    .await
                    .map(|commands| (counts, commands)),
                Err(e) => Err(e),
            };
            match written {
                Ok((counts, commands)) => {
                    metrics::histogram!("iot_archive_batch_duration_seconds")
                        .record(start.elapsed().as_secs_f64());
                    metrics::counter!("iot_archive_rows_total", "table" => "events")
                        .increment(counts.events);
                    metrics::counter!("iot_archive_rows_total", "table" => "transitions")
                        .increment(counts.transitions);
                    metrics::counter!("iot_archive_rows_total", "table" => "command_events")
                        .increment(commands);
                    self.healthy_again();
                    return Attempt::Written;
                }
                Err(e) if e.is_rejected_data() => {
                    // PostgreSQL answered: it is not unavailable.
                    self.healthy_again();
                    return Attempt::Rejected(e);
                }
                Err(e) => {
                    if !self.retry_after(&e, &mut backoff).await {
                        return Attempt::Shutdown;
                    }
                }
            }
        }
    }

    /// Records dead letters, retrying while PostgreSQL is unavailable;
    /// false if shutdown came first.
    async fn dead_letter(&self, letters: &[DeadLetter]) -> bool {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.store.dead_letter(letters).await {
                Ok(_) => {
                    self.healthy_again();
                    return true;
                }
                Err(e) if e.is_rejected_data() => {
                    // Cannot happen with base64 fields and NUL-free text;
                    // do not stall the archive for it.
                    for l in letters {
                        tracing::error!(stream = %l.stream, id = %l.entry_id, error = %e,
                            "cannot even record the dead letter; the entry is skipped");
                    }
                    return true;
                }
                Err(e) => {
                    if !self.retry_after(&e, &mut backoff).await {
                        return false;
                    }
                }
            }
        }
    }

    async fn claim(&mut self) -> redis::RedisResult<()> {
        let mut conn = self.redis.get();
        for stream in self.streams.clone() {
            let mut start = "0-0".to_owned();
            loop {
                let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
                    .arg(&stream)
                    .arg(ARCHIVER_GROUP)
                    .arg(&self.opts.consumer)
                    .arg(self.opts.claim_idle.as_millis() as u64)
                    .arg(&start)
                    .arg("COUNT")
                    .arg(self.opts.batch)
                    .query_async(&mut conn)
                    .await?;
                if !reply.deleted_ids.is_empty() {
                    // Read by an archiver that died, then removed before
                    // anyone stored them: the trimmer above never does
                    // that, a writer's MAXLEN does. Acknowledge so they do
                    // not stay pending, and count them.
                    let _: redis::RedisResult<()> = redis::cmd("XACK")
                        .arg(&stream)
                        .arg(ARCHIVER_GROUP)
                        .arg(&reply.deleted_ids)
                        .query_async(&mut conn)
                        .await;
                    let kind = Kind::of(&stream, &self.opts.keys);
                    self.lost(
                        &stream,
                        kind,
                        reply.deleted_ids.len() as u64,
                        "pending entries trimmed before they were stored",
                    );
                }
                if !reply.claimed.is_empty() {
                    metrics::counter!("iot_archive_claimed_entries_total")
                        .increment(reply.claimed.len() as u64);
                    let batch = vec![(stream.clone(), reply.claimed)];
                    self.write_and_ack(&batch).await;
                }
                if reply.next_stream_id == "0-0" || self.shutdown.is_cancelled() {
                    break;
                }
                start = reply.next_stream_id;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sid(id: &str, fields: &[(&str, &[u8])]) -> StreamId {
        StreamId {
            id: id.into(),
            map: fields
                .iter()
                .map(|(k, v)| ((*k).to_owned(), redis::Value::BulkString(v.to_vec())))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn units_know_their_rows_and_undecodable_entries_have_none() {
        let keys = Keys::default();
        let lifecycle = |at: &str| {
            sid(
                "1-0",
                &[
                    ("phy_id", b"d"),
                    ("online", b"1"),
                    ("reason", b"connected"),
                    ("at_ms", at.as_bytes()),
                ],
            )
        };
        let batch = vec![
            (
                keys.lifecycle(0),
                vec![lifecycle("1000"), lifecycle("nope"), lifecycle("2000")],
            ),
            (keys.events(1), vec![sid("2-0", &[("e", b"\x09junk")])]),
            (
                keys.lifecycle(1),
                vec![lifecycle(&format!("{}", MAX_MS + 1))],
            ),
        ];
        let p = prepare(&batch, &keys);
        assert_eq!(p.units.len(), 5);
        let bad: Vec<bool> = p.units.iter().map(|u| u.undecodable.is_some()).collect();
        assert_eq!(bad, [false, true, false, true, true]);
        assert_eq!(p.span(0..1).1.len(), 1);
        assert_eq!(p.span(1..2).1.len(), 0);
        assert_eq!(p.span(0..3).1.len(), 2);
        assert_eq!(p.span(2..3).1[0].at_ms, 2000);
        assert_eq!(p.span(3..5).0.len(), 0);
        assert_eq!(p.units[3].kind, Kind::Events);
        assert_eq!(Kind::of(&keys.command_events(), &keys), Kind::Commands);
    }

    #[test]
    fn gaps_are_counted_once() {
        let group = |read| GroupProgress {
            name: ARCHIVER_GROUP.into(),
            pending: 0,
            last_delivered_id: "10-0".into(),
            entries_read: Some(read),
        };
        let stream = |added, length, first: &str| StreamProgress {
            entries_added: added,
            length,
            first_entry_id: Some(first.into()),
        };
        let mut g = Gaps::default();
        assert_eq!(g.observe("s", &stream(20, 10, "11-0"), &group(10)), 0);
        assert_eq!(g.observe("s", &stream(20, 6, "15-0"), &group(10)), 4);
        assert_eq!(
            g.observe("s", &stream(20, 6, "15-0"), &group(10)),
            0,
            "seen"
        );
        assert_eq!(g.observe("s", &stream(30, 10, "21-0"), &group(10)), 6);
        assert_eq!(g.observe("t", &stream(30, 10, "21-0"), &group(10)), 10);
    }
}
