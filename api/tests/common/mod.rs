//! What the api's integration tests share: an api on a private Redis (and,
//! for the PostgreSQL routes, a migrated database of its own) over real
//! HTTP, requests of every method, and seeding of Redis exactly as the
//! projector and the ingest write it (views from `SessionView::apply` +
//! `to_fields`, projection fields, index sets, the lag record, registry
//! entries).

#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use iot_core::keys::shard_of;
use iot_core::registry::{InstanceInfo, Lag};
use iot_core::view::field;
use iot_core::{Config, Event, EventKind, Keys, PhyId, ServerId, SessionView, TcpDownReason};
use iot_downlink::{CommandStore, Settings as DownlinkSettings};
use iot_service::RedisPool;
use iot_service::startup::Context;
use iot_store::Store;
use iot_test_support::{RedisServer, TestDb};
use redis::aio::MultiplexedConnection;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The read token every test api accepts.
pub const READ: &str = "read-token-1";
/// The write token every test api accepts.
pub const WRITE: &str = "write-token-1";

/// An api on a private Redis, served over HTTP on 127.0.0.1:0.
pub struct TestApi {
    pub redis: RedisServer,
    pub config: Config,
    pub keys: Keys,
    pub addr: SocketAddr,
    pub http: reqwest::Client,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
    /// The database of [`TestApi::start_with_db`], dropped with the api.
    pub db: Option<TestDb>,
}

/// A fresh database with every migration applied.
pub async fn migrated_db() -> TestDb {
    let db = TestDb::create().await;
    store(db.url()).await.migrate().await.expect("migrate");
    db
}

/// A store on `url` (connected now).
pub async fn store(url: &str) -> Store {
    let cfg = iot_core::config::DatabaseConfig {
        url: url.to_owned(),
        max_connections: 4,
        connect_timeout: Duration::from_secs(5),
    };
    Store::connect(&cfg)
        .await
        .expect("connect to the test database")
}

/// A config for a test api on `redis` (tokens, prefix, short timeouts).
pub fn config(redis: &RedisServer) -> Config {
    let mut c = Config {
        server_id: "api-test".into(),
        ..Config::default()
    };
    c.redis.url = redis.url();
    c.redis.key_prefix = iot_test_support::unique_prefix();
    c.redis.min_idle_conns = 2;
    c.redis.dial_timeout = Duration::from_secs(1);
    c.redis.read_timeout = Duration::from_secs(1);
    c.redis.write_timeout = Duration::from_secs(1);
    c.api.read_tokens = vec![READ.into()];
    c.api.write_tokens = vec![WRITE.into()];
    c
}

/// A started [`Context`] for `config` (for tests that drive the router
/// without HTTP).
pub async fn context(config: Config) -> Context {
    Context::start(config, CancellationToken::new())
        .await
        .expect("start the api context")
}

