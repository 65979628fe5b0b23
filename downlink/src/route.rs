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
pub async fn submit(store: &CommandStore, new: NewCommand) -> redis::RedisResult<Command> {
    let now = iot_core::time::now_ms();
    let id = Uuid::now_v7();
    match locate(store, &new.phy_id).await? {
        Location::Connected(owner) => {
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
            store
                .set_deadline(
                    &id,
                    now + crate::metrics::ms(store.settings().stuck_after()),
                )
                .await?;
            let receivers =
                publish(store, &owner.server_id, &dispatch_of(&cmd, owner.epoch, 0)).await?;
            if receivers > 0 {
                return Ok(cmd);
            }
            // Nobody listens on the owner's channel: it is gone.
            offline(store, cmd, now).await
        }
        Location::Offline => {
            if new.queue_if_offline {
                let cmd = store
                    .create(id, &new, Status::Queued, None, None, now)
                    .await?;
                queue(store, cmd, now).await
            } else {
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
}

/// Puts a (queued) command into its device's queue, or fails it when the
/// queue is full; then nudges the owner in case the device connected
/// meanwhile.
async fn queue(store: &CommandStore, mut cmd: Command, now: i64) -> redis::RedisResult<Command> {
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
    store.set_deadline(&cmd.id, cmd.expires_at_ms).await?;
    if let Location::Connected(owner) = locate(store, &cmd.phy_id).await? {
        publish(
            store,
            &owner.server_id,
            &Control::DrainQueue {
                phy_id: cmd.phy_id.clone(),
            },
        )
        .await?;
    }
    Ok(cmd)
}

/// The device is not reachable where the command went: queue the command
/// (if it may wait and has not expired) or fail it.
pub async fn offline(
    store: &CommandStore,
    mut cmd: Command,
    now: i64,
) -> redis::RedisResult<Command> {
    if now >= cmd.expires_at_ms {
        store
            .transition(&cmd.id, &Transition::to(Status::Expired), now)
            .await?;
        cmd.status = Status::Expired;
        return Ok(cmd);
    }
    if cmd.queue_if_offline {
        let t = Transition::to(Status::Queued).reason("offline");
        if store.transition(&cmd.id, &t, now).await?.is_some() {
            cmd.status = Status::Queued;
            return queue(store, cmd, now).await;
        }
        return Ok(cmd);
    }
    let t = Transition::to(Status::Failed).reason(FailReason::Offline.as_str());
    store.transition(&cmd.id, &t, now).await?;
    cmd.status = Status::Failed;
    cmd.reason = Some(FailReason::Offline.as_str().to_owned());
    Ok(cmd)
}

/// Sends a command once more to where the device is now (it moved, or its
/// first owner vanished). At most one forward per command; after that, or
/// when the device is nowhere, the command is queued or fails.
pub async fn forward(
    store: &CommandStore,
    cmd: Command,
    reason: &str,
) -> redis::RedisResult<Command> {
    let now = iot_core::time::now_ms();
    if cmd.hops == 0
        && let Location::Connected(owner) = locate(store, &cmd.phy_id).await?
        && (Some(owner.server_id.as_str()) != cmd.server_id.as_deref()
            || Some(owner.epoch) != cmd.epoch)
    {
        let t = Transition::to(Status::Dispatched)
            .from(&[Status::Dispatched, Status::Sent, Status::Queued])
            .reason(reason)
            .detail(format!("{} epoch {}", owner.server_id, owner.epoch))
            .set(field::SERVER_ID, &owner.server_id)
            .set(field::EPOCH, owner.epoch)
            .set(field::HOPS, 1);
        if store.transition(&cmd.id, &t, now).await?.is_none() {
            return Ok(cmd);
        }
        store
            .set_deadline(
                &cmd.id,
                now + crate::metrics::ms(store.settings().stuck_after()),
            )
            .await?;
        let receivers =
            publish(store, &owner.server_id, &dispatch_of(&cmd, owner.epoch, 1)).await?;
        if receivers > 0 {
            return Ok(Command {
                status: Status::Dispatched,
                server_id: Some(owner.server_id.to_string()),
                epoch: Some(owner.epoch),
                hops: 1,
                ..cmd
            });
        }
    }
    offline(store, cmd, now).await
}
