//! What the simulator does: every option of `iot-sim`, usable from code too.
//!
//! One struct serves three readers: clap (the command line), serde (the
//! parent sends each worker process its slice as JSON) and scenario code
//! (phase-2 scenarios build a [`SimConfig`] directly, starting from
//! [`SimConfig::default`]).

use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};

/// Longest run the simulator accepts: it always stops by itself.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// Durations as humantime strings (`1m 30s`) in JSON.
mod human {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }

    pub mod opt {
        use std::time::Duration;

        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => super::serialize(d, s),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            Option::<String>::deserialize(d)?
                .map(|s| humantime::parse_duration(&s).map_err(serde::de::Error::custom))
                .transpose()
        }
    }
}

/// A duration drawn uniformly from `min..max` (`30s` alone means exactly
/// 30 s).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct DurationRange {
    /// Lower bound.
    pub min: Duration,
    /// Upper bound (>= min).
    pub max: Duration,
}

impl DurationRange {
    /// Exactly `d`.
    pub const fn fixed(d: Duration) -> Self {
        Self { min: d, max: d }
    }
}

impl From<DurationRange> for String {
    fn from(r: DurationRange) -> String {
        r.to_string()
    }
}

impl TryFrom<String> for DurationRange {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl FromStr for DurationRange {
    type Err = String;

    /// `10s..60s`, `500ms..2s` or `30s`.
    fn from_str(s: &str) -> Result<Self, String> {
        let parse = |p: &str| {
            humantime::parse_duration(p.trim())
                .map_err(|e| format!("{p:?} is not a duration like 500ms or 30s: {e}"))
        };
        let (min, max) = match s.split_once("..") {
            Some((a, b)) => (parse(a)?, parse(b)?),
            None => {
                let d = parse(s)?;
                (d, d)
            }
        };
        if max < min {
            return Err(format!("range {s:?} ends before it starts"));
        }
        Ok(Self { min, max })
    }
}

impl fmt::Display for DurationRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = |d: Duration| humantime::format_duration(d).to_string();
        if self.min == self.max {
            write!(f, "{}", h(self.min))
        } else {
            write!(f, "{}..{}", h(self.min), h(self.max))
        }
    }
}

/// Local source addresses to spread connections over (each gives its own
/// 28k ephemeral ports per destination).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceAddrs(pub Vec<Ipv4Addr>);

impl FromStr for SourceAddrs {
    type Err = String;

    /// `127.0.0.2-127.0.0.254`, `127.0.0.2,127.0.0.3`, a mix of both, or
    /// `none` (let the kernel choose; all connections come from one address).
    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim().eq_ignore_ascii_case("none") {
            return Ok(Self(Vec::new()));
        }
        let ip = |p: &str| {
            p.trim()
                .parse::<Ipv4Addr>()
                .map_err(|e| format!("{p:?} is not an IPv4 address: {e}"))
        };
        let mut out = Vec::new();
        for part in s.split(',').filter(|p| !p.trim().is_empty()) {
            match part.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (u32::from(ip(a)?), u32::from(ip(b)?));
                    if b < a || b - a > 65_536 {
                        return Err(format!("address range {part:?} is empty or too large"));
                    }
                    out.extend((a..=b).map(Ipv4Addr::from));
                }
                None => out.push(ip(part)?),
            }
        }
        if let Some(bad) = out.iter().find(|a| !a.is_loopback()) {
            return Err(format!(
                "source address {bad} is not in 127.0.0.0/8; the simulator only uses loopback"
            ));
        }
        Ok(Self(out))
    }
}

/// How a flapping device drops its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropMode {
    /// Close the socket (FIN), without an MQTT DISCONNECT: a TCP drop.
    Close,
    /// Abort the connection (RST, SO_LINGER 0).
    Reset,
}

/// How devices leave at the end of the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndMode {
    /// Send DISCONNECT, then close.
    Clean,
    /// Close the socket without DISCONNECT.
    Abrupt,
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|e| format!("{s:?} is not a number: {e}"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not a fraction between 0 and 1"))
    }
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|e| format!("{s:?} is not a number: {e}"))?;
    if v.is_finite() && v >= 0.0 {
        Ok(v)
    } else {
        Err(format!("{v} is not a rate >= 0"))
    }
}

