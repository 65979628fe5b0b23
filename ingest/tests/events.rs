//! Well-behaved devices: each event kind lands in its device's shard with
//! the right fields; stock clients (rumqttc, mosquitto_pub/sub) work;
//! keepalive, liveness and the connection limits behave.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Client, Ingest, events_of, has_tcp_down, kinds, phy, wait_events};
use iot_core::{EventKind, TcpDownReason};
use iot_mqtt::{ConnectReturnCode, Packet};
use iot_test_support::{RedisServer, TestDevice};
use rumqttc::{Packet as MqttPacket, QoS, SubscribeReasonCode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_kind_lands_in_its_shard_with_its_fields() {
    let redis = RedisServer::start();
    let ingest = Ingest::start(&redis.url(), "ev-srv-1", |_| {}).await;
    let mut conn = ingest.redis().await;
    let id = phy("dev");
    let t0 = iot_core::time::now_ms();

    // rumqttc pings after 1 s of silence.
    let mut c = Client::connect(&ingest.mqtt, &id, Duration::from_secs(1)).await;
    match c.incoming(Duration::from_secs(5)).await {
        MqttPacket::PingResp => {}
        other => panic!("expected PINGRESP, got {other:?}"),
    }

    let up = format!("devices/{id}/up/temp");
    c.client
        .publish(&up, QoS::AtMostOnce, false, b"21.5".to_vec())
        .await
        .unwrap();
    c.client
        .publish(&up, QoS::AtLeastOnce, false, b"22.0".to_vec())
        .await
        .unwrap();
    match c.incoming(Duration::from_secs(5)).await {
        MqttPacket::PubAck(_) => {}
        other => panic!("expected PUBACK, got {other:?}"),
    }
    // The PUBACK follows the write: the QoS 1 uplink is in the stream now,
    // without waiting.
    let now = events_of(&mut conn, &ingest.keys, &id).await;
    assert!(
        now.iter().any(|e| matches!(&e.kind,
            EventKind::Uplink { qos: 1, payload, .. } if payload == b"22.0")),
        "PUBACK arrived before its uplink was written: {:?}",
        kinds(&now)
    );

    c.client
        .subscribe_many([
            rumqttc::SubscribeFilter::new(format!("devices/{id}/down/#"), QoS::ExactlyOnce),
            rumqttc::SubscribeFilter::new("devices/someone-else/down/#".into(), QoS::AtMostOnce),
        ])
        .await
        .unwrap();
    match c.incoming(Duration::from_secs(5)).await {
        MqttPacket::SubAck(ack) => assert_eq!(
            ack.return_codes,
            vec![
                SubscribeReasonCode::Success(QoS::AtLeastOnce),
                SubscribeReasonCode::Failure
            ],
            "own downlinks granted at QoS 1 at most, others refused"
        ),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    c.client
        .unsubscribe(format!("devices/{id}/down/#"))
        .await
        .unwrap();
    match c.incoming(Duration::from_secs(5)).await {
        MqttPacket::UnsubAck(_) => {}
        other => panic!("expected UNSUBACK, got {other:?}"),
    }
    c.client.disconnect().await.unwrap();
    c.ended(Duration::from_secs(5)).await;

    // Heartbeats travel in entries of their own, perhaps on another stream:
    // wait for one too.
    let events = wait_events(
        &conn,
        &ingest.keys,
        &id,
        "disconnected and a heartbeat",
        |ev| {
            ev.iter().any(|e| e.kind == EventKind::Disconnected)
                && ev.iter().any(|e| e.kind == EventKind::Heartbeat)
        },
    )
    .await;
    let t1 = iot_core::time::now_ms();
    let first = &events[0];
    for e in &events {
        assert_eq!(e.conn_id, first.conn_id, "one connection: {e:?}");
        assert_eq!(e.server_id, ingest.server_id);
        assert_eq!(e.epoch, first.epoch, "one connection, one epoch: {e:?}");
        assert!(
            e.epoch / 1000 >= u64::try_from(t0).unwrap()
                && e.epoch / 1000 <= u64::try_from(t1).unwrap(),
            "a device's first epoch is the clock in µs at CONNECT: {e:?}"
        );
        assert!(e.ts_ms >= t0 && e.ts_ms <= t1, "timestamp {e:?}");
    }
    match &events
        .iter()
        .find(|e| e.kind.name() == "connected")
        .expect("connected")
        .kind
    {
        EventKind::Connected {
            keepalive_secs,
            peer,
        } => {
            assert_eq!(*keepalive_secs, 1);
            assert!(peer.starts_with("127.0.0.1:"), "{peer}");
        }
        _ => unreachable!(),
    }
    let uplinks: Vec<_> = events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Uplink {
                topic,
                qos,
                payload,
            } => Some((topic.as_str(), *qos, payload.as_slice())),
            _ => None,
        })
        .collect();
    assert_eq!(
        uplinks,
        vec![
            (up.as_str(), 0, &b"21.5"[..]),
            (up.as_str(), 1, &b"22.0"[..])
        ]
    );
    // PINGREQ, SUBSCRIBE and UNSUBSCRIBE are signs of life.
    assert!(
        events.iter().any(|e| e.kind == EventKind::Heartbeat),
        "{:?}",
        kinds(&events)
    );
    assert!(!events.iter().any(|e| e.kind.name() == "tcp_down"));
    assert!(
        ingest
            .metric("iot_ingest_events_written_total{kind=\"uplink\"}")
            .await
            >= 2.0
    );
    assert!(
        ingest
            .metric("iot_ingest_protocol_violations_total{kind=\"subscribe_refused\"}")
            .await
            >= 1.0
    );
    ingest.stop().await.unwrap();
}

