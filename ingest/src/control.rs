//! The instance's control channel: a Redis Pub/Sub subscriber on
//! `downlink:{server_id}`.
//!
//! Today it carries `Control::Kick` (another instance accepted a newer
//! CONNECT of a device held here); downlink commands come later. The
//! subscriber reconnects with backoff when Redis goes away and checks its
//! connection with a PING every few seconds, since a silent channel cannot
//! tell a dead connection from a quiet one.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use iot_core::control::Control;
use iot_service::RedisPool;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::registry::Registry;

const PING_EVERY: Duration = Duration::from_secs(5);
const OP_TIMEOUT: Duration = Duration::from_secs(3);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Starts the subscriber. The receiver completes once the first
/// subscription is in place (so kicks sent after start-up are not missed).
pub fn spawn(
    redis: RedisPool,
    channel: String,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) -> (tokio::task::JoinHandle<()>, oneshot::Receiver<()>) {
    let (ready, subscribed) = oneshot::channel();
    let task = tokio::spawn(run(redis, channel, registry, shutdown, ready));
    (task, subscribed)
}

async fn run(
    redis: RedisPool,
    channel: String,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
    ready: oneshot::Sender<()>,
) {
    let mut ready = Some(ready);
    let mut backoff = BACKOFF_MIN;
    let mut failing = false;
    loop {
        let connect = async {
            let mut ps = redis.client().get_async_pubsub().await?;
            ps.subscribe(&channel).await?;
            redis::RedisResult::Ok(ps)
        };
        let attempt = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = tokio::time::timeout(OP_TIMEOUT, connect) => r,
        };
        match attempt {
            Ok(Ok(ps)) => {
                if let Some(r) = ready.take() {
                    let _ = r.send(());
                }
                if failing {
                    tracing::info!(%channel, "control channel subscribed again");
                }
                backoff = BACKOFF_MIN;
                let (mut sink, mut stream) = ps.split();
                let mut ping = tokio::time::interval(PING_EVERY);
                ping.tick().await;
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        msg = stream.next() => match msg {
                            Some(msg) => handle(&registry, msg.get_payload_bytes()),
                            None => break,
                        },
                        _ = ping.tick() => {
                            let alive = tokio::time::timeout(OP_TIMEOUT, sink.ping::<String>()).await;
                            if !matches!(alive, Ok(Ok(_))) {
                                break;
                            }
                        }
                    }
                }
                crate::metrics::redis_error("subscribe");
                tracing::warn!(%channel, "control channel connection lost; subscribing again");
                failing = true;
            }
            Ok(Err(e)) => {
                crate::metrics::redis_error("subscribe");
                if !failing {
                    tracing::warn!(%channel, error = %e, "cannot subscribe to the control channel; retrying");
                }
                failing = true;
            }
            Err(_) => {
                crate::metrics::redis_error("subscribe");
                if !failing {
                    tracing::warn!(%channel, "subscribing to the control channel timed out; retrying");
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

fn handle(registry: &Registry, payload: &[u8]) {
    match Control::decode(payload) {
        Ok(Control::Kick { phy_id, epoch }) => {
            registry.kick(&phy_id, epoch);
        }
        // Downlink commands (lead's note: handled with the downlink issue).
        Ok(other) => {
            tracing::debug!(message = ?other, "control message not handled by this build");
        }
        Err(e) => {
            tracing::warn!(error = %e, bytes = payload.len(), "undecodable control message ignored");
        }
    }
}
