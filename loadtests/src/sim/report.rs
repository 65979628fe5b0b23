//! The simulator's final report: counts, connect figures and latency
//! percentiles, as JSON (`--report FILE`) and as a human summary.
//!
//! Worker processes each send their report to the parent, which merges them
//! ([`SimReport::merge`]): counts add up, histograms merge exactly, times
//! take the earliest start and the latest finish.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::histogram::{LatencyHistogram, LatencySummary};
use crate::sim::config::SimConfig;
use crate::sim::stats::{Histograms, Stats};

/// Counters at the end of a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    /// Devices simulated.
    pub devices: u64,
    /// Devices that connected at least once.
    pub initial_connected: u64,
    /// Most connections open at once (sampled every 250 ms).
    pub max_connected: u64,
    /// Connection attempts (TCP connect started).
    pub connect_attempts: u64,
    /// Accepted connections (CONNACK 0), takeover connections included.
    pub connects_ok: u64,
    /// Failed attempts (by reason in `connect_failures`).
    pub connect_failures: u64,
    /// Ended connections (by reason in `disconnects`).
    pub disconnects: u64,
    /// PINGREQs sent.
    pub pings_sent: u64,
    /// PINGRESPs received.
    pub pongs: u64,
    /// Uplink PUBLISHes sent.
    pub publishes_sent: u64,
    /// PUBACKs received for QoS 1 uplinks.
    pub pubacks: u64,
    /// Uplinks skipped: too many unacknowledged.
    pub uplinks_skipped: u64,
    /// SUBSCRIBEs sent.
    pub subscribes: u64,
    /// SUBACKs received.
    pub subacks: u64,
    /// Refused subscriptions (SUBACK 0x80).
    pub suback_refused: u64,
    /// Downlinks received.
    pub downlinks_received: u64,
    /// Downlinks acknowledged.
    pub downlinks_acked: u64,
    /// QoS 1 downlinks deliberately not acknowledged.
    pub downlinks_withheld: u64,
    /// Takeovers (second connection accepted).
    pub takeovers: u64,
    /// MQTT packets written.
    pub packets_sent: u64,
    /// MQTT packets read.
    pub packets_received: u64,
    /// Bytes written.
    pub bytes_sent: u64,
    /// Bytes read.
    pub bytes_received: u64,
}

impl Counts {
    fn from_stats(s: &Stats, max_connected: u64) -> Counts {
        let p = s.progress(std::time::Duration::ZERO);
        Counts {
            devices: u64::from(s.devices),
            initial_connected: s.initial_connected.get(),
            max_connected,
            connect_attempts: s.connect_attempts.get(),
            connects_ok: s.connects_ok.get(),
            connect_failures: p.connect_failures,
            disconnects: p.disconnects,
            pings_sent: s.pings_sent.get(),
            pongs: s.pongs.get(),
            publishes_sent: s.publishes_sent.get(),
            pubacks: s.pubacks.get(),
            uplinks_skipped: s.uplinks_skipped.get(),
            subscribes: s.subscribes.get(),
            subacks: s.subacks.get(),
            suback_refused: s.suback_refused.get(),
            downlinks_received: s.downlinks_received.get(),
            downlinks_acked: s.downlinks_acked.get(),
            downlinks_withheld: s.downlinks_withheld.get(),
            takeovers: s.takeovers.get(),
            packets_sent: s.packets_sent.get(),
            packets_received: s.packets_received.get(),
            bytes_sent: s.bytes_sent.get(),
            bytes_received: s.bytes_received.get(),
        }
    }

    fn add(&mut self, o: &Counts) {
        self.devices += o.devices;
        self.initial_connected += o.initial_connected;
        self.max_connected += o.max_connected;
        self.connect_attempts += o.connect_attempts;
        self.connects_ok += o.connects_ok;
        self.connect_failures += o.connect_failures;
        self.disconnects += o.disconnects;
        self.pings_sent += o.pings_sent;
        self.pongs += o.pongs;
        self.publishes_sent += o.publishes_sent;
        self.pubacks += o.pubacks;
        self.uplinks_skipped += o.uplinks_skipped;
        self.subscribes += o.subscribes;
        self.subacks += o.subacks;
        self.suback_refused += o.suback_refused;
        self.downlinks_received += o.downlinks_received;
        self.downlinks_acked += o.downlinks_acked;
        self.downlinks_withheld += o.downlinks_withheld;
        self.takeovers += o.takeovers;
        self.packets_sent += o.packets_sent;
        self.packets_received += o.packets_received;
        self.bytes_sent += o.bytes_sent;
        self.bytes_received += o.bytes_received;
    }
}

