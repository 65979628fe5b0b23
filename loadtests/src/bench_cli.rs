//! The `iot-bench` command line: one subcommand per baseline or scenario,
//! each bounded in time, printing a summary on stdout and writing its JSON
//! report with `--report FILE` (scenarios also write the simulator's own
//! report beside it, as `FILE` with the extension `sim.json`).

use clap::Subcommand;

use crate::baseline::count_scan::{self, CountScanArgs};
use crate::baseline::idle_connections::{self, IdleArgs};
use crate::baseline::seed_heartbeat::{self, SeedHeartbeatArgs};
use crate::bench_report::write_json;
use crate::scenario::api_reads::{self, ApiReadsArgs};
use crate::scenario::connect_storm::{self, ConnectStormArgs};
use crate::scenario::downlinks::{self, DownlinksArgs};
use crate::scenario::failover::{self, FailoverArgs};
use crate::scenario::ingest_idle::{self, IngestIdleArgs};
use crate::scenario::presence::{self, PresenceArgs};
use crate::scenario::steady_state::{self, SteadyStateArgs};
use crate::sim::SimReport;

/// A benchmark.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// The seed's heartbeat (GET then SETEX of the session JSON, one device
    /// at a time per connection) against Redis: heartbeats/s and Redis CPU
    /// per heartbeat.
    SeedHeartbeat(SeedHeartbeatArgs),
    /// The seed's online count (SCAN + GET every session) against our O(1)
    /// count (ZCARD per shard) at several session counts.
    CountScan(CountScanArgs),
    /// Idle MQTT connections held by Mosquitto (or --target/--pid: any
    /// server): connect rate and memory per connection.
    #[command(alias = "idle-connections")]
    MosquittoIdle(IdleArgs),
    /// Scenario: N devices connect to K ingests; connections/s, time to N,
    /// and the api's online count equal to N. With --hold (and --ingests 0
    /// for as many as it takes): the capacity runs.
    #[command(alias = "capacity")]
    ConnectStorm(ConnectStormArgs),
    /// Scenario: N devices heartbeating; events/s through the pipeline, CPU
    /// per heartbeat, heartbeat-to-view latency, and the seed's heartbeat
    /// at the same device count.
    SteadyState(SteadyStateArgs),
    /// Scenario: random TCP drops and takeovers; drop-to-offline latency in
    /// the api and wrong answers against the ground truth.
    Presence(PresenceArgs),
    /// Scenario: per-device and online-list requests at fixed rates and at
    /// full speed.
    ApiReads(ApiReadsArgs),
    /// Scenario: commands through the api to devices on another ingest;
    /// round trip and commands/s.
    Downlinks(DownlinksArgs),
    /// Scenario: SIGKILL one of two ingests; time until its devices are
    /// offline in the api, and online again through the other.
    Failover(FailoverArgs),
    /// One ingest next to Mosquitto holding the same idle connections:
    /// memory per connection and connect rate, at each log level.
    IngestIdle(IngestIdleArgs),
}

/// Writes a scenario's report and, beside it, the simulator's.
fn write_scenario<T: serde::Serialize>(
    path: Option<&std::path::Path>,
    report: &T,
    sim: &SimReport,
) -> anyhow::Result<()> {
    if let Some(path) = path {
        write_json(path, report)?;
        if path != std::path::Path::new("-") {
            write_json(&path.with_extension("sim.json"), sim)?;
        }
    }
    Ok(())
}

/// Runs `command`: summary on stdout, JSON report to its `--report`.
///
/// Ctrl-C ends it early: the scenario is dropped, which kills the services
/// it started and the simulator's worker processes.
pub async fn run(command: BenchCommand) -> anyhow::Result<()> {
    tokio::select! {
        r = run_command(command) => r,
        _ = tokio::signal::ctrl_c() => {
            anyhow::bail!("interrupted: the services and simulator processes of this run are stopped")
        }
    }
}

async fn run_command(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::SeedHeartbeat(args) => {
            let report = seed_heartbeat::run(&args).await?;
            print!("{}", report.results.summary());
            if let Some(path) = &args.report {
                write_json(path, &report)?;
            }
        }
        BenchCommand::CountScan(args) => {
            let report = count_scan::run(&args).await?;
            print!("{}", report.results.summary());
            if let Some(path) = &args.report {
                write_json(path, &report)?;
            }
        }
        BenchCommand::MosquittoIdle(args) => {
            let (report, _sim) = idle_connections::run(&args).await?;
            print!("{}", report.results.summary());
            if let Some(path) = &args.report {
                write_json(path, &report)?;
            }
        }
        BenchCommand::ConnectStorm(args) => {
            let (report, sim) = connect_storm::run(&args).await?;
            print!("{}", report.results.summary());
            write_scenario(args.report.as_deref(), &report, &sim)?;
        }
        BenchCommand::SteadyState(args) => {
            let (report, sim) = steady_state::run(&args).await?;
            print!("{}", report.results.summary());
            write_scenario(args.report.as_deref(), &report, &sim)?;
        }
        BenchCommand::Presence(args) => {
            let (report, sim) = presence::run(&args).await?;
            print!("{}", report.results.summary());
            write_scenario(args.report.as_deref(), &report, &sim)?;
        }
        BenchCommand::ApiReads(args) => {
            let (report, sim) = api_reads::run(&args).await?;
            print!("{}", report.results.summary());
            write_scenario(args.report.as_deref(), &report, &sim)?;
        }
        BenchCommand::Downlinks(args) => {
            let (report, sim) = downlinks::run(&args).await?;
            print!("{}", report.results.summary());
            write_scenario(args.report.as_deref(), &report, &sim)?;
        }
        BenchCommand::Failover(args) => {
            let (report, sim) = failover::run(&args).await?;
            print!("{}", report.results.summary());
            write_scenario(args.report.as_deref(), &report, &sim)?;
        }
        BenchCommand::IngestIdle(args) => {
            let report = ingest_idle::run(&args).await?;
            print!("{}", report.results.summary());
            if let Some(path) = &args.report {
                write_json(path, &report)?;
            }
        }
    }
    Ok(())
}
