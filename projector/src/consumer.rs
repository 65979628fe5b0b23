//! The consumer: reads every event shard as one member of the projectors'
//! consumer group, applies each batch, and acknowledges an entry only once
//! its effects are stored.
//!
//! At start it first re-applies the entries still pending for its own name
//! (a restart after a crash), then reads new entries with blocking
//! XREADGROUPs on connections of their own, in reader tasks that hand what
//! they read to the consumer loop over a bounded channel (so a busy loop
//! stops the readers, and what they read waits in the group's pending
//! lists); the loop applies up to `batch_size` entries of all shards at a
//! time. On a plain Redis one reader reads every shard with one
//! `XREADGROUP ... STREAMS` (one wake-up for all shards: the cheapest for
//! Redis); on a Redis Cluster (`cluster_enabled:1`) each shard has a reader
//! of its own with a single-stream command, so every command the projector
//! sends stays within one hash slot. Every `claim_interval` it
//! takes over entries left pending longer than `claim_idle` by any consumer
//! (XAUTOCLAIM), so a dead projector's work is finished by a live one.
//! Undecodable entries are logged, counted and acknowledged. Redis errors are
//! logged and counted, and the operation is retried with backoff until it
//! succeeds or the service stops; a batch that is interrupted is simply
//! delivered again later (every step is idempotent).
//!
//! One exception keeps a single bad entry from stalling the whole group (and
//! then every projector that claims it): when Redis refuses a batch as data
//! ([`is_refused_as_data`], e.g. `WRONGTYPE` on a device key someone
//! overwrote) [`REFUSALS_BEFORE_ISOLATING`] times in a row, the batch is
//! applied one entry at a time, and an entry that Redis still refuses on its
//! own that often is moved to `stream:dead:projector` (logged, counted in
//! `iot_projector_dead_letters_total`) and acknowledged with the rest.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use iot_core::keys::PROJECTOR_GROUP;
use iot_service::{Health, RedisPool, Status};
use redis::aio::ConnectionManager;
use redis::{RedisError, RedisResult, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::metrics;
use crate::projection::{Applied, Item, Lifecycle, Projection};
use crate::stream::{self, Payload, StreamEntry};

/// Name of the health check the consumer keeps.
pub const HEALTH_CHECK: &str = "projector";

/// Most entries claimed from one shard per claim round.
const CLAIM_ROUND_MAX: usize = 10_000;

/// Refusals as data in a row before a batch is applied entry by entry, and
/// before an entry refused on its own goes to the dead-letter stream.
pub const REFUSALS_BEFORE_ISOLATING: u32 = 3;

/// Cap (`MAXLEN ~`) of the dead-letter stream.
const DEAD_LETTERS_MAX: usize = 10_000;

/// Whether Redis refused a command for what it was given (a reply error
/// that the same entry will meet every time), rather than for its own state
/// or reach, which waiting cures: out of memory, a failing disk (`MISCONF`),
/// a busy script, a read-only replica, loading, a lost function library,
/// authentication or connection trouble are not refusals as data.
pub fn is_refused_as_data(e: &RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    if crate::script::is_noscript(e) {
        return false;
    }
    match e.kind() {
        ErrorKind::Server(ServerErrorKind::ResponseError) | ErrorKind::UnexpectedReturnType => true,
        ErrorKind::Extension => !matches!(
            e.code(),
            Some(
                "OOM"
                    | "MISCONF"
                    | "BUSY"
                    | "NOREPLICAS"
                    | "NOAUTH"
                    | "WRONGPASS"
                    | "UNBLOCKED"
                    | "MASTERDOWN"
                    | "LOADING"
                    | "READONLY"
            )
        ),
        _ => false,
    }
}

/// What a shard reader hands the consumer loop.
enum ShardRead {
    /// New entries of one shard (delivered to this consumer: pending until
    /// the loop acknowledges them).
    Entries(Vec<StreamEntry>),
    /// A read failed; the reader retries after a backoff.
    Failed(RedisError),
}

/// A reader: a blocking `XREADGROUP ... >` of `shards` on a connection of
/// its own, in a loop, until `stop` or the consumer loop is gone. After a
/// small read it waits `projector.linger` so a trickle arrives in fewer,
/// larger reads. Errors go to the loop (which logs and counts them) and are
/// retried after a backoff.
async fn read_shards(
    redis: RedisPool,
    projection: Arc<Projection>,
    shards: Vec<u16>,
    tx: mpsc::Sender<ShardRead>,
    stop: CancellationToken,
) {
    let s = projection.settings();
    let keys: Vec<String> = shards.iter().map(|i| s.keys.events(*i)).collect();
    let shard_of_key: HashMap<String, u16> = keys.iter().cloned().zip(shards).collect();
    let count = s.per_shard_count();
    let block_ms = u64::try_from(s.block.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    let mut backoff = Backoff::default();
    let mut conn: Option<ConnectionManager> = None;
    while !stop.is_cancelled() {
        let c = match &mut conn {
            Some(c) => c,
            None => match redis.dedicated().await {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    if tx.send(ShardRead::Failed(e)).await.is_err() {
                        return;
                    }
                    if !backoff.wait(&stop).await {
                        return;
                    }
                    continue;
                }
            },
        };
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(PROJECTOR_GROUP)
            .arg(&s.consumer)
            .arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(block_ms)
            .arg("STREAMS")
            .arg(&keys);
        for _ in &keys {
            cmd.arg(">");
        }
        let reply = tokio::select! {
            _ = stop.cancelled() => return,
            r = cmd.query_async::<Value>(c) => r,
        };
        match reply {
            Ok(reply) => {
                backoff.reset();
                let entries = stream::parse_read(reply, &shard_of_key);
                let small = entries.len() < (count * keys.len()) / 4;
                if !entries.is_empty() && tx.send(ShardRead::Entries(entries)).await.is_err() {
                    return;
                }
                if small && !s.linger.is_zero() {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(s.linger) => {}
                    }
                }
            }
            Err(e) => {
                if tx.send(ShardRead::Failed(e)).await.is_err() {
                    return;
                }
                if !backoff.wait(&stop).await {
                    return;
                }
            }
        }
    }
}

