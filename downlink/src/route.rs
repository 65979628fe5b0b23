//! Routing: find the instance that holds a device and hand it the command
//! over Redis Pub/Sub, or queue it, or fail it — every command ends
//! somewhere.

use iot_core::control::{Control, Dispatch};
use iot_core::registry::Owner;
use iot_core::view::field as view_field;
use iot_core::{PhyId, ServerId};
use uuid::Uuid;

use crate::command::{Command, FailReason, Status, field};
use crate::store::{CommandStore, NewCommand, Transition};

/// Where a device is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// Connected to this instance with this epoch (as far as Redis knows).
    Connected(Owner),
    /// Not connected anywhere alive.
    Offline,
}

/// Finds the device: the owner key written at CONNECT (fresher than the
/// projection), unless the projected view says that very connection has
/// ended, or the owner's liveness key has lapsed.
pub async fn locate(store: &CommandStore, phy: &PhyId) -> redis::RedisResult<Location> {
    let keys = store.keys();
    let (owner, epoch, ended): (Option<String>, Option<u64>, Option<String>) = redis::pipe()
        .cmd("GET")
        .arg(keys.owner(phy))
        .cmd("HGET")
        .arg(keys.device(phy))
        .arg(view_field::EPOCH)
        .cmd("HGET")
        .arg(keys.device(phy))
        .arg(view_field::ENDED)
        .query_async(&mut store.redis().get())
        .await?;
    let Some(owner) = owner.as_deref().and_then(Owner::parse) else {
        return Ok(Location::Offline);
    };
    if epoch == Some(owner.epoch) && ended.is_some_and(|e| !e.is_empty()) {
        return Ok(Location::Offline);
    }
    let alive: bool = redis::cmd("EXISTS")
        .arg(keys.liveness(&owner.server_id))
        .query_async(&mut store.redis().get())
        .await?;
    Ok(if alive {
        Location::Connected(owner)
    } else {
        Location::Offline
    })
}

/// Publishes a control message to an instance; returns how many
/// subscribers received it (0: nobody listens on that channel).
pub async fn publish(
    store: &CommandStore,
    server: &ServerId,
    msg: &Control,
) -> redis::RedisResult<u64> {
    redis::cmd("PUBLISH")
        .arg(store.keys().downlink_channel(server))
        .arg(msg.encode())
        .query_async(&mut store.redis().get())
        .await
}

fn dispatch_of(cmd: &Command, epoch: u64, hops: u8) -> Control {
    Control::Command(Dispatch {
        id: cmd.id,
        phy_id: cmd.phy_id.clone(),
        epoch,
        name: cmd.name.clone(),
        payload: cmd.payload.clone(),
        expires_at_ms: cmd.expires_at_ms,
        queue_if_offline: cmd.queue_if_offline,
        hops,
    })
}

/// Creates a command and routes it. Returns the record as it stands after
/// routing (dispatched, queued or failed).
///
/// The work runs in a task of its own: a caller that stops waiting (a
/// request deadline, a client that hung up) does not cut it short, so a
/// command is not left half-routed. Even so, every step is written so that
/// stopping between any two leaves nothing unwatched: the sweeper deadline
/// comes before the record, and the sweeper finishes what a submit left
/// undone (see the [`crate::store`] module doc).
///
/// An error before the record exists is returned (no command was made).
/// Once it exists the command is the caller's to follow: an error after
/// that (publishing, queueing) is logged and the record returned as it
/// stands; the sweeper completes its routing at its deadline.
pub async fn submit(store: &CommandStore, new: NewCommand) -> redis::RedisResult<Command> {
    let store = store.clone();
    match tokio::spawn(async move { submit_in_task(&store, new).await }).await {
        Ok(routed) => routed,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Err(redis::RedisError::from((
            redis::ErrorKind::Client,
            "the command submission was cancelled (the runtime is shutting down)",
        ))),
    }
}

