//! Quick capacity figures for the ingest binary on this machine: memory per
//! idle connection, CONNECTs per second and events written per second.
//! Not a benchmark (the load generator in `loadtests/` is); ignored by
//! default because it takes a while. Run:
//!
//! ```text
//! cargo build --release -p ingest
//! INGEST_BIN=target/release/iot-ingest CAPACITY_CONNECTIONS=10000 \
//!   cargo test -p ingest --test capacity -- --ignored --nocapture
//! ```
//!
//! `CAPACITY_SKIP_THROUGHPUT=1` measures the idle connections only.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use iot_mqtt::QoS;
use iot_test_support::{RedisServer, ServiceProcess, TestDevice, free_port, publish_packet};

/// CPU seconds (user + system) used so far by process `pid`.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("proc stat");
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run by hand (see the file's doc)"]
async fn idle_connection_memory_connect_rate_and_event_throughput() {
    let n: usize = std::env::var("CAPACITY_CONNECTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000);
    let bin =
        std::env::var("INGEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_iot-ingest").to_owned());
    let redis = RedisServer::start();
    let url = redis.url();
    let mqtt = format!("127.0.0.1:{}", free_port());
    let http = format!("127.0.0.1:{}", free_port());
    let svc = ServiceProcess::spawn(
        &bin,
        &[],
        &[
            ("REDIS_URL", url.as_str()),
            ("IOT_MQTT_LISTEN", mqtt.as_str()),
            ("IOT_HTTP_LISTEN", http.as_str()),
            ("SERVER_ID", "cap-1"),
            ("IOT_MQTT_CONNECT_RATE_PER_IP", "0"),
        ],
    );
    let h = http.clone();
    let svc = tokio::task::spawn_blocking(move || {
        let mut svc = svc;
        svc.wait_http_ok(&h, "/health", Duration::from_secs(30));
        svc
    })
    .await
    .unwrap();
    let pid = svc.pid();
    if let Some(line) = svc.stderr().lines().find(|l| l.contains("task_bytes")) {
        println!("{line}");
    }
    // Warm up allocator and runtime with a few connections.
    let mut warm = Vec::new();
    for i in 0..50 {
        warm.push(TestDevice::connected(&mqtt, &format!("warm-{i}"), 300).await);
    }
    drop(warm);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(pid);

    let started = Instant::now();
    let tasks = 64;
    let mut handles = Vec::new();
    for t in 0..tasks {
        let mqtt = mqtt.clone();
        handles.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            let mut i = t;
            while i < n {
                let id = format!("cap-{i}");
                mine.push((TestDevice::connected(&mqtt, &id, 300).await, id));
                i += tasks;
            }
            mine
        }));
    }
    let mut devices = Vec::with_capacity(n);
    for h in handles {
        devices.extend(h.await.unwrap());
    }
    let took = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib(pid);
    let per_conn = (after.saturating_sub(before)) as f64 * 1024.0 / n as f64;
    println!(
        "connections held: {n}; connect rate: {:.0}/s ({n} in {took:?}, 64 clients in parallel)",
        n as f64 / took.as_secs_f64()
    );
    println!("RSS before {before} KiB, after {after} KiB: {per_conn:.0} bytes per idle connection");
    let connections = common::metric(&http, "iot_ingest_connections").await;
    assert_eq!(connections as usize, n);

    if std::env::var_os("CAPACITY_SKIP_THROUGHPUT").is_some() {
        svc.terminate();
        let mut svc = svc;
        let status = tokio::task::spawn_blocking(move || svc.wait_exit(Duration::from_secs(60)))
            .await
            .unwrap();
        assert!(status.is_some_and(|s| s.success()));
        return;
    }

    // Throughput: 200 devices publish QoS 0 as fast as they can for 6 s;
    // the rate is read from the metric between seconds 1 and 5.
    let written = "iot_ingest_events_written_total{kind=\"uplink\"}";
    let mut pubs = Vec::new();
    for (mut d, id) in devices.drain(..200.min(n)) {
        pubs.push(tokio::spawn(async move {
            let packet = publish_packet(
                &format!("devices/{id}/up/x"),
                b"0123456789",
                QoS::AtMostOnce,
                0,
            );
            let mut out = bytes::BytesMut::new();
            for _ in 0..16 {
                packet.write(&mut out);
            }
            let end = Instant::now() + Duration::from_secs(6);
            while Instant::now() < end {
                d.send_raw(&out)
                    .await
                    .expect("the ingest keeps the publisher");
            }
            (d, id)
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let w0 = common::metric(&http, written).await;
    let redis_pid = redis.pid().expect("redis runs");
    let (c0, r0, me0) = (
        cpu_secs(pid),
        cpu_secs(redis_pid),
        cpu_secs(std::process::id()),
    );
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let w1 = common::metric(&http, written).await;
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "CPU over the window: ingest {:.2} s, redis {:.2} s, test clients {:.2} s",
        cpu_secs(pid) - c0,
        cpu_secs(redis_pid) - r0,
        cpu_secs(std::process::id()) - me0
    );
    println!(
        "events written: {:.0} uplinks in {secs:.1} s = {:.0} events/s (200 publishers on the same 2 cores)",
        w1 - w0,
        (w1 - w0) / secs
    );
    assert!(w1 > w0);
    for p in pubs {
        devices.push(p.await.unwrap());
    }
    let stopping = Instant::now();
    svc.terminate();
    let (status, svc) = tokio::task::spawn_blocking(move || {
        let mut svc = svc;
        (svc.wait_exit(Duration::from_secs(30)), svc)
    })
    .await
    .unwrap();
    println!("graceful shutdown under load took {:?}", stopping.elapsed());
    for line in svc
        .stderr()
        .lines()
        .rev()
        .take(8)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
    {
        println!("  {line}");
    }
    assert!(status.is_some_and(|s| s.success()));
    drop(devices);
}