impl TestApi {
    /// Starts an api with the default test config.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts an api after `tweak` adjusts the config.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        let redis = RedisServer::start();
        let mut config = config(&redis);
        tweak(&mut config);
        Self::start_on(redis, config).await
    }

    /// Starts an api on `redis` with `config`.
    pub async fn start_on(redis: RedisServer, config: Config) -> Self {
        let shutdown = CancellationToken::new();
        let ctx = Context::start(config.clone(), shutdown.clone())
            .await
            .expect("start the api context");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let task = tokio::spawn(api::run(ctx, listener));
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("http client");
        Self {
            keys: config.keys(),
            redis,
            config,
            addr,
            http,
            shutdown,
            task,
            db: None,
        }
    }

    /// Starts an api whose PostgreSQL is a fresh migrated database.
    pub async fn start_with_db() -> Self {
        Self::start_with_db_and(|_| {}).await
    }

    /// [`start_with_db`](Self::start_with_db) after `tweak` adjusts the config.
    pub async fn start_with_db_and(tweak: impl FnOnce(&mut Config)) -> Self {
        let db = migrated_db().await;
        let url = db.url().to_owned();
        let mut api = Self::start_with(|c| {
            c.database.url = url;
            c.database.connect_timeout = Duration::from_secs(2);
            tweak(c);
        })
        .await;
        api.db = Some(db);
        api
    }

    /// A store on this api's database.
    pub async fn store(&self) -> Store {
        store(self.db.as_ref().expect("an api with a database").url()).await
    }

    /// A Redis pool on this api's Redis.
    pub async fn pool(&self) -> RedisPool {
        RedisPool::connect(&self.config.redis)
            .await
            .expect("redis pool")
    }

    /// The downlink command store on this api's Redis and keys.
    pub async fn command_store(&self) -> CommandStore {
        CommandStore::new(
            self.pool().await,
            self.keys.clone(),
            DownlinkSettings::from(&self.config.downlink),
        )
    }

    /// A request with `method`, an optional bearer token and an optional
    /// JSON body: status, headers and the body as JSON (`Null` when empty;
    /// panics when it is not JSON).
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let mut req = self.http.request(method.clone(), self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.expect("read body");
        let json = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|e| {
                panic!("{method} {path} -> {status}: body is not JSON ({e}): {text:.500}")
            })
        };
        (status, headers, json)
    }

    /// POST `body` with the write token.
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let (s, _, b) = self
            .send(reqwest::Method::POST, path, Some(WRITE), Some(body))
            .await;
        (s, b)
    }

    /// PATCH `body` with the write token.
    pub async fn patch(&self, path: &str, body: &Value) -> (u16, Value) {
        let (s, _, b) = self
            .send(reqwest::Method::PATCH, path, Some(WRITE), Some(body))
            .await;
        (s, b)
    }

    /// DELETE with the write token.
    pub async fn delete(&self, path: &str) -> (u16, Value) {
        let (s, _, b) = self
            .send(reqwest::Method::DELETE, path, Some(WRITE), None)
            .await;
        (s, b)
    }

    /// An error answer to any request must be JSON `{"error", "message"}`
    /// with `status`; returns the error code.
    pub async fn expect_error_of(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
        status: u16,
    ) -> String {
        let (got, _, body) = self.send(method.clone(), path, token, body).await;
        assert_eq!(got, status, "{method} {path}: {body}");
        error_code(&body)
    }

    /// `http://127.0.0.1:port{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// GET with an optional bearer token: status, headers and body text.
    pub async fn get_raw(
        &self,
        path: &str,
        token: Option<&str>,
    ) -> (u16, reqwest::header::HeaderMap, String) {
        let mut req = self.http.get(self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.text().await.expect("read body");
        (status, headers, body)
    }

    /// GET with the read token; the body as JSON.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.get_as(path, Some(READ)).await
    }

    /// GET with `token`; the body as JSON (panics if it is not JSON).
    pub async fn get_as(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        let (status, _, body) = self.get_raw(path, token).await;
        let json = serde_json::from_str(&body).unwrap_or_else(|e| {
            panic!("GET {path} -> {status}: body is not JSON ({e}): {body:.500}")
        });
        (status, json)
    }

    /// An error answer must be JSON `{"error", "message"}` with `status`;
    /// returns the error code.
    pub async fn expect_error(&self, path: &str, token: Option<&str>, status: u16) -> String {
        let (got, body) = self.get_as(path, token).await;
        assert_eq!(got, status, "GET {path}: {body}");
        let code = body["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error code: {body}"));
        let message = body["message"]
            .as_str()
            .unwrap_or_else(|| panic!("no message: {body}"));
        assert!(!message.is_empty());
        assert_eq!(body.as_object().map(|o| o.len()), Some(2), "{body}");
        code.to_owned()
    }

    /// A Redis connection for seeding.
    pub async fn conn(&self) -> MultiplexedConnection {
        redis::Client::open(self.redis.url())
            .expect("redis client")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to test redis")
    }

    /// The seeding helper on this api's Redis and keys.
    pub async fn seeder(&self) -> Seeder {
        Seeder {
            conn: self.conn().await,
            keys: self.keys.clone(),
            shards: self.config.streams.shards,
        }
    }

    /// Stops the api and waits for it.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let r = tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("api stops within 10 s")
            .expect("api task");
        r.expect("api::run returns Ok");
    }
}