/// [`submit`] in the caller's task. Dropping it half-way is safe too (the
/// sweeper finishes the routing of a command whose record was written), but
/// the command then waits for the sweeper: prefer [`submit`].
pub async fn submit_in_task(store: &CommandStore, new: NewCommand) -> redis::RedisResult<Command> {
    let now = iot_core::time::now_ms();
    let id = Uuid::now_v7();
    let expires_at_ms = store.expires_at(&new, now);
    match locate(store, &new.phy_id).await? {
        Location::Connected(owner) => {
            store
                .set_deadline(
                    &id,
                    now + crate::metrics::ms(store.settings().stuck_after()),
                )
                .await?;
            let cmd = store
                .create(
                    id,
                    &new,
                    Status::Dispatched,
                    None,
                    Some((owner.server_id.as_str(), owner.epoch)),
                    now,
                )
                .await?;
            let routed = async {
                let receivers =
                    publish(store, &owner.server_id, &dispatch_of(&cmd, owner.epoch, 0)).await?;
                if receivers > 0 {
                    return Ok(cmd.clone());
                }
                // Nobody listens on the owner's channel: it is gone.
                offline(store, cmd.clone(), now).await
            };
            Ok(settled(routed.await, cmd))
        }
        Location::Offline if new.queue_if_offline => {
            store
                .set_deadline(&id, store.settings().check_at(expires_at_ms, now))
                .await?;
            let cmd = store
                .create(id, &new, Status::Queued, None, None, now)
                .await?;
            Ok(settled(enqueue(store, cmd.clone(), now).await, cmd))
        }
        Location::Offline => {
            store
                .create(
                    id,
                    &new,
                    Status::Failed,
                    Some(FailReason::Offline.as_str()),
                    None,
                    now,
                )
                .await
        }
    }
}

/// The routing of a command that exists: its outcome, or on an error the
/// command as created (logged; the sweeper completes the routing at the
/// command's deadline).
fn settled(routed: redis::RedisResult<Command>, created: Command) -> Command {
    match routed {
        Ok(cmd) => cmd,
        Err(e) => {
            tracing::warn!(command_id = %created.id, phy_id = %created.phy_id, status = %created.status, error = %e,
                "command created but not routed; the sweeper will route it");
            created
        }
    }
}

/// Puts a (queued) command into its device's queue, or fails it when the
/// queue is full; then nudges the owner in case the device connected
/// meanwhile. Its sweeper deadline is set first (to check that it got
/// there, see [`crate::store::Settings::check_at`]).
async fn queue(store: &CommandStore, cmd: Command, now: i64) -> redis::RedisResult<Command> {
    store
        .set_deadline(&cmd.id, store.settings().check_at(cmd.expires_at_ms, now))
        .await?;
    enqueue(store, cmd, now).await
}

/// [`queue`] without the deadline (the caller has set it).
async fn enqueue(store: &CommandStore, mut cmd: Command, now: i64) -> redis::RedisResult<Command> {
    if !store
        .enqueue(&cmd.phy_id, &cmd.id, cmd.expires_at_ms, now)
        .await?
    {
        let t = Transition::to(Status::Failed).reason(FailReason::QueueFull.as_str());
        store.transition(&cmd.id, &t, now).await?;
        cmd.status = Status::Failed;
        cmd.reason = Some(FailReason::QueueFull.as_str().to_owned());
        return Ok(cmd);
    }
    nudge(store, &cmd.phy_id).await?;
    Ok(cmd)
}

/// Tells the device's owner, if it is connected, to drain its queue.
pub async fn nudge(store: &CommandStore, phy: &PhyId) -> redis::RedisResult<()> {
    if let Location::Connected(owner) = locate(store, phy).await? {
        publish(
            store,
            &owner.server_id,
            &Control::DrainQueue {
                phy_id: phy.clone(),
            },
        )
        .await?;
    }
    Ok(())
}