/// Every option of the device simulator.
#[derive(Debug, Clone, PartialEq, Args, Serialize, Deserialize)]
pub struct SimConfig {
    /// MQTT targets (host:port, loopback only), comma-separated or repeated;
    /// devices are spread over them round-robin (device i -> target i mod n).
    #[arg(
        long = "target",
        value_delimiter = ',',
        default_value = "127.0.0.1:1883"
    )]
    pub targets: Vec<String>,

    /// Number of simulated devices.
    #[arg(short = 'n', long, default_value_t = 1000)]
    pub devices: u32,

    /// phyID (MQTT ClientId) prefix: device i is `{prefix}{i}`.
    #[arg(long, default_value = "sim-")]
    pub prefix: String,

    /// Index of the first device, so that several simulators can share a
    /// prefix without sharing devices.
    #[arg(long, default_value_t = 0)]
    pub first_device: u32,

    /// New connections per second, all workers together (0: as fast as
    /// possible, limited by --max-pending-connects).
    #[arg(long, default_value_t = 1000.0, value_parser = parse_rate)]
    pub connect_rate: f64,

    /// Connection attempts in flight at once (TCP connect to CONNACK), all
    /// workers together. Keep it below the server's listen backlog
    /// (Mosquitto: 100), or overflowing SYNs are retried after 1 s.
    #[arg(long, default_value_t = 64)]
    pub max_pending_connects: u32,

    /// MQTT keepalive sent in CONNECT (the server closes a connection silent
    /// for 1.5 x keepalive).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    #[serde(with = "human")]
    pub keepalive: Duration,

    /// Time between PINGREQs of one device (the heartbeat); first ping at a
    /// random offset within one interval. Default: the keepalive. 0: never.
    #[arg(long, value_parser = humantime::parse_duration)]
    #[serde(with = "human::opt")]
    pub ping_interval: Option<Duration>,

    /// Uplink PUBLISHes per second per device, to `devices/{phy}/up/telemetry`
    /// (0: none). The payload starts with the send time (u64 big-endian µs
    /// since the Unix epoch) when it has room for it.
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    pub uplink_rate: f64,

    /// Uplink payload size in bytes.
    #[arg(long, default_value_t = 32)]
    pub payload_size: usize,

    /// Uplink QoS: 0 or 1 (QoS 1 measures PUBLISH -> PUBACK).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub qos: u8,

    /// Unacknowledged QoS 1 uplinks per device; an uplink due while this many
    /// wait is skipped and counted.
    #[arg(long, default_value_t = 16)]
    pub max_inflight: usize,

    /// SUBSCRIBE to `devices/{phy}/down/#` (QoS 1) after each CONNACK.
    #[arg(long)]
    pub subscribe: bool,

    /// Fraction of devices that never acknowledge QoS 1 downlinks.
    #[arg(long, default_value_t = 0.0, value_parser = parse_fraction)]
    pub never_ack_fraction: f64,

    /// Fraction of devices that acknowledge QoS 1 downlinks late, by
    /// --late-ack-delay (the others ack at once).
    #[arg(long, default_value_t = 0.0, value_parser = parse_fraction)]
    pub late_ack_fraction: f64,

    /// Delay of late acknowledgements.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    #[serde(with = "human")]
    pub late_ack_delay: Duration,

    /// Fraction of devices that drop their TCP connection at random intervals
    /// and reconnect.
    #[arg(long, default_value_t = 0.0, value_parser = parse_fraction)]
    pub flap_fraction: f64,

    /// Time connected before a flapping device drops (range `min..max`).
    #[arg(long, default_value = "20s..60s")]
    pub flap_every: DurationRange,

    /// Time a flapping device stays away before reconnecting.
    #[arg(long, default_value = "1s..5s")]
    pub flap_downtime: DurationRange,

    /// How a flapping device drops: close (FIN) or reset (RST).
    #[arg(long, value_enum, default_value_t = DropMode::Close)]
    pub flap_mode: DropMode,

    /// Fraction of devices that, at random intervals, connect a second time
    /// with the same phyID (a takeover); the server must close the old one.
    #[arg(long, default_value_t = 0.0, value_parser = parse_fraction)]
    pub takeover_fraction: f64,

    /// Time connected before a takeover device opens its second connection.
    #[arg(long, default_value = "20s..60s")]
    pub takeover_every: DurationRange,

    /// How long the run lasts at most; devices leave when it ends (the
    /// simulator always stops by itself; at most 24h).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    #[serde(with = "human")]
    pub duration: Duration,

    /// Stop as soon as every device has connected once (a connect storm);
    /// --duration still bounds the run.
    #[arg(long)]
    pub stop_when_connected: bool,

    /// How devices leave at the end: clean (DISCONNECT) or abrupt.
    #[arg(long, value_enum, default_value_t = EndMode::Clean)]
    pub end: EndMode,

    /// Local source addresses, spread round-robin over the devices (each
    /// address has its own ephemeral ports); `none` lets the kernel choose.
    #[arg(long, default_value = "127.0.0.2-127.0.0.254")]
    pub source_addrs: SourceAddrs,

    /// Worker processes (this binary re-executed), each with a slice of the
    /// devices and of the source addresses. 0: as many as needed for
    /// --devices-per-worker.
    #[arg(long, default_value_t = 0)]
    pub workers: u32,

    /// Most devices one worker process holds when --workers is 0 (a process
    /// may hold at most `ulimit -Hn` open files).
    #[arg(long, default_value_t = 15_000)]
    pub devices_per_worker: u32,

    /// MQTT user name sent in CONNECT.
    #[arg(long)]
    pub username: Option<String>,

    /// MQTT password sent in CONNECT (needs --username).
    #[arg(long, requires = "username")]
    pub password: Option<String>,

    /// Deadline for TCP connect and then for CONNACK, each.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    #[serde(with = "human")]
    pub connect_timeout: Duration,

    /// Wait before a device retries after a failed connect or a lost
    /// connection.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    #[serde(with = "human")]
    pub retry_delay: Duration,

    /// Do not retry: a device whose connect fails or whose connection is lost
    /// stays away.
    #[arg(long)]
    pub no_retry: bool,

    /// After a failed connect or a lost connection, retry on the next target
    /// (as devices behind a load balancer would when an instance dies).
    #[arg(long)]
    pub failover: bool,

    /// Seed of the per-device roles and timers (same seed, same run).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,

    /// Record every PINGREQ in the ground truth (for heartbeat-to-view
    /// latency; costs 16 bytes per ping).
    #[arg(long)]
    pub record_pings: bool,

    /// Largest packet accepted from the server.
    #[arg(long, default_value_t = 65_536)]
    pub max_packet_size: usize,

    /// The worker executable (default: `iot-sim` itself or beside the
    /// running binary).
    #[arg(long, hide = true)]
    pub worker_exe: Option<PathBuf>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            targets: vec!["127.0.0.1:1883".to_owned()],
            devices: 1000,
            prefix: "sim-".to_owned(),
            first_device: 0,
            connect_rate: 1000.0,
            max_pending_connects: 64,
            keepalive: Duration::from_secs(60),
            ping_interval: None,
            uplink_rate: 0.0,
            payload_size: 32,
            qos: 1,
            max_inflight: 16,
            subscribe: false,
            never_ack_fraction: 0.0,
            late_ack_fraction: 0.0,
            late_ack_delay: Duration::from_secs(5),
            flap_fraction: 0.0,
            flap_every: DurationRange {
                min: Duration::from_secs(20),
                max: Duration::from_secs(60),
            },
            flap_downtime: DurationRange {
                min: Duration::from_secs(1),
                max: Duration::from_secs(5),
            },
            flap_mode: DropMode::Close,
            takeover_fraction: 0.0,
            takeover_every: DurationRange {
                min: Duration::from_secs(20),
                max: Duration::from_secs(60),
            },
            duration: Duration::from_secs(60),
            stop_when_connected: false,
            end: EndMode::Clean,
            source_addrs: SourceAddrs((2..=254).map(|i| Ipv4Addr::new(127, 0, 0, i)).collect()),
            workers: 0,
            devices_per_worker: 15_000,
            username: None,
            password: None,
            connect_timeout: Duration::from_secs(10),
            retry_delay: Duration::from_secs(1),
            no_retry: false,
            failover: false,
            seed: 1,
            record_pings: false,
            max_packet_size: 65_536,
            worker_exe: None,
        }
    }
}

