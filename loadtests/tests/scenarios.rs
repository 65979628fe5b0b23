//! Smoke tests of every scenario: small N, a few seconds each, against the
//! workspace's own service binaries (see `common::service_bin_dir`). They
//! check that each scenario runs end to end and that its report is sane
//! (counts add up, percentiles are there and ordered, the online count
//! equals N), so the tools cannot rot; the figures themselves are for
//! BENCHMARKS.md, measured with release builds.
//!
//! The scenarios run one at a time (each starts Redis, ingests, a projector
//! and an api on two cores).

mod common;

use std::path::PathBuf;

use clap::Parser;
use loadtests::bench_cli::BenchCommand;
use loadtests::histogram::LatencySummary;
use loadtests::scenario::{
    api_reads, connect_storm, downlinks, failover, ingest_idle, presence, steady_state,
};

/// One scenario at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: BenchCommand,
}

/// Parses `iot-bench` arguments (so the documented defaults are tested)
/// with the test's service binaries and simulator.
fn parse(args: &[&str]) -> BenchCommand {
    let dir = common::service_bin_dir();
    let mut argv = vec!["iot-bench"];
    argv.extend_from_slice(args);
    argv.extend_from_slice(&["--bin-dir", dir.to_str().expect("utf-8 path")]);
    if args[0] != "ingest-idle" {
        argv.push("--quiet");
    }
    Cli::try_parse_from(argv).expect("arguments").command
}

fn sim_exe() -> Option<PathBuf> {
    Some(PathBuf::from(common::iot_sim()))
}

