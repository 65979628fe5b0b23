//! Heartbeats and the binding, on a real Redis: a heartbeat of an epoch
//! above the bound one binds the view (its connection key and instance set
//! follow), later heartbeats of that connection take the seen set only; a
//! view lost while its device heartbeats (expired while the projectors were
//! down, or rebuilt after its `connected` entry was trimmed) gets its
//! binding back from the next heartbeat.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use common::*;
use iot_core::keys::shard_of;
use iot_core::{Entry, Keys};
use iot_test_support::{RedisServer, unique_prefix};
use projector::projection::{Applied, Item, Lifecycle};
use projector::{Projection, Settings};
use redis::AsyncCommands;
use redis::aio::ConnectionManager;

const SHARDS: u16 = 2;

fn projection(url: &str, prefix: &str) -> Projection {
    let c = config(url, prefix, SHARDS);
    Projection::new(Arc::new(Settings::from_config(&c, &srv("t"))))
}

async fn apply(conn: &mut ConnectionManager, p: &Projection, entry: Entry, now: i64) -> Applied {
    let items = [Item {
        entry,
        redelivered: false,
    }];
    p.apply(conn, &items, Lifecycle::Emit, now).await.unwrap()
}

/// The view's hash as stored (no seen score folded in).
async fn raw(conn: &mut ConnectionManager, keys: &Keys, d: &str) -> HashMap<String, String> {
    conn.hgetall(keys.device(&phy(d))).await.unwrap()
}

async fn bound(conn: &mut ConnectionManager, keys: &Keys, d: &str) -> Option<u64> {
    conn.hget(keys.bound(shard_of(d, SHARDS)), d).await.unwrap()
}

/// Asserts that the view of `d` is bound to (epoch, its connection, server)
/// with the connection key and the instance's set in place.
async fn assert_bound(
    conn: &mut ConnectionManager,
    keys: &Keys,
    d: &str,
    epoch: u64,
    server: &str,
) {
    let v = raw(conn, keys, d).await;
    let c = conn_of(d, epoch);
    assert_eq!(v.get("epoch"), Some(&epoch.to_string()), "{v:?}");
    assert_eq!(v.get("conn_id"), Some(&c.to_string()), "{v:?}");
    assert_eq!(
        v.get("server_id").map(String::as_str),
        Some(server),
        "{v:?}"
    );
    let owner: Option<String> = conn.get(keys.conn(&c)).await.unwrap();
    assert_eq!(owner.as_deref(), Some(d), "connection key");
    let held: bool = conn
        .sismember(keys.server_conns(&srv(server)), c.to_string())
        .await
        .unwrap();
    assert!(held, "in the instance's connection set");
}

#[tokio::test]
async fn a_heartbeat_of_a_higher_epoch_binds_and_then_takes_the_seen_set() {
    let redis = RedisServer::start();
    let prefix = unique_prefix();
    let p = projection(&redis.url(), &prefix);
    let keys = Keys::new(prefix.clone()).unwrap();
    let mut conn = connect(&redis.url()).await;
    let d = "dev-b";
    let t = iot_core::time::now_ms();

    apply(
        &mut conn,
        &p,
        Entry::Event(ev(d, 1, "s1", t, connected())),
        t,
    )
    .await;
    assert_eq!(bound(&mut conn, &keys, d).await, Some(1));
    let a = apply(&mut conn, &p, beats("s1", &[(d, 1, t + 100)]), t + 100).await;
    assert_eq!(a.seen_only, 1, "online at epoch 1: the seen set only");

    // The device reconnected through another instance; its `connected`
    // has not arrived (or was lost): the first heartbeat binds.
    let a = apply(&mut conn, &p, beats("s2", &[(d, 2, t + 200)]), t + 200).await;
    assert_eq!(a.seen_only, 0, "epoch 2 is above the bound 1");
    assert_bound(&mut conn, &keys, d, 2, "s2").await;
    let v = raw(&mut conn, &keys, d).await;
    assert_eq!(v.get("connected_at"), None, "a heartbeat does not set it");
    assert_eq!(v.get("online").map(String::as_str), Some("1"));
    let old: bool = conn
        .sismember(keys.server_conns(&srv("s1")), conn_of(d, 1).to_string())
        .await
        .unwrap();
    assert!(!old, "the superseded connection left its instance's set");
    assert_eq!(bound(&mut conn, &keys, d).await, Some(2));

    // Later heartbeats of either connection change nothing but last_seen.
    let a = apply(&mut conn, &p, beats("s2", &[(d, 2, t + 300)]), t + 300).await;
    assert_eq!(a.seen_only, 1);
    let a = apply(&mut conn, &p, beats("s1", &[(d, 1, t + 400)]), t + 400).await;
    assert_eq!(a.seen_only, 1);
    assert_eq!(
        view(&mut conn, &keys, d).await["last_seen"],
        (t + 400).to_string()
    );
    assert_eq!(
        raw(&mut conn, &keys, d).await["last_seen"],
        (t + 200).to_string()
    );

    // A takeover while online does not flip the state, but the bound epoch
    // follows, so the new connection's heartbeats take the seen set.
    apply(
        &mut conn,
        &p,
        Entry::Event(ev(d, 3, "s1", t + 500, connected())),
        t + 500,
    )
    .await;
    assert_eq!(bound(&mut conn, &keys, d).await, Some(3));
    let a = apply(&mut conn, &p, beats("s1", &[(d, 3, t + 600)]), t + 600).await;
    assert_eq!(a.seen_only, 1);
    assert_bound(&mut conn, &keys, d, 3, "s1").await;
    let l = lifecycle(&mut conn, &keys, SHARDS, d).await;
    assert_eq!(l.len(), 1, "online once, never offline: {l:?}");
}

