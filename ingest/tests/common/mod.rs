//! What the ingest's integration tests share: an in-process ingest on
//! loopback listeners, a rumqttc client driven by a task, and readers for the
//! event streams and `/metrics`.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use iot_core::{Config, Entry, Event, EventKind, Keys, PhyId, ServerId, TcpDownReason};
use iot_service::startup::Context;
use rumqttc::{
    AsyncClient, ConnectionError, Event as MqttEvent, MqttOptions, Packet as MqttPacket,
};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Held by tests that compare metric values: the Prometheus recorder is
/// global to the test process, so tests that run at the same time in one
/// binary would count into each other's figures.
pub static METRICS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Number of shards the tests use (small, so that shard mistakes show).
pub const SHARDS: u16 = 4;

/// An ingest running in this process.
pub struct Ingest {
    /// MQTT `host:port`.
    pub mqtt: String,
    /// HTTP `host:port`.
    pub http: String,
    /// Its server id.
    pub server_id: ServerId,
    /// The key schema.
    pub keys: Keys,
    /// The Redis URL.
    pub redis_url: String,
    token: CancellationToken,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// The config every test starts from: the test's Redis, few shards, no
/// per-IP rate limit (every test connects from 127.0.0.1).
pub fn config(redis_url: &str, server_id: &str) -> Config {
    let mut c = Config::default();
    c.redis.url = redis_url.to_owned();
    c.redis.min_idle_conns = 2;
    c.redis.dial_timeout = Duration::from_secs(2);
    c.redis.read_timeout = Duration::from_secs(1);
    c.redis.write_timeout = Duration::from_secs(1);
    c.server_id = server_id.to_owned();
    c.streams.shards = SHARDS;
    c.mqtt.connect_rate_per_ip = 0;
    c.shutdown.grace = Duration::from_secs(5);
    c
}

impl Ingest {
    /// Starts an ingest with `config(redis_url, server_id)` changed by `tweak`.
    pub async fn start(redis_url: &str, server_id: &str, tweak: impl FnOnce(&mut Config)) -> Self {
        let mut cfg = config(redis_url, server_id);
        tweak(&mut cfg);
        let keys = cfg.keys();
        let token = CancellationToken::new();
        let ctx = Context::start(cfg, token.clone())
            .await
            .expect("context starts with the test's Redis");
        let server_id = ctx.server_id.clone();
        let mqtt = TcpListener::bind("127.0.0.1:0").await.expect("bind mqtt");
        let http = TcpListener::bind("127.0.0.1:0").await.expect("bind http");
        let mqtt_addr = mqtt.local_addr().expect("addr").to_string();
        let http_addr = http.local_addr().expect("addr").to_string();
        let handle = tokio::spawn(ingest::run(ctx, mqtt, http));
        let ingest = Self {
            mqtt: mqtt_addr,
            http: http_addr,
            server_id,
            keys,
            redis_url: redis_url.to_owned(),
            token,
            handle,
        };
        // Ready once it has registered itself.
        let redis = ingest.redis().await;
        let key = ingest.keys.servers();
        let id = ingest.server_id.to_string();
        iot_test_support::eventually(Duration::from_secs(10), "ingest registered", || {
            let mut redis = redis.clone();
            let (key, id) = (key.clone(), id.clone());
            async move {
                let v: Option<String> = redis::cmd("HGET")
                    .arg(&key)
                    .arg(&id)
                    .query_async(&mut redis)
                    .await
                    .map_err(|e| e.to_string())?;
                v.ok_or_else(|| "not yet".to_owned())
            }
        })
        .await;
        ingest
    }

    /// A Redis connection to the test's server.
    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        redis_conn(&self.redis_url).await
    }

    /// Cancels the ingest and returns what `run` returned.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.token.cancel();
        self.handle.await.expect("run task")
    }

    /// The value of a metric line (`name{labels}`), 0 if absent.
    pub async fn metric(&self, series: &str) -> f64 {
        metric(&self.http, series).await
    }

    /// `GET /health`: status code and body.
    pub async fn health(&self) -> (u16, serde_json::Value) {
        let resp = reqwest::get(format!("http://{}/health", self.http))
            .await
            .expect("GET /health");
        let code = resp.status().as_u16();
        (code, resp.json().await.expect("health JSON"))
    }
}

