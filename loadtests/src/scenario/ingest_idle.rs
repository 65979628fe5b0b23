//! Side by side: one `iot-ingest` and one Mosquitto holding the same number
//! of idle MQTT connections, measured the same way back to back
//! ([`crate::baseline::idle_connections`]: RSS growth per connection and
//! first-time connects per second). Targets: ingest memory per idle
//! connection at most 2x Mosquitto's, connect rate per process at least
//! half of Mosquitto's.
//!
//! The ingest runs with a private Redis (it takes an epoch and writes a
//! `connected` event per CONNECT) and, by default, without projector or
//! api, so that the comparison is process against process; `--with-projector`
//! adds the projector's work to the same two cores. It is measured once per
//! `--log-levels` entry: at `info` it keeps a tracing span per connection.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde::{Deserialize, Serialize};

use crate::baseline::idle_connections::{self, IdleArgs, IdleResults};
use crate::bench_report::BenchReport;
use crate::scenario::ratio;
use crate::sim::config::SourceAddrs;
use crate::stack::{Stack, StackArgs, StackPlan};

/// Options of `iot-bench ingest-idle`.
#[derive(Debug, Clone, Args)]
pub struct IngestIdleArgs {
    /// The services and how they run (`--log-level` is replaced by
    /// `--log-levels`).
    #[command(flatten)]
    pub stack: StackArgs,

    /// Idle connections to hold (one process holds at most ~19,900 here).
    #[arg(short = 'n', long, default_value_t = 19_500)]
    pub connections: u32,

    /// Ingest log levels to measure, in order.
    #[arg(long, value_delimiter = ',', default_value = "warn,info")]
    pub log_levels: Vec<String>,

    /// Also run the projector while the ingest is measured.
    #[arg(long)]
    pub with_projector: bool,

    /// Skip Mosquitto (ingest figures only).
    #[arg(long)]
    pub no_mosquitto: bool,

    /// The Mosquitto executable.
    #[arg(long, default_value = crate::servers::MOSQUITTO_BIN)]
    pub mosquitto_bin: PathBuf,

    /// Connection attempts in flight (keep it below Mosquitto's listen
    /// backlog of 100).
    #[arg(long, default_value_t = 64)]
    pub max_pending_connects: u32,

    /// Hold time after the last connect before memory is read.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub settle: Duration,

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

/// One ingest measurement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IngestRun {
    /// `IOT_LOG_LEVEL`.
    pub log_level: String,
    /// The measurement.
    pub ingest: IdleResults,
    /// Ingest KiB per connection over Mosquitto's (target <= 2).
    pub memory_ratio: Option<f64>,
    /// Ingest connect rate over Mosquitto's (target >= 0.5).
    pub connect_rate_ratio: Option<f64>,
}

/// Figures of `ingest-idle`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IngestIdleResults {
    /// Connections.
    pub connections: u32,
    /// Mosquitto, measured first.
    pub mosquitto: Option<IdleResults>,
    /// The ingest at each log level.
    pub ingest: Vec<IngestRun>,
    /// Whether the projector ran alongside.
    pub with_projector: bool,
}

impl IngestIdleResults {
    /// The human summary.
    pub fn summary(&self) -> String {
        let line = |name: &str, r: &IdleResults| {
            format!(
                "  {name:<14} connected {:>6}  {:>8.0} connects/s  {} KiB per connection  CONNACK p99 {:.2} ms\n",
                r.connected,
                r.connect_rate_per_s,
                r.rss_per_connection_kib
                    .map_or("n/a".to_owned(), |v| format!("{v:.2}")),
                r.connect_latency.p99_ms
            )
        };
        let mut s = format!(
            "ingest-idle: {} idle connections, one process each{}\n",
            self.connections,
            if self.with_projector {
                " (projector running)"
            } else {
                ""
            }
        );
        if let Some(m) = &self.mosquitto {
            s.push_str(&line("mosquitto", m));
        }
        for r in &self.ingest {
            s.push_str(&line(&format!("ingest ({})", r.log_level), &r.ingest));
            if let (Some(m), Some(c)) = (r.memory_ratio, r.connect_rate_ratio) {
                s.push_str(&format!(
                    "    vs mosquitto: memory {m:.2}x (target <= 2), connect rate {c:.2}x (target >= 0.5)\n"
                ));
            }
        }
        s
    }
}

fn idle_args(args: &IngestIdleArgs, targets: Vec<String>, pids: Vec<u32>) -> IdleArgs {
    IdleArgs {
        connections: args.connections,
        targets,
        pids,
        brokers: 1,
        mosquitto_bin: args.mosquitto_bin.clone(),
        connect_rate: 0.0,
        max_pending_connects: args.max_pending_connects,
        workers: 0,
        devices_per_worker: 15_000,
        keepalive: Duration::from_secs(600),
        connect_limit: Duration::from_secs(120),
        settle: args.settle,
        prefix: crate::scenario::run_prefix("idle"),
        source_addrs: SourceAddrs(
            (2..=254)
                .map(|i| std::net::Ipv4Addr::new(127, 0, 0, i))
                .collect(),
        ),
        worker_exe: args.worker_exe.clone(),
        report: None,
        quiet: args.quiet,
    }
}

/// Runs the comparison.
pub async fn run(args: &IngestIdleArgs) -> anyhow::Result<BenchReport<IngestIdleResults>> {
    anyhow::ensure!(args.connections >= 1, "--connections must be at least 1");
    let mosquitto = if args.no_mosquitto {
        None
    } else {
        Some(
            idle_connections::run(&idle_args(args, Vec::new(), Vec::new()))
                .await?
                .0
                .results,
        )
    };
    let mut ingest = Vec::new();
    for level in &args.log_levels {
        let stack_args = StackArgs {
            log_level: level.clone(),
            ..args.stack.clone()
        };
        let plan = StackPlan {
            ingests: 1,
            projector: args.with_projector,
            api: false,
            env: Vec::new(),
        };
        let stack = Stack::start(&stack_args, &plan).await?;
        let i = &stack.ingests[0];
        let measured = idle_connections::run(&idle_args(
            args,
            vec![i.mqtt.to_string()],
            vec![i.process.pid()],
        ))
        .await;
        stack.stop().await;
        let r = measured?.0.results;
        let (memory_ratio, connect_rate_ratio) = match &mosquitto {
            Some(m) => (
                r.rss_per_connection_kib
                    .zip(m.rss_per_connection_kib)
                    .map(|(a, b)| ratio(a, b)),
                Some(ratio(r.connect_rate_per_s, m.connect_rate_per_s)),
            ),
            None => (None, None),
        };
        ingest.push(IngestRun {
            log_level: level.clone(),
            ingest: r,
            memory_ratio,
            connect_rate_ratio,
        });
    }
    Ok(BenchReport::new(
        "ingest-idle",
        IngestIdleResults {
            connections: args.connections,
            mosquitto,
            ingest,
            with_projector: args.with_projector,
        },
    ))
}
