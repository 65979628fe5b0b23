//! One entry that Redis refuses as data does not stall the consumer group:
//! it goes to the dead-letter stream and the rest of its batch is applied;
//! a refusal that waiting cures (out of memory) dead-letters nothing.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use iot_core::time::now_ms;
use iot_core::{Entry, Keys};
use iot_test_support::{RedisServer, eventually, unique_prefix};
use redis::AsyncCommands;

const SHARDS: u16 = 1;

/// The metrics recorder is one per process: the tests take turns so that
/// each reads only its own projector's counts.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `name`'s value in the projector's /metrics (0 when absent).
fn metric(http: &str, name: &str) -> f64 {
    let (_, text) = iot_test_support::http_get(http, "/metrics").expect("/metrics answers");
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn dead_letters(conn: &mut redis::aio::ConnectionManager, keys: &Keys) -> Vec<redis::Value> {
    redis::cmd("XRANGE")
        .arg(keys.projector_dead_letters())
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await
        .expect("xrange")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_redis_refuses_goes_to_the_dead_letters_and_its_batch_is_applied() {
    let _turn = TURN.lock().await;
    let redis = RedisServer::start();
    let prefix = unique_prefix();
    let keys = Keys::new(prefix.clone()).unwrap();
    let mut conn = connect(&redis.url()).await;
    // Somebody wrote a string where the device's view (a hash) belongs.
    let _: () = conn
        .set(keys.device(&phy("p-bad")), "not a hash")
        .await
        .unwrap();
    let t = now_ms();
    inject(
        &mut conn,
        &keys,
        SHARDS,
        &[
            Entry::Event(ev("p-good-1", 1, "s", t, connected())),
            Entry::Event(ev("p-bad", 1, "s", t, connected())),
            Entry::Event(ev("p-good-2", 1, "s", t, connected())),
        ],
    )
    .await;
    let proj = start(config(&redis.url(), &prefix, SHARDS), "proj-poison").await;
    caught_up(&mut conn, &keys, SHARDS, Duration::from_secs(20)).await;

    for p in ["p-good-1", "p-good-2"] {
        assert_eq!(view(&mut conn, &keys, p).await["online"], "1", "{p}");
    }
    let stored: String = conn.get(keys.device(&phy("p-bad"))).await.unwrap();
    assert_eq!(stored, "not a hash", "the refused key is left as it was");

    let letters = dead_letters(&mut conn, &keys).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    let (_, fields): (String, std::collections::HashMap<String, Vec<u8>>) =
        redis::FromRedisValue::from_redis_value(letters[0].clone()).unwrap();
    let error = String::from_utf8_lossy(&fields["error"]).into_owned();
    assert!(error.contains("WRONGTYPE"), "{error}");
    assert_eq!(fields["shard"], b"0");
    match Entry::decode(&fields["e"]).expect("the dead letter keeps the entry's bytes") {
        Entry::Event(e) => assert_eq!(e.phy_id.as_str(), "p-bad"),
        other => panic!("unexpected entry {other:?}"),
    }
    let http = proj.http.to_string();
    assert_eq!(metric(&http, "iot_projector_dead_letters_total"), 1.0);
    assert!(metric(&http, "iot_projector_redis_errors_total{op=\"apply\"}") >= 3.0);
    proj.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_memory_is_waited_out_not_dead_lettered() {
    let _turn = TURN.lock().await;
    let redis = RedisServer::start();
    let prefix = unique_prefix();
    let keys = Keys::new(prefix.clone()).unwrap();
    let mut conn = connect(&redis.url()).await;
    let proj = start(config(&redis.url(), &prefix, SHARDS), "proj-oom").await;
    caught_up(&mut conn, &keys, SHARDS, Duration::from_secs(20)).await;

    // An entry, then a memory limit that refuses every write (OOM) until
    // it is lifted, in one transaction: the projector meets the limit.
    let mut pipe = redis::pipe();
    pipe.cmd("MULTI").ignore();
    pipe.cmd("XADD")
        .arg(keys.events(0))
        .arg("*")
        .arg(iot_core::event::ENTRY_FIELD)
        .arg(Entry::Event(ev("p-oom", 1, "s", now_ms(), connected())).encode())
        .ignore();
    pipe.cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("1")
        .ignore();
    pipe.cmd("EXEC").ignore();
    pipe.query_async::<()>(&mut conn).await.unwrap();

    let http = proj.http.to_string();
    let dead_before = metric(&http, "iot_projector_dead_letters_total");
    let before = metric(&http, "iot_projector_redis_errors_total{op=\"apply\"}");
    let want = before + f64::from(projector::consumer::REFUSALS_BEFORE_ISOLATING) + 1.0;
    eventually(Duration::from_secs(20), "apply refused repeatedly", || {
        let http = http.clone();
        async move {
            let n = metric(&http, "iot_projector_redis_errors_total{op=\"apply\"}");
            if n >= want { Ok(()) } else { Err(n) }
        }
    })
    .await;

    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("0")
        .query_async(&mut conn)
        .await
        .unwrap();
    caught_up(&mut conn, &keys, SHARDS, Duration::from_secs(20)).await;
    assert_eq!(view(&mut conn, &keys, "p-oom").await["online"], "1");
    assert!(dead_letters(&mut conn, &keys).await.is_empty());
    assert_eq!(
        metric(&http, "iot_projector_dead_letters_total"),
        dead_before
    );
    proj.stop().await;
}
