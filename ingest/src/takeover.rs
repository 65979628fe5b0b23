//! The Redis side of a CONNECT: the device's epoch, its owner, and the kick
//! that closes an older connection on another instance.
//!
//! One Lua script per CONNECT (both keys share the device's hash slot
//! `{phyID}`): `INCR session:epoch:{phy}` (never expires) and `SET
//! session:owner:{phy} "<server_id> <epoch>" PX <ttl>`, returning the
//! previous owner. If that was another instance, a `Control::Kick` goes to
//! its `downlink:{server_id}` channel.
//!
//! The epoch never goes back, even when Redis loses the counter (a restart
//! without persistence, a failover that lost the last writes): the script
//! raises it to at least the current time in microseconds, so a connection
//! made after the loss still outranks every connection made before it (a
//! device would need more than one CONNECT per microsecond, sustained, for
//! its counter to run ahead of the clock; the instances' clocks must agree
//! better than the time between a device's reconnects). Epochs stay below
//! 2^53, exact in Lua and in JSON.
//!
//! The owner key lives 2 x the heartbeat timeout; a sweep renews it for every
//! device still connected here, so a device connected for days can still be
//! taken over from another instance. The same sweep adds the live
//! connections to the instance's connection set, which heals a set that lost
//! members (a reaping that raced a re-announcement, a Redis that lost data).
//!
//! When the shared state may have lost this instance's sessions (its
//! liveness key had lapsed, so a projector may have reaped them, or Redis
//! came back empty), every connection is re-claimed with a new epoch
//! ([`Takeover::reclaim`]) and announced again (see [`crate::rebind`]),
//! unless the device has meanwhile connected elsewhere.

use std::sync::Arc;
use std::time::Duration;

use iot_core::control::Control;
use iot_core::{Keys, PhyId, ServerId};
use iot_service::RedisPool;
use redis::Script;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::registry::Registry;

/// INCR the epoch (raised to at least ARGV[3], the time in µs), swap the
/// owner, return `{epoch, previous owner or nil}`.
const CLAIM: &str = r"
local epoch = redis.call('INCR', KEYS[1])
local floor = tonumber(ARGV[3])
if floor and epoch < floor then
  redis.call('SET', KEYS[1], ARGV[3])
  epoch = floor
end
local prev = redis.call('GET', KEYS[2])
redis.call('SET', KEYS[2], ARGV[1] .. ' ' .. string.format('%d', epoch), 'PX', ARGV[2])
return {epoch, prev}
";

/// Re-claims a device for the connection of epoch ARGV[2] on instance
/// ARGV[1]: unless the owner key names a newer connection (another instance,
/// or a higher epoch), takes a new epoch (floored at ARGV[4], µs) and makes
/// the connection the owner. Returns `{new epoch, owner before}`, or
/// `{0, owner}` when a newer connection holds the device.
const RECLAIM: &str = r"
local cur = redis.call('GET', KEYS[2])
if cur then
  local server, e = string.match(cur, '^(%S+) (%d+)$')
  if server and tonumber(e) > tonumber(ARGV[2]) then
    return {0, cur}
  end
end
local epoch = redis.call('INCR', KEYS[1])
local floor = tonumber(ARGV[4])
if floor and epoch < floor then
  redis.call('SET', KEYS[1], ARGV[4])
  epoch = floor
end
redis.call('SET', KEYS[2], ARGV[1] .. ' ' .. string.format('%d', epoch), 'PX', ARGV[3])
return {epoch, cur}
";

/// Renew the owner key only if it still names this connection.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// Devices renewed per pipeline.
const RENEW_CHUNK: usize = 500;

/// The instance that holds a device, as stored in its owner key (one
/// definition for every crate: `iot_core::registry::Owner`).
pub use iot_core::registry::Owner;

/// What re-claiming a device gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reclaim {
    /// The connection holds the device again, with this new epoch.
    Renewed(u64),
    /// A newer connection (here or on another instance) holds the device.
    Superseded(Option<Owner>),
}

/// What a CONNECT took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The new connection's epoch.
    pub epoch: u64,
    /// Who held the device before, if anyone (and the value was readable).
    pub previous: Option<Owner>,
}

/// The scripts and names for claiming devices.
#[derive(Debug, Clone)]
pub struct Takeover {
    keys: Keys,
    server_id: ServerId,
    owner_ttl: Duration,
    claim: Arc<Script>,
    reclaim: Arc<Script>,
    renew: Arc<Script>,
}

impl Takeover {
    /// For this instance; owner keys live `owner_ttl`.
    pub fn new(keys: Keys, server_id: ServerId, owner_ttl: Duration) -> Self {
        Self {
            keys,
            server_id,
            owner_ttl: owner_ttl.max(Duration::from_secs(1)),
            claim: Arc::new(Script::new(CLAIM)),
            reclaim: Arc::new(Script::new(RECLAIM)),
            renew: Arc::new(Script::new(RENEW)),
        }
    }

    fn ttl_ms(&self) -> u64 {
        u64::try_from(self.owner_ttl.as_millis()).unwrap_or(u64::MAX)
    }

    /// Takes the device's next epoch and makes this instance its owner.
    pub async fn claim(&self, redis: &RedisPool, phy: &PhyId) -> redis::RedisResult<Claim> {
        let mut conn = redis.get();
        let (epoch, previous): (u64, Option<String>) = self
            .claim
            .key(self.keys.epoch(phy))
            .key(self.keys.owner(phy))
            .arg(self.server_id.as_str())
            .arg(self.ttl_ms())
            .arg(iot_core::time::now_us())
            .invoke_async(&mut conn)
            .await?;
        Ok(Claim {
            epoch,
            previous: previous.as_deref().and_then(Owner::parse),
        })
    }

