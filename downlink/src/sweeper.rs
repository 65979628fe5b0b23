//! The sweeper: makes sure every command reaches a terminal state even when
//! nobody else will decide it — it expired in the queue, or the instance it
//! was dispatched to died (or never heard of it).
//!
//! Every non-terminal command has a deadline in `commands:deadline`. Any
//! number of sweepers may run: each leases due ids (pushing their deadline
//! a little into the future) so they do not all work on the same ones, and
//! state changes are compare-and-set, so a late or double verdict is a
//! no-op.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::command::Status;
use crate::route;
use crate::store::{CommandStore, Transition};

/// Ids handled per round.
const BATCH: usize = 200;
/// How long a lease keeps other sweepers off an id.
const LEASE: Duration = Duration::from_secs(10);

/// What the sweeper did with one command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing to do any more (terminal, or its record is gone).
    Forgot,
    /// Expired (in the queue, or before it was sent).
    Expired,
    /// Still waiting; looked at again later.
    Rescheduled,
    /// Stuck where it was dispatched: forwarded, dispatched again, queued
    /// or failed.
    Rerouted,
    /// Parked for a device that did not subscribe within its grace:
    /// failed (`no_subscription`).
    Failed,
}

/// Looks at every due command once; returns how many it handled.
pub async fn sweep_once(store: &CommandStore, now: i64) -> redis::RedisResult<usize> {
    let ids = store
        .lease_due(now, BATCH, now + crate::metrics::ms(LEASE))
        .await?;
    for id in &ids {
        let action = sweep_one(store, id, now).await?;
        metrics::counter!("iot_downlink_sweeps_total", "action" => format!("{action:?}").to_lowercase())
            .increment(1);
    }
    let pending: u64 = redis::cmd("ZCARD")
        .arg(store.keys().command_deadlines())
        .query_async(&mut store.redis().get())
        .await?;
    metrics::gauge!("iot_downlink_deadlines").set(pending as f64);
    crate::metrics::open(&store.open_counts().await?);
    Ok(ids.len())
}

async fn sweep_one(store: &CommandStore, id: &uuid::Uuid, now: i64) -> redis::RedisResult<Action> {
    let Some(cmd) = store.get(id).await? else {
        store.clear_deadline(id).await?;
        return Ok(Action::Forgot);
    };
    if cmd.status.is_terminal() {
        store.clear_deadline(id).await?;
        return Ok(Action::Forgot);
    }
    let stuck_at = cmd.updated_at_ms + crate::metrics::ms(store.settings().stuck_after());
    match cmd.status {
        Status::Queued | Status::Dispatched if now >= cmd.expires_at_ms => {
            let t = Transition::to(Status::Expired).from(&[Status::Queued, Status::Dispatched]);
            if store.transition(id, &t, now).await?.is_some() {
                store.dequeue(&cmd.phy_id, id).await?;
                return Ok(Action::Expired);
            }
            // It moved on meanwhile; look again soon.
            store.set_deadline(id, now + 1000).await?;
            Ok(Action::Rescheduled)
        }
        // Parked for a device that had not subscribed yet although the
        // command may not wait (see `route::park`): its grace is over.
        Status::Queued if !cmd.queue_if_offline => {
            if store.dequeue(&cmd.phy_id, id).await? {
                let t = Transition::to(Status::Failed)
                    .from(&[Status::Queued])
                    .reason(crate::FailReason::NoSubscription.as_str());
                if store.transition(id, &t, now).await?.is_some() {
                    return Ok(Action::Failed);
                }
            }
            // A drain took it meanwhile: it is being delivered.
            store.set_deadline(id, now + 1000).await?;
            Ok(Action::Rescheduled)
        }
        Status::Queued => {
            store.set_deadline(id, cmd.expires_at_ms).await?;
            Ok(Action::Rescheduled)
        }
        Status::Dispatched | Status::Sent if now >= stuck_at => {
            let after = route::forward(store, cmd, "owner_lost", None).await?;
            if !after.status.is_terminal() {
                let next = match after.status {
                    Status::Queued => after.expires_at_ms,
                    _ => now + crate::metrics::ms(store.settings().stuck_after()),
                };
                store.set_deadline(id, next).await?;
            }
            Ok(Action::Rerouted)
        }
        _ => {
            store.set_deadline(id, stuck_at).await?;
            Ok(Action::Rescheduled)
        }
    }
}

/// Runs [`sweep_once`] every `interval` until `shutdown`. Redis errors are
/// logged and retried on the next round.
pub async fn run(store: CommandStore, interval: Duration, shutdown: CancellationToken) {
    crate::metrics::describe();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        loop {
            match sweep_once(&store, iot_core::time::now_ms()).await {
                // A full batch: more may be due right now.
                Ok(n) if n == BATCH && !shutdown.is_cancelled() => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "command sweep failed; retrying next round");
                    break;
                }
            }
        }
    }
}
