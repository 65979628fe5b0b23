//! Mode `registry`: the MQTT username is the phyID (equal to the client
//! id), the password is the device secret, checked against the PostgreSQL
//! device registry through the [`Cache`].
//!
//! - Fresh cache entry: answered without the database.
//! - Otherwise PostgreSQL is asked (bounded by `database.connect_timeout`);
//!   its verdict is cached.
//! - PostgreSQL fails: a device whose password was valid before (even long
//!   ago: the stale entry) connects; any other gets "server unavailable".
//!   The failure marks the `database` health check degraded.
//! - While the `database` check is degraded (a failed query here, or the
//!   health probe), nobody waits for PostgreSQL: the cache answers at once
//!   (stale valid entries connect, unknown devices get "server
//!   unavailable"), and a probe in the background ([`PROBE_BACKOFF`] apart
//!   at most) finds out when the database is back.
//! - Every refusal is counted by reason and slowed down per address
//!   ([`Throttle`]).

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use iot_core::PhyId;
use iot_service::{Health, Status};
use iot_store::Store;
use parking_lot::Mutex;
use tokio::time::Instant;

use super::cache::{Cache, Key, Lookup, Verdict};
use super::revocation::Feed;
use super::throttle::Throttle;
use super::{Authenticator, Decision, HEALTH_CHECK};
use crate::protocol::Hello;

/// Least time between two background probes of the database while the
/// `database` check is degraded.
pub const PROBE_BACKOFF: Duration = Duration::from_millis(500);

/// The registry authenticator; cheap to clone (shared state).
#[derive(Clone)]
pub struct RegistryAuth {
    inner: Arc<Inner>,
    /// Where revocations arrive (see [`super::revocation`]).
    feed: Option<Feed>,
}

struct Inner {
    store: Store,
    ttl: Duration,
    query_timeout: Duration,
    /// Random per process: cache keys are hashes of salt + password.
    salt: [u8; 32],
    cache: Mutex<Cache>,
    throttle: Mutex<Throttle>,
    /// The `database` check, shared with the health probe.
    health: Health,
    /// A background probe is running.
    probing: AtomicBool,
    /// When the last background probe started.
    last_probe: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryAuth")
            .field("ttl", &self.inner.ttl)
            .field("cached", &self.inner.cache.lock().len())
            .finish()
    }
}

impl RegistryAuth {
    /// Checks credentials in `store`, caching verdicts for `ttl`; each
    /// query may take `query_timeout`. `health` holds the `database` check
    /// ([`HEALTH_CHECK`]): while it is degraded the cache answers alone.
    pub fn new(store: Store, ttl: Duration, query_timeout: Duration, health: Health) -> Self {
        let mut salt = [0u8; 32];
        salt[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        salt[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        Self {
            inner: Arc::new(Inner {
                store,
                ttl,
                query_timeout,
                salt,
                cache: Mutex::new(Cache::new(ttl)),
                throttle: Mutex::new(Throttle::default()),
                health,
                probing: AtomicBool::new(false),
                last_probe: Mutex::new(None),
            }),
            feed: None,
        }
    }

    /// Revocations published on `feed` reach this instance at once.
    pub fn with_feed(mut self, feed: Feed) -> Self {
        self.feed = Some(feed);
        self
    }

    /// Where revocations arrive, if anywhere.
    pub fn feed(&self) -> Option<&Feed> {
        self.feed.as_ref()
    }

    /// Whether the `database` check is degraded (or down): PostgreSQL is
    /// not asked on the connect path then.
    pub fn database_degraded(&self) -> bool {
        self.inner
            .health
            .status_of(HEALTH_CHECK)
            .is_some_and(|s| s != Status::Ok)
    }

    fn mark_degraded(&self, error: &str) {
        if !self.database_degraded() {
            tracing::warn!(error = %error, "the device registry does not answer; answering from the credential cache until it does");
        }
        self.inner.health.set(
            HEALTH_CHECK,
            Status::Degraded,
            Some(format!("the device registry does not answer: {error}")),
            None,
        );
    }

    /// Starts a background probe of the database, unless one runs or one
    /// started less than [`PROBE_BACKOFF`] ago. Its success makes the
    /// `database` check ok again (so connects ask PostgreSQL again).
    fn probe_in_background(&self) {
        {
            let mut last = self.inner.last_probe.lock();
            if last.is_some_and(|t| t.elapsed() < PROBE_BACKOFF)
                || self.inner.probing.swap(true, Ordering::AcqRel)
            {
                return;
            }
            *last = Some(Instant::now());
        }
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let result = tokio::time::timeout(inner.query_timeout, inner.store.ping()).await;
            if let Ok(Ok(rtt)) = result {
                tracing::info!("the device registry answers again");
                inner.health.set(HEALTH_CHECK, Status::Ok, None, Some(rtt));
            }
            inner.probing.store(false, Ordering::Release);
        });
    }

