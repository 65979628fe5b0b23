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
    assert!(first.epoch < second.epoch, "{first:?} {second:?}");
    let down = takeover_of(&events).unwrap();
    assert_eq!(down.conn_id, first.conn_id, "the old connection went down");
    assert_eq!(down.epoch, first.epoch, "with its own, lower epoch");
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
    assert_eq!(owner, format!("tk-srv-1 {}", second.epoch));
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
                    .any(|e| e.kind.name() == "connected" && e.server_id.as_str() == "tk-srv-b")
        },
    )
    .await;
    let old = events
        .iter()
        .find(|e| e.kind.name() == "connected" && e.server_id.as_str() == "tk-srv-a")
        .expect("the old connection's connected event");
    let down = takeover_of(&events).unwrap();
    assert_eq!(down.server_id.as_str(), "tk-srv-a");
    assert_eq!(down.epoch, old.epoch, "with its own epoch");
    let new = events
        .iter()
        .find(|e| e.kind.name() == "connected" && e.server_id.as_str() == "tk-srv-b")
        .expect("the new connection's connected event");
    assert!(new.epoch > down.epoch, "the newer connection outranks it");
    assert_ne!(new.conn_id, down.conn_id);
    let b_epoch = new.epoch;
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
                && e.epoch == b_epoch
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

    let t0 = iot_core::time::now_us();
    let claim = takeover.claim(&pool, &a).await.unwrap();
    assert_eq!(claim.previous, None);
    assert!(
        claim.epoch >= t0,
        "a first epoch is the clock in µs: {}",
        claim.epoch
    );
    let again = takeover.claim(&pool, &a).await.unwrap();
    assert!(again.epoch > claim.epoch);
    assert_eq!(
        again.previous,
        Some(Owner {
            server_id: me.clone(),
            epoch: claim.epoch
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
    // `a` is held by its newest epoch (renewed), `b` is not held with epoch
    // 7 here.
    takeover
        .renew(&pool, &[(a.clone(), again.epoch), (b.clone(), 7)])
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_epoch_never_goes_back_even_when_redis_loses_the_counter() {
    use ingest::takeover::{Reclaim, Takeover};
    let redis = RedisServer::start();
    let cfg = common::config(&redis.url(), "tk-srv-e");
    let pool = iot_service::RedisPool::connect(&cfg.redis).await.unwrap();
    let keys = cfg.keys();
    let me = iot_core::ServerId::new("tk-srv-e").unwrap();
    let takeover = Takeover::new(keys.clone(), me.clone(), Duration::from_secs(60));
    let id = common::phy_id(&phy("lost-counter"));
    let first = takeover.claim(&pool, &id).await.unwrap();

    // Redis lost the counter (a restart without persistence, a failover that
    // dropped the last writes): it is back at a small value, or gone.
    let mut conn = common::redis_conn(&redis.url()).await;
    let _: () = redis::cmd("SET")
        .arg(keys.epoch(&id))
        .arg(3)
        .query_async(&mut conn)
        .await
        .unwrap();
    let second = takeover.claim(&pool, &id).await.unwrap();
    assert!(second.epoch > first.epoch, "{second:?} after {first:?}");
    let _: () = redis::cmd("DEL")
        .arg(keys.epoch(&id))
        .arg(keys.owner(&id))
        .query_async(&mut conn)
        .await
        .unwrap();
    let third = takeover.claim(&pool, &id).await.unwrap();
    assert!(third.epoch > second.epoch, "{third:?} after {second:?}");

    // Re-claiming: the connection that holds the owner key (or a lost one)
    // gets a new, higher epoch; a connection a newer one superseded does not.
    let verdicts = takeover
        .reclaim(&pool, &[(id.clone(), third.epoch)])
        .await
        .unwrap();
    let Reclaim::Renewed(fourth) = verdicts[0] else {
        panic!("expected a renewal, got {verdicts:?}");
    };
    assert!(fourth > third.epoch);
    let owner: String = redis::cmd("GET")
        .arg(keys.owner(&id))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(owner, format!("tk-srv-e {fourth}"));
    let verdicts = takeover
        .reclaim(&pool, &[(id.clone(), third.epoch)])
        .await
        .unwrap();
    assert!(
        matches!(&verdicts[0], Reclaim::Superseded(Some(o)) if o.epoch == fourth),
        "an older connection is not given the device back: {verdicts:?}"
    );
}
