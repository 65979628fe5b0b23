//! The projector in-process with short windows (heartbeat timeout 3 s, drop
//! and ACK windows 1 s, penalties 0.5 and 0.3, threshold 0.5 like the seed):
//! the seed's transitions appear in the view, the online index and the
//! lifecycle stream, time-based ones within 1 s of the change time; a view
//! and its connection key live while the device heartbeats and expire 2 x
//! heartbeat timeout after its last heartbeat.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use iot_core::time::now_ms;
use iot_core::{Config, EventKind, Keys, TcpDownReason};
use iot_test_support::{RedisServer, eventually, unique_prefix};
use redis::AsyncCommands;
use redis::aio::ConnectionManager;

const SHARDS: u16 = 4;
const HB_MS: i64 = 3000;
const WINDOW_MS: i64 = 1000;

fn short_config(url: &str, prefix: &str) -> Config {
    let mut c = config(url, prefix, SHARDS);
    c.session.heartbeat_timeout = Duration::from_millis(HB_MS as u64);
    c.policy.tcp_down_window = Duration::from_millis(WINDOW_MS as u64);
    c.policy.ack_window = Duration::from_millis(WINDOW_MS as u64);
    c
}

async fn wait_state(conn: &ConnectionManager, keys: &Keys, p: &str, online: bool, reason: &str) {
    let want = (if online { "1" } else { "0" }).to_owned();
    eventually(
        Duration::from_secs(10),
        &format!("{p} online={online} {reason}"),
        || {
            let mut conn = conn.clone();
            let keys = keys.clone();
            let want = want.clone();
            async move {
                let v = view(&mut conn, &keys, p).await;
                let idx = online_set(&mut conn, &keys, SHARDS).await.contains(p);
                if v.get("online") == Some(&want)
                    && v.get("reason").map(String::as_str) == Some(reason)
                    && idx == online
                {
                    Ok(())
                } else {
                    Err((v, idx))
                }
            }
        },
    )
    .await
}

async fn wait_lifecycle(
    conn: &ConnectionManager,
    keys: &Keys,
    p: &str,
    n: usize,
) -> Vec<Transition> {
    eventually(
        Duration::from_secs(10),
        &format!("{n} lifecycle entries of {p}"),
        || {
            let mut conn = conn.clone();
            let keys = keys.clone();
            async move {
                let l = lifecycle(&mut conn, &keys, SHARDS, p).await;
                if l.len() >= n { Ok(l) } else { Err(l) }
            }
        },
    )
    .await
}

