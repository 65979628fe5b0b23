//! PostgreSQL and the api: `iot-api migrate`, the schema check at start,
//! starting without the database, routes without a configured database,
//! and an outage of a private PostgreSQL server during a run.

mod common;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;
use iot_core::time::now_ms;
use iot_test_support::{PgServer, TestDb, eventually, free_port};
use reqwest::Method;
use serde_json::{Value, json};

/// `iot-api migrate` with only `env` set (no config file, no DATABASE_URL
/// from outside, and a Redis URL nobody listens on: it needs no Redis).
fn migrate(env: &[(&str, &str)]) -> Output {
    let redis = format!("redis://127.0.0.1:{}/0", free_port());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_iot-api"));
    cmd.arg("migrate")
        .env_remove("DATABASE_URL")
        .env_remove("IOT_DATABASE_URL")
        .env_remove("IOT_CONFIG")
        .env("REDIS_URL", redis)
        .env("RUST_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run iot-api migrate")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_applies_the_migrations_once_without_redis() {
    let db = TestDb::create().await;
    let store = store(db.url()).await;
    assert!(store.check_schema().await.is_err(), "a fresh database");

    let first = migrate(&[("DATABASE_URL", db.url())]);
    assert!(
        first.status.success(),
        "{}{}",
        text(&first.stdout),
        text(&first.stderr)
    );
    let known = iot_store::MIGRATOR.iter().count();
    assert!(
        text(&first.stdout).contains(&format!("applied {known} migration(s)")),
        "{}",
        text(&first.stdout)
    );
    store.check_schema().await.expect("every migration applied");

    let again = migrate(&[("DATABASE_URL", db.url())]);
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert!(
        text(&again.stdout).contains("applied 0 migration(s)"),
        "{}",
        text(&again.stdout)
    );
}

#[test]
fn migrate_without_a_reachable_database_fails_clearly() {
    let none = migrate(&[]);
    assert_eq!(none.status.code(), Some(1));
    let err = text(&none.stderr);
    assert!(err.contains("DATABASE_URL"), "{err}");
    assert!(err.lines().count() <= 3, "one clear line: {err}");

    let url = format!("postgres://postgres@127.0.0.1:{}/nope", free_port());
    let started = Instant::now();
    let gone = migrate(&[
        ("DATABASE_URL", url.as_str()),
        ("IOT_DATABASE_CONNECT_TIMEOUT", "1s"),
    ]);
    assert_eq!(gone.status.code(), Some(1));
    let err = text(&gone.stderr);
    assert!(err.contains("cannot reach PostgreSQL"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[test]
fn help_lists_migrate_as_scripts_up_expects() {
    let out = Command::new(env!("CARGO_BIN_EXE_iot-api"))
        .arg("--help")
        .output()
        .expect("iot-api --help");
    assert!(out.status.success());
    let help = text(&out.stdout);
    assert!(
        help.lines().any(|l| l.starts_with("  migrate")),
        "scripts/up looks for '^  migrate' in:\n{help}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_refuses_to_start_on_a_schema_without_migrations() {
    let db = TestDb::create().await;
    let redis = iot_test_support::RedisServer::start();
    let mut cfg = config(&redis);
    cfg.database.url = db.url().to_owned();
    let ctx = context(cfg).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let result = tokio::time::timeout(Duration::from_secs(20), api::run(ctx, listener))
        .await
        .expect("run returns at once");
    let err = result.expect_err("refuses to start").to_string();
    assert!(err.contains("iot-api migrate"), "{err}");
    assert!(
        err.contains("devices"),
        "names the missing migrations: {err}"
    );
}

/// Routes that need PostgreSQL, with a request body where they take one.
fn database_routes() -> Vec<(Method, &'static str, Option<Value>)> {
    vec![
        (Method::GET, "/api/devices", None),
        (
            Method::POST,
            "/api/devices",
            Some(json!({"phy_id": "db-dev"})),
        ),
        (
            Method::PATCH,
            "/api/devices/db-dev",
            Some(json!({"enabled": false})),
        ),
        (Method::DELETE, "/api/devices/db-dev", None),
        (Method::GET, "/api/devices/db-dev/events", None),
        (Method::GET, "/api/devices/db-dev/sessions", None),
        (Method::GET, "/api/commands", None),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_database_its_routes_answer_database_not_configured() {
    let api = TestApi::start().await;
    for (method, path, body) in database_routes() {
        assert_eq!(
            api.expect_error_of(method.clone(), path, Some(WRITE), body.as_ref(), 503)
                .await,
            "database_not_configured",
            "{method} {path}"
        );
    }
    let (status, health) = api.get_as("/health", None).await;
    assert_eq!(status, 200, "{health}");
    assert!(health["checks"].get("database").is_none(), "{health}");
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_starts_while_postgres_is_unreachable_and_says_so() {
    let url = format!("postgres://postgres@127.0.0.1:{}/nope", free_port());
    let api = TestApi::start_with(|c| {
        c.database.url = url;
        c.database.connect_timeout = Duration::from_millis(300);
    })
    .await;
    let (status, health) = api.get_as("/health", None).await;
    assert_eq!(status, 503, "{health}");
    assert_eq!(health["checks"]["database"]["status"], "degraded");
    assert!(health["checks"]["database"]["detail"].as_str().is_some());
    assert_eq!(health["checks"]["redis"]["status"], "ok");
    // Ready all the same: presence and commands need Redis only, so a
    // database outage must not pull the api out of a load balancer.
    let (status, ready) = api.get_as("/health/ready", None).await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["checks"]["database"]["status"], "degraded");
    assert_eq!(api.get_as("/health/live", None).await.0, 200);

    for (method, path, body) in database_routes() {
        let started = Instant::now();
        assert_eq!(
            api.expect_error_of(method.clone(), path, Some(WRITE), body.as_ref(), 503)
                .await,
            "database_unavailable",
            "{method} {path}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{method} {path}"
        );
    }
    // Presence and commands need Redis only.
    let mut seed = api.seeder().await;
    let p = phy("db-dev");
    seed.device(&p, &[event(&p, &srv("s"), 1, now_ms(), connected())], None)
        .await;
    let started = Instant::now();
    let (status, d) = api.get("/api/devices/db-dev").await;
    assert_eq!(status, 200, "{d}");
    assert!(d.get("registry").is_none());
    assert!(started.elapsed() < Duration::from_secs(1));
    let (status, c) = api
        .post("/api/devices/db-dev/commands", &json!({"name": "reboot"}))
        .await;
    assert_eq!(status, 201, "{c}");
    // An id Redis does not know cannot be looked up in the log: 503.
    assert_eq!(
        api.expect_error(
            &format!("/api/commands/{}", uuid::Uuid::now_v7()),
            Some(READ),
            503
        )
        .await,
        "database_unavailable"
    );
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_outage_is_a_quick_503_and_the_api_recovers() {
    let mut pg = tokio::task::spawn_blocking(PgServer::start)
        .await
        .expect("start PostgreSQL");
    store(&pg.url()).await.migrate().await.expect("migrate");
    let url = pg.url();
    let api = TestApi::start_with(|c| {
        c.database.url = url;
        c.database.connect_timeout = Duration::from_millis(500);
    })
    .await;
    let (status, _) = api
        .post(
            "/api/devices",
            &json!({"phy_id": "db-dev", "labels": {"k": "v"}}),
        )
        .await;
    assert_eq!(status, 201);
    let mut seed = api.seeder().await;
    let p = phy("db-dev");
    seed.device(&p, &[event(&p, &srv("s"), 1, now_ms(), connected())], None)
        .await;
    let (_, d) = api.get("/api/devices/db-dev").await;
    assert_eq!(d["registry"]["labels"]["k"], "v");
    let (status, health) = api.get_as("/health", None).await;
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["checks"]["database"]["status"], "ok");

    let pg = tokio::task::spawn_blocking(move || {
        pg.stop();
        pg
    })
    .await
    .expect("stop PostgreSQL");
    eventually(
        Duration::from_secs(10),
        "/health shows the outage",
        || async {
            let (s, h) = api.get_as("/health", None).await;
            if s == 503 && h["checks"]["database"]["status"] == "degraded" {
                Ok(())
            } else {
                Err((s, h))
            }
        },
    )
    .await;
    assert_eq!(api.get_as("/health/live", None).await.0, 200);
    let (status, ready) = api.get_as("/health/ready", None).await;
    assert_eq!(status, 200, "ready through a database outage: {ready}");
    assert_eq!(ready["status"], "degraded", "{ready}");
    for (method, path, body) in database_routes() {
        let started = Instant::now();
        assert_eq!(
            api.expect_error_of(method.clone(), path, Some(WRITE), body.as_ref(), 503)
                .await,
            "database_unavailable",
            "{method} {path}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{method} {path} took {:?}",
            started.elapsed()
        );
    }
    // Presence keeps working, quickly, without the registry entry.
    let started = Instant::now();
    let (status, d) = api.get("/api/devices/db-dev").await;
    assert_eq!(status, 200, "{d}");
    assert!(d.get("registry").is_none(), "{d}");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(api.get("/api/devices/online").await.0, 200);
    let (status, _) = api
        .post("/api/devices/db-dev/commands", &json!({"name": "reboot"}))
        .await;
    assert_eq!(status, 201, "commands need Redis only");

    let mut pg = pg;
    let pg = tokio::task::spawn_blocking(move || {
        pg.start_again();
        pg
    })
    .await
    .expect("restart PostgreSQL");
    eventually(Duration::from_secs(20), "/health ok again", || async {
        let (s, h) = api.get_as("/health", None).await;
        if s == 200 { Ok(()) } else { Err((s, h)) }
    })
    .await;
    eventually(
        Duration::from_secs(20),
        "the registry answers again",
        || async {
            let (s, list) = api.get("/api/devices").await;
            if s == 200 && list["devices"][0]["phy_id"] == "db-dev" {
                Ok(())
            } else {
                Err((s, list))
            }
        },
    )
    .await;
    let (_, d) = api.get("/api/devices/db-dev").await;
    assert_eq!(d["registry"]["labels"]["k"], "v", "{d}");
    assert_eq!(
        api.patch("/api/devices/db-dev", &json!({"enabled": false}))
            .await
            .0,
        200
    );
    api.stop().await;
    drop(pg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_comes_back_without_migrations_is_reported_as_such() {
    // A fresh database (no migrations) behind a proxy that is cut at start.
    let db = TestDb::create().await;
    let upstream = db
        .url()
        .rsplit_once('@')
        .and_then(|(_, rest)| rest.split('/').next())
        .expect("host:port in the test database url")
        .to_owned();
    let proxy = iot_test_support::TcpProxy::start(&upstream).await;
    proxy.cut();
    let url = format!("postgres://postgres@{}/{}", proxy.addr(), db.name());
    let api = TestApi::start_with(|c| {
        c.database.url = url;
        c.database.connect_timeout = Duration::from_millis(300);
    })
    .await;
    let (_, health) = api.get_as("/health", None).await;
    assert_eq!(health["checks"]["database"]["status"], "degraded");

    // It answers again, but without the schema: the probe says so (it
    // could not check the schema at start), and so do the routes.
    proxy.restore();
    eventually(
        Duration::from_secs(20),
        "/health names the missing migrations",
        || async {
            let (s, h) = api.get_as("/health", None).await;
            let detail = h["checks"]["database"]["detail"]
                .as_str()
                .unwrap_or_default();
            if s == 503 && detail.contains("migrat") {
                Ok(())
            } else {
                Err((s, h))
            }
        },
    )
    .await;
    let (status, body) = api.get("/api/devices").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "database_unavailable", "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("iot-api migrate"),
        "{body}"
    );
    api.stop().await;
}
