//! Scenario: downlinks across instances. N devices subscribe to their
//! downlink topics on ingest B; commands go in through the api (`POST
//! /api/devices/{phyID}/commands`) at a fixed rate, are routed to B over
//! Redis Pub/Sub, delivered as QoS 1 PUBLISH, and acknowledged by the
//! devices at once. Measured: the round trip from the POST to the command's
//! `acked` state, and acknowledged commands per second. Target: p99 under
//! 10 ms at 1,000 commands/s.
//!
//! Two ways to see the ack (`--mode`): `poll` (default) posts without
//! `wait` and reads the command's record in Redis (`HGET command:{id}
//! status`) every `--poll` until it is `acked`: the system's round trip
//! at 1 ms resolution; `wait` posts with `wait` and takes the api's
//! answer, which polls the record every 10 ms itself, so its figure
//! carries that granularity.
//!
//! Before the run one command is posted with a 10 s wait: if it does not
//! end `acked`, downlinks do not work on the stack and the run fails (a
//! figure measured without delivery would be no figure at all).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};
use iot_core::Keys;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::bench_report::BenchReport;
use crate::scenario::load_gen::{self, LoadPlan, LoadResult, Outcome, Request, RequestFuture};
use crate::scenario::{SimArgs, progress_printer, run_prefix, wait_connected};
use crate::sim::config::EndMode;
use crate::sim::{self, SimConfig, SimReport};
use crate::stack::http::HttpConn;
use crate::stack::{Stack, StackArgs, StackPlan, Usage, UsageWindow, WRITE_TOKEN};

/// Field of a command record holding its status (`iot-downlink`'s
/// `command::field::STATUS`).
const STATUS_FIELD: &str = "status";
/// The status of an acknowledged command.
const ACKED: &str = "acked";
/// Terminal statuses.
const TERMINAL: [&str; 4] = ["acked", "timed_out", "expired", "failed"];

/// How the round trip is observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// POST, then read the command's record in Redis until acked.
    Poll,
    /// POST with `wait` and take the api's answer.
    Wait,
}

/// Options of `iot-bench downlinks`.
#[derive(Debug, Clone, Args)]
pub struct DownlinksArgs {
    /// The services and how they run.
    #[command(flatten)]
    pub stack: StackArgs,

    /// The simulator.
    #[command(flatten)]
    pub sim: SimArgs,

    /// Devices (all on the second ingest; the api submits).
    #[arg(short = 'n', long, default_value_t = 1_000)]
    pub devices: u32,

    /// Commands per second.
    #[arg(long, default_value_t = 1_000.0)]
    pub rate: f64,

    /// Measured time.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,

    /// HTTP connections of the load generator.
    #[arg(long, default_value_t = 64)]
    pub connections: u32,

    /// How the ack is observed.
    #[arg(long, value_enum, default_value_t = Mode::Poll)]
    pub mode: Mode,

    /// Time between reads of a command's record (`--mode poll`).
    #[arg(long, default_value = "1ms", value_parser = humantime::parse_duration)]
    pub poll: Duration,

    /// A command not acked within this counts as failed.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub limit: Duration,

    /// Write the JSON report here (`-` for stdout).
    #[arg(long)]
    pub report: Option<PathBuf>,
}

/// Figures of `downlinks`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DownlinksResults {
    /// Devices subscribed on ingest B.
    pub devices: u32,
    /// Whether the ingest delivered the probe command (always true in a
    /// report: the run fails otherwise; kept for reports of older runs).
    pub delivery_supported: bool,
    /// The probe command's status (acked within 10 s, or the run fails).
    pub probe_status: String,
    /// How the round trip was observed (`poll` or `wait`; older reports
    /// may say `submit_only`, from builds that did not deliver).
    pub mode: String,
    /// The generator: latency is the round trip POST -> acked.
    pub load: LoadResult,
    /// Final statuses seen, by name.
    pub statuses: BTreeMap<String, u64>,
    /// Acknowledged commands per second.
    pub acked_per_s: f64,
    /// Downlinks the devices received during the run.
    pub devices_received: u64,
    /// Downlinks the devices acknowledged during the run.
    pub devices_acked: u64,
    /// CPU per role during the run.
    pub usage: Usage,
}

