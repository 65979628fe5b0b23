//! A reusable measurement of requests per second and latency percentiles of
//! `GET /api/devices/{phyID}` and `GET /api/devices/online` over real HTTP,
//! against a private Redis holding 10,000 online devices.
//!
//! Ignored by default; run it on a release build:
//!
//! ```text
//! cargo test -p api --release --test bench -- --ignored --nocapture
//! ```
//!
//! `BENCH_SECONDS` (default 10) and `BENCH_CONNECTIONS` (default 32) tune it.
//! The in-process client (reqwest) shares the cores with the api and Redis,
//! so its numbers are a floor. When `wrk` is installed (`apt-get install
//! wrk`), the same two routes are then measured with it too (2 threads, the
//! same connections; one device for the per-device route), which costs the
//! machine less per request.
//!
//! # Measured on this machine
//!
//! 2 cores shared by the client, the api and redis-server; 10,000 online
//! devices in 16 shards; release build; 10 s per run.
//!
//! | route | client | connections | req/s | p50 | p99 |
//! | --- | --- | --- | --- | --- | --- |
//! | `GET /api/devices/{phyID}` | reqwest (in process) | 32 | 11,573 | 2.33 ms | 8.98 ms |
//! | `GET /api/devices/{phyID}` | wrk | 32 | 12,925 | 1.96 ms | 25.5 ms |
//! | `GET /api/devices/{phyID}` | reqwest (in process) | 4 | 12,755 | 0.27 ms | 1.42 ms |
//! | `GET /api/devices/online?limit=100` | reqwest (in process) | 32 | 1,611 | 18.7 ms | 39.3 ms |
//! | `GET /api/devices/online?limit=100` | wrk | 32 | 2,068 | 14.2 ms | 42.3 ms |
//! | `GET /api/devices/online?limit=100` | reqwest (in process) | 4 | 1,619 | 2.08 ms | 9.10 ms |
//!
//! A device answer is one Redis round trip (view and lag pipelined); a page
//! of 100 is two or three (about 120 Redis commands, ~19 KB of JSON), so
//! the list is bound by Redis and serialisation, not by round trips.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use hdrhistogram::Histogram;
use iot_core::time::now_ms;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Result {
    requests: u64,
    errors: u64,
    elapsed: Duration,
    hist: Histogram<u64>,
}

async fn load(api: &TestApi, paths: Arc<Vec<String>>, connections: u64, seconds: u64) -> Result {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..connections {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(1)
            .build()
            .expect("client");
        let base = api.url("");
        let paths = paths.clone();
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
            let (mut n, mut errors) = (0u64, 0u64);
            let mut i = c as usize;
            while Instant::now() < deadline {
                let url = format!("{base}{}", paths[i % paths.len()]);
                i += connections as usize;
                let t = Instant::now();
                match client.get(&url).bearer_auth(READ).send().await {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                    }
                    _ => errors += 1,
                }
                hist.saturating_record(t.elapsed().as_micros() as u64);
                n += 1;
            }
            (n, errors, hist)
        }));
    }
    let mut total = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    let (mut requests, mut errors) = (0, 0);
    for t in tasks {
        let (n, e, h) = t.await.expect("worker");
        requests += n;
        errors += e;
        total.add(h).expect("merge");
    }
    Result {
        requests,
        errors,
        elapsed: start.elapsed(),
        hist: total,
    }
}

fn report(name: &str, r: &Result) {
    let ms = |q: f64| r.hist.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "{name}: {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms ({} requests, {} errors, {:.1} s)",
        r.requests as f64 / r.elapsed.as_secs_f64(),
        ms(0.5),
        ms(0.99),
        ms(0.999),
        r.hist.max() as f64 / 1000.0,
        r.requests,
        r.errors,
        r.elapsed.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "measurement; run with --release -- --ignored --nocapture"]
async fn measure_device_and_online_list_throughput() {
    let seconds = env_or("BENCH_SECONDS", 10);
    let connections = env_or("BENCH_CONNECTIONS", 32);
    let api = TestApi::start().await;
    let mut seed = api.seeder().await;
    let devices = seed
        .online_devices("bench-", 10_000, &srv("ingest-a"), now_ms())
        .await;

    let device_paths: Vec<String> = devices
        .iter()
        .map(|p| format!("/api/devices/{p}"))
        .collect();
    let r = load(&api, Arc::new(device_paths), connections, seconds).await;
    report("GET /api/devices/{phyID}", &r);
    assert_eq!(r.errors, 0);
    assert!(r.requests > 0);

    let list = vec!["/api/devices/online?limit=100".to_owned()];
    let r = load(&api, Arc::new(list), connections, seconds).await;
    report("GET /api/devices/online?limit=100", &r);
    assert_eq!(r.errors, 0);

    for path in [
        format!("/api/devices/{}", devices[4242]),
        "/api/devices/online?limit=100".to_owned(),
    ] {
        wrk(&api.url(&path), connections, seconds).await;
    }
    api.stop().await;
}

/// Runs `wrk` against `url` if it is installed, and prints its summary.
async fn wrk(url: &str, connections: u64, seconds: u64) {
    let out = tokio::process::Command::new("wrk")
        .args([
            "-t2",
            &format!("-c{connections}"),
            &format!("-d{seconds}s"),
            "--latency",
        ])
        .args(["-H", &format!("Authorization: Bearer {READ}")])
        .arg(url)
        .output()
        .await;
    match out {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout);
            println!("wrk {url}:");
            for line in text.lines().filter(|l| {
                let l = l.trim_start();
                l.starts_with("Latency")
                    || l.starts_with("50%")
                    || l.starts_with("99%")
                    || l.starts_with("Requests/sec")
                    || l.starts_with("Non-2xx")
                    || l.contains("requests in")
            }) {
                println!("  {}", line.trim());
            }
            assert!(!text.contains("Non-2xx"), "wrk saw errors:\n{text}");
        }
        Ok(o) => println!("wrk failed: {}", String::from_utf8_lossy(&o.stderr)),
        Err(e) => println!("wrk not run ({e}); apt-get install wrk to compare"),
    }
}