fn sane(what: &str, l: &LatencySummary) {
    assert!(l.count > 0, "{what}: no samples");
    assert!(
        l.min_ms <= l.p50_ms && l.p50_ms <= l.p99_ms && l.p99_ms <= l.max_ms,
        "{what}: {l:?}"
    );
    assert!(!l.hdr.is_empty(), "{what}: no histogram");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_storm_counts_every_device_online() {
    let _one = SERIAL.lock().await;
    let BenchCommand::ConnectStorm(mut args) = parse(&[
        "connect-storm",
        "-n",
        "300",
        "--ingests",
        "2",
        "--hold",
        "2s",
        "--check-every",
        "500ms",
        "--ping-interval",
        "1s",
    ]) else {
        unreachable!("connect-storm")
    };
    args.sim.worker_exe = sim_exe();
    let (report, sim) = connect_storm::run(&args).await.expect("run");
    let r = &report.results;
    assert_eq!(report.bench, "connect-storm");
    assert_eq!((r.devices, r.ingests), (300, 2));
    assert!(r.count.exact, "{}", r.summary());
    assert_eq!(r.count.api_online, 300);
    assert!(r.count_exact && r.hold_mismatches == 0, "{}", r.summary());
    assert!(r.hold_checks.len() >= 2, "{:?}", r.hold_checks);
    assert!(
        r.hold_checks
            .iter()
            .all(|c| c.sim_connected == 300 && c.api_online == 300)
    );
    assert!(r.time_to_all_connected_s.is_some() && r.connect_rate_per_s > 0.0);
    assert!(r.time_to_api_count_s >= r.time_to_all_connected_s);
    sane("connect", &r.connect_latency);
    sane("stats", &r.stats_latency);
    assert_eq!(r.per_ingest.len(), 2);
    assert_eq!(r.per_ingest.iter().map(|i| i.connections).sum::<u64>(), 300);
    assert!(r.per_ingest.iter().all(|i| i.rss_after_kib > 0));
    assert!(
        r.connect_usage.cpu_s.contains_key("ingest"),
        "{:?}",
        r.connect_usage
    );
    assert!(r.hold_heartbeats_per_s > 0.0);
    assert_eq!(sim.counts.initial_connected, 300);
    // The capacity alias parses to the same scenario, with a computed
    // number of ingests.
    let BenchCommand::ConnectStorm(cap) = parse(&["capacity", "-n", "50000", "--ingests", "0"])
    else {
        unreachable!("capacity")
    };
    assert_eq!(cap.devices_per_ingest, 19_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_state_measures_the_pipeline_and_the_seed_side_by_side() {
    let _one = SERIAL.lock().await;
    let BenchCommand::SteadyState(mut args) = parse(&[
        "steady-state",
        "-n",
        "200",
        "--ping-interval",
        "200ms",
        "--warmup",
        "500ms",
        "--duration",
        "3s",
        "--probes",
        "5",
        "--probe-duration",
        "2s",
        "--probe-interval",
        "200ms",
        "--seed-duration",
        "1s",
        "--seed-clients",
        "4",
    ]) else {
        unreachable!("steady-state")
    };
    args.sim.worker_exe = sim_exe();
    let (report, _) = steady_state::run(&args).await.expect("run");
    let r = &report.results;
    let s = r.summary();
    assert!(r.window_s >= 3.0, "{s}");
    assert!((r.rates.offered_heartbeats - 1000.0).abs() < 1e-6);
    assert!(r.rates.pings_sent > 300.0, "{s}");
    assert!(
        r.rates.events_written > 0.0 && r.rates.xadd_calls > 0.0,
        "{s}"
    );
    assert!(r.rates.events_applied > 0.0, "{s}");
    let c = &r.cpu_per_heartbeat;
    assert!(
        c.redis_us > 0.0 && c.ingest_us > 0.0 && c.projector_us > 0.0,
        "{s}"
    );
    assert!(c.server_us >= c.redis_us, "{s}");
    let h = &r.heartbeat_to_view;
    assert_eq!(h.probes, 5);
    assert!(h.samples >= 20, "{s}");
    sane("heartbeat to view", &h.latency);
    let seed = r.comparison.seed.as_ref().expect("seed side by side");
    assert_eq!(seed.devices, 200);
    assert!(seed.heartbeats > 0 && seed.redis_cpu_us_per_heartbeat > 0.0);
    assert!(r.comparison.heartbeats_per_s_ratio > 0.0);
    assert!(r.comparison.redis_cpu_per_heartbeat_ratio > 0.0);
    assert!(r.comparison.ours_at_saturated_redis_per_s > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_detects_drops_and_judges_answers() {
    let _one = SERIAL.lock().await;
    let BenchCommand::Presence(mut args) = parse(&[
        "presence",
        "-n",
        "100",
        "--flap-fraction",
        "0.3",
        "--flap-every",
        "1s..2s",
        "--flap-downtime",
        "300ms..600ms",
        "--takeover-fraction",
        "0.2",
        "--takeover-every",
        "1s..2s",
        "--tcp-down-window",
        "2s",
        "--duration",
        "6s",
        "--sample-rate",
        "50",
        "--takeover-watch",
        "300ms",
    ]) else {
        unreachable!("presence")
    };
    args.sim.worker_exe = sim_exe();
    let (report, sim) = presence::run(&args).await.expect("run");
    let r = &report.results;
    let s = r.summary();
    assert!(r.drops > 0, "{s}");
    assert_eq!(r.detected + r.missed, r.drops, "{s}");
    assert!(r.detected > 0, "{s}");
    sane("detection", &r.detection_latency);
    assert_eq!(r.detection_latency.count, r.detected);
    assert!(r.sampled.answers > 50, "{s}");
    let j = &r.sampled;
    assert_eq!(
        j.answers,
        j.right_online + j.right_offline + j.false_offline + j.false_online + j.unjudged
    );
    assert!(j.right_online > 0, "{s}");
    assert!(r.takeovers > 0 && r.during_takeovers.answers > 0, "{s}");
    // A takeover is not a drop: never offline.
    assert_eq!(
        r.during_takeovers.false_offline, 0,
        "{s}\n{:?}",
        r.during_takeovers.examples
    );
    assert_eq!(r.tap_overflow, 0);
    assert!(sim.counts.takeovers > 0 && sim.disconnects.contains_key("flap"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_reads_runs_both_routes_at_a_rate_and_at_full_speed() {
    let _one = SERIAL.lock().await;
    let BenchCommand::ApiReads(mut args) = parse(&[
        "api-reads",
        "-n",
        "100",
        "--rate",
        "200",
        "--list-rate",
        "20",
        "--list-limit",
        "10",
        "--duration",
        "1s",
        "--connections",
        "4",
        "--max-connections",
        "4",
    ]) else {
        unreachable!("api-reads")
    };
    args.sim.worker_exe = sim_exe();
    let (report, _) = api_reads::run(&args).await.expect("run");
    let r = &report.results;
    assert_eq!(r.runs.len(), 4, "{}", r.summary());
    for run in &r.runs {
        let l = &run.load;
        assert!(l.ok > 10 && l.errors == 0, "{}: {l:?}", run.route);
        assert_eq!(l.latency.count, l.requests);
        sane(&run.route, &l.latency);
        assert!(run.api_cpu_us_per_request > 0.0, "{}", run.route);
    }
    // The fixed-rate runs kept (about) their rate and timed from the due
    // time; the full-speed ones did not.
    assert!(
        (150..=210).contains(&r.runs[0].load.requests),
        "{:?}",
        r.runs[0].load
    );
    assert_eq!(r.runs[0].load.corrected.count, r.runs[0].load.requests);
    assert_eq!(r.runs[2].load.corrected.count, 0);
    assert!(r.runs[1].route.contains("online?limit=10"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downlinks_submit_through_the_api_to_devices_on_another_ingest() {
    let _one = SERIAL.lock().await;
    let BenchCommand::Downlinks(mut args) = parse(&[
        "downlinks",
        "-n",
        "50",
        "--rate",
        "50",
        "--duration",
        "2s",
        "--connections",
        "8",
    ]) else {
        unreachable!("downlinks")
    };
    args.sim.worker_exe = sim_exe();
    let (report, _) = downlinks::run(&args).await.expect("run");
    let r = &report.results;
    let s = r.summary();
    assert!(r.load.requests >= 80, "{s}");
    assert_eq!(r.statuses.values().sum::<u64>(), r.load.requests, "{s}");
    assert!(!r.probe_status.is_empty());
    assert!(r.delivery_supported, "the probe command was not acked: {s}");
    if r.delivery_supported {
        // Every command acked, round trip measured, devices saw them.
        assert_eq!(r.mode, "poll");
        assert_eq!(
            r.statuses.get("acked").copied(),
            Some(r.load.requests),
            "{s}"
        );
        sane("round trip", &r.load.latency);
        assert!(r.devices_acked >= r.load.requests, "{s}");
    } else {
        // The ingest build does not deliver yet: the api side only.
        assert_eq!(r.mode, "submit_only", "{s}");
        assert!(r.load.ok > 0, "{s}");
        sane("submit", &r.load.latency);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_sees_the_killed_ingests_devices_go_and_come_back() {
    let _one = SERIAL.lock().await;
    let BenchCommand::Failover(mut args) = parse(&[
        "failover",
        "-n",
        "40",
        "--sample",
        "10",
        "--reconnect-delay",
        "8s",
        "--limit",
        "40s",
    ]) else {
        unreachable!("failover")
    };
    args.sim.worker_exe = sim_exe();
    let (report, sim) = failover::run(&args).await.expect("run");
    let r = &report.results;
    let s = r.summary();
    assert_eq!(r.devices_on_killed, 20);
    assert_eq!(r.sampled, 10, "{s}");
    assert_eq!((r.never_offline, r.not_back), (0, 0), "{s}");
    sane("offline", &r.offline_after_kill);
    sane("back", &r.online_again_after_kill);
    sane("back after reconnect", &r.online_again_after_reconnect);
    // Offline comes with the lapsed liveness key, not before.
    assert!(r.offline_after_kill.min_ms >= 1000.0, "{s}");
    assert!(r.online_again_after_kill.min_ms > r.offline_after_kill.min_ms);
    assert!(
        r.count_down_after_kill_s.is_some() && r.count_back_after_kill_s.is_some(),
        "{s}"
    );
    assert!(r.b_answers > 0 && r.b_false_offline == 0, "{s}");
    assert!(
        sim.disconnects.get("server_closed").copied().unwrap_or(0)
            + sim.disconnects.get("reset").copied().unwrap_or(0)
            >= 20
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_idle_compares_memory_and_connect_rate_with_mosquitto() {
    let _one = SERIAL.lock().await;
    let mosquitto = std::path::Path::new(loadtests::servers::MOSQUITTO_BIN).is_file();
    let mut argv = vec![
        "ingest-idle",
        "-n",
        "200",
        "--log-levels",
        "warn",
        "--settle",
        "200ms",
        "-q",
    ];
    if !mosquitto {
        eprintln!("NOTE: no Mosquitto installed; ingest figures only");
        argv.push("--no-mosquitto");
    }
    let BenchCommand::IngestIdle(mut args) = parse(&argv) else {
        unreachable!("ingest-idle")
    };
    args.worker_exe = sim_exe();
    let report = ingest_idle::run(&args).await.expect("run");
    let r = &report.results;
    assert_eq!(r.ingest.len(), 1);
    let i = &r.ingest[0];
    assert_eq!(i.log_level, "warn");
    assert_eq!(i.ingest.connected, 200, "{}", r.summary());
    assert!(i.ingest.rss_per_connection_kib.is_some());
    assert!(i.ingest.connect_rate_per_s > 0.0);
    sane("connect", &i.ingest.connect_latency);
    if mosquitto {
        assert_eq!(r.mosquitto.as_ref().map(|m| m.connected), Some(200));
        assert!(i.memory_ratio.is_some() && i.connect_rate_ratio.is_some());
    }
}
