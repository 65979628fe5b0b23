//! Ground truth: what the simulated devices really did, and when.
//!
//! Every device task appends a 16-byte [`TruthRecord`] when it connects,
//! drops, is taken over, withholds an acknowledgement and so on. Scenario
//! code compares these records with what the api answers: detection latency
//! is the api's offline answer minus the [`TruthKind::Dropped`] time, a
//! "false offline" is an offline answer while [`GroundTruth::is_connected_at`]
//! says the device was connected.
//!
//! Times are wall-clock milliseconds since the Unix epoch (the unit of every
//! timestamp in the project), taken on this machine, so they compare directly
//! with the `last_seen` and `last_tcp_down` of the views.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum TruthKind {
    /// CONNACK "accepted" arrived: the device is connected (`conn` = the
    /// device's connection number, from 1).
    Connected = 0,
    /// A connection attempt failed (TCP, CONNACK refused or missing).
    ConnectFailed = 1,
    /// The device dropped its TCP connection on purpose (flapping), without
    /// DISCONNECT.
    Dropped = 2,
    /// A takeover's second connection was accepted (`conn` = the new number);
    /// the device stays connected throughout.
    TakeoverConnected = 3,
    /// After a takeover the server closed the old connection (`conn` = the
    /// old number).
    TakenOver = 4,
    /// The server closed or reset the current connection, or it broke.
    Lost = 5,
    /// The run ended and the device left (DISCONNECT, or abrupt close with
    /// `--end abrupt`).
    Disconnected = 6,
    /// A device that never acks received a QoS 1 downlink and withheld the
    /// PUBACK: from here on it "stopped acking".
    AckWithheld = 7,
    /// A downlink PUBLISH arrived.
    DownlinkReceived = 8,
    /// The device sent the PUBACK of a downlink (at once or late).
    DownlinkAcked = 9,
    /// The device sent a PINGREQ (only with `--record-pings`).
    PingSent = 10,
}

impl TruthKind {
    const ALL: [TruthKind; 11] = [
        TruthKind::Connected,
        TruthKind::ConnectFailed,
        TruthKind::Dropped,
        TruthKind::TakeoverConnected,
        TruthKind::TakenOver,
        TruthKind::Lost,
        TruthKind::Disconnected,
        TruthKind::AckWithheld,
        TruthKind::DownlinkReceived,
        TruthKind::DownlinkAcked,
        TruthKind::PingSent,
    ];

    /// The kind with this wire number.
    pub fn from_u8(v: u8) -> Option<TruthKind> {
        Self::ALL.get(usize::from(v)).copied()
    }

    /// Whether this record makes the device connected (`Some(true)`), not
    /// connected (`Some(false)`), or says nothing about it (`None`).
    pub fn presence(self) -> Option<bool> {
        match self {
            TruthKind::Connected | TruthKind::TakeoverConnected => Some(true),
            TruthKind::Dropped | TruthKind::Lost | TruthKind::Disconnected => Some(false),
            _ => None,
        }
    }
}

/// One fact about one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "(i64, u32, u16, u8)", into = "(i64, u32, u16, u8)")]
pub struct TruthRecord {
    /// When, in ms since the Unix epoch.
    pub at_ms: i64,
    /// Global device index (the phyID is `{prefix}{device}`).
    pub device: u32,
    /// The device's connection number (1 for its first connection).
    pub conn: u16,
    /// What happened.
    pub kind: TruthKind,
}

impl From<TruthRecord> for (i64, u32, u16, u8) {
    fn from(r: TruthRecord) -> Self {
        (r.at_ms, r.device, r.conn, r.kind as u8)
    }
}

impl From<(i64, u32, u16, u8)> for TruthRecord {
    /// An unknown kind number (from a newer worker) reads as
    /// `ConnectFailed`, which says nothing about presence.
    fn from((at_ms, device, conn, kind): (i64, u32, u16, u8)) -> Self {
        TruthRecord {
            at_ms,
            device,
            conn,
            kind: TruthKind::from_u8(kind).unwrap_or(TruthKind::ConnectFailed),
        }
    }
}

/// A device's connected periods: `[start, end)` in ms; `end` is `None` while
/// it is still connected.
pub type Interval = (i64, Option<i64>);

/// Every record of a run, in arrival order.
#[derive(Debug, Clone, Default)]
pub struct GroundTruth {
    records: Vec<TruthRecord>,
}

