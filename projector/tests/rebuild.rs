//! `iot-projector rebuild --reset` re-derives from the streams the same views
//! and online index as the live projection, without lifecycle entries; a
//! rebuild without reset changes nothing.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use iot_core::Keys;
use iot_test_support::{RedisServer, ServiceProcess, free_port, unique_prefix};
use redis::AsyncCommands;

const SHARDS: u16 = 4;
const BIN: &str = env!("CARGO_BIN_EXE_iot-projector");

async fn lifecycle_len(conn: &mut redis::aio::ConnectionManager, keys: &Keys) -> u64 {
    let mut n = 0;
    for s in 0..SHARDS {
        n += conn.xlen::<_, u64>(keys.lifecycle(s)).await.unwrap();
    }
    n
}

fn rebuild(url: &str, prefix: &str, args: &[&str]) -> String {
    let http = format!("127.0.0.1:{}", free_port());
    let env = process_env(url, prefix, SHARDS, &http, "rebuilder");
    let env_ref: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let out = std::process::Command::new(BIN)
        .args(args)
        .envs(env_ref)
        .output()
        .expect("run rebuild");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "rebuild failed: {}\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_with_reset_gives_the_live_views() {
    let redis = RedisServer::start();
    let prefix = unique_prefix();
    let keys = Keys::new(prefix.clone()).unwrap();
    let mut conn = connect(&redis.url()).await;
    let (entries, events) = workload("rb-", 400, 8, iot_core::time::now_ms() - 30_000);
    inject(&mut conn, &keys, SHARDS, &entries).await;

    let http = format!("127.0.0.1:{}", free_port());
    let env = process_env(&redis.url(), &prefix, SHARDS, &http, "live");
    let env_ref: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut live = ServiceProcess::spawn(BIN, &[], &env_ref);
    live.wait_http_ok(&http, "/health", Duration::from_secs(30));
    caught_up(&mut conn, &keys, SHARDS, Duration::from_secs(60)).await;
    live.terminate();
    let status = live
        .wait_exit(Duration::from_secs(15))
        .expect("exit on SIGTERM");
    assert!(status.success(), "{status}\n{}", live.stderr());

    let before = snapshot(&mut conn, &keys, SHARDS).await;
    let links_before = links(&mut conn, &keys).await;
    assert_eq!(links_before, links_of(&keys, &before.0));
    let lifecycle_before = lifecycle_len(&mut conn, &keys).await;
    assert_eq!(before.0.len(), 400);
    assert!(lifecycle_before > 0);

    let out = rebuild(&redis.url(), &prefix, &["rebuild", "--reset"]);
    assert!(out.contains("rebuild done"), "{out}");
    assert!(out.contains(&format!("{events} events applied")), "{out}");
    assert!(out.contains("400 views deleted first"), "{out}");
    assert!(out.contains("400 devices known"), "{out}");
    let after = snapshot(&mut conn, &keys, SHARDS).await;
    assert_eq!(before, after);
    assert_eq!(links(&mut conn, &keys).await, links_before);
    assert_eq!(lifecycle_len(&mut conn, &keys).await, lifecycle_before);

    // Without reset: the same again, and no transitions.
    let out = rebuild(&redis.url(), &prefix, &["rebuild"]);
    assert!(out.contains("0 views deleted first"), "{out}");
    assert_eq!(snapshot(&mut conn, &keys, SHARDS).await, before);
    assert_eq!(links(&mut conn, &keys).await, links_before);
    assert_eq!(lifecycle_len(&mut conn, &keys).await, lifecycle_before);
}

/// With PostgreSQL configured the projector archives every entry and the
/// archiver trims what every group has processed; a rebuild then takes from
/// the archive what the streams no longer hold and ends with the same views.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_takes_from_the_archive_what_the_streams_no_longer_hold() {
    let redis = RedisServer::start();
    let db = iot_test_support::TestDb::create().await;
    let mut cfg = config(&redis.url(), &unique_prefix(), SHARDS);
    cfg.database.url = db.url().to_owned();
    let store = iot_store::Store::connect(&cfg.database).await.unwrap();
    store.migrate().await.unwrap();
    let keys = cfg.keys();
    let mut conn = connect(&redis.url()).await;
    let (entries, events) = workload("ar-", 200, 6, iot_core::time::now_ms() - 30_000);
    inject(&mut conn, &keys, SHARDS, &entries).await;

    let total_entries = entries.len() as u64;
    let live = start(cfg.clone(), "live-archiving").await;
    caught_up(&mut conn, &keys, SHARDS, Duration::from_secs(60)).await;
    iot_test_support::eventually(Duration::from_secs(60), "archived and trimmed", || {
        let store = store.clone();
        let mut conn = conn.clone();
        let keys = keys.clone();
        async move {
            let archived = store.count_events().await.map_err(|e| e.to_string())?;
            let mut left = 0u64;
            for s in 0..SHARDS {
                left += conn
                    .xlen::<_, u64>(keys.events(s))
                    .await
                    .map_err(|e| e.to_string())?;
            }
            if archived as u64 == events && left < total_entries / 2 {
                Ok(())
            } else {
                Err(format!("{archived}/{events} archived, {left} entries left"))
            }
        }
    })
    .await;
    live.stop().await;
    let before = snapshot(&mut conn, &keys, SHARDS).await;
    assert_eq!(before.0.len(), 200);

    let settings = std::sync::Arc::new(projector::Settings::from_config(
        &cfg,
        &iot_core::ServerId::new("rebuilder").unwrap(),
    ));
    let projection = projector::Projection::new(settings);
    let archive = projector::rebuild::ArchiveSource {
        store: store.clone(),
        since: Duration::from_secs(3600),
    };
    let summary = projector::rebuild::rebuild_with(&mut conn, &projection, true, Some(&archive))
        .await
        .unwrap();
    assert!(summary.archived > 0, "{summary}");
    assert_eq!(summary.views_deleted, 200, "{summary}");
    assert_eq!(
        snapshot(&mut conn, &keys, SHARDS).await,
        before,
        "{summary}"
    );

    // Streams alone no longer know most devices.
    let streams_only = projector::rebuild::rebuild_with(&mut conn, &projection, true, None)
        .await
        .unwrap();
    assert!(streams_only.devices < 200, "{streams_only}");
}
