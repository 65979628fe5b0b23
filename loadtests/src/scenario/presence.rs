//! Scenario: presence accuracy. Devices drop their TCP connection at
//! random (the simulator's flapping: close without DISCONNECT) and some
//! take their own session over from a second connection, under a policy
//! where one TCP drop means offline (`--tcp-down-penalty 0.6` > 1 -
//! threshold) for `--tcp-down-window`.
//!
//! - Detection latency: for every real drop (ground truth `Dropped`, taken
//!   from the simulator the moment it happens), the device is asked
//!   (`GET /api/devices/{phyID}`) every `--poll-interval` until the api
//!   answers offline. The policy says offline at the drop itself (the
//!   penalty applies from the ingest's drop timestamp), so the latency is
//!   measured from the drop to the answer. Target: within 1 s.
//! - Wrong answers: random devices are asked at `--sample-rate` and every
//!   answer is judged against the ground truth afterwards: a *false
//!   offline* is "offline" for a device that was connected throughout
//!   `[ask - tolerance, answer]` and had no drop within the penalty window
//!   before (then the policy says online); a *false online* is "online" for
//!   a device that dropped at least `tolerance` before the question, stayed
//!   away until the answer, and whose drop is still inside the penalty
//!   window (then the policy says offline). Answers near a transition are
//!   not judged.
//! - Takeovers: each device that takes its session over is asked every
//!   `--takeover-poll` for `--takeover-watch` from the moment its second
//!   connection is accepted; a takeover is not a drop, so every "offline"
//!   there is a false offline. Target: zero.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;

use crate::bench_report::BenchReport;
use crate::histogram::{LatencyHistogram, LatencySummary};
use crate::rng::SplitMix64;
use crate::scenario::{SimArgs, progress_printer, run_prefix, wait_connected};
use crate::sim::config::{DropMode, DurationRange, EndMode};
use crate::sim::{self, GroundTruth, SimConfig, SimReport, TruthKind, TruthRecord, TruthTap};
use crate::stack::{ApiClient, Stack, StackArgs, StackPlan};

/// Options of `iot-bench presence`.
#[derive(Debug, Clone, Args)]
pub struct PresenceArgs {
    /// The services and how they run.
    #[command(flatten)]
    pub stack: StackArgs,

    /// The simulator.
    #[command(flatten)]
    pub sim: SimArgs,

    /// Devices (keep them in one simulator process, at most
    /// --devices-per-worker, so that drops are seen the moment they happen).
    #[arg(short = 'n', long, default_value_t = 2_000)]
    pub devices: u32,

    /// Ingest processes.
    #[arg(long, default_value_t = 2)]
    pub ingests: u32,

    /// Fraction of devices that drop and reconnect at random.
    #[arg(long, default_value_t = 0.2)]
    pub flap_fraction: f64,

    /// Time connected before a flapping device drops.
    #[arg(long, default_value = "5s..15s")]
    pub flap_every: DurationRange,

    /// Time a flapping device stays away.
    #[arg(long, default_value = "1s..3s")]
    pub flap_downtime: DurationRange,

    /// Fraction of devices that take their own session over at random.
    #[arg(long, default_value_t = 0.05)]
    pub takeover_fraction: f64,

    /// Time connected before a takeover.
    #[arg(long, default_value = "5s..15s")]
    pub takeover_every: DurationRange,

    /// The policy's TCP drop penalty (IOT_POLICY_TCP_DOWN_PENALTY); above
    /// 1 - threshold, one drop means offline.
    #[arg(long, default_value_t = 0.6)]
    pub tcp_down_penalty: f64,

    /// The policy's TCP drop window (IOT_POLICY_TCP_DOWN_WINDOW).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub tcp_down_window: Duration,

    /// Time between a device's PINGREQs.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub ping_interval: Duration,

    /// Measured time.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub duration: Duration,

    /// Time between questions about a dropped device.
    #[arg(long, default_value = "10ms", value_parser = humantime::parse_duration)]
    pub poll_interval: Duration,

    /// A drop not answered offline within this is counted as missed.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub detect_limit: Duration,

    /// Random questions per second for the wrong-answer count.
    #[arg(long, default_value_t = 200.0)]
    pub sample_rate: f64,

    /// Answers within this of a transition are not judged.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub tolerance: Duration,

    /// How long a takeover device is watched after its takeover.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub takeover_watch: Duration,

