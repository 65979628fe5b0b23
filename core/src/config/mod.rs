//! Configuration: typed sections read from a YAML file with environment
//! overrides.
//!
//! Precedence, lowest first: built-in defaults, the YAML file given with
//! `--config`, `IOT_<SECTION>_<KEY>` variables, then the short names
//! `SERVER_ID`, `REDIS_URL` and `DATABASE_URL`. List values in the
//! environment are comma-separated. Durations are written with a unit: `5s`,
//! `500ms`, `5m`, `1h30m`.
//!
//! Every service reads the same file, so one file can describe a whole
//! deployment; a section a service does not use is still checked. An unknown
//! key or a bad value is an error that names the key and where it came from
//! (the file or the environment variable).
//!
//! `config.example.yaml` at the repository root lists every key with its
//! default and a comment; a test keeps it in step with [`Config::default`]
//! and fails on a key without a comment.

pub mod duration;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_norway::{Mapping, Value};

use crate::ids::ServerId;
use crate::keys::Keys;
use crate::policy::Policy;

/// Environment variable naming the config file (same as `--config`); it is
/// not a config key.
pub const CONFIG_FILE_ENV: &str = "IOT_CONFIG";

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Instance id. Default empty: `SERVER_ID`, else `iot-server-{hostname}-{uuid}`.
    /// Env: `SERVER_ID`.
    pub server_id: String,
    /// Redis (required by every service).
    pub redis: RedisConfig,
    /// PostgreSQL.
    pub database: DatabaseConfig,
    /// The MQTT device listener (ingest).
    pub mqtt: MqttConfig,
    /// The HTTP listener (`/health`, `/metrics`, and the REST API on api).
    pub http: HttpConfig,
    /// Session timing.
    pub session: SessionConfig,
    /// The weighted online policy.
    pub policy: PolicyConfig,
    /// The event streams and the ingest's batching writer.
    pub streams: StreamsConfig,
    /// Downlink commands.
    pub downlink: DownlinkConfig,
    /// REST API access.
    pub api: ApiConfig,
    /// Projector workers.
    pub projector: ProjectorConfig,
    /// Graceful shutdown.
    pub shutdown: ShutdownConfig,
    /// Logging.
    pub log: LogConfig,
}

/// `redis:` — the seed's section, plus `url` and `key_prefix`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// Must be true: Redis is required. Default `true`. Env `IOT_REDIS_ENABLED`.
    pub enabled: bool,
    /// Full URL (`redis://[:password@]host:port/db`); wins over addr, password
    /// and db. Default empty. Env `REDIS_URL` or `IOT_REDIS_URL`.
    pub url: String,
    /// `host:port`. Default `localhost:6379`. Env `IOT_REDIS_ADDR`.
    pub addr: String,
    /// Password (AUTH). Default empty. Env `IOT_REDIS_PASSWORD`.
    pub password: String,
    /// Database number. Default 0. Env `IOT_REDIS_DB`.
    pub db: u32,
    /// Most connections a service opens to Redis; requests are pipelined
    /// (multiplexed) over them. Default 100. Env `IOT_REDIS_POOL_SIZE`.
    pub pool_size: u32,
    /// Connections opened at start and kept open. Default 10.
    /// Env `IOT_REDIS_MIN_IDLE_CONNS`.
    pub min_idle_conns: u32,
    /// Connect timeout. Default `5s`. Env `IOT_REDIS_DIAL_TIMEOUT`.
    #[serde(with = "duration")]
    pub dial_timeout: Duration,
    /// Reply timeout. Default `3s`. Env `IOT_REDIS_READ_TIMEOUT`.
    #[serde(with = "duration")]
    pub read_timeout: Duration,
    /// Request write timeout. Default `3s`. Env `IOT_REDIS_WRITE_TIMEOUT`.
    #[serde(with = "duration")]
    pub write_timeout: Duration,
    /// Prefix in front of every key, for several deployments (or tests) on
    /// one Redis. Default empty. Env `IOT_REDIS_KEY_PREFIX`.
    pub key_prefix: String,
}

/// `database:` — PostgreSQL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `postgres://user@host:port/db`. Empty: no PostgreSQL features
    /// (registry auth, archive, command log). Default empty.
    /// Env `DATABASE_URL` or `IOT_DATABASE_URL`.
    pub url: String,
    /// Pool size. Default 10. Env `IOT_DATABASE_MAX_CONNECTIONS`.
    pub max_connections: u32,
    /// Connect and acquire timeout. Default `5s`. Env `IOT_DATABASE_CONNECT_TIMEOUT`.
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
}

/// Device authentication mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// Any well-formed phyID may connect (development).
    Open,
    /// Username = phyID, password = the device secret from PostgreSQL.
    Registry,
}

/// `mqtt:` — the ingest's device listener.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    /// Listen address. Default `0.0.0.0:1883`. Env `IOT_MQTT_LISTEN`.
    pub listen: String,
    /// `open` or `registry`. Default `open`. Env `IOT_MQTT_AUTH`.
    pub auth: AuthMode,
    /// Connection limit; 0: as many as the open-file limit allows.
    /// Default 0. Env `IOT_MQTT_MAX_CONNECTIONS`.
    pub max_connections: u32,
    /// Time from accept to a complete CONNECT. Default `5s`.
    /// Env `IOT_MQTT_CONNECT_TIMEOUT`.
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    /// Largest packet accepted, in bytes. Default 65536.
    /// Env `IOT_MQTT_MAX_PACKET_SIZE`.
    pub max_packet_size: u32,
    /// Keepalive enforced for a device that asks for 0 (none) or for more
    /// than this. Default `5m`. Env `IOT_MQTT_MAX_KEEPALIVE`.
    #[serde(with = "duration")]
    pub max_keepalive: Duration,
    /// New connections per second per source IP; 0: unlimited. Default 100.
    /// Env `IOT_MQTT_CONNECT_RATE_PER_IP`.
    pub connect_rate_per_ip: u32,
    /// Burst allowance of the per-IP rate. Default 200.
    /// Env `IOT_MQTT_CONNECT_BURST_PER_IP`.
    pub connect_burst_per_ip: u32,
    /// How long a registry credential check is cached. Default `30s`.
    /// Env `IOT_MQTT_AUTH_CACHE_TTL`.
    #[serde(with = "duration")]
    pub auth_cache_ttl: Duration,
}

