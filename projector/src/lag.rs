//! The consumer group's lag, published every `lag_interval` to
//! `projector:lag` (read by the API) and to the lag gauges.
//!
//! - `pending`: entries delivered to a projector and not yet acknowledged,
//!   summed over the shards (XINFO GROUPS `pending`).
//! - `undelivered`: entries not yet delivered to any projector (XINFO
//!   GROUPS `lag`, Redis 7; counted as 0 where Redis cannot tell, which
//!   happens after entries were deleted from the middle of a stream).
//! - `oldest_age_ms`: age of the oldest entry not yet applied, pending or
//!   undelivered, from the milliseconds part of its id; 0 when caught up.
//! - `added_per_sec`: stream entries appended per second over the last
//!   interval (XINFO STREAM `entries-added`, summed). An entry may hold a
//!   batch of heartbeats, so this counts entries, not events.
//! - `applied_per_sec`: stream entries acknowledged per second by the whole
//!   group over the last interval (`entries-read` minus `pending`, summed).
//!   0 for the first interval of a projector.
//! - `events_applied_per_sec`: events (each heartbeat of a batch counts)
//!   applied per second by the whole group over the last interval. Every
//!   projector adds the events it applied since its previous round to the
//!   record's `events_applied` counter (HINCRBY) before it measures, so the
//!   figure trails by up to one interval. 0 for the first interval.
//! - `consumers`: consumers in the group (largest over the shards).
//!
//! Every `claim_idle` the publisher also deletes the group's consumers that
//! have nothing pending and have been idle longer than
//! [`consumer_idle_bound`] (10 x `claim_idle`): the consumer name defaults
//! to the server id, a new one at each start, so without this every
//! restart would leave a consumer behind for good. The check and the
//! `XGROUP DELCONSUMER` run in one script, so a consumer that has just been
//! delivered entries is never deleted (that would drop its pending
//! entries); one deleted while still alive is created again by its next
//! read.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use iot_core::keys::PROJECTOR_GROUP;
use iot_core::registry::{Lag, lag_field};
use iot_service::RedisPool;
use redis::aio::ConnectionLike;
use redis::{RedisResult, Script, Value};
use tokio_util::sync::CancellationToken;

use crate::metrics;
use crate::settings::Settings;
use crate::stream::id_ms;

/// Counters kept between two measurements, for the rates.
#[derive(Debug, Default, Clone, Copy)]
pub struct Totals {
    at_ms: i64,
    added: u64,
    acked: u64,
    events: u64,
}

/// Events applied in this process and not yet added to the lag record.
static EVENTS_APPLIED: AtomicU64 = AtomicU64::new(0);

/// Counts `n` events applied (by [`crate::metrics::events_applied`]); the
/// lag publisher adds them to the group's total.
pub fn count_events_applied(n: u64) {
    EVENTS_APPLIED.fetch_add(n, Ordering::Relaxed);
}

/// Takes the events counted since the last call.
fn take_events_applied() -> u64 {
    EVENTS_APPLIED.swap(0, Ordering::Relaxed)
}

/// Adds `n` events applied to the group's total in the lag record.
pub async fn add_events_applied<C: ConnectionLike>(
    conn: &mut C,
    settings: &Settings,
    n: u64,
) -> RedisResult<()> {
    if n == 0 {
        return Ok(());
    }
    redis::cmd("HINCRBY")
        .arg(settings.keys.projector_lag())
        .arg(lag_field::EVENTS_APPLIED)
        .arg(n)
        .query_async::<()>(conn)
        .await
}

fn fields(v: Value) -> HashMap<String, Value> {
    let flat: Vec<Value> = match v {
        Value::Map(m) => m.into_iter().flat_map(|(k, v)| [k, v]).collect(),
        Value::Array(a) => a,
        _ => Vec::new(),
    };
    let mut out = HashMap::new();
    let mut it = flat.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        if let Ok(k) = redis::from_redis_value::<String>(k) {
            out.insert(k, v);
        }
    }
    out
}

fn int(v: Option<&Value>) -> Option<u64> {
    match v {
        Some(Value::Int(i)) => u64::try_from(*i).ok(),
        Some(Value::BulkString(b)) => std::str::from_utf8(b).ok()?.parse().ok(),
        _ => None,
    }
}

fn text(v: Option<&Value>) -> Option<String> {
    v.cloned()
        .and_then(|v| redis::from_redis_value::<Option<String>>(v).ok().flatten())
}

