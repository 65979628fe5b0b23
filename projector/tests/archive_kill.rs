//! The archiver in a real `iot-projector` process (DATABASE_URL set) is
//! SIGKILLed while events are being written and it holds unacknowledged
//! entries; a second process claims them. Afterwards the archive holds
//! exactly what was written: `count(*)`, the sorted list of row identities
//! (duplicates would show) and the set of stream entry ids all equal what
//! the test wrote, and the transitions equal the lifecycle streams.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use iot_core::Keys;
use iot_core::event::ENTRY_FIELD;
use iot_core::keys::ARCHIVER_GROUP;
use iot_store::Store;
use iot_store::archive::ArchivedEvent;
use iot_test_support::{RedisServer, ServiceProcess, TestDb, eventually, free_port, unique_prefix};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use redis::aio::ConnectionManager;

const SHARDS: u16 = 4;
const BIN: &str = env!("CARGO_BIN_EXE_iot-projector");

/// Entries of `consumer` pending in the archivers' group, over `streams`.
async fn archiver_pending(conn: &mut ConnectionManager, streams: &[String], consumer: &str) -> u64 {
    let mut n = 0;
    for key in streams {
        let v: redis::Value = redis::cmd("XPENDING")
            .arg(key)
            .arg(ARCHIVER_GROUP)
            .query_async(conn)
            .await
            .unwrap_or(redis::Value::Nil);
        if let redis::Value::Array(parts) = v
            && let Some(redis::Value::Array(consumers)) = parts.get(3)
        {
            for c in consumers {
                let (name, count): (String, String) = redis::from_redis_value(c.clone()).unwrap();
                if name == consumer {
                    n += count.parse::<u64>().unwrap();
                }
            }
        }
    }
    n
}

/// Every (stream, entry id) of the lifecycle streams.
async fn lifecycle_ids(conn: &mut ConnectionManager, keys: &Keys) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for s in 0..SHARDS {
        let key = keys.lifecycle(s);
        let r: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(&key)
            .arg("-")
            .arg("+")
            .query_async(conn)
            .await
            .expect("XRANGE");
        out.extend(r.ids.into_iter().map(|i| (key.clone(), i.id)));
    }
    out.sort();
    out
}

