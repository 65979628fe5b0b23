//! Graceful shutdown of the binary: SIGTERM with devices connected closes
//! them with tcp_down(server_shutdown), flushes, removes the instance's
//! keys and exits 0 within the grace period.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{events_of, phy, phy_id};
use iot_core::{EventKind, Keys, ServerId, TcpDownReason};
use iot_test_support::{RedisServer, ServiceProcess, TestDevice, free_port};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_devices_flushes_and_cleans_up_within_the_grace_period() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mqtt = format!("127.0.0.1:{}", free_port());
    let http = format!("127.0.0.1:{}", free_port());
    let shards = common::SHARDS.to_string();
    let svc = ServiceProcess::spawn(
        env!("CARGO_BIN_EXE_iot-ingest"),
        &[],
        &[
            ("REDIS_URL", url.as_str()),
            ("IOT_MQTT_LISTEN", mqtt.as_str()),
            ("IOT_HTTP_LISTEN", http.as_str()),
            ("SERVER_ID", "shut-srv-1"),
            ("IOT_SHUTDOWN_GRACE", "3s"),
            ("IOT_STREAMS_SHARDS", shards.as_str()),
        ],
    );
    let svc_http = http.clone();
    let svc = tokio::task::spawn_blocking(move || {
        let mut svc = svc;
        svc.wait_http_ok(&svc_http, "/health", Duration::from_secs(30));
        svc
    })
    .await
    .unwrap();

    let keys = Keys::default();
    let server = ServerId::new("shut-srv-1").unwrap();
    let mut conn = common::redis_conn(&url).await;
    let ids: Vec<String> = (0..3).map(|i| phy(&format!("sd{i}"))).collect();
    let mut devices = Vec::new();
    for id in &ids {
        let mut d = TestDevice::connected(&mqtt, id, 60).await;
        d.ping().await;
        devices.push(d);
    }
    // What the projector would have built: the instance's connection set.
    let _: () = redis::cmd("SADD")
        .arg(keys.server_conns(&server))
        .arg("some-conn")
        .query_async(&mut conn)
        .await
        .unwrap();
    let live: bool = redis::cmd("EXISTS")
        .arg(keys.liveness(&server))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(live, "liveness key while running");

    let started = Instant::now();
    svc.terminate();
    let status = tokio::task::spawn_blocking(move || {
        let mut svc = svc;
        let status = svc.wait_exit(Duration::from_secs(10));
        (status, svc)
    })
    .await
    .unwrap();
    let took = started.elapsed();
    let (status, svc) = status;
    let status = status.unwrap_or_else(|| panic!("no exit; stderr:\n{}", svc.stderr()));
    assert!(status.success(), "exit {status}; stderr:\n{}", svc.stderr());
    assert!(
        took < Duration::from_secs(3) + Duration::from_millis(1500),
        "took {took:?} for a 3 s grace period"
    );
    for d in devices.iter_mut() {
        d.closed_within(Duration::from_secs(1)).await;
    }

    for id in &ids {
        let events = events_of(&mut conn, &keys, id).await;
        let connected = events
            .iter()
            .find(|e| e.kind.name() == "connected")
            .expect("connected");
        let down = events
            .iter()
            .find(|e| {
                e.kind
                    == EventKind::TcpDown {
                        reason: TcpDownReason::ServerShutdown,
                    }
            })
            .unwrap_or_else(|| panic!("tcp_down(server_shutdown) of {id}: {events:?}"));
        assert_eq!(down.epoch, connected.epoch);
        assert_eq!(down.conn_id, connected.conn_id);
        assert_eq!(down.server_id, server);
        let _ = phy_id(id);
    }
    for key in [keys.liveness(&server), keys.server_conns(&server)] {
        let exists: bool = redis::cmd("EXISTS")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(!exists, "{key} left behind");
    }
    let in_registry: bool = redis::cmd("HEXISTS")
        .arg(keys.servers())
        .arg(server.as_str())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!in_registry, "registry entry left behind");
    let beat: Option<f64> = redis::cmd("ZSCORE")
        .arg(keys.server_beats())
        .arg(server.as_str())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(beat, None);
    assert!(
        svc.stderr().contains("iot-ingest stopped"),
        "{}",
        svc.stderr()
    );
}