    /// Time between questions about a device during its takeover.
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    pub takeover_poll: Duration,

    /// Write the JSON report here (`-` for stdout).
    #[arg(long)]
    pub report: Option<PathBuf>,
}

/// One answer of the api about one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    /// Device index.
    pub device: u32,
    /// Question sent, ms since the epoch.
    pub asked_ms: i64,
    /// Answer received, ms.
    pub answered_ms: i64,
    /// The api's `online`.
    pub online: bool,
}

/// What the ground truth says about an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The policy says online and so did the api.
    RightOnline,
    /// The policy says offline and so did the api.
    RightOffline,
    /// Offline for a device the policy says is online.
    FalseOffline,
    /// Online for a device the policy says is offline.
    FalseOnline,
    /// Too close to a transition to judge.
    Unjudged,
}

/// Judges `a` against the truth of its device (`timeline`, in time order):
/// see the module doc.
pub fn judge(a: &Answer, timeline: &[TruthRecord], window_ms: i64, tolerance_ms: i64) -> Verdict {
    let from = a.asked_ms - tolerance_ms;
    // State at `from` and every presence change up to the answer.
    // A second connection of a connected device (a takeover) is no change.
    let mut state_at_from = false;
    let mut last_down_before: Option<i64> = None;
    let mut changed = false;
    let mut state = false;
    for r in timeline {
        let Some(up) = r.kind.presence() else {
            continue;
        };
        if r.at_ms <= from {
            state_at_from = up;
            if !up {
                last_down_before = Some(r.at_ms);
            }
        } else if r.at_ms <= a.answered_ms && up != state {
            changed = true;
        }
        state = up;
    }
    if changed {
        return Verdict::Unjudged;
    }
    if state_at_from {
        // Connected throughout: online unless a drop's penalty may still run.
        let penalised =
            last_down_before.is_some_and(|d| d + window_ms + tolerance_ms >= a.asked_ms);
        match (a.online, penalised) {
            (_, true) => Verdict::Unjudged,
            (true, false) => Verdict::RightOnline,
            (false, false) => Verdict::FalseOffline,
        }
    } else {
        // Away throughout: offline while the drop's penalty runs.
        match last_down_before {
            Some(d) if a.answered_ms <= d + window_ms => {
                if a.online {
                    Verdict::FalseOnline
                } else {
                    Verdict::RightOffline
                }
            }
            _ => Verdict::Unjudged,
        }
    }
}

/// Counts of judged answers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Judged {
    /// Answers collected.
    pub answers: u64,
    /// Judged online and right.
    pub right_online: u64,
    /// Judged offline and right.
    pub right_offline: u64,
    /// Offline for a device the policy says is online.
    pub false_offline: u64,
    /// Online for a device the policy says is offline.
    pub false_online: u64,
    /// Too close to a transition.
    pub unjudged: u64,
    /// Up to 20 wrong answers, for a look at the devices' timelines.
    pub examples: Vec<Answer>,
}

impl Judged {
    fn add(&mut self, a: &Answer, v: Verdict) {
        self.answers += 1;
        match v {
            Verdict::RightOnline => self.right_online += 1,
            Verdict::RightOffline => self.right_offline += 1,
            Verdict::FalseOffline => self.false_offline += 1,
            Verdict::FalseOnline => self.false_online += 1,
            Verdict::Unjudged => self.unjudged += 1,
        }
        if matches!(v, Verdict::FalseOffline | Verdict::FalseOnline) && self.examples.len() < 20 {
            self.examples.push(*a);
        }
    }
}

/// Figures of `presence`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PresenceResults {
    /// Devices.
    pub devices: u32,
    /// Ingest processes.
    pub ingests: u32,
    /// The policy's TCP drop penalty.
    pub tcp_down_penalty: f64,
    /// The policy's TCP drop window, s.
    pub tcp_down_window_s: f64,
    /// Measured time, s.
    pub duration_s: f64,
    /// Real drops during the measurement.
    pub drops: u64,
    /// Drops answered offline.
    pub detected: u64,
    /// Drops not answered offline within the limit.
    pub missed: u64,
    /// Real drop -> the api's offline answer (the poll interval is the
    /// resolution).
    pub detection_latency: LatencySummary,
    /// Drops answered offline more than 1 s after the drop (the target).
    pub detected_after_1s: u64,
    /// Random questions, judged.
    pub sampled: Judged,
    /// Takeovers watched.
    pub takeovers: u64,
    /// Questions during takeovers, judged.
    pub during_takeovers: Judged,
    /// Ground-truth records the live feed could not take (then some drops
    /// were not polled at once).
    pub tap_overflow: u64,
    /// Api requests that failed.
    pub api_errors: u64,
}