/// Connect-storm figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConnectFigures {
    /// First connection attempt (ms since the epoch).
    pub first_attempt_at_ms: Option<i64>,
    /// The last device's first successful connect.
    pub last_initial_connect_at_ms: Option<i64>,
    /// Every device connected at least once, at this time.
    pub all_connected_at_ms: Option<i64>,
    /// From the first attempt until every device had connected once.
    pub time_to_all_connected_s: Option<f64>,
    /// First-time connects per second, from the first attempt to the last
    /// first-time connect.
    pub connect_rate_per_s: f64,
}

impl ConnectFigures {
    fn compute(&mut self, initial_connected: u64) {
        let span = |end: Option<i64>| {
            Some((end? - self.first_attempt_at_ms?) as f64 / 1000.0).filter(|s| *s >= 0.0)
        };
        self.time_to_all_connected_s = span(self.all_connected_at_ms);
        self.connect_rate_per_s = match span(self.last_initial_connect_at_ms) {
            Some(s) if s > 0.0 => initial_connected as f64 / s,
            _ => 0.0,
        };
    }
}

/// Latency percentiles.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyFigures {
    /// TCP connect start -> CONNACK.
    pub connect: LatencySummary,
    /// PINGREQ -> PINGRESP.
    pub ping: LatencySummary,
    /// QoS 1 uplink PUBLISH -> PUBACK.
    pub puback: LatencySummary,
    /// Downlink received -> PUBACK sent (the late-ack delay included).
    pub downlink_ack: LatencySummary,
    /// Takeover: second CONNACK -> old connection closed by the server.
    pub takeover: LatencySummary,
}

impl From<&Histograms> for LatencyFigures {
    fn from(h: &Histograms) -> Self {
        Self {
            connect: h.connect.summary(),
            ping: h.ping.summary(),
            puback: h.puback.summary(),
            downlink_ack: h.downlink_ack.summary(),
            takeover: h.takeover.summary(),
        }
    }
}

impl LatencyFigures {
    fn histograms(&self) -> Histograms {
        let h = |s: &LatencySummary| s.histogram().unwrap_or_default();
        Histograms {
            connect: h(&self.connect),
            ping: h(&self.ping),
            puback: h(&self.puback),
            downlink_ack: h(&self.downlink_ack),
            takeover: h(&self.takeover),
        }
    }
}

/// Rates over the whole run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Rates {
    /// MQTT packets written per second.
    pub packets_sent_per_s: f64,
    /// MQTT packets read per second.
    pub packets_received_per_s: f64,
    /// Uplink PUBLISHes per second.
    pub publishes_per_s: f64,
    /// PINGREQs per second.
    pub pings_per_s: f64,
}

/// The report of a simulator run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SimReport {
    /// `iot-sim`.
    pub tool: String,
    /// Start, RFC 3339 UTC.
    pub started_at: String,
    /// Start, ms since the epoch.
    pub started_at_ms: i64,
    /// Run time in seconds.
    pub elapsed_s: f64,
    /// Worker processes (1: in process).
    pub workers: u32,
    /// The options of the run.
    pub config: SimConfig,
    /// Counters.
    pub counts: Counts,
    /// Failed connection attempts by reason.
    pub connect_failures: BTreeMap<String, u64>,
    /// Ended connections by reason.
    pub disconnects: BTreeMap<String, u64>,
    /// Connect storm figures.
    pub connect: ConnectFigures,
    /// Rates.
    pub rates: Rates,
    /// Latency percentiles.
    pub latency: LatencyFigures,
    /// Ground-truth records collected.
    pub truth_records: u64,
    /// Peak resident memory of the simulator process(es), KiB (summed).
    pub sim_peak_rss_kib: u64,
    /// CPU time of the simulator process(es), s (summed).
    pub sim_cpu_s: f64,
}

impl SimReport {
    /// The report of one process's run.
    pub fn from_stats(
        config: &SimConfig,
        stats: &Stats,
        started_at_ms: i64,
        elapsed_s: f64,
        max_connected: u64,
        truth_records: u64,
    ) -> SimReport {
        let counts = Counts::from_stats(stats, max_connected);
        let mut connect = ConnectFigures {
            first_attempt_at_ms: stats.first_connect_at_ms(),
            last_initial_connect_at_ms: stats.last_initial_connect_at_ms(),
            all_connected_at_ms: stats.all_connected_at_ms(),
            ..ConnectFigures::default()
        };
        connect.compute(counts.initial_connected);
        let mut r = SimReport {
            tool: "iot-sim".to_owned(),
            started_at: rfc3339(started_at_ms),
            started_at_ms,
            elapsed_s,
            workers: 1,
            config: config.clone(),
            connect_failures: to_map(stats.failures()),
            disconnects: to_map(stats.disconnects()),
            counts,
            connect,
            rates: Rates::default(),
            latency: LatencyFigures::from(&stats.histograms()),
            truth_records,
            sim_peak_rss_kib: crate::proc_stat::peak_rss_kib(std::process::id()).unwrap_or(0),
            sim_cpu_s: crate::proc_stat::own_cpu_time()
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        };
        r.compute_rates();
        r
    }