impl DownlinksResults {
    /// The human summary.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "downlinks: {} devices on ingest B, commands through the api at {:.0}/s ({})\n",
            self.devices, self.load.target_rate, self.mode
        );
        s.push_str(&format!(
            "  {}\n  acked {:.0}/s; statuses {:?}; devices received {}, acked {}\n  CPU (cores): {}\n",
            self.load.line(),
            self.acked_per_s,
            self.statuses,
            self.devices_received,
            self.devices_acked,
            self.usage.line()
        ));
        s
    }
}

struct Downlink {
    prefix: String,
    devices: u32,
    mode: Mode,
    poll: Duration,
    limit: Duration,
    redis: redis::aio::MultiplexedConnection,
    keys: Keys,
    statuses: Mutex<BTreeMap<String, u64>>,
}

#[derive(Deserialize)]
struct Posted {
    id: String,
    status: String,
    #[serde(default)]
    reason: Option<String>,
}

impl Posted {
    /// `failed (offline)`, or the status alone.
    fn label(&self) -> String {
        match &self.reason {
            Some(r) if self.status == "failed" => format!("failed ({r})"),
            _ => self.status.clone(),
        }
    }
}

impl Downlink {
    fn count(&self, status: &str) {
        *self.statuses.lock().entry(status.to_owned()).or_insert(0) += 1;
    }

