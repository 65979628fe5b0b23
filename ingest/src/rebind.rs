//! Re-announcing this instance's sessions when the shared state may have
//! lost them.
//!
//! The liveness beat ([`crate::liveness`]) finds out: when the instance's
//! liveness key is gone although it beat before, either the key lapsed (the
//! instance could not reach Redis for longer than `session.liveness_ttl`,
//! so a projector may have reaped its sessions as `tcp_down(server_lost)`),
//! or Redis lost its data (a restart without persistence). Either way the
//! views may say that devices connected here are gone, and nothing the
//! connections send afterwards would bind them again: a reaped epoch has
//! ended for good.
//!
//! So every connection still open here is re-claimed with a new epoch
//! ([`Takeover::reclaim`](crate::takeover::Takeover::reclaim)) and its
//! connection task writes a fresh `connected` event with it; the merge
//! rebinds the device to this instance and the api shows it online again.
//! A device that has meanwhile connected elsewhere (the owner key names a
//! newer connection) is not taken back: its connection here is closed as a
//! takeover, which is what the missed kick would have done.

use std::sync::Arc;
use std::time::Duration;

use iot_core::{PhyId, TcpDownReason};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::instance::Instance;
use crate::takeover::Reclaim;

/// What one re-announcement did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Rebound {
    /// Connections given a new epoch and announced again.
    pub renewed: usize,
    /// Connections closed because a newer one holds their device.
    pub superseded: usize,
}

/// Re-claims and re-announces every connection of this instance.
pub async fn rebind_all(inst: &Instance) -> redis::RedisResult<Rebound> {
    let handles = inst.registry.handles();
    let devices: Vec<(PhyId, u64)> = handles
        .iter()
        .map(|(p, h)| (p.clone(), h.epoch()))
        .collect();
    let verdicts = inst.takeover.reclaim(&inst.redis, &devices).await?;
    let mut done = Rebound::default();
    let mut conns: Vec<Uuid> = Vec::with_capacity(handles.len());
    for ((phy, handle), verdict) in handles.iter().zip(verdicts) {
        match verdict {
            Reclaim::Renewed(epoch) => {
                handle.announce(epoch);
                conns.push(handle.conn_id);
                done.renewed += 1;
            }
            Reclaim::Superseded(owner) => {
                if handle.close(TcpDownReason::Takeover) {
                    crate::metrics::takeover("rebind");
                    tracing::info!(
                        phy_id = %phy,
                        conn_id = %handle.conn_id,
                        epoch = handle.epoch(),
                        owner = ?owner.map(|o| o.format()),
                        "device connected elsewhere while this instance was cut off; closing its connection here"
                    );
                }
                done.superseded += 1;
            }
        }
    }
    inst.takeover.add_conns(&inst.redis, &conns).await?;
    Ok(done)
}

/// Runs [`rebind_all`] each time `lapsed` is notified, retrying a failed
/// run every second, until `shutdown`.
pub fn spawn(
    inst: Arc<Instance>,
    lapsed: Arc<Notify>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = lapsed.notified() => {}
            }
            loop {
                let run =
                    tokio::time::timeout(inst.redis_timeout.saturating_mul(4), rebind_all(&inst));
                let failed = match run.await {
                    Ok(Ok(done)) => {
                        crate::metrics::rebound(done.renewed, done.superseded);
                        tracing::warn!(
                            renewed = done.renewed,
                            superseded = done.superseded,
                            "re-announced this instance's sessions with new epochs"
                        );
                        false
                    }
                    Ok(Err(e)) => {
                        crate::metrics::redis_error("rebind");
                        tracing::warn!(error = %e, "cannot re-announce the sessions; retrying");
                        true
                    }
                    Err(_) => {
                        crate::metrics::redis_error("rebind");
                        tracing::warn!("re-announcing the sessions timed out; retrying");
                        true
                    }
                };
                if !failed {
                    break;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    })
}
