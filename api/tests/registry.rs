//! The device registry over HTTP against a real PostgreSQL (a fresh
//! migrated database per test): register, list with paging and filters,
//! change, delete, and every refusal.

mod common;

use std::collections::HashSet;

use common::*;
use iot_store::devices::Credential;
use reqwest::Method;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_shows_the_secret_once_and_stores_only_its_hash() {
    let api = TestApi::start_with_db().await;
    let (status, headers, reg) = api
        .send(
            Method::POST,
            "/api/devices",
            Some(WRITE),
            Some(&json!({"phy_id": "dev-1", "labels": {"site": "berlin", "model": "t1"}})),
        )
        .await;
    assert_eq!(status, 201, "{reg}");
    assert_eq!(
        headers.get("location").and_then(|v| v.to_str().ok()),
        Some("/api/devices/dev-1")
    );
    assert_eq!(reg["phy_id"], "dev-1");
    assert_eq!(reg["enabled"], true);
    assert_eq!(reg["labels"], json!({"site": "berlin", "model": "t1"}));
    assert!(reg["created_at"].as_str().is_some_and(|t| t.ends_with('Z')));
    let secret = reg["secret"].as_str().expect("secret").to_owned();
    assert_eq!(secret.len(), 43);

    // The secret is the device's password; the database holds its hash only.
    let store = api.store().await;
    let phy = phy("dev-1");
    assert_eq!(
        store
            .check_credentials(&phy, secret.as_bytes())
            .await
            .expect("check"),
        Credential::Valid
    );
    let stored: Vec<u8> =
        sqlx::query_scalar("SELECT secret_hash FROM devices WHERE phy_id = 'dev-1'")
            .fetch_one(store.pool())
            .await
            .expect("row");
    assert_ne!(stored, secret.as_bytes());
    assert_eq!(stored.len(), 32);

    // Never shown again: not in the list, the presence answer or a PATCH.
    let (_, list) = api.get("/api/devices").await;
    let (_, presence) = api.get("/api/devices/dev-1").await;
    let (_, patched) = api
        .patch("/api/devices/dev-1", &json!({"enabled": true}))
        .await;
    for v in [&list, &presence, &patched] {
        assert!(!v.to_string().contains(&secret), "{v}");
    }
    assert!(list["devices"][0].get("secret").is_none());

    // A second registration of the same phyID is a conflict.
    let (status, body) = api.post("/api/devices", &json!({"phy_id": "dev-1"})).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(error_code(&body), "device_exists");
    // A disabled registration.
    let (status, off) = api
        .post(
            "/api/devices",
            &json!({"phy_id": "dev-2", "enabled": false}),
        )
        .await;
    assert_eq!(status, 201, "{off}");
    assert_eq!(off["enabled"], false);
    assert_eq!(off["labels"], json!({}));
    api.stop().await;
}

