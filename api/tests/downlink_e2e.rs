//! Downlinks end to end through HTTP: two ingest instances, a projector and
//! the api in one process on one private Redis, real MQTT devices
//! (rumqttc). A command posted to the api travels over Redis Pub/Sub to the
//! instance holding the device, reaches it as a QoS 1 PUBLISH, and its fate
//! is what the api shows: `acked` for a device that answers, `timed_out`
//! (with the `ack_timeout` event and the policy's penalty) for one that
//! never does. Nothing here writes Redis behind the services' backs: if
//! delivery breaks anywhere, these tests fail.

mod common;

use std::time::Duration;

use common::{READ, TestApi};
use iot_core::Config;
use iot_service::startup::Context;
use iot_test_support::{RedisServer, eventually};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(15);
/// Short, so that a device that never answers times out quickly (with
/// one retransmission at half of it).
const ACK_TIMEOUT: Duration = Duration::from_millis(1200);

struct Stack {
    api: TestApi,
    /// MQTT ports of ingest A and B.
    mqtt: [u16; 2],
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
    shutdown: CancellationToken,
}

const INGEST_A: &str = "dl-e2e-a";
const INGEST_B: &str = "dl-e2e-b";

fn stack_config(redis: &RedisServer) -> Config {
    let mut c = common::config(redis);
    c.downlink.ack_timeout = ACK_TIMEOUT;
    // IOT_POLICY_ACK_TIMEOUT_PENALTY=0.6: with a fresh heartbeat (1) an
    // ACK timeout takes the device offline (0.4 < 0.5).
    c.policy.ack_timeout_penalty = 0.6;
    c.policy.threshold = 0.5;
    c.streams.shards = 4;
    c.session.liveness_ttl = Duration::from_secs(2);
    c.projector.block = Duration::from_millis(50);
    c.projector.due_interval = Duration::from_millis(50);
    c.projector.lag_interval = Duration::from_millis(200);
    c.projector.reaper_interval = Duration::from_millis(200);
    c.mqtt.connect_rate_per_ip = 0;
    c.shutdown.grace = Duration::from_secs(3);
    c
}

async fn listener() -> tokio::net::TcpListener {
    tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
}

impl Stack {
    async fn start() -> Self {
        let redis = RedisServer::start();
        let config = stack_config(&redis);
        let shutdown = CancellationToken::new();
        let mut tasks = Vec::new();
        let mut mqtt = [0; 2];
        for (i, id) in [INGEST_A, INGEST_B].into_iter().enumerate() {
            let mut c = config.clone();
            c.server_id = id.into();
            let ctx = Context::start(c, shutdown.clone())
                .await
                .expect("ingest context");
            let l = listener().await;
            mqtt[i] = l.local_addr().expect("addr").port();
            tasks.push(tokio::spawn(ingest::run(ctx, l, listener().await)));
        }
        let mut c = config.clone();
        c.server_id = "dl-e2e-projector".into();
        let ctx = Context::start(c, shutdown.clone())
            .await
            .expect("projector context");
        tasks.push(tokio::spawn(projector::run(ctx, listener().await)));
        let api = TestApi::start_on(redis, config).await;
        Self {
            api,
            mqtt,
            tasks,
            shutdown,
        }
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.api.get_as(path, Some(READ)).await
    }

    async fn stop(self) {
        self.shutdown.cancel();
        for t in self.tasks {
            let r = tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .expect("service stops")
                .expect("service task");
            r.expect("service returns Ok");
        }
        self.api.stop().await;
    }
}

/// A real MQTT device whose event loop runs in a task; what arrives comes
/// out of a channel.
struct Device {
    id: String,
    client: AsyncClient,
    incoming: mpsc::UnboundedReceiver<Packet>,
    task: JoinHandle<()>,
}

