//! The batching event writer: one per instance, between every connection
//! and the Redis Streams.
//!
//! Connections send [`Item`]s over a bounded channel (a full channel makes
//! them wait: backpressure reaches the sockets). The writer collects items
//! until `streams.batch_max` entries are ready or `streams.flush_interval`
//! has passed since the first, then writes them with one pipelined round of
//! `XADD stream:events:{shard} MAXLEN ~ <maxlen> * e <entry>`; with the
//! PostgreSQL archive (`database.url` set), or once an archiver has been
//! seen on this Redis, without `MAXLEN`, since the archiver then trims the
//! streams below what every consumer group has processed (the cap is read
//! at each flush, see [`iot_core::Config::stream_cap`]).
//!
//! Heartbeats coalesce: per flush only the newest heartbeat of each device is
//! kept ([`Pending`]), and they travel together in as few `Entry::Heartbeats`
//! entries as fit ([`BEATS_PER_ENTRY`] each), whatever the devices' shards,
//! on streams taken in turn. Heartbeats merge by max, in any order, so they
//! need no place beside their device's other events; what a stream entry
//! costs Redis (the `XADD`, its delivery and `XACK`) is then shared by every
//! heartbeat of a flush instead of by the few of one shard. Every other
//! event is its own entry in its device's shard, written in arrival order. A
//! QoS 1 uplink carries a completion signal that fires once its XADD has
//! succeeded, so the PUBACK follows the write.
//!
//! While Redis fails, the writer keeps collecting: at most one heartbeat per
//! device plus a bounded FIFO of other events (`streams.buffer_max`; beyond
//! it the oldest event is dropped and counted), reports the `event_writer`
//! health check degraded, and retries with backoff. When Redis answers
//! again, everything is written oldest first.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use iot_core::config::StreamCap;
use iot_core::event::{ENTRY_FIELD, Heartbeat, HeartbeatBatch};
use iot_core::{Entry, Event, EventKind, Keys, PhyId, ServerId};
use iot_service::{Health, RedisPool, Status};
use metrics::{counter, gauge, histogram};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::metrics as m;

/// Most heartbeats in one `Entry::Heartbeats` stream entry.
pub const BEATS_PER_ENTRY: usize = 500;

/// Name of the health check the writer keeps.
pub const HEALTH_CHECK: &str = "event_writer";

const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// What a connection hands to the writer.
#[derive(Debug)]
pub enum Item {
    /// An event that is written as its own entry, in order.
    Event {
        /// The event.
        event: Event,
        /// Completed with `()` once written; dropped if the event is dropped.
        done: Option<oneshot::Sender<()>>,
    },
    /// A heartbeat, coalesced with the device's others.
    Heartbeat(Heartbeat),
}

/// An event waiting to be written.
#[derive(Debug)]
pub struct Queued {
    /// The event.
    pub event: Event,
    /// Its completion signal, if someone waits for it.
    pub done: Option<oneshot::Sender<()>>,
}

/// Whether heartbeat `a` supersedes `b`: the newer connection (epoch) wins,
/// then the later time.
fn supersedes(a: &Heartbeat, b: &Heartbeat) -> bool {
    (a.epoch, a.ts_ms) >= (b.epoch, b.ts_ms)
}

/// Events waiting for a flush: a FIFO of events and the newest heartbeat of
/// each device. Pure, so its rules are unit-tested.
#[derive(Debug, Default)]
pub struct Pending {
    events: VecDeque<Queued>,
    beats: HashMap<PhyId, Heartbeat>,
    buffer_max: usize,
}

/// What [`Pending::take`] hands to a flush.
#[derive(Debug, Default)]
pub struct Batch {
    /// Events in arrival order.
    pub events: Vec<Queued>,
    /// One heartbeat per device.
    pub beats: Vec<Heartbeat>,
}

impl Pending {
    /// Holds at most `buffer_max` events (heartbeats are not counted: there
    /// is at most one per device).
    pub fn new(buffer_max: usize) -> Self {
        Self {
            events: VecDeque::new(),
            beats: HashMap::new(),
            buffer_max: buffer_max.max(1),
        }
    }

