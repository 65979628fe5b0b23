//! A Redis outage does not stop the projector: it logs, counts, backs off
//! and carries on once Redis is back (here empty, as after a crash without
//! persistence: the consumer group is created again).
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use iot_core::time::now_ms;
use iot_core::{Entry, Keys};
use iot_test_support::{RedisServer, eventually, unique_prefix};

const SHARDS: u16 = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projector_survives_a_redis_restart() {
    let mut redis = RedisServer::start();
    let prefix = unique_prefix();
    let keys = Keys::new(prefix.clone()).unwrap();
    let mut cfg = config(&redis.url(), &prefix, SHARDS);
    cfg.redis.read_timeout = Duration::from_millis(500);
    cfg.redis.write_timeout = Duration::from_millis(500);
    cfg.redis.dial_timeout = Duration::from_millis(500);
    let proj = start(cfg, "proj-o").await;
    let mut conn = connect(&redis.url()).await;
    inject(
        &mut conn,
        &keys,
        SHARDS,
        &[Entry::Event(ev("o-1", 1, "s", now_ms(), connected()))],
    )
    .await;
    caught_up(&mut conn, &keys, SHARDS, Duration::from_secs(10)).await;
    assert_eq!(view(&mut conn, &keys, "o-1").await["online"], "1");

    redis.stop();
    // Wait until the projector's loops have met the outage: errors of at
    // least two kinds of operation (the reads and the maintenance loops).
    let http = proj.http.to_string();
    eventually(Duration::from_secs(15), "redis errors counted", || {
        let http = http.clone();
        async move {
            let (_, metrics) =
                iot_test_support::http_get(&http, "/metrics").ok_or("no /metrics answer")?;
            let ops = metrics
                .lines()
                .filter(|l| l.starts_with("iot_projector_redis_errors_total{"))
                .count();
            if ops >= 2 {
                Ok(())
            } else {
                Err(format!("{ops} operations failed so far"))
            }
        }
    })
    .await;
    assert!(
        !proj.handle.is_finished(),
        "the projector must not exit on a Redis outage"
    );
    redis.start_again();

    let conn = connect(&redis.url()).await;
    eventually(
        Duration::from_secs(30),
        "o-2 projected after the restart",
        || {
            let mut conn = conn.clone();
            let keys = keys.clone();
            async move {
                // Keep injecting: the first entries may precede the new group.
                inject(
                    &mut conn,
                    &keys,
                    SHARDS,
                    &[Entry::Event(ev("o-2", 1, "s", now_ms(), connected()))],
                )
                .await;
                let v = view(&mut conn, &keys, "o-2").await;
                if v.get("online").map(String::as_str) == Some("1") {
                    Ok(())
                } else {
                    Err(v)
                }
            }
        },
    )
    .await;
    proj.stop().await;
}