/// The real archiver (`iot_store::archiver::run`) on an api's Redis and
/// database, as the projector runs it.
pub struct Archiver {
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
    pub health: iot_service::Health,
}

impl Archiver {
    /// Starts it for `api` (which must have a database).
    pub async fn start(api: &TestApi) -> Self {
        let opts = iot_store::archiver::ArchiverOptions {
            keys: api.keys.clone(),
            shards: api.config.streams.shards,
            consumer: "api-test-archiver".into(),
            batch: 200,
            block: Duration::from_millis(50),
            claim_idle: Duration::from_secs(1),
            maintenance_interval: Duration::from_millis(200),
        };
        let shutdown = CancellationToken::new();
        let health = iot_service::Health::default();
        let task = tokio::spawn(iot_store::archiver::run(
            api.pool().await,
            api.store().await,
            health.clone(),
            opts,
            shutdown.clone(),
        ));
        Self {
            shutdown,
            task,
            health,
        }
    }

    /// Stops it and waits for it.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("the archiver stops within 10 s")
            .expect("archiver task");
    }
}

/// The code of an error body, checking its shape (`error` and a
/// non-empty `message`, nothing else).
pub fn error_code(body: &Value) -> String {
    let code = body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error code: {body}"));
    let message = body["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no message: {body}"));
    assert!(!message.is_empty());
    assert_eq!(body.as_object().map(|o| o.len()), Some(2), "{body}");
    code.to_owned()
}

/// A server id.
pub fn srv(s: &str) -> ServerId {
    ServerId::new(s).expect("server id")
}

/// A phyID.
pub fn phy(s: &str) -> PhyId {
    PhyId::new(s).expect("phyID")
}

/// The connection id of `phy`'s connection `epoch` in seeded events.
pub fn conn_id(phy_id: &PhyId, epoch: u64) -> Uuid {
    let h = phy_id
        .as_str()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
    Uuid::from_u128((u128::from(h) << 64) | u128::from(epoch))
}

/// An event of `phy`'s connection `epoch` on `server`.
pub fn event(phy_id: &PhyId, server: &ServerId, epoch: u64, ts_ms: i64, kind: EventKind) -> Event {
    Event {
        phy_id: phy_id.clone(),
        conn_id: conn_id(phy_id, epoch),
        server_id: server.clone(),
        epoch,
        ts_ms,
        kind,
    }
}

/// `connected`.
pub fn connected() -> EventKind {
    EventKind::Connected {
        keepalive_secs: 30,
        peer: "127.0.0.1:5000".into(),
    }
}

/// `tcp_down` with `reason`.
pub fn tcp_down(reason: TcpDownReason) -> EventKind {
    EventKind::TcpDown { reason }
}

/// `ack_timeout`.
pub fn ack_timeout() -> EventKind {
    EventKind::AckTimeout {
        command_id: Uuid::nil(),
    }
}

/// What the projector wrote about a device's state.
#[derive(Debug, Clone)]
pub struct ProjectedState {
    pub online: bool,
    pub reason: String,
    pub since: i64,
    pub rev: u64,
}

/// Writes Redis the way the projector and the ingest do.
pub struct Seeder {
    pub conn: MultiplexedConnection,
    pub keys: Keys,
    pub shards: u16,
}

impl Seeder {
    /// A device's view from `events` (merged with `SessionView::apply`), its
    /// projection fields and its index memberships, in one pipeline.
    pub async fn device(
        &mut self,
        phy: &PhyId,
        events: &[Event],
        projected: Option<ProjectedState>,
    ) {
        let mut pipe = redis::pipe();
        self.device_into(&mut pipe, phy, events, projected);
        let () = pipe.query_async(&mut self.conn).await.expect("seed device");
    }

