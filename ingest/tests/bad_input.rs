//! Bad input: each case gets its protocol answer or a close, a log line and
//! a metric, and leaves every other device untouched (a well-behaved
//! observer device pings before and after each case). The tests take turns
//! ([`common::METRICS`]), so each counts exactly its own refusals.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Ingest, events_of, has_tcp_down, kinds, phy, wait_events};
use iot_core::TcpDownReason;
use iot_mqtt::{ConnectReturnCode, Packet, QoS, Subscribe, SubscribeReturnCode};
use iot_test_support::{RedisServer, TestDevice, connect_packet, publish_packet};

const CLOSE: Duration = Duration::from_secs(3);

/// An ingest with a small packet limit and a short CONNECT deadline, and a
/// connected observer device.
async fn setup(server: &str) -> (RedisServer, Ingest, TestDevice) {
    let redis = RedisServer::start();
    let ingest = Ingest::start(&redis.url(), server, |c| {
        c.mqtt.max_packet_size = 1024;
        c.mqtt.connect_timeout = Duration::from_secs(1);
    })
    .await;
    let mut observer = TestDevice::connected(&ingest.mqtt, &phy("observer"), 60).await;
    observer.ping().await;
    (redis, ingest, observer)
}

/// Bytes of a packet.
fn bytes_of(p: &Packet) -> Vec<u8> {
    let mut out = bytes::BytesMut::new();
    p.write(&mut out);
    out.to_vec()
}

