//! Time-based changes: every `due_interval`, the devices whose state may
//! have changed with time alone (heartbeat expiry, end of a penalty window,
//! view expiry) are leased from the shard's due set, evaluated at `now`, and
//! their index updated and rescheduled. With several projectors each device
//! is evaluated by one of them (the lease); if that one dies the device comes
//! due again when the lease ends.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use iot_core::PhyId;
use iot_service::RedisPool;
use redis::RedisResult;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::metrics;
use crate::projection::{Applied, Projection};
use crate::script::parse_seen;

/// Devices leased per shard per round.
pub const DUE_LIMIT: usize = 512;

/// How long a lease lasts: a device whose evaluator died comes due again
/// after this.
pub const LEASE: Duration = Duration::from_secs(5);

/// Most rounds per tick when shards keep returning full leases.
const MAX_ROUNDS: usize = 20;

/// One round: leases the due devices of every shard at `now_ms` and
/// evaluates them. Returns what was applied and whether any shard had more.
pub async fn round<C: redis::aio::ConnectionLike>(
    conn: &mut C,
    projection: &Projection,
    now_ms: i64,
) -> RedisResult<(Applied, bool)> {
    let s = projection.settings();
    let lease_until = now_ms + i64::try_from(LEASE.as_millis()).unwrap_or(5000);
    let mut pipe = redis::pipe();
    for shard in s.shard_range() {
        pipe.add_command(
            projection
                .scripts()
                .due_claim(s, shard, now_ms, lease_until, DUE_LIMIT),
        );
    }
    let replies = projection.scripts().query(conn, &pipe).await?;
    let mut leased: BTreeMap<String, Option<i64>> = BTreeMap::new();
    let mut more = false;
    for reply in replies {
        let pairs = parse_seen(reply)?;
        more |= pairs.len() >= DUE_LIMIT;
        for (phy, seen) in pairs {
            leased.insert(phy, seen);
        }
    }
    let mut valid = Vec::with_capacity(leased.len());
    for (p, seen) in leased {
        match PhyId::new(p.as_str()) {
            Ok(id) => valid.push((id, seen)),
            Err(e) => {
                tracing::warn!(member = %p, error = %e, "invalid member in a due set; ignored")
            }
        }
    }
    let applied = projection.evaluate(conn, &valid, true, now_ms).await?;
    metrics::due_evaluations(applied.evaluated);
    Ok((applied, more))
}

/// Runs the due loop until shutdown.
pub async fn run(projection: Arc<Projection>, redis: RedisPool, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(projection.settings().due_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut backoff = Backoff::default();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut conn = redis.get();
        for _ in 0..MAX_ROUNDS {
            match round(&mut conn, &projection, iot_core::time::now_ms()).await {
                Ok((_, more)) => {
                    backoff.reset();
                    if !more {
                        break;
                    }
                }
                Err(e) => {
                    metrics::redis_error("due");
                    tracing::warn!(error = %e, "due evaluation failed; retrying");
                    if !backoff.wait(&shutdown).await {
                        return;
                    }
                    break;
                }
            }
        }
    }
}