/// `http:` — the HTTP listener of every service.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Listen address; empty: the service's default port on 0.0.0.0 (api
    /// 8080, ingest 9100, projector 9101). Default empty. Env `IOT_HTTP_LISTEN`.
    pub listen: String,
}

/// `session:` — timing of sessions and instances.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionConfig {
    /// A heartbeat at most this old is fresh; session keys live twice this.
    /// Default `5m`. Env `IOT_SESSION_HEARTBEAT_TIMEOUT`.
    #[serde(with = "duration")]
    pub heartbeat_timeout: Duration,
    /// TTL of an ingest's liveness key (refreshed every third of it); when it
    /// lapses, the instance's sessions are reaped. Default `5s`.
    /// Env `IOT_SESSION_LIVENESS_TTL`.
    #[serde(with = "duration")]
    pub liveness_ttl: Duration,
}

/// `policy:` — the seed's WeightedPolicy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// false: online = heartbeat fresh. Default true. Env `IOT_POLICY_ENABLED`.
    pub enabled: bool,
    /// How long a TCP drop counts against the device (`tcp_down_penalty`).
    /// Default `1m`. Env `IOT_POLICY_TCP_DOWN_WINDOW`.
    #[serde(with = "duration")]
    pub tcp_down_window: Duration,
    /// How long an ACK timeout counts against the device
    /// (`ack_timeout_penalty`). Default `1m`. Env `IOT_POLICY_ACK_WINDOW`.
    #[serde(with = "duration")]
    pub ack_window: Duration,
    /// Subtracted from the score within `tcp_down_window` of a TCP drop.
    /// Default 0.5. Env `IOT_POLICY_TCP_DOWN_PENALTY`.
    pub tcp_down_penalty: f64,
    /// Subtracted from the score within `ack_window` of an ACK timeout.
    /// Default 0.3. Env `IOT_POLICY_ACK_TIMEOUT_PENALTY`.
    pub ack_timeout_penalty: f64,
    /// Online when the score (1 if the heartbeat is fresh, minus the
    /// penalties) is at least this. Default 0.5. Env `IOT_POLICY_THRESHOLD`.
    pub threshold: f64,
}

/// `streams:` — event streams and the ingest's batching writer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamsConfig {
    /// Number of event stream shards (`stream:events:{0..shards}`); every
    /// service of a deployment must agree. Default 16. Env `IOT_STREAMS_SHARDS`.
    pub shards: u16,
    /// Approximate length cap per shard (`XADD MAXLEN ~`). Default 1000000.
    /// Env `IOT_STREAMS_MAXLEN`.
    pub maxlen: u64,
    /// Most stream entries per writer flush. Default 512. Env `IOT_STREAMS_BATCH_MAX`.
    pub batch_max: u32,
    /// Longest an event waits for a flush. Default `2ms`.
    /// Env `IOT_STREAMS_FLUSH_INTERVAL`.
    #[serde(with = "duration")]
    pub flush_interval: Duration,
    /// Events (other than heartbeats, which coalesce per device) held while
    /// Redis is unreachable; beyond it the oldest are dropped and counted.
    /// Default 100000. Env `IOT_STREAMS_BUFFER_MAX`.
    pub buffer_max: u32,
    /// Capacity of the channel from connections to the writer; a full channel
    /// makes connections wait (backpressure). Default 65536.
    /// Env `IOT_STREAMS_CHANNEL_CAPACITY`.
    pub channel_capacity: u32,
    /// Not a config key: whether this process has seen an archiver's
    /// marker (`archive:on`) in Redis, so that a service without
    /// `database.url` leaves trimming to the archiver too (see
    /// [`Config::stream_cap`]). `iot_service::startup::Context::start` gives
    /// its config a fresh one, set at start or later by a background re-read
    /// of the marker; every [`StreamCap`] made from the config follows it.
    #[serde(skip)]
    pub archiver_seen: ArchiverSeen,
}

/// Whether an archiver has been seen: a flag shared by a service's
/// [`Config`] and every [`StreamCap`] made from it. Sticky: once set it stays
/// set for the life of the process, so that an archiver stopped for a while
/// (its marker expiring) never makes writers trim entries it has not stored.
#[derive(Debug, Clone, Default)]
pub struct ArchiverSeen(Arc<AtomicBool>);

impl ArchiverSeen {
    /// A new flag, independent of every other.
    pub fn new(seen: bool) -> Self {
        Self(Arc::new(AtomicBool::new(seen)))
    }

    /// Whether an archiver has been seen.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// Records that an archiver has been seen (for good); true if this call
    /// set it.
    pub fn set(&self) -> bool {
        !self.0.swap(true, Ordering::Relaxed)
    }
}

impl PartialEq for ArchiverSeen {
    /// By value.
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

/// The `MAXLEN ~` cap a stream writer puts on its streams, read at each
/// write: `streams.maxlen` until an archiver has been seen
/// ([`ArchiverSeen`]), then none for good; none from the start when this
/// service has the archive on itself (`database.url`). Cheap to clone and to
/// read (one atomic load). Made by [`Config::stream_cap`].
#[derive(Debug, Clone)]
pub struct StreamCap {
    maxlen: Option<u64>,
    archiver_seen: ArchiverSeen,
}

impl StreamCap {
    /// A cap that never changes (`None`: never capped); for tests and tools.
    pub fn fixed(maxlen: Option<u64>) -> Self {
        Self {
            maxlen,
            archiver_seen: ArchiverSeen::new(false),
        }
    }

