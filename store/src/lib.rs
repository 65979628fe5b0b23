//! PostgreSQL persistence of the IoT session server.
//!
//! PostgreSQL keeps the durable data beside Redis: who may connect (the
//! device registry), what happened to every device (the archive of events,
//! transitions and sessions) and what was asked of it (the command log).
//! Nothing on a device's hot path waits for PostgreSQL: the ingest caches
//! credential checks, and the archive is written from the Redis Streams by a
//! consumer group of its own, so a slow or absent database delays the
//! archive, never the devices.
//!
//! # Layout
//!
//! - [`Store`] (this file): the pool, migrations and the schema check.
//! - [`devices`]: the device registry (secrets stored as SHA-256).
//! - [`archive`]: archived events, transitions and sessions; history pages.
//! - [`archiver`]: the consumer group that fills the archive and trims the streams.
//! - [`trim`]: the safe trim point of a stream, and entries trimmed before
//!   the archive read them.
//! - [`dead_letter`]: entries the archive could not store, with the error.
//! - [`commands`]: the command log.
//! - [`error`]: the error type, `StoreError`.

pub mod archive;
pub mod archiver;
pub mod commands;
pub mod dead_letter;
pub mod devices;
pub mod error;
pub mod trim;

use std::time::Duration;

use iot_core::config::DatabaseConfig;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgPool, PgPoolOptions};

pub use error::StoreError;

/// The migrations under `migrations/`, embedded at build time.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// A PostgreSQL connection pool with the project's queries.
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
    /// Archive partitions known to exist (saves a DDL round trip per batch).
    partitions: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    /// A schema check has passed (at start, or in [`Store::probe`] once the
    /// database answered): until then the probe checks the schema too.
    schema_verified: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// `postgres://user:secret@host/db` -> `postgres://user:***@host/db`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s + 3 => {
            let user = url[s + 3..at].split(':').next().unwrap_or_default();
            format!("{}{user}:***{}", &url[..s + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

fn pool_options(cfg: &DatabaseConfig) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(cfg.max_connections.max(1))
        .acquire_timeout(cfg.connect_timeout)
        .idle_timeout(Some(Duration::from_secs(300)))
}

impl Store {
    /// Connects to `cfg.url`. The pool connects lazily beyond the first
    /// connection, so a database that goes away later shows up as errors on
    /// queries, not as a failed start.
    pub async fn connect(cfg: &DatabaseConfig) -> Result<Self, StoreError> {
        if cfg.url.trim().is_empty() {
            return Err(StoreError::NotConfigured);
        }
        let pool = pool_options(cfg)
            .connect(cfg.url.trim())
            .await
            .map_err(|e| StoreError::Unreachable {
                url: redact_url(cfg.url.trim()),
                reason: e.to_string(),
            })?;
        Ok(Self::from_pool(pool))
    }

    /// A pool that connects on first use, so a service can start while
    /// PostgreSQL is away (its queries fail until it is back).
    pub fn connect_lazy(cfg: &DatabaseConfig) -> Result<Self, StoreError> {
        if cfg.url.trim().is_empty() {
            return Err(StoreError::NotConfigured);
        }
        let pool = pool_options(cfg)
            .connect_lazy(cfg.url.trim())
            .map_err(|e| StoreError::Unreachable {
                url: redact_url(cfg.url.trim()),
                reason: e.to_string(),
            })?;
        Ok(Self::from_pool(pool))
    }

    /// Wraps an existing pool.
    pub fn from_pool(pool: PgPool) -> Self {
        Self {
            pool,
            partitions: Default::default(),
            schema_verified: Default::default(),
        }
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies every migration not applied yet; returns how many ran.
    pub async fn migrate(&self) -> Result<usize, StoreError> {
        let before = self.applied_versions().await.unwrap_or_default().len();
        MIGRATOR
            .run(&self.pool)
            .await
            .map_err(|e| StoreError::Migration(e.to_string()))?;
        let after = self.applied_versions().await?.len();
        Ok(after.saturating_sub(before))
    }

    async fn applied_versions(&self) -> Result<Vec<i64>, StoreError> {
        let exists: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
            .fetch_one(&self.pool)
            .await?;
        if !exists {
            return Ok(Vec::new());
        }
        Ok(sqlx::query_scalar(
            "SELECT version FROM _sqlx_migrations WHERE success ORDER BY version",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Checks that every embedded migration has been applied, so a service
    /// refuses to run against an old schema with a clear message.
    pub async fn check_schema(&self) -> Result<(), StoreError> {
        let verified = self.check_schema_once().await;
        if verified.is_ok() {
            self.schema_verified
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        verified
    }

    async fn check_schema_once(&self) -> Result<(), StoreError> {
        let applied = self.applied_versions().await?;
        let missing: Vec<String> = MIGRATOR
            .iter()
            .filter(|m| !m.migration_type.is_down_migration() && !applied.contains(&m.version))
            .map(|m| format!("{}_{}", m.version, m.description))
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(StoreError::SchemaOutdated { missing })
        }
    }

    /// The schema check a service makes at start: `Err` only for a schema
    /// that lacks migrations (the service must not run against it). An
    /// unreachable database sets health check `check` degraded and lets the
    /// service start; it is retried by whoever uses the store.
    ///
    /// `check` is marked [optional](iot_service::Health::mark_optional): a
    /// PostgreSQL outage shows in `/health` but never makes a service
    /// unready, since nothing on the device path waits for the database.
    pub async fn check_at_start(
        &self,
        health: &iot_service::Health,
        check: &str,
    ) -> Result<(), StoreError> {
        health.mark_optional(check);
        match self.check_schema().await {
            Ok(()) => {
                health.set(check, iot_service::Status::Ok, None, None);
                Ok(())
            }
            Err(e @ StoreError::SchemaOutdated { .. }) => Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "PostgreSQL does not answer at start; waiting for it");
                health.set(
                    check,
                    iot_service::Status::Degraded,
                    Some(e.to_string()),
                    None,
                );
                Ok(())
            }
        }
    }

    /// The health probe: a round trip to the database and, until a schema
    /// check has passed (a database that did not answer at start), the
    /// schema check, so a database that comes back without its migrations
    /// shows as degraded with `SchemaOutdated` (run `iot-api migrate`)
    /// instead of failing requests one by one.
    pub async fn probe(&self) -> Result<Duration, StoreError> {
        let rtt = self.ping().await?;
        if !self
            .schema_verified
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            self.check_schema().await?;
        }
        Ok(rtt)
    }

    /// Round trip to the database (for health checks).
    pub async fn ping(&self) -> Result<Duration, StoreError> {
        let start = std::time::Instant::now();
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(start.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact_url("postgres://u:pw@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact_url("postgres://h/db"), "postgres://h/db");
    }
}
