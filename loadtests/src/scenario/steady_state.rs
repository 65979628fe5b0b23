//! Scenario: steady state. N devices connected and heartbeating (a PINGREQ
//! every `--ping-interval`); measured over a window once they are all
//! online:
//!
//! - events per second through the whole pipeline: PINGREQs sent by the
//!   simulator, heartbeats written by the ingests
//!   (`iot_ingest_events_written_total`), XADD calls (Redis commandstats)
//!   and events applied by the projector
//!   (`iot_projector_events_applied_total`);
//! - CPU per heartbeat of every process, Redis's from `INFO CPU` (the
//!   figure that decides the heartbeats per second one saturated Redis core
//!   can take: 1 / CPU per heartbeat);
//! - heartbeat-to-view latency from probe devices ([`crate::scenario::probe`]),
//!   in a second window of its own (`--probe-duration`), so that the
//!   probes' reads of their views are not in the CPU figures.
//!
//! Then, with the same device count, the seed's heartbeat (GET then SETEX
//! per heartbeat, [`crate::baseline::seed_heartbeat`]) against a private
//! Redis of its own, and the ratios. On 2 cores the load generator, the
//! ingests, the projector and Redis share the machine, so neither side can
//! saturate Redis: the raw rates are what the whole machine reached, and
//! Redis CPU per heartbeat is the comparison of the two designs at a
//! saturated Redis.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use iot_core::Keys;
use serde::{Deserialize, Serialize};

use crate::baseline::seed_heartbeat::{self, Client, SeedHeartbeatArgs, SeedHeartbeatResults};
use crate::bench_report::BenchReport;
use crate::scenario::probe::{self, ProbePlan, ProbeResults};
use crate::scenario::{
    SimArgs, progress_printer, ratio, run_prefix, wait_connected, wait_online_count,
};
use crate::sim::config::EndMode;
use crate::sim::{self, SimConfig, SimReport};
use crate::stack::{Stack, StackArgs, StackPlan, Usage, UsageWindow};

/// Options of `iot-bench steady-state`.
#[derive(Debug, Clone, Args)]
pub struct SteadyStateArgs {
    /// The services and how they run.
    #[command(flatten)]
    pub stack: StackArgs,

    /// The simulator.
    #[command(flatten)]
    pub sim: SimArgs,

    /// Devices.
    #[arg(short = 'n', long, default_value_t = 10_000)]
    pub devices: u32,

    /// Ingest processes.
    #[arg(long, default_value_t = 1)]
    pub ingests: u32,

    /// Time between a device's PINGREQs: the offered heartbeat rate is
    /// devices / interval.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub ping_interval: Duration,

    /// Time after every device is online before measuring.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,

    /// Measurement window of the rates and CPU figures.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub duration: Duration,

    /// Window of the heartbeat-to-view probes (after the first).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub probe_duration: Duration,

    /// Probe devices measuring heartbeat-to-view latency.
    #[arg(long, default_value_t = 50)]
    pub probes: u32,

    /// Time between a probe's pings.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    pub probe_interval: Duration,

    /// Time between a probe's reads of its view (the latency's resolution).
    #[arg(long, default_value = "1ms", value_parser = humantime::parse_duration)]
    pub probe_poll: Duration,

    /// Skip the seed's heartbeat side by side.
    #[arg(long)]
    pub no_seed: bool,

    /// Connections of the seed's heartbeat baseline.
    #[arg(long, default_value_t = 50)]
    pub seed_clients: u32,

    /// Measured time of the seed's heartbeat baseline.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub seed_duration: Duration,

    /// Time allowed for the devices to connect and be counted online.
    #[arg(long, default_value = "180s", value_parser = humantime::parse_duration)]
    pub connect_limit: Duration,

    /// Write the JSON report here (`-` for stdout).
    #[arg(long)]
    pub report: Option<PathBuf>,
}

