//! The `iot-bench` command line: one subcommand per baseline or scenario,
//! each bounded in time, printing a summary on stdout and writing its JSON
//! report with `--report FILE`.
//!
//! Phase-2 scenarios (connect storm against ingest, steady state,
//! presence accuracy, api reads, downlinks, failover) are added here as
//! further subcommands built on [`crate::sim`] (devices and ground truth),
//! [`crate::proc_stat`] (server CPU and memory) and [`crate::servers`].

use clap::Subcommand;

use crate::baseline::count_scan::{self, CountScanArgs};
use crate::baseline::idle_connections::{self, IdleArgs};
use crate::baseline::seed_heartbeat::{self, SeedHeartbeatArgs};
use crate::bench_report::write_json;

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
}

/// Runs `command`: summary on stdout, JSON report to its `--report`.
pub async fn run(command: BenchCommand) -> anyhow::Result<()> {
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
    }
    Ok(())
}
