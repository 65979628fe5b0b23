//! Revocation: every cache TTL, the devices connected here are checked
//! against the registry in batches; those disabled or deleted since they
//! connected are forgotten by the cache and closed with
//! `tcp_down(revoked)`. While PostgreSQL cannot answer, nothing is closed
//! (a database outage does not disconnect devices).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use iot_core::{PhyId, TcpDownReason};
use iot_store::StoreError;
use tokio_util::sync::CancellationToken;

use super::RegistryAuth;
use crate::registry::Registry;

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

/// Runs [`recheck`] every `every` until `shutdown`.
pub fn spawn(
    auth: RegistryAuth,
    registry: Arc<Registry>,
    every: Duration,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut failing = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
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
    })
}
