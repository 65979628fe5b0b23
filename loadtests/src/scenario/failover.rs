//! Scenario: failover. N devices spread over two ingest processes (A and
//! B); A is SIGKILLed. Its devices lose their connections at once, but A
//! can say nothing: the system learns it when A's liveness key lapses
//! (`session.liveness_ttl`) and a projector's reaper marks A's connections
//! `tcp_down` (server_lost). The devices reconnect through B after
//! `--reconnect-delay` (+-50%, as devices behind a load balancer would).
//!
//! Measured per device of A (a sample, asked every `--poll-interval`):
//! the time from the kill until the api answers offline (target: within
//! the liveness TTL + 1 s), and until it answers online through B; the
//! latter also from the device's own reconnect (the system's part). B's
//! devices are asked too: every offline answer about them is false.
//!
//! The policy is set so that these answers mean what they say: one TCP drop
//! is offline (`--tcp-down-penalty 0.6`) for `--tcp-down-window`, and a
//! heartbeat is fresh for `--heartbeat-timeout` (devices ping every
//! `--ping-interval`), so that a device of A stays offline until it is back
//! rather than turning online again when the drop's penalty ends while its
//! last heartbeat is still fresh. The reconnect delay must exceed the
//! liveness TTL plus the penalty window, so that the two answers are apart.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::time::{Instant, sleep};

use crate::bench_report::BenchReport;
use crate::histogram::{LatencyHistogram, LatencySummary};
use crate::scenario::{SimArgs, progress_printer, run_prefix, wait_connected, wait_online_count};
use crate::sim::config::EndMode;
use crate::sim::{self, SimConfig, SimReport, TruthKind};
use crate::stack::{ApiClient, Stack, StackArgs, StackPlan};

/// Options of `iot-bench failover`.
#[derive(Debug, Clone, Args)]
pub struct FailoverArgs {
    /// The services and how they run.
    #[command(flatten)]
    pub stack: StackArgs,

    /// The simulator.
    #[command(flatten)]
    pub sim: SimArgs,

    /// Devices, half on each ingest.
    #[arg(short = 'n', long, default_value_t = 2_000)]
    pub devices: u32,

    /// `session.liveness_ttl` of the services.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub liveness_ttl: Duration,

    /// `session.heartbeat_timeout` of the services.
    #[arg(long, default_value = "4s", value_parser = humantime::parse_duration)]
    pub heartbeat_timeout: Duration,

    /// Time between a device's PINGREQs.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub ping_interval: Duration,

    /// The policy's TCP drop penalty.
    #[arg(long, default_value_t = 0.6)]
    pub tcp_down_penalty: f64,

    /// The policy's TCP drop window.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub tcp_down_window: Duration,

    /// A device whose connection was lost reconnects (through the other
    /// ingest) after this, +-50%.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub reconnect_delay: Duration,

    /// Devices of A (and of B) asked about; 0: all.
    #[arg(long, default_value_t = 200)]
    pub sample: u32,

    /// Time between questions about one device.
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    pub poll_interval: Duration,

    /// Time allowed after the kill for every sampled device to be back.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub limit: Duration,

    /// Write the JSON report here (`-` for stdout).
    #[arg(long)]
    pub report: Option<PathBuf>,
}

/// Figures of `failover`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FailoverResults {
    /// Devices.
    pub devices: u32,
    /// Devices on the killed ingest.
    pub devices_on_killed: u32,
    /// Liveness TTL, s.
    pub liveness_ttl_s: f64,
    /// Reconnect delay, s (+-50%).
    pub reconnect_delay_s: f64,
    /// Devices of A asked about.
    pub sampled: u32,
    /// Kill -> the api answers offline, per sampled device of A.
    pub offline_after_kill: LatencySummary,
    /// Sampled devices never answered offline (they were back first or
    /// the limit passed).
    pub never_offline: u32,
    /// Devices answered offline later than the liveness TTL + 1 s.
    pub offline_later_than_target: u32,
    /// Kill -> the api answers online through B.
    pub online_again_after_kill: LatencySummary,
    /// The device's reconnect (its CONNACK from B) -> the api answers
    /// online through B: the system's part of the way back.
    pub online_again_after_reconnect: LatencySummary,
    /// Sampled devices not back within the limit.
    pub not_back: u32,
    /// Kill -> the api's online count fell to the devices of B.
    pub count_down_after_kill_s: Option<f64>,
    /// Kill -> the api's online count was N again.
    pub count_back_after_kill_s: Option<f64>,
    /// Questions about B's devices after the kill.
    pub b_answers: u64,
    /// Of which offline (false: B's devices never dropped).
    pub b_false_offline: u64,
}

