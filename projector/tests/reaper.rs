//! A lapsed ingest liveness key leads to tcp_down(server_lost) for every
//! live session of that instance, exactly once even with two projectors;
//! its connection set and registry entries are cleared; a live instance is
//! left alone.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use iot_core::time::now_ms;
use iot_core::{Entry, EventKind, Keys, TcpDownReason};
use iot_test_support::{RedisServer, eventually, unique_prefix};
use redis::AsyncCommands;
use redis::aio::ConnectionManager;

const SHARDS: u16 = 4;

async fn beat(conn: &mut ConnectionManager, keys: &Keys, server: &str, ttl_ms: u64) {
    let s = srv(server);
    let info = serde_json::json!({
        "server_id": server, "hostname": "test", "pid": 1, "mqtt_listen": "127.0.0.1:1883",
        "http_listen": "127.0.0.1:9100", "version": "0", "started_at_ms": 1,
        "last_beat_ms": now_ms(), "connections": 0, "status": "running"
    });
    redis::pipe()
        .cmd("SET")
        .arg(keys.liveness(&s))
        .arg("1")
        .arg("PX")
        .arg(ttl_ms)
        .ignore()
        .zadd(keys.server_beats(), server, now_ms())
        .ignore()
        .hset(keys.servers(), server, info.to_string())
        .ignore()
        .query_async::<()>(conn)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapsed_ingest_sessions_get_server_lost_exactly_once() {
    let redis = RedisServer::start();
    let prefix = unique_prefix();
    let keys = Keys::new(prefix.clone()).unwrap();
    let mut conn = connect(&redis.url()).await;
    let mut cfg = config(&redis.url(), &prefix, SHARDS);
    cfg.session.liveness_ttl = Duration::from_millis(1000);
    cfg.session.heartbeat_timeout = Duration::from_secs(60);
    let a = start(cfg.clone(), "proj-a").await;
    let b = start(cfg, "proj-b").await;

    // Two instances beat; ing-2 keeps beating throughout.
    beat(&mut conn, &keys, "ing-1", 1000).await;
    beat(&mut conn, &keys, "ing-2", 1000).await;
    let keeper = {
        let mut conn = conn.clone();
        let keys = keys.clone();
        tokio::spawn(async move {
            loop {
                beat(&mut conn, &keys, "ing-2", 1000).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let ing1_keeper = {
        let mut conn = conn.clone();
        let keys = keys.clone();
        tokio::spawn(async move {
            loop {
                beat(&mut conn, &keys, "ing-1", 1000).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let t = now_ms();
    let mut entries = Vec::new();
    for i in 0..20 {
        entries.push(Entry::Event(ev(
            &format!("a-{i}"),
            1,
            "ing-1",
            t,
            connected(),
        )));
    }
    for i in 0..5 {
        entries.push(Entry::Event(ev(
            &format!("b-{i}"),
            1,
            "ing-2",
            t,
            connected(),
        )));
    }
    // a-0 moved to ing-2 (epoch 2); its old connection ended with a takeover.
    entries.push(Entry::Event(ev("a-0", 2, "ing-2", t + 1, connected())));
    entries.push(Entry::Event(ev(
        "a-0",
        1,
        "ing-1",
        t + 2,
        tcp_down(TcpDownReason::Takeover),
    )));
    // a-1 ended cleanly before the crash.
    entries.push(Entry::Event(ev(
        "a-1",
        1,
        "ing-1",
        t + 3,
        EventKind::Disconnected,
    )));
    inject(&mut conn, &keys, SHARDS, &entries).await;
    caught_up(&mut conn, &keys, SHARDS, Duration::from_secs(10)).await;
    let set1: Vec<String> = conn
        .smembers(keys.server_conns(&srv("ing-1")))
        .await
        .unwrap();
    assert_eq!(set1.len(), 18, "{set1:?}");

    // ing-1 crashes: its liveness key lapses.
    ing1_keeper.abort();
    let _ = ing1_keeper.await;
    let last_beat: f64 = conn.zscore(keys.server_beats(), "ing-1").await.unwrap();
    eventually(Duration::from_secs(15), "ing-1 reaped", || {
        let mut conn = conn.clone();
        let keys = keys.clone();
        async move {
            let set: bool = conn.exists(keys.server_conns(&srv("ing-1"))).await.unwrap();
            let beat: Option<f64> = conn.zscore(keys.server_beats(), "ing-1").await.unwrap();
            let reg: bool = conn.hexists(keys.servers(), "ing-1").await.unwrap();
            if !set && beat.is_none() && !reg {
                Ok(())
            } else {
                Err((set, beat, reg))
            }
        }
    })
    .await;
    caught_up(&mut conn, &keys, SHARDS, Duration::from_secs(10)).await;

    // Exactly one server_lost event per live session of ing-1, none for others.
    let mut lost: HashMap<String, usize> = HashMap::new();
    for s in 0..SHARDS {
        let reply: redis::streams::StreamRangeReply =
            conn.xrange_all(keys.events(s)).await.unwrap();
        for id in reply.ids {
            let bytes: Vec<u8> = id.get("e").unwrap();
            if let Entry::Event(e) = Entry::decode(&bytes).unwrap()
                && e.kind == tcp_down(TcpDownReason::ServerLost)
            {
                assert_eq!(e.server_id.as_str(), "ing-1");
                assert_eq!(
                    e.ts_ms,
                    last_beat as i64 + 1000,
                    "lost at last beat + liveness ttl"
                );
                *lost.entry(e.phy_id.to_string()).or_default() += 1;
            }
        }
    }
    assert_eq!(lost.len(), 18, "{lost:?}");
    assert!(lost.values().all(|n| *n == 1), "{lost:?}");
    assert!(!lost.contains_key("a-0") && !lost.contains_key("a-1"));
    for i in 2..20 {
        let v = view(&mut conn, &keys, &format!("a-{i}")).await;
        assert_eq!(v["ended"], "server_lost", "a-{i}: {v:?}");
        assert_eq!(v["last_tcp_down_reason"], "server_lost");
    }
    let a0 = view(&mut conn, &keys, "a-0").await;
    assert_eq!((a0["epoch"].as_str(), a0.get("ended")), ("2", None));
    assert_eq!(view(&mut conn, &keys, "a-1").await["ended"], "disconnected");
    // The live instance is untouched.
    let set2: Vec<String> = conn
        .smembers(keys.server_conns(&srv("ing-2")))
        .await
        .unwrap();
    assert_eq!(set2.len(), 6, "{set2:?}");
    assert!(
        conn.zscore::<_, _, Option<f64>>(keys.server_beats(), "ing-2")
            .await
            .unwrap()
            .is_some()
    );
    let (_, ma) = iot_test_support::http_get(&a.http.to_string(), "/metrics").unwrap();
    assert!(
        ma.contains("iot_projector_reaped_sessions_total 18"),
        "{ma}"
    );
    keeper.abort();
    a.stop().await;
    b.stop().await;
}