    /// The cap for the next write, or `None`: write without `MAXLEN`.
    pub fn get(&self) -> Option<u64> {
        self.maxlen.filter(|_| !self.archiver_seen.get())
    }
}

impl PartialEq<Option<u64>> for StreamCap {
    /// Compares the current cap.
    fn eq(&self, other: &Option<u64>) -> bool {
        self.get() == *other
    }
}

/// `downlink:` — commands to devices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DownlinkConfig {
    /// Time for the device's PUBACK (one retransmission at half of it).
    /// Default `10s`. Env `IOT_DOWNLINK_ACK_TIMEOUT`.
    #[serde(with = "duration")]
    pub ack_timeout: Duration,
    /// Commands waiting per device: in its offline queue, and on its
    /// connection behind the inflight limit. Default 100. Env `IOT_DOWNLINK_QUEUE_MAX`.
    pub queue_max: u32,
    /// Default time-to-live of a command. Default `1h`. Env `IOT_DOWNLINK_QUEUE_TTL`.
    #[serde(with = "duration")]
    pub queue_ttl: Duration,
    /// Unacknowledged commands per device at once. Default 8.
    /// Env `IOT_DOWNLINK_MAX_INFLIGHT`.
    pub max_inflight: u32,
    /// How long a command's record stays in Redis after its time-to-live
    /// (PostgreSQL keeps the log for good). Default `24h`.
    /// Env `IOT_DOWNLINK_RETENTION`.
    #[serde(with = "duration")]
    pub retention: Duration,
}

/// `api:` — REST access control.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Bearer tokens for `GET /api/...`. Default none. Env `IOT_API_READ_TOKENS=a,b`.
    pub read_tokens: Vec<String>,
    /// Bearer tokens for writes (also allowed to read). Default none.
    /// Env `IOT_API_WRITE_TOKENS`.
    pub write_tokens: Vec<String>,
    /// `/health*` and `/metrics` without a token. Default true.
    /// Env `IOT_API_OPEN_HEALTH`.
    pub open_health: bool,
}

/// `projector:` — projector workers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProjectorConfig {
    /// Consumer name in the group; empty: the server id. Env `IOT_PROJECTOR_CONSUMER`.
    pub consumer: String,
    /// Entries per XREADGROUP. Default 512. Env `IOT_PROJECTOR_BATCH_SIZE`.
    pub batch_size: u32,
    /// XREADGROUP BLOCK time. Default `100ms`. Env `IOT_PROJECTOR_BLOCK`.
    #[serde(with = "duration")]
    pub block: Duration,
    /// After a read that returned less than a quarter of `batch_size`, wait
    /// this long before the next one, so that entries arriving meanwhile
    /// are applied together (fewer, larger Redis calls per heartbeat at the
    /// cost of up to this much latency). `0s`: read again at once. Default
    /// `5ms`. Env `IOT_PROJECTOR_LINGER`.
    #[serde(with = "duration")]
    pub linger: Duration,
    /// Pending entries idle this long are claimed from their consumer.
    /// Default `30s`. Env `IOT_PROJECTOR_CLAIM_IDLE`.
    #[serde(with = "duration")]
    pub claim_idle: Duration,
    /// How often each shard is checked for entries to claim. Default `5s`.
    /// Env `IOT_PROJECTOR_CLAIM_INTERVAL`.
    #[serde(with = "duration")]
    pub claim_interval: Duration,
    /// How often devices due for re-evaluation are processed. Default `200ms`.
    /// Env `IOT_PROJECTOR_DUE_INTERVAL`.
    #[serde(with = "duration")]
    pub due_interval: Duration,
    /// How often lapsed ingest instances are looked for. Default `1s`.
    /// Env `IOT_PROJECTOR_REAPER_INTERVAL`.
    #[serde(with = "duration")]
    pub reaper_interval: Duration,
    /// How often the consumer-group lag is published. Default `1s`.
    /// Env `IOT_PROJECTOR_LAG_INTERVAL`.
    #[serde(with = "duration")]
    pub lag_interval: Duration,
}

/// `shutdown:` — graceful shutdown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// Longest a graceful shutdown may take before the service exits anyway.
    /// Default `10s`. Env `IOT_SHUTDOWN_GRACE`.
    #[serde(with = "duration")]
    pub grace: Duration,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `log:` — logging.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// tracing filter, such as `info` or `info,ingest=debug`; `RUST_LOG` wins.
    /// Default `info`. Env `IOT_LOG_LEVEL`.
    pub level: String,
    /// `text` or `json`. Default `text`. Env `IOT_LOG_FORMAT`.
    pub format: LogFormat,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            url: String::new(),
            addr: "localhost:6379".into(),
            password: String::new(),
            db: 0,
            pool_size: 100,
            min_idle_conns: 10,
            dial_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(3),
            write_timeout: Duration::from_secs(3),
            key_prefix: String::new(),
        }
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            max_connections: 10,
            connect_timeout: Duration::from_secs(5),
        }
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:1883".into(),
            auth: AuthMode::Open,
            max_connections: 0,
            connect_timeout: Duration::from_secs(5),
            max_packet_size: 65536,
            max_keepalive: Duration::from_secs(300),
            connect_rate_per_ip: 100,
            connect_burst_per_ip: 200,
            auth_cache_ttl: Duration::from_secs(30),
        }
    }
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            heartbeat_timeout: Duration::from_secs(300),
            liveness_ttl: Duration::from_secs(5),
        }
    }
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            tcp_down_window: Duration::from_secs(60),
            ack_window: Duration::from_secs(60),
            tcp_down_penalty: 0.5,
            ack_timeout_penalty: 0.3,
            threshold: 0.5,
        }
    }
}

impl Default for StreamsConfig {
    fn default() -> Self {
        Self {
            shards: 16,
            maxlen: 1_000_000,
            batch_max: 512,
            flush_interval: Duration::from_millis(2),
            buffer_max: 100_000,
            channel_capacity: 65_536,
            archiver_seen: ArchiverSeen::default(),
        }
    }
}

impl Default for DownlinkConfig {
    fn default() -> Self {
        Self {
            ack_timeout: Duration::from_secs(10),
            queue_max: 100,
            queue_ttl: Duration::from_secs(3600),
            max_inflight: 8,
            retention: Duration::from_secs(24 * 3600),
        }
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            read_tokens: Vec::new(),
            write_tokens: Vec::new(),
            open_health: true,
        }
    }
}