/// Pipeline rates over the window, per second.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PipelineRates {
    /// Offered: devices / ping interval.
    pub offered_heartbeats: f64,
    /// PINGREQs the simulator sent.
    pub pings_sent: f64,
    /// PINGRESPs it received.
    pub pongs: f64,
    /// Events the ingests wrote (after coalescing).
    pub events_written: f64,
    /// XADD calls (stream entries; heartbeats travel up to 500 per entry).
    pub xadd_calls: f64,
    /// Events the projector applied.
    pub events_applied: f64,
    /// The projectors' own stream entry rates, appended and acknowledged
    /// (`entries_per_second` of /api/stats) at the end of the window.
    pub lag_added: f64,
    /// See `lag_added`.
    pub lag_applied: f64,
    /// The projectors' own events applied per second (`events_per_second`
    /// of /api/stats, every heartbeat of a batch counted).
    #[serde(default)]
    pub lag_events_applied: f64,
}

/// CPU microseconds per heartbeat, per role.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuPerHeartbeat {
    /// Redis (INFO CPU).
    pub redis_us: f64,
    /// Redis per heartbeat written by the ingests (after coalescing: a
    /// device's heartbeats within one writer flush become one).
    pub redis_us_per_written: f64,
    /// Ingest processes.
    pub ingest_us: f64,
    /// Projector.
    pub projector_us: f64,
    /// Simulator processes (the devices' side).
    pub simulator_us: f64,
    /// Everything of the server side (Redis, ingest, projector, api).
    pub server_us: f64,
}

/// Ours against the seed's, from this run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SeedComparison {
    /// The seed's heartbeat, measured right after ours.
    pub seed: Option<SeedHeartbeatResults>,
    /// Our heartbeats/s over the seed's (both as reached on this machine).
    pub heartbeats_per_s_ratio: f64,
    /// Seed's Redis CPU per heartbeat over ours.
    pub redis_cpu_per_heartbeat_ratio: f64,
    /// Heartbeats/s one saturated Redis core takes, ours: 1e6 / redis_us.
    pub ours_at_saturated_redis_per_s: f64,
    /// The same for the seed's.
    pub seed_at_saturated_redis_per_s: f64,
}

/// Figures of `steady-state`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SteadyStateResults {
    /// Devices (besides the probes).
    pub devices: u32,
    /// Ingest processes.
    pub ingests: u32,
    /// Ping interval, s.
    pub ping_interval_s: f64,
    /// Window, s.
    pub window_s: f64,
    /// Rates through the pipeline.
    pub rates: PipelineRates,
    /// CPU per heartbeat.
    pub cpu_per_heartbeat: CpuPerHeartbeat,
    /// CPU per role over the window.
    pub usage: Usage,
    /// Heartbeat-to-view latency.
    pub heartbeat_to_view: ProbeResults,
    /// Projection lag at the end of the window, entries.
    pub lag_entries_at_end: u64,
    /// The seed's heartbeat side by side.
    pub comparison: SeedComparison,
    /// Redis's slowest commands of the run (SLOWLOG, > 10 ms), µs.
    pub redis_slowlog: Vec<(u64, String)>,
}

