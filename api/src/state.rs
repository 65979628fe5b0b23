//! What every handler shares.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use iot_core::{Keys, Policy};
use iot_downlink::{CommandStore, Settings as DownlinkSettings};
use iot_service::http::ServiceInfo;
use iot_service::startup::Context;
use iot_service::{Health, RedisPool};
use iot_store::Store;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::auth::Tokens;
use crate::error::ApiError;

/// Longest `GET /health/redis` waits for PONG, so that it answers quickly
/// while Redis is away.
pub const PING_TIMEOUT: Duration = Duration::from_millis(1000);

/// The handlers' shared state (cheap to clone).
#[derive(Clone)]
pub struct AppState {
    /// Redis.
    pub redis: RedisPool,
    /// Key names.
    pub keys: Keys,
    /// `streams.shards`: the number of online and known index shards.
    pub shards: u16,
    /// The configured policy (`policy` + `session.heartbeat_timeout`).
    pub policy: Policy,
    /// Bearer tokens.
    pub tokens: Arc<Tokens>,
    /// `api.open_health`.
    pub open_health: bool,
    /// Health checks (kept fresh by the Redis probe).
    pub health: Health,
    /// The Prometheus handle.
    pub metrics: PrometheusHandle,
    /// Who is answering.
    pub info: Arc<ServiceInfo>,
    /// Longest a request's Redis work may take before it answers 503.
    pub redis_timeout: Duration,
    /// PostgreSQL, when `database.url` is set (a lazy pool: it connects on
    /// first use, so the api runs while the database is away).
    pub db: Option<Store>,
    /// Longest a request's PostgreSQL work may take before it answers 503
    /// (see [`crate::database::request_timeout`]).
    pub db_timeout: Duration,
    /// Downlink command records, routing and queues in Redis.
    pub commands: CommandStore,
    /// `mqtt.max_packet_size`: bounds a command's topic and payload.
    pub max_packet_size: usize,
    /// Largest request body accepted (see [`crate::body_limit`]).
    pub max_body_bytes: usize,
    /// Age after which the projectors' lag record is reported stale (see
    /// [`crate::model::stale_after`]).
    pub lag_stale_after: Duration,
}

impl AppState {
    /// The state of a started service. With `database.url` set, a lazy
    /// PostgreSQL pool; a URL that does not parse is logged and leaves the
    /// api without a database ([`crate::run`] refuses to start with it
    /// instead, through [`with_store`](Self::with_store)).
    pub fn from_context(ctx: &Context) -> Self {
        let db = match crate::database::open(&ctx.config.database) {
            Ok(db) => db,
            Err(e) => {
                tracing::error!(error = %e, "database.url is unusable; PostgreSQL routes answer 503");
                None
            }
        };
        Self::with_store(ctx, db)
    }

    /// The state of a started service with `db` as its PostgreSQL store.
    pub fn with_store(ctx: &Context, db: Option<Store>) -> Self {
        let cfg = &ctx.config;
        Self {
            redis: ctx.redis.clone(),
            keys: cfg.keys(),
            shards: cfg.streams.shards.max(1),
            policy: cfg.policy(),
            tokens: Arc::new(Tokens::from_config(&cfg.api)),
            open_health: cfg.api.open_health,
            health: ctx.health.clone(),
            metrics: ctx.metrics.clone(),
            info: Arc::new(ServiceInfo {
                service: "api",
                server_id: ctx.server_id.to_string(),
                version: env!("CARGO_PKG_VERSION"),
            }),
            redis_timeout: cfg
                .redis
                .read_timeout
                .max(cfg.redis.write_timeout)
                .max(Duration::from_millis(100)),
            db,
            db_timeout: crate::database::request_timeout(&cfg.database),
            commands: CommandStore::new(
                ctx.redis.clone(),
                cfg.keys(),
                DownlinkSettings::from_config(cfg),
            ),
            max_packet_size: cfg.mqtt.max_packet_size as usize,
            max_body_bytes: crate::body_limit(cfg.mqtt.max_packet_size as usize),
            lag_stale_after: crate::model::stale_after(cfg.projector.lag_interval),
        }
    }

    /// The lag record `lag` as answered now.
    pub fn lag_info(&self, lag: &iot_core::registry::Lag) -> crate::model::LagInfo {
        crate::model::LagInfo::new(lag, iot_core::time::now_ms(), self.lag_stale_after)
    }

    /// The PostgreSQL store, or 503 `database_not_configured`.
    pub fn store(&self) -> Result<&Store, ApiError> {
        self.db.as_ref().ok_or(ApiError::DatabaseNotConfigured)
    }

    /// Runs a request's PostgreSQL work within
    /// [`db_timeout`](Self::db_timeout); the deadline is a 503
    /// `database_unavailable`.
    pub async fn db<T, F>(&self, work: F) -> Result<T, ApiError>
    where
        F: Future<Output = Result<T, ApiError>>,
    {
        match tokio::time::timeout(self.db_timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(ApiError::DatabaseUnavailable(format!(
                "no answer within {:?}",
                self.db_timeout
            ))),
        }
    }

    /// Runs a request's Redis work within [`redis_timeout`](Self::redis_timeout);
    /// a Redis error or the deadline is a 503.
    pub async fn redis<T, F>(&self, work: F) -> Result<T, ApiError>
    where
        F: Future<Output = Result<T, ApiError>>,
    {
        match tokio::time::timeout(self.redis_timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(ApiError::RedisUnavailable(format!(
                "no answer within {:?}",
                self.redis_timeout
            ))),
        }
    }
}