    /// Adds an item; returns how many events were dropped to stay within
    /// the bound (the oldest go first).
    pub fn push(&mut self, item: Item) -> usize {
        match item {
            Item::Event { event, done } => {
                self.events.push_back(Queued { event, done });
                self.trim()
            }
            Item::Heartbeat(hb) => {
                self.merge_beat(hb);
                0
            }
        }
    }

    fn merge_beat(&mut self, hb: Heartbeat) {
        match self.beats.get_mut(&hb.phy_id) {
            Some(old) => {
                if supersedes(&hb, old) {
                    *old = hb;
                }
            }
            None => {
                self.beats.insert(hb.phy_id.clone(), hb);
            }
        }
    }

    fn trim(&mut self) -> usize {
        let mut dropped = 0;
        while self.events.len() > self.buffer_max {
            // Dropping the completion signal tells a waiting connection that
            // its event was not written.
            self.events.pop_front();
            dropped += 1;
        }
        dropped
    }

    /// Events plus pending heartbeats.
    pub fn len(&self) -> usize {
        self.events.len() + self.beats.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && self.beats.is_empty()
    }

    /// Stream entries a flush of everything would write.
    pub fn entries(&self) -> usize {
        self.events.len() + self.beats.len().div_ceil(BEATS_PER_ENTRY)
    }

    /// Takes up to `max_events` events (oldest first) and every heartbeat.
    pub fn take(&mut self, max_events: usize) -> Batch {
        let n = self.events.len().min(max_events.max(1));
        Batch {
            events: self.events.drain(..n).collect(),
            beats: self.beats.drain().map(|(_, hb)| hb).collect(),
        }
    }

    /// Puts a batch that could not be written back in front of what arrived
    /// since, so it is written first; a heartbeat that arrived meanwhile
    /// supersedes the batch's. Returns how many events were dropped to stay
    /// within the bound.
    pub fn restore(&mut self, batch: Batch) -> usize {
        for q in batch.events.into_iter().rev() {
            self.events.push_front(q);
        }
        for hb in batch.beats {
            self.merge_beat(hb);
        }
        self.trim()
    }
}

impl Batch {
    /// The stream entries: each event on its own, in its device's shard, then
    /// the heartbeats in entries of at most [`BEATS_PER_ENTRY`], the first on
    /// shard `turn % shards`, the next on the next shard, and so on.
    pub fn entries(&self, server_id: &ServerId, shards: u16, turn: u64) -> Vec<(u16, Entry)> {
        let mut out: Vec<(u16, Entry)> = self
            .events
            .iter()
            .map(|q| {
                (
                    iot_core::keys::shard_of(q.event.phy_id.as_str(), shards),
                    Entry::Event(q.event.clone()),
                )
            })
            .collect();
        let shards = u64::from(shards.max(1));
        for (i, chunk) in self.beats.chunks(BEATS_PER_ENTRY).enumerate() {
            // Less than `shards`, so it fits.
            let shard = u16::try_from(turn.wrapping_add(i as u64) % shards).unwrap_or(0);
            out.push((
                shard,
                Entry::Heartbeats(HeartbeatBatch {
                    server_id: server_id.clone(),
                    beats: chunk.to_vec(),
                }),
            ));
        }
        out
    }

    /// Events in the batch, heartbeats counted one per device.
    pub fn len(&self) -> usize {
        self.events.len() + self.beats.len()
    }

    /// Whether the batch holds nothing.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && self.beats.is_empty()
    }

    /// Counts per event kind, for the metric.
    fn kind_counts(&self) -> Vec<(&'static str, u64)> {
        let mut counts: BTreeMap<&'static str, u64> = BTreeMap::new();
        for q in &self.events {
            *counts.entry(q.event.kind.name()).or_default() += 1;
        }
        if !self.beats.is_empty() {
            *counts.entry(EventKind::Heartbeat.name()).or_default() += self.beats.len() as u64;
        }
        counts.into_iter().collect()
    }
}

/// The writer's settings (from `streams:`).
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// Number of shards.
    pub shards: u16,
    /// `MAXLEN ~` per shard, read at each flush; none: no cap (the
    /// archiver trims).
    pub maxlen: StreamCap,
    /// Most events per flush.
    pub batch_max: usize,
    /// Longest wait before a flush.
    pub flush_interval: Duration,
    /// Events held while Redis fails.
    pub buffer_max: usize,
    /// Channel capacity.
    pub channel_capacity: usize,
    /// Longest one pipelined flush may take before it counts as failed.
    pub write_timeout: Duration,
}