/// Per-shard facts.
#[derive(Debug, Default)]
struct ShardLag {
    pending: u64,
    undelivered: u64,
    entries_read: u64,
    consumers: u64,
    last_delivered: Option<String>,
    oldest_pending: Option<String>,
    added: u64,
}

/// Measures the lag at `now_ms`; `prev` holds the counters of the previous
/// measurement and is updated.
pub async fn measure<C: ConnectionLike>(
    conn: &mut C,
    settings: &Settings,
    prev: &mut Option<Totals>,
    now_ms: i64,
) -> RedisResult<Lag> {
    let k = &settings.keys;
    let mut pipe = redis::pipe();
    pipe.cmd("HGET")
        .arg(k.projector_lag())
        .arg(lag_field::EVENTS_APPLIED);
    for shard in settings.shard_range() {
        let key = k.events(shard);
        pipe.cmd("XINFO").arg("GROUPS").arg(&key);
        pipe.cmd("XPENDING").arg(&key).arg(PROJECTOR_GROUP);
        pipe.cmd("XINFO").arg("STREAM").arg(&key);
    }
    let replies: Vec<Value> = pipe.ignore_errors().query_async(conn).await?;
    let (events, replies) = replies.split_first().map_or((0, &[][..]), |(first, rest)| {
        (int(Some(first)).unwrap_or(0), rest)
    });
    let mut shards = Vec::new();
    for chunk in replies.chunks(3) {
        let mut sl = ShardLag::default();
        if let Some(Value::Array(groups)) = chunk.first() {
            for g in groups {
                let f = fields(g.clone());
                if text(f.get("name")).as_deref() == Some(PROJECTOR_GROUP) {
                    sl.pending = int(f.get("pending")).unwrap_or(0);
                    sl.undelivered = int(f.get("lag")).unwrap_or(0);
                    sl.entries_read = int(f.get("entries-read")).unwrap_or(0);
                    sl.consumers = int(f.get("consumers")).unwrap_or(0);
                    sl.last_delivered = text(f.get("last-delivered-id"));
                }
            }
        }
        if let Some(Value::Array(summary)) = chunk.get(1) {
            sl.oldest_pending = text(summary.get(1));
        }
        if let Some(v) = chunk.get(2) {
            sl.added = int(fields(v.clone()).get("entries-added")).unwrap_or(0);
        }
        shards.push(sl);
    }
    // The first undelivered entry of each shard that has any.
    let mut pipe = redis::pipe();
    let mut asked = 0;
    for (shard, sl) in settings.shard_range().zip(&shards) {
        if sl.undelivered > 0 {
            let from = sl
                .last_delivered
                .as_deref()
                .map_or_else(|| "-".to_owned(), |id| format!("({id}"));
            pipe.cmd("XRANGE")
                .arg(k.events(shard))
                .arg(from)
                .arg("+")
                .arg("COUNT")
                .arg(1);
            asked += 1;
        }
    }
    let mut oldest: Option<i64> = shards
        .iter()
        .filter(|s| s.pending > 0)
        .filter_map(|s| s.oldest_pending.as_deref().map(id_ms))
        .min();
    if asked > 0 {
        let firsts: Vec<Value> = pipe.query_async(conn).await?;
        for v in firsts {
            for e in crate::stream::parse_entries(0, v) {
                let ms = e.id_ms();
                oldest = Some(oldest.map_or(ms, |o| o.min(ms)));
            }
        }
    }
    let pending: u64 = shards.iter().map(|s| s.pending).sum();
    let undelivered: u64 = shards.iter().map(|s| s.undelivered).sum();
    let added: u64 = shards.iter().map(|s| s.added).sum();
    let acked: u64 = shards
        .iter()
        .map(|s| s.entries_read.saturating_sub(s.pending))
        .sum();
    let totals = Totals {
        at_ms: now_ms,
        added,
        acked,
        events,
    };
    let (added_per_sec, applied_per_sec, events_applied_per_sec) = match prev {
        Some(p) if now_ms > p.at_ms => {
            let dt = (now_ms - p.at_ms) as f64 / 1000.0;
            (
                added.saturating_sub(p.added) as f64 / dt,
                acked.saturating_sub(p.acked) as f64 / dt,
                events.saturating_sub(p.events) as f64 / dt,
            )
        }
        _ => (0.0, 0.0, 0.0),
    };
    *prev = Some(totals);
    Ok(Lag {
        pending,
        undelivered,
        oldest_age_ms: oldest.map_or(0, |ms| (now_ms - ms).max(0)),
        added_per_sec,
        applied_per_sec,
        events_applied_per_sec,
        consumers: shards.iter().map(|s| s.consumers).max().unwrap_or(0),
        updated_at_ms: now_ms,
    })
}