/// Whether Redis runs in cluster mode (`INFO cluster`: `cluster_enabled:1`),
/// where a command must not name streams of several shards. When Redis
/// cannot tell, the answer is yes: per-shard reads work everywhere.
async fn is_cluster(conn: &mut ConnectionManager) -> bool {
    match redis::cmd("INFO")
        .arg("cluster")
        .query_async::<String>(conn)
        .await
    {
        Ok(info) => !info.contains("cluster_enabled:0"),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read INFO cluster; reading each shard on its own");
            true
        }
    }
}

/// Adds what `more` did to `total`.
fn add_applied(total: &mut Applied, more: Applied) {
    total.events += more.events;
    total.bad_events += more.bad_events;
    total.flips.extend(more.flips);
    total.evaluated += more.evaluated;
    total.seen_only += more.seen_only;
}

/// The consumer loop's state.
pub struct Consumer {
    projection: Arc<Projection>,
    redis: RedisPool,
    health: Health,
    shutdown: CancellationToken,
    shard_of_key: HashMap<String, u16>,
}

/// Whether `e` says the consumer group (or its stream) is missing, as after
/// Redis lost its data.
fn is_nogroup(e: &RedisError) -> bool {
    e.code() == Some("NOGROUP") || e.to_string().contains("NOGROUP")
}

