//! Every log line of a connection's work carries its `conn` span with the
//! device and connection ids, although no span is kept while it is idle.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Ingest, phy};
use iot_mqtt::{Packet, Publish, QoS};
use iot_test_support::{RedisServer, TestDevice, eventually};

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_log_lines_carry_the_device_and_connection_ids() {
    let captured = Captured::default();
    let sink = captured.clone();
    tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .init();

    let redis = RedisServer::start();
    let ingest = Ingest::start(&redis.url(), "span-srv", |_| {}).await;
    let id = phy("spanned");
    let mut dev = TestDevice::connected(&ingest.mqtt, &id, 30).await;
    dev.ping().await;
    // A publish on another device's topic is a logged protocol violation.
    let topic = iot_mqtt::MqttStr::try_from(format!("devices/{id}-other/up/x")).unwrap();
    let mut p = Publish::new(topic, bytes::Bytes::new());
    p.qos = QoS::AtMostOnce;
    dev.send(&Packet::Publish(p)).await;
    dev.closed_within(Duration::from_secs(3)).await;

    let lines = eventually(Duration::from_secs(10), "connection log lines", || async {
        let text = captured.text();
        let mine: Vec<String> = text
            .lines()
            .filter(|l| l.contains(&format!("phy_id={id}")))
            .map(str::to_owned)
            .collect();
        let has = |needle: &str| mine.iter().any(|l| l.contains(needle));
        if has("device connected") && has("protocol violation") && has("device connection closed") {
            Ok(mine)
        } else {
            Err(text)
        }
    })
    .await;
    for line in &lines {
        assert!(line.contains("conn{phy_id="), "{line}");
        assert!(line.contains(" conn_id="), "{line}");
    }
    ingest.stop().await.unwrap();
}
