//! The lag publisher's housekeeping on a real Redis: consumers left behind
//! by stopped projectors (idle, nothing pending) are deleted from the group,
//! never one with entries pending nor the projector's own; and the group's
//! events applied are counted (each heartbeat of a batch), not its entries.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use iot_core::Keys;
use iot_core::keys::PROJECTOR_GROUP;
use iot_core::registry::{Lag, lag_field};
use iot_test_support::{RedisServer, eventually, unique_prefix};
use projector::Settings;
use projector::lag;
use redis::aio::ConnectionManager;

const SHARDS: u16 = 2;

/// Consumer name -> pending count, of the group on `shard`.
async fn consumers(conn: &mut ConnectionManager, keys: &Keys, shard: u16) -> BTreeMap<String, u64> {
    let v: redis::Value = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(keys.events(shard))
        .arg(PROJECTOR_GROUP)
        .query_async(conn)
        .await
        .expect("XINFO CONSUMERS");
    let redis::Value::Array(list) = v else {
        panic!("XINFO CONSUMERS: {v:?}")
    };
    let mut out = BTreeMap::new();
    for c in list {
        let flat: Vec<redis::Value> = match c {
            redis::Value::Array(a) => a,
            redis::Value::Map(m) => m.into_iter().flat_map(|(k, v)| [k, v]).collect(),
            other => panic!("consumer: {other:?}"),
        };
        let mut name = String::new();
        let mut pending = 0;
        for pair in flat.chunks(2) {
            let k: String = redis::from_redis_value(pair[0].clone()).expect("field name");
            match k.as_str() {
                "name" => name = redis::from_redis_value(pair[1].clone()).expect("name"),
                "pending" => pending = redis::from_redis_value(pair[1].clone()).expect("pending"),
                _ => {}
            }
        }
        out.insert(name, pending);
    }
    out
}

