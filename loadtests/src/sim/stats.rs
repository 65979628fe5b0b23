//! Live counters and latency histograms of one simulator process, and the
//! [`Progress`] snapshot taken from them every tick.
//!
//! Counters are relaxed atomics (device tasks bump them without waiting on
//! each other); histograms sit behind one short mutex each.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::histogram::LatencyHistogram;

/// Why a connection attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnectFailure {
    /// Binding the source address failed (address or ports exhausted).
    Bind,
    /// TCP connect refused.
    Refused,
    /// TCP connect did not finish within --connect-timeout.
    Timeout,
    /// Reset or closed before CONNACK.
    Reset,
    /// Another I/O error.
    Io,
    /// No CONNACK within --connect-timeout.
    ConnAckTimeout,
    /// CONNACK with a refusal code.
    ConnAckRefused,
    /// The server's bytes were not MQTT or not a CONNACK.
    Protocol,
    /// Out of file descriptors (raise `ulimit -n` or add --workers).
    FileLimit,
}

impl ConnectFailure {
    /// Every reason, in report order.
    pub const ALL: [ConnectFailure; 9] = [
        ConnectFailure::Bind,
        ConnectFailure::Refused,
        ConnectFailure::Timeout,
        ConnectFailure::Reset,
        ConnectFailure::Io,
        ConnectFailure::ConnAckTimeout,
        ConnectFailure::ConnAckRefused,
        ConnectFailure::Protocol,
        ConnectFailure::FileLimit,
    ];

    /// Report name.
    pub fn name(self) -> &'static str {
        match self {
            ConnectFailure::Bind => "bind",
            ConnectFailure::Refused => "refused",
            ConnectFailure::Timeout => "tcp_timeout",
            ConnectFailure::Reset => "reset",
            ConnectFailure::Io => "io",
            ConnectFailure::ConnAckTimeout => "connack_timeout",
            ConnectFailure::ConnAckRefused => "connack_refused",
            ConnectFailure::Protocol => "protocol",
            ConnectFailure::FileLimit => "file_limit",
        }
    }

    /// Classifies a socket error.
    pub fn of_io(e: &std::io::Error) -> ConnectFailure {
        use std::io::ErrorKind as K;
        match e.kind() {
            K::ConnectionRefused => ConnectFailure::Refused,
            K::TimedOut => ConnectFailure::Timeout,
            K::ConnectionReset | K::ConnectionAborted | K::UnexpectedEof | K::BrokenPipe => {
                ConnectFailure::Reset
            }
            K::AddrInUse | K::AddrNotAvailable => ConnectFailure::Bind,
            _ if e.raw_os_error() == Some(nix::libc::EMFILE)
                || e.raw_os_error() == Some(nix::libc::ENFILE) =>
            {
                ConnectFailure::FileLimit
            }
            _ => ConnectFailure::Io,
        }
    }
}

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DisconnectReason {
    /// The device dropped it (flapping).
    Flap,
    /// The server closed it after a takeover by the device's second
    /// connection.
    TakenOver,
    /// After a takeover the server did not close the old connection within
    /// --connect-timeout; the device closed it.
    TakeoverNotClosed,
    /// The server closed it (FIN) unexpectedly.
    ServerClosed,
    /// Reset or another I/O error.
    Reset,
    /// The server sent bytes that are not valid MQTT.
    Protocol,
    /// End of the run.
    End,
}

impl DisconnectReason {
    /// Every reason, in report order.
    pub const ALL: [DisconnectReason; 7] = [
        DisconnectReason::Flap,
        DisconnectReason::TakenOver,
        DisconnectReason::TakeoverNotClosed,
        DisconnectReason::ServerClosed,
        DisconnectReason::Reset,
        DisconnectReason::Protocol,
        DisconnectReason::End,
    ];

    /// Report name.
    pub fn name(self) -> &'static str {
        match self {
            DisconnectReason::Flap => "flap",
            DisconnectReason::TakenOver => "taken_over",
            DisconnectReason::TakeoverNotClosed => "takeover_not_closed",
            DisconnectReason::ServerClosed => "server_closed",
            DisconnectReason::Reset => "reset",
            DisconnectReason::Protocol => "protocol",
            DisconnectReason::End => "end",
        }
    }
}

/// Which latency a sample belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Latency {
    /// TCP connect start -> CONNACK.
    Connect,
    /// PINGREQ -> PINGRESP.
    Ping,
    /// QoS 1 PUBLISH -> PUBACK.
    PubAck,
    /// Downlink PUBLISH received -> PUBACK sent.
    DownlinkAck,
    /// Takeover: second CONNACK -> server closed the old connection.
    Takeover,
}