/// Sends `bytes` on a fresh connection and expects a close with no answer.
async fn closed_without_answer(ingest: &Ingest, bytes: &[u8]) {
    let mut d = TestDevice::open(&ingest.mqtt).await;
    let _ = d.send_raw(bytes).await;
    let got = d.closed_within(CLOSE).await;
    assert!(got.is_empty(), "no answer expected, got {got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_packets_before_connect_are_closed() {
    let _turn = common::METRICS.lock().await;
    let (_redis, ingest, mut observer) = setup("bad-1").await;
    let before = ingest
        .metric("iot_ingest_connects_refused_total{reason=\"malformed\"}")
        .await;

    // Random bytes instead of CONNECT (reserved packet type 0, then junk).
    closed_without_answer(&ingest, &[0x00, 0x13, 0x37, 0xde, 0xad, 0xbe, 0xef]).await;
    closed_without_answer(&ingest, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    // A well-formed packet before CONNECT.
    closed_without_answer(&ingest, &bytes_of(&Packet::PingReq)).await;
    closed_without_answer(
        &ingest,
        &bytes_of(&publish_packet("devices/x/up/t", b"1", QoS::AtMostOnce, 0)),
    )
    .await;
    // A CONNECT with a wrong protocol name.
    let mut connect = bytes_of(&connect_packet("dev-x", 30));
    connect[4..8].copy_from_slice(b"MQTX");
    closed_without_answer(&ingest, &connect).await;

    assert!(
        ingest
            .metric("iot_ingest_connects_refused_total{reason=\"malformed\"}")
            .await
            == before + 5.0
    );
    observer.ping().await;
    ingest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_protocol_level_gets_connack_1() {
    let _turn = common::METRICS.lock().await;
    let (_redis, ingest, mut observer) = setup("bad-2").await;
    let mut connect = bytes_of(&connect_packet("dev-x", 30));
    connect[8] = 5; // MQTT 5
    let bad_protocol = "iot_ingest_connects_refused_total{reason=\"bad_protocol\"}";
    let before = ingest.metric(bad_protocol).await;
    let mut d = TestDevice::open(&ingest.mqtt).await;
    d.send_raw(&connect).await.unwrap();
    let got = d.closed_within(CLOSE).await;
    assert!(
        matches!(&got[..], [Packet::ConnAck(a)] if a.code == ConnectReturnCode::UnacceptableProtocolVersion),
        "{got:?}"
    );
    assert_eq!(ingest.metric(bad_protocol).await, before + 1.0);
    observer.ping().await;
    ingest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_client_ids_are_rejected_with_connack_2() {
    let _turn = common::METRICS.lock().await;
    let (_redis, ingest, mut observer) = setup("bad-3").await;
    let before = ingest
        .metric("iot_ingest_connects_refused_total{reason=\"identifier_rejected\"}")
        .await;
    let long = "d".repeat(65);
    let bad = [
        "",
        long.as_str(),
        "a{b",
        "a}b",
        "a:b",
        "a*b",
        "a b",
        "gerät",
        "设备",
        // Reserved: the REST API could not address them.
        "online",
        "..",
    ];
    for id in bad {
        let mut d = TestDevice::open(&ingest.mqtt).await;
        d.send(&connect_packet(id, 30)).await;
        let got = d.closed_within(CLOSE).await;
        assert!(
            matches!(&got[..], [Packet::ConnAck(a)] if a.code == ConnectReturnCode::IdentifierRejected),
            "{id:?}: {got:?}"
        );
    }
    assert!(
        ingest
            .metric("iot_ingest_connects_refused_total{reason=\"identifier_rejected\"}")
            .await
            == before + bad.len() as f64
    );
    // No event was written for any of them.
    let mut conn = ingest.redis().await;
    let all = common::entries(&mut conn, &ingest.keys).await;
    for s in &all {
        for e in s.entry.clone().into_events() {
            assert!(
                e.phy_id.as_str().starts_with("observer-"),
                "unexpected event {e:?}"
            );
        }
    }
    // The longest valid id is fine.
    let max = "d".repeat(64);
    TestDevice::connected(&ingest.mqtt, &max, 30)
        .await
        .ping()
        .await;
    observer.ping().await;
    ingest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_violations_after_connect_close_with_tcp_down() {
    let _turn = common::METRICS.lock().await;
    let (_redis, ingest, mut observer) = setup("bad-4").await;
    let conn = ingest.redis().await;
    let before = |kind: &str| format!("iot_ingest_protocol_violations_total{{kind=\"{kind}\"}}");
    let mut base = std::collections::HashMap::new();
    for k in [
        "second_connect",
        "qos2",
        "publish_other_device",
        "packet_too_large",
        "malformed_length",
        "server_packet",
    ] {
        base.insert(k, ingest.metric(&before(k)).await);
    }

    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("second_connect", bytes_of(&connect_packet("whatever", 30))),
        (
            "qos2",
            bytes_of(&publish_packet(
                "devices/ID/up/t",
                b"1",
                QoS::ExactlyOnce,
                7,
            )),
        ),
        (
            "publish_other_device",
            bytes_of(&publish_packet(
                "devices/someone-else/up/t",
                b"1",
                QoS::AtMostOnce,
                0,
            )),
        ),
        // PUBLISH announcing 2000 bytes, over the 1024 limit: refused on
        // the header, before the body arrives.
        ("packet_too_large", vec![0x30, 0xd0, 0x0f]),
        // Remaining length with a continuation bit on all four bytes.
        ("malformed_length", vec![0x30, 0xff, 0xff, 0xff, 0xff, 0x01]),
        ("server_packet", bytes_of(&Packet::PingResp)),
    ];
    for (kind, bytes) in cases {
        let id = phy(kind);
        let bytes = if kind == "qos2" {
            bytes_of(&publish_packet(
                &format!("devices/{id}/up/t"),
                b"1",
                QoS::ExactlyOnce,
                7,
            ))
        } else {
            bytes
        };
        let mut d = TestDevice::connected(&ingest.mqtt, &id, 30).await;
        d.ping().await;
        d.send_raw(&bytes).await.unwrap();
        let got = d.closed_within(CLOSE).await;
        assert!(got.is_empty(), "{kind}: no answer expected, got {got:?}");
        // The ping was answered, so its heartbeat is written too; it travels
        // in an entry of its own, perhaps on another stream, so wait for both
        // and compare only the set.
        let events = wait_events(
            &conn,
            &ingest.keys,
            &id,
            "tcp_down(protocol_error) and the heartbeat",
            |ev| {
                has_tcp_down(ev, TcpDownReason::ProtocolError)
                    && ev.iter().any(|e| e.kind.name() == "heartbeat")
            },
        )
        .await;
        let mut got = kinds(&events);
        got.sort_unstable();
        assert_eq!(got, vec!["connected", "heartbeat", "tcp_down"], "{kind}");
        assert!(
            ingest.metric(&before(kind)).await == base[kind] + 1.0,
            "metric for {kind}"
        );
        observer.ping().await;
    }
    ingest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_malformed_connects_are_closed() {
    let _turn = common::METRICS.lock().await;
    let (_redis, ingest, mut observer) = setup("bad-5").await;
    let malformed = "iot_ingest_connects_refused_total{reason=\"malformed\"}";
    let before = ingest.metric(malformed).await;
    // A CONNECT announcing 100 kB: over the limit.
    closed_without_answer(&ingest, &[0x10, 0xa0, 0x8d, 0x06]).await;
    // Five length bytes.
    closed_without_answer(&ingest, &[0x10, 0x80, 0x80, 0x80, 0x80, 0x01]).await;
    // A CONNECT whose client id is not UTF-8.
    let mut connect = bytes_of(&connect_packet("abc", 30));
    let n = connect.len();
    connect[n - 1] = 0xff;
    closed_without_answer(&ingest, &connect).await;
    assert_eq!(ingest.metric(malformed).await, before + 3.0, "each counted");
    observer.ping().await;
    ingest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribing_to_another_device_is_refused_but_the_connection_stays() {
    let _turn = common::METRICS.lock().await;
    let (_redis, ingest, mut observer) = setup("bad-6").await;
    let refused = "iot_ingest_protocol_violations_total{kind=\"subscribe_refused\"}";
    let before = ingest.metric(refused).await;
    let id = phy("nosy");
    let mut d = TestDevice::connected(&ingest.mqtt, &id, 30).await;
    let sub = Subscribe {
        pkid: 4,
        filters: vec![
            iot_mqtt::SubscribeFilter::new(
                "devices/victim/down/#".to_owned().try_into().unwrap(),
                QoS::AtLeastOnce,
            ),
            iot_mqtt::SubscribeFilter::new(
                "devices/+/up/#".to_owned().try_into().unwrap(),
                QoS::AtMostOnce,
            ),
            iot_mqtt::SubscribeFilter::new("#".to_owned().try_into().unwrap(), QoS::AtMostOnce),
            iot_mqtt::SubscribeFilter::new(
                format!("devices/{id}/down/+").try_into().unwrap(),
                QoS::AtMostOnce,
            ),
        ],
    };
    d.send(&Packet::Subscribe(sub)).await;
    match d.recv(CLOSE).await {
        Some(Packet::SubAck(ack)) => {
            assert_eq!(ack.pkid, 4);
            assert_eq!(
                ack.return_codes,
                vec![
                    SubscribeReturnCode::Failure,
                    SubscribeReturnCode::Failure,
                    SubscribeReturnCode::Failure,
                    SubscribeReturnCode::Success(QoS::AtMostOnce),
                ]
            );
        }
        other => panic!("expected SUBACK, got {other:?}"),
    }
    assert_eq!(
        ingest.metric(refused).await,
        before + 1.0,
        "one per refusing SUBACK"
    );
    d.ping().await;
    observer.ping().await;
    ingest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_that_never_finishes_is_closed_at_the_deadline() {
    let _turn = common::METRICS.lock().await;
    let (_redis, ingest, mut observer) = setup("bad-7").await;
    let before = ingest
        .metric("iot_ingest_connects_refused_total{reason=\"connect_timeout\"}")
        .await;
    let connect = bytes_of(&connect_packet("slowpoke", 30));
    let mut d = TestDevice::open(&ingest.mqtt).await;
    let started = std::time::Instant::now();
    // Half a CONNECT, a byte at a time, then nothing.
    for b in &connect[..connect.len() / 2] {
        d.send_raw(&[*b]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = d.closed_within(Duration::from_secs(5)).await;
    let took = started.elapsed();
    assert!(got.is_empty(), "{got:?}");
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_millis(2500),
        "closed after {took:?} (deadline 1 s after accept)"
    );
    assert_eq!(
        ingest
            .metric("iot_ingest_connects_refused_total{reason=\"connect_timeout\"}")
            .await,
        before + 1.0
    );
    let mut conn = ingest.redis().await;
    assert!(
        events_of(&mut conn, &ingest.keys, "slowpoke")
            .await
            .is_empty()
    );
    observer.ping().await;
    ingest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_silent_connections_are_closed_while_a_device_works() {
    let _turn = common::METRICS.lock().await;
    let redis = RedisServer::start();
    let ingest = Ingest::start(&redis.url(), "bad-8", |c| {
        c.mqtt.connect_timeout = Duration::from_secs(2);
    })
    .await;
    let conn = ingest.redis().await;
    let before = ingest
        .metric("iot_ingest_connects_refused_total{reason=\"connect_timeout\"}")
        .await;
    // The limit it logged at start (open files less a reserve) holds them.
    let limit = ingest.metric("iot_ingest_connection_limit").await;
    let hard = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap().1 as f64;
    assert!(
        limit >= 1000.0 && limit < hard,
        "connection limit {limit} (hard {hard})"
    );
    let worker_id = phy("worker");
    let mut worker = TestDevice::connected(&ingest.mqtt, &worker_id, 30).await;

    let started = std::time::Instant::now();
    let mut silent = Vec::with_capacity(1000);
    for _ in 0..1000 {
        silent.push(TestDevice::open(&ingest.mqtt).await);
    }
    let opened = started.elapsed();

    // The worker keeps working while they wait.
    let topic = format!("devices/{worker_id}/up/n");
    for i in 1..=10u16 {
        worker.ping().await;
        worker
            .send(&publish_packet(
                &topic,
                &i.to_be_bytes(),
                QoS::AtLeastOnce,
                i,
            ))
            .await;
        match worker.recv(Duration::from_secs(5)).await {
            Some(Packet::PubAck(a)) => assert_eq!(a.pkid, i),
            other => panic!("expected PUBACK {i}, got {other:?}"),
        }
    }

    // Every silent connection is closed by the deadline (2 s after its
    // accept; the last was accepted `opened` after the first).
    let limit = Duration::from_secs(2) + opened + Duration::from_secs(3);
    for d in &mut silent {
        let left = limit
            .saturating_sub(started.elapsed())
            .max(Duration::from_millis(10));
        let got = d.closed_within(left).await;
        assert!(got.is_empty());
    }
    assert!(
        ingest
            .metric("iot_ingest_connects_refused_total{reason=\"connect_timeout\"}")
            .await
            == before + 1000.0
    );
    worker.ping().await;
    let events = wait_events(&conn, &ingest.keys, &worker_id, "10 uplinks", |ev| {
        ev.iter().filter(|e| e.kind.name() == "uplink").count() == 10
    })
    .await;
    assert!(!events.iter().any(|e| e.kind.name() == "tcp_down"));
    ingest.stop().await.unwrap();
}
