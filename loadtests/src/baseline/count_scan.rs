//! Baseline: the seed's online count against ours.
//!
//! The seed counts online devices by scanning every session key and reading
//! each one (`SCAN MATCH session:device:*`, `GET`, decide by `last_seen`):
//! O(sessions) per count. Our projector keeps an online index, one sorted
//! set per shard, so the count is a sum of 16 `ZCARD`s in one round trip:
//! O(1). This populates both (pipelined) at each size and times each way of
//! counting: the seed's exactly (one GET per key, awaited), the seed's best
//! case (one MGET per SCAN batch), and ours.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use iot_core::PhyId;
use iot_core::keys::shard_of;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::baseline::redis_target::RedisTarget;
use crate::baseline::seed_session::{SeedSession, go_time};
use crate::bench_report::BenchReport;
use crate::rng::unit_hash;

/// Options of `iot-bench count-scan`.
#[derive(Debug, Clone, Args)]
pub struct CountScanArgs {
    /// Redis to use (loopback only); default: a private redis-server.
    #[arg(long)]
    pub redis_url: Option<String>,

    /// redis-server executable for the private server.
    #[arg(long, default_value = "redis-server")]
    pub redis_server_bin: String,

    /// Key prefix (default: none on a private server, a unique one on
    /// --redis-url).
    #[arg(long)]
    pub prefix: Option<String>,

    /// Session counts to measure at, ascending (each adds sessions to the
    /// previous).
    #[arg(long, value_delimiter = ',', default_value = "10000,100000,1000000")]
    pub sizes: Vec<u32>,

    /// Fraction of sessions whose heartbeat is fresh.
    #[arg(long, default_value_t = 0.8)]
    pub online_fraction: f64,

    /// Runs of each way of counting per size (the seed's stop early once
    /// --budget is spent).
    #[arg(long, default_value_t = 3)]
    pub repeat: u32,

    /// Time one way of counting may spend per size before it stops repeating
    /// (it always runs once).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub budget: Duration,

    /// COUNT hint of each SCAN call.
    #[arg(long, default_value_t = 1000)]
    pub scan_count: u32,

    /// Shards of our online index (streams.shards).
    #[arg(long, default_value_t = 16)]
    pub shards: u16,

    /// The seed's heartbeat timeout (online: last_seen at most this old).
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub heartbeat_timeout: Duration,

    /// Write the JSON report here (`-` for stdout).
    #[arg(long)]
    pub report: Option<PathBuf>,
}

/// Timings of one way of counting.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MethodTiming {
    /// The count it returned (last run).
    pub count: u64,
    /// Runs.
    pub runs: u32,
    /// Fastest run, ms.
    pub best_ms: f64,
    /// Median run, ms.
    pub median_ms: f64,
    /// Round trips to Redis in one run.
    pub round_trips: u64,
}

/// Figures at one size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SizeResult {
    /// Session keys.
    pub sessions: u32,
    /// Online sessions as populated.
    pub online_expected: u64,
    /// Time to populate the added sessions (pipelined), s.
    pub populate_s: f64,
    /// Redis memory used after populating, MiB.
    pub redis_used_memory_mib: f64,
    /// The seed's count: SCAN + one GET per key.
    pub seed_scan_get: MethodTiming,
    /// The seed's best case: SCAN + one MGET per batch.
    pub seed_scan_mget: MethodTiming,
    /// Ours: sum of ZCARD over the shards, pipelined.
    pub ours_zcard: MethodTiming,
    /// seed_scan_get median / ours median.
    pub ratio_scan_get: f64,
    /// seed_scan_mget median / ours median.
    pub ratio_scan_mget: f64,
    /// All three counts equal the populated online count.
    pub counts_agree: bool,
}

/// Figures of `count-scan`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CountScanResults {
    /// Redis URL.
    pub redis: String,
    /// redis_version.
    pub redis_version: String,
    /// Shards of the online index.
    pub shards: u16,
    /// Per size.
    pub sizes: Vec<SizeResult>,
}

impl CountScanResults {
    /// The human summary.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "count-scan against {} (Redis {}), {} shards\n  {:>9} {:>9} {:>14} {:>14} {:>11} {:>9} {:>9} {}\n",
            self.redis,
            self.redis_version,
            self.shards,
            "sessions",
            "online",
            "scan+GET ms",
            "scan+MGET ms",
            "ZCARD ms",
            "x GET",
            "x MGET",
            "agree"
        );
        for r in &self.sizes {
            s.push_str(&format!(
                "  {:>9} {:>9} {:>14.1} {:>14.1} {:>11.3} {:>9.0} {:>9.0} {}\n",
                r.sessions,
                r.online_expected,
                r.seed_scan_get.median_ms,
                r.seed_scan_mget.median_ms,
                r.ours_zcard.median_ms,
                r.ratio_scan_get,
                r.ratio_scan_mget,
                r.counts_agree
            ));
        }
        s
    }
}

