//! Scenario: connect storm, and the capacity runs built on it.
//!
//! N devices connect to K ingest processes as fast as the simulator and
//! the services go (or at `--connect-rate`). Measured: connections per
//! second and time until all N are connected (the simulator's CONNACKs),
//! then the time until the api's online count (`/api/stats`, the online
//! index) equals N exactly. With `--hold`, the devices stay connected and
//! heartbeating, and the api count is compared with the simulator's
//! connected count every `--check-every`: a capacity run (100,000 devices
//! over 6 ingests; 1,000,000 over as many as it takes) passes when every
//! check is exact.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::bench_report::BenchReport;
use crate::histogram::{LatencyHistogram, LatencySummary};
use crate::proc_stat;
use crate::scenario::{
    CountCheck, SimArgs, progress_printer, run_prefix, wait_connected, wait_online_count,
};
use crate::sim::config::EndMode;
use crate::sim::{self, SimConfig, SimReport};
use crate::stack::{Stack, StackArgs, StackPlan, Usage, UsageWindow};

/// Options of `iot-bench connect-storm` (alias `capacity`).
#[derive(Debug, Clone, Args)]
pub struct ConnectStormArgs {
    /// The services and how they run.
    #[command(flatten)]
    pub stack: StackArgs,

    /// The simulator.
    #[command(flatten)]
    pub sim: SimArgs,

    /// Devices.
    #[arg(short = 'n', long, default_value_t = 10_000)]
    pub devices: u32,

    /// Ingest processes (0: as many as --devices-per-ingest needs).
    #[arg(long, default_value_t = 1)]
    pub ingests: u32,

    /// Most devices per ingest process when --ingests is 0 (a process may
    /// hold at most `ulimit -Hn` = 20,000 open files here).
    #[arg(long, default_value_t = 19_000)]
    pub devices_per_ingest: u32,

    /// New connections per second, all simulator processes together (0: as
    /// fast as possible, limited by --max-pending-connects).
    #[arg(long, default_value_t = 0.0)]
    pub connect_rate: f64,

    /// Time allowed for every device to connect.
    #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
    pub connect_limit: Duration,

    /// Time allowed for the api's online count to reach N once all are
    /// connected.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub settle_limit: Duration,

    /// After the count is reached, hold the devices connected and
    /// heartbeating this long, checking the count (a capacity run).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub hold: Duration,

    /// Time between a device's PINGREQs (heartbeats) while connected.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub ping_interval: Duration,

    /// Time between count checks during --hold.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub check_every: Duration,

    /// Write the JSON report here (`-` for stdout).
    #[arg(long)]
    pub report: Option<PathBuf>,
}

/// One count check during the hold.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HoldCheck {
    /// Seconds into the hold.
    pub at_s: f64,
    /// Devices the simulator held connected.
    pub sim_connected: u64,
    /// The api's online count.
    pub api_online: u64,
    /// The api's count of connections tracked in Redis.
    pub api_connected: u64,
    /// Projection lag (entries not yet applied).
    pub lag_entries: u64,
}

/// Figures of one ingest process.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IngestFigures {
    /// Its server id.
    pub server_id: String,
    /// RSS before the devices came, KiB.
    pub rss_before_kib: u64,
    /// RSS with its devices connected (end of the hold), KiB.
    pub rss_after_kib: u64,
    /// Devices it held (its `iot_ingest_connections`).
    pub connections: u64,
    /// (after - before) / connections, KiB.
    pub rss_per_connection_kib: f64,
    /// CPU seconds during the connect phase.
    pub connect_cpu_s: f64,
}

/// Figures of `connect-storm`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConnectStormResults {
    /// Devices.
    pub devices: u32,
    /// Ingest processes.
    pub ingests: u32,
    /// Simulator processes.
    pub sim_workers: u32,
    /// Log level of the services.
    pub log_level: String,
    /// From the first attempt until every device was connected, s.
    pub time_to_all_connected_s: Option<f64>,
    /// First-time connects per second, all ingests together.
    pub connect_rate_per_s: f64,
    /// The same per ingest process.
    pub connect_rate_per_ingest_per_s: f64,
    /// TCP connect -> CONNACK.
    pub connect_latency: LatencySummary,
    /// Failed attempts by reason.
    pub connect_failures: std::collections::BTreeMap<String, u64>,
    /// The api's online count after everyone connected.
    pub count: CountCheck,
    /// From the first attempt until the api counted N online, s.
    pub time_to_api_count_s: Option<f64>,
    /// Count checks during the hold.
    pub hold_checks: Vec<HoldCheck>,
    /// Checks where the api count differed from the simulator's.
    pub hold_mismatches: u64,
    /// Every check (after the settle) was exact.
    pub count_exact: bool,
    /// `GET /api/stats` (the O(1) count) latency during the hold.
    pub stats_latency: LatencySummary,
    /// Heartbeats per second sent during the hold.
    pub hold_heartbeats_per_s: f64,
    /// CPU of each role during the connect phase.
    pub connect_usage: Usage,
    /// CPU of each role during the hold.
    pub hold_usage: Option<Usage>,
    /// Per ingest process.
    pub per_ingest: Vec<IngestFigures>,
    /// Redis memory with every device connected, MiB.
    pub redis_used_memory_mib: f64,
    /// Simulator peak RSS (all processes), KiB.
    pub sim_peak_rss_kib: u64,
    /// Simulator CPU, s.
    pub sim_cpu_s: f64,
    /// Redis's slowest commands of the run (SLOWLOG, > 10 ms), µs.
    pub redis_slowlog: Vec<(u64, String)>,
    /// The machine before the devices came.
    pub system_before: proc_stat::SystemSnapshot,
    /// The machine with every device connected (end of the hold).
    pub system_after: proc_stat::SystemSnapshot,
}