impl Default for ProjectorConfig {
    fn default() -> Self {
        Self {
            consumer: String::new(),
            batch_size: 512,
            block: Duration::from_millis(100),
            linger: Duration::from_millis(5),
            claim_idle: Duration::from_secs(30),
            claim_interval: Duration::from_secs(5),
            due_interval: Duration::from_millis(200),
            reaper_interval: Duration::from_secs(1),
            lag_interval: Duration::from_secs(1),
        }
    }
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(10),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// Where a config value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Built-in default.
    Default,
    /// The YAML file.
    File(String),
    /// An environment variable.
    Env(String),
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Default => f.write_str("built-in defaults"),
            Origin::File(p) => write!(f, "config file {p}"),
            Origin::Env(v) => write!(f, "environment variable {v}"),
        }
    }
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The path given.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not YAML, or not a mapping at the top.
    #[error("config file {path} is not valid: {message}")]
    Syntax {
        /// The path given.
        path: String,
        /// What is wrong, with line and column where known.
        message: String,
    },
    /// A key that does not exist.
    #[error("{origin}: unknown key {key}; known keys{scope}: {known}")]
    UnknownKey {
        /// Where it was written.
        origin: Origin,
        /// The dotted key, as written.
        key: String,
        /// " in section X" or empty for the top level.
        scope: String,
        /// The keys that exist there.
        known: String,
    },
    /// A value of the wrong type or out of range.
    #[error("{origin}: invalid value for {key}: {message}")]
    Invalid {
        /// Where it was written.
        origin: Origin,
        /// The dotted key.
        key: String,
        /// What is wrong and what is expected.
        message: String,
    },
}

/// Redis is required and not usable as configured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "Redis is required: {reason}. Set redis.enabled: true and redis.addr (host:port) in the config file, or REDIS_URL=redis://host:6379/0"
)]
pub struct RedisRequired {
    /// What is missing.
    pub reason: String,
}

impl RedisConfig {
    /// The URL to connect to: `url` if set, otherwise built from addr,
    /// password and db.
    pub fn connection_url(&self) -> Result<String, RedisRequired> {
        if !self.enabled {
            return Err(RedisRequired {
                reason: "redis.enabled is false".into(),
            });
        }
        if !self.url.trim().is_empty() {
            return Ok(self.url.trim().to_owned());
        }
        let addr = self.addr.trim();
        if addr.is_empty() {
            return Err(RedisRequired {
                reason: "neither redis.url nor redis.addr is set".into(),
            });
        }
        let auth = if self.password.is_empty() {
            String::new()
        } else {
            format!(":{}@", percent_encode(&self.password))
        };
        Ok(format!("redis://{auth}{addr}/{}", self.db))
    }
}

/// Percent-encodes everything but unreserved URL characters.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl PolicyConfig {
    /// The policy with this section's values and the heartbeat timeout.
    pub fn policy(&self, heartbeat_timeout: Duration) -> Policy {
        Policy {
            enabled: self.enabled,
            heartbeat_timeout_ms: millis(heartbeat_timeout),
            tcp_down_window_ms: millis(self.tcp_down_window),
            ack_window_ms: millis(self.ack_window),
            tcp_down_penalty: self.tcp_down_penalty,
            ack_timeout_penalty: self.ack_timeout_penalty,
            threshold: self.threshold,
        }
    }
}

/// A duration in whole milliseconds, saturating.
pub fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl HttpConfig {
    /// The listen address, or `0.0.0.0:{default_port}` when empty.
    pub fn listen_addr(&self, default_port: u16) -> Result<SocketAddr, String> {
        if self.listen.trim().is_empty() {
            Ok(SocketAddr::from(([0, 0, 0, 0], default_port)))
        } else {
            self.listen
                .trim()
                .parse()
                .map_err(|e| format!("http.listen {:?} is not host:port ({e})", self.listen))
        }
    }
}

impl Config {
    /// The effective policy.
    pub fn policy(&self) -> Policy {
        self.policy.policy(self.session.heartbeat_timeout)
    }

    /// Whether the PostgreSQL archive runs (`database.url` set). The rule
    /// for stream trimming follows from it, in one place: with the archive,
    /// the projector's archiver trims the event streams below what every
    /// consumer group has processed, so the ingest appends without `MAXLEN`;
    /// without it, the ingest caps each shard with `MAXLEN ~ streams.maxlen`.
    pub fn archive_enabled(&self) -> bool {
        !self.database.url.trim().is_empty()
    }

    /// The `MAXLEN ~` cap the writers put on the streams as of now, or
    /// `None` when the archiver trims them: this service has the archive on
    /// ([`archive_enabled`](Self::archive_enabled)), or has seen that an
    /// archiver runs on its Redis (`streams.archiver_seen`). Writers hold a
    /// [`stream_cap`](Self::stream_cap) instead, which follows the latter.
    pub fn stream_maxlen(&self) -> Option<u64> {
        self.stream_cap().get()
    }

    /// The live cap for a stream writer: `streams.maxlen` without the
    /// archive until an archiver is seen (`streams.archiver_seen`, shared
    /// with this config), then none.
    pub fn stream_cap(&self) -> StreamCap {
        StreamCap {
            maxlen: (!self.archive_enabled()).then_some(self.streams.maxlen),
            archiver_seen: self.streams.archiver_seen.clone(),
        }
    }

    /// TTL of session keys: 2 x heartbeat timeout.
    pub fn session_ttl(&self) -> Duration {
        self.session.heartbeat_timeout.saturating_mul(2)
    }

    /// The key schema with the configured prefix.
    pub fn keys(&self) -> Keys {
        // Validated in `validate`, so the fallback is never taken.
        Keys::new(self.redis.key_prefix.clone()).unwrap_or_default()
    }

    /// The server id by the seed's rule (`server_id` / `SERVER_ID`, else
    /// generated).
    pub fn resolve_server_id(&self) -> Result<ServerId, crate::ids::IdError> {
        ServerId::resolve(Some(&self.server_id), &crate::ids::hostname())
    }

