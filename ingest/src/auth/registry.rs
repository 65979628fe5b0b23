//! Mode `registry`: the MQTT username is the phyID (equal to the client
//! id), the password is the device secret, checked against the PostgreSQL
//! device registry through the [`Cache`].
//!
//! - Fresh cache entry: answered without the database.
//! - Otherwise PostgreSQL is asked (bounded by `database.connect_timeout`);
//!   its verdict is cached.
//! - PostgreSQL fails: a device whose password was valid before (even long
//!   ago: the stale entry) connects; any other gets "server unavailable".
//! - Every refusal is counted by reason and slowed down per address
//!   ([`Throttle`]).

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use iot_core::PhyId;
use iot_store::Store;
use parking_lot::Mutex;
use tokio::time::Instant;

use super::cache::{Cache, Key, Lookup, Verdict};
use super::throttle::Throttle;
use super::{Authenticator, Decision};
use crate::protocol::Hello;

/// The registry authenticator; cheap to clone (shared state).
#[derive(Clone)]
pub struct RegistryAuth {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    ttl: Duration,
    query_timeout: Duration,
    /// Random per process: cache keys are hashes of salt + password.
    salt: [u8; 32],
    cache: Mutex<Cache>,
    throttle: Mutex<Throttle>,
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
    /// query may take `query_timeout`.
    pub fn new(store: Store, ttl: Duration, query_timeout: Duration) -> Self {
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
            }),
        }
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
        if cached == Lookup::Stale {
            crate::metrics::auth_cache("stale");
            tracing::info!(error = %error, "the device registry does not answer; accepting the device on its earlier verified credentials");
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