impl ConnectStormResults {
    /// The human summary.
    pub fn summary(&self) -> String {
        let opt = |v: Option<f64>| v.map_or("n/a".to_owned(), |v| format!("{v:.2}s"));
        let ingest_kib: Vec<String> = self
            .per_ingest
            .iter()
            .map(|i| format!("{:.2}", i.rss_per_connection_kib))
            .collect();
        format!(
            "connect-storm: {} devices over {} ingest(s), {} simulator process(es), log {}\n  \
             time to all connected {}  connect rate {:.0}/s ({:.0}/s per ingest)  failures {:?}\n  \
             connect -> CONNACK {}\n  \
             api online count {} of {} (exact: {}) {:.2}s after the last connect; {} after the first attempt\n  \
             hold: {} checks, {} mismatches, heartbeats {:.0}/s; count exact throughout: {}\n  \
             GET /api/stats {}\n  \
             connect CPU (cores): {}\n  \
             ingest KiB per connection: {}  Redis {:.0} MiB  simulator peak RSS {} KiB, CPU {:.1}s\n  \
             machine: TCP sockets {} -> {}, slab {} -> {} MiB, available memory {} -> {} MiB\n",
            self.devices,
            self.ingests,
            self.sim_workers,
            self.log_level,
            opt(self.time_to_all_connected_s),
            self.connect_rate_per_s,
            self.connect_rate_per_ingest_per_s,
            self.connect_failures,
            self.connect_latency.line(),
            self.count.api_online,
            self.count.expected,
            self.count.exact,
            self.count.waited_s,
            opt(self.time_to_api_count_s),
            self.hold_checks.len(),
            self.hold_mismatches,
            self.hold_heartbeats_per_s,
            self.count_exact,
            self.stats_latency.line(),
            self.connect_usage.line(),
            ingest_kib.join(" "),
            self.redis_used_memory_mib,
            self.sim_peak_rss_kib,
            self.sim_cpu_s,
            self.system_before.tcp_inuse,
            self.system_after.tcp_inuse,
            self.system_before.slab_kib / 1024,
            self.system_after.slab_kib / 1024,
            self.system_before.mem_available_kib / 1024,
            self.system_after.mem_available_kib / 1024,
        )
    }
}