/// A multiplexed connection to `url`.
pub async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to the test's Redis")
}

/// The value of `series` (a full `name{labels}` or a bare name) in the
/// `/metrics` text of `http`; 0 when absent.
pub async fn metric(http: &str, series: &str) -> f64 {
    let text = reqwest::get(format!("http://{http}/metrics"))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text");
    parse_metric(&text, series)
}

/// Finds `series` in a Prometheus text exposition.
pub fn parse_metric(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

/// One stream entry: shard, entry id, decoded entry.
#[derive(Debug, Clone)]
pub struct Stored {
    /// The shard it was read from.
    pub shard: u16,
    /// The stream entry id.
    pub id: String,
    /// What it holds.
    pub entry: Entry,
}

/// Every entry of every shard (XRANGE - +), decoded.
pub async fn entries(redis: &mut redis::aio::MultiplexedConnection, keys: &Keys) -> Vec<Stored> {
    let mut out = Vec::new();
    for shard in 0..SHARDS {
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(keys.events(shard))
            .arg("-")
            .arg("+")
            .query_async(redis)
            .await
            .expect("XRANGE");
        for id in reply.ids {
            let bytes: Vec<u8> = match id.map.get(iot_core::event::ENTRY_FIELD) {
                Some(redis::Value::BulkString(b)) => b.clone(),
                other => panic!("entry {} has no `e` field: {other:?}", id.id),
            };
            let entry = Entry::decode(&bytes).expect("entry decodes");
            out.push(Stored {
                shard,
                id: id.id,
                entry,
            });
        }
    }
    out
}

/// Every event (heartbeat batches expanded) of `phy`, checking that each
/// came from the device's own shard, except heartbeats (a flush's
/// heartbeats travel together, on any shard). Streams have no order between
/// them, so the events come in time order; at the same millisecond a
/// `connected` comes first and a connection's end last.
pub async fn events_of(
    redis: &mut redis::aio::MultiplexedConnection,
    keys: &Keys,
    phy: &str,
) -> Vec<Event> {
    let shard = iot_core::keys::shard_of(phy, SHARDS);
    let mut out = Vec::new();
    for s in entries(redis, keys).await {
        for e in s.entry.into_events() {
            if e.phy_id.as_str() == phy {
                assert!(
                    s.shard == shard || e.kind == EventKind::Heartbeat,
                    "event of {phy} in shard {} ({e:?})",
                    s.shard
                );
                out.push(e);
            }
        }
    }
    out.sort_by_key(|e| {
        let rank = match e.kind {
            EventKind::Connected { .. } => 0,
            EventKind::TcpDown { .. } | EventKind::Disconnected => 2,
            _ => 1,
        };
        (e.ts_ms, rank)
    });
    out
}

/// Waits until the events of `phy` satisfy `check`; returns them.
pub async fn wait_events(
    redis: &redis::aio::MultiplexedConnection,
    keys: &Keys,
    phy: &str,
    what: &str,
    check: impl Fn(&[Event]) -> bool,
) -> Vec<Event> {
    let check = &check;
    iot_test_support::eventually(Duration::from_secs(10), what, || {
        let mut redis = redis.clone();
        async move {
            let ev = events_of(&mut redis, keys, phy).await;
            if check(&ev) { Ok(ev) } else { Err(ev) }
        }
    })
    .await
}

/// The kind names of `events`, in order.
pub fn kinds(events: &[Event]) -> Vec<&'static str> {
    events.iter().map(|e| e.kind.name()).collect()
}

/// Whether `events` hold a tcp_down with `reason`.
pub fn has_tcp_down(events: &[Event], reason: TcpDownReason) -> bool {
    events
        .iter()
        .any(|e| e.kind == EventKind::TcpDown { reason })
}