impl SteadyStateResults {
    /// The human summary.
    pub fn summary(&self) -> String {
        let r = &self.rates;
        let c = &self.cpu_per_heartbeat;
        let mut s = format!(
            "steady-state: {} devices on {} ingest(s), a ping every {:.1}s, {:.1}s window\n  \
             heartbeats/s offered {:.0}, sent {:.0}, written {:.0} (in {:.0} XADD/s), applied {:.0}; lag at end {} entries\n  \
             CPU per heartbeat: Redis {:.2} us ({:.2} us per heartbeat written), ingest {:.2} us, projector {:.2} us, server total {:.2} us, simulator {:.2} us\n  \
             CPU (cores): {}\n  \
             heartbeat -> view ({} probes, {:.0} ms poll): {} (missed {})\n",
            self.devices,
            self.ingests,
            self.ping_interval_s,
            self.window_s,
            r.offered_heartbeats,
            r.pings_sent,
            r.events_written,
            r.xadd_calls,
            r.events_applied,
            self.lag_entries_at_end,
            c.redis_us,
            c.redis_us_per_written,
            c.ingest_us,
            c.projector_us,
            c.server_us,
            c.simulator_us,
            self.usage.line(),
            self.heartbeat_to_view.probes,
            self.heartbeat_to_view.poll_ms,
            self.heartbeat_to_view.latency.line(),
            self.heartbeat_to_view.missed,
        );
        let cmp = &self.comparison;
        if let Some(seed) = &cmp.seed {
            s.push_str(&format!(
                "  seed (GET+SETEX, {} clients, {} devices): {:.0} heartbeats/s, Redis {:.2} us/heartbeat\n  \
                 ratios: heartbeats/s ours/seed {:.2}x; Redis CPU per heartbeat seed/ours {:.2}x => at one saturated Redis core ours {:.0}/s vs seed {:.0}/s\n",
                seed.clients,
                seed.devices,
                seed.heartbeats_per_s,
                seed.redis_cpu_us_per_heartbeat,
                cmp.heartbeats_per_s_ratio,
                cmp.redis_cpu_per_heartbeat_ratio,
                cmp.ours_at_saturated_redis_per_s,
                cmp.seed_at_saturated_redis_per_s,
            ));
        }
        s
    }
}

struct Counters {
    pings: u64,
    pongs: u64,
    written: f64,
    applied: f64,
}

async fn counters(stack: &Stack, handle: &sim::SimHandle) -> anyhow::Result<Counters> {
    let p = handle.progress();
    let applied = match &stack.projector {
        Some(p) => crate::stack::api::scrape(p.http_addr())
            .await?
            .get("iot_projector_events_applied_total")
            .copied()
            .unwrap_or(0.0),
        None => 0.0,
    };
    Ok(Counters {
        pings: p.pings_sent,
        pongs: p.pongs,
        written: stack
            .ingest_metric("iot_ingest_events_written_total")
            .await?,
        applied,
    })
}