/// The histograms of one process.
#[derive(Debug, Clone, Default)]
pub struct Histograms {
    /// TCP connect start -> CONNACK.
    pub connect: LatencyHistogram,
    /// PINGREQ -> PINGRESP.
    pub ping: LatencyHistogram,
    /// QoS 1 PUBLISH -> PUBACK.
    pub puback: LatencyHistogram,
    /// Downlink received -> PUBACK sent.
    pub downlink_ack: LatencyHistogram,
    /// Second CONNACK -> old connection closed by the server.
    pub takeover: LatencyHistogram,
}

/// A plain counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// Current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Counters of one simulator process.
#[derive(Debug, Default)]
pub struct Stats {
    /// Devices this process simulates.
    pub devices: u32,
    /// TCP connects started.
    pub connect_attempts: Counter,
    /// CONNACK "accepted" received (takeover connections included).
    pub connects_ok: Counter,
    /// Devices that connected at least once.
    pub initial_connected: Counter,
    connected_now: AtomicI64,
    failures: [Counter; ConnectFailure::ALL.len()],
    disconnects: [Counter; DisconnectReason::ALL.len()],
    /// PINGREQs sent.
    pub pings_sent: Counter,
    /// PINGRESPs received.
    pub pongs: Counter,
    /// Uplink PUBLISHes sent.
    pub publishes_sent: Counter,
    /// PUBACKs received for uplinks.
    pub pubacks: Counter,
    /// Uplinks skipped because --max-inflight were unacknowledged.
    pub uplinks_skipped: Counter,
    /// SUBSCRIBEs sent.
    pub subscribes: Counter,
    /// SUBACKs received.
    pub subacks: Counter,
    /// SUBACK return codes that refused the subscription.
    pub suback_refused: Counter,
    /// Downlink PUBLISHes received.
    pub downlinks_received: Counter,
    /// Downlink PUBACKs sent.
    pub downlinks_acked: Counter,
    /// QoS 1 downlinks deliberately left unacknowledged.
    pub downlinks_withheld: Counter,
    /// Takeovers started (second connection accepted).
    pub takeovers: Counter,
    /// MQTT packets written.
    pub packets_sent: Counter,
    /// MQTT packets read.
    pub packets_received: Counter,
    /// Bytes written.
    pub bytes_sent: Counter,
    /// Bytes read.
    pub bytes_received: Counter,
    first_connect_at_ms: AtomicI64,
    last_initial_connect_at_ms: AtomicI64,
    all_connected_at_ms: AtomicI64,
    histograms: Mutex<Histograms>,
}

impl Stats {
    /// Counters for `devices` devices.
    pub fn new(devices: u32) -> Self {
        Self {
            devices,
            ..Self::default()
        }
    }

