//! Two `iot-projector` processes on one consumer group work through a large
//! injected stream; one is killed with SIGKILL mid-stream and the survivor
//! claims its pending entries. The final views (merge fields, online state
//! and reason), the online index, the instances' connection sets and the
//! bound connections' keys equal a single projector's replay of the same
//! entries under another prefix, and the sets and keys follow the views.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use iot_core::Keys;
use iot_core::keys::PROJECTOR_GROUP;
use iot_test_support::{RedisServer, ServiceProcess, eventually, free_port, unique_prefix};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const SHARDS: u16 = 4;
const BIN: &str = env!("CARGO_BIN_EXE_iot-projector");

/// Pending entries of one consumer, over all shards.
async fn pending_of(conn: &mut redis::aio::ConnectionManager, keys: &Keys, consumer: &str) -> u64 {
    let mut n = 0;
    for s in 0..SHARDS {
        let v: redis::Value = redis::cmd("XPENDING")
            .arg(keys.events(s))
            .arg(PROJECTOR_GROUP)
            .query_async(conn)
            .await
            .unwrap_or(redis::Value::Nil);
        if let redis::Value::Array(parts) = v
            && let Some(redis::Value::Array(consumers)) = parts.get(3)
        {
            for c in consumers {
                let pair: (String, String) = redis::from_redis_value(c.clone()).unwrap();
                if pair.0 == consumer {
                    n += pair.1.parse::<u64>().unwrap();
                }
            }
        }
    }
    n
}

/// Entries read by the group so far, over all shards.
async fn read_so_far(conn: &mut redis::aio::ConnectionManager, keys: &Keys) -> u64 {
    let mut n = 0;
    for s in 0..SHARDS {
        let v: redis::Value = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(keys.events(s))
            .query_async(conn)
            .await
            .unwrap_or(redis::Value::Nil);
        if let redis::Value::Array(groups) = v {
            for g in groups {
                let flat: Vec<redis::Value> = redis::from_redis_value(g).unwrap_or_default();
                for pair in flat.chunks(2) {
                    let k: String = redis::from_redis_value(pair[0].clone()).unwrap_or_default();
                    if k == "entries-read" {
                        n += redis::from_redis_value::<u64>(pair[1].clone()).unwrap_or(0);
                    }
                }
            }
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_projector_work_is_claimed_and_views_match_a_single_replay() {
    let redis = RedisServer::start();
    let (pa, pb) = (unique_prefix(), unique_prefix());
    let (ka, kb) = (
        Keys::new(pa.clone()).unwrap(),
        Keys::new(pb.clone()).unwrap(),
    );
    let mut conn = connect(&redis.url()).await;
    let (entries, events) = workload("fo-", 1600, 12, iot_core::time::now_ms() - 60_000);
    assert!(events >= 20_000, "{events}");
    inject(&mut conn, &ka, SHARDS, &entries).await;
    inject(&mut conn, &kb, SHARDS, &entries).await;
    let total = entries.len() as u64;

    let spawn = |id: &str| {
        let http = format!("127.0.0.1:{}", free_port());
        let mut env = process_env(&redis.url(), &pa, SHARDS, &http, id);
        env.push(("IOT_PROJECTOR_BATCH_SIZE".into(), "8".into()));
        let env_ref: Vec<(&str, &str)> =
            env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut p = ServiceProcess::spawn(BIN, &[], &env_ref);
        p.wait_http_ok(&http, "/health/live", Duration::from_secs(30));
        (p, http)
    };
    let (mut victim, _) = spawn("victim");
    let (survivor, survivor_http) = spawn("survivor");

    // Kill the victim while it holds unacknowledged entries, mid-stream:
    // freeze it, check (stable while frozen), then SIGKILL; else thaw and
    // try again a moment later.
    let victim_pid = victim.pid();
    let killed_with = eventually(Duration::from_secs(60), "victim busy mid-stream", || {
        let mut conn = conn.clone();
        let ka = ka.clone();
        async move {
            let pid = Pid::from_raw(victim_pid as i32);
            kill(pid, Signal::SIGSTOP).expect("SIGSTOP");
            let read = read_so_far(&mut conn, &ka).await;
            let pending = pending_of(&mut conn, &ka, "victim").await;
            if read >= total / 10 && read < total && pending > 0 {
                kill(pid, Signal::SIGKILL).expect("SIGKILL");
                Ok(pending)
            } else {
                kill(pid, Signal::SIGCONT).expect("SIGCONT");
                tokio::time::sleep(Duration::from_millis(3)).await;
                Err((read, pending))
            }
        }
    })
    .await;
    // Reap the killed process.
    victim.kill();
    assert!(killed_with > 0);

    caught_up(&mut conn, &ka, SHARDS, Duration::from_secs(120)).await;
    assert_eq!(
        pending_of(&mut conn, &ka, "victim").await,
        0,
        "victim's entries claimed"
    );
    let (_, metrics) = iot_test_support::http_get(&survivor_http, "/metrics").expect("metrics");
    let claimed: f64 = metrics
        .lines()
        .find(|l| l.starts_with("iot_projector_claimed_entries_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(
        claimed >= 1.0,
        "survivor claimed nothing (victim held {killed_with}):\n{metrics}"
    );

    // The same entries, one projector, another prefix.
    let mut cfg = config(&redis.url(), &pb, SHARDS);
    cfg.session.heartbeat_timeout = Duration::from_secs(600);
    cfg.policy.tcp_down_window = Duration::from_secs(600);
    cfg.policy.ack_window = Duration::from_secs(600);
    let single = start(cfg, "single").await;
    caught_up(&mut conn, &kb, SHARDS, Duration::from_secs(120)).await;

    let (views_a, online_a) = snapshot(&mut conn, &ka, SHARDS).await;
    let (views_b, online_b) = snapshot(&mut conn, &kb, SHARDS).await;
    assert_eq!(views_a.len(), 1600);
    assert_eq!(views_a, views_b);
    assert_eq!(online_a, online_b);
    let (links_a, links_b) = (links(&mut conn, &ka).await, links(&mut conn, &kb).await);
    // Under their own prefixes: compare the sets by instance name.
    let strip = |(sets, conn_keys): Links, k: &Keys| -> Links {
        let sets = sets
            .into_iter()
            .map(|(name, m)| (name.trim_start_matches(k.prefix()).to_owned(), m))
            .collect();
        (sets, conn_keys)
    };
    assert_eq!(
        links_a,
        links_of(&ka, &views_a),
        "the links follow the views"
    );
    assert!(!links_a.0.is_empty());
    assert_eq!(strip(links_a, &ka), strip(links_b, &kb));
    assert!(
        !online_a.is_empty() && online_a.len() < 1600,
        "{}",
        online_a.len()
    );
    single.stop().await;
    drop(survivor);
}
