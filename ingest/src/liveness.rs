//! Liveness: the instance tells Redis it is alive, and leaves cleanly.
//!
//! Every third of `session.liveness_ttl`: `SET server:live:{id} <now> PX
//! <ttl>`, `ZADD servers:beat <now> <id>` and `HSET servers:registry <id>
//! <InstanceInfo JSON>`. When the key lapses (a crash), projectors mark the
//! instance's sessions `tcp_down(server_lost)`. A graceful shutdown removes
//! all three and the instance's connection set.
//!
//! Each beat also asks whether the key was still there. If it was gone
//! although an earlier beat had set it, the instance's sessions may have been
//! reaped or lost with Redis's data: the beat loop then wakes
//! [`crate::rebind`], which announces them again.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use iot_core::registry::InstanceInfo;
use iot_core::{Keys, ServerId};
use iot_service::{Health, RedisPool, Status};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::registry::Registry;

/// What an instance publishes about itself.
#[derive(Debug, Clone)]
pub struct Liveness {
    keys: Keys,
    server_id: ServerId,
    ttl: Duration,
    /// The fixed part of the registry record.
    base: InstanceInfo,
}

impl Liveness {
    /// For this instance.
    pub fn new(
        keys: Keys,
        server_id: ServerId,
        ttl: Duration,
        mqtt_listen: String,
        http_listen: String,
    ) -> Self {
        let base = InstanceInfo {
            server_id: server_id.to_string(),
            hostname: iot_core::ids::hostname(),
            pid: std::process::id(),
            mqtt_listen,
            http_listen,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started_at_ms: iot_core::time::now_ms(),
            last_beat_ms: 0,
            connections: 0,
            status: "running".into(),
        };
        Self {
            keys,
            server_id,
            ttl: ttl.max(Duration::from_millis(300)),
            base,
        }
    }

    /// How often [`beat`](Self::beat) runs.
    pub fn interval(&self) -> Duration {
        self.ttl / 3
    }

    /// Refreshes the liveness key, the beat and the registry record; returns
    /// whether the liveness key was still there.
    pub async fn beat(
        &self,
        redis: &RedisPool,
        status: &str,
        connections: u64,
    ) -> redis::RedisResult<bool> {
        let now = iot_core::time::now_ms();
        let mut info = self.base.clone();
        info.last_beat_ms = now;
        info.connections = connections;
        info.status = status.to_owned();
        let json = serde_json::to_string(&info).unwrap_or_default();
        let ttl_ms = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
        let mut conn = redis.get();
        let (existed,): (bool,) = redis::pipe()
            .cmd("EXISTS")
            .arg(self.keys.liveness(&self.server_id))
            .cmd("SET")
            .arg(self.keys.liveness(&self.server_id))
            .arg(now)
            .arg("PX")
            .arg(ttl_ms)
            .ignore()
            .cmd("ZADD")
            .arg(self.keys.server_beats())
            .arg(now)
            .arg(self.server_id.as_str())
            .ignore()
            .cmd("HSET")
            .arg(self.keys.servers())
            .arg(self.server_id.as_str())
            .arg(json)
            .ignore()
            .query_async(&mut conn)
            .await?;
        Ok(existed)
    }

    /// Removes the instance: liveness key, connection set, beat and record.
    pub async fn clear(&self, redis: &RedisPool) -> redis::RedisResult<()> {
        let mut conn = redis.get();
        redis::pipe()
            .cmd("DEL")
            .arg(self.keys.liveness(&self.server_id))
            .ignore()
            .cmd("DEL")
            .arg(self.keys.server_conns(&self.server_id))
            .ignore()
            .cmd("ZREM")
            .arg(self.keys.server_beats())
            .arg(self.server_id.as_str())
            .ignore()
            .cmd("HDEL")
            .arg(self.keys.servers())
            .arg(self.server_id.as_str())
            .ignore()
            .query_async::<()>(&mut conn)
            .await
    }

    /// Beats every [`interval`](Self::interval) until `shutdown`;
    /// `started`: an earlier beat set the key. Notifies `lapsed` when a beat
    /// finds the key gone although an earlier one had set it.
    #[allow(
        clippy::too_many_arguments,
        reason = "the shared handles of the instance, each used as is"
    )]
    pub fn spawn(
        self: Arc<Self>,
        redis: RedisPool,
        health: Health,
        registry: Arc<Registry>,
        connections: Arc<AtomicU64>,
        started: bool,
        lapsed: Arc<Notify>,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(self.interval());
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut failing = false;
            let mut beaten = started;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let status = status(&health, &registry);
                let n = connections.load(Ordering::Relaxed);
                let beat = tokio::time::timeout(self.interval(), self.beat(&redis, status, n));
                match beat.await {
                    Ok(Ok(existed)) => {
                        if failing {
                            tracing::info!("liveness beats reach Redis again");
                            failing = false;
                        }
                        if beaten && !existed {
                            crate::metrics::liveness_lapsed();
                            tracing::warn!(
                                connections = n,
                                "the liveness key had lapsed (this instance was cut off from Redis for longer than session.liveness_ttl, or Redis lost its data): announcing its sessions again"
                            );
                            lapsed.notify_one();
                        }
                        beaten = true;
                    }
                    Ok(Err(e)) => {
                        crate::metrics::redis_error("liveness");
                        if !failing {
                            tracing::warn!(error = %e, "cannot refresh the liveness key");
                            failing = true;
                        }
                    }
                    Err(_) => {
                        crate::metrics::redis_error("liveness");
                        if !failing {
                            tracing::warn!("refreshing the liveness key timed out");
                            failing = true;
                        }
                    }
                }
            }
        })
    }
}

/// `draining` while shutting down, `degraded` while events cannot be
/// written, `running` otherwise.
pub fn status(health: &Health, registry: &Registry) -> &'static str {
    if registry.is_draining() {
        "draining"
    } else if health.status_of(crate::writer::HEALTH_CHECK) == Some(Status::Ok) {
        "running"
    } else {
        "degraded"
    }
}
