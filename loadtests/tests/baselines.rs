//! Smoke tests of the baselines: tiny sizes, a second or two each, against
//! private servers; the figures must make sense.

mod common;

use std::path::PathBuf;
use std::process::Command;

use clap::Parser;
use iot_test_support::RedisServer;
use loadtests::baseline::count_scan;
use loadtests::baseline::idle_connections::{self, IdleArgs};
use loadtests::baseline::seed_heartbeat::{self, Client, SeedHeartbeatArgs};
use loadtests::bench_cli::BenchCommand;

/// Parses `iot-bench` arguments the way the binary does, so the tests use
/// the documented defaults.
#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: BenchCommand,
}

fn parse(args: &[&str]) -> BenchCommand {
    let mut argv = vec!["iot-bench"];
    argv.extend_from_slice(args);
    Cli::try_parse_from(argv).expect("arguments").command
}

fn dbsize(redis: &RedisServer) -> String {
    redis.cli().raw(&["DBSIZE"])
}

#[tokio::test]
async fn seed_heartbeat_measures_throughput_and_redis_cpu() {
    let redis = RedisServer::start();
    let BenchCommand::SeedHeartbeat(args) = parse(&[
        "seed-heartbeat",
        "--redis-url",
        &redis.url(),
        "--clients",
        "4",
        "--devices",
        "50",
        "--duration",
        "1s",
    ]) else {
        unreachable!("parsed as seed-heartbeat")
    };
    let report = seed_heartbeat::run(&args).await.expect("run");
    let r = &report.results;
    assert_eq!(report.bench, "seed-heartbeat");
    assert!(r.heartbeats > 100, "{r:?}");
    assert_eq!(r.errors, 0);
    assert_eq!(r.latency.count, r.heartbeats);
    assert!(r.latency.p50_ms > 0.0 && r.latency.p99_ms >= r.latency.p50_ms);
    assert!(r.heartbeats_per_s > 0.0);
    assert!(
        r.redis_cpu_s > 0.0 && r.redis_cpu_us_per_heartbeat > 0.0,
        "{r:?}"
    );
    assert!(r.elapsed_s >= 1.0 && r.elapsed_s < 5.0);
    assert!(!r.redis_version.is_empty());
    // On a given server it cleans up after itself.
    assert_eq!(dbsize(&redis), ":0\r\n");

    // The same through the redis crate's client.
    let args = SeedHeartbeatArgs {
        client: Client::RedisRs,
        ..args
    };
    let r = seed_heartbeat::run(&args).await.expect("run").results;
    assert!(r.heartbeats > 100 && r.errors == 0, "{r:?}");
    assert_eq!(r.client, Client::RedisRs);
}

#[test]
fn seed_heartbeat_is_one_command_with_its_own_redis() {
    // Through the binary, with its own private redis-server: one command.
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("seed.json");
    let out = Command::new(common::iot_bench())
        .args(["seed-heartbeat", "--clients", "2", "--devices", "10"])
        .args(["--duration", "500ms", "--report"])
        .arg(&path)
        .output()
        .expect("run iot-bench");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("heartbeats/s"));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("report")).expect("json");
    assert_eq!(report["bench"], "seed-heartbeat");
    assert!(report["machine"]["cores"].as_u64().expect("cores") >= 1);
    assert!(
        report["command"]
            .as_str()
            .expect("command")
            .contains("seed-heartbeat")
    );
    assert!(
        report["results"]["heartbeats"]
            .as_u64()
            .expect("heartbeats")
            > 0
    );
}

#[tokio::test]
async fn count_scan_counts_agree_and_ours_needs_one_round_trip() {
    let redis = RedisServer::start();
    let BenchCommand::CountScan(args) = parse(&[
        "count-scan",
        "--redis-url",
        &redis.url(),
        "--sizes",
        "300,1500",
        "--repeat",
        "2",
        "--scan-count",
        "100",
    ]) else {
        unreachable!("parsed as count-scan")
    };
    let report = count_scan::run(&args).await.expect("run");
    let sizes = &report.results.sizes;
    assert_eq!(sizes.len(), 2);
    for s in sizes {
        assert!(s.counts_agree, "{s:?}");
        assert!(s.online_expected > 0 && s.online_expected < u64::from(s.sessions));
        assert_eq!(s.ours_zcard.round_trips, 1);
        // One GET per session plus the SCAN calls.
        assert!(s.seed_scan_get.round_trips > u64::from(s.sessions), "{s:?}");
        assert!(s.seed_scan_mget.round_trips < s.seed_scan_get.round_trips);
        assert!(s.seed_scan_get.median_ms > 0.0 && s.ours_zcard.median_ms > 0.0);
        assert!(s.ratio_scan_get > 1.0, "{s:?}");
    }
    assert_eq!(sizes[1].sessions, 1500);
    assert!(sizes[1].online_expected > sizes[0].online_expected);
    // Our keys are gone from the given server.
    assert_eq!(dbsize(&redis), ":0\r\n");
}

fn idle_args(args: &[&str]) -> IdleArgs {
    let mut argv = vec!["mosquitto-idle", "--settle", "200ms", "--quiet"];
    argv.extend_from_slice(args);
    let BenchCommand::MosquittoIdle(a) = parse(&argv) else {
        unreachable!("parsed as mosquitto-idle")
    };
    IdleArgs {
        worker_exe: Some(PathBuf::from(common::iot_sim())),
        ..a
    }
}

#[tokio::test]
async fn mosquitto_idle_measures_connect_rate_and_memory() {
    if common::mosquitto().await.is_none() {
        return;
    }
    let args = idle_args(&["-n", "300"]);
    let (report, sim) = idle_connections::run(&args).await.expect("run");
    let r = &report.results;
    assert!(r.server.starts_with("mosquitto"), "{r:?}");
    assert_eq!(r.connected, 300, "{}", sim.summary());
    assert!(r.connect_rate_per_s > 0.0);
    assert!(r.time_to_all_connected_s.is_some());
    assert_eq!(r.connect_latency.count, 300);
    assert!(r.connect_latency.p99_ms > 0.0);
    let (before, after) = (
        r.rss_before_kib.expect("rss"),
        r.rss_after_kib.expect("rss"),
    );
    assert!(before > 0 && after >= before, "{r:?}");
    assert!(r.rss_per_connection_kib.is_some());
    // The connections were idle: no pings.
    assert_eq!(sim.counts.pings_sent, 0);
}

#[tokio::test]
async fn idle_measurement_accepts_any_target_and_pid() {
    let Some(broker) = common::mosquitto().await else {
        return;
    };
    let pid = broker.pid().to_string();
    let args = idle_args(&["-n", "100", "--target", &broker.addr(), "--pid", &pid]);
    let (report, _) = idle_connections::run(&args).await.expect("run");
    let r = &report.results;
    assert_eq!(r.server, "external");
    assert_eq!(r.pids, vec![broker.pid()]);
    assert_eq!(r.connected, 100);
    assert!(r.rss_after_kib.is_some());
    assert!(r.server_cpu_s.is_some());
    // Without a pid: connect figures only.
    let args = idle_args(&[
        "-n",
        "50",
        "--target",
        &broker.addr(),
        "--connect-limit",
        "10s",
    ]);
    let (report, _) = idle_connections::run(&args).await.expect("run");
    assert_eq!(report.results.connected, 50);
    assert_eq!(report.results.rss_per_connection_kib, None);
}