    async fn one(&self, conn: &mut HttpConn, i: u64) -> Outcome {
        let phy = format!("{}{}", self.prefix, i % u64::from(self.devices));
        let path = format!("/api/devices/{phy}/commands");
        let body = match self.mode {
            Mode::Wait => format!(
                r#"{{"name":"bench","payload":"{i}","wait":"{}"}}"#,
                humantime::format_duration(self.limit)
            ),
            _ => format!(r#"{{"name":"bench","payload":"{i}"}}"#),
        };
        let r = match conn.post_json(&path, body.as_bytes()).await {
            Ok(r) => r,
            Err(_) => return Outcome::ConnectionError,
        };
        if !r.is_success() {
            self.count(&format!("http_{}", r.status));
            return Outcome::Status(r.status);
        }
        let Ok(posted) = r.json::<Posted>() else {
            self.count("unreadable_answer");
            return Outcome::Failed;
        };
        match self.mode {
            Mode::Wait => {
                self.count(&posted.label());
                if posted.status == ACKED {
                    Outcome::Status(r.status)
                } else {
                    Outcome::Failed
                }
            }
            Mode::Poll => self.poll_acked(&posted).await,
        }
    }

    async fn poll_acked(&self, posted: &Posted) -> Outcome {
        let Ok(id) = uuid::Uuid::parse_str(&posted.id) else {
            self.count("bad_id");
            return Outcome::Failed;
        };
        let key = self.keys.command(&id);
        let mut redis = self.redis.clone();
        let start = Instant::now();
        let mut status = posted.status.clone();
        loop {
            if TERMINAL.contains(&status.as_str()) {
                self.count(&status);
                return if status == ACKED {
                    Outcome::Status(200)
                } else {
                    Outcome::Failed
                };
            }
            if start.elapsed() > self.limit {
                self.count(&format!("{status} (not acked within the limit)"));
                return Outcome::Failed;
            }
            tokio::time::sleep(self.poll).await;
            let read: Result<Option<String>, _> = redis::cmd("HGET")
                .arg(&key)
                .arg(STATUS_FIELD)
                .query_async(&mut redis)
                .await;
            match read {
                Ok(Some(s)) => status = s,
                Ok(None) => {}
                Err(_) => {
                    self.count("redis_error");
                    return Outcome::Failed;
                }
            }
        }
    }
}

impl Request for Downlink {
    fn call<'a>(&'a self, conn: &'a mut HttpConn, i: u64) -> RequestFuture<'a> {
        Box::pin(self.one(conn, i))
    }
}

/// Runs the scenario; returns its report and the simulator's.
pub async fn run(
    args: &DownlinksArgs,
) -> anyhow::Result<(BenchReport<DownlinksResults>, SimReport)> {
    anyhow::ensure!(args.devices >= 1, "--devices must be at least 1");
    let stack = Stack::start(&args.stack, &StackPlan::full(2)).await?;
    let prefix = run_prefix("dl");
    let config = SimConfig {
        targets: vec![stack.ingests[1].mqtt.to_string()],
        devices: args.devices,
        prefix: prefix.clone(),
        connect_rate: 0.0,
        max_pending_connects: args.sim.max_pending_connects,
        keepalive: Duration::from_secs(60),
        ping_interval: Some(Duration::from_secs(30)),
        subscribe: true,
        duration: args.duration + Duration::from_secs(240),
        end: EndMode::Clean,
        devices_per_worker: args.sim.devices_per_worker,
        worker_exe: args.sim.worker_exe.clone(),
        ..SimConfig::default()
    };
    let handle = sim::start(config).await?;
    let printer = progress_printer(&handle, args.sim.quiet);
    let measured = async {
        let n = u64::from(args.devices);
        wait_connected(&handle, n, Duration::from_secs(120)).await?;
        let (p, subscribed) = handle
            .wait_for(Duration::from_secs(60), |p| p.subacks >= n)
            .await;
        anyhow::ensure!(
            subscribed,
            "only {} of {n} subscriptions confirmed",
            p.subacks
        );
        let api = stack.api()?;
        // One command with a wait first: a deployment that does not deliver
        // is an error, not a figure.
        let probe = api
            .post_command(
                &format!("{prefix}0"),
                r#"{"name":"probe","payload":"p","wait":"10s"}"#,
            )
            .await?;
        let supported = probe.status == ACKED;
        anyhow::ensure!(
            supported,
            "the probe command was not delivered and acked within 10 s (status {:?}): downlinks do not work on this stack",
            probe.status
        );
        let mode = args.mode;
        let request = Arc::new(Downlink {
            prefix: prefix.clone(),
            devices: args.devices,
            mode,
            poll: args.poll,
            limit: args.limit,
            redis: stack.redis_conn().await?,
            keys: Keys::default(),
            statuses: Mutex::new(BTreeMap::new()),
        });
        let before = handle.progress();
        let window = UsageWindow::start(&stack, &[]).await?;
        let load = load_gen::run(
            api.addr(),
            &LoadPlan {
                rate: args.rate,
                connections: args.connections,
                duration: args.duration,
                token: Some(WRITE_TOKEN.to_owned()),
            },
            request.clone(),
        )
        .await;
        let usage = window.finish(&stack).await?;
        let after = handle.progress();
        let statuses = request.statuses.lock().clone();
        anyhow::Ok(DownlinksResults {
            devices: args.devices,
            delivery_supported: supported,
            probe_status: probe.status,
            mode: match mode {
                Mode::Poll => "poll".to_owned(),
                Mode::Wait => "wait".to_owned(),
            },
            acked_per_s: statuses.get(ACKED).copied().unwrap_or(0) as f64
                / load.elapsed_s.max(1e-9),
            statuses,
            load,
            devices_received: after.downlinks_received - before.downlinks_received,
            devices_acked: after.downlinks_acked - before.downlinks_acked,
            usage,
        })
    }
    .await;
    handle.stop();
    let sim_outcome = handle.finish().await;
    crate::scenario::explain_failure(&measured, &sim_outcome);
    if let Some(p) = printer {
        let _ = p.await;
    }
    stack.stop().await;
    let results = measured?;
    let report = sim_outcome?.report;
    Ok((BenchReport::new("downlinks", results), report))
}