    /// A connection attempt starts (first start time is remembered).
    pub fn connect_started(&self, now_ms: i64) {
        self.connect_attempts.inc();
        let _ = self.first_connect_at_ms.compare_exchange(
            0,
            now_ms,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// A connection was accepted; `first` if it is the device's first.
    pub fn connected(&self, first: bool, now_ms: i64, latency: Duration) {
        self.connects_ok.inc();
        self.connected_now.fetch_add(1, Ordering::Relaxed);
        self.record(Latency::Connect, latency);
        if first {
            self.last_initial_connect_at_ms
                .fetch_max(now_ms, Ordering::Relaxed);
            let n = self.initial_connected.0.fetch_add(1, Ordering::Relaxed) + 1;
            if n == u64::from(self.devices) {
                self.all_connected_at_ms.store(now_ms, Ordering::Relaxed);
            }
        }
    }

    /// A connection attempt failed.
    pub fn failed(&self, why: ConnectFailure) {
        if let Some(i) = ConnectFailure::ALL.iter().position(|f| *f == why) {
            self.failures[i].inc();
        }
    }

    /// An accepted connection ended.
    pub fn disconnected(&self, why: DisconnectReason) {
        self.connected_now.fetch_sub(1, Ordering::Relaxed);
        if let Some(i) = DisconnectReason::ALL.iter().position(|r| *r == why) {
            self.disconnects[i].inc();
        }
    }

    /// A packet of `bytes` was written.
    pub fn sent(&self, bytes: usize) {
        self.packets_sent.inc();
        self.bytes_sent.add(bytes as u64);
    }

    /// Records a latency sample.
    pub fn record(&self, which: Latency, d: Duration) {
        let mut h = self.histograms.lock();
        match which {
            Latency::Connect => h.connect.record(d),
            Latency::Ping => h.ping.record(d),
            Latency::PubAck => h.puback.record(d),
            Latency::DownlinkAck => h.downlink_ack.record(d),
            Latency::Takeover => h.takeover.record(d),
        }
    }

    /// A copy of the histograms.
    pub fn histograms(&self) -> Histograms {
        self.histograms.lock().clone()
    }

    /// Connections open right now.
    pub fn connected_now(&self) -> u64 {
        u64::try_from(self.connected_now.load(Ordering::Relaxed)).unwrap_or(0)
    }

    /// Failures by reason name (zeros left out).
    pub fn failures(&self) -> Vec<(&'static str, u64)> {
        ConnectFailure::ALL
            .iter()
            .zip(&self.failures)
            .map(|(f, c)| (f.name(), c.get()))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// Disconnects by reason name (zeros left out).
    pub fn disconnects(&self) -> Vec<(&'static str, u64)> {
        DisconnectReason::ALL
            .iter()
            .zip(&self.disconnects)
            .map(|(r, c)| (r.name(), c.get()))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    fn opt_ms(v: &AtomicI64) -> Option<i64> {
        Some(v.load(Ordering::Relaxed)).filter(|v| *v > 0)
    }

    /// When the first connection attempt started (ms since the epoch).
    pub fn first_connect_at_ms(&self) -> Option<i64> {
        Self::opt_ms(&self.first_connect_at_ms)
    }

    /// When the last device connected for the first time.
    pub fn last_initial_connect_at_ms(&self) -> Option<i64> {
        Self::opt_ms(&self.last_initial_connect_at_ms)
    }

    /// When every device had connected once.
    pub fn all_connected_at_ms(&self) -> Option<i64> {
        Self::opt_ms(&self.all_connected_at_ms)
    }

    /// A progress snapshot.
    pub fn progress(&self, elapsed: Duration) -> Progress {
        Progress {
            elapsed_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
            devices: u64::from(self.devices),
            connected_now: self.connected_now(),
            initial_connected: self.initial_connected.get(),
            connect_attempts: self.connect_attempts.get(),
            connects_ok: self.connects_ok.get(),
            connect_failures: self.failures.iter().map(Counter::get).sum(),
            subacks: self.subacks.get(),
            disconnects: self.disconnects.iter().map(Counter::get).sum(),
            packets_sent: self.packets_sent.get(),
            packets_received: self.packets_received.get(),
            pings_sent: self.pings_sent.get(),
            pongs: self.pongs.get(),
            publishes_sent: self.publishes_sent.get(),
            downlinks_received: self.downlinks_received.get(),
            downlinks_acked: self.downlinks_acked.get(),
            takeovers: self.takeovers.get(),
            all_connected_at_ms: self.all_connected_at_ms(),
            workers_done: 0,
        }
    }
}

/// Cumulative counters at one moment: what the progress line shows and what
/// scenario code waits on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Time since the run started.
    pub elapsed_ms: u64,
    /// Devices simulated.
    pub devices: u64,
    /// Connections open now.
    pub connected_now: u64,
    /// Devices that connected at least once.
    pub initial_connected: u64,
    /// Connection attempts.
    pub connect_attempts: u64,
    /// Accepted connections.
    pub connects_ok: u64,
    /// Failed attempts.
    pub connect_failures: u64,
    /// SUBACKs received (subscriptions in place, with --subscribe).
    pub subacks: u64,
    /// Ended connections.
    pub disconnects: u64,
    /// Packets written.
    pub packets_sent: u64,
    /// Packets read.
    pub packets_received: u64,
    /// PINGREQs sent.
    #[serde(default)]
    pub pings_sent: u64,
    /// PINGRESPs received.
    #[serde(default)]
    pub pongs: u64,
    /// Uplink PUBLISHes sent.
    #[serde(default)]
    pub publishes_sent: u64,
    /// Downlink PUBLISHes received.
    #[serde(default)]
    pub downlinks_received: u64,
    /// Downlink PUBACKs sent.
    #[serde(default)]
    pub downlinks_acked: u64,
    /// Takeovers (second connection accepted).
    #[serde(default)]
    pub takeovers: u64,
    /// When every device had connected once (ms since the epoch).
    pub all_connected_at_ms: Option<i64>,
    /// Worker processes that have finished (multi-process runs).
    pub workers_done: u32,
}

impl Progress {
    /// Sums the snapshots of several workers (the latest elapsed time; all
    /// connected when every worker is, at the latest of their times).
    pub fn merge(parts: &[Progress]) -> Progress {
        let mut out = Progress::default();
        let mut all = Some(0i64);
        for p in parts {
            out.elapsed_ms = out.elapsed_ms.max(p.elapsed_ms);
            out.devices += p.devices;
            out.connected_now += p.connected_now;
            out.initial_connected += p.initial_connected;
            out.connect_attempts += p.connect_attempts;
            out.connects_ok += p.connects_ok;
            out.connect_failures += p.connect_failures;
            out.subacks += p.subacks;
            out.disconnects += p.disconnects;
            out.packets_sent += p.packets_sent;
            out.packets_received += p.packets_received;
            out.pings_sent += p.pings_sent;
            out.pongs += p.pongs;
            out.publishes_sent += p.publishes_sent;
            out.downlinks_received += p.downlinks_received;
            out.downlinks_acked += p.downlinks_acked;
            out.takeovers += p.takeovers;
            out.workers_done += p.workers_done;
            all = match (all, p.all_connected_at_ms) {
                (Some(a), Some(b)) => Some(a.max(b)),
                _ => None,
            };
        }
        out.all_connected_at_ms = all.filter(|_| !parts.is_empty());
        out
    }

    /// Whether every device has connected at least once.
    pub fn all_connected(&self) -> bool {
        self.devices > 0 && self.initial_connected >= self.devices
    }

    /// The one-line progress report, with rates against `previous`.
    pub fn line(&self, previous: &Progress) -> String {
        let dt = (self.elapsed_ms.saturating_sub(previous.elapsed_ms)).max(1) as f64 / 1000.0;
        let rate = |now: u64, before: u64| now.saturating_sub(before) as f64 / dt;
        format!(
            "[{:>7.1}s] connected {}/{} (+{:.0}/s) attempts {} failed {} disconnects {} sent {:.0}/s recv {:.0}/s",
            self.elapsed_ms as f64 / 1000.0,
            self.connected_now,
            self.devices,
            rate(self.connects_ok, previous.connects_ok),
            self.connect_attempts,
            self.connect_failures,
            self.disconnects,
            rate(self.packets_sent, previous.packets_sent),
            rate(self.packets_received, previous.packets_received),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_connected_time_is_set_by_the_last_first_connect() {
        let s = Stats::new(2);
        s.connected(true, 100, Duration::from_millis(1));
        assert_eq!(s.all_connected_at_ms(), None);
        s.connected(false, 150, Duration::from_millis(1));
        assert_eq!(s.all_connected_at_ms(), None);
        s.connected(true, 200, Duration::from_millis(1));
        assert_eq!(s.all_connected_at_ms(), Some(200));
        assert_eq!(s.connected_now(), 3);
        s.disconnected(DisconnectReason::Flap);
        assert_eq!(s.connected_now(), 2);
        assert_eq!(s.disconnects(), vec![("flap", 1)]);
        assert_eq!(s.histograms().connect.count(), 3);
    }

    #[test]
    fn failures_are_counted_by_reason() {
        let s = Stats::new(1);
        s.failed(ConnectFailure::Refused);
        s.failed(ConnectFailure::Refused);
        s.failed(ConnectFailure::ConnAckRefused);
        assert_eq!(s.failures(), vec![("refused", 2), ("connack_refused", 1)]);
        assert_eq!(s.progress(Duration::ZERO).connect_failures, 3);
        let emfile = std::io::Error::from_raw_os_error(nix::libc::EMFILE);
        assert_eq!(ConnectFailure::of_io(&emfile), ConnectFailure::FileLimit);
    }

    #[test]
    fn progress_merges_and_formats() {
        let a = Progress {
            elapsed_ms: 1000,
            devices: 10,
            connected_now: 10,
            initial_connected: 10,
            connects_ok: 10,
            all_connected_at_ms: Some(5),
            ..Progress::default()
        };
        let b = Progress {
            elapsed_ms: 1100,
            devices: 10,
            connected_now: 4,
            initial_connected: 4,
            connects_ok: 4,
            ..Progress::default()
        };
        let m = Progress::merge(&[a.clone(), b]);
        assert_eq!(m.devices, 20);
        assert_eq!(m.connected_now, 14);
        assert_eq!(m.all_connected_at_ms, None);
        assert!(!m.all_connected());
        let c = Progress::merge(&[a.clone(), a.clone()]);
        assert_eq!(c.all_connected_at_ms, Some(5));
        assert!(c.all_connected());
        let line = m.line(&Progress::default());
        assert!(line.contains("connected 14/20"), "{line}");
    }
}
