//! The sweeper: makes sure every command reaches a terminal state even when
//! nobody else will decide it — it expired in the queue, or the instance it
//! was dispatched to died (or never heard of it).
//!
//! Every non-terminal command has a deadline in `commands:deadline` (see
//! the [`crate::store`] module doc for how that holds through crashes and
//! dropped futures). Any number of sweepers may run: each leases due ids
//! (pushing their deadline a little into the future) so they do not all
//! work on the same ones, and state changes are compare-and-set, so a late
//! or double verdict is a no-op. A sweeper moves a deadline it leased only
//! if nobody set one since ([`CommandStore::reschedule`]).
//!
//! A command `queued` but in no queue is one whose drain never delivered
//! it: the instance that took it out of the queue died (or a Redis error
//! or timeout stopped it) before it was `sent`, or its submit stopped
//! before queueing it. The drain pushed its deadline before taking it, and
//! a connection holding it for long pushes it again while it lives, so
//! when the sweeper finds it due it is lost: the sweeper puts it back into
//! its device's queue, in creation order, and tells the device's owner (if
//! it is connected) to drain the queue. A command put back while a live
//! connection still holds it is not sent twice: that connection knows it
//! (it is held already), and a drain skips a command no longer `queued`.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use uuid::Uuid;

use crate::command::{Command, Status};
use crate::route;
use crate::store::{CREATE_GRACE, CommandStore, Transition};

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
    /// Queued but in no queue (its drain or its submit stopped half-way):
    /// put back into its device's queue.
    Requeued,
}

/// The reason logged when the sweeper puts a lost command back.
pub const REQUEUED: &str = "requeued";

/// Looks at every due command once; returns how many it handled.
pub async fn sweep_once(store: &CommandStore, now: i64) -> redis::RedisResult<usize> {
    let lease = now + crate::metrics::ms(LEASE);
    let ids = store.lease_due(now, BATCH, lease).await?;
    for id in &ids {
        let action = sweep_one(store, id, now, lease).await?;
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

/// How old a command id (UUID v7) is at `now`, in ms.
fn age_ms(id: &Uuid, now: i64) -> Option<i64> {
    let (secs, nanos) = id.get_timestamp()?.to_unix();
    let created = i64::try_from(secs).ok()? * 1000 + i64::from(nanos / 1_000_000);
    Some(now - created)
}

async fn sweep_one(
    store: &CommandStore,
    id: &Uuid,
    now: i64,
    lease: i64,
) -> redis::RedisResult<Action> {
    // Sets the next look unless someone else set a deadline since the lease.
    let later = |at: i64| store.reschedule(id, lease, at);
    let Some(cmd) = store.get(id).await? else {
        // Its submit writes the deadline first, the record a moment later.
        if age_ms(id, now).is_some_and(|age| age < crate::metrics::ms(CREATE_GRACE)) {
            later(now + 1000).await?;
            return Ok(Action::Rescheduled);
        }
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
            later(now + 1000).await?;
            Ok(Action::Rescheduled)
        }
        Status::Queued if !store.in_queue(&cmd.phy_id, id).await? => {
            requeue_lost(store, cmd, now, lease).await
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
            later(now + 1000).await?;
            Ok(Action::Rescheduled)
        }
        Status::Queued => {
            later(cmd.expires_at_ms).await?;
            Ok(Action::Rescheduled)
        }
        Status::Dispatched | Status::Sent if now >= stuck_at => {
            let after = route::forward(store, cmd, "owner_lost", None).await?;
            if !after.status.is_terminal() {
                let next = match after.status {
                    Status::Queued => store.settings().check_at(after.expires_at_ms, now),
                    _ => now + crate::metrics::ms(store.settings().stuck_after()),
                };
                later(next).await?;
            }
            Ok(Action::Rerouted)
        }
        _ => {
            later(stuck_at).await?;
            Ok(Action::Rescheduled)
        }
    }
}

/// A command `queued` in no queue at its deadline: put back into its
/// device's queue (see the module doc), unless someone set its deadline
/// since the lease (a drain took it just now) or it moved on.
async fn requeue_lost(
    store: &CommandStore,
    cmd: Command,
    now: i64,
    lease: i64,
) -> redis::RedisResult<Action> {
    let check = store.settings().check_at(cmd.expires_at_ms, now);
    // The deadline first, as everywhere: a drain may take it the moment
    // it is back. Not ours any more: whoever set it decides.
    if !store.reschedule(&cmd.id, lease, check).await? {
        return Ok(Action::Rescheduled);
    }
    let t = Transition::to(Status::Queued)
        .from(&[Status::Queued])
        .reason(REQUEUED);
    if store.transition(&cmd.id, &t, now).await?.is_none() {
        // Sent or decided meanwhile: the next look sees where it stands.
        return Ok(Action::Rescheduled);
    }
    store
        .restore(&cmd.phy_id, &cmd.id, cmd.expires_at_ms, now)
        .await?;
    tracing::info!(command_id = %cmd.id, phy_id = %cmd.phy_id,
        "queued command found in no queue (its drain or submit stopped half-way); put back");
    route::nudge(store, &cmd.phy_id).await?;
    Ok(Action::Requeued)
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
