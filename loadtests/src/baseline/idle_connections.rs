//! Baseline: idle MQTT connections, their memory and connect rate.
//!
//! Holds N idle connections (CONNECT, CONNACK, then silence: a long
//! keepalive and no pings) to an MQTT server and measures how fast they
//! connect and what they cost the server in resident memory (VmRSS before
//! and after, divided by N). By default the server is a private Debian
//! Mosquitto (`iot-bench mosquitto-idle`); `--target` and `--pid` point the
//! same measurement at any server, e.g. an `iot-ingest`, for the side-by-side
//! figure "ingest memory per idle connection no more than 2x Mosquitto's".

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Args;
use serde::{Deserialize, Serialize};

use crate::bench_report::BenchReport;
use crate::histogram::LatencySummary;
use crate::proc_stat;
use crate::servers::MosquittoProcess;
use crate::sim::config::{EndMode, SourceAddrs};
use crate::sim::{self, SimConfig, SimReport};

/// Options of `iot-bench mosquitto-idle`.
#[derive(Debug, Clone, Args)]
pub struct IdleArgs {
    /// Idle connections to hold.
    #[arg(short = 'n', long, default_value_t = 10_000)]
    pub connections: u32,

    /// MQTT server(s) to connect to (loopback only); default: start
    /// --brokers private Mosquitto processes.
    #[arg(long = "target", value_delimiter = ',')]
    pub targets: Vec<String>,

    /// Process id(s) whose memory is measured (summed); default: the private
    /// brokers. Without it, a --target run measures connect rate only.
    #[arg(long = "pid", value_delimiter = ',')]
    pub pids: Vec<u32>,

    /// Private Mosquitto processes to start when no --target is given (one
    /// process holds at most `ulimit -Hn` connections).
    #[arg(long, default_value_t = 1)]
    pub brokers: u32,

    /// The Mosquitto executable.
    #[arg(long, default_value = crate::servers::MOSQUITTO_BIN)]
    pub mosquitto_bin: PathBuf,

    /// New connections per second (0: as fast as possible).
    #[arg(long, default_value_t = 0.0)]
    pub connect_rate: f64,

    /// Connection attempts in flight, all simulator processes together
    /// (keep it below the server's listen backlog; Mosquitto's is 100).
    #[arg(long, default_value_t = 64)]
    pub max_pending_connects: u32,

    /// Simulator worker processes (0: as many as --devices-per-worker
    /// needs).
    #[arg(long, default_value_t = 0)]
    pub workers: u32,

    /// Most connections per simulator process when --workers is 0.
    #[arg(long, default_value_t = 15_000)]
    pub devices_per_worker: u32,

    /// Keepalive in CONNECT (long: the connections stay silent).
    #[arg(long, default_value = "600s", value_parser = humantime::parse_duration)]
    pub keepalive: Duration,

    /// Time allowed for all connections to be established.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub connect_limit: Duration,

    /// Hold time after the last connect before memory is read.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub settle: Duration,

    /// phyID prefix of the connections.
    #[arg(long, default_value = "idle-")]
    pub prefix: String,

    /// Local source addresses (see iot-sim --source-addrs).
    #[arg(long, default_value = "127.0.0.2-127.0.0.254")]
    pub source_addrs: SourceAddrs,

    /// The iot-sim executable for worker processes.
    #[arg(long, hide = true)]
    pub worker_exe: Option<PathBuf>,

    /// Write the JSON report here (`-` for stdout).
    #[arg(long)]
    pub report: Option<PathBuf>,

    /// No progress lines.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

/// Figures of `mosquitto-idle`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IdleResults {
    /// What was measured: `mosquitto (private xK)` or `external`.
    pub server: String,
    /// Targets.
    pub targets: Vec<String>,
    /// Measured process ids.
    pub pids: Vec<u32>,
    /// Connections asked for.
    pub connections: u32,
    /// Connections open when memory was read.
    pub connected: u64,
    /// Simulator processes.
    pub workers: u32,
    /// From the first attempt until all were connected, s.
    pub time_to_all_connected_s: Option<f64>,
    /// First-time connects per second.
    pub connect_rate_per_s: f64,
    /// TCP connect -> CONNACK.
    pub connect_latency: LatencySummary,
    /// Failed attempts by reason.
    pub connect_failures: std::collections::BTreeMap<String, u64>,
    /// Server RSS before, KiB (sum over pids).
    pub rss_before_kib: Option<u64>,
    /// Server RSS with the connections open, KiB.
    pub rss_after_kib: Option<u64>,
    /// (after - before) / connected, KiB.
    pub rss_per_connection_kib: Option<f64>,
    /// Server CPU seconds spent while the connections were made.
    pub server_cpu_s: Option<f64>,
    /// Peak resident memory of the simulator process(es), KiB.
    pub simulator_peak_rss_kib: u64,
    /// CPU time of the simulator process(es) for the whole run
    /// (connect, hold, disconnect), s.
    pub simulator_cpu_s: f64,
}

