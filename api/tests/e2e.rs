//! End to end: an ingest, a projector and an api in one process on one
//! private Redis, with real MQTT devices (rumqttc). The online list, the
//! count and the per-device answers follow connect, heartbeat expiry, TCP
//! drop and ACK timeout.
//!
//! Windows are short (heartbeat timeout 5 s, penalty windows 3 s) and the
//! threshold is 0.75, so a TCP drop (-0.5) or an ACK timeout (-0.3) alone
//! takes a device with a fresh heartbeat offline. The ACK timeout is a real
//! one: a command posted to the api reaches a device that subscribed and
//! never acknowledges it.

mod common;

use std::time::Duration;

use common::{READ, TestApi};
use iot_core::Config;
use iot_core::keys::shard_of;
use iot_service::startup::Context;
use iot_test_support::{RedisServer, eventually};
use rumqttc::{AsyncClient, MqttOptions};
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(15);

struct Stack {
    api: TestApi,
    mqtt_port: u16,
    ingest_id: String,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
    shutdown: CancellationToken,
}

fn stack_config(redis: &RedisServer) -> Config {
    let mut c = common::config(redis);
    c.session.heartbeat_timeout = Duration::from_secs(5);
    c.session.liveness_ttl = Duration::from_secs(2);
    c.policy.tcp_down_window = Duration::from_secs(3);
    c.policy.ack_window = Duration::from_secs(3);
    c.policy.threshold = 0.75;
    c.streams.shards = 4;
    c.projector.block = Duration::from_millis(50);
    c.projector.due_interval = Duration::from_millis(50);
    c.projector.lag_interval = Duration::from_millis(200);
    c.projector.reaper_interval = Duration::from_millis(200);
    c.downlink.ack_timeout = Duration::from_secs(1);
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

        let mut ingest_cfg = config.clone();
        ingest_cfg.server_id = "e2e-ingest".into();
        let ctx = Context::start(ingest_cfg, shutdown.clone())
            .await
            .expect("ingest context");
        let mqtt = listener().await;
        let mqtt_port = mqtt.local_addr().expect("addr").port();
        tasks.push(tokio::spawn(ingest::run(ctx, mqtt, listener().await)));

        let mut projector_cfg = config.clone();
        projector_cfg.server_id = "e2e-projector".into();
        let ctx = Context::start(projector_cfg, shutdown.clone())
            .await
            .expect("projector context");
        tasks.push(tokio::spawn(projector::run(ctx, listener().await)));

        let api = TestApi::start_on(redis, config).await;
        Self {
            api,
            mqtt_port,
            ingest_id: "e2e-ingest".into(),
            tasks,
            shutdown,
        }
    }

    async fn device(&self, path: &str) -> (u16, Value) {
        self.api.get_as(path, Some(READ)).await
    }

    async fn online_ids(&self) -> (u64, Vec<String>) {
        let (status, body) = self.device("/api/devices/online?limit=1000").await;
        assert_eq!(status, 200, "{body}");
        let ids = body["devices"]
            .as_array()
            .expect("devices")
            .iter()
            .filter_map(|d| d["phy_id"].as_str().map(str::to_owned))
            .collect();
        (body["count"].as_u64().expect("count"), ids)
    }

    /// Waits until `phy`'s answer has `online` and `reason`, both in the
    /// per-device answer (computed now) and in the projection (the online
    /// list and count).
    async fn wait_state(&self, phy: &str, online: bool, reason: &str) -> Value {
        let what = format!("{phy} online={online} reason={reason}");
        eventually(WAIT, &what, || async {
            let (status, d) = self.device(&format!("/api/devices/{phy}")).await;
            let listed = self.online_ids().await.1.contains(&phy.to_owned());
            if status == 200
                && d["online"] == online
                && d["reason"] == reason
                && d["projected_online"] == online
                && listed == online
            {
                Ok(d)
            } else {
                Err((status, listed, d))
            }
        })
        .await
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

/// A real MQTT client whose event loop runs in a task.
struct Device {
    client: AsyncClient,
    task: JoinHandle<()>,
    silence: Option<oneshot::Sender<()>>,
}

impl Device {
    /// Connects `id` with `keepalive` and waits for the CONNACK.
    async fn connect(port: u16, id: &str, keepalive: Duration) -> Self {
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_keep_alive(keepalive);
        let (client, mut eventloop) = AsyncClient::new(opts, 16);
        let (connack_tx, connack_rx) = oneshot::channel();
        let (silence_tx, mut silence_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut connack = Some(connack_tx);
            loop {
                tokio::select! {
                    ev = eventloop.poll() => match ev {
                        Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                            if let Some(tx) = connack.take() {
                                let _ = tx.send(());
                            }
                        }
                        Ok(_) => {}
                        Err(_) => return,
                    },
                    _ = &mut silence_rx => break,
                }
            }
            // Silent: the event loop (and its socket) stays, unpolled.
            std::future::pending::<()>().await;
            drop(eventloop);
        });
        tokio::time::timeout(WAIT, connack_rx)
            .await
            .expect("CONNACK in time")
            .expect("CONNACK");
        Self {
            client,
            task,
            silence: Some(silence_tx),
        }
    }

    /// Connects `id`, subscribes to its downlinks with QoS 1, and never
    /// acknowledges a command (manual acks, none given); it keeps pinging.
    async fn connect_never_acking(port: u16, id: &str) -> Self {
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(1));
        opts.set_manual_acks(true);
        let (client, mut eventloop) = AsyncClient::new(opts, 16);
        let (suback_tx, suback_rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            let mut suback = Some(suback_tx);
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        if let Some(tx) = suback.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
        client
            .subscribe(format!("devices/{id}/down/#"), rumqttc::QoS::AtLeastOnce)
            .await
            .expect("queue SUBSCRIBE");
        tokio::time::timeout(WAIT, suback_rx)
            .await
            .expect("SUBACK in time")
            .expect("SUBACK");
        Self {
            client,
            task,
            silence: None,
        }
    }

    /// Stops sending anything (no PINGREQ) while the TCP connection stays up.
    fn go_silent(&mut self) {
        if let Some(tx) = self.silence.take() {
            let _ = tx.send(());
        }
    }

    /// Drops the TCP connection without DISCONNECT.
    fn drop_tcp(self) {
        self.task.abort();
        drop(self.client);
    }
}

