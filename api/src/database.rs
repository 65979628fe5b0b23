//! PostgreSQL in the api: the store at start, the schema check, the
//! `database` health probe and `iot-api migrate`.
//!
//! The database is optional (`database.url` empty: the PostgreSQL routes
//! answer 503 `database_not_configured`, everything else works). When it is
//! configured, the api starts even while PostgreSQL is away (the pool
//! connects on first use, the `database` check is degraded), but refuses to
//! start when PostgreSQL answers with a schema that lacks migrations: that
//! is an operator error, said clearly (`run iot-api migrate`). A probe keeps
//! the `database` check fresh, so `/health` follows outages without a
//! request paying for it; presence routes never wait for PostgreSQL.

use std::time::Duration;

use iot_core::config::DatabaseConfig;
use iot_service::Health;
use iot_store::{Store, StoreError};
use tokio_util::sync::CancellationToken;

/// Name of the health check.
pub const HEALTH_CHECK: &str = "database";

/// How often the probe runs.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// The store for `cfg`: `None` when `database.url` is empty; an error when
/// the URL does not parse. Never touches the network.
pub fn open(cfg: &DatabaseConfig) -> Result<Option<Store>, StoreError> {
    match Store::connect_lazy(cfg) {
        Ok(s) => Ok(Some(s)),
        Err(StoreError::NotConfigured) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Longest a request's PostgreSQL work may take: the pool's acquire timeout
/// (`database.connect_timeout`) plus a second for the query, within 1 to 8 s
/// so the answer comes before the request deadline.
pub fn request_timeout(cfg: &DatabaseConfig) -> Duration {
    (cfg.connect_timeout + Duration::from_secs(1))
        .clamp(Duration::from_secs(1), Duration::from_secs(8))
}

/// Whether `e` means PostgreSQL is unavailable (503) rather than a bug:
/// the store's own judgement, plus server errors of SQLSTATE classes 08
/// (connection exception), 53 (insufficient resources) and 57 (operator
/// intervention, such as a shutdown in progress).
pub fn is_unavailable(e: &StoreError) -> bool {
    if e.is_unavailable() {
        return true;
    }
    match e {
        StoreError::Db(sqlx::Error::Database(d)) => d
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("53") || c.starts_with("57")),
        _ => false,
    }
}

/// Probes PostgreSQL every `interval` (each probe bounded by `timeout`; see
/// [`iot_store::Store::probe`]) and records the `database` check: ok with
/// the round trip, or degraded with the error (a schema without its
/// migrations included).
pub fn spawn_probe(
    store: Store,
    health: Health,
    interval: Duration,
    timeout: Duration,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    iot_service::health::spawn_probe(
        health,
        HEALTH_CHECK,
        interval,
        timeout,
        shutdown,
        move || {
            let store = store.clone();
            async move { store.probe().await }
        },
    )
}

/// What `iot-api migrate` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migrated {
    /// Migrations applied by this run.
    pub applied: usize,
    /// Migrations the binary knows.
    pub known: usize,
}

impl std::fmt::Display for Migrated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "applied {} migration(s); the schema has all {} migration(s) this binary knows",
            self.applied, self.known
        )
    }
}

/// `iot-api migrate`: connects to `database.url` and applies the
/// migrations not applied yet. Needs no Redis.
pub async fn migrate(cfg: &DatabaseConfig) -> Result<Migrated, StoreError> {
    let store = Store::connect(cfg).await?;
    let applied = store.migrate().await?;
    store.check_schema().await?;
    let known = iot_store::MIGRATOR
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
        .count();
    store.pool().close().await;
    Ok(Migrated { applied, known })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_timeout_is_bounded() {
        let cfg = |s| DatabaseConfig {
            connect_timeout: Duration::from_millis(s),
            ..Default::default()
        };
        assert_eq!(request_timeout(&cfg(0)), Duration::from_secs(1));
        assert_eq!(request_timeout(&cfg(500)), Duration::from_millis(1500));
        assert_eq!(request_timeout(&cfg(60_000)), Duration::from_secs(8));
    }

    #[test]
    fn an_empty_url_is_no_database_and_a_bad_one_an_error() {
        assert!(open(&DatabaseConfig::default()).expect("empty").is_none());
        let bad = DatabaseConfig {
            url: "not a url".into(),
            ..Default::default()
        };
        assert!(open(&bad).is_err());
    }

    #[test]
    fn pool_timeouts_are_unavailable_and_missing_rows_are_not() {
        assert!(is_unavailable(&StoreError::Db(sqlx::Error::PoolTimedOut)));
        assert!(!is_unavailable(&StoreError::NotFound));
        assert!(!is_unavailable(&StoreError::Conflict));
    }
}
