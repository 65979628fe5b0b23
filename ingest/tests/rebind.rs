//! An instance whose sessions the shared state lost announces them again.
//!
//! - Cut off from Redis for longer than its liveness TTL (a partition: the
//!   ingest reaches Redis through a proxy the test cuts, the projector
//!   directly), an ingest is reaped: its devices get `tcp_down(server_lost)`
//!   although their connections are up. Back in touch, it finds its
//!   liveness key gone and re-announces every connection with a new epoch:
//!   the views bind them to it again and they are online. A device that
//!   connected to another instance meanwhile is not taken back: its old
//!   connection is closed as a takeover.
//! - Redis restarted empty (no persistence): the views, owner keys and epoch
//!   counters are gone; the ingest re-announces its connections, with epochs
//!   above the lost ones (the epoch is floored at the clock in µs).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{Client, Ingest, Projector, phy, phy_id, redis_conn};
use iot_core::{Config, Keys, ServerId};
use iot_test_support::{RedisServer, TcpProxy, eventually};

fn tune(c: &mut Config) {
    c.session.liveness_ttl = Duration::from_secs(1);
    c.projector.reaper_interval = Duration::from_millis(200);
}

type View = HashMap<String, String>;

/// Waits for the view of `id` to satisfy `ok`.
async fn wait_view(
    redis: &redis::aio::MultiplexedConnection,
    keys: &Keys,
    id: &str,
    what: &str,
    ok: impl Fn(&View) -> bool,
) -> View {
    let key = keys.device(&phy_id(id));
    eventually(Duration::from_secs(20), what, || {
        let mut redis = redis.clone();
        let key = key.clone();
        let ok = &ok;
        async move {
            let v: View = match redis::cmd("HGETALL")
                .arg(&key)
                .query_async(&mut redis)
                .await
            {
                Ok(v) => v,
                Err(e) => return Err(format!("{e}")),
            };
            if ok(&v) { Ok(v) } else { Err(format!("{v:?}")) }
        }
    })
    .await
}

fn field<'a>(v: &'a View, name: &str) -> &'a str {
    v.get(name).map(String::as_str).unwrap_or("")
}

fn epoch(v: &View) -> u64 {
    field(v, "epoch").parse().unwrap_or(0)
}