    fn compute_rates(&mut self) {
        let per_s = |n: u64| {
            if self.elapsed_s > 0.0 {
                n as f64 / self.elapsed_s
            } else {
                0.0
            }
        };
        self.rates = Rates {
            packets_sent_per_s: per_s(self.counts.packets_sent),
            packets_received_per_s: per_s(self.counts.packets_received),
            publishes_per_s: per_s(self.counts.publishes_sent),
            pings_per_s: per_s(self.counts.pings_sent),
        };
    }

    /// Merges the reports of worker processes into the report of the run
    /// described by `config`. `max_connected` is the parent's own sample of
    /// the sum (worker maxima do not add up).
    pub fn merge(
        config: &SimConfig,
        parts: &[SimReport],
        started_at_ms: i64,
        elapsed_s: f64,
        max_connected: u64,
    ) -> SimReport {
        let mut counts = Counts::default();
        let mut failures = BTreeMap::new();
        let mut disconnects = BTreeMap::new();
        let mut hist = Histograms::default();
        let mut connect = ConnectFigures::default();
        let mut all_connected = Some(0i64);
        let mut truth_records = 0;
        let mut sim_peak_rss_kib = 0;
        let mut sim_cpu_s = 0.0;
        for p in parts {
            sim_peak_rss_kib += p.sim_peak_rss_kib;
            sim_cpu_s += p.sim_cpu_s;
            counts.add(&p.counts);
            for (k, v) in &p.connect_failures {
                *failures.entry(k.clone()).or_insert(0) += v;
            }
            for (k, v) in &p.disconnects {
                *disconnects.entry(k.clone()).or_insert(0) += v;
            }
            let h = p.latency.histograms();
            merge_hist(&mut hist.connect, &h.connect);
            merge_hist(&mut hist.ping, &h.ping);
            merge_hist(&mut hist.puback, &h.puback);
            merge_hist(&mut hist.downlink_ack, &h.downlink_ack);
            merge_hist(&mut hist.takeover, &h.takeover);
            connect.first_attempt_at_ms =
                min_opt(connect.first_attempt_at_ms, p.connect.first_attempt_at_ms);
            connect.last_initial_connect_at_ms = connect
                .last_initial_connect_at_ms
                .max(p.connect.last_initial_connect_at_ms);
            all_connected = match (all_connected, p.connect.all_connected_at_ms) {
                (Some(a), Some(b)) => Some(a.max(b)),
                _ => None,
            };
            truth_records += p.truth_records;
        }
        counts.max_connected = max_connected;
        connect.all_connected_at_ms = all_connected.filter(|_| !parts.is_empty());
        connect.compute(counts.initial_connected);
        let mut r = SimReport {
            tool: "iot-sim".to_owned(),
            started_at: rfc3339(started_at_ms),
            started_at_ms,
            elapsed_s,
            workers: u32::try_from(parts.len()).unwrap_or(u32::MAX),
            config: config.clone(),
            counts,
            connect_failures: failures,
            disconnects,
            connect,
            rates: Rates::default(),
            latency: LatencyFigures::from(&hist),
            truth_records,
            sim_peak_rss_kib,
            sim_cpu_s,
        };
        r.compute_rates();
        r
    }