impl WriterConfig {
    /// From the config (the `streams:` section, and whether the archive
    /// trims the streams), with `write_timeout` for each flush.
    pub fn from_config(config: &iot_core::Config, write_timeout: Duration) -> Self {
        let c = &config.streams;
        Self {
            write_timeout,
            shards: c.shards.max(1),
            maxlen: config.stream_cap(),
            batch_max: (c.batch_max as usize).max(1),
            flush_interval: c.flush_interval,
            buffer_max: (c.buffer_max as usize).max(1),
            channel_capacity: (c.channel_capacity as usize).max(1),
        }
    }
}

/// The sending side, cloned into every connection.
#[derive(Debug, Clone)]
pub struct WriterHandle {
    tx: mpsc::Sender<Item>,
}

impl WriterHandle {
    /// Queues an event; waits while the channel is full. Returns false if
    /// the writer has stopped.
    pub async fn event(&self, event: Event) -> bool {
        self.tx
            .send(Item::Event { event, done: None })
            .await
            .is_ok()
    }

    /// Queues an event and returns a signal completed once it is written
    /// (or `None` if the writer has stopped).
    pub async fn event_acked(&self, event: Event) -> Option<oneshot::Receiver<()>> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Item::Event {
                event,
                done: Some(done),
            })
            .await
            .ok()?;
        Some(rx)
    }

    /// Queues a heartbeat.
    pub async fn heartbeat(&self, hb: Heartbeat) -> bool {
        self.tx.send(Item::Heartbeat(hb)).await.is_ok()
    }
}

/// Tells a running writer to finish.
#[derive(Debug)]
pub struct WriterControl {
    finish: watch::Sender<Option<Instant>>,
    join: tokio::task::JoinHandle<()>,
}

impl WriterControl {
    /// Stops taking new items, writes everything pending and returns; what
    /// cannot be written by `deadline` is dropped and counted.
    pub async fn finish(self, deadline: Instant) {
        let _ = self.finish.send(Some(deadline));
        // The writer gives up by the deadline itself; the margin only guards
        // against a Redis call that hangs past it.
        let margin = Duration::from_millis(250);
        if tokio::time::timeout_at(deadline + margin, self.join)
            .await
            .is_err()
        {
            tracing::error!("event writer did not finish by the shutdown deadline");
        }
    }
}

/// Starts the writer task.
pub fn spawn(
    cfg: WriterConfig,
    redis: RedisPool,
    keys: &Keys,
    server_id: ServerId,
    health: Health,
) -> (WriterHandle, WriterControl) {
    let (tx, rx) = mpsc::channel(cfg.channel_capacity);
    let (finish, finish_rx) = watch::channel(None);
    health.set(HEALTH_CHECK, Status::Ok, None, None);
    let stream_keys = (0..cfg.shards).map(|s| keys.events(s)).collect();
    let writer = Writer {
        pending: Pending::new(cfg.buffer_max),
        cfg,
        redis,
        stream_keys,
        server_id,
        health,
        rx,
        closed: false,
        finish: finish_rx,
        deadline: None,
        degraded_since: None,
        turn: 0,
    };
    let join = tokio::spawn(writer.run());
    (WriterHandle { tx }, WriterControl { finish, join })
}

struct Writer {
    cfg: WriterConfig,
    redis: RedisPool,
    stream_keys: Vec<String>,
    server_id: ServerId,
    health: Health,
    rx: mpsc::Receiver<Item>,
    pending: Pending,
    /// The channel is closed and drained.
    closed: bool,
    finish: watch::Receiver<Option<Instant>>,
    /// Set when finishing: give up on Redis after this.
    deadline: Option<Instant>,
    /// When the current outage began (degraded), for the log.
    degraded_since: Option<Instant>,
    /// Which stream the next heartbeat entry goes to (taken in turn).
    turn: u64,
}

