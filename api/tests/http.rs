//! The api over real HTTP against a private Redis seeded exactly as the
//! projector and the ingest write it.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use iot_core::registry::Lag;
use iot_core::time::now_ms;
use iot_core::{EventKind, TcpDownReason};
use iot_test_support::eventually;

/// 2024-05-01T12:00:00Z.
const T: i64 = 1_714_564_800_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_list_pages_through_every_shard_without_duplicates_or_omissions() {
    let api = TestApi::start().await;
    let mut seed = api.seeder().await;
    let server = srv("ingest-a");
    let online = seed.online_devices("dev-", 2500, &server, now_ms()).await;
    // Known but offline devices are not listed.
    for i in 0..20 {
        let p = phy(&format!("off-{i}"));
        let evs = [event(&p, &server, 1, T, connected())];
        seed.device(
            &p,
            &evs,
            Some(ProjectedState {
                online: false,
                reason: "heartbeat_expired".into(),
                since: T,
                rev: 2,
            }),
        )
        .await;
    }
    let expected: HashSet<String> = online.iter().map(ToString::to_string).collect();
    let shards_used: HashSet<u16> = online
        .iter()
        .map(|p| iot_core::keys::shard_of(p.as_str(), 16))
        .collect();
    assert_eq!(shards_used.len(), 16, "devices spread over every shard");

    for limit in [1000usize, 97, 1] {
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        let mut pages = 0;
        loop {
            let path = match &cursor {
                None => format!("/api/devices/online?limit={limit}"),
                Some(c) => format!("/api/devices/online?limit={limit}&cursor={c}"),
            };
            let (status, body) = api.get(&path).await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["count"], 2500);
            assert!(body["as_of"].as_str().is_some_and(|s| s.ends_with('Z')));
            let devices = body["devices"].as_array().expect("devices");
            assert!(devices.len() <= limit);
            for d in devices {
                assert_eq!(d["server_id"], "ingest-a");
                assert_eq!(d["reason"], "heartbeat_fresh");
                assert!(d["since"].as_str().is_some(), "{d}");
                seen.push(d["phy_id"].as_str().expect("phy_id").to_owned());
            }
            pages += 1;
            assert!(pages <= 2500 / limit + 2, "too many pages");
            match body["next_cursor"].as_str() {
                Some(c) => {
                    assert_eq!(devices.len(), limit, "only the last page is short");
                    cursor = Some(c.to_owned());
                }
                None => break,
            }
        }
        let unique: HashSet<String> = seen.iter().cloned().collect();
        assert_eq!(unique.len(), seen.len(), "limit {limit}: duplicates");
        assert_eq!(unique, expected, "limit {limit}: omissions");
        assert_eq!(
            pages,
            2500usize.div_ceil(limit),
            "limit {limit}: no empty last page"
        );
    }

    // The default page is 100.
    let (_, body) = api.get("/api/devices/online").await;
    assert_eq!(body["devices"].as_array().map(Vec::len), Some(100));
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_list_of_an_empty_deployment() {
    let api = TestApi::start().await;
    let (status, body) = api.get("/api/devices/online").await;
    assert_eq!(status, 200);
    assert_eq!(body["count"], 0);
    assert_eq!(body["devices"].as_array().map(Vec::len), Some(0));
    assert!(body["next_cursor"].is_null());
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_answer_has_the_seeds_fields_and_explains_itself() {
    let api = TestApi::start().await;
    let mut seed = api.seeder().await;
    let p = phy("dev-001");
    let a = srv("ingest-a");
    let b = srv("ingest-b");
    let evs = [
        event(&p, &a, 1, T - 60_000, connected()),
        event(&p, &a, 1, T - 30_000, tcp_down(TcpDownReason::Reset)),
        event(&p, &b, 2, T - 20_000, connected()),
        event(&p, &b, 2, T, EventKind::Heartbeat),
    ];
    seed.device(
        &p,
        &evs,
        Some(ProjectedState {
            online: false,
            reason: "tcp_down:reset".into(),
            since: T - 30_000,
            rev: 3,
        }),
    )
    .await;
    seed.lag(&Lag {
        pending: 3,
        undelivered: 4,
        oldest_age_ms: 120,
        added_per_sec: 10.0,
        applied_per_sec: 9.0,
        events_applied_per_sec: 900.0,
        consumers: 2,
        updated_at_ms: T,
    })
    .await;

    // At T + 10 s the drop 40 s ago still penalises: 1 - 0.5 = 0.5 >= 0.5.
    let (status, d) = api
        .get(&format!("/api/devices/dev-001?now={}", T + 10_000))
        .await;
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["phy_id"], "dev-001");
    assert_eq!(d["conn_id"], conn_id(&p, 2).to_string());
    assert_eq!(d["server_id"], "ingest-b");
    assert_eq!(d["epoch"], 2);
    assert_eq!(d["connected"], true);
    assert_eq!(d["connected_at"], "2024-05-01T11:59:40.000Z");
    assert_eq!(d["last_seen"], "2024-05-01T12:00:00.000Z");
    assert_eq!(d["last_tcp_down"], "2024-05-01T11:59:30.000Z");
    assert_eq!(d["last_tcp_down_reason"], "reset");
    assert!(d["last_ack_timeout"].is_null());
    assert!(d["ended"].is_null());
    assert_eq!(d["online"], true);
    assert_eq!(f(&d, "score"), 0.5);
    assert_eq!(f(&d["terms"], "heartbeat"), 1.0);
    assert_eq!(f(&d["terms"], "tcp_down"), -0.5);
    assert_eq!(f(&d["terms"], "ack_timeout"), 0.0);
    assert_eq!(f(&d, "threshold"), 0.5);
    assert_eq!(d["reason"], "heartbeat_fresh");
    // The penalty window ends first: T - 30 s + 1 min + 1 ms.
    assert_eq!(d["next_change"], "2024-05-01T12:00:30.001Z");
    assert_eq!(d["projected_online"], false);
    assert_eq!(d["projected_reason"], "tcp_down:reset");
    assert_eq!(d["since"], "2024-05-01T11:59:30.000Z");
    assert_eq!(d["rev"], 3);
    assert_eq!(d["as_of"], "2024-05-01T12:00:10.000Z");
    assert_eq!(d["lag"]["entries"], 7);
    assert_eq!(d["lag"]["pending"], 3);
    assert_eq!(d["lag"]["undelivered"], 4);
    assert_eq!(d["lag"]["oldest_age_ms"], 120);
    assert_eq!(d["lag"]["updated_at"], "2024-05-01T12:00:00.000Z");
    // Published in 2024 and measured against the API's clock, not `now`.
    assert!(
        d["lag"]["age_ms"].as_i64() >= Some(now_ms() - T - 60_000),
        "{d}"
    );
    assert_eq!(d["lag"]["stale"], true);

    // Six minutes later the heartbeat has expired (timeout 5 min).
    let (_, later) = api
        .get("/api/devices/dev-001?now=2024-05-01T12:06:00Z")
        .await;
    assert_eq!(later["online"], false);
    assert_eq!(later["reason"], "heartbeat_expired");
    assert_eq!(f(&later, "score"), 0.0);
    assert!(later["next_change"].is_null());

    // Without `now`: the current time.
    let before = now_ms();
    let (_, cur) = api.get("/api/devices/dev-001").await;
    let as_of = chrono::DateTime::parse_from_rfc3339(cur["as_of"].as_str().expect("as_of"))
        .expect("RFC 3339")
        .timestamp_millis();
    assert!(as_of >= before - 1 && as_of <= now_ms(), "{as_of}");
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_seen_includes_the_heartbeats_kept_in_the_seen_set() {
    let api = TestApi::start().await;
    let mut seed = api.seeder().await;
    let p = phy("dev-seen");
    let a = srv("ingest-a");
    seed.device(
        &p,
        &[event(&p, &a, 1, T - 400_000, connected())],
        Some(ProjectedState {
            online: true,
            reason: "heartbeat_fresh".into(),
            since: T - 400_000,
            rev: 1,
        }),
    )
    .await;
    // By the view's own field the heartbeat expired (timeout 5 min).
    let (_, stale) = api.get(&format!("/api/devices/dev-seen?now={T}")).await;
    assert_eq!(stale["online"], false, "{stale}");
    assert_eq!(stale["last_seen"], "2024-05-01T11:53:20.000Z");

    // The projector kept the newer heartbeats in the shard's seen set.
    let shard = iot_core::keys::shard_of(p.as_str(), seed.shards);
    let () = redis::cmd("ZADD")
        .arg(seed.keys.seen(shard))
        .arg(T - 1000)
        .arg(p.as_str())
        .query_async(&mut seed.conn)
        .await
        .expect("zadd");
    let (status, d) = api.get(&format!("/api/devices/dev-seen?now={T}")).await;
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["last_seen"], "2024-05-01T11:59:59.000Z");
    assert_eq!(d["online"], true);
    assert_eq!(d["reason"], "heartbeat_fresh");
    let (_, page) = api.get("/api/devices/online").await;
    let listed = page["devices"]
        .as_array()
        .and_then(|l| l.iter().find(|e| e["phy_id"] == "dev-seen"))
        .cloned()
        .expect("listed");
    assert_eq!(listed["last_seen"], "2024-05-01T11:59:59.000Z");
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_disconnect_and_an_ack_timeout_show_in_the_answer() {
    let api = TestApi::start().await;
    let mut seed = api.seeder().await;
    let a = srv("ingest-a");
    let gone = phy("gone");
    seed.device(
        &gone,
        &[
            event(&gone, &a, 1, T - 5_000, connected()),
            event(&gone, &a, 1, T, EventKind::Disconnected),
        ],
        None,
    )
    .await;
    let (_, d) = api.get(&format!("/api/devices/gone?now={T}")).await;
    assert_eq!(d["connected"], false);
    assert_eq!(d["ended"], "disconnected");
    assert_eq!(d["ended_at"], "2024-05-01T12:00:00.000Z");
    assert_eq!(d["online"], false);
    assert_eq!(d["reason"], "disconnected");
    assert!(
        d["projected_online"].is_null(),
        "no projection fields: null"
    );
    assert!(d["lag"]["updated_at"].is_null(), "no lag record: null");
    assert!(d["lag"]["age_ms"].is_null(), "no lag record: null");
    assert_eq!(d["lag"]["stale"], true, "no lag record: stale");

    let acky = phy("acky");
    seed.device(
        &acky,
        &[
            event(&acky, &a, 1, T - 5_000, connected()),
            event(&acky, &a, 1, T - 1_000, ack_timeout()),
        ],
        None,
    )
    .await;
    let (_, o) = api
        .get(&format!("/api/devices/acky/online?now={T}&threshold=0.8"))
        .await;
    assert_eq!(o["online"], false);
    assert_eq!(o["reason"], "ack_timeout");
    assert!((f(&o, "score") - 0.7).abs() < 1e-9, "{o}");
    assert_eq!(o["last_ack_timeout"], "2024-05-01T11:59:59.000Z");
    assert_eq!(o["policy"]["threshold"], 0.8);
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_request_policy_reproduces_the_seeds_example() {
    let api = TestApi::start().await;
    let mut seed = api.seeder().await;
    let p = phy("seed-dev");
    let a = srv("ingest-a");
    // Heartbeat, TCP drop and ACK timeout at t (the drop of an older
    // connection, so the device is still connected).
    seed.device(
        &p,
        &[
            event(&p, &a, 1, T - 1_000, connected()),
            event(&p, &a, 2, T - 500, connected()),
            event(&p, &a, 1, T, tcp_down(TcpDownReason::Closed)),
            event(&p, &a, 2, T, EventKind::Heartbeat),
            event(&p, &a, 2, T, ack_timeout()),
        ],
        None,
    )
    .await;
    let policy = "heartbeat_timeout=5m&tcp_down_window=1m&ack_window=1m\
                  &tcp_down_penalty=0.5&ack_timeout_penalty=0.3&threshold=0.5&enabled=true";

    let (status, at10) = api
        .get(&format!(
            "/api/devices/seed-dev/online?{policy}&now={}",
            T + 10_000
        ))
        .await;
    assert_eq!(status, 200, "{at10}");
    assert_eq!(at10["online"], false);
    assert!((f(&at10, "score") - 0.2).abs() < 1e-9, "{at10}");
    assert_eq!(f(&at10["terms"], "heartbeat"), 1.0);
    assert_eq!(f(&at10["terms"], "tcp_down"), -0.5);
    assert_eq!(f(&at10["terms"], "ack_timeout"), -0.3);
    assert_eq!(at10["reason"], "tcp_down:closed");
    assert_eq!(at10["as_of"], "2024-05-01T12:00:10.000Z");
    assert_eq!(at10["next_change"], "2024-05-01T12:01:00.001Z");
    assert_eq!(at10["policy"]["heartbeat_timeout"], "5m");
    assert_eq!(at10["policy"]["tcp_down_penalty"], 0.5);
    assert_eq!(at10["disconnected"], false);

    // Online again at t + 2 min: the windows are over, the heartbeat fresh.
    let (_, at2m) = api
        .get(&format!(
            "/api/devices/seed-dev/online?{policy}&now=2024-05-01T12:02:00Z"
        ))
        .await;
    assert_eq!(at2m["online"], true);
    assert_eq!(f(&at2m, "score"), 1.0);
    assert_eq!(at2m["reason"], "heartbeat_fresh");
    assert_eq!(at2m["next_change"], "2024-05-01T12:05:00.001Z");

    // Policy fields not given come from the config; each can be changed.
    let (_, lenient) = api
        .get(&format!(
            "/api/devices/seed-dev/online?threshold=0.1&now={}",
            T + 10_000
        ))
        .await;
    assert_eq!(lenient["online"], true);
    let (_, disabled) = api
        .get(&format!(
            "/api/devices/seed-dev/online?enabled=false&now={}",
            T + 10_000
        ))
        .await;
    assert_eq!(disabled["online"], true);
    assert_eq!(f(&disabled["terms"], "tcp_down"), 0.0);
    let (_, short) = api
        .get(&format!(
            "/api/devices/seed-dev/online?heartbeat_timeout=5s&now={}",
            T + 10_000
        ))
        .await;
    assert_eq!(short["online"], false);
    assert_eq!(short["reason"], "heartbeat_expired");
    // `+` must be sent as %2B; a decoded space is read as `+` too.
    let (_, offset) = api
        .get("/api/devices/seed-dev/online?now=2024-05-01T14:00:10%2B02:00")
        .await;
    assert_eq!(offset["as_of"], "2024-05-01T12:00:10.000Z");
    let (_, spaced) = api
        .get("/api/devices/seed-dev/online?now=2024-05-01T14:00:10+02:00")
        .await;
    assert_eq!(spaced["as_of"], "2024-05-01T12:00:10.000Z");
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_json_400_and_unknown_things_a_json_404() {
    let api = TestApi::start().await;
    let mut seed = api.seeder().await;
    let p = phy("dev-1");
    seed.device(&p, &[event(&p, &srv("s"), 1, T, connected())], None)
        .await;
    let long = "x".repeat(65);
    let huge = format!("/api/devices/dev-1?now={}", "9".repeat(3000));
    let cases: Vec<(String, &str)> = vec![
        ("/api/devices/a:b".into(), "invalid_phy_id"),
        ("/api/devices/a%20b".into(), "invalid_phy_id"),
        ("/api/devices/a%2Fb".into(), "invalid_phy_id"),
        ("/api/devices/%7Bx%7D/online".into(), "invalid_phy_id"),
        // Reserved: the list route owns the name.
        ("/api/devices/online/online".into(), "invalid_phy_id"),
        (format!("/api/devices/{long}"), "invalid_phy_id"),
        ("/api/devices/%FF%FE".into(), "invalid_path"),
        ("/api/devices/online?limit=abc".into(), "invalid_query"),
        ("/api/devices/online?limit=-1".into(), "invalid_query"),
        (
            "/api/devices/online?limit=99999999999999".into(),
            "invalid_query",
        ),
        ("/api/devices/online?limit=0".into(), "invalid_limit"),
        ("/api/devices/online?limit=1001".into(), "invalid_limit"),
        (
            "/api/devices/online?limit=1&limit=2".into(),
            "invalid_query",
        ),
        ("/api/devices/online?cursor=%%%".into(), "invalid_cursor"),
        ("/api/devices/online?cursor=bm9wZQ".into(), "invalid_cursor"),
        ("/api/devices/online?colour=red".into(), "invalid_query"),
        ("/api/devices/dev-1?now=yesterday".into(), "invalid_query"),
        ("/api/devices/dev-1?now=-5".into(), "invalid_query"),
        ("/api/devices/dev-1?verbose=1".into(), "invalid_query"),
        (
            "/api/devices/dev-1/online?heartbeat_timeout=30".into(),
            "invalid_query",
        ),
        (
            "/api/devices/dev-1/online?ack_window=forever".into(),
            "invalid_query",
        ),
        (
            "/api/devices/dev-1/online?threshold=NaN".into(),
            "invalid_query",
        ),
        (
            "/api/devices/dev-1/online?tcp_down_penalty=inf".into(),
            "invalid_query",
        ),
        (
            "/api/devices/dev-1/online?ack_timeout_penalty=lots".into(),
            "invalid_query",
        ),
        (
            "/api/devices/dev-1/online?enabled=maybe".into(),
            "invalid_query",
        ),
        (
            "/api/devices/dev-1/online?now=9999999999999999".into(),
            "invalid_query",
        ),
        ("/api/devices/dev-1/online?%FF=1".into(), "invalid_query"),
        ("/api/servers?x=1".into(), "invalid_query"),
        ("/api/stats?limit=1".into(), "invalid_query"),
        (huge, "query_too_long"),
    ];
    for (path, code) in &cases {
        assert_eq!(
            api.expect_error(path, Some(READ), 400).await,
            *code,
            "{path}"
        );
    }
    // Unknown device and unknown routes: JSON 404.
    assert_eq!(
        api.expect_error("/api/devices/nobody", Some(READ), 404)
            .await,
        "device_not_found"
    );
    assert_eq!(
        api.expect_error("/api/devices/nobody/online", Some(READ), 404)
            .await,
        "device_not_found"
    );
    for path in ["/nope", "/api/nope", "/api/devices/dev-1/online/x", "/api"] {
        assert_eq!(
            api.expect_error(path, Some(READ), 404).await,
            "not_found",
            "{path}"
        );
    }
    // A wrong method: JSON 405 (PUT is served nowhere).
    let resp = api
        .http
        .put(api.url("/api/devices/dev-1"))
        .bearer_auth(READ)
        .send()
        .await
        .expect("DELETE");
    assert_eq!(resp.status().as_u16(), 405);
    let body: serde_json::Value = resp.json().await.expect("JSON 405");
    assert_eq!(body["error"], "method_not_allowed");
    // A body on a GET over the limit: 413, not 500.
    let resp = api
        .http
        .get(api.url("/api/stats"))
        .bearer_auth(READ)
        .body(vec![b'x'; 200_000])
        .send()
        .await
        .expect("GET with a body");
    assert_eq!(resp.status().as_u16(), 413);
    let body: serde_json::Value = resp.json().await.expect("JSON 413");
    assert_eq!(body["error"], "payload_too_large");
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_routes_need_a_token_and_refuse_without_touching_redis() {
    let mut api = TestApi::start().await;
    let routes = [
        "/api/devices/online",
        "/api/devices/dev-1",
        "/api/devices/dev-1/online",
        "/api/servers",
        "/api/stats",
        "/api/unknown",
    ];
    // Redis commands served, leaving out the health probe's PING and our
    // own INFO: a refused request must not add to them.
    let served = |api: &TestApi| -> u64 {
        api.redis
            .cli()
            .raw(&["INFO", "commandstats"])
            .lines()
            .filter_map(|l| l.strip_prefix("cmdstat_"))
            .filter(|l| !l.starts_with("ping:") && !l.starts_with("info:"))
            .filter_map(|l| {
                l.split("calls=")
                    .nth(1)?
                    .split(',')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum()
    };
    let before = served(&api);
    for path in routes {
        for token in [None, Some("wrong"), Some("")] {
            let (status, headers, body) = api.get_raw(path, token).await;
            assert_eq!(status, 401, "{path} {token:?}: {body}");
            let challenge = headers
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            assert!(challenge.starts_with("Bearer"), "{challenge}");
            assert!(body.contains("\"error\":\"unauthorized\""), "{body}");
        }
        // A non-bearer scheme is refused the same way.
        let resp = api
            .http
            .get(api.url(path))
            .basic_auth("user", Some(READ))
            .send()
            .await
            .expect("GET");
        assert_eq!(resp.status().as_u16(), 401);
    }
    assert_eq!(
        served(&api),
        before,
        "24 refused requests, not one Redis command"
    );
    // The write token reads too (and that does ask Redis: the count works).
    let (status, _) = api.get_as("/api/stats", Some(WRITE)).await;
    assert_eq!(status, 200);
    assert!(
        served(&api) > before,
        "an authorised read is served from Redis"
    );

    // Without Redis, a refused request is still a quick 401 (no Redis call),
    // while an authorised one is a 503.
    api.redis.stop();
    for path in routes {
        let started = std::time::Instant::now();
        let (status, _, _) = api.get_raw(path, Some("wrong")).await;
        assert_eq!(status, 401, "{path}");
        assert!(started.elapsed() < Duration::from_millis(500));
    }
    assert_eq!(
        api.expect_error("/api/stats", Some(READ), 503).await,
        "redis_unavailable"
    );
    api.redis.start_again();
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics_need_a_token_when_open_health_is_false() {
    let api = TestApi::start_with(|c| c.api.open_health = false).await;
    for path in [
        "/health",
        "/health/live",
        "/health/ready",
        "/health/redis",
        "/metrics",
        "/openapi.json",
    ] {
        let (status, _, _) = api.get_raw(path, None).await;
        assert_eq!(status, 401, "{path}");
        let (status, _, _) = api.get_raw(path, Some(READ)).await;
        assert_eq!(status, 200, "{path}");
    }
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_redis_follows_an_outage_without_restarting_the_api() {
    let mut api = TestApi::start().await;
    for path in ["/health", "/health/ready", "/health/live", "/health/redis"] {
        let (status, body) = api.get_as(path, None).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    let (_, body) = api.get_as("/health/redis", None).await;
    assert_eq!(body["status"], "ok");
    assert!(f(&body, "latency_ms") >= 0.0);

    api.redis.stop();
    let started = std::time::Instant::now();
    let (status, body) = api.get_as("/health/redis", None).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "down");
    assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "answers quickly"
    );
    // Liveness stays 200; readiness follows Redis.
    assert_eq!(api.get_as("/health/live", None).await.0, 200);
    eventually(Duration::from_secs(10), "/health/ready 503", || async {
        let (s, b) = api.get_as("/health/ready", None).await;
        if s == 503 { Ok(()) } else { Err((s, b)) }
    })
    .await;
    assert_eq!(
        api.expect_error("/api/devices/online", Some(READ), 503)
            .await,
        "redis_unavailable"
    );

    api.redis.start_again();
    eventually(
        Duration::from_secs(20),
        "/health/redis 200 again",
        || async {
            let (s, b) = api.get_as("/health/redis", None).await;
            if s == 200 && b["status"] == "ok" {
                Ok(())
            } else {
                Err((s, b))
            }
        },
    )
    .await;
    eventually(Duration::from_secs(20), "/api works again", || async {
        let (s, b) = api.get("/api/devices/online").await;
        if s == 200 { Ok(()) } else { Err((s, b)) }
    })
    .await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_and_stats_describe_the_deployment() {
    let api = TestApi::start().await;
    let mut seed = api.seeder().await;
    let now = now_ms();
    seed.instance(&instance_info("ingest-a", 2, now), true)
        .await;
    seed.instance(&instance_info("ingest-b", 0, now - 600_000), false)
        .await;
    let a = srv("ingest-a");
    seed.online_devices("on-", 2, &a, now).await;
    let p = phy("off-1");
    seed.device(
        &p,
        &[
            event(&p, &a, 1, now - 400_000, connected()),
            event(&p, &a, 1, now - 390_000, tcp_down(TcpDownReason::Keepalive)),
        ],
        Some(ProjectedState {
            online: false,
            reason: "heartbeat_expired".into(),
            since: now - 100_000,
            rev: 2,
        }),
    )
    .await;
    seed.lag(&Lag {
        pending: 1,
        undelivered: 2,
        oldest_age_ms: 5,
        added_per_sec: 1500.5,
        applied_per_sec: 1499.0,
        events_applied_per_sec: 250_000.25,
        consumers: 1,
        updated_at_ms: now,
    })
    .await;

    let (status, s) = api.get("/api/servers").await;
    assert_eq!(status, 200, "{s}");
    assert_eq!(s["count"], 2);
    assert_eq!(s["alive"], 1);
    let list = s["servers"].as_array().expect("servers");
    assert_eq!(list[0]["server_id"], "ingest-a");
    assert_eq!(list[0]["alive"], true);
    assert_eq!(list[0]["status"], "running");
    assert_eq!(list[0]["connections"], 2);
    assert_eq!(list[0]["tracked_connections"], 2);
    assert_eq!(list[0]["mqtt_listen"], "127.0.0.1:1883");
    assert_eq!(list[0]["pid"], 4242);
    assert_eq!(list[0]["last_beat"].as_str(), iot_api_time(now).as_deref());
    assert_eq!(list[1]["server_id"], "ingest-b");
    assert_eq!(list[1]["alive"], false);
    assert_eq!(list[1]["tracked_connections"], 0);

    let (status, st) = api.get("/api/stats").await;
    assert_eq!(status, 200, "{st}");
    assert_eq!(st["online"], 2);
    assert_eq!(st["connected"], 2);
    assert_eq!(st["known"], 3);
    assert_eq!(f(&st["entries_per_second"], "added"), 1500.5);
    assert_eq!(f(&st["entries_per_second"], "applied"), 1499.0);
    assert_eq!(f(&st["events_per_second"], "applied"), 250_000.25);
    assert!(
        st["events_per_second"].get("added").is_none(),
        "events appended are not counted: {st}"
    );
    assert_eq!(st["lag"]["entries"], 3);
    assert_eq!(st["lag"]["stale"], false, "{st}");
    assert!(
        st["lag"]["age_ms"]
            .as_i64()
            .is_some_and(|a| (0..10_000).contains(&a)),
        "{st}"
    );
    assert_eq!(st["servers"]["total"], 2);
    assert_eq!(st["servers"]["alive"], 1);
    api.stop().await;
}

fn iot_api_time(ms: i64) -> Option<String> {
    api::timestamp::rfc3339(ms)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_by_route_template() {
    let api = TestApi::start().await;
    let mut seed = api.seeder().await;
    let p = phy("metered-device");
    seed.device(&p, &[event(&p, &srv("s"), 1, T, connected())], None)
        .await;
    assert_eq!(api.get("/api/devices/metered-device").await.0, 200);
    assert_eq!(api.get("/api/devices/bad:id").await.0, 400);
    assert_eq!(api.get_raw("/api/stats", None).await.0, 401);
    assert_eq!(api.get("/no/such/route").await.0, 404);
    let (status, _, text) = api.get_raw("/metrics", None).await;
    assert_eq!(status, 200);
    for needle in [
        r#"iot_api_requests_total{route="/api/devices/{phyID}",method="GET",status="200"}"#,
        r#"iot_api_requests_total{route="/api/devices/{phyID}",method="GET",status="400"}"#,
        r#"iot_api_requests_total{route="/api/stats",method="GET",status="401"}"#,
        r#"iot_api_requests_total{route="unmatched",method="GET",status="404"}"#,
        r#"iot_api_request_duration_seconds_bucket{route="/api/devices/{phyID}",method="GET",status="200",le="0.005"}"#,
        r#"iot_api_errors_total{error="invalid_phy_id"}"#,
        "iot_build_info",
    ] {
        assert!(text.contains(needle), "/metrics lacks {needle}");
    }
    assert!(
        !text.contains("metered-device"),
        "raw paths must not be labels"
    );
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_answers_through_tower_oneshot() {
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    let redis = iot_test_support::RedisServer::start();
    let ctx = context(common::config(&redis)).await;
    let router = api::router(api::AppState::from_context(&ctx));
    let req = axum::http::Request::get("/api/devices/online?limit=5")
        .header("authorization", format!("Bearer {READ}"))
        .body(axum::body::Body::empty())
        .expect("request");
    let resp = router.clone().oneshot(req).await.expect("infallible");
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(json["count"], 0);
    let req = axum::http::Request::get("/api/devices/online")
        .body(axum::body::Body::empty())
        .expect("request");
    let resp = router.oneshot(req).await.expect("infallible");
    assert_eq!(resp.status(), 401);
    ctx.shutdown.cancel();
}

/// The lag record carries its age, and is flagged stale once older than
/// 3 x `projector.lag_interval` (at least 10 s), as when every projector
/// has stopped, in the device answers and in `/api/stats`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lag_record_no_projector_refreshes_is_flagged_stale() {
    let api = TestApi::start().await;
    let mut seed = api.seeder().await;
    let a = srv("ingest-a");
    let p = phy("lagged");
    let now = now_ms();
    seed.device(&p, &[event(&p, &a, 1, now - 1_000, connected())], None)
        .await;
    let lag = |updated_at_ms| Lag {
        pending: 5,
        undelivered: 7,
        oldest_age_ms: 40,
        consumers: 1,
        updated_at_ms,
        ..Lag::default()
    };

    // Fresh: published a moment ago.
    seed.lag(&lag(now_ms())).await;
    for path in [
        "/api/stats",
        "/api/devices/lagged",
        "/api/devices/lagged/online",
    ] {
        let (status, b) = api.get(path).await;
        assert_eq!(status, 200, "{path}: {b}");
        assert_eq!(b["lag"]["stale"], false, "{path}: {b}");
        let age = b["lag"]["age_ms"].as_i64().expect("age_ms");
        assert!((0..10_000).contains(&age), "{path}: {b}");
    }

    // Frozen: the last projector stopped a minute ago, its figures stay.
    let stopped = now_ms() - 60_000;
    seed.lag(&lag(stopped)).await;
    for path in [
        "/api/stats",
        "/api/devices/lagged",
        "/api/devices/lagged/online",
    ] {
        let (status, b) = api.get(path).await;
        assert_eq!(status, 200, "{path}: {b}");
        assert_eq!(b["lag"]["stale"], true, "{path}: {b}");
        assert!(b["lag"]["age_ms"].as_i64() >= Some(60_000), "{path}: {b}");
        assert_eq!(b["lag"]["entries"], 12, "{path}: {b}");
        assert_eq!(
            b["lag"]["updated_at"].as_str(),
            api::timestamp::rfc3339(stopped).as_deref(),
            "{path}: {b}"
        );
    }

    // Published by a host whose clock runs ahead: age 0, not stale.
    seed.lag(&lag(now_ms() + 5_000)).await;
    let (_, b) = api.get("/api/stats").await;
    assert_eq!(b["lag"]["age_ms"], 0, "{b}");
    assert_eq!(b["lag"]["stale"], false, "{b}");
    api.stop().await;
}
