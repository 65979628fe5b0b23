//! The Redis connection every service starts with.
//!
//! Redis is required: [`RedisPool::connect`] fails with one clear line when
//! it is disabled, not configured, or does not answer. Once connected, each
//! connection reconnects by itself; requests made while Redis is away fail
//! fast with an error the caller handles (retry, buffer, report degraded).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use iot_core::config::{RedisConfig, RedisRequired};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

/// Why Redis could not be used at start.
#[derive(Debug, thiserror::Error)]
pub enum RedisStartError {
    /// Disabled or not configured.
    #[error(transparent)]
    Required(#[from] RedisRequired),
    /// Configured but not answering.
    #[error(
        "Redis is required: cannot reach {url} ({reason}). Start Redis there, or point redis.addr / REDIS_URL at a running one"
    )]
    Unreachable {
        /// The URL with any password hidden.
        url: String,
        /// The connection error.
        reason: String,
    },
}

/// A few multiplexed Redis connections, used round-robin.
///
/// Each connection pipelines any number of concurrent requests, so a handful
/// serve a whole service; `redis.min_idle_conns` (capped by `pool_size`)
/// decides how many. Blocking commands (XREADGROUP BLOCK) must use a
/// [`dedicated`](Self::dedicated) connection so they do not stall the others.
#[derive(Clone)]
pub struct RedisPool {
    client: redis::Client,
    conns: Arc<[ConnectionManager]>,
    next: Arc<AtomicUsize>,
    config: ConnectionManagerConfig,
    url: String,
}

impl std::fmt::Debug for RedisPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisPool")
            .field("url", &self.url)
            .field("conns", &self.conns.len())
            .finish()
    }
}

/// `redis://:secret@host/0` -> `redis://:***@host/0`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s + 3 => {
            let userinfo = &url[s + 3..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{}{user}:***{}", &url[..s + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

impl RedisPool {
    /// Connects and checks that Redis answers (PING).
    pub async fn connect(cfg: &RedisConfig) -> Result<Self, RedisStartError> {
        let url = cfg.connection_url()?;
        let shown = redact_url(&url);
        let unreachable = |reason: String| RedisStartError::Unreachable {
            url: shown.clone(),
            reason,
        };
        let client = redis::Client::open(url.as_str()).map_err(|e| unreachable(e.to_string()))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(cfg.dial_timeout))
            .set_response_timeout(Some(cfg.read_timeout.max(cfg.write_timeout)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(2));
        let n = cfg.min_idle_conns.clamp(1, cfg.pool_size.max(1)).min(16) as usize;
        let mut conns = Vec::with_capacity(n);
        for _ in 0..n {
            let conn = tokio::time::timeout(
                cfg.dial_timeout,
                ConnectionManager::new_with_config(client.clone(), config.clone()),
            )
            .await
            .map_err(|_| unreachable(format!("no answer within {:?}", cfg.dial_timeout)))?
            .map_err(|e| unreachable(e.to_string()))?;
            conns.push(conn);
        }
        let pool = Self {
            client,
            conns: conns.into(),
            next: Arc::new(AtomicUsize::new(0)),
            config,
            url: shown.clone(),
        };
        pool.ping().await.map_err(|e| unreachable(e.to_string()))?;
        Ok(pool)
    }

    /// A shared multiplexed connection (cheap to clone).
    pub fn get(&self) -> ConnectionManager {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
        self.conns[i].clone()
    }

    /// A new connection of its own, for blocking commands.
    pub async fn dedicated(&self) -> redis::RedisResult<ConnectionManager> {
        ConnectionManager::new_with_config(self.client.clone(), self.config.clone()).await
    }

    /// The client, for Pub/Sub connections.
    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    /// The URL with any password hidden, for logs.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// PING round trip.
    pub async fn ping(&self) -> redis::RedisResult<Duration> {
        let start = Instant::now();
        let mut c = self.get();
        let _: String = redis::cmd("PING").query_async(&mut c).await?;
        Ok(start.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact_url("redis://:pw@h:1/0"), "redis://:***@h:1/0");
        assert_eq!(redact_url("redis://u:pw@h:1/0"), "redis://u:***@h:1/0");
        assert_eq!(redact_url("redis://h:1/0"), "redis://h:1/0");
    }
}