impl FailoverResults {
    /// The human summary.
    pub fn summary(&self) -> String {
        let opt = |v: Option<f64>| v.map_or("n/a".to_owned(), |v| format!("{v:.2}s"));
        format!(
            "failover: {} devices on 2 ingests, {} on the killed one; liveness TTL {:.1}s, reconnect after {:.0}s +-50%\n  \
             kill -> offline ({} sampled): {} (never offline {}, later than TTL + 1 s: {})\n  \
             kill -> online via B: {} (not back {})\n  \
             reconnect -> online via B: {}\n  \
             online count down to B's devices {} after the kill, back to N {}\n  \
             B's devices: {} answers, {} false offline\n",
            self.devices,
            self.devices_on_killed,
            self.liveness_ttl_s,
            self.reconnect_delay_s,
            self.sampled,
            self.offline_after_kill.line(),
            self.never_offline,
            self.offline_later_than_target,
            self.online_again_after_kill.line(),
            self.not_back,
            self.online_again_after_reconnect.line(),
            opt(self.count_down_after_kill_s),
            opt(self.count_back_after_kill_s),
            self.b_answers,
            self.b_false_offline,
        )
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Track {
    offline_ms: Option<i64>,
    back_ms: Option<i64>,
}

/// Asks about device `d` of A until it is back through B.
async fn follow_a(
    api: Arc<ApiClient>,
    phy: String,
    b: String,
    poll: Duration,
    deadline: Instant,
) -> Track {
    let mut t = Track::default();
    while Instant::now() < deadline {
        if let Ok(Some(a)) = api.device(&phy).await {
            let now = iot_core::time::now_ms();
            if !a.online && t.offline_ms.is_none() {
                t.offline_ms = Some(now);
            }
            if a.online && t.offline_ms.is_some() && a.server_id.as_deref() == Some(b.as_str()) {
                t.back_ms = Some(now);
                return t;
            }
        }
        sleep(poll).await;
    }
    t
}

/// Runs the scenario; returns its report and the simulator's.
pub async fn run(args: &FailoverArgs) -> anyhow::Result<(BenchReport<FailoverResults>, SimReport)> {
    anyhow::ensure!(args.devices >= 2, "--devices must be at least 2");
    let h = |d: Duration| humantime::format_duration(d).to_string();
    let plan = StackPlan::full(2)
        .with_env("IOT_SESSION_LIVENESS_TTL", h(args.liveness_ttl))
        .with_env("IOT_SESSION_HEARTBEAT_TIMEOUT", h(args.heartbeat_timeout))
        .with_env("IOT_POLICY_TCP_DOWN_PENALTY", args.tcp_down_penalty)
        .with_env("IOT_POLICY_TCP_DOWN_WINDOW", h(args.tcp_down_window));
    let mut stack = Stack::start(&args.stack, &plan).await?;
    let prefix = run_prefix("fo");
    let config = SimConfig {
        targets: stack.mqtt_targets(),
        devices: args.devices,
        prefix: prefix.clone(),
        connect_rate: 0.0,
        max_pending_connects: args.sim.max_pending_connects,
        keepalive: (args.ping_interval * 4).max(Duration::from_secs(10)),
        ping_interval: Some(args.ping_interval),
        failover: true,
        retry_delay: args.reconnect_delay,
        duration: args.limit + Duration::from_secs(180),
        end: EndMode::Clean,
        devices_per_worker: args.sim.devices_per_worker,
        worker_exe: args.sim.worker_exe.clone(),
        ..SimConfig::default()
    };
    let handle = sim::start(config).await?;
    let printer = progress_printer(&handle, args.sim.quiet);
    let api = Arc::new(ApiClient::new(
        stack.api()?.addr(),
        crate::stack::READ_TOKEN,
        crate::stack::WRITE_TOKEN,
    ));
    let b_id = stack.ingests[1].server_id.clone();
    // Device i connects to target i % 2: even ones to A.
    let on_a: Vec<u32> = (0..args.devices).step_by(2).collect();
    let on_b: Vec<u32> = (1..args.devices).step_by(2).collect();
    let take = |v: &[u32]| -> Vec<u32> {
        if args.sample == 0 || args.sample as usize >= v.len() {
            v.to_vec()
        } else {
            let step = v.len() / args.sample as usize;
            v.iter()
                .step_by(step.max(1))
                .take(args.sample as usize)
                .copied()
                .collect()
        }
    };
    let (sample_a, sample_b) = (take(&on_a), take(&on_b));
    let measured = async {
        let n = u64::from(args.devices);
        wait_connected(&handle, n, Duration::from_secs(120)).await?;
        let (count, _) = wait_online_count(&api, n, Duration::from_secs(60)).await?;
        anyhow::ensure!(
            count.exact,
            "the api counted {} of {n} online before the kill",
            count.api_online
        );
        let killed_ms = iot_core::time::now_ms();
        let killed = Instant::now();
        stack.kill_ingest(0);
        let deadline = killed + args.limit;
        let mut follow = tokio::task::JoinSet::new();
        let poll = args.poll_interval;
        for d in &sample_a {
            follow.spawn({
                let (api, phy, b) = (api.clone(), format!("{prefix}{d}"), b_id.clone());
                let d = *d;
                async move { (d, follow_a(api, phy, b, poll, deadline).await) }
            });
        }
        // B's devices, and the online count, until A's sample is back.
        let b_answers = Arc::new(Mutex::new((0u64, 0u64)));
        let watch_b = {
            let (api, b_answers, prefix) = (api.clone(), b_answers.clone(), prefix.clone());
            let sample_b = sample_b.clone();
            let poll = args.poll_interval;
            tokio::spawn(async move {
                let n_b = sample_b.len() as u64;
                let mut count_down = None;
                let mut count_back = None;
                let on_b = n / 2;
                while Instant::now() < deadline && count_back.is_none() {
                    for d in &sample_b {
                        if let Ok(Some(a)) = api.device(&format!("{prefix}{d}")).await {
                            let mut g = b_answers.lock();
                            g.0 += 1;
                            if !a.online {
                                g.1 += 1;
                            }
                        }
                    }
                    if let Ok(s) = api.stats().await {
                        let t = killed.elapsed().as_secs_f64();
                        if count_down.is_none() && s.online <= on_b {
                            count_down = Some(t);
                        }
                        if count_down.is_some() && s.online == n {
                            count_back = Some(t);
                        }
                    }
                    sleep(poll.max(Duration::from_millis(n_b.min(200)))).await;
                }
                (count_down, count_back)
            })
        };
        let mut tracks = HashMap::new();
        while let Some(r) = follow.join_next().await {
            if let Ok((d, t)) = r {
                tracks.insert(d, t);
            }
        }
        let (count_down, count_back) = watch_b.await.unwrap_or((None, None));
        let b = *b_answers.lock();
        anyhow::Ok((killed_ms, tracks, count_down, count_back, b))
    }
    .await;
    handle.stop();
    let sim_outcome = handle.finish().await;
    crate::scenario::explain_failure(&measured, &sim_outcome);
    if let Some(p) = printer {
        let _ = p.await;
    }
    stack.stop().await;
    let (killed_ms, tracks, count_down, count_back, (b_answers, b_false)) = measured?;
    let outcome = sim_outcome?;

    let ttl_ms = i64::try_from(args.liveness_ttl.as_millis()).unwrap_or(i64::MAX);
    let mut offline = LatencyHistogram::new();
    let mut back = LatencyHistogram::new();
    let mut back_from_reconnect = LatencyHistogram::new();
    let (mut never_offline, mut late, mut not_back) = (0, 0, 0);
    let ms = |v: i64| Duration::from_millis(u64::try_from(v.max(0)).unwrap_or(0));
    for (d, t) in &tracks {
        match t.offline_ms {
            Some(o) => {
                offline.record(ms(o - killed_ms));
                if o - killed_ms > ttl_ms + 1000 {
                    late += 1;
                }
            }
            None => never_offline += 1,
        }
        match t.back_ms {
            Some(b) => {
                back.record(ms(b - killed_ms));
                // The device's first connect after the kill.
                let reconnect = outcome
                    .truth
                    .timeline(*d)
                    .iter()
                    .find(|r| r.kind == TruthKind::Connected && r.at_ms >= killed_ms)
                    .map(|r| r.at_ms);
                if let Some(rc) = reconnect {
                    back_from_reconnect.record(ms(b - rc));
                }
            }
            None => not_back += 1,
        }
    }
    let results = FailoverResults {
        devices: args.devices,
        devices_on_killed: on_a.len() as u32,
        liveness_ttl_s: args.liveness_ttl.as_secs_f64(),
        reconnect_delay_s: args.reconnect_delay.as_secs_f64(),
        sampled: tracks.len() as u32,
        offline_after_kill: offline.summary(),
        never_offline,
        offline_later_than_target: late,
        online_again_after_kill: back.summary(),
        online_again_after_reconnect: back_from_reconnect.summary(),
        not_back,
        count_down_after_kill_s: count_down,
        count_back_after_kill_s: count_back,
        b_answers,
        b_false_offline: b_false,
    };
    Ok((BenchReport::new("failover", results), outcome.report))
}
