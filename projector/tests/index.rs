//! The shard-level scripts and the lag measurement on a real Redis: stale
//! revisions are ignored, lifecycle entries appear only on flips, due times
//! only move earlier, leases hand a device to one evaluator and come back
//! when it dies, a view found gone leaves every index, a heartbeat racing
//! an evaluation causes no false offline; lag counts pending
//! and undelivered entries; lost scripts are reloaded.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::*;
use iot_core::keys::{PROJECTOR_GROUP, shard_of};
use iot_core::{Entry, Keys};
use iot_test_support::{RedisServer, unique_prefix};
use projector::projection::{Item, Lifecycle};
use projector::script::{IndexUpdate, Record, parse_flips};
use projector::{Projection, Settings};
use redis::AsyncCommands;

const SHARDS: u16 = 2;

fn projection(url: &str, prefix: &str) -> Projection {
    let c = config(url, prefix, SHARDS);
    Projection::new(Arc::new(Settings::from_config(&c, &srv("t"))))
}

fn record(phy: &str, online: bool, rev: u64, due: i64) -> Record {
    Record {
        phy: phy.into(),
        online,
        rev,
        lifecycle_reason: if online {
            "connected".into()
        } else {
            "heartbeat_expired".into()
        },
        changed: true,
        reason: "heartbeat_fresh".into(),
        due_ms: due,
        known_ms: 1000 + rev as i64,
        epoch: 1,
        conn: None,
        server: None,
        live: true,
        superseded: None,
        conn_expires_ms: None,
        since: 1000,
        binding: false,
    }
}

#[tokio::test]
async fn lifecycle_entries_are_uncapped_when_the_archiver_trims() {
    let redis = RedisServer::start();
    let prefix = unique_prefix();
    let mut c = config(&redis.url(), &prefix, SHARDS);
    c.database.url = "postgres://postgres@127.0.0.1/unused".into();
    let p = Projection::new(Arc::new(Settings::from_config(&c, &srv("t"))));
    assert_eq!(p.settings().maxlen, None);
    let keys = Keys::new(prefix.clone()).unwrap();
    let mut conn = connect(&redis.url()).await;
    p.scripts().load(&mut conn).await.unwrap();
    let d = "dev-y";
    let shard = shard_of(d, SHARDS);
    let updates = [
        IndexUpdate::State {
            record: record(d, true, 10, 5000),
            lease: false,
        },
        IndexUpdate::Gone {
            phy: d.into(),
            now_ms: 5000,
            lease: false,
        },
    ];
    let cmd = p
        .scripts()
        .index(p.settings(), shard, false, 5000, &updates);
    let flips = parse_flips(cmd.query_async(&mut conn).await.unwrap()).unwrap();
    assert_eq!(flips.len(), 2);
    let l = lifecycle(&mut conn, &keys, SHARDS, d).await;
    assert_eq!(
        l.iter().map(|t| t.online).collect::<Vec<_>>(),
        vec![true, false]
    );
}