impl PresenceResults {
    /// The human summary.
    pub fn summary(&self) -> String {
        let j = |x: &Judged| {
            format!(
                "{} answers: {} right online, {} right offline, {} FALSE OFFLINE, {} FALSE ONLINE, {} unjudged",
                x.answers,
                x.right_online,
                x.right_offline,
                x.false_offline,
                x.false_online,
                x.unjudged
            )
        };
        format!(
            "presence: {} devices on {} ingest(s), penalty {} for {:.1}s, {:.1}s measured\n  \
             drops {}: detected {}, missed {}, later than 1 s {}\n  \
             drop -> api offline {}\n  \
             random questions: {}\n  \
             takeovers {}: {}\n  \
             api errors {}, live-feed overflow {}\n",
            self.devices,
            self.ingests,
            self.tcp_down_penalty,
            self.tcp_down_window_s,
            self.duration_s,
            self.drops,
            self.detected,
            self.missed,
            self.detected_after_1s,
            self.detection_latency.line(),
            j(&self.sampled),
            self.takeovers,
            j(&self.during_takeovers),
            self.api_errors,
            self.tap_overflow,
        )
    }
}

#[derive(Default)]
struct Collected {
    detection: LatencyHistogram,
    drops: u64,
    detected: u64,
    missed: u64,
    after_1s: u64,
    takeovers: u64,
    samples: Vec<Answer>,
    takeover_samples: Vec<Answer>,
    api_errors: u64,
}

async fn ask(api: &ApiClient, prefix: &str, device: u32) -> Option<Answer> {
    let asked_ms = iot_core::time::now_ms();
    let answer = api.device(&format!("{prefix}{device}")).await.ok()??;
    Some(Answer {
        device,
        asked_ms,
        answered_ms: iot_core::time::now_ms(),
        online: answer.online,
    })
}

/// Polls a dropped device until the api says offline.
async fn detect(
    api: Arc<ApiClient>,
    prefix: String,
    drop: TruthRecord,
    poll: Duration,
    limit: Duration,
    out: Arc<Mutex<Collected>>,
) {
    let start = Instant::now();
    loop {
        match ask(&api, &prefix, drop.device).await {
            Some(a) if !a.online => {
                let ms = (a.answered_ms - drop.at_ms).max(0);
                let mut o = out.lock();
                o.detected += 1;
                o.detection.record(Duration::from_millis(ms as u64));
                if ms > 1000 {
                    o.after_1s += 1;
                }
                return;
            }
            Some(_) => {}
            None => out.lock().api_errors += 1,
        }
        if start.elapsed() > limit {
            out.lock().missed += 1;
            return;
        }
        sleep(poll).await;
    }
}

/// Asks about a device through its takeover.
async fn watch_takeover(
    api: Arc<ApiClient>,
    prefix: String,
    device: u32,
    poll: Duration,
    watch: Duration,
    out: Arc<Mutex<Collected>>,
) {
    let start = Instant::now();
    while start.elapsed() < watch {
        match ask(&api, &prefix, device).await {
            Some(a) => out.lock().takeover_samples.push(a),
            None => out.lock().api_errors += 1,
        }
        sleep(poll).await;
    }
}

