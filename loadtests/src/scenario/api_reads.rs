//! Scenario: api reads. With N devices connected (views, online index),
//! `GET /api/devices/{phyID}` (a random device each time) and `GET
//! /api/devices/online?limit=` are requested at fixed rates (open loop,
//! [`crate::scenario::load_gen`]) and then as fast as `--max-connections`
//! connections go, each for `--duration`. Target: the per-device route's
//! p99 under 2 ms at 5,000 requests/s.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use serde::{Deserialize, Serialize};

use crate::bench_report::BenchReport;
use crate::rng::unit_hash;
use crate::scenario::load_gen::{self, Get, LoadPlan, LoadResult};
use crate::scenario::{SimArgs, progress_printer, run_prefix, wait_connected, wait_online_count};
use crate::sim::config::EndMode;
use crate::sim::{self, SimConfig, SimReport};
use crate::stack::{READ_TOKEN, Stack, StackArgs, StackPlan, Usage, UsageWindow};

/// Options of `iot-bench api-reads`.
#[derive(Debug, Clone, Args)]
pub struct ApiReadsArgs {
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

    /// Requests per second of the per-device route.
    #[arg(long, default_value_t = 5_000.0)]
    pub rate: f64,

    /// Requests per second of the online list.
    #[arg(long, default_value_t = 500.0)]
    pub list_rate: f64,

    /// `limit` of the online list.
    #[arg(long, default_value_t = 100)]
    pub list_limit: u32,

    /// Connections of the fixed-rate runs.
    #[arg(long, default_value_t = 32)]
    pub connections: u32,

    /// Connections of the full-speed runs.
    #[arg(long, default_value_t = 32)]
    pub max_connections: u32,

    /// Time of each run.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,

    /// Skip the full-speed runs.
    #[arg(long)]
    pub no_max: bool,

    /// Time between a device's PINGREQs (background heartbeats).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub ping_interval: Duration,

    /// Write the JSON report here (`-` for stdout).
    #[arg(long)]
    pub report: Option<PathBuf>,
}

/// One route under one load.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RouteRun {
    /// `GET /api/devices/{phyID}` or `GET /api/devices/online?limit=N`.
    pub route: String,
    /// What the generator did and saw.
    pub load: LoadResult,
    /// CPU per role during the run.
    pub usage: Usage,
    /// Api CPU per request, µs.
    pub api_cpu_us_per_request: f64,
    /// Redis CPU per request, µs.
    pub redis_cpu_us_per_request: f64,
}

/// Figures of `api-reads`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ApiReadsResults {
    /// Devices connected.
    pub devices: u32,
    /// The runs, in order.
    pub runs: Vec<RouteRun>,
}

impl ApiReadsResults {
    /// The human summary.
    pub fn summary(&self) -> String {
        let mut s = format!("api-reads: {} devices connected\n", self.devices);
        for r in &self.runs {
            let target = if r.load.target_rate > 0.0 {
                format!("at {:.0}/s", r.load.target_rate)
            } else {
                format!("full speed, {} connections", r.load.connections)
            };
            s.push_str(&format!(
                "  {} {}: {}\n    api {:.1} us/request, Redis {:.1} us/request; CPU (cores) {}\n",
                r.route,
                target,
                r.load.line(),
                r.api_cpu_us_per_request,
                r.redis_cpu_us_per_request,
                r.usage.line()
            ));
        }
        s
    }
}

async fn measure(
    stack: &Stack,
    route: &str,
    plan: &LoadPlan,
    request: Arc<dyn load_gen::Request>,
) -> anyhow::Result<RouteRun> {
    let window = UsageWindow::start(stack, &[]).await?;
    let load = load_gen::run(stack.api()?.addr(), plan, request).await;
    let usage = window.finish(stack).await?;
    let per = |s: f64| crate::scenario::ratio(s * 1e6, load.requests as f64);
    Ok(RouteRun {
        route: route.to_owned(),
        api_cpu_us_per_request: per(usage.cpu_s.get("api").copied().unwrap_or(0.0)),
        redis_cpu_us_per_request: per(usage.redis_cpu_s),
        load,
        usage,
    })
}

/// Runs the scenario; returns its report and the simulator's.
pub async fn run(args: &ApiReadsArgs) -> anyhow::Result<(BenchReport<ApiReadsResults>, SimReport)> {
    anyhow::ensure!(args.devices >= 1, "--devices must be at least 1");
    let stack = Stack::start(&args.stack, &StackPlan::full(args.ingests.max(1))).await?;
    let prefix = run_prefix("ar");
    let config = SimConfig {
        targets: stack.mqtt_targets(),
        devices: args.devices,
        prefix: prefix.clone(),
        connect_rate: 0.0,
        max_pending_connects: args.sim.max_pending_connects,
        keepalive: (args.ping_interval * 2).max(Duration::from_secs(60)),
        ping_interval: Some(args.ping_interval),
        duration: args.duration * 5 + Duration::from_secs(300),
        end: EndMode::Clean,
        devices_per_worker: args.sim.devices_per_worker,
        worker_exe: args.sim.worker_exe.clone(),
        ..SimConfig::default()
    };
    let handle = sim::start(config).await?;
    let printer = progress_printer(&handle, args.sim.quiet);
    let measured = async {
        let n = u64::from(args.devices);
        wait_connected(&handle, n, Duration::from_secs(180)).await?;
        let (count, _) = wait_online_count(stack.api()?, n, Duration::from_secs(120)).await?;
        anyhow::ensure!(
            count.exact,
            "the api counted {} of {n} online",
            count.api_online
        );
        let devices = args.devices;
        let device_route = "GET /api/devices/{phyID}";
        let list_route = format!("GET /api/devices/online?limit={}", args.list_limit);
        let device_req: Arc<dyn load_gen::Request> = {
            let prefix = prefix.clone();
            Arc::new(Get(move |i: u64| {
                let d = (unit_hash(11, i, 3) * f64::from(devices)) as u32;
                format!("/api/devices/{prefix}{}", d.min(devices - 1))
            }))
        };
        let list_path = format!("/api/devices/online?limit={}", args.list_limit);
        let list_req: Arc<dyn load_gen::Request> = Arc::new(Get(move |_| list_path.clone()));
        let plan = |rate: f64, connections: u32| LoadPlan {
            rate,
            connections,
            duration: args.duration,
            token: Some(READ_TOKEN.to_owned()),
        };
        let mut runs = vec![
            measure(
                &stack,
                device_route,
                &plan(args.rate, args.connections),
                device_req.clone(),
            )
            .await?,
            measure(
                &stack,
                &list_route,
                &plan(args.list_rate, args.connections),
                list_req.clone(),
            )
            .await?,
        ];
        if !args.no_max {
            runs.push(
                measure(
                    &stack,
                    device_route,
                    &plan(0.0, args.max_connections),
                    device_req,
                )
                .await?,
            );
            runs.push(
                measure(
                    &stack,
                    &list_route,
                    &plan(0.0, args.max_connections),
                    list_req,
                )
                .await?,
            );
        }
        anyhow::Ok(runs)
    }
    .await;
    handle.stop();
    let sim_outcome = handle.finish().await;
    crate::scenario::explain_failure(&measured, &sim_outcome);
    if let Some(p) = printer {
        let _ = p.await;
    }
    stack.stop().await;
    let runs = measured?;
    let report = sim_outcome?.report;
    Ok((
        BenchReport::new(
            "api-reads",
            ApiReadsResults {
                devices: args.devices,
                runs,
            },
        ),
        report,
    ))
}
