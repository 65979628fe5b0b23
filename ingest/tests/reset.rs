//! A device whose connection is aborted (RST, as when a client crashes or a
//! middlebox drops it): the ingest writes tcp_down(reset) and counts the
//! disconnect under `reason="reset"`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Ingest, has_tcp_down, kinds, phy, wait_events};
use iot_core::{EventKind, TcpDownReason};
use iot_test_support::{RedisServer, TestDevice, eventually};

const RESETS: &str = "iot_ingest_disconnects_total{reason=\"reset\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_connection_is_tcp_down_reset() {
    let _turn = common::METRICS.lock().await;
    let redis = RedisServer::start();
    let ingest = Ingest::start(&redis.url(), "reset-srv-1", |_| {}).await;
    let conn = ingest.redis().await;
    let before = ingest.metric(RESETS).await;

    let id = phy("aborted");
    let mut d = TestDevice::connected(&ingest.mqtt, &id, 60).await;
    // The session is established on the ingest's side before the RST.
    d.ping().await;
    wait_events(&conn, &ingest.keys, &id, "connected", |ev| {
        kinds(ev).contains(&"connected")
    })
    .await;
    d.reset();

    let events = wait_events(&conn, &ingest.keys, &id, "tcp_down(reset)", |ev| {
        has_tcp_down(ev, TcpDownReason::Reset)
    })
    .await;
    // connected, the PINGREQ's heartbeat (if not folded into the end),
    // then the end.
    let ends: Vec<_> = kinds(&events)
        .into_iter()
        .filter(|k| *k != "heartbeat")
        .collect();
    assert_eq!(ends, vec!["connected", "tcp_down"], "{events:?}");
    let (first, last) = (&events[0], &events[events.len() - 1]);
    assert_eq!(
        last.kind,
        EventKind::TcpDown {
            reason: TcpDownReason::Reset
        }
    );
    assert_eq!((last.epoch, last.conn_id), (first.epoch, first.conn_id));

    let http = ingest.http.clone();
    let after = eventually(Duration::from_secs(10), "reset counted", || {
        let http = http.clone();
        async move {
            let v = common::metric(&http, RESETS).await;
            if v > before { Ok(v) } else { Err(v) }
        }
    })
    .await;
    assert_eq!(after, before + 1.0, "one reset counted");
    ingest.stop().await.unwrap();
}