    /// Loads the file at `path` (if any) and applies `env` overrides.
    pub fn load(path: Option<&Path>, env: &[(String, String)]) -> Result<Self, ConfigError> {
        match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.display().to_string(),
                    source,
                })?;
                Self::from_yaml(&text, &p.display().to_string(), env)
            }
            None => Self::from_yaml("", "", env),
        }
    }

    /// Parses `text` (the contents of the file `path`; both may be empty) and
    /// applies `env` overrides, then checks every value.
    pub fn from_yaml(
        text: &str,
        path: &str,
        env: &[(String, String)],
    ) -> Result<Self, ConfigError> {
        let file_origin = if path.is_empty() {
            Origin::Default
        } else {
            Origin::File(path.to_owned())
        };
        let mut root = match serde_norway::from_str::<Value>(text) {
            Ok(Value::Null) => Value::Mapping(Mapping::new()),
            Ok(v @ Value::Mapping(_)) => v,
            Ok(_) => {
                return Err(ConfigError::Syntax {
                    path: path.to_owned(),
                    message: "the top level must be a mapping of sections (redis:, mqtt:, ...)"
                        .into(),
                });
            }
            Err(e) => {
                return Err(ConfigError::Syntax {
                    path: path.to_owned(),
                    message: e.to_string(),
                });
            }
        };
        let schema = schema();
        check_known_keys(&root, &schema, &file_origin)?;

        let mut origins: BTreeMap<String, Origin> = BTreeMap::new();
        apply_env(&mut root, &schema, env, &mut origins)?;

        let origin_of = |key: &str| -> Origin {
            origins
                .iter()
                .find(|(k, _)| key == k.as_str() || key.starts_with(&format!("{k}.")))
                .map(|(_, o)| o.clone())
                .unwrap_or_else(|| file_origin.clone())
        };

        let config: Config = serde_path_to_error::deserialize(root).map_err(|e| {
            let key = e.path().to_string();
            ConfigError::Invalid {
                origin: origin_of(&key),
                key,
                message: e.into_inner().to_string(),
            }
        })?;
        config
            .validate()
            .map_err(|(key, message)| ConfigError::Invalid {
                origin: origin_of(key),
                key: key.to_owned(),
                message,
            })?;
        Ok(config)
    }

    /// Semantic checks; returns the offending key and a message.
    fn validate(&self) -> Result<(), (&'static str, String)> {
        fn positive(key: &'static str, d: Duration) -> Result<(), (&'static str, String)> {
            if d.is_zero() {
                Err((key, "must be greater than zero".into()))
            } else {
                Ok(())
            }
        }
        fn finite(key: &'static str, v: f64) -> Result<(), (&'static str, String)> {
            if v.is_finite() {
                Ok(())
            } else {
                Err((key, format!("{v} is not a finite number")))
            }
        }
        if !self.server_id.trim().is_empty() {
            ServerId::new(self.server_id.trim()).map_err(|e| ("server_id", e.to_string()))?;
        }
        Keys::new(self.redis.key_prefix.clone())
            .map_err(|e| ("redis.key_prefix", e.to_string()))?;
        if self.redis.pool_size == 0 {
            return Err(("redis.pool_size", "must be at least 1".into()));
        }
        positive("redis.dial_timeout", self.redis.dial_timeout)?;
        positive("redis.read_timeout", self.redis.read_timeout)?;
        positive("redis.write_timeout", self.redis.write_timeout)?;
        self.mqtt.listen.trim().parse::<SocketAddr>().map_err(|e| {
            (
                "mqtt.listen",
                format!("{:?} is not host:port ({e})", self.mqtt.listen),
            )
        })?;
        self.http.listen_addr(0).map_err(|e| ("http.listen", e))?;
        positive("mqtt.connect_timeout", self.mqtt.connect_timeout)?;
        positive("mqtt.max_keepalive", self.mqtt.max_keepalive)?;
        if !(16..=268_435_455).contains(&self.mqtt.max_packet_size) {
            return Err((
                "mqtt.max_packet_size",
                format!(
                    "{} is out of range; use 16 to 268435455 bytes",
                    self.mqtt.max_packet_size
                ),
            ));
        }
        positive("session.heartbeat_timeout", self.session.heartbeat_timeout)?;
        if self.session.liveness_ttl < Duration::from_millis(300) {
            return Err((
                "session.liveness_ttl",
                "must be at least 300ms (it is refreshed every third of it)".into(),
            ));
        }
        finite("policy.tcp_down_penalty", self.policy.tcp_down_penalty)?;
        finite(
            "policy.ack_timeout_penalty",
            self.policy.ack_timeout_penalty,
        )?;
        finite("policy.threshold", self.policy.threshold)?;
        if self.policy.tcp_down_penalty < 0.0 {
            return Err(("policy.tcp_down_penalty", "must not be negative".into()));
        }
        if self.policy.ack_timeout_penalty < 0.0 {
            return Err(("policy.ack_timeout_penalty", "must not be negative".into()));
        }
        if !(1..=1024).contains(&self.streams.shards) {
            return Err((
                "streams.shards",
                format!("{} is out of range; use 1 to 1024", self.streams.shards),
            ));
        }
        if self.streams.maxlen == 0 {
            return Err(("streams.maxlen", "must be at least 1".into()));
        }
        if self.streams.batch_max == 0 {
            return Err(("streams.batch_max", "must be at least 1".into()));
        }
        positive("streams.flush_interval", self.streams.flush_interval)?;
        if self.streams.channel_capacity == 0 {
            return Err(("streams.channel_capacity", "must be at least 1".into()));
        }
        positive("downlink.ack_timeout", self.downlink.ack_timeout)?;
        positive("downlink.queue_ttl", self.downlink.queue_ttl)?;
        if self.downlink.max_inflight == 0 {
            return Err(("downlink.max_inflight", "must be at least 1".into()));
        }
        for (key, list) in [
            ("api.read_tokens", &self.api.read_tokens),
            ("api.write_tokens", &self.api.write_tokens),
        ] {
            if list.iter().any(|t| t.trim().is_empty()) {
                return Err((key, "tokens must not be empty strings".into()));
            }
        }
        if self.projector.batch_size == 0 {
            return Err(("projector.batch_size", "must be at least 1".into()));
        }
        positive("projector.claim_idle", self.projector.claim_idle)?;
        positive("projector.claim_interval", self.projector.claim_interval)?;
        positive("projector.due_interval", self.projector.due_interval)?;
        positive("projector.reaper_interval", self.projector.reaper_interval)?;
        positive("projector.lag_interval", self.projector.lag_interval)?;
        positive("shutdown.grace", self.shutdown.grace)?;
        Ok(())
    }

    /// Every key as `section.key` with its default value rendered as YAML,
    /// in file order (used by `--help` texts and the docs test).
    pub fn default_keys() -> Vec<(String, String)> {
        let mut out = Vec::new();
        if let Value::Mapping(m) = schema() {
            for (k, v) in m {
                let k = k.as_str().unwrap_or_default().to_owned();
                match v {
                    Value::Mapping(section) => {
                        for (kk, vv) in section {
                            out.push((
                                format!("{k}.{}", kk.as_str().unwrap_or_default()),
                                render(&vv),
                            ));
                        }
                    }
                    other => out.push((k, render(&other))),
                }
            }
        }
        out
    }
}