/// What the writer has written: entry ids and the rows they make.
#[derive(Default)]
struct Written {
    ids: BTreeSet<(String, String)>,
    rows: Vec<(String, String, i32)>,
    done: bool,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_archiver_process_leaves_exactly_the_written_events_in_the_archive() {
    let redis = RedisServer::start();
    let db = TestDb::create().await;
    let store = Store::connect(&iot_core::config::DatabaseConfig {
        url: db.url().to_owned(),
        ..Default::default()
    })
    .await
    .expect("store");
    store.migrate().await.expect("migrate");
    let prefix = unique_prefix();
    let keys = Keys::new(prefix.clone()).unwrap();
    let mut conn = connect(&redis.url()).await;
    // An audit group that reads nothing keeps the lifecycle streams whole
    // (the archiver trims only below every group), to compare at the end.
    for s in 0..SHARDS {
        let _: () = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(keys.lifecycle(s))
            .arg("audit")
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await
            .expect("XGROUP CREATE");
    }
    let (entries, _) = workload("ak-", 300, 10, iot_core::time::now_ms() - 60_000);
    assert!(entries.len() > 1000, "{}", entries.len());

    let spawn = |id: &str| {
        let http = format!("127.0.0.1:{}", free_port());
        let mut env = process_env(&redis.url(), &prefix, SHARDS, &http, id);
        env.push(("DATABASE_URL".into(), db.url().to_owned()));
        env.push(("IOT_PROJECTOR_BATCH_SIZE".into(), "16".into()));
        let env_ref: Vec<(&str, &str)> =
            env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut p = ServiceProcess::spawn(BIN, &[], &env_ref);
        p.wait_http_ok(&http, "/health/live", Duration::from_secs(30));
        (p, http)
    };
    let (mut victim, _) = spawn("arch-victim");

    // The writer: small pipelined chunks at a steady pace, so that writing
    // goes on across the kill and the restart.
    let written = Arc::new(Mutex::new(Written::default()));
    let writer = {
        let written = written.clone();
        let mut conn = conn.clone();
        let keys = keys.clone();
        tokio::spawn(async move {
            for chunk in entries.chunks(4) {
                let mut pipe = redis::pipe();
                let mut streams = Vec::new();
                for e in chunk {
                    let stream = keys.events(entry_shard(e, SHARDS));
                    pipe.cmd("XADD")
                        .arg(&stream)
                        .arg("*")
                        .arg(ENTRY_FIELD)
                        .arg(e.encode());
                    streams.push(stream);
                }
                let ids: Vec<String> = pipe.query_async(&mut conn).await.expect("XADD");
                {
                    let mut w = written.lock().unwrap();
                    for ((stream, id), e) in streams.into_iter().zip(ids).zip(chunk) {
                        for r in ArchivedEvent::from_entry(&stream, &id, e.clone()) {
                            w.rows.push((r.stream, r.entry_id, r.seq));
                        }
                        w.ids.insert((stream, id));
                    }
                }
                // Pacing of the load, not a wait for a condition.
                tokio::time::sleep(Duration::from_millis(4)).await;
            }
            written.lock().unwrap().done = true;
        })
    };

    // Kill it while it holds unacknowledged archive entries, with rows
    // stored already and the writer still writing: freeze, look (stable
    // while frozen), SIGKILL; else thaw and look again a moment later.
    let streams: Vec<String> = (0..SHARDS).map(|s| keys.events(s)).collect();
    let pid = Pid::from_raw(victim.pid() as i32);
    let pending_at_kill = eventually(Duration::from_secs(60), "archiver busy mid-run", || {
        let mut conn = conn.clone();
        let (streams, store, written) = (streams.clone(), store.clone(), written.clone());
        async move {
            kill(pid, Signal::SIGSTOP).expect("SIGSTOP");
            let pending = archiver_pending(&mut conn, &streams, "arch-victim").await;
            let rows = store.count_events().await.unwrap_or(0);
            let done = written.lock().unwrap().done;
            if pending > 0 && rows >= 50 && !done {
                kill(pid, Signal::SIGKILL).expect("SIGKILL");
                Ok(pending)
            } else {
                kill(pid, Signal::SIGCONT).expect("SIGCONT");
                tokio::time::sleep(Duration::from_millis(5)).await;
                Err((pending, rows, done))
            }
        }
    })
    .await;
    victim.kill();
    assert!(pending_at_kill > 0);
    let rows_at_kill = store.count_events().await.expect("count");

    let (survivor, survivor_http) = spawn("arch-survivor");
    writer.await.expect("writer");
    let (want_ids, mut want_rows) = {
        let w = written.lock().unwrap();
        (w.ids.clone(), w.rows.clone())
    };
    want_rows.sort();
    assert!(
        (rows_at_kill as usize) < want_rows.len(),
        "the kill came too late to test anything"
    );

    eventually(Duration::from_secs(120), "everything archived", || {
        let store = store.clone();
        let want = want_rows.len() as i64;
        async move {
            let n = store.count_events().await.map_err(|e| e.to_string())?;
            if n >= want {
                Ok(())
            } else {
                Err(format!("{n} of {want} rows"))
            }
        }
    })
    .await;
    let got = store.event_keys().await.expect("event keys");
    assert_eq!(
        store.count_events().await.expect("count") as usize,
        want_rows.len(),
        "count(*)"
    );
    assert_eq!(
        got, want_rows,
        "rows: nothing missing, nothing twice (sorted, duplicates kept)"
    );
    let got_ids: BTreeSet<(String, String)> = got
        .iter()
        .map(|(s, id, _)| (s.clone(), id.clone()))
        .collect();
    assert_eq!(got_ids, want_ids, "exactly the entry ids written");

    // Transitions: the projectors' lifecycle entries, each archived once.
    caught_up(&mut conn, &keys, SHARDS, Duration::from_secs(60)).await;
    let lifecycle = eventually(Duration::from_secs(60), "transitions archived", || {
        let (mut conn, keys, store) = (conn.clone(), keys.clone(), store.clone());
        async move {
            let want = lifecycle_ids(&mut conn, &keys).await;
            let got = store.transition_keys().await.map_err(|e| e.to_string())?;
            if !want.is_empty() && got == want {
                Ok(want)
            } else {
                Err(format!(
                    "{} archived, {} in the streams",
                    got.len(),
                    want.len()
                ))
            }
        }
    })
    .await;
    assert_eq!(
        store.count_transitions().await.expect("count") as usize,
        lifecycle.len()
    );
    // The survivor stored the victim's pending entries by claiming them.
    let (_, metrics) = iot_test_support::http_get(&survivor_http, "/metrics").expect("metrics");
    let claimed: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("iot_archive_claimed_entries_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(claimed > 0.0, "no entries claimed:\n{metrics}");
    drop(survivor);
}
