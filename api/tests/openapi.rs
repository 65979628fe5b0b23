//! The OpenAPI document: it is valid OpenAPI 3, it is what `/openapi.json`
//! serves, and every operation in it is exercised here against a seeded
//! Redis and PostgreSQL, with each answer checked against the documented
//! schema.

mod common;

use std::collections::{BTreeSet, HashSet};

use common::*;
use iot_core::registry::Lag;
use iot_core::time::now_ms;
use iot_core::{EventKind, TcpDownReason};
use serde_json::Value;

/// Every operation the document must hold: a route added to the router
/// (and so to the document) without being added here fails
/// `every_documented_operation_is_exercised`, which requests each of them.
const OPERATIONS: &[(&str, &str)] = &[
    ("get", "/api/devices/online"),
    ("get", "/api/devices/{phyID}"),
    ("patch", "/api/devices/{phyID}"),
    ("delete", "/api/devices/{phyID}"),
    ("get", "/api/devices/{phyID}/online"),
    ("get", "/api/devices"),
    ("post", "/api/devices"),
    ("get", "/api/devices/{phyID}/commands"),
    ("post", "/api/devices/{phyID}/commands"),
    ("get", "/api/commands/{id}"),
    ("get", "/api/commands"),
    ("get", "/api/devices/{phyID}/events"),
    ("get", "/api/devices/{phyID}/sessions"),
    ("get", "/api/servers"),
    ("get", "/api/stats"),
    ("get", "/health"),
    ("get", "/health/live"),
    ("get", "/health/ready"),
    ("get", "/health/redis"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
];

const METHODS: &[&str] = &[
    "get", "put", "post", "delete", "patch", "head", "options", "trace",
];

fn operations(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for m in METHODS {
            if item.get(*m).is_some() {
                out.insert(((*m).to_owned(), path.clone()));
            }
        }
    }
    out
}

fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let name = r
                .strip_prefix("#/components/schemas/")
                .unwrap_or_else(|| panic!("unexpected $ref {r}"));
            let target = &doc["components"]["schemas"][name];
            assert!(!target.is_null(), "dangling $ref {r}");
            resolve(doc, target)
        }
        None => schema,
    }
}

/// Property names an object schema allows (through `allOf`), or `None` if
/// it allows any.
fn allowed(doc: &Value, schema: &Value) -> Option<HashSet<String>> {
    let s = resolve(doc, schema);
    let mut names = HashSet::new();
    let mut any = false;
    if let Some(all) = s.get("allOf").and_then(Value::as_array) {
        for sub in all {
            match allowed(doc, sub) {
                Some(n) => names.extend(n),
                None => any = true,
            }
        }
    }
    if let Some(p) = s.get("properties").and_then(Value::as_object) {
        names.extend(p.keys().cloned());
    } else if s.get("allOf").is_none() {
        any = true;
    }
    if s.get("additionalProperties")
        .is_some_and(|a| a != &Value::Bool(false))
    {
        any = true;
    }
    (!any).then_some(names)
}