/// The online flips of `phy` in the lifecycle stream, oldest first:
/// (online, reason).
async fn lifecycle(stack: &Stack, phy: &str) -> Vec<(bool, String)> {
    let mut conn = stack.api.conn().await;
    let shard = shard_of(phy, stack.api.config.streams.shards);
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(stack.api.keys.lifecycle(shard))
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .expect("XRANGE");
    entries
        .into_iter()
        .filter_map(|(_, fields)| {
            let get = |k: &str| {
                fields
                    .iter()
                    .find(|(f, _)| f == k)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default()
            };
            (get("phy_id") == phy).then(|| (get("online") == "1", get("reason")))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_follows_connect_heartbeat_expiry_tcp_drop_and_ack_timeout() {
    let stack = Stack::start().await;
    let port = stack.mqtt_port;

    // Connect: listed, counted, online with a fresh heartbeat.
    let pinger = Device::connect(port, "e2e-pinger", Duration::from_secs(1)).await;
    let d = stack
        .wait_state("e2e-pinger", true, "heartbeat_fresh")
        .await;
    assert_eq!(d["connected"], true);
    assert_eq!(d["server_id"], stack.ingest_id);
    let epoch = d["epoch"].as_u64().expect("epoch");
    let mut conn = stack.api.conn().await;
    let owner: String = redis::cmd("GET")
        .arg(
            stack
                .api
                .keys
                .owner(&iot_core::PhyId::new("e2e-pinger").expect("valid")),
        )
        .query_async(&mut conn)
        .await
        .expect("owner key");
    assert_eq!(
        owner,
        format!("{} {epoch}", stack.ingest_id),
        "the connection's own epoch"
    );
    assert!(d["conn_id"].as_str().is_some());
    assert!(d["connected_at"].as_str().is_some());
    assert!(d["lag"]["entries"].as_u64().is_some(), "{d}");

    // Heartbeat expiry: a device that goes silent with its socket open is
    // offline after heartbeat_timeout, though still connected.
    let mut quiet = Device::connect(port, "e2e-quiet", Duration::from_secs(60)).await;
    stack.wait_state("e2e-quiet", true, "heartbeat_fresh").await;
    quiet.go_silent();
    let d = stack
        .wait_state("e2e-quiet", false, "heartbeat_expired")
        .await;
    assert_eq!(d["connected"], true);
    assert_eq!(f(&d["terms"], "heartbeat"), 0.0);

    // The pinger stayed online throughout: its PINGREQs keep it fresh.
    let (count, ids) = stack.online_ids().await;
    assert_eq!(count, 1, "{ids:?}");
    assert_eq!(ids, vec!["e2e-pinger".to_owned()]);

    // TCP drop: offline at once (fresh heartbeat 1 - 0.5 < 0.75), the
    // connection ended, back online when the drop's window is over (the
    // seed's rule: the heartbeat is still fresh), then offline for good
    // when the heartbeat expires.
    let dropper = Device::connect(port, "e2e-dropper", Duration::from_secs(1)).await;
    stack
        .wait_state("e2e-dropper", true, "heartbeat_fresh")
        .await;
    dropper.drop_tcp();
    let d = stack
        .wait_state("e2e-dropper", false, "tcp_down:closed")
        .await;
    assert_eq!(d["connected"], false);
    assert_eq!(d["ended"], "closed");
    assert_eq!(d["last_tcp_down_reason"], "closed");
    assert_eq!(f(&d["terms"], "tcp_down"), -0.5);
    assert!((f(&d, "score") - 0.5).abs() < 1e-9);
    // The per-device policy can say otherwise for the same view.
    let (_, lenient) = stack
        .device("/api/devices/e2e-dropper/online?threshold=0.5")
        .await;
    assert_eq!(lenient["online"], true, "{lenient}");
    stack
        .wait_state("e2e-dropper", false, "heartbeat_expired")
        .await;
    // In between, the projection had it online again for the rest of its
    // heartbeat's freshness: the lifecycle has every flip, with its reason.
    let flips = lifecycle(&stack, "e2e-dropper").await;
    assert_eq!(
        flips,
        [
            (true, "connected".to_owned()),
            (false, "tcp_down:closed".to_owned()),
            (true, "recovered".to_owned()),
            (false, "heartbeat_expired".to_owned()),
        ],
        "online flips of the dropper"
    );

    // ACK timeout: a command the device never acknowledges times out (the
    // ingest's ACK timeout is 1 s): offline (1 - 0.3 < 0.75) while
    // connected, online again when the ACK window is over.
    let acker = Device::connect_never_acking(port, "e2e-acker").await;
    stack.wait_state("e2e-acker", true, "heartbeat_fresh").await;
    let (status, posted) = stack
        .api
        .post(
            "/api/devices/e2e-acker/commands",
            &serde_json::json!({"name": "reboot", "payload": "now"}),
        )
        .await;
    assert_eq!(status, 201, "{posted}");
    let id = posted["id"].as_str().expect("command id").to_owned();
    let d = stack.wait_state("e2e-acker", false, "ack_timeout").await;
    assert_eq!(d["connected"], true);
    assert_eq!(f(&d["terms"], "ack_timeout"), -0.3);
    assert!(d["last_ack_timeout"].as_str().is_some());
    let (_, cmd) = stack.device(&format!("/api/commands/{id}")).await;
    assert_eq!(cmd["status"], "timed_out", "{cmd}");
    stack.wait_state("e2e-acker", true, "heartbeat_fresh").await;
    let flips = lifecycle(&stack, "e2e-acker").await;
    assert_eq!(
        flips,
        [
            (true, "connected".to_owned()),
            (false, "ack_timeout".to_owned()),
            (true, "recovered".to_owned()),
        ],
        "online flips of the acker"
    );

    // Servers and stats see the ingest and its connections.
    let (status, servers) = stack.device("/api/servers").await;
    assert_eq!(status, 200);
    let me = servers["servers"]
        .as_array()
        .expect("servers")
        .iter()
        .find(|s| s["server_id"] == stack.ingest_id)
        .cloned()
        .unwrap_or_else(|| panic!("ingest not listed: {servers}"));
    assert_eq!(me["alive"], true);
    let stats = eventually(WAIT, "the projectors' lag record", || async {
        let (_, st) = stack.device("/api/stats").await;
        if st["lag"]["updated_at"].is_string() && st["lag"]["consumers"].as_u64() >= Some(1) {
            Ok(st)
        } else {
            Err(st)
        }
    })
    .await;
    assert_eq!(stats["online"], 2, "{stats}");
    // pinger, quiet and acker hold connections; the dropper's view may
    // already have expired (2 x heartbeat_timeout after its last event).
    assert_eq!(stats["connected"], 3, "{stats}");
    assert!(stats["known"].as_u64().is_some_and(|k| k >= 3), "{stats}");

    pinger.drop_tcp();
    acker.drop_tcp();
    quiet.task.abort();
    stack.stop().await;
}

fn f(v: &Value, k: &str) -> f64 {
    common::f(v, k)
}