impl GroundTruth {
    /// Empty.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends records.
    pub fn extend(&mut self, records: impl IntoIterator<Item = TruthRecord>) {
        self.records.extend(records);
    }

    /// Every record.
    pub fn records(&self) -> &[TruthRecord] {
        &self.records
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether there is no record.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Sorts by time (stable: a device's records keep their order within a
    /// millisecond).
    pub fn sort(&mut self) {
        self.records.sort_by_key(|r| r.at_ms);
    }

    /// Records of one kind.
    pub fn of_kind(&self, kind: TruthKind) -> impl Iterator<Item = &TruthRecord> {
        self.records.iter().filter(move |r| r.kind == kind)
    }

    /// Number of records per kind.
    pub fn counts(&self) -> HashMap<TruthKind, usize> {
        let mut out = HashMap::new();
        for r in &self.records {
            *out.entry(r.kind).or_insert(0) += 1;
        }
        out
    }

    /// One device's records, in time order.
    pub fn timeline(&self, device: u32) -> Vec<TruthRecord> {
        let mut v: Vec<TruthRecord> = self
            .records
            .iter()
            .filter(|r| r.device == device)
            .copied()
            .collect();
        v.sort_by_key(|r| r.at_ms);
        v
    }

    /// One device's connected periods.
    pub fn intervals(&self, device: u32) -> Vec<Interval> {
        intervals_of(&self.timeline(device))
    }

    /// Whether `device` was really connected at `at_ms` (a record at exactly
    /// `at_ms` counts as already happened).
    pub fn is_connected_at(&self, device: u32, at_ms: i64) -> bool {
        self.timeline(device)
            .iter()
            .rev()
            .filter(|r| r.at_ms <= at_ms)
            .find_map(|r| r.kind.presence())
            .unwrap_or(false)
    }

    /// How many devices were connected at `at_ms`.
    pub fn connected_count_at(&self, at_ms: i64) -> usize {
        let mut last: HashMap<u32, (i64, bool)> = HashMap::new();
        for r in self.records.iter().filter(|r| r.at_ms <= at_ms) {
            if let Some(p) = r.kind.presence() {
                let e = last.entry(r.device).or_insert((r.at_ms, p));
                if r.at_ms >= e.0 {
                    *e = (r.at_ms, p);
                }
            }
        }
        last.values().filter(|(_, p)| *p).count()
    }
}

/// Connected periods from one device's records in time order.
fn intervals_of(timeline: &[TruthRecord]) -> Vec<Interval> {
    let mut out: Vec<Interval> = Vec::new();
    let mut open: Option<i64> = None;
    for r in timeline {
        match (r.kind.presence(), open) {
            (Some(true), None) => open = Some(r.at_ms),
            (Some(false), Some(start)) => {
                out.push((start, Some(r.at_ms)));
                open = None;
            }
            _ => {}
        }
    }
    if let Some(start) = open {
        out.push((start, None));
    }
    out
}

/// Where device tasks append their records: shared, cheap to clone, drained
/// by the worker loop.
#[derive(Debug, Clone, Default)]
pub struct TruthLog {
    records: Arc<Mutex<Vec<TruthRecord>>>,
    tap: Option<TruthTap>,
}

impl TruthLog {
    /// A log that also hands every record to `tap` the moment it is made.
    pub fn with_tap(tap: Option<TruthTap>) -> Self {
        Self {
            records: Arc::default(),
            tap,
        }
    }

    /// Appends one record stamped now.
    pub fn record(&self, device: u32, conn: u16, kind: TruthKind) {
        self.push(TruthRecord {
            at_ms: iot_core::time::now_ms(),
            device,
            conn,
            kind,
        });
    }

    /// Appends one record.
    pub fn push(&self, record: TruthRecord) {
        if let Some(tap) = &self.tap {
            tap.offer(record);
        }
        self.records.lock().push(record);
    }

    /// Takes every record appended since the last call.
    pub fn drain(&self) -> Vec<TruthRecord> {
        std::mem::take(&mut *self.records.lock())
    }
}

/// A live feed of ground-truth records for scenario code that must react
/// at once (poll the api right after a device dropped): a bounded channel;
/// records that do not fit are counted, never waited for, so the tap cannot
/// slow the devices down.
#[derive(Debug, Clone)]
pub struct TruthTap {
    tx: tokio::sync::mpsc::Sender<TruthRecord>,
    kinds: Arc<[TruthKind]>,
    dropped: Arc<std::sync::atomic::AtomicU64>,
}

impl TruthTap {
    /// A tap for records of `kinds` (all kinds if empty) holding at most
    /// `capacity` unread records, and its receiving end.
    pub fn new(
        kinds: &[TruthKind],
        capacity: usize,
    ) -> (TruthTap, tokio::sync::mpsc::Receiver<TruthRecord>) {
        let (tx, rx) = tokio::sync::mpsc::channel(capacity.max(1));
        (
            TruthTap {
                tx,
                kinds: kinds.into(),
                dropped: Arc::default(),
            },
            rx,
        )
    }

    /// Hands `record` over if its kind is wanted and there is room.
    pub fn offer(&self, record: TruthRecord) {
        if !self.kinds.is_empty() && !self.kinds.contains(&record.kind) {
            return;
        }
        if self.tx.try_send(record).is_err() {
            self.dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Records that did not fit (or found the receiver gone).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(at_ms: i64, device: u32, conn: u16, kind: TruthKind) -> TruthRecord {
        TruthRecord {
            at_ms,
            device,
            conn,
            kind,
        }
    }

    fn sample() -> GroundTruth {
        let mut t = GroundTruth::new();
        t.extend([
            rec(100, 1, 1, TruthKind::Connected),
            rec(110, 2, 1, TruthKind::Connected),
            rec(200, 1, 1, TruthKind::Dropped),
            rec(250, 2, 2, TruthKind::TakeoverConnected),
            rec(252, 2, 1, TruthKind::TakenOver),
            rec(300, 1, 2, TruthKind::Connected),
            rec(310, 2, 2, TruthKind::AckWithheld),
            rec(400, 2, 2, TruthKind::Disconnected),
        ]);
        t
    }

    #[test]
    fn presence_follows_connects_and_drops() {
        let t = sample();
        assert!(!t.is_connected_at(1, 99));
        assert!(t.is_connected_at(1, 100));
        assert!(t.is_connected_at(1, 199));
        assert!(!t.is_connected_at(1, 200));
        assert!(t.is_connected_at(1, 1000));
        // A takeover never makes the device look disconnected.
        assert!(t.is_connected_at(2, 251));
        assert!(t.is_connected_at(2, 253));
        assert!(!t.is_connected_at(2, 400));
        assert!(!t.is_connected_at(7, 150));
    }

    #[test]
    fn counts_and_intervals() {
        let t = sample();
        assert_eq!(t.connected_count_at(150), 2);
        assert_eq!(t.connected_count_at(250), 1);
        assert_eq!(t.connected_count_at(350), 2);
        assert_eq!(t.connected_count_at(500), 1);
        assert_eq!(t.intervals(1), vec![(100, Some(200)), (300, None)]);
        assert_eq!(t.intervals(2), vec![(110, Some(400))]);
        assert_eq!(t.of_kind(TruthKind::AckWithheld).count(), 1);
        assert_eq!(t.counts()[&TruthKind::Connected], 3);
    }

    #[test]
    fn records_travel_as_compact_tuples() {
        let r = rec(1_700_000_000_000, 42, 3, TruthKind::TakenOver);
        let json = serde_json::to_string(&r).expect("encode");
        assert_eq!(json, "[1700000000000,42,3,4]");
        let back: TruthRecord = serde_json::from_str(&json).expect("decode");
        assert_eq!(back, r);
        assert_eq!(TruthKind::from_u8(10), Some(TruthKind::PingSent));
        assert_eq!(TruthKind::from_u8(11), None);
    }

    #[test]
    fn log_drains_what_was_recorded() {
        let log = TruthLog::default();
        log.record(1, 1, TruthKind::Connected);
        log.record(2, 1, TruthKind::Connected);
        assert_eq!(log.drain().len(), 2);
        assert!(log.drain().is_empty());
    }

    #[test]
    fn tap_gets_wanted_kinds_at_once_and_counts_overflow() {
        let (tap, mut rx) = TruthTap::new(&[TruthKind::Dropped], 1);
        let log = TruthLog::with_tap(Some(tap.clone()));
        log.record(1, 1, TruthKind::Connected);
        log.record(1, 1, TruthKind::Dropped);
        log.record(2, 1, TruthKind::Dropped);
        assert_eq!(rx.try_recv().expect("tapped").device, 1);
        assert!(rx.try_recv().is_err());
        assert_eq!(tap.dropped(), 1);
        // The log itself keeps everything.
        assert_eq!(log.drain().len(), 3);
    }
}