/// Runs the scenario; returns its report and the simulator's.
pub async fn run(
    args: &SteadyStateArgs,
) -> anyhow::Result<(BenchReport<SteadyStateResults>, SimReport)> {
    anyhow::ensure!(args.devices >= 1, "--devices must be at least 1");
    anyhow::ensure!(!args.ping_interval.is_zero(), "--ping-interval must be > 0");
    let ingests = args.ingests.max(1);
    let stack = Stack::start(&args.stack, &StackPlan::full(ingests)).await?;
    let config = SimConfig {
        targets: stack.mqtt_targets(),
        devices: args.devices,
        prefix: run_prefix("ss"),
        connect_rate: 0.0,
        max_pending_connects: args.sim.max_pending_connects,
        keepalive: (args.ping_interval * 4).max(Duration::from_secs(60)),
        ping_interval: Some(args.ping_interval),
        duration: args.connect_limit + args.warmup + args.duration + Duration::from_secs(60),
        end: EndMode::Clean,
        devices_per_worker: args.sim.devices_per_worker,
        worker_exe: args.sim.worker_exe.clone(),
        ..SimConfig::default()
    };
    let handle = sim::start(config).await?;
    let printer = progress_printer(&handle, args.sim.quiet);
    let measured = async {
        let n = u64::from(args.devices);
        wait_connected(&handle, n, args.connect_limit).await?;
        let api = stack.api()?;
        let (count, _) = wait_online_count(api, n, args.connect_limit).await?;
        anyhow::ensure!(
            count.exact,
            "the api counted {} of {n} devices online within {:?}",
            count.api_online,
            args.connect_limit
        );
        tokio::time::sleep(args.warmup).await;
        let sim_pids: Vec<(String, u32)> = handle
            .pids()
            .into_iter()
            .map(|p| ("simulator".to_owned(), p))
            .collect();
        let before = counters(&stack, &handle).await?;
        let window = UsageWindow::start(&stack, &sim_pids).await?;
        tokio::time::sleep(args.duration).await;
        let usage = window.finish(&stack).await?;
        let after = counters(&stack, &handle).await?;
        let stats = api.stats().await?;
        let plan = ProbePlan {
            targets: stack.ingests.iter().map(|i| i.mqtt).collect(),
            probes: args.probes,
            prefix: run_prefix("probe"),
            interval: args.probe_interval,
            poll: args.probe_poll,
            limit: Duration::from_secs(5),
            duration: args.probe_duration,
            shards: stack.shards(),
        };
        let probes = if args.probes > 0 {
            probe::run(&plan, stack.redis_conn().await?, &Keys::default()).await?
        } else {
            ProbeResults::default()
        };
        let slow = stack.redis_slowlog(10).await?;
        anyhow::Ok((before, after, usage, probes, stats, slow))
    }
    .await;
    handle.stop();
    let sim_outcome = handle.finish().await;
    crate::scenario::explain_failure(&measured, &sim_outcome);
    if let Some(p) = printer {
        let _ = p.await;
    }
    stack.stop().await;
    let (before, after, usage, probes, stats, redis_slowlog) = measured?;
    let sim_report = sim_outcome?.report;

    let w = usage.elapsed_s.max(1e-9);
    let pings = (after.pings - before.pings) as f64;
    let per_s = |v: f64| v / w;
    let rates = PipelineRates {
        offered_heartbeats: f64::from(args.devices) / args.ping_interval.as_secs_f64(),
        pings_sent: per_s(pings),
        pongs: per_s((after.pongs - before.pongs) as f64),
        events_written: per_s(after.written - before.written),
        xadd_calls: per_s(usage.redis_calls.get("xadd").copied().unwrap_or(0) as f64),
        events_applied: per_s(after.applied - before.applied),
        lag_added: stats.entries_per_second.added,
        lag_applied: stats.entries_per_second.applied,
        lag_events_applied: stats.events_per_second.applied,
    };
    let us = |s: f64| ratio(s * 1e6, pings);
    let role = |r: &str| usage.cpu_s.get(r).copied().unwrap_or(0.0);
    let cpu = CpuPerHeartbeat {
        redis_us: us(usage.redis_cpu_s),
        redis_us_per_written: ratio(usage.redis_cpu_s * 1e6, after.written - before.written),
        ingest_us: us(role("ingest")),
        projector_us: us(role("projector")),
        simulator_us: us(role("simulator")),
        server_us: us(role("redis") + role("ingest") + role("projector") + role("api")),
    };

    let mut comparison = SeedComparison {
        ours_at_saturated_redis_per_s: ratio(1e6, cpu.redis_us),
        ..SeedComparison::default()
    };
    if !args.no_seed {
        let seed = seed_heartbeat::run(&SeedHeartbeatArgs {
            redis_url: None,
            redis_server_bin: args.stack.redis_server_bin.clone(),
            prefix: None,
            clients: args.seed_clients,
            devices: args.devices,
            duration: args.seed_duration,
            client: Client::Raw,
            heartbeat_timeout: Duration::from_secs(300),
            report: None,
        })
        .await?
        .results;
        comparison.heartbeats_per_s_ratio = ratio(rates.pings_sent, seed.heartbeats_per_s);
        comparison.redis_cpu_per_heartbeat_ratio =
            ratio(seed.redis_cpu_us_per_heartbeat, cpu.redis_us);
        comparison.seed_at_saturated_redis_per_s = ratio(1e6, seed.redis_cpu_us_per_heartbeat);
        comparison.seed = Some(seed);
    }
    let results = SteadyStateResults {
        devices: args.devices,
        ingests,
        ping_interval_s: args.ping_interval.as_secs_f64(),
        window_s: usage.elapsed_s,
        rates,
        cpu_per_heartbeat: cpu,
        usage,
        heartbeat_to_view: probes,
        lag_entries_at_end: stats.lag.entries,
        comparison,
        redis_slowlog,
    };
    Ok((BenchReport::new("steady-state", results), sim_report))
}
