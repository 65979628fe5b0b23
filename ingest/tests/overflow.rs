//! The outage buffer is bounded: beyond `streams.buffer_max` the oldest
//! events are dropped and counted, never silently; what is kept is written
//! oldest first when Redis is back.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Ingest, phy, wait_events};
use iot_core::EventKind;
use iot_mqtt::QoS;
use iot_test_support::{RedisServer, TestDevice, eventually, publish_packet};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overflow_drops_the_oldest_events_and_counts_them() {
    let mut redis = RedisServer::start();
    let ingest = Ingest::start(&redis.url(), "ovf-srv-1", |c| {
        c.streams.buffer_max = 5;
        c.redis.read_timeout = Duration::from_millis(500);
        c.redis.write_timeout = Duration::from_millis(500);
    })
    .await;
    let id = phy("flood");
    let mut d = TestDevice::connected(&ingest.mqtt, &id, 60).await;
    let conn = ingest.redis().await;
    wait_events(&conn, &ingest.keys, &id, "connected", |ev| !ev.is_empty()).await;
    let before = ingest
        .metric("iot_ingest_events_dropped_total{reason=\"buffer_full\"}")
        .await;

    redis.stop();
    let topic = format!("devices/{id}/up/n");
    for i in 0..12u8 {
        d.send(&publish_packet(&topic, &[i], QoS::AtMostOnce, 0))
            .await;
    }
    d.ping().await;
    eventually(Duration::from_secs(10), "7 drops counted", || async {
        let n = ingest
            .metric("iot_ingest_events_dropped_total{reason=\"buffer_full\"}")
            .await;
        if n >= before + 7.0 { Ok(()) } else { Err(n) }
    })
    .await;

    redis.start_again();
    let conn = eventually(Duration::from_secs(10), "Redis back", || async {
        redis::Client::open(ingest.redis_url.as_str())
            .map_err(|e| e.to_string())?
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| e.to_string())
    })
    .await;
    let events = wait_events(&conn, &ingest.keys, &id, "the 5 newest uplinks", |ev| {
        ev.iter().filter(|e| e.kind.name() == "uplink").count() >= 5
    })
    .await;
    let payloads: Vec<u8> = events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Uplink { payload, .. } => Some(payload[0]),
            _ => None,
        })
        .collect();
    assert_eq!(
        payloads,
        vec![7, 8, 9, 10, 11],
        "oldest dropped, rest in order"
    );
    d.ping().await;
    ingest.stop().await.unwrap();
}

/// While Redis is healthy, a burst beyond the buffer bound is not dropped:
/// the writer stops taking from the channel and connections wait instead
/// (backpressure), so every event is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_redis_gets_every_event_of_a_burst() {
    let redis = RedisServer::start();
    let ingest = Ingest::start(&redis.url(), "ovf-srv-2", |c| {
        c.streams.buffer_max = 20;
        c.streams.batch_max = 4;
        c.streams.channel_capacity = 8;
    })
    .await;
    let id = phy("burst");
    let mut d = TestDevice::connected(&ingest.mqtt, &id, 60).await;
    let topic = format!("devices/{id}/up/n");
    let mut burst = bytes::BytesMut::new();
    for i in 0..500u16 {
        publish_packet(&topic, &i.to_be_bytes(), QoS::AtMostOnce, 0).write(&mut burst);
    }
    d.send_raw(&burst).await.unwrap();
    d.ping().await;
    let conn = ingest.redis().await;
    let events = wait_events(&conn, &ingest.keys, &id, "500 uplinks", |ev| {
        ev.iter().filter(|e| e.kind.name() == "uplink").count() >= 500
    })
    .await;
    let seq: Vec<u16> = events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Uplink { payload, .. } => Some(u16::from_be_bytes([payload[0], payload[1]])),
            _ => None,
        })
        .collect();
    assert_eq!(seq, (0..500).collect::<Vec<_>>(), "all of them, in order");
    ingest.stop().await.unwrap();
}