/// The device is not reachable where the command went: queue the command
/// (if it may wait and has not expired) or fail it. Only while the command
/// is still dispatched where `cmd` says (a concurrent forward wins).
pub async fn offline(
    store: &CommandStore,
    mut cmd: Command,
    now: i64,
) -> redis::RedisResult<Command> {
    let still_there = |t: Transition| {
        t.guard(field::SERVER_ID, cmd.server_id.clone().unwrap_or_default())
            .guard(
                field::EPOCH,
                cmd.epoch.map(|e| e.to_string()).unwrap_or_default(),
            )
    };
    if now >= cmd.expires_at_ms {
        let t = still_there(Transition::to(Status::Expired));
        if store.transition(&cmd.id, &t, now).await?.is_some() {
            cmd.status = Status::Expired;
        }
        return Ok(cmd);
    }
    if cmd.queue_if_offline {
        let t = still_there(Transition::to(Status::Queued).reason("offline"));
        if store.transition(&cmd.id, &t, now).await?.is_some() {
            cmd.status = Status::Queued;
            return queue(store, cmd, now).await;
        }
        return Ok(cmd);
    }
    let t = still_there(Transition::to(Status::Failed).reason(FailReason::Offline.as_str()));
    if store.transition(&cmd.id, &t, now).await?.is_some() {
        cmd.status = Status::Failed;
        cmd.reason = Some(FailReason::Offline.as_str().to_owned());
    }
    Ok(cmd)
}

/// Sends a command again to where the device is now: it moved (takeover),
/// its first owner vanished, or its owner never answered. `gone` is the
/// connection (instance, epoch) the caller knows does not hold the device
/// any more, if any: that connection, or an older one of the device on
/// that instance, is not a place to send it.
///
/// - The device is on another connection than the one the command was
///   dispatched to: the command follows it there, at most once per
///   command (the `hops` guard is checked in the state change itself, so
///   a reporter and the sweeper cannot both forward it).
/// - The device is still on that very connection and its instance lives
///   (a report or the Pub/Sub message was lost): the command is dispatched
///   there again; the connection takes it, or re-reports where it stands
///   if it holds it already. This is not a hop.
/// - Otherwise (nowhere, gone, or forwarded once already) it is queued or
///   fails (see [`offline`]).
pub async fn forward(
    store: &CommandStore,
    cmd: Command,
    reason: &str,
    gone: Option<(&ServerId, u64)>,
) -> redis::RedisResult<Command> {
    let now = iot_core::time::now_ms();
    let Location::Connected(owner) = locate(store, &cmd.phy_id).await? else {
        return offline(store, cmd, now).await;
    };
    if gone.is_some_and(|(s, e)| *s == owner.server_id && owner.epoch <= e) {
        return offline(store, cmd, now).await;
    }
    let same = Some(owner.server_id.as_str()) == cmd.server_id.as_deref()
        && Some(owner.epoch) == cmd.epoch;
    if !same && cmd.hops > 0 {
        return offline(store, cmd, now).await;
    }
    let mut t = Transition::to(Status::Dispatched)
        .detail(format!("{} epoch {}", owner.server_id, owner.epoch))
        .guard(field::SERVER_ID, cmd.server_id.clone().unwrap_or_default())
        .guard(
            field::EPOCH,
            cmd.epoch.map(|e| e.to_string()).unwrap_or_default(),
        );
    let hops = if same {
        t = t
            .from(&[Status::Dispatched, Status::Sent])
            .reason("redispatch");
        cmd.hops
    } else {
        t = t
            .from(&[Status::Dispatched, Status::Sent, Status::Queued])
            .reason(reason)
            .guard(field::HOPS, cmd.hops)
            .set(field::SERVER_ID, &owner.server_id)
            .set(field::EPOCH, owner.epoch)
            .set(field::HOPS, cmd.hops.saturating_add(1));
        cmd.hops.saturating_add(1)
    };
    if store.transition(&cmd.id, &t, now).await?.is_none() {
        // Decided or moved on meanwhile (another forward won).
        return Ok(cmd);
    }
    store
        .set_deadline(
            &cmd.id,
            now + crate::metrics::ms(store.settings().stuck_after()),
        )
        .await?;
    let receivers = publish(
        store,
        &owner.server_id,
        &dispatch_of(&cmd, owner.epoch, hops),
    )
    .await?;
    let moved = Command {
        status: Status::Dispatched,
        server_id: Some(owner.server_id.to_string()),
        epoch: Some(owner.epoch),
        hops,
        ..cmd
    };
    if receivers > 0 {
        return Ok(moved);
    }
    offline(store, moved, now).await
}