impl IdleResults {
    /// The human summary.
    pub fn summary(&self) -> String {
        let opt = |v: Option<f64>, unit: &str| match v {
            Some(v) => format!("{v:.2}{unit}"),
            None => "n/a".to_owned(),
        };
        format!(
            "mosquitto-idle: {} idle connections to {} ({}), {} simulator process(es)\n  \
             connected {}  time to all {}  connect rate {:.0}/s  failures {:?}\n  \
             connect -> CONNACK {}\n  \
             server RSS {} -> {} KiB: {} per connection; server CPU {}\n  \
             simulator: peak RSS {} KiB, CPU {:.2}s\n",
            self.connections,
            self.targets.join(","),
            self.server,
            self.workers,
            self.connected,
            opt(self.time_to_all_connected_s, "s"),
            self.connect_rate_per_s,
            self.connect_failures,
            self.connect_latency.line(),
            self.rss_before_kib
                .map_or("n/a".to_owned(), |v| v.to_string()),
            self.rss_after_kib
                .map_or("n/a".to_owned(), |v| v.to_string()),
            opt(self.rss_per_connection_kib, " KiB"),
            opt(self.server_cpu_s, "s"),
            self.simulator_peak_rss_kib,
            self.simulator_cpu_s,
        )
    }
}

fn sum_rss(pids: &[u32]) -> anyhow::Result<Option<u64>> {
    if pids.is_empty() {
        return Ok(None);
    }
    let mut total = 0;
    for pid in pids {
        total += proc_stat::rss_kib(*pid)?;
    }
    Ok(Some(total))
}

fn sum_cpu(pids: &[u32]) -> Option<f64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter()
        .map(|p| proc_stat::cpu_time(*p).ok().map(|d| d.as_secs_f64()))
        .sum()
}

/// Runs the baseline; returns its report and the simulator's own.
pub async fn run(args: &IdleArgs) -> anyhow::Result<(BenchReport<IdleResults>, SimReport)> {
    anyhow::ensure!(args.connections >= 1, "--connections must be at least 1");
    // Brokers started below inherit the raised limit.
    sim::raise_fd_limit();
    let mut brokers = Vec::new();
    let (targets, pids, server) = if args.targets.is_empty() {
        if !MosquittoProcess::available(&args.mosquitto_bin) {
            bail!(
                "{} not found: apt-get install mosquitto, or pass --mosquitto-bin or --target",
                args.mosquitto_bin.display()
            );
        }
        for _ in 0..args.brokers.max(1) {
            brokers.push(MosquittoProcess::start(&args.mosquitto_bin).await?);
        }
        (
            brokers.iter().map(MosquittoProcess::addr).collect(),
            brokers.iter().map(MosquittoProcess::pid).collect(),
            format!("mosquitto (private x{})", brokers.len()),
        )
    } else {
        (
            args.targets.clone(),
            args.pids.clone(),
            "external".to_owned(),
        )
    };
    let config = SimConfig {
        targets: targets.clone(),
        devices: args.connections,
        prefix: args.prefix.clone(),
        connect_rate: args.connect_rate,
        max_pending_connects: args.max_pending_connects,
        keepalive: args.keepalive,
        ping_interval: Some(Duration::ZERO),
        duration: args.connect_limit + args.settle + Duration::from_secs(30),
        end: EndMode::Clean,
        source_addrs: args.source_addrs.clone(),
        workers: args.workers,
        devices_per_worker: args.devices_per_worker,
        worker_exe: args.worker_exe.clone(),
        ..SimConfig::default()
    };
    let workers = config.worker_count();
    let rss_before = sum_rss(&pids).context("measuring the server before connecting")?;
    let cpu_before = sum_cpu(&pids);
    let handle = sim::start(config).await?;
    let printer = (!args.quiet).then(|| sim::print_progress(handle.subscribe()));
    let n = u64::from(args.connections);
    let (progress, all) = handle
        .wait_for(args.connect_limit, |p| p.connected_now >= n)
        .await;
    if !all {
        eprintln!(
            "mosquitto-idle: only {} of {n} connected within {:?}; measuring what is there",
            progress.connected_now, args.connect_limit
        );
    }
    let cpu_after = sum_cpu(&pids);
    // A measurement hold, not a wait for a condition: let the server finish
    // the allocations of the last connections.
    tokio::time::sleep(args.settle).await;
    let connected = handle.progress().connected_now;
    let rss_after = sum_rss(&pids).context("measuring the server with the connections open")?;
    handle.stop();
    let outcome = handle.finish().await?;
    if let Some(p) = printer {
        let _ = p.await;
    }
    let report = outcome.report;
    let per_conn = match (rss_before, rss_after) {
        (Some(b), Some(a)) if connected > 0 => Some((a as f64 - b as f64) / connected as f64),
        _ => None,
    };
    let results = IdleResults {
        server,
        targets,
        pids,
        connections: args.connections,
        connected,
        workers,
        time_to_all_connected_s: report.connect.time_to_all_connected_s,
        connect_rate_per_s: report.connect.connect_rate_per_s,
        connect_latency: report.latency.connect.clone(),
        connect_failures: report.connect_failures.clone(),
        rss_before_kib: rss_before,
        rss_after_kib: rss_after,
        rss_per_connection_kib: per_conn,
        server_cpu_s: cpu_before.zip(cpu_after).map(|(b, a)| a - b),
        simulator_peak_rss_kib: report.sim_peak_rss_kib,
        simulator_cpu_s: report.sim_cpu_s,
    };
    drop(brokers);
    Ok((BenchReport::new("mosquitto-idle", results), report))
}