#[tokio::test]
async fn a_view_lost_while_its_device_heartbeats_gets_its_binding_back() {
    let redis = RedisServer::start();
    let prefix = unique_prefix();
    let p = projection(&redis.url(), &prefix);
    let keys = Keys::new(prefix.clone()).unwrap();
    let mut conn = connect(&redis.url()).await;
    let d = "dev-l";
    let h = p.settings().policy.heartbeat_timeout_ms;
    let t = iot_core::time::now_ms();

    apply(
        &mut conn,
        &p,
        Entry::Event(ev(d, 1, "s1", t, connected())),
        t,
    )
    .await;
    // The projectors were down for longer than the view's TTL: the view and
    // the connection key expired, the indexes are still there.
    let _: () = conn.del(keys.device(&phy(d))).await.unwrap();
    let _: () = conn.del(keys.conn(&conn_of(d, 1))).await.unwrap();
    let a = apply(&mut conn, &p, beats("s1", &[(d, 1, t + h)]), t + h).await;
    assert_eq!(a.seen_only, 1, "the index still says online at epoch 1");
    // The due evaluation finds the view gone and clears the indexes.
    let (a, _) = projector::due::round(&mut conn, &p, t + h + 1)
        .await
        .unwrap();
    assert_eq!(a.evaluated, 1);
    assert_eq!(bound(&mut conn, &keys, d).await, None);
    assert!(!online_set(&mut conn, &keys, SHARDS).await.contains(d));

    // The next heartbeat recreates the view, bound to its connection.
    let back = t + h + 300;
    let a = apply(&mut conn, &p, beats("s1", &[(d, 1, back)]), back).await;
    assert_eq!(a.seen_only, 0);
    assert_bound(&mut conn, &keys, d, 1, "s1").await;
    let v = view(&mut conn, &keys, d).await;
    assert_eq!(v.get("online").map(String::as_str), Some("1"), "{v:?}");
    assert_eq!(v["last_seen"], back.to_string());
    assert!(online_set(&mut conn, &keys, SHARDS).await.contains(d));
    assert_eq!(bound(&mut conn, &keys, d).await, Some(1));
}

#[tokio::test]
async fn rebuild_after_the_connected_entry_was_trimmed_binds_from_the_heartbeats() {
    let redis = RedisServer::start();
    let prefix = unique_prefix();
    let p = projection(&redis.url(), &prefix);
    let keys = Keys::new(prefix.clone()).unwrap();
    let mut conn = connect(&redis.url()).await;
    let t = iot_core::time::now_ms();
    // The streams hold only heartbeats of these connections.
    inject(
        &mut conn,
        &keys,
        SHARDS,
        &[
            beats("s1", &[("dev-r", 4, t - 2000)]),
            beats("s1", &[("dev-r", 4, t - 1000)]),
            beats("s2", &[("dev-q", 2, t - 500)]),
        ],
    )
    .await;
    // Stale index entries of a device without a view go with the reset.
    let _: () = conn
        .hset(keys.bound(shard_of("dev-gone", SHARDS)), "dev-gone", 9)
        .await
        .unwrap();

    let summary = projector::rebuild::rebuild_with(&mut conn, &p, true, None)
        .await
        .unwrap();
    assert_eq!((summary.devices, summary.online), (2, 2), "{summary}");
    assert_bound(&mut conn, &keys, "dev-r", 4, "s1").await;
    assert_bound(&mut conn, &keys, "dev-q", 2, "s2").await;
    assert_eq!(bound(&mut conn, &keys, "dev-r").await, Some(4));
    assert_eq!(bound(&mut conn, &keys, "dev-q").await, Some(2));
    assert_eq!(bound(&mut conn, &keys, "dev-gone").await, None);
    assert_eq!(
        view(&mut conn, &keys, "dev-r").await["last_seen"],
        (t - 1000).to_string()
    );
}