fn bound_to(v: &View, server: &str) -> bool {
    field(v, "server_id") == server && field(v, "ended").is_empty() && field(v, "online") == "1"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reaped_instance_announces_its_sessions_again_when_redis_is_back_in_reach() {
    let redis = RedisServer::start();
    let proxy = TcpProxy::start(&redis.addr()).await;
    let a = Ingest::start(&proxy.redis_url(), "rb-a", tune).await;
    let b = Ingest::start(&redis.url(), "rb-b", tune).await;
    let projector = Projector::start(&redis.url(), "rb-proj", tune).await;
    let conn = redis_conn(&redis.url()).await;
    let keys = a.keys.clone();

    let stay = phy("stay");
    let moved = phy("moved");
    let keepalive = Duration::from_secs(1);
    let _stay_dev = Client::connect(&a.mqtt, &stay, keepalive).await;
    let mut moved_old = Client::connect(&a.mqtt, &moved, keepalive).await;
    let before = wait_view(&conn, &keys, &stay, "stay bound to rb-a", |v| {
        bound_to(v, "rb-a")
    })
    .await;
    wait_view(&conn, &keys, &moved, "moved bound to rb-a", |v| {
        bound_to(v, "rb-a")
    })
    .await;

    // The partition: rb-a cannot reach Redis; its liveness key lapses and
    // the projector reaps it.
    proxy.cut();
    wait_view(&conn, &keys, &stay, "stay reaped as server_lost", |v| {
        field(v, "ended") == "server_lost" && epoch(v) == epoch(&before)
    })
    .await;
    // Meanwhile `moved` connects to rb-b; the kick to rb-a is lost.
    let _moved_new = Client::connect(&b.mqtt, &moved, keepalive).await;
    let moved_view = wait_view(&conn, &keys, &moved, "moved bound to rb-b", |v| {
        bound_to(v, "rb-b")
    })
    .await;

    proxy.restore();
    let after = wait_view(
        &conn,
        &keys,
        &stay,
        "stay announced again by rb-a with a new epoch",
        |v| bound_to(v, "rb-a") && epoch(v) > epoch(&before),
    )
    .await;
    assert_eq!(
        field(&after, "conn_id"),
        field(&before, "conn_id"),
        "the same connection, announced again"
    );
    let mut c = conn.clone();
    let owner: String = redis::cmd("GET")
        .arg(keys.owner(&phy_id(&stay)))
        .query_async(&mut c)
        .await
        .expect("owner key");
    assert_eq!(owner, format!("rb-a {}", epoch(&after)));
    let server_a = ServerId::new("rb-a").expect("valid");
    let set = keys.server_conns(&server_a);
    let conn_id = field(&after, "conn_id").to_owned();
    eventually(
        Duration::from_secs(10),
        "the connection in rb-a's set again",
        || {
            let mut c = c.clone();
            let (set, conn_id) = (set.clone(), conn_id.clone());
            async move {
                let members: Vec<String> = redis::cmd("SMEMBERS")
                    .arg(&set)
                    .query_async(&mut c)
                    .await
                    .map_err(|e| e.to_string())?;
                if members.contains(&conn_id) {
                    Ok(())
                } else {
                    Err(format!("{members:?}"))
                }
            }
        },
    )
    .await;

    // The device that moved stays with rb-b; its old connection is closed.
    let why = moved_old.ended(Duration::from_secs(10)).await;
    assert!(!why.is_empty());
    let still = wait_view(&conn, &keys, &moved, "moved still on rb-b", |v| {
        bound_to(v, "rb-b")
    })
    .await;
    assert_eq!(
        epoch(&still),
        epoch(&moved_view),
        "rb-a did not take it back"
    );

    assert!(a.metric("iot_ingest_liveness_lapses_total").await >= 1.0);
    assert!(
        a.metric("iot_ingest_reannounced_sessions_total{result=\"renewed\"}")
            .await
            >= 1.0
    );
    assert!(
        a.metric("iot_ingest_reannounced_sessions_total{result=\"superseded\"}")
            .await
            >= 1.0
    );
    assert!(
        a.metric("iot_ingest_takeovers_total{scope=\"rebind\"}")
            .await
            >= 1.0
    );

    projector.stop().await;
    b.stop().await.expect("rb-b stops");
    a.stop().await.expect("rb-a stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_redis_comes_back_empty_the_sessions_are_announced_again() {
    let mut redis = RedisServer::start();
    let a = Ingest::start(&redis.url(), "rb-empty", tune).await;
    let projector = Projector::start(&redis.url(), "rb-empty-proj", tune).await;
    let keys = a.keys.clone();
    let id = phy("survivor");
    let _dev = Client::connect(&a.mqtt, &id, Duration::from_secs(1)).await;
    let conn = redis_conn(&redis.url()).await;
    let before = wait_view(&conn, &keys, &id, "bound to rb-empty", |v| {
        bound_to(v, "rb-empty")
    })
    .await;
    assert!(
        epoch(&before) >= 1_600_000_000_000_000,
        "epochs are floored at the clock in µs: {before:?}"
    );
    drop(conn);

    // No persistence: everything is gone after the restart.
    redis.stop();
    redis.start_again();
    let conn = redis_conn(&redis.url()).await;
    let after = wait_view(
        &conn,
        &keys,
        &id,
        "announced again into the empty Redis",
        |v| bound_to(v, "rb-empty") && epoch(v) > epoch(&before),
    )
    .await;
    assert_eq!(field(&after, "conn_id"), field(&before, "conn_id"));
    let mut c = conn.clone();
    let owner: String = redis::cmd("GET")
        .arg(keys.owner(&phy_id(&id)))
        .query_async(&mut c)
        .await
        .expect("owner key is back");
    assert_eq!(owner, format!("rb-empty {}", epoch(&after)));

    projector.stop().await;
    a.stop().await.expect("ingest stops");
}
