//! Device authentication at CONNECT.
//!
//! Mode `open` (development) accepts every device whose client id is a valid
//! phyID, whatever its credentials. Mode `registry` checks the PostgreSQL
//! device registry: the MQTT username is the phyID (and must equal the
//! client id), the password is the device secret. Verdicts are cached for
//! `mqtt.auth_cache_ttl`, so a connect storm does not become a database
//! storm; refusals are answered "not authorized" after a delay that grows
//! with the failures from the same address; while PostgreSQL cannot answer,
//! devices the cache knows keep connecting and the others are told "server
//! unavailable", at once (nobody waits for a database known to be away);
//! devices disabled or deleted while connected are closed at once when the
//! api announces it on Redis, and within the cache TTL otherwise.
//!
//! # Layout
//!
//! - this file: the [`Authenticator`] trait, its [`Decision`]s, mode
//!   `open`, and the mode chosen from the config ([`from_config`]).
//! - [`registry`]: mode `registry`.
//! - [`cache`]: the credential cache (pure).
//! - [`throttle`]: the per-address slow-down of failures (pure).
//! - [`revocation`]: revocations from the api over Redis Pub/Sub, and the
//!   periodic re-check of the devices connected here.

pub mod cache;
pub mod registry;
pub mod revocation;
pub mod throttle;

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;

use iot_core::Config;
use iot_core::config::AuthMode;
use iot_service::Health;
use iot_store::{Store, StoreError};

use crate::protocol::Hello;

pub use registry::RegistryAuth;

/// Name of the health check of the device registry's database (mode
/// `registry` only).
pub const HEALTH_CHECK: &str = "database";

/// The outcome of a credential check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The device may connect.
    Allow,
    /// The device may not connect (CONNACK 5, not authorized); the reason
    /// is logged, never sent to the device.
    Deny(String),
    /// The credentials cannot be checked now (CONNACK 3, server
    /// unavailable); the reason is logged.
    Unavailable(String),
}

/// Checks a device's credentials.
pub trait Authenticator: Send + Sync + 'static {
    /// Decides whether the device of `hello`, connecting from `peer`, may
    /// connect. A refusal may take a while (failures are slowed down).
    fn authenticate<'a>(
        &'a self,
        hello: &'a Hello,
        peer: Option<IpAddr>,
    ) -> Pin<Box<dyn Future<Output = Decision> + Send + 'a>>;

    /// The mode's name, for the start-up log.
    fn name(&self) -> &'static str;
}

/// Mode `open`: every valid phyID may connect.
#[derive(Debug, Clone, Copy, Default)]
pub struct Open;

impl Authenticator for Open {
    fn authenticate<'a>(
        &'a self,
        _hello: &'a Hello,
        _peer: Option<IpAddr>,
    ) -> Pin<Box<dyn Future<Output = Decision> + Send + 'a>> {
        Box::pin(std::future::ready(Decision::Allow))
    }

    fn name(&self) -> &'static str {
        "open"
    }
}

/// Why the configured authentication cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    /// `mqtt.auth: registry` without `database.url`.
    #[error(
        "mqtt.auth is \"registry\" (device credentials are checked against the PostgreSQL device registry) but database.url is empty; set database.url (DATABASE_URL) to the registry's database, or mqtt.auth: open (IOT_MQTT_AUTH=open) for development"
    )]
    DatabaseNotConfigured,
    /// The registry's database cannot be used (a schema missing
    /// migrations, an invalid URL).
    #[error("mqtt.auth is \"registry\" but the device registry cannot be used: {0}")]
    Store(#[from] StoreError),
}

/// The authentication of an instance.
pub struct Auth {
    /// What connections ask.
    pub authenticator: Box<dyn Authenticator>,
    /// Mode `registry`: its cache and database, for the revocation re-check
    /// and the health probe.
    pub registry: Option<RegistryAuth>,
}

/// The authentication for `config.mqtt.auth`. In mode `registry` the
/// database must be configured and, if it answers, hold every migration;
/// an unreachable database only marks the `database` health check degraded
/// (devices are then refused with "server unavailable" until it answers).
pub async fn from_config(config: &Config, health: &Health) -> Result<Auth, AuthConfigError> {
    match config.mqtt.auth {
        AuthMode::Open => Ok(Auth {
            authenticator: Box::new(Open),
            registry: None,
        }),
        AuthMode::Registry => {
            let store = match Store::connect_lazy(&config.database) {
                Ok(s) => s,
                Err(StoreError::NotConfigured) => {
                    return Err(AuthConfigError::DatabaseNotConfigured);
                }
                Err(e) => return Err(e.into()),
            };
            // Refuses a schema missing migrations; an unreachable database
            // only marks the check degraded (the pool's acquire timeout,
            // `database.connect_timeout`, bounds the wait).
            store.check_at_start(health, HEALTH_CHECK).await?;
            let timeout = config
                .database
                .connect_timeout
                .max(std::time::Duration::from_millis(100));
            let mut registry =
                RegistryAuth::new(store, config.mqtt.auth_cache_ttl, timeout, health.clone());
            match revocation_feed(config) {
                Ok(feed) => registry = registry.with_feed(feed),
                Err(e) => tracing::warn!(error = %e,
                    "no revocation channel; disabled devices are closed at the periodic re-check only"),
            }
            Ok(Auth {
                authenticator: Box::new(registry.clone()),
                registry: Some(registry),
            })
        }
    }
}

/// The revocation channel on the instance's Redis.
fn revocation_feed(config: &Config) -> Result<revocation::Feed, String> {
    let url = config.redis.connection_url().map_err(|e| e.to_string())?;
    let client = redis::Client::open(url.as_str()).map_err(|e| e.to_string())?;
    Ok(revocation::Feed {
        client,
        channel: config.keys().auth_revocations(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn open_allows_any_valid_device() {
        let hello = Hello {
            phy: iot_core::PhyId::new("d").expect("valid"),
            keepalive_secs: 0,
            keepalive: Duration::from_secs(1),
            username: Some("someone".into()),
            password: Some(bytes::Bytes::from_static(b"anything")),
        };
        let auth = from_config(&Config::default(), &Health::default())
            .await
            .expect("open is the default");
        assert_eq!(auth.authenticator.name(), "open");
        assert!(auth.registry.is_none());
        assert_eq!(
            auth.authenticator.authenticate(&hello, None).await,
            Decision::Allow
        );
    }

    #[tokio::test]
    async fn registry_mode_without_a_database_refuses_to_start_with_a_clear_message() {
        let mut config = Config::default();
        config.mqtt.auth = AuthMode::Registry;
        let err = from_config(&config, &Health::default())
            .await
            .err()
            .expect("refused");
        let msg = err.to_string();
        assert!(
            msg.contains("mqtt.auth")
                && msg.contains("database.url")
                && msg.contains("DATABASE_URL"),
            "{msg}"
        );
    }
}