impl Device {
    /// Connects `id` to `port`, subscribes to `devices/{id}/down/#` with
    /// QoS 1 and waits for the SUBACK. With `acks` false the device never
    /// acknowledges a PUBLISH.
    async fn subscribed(port: u16, id: &str, acks: bool) -> Self {
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_manual_acks(!acks);
        let (client, mut eventloop) = AsyncClient::new(opts, 16);
        let (tx, incoming) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok(ev) = eventloop.poll().await {
                if let Event::Incoming(p) = ev
                    && tx.send(p).is_err()
                {
                    return;
                }
            }
        });
        let mut d = Self {
            id: id.to_owned(),
            client,
            incoming,
            task,
        };
        assert!(matches!(d.next().await, Packet::ConnAck(_)));
        d.client
            .subscribe(format!("devices/{id}/down/#"), QoS::AtLeastOnce)
            .await
            .expect("SUBSCRIBE");
        match d.next().await {
            Packet::SubAck(ack) => assert_eq!(
                ack.return_codes,
                [rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce)]
            ),
            other => panic!("{id}: expected SUBACK, got {other:?}"),
        }
        d
    }

    async fn next(&mut self) -> Packet {
        tokio::time::timeout(WAIT, self.incoming.recv())
            .await
            .unwrap_or_else(|_| panic!("{}: nothing arrived within {WAIT:?}", self.id))
            .unwrap_or_else(|| panic!("{}: connection ended", self.id))
    }

    /// The next PUBLISH (PINGRESPs skipped).
    async fn publish(&mut self) -> rumqttc::Publish {
        loop {
            if let Packet::Publish(p) = self.next().await {
                return p;
            }
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn statuses(history: &Value) -> Vec<&str> {
    history
        .as_array()
        .unwrap_or_else(|| panic!("no history: {history}"))
        .iter()
        .map(|c| c["status"].as_str().expect("status"))
        .collect()
}

fn time(v: &Value) -> chrono::DateTime<chrono::FixedOffset> {
    chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap_or_else(|| panic!("no time: {v}")))
        .unwrap_or_else(|e| panic!("{v}: {e}"))
}

/// Waits until the device's per-device answer is online with a fresh
/// heartbeat, connected to `server`.
async fn wait_online(stack: &Stack, phy: &str, server: &str) -> Value {
    eventually(WAIT, &format!("{phy} online on {server}"), || async {
        let (status, d) = stack.get(&format!("/api/devices/{phy}")).await;
        if status == 200 && d["online"] == true && d["server_id"] == server {
            Ok(d)
        } else {
            Err((status, d))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_posted_to_the_api_reaches_the_device_on_another_ingest_and_is_acked() {
    let stack = Stack::start().await;
    let phy = "dl-e2e-keen";
    let mut dev = Device::subscribed(stack.mqtt[1], phy, true).await;
    let view = wait_online(&stack, phy, INGEST_B).await;
    let epoch = view["epoch"].as_u64().expect("epoch");

    // Posted to the api, with a wait: the answer is the terminal state.
    let (status, c) = stack
        .api
        .post(
            &format!("/api/devices/{phy}/commands"),
            &json!({"name": "reboot", "payload": "{\"delay\": 5}", "wait": "5s"}),
        )
        .await;
    assert_eq!(status, 201, "{c}");
    assert_eq!(c["status"], "acked", "{c}");
    assert_eq!(c["terminal"], true);
    assert_eq!(c["server_id"], INGEST_B);
    assert_eq!(c["epoch"], epoch);
    let id = c["id"].as_str().expect("id").to_owned();

    // The device got it on its topic, as QoS 1, once.
    let p = dev.publish().await;
    assert_eq!(p.topic, format!("devices/{phy}/down/reboot"));
    assert_eq!(&p.payload[..], b"{\"delay\": 5}");
    assert_eq!(p.qos, QoS::AtLeastOnce);
    assert!(!p.dup);

    // Its record and history through the api.
    let (status, d) = stack.get(&format!("/api/commands/{id}")).await;
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["status"], "acked");
    assert_eq!(d["attempts"], 1);
    assert_eq!(d["hops"], 0);
    let h = &d["history"];
    assert_eq!(statuses(h), ["dispatched", "sent", "acked"], "{d}");
    let place = format!("{INGEST_B} epoch {epoch}");
    assert_eq!(h[0]["detail"], place.as_str(), "dispatched to B: {d}");
    assert_eq!(h[1]["detail"], place.as_str(), "sent by B: {d}");
    let times: Vec<_> = (0..3).map(|i| time(&h[i]["at"])).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{h}");
    assert_eq!(
        h.as_array()
            .expect("history")
            .iter()
            .map(|c| c["seq"].as_u64().expect("seq"))
            .collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert!(time(&d["sent_at"]) <= time(&d["acked_at"]), "{d}");
    // And in the device's list, with its history when asked.
    let (status, list) = stack
        .get(&format!("/api/devices/{phy}/commands?history=true"))
        .await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["commands"][0]["id"], id.as_str());
    assert_eq!(
        statuses(&list["commands"][0]["history"]),
        ["dispatched", "sent", "acked"]
    );
    drop(dev);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_never_acks_ends_timed_out_and_offline_by_the_policy() {
    let stack = Stack::start().await;
    let phy = "dl-e2e-mute";
    let mut dev = Device::subscribed(stack.mqtt[0], phy, false).await;
    let before = wait_online(&stack, phy, INGEST_A).await;
    assert!(before["last_ack_timeout"].is_null(), "{before}");

    let (status, c) = stack
        .api
        .post(
            &format!("/api/devices/{phy}/commands"),
            &json!({"name": "flash", "payload": "fw-2", "wait": "5s"}),
        )
        .await;
    assert_eq!(status, 201, "{c}");
    assert_eq!(c["status"], "timed_out", "{c}");
    assert_eq!(c["terminal"], true);
    assert_eq!(c["reason"], "ack_timeout");
    let id = c["id"].as_str().expect("id").to_owned();

    // It was sent, and sent again with DUP, and never acknowledged.
    let first = dev.publish().await;
    let again = dev.publish().await;
    assert_eq!(first.topic, format!("devices/{phy}/down/flash"));
    assert_eq!(&first.payload[..], b"fw-2");
    assert!(!first.dup && again.dup);
    assert_eq!(first.pkid, again.pkid);

    let (_, d) = stack.get(&format!("/api/commands/{id}")).await;
    assert_eq!(
        statuses(&d["history"]),
        ["dispatched", "sent", "sent", "timed_out"],
        "{d}"
    );
    assert_eq!(d["attempts"], 2);
    assert!(d["acked_at"].is_null());

    // The ack_timeout event is in the device's view, and the policy's
    // penalty takes it offline while it stays connected.
    let view = eventually(WAIT, "offline for ack_timeout", || async {
        let (status, v) = stack.get(&format!("/api/devices/{phy}")).await;
        if status == 200 && v["online"] == false && v["reason"] == "ack_timeout" {
            Ok(v)
        } else {
            Err((status, v))
        }
    })
    .await;
    assert_eq!(view["connected"], true, "{view}");
    assert!(view["last_ack_timeout"].is_string(), "{view}");
    assert_eq!(common::f(&view["terms"], "ack_timeout"), -0.6, "{view}");
    assert!((common::f(&view, "score") - 0.4).abs() < 1e-9, "{view}");
    drop(dev);
    stack.stop().await;
}