impl Writer {
    async fn run(mut self) {
        let mut buf = Vec::with_capacity(self.cfg.batch_max);
        loop {
            if self.pending.is_empty() {
                if self.closed {
                    break;
                }
                self.receive(&mut buf, None).await;
                continue;
            }
            // Something waits: gather more until a batch is full or the
            // flush interval has passed.
            let flush_at = Instant::now() + self.cfg.flush_interval;
            while !self.closed && self.pending.entries() < self.cfg.batch_max {
                if !self.receive(&mut buf, Some(flush_at)).await {
                    break;
                }
            }
            if !self.flush().await {
                break;
            }
        }
        gauge!(m::BUFFERED).set(self.pending.len() as f64);
    }

    /// Waits for items (until `until`, if given) and adds them to pending.
    /// Returns false when the wait ended without items.
    async fn receive(&mut self, buf: &mut Vec<Item>, until: Option<Instant>) -> bool {
        let room = self.room();
        let sleep = async {
            match until {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            n = self.rx.recv_many(buf, room), if !self.closed => {
                if n == 0 {
                    self.closed = true;
                    return false;
                }
                let mut dropped = 0;
                for item in buf.drain(..) {
                    dropped += self.pending.push(item);
                }
                self.count_dropped(dropped, "buffer_full");
                true
            }
            changed = self.finish.changed(), if self.deadline.is_none() => {
                if changed.is_err() {
                    // The control was dropped without `finish` (the service
                    // is failing): write what can be written within a second.
                    self.deadline = Some(Instant::now() + Duration::from_secs(1));
                    self.rx.close();
                } else {
                    self.begin_finish();
                }
                true
            }
            () = sleep => false,
        }
    }

    /// How many items to take from the channel at once: up to a full batch
    /// when healthy, more while degraded (everything goes to the buffer).
    fn room(&self) -> usize {
        if self.degraded_since.is_some() {
            self.cfg.channel_capacity.min(4096)
        } else {
            self.cfg
                .batch_max
                .saturating_sub(self.pending.entries())
                .max(1)
        }
    }

    fn begin_finish(&mut self) {
        let deadline = *self.finish.borrow();
        if let Some(d) = deadline {
            self.deadline = Some(d);
            // Senders now fail; what is in the channel is still received.
            self.rx.close();
        }
    }

    fn count_dropped(&self, n: usize, reason: &'static str) {
        if n > 0 {
            counter!(m::EVENTS_DROPPED, "reason" => reason).increment(n as u64);
            tracing::warn!(
                dropped = n,
                reason,
                buffered = self.pending.len(),
                "events dropped from the writer buffer"
            );
        }
    }

    /// Writes one batch, retrying while Redis fails. Returns false if the
    /// writer must stop (the shutdown deadline passed).
    async fn flush(&mut self) -> bool {
        let mut backoff = BACKOFF_MIN;
        let mut buf = Vec::new();
        loop {
            let batch = self.pending.take(self.cfg.batch_max);
            if batch.is_empty() {
                return true;
            }
            gauge!(m::BUFFERED).set((self.pending.len() + batch.len()) as f64);
            let entries = batch.entries(&self.server_id, self.cfg.shards, self.turn);
            self.turn = self.turn.wrapping_add(1);
            let started = Instant::now();
            match self.write(&entries, &mut buf).await {
                Ok(()) => {
                    histogram!(m::FLUSH_DURATION).record(started.elapsed().as_secs_f64());
                    histogram!(m::FLUSH_BATCH).record(entries.len() as f64);
                    for (kind, n) in batch.kind_counts() {
                        counter!(m::EVENTS_WRITTEN, "kind" => kind).increment(n);
                    }
                    for q in batch.events {
                        if let Some(done) = q.done {
                            let _ = done.send(());
                        }
                    }
                    gauge!(m::BUFFERED).set(self.pending.len() as f64);
                    if let Some(since) = self.degraded_since.take() {
                        self.health.set(HEALTH_CHECK, Status::Ok, None, None);
                        tracing::info!(
                            outage_secs = since.elapsed().as_secs_f64(),
                            still_buffered = self.pending.len(),
                            "Redis answers again; writing buffered events"
                        );
                    }
                    return true;
                }
                Err(e) => {
                    m::redis_error("xadd");
                    let dropped = self.pending.restore(batch);
                    self.count_dropped(dropped, "buffer_full");
                    if self.degraded_since.is_none() {
                        self.degraded_since = Some(Instant::now());
                        tracing::warn!(
                            error = %e,
                            buffered = self.pending.len(),
                            "cannot write events to Redis; buffering (heartbeats coalesce per device)"
                        );
                    }
                    self.health.set(
                        HEALTH_CHECK,
                        Status::Degraded,
                        Some(format!(
                            "cannot write to Redis ({e}); {} events buffered",
                            self.pending.len()
                        )),
                        None,
                    );
                    gauge!(m::BUFFERED).set(self.pending.len() as f64);
                    if let Some(deadline) = self.deadline
                        && Instant::now() + backoff >= deadline
                    {
                        let lost = self.pending.len();
                        self.pending = Pending::new(self.cfg.buffer_max);
                        self.count_dropped(lost, "shutdown");
                        return false;
                    }
                    // Keep taking items while waiting, so connections do not
                    // stall behind the outage.
                    let retry_at = Instant::now() + backoff;
                    while self.receive(&mut buf, Some(retry_at)).await {}
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// Writes `entries` in one pipeline, at most `write_timeout` long.
    ///
    /// Meanwhile items keep arriving into pending: up to one more batch when
    /// Redis is healthy (beyond that the channel fills and connections wait:
    /// backpressure), without limit but the buffer bound while degraded, so
    /// that connections do not stall behind an outage and heartbeats
    /// coalesce.
    async fn write(&mut self, entries: &[(u16, Entry)], buf: &mut Vec<Item>) -> Result<(), String> {
        let mut pipe = redis::pipe();
        let mut bytes = Vec::with_capacity(128);
        let maxlen = self.cfg.maxlen.get();
        for (shard, entry) in entries {
            bytes.clear();
            entry.encode_into(&mut bytes);
            let xadd = pipe.cmd("XADD").arg(&self.stream_keys[usize::from(*shard)]);
            if let Some(maxlen) = maxlen {
                xadd.arg("MAXLEN").arg("~").arg(maxlen);
            }
            xadd.arg("*").arg(ENTRY_FIELD).arg(&bytes[..]).ignore();
        }
        let mut conn = self.redis.get();
        let timeout = self.cfg.write_timeout;
        let write =
            tokio::time::timeout(
                timeout,
                async move { pipe.query_async::<()>(&mut conn).await },
            );
        tokio::pin!(write);
        loop {
            let room = self.room();
            tokio::select! {
                biased;
                r = &mut write => {
                    return match r {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err(format!("no answer within {timeout:?}")),
                    };
                }
                n = self.rx.recv_many(buf, room), if !self.closed
                    && (self.degraded_since.is_some() || self.pending.entries() < self.cfg.batch_max) => {
                    if n == 0 {
                        self.closed = true;
                    }
                    let mut dropped = 0;
                    for item in buf.drain(..) {
                        dropped += self.pending.push(item);
                    }
                    self.count_dropped(dropped, "buffer_full");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn phy(i: usize) -> PhyId {
        PhyId::new(format!("d{i}")).expect("valid")
    }

    fn server() -> ServerId {
        ServerId::new("srv").expect("valid")
    }

    fn beat(i: usize, epoch: u64, ts: i64) -> Item {
        Item::Heartbeat(Heartbeat {
            phy_id: phy(i),
            conn_id: Uuid::from_u128(i as u128),
            epoch,
            ts_ms: ts,
        })
    }

    fn event(i: usize, ts: i64) -> Item {
        Item::Event {
            event: Event {
                phy_id: phy(i),
                conn_id: Uuid::from_u128(i as u128),
                server_id: server(),
                epoch: 1,
                ts_ms: ts,
                kind: EventKind::TcpDown {
                    reason: iot_core::TcpDownReason::Closed,
                },
            },
            done: None,
        }
    }

    #[test]
    fn heartbeats_coalesce_to_the_newest_per_device() {
        let mut p = Pending::new(10);
        p.push(beat(1, 1, 100));
        p.push(beat(1, 1, 300));
        p.push(beat(1, 1, 200));
        p.push(beat(2, 1, 50));
        // A newer connection wins even with an older clock.
        p.push(beat(2, 2, 40));
        p.push(beat(2, 1, 60));
        assert_eq!(p.len(), 2);
        let mut beats = p.take(10).beats;
        beats.sort_by(|a, b| a.phy_id.cmp(&b.phy_id));
        assert_eq!((beats[0].epoch, beats[0].ts_ms), (1, 300));
        assert_eq!((beats[1].epoch, beats[1].ts_ms), (2, 40));
        assert!(p.is_empty());
    }

    #[test]
    fn events_keep_order_and_the_bound_drops_the_oldest() {
        let mut p = Pending::new(3);
        let mut dropped = 0;
        for ts in 0..5 {
            dropped += p.push(event(1, ts));
            dropped += p.push(beat(ts as usize, 1, ts));
        }
        assert_eq!(dropped, 2);
        let b = p.take(100);
        let ts: Vec<i64> = b.events.iter().map(|q| q.event.ts_ms).collect();
        assert_eq!(ts, vec![2, 3, 4]);
        assert_eq!(b.beats.len(), 5, "heartbeats are not bounded by buffer_max");
    }

    #[test]
    fn dropped_events_release_their_waiters() {
        let mut p = Pending::new(1);
        let (tx, mut rx) = oneshot::channel();
        let Item::Event { event: ev, .. } = event(1, 1) else {
            unreachable!()
        };
        p.push(Item::Event {
            event: ev,
            done: Some(tx),
        });
        p.push(event(2, 2));
        assert!(matches!(
            rx.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
    }

    #[test]
    fn a_failed_batch_goes_back_in_front_and_newer_beats_win() {
        let mut p = Pending::new(100);
        p.push(event(1, 1));
        p.push(event(1, 2));
        p.push(beat(7, 1, 10));
        let batch = p.take(1);
        assert_eq!(batch.events.len(), 1);
        // Arrivals during the failed write.
        p.push(event(1, 3));
        p.push(beat(7, 1, 20));
        p.restore(batch);
        let b = p.take(100);
        let ts: Vec<i64> = b.events.iter().map(|q| q.event.ts_ms).collect();
        assert_eq!(ts, vec![1, 2, 3], "oldest first after a failure");
        assert_eq!(b.beats.len(), 1);
        assert_eq!(b.beats[0].ts_ms, 20);
    }

    #[test]
    fn restore_respects_the_bound() {
        let mut p = Pending::new(2);
        p.push(event(1, 1));
        p.push(event(1, 2));
        let batch = p.take(10);
        p.push(event(1, 3));
        p.push(event(1, 4));
        assert_eq!(p.restore(batch), 2);
        let ts: Vec<i64> = p.take(10).events.iter().map(|q| q.event.ts_ms).collect();
        assert_eq!(ts, vec![3, 4]);
    }

    #[test]
    fn entries_put_a_flushs_heartbeats_in_as_few_entries_as_fit_on_streams_in_turn() {
        let shards = 4;
        let mut p = Pending::new(10);
        p.push(event(1, 1));
        for i in 0..1200 {
            p.push(beat(i, 1, 5));
        }
        assert_eq!(p.entries(), 1 + 3);
        let batch = p.take(10);
        let entries = batch.entries(&server(), shards, 6);
        assert_eq!(entries.len(), 1 + 3, "1200 heartbeats in 3 entries");
        assert!(matches!(entries[0].1, Entry::Event(_)));
        assert_eq!(
            entries[0].0,
            iot_core::keys::shard_of("d1", shards),
            "an event goes to its device's shard"
        );
        let mut seen = std::collections::BTreeSet::new();
        for (i, (shard, entry)) in entries[1..].iter().enumerate() {
            let Entry::Heartbeats(b) = entry else {
                panic!("expected heartbeats")
            };
            assert!(b.beats.len() <= BEATS_PER_ENTRY);
            assert_eq!(b.server_id, server());
            assert_eq!(u64::from(*shard), (6 + i as u64) % 4, "streams in turn");
            seen.extend(b.beats.iter().map(|hb| hb.phy_id.clone()));
        }
        assert_eq!(seen.len(), 1200, "every device once");
        // The next flush starts on the next stream.
        let mut q = Pending::new(10);
        q.push(beat(1, 1, 9));
        let next = q.take(10).entries(&server(), shards, 7);
        assert_eq!(next[0].0, 3);
        assert_eq!(
            batch.kind_counts(),
            vec![("heartbeat", 1200), ("tcp_down", 1)]
        );
    }
}
