//! The Redis outage path: the test's own redis-server (persistent, as a
//! deployment would run it) is killed while devices heartbeat; connections
//! stay up, `/health` reports the writer degraded, a new CONNECT gets
//! "server unavailable", and when Redis is back every event buffered during
//! the outage is written, with the newest heartbeat of each device, next to
//! the `connected` events written before it. Devices that send QoS 1
//! uplinks during the outage are not closed for keepalive while the ingest,
//! waiting to write their uplinks, does not read from them; they get every
//! PUBACK once Redis is back.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{Ingest, events_of, phy, wait_events};
use iot_core::{Entry, EventKind, TcpDownReason};
use iot_mqtt::{ConnectReturnCode, Packet, QoS};
use iot_test_support::{RedisServer, TestDevice, eventually, publish_packet};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_wait_out_a_redis_outage_and_are_written_after_it() {
    let mut redis = RedisServer::start_persistent();
    let ingest = Ingest::start(&redis.url(), "out-srv-1", |c| {
        c.redis.read_timeout = Duration::from_millis(500);
        c.redis.write_timeout = Duration::from_millis(500);
        c.redis.dial_timeout = Duration::from_millis(500);
    })
    .await;
    let conn = ingest.redis().await;

    let beaters: Vec<String> = (0..3).map(|i| phy(&format!("beat{i}"))).collect();
    let mut devices = Vec::new();
    for id in &beaters {
        devices.push(TestDevice::connected(&ingest.mqtt, id, 60).await);
    }
    let dropper = phy("dropper");
    let leaver = phy("leaver");
    let talker = phy("talker");
    let drop_dev = TestDevice::connected(&ingest.mqtt, &dropper, 60).await;
    let mut leave_dev = TestDevice::connected(&ingest.mqtt, &leaver, 60).await;
    let mut talk_dev = TestDevice::connected(&ingest.mqtt, &talker, 60).await;
    for id in [&dropper, &leaver, &talker] {
        wait_events(
            &conn,
            &ingest.keys,
            id,
            "connected before the outage",
            |ev| !ev.is_empty(),
        )
        .await;
    }

    redis.stop();
    let outage_start = iot_core::time::now_ms();

    // Heartbeats keep flowing; connections stay up.
    for d in devices.iter_mut() {
        d.ping().await;
    }
    let (code, body) = eventually(Duration::from_secs(10), "/health degraded", || async {
        let (code, body) = ingest.health().await;
        if body["checks"]["event_writer"]["status"] == "degraded"
            && body["checks"]["redis"]["status"] == "degraded"
        {
            Ok((code, body))
        } else {
            Err(body)
        }
    })
    .await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["status"], "degraded", "{body}");

    // A new CONNECT cannot take an epoch: server unavailable.
    let newcomer = phy("newcomer");
    let (_d, code) = TestDevice::connect(&ingest.mqtt, &newcomer, 60).await;
    assert_eq!(code, ConnectReturnCode::ServerUnavailable);

    // Events of every kind wait in the buffer.
    drop(drop_dev); // TCP close without DISCONNECT
    leave_dev.send(&Packet::Disconnect).await;
    leave_dev.closed_within(Duration::from_secs(3)).await;
    let topic = format!("devices/{talker}/up/during-outage");
    talk_dev
        .send(&publish_packet(&topic, b"buffered", QoS::AtMostOnce, 0))
        .await;

    // More heartbeats: only the newest per device will be written.
    let mut last_ping = HashMap::new();
    for round in 0..3 {
        for (id, d) in beaters.iter().zip(devices.iter_mut()) {
            if round == 2 {
                last_ping.insert(id.clone(), iot_core::time::now_ms());
            }
            d.ping().await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Still degraded, connections still up; the buffer holds one heartbeat
    // per pinging device (3) plus the tcp_down, disconnected and uplink.
    let (_, body) = ingest.health().await;
    assert_eq!(body["checks"]["event_writer"]["status"], "degraded");
    eventually(Duration::from_secs(10), "6 buffered events", || async {
        let n = ingest.metric("iot_ingest_buffered_events").await;
        if n == 6.0 { Ok(()) } else { Err(n) }
    })
    .await;

    redis.start_again();

    // Everything buffered lands, oldest first.
    for (id, after) in &last_ping {
        let events = wait_events(
            &conn_after(&ingest).await,
            &ingest.keys,
            id,
            "newest heartbeat",
            |ev| {
                ev.iter()
                    .any(|e| e.kind == EventKind::Heartbeat && e.ts_ms >= *after)
            },
        )
        .await;
        let beats: Vec<_> = events
            .iter()
            .filter(|e| e.kind == EventKind::Heartbeat)
            .collect();
        // One pending per device, plus at most the one of a flush that was
        // in flight when Redis came back.
        assert!(
            !beats.is_empty() && beats.len() <= 2,
            "the outage's heartbeats of {id} coalesce: {beats:?}"
        );
        assert!(beats.iter().all(|b| b.ts_ms >= outage_start));
    }
    let c = conn_after(&ingest).await;
    let down = wait_events(&c, &ingest.keys, &dropper, "tcp_down(closed)", |ev| {
        ev.iter().any(|e| {
            e.kind
                == EventKind::TcpDown {
                    reason: TcpDownReason::Closed,
                }
        })
    })
    .await;
    let closed = down
        .iter()
        .find(|e| common::has_tcp_down(std::slice::from_ref(e), TcpDownReason::Closed))
        .unwrap();
    assert!(closed.ts_ms >= outage_start);
    wait_events(&c, &ingest.keys, &leaver, "disconnected", |ev| {
        ev.iter().any(|e| e.kind == EventKind::Disconnected)
    })
    .await;
    let up = wait_events(&c, &ingest.keys, &talker, "uplink", |ev| {
        ev.iter().any(|e| e.kind.name() == "uplink")
    })
    .await;
    let uplink = up.iter().find(|e| e.kind.name() == "uplink").unwrap();
    assert!(matches!(&uplink.kind, EventKind::Uplink { payload, .. } if payload == b"buffered"));
    let mut c2 = c.clone();
    assert!(events_of(&mut c2, &ingest.keys, &newcomer).await.is_empty());
    // Every connected event, written before the outage, is still there.
    for id in beaters.iter().chain([&dropper, &leaver, &talker]) {
        let events = events_of(&mut c2, &ingest.keys, id).await;
        assert_eq!(
            events
                .iter()
                .filter(|e| e.kind.name() == "connected")
                .count(),
            1,
            "{id}: {:?}",
            common::kinds(&events)
        );
    }

    // The outage's heartbeats went out as batches, one beat per device.
    for s in common::entries(&mut c2, &ingest.keys).await {
        if let Entry::Heartbeats(b) = s.entry {
            let mut ids: Vec<_> = b.beats.iter().map(|h| h.phy_id.clone()).collect();
            let n = ids.len();
            ids.sort();
            ids.dedup();
            assert_eq!(ids.len(), n, "a device twice in one batch");
        }
    }

    // Healthy again; new devices get in; the old ones never left.
    eventually(Duration::from_secs(10), "/health ok", || async {
        let (code, body) = ingest.health().await;
        if code == 200 { Ok(()) } else { Err(body) }
    })
    .await;
    let (_d, code) = TestDevice::connect(&ingest.mqtt, &newcomer, 60).await;
    assert_eq!(code, ConnectReturnCode::Accepted);
    for d in devices.iter_mut() {
        d.ping().await;
    }
    talk_dev.ping().await;

    // The control channel subscribed again: a kick reaches this instance.
    let victim = &beaters[0];
    let kick = iot_core::control::Control::Kick {
        phy_id: common::phy_id(victim),
        // Above any real epoch (they are floored at the clock in µs).
        epoch: u64::MAX,
    }
    .encode();
    let channel = ingest.keys.downlink_channel(&ingest.server_id);
    eventually(
        Duration::from_secs(15),
        "a subscriber on the control channel",
        || {
            let mut c = c.clone();
            let (channel, kick) = (channel.clone(), kick.clone());
            async move {
                let receivers: i64 = redis::cmd("PUBLISH")
                    .arg(channel)
                    .arg(kick)
                    .query_async(&mut c)
                    .await
                    .map_err(|e| e.to_string())?;
                if receivers >= 1 {
                    Ok(())
                } else {
                    Err("no subscriber yet".to_owned())
                }
            }
        },
    )
    .await;
    devices[0].closed_within(Duration::from_secs(3)).await;
    wait_events(&c, &ingest.keys, victim, "tcp_down(takeover)", |ev| {
        common::has_tcp_down(ev, TcpDownReason::Takeover)
    })
    .await;
    assert!(
        ingest
            .metric("iot_ingest_redis_errors_total{op=\"xadd\"}")
            .await
            >= 1.0
    );
    assert!(
        ingest
            .metric("iot_ingest_connects_refused_total{reason=\"server_unavailable\"}")
            .await
            >= 1.0
    );
    ingest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_publishers_are_not_closed_for_keepalive_while_their_uplinks_wait_for_redis() {
    let mut redis = RedisServer::start();
    let ingest = Ingest::start(&redis.url(), "out-srv-2", |c| {
        c.redis.read_timeout = Duration::from_millis(500);
        c.redis.write_timeout = Duration::from_millis(500);
        c.redis.dial_timeout = Duration::from_millis(500);
    })
    .await;
    let id = phy("qos1");
    // Keepalive 1 s: silent for 1.5 s, a device is closed.
    let mut dev = TestDevice::connected(&ingest.mqtt, &id, 1).await;
    let topic = format!("devices/{id}/up/t");
    redis.stop();
    eventually(Duration::from_secs(10), "writer degraded", || async {
        let (_, body) = ingest.health().await;
        if body["checks"]["event_writer"]["status"] == "degraded" {
            Ok(())
        } else {
            Err(body)
        }
    })
    .await;
    // More QoS 1 uplinks than the ingest holds while they wait: it stops
    // reading from the device.
    const N: u16 = 40;
    for pkid in 1..=N {
        dev.send(&publish_packet(&topic, b"x", QoS::AtLeastOnce, pkid))
            .await;
    }
    dev.send(&Packet::PingReq).await;
    // Twice the allowance: a device held to its keepalive would have been
    // closed by now (the connection ending makes `recv` return `None`).
    let window = Duration::from_secs(3);
    let got = tokio::time::timeout(window, dev.recv(window * 2)).await;
    assert!(
        got.is_err(),
        "nothing may arrive, and the connection must stay, while the uplinks wait for Redis: {got:?}"
    );
    assert!(!dev.is_closed().await, "the device was closed");
    assert_eq!(
        ingest
            .metric("iot_ingest_disconnects_total{reason=\"keepalive\"}")
            .await,
        0.0
    );

    redis.start_again();
    let mut acked = Vec::new();
    while acked.len() < usize::from(N) {
        match dev.recv(Duration::from_secs(10)).await {
            Some(Packet::PubAck(a)) => acked.push(a.pkid),
            Some(Packet::PingResp) => {}
            other => panic!("expected PUBACKs, got {other:?} after {}", acked.len()),
        }
    }
    let expected: Vec<u16> = (1..=N).collect();
    assert_eq!(acked, expected, "every uplink acknowledged, in order");
    ingest.stop().await.unwrap();
}

/// A fresh connection (the one made before the outage died with Redis).
async fn conn_after(ingest: &Ingest) -> redis::aio::MultiplexedConnection {
    eventually(Duration::from_secs(10), "Redis answers again", || async {
        redis::Client::open(ingest.redis_url.as_str())
            .map_err(|e| e.to_string())?
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| e.to_string())
    })
    .await
}
