//! Health: named checks, each ok, degraded or down, and the worst of them.
//!
//! Components set their own check (the ingest's event writer reports
//! `degraded` while Redis is away); [`spawn_redis_probe`] keeps a `redis`
//! check fresh so health requests never wait for Redis.
//!
//! Every check counts for the overall status (`/health`), but only the
//! checks a service cannot serve without count for readiness
//! (`/health/ready`): a check marked [`optional`](Health::mark_optional)
//! (PostgreSQL: the `database` and `archive` checks) is reported, degraded
//! or not, without taking the instance out of a load balancer's rotation;
//! devices and presence work without PostgreSQL.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::redis::RedisPool;

/// State of one check, ordered from best to worst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Working.
    Ok,
    /// Working with reduced function (for example buffering while Redis is away).
    Degraded,
    /// Not working.
    Down,
}

/// One named check.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// Its state.
    pub status: Status,
    /// Why, when not ok.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Round trip of the last probe, when the check is a probe.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
    /// When it was last set, ms since the Unix epoch.
    pub updated_at_ms: i64,
}

/// All checks of a service, with the overall status.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The worst status of all checks (ok when there are none).
    pub status: Status,
    /// Each check by name.
    pub checks: BTreeMap<String, Check>,
}

/// The shared set of checks.
#[derive(Debug, Clone, Default)]
pub struct Health {
    checks: Arc<RwLock<BTreeMap<String, Check>>>,
    /// Checks that do not decide readiness (see [`Health::mark_optional`]).
    optional: Arc<RwLock<BTreeSet<String>>>,
}

impl Health {
    /// Sets check `name`.
    pub fn set(
        &self,
        name: &str,
        status: Status,
        detail: Option<String>,
        latency: Option<Duration>,
    ) {
        let check = Check {
            status,
            detail,
            latency_ms: latency.map(|d| d.as_secs_f64() * 1000.0),
            updated_at_ms: iot_core::time::now_ms(),
        };
        self.checks.write().insert(name.to_owned(), check);
    }

    /// The current status of check `name`, if set.
    pub fn status_of(&self, name: &str) -> Option<Status> {
        self.checks.read().get(name).map(|c| c.status)
    }

    /// Marks check `name` as one the service can serve without: it is
    /// reported (and makes the overall status degraded) but does not make
    /// the service unready. Checks are required unless marked.
    pub fn mark_optional(&self, name: &str) {
        self.optional.write().insert(name.to_owned());
    }

    /// Whether check `name` was marked [`optional`](Self::mark_optional).
    pub fn is_optional(&self, name: &str) -> bool {
        self.optional.read().contains(name)
    }

    /// Ready: every check that is not optional is ok (`/health/ready`).
    pub fn is_ready(&self) -> bool {
        let optional = self.optional.read();
        self.checks
            .read()
            .iter()
            .all(|(name, c)| c.status == Status::Ok || optional.contains(name))
    }

    /// Every check and the overall status.
    pub fn report(&self) -> Report {
        let checks = self.checks.read().clone();
        let status = checks
            .values()
            .map(|c| c.status)
            .max()
            .unwrap_or(Status::Ok);
        Report { status, checks }
    }
}

/// Runs `probe` every `interval` (each run bounded by `timeout`) and records
/// check `name`: ok with the round trip, or degraded with the error. Logs
/// once when the check turns degraded and once when it recovers.
pub fn spawn_probe<F, Fut, E>(
    health: Health,
    name: &'static str,
    interval: Duration,
    timeout: Duration,
    shutdown: CancellationToken,
    probe: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<Duration, E>> + Send,
    E: std::fmt::Display,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = tokio::time::timeout(timeout, probe()) => r,
            };
            let error = match result {
                Ok(Ok(rtt)) => {
                    if health.status_of(name).is_some_and(|s| s != Status::Ok) {
                        tracing::info!(check = name, "answers again");
                    }
                    health.set(name, Status::Ok, None, Some(rtt));
                    continue;
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {timeout:?}"),
            };
            if health.status_of(name) != Some(Status::Degraded) {
                tracing::warn!(check = name, error = %error, "does not answer");
            }
            health.set(name, Status::Degraded, Some(error), None);
        }
    })
}

/// Pings Redis every `interval` and records the `redis` check: ok with the
/// round trip, or degraded with the error after a failed PING. Degraded, not
/// down: every service keeps running through a Redis outage (the ingest
/// keeps its devices and buffers events, the others retry), and `/health`
/// answers 503 for anything but ok anyway.
pub fn spawn_redis_probe(
    health: Health,
    pool: RedisPool,
    interval: Duration,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    spawn_probe(health, "redis", interval, interval, shutdown, move || {
        let pool = pool.clone();
        async move { pool.ping().await }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overall_status_is_the_worst() {
        let h = Health::default();
        assert_eq!(h.report().status, Status::Ok);
        h.set("a", Status::Ok, None, None);
        h.set("b", Status::Degraded, Some("buffering".into()), None);
        assert_eq!(h.report().status, Status::Degraded);
        h.set("c", Status::Down, None, None);
        assert_eq!(h.report().status, Status::Down);
        h.set("c", Status::Ok, None, Some(Duration::from_millis(2)));
        assert_eq!(h.report().status, Status::Degraded);
        assert_eq!(h.report().checks["c"].latency_ms, Some(2.0));
    }

    #[test]
    fn optional_checks_do_not_decide_readiness() {
        let h = Health::default();
        h.set("redis", Status::Ok, None, None);
        h.set("database", Status::Degraded, Some("away".into()), None);
        assert!(!h.is_ready(), "required unless marked");
        h.mark_optional("database");
        assert!(h.is_optional("database"));
        assert!(h.is_ready());
        assert_eq!(
            h.report().status,
            Status::Degraded,
            "still reported as degraded"
        );
        h.set("redis", Status::Degraded, None, None);
        assert!(!h.is_ready());
    }
}