/// Runs the scenario; returns its report and the simulator's.
pub async fn run(args: &PresenceArgs) -> anyhow::Result<(BenchReport<PresenceResults>, SimReport)> {
    anyhow::ensure!(args.devices >= 1, "--devices must be at least 1");
    let plan = StackPlan::full(args.ingests.max(1))
        .with_env("IOT_POLICY_TCP_DOWN_PENALTY", args.tcp_down_penalty)
        .with_env(
            "IOT_POLICY_TCP_DOWN_WINDOW",
            humantime::format_duration(args.tcp_down_window),
        );
    let stack = Stack::start(&args.stack, &plan).await?;
    let prefix = run_prefix("pr");
    let config = SimConfig {
        targets: stack.mqtt_targets(),
        devices: args.devices,
        prefix: prefix.clone(),
        connect_rate: 0.0,
        max_pending_connects: args.sim.max_pending_connects,
        keepalive: (args.ping_interval * 4).max(Duration::from_secs(60)),
        ping_interval: Some(args.ping_interval),
        flap_fraction: args.flap_fraction,
        flap_every: args.flap_every,
        flap_downtime: args.flap_downtime,
        flap_mode: DropMode::Close,
        takeover_fraction: args.takeover_fraction,
        takeover_every: args.takeover_every,
        retry_delay: Duration::from_millis(500),
        duration: args.duration + Duration::from_secs(120),
        end: EndMode::Clean,
        devices_per_worker: args.sim.devices_per_worker,
        worker_exe: args.sim.worker_exe.clone(),
        ..SimConfig::default()
    };
    let (tap, mut feed) =
        TruthTap::new(&[TruthKind::Dropped, TruthKind::TakeoverConnected], 65_536);
    let handle = sim::start_with_tap(config, Some(tap.clone())).await?;
    let printer = progress_printer(&handle, args.sim.quiet);
    let api = Arc::new(ApiClient::new(
        stack.api()?.addr(),
        crate::stack::READ_TOKEN,
        crate::stack::WRITE_TOKEN,
    ));
    let collected = Arc::new(Mutex::new(Collected::default()));
    let measured = async {
        wait_connected(&handle, u64::from(args.devices), Duration::from_secs(60)).await?;
        // Let the connects reach the views before judging anything.
        sleep(args.tolerance).await;
        // Records from before the measurement are not ours to poll.
        while feed.try_recv().is_ok() {}
        let start_ms = iot_core::time::now_ms();
        let stop = CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();
        // Random questions.
        {
            let api = api.clone();
            let prefix = prefix.clone();
            let out = collected.clone();
            let stop = stop.clone();
            let rate = args.sample_rate.max(0.0);
            let n = args.devices;
            tasks.spawn(async move {
                if rate <= 0.0 {
                    return;
                }
                let every = Duration::from_secs_f64(1.0 / rate);
                let mut rng = SplitMix64::new(7, 7);
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                let inflight = Arc::new(tokio::sync::Semaphore::new(32));
                while !stop.is_cancelled() {
                    tick.tick().await;
                    let Ok(permit) = inflight.clone().try_acquire_owned() else {
                        continue;
                    };
                    let device = (rng.next_u64() % u64::from(n)) as u32;
                    let (api, prefix, out) = (api.clone(), prefix.clone(), out.clone());
                    tokio::spawn(async move {
                        match ask(&api, &prefix, device).await {
                            Some(a) => out.lock().samples.push(a),
                            None => out.lock().api_errors += 1,
                        }
                        drop(permit);
                    });
                }
            });
        }
        let deadline = Instant::now() + args.duration;
        loop {
            let rec = tokio::select! {
                r = feed.recv() => r,
                _ = tokio::time::sleep_until(deadline) => None,
            };
            let Some(rec) = rec else { break };
            match rec.kind {
                TruthKind::Dropped => {
                    collected.lock().drops += 1;
                    tasks.spawn(detect(
                        api.clone(),
                        prefix.clone(),
                        rec,
                        args.poll_interval,
                        args.detect_limit,
                        collected.clone(),
                    ));
                }
                TruthKind::TakeoverConnected => {
                    collected.lock().takeovers += 1;
                    tasks.spawn(watch_takeover(
                        api.clone(),
                        prefix.clone(),
                        rec.device,
                        args.takeover_poll,
                        args.takeover_watch,
                        collected.clone(),
                    ));
                }
                _ => {}
            }
        }
        stop.cancel();
        // Detections and watches started before the end finish.
        while tasks.join_next().await.is_some() {}
        let duration_s = (iot_core::time::now_ms() - start_ms) as f64 / 1000.0;
        anyhow::Ok(duration_s)
    }
    .await;
    handle.stop();
    let sim_outcome = handle.finish().await;
    crate::scenario::explain_failure(&measured, &sim_outcome);
    if let Some(p) = printer {
        let _ = p.await;
    }
    stack.stop().await;
    let duration_s = measured?;
    let outcome = sim_outcome?;
    let c = std::mem::take(&mut *collected.lock());
    let window_ms = i64::try_from(args.tcp_down_window.as_millis()).unwrap_or(i64::MAX);
    let tolerance_ms = i64::try_from(args.tolerance.as_millis()).unwrap_or(i64::MAX);
    let timelines = timelines(&outcome.truth);
    let judge_all = |answers: &[Answer]| {
        let mut j = Judged::default();
        for a in answers {
            let t = timelines.get(&a.device).map(Vec::as_slice).unwrap_or(&[]);
            j.add(a, judge(a, t, window_ms, tolerance_ms));
        }
        j
    };
    let results = PresenceResults {
        devices: args.devices,
        ingests: args.ingests.max(1),
        tcp_down_penalty: args.tcp_down_penalty,
        tcp_down_window_s: args.tcp_down_window.as_secs_f64(),
        duration_s,
        drops: c.drops,
        detected: c.detected,
        missed: c.missed,
        detection_latency: c.detection.summary(),
        detected_after_1s: c.after_1s,
        sampled: judge_all(&c.samples),
        takeovers: c.takeovers,
        during_takeovers: judge_all(&c.takeover_samples),
        tap_overflow: tap.dropped(),
        api_errors: c.api_errors,
    };
    Ok((BenchReport::new("presence", results), outcome.report))
}