fn render(v: &Value) -> String {
    serde_norway::to_string(v)
        .map(|s| s.trim_end().to_owned())
        .unwrap_or_default()
}

/// The defaults as a YAML value: the list of sections and keys that exist.
fn schema() -> Value {
    serde_norway::to_value(Config::default()).unwrap_or(Value::Null)
}

fn keys_of(m: &Mapping) -> String {
    m.keys()
        .filter_map(Value::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

fn check_known_keys(root: &Value, schema: &Value, origin: &Origin) -> Result<(), ConfigError> {
    let (Value::Mapping(root), Value::Mapping(schema)) = (root, schema) else {
        return Ok(());
    };
    for (k, v) in root {
        let name = k.as_str().map(str::to_owned).unwrap_or_else(|| render(k));
        let Some(section_schema) = schema.get(k) else {
            return Err(ConfigError::UnknownKey {
                origin: origin.clone(),
                key: name,
                scope: String::new(),
                known: keys_of(schema),
            });
        };
        if let (Value::Mapping(section), Value::Mapping(section_schema)) = (v, section_schema) {
            for kk in section.keys() {
                if !section_schema.contains_key(kk) {
                    let kname = kk.as_str().map(str::to_owned).unwrap_or_else(|| render(kk));
                    return Err(ConfigError::UnknownKey {
                        origin: origin.clone(),
                        key: format!("{name}.{kname}"),
                        scope: format!(" in section {name}"),
                        known: keys_of(section_schema),
                    });
                }
            }
        }
    }
    Ok(())
}

/// Converts an environment string to the YAML type the schema expects.
fn env_value(raw: &str, expected: &Value) -> Value {
    match expected {
        Value::Sequence(_) => Value::Sequence(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| Value::String(s.to_owned()))
                .collect(),
        ),
        Value::Bool(_) | Value::Number(_) => {
            serde_norway::from_str::<Value>(raw).unwrap_or_else(|_| Value::String(raw.to_owned()))
        }
        _ => Value::String(raw.to_owned()),
    }
}

fn set(root: &mut Value, section: &str, key: Option<&str>, v: Value) {
    let Value::Mapping(m) = root else { return };
    match key {
        None => {
            m.insert(Value::String(section.to_owned()), v);
        }
        Some(key) => {
            let entry = m
                .entry(Value::String(section.to_owned()))
                .or_insert_with(|| Value::Mapping(Mapping::new()));
            if !matches!(entry, Value::Mapping(_)) {
                *entry = Value::Mapping(Mapping::new());
            }
            if let Value::Mapping(s) = entry {
                s.insert(Value::String(key.to_owned()), v);
            }
        }
    }
}

fn apply_env(
    root: &mut Value,
    schema: &Value,
    env: &[(String, String)],
    origins: &mut BTreeMap<String, Origin>,
) -> Result<(), ConfigError> {
    let Value::Mapping(schema_map) = schema else {
        return Ok(());
    };
    let env: HashMap<&str, &str> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut names: Vec<&str> = env
        .keys()
        .copied()
        // IOT_CONFIG names the config file itself (the binaries' --config).
        .filter(|k| k.starts_with("IOT_") && *k != CONFIG_FILE_ENV)
        .collect();
    names.sort_unstable();
    for var in names {
        let rest = &var["IOT_".len()..];
        let mut matched = false;
        for (section, section_schema) in schema_map {
            let Some(section) = section.as_str() else {
                continue;
            };
            let upper = section.to_ascii_uppercase();
            if rest == upper && !matches!(section_schema, Value::Mapping(_)) {
                set(root, section, None, env_value(env[var], section_schema));
                origins.insert(section.to_owned(), Origin::Env(var.to_owned()));
                matched = true;
                break;
            }
            let Some(key) = rest.strip_prefix(&upper).and_then(|r| r.strip_prefix('_')) else {
                continue;
            };
            let Value::Mapping(fields) = section_schema else {
                continue;
            };
            let key = key.to_ascii_lowercase();
            let Some(expected) = fields.get(key.as_str()) else {
                return Err(ConfigError::UnknownKey {
                    origin: Origin::Env(var.to_owned()),
                    key: format!("{section}.{key}"),
                    scope: format!(" in section {section}"),
                    known: keys_of(fields),
                });
            };
            set(root, section, Some(&key), env_value(env[var], expected));
            origins.insert(format!("{section}.{key}"), Origin::Env(var.to_owned()));
            matched = true;
            break;
        }
        if !matched {
            return Err(ConfigError::UnknownKey {
                origin: Origin::Env(var.to_owned()),
                key: rest.to_ascii_lowercase(),
                scope: String::new(),
                known: keys_of(schema_map),
            });
        }
    }
    for (var, section, key) in [
        ("SERVER_ID", "server_id", None),
        ("REDIS_URL", "redis", Some("url")),
        ("DATABASE_URL", "database", Some("url")),
    ] {
        if let Some(v) = env.get(var) {
            set(root, section, key, Value::String((*v).to_owned()));
            let path = key.map_or(section.to_owned(), |k| format!("{section}.{k}"));
            origins.insert(path, Origin::Env(var.to_owned()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_archive_decides_who_trims_the_streams() {
        let mut c = Config::default();
        assert!(!c.archive_enabled());
        assert_eq!(c.stream_maxlen(), Some(1_000_000));
        c.database.url = "  ".into();
        assert!(!c.archive_enabled(), "blank is not configured");
        c.database.url = "postgres://postgres@127.0.0.1/test".into();
        assert!(c.archive_enabled());
        assert_eq!(c.stream_maxlen(), None, "the archiver trims");
    }

    #[test]
    fn a_writer_stops_capping_for_good_once_an_archiver_is_seen() {
        let mut c = Config::default();
        c.streams.maxlen = 7;
        let cap = c.stream_cap();
        assert_eq!(cap.get(), Some(7));
        let other = Config::default();
        assert!(c.streams.archiver_seen.set(), "first sighting");
        assert!(!c.streams.archiver_seen.set(), "already seen");
        assert_eq!(cap.get(), None, "the cap made before follows the flag");
        assert_eq!(c.stream_maxlen(), None);
        assert_eq!(
            other.stream_maxlen(),
            Some(1_000_000),
            "flags are not shared"
        );
        assert_eq!(StreamCap::fixed(Some(3)), Some(3));
        assert_eq!(StreamCap::fixed(None).get(), None);
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::from_yaml("", "x.yaml", &[]).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(
            c.redis.connection_url().unwrap(),
            "redis://localhost:6379/0"
        );
    }

    #[test]
    fn reads_the_seed_redis_section() {
        let yaml = r#"
redis:
  enabled: true
  addr: "localhost:6380"
  password: "your-password"
  db: 2
  pool_size: 100
  min_idle_conns: 10
  dial_timeout: 5s
  read_timeout: 3s
  write_timeout: 500ms
session:
  heartbeat_timeout: 30s
"#;
        let c = Config::from_yaml(yaml, "x.yaml", &[]).unwrap();
        assert_eq!(c.redis.db, 2);
        assert_eq!(c.redis.write_timeout, Duration::from_millis(500));
        assert_eq!(
            c.redis.connection_url().unwrap(),
            "redis://:your-password@localhost:6380/2"
        );
        assert_eq!(c.session.heartbeat_timeout, Duration::from_secs(30));
        assert_eq!(c.session_ttl(), Duration::from_secs(60));
        assert_eq!(c.policy().heartbeat_timeout_ms, 30_000);
    }

    #[test]
    fn url_wins_over_addr() {
        let c =
            Config::from_yaml("redis: {addr: 'a:1', url: 'redis://b:2/3'}", "x.yaml", &[]).unwrap();
        assert_eq!(c.redis.connection_url().unwrap(), "redis://b:2/3");
        let c = Config::from_yaml(
            "redis: {url: 'redis://b:2/3'}",
            "x.yaml",
            &env(&[("REDIS_URL", "redis://c:4/0")]),
        )
        .unwrap();
        assert_eq!(c.redis.connection_url().unwrap(), "redis://c:4/0");
    }

    #[test]
    fn redis_disabled_or_missing_is_refused_clearly() {
        let c = Config::from_yaml("redis: {enabled: false}", "x.yaml", &[]).unwrap();
        let e = c.redis.connection_url().unwrap_err().to_string();
        assert!(
            e.starts_with("Redis is required: redis.enabled is false"),
            "{e}"
        );
        assert!(e.contains("REDIS_URL"), "{e}");
        let c = Config::from_yaml("redis: {addr: ''}", "x.yaml", &[]).unwrap();
        assert!(
            c.redis
                .connection_url()
                .unwrap_err()
                .to_string()
                .contains("redis.addr")
        );
        assert!(
            !c.redis
                .connection_url()
                .unwrap_err()
                .to_string()
                .contains('\n')
        );
    }

    #[test]
    fn env_overrides_every_kind_of_key() {
        let c = Config::from_yaml(
            "mqtt: {listen: '0.0.0.0:1883'}",
            "x.yaml",
            &env(&[
                ("IOT_MQTT_LISTEN", "127.0.0.1:1884"),
                ("IOT_SESSION_HEARTBEAT_TIMEOUT", "30s"),
                ("IOT_API_READ_TOKENS", "a, b,,c"),
                ("IOT_REDIS_POOL_SIZE", "7"),
                ("IOT_REDIS_PASSWORD", "12345"),
                ("IOT_POLICY_ENABLED", "false"),
                ("IOT_POLICY_THRESHOLD", "0.75"),
                ("IOT_MQTT_AUTH", "registry"),
                ("SERVER_ID", "pod-1"),
                ("DATABASE_URL", "postgres://localhost/test"),
                ("UNRELATED", "x"),
                ("IOT_CONFIG", "/etc/iot/config.yaml"),
            ]),
        )
        .unwrap();
        assert_eq!(c.mqtt.listen, "127.0.0.1:1884");
        assert_eq!(c.session.heartbeat_timeout, Duration::from_secs(30));
        assert_eq!(c.api.read_tokens, vec!["a", "b", "c"]);
        assert_eq!(c.redis.pool_size, 7);
        assert_eq!(c.redis.password, "12345");
        assert!(!c.policy.enabled);
        assert_eq!(c.policy.threshold, 0.75);
        assert_eq!(c.mqtt.auth, AuthMode::Registry);
        assert_eq!(c.server_id, "pod-1");
        assert_eq!(c.resolve_server_id().unwrap().as_str(), "pod-1");
        assert_eq!(c.database.url, "postgres://localhost/test");
    }

    #[test]
    fn unknown_file_key_names_key_and_file() {
        let e = Config::from_yaml("redis:\n  pool_sze: 3\n", "conf/a.yaml", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("conf/a.yaml"), "{e}");
        assert!(e.contains("redis.pool_sze"), "{e}");
        assert!(e.contains("pool_size"), "{e}");
        let e = Config::from_yaml("redsi: {}\n", "conf/a.yaml", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown key redsi"), "{e}");
    }

    #[test]
    fn unknown_env_key_names_the_variable() {
        let e = Config::from_yaml("", "", &env(&[("IOT_MQTT_LISTN", "x")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("environment variable IOT_MQTT_LISTN"), "{e}");
        assert!(e.contains("mqtt.listn"), "{e}");
        let e = Config::from_yaml("", "", &env(&[("IOT_NOPE_X", "x")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("IOT_NOPE_X"), "{e}");
    }

    #[test]
    fn bad_values_name_key_and_origin() {
        let e = Config::from_yaml("session:\n  heartbeat_timeout: 5x\n", "c.yaml", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("c.yaml") && e.contains("session.heartbeat_timeout"),
            "{e}"
        );
        assert!(e.contains("invalid duration"), "{e}");

        let e = Config::from_yaml("session:\n  heartbeat_timeout: 30\n", "c.yaml", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("no unit"), "{e}");

        let e = Config::from_yaml("", "c.yaml", &env(&[("IOT_REDIS_DB", "zero")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("environment variable IOT_REDIS_DB"), "{e}");
        assert!(e.contains("redis.db"), "{e}");

        let e = Config::from_yaml("mqtt: {auth: ldap}", "c.yaml", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("mqtt.auth") && e.contains("registry"), "{e}");

        let e = Config::from_yaml("streams: {shards: 0}", "c.yaml", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("streams.shards") && e.contains("c.yaml"), "{e}");

        let e = Config::from_yaml("mqtt: {listen: 'nowhere'}", "c.yaml", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("mqtt.listen"), "{e}");

        let e = Config::from_yaml("", "c.yaml", &env(&[("SERVER_ID", "bad id")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("environment variable SERVER_ID") && e.contains("server_id"),
            "{e}"
        );

        let e = Config::from_yaml("policy: {threshold: .nan}", "c.yaml", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("policy.threshold"), "{e}");
    }

    #[test]
    fn syntax_errors_name_the_file() {
        let e = Config::from_yaml("redis: [", "c.yaml", &[])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("config file c.yaml is not valid"), "{e}");
        let e = Config::from_yaml("- a\n- b\n", "c.yaml", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("mapping"), "{e}");
    }

    #[test]
    fn http_listen_defaults_per_service() {
        let c = Config::default();
        assert_eq!(
            c.http.listen_addr(9100).unwrap().to_string(),
            "0.0.0.0:9100"
        );
        let c = Config::from_yaml("http: {listen: '127.0.0.1:1'}", "c", &[]).unwrap();
        assert_eq!(c.http.listen_addr(9100).unwrap().to_string(), "127.0.0.1:1");
    }

    #[test]
    fn missing_file_is_a_clear_error() {
        let e = Config::load(Some(Path::new("/nonexistent/x.yaml")), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("cannot read config file /nonexistent/x.yaml"),
            "{e}"
        );
    }

    #[test]
    fn example_config_lists_every_key_with_its_default() {
        let text = include_str!("../../../config.example.yaml");
        let parsed = Config::from_yaml(text, "config.example.yaml", &[]).unwrap();
        assert_eq!(
            parsed,
            Config::default(),
            "example values must be the defaults"
        );
        let raw: Value = serde_norway::from_str(text).unwrap();
        for (key, _) in Config::default_keys() {
            let mut parts = key.split('.');
            let section = parts.next().unwrap();
            let present = match parts.next() {
                None => raw.get(section).is_some(),
                Some(k) => raw.get(section).and_then(|s| s.get(k)).is_some(),
            };
            assert!(present, "config.example.yaml lacks {key}");
        }
        // Every key (and section) says what it is for.
        let uncommented = uncommented_keys(text);
        assert!(
            uncommented.is_empty(),
            "config.example.yaml: give these keys a comment (`key: value  # what it does`, \
             or a comment line right above): {uncommented:?}"
        );
        for (key, _) in Config::default_keys() {
            assert!(
                !uncommented.contains(&key),
                "config.example.yaml: {key} has no comment"
            );
        }
    }

    /// The keys of a config file in the example's layout (`section:` at
    /// column 0, its keys indented) that have no comment: neither a trailing
    /// `# ...` on their line nor a comment line right above at the same
    /// indentation. Named `section.key`, or `key` at the top level.
    fn uncommented_keys(text: &str) -> Vec<String> {
        fn trailing_comment(value: &str) -> bool {
            let v = value.trim_start();
            // Skip a quoted value: a `#` inside it is not a comment.
            let rest = match v.strip_prefix('"') {
                Some(q) => q.split_once('"').map_or("", |(_, r)| r),
                None => v,
            };
            rest.trim_start().starts_with('#') || rest.contains(" #")
        }
        let mut out = Vec::new();
        let mut section = "";
        let mut comment_above: Option<usize> = None;
        for line in text.lines() {
            let trimmed = line.trim_start();
            let indent = line.len() - trimmed.len();
            if trimmed.starts_with('#') {
                comment_above = Some(indent);
                continue;
            }
            let above = comment_above.take();
            let Some((key, value)) = trimmed.split_once(':') else {
                continue;
            };
            let name = if indent == 0 {
                section = key;
                key.to_owned()
            } else {
                format!("{section}.{key}")
            };
            if above != Some(indent) && !trailing_comment(value) {
                out.push(name);
            }
        }
        out
    }

    #[test]
    fn a_key_without_a_comment_is_found() {
        let text = "# the id\nserver_id: \"\"\nredis:   # r\n  addr: \"a:1\"   # where\n  \
                    db: 0\n  url: \"x#y\"\n  # above\n  password: \"\"\nlog:\n  level: info # l\n";
        assert_eq!(uncommented_keys(text), ["redis.db", "redis.url", "log"]);
        assert!(uncommented_keys("\n# gap\n\nserver_id: a\n") == ["server_id"]);
    }
}