/// Why a configuration cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Something is out of range; the message says what and why.
    #[error("invalid simulator option: {0}")]
    Invalid(String),
}

impl SimConfig {
    /// The phyID of device `index` (a global index: `first_device` and up).
    pub fn phy_id(&self, index: u32) -> String {
        format!("{}{index}", self.prefix)
    }

    /// The device index of a phyID of this run, if it is one.
    pub fn device_index(&self, phy_id: &str) -> Option<u32> {
        let i: u32 = phy_id.strip_prefix(&self.prefix)?.parse().ok()?;
        (i >= self.first_device && i < self.first_device.saturating_add(self.devices)).then_some(i)
    }

    /// The effective ping interval (`None`: never ping).
    pub fn ping_every(&self) -> Option<Duration> {
        let d = self.ping_interval.unwrap_or(self.keepalive);
        (!d.is_zero()).then_some(d)
    }

    /// How many worker processes this run uses (1: in this process).
    pub fn worker_count(&self) -> u32 {
        let n = if self.workers > 0 {
            self.workers
        } else {
            self.devices.div_ceil(self.devices_per_worker.max(1))
        };
        n.clamp(1, self.devices.max(1))
    }

    /// Checks every option; the message names the option and the fix.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.targets.is_empty() {
            return bad("--target: give at least one host:port".to_owned());
        }
        if self.devices == 0 {
            return bad("--devices must be at least 1".to_owned());
        }
        if self.first_device.checked_add(self.devices).is_none() {
            return bad("--first-device + --devices overflows u32".to_owned());
        }
        let last = self.phy_id(self.first_device + (self.devices - 1));
        if let Err(e) = iot_core::PhyId::new(last.as_str()) {
            return bad(format!(
                "--prefix {:?} gives invalid phyIDs: {e}",
                self.prefix
            ));
        }
        if self.never_ack_fraction + self.late_ack_fraction > 1.0 {
            return bad("--never-ack-fraction + --late-ack-fraction exceed 1".to_owned());
        }
        if self.keepalive.as_secs() > u64::from(u16::MAX) {
            return bad("--keepalive is at most 65535s (MQTT)".to_owned());
        }
        if self.duration.is_zero() || self.duration > MAX_DURATION {
            return bad(format!(
                "--duration must be between 1ms and {}",
                humantime::format_duration(MAX_DURATION)
            ));
        }
        if self.max_pending_connects == 0 {
            return bad("--max-pending-connects must be at least 1".to_owned());
        }
        if self.max_inflight == 0 || self.max_inflight > 65_000 {
            return bad("--max-inflight must be between 1 and 65000".to_owned());
        }
        if self.payload_size > self.max_packet_size {
            return bad("--payload-size is larger than --max-packet-size".to_owned());
        }
        if self.flap_fraction > 0.0 && self.flap_every.max.is_zero() {
            return bad("--flap-every must be longer than 0".to_owned());
        }
        if self.takeover_fraction > 0.0 && self.takeover_every.max.is_zero() {
            return bad("--takeover-every must be longer than 0".to_owned());
        }
        if self.workers > 1024 {
            return bad("--workers is at most 1024".to_owned());
        }
        Ok(())
    }

    /// The slice of this run that worker `k` of `n` runs: a contiguous range
    /// of devices, an equal share of the connect rate and of the pending
    /// connects, and the source addresses `k, k+n, k+2n, ...` (all of them
    /// if there are fewer than `n`). The parent decides when every device
    /// has connected, so a slice never stops by itself on that.
    pub fn slice(&self, k: u32, n: u32) -> SimConfig {
        let n = n.max(1);
        let base = self.devices / n;
        let extra = self.devices % n;
        let count = base + u32::from(k < extra);
        let start = self.first_device + k * base + k.min(extra);
        let addrs = &self.source_addrs.0;
        let mine: Vec<Ipv4Addr> = if addrs.len() >= n as usize {
            addrs
                .iter()
                .skip(k as usize)
                .step_by(n as usize)
                .copied()
                .collect()
        } else {
            addrs.clone()
        };
        SimConfig {
            devices: count,
            first_device: start,
            connect_rate: self.connect_rate / f64::from(n),
            max_pending_connects: (self.max_pending_connects / n).max(1),
            stop_when_connected: false,
            source_addrs: SourceAddrs(mine),
            workers: 1,
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        sim: SimConfig,
    }

    #[test]
    fn clap_defaults_match_default() {
        let cli = Cli::try_parse_from(["iot-sim"]).expect("parse");
        assert_eq!(cli.sim, SimConfig::default());
    }

    #[test]
    fn parses_the_documented_forms() {
        let cli = Cli::try_parse_from([
            "iot-sim",
            "--target",
            "127.0.0.1:1,127.0.0.1:2",
            "-n",
            "50",
            "--flap-every",
            "1s..2s",
            "--source-addrs",
            "127.0.0.2-127.0.0.4,127.0.1.1",
            "--ping-interval",
            "0s",
            "--qos",
            "0",
        ])
        .expect("parse");
        assert_eq!(cli.sim.targets.len(), 2);
        assert_eq!(cli.sim.devices, 50);
        assert_eq!(
            cli.sim.flap_every,
            DurationRange {
                min: Duration::from_secs(1),
                max: Duration::from_secs(2)
            }
        );
        assert_eq!(cli.sim.source_addrs.0.len(), 4);
        assert_eq!(cli.sim.ping_every(), None);
        assert!(Cli::try_parse_from(["iot-sim", "--qos", "2"]).is_err());
        assert!(Cli::try_parse_from(["iot-sim", "--flap-fraction", "1.5"]).is_err());
        assert!(Cli::try_parse_from(["iot-sim", "--source-addrs", "10.0.0.1"]).is_err());
        assert!(Cli::try_parse_from(["iot-sim", "--flap-every", "5s..1s"]).is_err());
    }

    #[test]
    fn json_round_trips_with_readable_durations() {
        let c = SimConfig {
            ping_interval: Some(Duration::from_millis(1500)),
            ..SimConfig::default()
        };
        let json = serde_json::to_value(&c).expect("encode");
        assert_eq!(json["keepalive"], "1m");
        assert_eq!(json["ping_interval"], "1s 500ms");
        assert_eq!(json["flap_every"], "20s..1m");
        assert_eq!(json["flap_mode"], "close");
        let back: SimConfig = serde_json::from_value(json).expect("decode");
        assert_eq!(back, c);
    }

    #[test]
    fn phy_ids_round_trip() {
        let c = SimConfig {
            first_device: 10,
            devices: 5,
            ..SimConfig::default()
        };
        assert_eq!(c.phy_id(12), "sim-12");
        assert_eq!(c.device_index("sim-12"), Some(12));
        assert_eq!(c.device_index("sim-15"), None);
        assert_eq!(c.device_index("other-12"), None);
    }

    #[test]
    fn validation_names_the_problem() {
        let bad = SimConfig {
            prefix: "bad prefix ".to_owned(),
            ..SimConfig::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("--prefix"));
        let bad = SimConfig {
            never_ack_fraction: 0.6,
            late_ack_fraction: 0.6,
            ..SimConfig::default()
        };
        assert!(bad.validate().is_err());
        assert!(SimConfig::default().validate().is_ok());
    }

    #[test]
    fn slices_cover_every_device_once() {
        let c = SimConfig {
            devices: 10,
            first_device: 100,
            connect_rate: 900.0,
            ..SimConfig::default()
        };
        let slices: Vec<SimConfig> = (0..3).map(|k| c.slice(k, 3)).collect();
        let mut covered: Vec<u32> = slices
            .iter()
            .flat_map(|s| s.first_device..s.first_device + s.devices)
            .collect();
        covered.sort_unstable();
        assert_eq!(covered, (100..110).collect::<Vec<_>>());
        assert!(slices.iter().all(|s| (s.connect_rate - 300.0).abs() < 1e-9));
        // Disjoint source addresses.
        let a: std::collections::HashSet<_> = slices[0].source_addrs.0.iter().collect();
        assert!(slices[1].source_addrs.0.iter().all(|x| !a.contains(x)));
    }

    #[test]
    fn worker_count_follows_the_per_worker_cap() {
        let c = SimConfig {
            devices: 100_000,
            ..SimConfig::default()
        };
        assert_eq!(c.worker_count(), 7);
        let c = SimConfig {
            devices: 3,
            workers: 8,
            ..SimConfig::default()
        };
        assert_eq!(c.worker_count(), 3);
    }
}