/// Each device's records in time order.
fn timelines(truth: &GroundTruth) -> HashMap<u32, Vec<TruthRecord>> {
    let mut out: HashMap<u32, Vec<TruthRecord>> = HashMap::new();
    for r in truth.records() {
        out.entry(r.device).or_default().push(*r);
    }
    for v in out.values_mut() {
        v.sort_by_key(|r| r.at_ms);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(at_ms: i64, kind: TruthKind) -> TruthRecord {
        TruthRecord {
            at_ms,
            device: 1,
            conn: 1,
            kind,
        }
    }

    fn answer(asked_ms: i64, online: bool) -> Answer {
        Answer {
            device: 1,
            asked_ms,
            answered_ms: asked_ms + 5,
            online,
        }
    }

    const W: i64 = 5_000;
    const TOL: i64 = 1_000;

    #[test]
    fn connected_devices_must_be_online() {
        let t = [rec(0, TruthKind::Connected)];
        assert_eq!(
            judge(&answer(2_000, true), &t, W, TOL),
            Verdict::RightOnline
        );
        assert_eq!(
            judge(&answer(2_000, false), &t, W, TOL),
            Verdict::FalseOffline
        );
        // Too soon after the connect.
        assert_eq!(judge(&answer(500, false), &t, W, TOL), Verdict::Unjudged);
    }

    #[test]
    fn dropped_devices_must_be_offline_while_penalised() {
        let t = [
            rec(0, TruthKind::Connected),
            rec(10_000, TruthKind::Dropped),
            rec(12_000, TruthKind::Connected),
        ];
        assert_eq!(
            judge(&answer(11_100, false), &t, W, TOL),
            Verdict::RightOffline
        );
        assert_eq!(
            judge(&answer(11_100, true), &t, W, TOL),
            Verdict::FalseOnline
        );
        // Within the tolerance after the drop: not judged.
        assert_eq!(judge(&answer(10_500, true), &t, W, TOL), Verdict::Unjudged);
        // Reconnected but still penalised: offline is right, not judged.
        assert_eq!(judge(&answer(14_000, false), &t, W, TOL), Verdict::Unjudged);
        // Penalty over (plus tolerance): online again.
        assert_eq!(
            judge(&answer(16_100, true), &t, W, TOL),
            Verdict::RightOnline
        );
        assert_eq!(
            judge(&answer(16_100, false), &t, W, TOL),
            Verdict::FalseOffline
        );
    }

    #[test]
    fn away_past_the_window_is_not_judged_and_takeovers_are_not_drops() {
        let t = [rec(0, TruthKind::Connected), rec(1_000, TruthKind::Dropped)];
        assert_eq!(judge(&answer(20_000, true), &t, W, TOL), Verdict::Unjudged);
        let t = [
            rec(0, TruthKind::Connected),
            rec(5_000, TruthKind::TakeoverConnected),
            rec(5_002, TruthKind::TakenOver),
        ];
        assert_eq!(
            judge(&answer(5_001, false), &t, W, TOL),
            Verdict::FalseOffline
        );
        assert_eq!(
            judge(&answer(5_010, true), &t, W, TOL),
            Verdict::RightOnline
        );
    }
}