fn type_ok(t: &str, v: &Value) -> bool {
    match t {
        "null" => v.is_null(),
        "string" => v.is_string(),
        "boolean" => v.is_boolean(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "array" => v.is_array(),
        "object" => v.is_object(),
        other => panic!("unknown schema type {other}"),
    }
}

/// Checks `v` against `schema`: types, required and unknown properties,
/// array items, map values, `allOf` and `oneOf`.
fn check(doc: &Value, schema: &Value, v: &Value, at: &str, errors: &mut Vec<String>) {
    check_inner(doc, schema, v, at, errors, true);
}

/// `strict`: also refuse properties the schema does not name (false for the
/// parts of an `allOf`, whose union is checked by the caller).
fn check_inner(
    doc: &Value,
    schema: &Value,
    v: &Value,
    at: &str,
    errors: &mut Vec<String>,
    strict: bool,
) {
    let s = resolve(doc, schema);
    if let Some(one) = s.get("oneOf").and_then(Value::as_array) {
        let ok = one.iter().any(|sub| {
            let mut e = Vec::new();
            check(doc, sub, v, at, &mut e);
            e.is_empty()
        });
        if !ok {
            errors.push(format!("{at}: matches no oneOf alternative: {v}"));
        }
        return;
    }
    if let Some(all) = s.get("allOf").and_then(Value::as_array) {
        for sub in all {
            check_inner(doc, sub, v, at, errors, false);
        }
    }
    match s.get("type") {
        Some(Value::String(t)) if !type_ok(t, v) => errors.push(format!("{at}: not {t}: {v}")),
        Some(Value::Array(ts)) if !ts.iter().any(|t| type_ok(t.as_str().unwrap_or(""), v)) => {
            errors.push(format!("{at}: not any of {ts:?}: {v}"))
        }
        _ => {}
    }
    if let Some(obj) = v.as_object() {
        if let Some(req) = s.get("required").and_then(Value::as_array) {
            for r in req.iter().filter_map(Value::as_str) {
                if !obj.contains_key(r) {
                    errors.push(format!("{at}: required {r} missing"));
                }
            }
        }
        if let Some(props) = s.get("properties").and_then(Value::as_object) {
            for (k, sub) in props {
                if let Some(x) = obj.get(k) {
                    check(doc, sub, x, &format!("{at}.{k}"), errors);
                }
            }
        }
        if let Some(extra) = s.get("additionalProperties").filter(|a| a.is_object()) {
            for (k, x) in obj {
                check(doc, extra, x, &format!("{at}.{k}"), errors);
            }
        }
        if let Some(names) = allowed(doc, schema).filter(|_| strict) {
            for k in obj.keys() {
                if !names.contains(k) {
                    errors.push(format!("{at}: undocumented property {k}"));
                }
            }
        }
    }
    if let (Some(items), Some(arr)) = (s.get("items"), v.as_array()) {
        for (i, x) in arr.iter().enumerate() {
            check(doc, items, x, &format!("{at}[{i}]"), errors);
        }
    }
}

async fn seeded_api() -> TestApi {
    let api = TestApi::start_with_db().await;
    let mut seed = api.seeder().await;
    let now = now_ms();
    let a = srv("ingest-a");
    seed.instance(&instance_info("ingest-a", 3, now), true)
        .await;
    seed.instance(&instance_info("ingest-gone", 0, now - 900_000), false)
        .await;
    seed.online_devices("doc-", 3, &a, now).await;
    let p = phy("doc-dev");
    seed.device(
        &p,
        &[
            event(&p, &a, 1, now - 90_000, connected()),
            event(&p, &a, 1, now - 60_000, tcp_down(TcpDownReason::Keepalive)),
            event(&p, &a, 2, now - 50_000, connected()),
            event(&p, &a, 2, now - 1_000, EventKind::Heartbeat),
            event(&p, &a, 2, now - 500, ack_timeout()),
        ],
        Some(ProjectedState {
            online: true,
            reason: "heartbeat_fresh".into(),
            since: now - 50_000,
            rev: 4,
        }),
    )
    .await;
    seed.lag(&Lag {
        pending: 1,
        undelivered: 0,
        oldest_age_ms: 3,
        added_per_sec: 12.5,
        applied_per_sec: 12.5,
        events_applied_per_sec: 800.0,
        consumers: 1,
        updated_at_ms: now,
    })
    .await;
    // PostgreSQL: registered devices, and archived events of doc-dev.
    for phy_id in ["doc-dev", "doc-del"] {
        let (status, body) = api
            .post(
                "/api/devices",
                &serde_json::json!({"phy_id": phy_id, "labels": {"site": "doc"}}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
    }
    let store = api.store().await;
    let rows: Vec<iot_store::archive::ArchivedEvent> = [
        event(&p, &a, 1, now - 90_000, connected()),
        event(&p, &a, 1, now - 60_000, tcp_down(TcpDownReason::Keepalive)),
        event(&p, &a, 2, now - 50_000, connected()),
    ]
    .into_iter()
    .enumerate()
    .flat_map(|(i, e)| {
        iot_store::archive::ArchivedEvent::from_entry(
            "stream:events:{0}",
            &format!("{}-{i}", now - 90_000),
            iot_core::Entry::Event(e),
        )
    })
    .collect();
    store.archive(&rows, &[]).await.expect("archive events");
    api
}

/// How the test exercises one operation: the path with its parameters
/// filled in, a body, the success status, and the path of a 404 if the
/// operation has one.
struct Plan {
    concrete: String,
    body: Option<Value>,
    ok: u16,
    missing: Option<String>,
}

fn plan(method: &str, path: &str, command_id: &str) -> Plan {
    let fill = |phy: &str| path.replace("{phyID}", phy).replace("{id}", command_id);
    let (concrete, body, ok) = match (method, path) {
        ("post", "/api/devices") => (
            fill("doc-dev"),
            Some(serde_json::json!({"phy_id": "doc-new", "labels": {"k": "v"}})),
            201,
        ),
        ("post", _) => (
            fill("doc-dev"),
            Some(serde_json::json!({"name": "reboot", "payload": "now", "queue_if_offline": true})),
            201,
        ),
        ("patch", _) => (
            fill("doc-dev"),
            Some(serde_json::json!({"labels": {"site": "doc", "x": "y"}})),
            200,
        ),
        ("delete", _) => (fill("doc-del"), None, 204),
        _ => (fill("doc-dev"), None, 200),
    };
    let missing = match (method, path) {
        ("get", "/api/devices/{phyID}")
        | ("get", "/api/devices/{phyID}/online")
        | ("patch", "/api/devices/{phyID}")
        | ("delete", "/api/devices/{phyID}") => Some(path.replace("{phyID}", "no-such-device")),
        ("get", "/api/commands/{id}") => Some(format!("/api/commands/{}", uuid::Uuid::now_v7())),
        _ => None,
    };
    Plan {
        concrete,
        body,
        ok,
        missing,
    }
}

fn response_schema<'a>(doc: &'a Value, method: &str, path: &str, status: u16) -> Option<&'a Value> {
    let resp = &doc["paths"][path][method]["responses"][status.to_string()];
    assert!(
        !resp.is_null(),
        "{method} {path}: status {status} is not documented"
    );
    resp["content"]["application/json"].get("schema")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn served_document_is_the_generated_one_and_parses_as_openapi_3() {
    let api = TestApi::start().await;
    let (status, headers, text) = api.get_raw("/openapi.json", None).await;
    assert_eq!(status, 200);
    assert_eq!(
        headers.get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
    let served: Value = serde_json::from_str(&text).expect("JSON");
    let generated = serde_json::to_value(api::openapi()).expect("serialise");
    assert_eq!(served, generated);

    let spec = oas3::from_json(&text).expect("the document deserialises as OpenAPI 3.1");
    let version = spec
        .validate_version()
        .expect("a supported OpenAPI version");
    assert_eq!(version.major, 3);
    let mut n = 0;
    for (path, method, op) in spec.operations() {
        n += 1;
        op.parameters(&spec)
            .unwrap_or_else(|e| panic!("{method} {path}: parameters do not resolve: {e}"));
        let responses = op.responses(&spec);
        assert!(
            responses.keys().any(|k| k.starts_with('2')),
            "{method} {path}: no 2xx"
        );
        if method != reqwest::Method::GET {
            assert!(responses.contains_key("403"), "{method} {path}: no 403");
        }
        if path.starts_with("/api/") {
            assert!(responses.contains_key("401"), "{method} {path}: no 401");
            assert!(
                op.security.iter().any(|s| s.0.contains_key("bearer")),
                "{method} {path}: no bearer security"
            );
        }
    }
    assert_eq!(n, OPERATIONS.len());
    api.stop().await;
}

/// The reference validator (openapi-spec-validator, Python) checks the
/// document against the OpenAPI 3.1 meta-schema.
#[test]
fn document_passes_the_openapi_spec_validator() {
    let dir = tempfile_dir();
    let file = dir.join("openapi.json");
    std::fs::write(&file, api::openapi().to_pretty_json().expect("JSON")).expect("write");
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys, json\n\
             from openapi_spec_validator import validate\n\
             validate(json.load(open(sys.argv[1])))\n\
             print('valid')",
        ])
        .arg(&file)
        .output()
        .expect("run python3 (needed to validate the OpenAPI document)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("No module named"),
        "install the validator: pip install openapi-spec-validator\n{stderr}"
    );
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("valid"),
        "openapi-spec-validator rejects the document:\n{stderr}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

fn tempfile_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("iot-api-openapi-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_operation_is_exercised() {
    let api = seeded_api().await;
    let doc = serde_json::to_value(api::openapi()).expect("serialise");
    let documented = operations(&doc);
    let listed: BTreeSet<(String, String)> = OPERATIONS
        .iter()
        .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
        .collect();
    assert_eq!(
        documented, listed,
        "the document and this test's list differ: add a test for each new route"
    );

    // A command to read back, and the command log filled by the archiver.
    let archiver = Archiver::start(&api).await;
    let (status, cmd) = api
        .post(
            "/api/devices/doc-dev/commands",
            &serde_json::json!({"name": "status", "payload": "AP8=", "payload_encoding": "base64"}),
        )
        .await;
    assert_eq!(status, 201, "{cmd}");
    let command_id = cmd["id"].as_str().expect("id").to_owned();
    iot_test_support::eventually(
        std::time::Duration::from_secs(20),
        "the command log holds the command",
        || async {
            let (_, log) = api.get("/api/commands").await;
            if log["commands"].as_array().is_some_and(|c| !c.is_empty()) {
                Ok(())
            } else {
                Err(log)
            }
        },
    )
    .await;

    for (method, path) in &documented {
        let m = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
        let p = plan(method, path, &command_id);
        let concrete = &p.concrete;
        let is_api = path.starts_with("/api/");
        let token = if m == reqwest::Method::GET {
            READ
        } else {
            WRITE
        };
        let (status, headers, body) =
            send_raw(&api, m.clone(), concrete, Some(token), p.body.as_ref()).await;
        assert_eq!(status, p.ok, "{method} {concrete}: {body:.500}");
        match response_schema(&doc, method, path, p.ok) {
            Some(schema) => {
                let v: Value = serde_json::from_str(&body).expect("JSON body");
                let mut errors = Vec::new();
                check(&doc, schema, &v, path, &mut errors);
                assert!(errors.is_empty(), "{method} {concrete}: {errors:#?}\n{v:#}");
                // Lists must hold items, so their item schema is checked too.
                for (k, x) in v.as_object().into_iter().flatten() {
                    if let Some(items) = x.as_array() {
                        assert!(!items.is_empty(), "{method} {concrete}: {k} is empty: {v}");
                    }
                }
            }
            None if p.ok == 204 => assert!(body.is_empty(), "{method} {path}: 204 with a body"),
            None => {
                let ct = headers
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                assert!(ct.starts_with("text/plain"), "{path}: {ct}");
                assert!(body.contains("iot_"), "{path}");
            }
        }

        // The documented error answers have the documented shape.
        let mut errors_tried = Vec::new();
        if is_api {
            errors_tried.push((
                send_raw(&api, m.clone(), concrete, None, p.body.as_ref()).await,
                401,
            ));
            errors_tried.push((
                send_raw(
                    &api,
                    m.clone(),
                    &format!("{concrete}?bogus=1"),
                    Some(token),
                    p.body.as_ref(),
                )
                .await,
                400,
            ));
            if m != reqwest::Method::GET {
                errors_tried.push((
                    send_raw(&api, m.clone(), concrete, Some(READ), p.body.as_ref()).await,
                    403,
                ));
            }
            if p.body.is_some() {
                let bad = serde_json::json!({"bogus": 1});
                errors_tried.push((
                    send_raw(&api, m.clone(), concrete, Some(token), Some(&bad)).await,
                    400,
                ));
            }
        }
        if let Some(missing) = &p.missing {
            errors_tried.push((
                send_raw(&api, m.clone(), missing, Some(token), p.body.as_ref()).await,
                404,
            ));
        }
        for ((status, _, body), want) in errors_tried {
            assert_eq!(status, want, "{method} {path}: {body}");
            let schema = response_schema(&doc, method, path, want).expect("a JSON error schema");
            let v: Value = serde_json::from_str(&body).expect("JSON error");
            let mut errors = Vec::new();
            check(&doc, schema, &v, path, &mut errors);
            assert!(errors.is_empty(), "{method} {path} {want}: {errors:#?}");
        }
    }
    archiver.stop().await;
    api.stop().await;
}

/// Any request: status, headers and the body text.
async fn send_raw(
    api: &TestApi,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> (u16, reqwest::header::HeaderMap, String) {
    let mut req = api.http.request(method.clone(), api.url(path));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(b);
    }
    let resp = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.text().await.expect("body"))
}

#[test]
fn the_schema_check_catches_mismatches() {
    let doc = serde_json::to_value(api::openapi()).expect("serialise");
    let schema = serde_json::json!({"$ref": "#/components/schemas/DeviceInfo"});
    let good = serde_json::json!({
        "phy_id": "d", "conn_id": null, "server_id": null, "epoch": 1, "connected": true,
        "connected_at": null, "ended": null, "ended_at": null, "last_seen": null,
        "last_tcp_down": null, "last_tcp_down_reason": null, "last_ack_timeout": null,
        "online": false, "score": 0.0, "terms": {"heartbeat": 0.0, "tcp_down": 0.0, "ack_timeout": 0.0},
        "threshold": 0.5, "reason": "never_seen", "next_change": null,
        "projected_online": null, "projected_reason": null, "since": null, "rev": null,
        "as_of": "2024-05-01T12:00:00.000Z",
        "lag": {"entries": 0, "pending": 0, "undelivered": 0, "oldest_age_ms": 0, "consumers": 0, "updated_at": null, "age_ms": null, "stale": true}
    });
    let mut errors = Vec::new();
    check(&doc, &schema, &good, "good", &mut errors);
    assert!(errors.is_empty(), "{errors:#?}");
    for (mutate, what) in [
        ("extra", "undocumented"),
        ("epoch", "not"),
        ("score", "required"),
        ("terms", "required"),
    ] {
        let mut bad = good.clone();
        let o = bad.as_object_mut().expect("object");
        match mutate {
            "extra" => {
                o.insert("surprise".into(), Value::Bool(true));
            }
            "epoch" => {
                o.insert("epoch".into(), Value::String("one".into()));
            }
            "terms" => {
                o["terms"]
                    .as_object_mut()
                    .expect("terms")
                    .remove("heartbeat");
            }
            k => {
                o.remove(k);
            }
        }
        let mut errors = Vec::new();
        check(&doc, &schema, &bad, "bad", &mut errors);
        assert!(
            errors.iter().any(|e| e.contains(what)),
            "{mutate}: {errors:#?}"
        );
    }
}