/// Puts the commands of a connection that went away back at the head of
/// their device's queue, in the given order (oldest first), so that they are
/// delivered first when the device is back. `items` are `(id, expires_at_ms)`;
/// each must be queued, or dispatched or sent to `by` (the connection that
/// reports, as in [`Transition::by`]): one already terminal (or moved on)
/// is left alone, one whose time-to-live has passed ends `expired`. Returns
/// the ids put back.
///
/// The queue cap is not applied: these commands were accepted before and
/// keep their place. Nobody is nudged: the caller knows whether the device
/// is connected again and to whom (see [`locate`]).
pub async fn requeue(
    store: &CommandStore,
    phy: &PhyId,
    items: &[(Uuid, i64)],
    reason: &str,
    by: Option<(&str, u64)>,
    now: i64,
) -> redis::RedisResult<Vec<Uuid>> {
    let mut back = Vec::with_capacity(items.len());
    for &(id, expires_at_ms) in items {
        if now >= expires_at_ms {
            let t = with_by(Transition::to(Status::Expired), by);
            store.transition(&id, &t, now).await?;
            continue;
        }
        let t = Transition::to(Status::Queued)
            .from(&[Status::Dispatched, Status::Sent, Status::Queued])
            .reason(reason);
        if store.transition(&id, &with_by(t, by), now).await?.is_some() {
            back.push((id, expires_at_ms));
        }
    }
    // Deadlines first: a drain may take them the moment they are back.
    for (id, expires_at_ms) in &back {
        store
            .set_deadline(id, store.settings().check_at(*expires_at_ms, now))
            .await?;
    }
    store.requeue_front(phy, &back, now).await?;
    Ok(back.into_iter().map(|(id, _)| id).collect())
}

fn with_by(t: Transition, by: Option<(&str, u64)>) -> Transition {
    match by {
        Some((server, epoch)) => t.by(server, epoch),
        None => t,
    }
}

/// Moves a command that reached its device's connection while the device
/// was not subscribed to its topic to the tail of the device's queue, to be
/// delivered after a matching SUBSCRIBE; a full queue fails it
/// (`queue_full`). `by` is the reporting connection (see
/// [`Transition::by`]). `decide_at` is when the sweeper looks at it: its
/// expiry for a command that may wait (the sweeper first checks, at
/// [`Settings::check_at`](crate::store::Settings::check_at), that it is in
/// the queue), the end of the subscription grace for one that may not (the
/// sweeper then fails it with `no_subscription` if it is still in the
/// queue). Returns the command's status afterwards,
/// or `None` when it was not dispatched, sent or queued any more (left
/// alone).
///
/// Like [`requeue`], nobody is nudged.
#[allow(clippy::too_many_arguments)]
pub async fn park(
    store: &CommandStore,
    phy: &PhyId,
    id: &Uuid,
    expires_at_ms: i64,
    decide_at: i64,
    reason: &str,
    by: Option<(&str, u64)>,
    now: i64,
) -> redis::RedisResult<Option<Status>> {
    if now >= expires_at_ms {
        let t = with_by(Transition::to(Status::Expired), by);
        let done = store.transition(id, &t, now).await?;
        return Ok(done.map(|_| Status::Expired));
    }
    let t = Transition::to(Status::Queued)
        .from(&[Status::Dispatched, Status::Sent, Status::Queued])
        .reason(reason);
    if store.transition(id, &with_by(t, by), now).await?.is_none() {
        return Ok(None);
    }
    // The deadline first: a drain may take it the moment it is queued.
    let check = store.settings().check_at(expires_at_ms, now);
    store.set_deadline(id, decide_at.min(check)).await?;
    if !store.enqueue(phy, id, expires_at_ms, now).await? {
        let t = Transition::to(Status::Failed).reason(FailReason::QueueFull.as_str());
        store.transition(id, &t, now).await?;
        return Ok(Some(Status::Failed));
    }
    Ok(Some(Status::Queued))
}
