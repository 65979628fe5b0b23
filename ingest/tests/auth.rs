//! Registry authentication (`mqtt.auth: registry`) against a real
//! PostgreSQL: devices registered with `Store::register_device` connect
//! with username = phyID and password = their secret; wrong, unknown and
//! disabled ones get CONNACK 5; a device disabled or deleted while
//! connected is closed within the cache TTL, and at once when a revocation
//! is published on Redis; during a PostgreSQL outage known devices keep
//! connecting and unknown ones get CONNACK 3, both without waiting for the
//! database. Also: the ingest leaves stream trimming to the archiver when
//! PostgreSQL is configured, and, without it, from the moment an archiver
//! marks the archive on (no restart).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Ingest, connect_with_credentials, phy, phy_id, wait_events};
use iot_core::config::AuthMode;
use iot_core::{Config, TcpDownReason};
use iot_mqtt::{ConnectReturnCode, Packet, QoS};
use iot_store::Store;
use iot_test_support::{
    PgServer, RedisServer, TestDb, TestDevice, eventually, publish_packet, unique_prefix,
};
use serde_json::Map;

const TTL: Duration = Duration::from_secs(1);

async fn migrated(url: &str) -> Store {
    let cfg = iot_core::config::DatabaseConfig {
        url: url.to_owned(),
        ..Default::default()
    };
    let store = Store::connect(&cfg).await.expect("connect");
    store.migrate().await.expect("migrate");
    store
}

fn registry_mode(db_url: &str) -> impl FnOnce(&mut Config) {
    let url = db_url.to_owned();
    move |c: &mut Config| {
        c.mqtt.auth = AuthMode::Registry;
        c.mqtt.auth_cache_ttl = TTL;
        c.database.url = url;
        c.database.connect_timeout = Duration::from_secs(1);
    }
}

async fn register(store: &Store, id: &str, enabled: bool) -> String {
    store
        .register_device(&phy_id(id), Map::new(), enabled)
        .await
        .expect("register")
        .1
}

async fn connack(
    ingest: &Ingest,
    id: &str,
    user: Option<&str>,
    pw: Option<&str>,
) -> ConnectReturnCode {
    connect_with_credentials(&ingest.mqtt, id, user, pw.map(str::as_bytes))
        .await
        .1
}