/// Writes the lag record and the gauges.
pub async fn publish<C: ConnectionLike>(
    conn: &mut C,
    settings: &Settings,
    lag: &Lag,
) -> RedisResult<()> {
    metrics::lag(lag.pending, lag.undelivered, lag.oldest_age_ms);
    redis::cmd("HSET")
        .arg(settings.keys.projector_lag())
        .arg(lag.to_fields())
        .query_async::<()>(conn)
        .await
}

/// How long a consumer of the group with nothing pending may stay idle
/// before [`remove_idle_consumers`] deletes it: 10 x `claim_idle` (5 min by
/// default), at least 1 s. A live projector reads every `block`, far more
/// often.
pub fn consumer_idle_bound(settings: &Settings) -> Duration {
    settings
        .claim_idle
        .saturating_mul(10)
        .max(Duration::from_secs(1))
}

/// Deletes, on one stream, the consumers of the group other than
/// `ARGV[3]` that have nothing pending and have been idle longer than
/// `ARGV[2]` ms; returns their names. Check and delete in one script: a
/// consumer is never deleted with entries pending (they would be lost to
/// the group).
static REMOVE_IDLE_CONSUMERS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local list = redis.pcall('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if type(list) ~= 'table' or list.err then
  return {}
end
local bound = tonumber(ARGV[2])
local deleted = {}
for _, c in ipairs(list) do
  local f = {}
  for i = 1, #c, 2 do
    f[c[i]] = c[i + 1]
  end
  if f['name'] ~= ARGV[3] and tonumber(f['pending']) == 0
      and tonumber(f['idle']) > bound then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], f['name'])
    deleted[#deleted + 1] = f['name']
  end
end
return deleted
",
    )
});

/// Deletes the group's consumers, other than this projector's own, that
/// have nothing pending and have been idle longer than `idle_bound`, on
/// every shard; returns their names (one per shard it was deleted from).
pub async fn remove_idle_consumers<C: ConnectionLike>(
    conn: &mut C,
    settings: &Settings,
    idle_bound: Duration,
) -> RedisResult<Vec<String>> {
    let bound_ms = u64::try_from(idle_bound.as_millis()).unwrap_or(u64::MAX);
    let mut deleted = Vec::new();
    for shard in settings.shard_range() {
        let names: Vec<String> = REMOVE_IDLE_CONSUMERS
            .key(settings.keys.events(shard))
            .arg(PROJECTOR_GROUP)
            .arg(bound_ms)
            .arg(&settings.consumer)
            .invoke_async(conn)
            .await?;
        deleted.extend(names);
    }
    Ok(deleted)
}

/// Publishes the lag every `lag_interval` until shutdown, and every
/// `claim_idle` removes the idle consumers.
pub async fn run(settings: Arc<Settings>, redis: RedisPool, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(settings.lag_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut prev = None;
    let idle_bound = consumer_idle_bound(&settings);
    let mut last_cleanup: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut conn = redis.get();
        let applied = take_events_applied();
        let r = async {
            if let Err(e) = add_events_applied(&mut conn, &settings, applied).await {
                // Added next round instead.
                count_events_applied(applied);
                return Err(e);
            }
            let lag = measure(&mut conn, &settings, &mut prev, iot_core::time::now_ms()).await?;
            publish(&mut conn, &settings, &lag).await
        }
        .await;
        if let Err(e) = r {
            metrics::redis_error("lag");
            tracing::warn!(error = %e, "publishing the lag failed; retrying next round");
        }
        if last_cleanup.is_some_and(|t| t.elapsed() < settings.claim_idle) {
            continue;
        }
        last_cleanup = Some(tokio::time::Instant::now());
        match remove_idle_consumers(&mut conn, &settings, idle_bound).await {
            Ok(names) if !names.is_empty() => {
                tracing::info!(consumers = ?names, idle_bound = ?idle_bound,
                    "removed idle consumers with nothing pending from the group");
            }
            Ok(_) => {}
            Err(e) => {
                metrics::redis_error("consumer_cleanup");
                tracing::warn!(error = %e, "removing idle consumers failed; retrying later");
            }
        }
    }
}