    /// The human summary.
    pub fn summary(&self) -> String {
        let c = &self.counts;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "iot-sim: {} devices, {} worker(s), {:.1}s, targets {}",
            c.devices,
            self.workers,
            self.elapsed_s,
            self.config.targets.join(",")
        );
        let _ = writeln!(
            s,
            "  connected once: {}/{}  max concurrent: {}  attempts: {}  accepted: {}  failed: {}",
            c.initial_connected,
            c.devices,
            c.max_connected,
            c.connect_attempts,
            c.connects_ok,
            c.connect_failures
        );
        match self.connect.time_to_all_connected_s {
            Some(t) => {
                let _ = writeln!(
                    s,
                    "  time to all connected: {t:.2}s  connect rate: {:.0}/s",
                    self.connect.connect_rate_per_s
                );
            }
            None => {
                let _ = writeln!(
                    s,
                    "  not every device connected; connect rate: {:.0}/s",
                    self.connect.connect_rate_per_s
                );
            }
        }
        if !self.connect_failures.is_empty() {
            let _ = writeln!(s, "  failures: {}", kv(&self.connect_failures));
        }
        if !self.disconnects.is_empty() {
            let _ = writeln!(s, "  disconnects: {}", kv(&self.disconnects));
        }
        let _ = writeln!(
            s,
            "  pings {} / pongs {}  uplinks {} / pubacks {} (skipped {})  downlinks {} (acked {}, withheld {})  takeovers {}",
            c.pings_sent,
            c.pongs,
            c.publishes_sent,
            c.pubacks,
            c.uplinks_skipped,
            c.downlinks_received,
            c.downlinks_acked,
            c.downlinks_withheld,
            c.takeovers
        );
        let _ = writeln!(
            s,
            "  packets: sent {:.0}/s  received {:.0}/s  simulator: peak RSS {} KiB, CPU {:.2}s",
            self.rates.packets_sent_per_s,
            self.rates.packets_received_per_s,
            self.sim_peak_rss_kib,
            self.sim_cpu_s
        );
        let l = &self.latency;
        for (name, v) in [
            ("connect -> CONNACK", &l.connect),
            ("PINGREQ -> PINGRESP", &l.ping),
            ("PUBLISH -> PUBACK", &l.puback),
            ("downlink -> ack", &l.downlink_ack),
            ("takeover close", &l.takeover),
        ] {
            let _ = writeln!(s, "  {name:<20} {}", v.line());
        }
        s
    }
}

fn merge_hist(into: &mut LatencyHistogram, from: &LatencyHistogram) {
    into.merge(from);
}

fn min_opt(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

fn to_map(v: Vec<(&'static str, u64)>) -> BTreeMap<String, u64> {
    v.into_iter().map(|(k, n)| (k.to_owned(), n)).collect()
}

fn kv(m: &BTreeMap<String, u64>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// RFC 3339 UTC of ms since the epoch.
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::stats::{ConnectFailure, DisconnectReason, Latency};
    use std::time::Duration;

    fn part(first: i64, all: i64, failures: u64) -> SimReport {
        let stats = Stats::new(2);
        stats.connect_started(first);
        stats.connected(true, first + 100, Duration::from_millis(2));
        stats.connected(true, all, Duration::from_millis(4));
        stats.record(Latency::Ping, Duration::from_micros(300));
        for _ in 0..failures {
            stats.failed(ConnectFailure::Refused);
        }
        stats.disconnected(DisconnectReason::End);
        SimReport::from_stats(&SimConfig::default(), &stats, first, 2.0, 2, 7)
    }

    #[test]
    fn one_process_report_has_connect_figures() {
        let r = part(1_000, 2_000, 1);
        assert_eq!(r.counts.initial_connected, 2);
        assert_eq!(r.connect.time_to_all_connected_s, Some(1.0));
        assert!((r.connect.connect_rate_per_s - 2.0).abs() < 1e-9);
        assert_eq!(r.connect_failures.get("refused"), Some(&1));
        assert_eq!(r.latency.connect.count, 2);
        assert!(r.summary().contains("time to all connected: 1.00s"));
    }

    #[test]
    fn merge_adds_counts_and_histograms() {
        let a = part(1_000, 2_000, 1);
        let b = part(1_500, 3_000, 2);
        let json = serde_json::to_string(&b).expect("encode");
        let b: SimReport = serde_json::from_str(&json).expect("decode");
        let m = SimReport::merge(&SimConfig::default(), &[a, b], 900, 3.0, 4);
        assert_eq!(m.workers, 2);
        assert_eq!(m.counts.devices, 4);
        assert_eq!(m.counts.initial_connected, 4);
        assert_eq!(m.counts.max_connected, 4);
        assert_eq!(m.connect_failures.get("refused"), Some(&3));
        assert_eq!(m.latency.connect.count, 4);
        assert_eq!(m.latency.ping.count, 2);
        assert_eq!(m.connect.first_attempt_at_ms, Some(1_000));
        assert_eq!(m.connect.all_connected_at_ms, Some(3_000));
        assert_eq!(m.connect.time_to_all_connected_s, Some(2.0));
        assert_eq!(m.truth_records, 14);
        assert!(m.sim_peak_rss_kib > 0 && m.sim_cpu_s >= 0.0);
    }
}