#[tokio::test]
async fn index_ignores_stale_revisions_and_flips_once() {
    let redis = RedisServer::start();
    let prefix = unique_prefix();
    let p = projection(&redis.url(), &prefix);
    let keys = Keys::new(prefix.clone()).unwrap();
    let mut conn = connect(&redis.url()).await;
    p.scripts().load(&mut conn).await.unwrap();
    let d = "dev-x";
    let shard = shard_of(d, SHARDS);
    let s = p.settings();
    let shared = conn.clone();
    let send = |u: IndexUpdate| {
        let cmd = p.scripts().index(s, shard, false, 5000, &[u]);
        let mut conn = shared.clone();
        async move { parse_flips(cmd.query_async(&mut conn).await.unwrap()).unwrap() }
    };
    let state = |online, rev, due| IndexUpdate::State {
        record: record(d, online, rev, due),
        lease: false,
    };

    assert_eq!(send(state(true, 10, 5000)).await.len(), 1);
    assert!(send(state(true, 10, 6000)).await.is_empty(), "duplicate");
    assert!(send(state(false, 9, 6000)).await.is_empty(), "stale");
    assert!(online_set(&mut conn, &keys, SHARDS).await.contains(d));
    let flips = send(state(false, 11, 4000)).await;
    assert_eq!((flips.len(), flips[0].online), (1, false));
    assert!(!online_set(&mut conn, &keys, SHARDS).await.contains(d));
    let l = lifecycle(&mut conn, &keys, SHARDS, d).await;
    assert_eq!(
        l.iter().map(|t| (t.online, t.rev)).collect::<Vec<_>>(),
        vec![(true, 10), (false, 11)]
    );
    let due: f64 = conn.zscore(keys.due(shard), d).await.unwrap();
    assert_eq!(due, 4000.0, "due only moves earlier");
    let known: f64 = conn.zscore(keys.known(shard), d).await.unwrap();
    assert_eq!(known, 1011.0);

    // Online again, then the view is found gone: an evaluation older than
    // the stored revision is ignored, a newer one clears every index.
    assert_eq!(send(state(true, 12, 4000)).await.len(), 1);
    assert!(
        send(IndexUpdate::Gone {
            phy: d.into(),
            now_ms: 12,
            lease: false
        })
        .await
        .is_empty()
    );
    assert!(online_set(&mut conn, &keys, SHARDS).await.contains(d));
    let flips = send(IndexUpdate::Gone {
        phy: d.into(),
        now_ms: 5000,
        lease: false,
    })
    .await;
    assert_eq!(flips.len(), 1);
    assert!(online_set(&mut conn, &keys, SHARDS).await.is_empty());
    let known: Option<f64> = conn.zscore(keys.known(shard), d).await.unwrap();
    let due: Option<f64> = conn.zscore(keys.due(shard), d).await.unwrap();
    let rev: Option<String> = conn.hget(keys.presence_rev(shard), d).await.unwrap();
    assert_eq!((known, due, rev), (None, None, None));
    let l = lifecycle(&mut conn, &keys, SHARDS, d).await;
    assert_eq!(
        l.last().map(|t| (t.online, t.reason.as_str(), t.rev)),
        Some((false, "heartbeat_expired", 13))
    );
}

#[tokio::test]
async fn due_leases_hand_a_device_to_one_evaluator_and_return_when_it_dies() {
    let redis = RedisServer::start();
    let prefix = unique_prefix();
    let p = projection(&redis.url(), &prefix);
    let keys = Keys::new(prefix.clone()).unwrap();
    let mut conn = connect(&redis.url()).await;
    // A real view, due long ago.
    let t = iot_core::time::now_ms();
    let items = vec![Item {
        entry: Entry::Event(ev("dev-l", 1, "s", t, connected())),
        redelivered: false,
    }];
    p.apply(&mut conn, &items, Lifecycle::Emit, t)
        .await
        .unwrap();
    let shard = shard_of("dev-l", SHARDS);
    let _: () = conn.zadd(keys.due(shard), "dev-l", 100).await.unwrap();
    let s = p.settings();
    let shared = conn.clone();
    let claim = |now: i64| {
        let cmd = p.scripts().due_claim(s, shard, now, now + 5000, 10);
        let mut conn = shared.clone();
        async move {
            let v: redis::Value = cmd.query_async(&mut conn).await.unwrap();
            projector::script::parse_seen(v).unwrap()
        }
    };
    assert_eq!(claim(200).await, vec![("dev-l".to_owned(), None)]);
    assert!(claim(300).await.is_empty(), "leased to the first evaluator");
    // The evaluator died: the lease comes due, with the device's seen score.
    let _: () = conn.zadd(keys.seen(shard), "dev-l", t + 7).await.unwrap();
    assert_eq!(claim(5200).await, vec![("dev-l".to_owned(), Some(t + 7))]);
    // This one finishes: the lease goes, the device is due at its next change.
    let (applied, more) = projector::due::round(&mut conn, &p, 10_400).await.unwrap();
    assert!(!more);
    assert_eq!(applied.evaluated, 1, "the lease of 5200 expired at 10200");
    let members: Vec<(String, f64)> = conn
        .zrange_withscores(keys.due(shard), 0, -1)
        .await
        .unwrap();
    assert_eq!(members.len(), 1, "{members:?}");
    assert_eq!(members[0].0, "dev-l");
}

