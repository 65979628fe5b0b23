//! Session takeover: a second CONNECT of a phyID closes the older
//! connection, on the same instance or on another one (through a kick on
//! Redis Pub/Sub); the old connection's tcp_down says `takeover` and carries
//! its own, lower epoch.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Ingest, kinds, phy, wait_events};
use iot_core::{Event, EventKind, TcpDownReason};
use iot_test_support::{RedisServer, TestDevice};

fn takeover_of(events: &[Event]) -> Option<&Event> {
    events.iter().find(|e| {
        e.kind
            == EventKind::TcpDown {
                reason: TcpDownReason::Takeover,
            }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connect_on_the_same_instance_takes_over() {
    let redis = RedisServer::start();
    let ingest = Ingest::start(&redis.url(), "tk-srv-1", |_| {}).await;
    let conn = ingest.redis().await;
    let id = phy("twin");

    let mut old = TestDevice::connected(&ingest.mqtt, &id, 30).await;
    let mut new = TestDevice::connected(&ingest.mqtt, &id, 30).await;
    old.closed_within(Duration::from_secs(3)).await;
    new.ping().await;

    let events = wait_events(
        &conn,
        &ingest.keys,
        &id,
        "tcp_down(takeover) and both connected",
        |ev| {
            takeover_of(ev).is_some()
                && ev.iter().filter(|e| e.kind.name() == "connected").count() == 2
        },
    )
    .await;
    let connected: Vec<&Event> = events
        .iter()
        .filter(|e| e.kind.name() == "connected")
        .collect();
    assert_eq!(connected.len(), 2, "{:?}", kinds(&events));
    let (first, second) = if connected[0].epoch < connected[1].epoch {
        (connected[0], connected[1])
    } else {
        (connected[1], connected[0])
    };
    assert_eq!((first.epoch, second.epoch), (1, 2));
    let down = takeover_of(&events).unwrap();
    assert_eq!(down.conn_id, first.conn_id, "the old connection went down");
    assert_eq!(down.epoch, 1, "with its own, lower epoch");
    assert_eq!(down.server_id, ingest.server_id);
    assert!(
        !events
            .iter()
            .any(|e| e.conn_id == second.conn_id && e.kind.name() == "tcp_down"),
        "the new connection stays"
    );
    assert!(
        ingest
            .metric("iot_ingest_takeovers_total{scope=\"local\"}")
            .await
            >= 1.0
    );

    // The owner key names the new connection.
    let mut c = conn.clone();
    let owner: String = redis::cmd("GET")
        .arg(ingest.keys.owner(&common::phy_id(&id)))
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(owner, format!("tk-srv-1 2"));
    ingest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_on_another_instance_kicks_the_old_connection() {
    let redis = RedisServer::start();
    let a = Ingest::start(&redis.url(), "tk-srv-a", |_| {}).await;
    let b = Ingest::start(&redis.url(), "tk-srv-b", |_| {}).await;
    let conn = a.redis().await;
    let id = phy("roamer");

    let mut on_a = TestDevice::connected(&a.mqtt, &id, 30).await;
    on_a.ping().await;
    let mut on_b = TestDevice::connected(&b.mqtt, &id, 30).await;
    on_a.closed_within(Duration::from_secs(3)).await;
    on_b.ping().await;

    // Two instances write these: either may land first.
    let events = wait_events(
        &conn,
        &a.keys,
        &id,
        "tcp_down(takeover) from srv-a and connected from srv-b",
        |ev| {
            takeover_of(ev).is_some()
                && ev
                    .iter()
                    .any(|e| e.kind.name() == "connected" && e.epoch == 2)
        },
    )
    .await;
    let down = takeover_of(&events).unwrap();
    assert_eq!(down.server_id.as_str(), "tk-srv-a");
    assert_eq!(down.epoch, 1);
    let new = events
        .iter()
        .find(|e| e.kind.name() == "connected" && e.epoch == 2)
        .expect("the new connection's connected event");
    assert_eq!(new.server_id.as_str(), "tk-srv-b");
    assert_ne!(new.conn_id, down.conn_id);
    assert!(
        a.metric("iot_ingest_takeovers_total{scope=\"remote\"}")
            .await
            >= 1.0
    );

    // And back: a third CONNECT on A kicks B's.
    let mut back_on_a = TestDevice::connected(&a.mqtt, &id, 30).await;
    on_b.closed_within(Duration::from_secs(3)).await;
    back_on_a.ping().await;
    wait_events(&conn, &a.keys, &id, "B's takeover", |ev| {
        ev.iter().any(|e| {
            e.server_id.as_str() == "tk-srv-b"
                && e.epoch == 2
                && e.kind
                    == EventKind::TcpDown {
                        reason: TcpDownReason::Takeover,
                    }
        })
    })
    .await;
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_keys_are_renewed_only_for_the_connection_they_name() {
    use ingest::takeover::{Owner, Takeover};
    let redis = RedisServer::start();
    let cfg = common::config(&redis.url(), "tk-srv-r");
    let pool = iot_service::RedisPool::connect(&cfg.redis).await.unwrap();
    let keys = cfg.keys();
    let me = iot_core::ServerId::new("tk-srv-r").unwrap();
    let takeover = Takeover::new(keys.clone(), me.clone(), Duration::from_secs(60));
    let (a, b) = (common::phy_id(&phy("own-a")), common::phy_id(&phy("own-b")));

    let claim = takeover.claim(&pool, &a).await.unwrap();
    assert_eq!((claim.epoch, claim.previous), (1, None));
    let again = takeover.claim(&pool, &a).await.unwrap();
    assert_eq!(again.epoch, 2);
    assert_eq!(
        again.previous,
        Some(Owner {
            server_id: me.clone(),
            epoch: 1
        })
    );
    takeover.claim(&pool, &b).await.unwrap();

    let mut conn = common::redis_conn(&redis.url()).await;
    for phy in [&a, &b] {
        let _: () = redis::cmd("PEXPIRE")
            .arg(keys.owner(phy))
            .arg(5_000)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    // `a` is held by epoch 2 (renewed), `b` is not held with epoch 7 here.
    takeover
        .renew(&pool, &[(a.clone(), 2), (b.clone(), 7)])
        .await
        .unwrap();
    let ttl = |phy: iot_core::PhyId| {
        let mut conn = conn.clone();
        let key = keys.owner(&phy);
        async move {
            redis::cmd("PTTL")
                .arg(key)
                .query_async::<i64>(&mut conn)
                .await
                .unwrap()
        }
    };
    assert!(ttl(a.clone()).await > 50_000, "renewed");
    assert!(
        ttl(b.clone()).await <= 5_000,
        "another connection's key is left alone"
    );
    // The epoch counter never expires.
    let epoch_ttl: i64 = redis::cmd("PTTL")
        .arg(keys.epoch(&a))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(epoch_ttl, -1);
}