/// A phyID that no other test uses.
pub fn phy(name: &str) -> String {
    format!("{name}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

/// A validated phyID.
pub fn phy_id(s: &str) -> PhyId {
    PhyId::new(s).expect("valid phyID")
}

/// A rumqttc client whose event loop runs in a task; events arrive on a
/// channel. The loop stops at the first error (no reconnects).
pub struct Client {
    /// The client handle.
    pub client: AsyncClient,
    events: mpsc::UnboundedReceiver<Result<MqttEvent, String>>,
    task: tokio::task::JoinHandle<()>,
}

impl Client {
    /// Connects `id` to `addr` with `keepalive` and waits for CONNACK.
    pub async fn connect(addr: &str, id: &str, keepalive: Duration) -> Self {
        Self::connect_with(addr, id, keepalive, |_| {}).await
    }

    /// Like [`connect`](Self::connect), but acknowledges incoming QoS 1
    /// PUBLISHes only when told to ([`ack`](Self::ack)).
    pub async fn connect_manual_acks(addr: &str, id: &str, keepalive: Duration) -> Self {
        Self::connect_with(addr, id, keepalive, |o| {
            o.set_manual_acks(true);
        })
        .await
    }

    /// Connects with options changed by `tweak` and waits for an accepting
    /// CONNACK.
    pub async fn connect_with(
        addr: &str,
        id: &str,
        keepalive: Duration,
        tweak: impl FnOnce(&mut MqttOptions),
    ) -> Self {
        let (host, port) = addr.rsplit_once(':').expect("host:port");
        let mut opts = MqttOptions::new(id, host, port.parse().expect("port"));
        opts.set_keep_alive(keepalive);
        tweak(&mut opts);
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(ev) => {
                        if tx.send(Ok(ev)).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(describe(&e)));
                        return;
                    }
                }
            }
        });
        let mut c = Self {
            client,
            events,
            task,
        };
        match c.incoming(Duration::from_secs(10)).await {
            MqttPacket::ConnAck(ack) => {
                assert_eq!(ack.code, rumqttc::ConnectReturnCode::Success, "{id}")
            }
            other => panic!("expected CONNACK, got {other:?}"),
        }
        c
    }

    /// The next incoming packet (outgoing notifications are skipped).
    pub async fn incoming(&mut self, timeout: Duration) -> MqttPacket {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Err(_) => panic!("no incoming packet within {timeout:?}"),
                Ok(None) => panic!("event loop ended"),
                Ok(Some(Err(e))) => panic!("connection error: {e}"),
                Ok(Some(Ok(MqttEvent::Incoming(p)))) => return p,
                Ok(Some(Ok(MqttEvent::Outgoing(_)))) => {}
            }
        }
    }

    /// Subscribes to `devices/{id}/down/#` with QoS 1 and waits for the
    /// SUBACK granting it.
    pub async fn subscribe_down(&mut self, id: &str) {
        self.client
            .subscribe(format!("devices/{id}/down/#"), rumqttc::QoS::AtLeastOnce)
            .await
            .expect("queue SUBSCRIBE");
        match self.incoming(Duration::from_secs(10)).await {
            MqttPacket::SubAck(ack) => assert_eq!(
                ack.return_codes,
                [rumqttc::SubscribeReasonCode::Success(
                    rumqttc::QoS::AtLeastOnce
                )],
                "SUBACK"
            ),
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    /// The next incoming PUBLISH (other packets, such as PINGRESP, are
    /// skipped).
    pub async fn publish(&mut self, timeout: Duration) -> rumqttc::Publish {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if let MqttPacket::Publish(p) = self.incoming(left).await {
                return p;
            }
        }
    }

    /// Whether a PUBLISH arrives within `window` (a check that something
    /// does *not* happen: the window bounds it).
    pub async fn publish_within(&mut self, window: Duration) -> Option<rumqttc::Publish> {
        let deadline = tokio::time::Instant::now() + window;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Err(_) => return None,
                Ok(None) => panic!("event loop ended"),
                Ok(Some(Err(e))) => panic!("connection error: {e}"),
                Ok(Some(Ok(MqttEvent::Incoming(MqttPacket::Publish(p))))) => return Some(p),
                Ok(Some(Ok(_))) => {}
            }
        }
    }

    /// Acknowledges an incoming QoS 1 PUBLISH (manual acks).
    pub async fn ack(&self, p: &rumqttc::Publish) {
        self.client.ack(p).await.expect("queue PUBACK");
    }

    /// Waits for the connection to end; returns the error text.
    pub async fn ended(&mut self, timeout: Duration) -> String {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Err(_) => panic!("connection still up after {timeout:?}"),
                Ok(None) => return "event loop ended".into(),
                Ok(Some(Err(e))) => return e,
                Ok(Some(Ok(_))) => {}
            }
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn describe(e: &ConnectionError) -> String {
    format!("{e}")
}