/// Whether device `i` is online in the populated data.
fn is_online(i: u32, fraction: f64) -> bool {
    unit_hash(7, u64::from(i), 0x0c0) < fraction
}

fn phy(i: u32) -> String {
    format!("dev-{i}")
}

/// Runs the baseline.
pub async fn run(args: &CountScanArgs) -> anyhow::Result<BenchReport<CountScanResults>> {
    anyhow::ensure!(!args.sizes.is_empty(), "--sizes is empty");
    anyhow::ensure!(
        args.sizes.windows(2).all(|w| w[0] < w[1]),
        "--sizes must be ascending"
    );
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.online_fraction),
        "--online-fraction must be between 0 and 1"
    );
    anyhow::ensure!(args.shards >= 1, "--shards must be at least 1");
    let target = RedisTarget::open(
        args.redis_url.as_deref(),
        &args.redis_server_bin,
        args.prefix.as_deref(),
    )
    .await?;
    target.clear().await?;
    let mut conn = target.conn().await?;
    let timeout_ms = i64::try_from(args.heartbeat_timeout.as_millis()).unwrap_or(i64::MAX);
    let mut populated = 0u32;
    let mut online_expected = 0u64;
    let mut sizes = Vec::new();
    for &size in &args.sizes {
        let t0 = Instant::now();
        online_expected += populate(&target, &mut conn, populated, size, args).await?;
        populated = size;
        let populate_s = t0.elapsed().as_secs_f64();
        let used_memory = used_memory_mib(&mut conn).await;

        let pattern = target.keys.device_pattern();
        let seed_scan_get = time_method(args, || {
            let mut c = conn.clone();
            let pattern = pattern.clone();
            async move { seed_count(&mut c, &pattern, args.scan_count, false, timeout_ms).await }
        })
        .await?;
        let seed_scan_mget = time_method(args, || {
            let mut c = conn.clone();
            let pattern = pattern.clone();
            async move { seed_count(&mut c, &pattern, args.scan_count, true, timeout_ms).await }
        })
        .await?;
        let ours_args = CountScanArgs {
            repeat: args.repeat.max(100),
            ..args.clone()
        };
        let online_keys: Vec<String> = (0..args.shards).map(|s| target.keys.online(s)).collect();
        let ours_zcard = time_method(&ours_args, || {
            let mut c = conn.clone();
            let keys = online_keys.clone();
            async move {
                let mut pipe = redis::pipe();
                for k in &keys {
                    pipe.cmd("ZCARD").arg(k);
                }
                let counts: Vec<u64> = pipe.query_async(&mut c).await?;
                Ok((counts.iter().sum(), 1))
            }
        })
        .await?;
        let ratio = |m: &MethodTiming| {
            if ours_zcard.median_ms > 0.0 {
                m.median_ms / ours_zcard.median_ms
            } else {
                0.0
            }
        };
        let result = SizeResult {
            sessions: size,
            online_expected,
            populate_s,
            redis_used_memory_mib: used_memory,
            ratio_scan_get: ratio(&seed_scan_get),
            ratio_scan_mget: ratio(&seed_scan_mget),
            counts_agree: [&seed_scan_get, &seed_scan_mget, &ours_zcard]
                .iter()
                .all(|m| m.count == online_expected),
            seed_scan_get,
            seed_scan_mget,
            ours_zcard,
        };
        eprintln!(
            "count-scan: {} sessions: scan+GET {:.1} ms, scan+MGET {:.1} ms, ZCARD {:.3} ms",
            size,
            result.seed_scan_get.median_ms,
            result.seed_scan_mget.median_ms,
            result.ours_zcard.median_ms
        );
        sizes.push(result);
    }
    let results = CountScanResults {
        redis: target.url().to_owned(),
        redis_version: target.version().await,
        shards: args.shards,
        sizes,
    };
    if !target.is_private() {
        target.clear().await?;
    }
    Ok(BenchReport::new("count-scan", results))
}

