//! Revocation: devices disabled or deleted in the registry lose their
//! cached verdicts and their connection here (`tcp_down(revoked)`), by two
//! ways:
//!
//! - at once: the api publishes a [`Revocation`] on the Pub/Sub channel
//!   [`Keys::auth_revocations`](iot_core::Keys::auth_revocations) after
//!   each disable or delete, and every ingest in mode `registry` listens
//!   ([`Feed`]);
//! - every cache TTL, as a fallback for messages missed while the
//!   subscription was down (and right after it is back): the devices
//!   connected here are checked against the registry in batches. While
//!   PostgreSQL cannot answer, nothing is closed (a database outage does
//!   not disconnect devices).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use iot_core::control::Revocation;
use iot_core::{PhyId, TcpDownReason};
use iot_store::StoreError;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::RegistryAuth;
use crate::registry::Registry;

/// How often the subscriber checks its connection with a PING.
const PING_EVERY: Duration = Duration::from_secs(5);
const OP_TIMEOUT: Duration = Duration::from_secs(3);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The channel revocations arrive on.
#[derive(Debug, Clone)]
pub struct Feed {
    /// For the Pub/Sub connection.
    pub client: redis::Client,
    /// [`iot_core::Keys::auth_revocations`].
    pub channel: String,
}

/// Devices asked about per query.
pub const BATCH: usize = 500;

/// Why a re-check stopped.
#[derive(Debug, thiserror::Error)]
pub enum RecheckError {
    /// The query failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The query did not answer in time.
    #[error("the registry did not answer within {0:?}")]
    Timeout(Duration),
}

/// Checks every device connected here once; returns how many were closed.
pub async fn recheck(auth: &RegistryAuth, registry: &Registry) -> Result<usize, RecheckError> {
    auth.prune();
    let devices = registry.snapshot();
    let mut closed = 0;
    for chunk in devices.chunks(BATCH) {
        let phys: Vec<PhyId> = chunk.iter().map(|(p, _)| p.clone()).collect();
        let query = auth.store().enabled_devices(&phys);
        let enabled: HashSet<String> = match tokio::time::timeout(auth.query_timeout(), query).await
        {
            Ok(r) => r?,
            Err(_) => return Err(RecheckError::Timeout(auth.query_timeout())),
        };
        for (phy, epoch) in chunk {
            if enabled.contains(phy.as_str()) {
                continue;
            }
            auth.forget(phy);
            if registry.close_device(phy, *epoch, TcpDownReason::Revoked) {
                closed += 1;
                crate::metrics::auth_revoked();
                tracing::info!(phy_id = %phy, epoch, "device disabled or deleted in the registry; closing its connection");
            }
        }
    }
    Ok(closed)
}

/// Applies one revocation message: forgets the device's verdicts and
/// closes its connection here, if any. Returns whether one was closed.
pub fn apply(auth: &RegistryAuth, registry: &Registry, payload: &[u8]) -> bool {
    let r = match Revocation::decode(payload) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, bytes = payload.len(), "undecodable revocation ignored");
            return false;
        }
    };
    auth.forget(&r.phy_id);
    let Some(conn) = registry.get(&r.phy_id) else {
        return false;
    };
    let closed = registry.close_device(&r.phy_id, conn.epoch(), TcpDownReason::Revoked);
    if closed {
        crate::metrics::auth_revoked();
        tracing::info!(phy_id = %r.phy_id, epoch = conn.epoch(), why = %r.why,
            "device revoked in the registry; closing its connection");
    }
    closed
}

/// Listens on `feed` until `shutdown`, reconnecting with backoff; after a
/// lost subscription it asks for a re-check (`resync`), since messages
/// published meanwhile are gone.
async fn listen(
    feed: Feed,
    auth: RegistryAuth,
    registry: Arc<Registry>,
    resync: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut backoff = BACKOFF_MIN;
    let mut failing = false;
    loop {
        let connect = async {
            let mut ps = feed.client.get_async_pubsub().await?;
            ps.subscribe(&feed.channel).await?;
            redis::RedisResult::Ok(ps)
        };
        let attempt = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = tokio::time::timeout(OP_TIMEOUT, connect) => r,
        };
        match attempt {
            Ok(Ok(ps)) => {
                if failing {
                    tracing::info!(channel = %feed.channel, "revocation channel subscribed again");
                    resync.notify_one();
                }
                backoff = BACKOFF_MIN;
                let (mut sink, mut stream) = ps.split();
                let mut ping = tokio::time::interval(PING_EVERY);
                ping.tick().await;
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        msg = stream.next() => match msg {
                            Some(msg) => {
                                apply(&auth, &registry, msg.get_payload_bytes());
                            }
                            None => break,
                        },
                        _ = ping.tick() => {
                            let alive = tokio::time::timeout(OP_TIMEOUT, sink.ping::<redis::Value>()).await;
                            if !matches!(alive, Ok(Ok(_))) {
                                break;
                            }
                        }
                    }
                }
                tracing::warn!(channel = %feed.channel, "revocation channel connection lost; subscribing again");
                failing = true;
            }
            Ok(Err(e)) => {
                if !failing {
                    tracing::warn!(channel = %feed.channel, error = %e, "cannot subscribe to the revocation channel; retrying");
                }
                failing = true;
            }
            Err(_) => {
                if !failing {
                    tracing::warn!(channel = %feed.channel, "subscribing to the revocation channel timed out; retrying");
                }
                failing = true;
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Listens for revocations (if `auth` has a [`Feed`]) and runs [`recheck`]
/// every `every` (and after the subscription was lost), until `shutdown`.
pub fn spawn(
    auth: RegistryAuth,
    registry: Arc<Registry>,
    every: Duration,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let resync = Arc::new(Notify::new());
        let listener = {
            let (auth, registry, resync, shutdown) = (
                auth.clone(),
                registry.clone(),
                resync.clone(),
                shutdown.clone(),
            );
            async move {
                if let Some(feed) = auth.feed().cloned() {
                    listen(feed, auth, registry, resync, shutdown).await;
                }
            }
        };
        tokio::join!(
            listener,
            recheck_loop(auth, registry, every, resync, shutdown)
        );
    })
}

async fn recheck_loop(
    auth: RegistryAuth,
    registry: Arc<Registry>,
    every: Duration,
    resync: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut failing = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
            () = resync.notified() => {}
        }
        match recheck(&auth, &registry).await {
            Ok(_) => {
                if failing {
                    tracing::info!("connected devices are checked against the registry again");
                    failing = false;
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "cannot check connected devices against the registry; they stay connected until it answers");
                    failing = true;
                }
            }
        }
    }
}