fn info_f64(info: &str, field: &str) -> f64 {
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Runs the scenario; returns its report and the simulator's.
pub async fn run(
    args: &ConnectStormArgs,
) -> anyhow::Result<(BenchReport<ConnectStormResults>, SimReport)> {
    anyhow::ensure!(args.devices >= 1, "--devices must be at least 1");
    let ingests = if args.ingests == 0 {
        args.devices.div_ceil(args.devices_per_ingest.max(1))
    } else {
        args.ingests
    };
    let stack = Stack::start(&args.stack, &StackPlan::full(ingests)).await?;
    let rss_before: Vec<u64> = stack
        .ingests
        .iter()
        .map(|i| proc_stat::rss_kib(i.process.pid()).unwrap_or(0))
        .collect();
    let cpu_before: Vec<f64> = stack
        .ingests
        .iter()
        .map(|i| {
            proc_stat::cpu_time(i.process.pid())
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0)
        })
        .collect();
    let config = SimConfig {
        targets: stack.mqtt_targets(),
        devices: args.devices,
        prefix: run_prefix("cs"),
        connect_rate: args.connect_rate,
        max_pending_connects: args.sim.max_pending_connects,
        keepalive: (args.ping_interval * 2).max(Duration::from_secs(60)),
        ping_interval: Some(args.ping_interval),
        duration: args.connect_limit + args.settle_limit + args.hold + Duration::from_secs(60),
        end: EndMode::Clean,
        devices_per_worker: args.sim.devices_per_worker,
        worker_exe: args.sim.worker_exe.clone(),
        ..SimConfig::default()
    };
    let sim_workers = config.worker_count();
    let system_before = proc_stat::SystemSnapshot::now();
    let window = UsageWindow::start(&stack, &[]).await?;
    let handle = sim::start(config).await?;
    let printer = progress_printer(&handle, args.sim.quiet);
    let outcome = async {
        let n = u64::from(args.devices);
        wait_connected(&handle, n, args.connect_limit).await?;
        let connect_usage = window.finish(&stack).await?;
        let connect_cpu: Vec<f64> = stack
            .ingests
            .iter()
            .zip(&cpu_before)
            .map(|(i, b)| {
                proc_stat::cpu_time(i.process.pid())
                    .map(|d| d.as_secs_f64() - b)
                    .unwrap_or(0.0)
            })
            .collect();
        let api = stack.api()?;
        let (count, _) = wait_online_count(api, n, args.settle_limit).await?;
        let counted_at_ms = iot_core::time::now_ms();
        let mut checks = Vec::new();
        let mut stats_latency = LatencyHistogram::new();
        let mut hold_usage = None;
        let pings_before = handle.progress().pings_sent;
        let hold_start = Instant::now();
        if !args.hold.is_zero() {
            let w = UsageWindow::start(&stack, &[]).await?;
            while hold_start.elapsed() < args.hold {
                tokio::time::sleep(args.check_every.min(args.hold)).await;
                let sim_connected = handle.progress().connected_now;
                let t = Instant::now();
                // An unanswered check counts as a mismatch (api_online 0).
                let s = api.stats().await.unwrap_or_default();
                stats_latency.record(t.elapsed());
                checks.push(HoldCheck {
                    at_s: hold_start.elapsed().as_secs_f64(),
                    sim_connected,
                    api_online: s.online,
                    api_connected: s.connected,
                    lag_entries: s.lag.entries,
                });
            }
            hold_usage = Some(w.finish(&stack).await?);
        } else {
            for _ in 0..20 {
                let t = Instant::now();
                if api.stats().await.is_ok() {
                    stats_latency.record(t.elapsed());
                }
            }
        }
        let hold_s = hold_start.elapsed().as_secs_f64();
        let pings = handle.progress().pings_sent - pings_before;
        let mut per_ingest = Vec::new();
        for (k, i) in stack.ingests.iter().enumerate() {
            // An overloaded ingest may not answer: 0 connections then.
            let m = crate::stack::api::scrape(i.process.http_addr())
                .await
                .unwrap_or_default();
            let connections = m.get("iot_ingest_connections").copied().unwrap_or(0.0) as u64;
            let after = proc_stat::rss_kib(i.process.pid()).unwrap_or(0);
            per_ingest.push(IngestFigures {
                server_id: i.server_id.clone(),
                rss_before_kib: rss_before[k],
                rss_after_kib: after,
                connections,
                rss_per_connection_kib: crate::scenario::ratio(
                    after as f64 - rss_before[k] as f64,
                    connections as f64,
                ),
                connect_cpu_s: connect_cpu[k],
            });
        }
        let mem = stack.redis_info("memory").await?;
        let slow = stack.redis_slowlog(10).await?;
        let system_after = proc_stat::SystemSnapshot::now();
        let mismatches = checks
            .iter()
            .filter(|c| c.api_online != c.sim_connected)
            .count() as u64;
        anyhow::Ok((
            count,
            counted_at_ms,
            checks,
            mismatches,
            stats_latency,
            connect_usage,
            hold_usage,
            per_ingest,
            info_f64(&mem, "used_memory") / (1024.0 * 1024.0),
            pings as f64 / hold_s.max(1e-9),
            slow,
            system_after,
        ))
    }
    .await;
    handle.stop();
    let sim_outcome = handle.finish().await;
    crate::scenario::explain_failure(&outcome, &sim_outcome);
    if let Some(p) = printer {
        let _ = p.await;
    }
    stack.stop().await;
    let (
        count,
        counted_at_ms,
        hold_checks,
        hold_mismatches,
        stats_latency,
        connect_usage,
        hold_usage,
        per_ingest,
        redis_mib,
        hold_hb,
        redis_slowlog,
        system_after,
    ) = outcome?;
    let report = sim_outcome?.report;
    let first = report.connect.first_attempt_at_ms;
    let results = ConnectStormResults {
        devices: args.devices,
        ingests,
        sim_workers,
        log_level: args.stack.log_level.clone(),
        time_to_all_connected_s: report.connect.time_to_all_connected_s,
        connect_rate_per_s: report.connect.connect_rate_per_s,
        connect_rate_per_ingest_per_s: report.connect.connect_rate_per_s / f64::from(ingests),
        connect_latency: report.latency.connect.clone(),
        connect_failures: report.connect_failures.clone(),
        time_to_api_count_s: first
            .filter(|_| count.exact)
            .map(|f| (counted_at_ms - f) as f64 / 1000.0),
        count_exact: count.exact && hold_mismatches == 0,
        count,
        hold_checks,
        hold_mismatches,
        stats_latency: stats_latency.summary(),
        hold_heartbeats_per_s: hold_hb,
        connect_usage,
        hold_usage,
        per_ingest,
        redis_used_memory_mib: redis_mib,
        sim_peak_rss_kib: report.sim_peak_rss_kib,
        sim_cpu_s: report.sim_cpu_s,
        redis_slowlog,
        system_before,
        system_after,
    };
    Ok((BenchReport::new("connect-storm", results), report))
}