#[tokio::test]
async fn lag_counts_pending_and_undelivered_entries() {
    let redis = RedisServer::start();
    let prefix = unique_prefix();
    let p = projection(&redis.url(), &prefix);
    let keys = Keys::new(prefix.clone()).unwrap();
    let mut conn = connect(&redis.url()).await;
    for s in 0..SHARDS {
        let _: () = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(keys.events(s))
            .arg(PROJECTOR_GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    for i in 0..10u64 {
        let _: String = conn
            .xadd(keys.events(0), format!("{}-0", 1_000 + i), &[("e", "x")])
            .await
            .unwrap();
    }
    // A consumer takes 4 and acknowledges 1.
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(PROJECTOR_GROUP)
        .arg("c1")
        .arg("COUNT")
        .arg(4)
        .arg("STREAMS")
        .arg(keys.events(0))
        .arg(">")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: u64 = conn
        .xack(keys.events(0), PROJECTOR_GROUP, &["1000-0"])
        .await
        .unwrap();
    let mut prev = None;
    let now = 11_000;
    let lag = projector::lag::measure(&mut conn, p.settings(), &mut prev, now)
        .await
        .unwrap();
    assert_eq!((lag.pending, lag.undelivered, lag.consumers), (3, 6, 1));
    assert_eq!(lag.oldest_age_ms, now - 1001, "oldest pending is 1001-0");
    // One more acknowledged and 2 more appended, 1 s later.
    let _: u64 = conn
        .xack(keys.events(0), PROJECTOR_GROUP, &["1001-0"])
        .await
        .unwrap();
    let _: String = conn
        .xadd(keys.events(0), "2000-0", &[("e", "x")])
        .await
        .unwrap();
    let _: String = conn
        .xadd(keys.events(0), "2001-0", &[("e", "x")])
        .await
        .unwrap();
    let lag = projector::lag::measure(&mut conn, p.settings(), &mut prev, now + 1000)
        .await
        .unwrap();
    assert_eq!((lag.pending, lag.undelivered), (2, 8));
    assert_eq!(lag.added_per_sec, 2.0);
    assert_eq!(lag.applied_per_sec, 1.0);
    projector::lag::publish(&mut conn, p.settings(), &lag)
        .await
        .unwrap();
    let f: std::collections::HashMap<String, String> =
        conn.hgetall(keys.projector_lag()).await.unwrap();
    assert_eq!(iot_core::registry::Lag::from_fields(&f), lag);
}

#[tokio::test]
async fn scripts_lost_by_redis_are_loaded_again() {
    let redis = RedisServer::start();
    let prefix = unique_prefix();
    let p = projection(&redis.url(), &prefix);
    let keys = Keys::new(prefix.clone()).unwrap();
    let mut conn = connect(&redis.url()).await;
    let t = iot_core::time::now_ms();
    let item = |p: &str| Item {
        entry: Entry::Event(ev(p, 1, "s", t, connected())),
        redelivered: false,
    };
    p.apply(&mut conn, &[item("dev-1")], Lifecycle::Emit, t)
        .await
        .unwrap();
    let _: () = redis::cmd("FUNCTION")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    p.apply(&mut conn, &[item("dev-2")], Lifecycle::Emit, t)
        .await
        .unwrap();
    assert_eq!(online_set(&mut conn, &keys, SHARDS).await.len(), 2);
}

#[tokio::test]
async fn heartbeats_of_online_devices_stay_in_the_seen_set_until_the_due_evaluation() {
    let redis = RedisServer::start();
    let prefix = unique_prefix();
    let p = projection(&redis.url(), &prefix);
    let keys = Keys::new(prefix.clone()).unwrap();
    let mut conn = connect(&redis.url()).await;
    let d = "dev-s";
    let shard = shard_of(d, SHARDS);
    let h = p.settings().policy.heartbeat_timeout_ms;
    let ttl = p.settings().ttl_ms;
    let t = iot_core::time::now_ms();
    let item = |entry| Item {
        entry,
        redelivered: false,
    };
    let hash_last_seen = |conn: &mut redis::aio::ConnectionManager| {
        let mut conn = conn.clone();
        let key = keys.device(&phy(d));
        async move {
            let v: Option<i64> = conn.hget(key, "last_seen").await.unwrap();
            v
        }
    };

    p.apply(
        &mut conn,
        &[item(Entry::Event(ev(d, 1, "s", t, connected())))],
        Lifecycle::Emit,
        t,
    )
    .await
    .unwrap();
    // Online: the heartbeat goes to the seen set only.
    let applied = p
        .apply(
            &mut conn,
            &[item(beats("s", &[(d, 1, t + 1000)]))],
            Lifecycle::Emit,
            t + 1000,
        )
        .await
        .unwrap();
    assert_eq!(applied.events, 1);
    assert_eq!(
        hash_last_seen(&mut conn).await,
        Some(t),
        "the view is not touched"
    );
    let seen: Option<i64> = conn.zscore(keys.seen(shard), d).await.unwrap();
    assert_eq!(seen, Some(t + 1000));
    assert_eq!(
        view(&mut conn, &keys, d).await["last_seen"],
        (t + 1000).to_string()
    );
    let _: () = conn.del(keys.conn(&conn_of(d, 1))).await.unwrap();
    // As if the time had passed: the view's TTL has run down by half.
    let _: () = conn.pexpire(keys.device(&phy(d)), ttl / 2).await.unwrap();

    // At the view's own heartbeat expiry the due evaluation folds the seen
    // score in: still online, the view's TTL and the connection key renewed.
    let (applied, _) = projector::due::round(&mut conn, &p, t + h + 1)
        .await
        .unwrap();
    assert_eq!(applied.evaluated, 1);
    assert!(applied.flips.is_empty(), "{:?}", applied.flips);
    assert_eq!(hash_last_seen(&mut conn).await, Some(t + 1000));
    assert!(online_set(&mut conn, &keys, SHARDS).await.contains(d));
    // Both now expire TTL after the newest heartbeat, not after the
    // evaluation.
    let left = t + 1000 + ttl - (t + h + 1);
    let pttl: i64 = conn.pttl(keys.device(&phy(d))).await.unwrap();
    assert!(
        pttl <= left && pttl > left - 10_000,
        "view TTL {pttl}, want {left}"
    );
    let conn_key: Option<String> = conn.get(keys.conn(&conn_of(d, 1))).await.unwrap();
    assert_eq!(conn_key.as_deref(), Some(d), "connection key renewed");
    let conn_pttl: i64 = conn.pttl(keys.conn(&conn_of(d, 1))).await.unwrap();
    assert!(
        conn_pttl <= left && conn_pttl > left - 10_000,
        "connection key TTL {conn_pttl}, want {left}"
    );
    // An evaluation with nothing newer leaves both alone.
    let _: () = conn.pexpire(keys.device(&phy(d)), ttl).await.unwrap();
    p.evaluate(&mut conn, &[(phy(d), Some(t + 1000))], false, t + h + 2)
        .await
        .unwrap();
    let pttl: i64 = conn.pttl(keys.device(&phy(d))).await.unwrap();
    assert!(pttl > left, "never shortened: {pttl}");

    // Expired, then a heartbeat: not online, so it goes to the view.
    let (applied, _) = projector::due::round(&mut conn, &p, t + 1000 + h + 1)
        .await
        .unwrap();
    assert_eq!(applied.flips.len(), 1);
    assert!(!online_set(&mut conn, &keys, SHARDS).await.contains(d));
    let back = t + 1000 + h + 10;
    let applied = p
        .apply(
            &mut conn,
            &[item(beats("s", &[(d, 1, back)]))],
            Lifecycle::Emit,
            back,
        )
        .await
        .unwrap();
    assert_eq!(applied.flips.len(), 1);
    assert!(applied.flips[0].online);
    assert_eq!(applied.flips[0].reason, "recovered");
    assert_eq!(hash_last_seen(&mut conn).await, Some(back));

    // A view found gone leaves the seen set as well.
    let _: () = conn.del(keys.device(&phy(d))).await.unwrap();
    p.evaluate(&mut conn, &[(phy(d), Some(back))], false, back + 1)
        .await
        .unwrap();
    assert!(!online_set(&mut conn, &keys, SHARDS).await.contains(d));
    let seen: Option<i64> = conn.zscore(keys.seen(shard), d).await.unwrap();
    assert_eq!(seen, None);
}

#[tokio::test]
async fn a_heartbeat_racing_the_due_evaluation_writes_no_false_offline() {
    let redis = RedisServer::start();
    let prefix = unique_prefix();
    let p = projection(&redis.url(), &prefix);
    let keys = Keys::new(prefix.clone()).unwrap();
    let mut conn = connect(&redis.url()).await;
    let d = "dev-r";
    let shard = shard_of(d, SHARDS);
    let h = p.settings().policy.heartbeat_timeout_ms;
    let t = iot_core::time::now_ms();
    let item = |entry| Item {
        entry,
        redelivered: false,
    };
    p.apply(
        &mut conn,
        &[item(Entry::Event(ev(d, 1, "s", t, connected())))],
        Lifecycle::Emit,
        t,
    )
    .await
    .unwrap();
    // At the heartbeat expiry the due round leased the device and read its
    // seen score (none yet); then a heartbeat reached the seen set, before
    // the evaluation's index update.
    let beat = t + h;
    let applied = p
        .apply(
            &mut conn,
            &[item(beats("s", &[(d, 1, beat)]))],
            Lifecycle::Emit,
            beat,
        )
        .await
        .unwrap();
    assert_eq!(applied.seen_only, 1);
    let at = t + h + 1;
    let applied = p
        .evaluate(&mut conn, &[(phy(d), None)], true, at)
        .await
        .unwrap();
    assert!(applied.flips.is_empty(), "refused: {:?}", applied.flips);
    assert!(online_set(&mut conn, &keys, SHARDS).await.contains(d));
    let due: Option<f64> = conn.zscore(keys.due(shard), d).await.unwrap();
    assert_eq!(due, Some(at as f64), "evaluated again at once");

    // The next round folds the heartbeat in: online all along.
    let (applied, _) = projector::due::round(&mut conn, &p, at + 100)
        .await
        .unwrap();
    assert_eq!(applied.evaluated, 1);
    assert!(applied.flips.is_empty(), "{:?}", applied.flips);
    assert_eq!(view(&mut conn, &keys, d).await["online"], "1");
    let l = lifecycle(&mut conn, &keys, SHARDS, d).await;
    assert_eq!(l.len(), 1, "no offline/online pair: {l:?}");

    // Once that heartbeat expired too, the flip goes through.
    let (applied, _) = projector::due::round(&mut conn, &p, beat + h + 1)
        .await
        .unwrap();
    assert_eq!(applied.flips.len(), 1, "{:?}", applied.flips);
    assert!(!online_set(&mut conn, &keys, SHARDS).await.contains(d));
    let l = lifecycle(&mut conn, &keys, SHARDS, d).await;
    assert_eq!(
        l.iter()
            .map(|t| (t.online, t.reason.as_str()))
            .collect::<Vec<_>>(),
        vec![(true, "connected"), (false, "heartbeat_expired")]
    );
}
