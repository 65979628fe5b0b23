//! The instance's control channel: a Redis Pub/Sub subscriber on
//! `downlink:{server_id}`.
//!
//! It carries `Control::Kick` (another instance accepted a newer CONNECT of
//! a device held here), `Control::Command` (a downlink command for a device
//! held here: posted to its connection if that connection is the one the
//! command was routed to or a newer one, otherwise forwarded after the
//! device) and `Control::DrainQueue` (commands wait in the device's queue:
//! its connection takes them if it listens). Handling never waits: Redis
//! work goes to the [`crate::reporter`]. The subscriber reconnects with
//! backoff when Redis goes away and checks its connection with a PING every
//! few seconds, since a silent channel cannot tell a dead connection from a
//! quiet one.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use iot_core::control::Control;
use iot_service::RedisPool;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::downlink::{Delivery, Mail};
use crate::registry::Registry;
use crate::reporter::{Report, ReporterHandle};

/// How often the subscriber checks its connection with a PING.
pub const PING_EVERY: Duration = Duration::from_secs(5);
const OP_TIMEOUT: Duration = Duration::from_secs(3);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Starts the subscriber. The receiver completes once the first
/// subscription is in place (so kicks sent after start-up are not missed).
pub fn spawn(
    redis: RedisPool,
    channel: String,
    registry: Arc<Registry>,
    reporter: ReporterHandle,
    shutdown: CancellationToken,
) -> (tokio::task::JoinHandle<()>, oneshot::Receiver<()>) {
    let (ready, subscribed) = oneshot::channel();
    let task = tokio::spawn(run(redis, channel, registry, reporter, shutdown, ready));
    (task, subscribed)
}

async fn run(
    redis: RedisPool,
    channel: String,
    registry: Arc<Registry>,
    reporter: ReporterHandle,
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
                            Some(msg) => handle(&registry, &reporter, msg.get_payload_bytes()),
                            None => break,
                        },
                        _ = ping.tick() => {
                            // Any answer will do: in subscribed mode (RESP2) PING answers
                            // `["pong", ""]`, not `PONG`.
                            let alive = tokio::time::timeout(OP_TIMEOUT, sink.ping::<redis::Value>()).await;
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

/// Handles one control message; never waits.
pub fn handle(registry: &Registry, reporter: &ReporterHandle, payload: &[u8]) {
    match Control::decode(payload) {
        Ok(Control::Kick { phy_id, epoch }) => {
            registry.kick(&phy_id, epoch);
        }
        Ok(Control::Command(d)) => {
            let (phy, epoch, id) = (d.phy_id.clone(), d.epoch, d.id);
            // The connection it was routed to, or a newer one of the device
            // (it reconnected here meanwhile).
            let posted = match registry.get(&phy).filter(|c| c.epoch() >= epoch) {
                Some(conn) => conn.post(Mail::Deliver(Delivery::dispatched(d))).is_ok(),
                None => false,
            };
            if !posted {
                tracing::debug!(phy_id = %phy, command_id = %id, epoch,
                    "command for a connection not held here; forwarding it after the device");
                let forward = Report::Forward {
                    id,
                    reason: "moved",
                };
                reporter.report(&phy, epoch, forward);
            }
        }
        Ok(Control::DrainQueue { phy_id }) => {
            if let Some(conn) = registry.get(&phy_id) {
                let _ = conn.post(Mail::Drain(None));
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, bytes = payload.len(), "undecodable control message ignored");
        }
    }
}
