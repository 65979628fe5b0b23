//! Smoke tests of the device simulator against a private Mosquitto: small
//! N, a few seconds, and reports that must make sense.

mod common;

use std::time::Duration;

use bytes::BytesMut;
use iot_mqtt::{Connect, MqttStr, Packet, Publish, QoS};
use iot_test_support::eventually;
use loadtests::sim::roles::{AckMode, Role};
use loadtests::sim::{self, SimConfig, TruthKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn base(target: String, devices: u32) -> SimConfig {
    SimConfig {
        targets: vec![target],
        devices,
        prefix: format!("t{}-", &uuid::Uuid::new_v4().simple().to_string()[..6]),
        duration: Duration::from_secs(20),
        connect_timeout: Duration::from_secs(3),
        retry_delay: Duration::from_millis(100),
        ..SimConfig::default()
    }
}

#[tokio::test]
async fn devices_ping_publish_flap_and_take_over() {
    let Some(broker) = common::mosquitto().await else {
        return;
    };
    let config = SimConfig {
        ping_interval: Some(Duration::from_millis(200)),
        uplink_rate: 5.0,
        qos: 1,
        subscribe: true,
        flap_fraction: 0.3,
        flap_every: "300ms..600ms".parse().expect("range"),
        flap_downtime: "50ms..150ms".parse().expect("range"),
        takeover_fraction: 0.3,
        takeover_every: "300ms..700ms".parse().expect("range"),
        duration: Duration::from_secs(3),
        ..base(broker.addr(), 40)
    };
    let roles: Vec<Role> = (0..40).map(|i| Role::of(&config, i)).collect();
    assert!(roles.iter().any(|r| r.flaps) && roles.iter().any(|r| r.takes_over));
    let handle = sim::start(config).await.expect("start");
    let outcome = handle.finish().await.expect("finish");
    let r = &outcome.report;

    assert_eq!(r.counts.devices, 40);
    assert_eq!(r.counts.initial_connected, 40, "{}", r.summary());
    assert!(r.connect_failures.is_empty(), "{:?}", r.connect_failures);
    assert!(r.connect.time_to_all_connected_s.is_some());
    for (name, l) in [
        ("connect", &r.latency.connect),
        ("ping", &r.latency.ping),
        ("puback", &r.latency.puback),
        ("takeover", &r.latency.takeover),
    ] {
        assert!(l.count > 0, "{name}: no samples");
        assert!(
            l.p50_ms > 0.0 && l.p50_ms <= l.p99_ms && l.p99_ms <= l.max_ms,
            "{name}: {l:?}"
        );
        assert!(!l.hdr.is_empty(), "{name}: histogram missing");
    }
    assert!(r.counts.pongs > 0 && r.counts.pubacks > 0);
    assert!(
        r.disconnects.get("flap").copied().unwrap_or(0) > 0,
        "{:?}",
        r.disconnects
    );
    assert!(
        r.disconnects.get("taken_over").copied().unwrap_or(0) > 0,
        "{:?}",
        r.disconnects
    );
    // A device may drop (flap, end of run) before its SUBACK arrives.
    assert!(r.counts.subacks > 0 && r.counts.subacks <= r.counts.subscribes);

    // Ground truth: every device connected; only flappers dropped; only
    // takeover devices were taken over; everyone left at the end.
    let truth = &outcome.truth;
    for (i, role) in roles.iter().enumerate() {
        let t = truth.timeline(i as u32);
        assert_eq!(
            t.first().map(|r| r.kind),
            Some(TruthKind::Connected),
            "device {i}"
        );
        let dropped = t.iter().any(|r| r.kind == TruthKind::Dropped);
        assert_eq!(dropped, role.flaps, "device {i}: {t:?}");
        if !role.takes_over {
            assert!(
                t.iter().all(|r| r.kind != TruthKind::TakenOver),
                "device {i}"
            );
        }
        assert!(
            !truth.is_connected_at(i as u32, i64::MAX),
            "device {i} never left"
        );
    }
    assert_eq!(r.truth_records as usize, truth.len());
    assert_eq!(
        truth.of_kind(TruthKind::TakenOver).count() as u64,
        r.disconnects["taken_over"]
    );
}

/// Connects a plain publisher and sends one QoS 1 downlink to each topic.
async fn publish_downlinks(addr: &str, topics: &[String]) {
    let mut s = TcpStream::connect(addr).await.expect("connect publisher");
    let mut out = BytesMut::new();
    Packet::Connect(Connect::new(MqttStr::from_static("test-publisher"))).write(&mut out);
    for (i, topic) in topics.iter().enumerate() {
        let mut p = Publish::new(
            MqttStr::try_from(topic.as_str()).expect("topic"),
            "cmd".into(),
        );
        p.qos = QoS::AtLeastOnce;
        p.pkid = u16::try_from(i + 1).expect("pkid");
        Packet::Publish(p).write(&mut out);
    }
    s.write_all(&out).await.expect("publish");
    // Wait for every PUBACK so that the broker has taken all of them.
    let mut buf = BytesMut::new();
    let mut acks = 0;
    while acks < topics.len() {
        match Packet::read(&mut buf, 65536).expect("broker speaks MQTT") {
            Some(Packet::PubAck(_)) => acks += 1,
            Some(_) => {}
            None => {
                let n = tokio::time::timeout(Duration::from_secs(5), s.read_buf(&mut buf))
                    .await
                    .expect("broker answers")
                    .expect("read");
                assert!(n > 0, "broker closed the publisher");
            }
        }
    }
}

#[tokio::test]
async fn downlinks_are_acked_at_once_late_or_never_by_role() {
    let Some(broker) = common::mosquitto().await else {
        return;
    };
    let config = SimConfig {
        subscribe: true,
        never_ack_fraction: 0.3,
        late_ack_fraction: 0.3,
        late_ack_delay: Duration::from_millis(300),
        ping_interval: Some(Duration::ZERO),
        ..base(broker.addr(), 30)
    };
    let roles: Vec<Role> = (0..30).map(|i| Role::of(&config, i)).collect();
    let never = roles.iter().filter(|r| r.ack == AckMode::Never).count() as u64;
    let late = roles.iter().filter(|r| r.ack == AckMode::Late).count() as u64;
    assert!(never > 0 && late > 0);
    let topics: Vec<String> = (0..30)
        .map(|i| format!("devices/{}/down/cmd", config.phy_id(i)))
        .collect();
    let handle = sim::start(config).await.expect("start");
    let (p, subscribed) = handle
        .wait_for(Duration::from_secs(10), |p| p.subacks >= 30)
        .await;
    assert!(subscribed, "subscriptions not confirmed: {p:?}");
    publish_downlinks(&broker.addr(), &topics).await;

    // Every device acks except the never-ackers; late ones after 300 ms.
    let truth = handle.truth();
    let expected_acks = 30 - never;
    eventually(
        Duration::from_secs(10),
        "every ack-mode device to ack",
        || {
            let acked = truth.lock().of_kind(TruthKind::DownlinkAcked).count() as u64;
            async move {
                if acked >= expected_acks {
                    Ok(())
                } else {
                    Err(acked)
                }
            }
        },
    )
    .await;
    handle.stop();
    let outcome = handle.finish().await.expect("finish");
    let c = &outcome.report.counts;
    assert_eq!(c.downlinks_received, 30);
    assert_eq!(c.downlinks_acked, 30 - never);
    assert_eq!(c.downlinks_withheld, never);
    let ack = &outcome.report.latency.downlink_ack;
    assert_eq!(ack.count, 30 - never);
    // The late ones waited the delay; the prompt ones did not.
    assert!(ack.max_ms >= 300.0, "{ack:?}");
    assert!(ack.min_ms < 100.0, "{ack:?}");
    for (i, role) in roles.iter().enumerate() {
        let withheld = outcome
            .truth
            .timeline(i as u32)
            .iter()
            .any(|r| r.kind == TruthKind::AckWithheld);
        assert_eq!(withheld, role.ack == AckMode::Never, "device {i}");
    }
}

#[tokio::test]
async fn worker_processes_merge_progress_reports_and_truth() {
    let Some(broker) = common::mosquitto().await else {
        return;
    };
    let config = SimConfig {
        workers: 3,
        stop_when_connected: true,
        ping_interval: Some(Duration::from_millis(100)),
        worker_exe: Some(common::iot_sim().into()),
        ..base(broker.addr(), 60)
    };
    let handle = sim::start(config).await.expect("start");
    let outcome = handle.finish().await.expect("finish");
    let r = &outcome.report;
    assert_eq!(r.workers, 3);
    assert_eq!(r.counts.devices, 60);
    assert_eq!(r.counts.initial_connected, 60, "{}", r.summary());
    assert_eq!(r.counts.max_connected, 60);
    assert!(r.latency.connect.count >= 60);
    assert!(r.connect.time_to_all_connected_s.is_some());
    let connected: std::collections::HashSet<u32> = outcome
        .truth
        .of_kind(TruthKind::Connected)
        .map(|t| t.device)
        .collect();
    assert_eq!(connected, (0..60).collect());
}

#[tokio::test]
async fn devices_of_a_killed_server_fail_over_to_the_other() {
    let (Some(a), Some(b)) = (common::mosquitto().await, common::mosquitto().await) else {
        return;
    };
    let config = SimConfig {
        targets: vec![a.addr(), b.addr()],
        failover: true,
        ping_interval: Some(Duration::from_millis(200)),
        ..base(a.addr(), 20)
    };
    let handle = sim::start(config).await.expect("start");
    let (p, ok) = handle
        .wait_for(Duration::from_secs(10), |p| p.connected_now == 20)
        .await;
    assert!(ok, "{p:?}");
    let killed_at = iot_core::time::now_ms();
    drop(a); // SIGKILL: its 10 devices lose their connections.
    let (p, ok) = handle
        .wait_for(Duration::from_secs(10), |p| {
            p.disconnects >= 10 && p.connected_now == 20
        })
        .await;
    assert!(
        ok,
        "devices did not come back through the other server: {p:?}"
    );
    handle.stop();
    let outcome = handle.finish().await.expect("finish");
    for i in (0..20u32).step_by(2) {
        let intervals = outcome.truth.intervals(i);
        assert!(intervals.len() >= 2, "device {i}: {intervals:?}");
        let (_, end) = intervals[0];
        assert!(
            end.expect("first connection ended") >= killed_at,
            "device {i}"
        );
        assert!(
            outcome
                .truth
                .timeline(i)
                .iter()
                .any(|r| r.kind == TruthKind::Lost),
            "device {i}"
        );
    }
    for i in (1..20u32).step_by(2) {
        assert_eq!(outcome.truth.intervals(i).len(), 1, "device {i} stayed");
    }
}

#[tokio::test]
async fn refused_connections_are_counted_by_reason() {
    // A port nobody listens on.
    let port = loadtests::loopback::free_port().expect("port");
    let config = SimConfig {
        no_retry: true,
        duration: Duration::from_secs(2),
        ..base(format!("127.0.0.1:{port}"), 5)
    };
    let handle = sim::start(config).await.expect("start");
    let (_, all_failed) = handle
        .wait_for(Duration::from_secs(5), |p| p.connect_failures >= 5)
        .await;
    assert!(all_failed);
    handle.stop();
    let r = handle.finish().await.expect("finish").report;
    assert_eq!(
        r.connect_failures.get("refused"),
        Some(&5),
        "{:?}",
        r.connect_failures
    );
    assert_eq!(r.counts.initial_connected, 0);
    assert_eq!(r.connect.time_to_all_connected_s, None);
}

#[tokio::test]
async fn non_loopback_targets_are_refused_before_connecting() {
    let err = sim::start(SimConfig {
        targets: vec!["192.0.2.1:1883".to_owned()],
        ..SimConfig::default()
    })
    .await
    .expect_err("must refuse");
    assert!(err.to_string().contains("not a loopback address"), "{err}");
}