    /// [`device`](Self::device) into a caller's pipeline.
    pub fn device_into(
        &self,
        pipe: &mut redis::Pipeline,
        phy: &PhyId,
        events: &[Event],
        projected: Option<ProjectedState>,
    ) {
        let mut view = SessionView::default();
        for e in events {
            view.apply(e);
        }
        let mut fields: Vec<(&str, String)> = view.to_fields(phy);
        let shard = shard_of(phy.as_str(), self.shards);
        if let Some(p) = &projected {
            fields.push((field::ONLINE, if p.online { "1" } else { "0" }.into()));
            fields.push((field::REASON, p.reason.clone()));
            fields.push((field::SINCE, p.since.to_string()));
            fields.push((field::REV, p.rev.to_string()));
            if p.online {
                pipe.zadd(self.keys.online(shard), phy.as_str(), 0).ignore();
            } else {
                pipe.zrem(self.keys.online(shard), phy.as_str()).ignore();
            }
        }
        pipe.hset_multiple(self.keys.device(phy), &fields).ignore();
        let newest = events.iter().map(|e| e.ts_ms).max().unwrap_or(0);
        pipe.zadd(self.keys.known(shard), phy.as_str(), newest)
            .ignore();
        if view.connected()
            && let (Some(server), Some(conn)) = (&view.server_id, view.conn_id)
        {
            pipe.sadd(self.keys.server_conns(server), conn.to_string())
                .ignore();
        }
    }

    /// `n` online devices `{prefix}{i}` seen at `ts` on `server`, spread
    /// over the shards; one pipeline per 500.
    pub async fn online_devices(
        &mut self,
        prefix: &str,
        n: usize,
        server: &ServerId,
        ts: i64,
    ) -> Vec<PhyId> {
        let mut all = Vec::with_capacity(n);
        for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
            let mut pipe = redis::pipe();
            for &i in chunk {
                let p = phy(&format!("{prefix}{i:05}"));
                let evs = [
                    event(&p, server, 1, ts, connected()),
                    event(&p, server, 1, ts, EventKind::Heartbeat),
                ];
                self.device_into(
                    &mut pipe,
                    &p,
                    &evs,
                    Some(ProjectedState {
                        online: true,
                        reason: "heartbeat_fresh".into(),
                        since: ts,
                        rev: 1,
                    }),
                );
                all.push(p);
            }
            let () = pipe
                .query_async(&mut self.conn)
                .await
                .expect("seed devices");
        }
        all
    }

    /// The lag record.
    pub async fn lag(&mut self, lag: &Lag) {
        let () = redis::cmd("HSET")
            .arg(self.keys.projector_lag())
            .arg(lag.to_fields())
            .query_async(&mut self.conn)
            .await
            .expect("seed lag");
    }

    /// An ingest instance: registry entry, beat, and (if `alive`) its
    /// liveness key.
    pub async fn instance(&mut self, info: &InstanceInfo, alive: bool) {
        let sid = srv(&info.server_id);
        let mut pipe = redis::pipe();
        pipe.hset(
            self.keys.servers(),
            &info.server_id,
            serde_json::to_string(info).expect("json"),
        )
        .ignore();
        pipe.zadd(self.keys.server_beats(), &info.server_id, info.last_beat_ms)
            .ignore();
        if alive {
            pipe.cmd("SET")
                .arg(self.keys.liveness(&sid))
                .arg("1")
                .arg("PX")
                .arg(60_000)
                .ignore();
        }
        let () = pipe
            .query_async(&mut self.conn)
            .await
            .expect("seed instance");
    }
}

/// An instance record.
pub fn instance_info(server_id: &str, connections: u64, last_beat_ms: i64) -> InstanceInfo {
    InstanceInfo {
        server_id: server_id.into(),
        hostname: "host-a".into(),
        pid: 4242,
        mqtt_listen: "127.0.0.1:1883".into(),
        http_listen: "127.0.0.1:9100".into(),
        version: "0.1.0".into(),
        started_at_ms: last_beat_ms - 60_000,
        last_beat_ms,
        connections,
        status: "running".into(),
    }
}

/// A float field of a JSON body.
pub fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64()
        .unwrap_or_else(|| panic!("{k} is not a number in {v}"))
}
