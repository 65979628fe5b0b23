//! The scenarios: each starts the system under test for itself (a
//! [`crate::stack::Stack`]: private Redis, ingest processes, projector,
//! api), drives it with the simulator, measures, and writes a report. Each
//! is one `iot-bench` subcommand, bounded in time.
//!
//! - [`connect_storm`]: N devices connect; connections/s, time to N, and
//!   the api's online count equal to N (also the capacity runs).
//! - [`steady_state`]: N devices heartbeating; events/s through the
//!   pipeline, CPU per heartbeat, heartbeat-to-view latency ([`probe`]),
//!   and the seed's heartbeat side by side.
//! - [`presence`]: random drops and takeovers; detection latency and wrong
//!   answers against the ground truth.
//! - [`api_reads`]: per-device and online-list requests at a fixed rate and
//!   at full speed ([`load_gen`]).
//! - [`downlinks`]: commands through the api to devices on another
//!   instance.
//! - [`failover`]: SIGKILL one of two ingests.
//! - [`ingest_idle`]: one ingest next to Mosquitto holding idle
//!   connections.

pub mod api_reads;
pub mod connect_storm;
pub mod downlinks;
pub mod failover;
pub mod ingest_idle;
pub mod load_gen;
pub mod presence;
pub mod probe;
pub mod steady_state;

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::sim::{Progress, SimHandle};
use crate::stack::ApiClient;
use crate::stack::api::StatsAnswer;

/// Simulator options every scenario shares.
#[derive(Debug, Clone, Args)]
pub struct SimArgs {
    /// Most devices one simulator process holds (more: worker processes).
    #[arg(long, default_value_t = 15_000)]
    pub devices_per_worker: u32,

    /// Connection attempts in flight, all simulator processes together.
    #[arg(long, default_value_t = 256)]
    pub max_pending_connects: u32,

    /// The iot-sim executable for worker processes (default: beside this
    /// one).
    #[arg(long, hide = true)]
    pub worker_exe: Option<PathBuf>,

    /// No progress lines.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

impl Default for SimArgs {
    fn default() -> Self {
        Self {
            devices_per_worker: 15_000,
            max_pending_connects: 256,
            worker_exe: None,
            quiet: false,
        }
    }
}

/// A unique phyID prefix for one run (`b1a2b3-`), so that a run never
/// meets an earlier run's views.
pub fn run_prefix(tag: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{tag}{}-", &id[..6])
}

/// Waits until `connected_now >= n`; an error naming what came short.
pub async fn wait_connected(
    handle: &SimHandle,
    n: u64,
    limit: Duration,
) -> anyhow::Result<Progress> {
    let (p, ok) = handle.wait_for(limit, |p| p.connected_now >= n).await;
    if !ok {
        anyhow::bail!(
            "only {} of {n} devices connected within {limit:?} ({} failed attempts); see the simulator's failures in the report",
            p.connected_now,
            p.connect_failures
        );
    }
    Ok(p)
}

/// How the api's online count caught up with the devices.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CountCheck {
    /// The count the api should reach.
    pub expected: u64,
    /// Its last answer.
    pub api_online: u64,
    /// Whether it reached `expected` exactly.
    pub exact: bool,
    /// Time from the start of the wait until it did, s.
    pub waited_s: f64,
}

/// Polls `/api/stats` until `online == expected` or `limit` passes.
pub async fn wait_online_count(
    api: &ApiClient,
    expected: u64,
    limit: Duration,
) -> anyhow::Result<(CountCheck, StatsAnswer)> {
    let start = Instant::now();
    loop {
        // An overloaded api may not answer in time; ask again until the limit.
        let s = match api.stats().await {
            Ok(s) => s,
            Err(e) if start.elapsed() < limit => {
                eprintln!("iot-bench: /api/stats: {e}; asking again");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let exact = s.online == expected;
        if exact || start.elapsed() >= limit {
            return Ok((
                CountCheck {
                    expected,
                    api_online: s.online,
                    exact,
                    waited_s: start.elapsed().as_secs_f64(),
                },
                s,
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `a / b`, or 0 when `b` is 0.
pub fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

/// Prints progress of `handle` unless quiet; the printer ends with the run.
pub fn progress_printer(handle: &SimHandle, quiet: bool) -> Option<tokio::task::JoinHandle<()>> {
    (!quiet).then(|| crate::sim::print_progress(handle.subscribe()))
}

/// When a scenario's measurement failed, prints what the simulator saw (its
/// connect failures and disconnects usually say why) on stderr.
pub fn explain_failure<T>(
    measured: &anyhow::Result<T>,
    sim: &anyhow::Result<crate::sim::SimOutcome>,
) {
    if measured.is_err()
        && let Ok(o) = sim
    {
        eprintln!(
            "the simulator's side of the failed run:\n{}",
            o.report.summary()
        );
    }
}