/// (phyID, site label, tier a, enabled) of a registered test device.
type Registered = (String, &'static str, bool, bool);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_pages_by_phy_id_and_filters() {
    let api = TestApi::start_with_db().await;
    let mut expected: Vec<Registered> = Vec::new();
    for i in 0..23 {
        let phy_id = format!("dev-{i:02}");
        let site = if i % 3 == 0 { "berlin" } else { "hamburg" };
        let body = json!({
            "phy_id": phy_id,
            "labels": {"site": site, "tier": if i % 2 == 0 { "a" } else { "b" }},
            "enabled": i % 5 != 0,
        });
        assert_eq!(api.post("/api/devices", &body).await.0, 201);
        expected.push((phy_id, site, i % 2 == 0, i % 5 != 0));
    }
    assert_eq!(
        api.post("/api/devices", &json!({"phy_id": "other-1"}))
            .await
            .0,
        201
    );

    let walk = |query: String| {
        let api = &api;
        async move {
            let mut seen = Vec::new();
            let mut cursor: Option<String> = None;
            for _ in 0..100 {
                let path = match &cursor {
                    None => format!("/api/devices?{query}"),
                    Some(c) => format!("/api/devices?{query}&cursor={c}"),
                };
                let (status, body) = api.get(&path).await;
                assert_eq!(status, 200, "{path}: {body}");
                for d in body["devices"].as_array().expect("devices") {
                    seen.push(d["phy_id"].as_str().expect("phy_id").to_owned());
                }
                match body["next_cursor"].as_str() {
                    Some(c) => cursor = Some(c.to_owned()),
                    None => return seen,
                }
            }
            panic!("too many pages for {query}");
        }
    };

    let mut all: Vec<String> = expected.iter().map(|e| e.0.clone()).collect();
    all.push("other-1".into());
    for limit in [1, 4, 24, 100] {
        let seen = walk(format!("limit={limit}")).await;
        assert_eq!(seen, all, "limit {limit}: in phyID order, once each");
    }
    let pick = |f: &dyn Fn(&Registered) -> bool| -> Vec<String> {
        expected
            .iter()
            .filter(|e| f(e))
            .map(|e| e.0.clone())
            .collect()
    };
    assert_eq!(
        walk("limit=2&prefix=dev-".into()).await,
        pick(&|_| true),
        "prefix"
    );
    assert_eq!(
        walk("limit=3&enabled=false".into()).await,
        pick(&|e| !e.3),
        "disabled"
    );
    assert_eq!(
        walk("limit=3&labels=site:berlin".into()).await,
        pick(&|e| e.1 == "berlin"),
        "one label"
    );
    assert_eq!(
        walk("labels=site:berlin,tier:a&enabled=true".into()).await,
        pick(&|e| e.1 == "berlin" && e.2 && e.3),
        "two labels and enabled"
    );
    assert!(walk("labels=site:paris".into()).await.is_empty());
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patch_enables_disables_and_relabels_and_delete_removes() {
    let api = TestApi::start_with_db().await;
    let (_, reg) = api
        .post(
            "/api/devices",
            &json!({"phy_id": "dev-p", "labels": {"site": "berlin"}}),
        )
        .await;
    let secret = reg["secret"].as_str().expect("secret").to_owned();
    let store = api.store().await;
    let p = phy("dev-p");

    let (status, d) = api
        .patch("/api/devices/dev-p", &json!({"enabled": false}))
        .await;
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["enabled"], false);
    assert_eq!(d["labels"], json!({"site": "berlin"}), "labels kept");
    assert_eq!(
        store
            .check_credentials(&p, secret.as_bytes())
            .await
            .expect("check"),
        Credential::Disabled
    );

    let (status, d) = api
        .patch(
            "/api/devices/dev-p",
            &json!({"labels": {"site": "hamburg", "x": "1"}}),
        )
        .await;
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["enabled"], false, "enabled kept");
    assert_eq!(d["labels"], json!({"site": "hamburg", "x": "1"}));
    let (status, d) = api
        .patch(
            "/api/devices/dev-p",
            &json!({"enabled": true, "labels": {}}),
        )
        .await;
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["enabled"], true);
    assert_eq!(d["labels"], json!({}));
    assert!(d["updated_at"].as_str() >= d["created_at"].as_str());

    let (status, body) = api.delete("/api/devices/dev-p").await;
    assert_eq!(status, 204);
    assert!(body.is_null(), "204 has no body");
    assert_eq!(
        store
            .check_credentials(&p, secret.as_bytes())
            .await
            .expect("check"),
        Credential::Unknown
    );
    let (status, body) = api.delete("/api/devices/dev-p").await;
    assert_eq!(status, 404);
    assert_eq!(error_code(&body), "device_not_registered");
    let (status, body) = api
        .patch("/api/devices/dev-p", &json!({"enabled": true}))
        .await;
    assert_eq!(status, 404);
    assert_eq!(error_code(&body), "device_not_registered");
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_refusals_are_json_401_403_400_415() {
    let api = TestApi::start_with_db().await;
    let body = json!({"phy_id": "dev-r"});
    // No token, an unknown token: 401. A read token on a write route: 403.
    for (method, path, b) in [
        (Method::POST, "/api/devices", Some(&body)),
        (
            Method::PATCH,
            "/api/devices/dev-r",
            Some(&json!({"enabled": false})),
        ),
        (Method::DELETE, "/api/devices/dev-r", None),
    ] {
        for token in [None, Some("nope")] {
            assert_eq!(
                api.expect_error_of(method.clone(), path, token, b, 401)
                    .await,
                "unauthorized",
                "{method} {path}"
            );
        }
        let (status, headers, err) = api.send(method.clone(), path, Some(READ), b).await;
        assert_eq!(status, 403, "{method} {path}");
        assert_eq!(error_code(&err), "insufficient_scope");
        assert!(
            headers
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("insufficient_scope"))
        );
    }
    assert_eq!(
        api.expect_error("/api/devices", None, 401).await,
        "unauthorized"
    );
    // Nothing was registered by the refused requests.
    let (_, list) = api.get("/api/devices").await;
    assert_eq!(list["devices"], json!([]));

    let long = "k".repeat(65);
    let bad_bodies: Vec<(Value, &str)> = vec![
        (json!({"phy_id": "a b"}), "invalid_phy_id"),
        (json!({"phy_id": ""}), "invalid_phy_id"),
        (json!({"phy_id": "x".repeat(65)}), "invalid_phy_id"),
        (json!({"phy_id": "d", "colour": "red"}), "invalid_body"),
        (json!({"phy_id": 5}), "invalid_body"),
        (json!({}), "invalid_body"),
        (json!([]), "invalid_body"),
        (
            json!({"phy_id": "d", "labels": {"site": 5}}),
            "invalid_body",
        ),
        (json!({"phy_id": "d", "labels": ["a"]}), "invalid_body"),
        (json!({"phy_id": "d", "enabled": "yes"}), "invalid_body"),
        (
            json!({"phy_id": "d", "labels": {"a b": "v"}}),
            "invalid_labels",
        ),
        (
            json!({"phy_id": "d", "labels": {long: "v"}}),
            "invalid_labels",
        ),
        (
            json!({"phy_id": "d", "labels": {"k": "v".repeat(300)}}),
            "invalid_labels",
        ),
    ];
    for (b, code) in &bad_bodies {
        let (status, err) = api.post("/api/devices", b).await;
        assert_eq!(status, 400, "{b}: {err}");
        assert_eq!(error_code(&err), *code, "{b}");
        assert!(err["message"].as_str().is_some_and(|m| m.len() < 600));
    }
    // The message names the field at fault.
    let (_, err) = api
        .post(
            "/api/devices",
            &json!({"phy_id": "d", "labels": {"site": 5}}),
        )
        .await;
    assert!(
        err["message"]
            .as_str()
            .is_some_and(|m| m.contains("labels.site")),
        "{err}"
    );

    // Not JSON: 415; JSON that does not parse, or an empty body: 400.
    for (ct, raw, want) in [
        (None, "{\"phy_id\": \"d\"}", 415),
        (Some("text/plain"), "{\"phy_id\": \"d\"}", 415),
        (Some("application/json"), "{\"phy_id\": ", 400),
        (Some("application/json"), "", 400),
        (Some("application/json"), "{\"phy_id\": \"d\"} x", 400),
    ] {
        let mut req = api
            .http
            .post(api.url("/api/devices"))
            .bearer_auth(WRITE)
            .body(raw);
        if let Some(ct) = ct {
            req = req.header("content-type", ct);
        }
        let resp = req.send().await.expect("POST");
        assert_eq!(resp.status().as_u16(), want, "{ct:?} {raw}");
        let err: Value = resp.json().await.expect("JSON error");
        error_code(&err);
    }

    // PATCH: nothing to change, unknown fields, bad labels, bad phyID.
    for (path, b, code) in [
        ("/api/devices/dev-r", json!({}), "invalid_body"),
        ("/api/devices/dev-r", json!({"secret": "x"}), "invalid_body"),
        (
            "/api/devices/dev-r",
            json!({"labels": {"a:b": "c"}}),
            "invalid_labels",
        ),
        (
            "/api/devices/a:b",
            json!({"enabled": true}),
            "invalid_phy_id",
        ),
    ] {
        let (status, err) = api.patch(path, &b).await;
        assert_eq!(status, 400, "{path} {b}: {err}");
        assert_eq!(error_code(&err), code, "{b}");
    }
    // Bad list parameters.
    for (q, code) in [
        ("limit=0", "invalid_limit"),
        ("enabled=maybe", "invalid_query"),
        ("prefix=a%20b", "invalid_query"),
        ("labels=site", "invalid_labels"),
        ("cursor=bm9wZQ", "invalid_cursor"),
        ("sort=desc", "invalid_query"),
    ] {
        assert_eq!(
            api.expect_error(&format!("/api/devices?{q}"), Some(READ), 400)
                .await,
            code,
            "{q}"
        );
    }
    // Query parameters on write routes are refused too.
    let (status, _) = api.post("/api/devices?force=1", &body).await;
    assert_eq!(status, 400);
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_presence_answer_carries_the_registry_entry() {
    let api = TestApi::start_with_db().await;
    let mut seed = api.seeder().await;
    let a = srv("ingest-a");
    let now = iot_core::time::now_ms();
    let seen = phy("seen-dev");
    seed.device(
        &seen,
        &[event(&seen, &a, 1, now - 1_000, connected())],
        None,
    )
    .await;
    let unregistered = phy("unregistered");
    seed.device(
        &unregistered,
        &[event(&unregistered, &a, 1, now - 1_000, connected())],
        None,
    )
    .await;
    for (p, labels) in [("seen-dev", json!({"site": "b"})), ("never-dev", json!({}))] {
        let (status, _) = api
            .post("/api/devices", &json!({"phy_id": p, "labels": labels}))
            .await;
        assert_eq!(status, 201);
    }
    // The registry entry joins a device with a session.
    let (status, d) = api.get("/api/devices/seen-dev").await;
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["connected"], true);
    assert_eq!(d["registry"]["enabled"], true);
    assert_eq!(d["registry"]["labels"], json!({"site": "b"}));
    assert!(d["registry"]["created_at"].as_str().is_some());
    // Registered, never connected: 200, never seen, with its entry.
    let (status, d) = api.get("/api/devices/never-dev").await;
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["reason"], "never_seen");
    assert_eq!(d["online"], false);
    assert_eq!(d["connected"], false);
    assert_eq!(d["epoch"], 0);
    assert_eq!(d["registry"]["labels"], json!({}));
    // The seed's question answers it the same way.
    let (status, d) = api.get("/api/devices/never-dev/online").await;
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["reason"], "never_seen");
    assert_eq!(d["score"], 0.0);
    assert_eq!(d["online"], false);
    assert_eq!(
        api.expect_error("/api/devices/nobody/online", Some(READ), 404)
            .await,
        "device_not_found"
    );
    // A session without a registry entry: no `registry` field.
    let (status, d) = api.get("/api/devices/unregistered").await;
    assert_eq!(status, 200);
    assert!(d.get("registry").is_none(), "{d}");
    // Neither: 404 as before.
    assert_eq!(
        api.expect_error("/api/devices/nobody", Some(READ), 404)
            .await,
        "device_not_found"
    );
    // Deleted: its presence answer loses the entry.
    assert_eq!(api.delete("/api/devices/seen-dev").await.0, 204);
    let (_, d) = api.get("/api/devices/seen-dev").await;
    assert!(d.get("registry").is_none(), "{d}");
    let names: HashSet<String> = d.as_object().expect("object").keys().cloned().collect();
    assert!(names.contains("lag"));
    api.stop().await;
}