    /// Re-claims `devices` (phyID, the epoch of its connection here), in
    /// order: see [`Reclaim`].
    pub async fn reclaim(
        &self,
        redis: &RedisPool,
        devices: &[(PhyId, u64)],
    ) -> redis::RedisResult<Vec<Reclaim>> {
        let mut conn = redis.get();
        // Loaded once per call: a restarted Redis has forgotten it.
        let hash: String = self.reclaim.prepare_invoke().load_async(&mut conn).await?;
        let mut out = Vec::with_capacity(devices.len());
        for chunk in devices.chunks(RENEW_CHUNK) {
            let mut pipe = redis::pipe();
            let now = iot_core::time::now_us();
            for (phy, epoch) in chunk {
                pipe.cmd("EVALSHA")
                    .arg(&hash)
                    .arg(2)
                    .arg(self.keys.epoch(phy))
                    .arg(self.keys.owner(phy))
                    .arg(self.server_id.as_str())
                    .arg(*epoch)
                    .arg(self.ttl_ms())
                    .arg(now);
            }
            let replies: Vec<(u64, Option<String>)> = pipe.query_async(&mut conn).await?;
            out.extend(replies.into_iter().map(|(epoch, owner)| {
                if epoch == 0 {
                    Reclaim::Superseded(owner.as_deref().and_then(Owner::parse))
                } else {
                    Reclaim::Renewed(epoch)
                }
            }));
        }
        Ok(out)
    }

    /// Adds the connections `conns` to this instance's connection set
    /// (idempotent; the projector keeps the set, this heals lost members).
    pub async fn add_conns(&self, redis: &RedisPool, conns: &[Uuid]) -> redis::RedisResult<()> {
        let mut conn = redis.get();
        let key = self.keys.server_conns(&self.server_id);
        for chunk in conns.chunks(RENEW_CHUNK) {
            let ids: Vec<String> = chunk.iter().map(Uuid::to_string).collect();
            redis::cmd("SADD")
                .arg(&key)
                .arg(ids)
                .query_async::<()>(&mut conn)
                .await?;
        }
        Ok(())
    }

    /// Asks `owner` to close its connection of `phy` (older than `epoch`).
    pub async fn kick(
        &self,
        redis: &RedisPool,
        owner: &ServerId,
        phy: &PhyId,
        epoch: u64,
    ) -> redis::RedisResult<()> {
        let msg = Control::Kick {
            phy_id: phy.clone(),
            epoch,
        }
        .encode();
        let mut conn = redis.get();
        redis::cmd("PUBLISH")
            .arg(self.keys.downlink_channel(owner))
            .arg(msg)
            .query_async::<i64>(&mut conn)
            .await
            .map(|_| ())
    }

    /// Renews the owner keys of `devices` (phyID, epoch) that still name
    /// this instance and connection.
    pub async fn renew(
        &self,
        redis: &RedisPool,
        devices: &[(PhyId, u64)],
    ) -> redis::RedisResult<()> {
        let mut conn = redis.get();
        // Loaded once per sweep: a restarted Redis has forgotten it.
        let hash: String = self.renew.prepare_invoke().load_async(&mut conn).await?;
        for chunk in devices.chunks(RENEW_CHUNK) {
            let mut pipe = redis::pipe();
            for (phy, epoch) in chunk {
                pipe.cmd("EVALSHA")
                    .arg(&hash)
                    .arg(1)
                    .arg(self.keys.owner(phy))
                    .arg(
                        Owner {
                            server_id: self.server_id.clone(),
                            epoch: *epoch,
                        }
                        .format(),
                    )
                    .arg(self.ttl_ms())
                    .ignore();
            }
            pipe.query_async::<()>(&mut conn).await?;
        }
        Ok(())
    }

    /// Renews owner keys every third of their TTL until `shutdown`.
    pub fn spawn_renewer(
        self,
        redis: RedisPool,
        registry: Arc<Registry>,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(self.owner_ttl / 3);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let handles = registry.handles();
                if handles.is_empty() {
                    continue;
                }
                let devices: Vec<(PhyId, u64)> = handles
                    .iter()
                    .map(|(p, h)| (p.clone(), h.epoch()))
                    .collect();
                if let Err(e) = self.renew(&redis, &devices).await {
                    crate::metrics::redis_error("owner_renew");
                    tracing::warn!(error = %e, devices = devices.len(), "cannot renew device owner keys; retrying next round");
                }
                let conns: Vec<Uuid> = handles.iter().map(|(_, h)| h.conn_id).collect();
                if let Err(e) = self.add_conns(&redis, &conns).await {
                    crate::metrics::redis_error("conn_set");
                    tracing::warn!(error = %e, "cannot refresh the instance's connection set; retrying next round");
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_values_round_trip() {
        let s = ServerId::new("iot-server-h-1").expect("valid");
        let owner = Owner {
            server_id: s.clone(),
            epoch: 42,
        };
        let v = owner.format();
        assert_eq!(v, "iot-server-h-1 42");
        assert_eq!(Owner::parse(&v), Some(owner));
        for bad in ["", "x", "x y", "bad id 3", " 3"] {
            assert_eq!(Owner::parse(bad), None, "{bad}");
        }
    }
}
