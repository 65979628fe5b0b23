//! The start of every service: config, logging, server id, Redis.

use std::path::Path;
use std::time::Duration;

use iot_core::config::{ArchiverSeen, ConfigError, LogConfig, LogFormat};
use iot_core::{Config, ServerId};
use tracing_subscriber::EnvFilter;

/// Loads the config file (if any) with the process environment on top.
pub fn load_config(path: Option<&Path>) -> Result<Config, ConfigError> {
    let env: Vec<(String, String)> = std::env::vars().collect();
    Config::load(path, &env)
}

/// Sets up logging to stderr. `RUST_LOG` wins over `log.level`. Safe to call
/// more than once (later calls do nothing).
pub fn init_tracing(cfg: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match cfg.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// The server id by the seed's rule, as an error message on failure.
pub fn server_id(config: &Config) -> Result<ServerId, String> {
    config
        .resolve_server_id()
        .map_err(|e| format!("invalid server_id / SERVER_ID: {e}"))
}

/// What every service has once it has started: its config, its id, Redis,
/// health checks, the metrics handle and the shutdown token.
#[derive(Clone)]
pub struct Context {
    /// The loaded configuration.
    pub config: Config,
    /// This instance's id.
    pub server_id: ServerId,
    /// Redis (connected and answering at start).
    pub redis: crate::redis::RedisPool,
    /// Health checks; a `redis` probe keeps its check fresh.
    pub health: crate::health::Health,
    /// The Prometheus handle for `/metrics`.
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// Cancelled when the service must stop.
    pub shutdown: tokio_util::sync::CancellationToken,
}

impl Context {
    /// Resolves the server id, connects to Redis (required) and starts the
    /// Redis health probe; while this service caps its streams, it also
    /// looks for an archiver every [`ARCHIVER_POLL`] (see
    /// [`Config::stream_cap`]).
    pub async fn start(
        config: Config,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> anyhow::Result<Self> {
        let mut config = config;
        let server_id = server_id(&config).map_err(anyhow::Error::msg)?;
        let redis = crate::redis::RedisPool::connect(&config.redis).await?;
        // Its own flag: configs cloned before do not follow this service's.
        config.streams.archiver_seen = ArchiverSeen::new(false);
        if config.stream_maxlen().is_some() {
            watch_for_an_archiver(&redis, &config, shutdown.clone()).await;
        }
        let health = crate::health::Health::default();
        health.set("redis", crate::health::Status::Ok, None, None);
        crate::health::spawn_redis_probe(
            health.clone(),
            redis.clone(),
            std::time::Duration::from_secs(1),
            shutdown.clone(),
        );
        Ok(Self {
            config,
            server_id,
            redis,
            health,
            metrics: crate::metrics::handle(),
            shutdown,
        })
    }

    /// The HTTP routes every service has (`/health*`, `/metrics`).
    pub fn base_router(&self, service: &'static str) -> axum::Router {
        crate::http::base_router(
            self.health.clone(),
            self.metrics.clone(),
            crate::http::ServiceInfo {
                service,
                server_id: self.server_id.to_string(),
                version: env!("CARGO_PKG_VERSION"),
            },
        )
    }
}

/// How often a service that caps its streams looks for an archiver's
/// marker again.
pub const ARCHIVER_POLL: Duration = Duration::from_secs(2);

/// Whether an archiver has marked the archive on in this Redis (its
/// `archive:on` key): then no writer may cap the streams, whatever its own
/// `database.url` says, or entries could leave before they are archived.
///
/// Read at start; while the marker is absent (or cannot be read: the
/// configured cap stays) a task re-reads it every [`ARCHIVER_POLL`] until it
/// appears or `shutdown`. Once seen, `config.streams.archiver_seen` is set
/// and every writer's [`StreamCap`](iot_core::config::StreamCap) reads no
/// cap from its next write on, for the life of the process: an archiver
/// that stops for a while (its marker expiring) must not make writers trim
/// entries it has not stored.
async fn watch_for_an_archiver(
    redis: &crate::redis::RedisPool,
    config: &Config,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let key = config.keys().archive_marker();
    let seen = config.streams.archiver_seen.clone();
    match archive_marked(redis, &key).await {
        Ok(true) => {
            seen.set();
            tracing::info!(
                "an archiver runs on this Redis: the streams this service writes are not capped with MAXLEN (the archiver trims them)"
            );
            return;
        }
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the archive marker; capping the streams as configured until it can be read");
        }
    }
    let redis = redis.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(ARCHIVER_POLL) => {}
            }
            match archive_marked(&redis, &key).await {
                Ok(true) => {
                    seen.set();
                    tracing::info!(
                        "an archiver now runs on this Redis: the streams this service writes are no longer capped with MAXLEN (the archiver trims them)"
                    );
                    return;
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "cannot read the archive marker; still capping the streams");
                }
            }
        }
    });
}

/// Whether the archive marker `key` exists, within [`ARCHIVER_POLL`].
async fn archive_marked(redis: &crate::redis::RedisPool, key: &str) -> Result<bool, String> {
    let mut conn = redis.get();
    let mut exists = redis::cmd("EXISTS");
    exists.arg(key);
    match tokio::time::timeout(ARCHIVER_POLL, exists.query_async::<bool>(&mut conn)).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer within {ARCHIVER_POLL:?}")),
    }
}

/// The body of every binary's `main`: load the config (exit 2 with one line
/// naming the problem), set up logging, build the runtime, connect SIGTERM
/// and Ctrl-C to a shutdown token, run `service`, and turn an error into one
/// line on stderr and exit code 1.
pub fn main_with<F, Fut>(config_path: Option<&Path>, service: F) -> std::process::ExitCode
where
    F: FnOnce(Config, tokio_util::sync::CancellationToken) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let config = match load_config(config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    init_tracing(&config.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let shutdown = crate::shutdown::cancel_on_signal();
        service(config, shutdown).await
    });
    // Tasks still running (probes, upkeep) must not hold the exit up.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Binds `addr`, naming the config key in the error.
pub async fn bind(
    addr: std::net::SocketAddr,
    key: &str,
) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} ({key}): {e}"))
}
