//! Events applied per second by one and by two `iot-projector` processes on
//! this machine. Ignored by default (it takes a while); run it with
//!
//! ```text
//! cargo test --release -p projector --test throughput -- --ignored --nocapture
//! ```
//!
//! `PROJ_BENCH_DEVICES` (default 20000) and `PROJ_BENCH_ROUNDS` (default 15)
//! size the workload: mostly heartbeat batches of 50 devices, plus connects,
//! uplinks, ACKs, ACK timeouts, drops, reconnects and disconnects. The whole
//! workload is injected first, then the projectors are started and timed
//! until the group has nothing pending or undelivered. Redis CPU time per
//! event is read from INFO CPU, and the top Redis commands are printed.
//!
//! How heartbeats are applied (see `projector::projection`): per shard and
//! batch, one `ZADD GT` into the seen set and one `HMGET` of the bound hash
//! (no function call); only heartbeats of devices not online at an epoch at
//! least theirs take the device function (and one more round trip for
//! their seen scores). The due evaluation folds the seen scores into the
//! views once per heartbeat timeout and device. Uplinks and ACKs take the
//! device function's short path; connects, drops, disconnects and ACK
//! timeouts its full merge, each followed by an index update. This workload
//! has far more full merges than real traffic (a fifth of its events), and
//! its timeout (10 min) is longer than the run, so no device is due.
//!
//! Measured 2026-12-07 on the 2-core development machine (Redis 7.0.15,
//! 16 shards, 348,858 events: 20,000 devices, about 82% heartbeats in
//! batches of 50), release build of commit 37cb1a9, three runs, median
//! (the figures are also in BENCHMARKS.md):
//!
//! | projectors | events/s | Redis CPU per event | before the seen set (2026-11-26) |
//! |-----------:|---------:|--------------------:|---------------------------------:|
//! | 1          | 130,371  | 6.01 µs             | 85,500 (8.9 µs)                  |
//! | 2          | 150,565  | 5.90 µs             | 74,800 (10.3 µs)                 |
//!
//! Redis is the bottleneck (the device function's full merges of the
//! workload's many connects, drops and ACK timeouts: `FCALL` is 16 µs per
//! call); a second projector on the same two cores adds a little by
//! overlapping its round trips with the first one's.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use iot_core::Keys;
use iot_test_support::{RedisServer, ServiceProcess, free_port, unique_prefix};

const SHARDS: u16 = 16;
const BIN: &str = env!("CARGO_BIN_EXE_iot-projector");

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn redis_cpu(conn: &mut redis::aio::ConnectionManager) -> f64 {
    let info: String = redis::cmd("INFO")
        .arg("CPU")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .filter(|l| l.starts_with("used_cpu_sys:") || l.starts_with("used_cpu_user:"))
        .filter_map(|l| l.split(':').nth(1)?.trim().parse::<f64>().ok())
        .sum()
}

async fn measure(
    redis: &RedisServer,
    projectors: usize,
    devices: usize,
    rounds: usize,
) -> (u64, Duration, f64) {
    let prefix = unique_prefix();
    let keys = Keys::new(prefix.clone()).unwrap();
    let mut conn = connect(&redis.url()).await;
    let (entries, events) = workload("tp-", devices, rounds, iot_core::time::now_ms() - 60_000);
    inject(&mut conn, &keys, SHARDS, &entries).await;
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut conn)
        .await
        .unwrap();
    let cpu0 = redis_cpu(&mut conn).await;
    let mut procs = Vec::new();
    let mut https = Vec::new();
    for i in 0..projectors {
        let http = format!("127.0.0.1:{}", free_port());
        let env = process_env(&redis.url(), &prefix, SHARDS, &http, &format!("bench-{i}"));
        let env_ref: Vec<(&str, &str)> =
            env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        procs.push(ServiceProcess::spawn(BIN, &[], &env_ref));
        https.push(http);
    }
    let started = Instant::now();
    for (p, http) in procs.iter_mut().zip(&https) {
        p.wait_http_ok(http, "/health/live", Duration::from_secs(30));
    }
    caught_up(&mut conn, &keys, SHARDS, Duration::from_secs(600)).await;
    let took = started.elapsed();
    let cpu = redis_cpu(&mut conn).await - cpu0;
    let stats: String = redis::cmd("INFO")
        .arg("COMMANDSTATS")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut rows: Vec<(f64, String)> = stats
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let usec: f64 = rest
                .split(',')
                .find_map(|kv| kv.strip_prefix("usec="))?
                .parse()
                .ok()?;
            Some((usec, format!("{name}: {rest}")))
        })
        .collect();
    rows.sort_by(|a, b| b.0.total_cmp(&a.0));
    for (_, row) in rows.iter().take(8) {
        println!("  {row}");
    }
    for mut p in procs {
        p.terminate();
        p.wait_exit(Duration::from_secs(15));
    }
    assert_eq!(all_views(&mut conn, &keys).await.len(), devices);
    (events, took, cpu)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run with --ignored --nocapture (release build recommended)"]
async fn events_applied_per_second() {
    let devices = env_usize("PROJ_BENCH_DEVICES", 20_000);
    let rounds = env_usize("PROJ_BENCH_ROUNDS", 15);
    let redis = RedisServer::start();
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    for n in [1, 2] {
        let (events, took, cpu) = measure(&redis, n, devices, rounds).await;
        println!(
            "{profile}: {n} projector(s): {events} events in {:.2} s = {:.0} events/s; Redis CPU {:.2} s = {:.2} us/event",
            took.as_secs_f64(),
            events as f64 / took.as_secs_f64(),
            cpu,
            cpu * 1e6 / events as f64,
        );
    }
}