/// Runs a mosquitto client binary, or `None` if it is not installed.
fn mosquitto(bin: &str, args: &[&str]) -> Option<std::process::Output> {
    let path = format!("/usr/bin/{bin}");
    if !std::path::Path::new(&path).exists() {
        println!("note: {path} is not installed; skipping its part of the test");
        return None;
    }
    Some(
        std::process::Command::new(path)
            .args(args)
            .output()
            .expect("run mosquitto client"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_clients_publish_and_subscribe() {
    let redis = RedisServer::start();
    let ingest = Ingest::start(&redis.url(), "ev-srv-2", |_| {}).await;
    let conn = ingest.redis().await;
    let (host, port) = ingest.mqtt.rsplit_once(':').unwrap();
    let (host, port) = (host.to_owned(), port.to_owned());

    let pub_id = phy("mosq-pub");
    let topic = format!("devices/{pub_id}/up/state");
    let args = [
        "-h", &host, "-p", &port, "-i", &pub_id, "-t", &topic, "-m", "on", "-q", "1",
    ];
    let Some(out) = tokio::task::spawn_blocking({
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        move || {
            mosquitto(
                "mosquitto_pub",
                &args.iter().map(String::as_str).collect::<Vec<_>>(),
            )
        }
    })
    .await
    .unwrap() else {
        return;
    };
    assert!(out.status.success(), "mosquitto_pub: {out:?}");
    let events = wait_events(
        &conn,
        &ingest.keys,
        &pub_id,
        "mosquitto_pub's events",
        |ev| ev.iter().any(|e| e.kind == EventKind::Disconnected),
    )
    .await;
    assert_eq!(kinds(&events), vec!["connected", "uplink", "disconnected"]);
    assert!(matches!(&events[1].kind,
        EventKind::Uplink { topic: t, qos: 1, payload } if *t == topic && payload == b"on"));

    // mosquitto_sub on its own downlink tree: subscribed, then it leaves
    // after its 1 s timeout.
    let sub_id = phy("mosq-sub");
    let filter = format!("devices/{sub_id}/down/#");
    let out = tokio::task::spawn_blocking({
        let (host, port, sub_id, filter) = (host.clone(), port.clone(), sub_id.clone(), filter);
        move || {
            mosquitto(
                "mosquitto_sub",
                &[
                    "-h", &host, "-p", &port, "-i", &sub_id, "-t", &filter, "-W", "1",
                ],
            )
        }
    })
    .await
    .unwrap()
    .expect("installed: mosquitto_pub was");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("denied"), "{stderr}");
    let events = wait_events(
        &conn,
        &ingest.keys,
        &sub_id,
        "mosquitto_sub's events",
        |ev| {
            ev.iter()
                .any(|e| matches!(e.kind.name(), "disconnected" | "tcp_down"))
                && ev.iter().any(|e| e.kind == EventKind::Heartbeat)
        },
    )
    .await;
    assert_eq!(events[0].kind.name(), "connected");
    assert!(
        events.iter().any(|e| e.kind == EventKind::Heartbeat),
        "SUBSCRIBE is a sign of life: {:?}",
        kinds(&events)
    );

    // Another device's tree: the broker refuses the subscription.
    let spy = phy("mosq-spy");
    let out = tokio::task::spawn_blocking({
        let (host, port) = (host.clone(), port.clone());
        move || {
            mosquitto(
                "mosquitto_sub",
                &[
                    "-h",
                    &host,
                    "-p",
                    &port,
                    "-i",
                    &spy,
                    "-t",
                    "devices/victim/down/#",
                    "-W",
                    "2",
                ],
            )
        }
    })
    .await
    .unwrap()
    .expect("installed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("All subscription requests were denied"),
        "status {:?}, stderr {stderr}",
        out.status
    );
    ingest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_devices_are_closed_after_one_and_a_half_keepalives() {
    let redis = RedisServer::start();
    let ingest = Ingest::start(&redis.url(), "ev-srv-3", |c| {
        c.mqtt.max_keepalive = Duration::from_secs(2);
    })
    .await;
    let conn = ingest.redis().await;

    // Keepalive 1 s, then silence: closed after 1.5 s.
    let quiet = phy("quiet");
    let mut d = TestDevice::connected(&ingest.mqtt, &quiet, 1).await;
    let started = std::time::Instant::now();
    d.closed_within(Duration::from_secs(5)).await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_millis(3000),
        "closed after {took:?}"
    );
    let events = wait_events(&conn, &ingest.keys, &quiet, "tcp_down(keepalive)", |ev| {
        has_tcp_down(ev, TcpDownReason::Keepalive)
    })
    .await;
    assert_eq!(kinds(&events), vec!["connected", "tcp_down"]);
    assert_eq!(events[1].epoch, events[0].epoch);
    assert_eq!(events[1].conn_id, events[0].conn_id);

    // Keepalive 0 (none) gets the configured maximum, 2 s: closed after 3 s.
    let none = phy("none");
    let mut d = TestDevice::connected(&ingest.mqtt, &none, 0).await;
    let started = std::time::Instant::now();
    d.closed_within(Duration::from_secs(8)).await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(2900) && took < Duration::from_millis(4500),
        "closed after {took:?}"
    );
    wait_events(&conn, &ingest.keys, &none, "tcp_down(keepalive)", |ev| {
        has_tcp_down(ev, TcpDownReason::Keepalive)
    })
    .await;

    // A device that pings in time stays.
    let chatty = phy("chatty");
    let mut d = TestDevice::connected(&ingest.mqtt, &chatty, 1).await;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        d.ping().await;
    }
    assert!(
        ingest
            .metric("iot_ingest_disconnects_total{reason=\"keepalive\"}")
            .await
            >= 2.0
    );
    ingest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn liveness_key_and_registry_entry_while_running() {
    let redis = RedisServer::start();
    let ingest = Ingest::start(&redis.url(), "ev-srv-4", |c| {
        c.session.liveness_ttl = Duration::from_millis(900);
    })
    .await;
    let mut conn = ingest.redis().await;
    let _d = TestDevice::connected(&ingest.mqtt, &phy("live"), 30).await;

    let live_key = ingest.keys.liveness(&ingest.server_id);
    // The key is refreshed every 300 ms: it outlives its 900 ms TTL.
    for _ in 0..4 {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(&live_key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(ttl > 0 && ttl <= 900, "liveness PTTL {ttl}");
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let beat: Option<f64> = redis::cmd("ZSCORE")
        .arg(ingest.keys.server_beats())
        .arg(ingest.server_id.as_str())
        .query_async(&mut conn)
        .await
        .unwrap();
    let beat = beat.expect("beat recorded");
    assert!((iot_core::time::now_ms() as f64 - beat).abs() < 2_000.0);
    let info =
        iot_test_support::eventually(Duration::from_secs(5), "registry counts the device", || {
            let mut conn = conn.clone();
            let key = ingest.keys.servers();
            let id = ingest.server_id.to_string();
            async move {
                let json: String = redis::cmd("HGET")
                    .arg(key)
                    .arg(id)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| e.to_string())?;
                let info: iot_core::registry::InstanceInfo =
                    serde_json::from_str(&json).map_err(|e| e.to_string())?;
                if info.connections == 1 {
                    Ok(info)
                } else {
                    Err(format!("{info:?}"))
                }
            }
        })
        .await;
    assert_eq!(info.status, "running");
    assert_eq!(info.server_id, "ev-srv-4");
    assert_eq!(info.mqtt_listen, ingest.mqtt);
    assert_eq!(info.http_listen, ingest.http);
    assert_eq!(info.pid, std::process::id());
    ingest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_rate_and_connection_limit_refuse_cleanly() {
    let redis = RedisServer::start();
    let ingest = Ingest::start(&redis.url(), "ev-srv-5", |c| {
        c.mqtt.max_connections = 2;
        c.mqtt.connect_rate_per_ip = 1;
        c.mqtt.connect_burst_per_ip = 3;
    })
    .await;
    let before_full = ingest
        .metric("iot_ingest_connects_refused_total{reason=\"max_connections\"}")
        .await;
    let before_rate = ingest
        .metric("iot_ingest_connects_refused_total{reason=\"rate_limited\"}")
        .await;

    let mut a = TestDevice::connected(&ingest.mqtt, &phy("a"), 30).await;
    let _b = TestDevice::connected(&ingest.mqtt, &phy("b"), 30).await;
    // Third: over the connection limit, closed without an answer.
    let mut c = TestDevice::open(&ingest.mqtt).await;
    assert!(c.closed_within(Duration::from_secs(2)).await.is_empty());
    // Fourth: the burst of 3 is spent.
    let mut d = TestDevice::open(&ingest.mqtt).await;
    assert!(d.closed_within(Duration::from_secs(2)).await.is_empty());
    assert!(
        ingest
            .metric("iot_ingest_connects_refused_total{reason=\"max_connections\"}")
            .await
            > before_full
    );
    assert!(
        ingest
            .metric("iot_ingest_connects_refused_total{reason=\"rate_limited\"}")
            .await
            > before_rate
    );
    // The devices that were in are untouched.
    a.ping().await;
    // A slot and a token free up: a new device gets in.
    a.send(&Packet::Disconnect).await;
    a.closed_within(Duration::from_secs(2)).await;
    let e = phy("e");
    let mut in_again = iot_test_support::eventually(Duration::from_secs(10), "a free slot", || {
        let (addr, e) = (ingest.mqtt.clone(), e.clone());
        async move {
            let mut d = TestDevice::open(&addr).await;
            let _ = d.send_raw(&connect_bytes(&e)).await;
            match d.recv(Duration::from_secs(2)).await {
                Some(Packet::ConnAck(ack)) if ack.code == ConnectReturnCode::Accepted => Ok(d),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    in_again.ping().await;
    ingest.stop().await.unwrap();
}

fn connect_bytes(id: &str) -> Vec<u8> {
    let mut out = bytes::BytesMut::new();
    iot_test_support::connect_packet(id, 30).write(&mut out);
    out.to_vec()
}