/// The status of check `name` in `/health`.
async fn check(ingest: &Ingest, name: &str) -> String {
    let (_, body) = ingest.health().await;
    body["checks"][name]["status"]
        .as_str()
        .unwrap_or("absent")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_devices_connect_with_their_secret_and_the_rest_are_refused() {
    let db = TestDb::create().await;
    let store = migrated(db.url()).await;
    let redis = RedisServer::start();
    let (good, off, ghost) = (phy("good"), phy("off"), phy("ghost"));
    let secret = register(&store, &good, true).await;
    let off_secret = register(&store, &off, false).await;
    let ingest = Ingest::start(&redis.url(), "auth-srv", registry_mode(db.url())).await;
    assert_eq!(check(&ingest, "database").await, "ok");

    let (mut dev, code) =
        connect_with_credentials(&ingest.mqtt, &good, Some(&good), Some(secret.as_bytes())).await;
    assert_eq!(code, ConnectReturnCode::Accepted);
    dev.ping().await;
    // Within the TTL the cache answers.
    drop(dev);
    let (mut dev, code) =
        connect_with_credentials(&ingest.mqtt, &good, Some(&good), Some(secret.as_bytes())).await;
    assert_eq!(code, ConnectReturnCode::Accepted);
    assert!(
        ingest
            .metric("iot_ingest_auth_cache_total{result=\"hit\"}")
            .await
            >= 1.0
    );

    let refused = [
        (
            good.as_str(),
            Some(good.as_str()),
            Some("not-the-secret"),
            "wrong_secret",
        ),
        (
            ghost.as_str(),
            Some(ghost.as_str()),
            Some(secret.as_str()),
            "unknown_device",
        ),
        (
            off.as_str(),
            Some(off.as_str()),
            Some(off_secret.as_str()),
            "disabled",
        ),
        (
            good.as_str(),
            Some(off.as_str()),
            Some(secret.as_str()),
            "username_mismatch",
        ),
        (good.as_str(), None, None, "missing_credentials"),
    ];
    for (id, user, pw, reason) in refused {
        assert_eq!(
            connack(&ingest, id, user, pw).await,
            ConnectReturnCode::NotAuthorized,
            "{reason}"
        );
        let series = format!("iot_ingest_auth_failures_total{{reason=\"{reason}\"}}");
        assert!(ingest.metric(&series).await >= 1.0, "{series}");
    }
    // The good device was not disturbed by the others (a wrong guess does
    // not push out its cache entry), and connects again.
    dev.ping().await;
    drop(dev);
    assert_eq!(
        connack(&ingest, &good, Some(&good), Some(&secret)).await,
        ConnectReturnCode::Accepted
    );
    assert!(
        ingest
            .metric("iot_ingest_connects_refused_total{reason=\"not_authorized\"}")
            .await
            >= 5.0
    );
    ingest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_failures_from_one_address_are_slowed_down() {
    let db = TestDb::create().await;
    let _store = migrated(db.url()).await;
    let redis = RedisServer::start();
    let ingest = Ingest::start(&redis.url(), "slow-srv", registry_mode(db.url())).await;
    let id = phy("guess");
    let mut took = Vec::new();
    for _ in 0..5 {
        let started = std::time::Instant::now();
        let code = connack(&ingest, &id, Some(&id), Some("guess")).await;
        assert_eq!(code, ConnectReturnCode::NotAuthorized);
        took.push(started.elapsed());
    }
    // 0, 100, 200, 400, 800 ms of added delay.
    assert!(took[4] >= Duration::from_millis(800), "{took:?}");
    assert!(took[4] > took[1], "{took:?}");
    ingest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_disabled_or_deleted_while_connected_are_closed_within_the_cache_ttl() {
    let db = TestDb::create().await;
    let store = migrated(db.url()).await;
    let redis = RedisServer::start();
    let (disabled, deleted, kept) = (phy("dis"), phy("del"), phy("kept"));
    let mut secrets = Vec::new();
    for id in [&disabled, &deleted, &kept] {
        secrets.push(register(&store, id, true).await);
    }
    let ingest = Ingest::start(&redis.url(), "rev-srv", registry_mode(db.url())).await;
    let mut devices = Vec::new();
    for (id, secret) in [&disabled, &deleted, &kept].into_iter().zip(&secrets) {
        let (d, code) =
            connect_with_credentials(&ingest.mqtt, id, Some(id), Some(secret.as_bytes())).await;
        assert_eq!(code, ConnectReturnCode::Accepted);
        devices.push(d);
    }
    store
        .update_device(&phy_id(&disabled), Some(false), None)
        .await
        .unwrap();
    assert!(store.delete_device(&phy_id(&deleted)).await.unwrap());

    // Within the TTL (one re-check), plus a margin for a loaded machine.
    devices[0].closed_within(TTL * 4).await;
    devices[1].closed_within(TTL * 4).await;
    devices[2].ping().await;
    let conn = ingest.redis().await;
    for id in [&disabled, &deleted] {
        wait_events(&conn, &ingest.keys, id, "tcp_down(revoked)", |ev| {
            common::has_tcp_down(ev, TcpDownReason::Revoked)
        })
        .await;
    }
    assert!(ingest.metric("iot_ingest_auth_revoked_total").await >= 2.0);
    // And refused at the next connect.
    assert_eq!(
        connack(&ingest, &disabled, Some(&disabled), Some(&secrets[0])).await,
        ConnectReturnCode::NotAuthorized
    );
    assert_eq!(
        connack(&ingest, &deleted, Some(&deleted), Some(&secrets[1])).await,
        ConnectReturnCode::NotAuthorized
    );
    devices[2].ping().await;
    ingest.stop().await.unwrap();
}

/// Waits until someone (the ingest) listens on the revocation channel.
async fn revocations_subscribed(ingest: &Ingest) {
    let conn = ingest.redis().await;
    let channel = ingest.keys.auth_revocations();
    eventually(
        Duration::from_secs(10),
        "revocation channel subscribed",
        || {
            let mut conn = conn.clone();
            let channel = channel.clone();
            async move {
                let (_, n): (String, u64) = redis::cmd("PUBSUB")
                    .arg("NUMSUB")
                    .arg(&channel)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| e.to_string())?;
                if n >= 1 { Ok(()) } else { Err(n.to_string()) }
            }
        },
    )
    .await;
}

async fn publish_revocation(ingest: &Ingest, id: &str, why: &str) {
    let mut conn = ingest.redis().await;
    let msg = iot_core::control::Revocation {
        phy_id: phy_id(id),
        why: why.into(),
    };
    let _: u64 = redis::cmd("PUBLISH")
        .arg(ingest.keys.auth_revocations())
        .arg(msg.encode())
        .query_async(&mut conn)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_revocation_closes_the_device_at_once_and_empties_its_cache_entry() {
    let db = TestDb::create().await;
    let store = migrated(db.url()).await;
    let redis = RedisServer::start();
    let (disabled, deleted, kept) = (phy("pdis"), phy("pdel"), phy("pkept"));
    let mut secrets = Vec::new();
    for id in [&disabled, &deleted, &kept] {
        secrets.push(register(&store, id, true).await);
    }
    // A long TTL: the periodic re-check cannot be what closes them.
    let long = Duration::from_secs(60);
    let url = db.url().to_owned();
    let ingest = Ingest::start(&redis.url(), "pubrev-srv", move |c| {
        registry_mode(&url)(c);
        c.mqtt.auth_cache_ttl = long;
    })
    .await;
    revocations_subscribed(&ingest).await;
    let mut devices = Vec::new();
    for (id, secret) in [&disabled, &deleted, &kept].into_iter().zip(&secrets) {
        let (d, code) =
            connect_with_credentials(&ingest.mqtt, id, Some(id), Some(secret.as_bytes())).await;
        assert_eq!(code, ConnectReturnCode::Accepted);
        devices.push(d);
    }
    store
        .update_device(&phy_id(&disabled), Some(false), None)
        .await
        .unwrap();
    assert!(store.delete_device(&phy_id(&deleted)).await.unwrap());
    let started = std::time::Instant::now();
    publish_revocation(&ingest, &disabled, "disabled").await;
    publish_revocation(&ingest, &deleted, "deleted").await;
    devices[0].closed_within(Duration::from_secs(1)).await;
    devices[1].closed_within(Duration::from_secs(1)).await;
    assert!(started.elapsed() < Duration::from_secs(1));
    devices[2].ping().await;
    let conn = ingest.redis().await;
    for id in [&disabled, &deleted] {
        wait_events(&conn, &ingest.keys, id, "tcp_down(revoked)", |ev| {
            common::has_tcp_down(ev, TcpDownReason::Revoked)
        })
        .await;
    }
    // The fresh cached "valid" is gone: refused at once, well within the TTL.
    for (id, secret) in [(&disabled, &secrets[0]), (&deleted, &secrets[1])] {
        let started = std::time::Instant::now();
        assert_eq!(
            connack(&ingest, id, Some(id), Some(secret)).await,
            ConnectReturnCode::NotAuthorized
        );
        assert!(started.elapsed() < Duration::from_secs(1));
    }
    // A revocation of a device not connected here, or garbage, is harmless.
    publish_revocation(&ingest, "nobody-here", "deleted").await;
    let mut raw = ingest.redis().await;
    let _: u64 = redis::cmd("PUBLISH")
        .arg(ingest.keys.auth_revocations())
        .arg(b"\x09junk".as_slice())
        .query_async(&mut raw)
        .await
        .unwrap();
    devices[2].ping().await;
    ingest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_a_postgres_outage_known_devices_connect_and_unknown_ones_wait() {
    let mut pg = tokio::task::spawn_blocking(PgServer::start).await.unwrap();
    let store = migrated(&pg.url()).await;
    let redis = RedisServer::start();
    let (known, stranger, late) = (phy("known"), phy("stranger"), phy("late"));
    let secret = register(&store, &known, true).await;
    let ingest = Ingest::start(&redis.url(), "pgout-srv", registry_mode(&pg.url())).await;

    let (mut dev, code) =
        connect_with_credentials(&ingest.mqtt, &known, Some(&known), Some(secret.as_bytes())).await;
    assert_eq!(code, ConnectReturnCode::Accepted);
    dev.send(&Packet::Disconnect).await;
    drop(dev);

    let mut pg = tokio::task::spawn_blocking(move || {
        pg.stop();
        pg
    })
    .await
    .unwrap();
    eventually(Duration::from_secs(10), "database degraded", || async {
        let (code, body) = ingest.health().await;
        match (code, body["checks"]["database"]["status"].as_str()) {
            (503, Some("degraded")) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // Past the TTL: the cache entry is stale, PostgreSQL cannot answer.
    tokio::time::sleep(TTL).await;
    // Nobody waits for the database (its pool would wait the connect
    // timeout, 1 s, on every check): the cache answers at once.
    let fast = Duration::from_millis(500);
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let (mut dev, code) =
            connect_with_credentials(&ingest.mqtt, &known, Some(&known), Some(secret.as_bytes()))
                .await;
        let took = started.elapsed();
        assert_eq!(
            code,
            ConnectReturnCode::Accepted,
            "known: cached credentials"
        );
        assert!(took < fast, "a known device waited {took:?}");
        dev.send(&Packet::Disconnect).await;
        let started = std::time::Instant::now();
        assert_eq!(
            connack(&ingest, &stranger, Some(&stranger), Some("whatever")).await,
            ConnectReturnCode::ServerUnavailable,
            "unknown: cannot be checked"
        );
        let took = started.elapsed();
        assert!(took < fast, "an unknown device waited {took:?}");
    }
    let (mut dev, code) =
        connect_with_credentials(&ingest.mqtt, &known, Some(&known), Some(secret.as_bytes())).await;
    assert_eq!(code, ConnectReturnCode::Accepted);
    assert!(
        ingest
            .metric("iot_ingest_auth_cache_total{result=\"stale\"}")
            .await
            >= 1.0
    );
    // The re-check cannot run: nobody is disconnected for it.
    tokio::time::sleep(TTL * 2).await;
    dev.ping().await;

    let pg = tokio::task::spawn_blocking(move || {
        pg.start_again();
        pg
    })
    .await
    .unwrap();
    eventually(Duration::from_secs(20), "database ok again", || async {
        match check(&ingest, "database").await.as_str() {
            "ok" => Ok(()),
            other => Err(other.to_owned()),
        }
    })
    .await;
    // Registered now (the database answers): it connects; strangers are
    // refused as unknown.
    let late_secret = register(&store, &late, true).await;
    assert_eq!(
        connack(&ingest, &late, Some(&late), Some(&late_secret)).await,
        ConnectReturnCode::Accepted
    );
    assert_eq!(
        connack(&ingest, &stranger, Some(&stranger), Some("whatever")).await,
        ConnectReturnCode::NotAuthorized
    );
    dev.ping().await;
    ingest.stop().await.unwrap();
    drop(pg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_mode_refuses_to_start_without_a_database_or_with_missing_migrations() {
    let redis = RedisServer::start();
    let db = TestDb::create().await; // no migrations applied
    for (url, needle) in [("", "database.url"), (db.url(), "iot-api migrate")] {
        let mut cfg = common::config(&redis.url(), "noauth-srv");
        registry_mode(url)(&mut cfg);
        let token = tokio_util::sync::CancellationToken::new();
        let ctx = iot_service::startup::Context::start(cfg, token.clone())
            .await
            .expect("context");
        let mqtt = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let run = ingest::run(ctx, mqtt, http);
        let err = tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .expect("returns at once")
            .expect_err("refuses to start");
        let msg = format!("{err:#}");
        assert!(msg.contains("mqtt.auth") && msg.contains(needle), "{msg}");
        token.cancel();
    }
}

/// Entries in every shard of the events stream under `keys`.
async fn stream_len(conn: &mut redis::aio::MultiplexedConnection, keys: &iot_core::Keys) -> u64 {
    let mut n = 0;
    for shard in 0..common::SHARDS {
        let len: u64 = redis::cmd("XLEN")
            .arg(keys.events(shard))
            .query_async(conn)
            .await
            .unwrap();
        n += len;
    }
    n
}

/// Sends `n` QoS 0 uplinks, then one QoS 1 and waits for its PUBACK (the
/// writer keeps a device's order: all are written then).
async fn uplinks(mqtt: &str, n: usize) {
    let id = phy("chatty");
    let mut dev = TestDevice::connected(mqtt, &id, 60).await;
    let topic = format!("devices/{id}/up/t");
    for _ in 0..n {
        dev.send(&publish_packet(&topic, b"x", QoS::AtMostOnce, 0))
            .await;
    }
    dev.send(&publish_packet(&topic, b"last", QoS::AtLeastOnce, 1))
        .await;
    match dev.recv(Duration::from_secs(10)).await {
        Some(Packet::PubAck(a)) => assert_eq!(a.pkid, 1),
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_archive_configured_streams_are_left_to_the_archiver_to_trim() {
    let redis = RedisServer::start();
    let db = TestDb::create().await;
    let n = 450;
    let mut lens = Vec::new();
    for archive in [false, true] {
        let prefix = unique_prefix();
        let url = db.url().to_owned();
        let ingest = Ingest::start(&redis.url(), "trim-srv", move |c| {
            c.redis.key_prefix = prefix;
            c.streams.maxlen = 1;
            c.streams.shards = common::SHARDS;
            if archive {
                c.database.url = url;
            }
        })
        .await;
        uplinks(&ingest.mqtt, n).await;
        let mut conn = ingest.redis().await;
        lens.push(stream_len(&mut conn, &ingest.keys).await);
        ingest.stop().await.unwrap();
    }
    // connected + n + 1 uplinks
    let written = n as u64 + 2;
    assert!(lens[0] < written, "MAXLEN ~ 1 trims: {lens:?}");
    assert!(
        lens[1] >= written,
        "nothing trimmed by the ingest: {lens:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_ingest_stops_capping_once_an_archiver_marks_the_archive_on() {
    let redis = RedisServer::start();
    let mut conn = common::redis_conn(&redis.url()).await;
    // Ten entries per node: `MAXLEN ~ 1` keeps at most ten per shard.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("stream-node-max-entries")
        .arg(10)
        .query_async(&mut conn)
        .await
        .unwrap();
    let capped_bound = 10 * u64::from(common::SHARDS);
    let prefix = unique_prefix();
    // Open mode, no `database.url`, no archiver yet: the ingest caps.
    let ingest = Ingest::start(&redis.url(), "cap-srv", move |c| {
        c.redis.key_prefix = prefix;
        c.streams.maxlen = 1;
        c.streams.shards = common::SHARDS;
    })
    .await;
    uplinks(&ingest.mqtt, 200).await;
    let capped = stream_len(&mut conn, &ingest.keys).await;
    assert!(capped <= capped_bound, "MAXLEN ~ 1 trims: {capped}");

    // An archiver marks the archive on: within a re-read of the marker the
    // running ingest writes without MAXLEN, and the streams keep growing.
    iot_store::trim::mark_archive_on(&mut conn, &ingest.keys)
        .await
        .unwrap();
    let (mqtt, keys, probe) = (ingest.mqtt.as_str(), &ingest.keys, conn.clone());
    let grown = eventually(
        iot_service::startup::ARCHIVER_POLL * 10,
        "the ingest stops capping the event streams",
        move || {
            let mut conn = probe.clone();
            async move {
                uplinks(mqtt, 100).await;
                let len = stream_len(&mut conn, keys).await;
                if len > 2 * capped_bound + 100 {
                    Ok(len)
                } else {
                    Err(len)
                }
            }
        },
    )
    .await;
    assert!(grown > capped_bound, "{grown}");
    ingest.stop().await.unwrap();
}
