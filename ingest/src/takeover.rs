//! The Redis side of a CONNECT: the device's epoch, its owner, and the kick
//! that closes an older connection on another instance.
//!
//! One Lua script per CONNECT (both keys share the device's hash slot
//! `{phyID}`): `INCR session:epoch:{phy}` (never expires, never goes back)
//! and `SET session:owner:{phy} "<server_id> <epoch>" PX <ttl>`, returning
//! the previous owner. If that was another instance, a `Control::Kick` goes
//! to its `downlink:{server_id}` channel.
//!
//! The owner key lives 2 x the heartbeat timeout; a sweep renews it for every
//! device still connected here, so a device connected for days can still be
//! taken over from another instance.

use std::sync::Arc;
use std::time::Duration;

use iot_core::control::Control;
use iot_core::{Keys, PhyId, ServerId};
use iot_service::RedisPool;
use redis::Script;
use tokio_util::sync::CancellationToken;

use crate::registry::Registry;

/// INCR the epoch, swap the owner, return `{epoch, previous owner or nil}`.
const CLAIM: &str = r"
local epoch = redis.call('INCR', KEYS[1])
local prev = redis.call('GET', KEYS[2])
redis.call('SET', KEYS[2], ARGV[1] .. ' ' .. epoch, 'PX', ARGV[2])
return {epoch, prev}
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
            .invoke_async(&mut conn)
            .await?;
        Ok(Claim {
            epoch,
            previous: previous.as_deref().and_then(Owner::parse),
        })
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
                let devices = registry.snapshot();
                if devices.is_empty() {
                    continue;
                }
                if let Err(e) = self.renew(&redis, &devices).await {
                    crate::metrics::redis_error("owner_renew");
                    tracing::warn!(error = %e, devices = devices.len(), "cannot renew device owner keys; retrying next round");
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