/// Creates the group (from 0) on every shard and `names` in it.
async fn group_with(conn: &mut ConnectionManager, keys: &Keys, names: &[&str]) {
    for shard in 0..SHARDS {
        let _: () = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(keys.events(shard))
            .arg(PROJECTOR_GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(conn)
            .await
            .expect("XGROUP CREATE");
        for name in names {
            let _: i64 = redis::cmd("XGROUP")
                .arg("CREATECONSUMER")
                .arg(keys.events(shard))
                .arg(PROJECTOR_GROUP)
                .arg(name)
                .query_async(conn)
                .await
                .expect("XGROUP CREATECONSUMER");
        }
    }
}

#[tokio::test]
async fn idle_consumers_with_nothing_pending_are_deleted() {
    let redis = RedisServer::start();
    let prefix = unique_prefix();
    let mut c = config(&redis.url(), &prefix, SHARDS);
    c.projector.claim_idle = Duration::from_millis(20);
    let settings = Settings::from_config(&c, &srv("own"));
    assert_eq!(lag::consumer_idle_bound(&settings), Duration::from_secs(1));
    c.projector.claim_idle = Duration::from_secs(30);
    assert_eq!(
        lag::consumer_idle_bound(&Settings::from_config(&c, &srv("own"))),
        Duration::from_secs(300),
        "10 x claim_idle"
    );
    let keys = settings.keys.clone();
    let mut conn = connect(&redis.url()).await;

    group_with(&mut conn, &keys, &["own", "gone-a", "gone-b", "busy"]).await;
    // `busy` holds an entry of shard 0, delivered and never acknowledged.
    let _: String = redis::cmd("XADD")
        .arg(keys.events(0))
        .arg("*")
        .arg("e")
        .arg("x")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(PROJECTOR_GROUP)
        .arg("busy")
        .arg("COUNT")
        .arg(1)
        .arg("STREAMS")
        .arg(keys.events(0))
        .arg(">")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(consumers(&mut conn, &keys, 0).await["busy"], 1);

    // None has been idle an hour.
    let deleted = lag::remove_idle_consumers(&mut conn, &settings, Duration::from_secs(3600))
        .await
        .unwrap();
    assert!(deleted.is_empty(), "{deleted:?}");
    assert_eq!(consumers(&mut conn, &keys, 1).await.len(), 4);

    // Once they have been idle longer than the bound, the idle ones go from
    // every shard; `busy` stays where it has an entry pending, and the
    // projector's own consumer stays.
    let bound = Duration::from_millis(200);
    let removed = std::sync::Mutex::new(Vec::<String>::new());
    eventually(Duration::from_secs(10), "idle consumers deleted", || {
        let mut conn = conn.clone();
        let (settings, removed) = (&settings, &removed);
        async move {
            let names = lag::remove_idle_consumers(&mut conn, settings, bound)
                .await
                .map_err(|e| e.to_string())?;
            removed.lock().unwrap().extend(names);
            // Both shards: the bound may pass between one shard's check
            // and the next's, leaving the other for a later round.
            let s0: BTreeSet<String> = consumers(&mut conn, &settings.keys, 0)
                .await
                .into_keys()
                .collect();
            let s1: BTreeSet<String> = consumers(&mut conn, &settings.keys, 1)
                .await
                .into_keys()
                .collect();
            if s0.len() == 2 && s1.len() == 1 {
                Ok(())
            } else {
                Err(format!("{s0:?} {s1:?}"))
            }
        }
    })
    .await;
    let mut removed = removed.into_inner().unwrap();
    removed.sort();
    assert_eq!(
        removed,
        ["busy", "gone-a", "gone-a", "gone-b", "gone-b"],
        "one name per shard deleted from"
    );
    let s0 = consumers(&mut conn, &keys, 0).await;
    assert_eq!(
        s0,
        BTreeMap::from([("busy".to_owned(), 1), ("own".to_owned(), 0)])
    );
    let s1 = consumers(&mut conn, &keys, 1).await;
    assert_eq!(s1, BTreeMap::from([("own".to_owned(), 0)]));
    // The pending entry is still there for XAUTOCLAIM.
    let summary: redis::Value = redis::cmd("XPENDING")
        .arg(keys.events(0))
        .arg(PROJECTOR_GROUP)
        .query_async(&mut conn)
        .await
        .unwrap();
    let redis::Value::Array(summary) = summary else {
        panic!("XPENDING: {summary:?}")
    };
    assert_eq!(summary[0], redis::Value::Int(1));

    // A stream or group that does not exist is no error.
    let other = Settings::from_config(&config(&redis.url(), &unique_prefix(), SHARDS), &srv("own"));
    assert!(
        lag::remove_idle_consumers(&mut conn, &other, bound)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn events_applied_are_summed_over_the_projectors_and_kept_by_publish() {
    let redis = RedisServer::start();
    let prefix = unique_prefix();
    let c = config(&redis.url(), &prefix, SHARDS);
    let settings = Arc::new(Settings::from_config(&c, &srv("t")));
    let keys = settings.keys.clone();
    let mut conn = connect(&redis.url()).await;
    group_with(&mut conn, &keys, &[]).await;

    let mut prev = None;
    let now = 50_000;
    let first = lag::measure(&mut conn, &settings, &mut prev, now)
        .await
        .unwrap();
    assert_eq!(first.events_applied_per_sec, 0.0, "no previous round");
    lag::publish(&mut conn, &settings, &first).await.unwrap();
    // Two projectors add what they applied; 2 s later.
    lag::add_events_applied(&mut conn, &settings, 3000)
        .await
        .unwrap();
    lag::add_events_applied(&mut conn, &settings, 1000)
        .await
        .unwrap();
    lag::add_events_applied(&mut conn, &settings, 0)
        .await
        .unwrap();
    let second = lag::measure(&mut conn, &settings, &mut prev, now + 2000)
        .await
        .unwrap();
    assert_eq!(second.events_applied_per_sec, 2000.0);
    assert_eq!(second.added_per_sec, 0.0, "no entries appended");
    lag::publish(&mut conn, &settings, &second).await.unwrap();
    let f: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg(keys.projector_lag())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(Lag::from_fields(&f), second);
    assert_eq!(
        f.get(lag_field::EVENTS_APPLIED).map(String::as_str),
        Some("4000"),
        "publish leaves the counter alone"
    );
}

/// A running projector counts events (heartbeats one by one) into the lag
/// record, and removes the consumer a stopped projector left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_projector_counts_events_and_removes_a_dead_consumer() {
    let redis = RedisServer::start();
    let prefix = unique_prefix();
    let mut c = config(&redis.url(), &prefix, SHARDS);
    c.projector.claim_idle = Duration::from_millis(100);
    let keys = Keys::new(prefix.clone()).unwrap();
    let mut conn = connect(&redis.url()).await;
    group_with(&mut conn, &keys, &["stopped-projector"]).await;

    let (entries, events) = workload("lagc-", 120, 4, iot_core::time::now_ms());
    assert!(
        events > entries.len() as u64,
        "heartbeat batches: more events ({events}) than entries ({})",
        entries.len()
    );
    let proj = start(c, "live-projector").await;
    inject(&mut conn, &keys, SHARDS, &entries).await;
    caught_up(&mut conn, &keys, SHARDS, Duration::from_secs(30)).await;

    eventually(
        Duration::from_secs(15),
        "every event counted, the dead consumer gone",
        || {
            let mut conn = conn.clone();
            let keys = keys.clone();
            async move {
                let f: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
                    .arg(keys.projector_lag())
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| e.to_string())?;
                let counted: u64 = f
                    .get(lag_field::EVENTS_APPLIED)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let mut names = BTreeSet::new();
                for shard in 0..SHARDS {
                    names.extend(consumers(&mut conn, &keys, shard).await.into_keys());
                }
                let lag = Lag::from_fields(&f);
                if counted == events && lag.consumers == 1 && names.len() == 1 {
                    Ok(names)
                } else {
                    Err(format!(
                        "{counted} of {events} events; consumers {names:?}; {lag:?}"
                    ))
                }
            }
        },
    )
    .await;
    let mut names = BTreeSet::new();
    for shard in 0..SHARDS {
        names.extend(consumers(&mut conn, &keys, shard).await.into_keys());
    }
    assert_eq!(names, BTreeSet::from(["live-projector".to_owned()]));
    proj.stop().await;
}