    /// The registry's database.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// How long a verdict is fresh.
    pub fn ttl(&self) -> Duration {
        self.inner.ttl
    }

    /// Longest wait for one query.
    pub fn query_timeout(&self) -> Duration {
        self.inner.query_timeout
    }

    fn key(&self, password: &[u8]) -> Key {
        let mut salted = Vec::with_capacity(self.inner.salt.len() + password.len());
        salted.extend_from_slice(&self.inner.salt);
        salted.extend_from_slice(password);
        iot_store::devices::hash_secret(&salted)
    }

    /// Forgets `phy` (it was disabled or deleted).
    pub fn forget(&self, phy: &PhyId) {
        self.inner.cache.lock().forget(phy);
    }

    /// Drops cache entries and failure counts that no longer matter.
    pub fn prune(&self) {
        let now = Instant::now();
        self.inner.cache.lock().prune(now);
        self.inner.throttle.lock().prune(now);
    }

    /// A refusal: counted, delayed by the failures from `peer`.
    async fn deny(&self, peer: Option<IpAddr>, reason: &'static str, detail: String) -> Decision {
        crate::metrics::auth_failure(reason);
        let delay = peer.map_or(Duration::ZERO, |ip| {
            self.inner.throttle.lock().failure(ip, Instant::now())
        });
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let slowed = if delay.is_zero() {
            String::new()
        } else {
            format!(" (answered after {delay:?}: repeated failures from this address)")
        };
        Decision::Deny(format!("{reason}: {detail}{slowed}"))
    }

    /// Decides for `hello` from `peer`.
    pub async fn check(&self, hello: &Hello, peer: Option<IpAddr>) -> Decision {
        let phy = &hello.phy;
        let Some(user) = hello.username.as_deref() else {
            let detail = "no username; registry authentication needs username = phyID and password = the device secret";
            return self.deny(peer, "missing_credentials", detail.into()).await;
        };
        if user != phy.as_str() {
            let detail = format!("username {user:?} is not the client id");
            return self.deny(peer, "username_mismatch", detail).await;
        }
        let Some(password) = hello.password.as_deref() else {
            let detail = "no password; registry authentication needs the device secret as password";
            return self.deny(peer, "missing_credentials", detail.into()).await;
        };
        let key = self.key(password);
        let cached = self.inner.cache.lock().lookup(phy, &key, Instant::now());
        match cached {
            Lookup::Fresh(Verdict::Valid) => {
                crate::metrics::auth_cache("hit");
                return Decision::Allow;
            }
            Lookup::Fresh(v) => {
                crate::metrics::auth_cache("hit");
                return self.deny(peer, v.reason(), "cached verdict".into()).await;
            }
            Lookup::Stale | Lookup::Miss => crate::metrics::auth_cache("miss"),
        }
        if self.database_degraded() {
            // Nobody waits for a database that is known not to answer.
            self.probe_in_background();
            return self.without_database(cached, "the database check is degraded".into());
        }
        let query = self.inner.store.check_credentials(phy, password);
        let error = match tokio::time::timeout(self.inner.query_timeout, query).await {
            Ok(Ok(credential)) => {
                let verdict = Verdict::from(credential);
                self.inner
                    .cache
                    .lock()
                    .record(phy, key, verdict, Instant::now());
                return match verdict {
                    Verdict::Valid => Decision::Allow,
                    v => {
                        self.deny(peer, v.reason(), "checked in the registry".into())
                            .await
                    }
                };
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {:?}", self.inner.query_timeout),
        };
        self.mark_degraded(&error);
        self.without_database(cached, error)
    }

    /// The answer while PostgreSQL cannot: a password that was valid
    /// before (the stale entry) connects; anything else is "server
    /// unavailable".
    fn without_database(&self, cached: Lookup, error: String) -> Decision {
        if cached == Lookup::Stale {
            crate::metrics::auth_cache("stale");
            tracing::debug!(error = %error, "the device registry does not answer; accepting the device on its earlier verified credentials");
            return Decision::Allow;
        }
        Decision::Unavailable(format!(
            "cannot check the device's credentials in the registry: {error}"
        ))
    }
}

impl Authenticator for RegistryAuth {
    fn authenticate<'a>(
        &'a self,
        hello: &'a Hello,
        peer: Option<IpAddr>,
    ) -> Pin<Box<dyn Future<Output = Decision> + Send + 'a>> {
        Box::pin(self.check(hello, peer))
    }

    fn name(&self) -> &'static str {
        "registry"
    }
}
