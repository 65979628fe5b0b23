//! Archive throughput: rows per second the archiver writes into PostgreSQL.
//!
//! It fills 8 event shards of a private redis-server with single events
//! (connected / uplink / tcp_down) and with heartbeat batches, then lets one
//! archiver (batches of 512 entries) consume everything into a fresh
//! database on the local PostgreSQL and reports rows per second for each.
//! The clock starts when the archiver starts (filling Redis is not timed)
//! and stops when `count(*)` of `events` reaches the rows written.
//!
//! # Running the measurement
//!
//! Ignored by default (it takes tens of seconds). On a quiet machine (no
//! other build or test running: the 2 cores are shared), from the
//! workspace root:
//!
//! ```text
//! export CARGO_PROFILE_DEV_DEBUG=line-tables-only   # only matters for debug builds
//! cargo test --release -p iot-store --test throughput -- --ignored --nocapture --test-threads=1
//! ```
//!
//! Needs `redis-server` on the PATH (or `REDIS_SERVER_BIN`) and PostgreSQL
//! on `127.0.0.1:5432` with trust auth (or `TEST_DATABASE_URL` pointing at
//! a server where the test may create and drop a database). Always use
//! `--release`: a debug build measures the archiver's own code, not
//! PostgreSQL. Each case prints one line:
//!
//! ```text
//! single events (connected/uplink/tcp_down): 100000 rows from 100000 stream entries in N s = R rows/s (E entries/s)
//! heartbeat batches of 100: 300000 rows from 3000 stream entries in N s = R rows/s (E entries/s)
//! ```
//!
//! Record both `rows/s` figures, with the machine, the PostgreSQL version
//! (`psql --version`) and the commit, in BENCHMARKS.md; run it two or three
//! times and give the median (the first run also creates the day
//! partitions and warms PostgreSQL's cache).
//!
//! Measured 2026-12-07 on the 2-core development machine (PostgreSQL 15.20,
//! Redis 7.0.15, release build of commit 37cb1a9), median of three runs:
//! single events 48,366 rows/s (45,566-50,889), heartbeat batches of 100
//! 118,055 rows/s (116,832-123,808).

use std::time::{Duration, Instant};

use iot_core::event::{ENTRY_FIELD, Entry, Event, EventKind, Heartbeat, HeartbeatBatch};
use iot_core::keys::Keys;
use iot_core::{PhyId, ServerId};
use iot_service::health::Health;
use iot_service::redis::RedisPool;
use iot_store::Store;
use iot_store::archiver::{self, ArchiverOptions};
use iot_test_support::{RedisServer, TestDb, eventually};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const SHARDS: u16 = 8;

async fn fill(pool: &RedisPool, entries: usize, batch: usize) -> u64 {
    let keys = Keys::default();
    let server = ServerId::new("srv-1").expect("id");
    let mut rows = 0u64;
    let mut conn = pool.get();
    let now = iot_core::time::now_ms();
    for chunk in (0..entries).collect::<Vec<_>>().chunks(1000) {
        let mut pipe = redis::pipe();
        for &i in chunk {
            let entry = if batch > 1 {
                Entry::Heartbeats(HeartbeatBatch {
                    server_id: server.clone(),
                    beats: (0..batch)
                        .map(|j| Heartbeat {
                            phy_id: PhyId::new(format!("d-{}", i * batch + j)).expect("phy"),
                            conn_id: Uuid::from_u128((i * batch + j) as u128),
                            epoch: 1,
                            ts_ms: now,
                        })
                        .collect(),
                })
            } else {
                Entry::Event(Event {
                    phy_id: PhyId::new(format!("d-{i}")).expect("phy"),
                    conn_id: Uuid::from_u128(i as u128),
                    server_id: server.clone(),
                    epoch: 1,
                    ts_ms: now,
                    kind: match i % 3 {
                        0 => EventKind::Connected {
                            keepalive_secs: 30,
                            peer: "127.0.0.1:1".into(),
                        },
                        1 => EventKind::Uplink {
                            topic: format!("devices/d-{i}/up/t"),
                            qos: 1,
                            payload: vec![7; 64],
                        },
                        _ => EventKind::TcpDown {
                            reason: iot_core::TcpDownReason::Closed,
                        },
                    },
                })
            };
            rows += batch as u64;
            pipe.cmd("XADD")
                .arg(keys.events((i % SHARDS as usize) as u16))
                .arg("*")
                .arg(ENTRY_FIELD)
                .arg(entry.encode())
                .ignore();
        }
        pipe.query_async::<()>(&mut conn).await.expect("XADD");
    }
    rows
}

async fn measure(label: &str, entries: usize, batch: usize) {
    let redis = RedisServer::start();
    let db = TestDb::create().await;
    let cfg = iot_core::config::DatabaseConfig {
        url: db.url().to_owned(),
        ..Default::default()
    };
    let store = Store::connect(&cfg).await.expect("store");
    store.migrate().await.expect("migrate");
    let pool = RedisPool::connect(&iot_core::config::RedisConfig {
        url: redis.url(),
        min_idle_conns: 2,
        ..Default::default()
    })
    .await
    .expect("redis");
    let rows = fill(&pool, entries, batch).await;
    let token = CancellationToken::new();
    let started = Instant::now();
    let task = tokio::spawn(archiver::run(
        pool.clone(),
        store.clone(),
        Health::default(),
        ArchiverOptions {
            keys: Keys::default(),
            shards: SHARDS,
            consumer: "bench".into(),
            batch: 512,
            block: Duration::from_millis(50),
            claim_idle: Duration::from_secs(30),
            maintenance_interval: Duration::from_secs(5),
        },
        token.clone(),
    ));
    eventually(Duration::from_secs(600), "everything archived", || async {
        let n = store.count_events().await.map_err(|e| e.to_string())? as u64;
        if n >= rows {
            Ok(())
        } else {
            Err(format!("{n} of {rows}"))
        }
    })
    .await;
    let took = started.elapsed();
    token.cancel();
    task.await.expect("archiver");
    println!(
        "{label}: {rows} rows from {entries} stream entries in {:.2}s = {:.0} rows/s ({:.0} entries/s)",
        took.as_secs_f64(),
        rows as f64 / took.as_secs_f64(),
        entries as f64 / took.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run with --ignored --nocapture"]
async fn archive_rows_per_second() {
    measure("single events (connected/uplink/tcp_down)", 100_000, 1).await;
    measure("heartbeat batches of 100", 3_000, 100).await;
}