/// A command store on the test's Redis, with the downlink settings of
/// `config(redis_url, ..)` changed by `tweak` (the store's settings decide
/// the queue cap and when the sweeper takes a command for stuck).
pub async fn command_store(
    redis_url: &str,
    tweak: impl FnOnce(&mut iot_core::config::DownlinkConfig),
) -> iot_downlink::CommandStore {
    let cfg = config(redis_url, "cmd-store");
    let mut downlink = cfg.downlink.clone();
    tweak(&mut downlink);
    let pool = iot_service::RedisPool::connect(&cfg.redis)
        .await
        .expect("redis pool");
    iot_downlink::CommandStore::new(pool, cfg.keys(), iot_downlink::Settings::from(&downlink))
}

/// A command for `phy` named `name`.
pub fn new_command(
    phy: &str,
    name: &str,
    payload: &[u8],
    queue_if_offline: bool,
    ttl: Option<Duration>,
) -> iot_downlink::NewCommand {
    iot_downlink::NewCommand {
        phy_id: phy_id(phy),
        name: name.to_owned(),
        payload: payload.to_vec(),
        ttl,
        queue_if_offline,
    }
}

/// Waits until command `id` satisfies `check`; returns its record and log.
pub async fn wait_command(
    store: &iot_downlink::CommandStore,
    id: uuid::Uuid,
    what: &str,
    timeout: Duration,
    check: impl Fn(&iot_downlink::Command) -> bool,
) -> (iot_downlink::Command, Vec<iot_downlink::Change>) {
    let check = &check;
    iot_test_support::eventually(timeout, what, || async move {
        match store.get_with_history(&id).await {
            Ok(Some((c, log))) if check(&c) => Ok((c, log)),
            Ok(other) => Err(format!("{other:?}")),
            Err(e) => Err(e.to_string()),
        }
    })
    .await
}

/// Waits until command `id` has `status`.
pub async fn wait_status(
    store: &iot_downlink::CommandStore,
    id: uuid::Uuid,
    status: iot_downlink::Status,
    timeout: Duration,
) -> (iot_downlink::Command, Vec<iot_downlink::Change>) {
    wait_command(store, id, &format!("command {status}"), timeout, |c| {
        c.status == status
    })
    .await
}

/// The statuses of a command's log, in order.
pub fn statuses(log: &[iot_downlink::Change]) -> Vec<&'static str> {
    log.iter().map(|c| c.status.as_str()).collect()
}

/// A projector running in this process on the test's Redis.
pub struct Projector {
    token: CancellationToken,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Projector {
    /// Starts a projector with `config(redis_url, server_id)` changed by `tweak`.
    pub async fn start(redis_url: &str, server_id: &str, tweak: impl FnOnce(&mut Config)) -> Self {
        let mut cfg = config(redis_url, server_id);
        tweak(&mut cfg);
        let token = CancellationToken::new();
        let ctx = Context::start(cfg, token.clone())
            .await
            .expect("projector context");
        let http = TcpListener::bind("127.0.0.1:0").await.expect("bind http");
        let handle = tokio::spawn(projector::run(ctx, http));
        Self { token, handle }
    }

    /// Stops it.
    pub async fn stop(self) {
        self.token.cancel();
        let _ = self.handle.await;
    }
}

/// Connects with `username` / `password` (raw device) and returns the
/// CONNACK code and the connection.
pub async fn connect_with_credentials(
    addr: &str,
    id: &str,
    username: Option<&str>,
    password: Option<&[u8]>,
) -> (iot_test_support::TestDevice, iot_mqtt::ConnectReturnCode) {
    let mut connect =
        iot_mqtt::Connect::new(iot_mqtt::MqttStr::try_from(id.to_owned()).expect("client id"));
    connect.keep_alive = 30;
    connect.username =
        username.map(|u| iot_mqtt::MqttStr::try_from(u.to_owned()).expect("username"));
    connect.password = password.map(bytes::Bytes::copy_from_slice);
    let mut d = iot_test_support::TestDevice::open(addr).await;
    d.send(&iot_mqtt::Packet::Connect(connect)).await;
    match d.recv(Duration::from_secs(15)).await {
        Some(iot_mqtt::Packet::ConnAck(ack)) => (d, ack.code),
        other => panic!("expected CONNACK for {id}, got {other:?}"),
    }
}