/// An ingest in auth mode `registry` on the api's Redis (same key prefix)
/// and database, in this process.
struct RegistryIngest {
    mqtt: String,
    shutdown: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RegistryIngest {
    async fn start(api: &TestApi) -> Self {
        let mut cfg = api.config.clone();
        cfg.server_id = "ingest-revoke".into();
        cfg.mqtt.auth = iot_core::config::AuthMode::Registry;
        // Long: the periodic re-check cannot be what closes a device here.
        cfg.mqtt.auth_cache_ttl = std::time::Duration::from_secs(60);
        cfg.mqtt.connect_rate_per_ip = 0;
        cfg.shutdown.grace = std::time::Duration::from_secs(5);
        let shutdown = tokio_util::sync::CancellationToken::new();
        let ctx = iot_service::startup::Context::start(cfg, shutdown.clone())
            .await
            .expect("ingest context");
        let mqtt = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let http = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = mqtt.local_addr().expect("addr").to_string();
        let task = tokio::spawn(ingest::run(ctx, mqtt, http));
        // Listening for revocations.
        let conn = api.conn().await;
        let channel = api.keys.auth_revocations();
        iot_test_support::eventually(
            std::time::Duration::from_secs(10),
            "the ingest subscribed to revocations",
            || {
                let mut conn = conn.clone();
                let channel = channel.clone();
                async move {
                    let (_, n): (String, u64) = redis::cmd("PUBSUB")
                        .arg("NUMSUB")
                        .arg(&channel)
                        .query_async(&mut conn)
                        .await
                        .map_err(|e| e.to_string())?;
                    if n >= 1 {
                        Ok(())
                    } else {
                        Err(format!("{n} subscribers"))
                    }
                }
            },
        )
        .await;
        Self {
            mqtt: addr,
            shutdown,
            task,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.expect("ingest task").expect("ingest run");
    }
}

/// A device connected with its secret (rumqttc); events on a channel.
struct Device {
    events: tokio::sync::mpsc::UnboundedReceiver<Result<rumqttc::Event, rumqttc::ConnectionError>>,
    _client: rumqttc::AsyncClient,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Device {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Device {
    /// Connects; returns the device, or the CONNACK refusal.
    async fn connect(
        addr: &str,
        id: &str,
        secret: &str,
    ) -> Result<Self, rumqttc::ConnectReturnCode> {
        let (host, port) = addr.rsplit_once(':').expect("host:port");
        let mut opts = rumqttc::MqttOptions::new(id, host, port.parse().expect("port"));
        opts.set_credentials(id, secret);
        opts.set_keep_alive(std::time::Duration::from_secs(30));
        let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 8);
        let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let ev = eventloop.poll().await;
                let end = ev.is_err();
                if tx.send(ev).is_err() || end {
                    return;
                }
            }
        });
        let first = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            loop {
                match events.recv().await {
                    Some(Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a)))) => {
                        return Ok(a.code);
                    }
                    Some(Ok(_)) => {}
                    Some(Err(rumqttc::ConnectionError::ConnectionRefused(code))) => {
                        return Ok(code);
                    }
                    Some(Err(e)) => return Err(format!("{e}")),
                    None => return Err("event loop ended".into()),
                }
            }
        })
        .await
        .expect("a CONNACK within 10 s")
        .expect("a CONNACK");
        match first {
            rumqttc::ConnectReturnCode::Success => Ok(Self {
                events,
                _client: client,
                task,
            }),
            code => Err(code),
        }
    }

    /// Waits until the server closes the connection.
    async fn closed_within(&mut self, limit: std::time::Duration) {
        tokio::time::timeout(limit, async {
            loop {
                match self.events.recv().await {
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => return,
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("still connected {limit:?} after the change"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_or_delete_over_rest_disconnects_the_device_at_once_and_refuses_it() {
    let api = TestApi::start_with_db().await;
    let ingest = RegistryIngest::start(&api).await;
    let mut secrets = std::collections::HashMap::new();
    for id in ["rev-off", "rev-del", "rev-kept"] {
        let (status, reg) = api.post("/api/devices", &json!({"phy_id": id})).await;
        assert_eq!(status, 201, "{reg}");
        secrets.insert(id, reg["secret"].as_str().expect("secret").to_owned());
    }
    let mut off = Device::connect(&ingest.mqtt, "rev-off", &secrets["rev-off"])
        .await
        .expect("accepted");
    let mut del = Device::connect(&ingest.mqtt, "rev-del", &secrets["rev-del"])
        .await
        .expect("accepted");
    let mut kept = Device::connect(&ingest.mqtt, "rev-kept", &secrets["rev-kept"])
        .await
        .expect("accepted");

    let (status, d) = api
        .patch("/api/devices/rev-off", &json!({"enabled": false}))
        .await;
    assert_eq!(status, 200, "{d}");
    off.closed_within(std::time::Duration::from_secs(1)).await;
    let (status, _) = api.delete("/api/devices/rev-del").await;
    assert_eq!(status, 204);
    del.closed_within(std::time::Duration::from_secs(1)).await;

    // Refused at once, although a fresh "valid" verdict was cached for 60 s.
    for id in ["rev-off", "rev-del"] {
        let started = std::time::Instant::now();
        let refused = Device::connect(&ingest.mqtt, id, &secrets[id]).await.err();
        assert_eq!(
            refused,
            Some(rumqttc::ConnectReturnCode::NotAuthorized),
            "{id}"
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(1),
            "{id}"
        );
    }
    // A relabel revokes nothing.
    let (status, _) = api
        .patch("/api/devices/rev-kept", &json!({"labels": {"a": "b"}}))
        .await;
    assert_eq!(status, 200);
    assert!(
        tokio::time::timeout(
            std::time::Duration::from_millis(300),
            kept.closed_within(std::time::Duration::from_secs(60))
        )
        .await
        .is_err(),
        "the kept device stays connected"
    );
    // Enabled again: it connects again.
    let (status, _) = api
        .patch("/api/devices/rev-off", &json!({"enabled": true}))
        .await;
    assert_eq!(status, 200);
    iot_test_support::eventually(
        std::time::Duration::from_secs(10),
        "re-enabled device connects",
        || async {
            Device::connect(&ingest.mqtt, "rev-off", &secrets["rev-off"])
                .await
                .map(drop)
        },
    )
    .await;
    drop(kept);
    ingest.stop().await;
    api.stop().await;
}