/// Adds sessions `from..to`: the seed's JSON per device (SETEX) and, for
/// the online ones, a member of our online index. Returns how many of the
/// added sessions are online.
async fn populate(
    target: &RedisTarget,
    conn: &mut redis::aio::MultiplexedConnection,
    from: u32,
    to: u32,
    args: &CountScanArgs,
) -> anyhow::Result<u64> {
    let now = iot_core::time::now_ms();
    let timeout_ms = i64::try_from(args.heartbeat_timeout.as_millis()).unwrap_or(i64::MAX);
    let ttl_s = (args.heartbeat_timeout.as_secs() * 2).max(1);
    let mut online = 0;
    let mut start = from;
    while start < to {
        let end = (start + 5_000).min(to);
        let mut pipe = redis::pipe();
        for i in start..end {
            let p = phy(i);
            let on = is_online(i, args.online_fraction);
            let mut s = SeedSession::new(&p, "c", "iot-server-bench", now);
            if !on {
                // Stale heartbeat, key not yet expired.
                s.last_seen = go_time(now - timeout_ms - 60_000);
            } else {
                online += 1;
                pipe.cmd("ZADD")
                    .arg(target.keys.online(shard_of(&p, args.shards)))
                    .arg(0)
                    .arg(&p)
                    .ignore();
            }
            pipe.cmd("SETEX")
                .arg(target.keys.device(&PhyId::new(p.as_str())?))
                .arg(ttl_s)
                .arg(s.encode())
                .ignore();
        }
        let _: () = pipe.query_async(conn).await?;
        start = end;
    }
    Ok(online)
}

/// The seed's OnlineCount: SCAN the session keys and read each (one GET
/// per key, or one MGET per batch), counting fresh heartbeats. Returns the
/// count and the round trips it took.
async fn seed_count(
    conn: &mut redis::aio::MultiplexedConnection,
    pattern: &str,
    scan_count: u32,
    mget: bool,
    timeout_ms: i64,
) -> anyhow::Result<(u64, u64)> {
    let now = iot_core::time::now_ms();
    let mut cursor: u64 = 0;
    let mut online = 0;
    let mut rt = 0u64;
    let round_trips = &mut rt;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(scan_count)
            .query_async(conn)
            .await?;
        *round_trips += 1;
        if mget {
            if !keys.is_empty() {
                let values: Vec<Option<Vec<u8>>> =
                    redis::cmd("MGET").arg(&keys).query_async(conn).await?;
                *round_trips += 1;
                online += values
                    .iter()
                    .flatten()
                    .filter(|v| SeedSession::stored_is_online(v, now, timeout_ms))
                    .count() as u64;
            }
        } else {
            for k in &keys {
                let v: Option<Vec<u8>> = redis::cmd("GET").arg(k).query_async(conn).await?;
                *round_trips += 1;
                if v.is_some_and(|v| SeedSession::stored_is_online(&v, now, timeout_ms)) {
                    online += 1;
                }
            }
        }
        if next == 0 {
            return Ok((online, rt));
        }
        cursor = next;
    }
}

/// Runs `count` up to `args.repeat` times (at least once, stopping when
/// `args.budget` is spent) and summarises the timings.
async fn time_method<F, Fut>(args: &CountScanArgs, mut count: F) -> anyhow::Result<MethodTiming>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<(u64, u64)>>,
{
    let started = Instant::now();
    let mut times = Vec::new();
    let mut last = 0;
    let mut round_trips = 0;
    for _ in 0..args.repeat.max(1) {
        let t0 = Instant::now();
        let (n, rt) = count().await?;
        times.push(t0.elapsed().as_secs_f64() * 1000.0);
        last = n;
        round_trips = rt;
        if started.elapsed() >= args.budget {
            break;
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(MethodTiming {
        count: last,
        runs: times.len() as u32,
        best_ms: times.first().copied().unwrap_or(0.0),
        median_ms: times.get(times.len() / 2).copied().unwrap_or(0.0),
        round_trips,
    })
}

async fn used_memory_mib(conn: &mut redis::aio::MultiplexedConnection) -> f64 {
    let info: String = redis::cmd("INFO")
        .arg("MEMORY")
        .query_async(conn)
        .await
        .unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|b| b / 1024.0 / 1024.0)
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn online_fraction_is_respected() {
        let n = (0..10_000).filter(|i| is_online(*i, 0.8)).count();
        assert!((7_800..8_200).contains(&n), "{n}");
        assert_eq!((0..100).filter(|i| is_online(*i, 0.0)).count(), 0);
        assert_eq!((0..100).filter(|i| is_online(*i, 1.0)).count(), 100);
    }
}
