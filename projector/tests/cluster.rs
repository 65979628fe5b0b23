//! The projector keeps every multi-key operation within one hash slot: run
//! against a one-node Redis Cluster (which refuses any command, script or
//! function call whose keys span slots with `CROSSSLOT`), it projects a
//! mixed workload without a single Redis error, into the same views, online
//! index, connection sets and connection keys as on a plain Redis.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use iot_core::Keys;
use iot_test_support::{RedisServer, unique_prefix};

const SHARDS: u16 = 4;

fn redis_errors(http: &str) -> Vec<String> {
    let (_, text) = iot_test_support::http_get(http, "/metrics").expect("/metrics answers");
    text.lines()
        .filter(|l| l.starts_with("iot_projector_redis_errors_total{"))
        .filter(|l| l.rsplit(' ').next() != Some("0"))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_node_cluster_projects_like_a_plain_redis() {
    let cluster = tokio::task::spawn_blocking(RedisServer::start_single_node_cluster)
        .await
        .unwrap();
    let plain = RedisServer::start();
    let prefix = unique_prefix();
    let keys = Keys::new(prefix.clone()).unwrap();
    let (entries, events) = workload("cl-", 400, 8, iot_core::time::now_ms() - 60_000);
    assert!(events >= 4_000, "{events}");

    let mut on_cluster = connect(&cluster.url()).await;
    let mut on_plain = connect(&plain.url()).await;
    inject(&mut on_cluster, &keys, SHARDS, &entries).await;
    inject(&mut on_plain, &keys, SHARDS, &entries).await;

    let configure = |url: &str| {
        let mut cfg = config(url, &prefix, SHARDS);
        cfg.session.heartbeat_timeout = Duration::from_secs(600);
        cfg.policy.tcp_down_window = Duration::from_secs(600);
        cfg.policy.ack_window = Duration::from_secs(600);
        cfg.projector.batch_size = 64;
        cfg
    };
    let a = start(configure(&cluster.url()), "proj-cluster").await;
    let b = start(configure(&plain.url()), "proj-plain").await;
    caught_up(&mut on_cluster, &keys, SHARDS, Duration::from_secs(60)).await;
    caught_up(&mut on_plain, &keys, SHARDS, Duration::from_secs(60)).await;

    // Both projectors share this process's metrics: neither met an error.
    let errors = redis_errors(&a.http.to_string());
    assert!(errors.is_empty(), "Redis errors: {errors:?}");

    let (views_c, online_c) = snapshot(&mut on_cluster, &keys, SHARDS).await;
    let (views_p, online_p) = snapshot(&mut on_plain, &keys, SHARDS).await;
    assert_eq!(views_c.len(), 400);
    assert_eq!(views_c, views_p);
    assert_eq!(online_c, online_p);
    assert!(!online_c.is_empty());
    let links_c = links(&mut on_cluster, &keys).await;
    assert!(!links_c.0.is_empty());
    assert_eq!(links_c, links(&mut on_plain, &keys).await);

    // A command across slots is refused here, so the test can fail.
    let cross: redis::RedisResult<Vec<Option<String>>> = redis::cmd("MGET")
        .arg(keys.device(&phy("cl-1")))
        .arg(keys.device(&phy("cl-2")))
        .query_async(&mut on_cluster)
        .await;
    assert!(
        cross
            .as_ref()
            .is_err_and(|e| e.to_string().to_lowercase().contains("crossslot")),
        "{cross:?}"
    );
    a.stop().await;
    b.stop().await;
}