/// Injects a heartbeat of `p` (epoch) every 300 ms until dropped.
fn heartbeats(
    conn: ConnectionManager,
    keys: Keys,
    p: &'static str,
    epoch: u64,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut conn = conn;
        loop {
            inject(
                &mut conn,
                &keys,
                SHARDS,
                &[beats("srv-1", &[(p, epoch, now_ms())])],
            )
            .await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_and_ack_timeout_penalise_then_recover_then_expire() {
    let redis = RedisServer::start();
    let prefix = unique_prefix();
    let keys = Keys::new(prefix.clone()).unwrap();
    let mut conn = connect(&redis.url()).await;
    let proj = start(short_config(&redis.url(), &prefix), "proj-1").await;

    // Connect: online, reason connected.
    let t0 = now_ms();
    inject(
        &mut conn,
        &keys,
        SHARDS,
        &[
            ev("dev-1", 1, "srv-1", t0, connected()).into_entry(),
            ev("dev-2", 1, "srv-1", t0, connected()).into_entry(),
        ],
    )
    .await;
    wait_state(&conn, &keys, "dev-1", true, "heartbeat_fresh").await;
    wait_state(&conn, &keys, "dev-2", true, "heartbeat_fresh").await;
    let hb1 = heartbeats(conn.clone(), keys.clone(), "dev-1", 1);
    let hb2 = heartbeats(conn.clone(), keys.clone(), "dev-2", 1);

    // dev-2: an ACK timeout alone (1 - 0.3 >= 0.5) keeps it online.
    inject(
        &mut conn,
        &keys,
        SHARDS,
        &[ev("dev-2", 1, "srv-1", now_ms(), ack_timeout()).into_entry()],
    )
    .await;

    // dev-1: drop and ACK timeout at t1: score 0.2, offline (the tie names the drop).
    let t1 = now_ms();
    inject(
        &mut conn,
        &keys,
        SHARDS,
        &[
            ev("dev-1", 1, "srv-1", t1, ack_timeout()).into_entry(),
            ev("dev-1", 1, "srv-1", t1, tcp_down(TcpDownReason::Keepalive)).into_entry(),
        ],
    )
    .await;
    // The device reconnects at once; the penalties still hold it offline.
    hb1.abort();
    inject(
        &mut conn,
        &keys,
        SHARDS,
        &[ev("dev-1", 2, "srv-1", t1 + 20, connected()).into_entry()],
    )
    .await;
    let hb1 = heartbeats(conn.clone(), keys.clone(), "dev-1", 2);

    // Online again once the window has passed (t1 + 1 s + 1 ms), within 1 s.
    let l = wait_lifecycle(&conn, &keys, "dev-1", 3).await;
    assert_eq!(
        (l[0].online, l[0].reason.as_str()),
        (true, "connected"),
        "{l:?}"
    );
    assert_eq!(
        (l[1].online, l[1].reason.as_str()),
        (false, "tcp_down:keepalive"),
        "{l:?}"
    );
    assert_eq!(
        (l[2].online, l[2].reason.as_str()),
        (true, "recovered"),
        "{l:?}"
    );
    let change = t1 + WINDOW_MS + 1;
    assert!(
        l[2].at_ms >= change && l[2].at_ms <= change + 1000,
        "recovered at {} vs change at {change}",
        l[2].at_ms
    );
    assert!(l[0].rev < l[1].rev && l[1].rev < l[2].rev, "{l:?}");
    assert_eq!(l[2].epoch, 2);
    wait_state(&conn, &keys, "dev-1", true, "heartbeat_fresh").await;

    // Heartbeats stop: offline with heartbeat_expired, within 1 s of expiry.
    hb1.abort();
    let _ = hb1.await;
    // The newest heartbeat the projector may see was injected before abort returned.
    let last_beat: i64 = {
        caught_up(&mut conn, &keys, SHARDS, Duration::from_secs(10)).await;
        view(&mut conn, &keys, "dev-1").await["last_seen"]
            .parse()
            .unwrap()
    };
    let l = wait_lifecycle(&conn, &keys, "dev-1", 4).await;
    assert_eq!(
        (l[3].online, l[3].reason.as_str()),
        (false, "heartbeat_expired"),
        "{l:?}"
    );
    let expiry = last_beat + HB_MS + 1;
    assert!(
        l[3].at_ms >= expiry && l[3].at_ms <= expiry + 1000,
        "expired at {} vs {expiry}",
        l[3].at_ms
    );
    wait_state(&conn, &keys, "dev-1", false, "heartbeat_expired").await;
    let v = view(&mut conn, &keys, "dev-1").await;
    assert_eq!(v["since"], l[3].at_ms.to_string());
    assert_eq!(v["rev"], l[3].rev.to_string());

    // dev-2 never went offline while its heartbeats ran.
    assert_eq!(lifecycle(&mut conn, &keys, SHARDS, "dev-2").await.len(), 1);
    hb2.abort();
    proj.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_epoch_tcp_down_after_new_connect_keeps_the_device_bound_and_online() {
    let redis = RedisServer::start();
    let prefix = unique_prefix();
    let keys = Keys::new(prefix.clone()).unwrap();
    let mut conn = connect(&redis.url()).await;
    let proj = start(short_config(&redis.url(), &prefix), "proj-1").await;
    let t = now_ms();
    inject(
        &mut conn,
        &keys,
        SHARDS,
        &[
            ev("dev-9", 1, "srv-1", t, connected()).into_entry(),
            ev("dev-9", 2, "srv-2", t + 5, connected()).into_entry(),
            ev("dev-9", 1, "srv-1", t + 10, tcp_down(TcpDownReason::Reset)).into_entry(),
        ],
    )
    .await;
    caught_up(&mut conn, &keys, SHARDS, Duration::from_secs(10)).await;
    wait_state(&conn, &keys, "dev-9", true, "heartbeat_fresh").await;
    let v = view(&mut conn, &keys, "dev-9").await;
    assert_eq!(v["epoch"], "2");
    assert_eq!(v["conn_id"], conn_of("dev-9", 2).to_string());
    assert_eq!(v["server_id"], "srv-2");
    assert!(!v.contains_key("ended"), "{v:?}");
    // The old drop still counts for the policy (score 0.5, at the threshold).
    assert_eq!(v["last_tcp_down_reason"], "reset");
    let srv2: Vec<String> = conn
        .smembers(keys.server_conns(&srv("srv-2")))
        .await
        .unwrap();
    assert_eq!(srv2, vec![conn_of("dev-9", 2).to_string()]);
    let srv1: Vec<String> = conn
        .smembers(keys.server_conns(&srv("srv-1")))
        .await
        .unwrap();
    assert!(srv1.is_empty(), "{srv1:?}");
    let c: Option<String> = conn.get(keys.conn(&conn_of("dev-9", 2))).await.unwrap();
    assert_eq!(c.as_deref(), Some("dev-9"));
    let l = lifecycle(&mut conn, &keys, SHARDS, "dev-9").await;
    assert_eq!(l.len(), 1, "{l:?}");
    assert_eq!(l[0].reason, "connected");
    proj.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_expiry_and_view_ttl() {
    let redis = RedisServer::start();
    let prefix = unique_prefix();
    let keys = Keys::new(prefix.clone()).unwrap();
    let mut conn = connect(&redis.url()).await;
    let proj = start(short_config(&redis.url(), &prefix), "proj-1").await;
    let t = now_ms();
    inject(
        &mut conn,
        &keys,
        SHARDS,
        &[
            ev("dev-d", 1, "srv-1", t, connected()).into_entry(),
            ev("dev-e", 1, "srv-1", t, connected()).into_entry(),
        ],
    )
    .await;
    wait_state(&conn, &keys, "dev-d", true, "heartbeat_fresh").await;
    inject(
        &mut conn,
        &keys,
        SHARDS,
        &[ev("dev-d", 1, "srv-1", now_ms(), EventKind::Disconnected).into_entry()],
    )
    .await;
    wait_state(&conn, &keys, "dev-d", false, "disconnected").await;
    let l = lifecycle(&mut conn, &keys, SHARDS, "dev-d").await;
    assert_eq!(l.last().map(|t| t.reason.as_str()), Some("disconnected"));
    let members: Vec<String> = conn
        .smembers(keys.server_conns(&srv("srv-1")))
        .await
        .unwrap();
    assert_eq!(members, vec![conn_of("dev-e", 1).to_string()]);

    // dev-e: no heartbeat; offline at t + 3 s + 1 ms.
    let l = wait_lifecycle(&conn, &keys, "dev-e", 2).await;
    assert_eq!(l[1].reason, "heartbeat_expired");
    let expiry = t + HB_MS + 1;
    assert!(l[1].at_ms >= expiry && l[1].at_ms <= expiry + 1000, "{l:?}");
    // The views live 2 x the heartbeat timeout; when they expire the
    // indexes forget the devices.
    let ttl: i64 = conn.pttl(keys.device(&phy("dev-e"))).await.unwrap();
    assert!(ttl > 0 && ttl <= 2 * HB_MS, "{ttl}");
    let shard = iot_core::keys::shard_of("dev-e", SHARDS);
    eventually(Duration::from_secs(15), "dev-e forgotten", || {
        let mut conn = conn.clone();
        let keys = keys.clone();
        async move {
            let known: Option<f64> = conn.zscore(keys.known(shard), "dev-e").await.unwrap();
            let due: Option<f64> = conn.zscore(keys.due(shard), "dev-e").await.unwrap();
            let rev: Option<String> = conn.hget(keys.presence_rev(shard), "dev-e").await.unwrap();
            let exists: bool = conn.exists(keys.device(&phy("dev-e"))).await.unwrap();
            if known.is_none() && due.is_none() && rev.is_none() && !exists {
                Ok(())
            } else {
                Err((known, due, rev, exists))
            }
        }
    })
    .await;
    proj.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_is_published_and_bad_entries_are_acknowledged() {
    let redis = RedisServer::start();
    let prefix = unique_prefix();
    let keys = Keys::new(prefix.clone()).unwrap();
    let mut conn = connect(&redis.url()).await;
    let proj = start(short_config(&redis.url(), &prefix), "proj-1").await;
    let t = now_ms();
    let mut entries = Vec::new();
    for i in 0..300 {
        entries.push(ev(&format!("lag-{i}"), 1, "srv-1", t, connected()).into_entry());
    }
    inject(&mut conn, &keys, SHARDS, &entries).await;
    // Garbage: not an entry, no `e` field, and an unknown version.
    let _: String = conn
        .xadd(keys.events(0), "*", &[("e", vec![1u8, 0xc1, 0xff])])
        .await
        .unwrap();
    let _: String = conn.xadd(keys.events(1), "*", &[("x", "1")]).await.unwrap();
    let _: String = conn
        .xadd(keys.events(2), "*", &[("e", vec![9u8, 1])])
        .await
        .unwrap();
    caught_up(&mut conn, &keys, SHARDS, Duration::from_secs(20)).await;
    let after = now_ms();
    let lag = eventually(Duration::from_secs(10), "lag record at 0", || {
        let mut conn = conn.clone();
        let keys = keys.clone();
        async move {
            let f: std::collections::HashMap<String, String> =
                conn.hgetall(keys.projector_lag()).await.unwrap();
            let lag = iot_core::registry::Lag::from_fields(&f);
            if lag.pending == 0 && lag.undelivered == 0 && lag.updated_at_ms > after {
                Ok(lag)
            } else {
                Err(f)
            }
        }
    })
    .await;
    assert_eq!(lag.oldest_age_ms, 0);
    assert_eq!(lag.consumers, 1);
    let online = online_set(&mut conn, &keys, SHARDS).await;
    assert_eq!(online.len(), 300);
    let (_, metrics) =
        iot_test_support::http_get(&proj.http.to_string(), "/metrics").expect("metrics");
    for name in [
        "iot_projector_events_applied_total{kind=\"connected\"}",
        "iot_projector_bad_entries_total",
        "iot_projector_lag_pending_entries",
        "iot_projector_transitions_total{to=\"online\",reason=\"connected\"}",
        "iot_projector_batch_duration_seconds",
        // The command sweeper runs beside the projection.
        "iot_downlink_open_commands{status=\"queued\"} 0",
        "iot_downlink_deadlines 0",
    ] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }
    proj.stop().await;
}

/// Connects `d` (epoch 1) and waits until it is online.
async fn connect_online(conn: &mut ConnectionManager, keys: &Keys, d: &str) -> i64 {
    let t0 = now_ms();
    inject(
        conn,
        keys,
        SHARDS,
        &[ev(d, 1, "srv-1", t0, connected()).into_entry()],
    )
    .await;
    wait_state(conn, keys, d, true, "heartbeat_fresh").await;
    t0
}

/// The view's `last_seen` field as stored (without the seen score).
async fn hash_last_seen(conn: &mut ConnectionManager, keys: &Keys, d: &str) -> Option<i64> {
    conn.hget(keys.device(&phy(d)), "last_seen").await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_only_heartbeats_keeps_its_view_and_connection_key() {
    let redis = RedisServer::start();
    let prefix = unique_prefix();
    let keys = Keys::new(prefix.clone()).unwrap();
    let mut conn = connect(&redis.url()).await;
    let proj = start(short_config(&redis.url(), &prefix), "proj-1").await;
    let d = "dev-hb";
    let t0 = connect_online(&mut conn, &keys, d).await;
    let hb = heartbeats(conn.clone(), keys.clone(), d, 1);
    let conn_key = keys.conn(&conn_of(d, 1));
    // Longer than the TTL (2 x heartbeat timeout) of the connect: only the
    // heartbeats (through the seen set and the due evaluation) keep the
    // view and the connection key alive, and the device online.
    let until = t0 + 2 * HB_MS + 1500;
    let mut beats_aside = false;
    while now_ms() < until {
        let (view_there, key_there): (bool, bool) = redis::pipe()
            .exists(keys.device(&phy(d)))
            .exists(&conn_key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(
            view_there && key_there,
            "view {view_there}, connection key {key_there}"
        );
        assert!(online_set(&mut conn, &keys, SHARDS).await.contains(d));
        let folded: i64 = view(&mut conn, &keys, d).await["last_seen"]
            .parse()
            .unwrap();
        beats_aside |= hash_last_seen(&mut conn, &keys, d).await < Some(folded);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    hb.abort();
    assert!(beats_aside, "heartbeats went to the seen set");
    assert!(
        hash_last_seen(&mut conn, &keys, d).await > Some(t0),
        "the due evaluation folded them into the view"
    );
    let l = lifecycle(&mut conn, &keys, SHARDS, d).await;
    assert_eq!(l.len(), 1, "never offline: {l:?}");
    proj.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_last_heartbeat_the_view_and_connection_key_expire_within_the_ttl() {
    let redis = RedisServer::start();
    let prefix = unique_prefix();
    let keys = Keys::new(prefix.clone()).unwrap();
    let mut conn = connect(&redis.url()).await;
    let proj = start(short_config(&redis.url(), &prefix), "proj-1").await;
    let d = "dev-x";
    let t0 = connect_online(&mut conn, &keys, d).await;
    let hb = heartbeats(conn.clone(), keys.clone(), d, 1);
    // Just after a due evaluation folded the seen score into the view, the
    // device sends its last heartbeat (the next evaluation, a heartbeat
    // timeout later, folds that one in).
    eventually(
        Duration::from_secs(10),
        "an evaluation folded the seen score",
        || {
            let mut conn = conn.clone();
            let keys = keys.clone();
            async move {
                let ls = hash_last_seen(&mut conn, &keys, d).await;
                if ls > Some(t0) { Ok(()) } else { Err(ls) }
            }
        },
    )
    .await;
    hb.abort();
    let _ = hb.await;
    let last = now_ms();
    inject(&mut conn, &keys, SHARDS, &[beats("srv-1", &[(d, 1, last)])]).await;
    eventually(Duration::from_secs(5), "the last heartbeat applied", || {
        let mut conn = conn.clone();
        let keys = keys.clone();
        async move {
            let v = view(&mut conn, &keys, d).await;
            if v.get("last_seen") == Some(&last.to_string()) {
                Ok(())
            } else {
                Err(v)
            }
        }
    })
    .await;

    // Both expire 2 x heartbeat timeout after the last heartbeat, give or
    // take the slack (not a heartbeat timeout later).
    let ttl = 2 * HB_MS;
    let slack = 500;
    let names = [keys.device(&phy(d)), keys.conn(&conn_of(d, 1))];
    let mut gone: [Option<i64>; 2] = [None, None];
    while gone.iter().any(Option::is_none) {
        let before = now_ms();
        let there: (bool, bool) = redis::pipe()
            .exists(&names[0])
            .exists(&names[1])
            .query_async(&mut conn)
            .await
            .unwrap();
        for (i, there) in [there.0, there.1].into_iter().enumerate() {
            if there {
                assert!(
                    before <= last + ttl + slack,
                    "{} still there {} ms after the last heartbeat",
                    names[i],
                    before - last
                );
            } else if gone[i].is_none() {
                gone[i] = Some(before);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (name, at) in names.iter().zip(gone) {
        let after = at.unwrap() - last;
        assert!(
            after >= ttl - slack,
            "{name} gone {after} ms after the last heartbeat"
        );
    }
    let l = lifecycle(&mut conn, &keys, SHARDS, d).await;
    assert_eq!(
        l.iter()
            .map(|t| (t.online, t.reason.as_str()))
            .collect::<Vec<_>>(),
        vec![(true, "connected"), (false, "heartbeat_expired")]
    );
    proj.stop().await;
}

trait IntoEntry {
    fn into_entry(self) -> iot_core::Entry;
}

impl IntoEntry for iot_core::Event {
    fn into_entry(self) -> iot_core::Entry {
        iot_core::Entry::Event(self)
    }
}