/// Creates the consumer group on every shard (from id 0, with MKSTREAM) where
/// it is missing.
pub async fn ensure_groups(
    conn: &mut ConnectionManager,
    projection: &Projection,
) -> RedisResult<()> {
    let s = projection.settings();
    for shard in s.shard_range() {
        let res: RedisResult<Value> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(s.keys.events(shard))
            .arg(PROJECTOR_GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(conn)
            .await;
        match res {
            Ok(_) => {}
            Err(e) if e.code() == Some("BUSYGROUP") || e.to_string().contains("BUSYGROUP") => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Consumer {
    /// A consumer for `projection`.
    pub fn new(
        projection: Arc<Projection>,
        redis: RedisPool,
        health: Health,
        shutdown: CancellationToken,
    ) -> Self {
        let s = projection.settings();
        let shard_of_key = s
            .shard_range()
            .map(|i| (s.keys.events(i), i))
            .collect::<HashMap<_, _>>();
        Self {
            projection,
            redis,
            health,
            shutdown,
            shard_of_key,
        }
    }

    fn failed(&self, op: &'static str, e: &RedisError, backoff: &Backoff) {
        metrics::redis_error(op);
        tracing::warn!(op, error = %e, retry_in = ?backoff.current(), "Redis operation failed; retrying");
        self.health.set(
            HEALTH_CHECK,
            Status::Degraded,
            Some(format!("{op} failing: {e}")),
            None,
        );
    }

    /// A failed read: logged and counted; a missing group (Redis lost its
    /// data) sends the loop back to its setup.
    fn read_failed(&self, e: &RedisError, setup: &mut bool, backoff: &Backoff) {
        if is_nogroup(e) {
            *setup = true;
        }
        self.failed("xreadgroup", e, backoff);
    }

    /// Runs until shutdown.
    pub async fn run(self) {
        let s = self.projection.settings();
        let consumer = s.consumer.clone();
        let mut backoff = Backoff::default();
        let mut conn = self.redis.get();
        let mut setup = true;
        // Shards whose own pending entries are still being re-applied, with
        // the id read up to.
        let mut own_pending: BTreeMap<u16, String> =
            s.shard_range().map(|i| (i, "0".to_owned())).collect();
        let mut next_claim = Instant::now() + s.claim_interval;
        // The shard readers, started once the groups exist and the own
        // pending entries are done; they stop with the loop.
        let readers_stop = self.shutdown.child_token();
        let _stop_readers = readers_stop.clone().drop_guard();
        let mut reads: Option<mpsc::Receiver<ShardRead>> = None;
        while !self.shutdown.is_cancelled() {
            if setup {
                let r = async {
                    ensure_groups(&mut conn, &self.projection).await?;
                    self.projection.scripts().load(&mut conn).await
                }
                .await;
                match r {
                    Ok(()) => {
                        setup = false;
                        backoff.reset();
                        self.health.set(HEALTH_CHECK, Status::Ok, None, None);
                    }
                    Err(e) => {
                        self.failed("setup", &e, &backoff);
                        if !backoff.wait(&self.shutdown).await {
                            return;
                        }
                        continue;
                    }
                }
            }
            if Instant::now() >= next_claim {
                self.claim().await;
                next_claim = Instant::now() + s.claim_interval;
            }
            if !own_pending.is_empty() {
                match self.read_own_pending(&mut conn, &mut own_pending).await {
                    Ok(entries) => {
                        backoff.reset();
                        if !entries.is_empty() {
                            self.process(entries, true).await;
                        }
                    }
                    Err(e) => {
                        self.read_failed(&e, &mut setup, &backoff);
                        if !backoff.wait(&self.shutdown).await {
                            return;
                        }
                    }
                }
                continue;
            }
            if reads.is_none() {
                let per_shard = is_cluster(&mut conn).await;
                reads = Some(self.spawn_readers(&readers_stop, per_shard));
            }
            let Some(rx) = reads.as_mut() else { break };
            let first = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                _ = tokio::time::sleep_until(next_claim.into()) => continue,
                r = rx.recv() => r,
            };
            let mut entries = match first {
                Some(ShardRead::Entries(e)) => e,
                Some(ShardRead::Failed(e)) => {
                    self.read_failed(&e, &mut setup, &backoff);
                    if !backoff.wait(&self.shutdown).await {
                        return;
                    }
                    continue;
                }
                // Every reader ended: only at shutdown.
                None => break,
            };
            backoff.reset();
            // What the other readers read meanwhile joins the batch.
            while entries.len() < s.batch_size {
                match rx.try_recv() {
                    Ok(ShardRead::Entries(e)) => entries.extend(e),
                    Ok(ShardRead::Failed(e)) => {
                        self.read_failed(&e, &mut setup, &backoff);
                    }
                    Err(_) => break,
                }
            }
            self.process(entries, false).await;
        }
        tracing::info!(consumer = %consumer, "consumer stopped");
    }

    /// Starts the readers (see [`read_shards`]): one per shard when
    /// `per_shard` (Redis Cluster), else one for all shards. They stop when
    /// `stop` is cancelled or the receiver is dropped.
    fn spawn_readers(
        &self,
        stop: &CancellationToken,
        per_shard: bool,
    ) -> mpsc::Receiver<ShardRead> {
        let s = self.projection.settings();
        let groups: Vec<Vec<u16>> = if per_shard {
            s.shard_range().map(|i| vec![i]).collect()
        } else {
            vec![s.shard_range().collect()]
        };
        tracing::info!(
            readers = groups.len(),
            per_shard,
            "reading the event shards"
        );
        // Room for one read of every reader: a busy loop stops the readers.
        let (tx, rx) = mpsc::channel(groups.len().max(1));
        for shards in groups {
            tokio::spawn(read_shards(
                self.redis.clone(),
                self.projection.clone(),
                shards,
                tx.clone(),
                stop.clone(),
            ));
        }
        rx
    }

    /// Reads this consumer's own pending entries (delivered before a
    /// restart), shard by shard (one single-stream `XREADGROUP` per shard,
    /// pipelined), advancing `cursors`; a shard with nothing left is dropped
    /// from them.
    async fn read_own_pending(
        &self,
        conn: &mut ConnectionManager,
        cursors: &mut BTreeMap<u16, String>,
    ) -> RedisResult<Vec<StreamEntry>> {
        let s = self.projection.settings();
        let mut pipe = redis::pipe();
        for (shard, id) in cursors.iter() {
            pipe.cmd("XREADGROUP")
                .arg("GROUP")
                .arg(PROJECTOR_GROUP)
                .arg(&s.consumer)
                .arg("COUNT")
                .arg(s.per_shard_count())
                .arg("STREAMS")
                .arg(s.keys.events(*shard))
                .arg(id);
        }
        let replies: Vec<Value> = pipe.query_async(conn).await?;
        let mut entries = Vec::new();
        for reply in replies {
            entries.extend(stream::parse_read(reply, &self.shard_of_key));
        }
        let mut last: BTreeMap<u16, String> = BTreeMap::new();
        for e in &entries {
            last.insert(e.shard, e.id.clone());
        }
        cursors.retain(|shard, cursor| match last.remove(shard) {
            Some(id) => {
                *cursor = id;
                true
            }
            None => false,
        });
        if !entries.is_empty() {
            tracing::info!(entries = entries.len(), "re-applying own pending entries");
        }
        Ok(entries)
    }

    /// Takes over entries idle longer than `claim_idle` on every shard.
    async fn claim(&self) {
        let s = self.projection.settings();
        let idle_ms = u64::try_from(s.claim_idle.as_millis()).unwrap_or(u64::MAX);
        let mut conn = self.redis.get();
        for shard in s.shard_range() {
            let mut start = "0-0".to_owned();
            let mut taken = 0usize;
            loop {
                if self.shutdown.is_cancelled() {
                    return;
                }
                let reply: RedisResult<Value> = redis::cmd("XAUTOCLAIM")
                    .arg(s.keys.events(shard))
                    .arg(PROJECTOR_GROUP)
                    .arg(&s.consumer)
                    .arg(idle_ms)
                    .arg(&start)
                    .arg("COUNT")
                    .arg(s.batch_size)
                    .query_async(&mut conn)
                    .await;
                let reply = match reply {
                    Ok(v) => v,
                    Err(e) => {
                        // Not worth a retry loop: the next round claims them.
                        metrics::redis_error("xautoclaim");
                        tracing::warn!(shard, error = %e, "XAUTOCLAIM failed");
                        return;
                    }
                };
                let (next, entries) = stream::parse_autoclaim(shard, reply);
                if !entries.is_empty() {
                    metrics::claimed(entries.len() as u64);
                    tracing::info!(
                        shard,
                        entries = entries.len(),
                        "claimed idle pending entries"
                    );
                    taken += entries.len();
                    self.process(entries, true).await;
                }
                if next == "0-0" || taken >= CLAIM_ROUND_MAX {
                    break;
                }
                start = next;
            }
        }
    }

    /// Applies `items` one at a time, after Redis refused their batch as
    /// data: an item it refuses on its own [`REFUSALS_BEFORE_ISOLATING`]
    /// times in a row goes to the dead-letter stream, the others are
    /// applied; other errors are retried as ever. `None`: the service is
    /// stopping (the batch stays pending).
    async fn isolate(
        &self,
        conn: &mut ConnectionManager,
        items: &[Item],
        origin: &[&StreamEntry],
    ) -> Option<Applied> {
        let mut total = Applied::default();
        for (item, entry) in items.iter().zip(origin) {
            let mut backoff = Backoff::default();
            let mut refused = 0u32;
            loop {
                let now = iot_core::time::now_ms();
                match self
                    .projection
                    .apply(conn, std::slice::from_ref(item), Lifecycle::Emit, now)
                    .await
                {
                    Ok(a) => {
                        add_applied(&mut total, a);
                        break;
                    }
                    Err(e)
                        if is_refused_as_data(&e) && refused + 1 >= REFUSALS_BEFORE_ISOLATING =>
                    {
                        if !self.dead_letter(conn, entry, &e).await {
                            return None;
                        }
                        break;
                    }
                    Err(e) => {
                        if is_refused_as_data(&e) {
                            refused += 1;
                        } else {
                            refused = 0;
                        }
                        self.failed("apply", &e, &backoff);
                        if !backoff.wait(&self.shutdown).await {
                            return None;
                        }
                    }
                }
            }
        }
        Some(total)
    }

    /// Moves `entry` to the dead-letter stream (retried until written);
    /// false: the service is stopping.
    async fn dead_letter(
        &self,
        conn: &mut ConnectionManager,
        entry: &StreamEntry,
        error: &RedisError,
    ) -> bool {
        let bytes: &[u8] = match &entry.payload {
            Payload::Bytes(b) => b,
            Payload::Missing | Payload::Deleted => &[],
        };
        let key = self.projection.settings().keys.projector_dead_letters();
        let mut backoff = Backoff::default();
        loop {
            let written: RedisResult<Value> = redis::cmd("XADD")
                .arg(&key)
                .arg("MAXLEN")
                .arg("~")
                .arg(DEAD_LETTERS_MAX)
                .arg("*")
                .arg("shard")
                .arg(entry.shard)
                .arg("id")
                .arg(&entry.id)
                .arg("error")
                .arg(error.to_string())
                .arg("e")
                .arg(bytes)
                .query_async(conn)
                .await;
            match written {
                Ok(_) => {
                    metrics::dead_letter();
                    tracing::error!(shard = entry.shard, id = %entry.id, error = %error, dead_letters = %key,
                        "Redis refuses to apply this event entry; moved it to the dead-letter stream and acknowledged it");
                    return true;
                }
                Err(e) => {
                    self.failed("dead_letter", &e, &backoff);
                    if !backoff.wait(&self.shutdown).await {
                        return false;
                    }
                }
            }
        }
    }

    /// Applies entries, then acknowledges them. Retries until done or the
    /// service stops (then the entries stay pending for a later delivery).
    async fn process(&self, entries: Vec<StreamEntry>, redelivered: bool) {
        let started = Instant::now();
        let mut items = Vec::with_capacity(entries.len());
        // The stream entry of each item (for the dead-letter stream).
        let mut origin = Vec::with_capacity(entries.len());
        let mut bad = 0u64;
        for e in &entries {
            match stream::decode(&e.payload) {
                Ok(Some(entry)) => {
                    items.push(Item { entry, redelivered });
                    origin.push(e);
                }
                Ok(None) => {}
                Err(err) => {
                    bad += 1;
                    tracing::warn!(shard = e.shard, id = %e.id, error = %err,
                        "undecodable stream entry; acknowledged and skipped");
                }
            }
        }
        let mut conn = self.redis.get();
        let mut backoff = Backoff::default();
        let mut refused = 0u32;
        let applied = loop {
            let now = iot_core::time::now_ms();
            match self
                .projection
                .apply(&mut conn, &items, Lifecycle::Emit, now)
                .await
            {
                Ok(a) => break a,
                Err(e) => {
                    self.failed("apply", &e, &backoff);
                    if is_refused_as_data(&e) {
                        refused += 1;
                        if refused >= REFUSALS_BEFORE_ISOLATING {
                            match self.isolate(&mut conn, &items, &origin).await {
                                Some(a) => break a,
                                None => return,
                            }
                        }
                    } else {
                        refused = 0;
                    }
                    if !backoff.wait(&self.shutdown).await {
                        return;
                    }
                }
            }
        };
        if bad + applied.bad_events > 0 {
            metrics::bad_entries(bad + applied.bad_events);
        }
        let mut by_shard: BTreeMap<u16, Vec<&str>> = BTreeMap::new();
        for e in &entries {
            by_shard.entry(e.shard).or_default().push(e.id.as_str());
        }
        let s = self.projection.settings();
        let mut pipe = redis::pipe();
        for (shard, ids) in &by_shard {
            pipe.cmd("XACK")
                .arg(s.keys.events(*shard))
                .arg(PROJECTOR_GROUP)
                .arg(ids)
                .ignore();
        }
        loop {
            match pipe.query_async::<()>(&mut conn).await {
                Ok(()) => break,
                Err(e) => {
                    self.failed("xack", &e, &backoff);
                    if !backoff.wait(&self.shutdown).await {
                        return;
                    }
                }
            }
        }
        self.health.set(HEALTH_CHECK, Status::Ok, None, None);
        metrics::batch(entries.len(), started.elapsed());
        let deleted = entries
            .iter()
            .filter(|e| e.payload == Payload::Deleted)
            .count();
        tracing::debug!(
            entries = entries.len(),
            events = applied.events,
            flips = applied.flips.len(),
            deleted,
            took_ms = started.elapsed().as_secs_f64() * 1000.0,
            "batch applied"
        );
    }
}
