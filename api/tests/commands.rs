//! Downlink commands over HTTP on a private Redis. No ingest runs here: a
//! device is offline, or "connected" to an instance the test plays itself
//! (its owner key and liveness key set, its Pub/Sub channel subscribed, its
//! verdicts written with `CommandStore::transition`), exactly as the ingest
//! does it.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt as _;
use iot_core::control::Control;
use iot_core::registry::Owner;
use iot_core::time::now_ms;
use iot_downlink::command::field;
use iot_downlink::{NewCommand, Status, Transition};
use reqwest::Method;
use serde_json::{Value, json};
use uuid::Uuid;

fn path(phy: &str) -> String {
    format!("/api/devices/{phy}/commands")
}

/// Makes `phy` look connected to `server` with `epoch` (the owner key the
/// ingest writes at CONNECT, and the instance's liveness key), and
/// subscribes to that instance's downlink channel.
async fn owner(api: &TestApi, phy_id: &str, server: &str, epoch: u64) -> redis::aio::PubSub {
    let owner = Owner {
        server_id: srv(server),
        epoch,
    };
    let mut conn = api.conn().await;
    let () = redis::pipe()
        .cmd("SET")
        .arg(api.keys.owner(&phy(phy_id)))
        .arg(owner.format())
        .cmd("SET")
        .arg(api.keys.liveness(&owner.server_id))
        .arg(1)
        .query_async(&mut conn)
        .await
        .expect("seed owner");
    let client = redis::Client::open(api.redis.url()).expect("client");
    let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
    pubsub
        .subscribe(api.keys.downlink_channel(&owner.server_id))
        .await
        .expect("subscribe");
    pubsub
}

/// The next control message on a subscribed channel.
async fn next_control(pubsub: &mut redis::aio::PubSub) -> Control {
    let msg = tokio::time::timeout(Duration::from_secs(5), pubsub.on_message().next())
        .await
        .expect("a message within 5 s")
        .expect("a message");
    let payload: Vec<u8> = msg.get_payload().expect("payload");
    Control::decode(&payload).expect("a control message")
}

fn statuses(history: &Value) -> Vec<String> {
    history
        .as_array()
        .expect("history")
        .iter()
        .map(|c| c["status"].as_str().expect("status").to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_for_an_offline_device_fails_or_waits_in_its_queue() {
    let api = TestApi::start().await;
    let (status, headers, c) = api
        .send(
            Method::POST,
            &path("dev-off"),
            Some(WRITE),
            Some(&json!({"name": "reboot", "payload": "now"})),
        )
        .await;
    assert_eq!(status, 201, "{c}");
    let id = c["id"].as_str().expect("id").to_owned();
    assert_eq!(
        headers.get("location").and_then(|v| v.to_str().ok()),
        Some(format!("/api/commands/{id}").as_str())
    );
    assert_eq!(c["status"], "failed");
    assert_eq!(c["reason"], "offline");
    assert_eq!(c["terminal"], true);
    assert_eq!(c["phy_id"], "dev-off");
    assert_eq!(c["name"], "reboot");
    assert_eq!(c["payload_utf8"], "now");
    assert_eq!(c["payload_base64"], "bm93");
    assert_eq!(c["payload_size"], 3);
    assert_eq!(c["source"], "redis");
    assert!(c["server_id"].is_null());
    let (status, d) = api.get(&format!("/api/commands/{id}")).await;
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["status"], "failed");
    assert_eq!(statuses(&d["history"]), ["failed"]);
    assert_eq!(d["history"][0]["reason"], "offline");

    // With queue_if_offline it waits, and is listed with its history.
    let (status, q) = api
        .post(
            &path("dev-off"),
            &json!({"name": "set-config", "payload": "AP8=", "payload_encoding": "base64",
                    "queue_if_offline": true, "ttl": "10m"}),
        )
        .await;
    assert_eq!(status, 201, "{q}");
    assert_eq!(q["status"], "queued");
    assert_eq!(q["terminal"], false);
    assert!(q["reason"].is_null());
    assert_eq!(q["payload_base64"], "AP8=");
    assert!(q["payload_utf8"].is_null(), "not UTF-8");
    assert_eq!(q["queue_if_offline"], true);
    let created = chrono::DateTime::parse_from_rfc3339(q["created_at"].as_str().expect("created"))
        .expect("RFC 3339");
    let expires = chrono::DateTime::parse_from_rfc3339(q["expires_at"].as_str().expect("expires"))
        .expect("RFC 3339");
    assert_eq!((expires - created).num_seconds(), 600, "ttl 10m");
    let qid = q["id"].as_str().expect("id");
    let (_, d) = api.get(&format!("/api/commands/{qid}")).await;
    assert_eq!(statuses(&d["history"]), ["queued"]);
    assert!(
        d["history"][0]["at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );
    let (status, list) = api.get(&path("dev-off")).await;
    assert_eq!(status, 200, "{list}");
    let ids: Vec<&str> = list["commands"]
        .as_array()
        .expect("commands")
        .iter()
        .map(|c| c["id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, [qid, id.as_str()], "newest first");
    assert!(list["next_cursor"].is_null());
    assert!(
        list["commands"][0].get("history").is_none(),
        "history only when asked: {list}"
    );
    // With history=true each carries its changes, numbered.
    let (status, list) = api.get(&format!("{}?history=true", path("dev-off"))).await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(statuses(&list["commands"][0]["history"]), ["queued"]);
    assert_eq!(statuses(&list["commands"][1]["history"]), ["failed"]);
    assert_eq!(list["commands"][1]["history"][0]["reason"], "offline");
    assert_eq!(list["commands"][1]["history"][0]["seq"], 1);
    assert!(list["commands"][1]["history"][0]["at"].is_string());
    let (status, _) = api.get(&format!("{}?history=false", path("dev-off"))).await;
    assert_eq!(status, 200);
    let code = api
        .expect_error(&format!("{}?history=yes", path("dev-off")), Some(READ), 400)
        .await;
    assert_eq!(code, "invalid_query");
    // It is in the device's offline queue, in Redis.
    let store = api.command_store().await;
    assert_eq!(store.queue_len(&phy("dev-off")).await.expect("len"), 1);

    // `wait` on a command that stays queued answers after the wait.
    let started = Instant::now();
    let (status, w) = api
        .post(
            &path("dev-off"),
            &json!({"name": "ping", "queue_if_offline": true, "wait": "400ms"}),
        )
        .await;
    let took = started.elapsed();
    assert_eq!(status, 201, "{w}");
    assert_eq!(w["status"], "queued");
    assert!(
        took >= Duration::from_millis(400),
        "answered after {took:?}"
    );
    assert!(took < Duration::from_secs(5), "answered after {took:?}");
    // Both wait in the offline queue: the deployment's queue depth.
    let (status, st) = api.get("/api/stats").await;
    assert_eq!(status, 200, "{st}");
    assert_eq!(
        st["commands"],
        json!({"queued": 2, "dispatched": 0, "sent": 0}),
        "{st}"
    );
    // A device without commands has an empty list, not a 404.
    let (status, empty) = api.get(&path("nobody")).await;
    assert_eq!(status, 200);
    assert_eq!(empty["commands"], json!([]));
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_with_wait_answers_when_the_owning_instance_reports_the_ack() {
    let api = TestApi::start().await;
    let mut pubsub = owner(&api, "dev-on", "ingest-x", 7).await;
    let store = api.command_store().await;

    let api_ref = &api;
    let post = async move {
        let started = Instant::now();
        let r = api_ref
            .post(
                &path("dev-on"),
                &json!({"name": "reboot", "payload": "{\"in\": 5}", "wait": "10s"}),
            )
            .await;
        (r, started.elapsed())
    };
    let ingest = async {
        // Act as the ingest holding dev-on: receive the dispatch, send it to
        // the device, get its PUBACK.
        let Control::Command(d) = next_control(&mut pubsub).await else {
            panic!("expected a command");
        };
        assert_eq!(d.phy_id.as_str(), "dev-on");
        assert_eq!(d.epoch, 7);
        assert_eq!(d.name, "reboot");
        assert_eq!(d.payload, b"{\"in\": 5}");
        let sent_at = now_ms();
        let t = Transition::to(Status::Sent)
            .from(&[Status::Dispatched])
            .set(field::ATTEMPTS, 1)
            .set(field::SENT_AT, sent_at);
        assert_eq!(
            store.transition(&d.id, &t, sent_at).await.expect("sent"),
            Some(Status::Dispatched)
        );
        let acked_at = now_ms();
        let t = Transition::to(Status::Acked)
            .from(&[Status::Sent])
            .set(field::ACKED_AT, acked_at);
        assert_eq!(
            store.transition(&d.id, &t, acked_at).await.expect("acked"),
            Some(Status::Sent)
        );
        d.id
    };
    let (((status, c), took), id) = tokio::join!(post, ingest);
    assert_eq!(status, 201, "{c}");
    assert_eq!(c["id"], id.to_string());
    assert_eq!(c["status"], "acked", "{c}");
    assert_eq!(c["terminal"], true);
    assert_eq!(c["server_id"], "ingest-x");
    assert_eq!(c["epoch"], 7);
    assert_eq!(c["attempts"], 1);
    assert_eq!(c["hops"], 0);
    assert!(
        c["sent_at"].as_str().is_some() && c["acked_at"].as_str().is_some(),
        "{c}"
    );
    assert!(
        took < Duration::from_secs(5),
        "answered on the ack, after {took:?}"
    );

    let (_, d) = api.get(&format!("/api/commands/{id}")).await;
    assert_eq!(statuses(&d["history"]), ["dispatched", "sent", "acked"]);
    assert_eq!(d["history"][0]["detail"], "ingest-x epoch 7");

    // Without `wait` the answer is immediate: dispatched.
    let (status, c) = api.post(&path("dev-on"), &json!({"name": "status"})).await;
    assert_eq!(status, 201);
    assert_eq!(c["status"], "dispatched");
    assert!(matches!(
        next_control(&mut pubsub).await,
        Control::Command(_)
    ));
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_s_commands_page_newest_first_through_time_ties() {
    let api = TestApi::start().await;
    let store = api.command_store().await;
    let p = phy("busy");
    // 31 commands over 4 instants, most of them sharing one.
    let base = now_ms() - 60_000;
    let mut made: Vec<(i64, Uuid)> = Vec::new();
    for i in 0..31u32 {
        let at = base
            + match i {
                0..=2 => 0,
                3..=24 => 10,
                25 => 20,
                _ => 30,
            };
        let id = Uuid::now_v7();
        let new = NewCommand {
            phy_id: p.clone(),
            name: format!("c{i}"),
            payload: Vec::new(),
            ttl: Some(Duration::from_secs(3600)),
            queue_if_offline: false,
        };
        store
            .create(id, &new, Status::Failed, Some("offline"), None, at)
            .await
            .expect("create");
        made.push((at, id));
    }
    made.sort_by(|a, b| b.cmp(a));
    let expected: Vec<String> = made.iter().map(|(_, id)| id.to_string()).collect();

    for limit in [1usize, 4, 22, 31, 100] {
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..40 {
            let q = match &cursor {
                None => format!("{}?limit={limit}", path("busy")),
                Some(c) => format!("{}?limit={limit}&cursor={c}", path("busy")),
            };
            let (status, page) = api.get(&q).await;
            assert_eq!(status, 200, "{page}");
            let items = page["commands"].as_array().expect("commands");
            assert!(items.len() <= limit);
            seen.extend(
                items
                    .iter()
                    .map(|c| c["id"].as_str().expect("id").to_owned()),
            );
            match page["next_cursor"].as_str() {
                Some(c) => {
                    assert_eq!(items.len(), limit, "only the last page is short");
                    cursor = Some(c.to_owned());
                }
                None => break,
            }
        }
        let unique: HashSet<&String> = seen.iter().collect();
        assert_eq!(unique.len(), seen.len(), "limit {limit}: duplicates");
        assert_eq!(seen, expected, "limit {limit}: order or omissions");
    }
    // `before` an instant: only older commands.
    let (_, older) = api
        .get(&format!("{}?before={}", path("busy"), base + 10))
        .await;
    assert_eq!(older["commands"].as_array().map(Vec::len), Some(3));
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_commands_are_refused_with_a_clear_answer() {
    let api = TestApi::start_with(|c| c.mqtt.max_packet_size = 200).await;
    let p = path("dev-b");
    let cases: Vec<(Value, u16, &str)> = vec![
        (json!({"name": "a/b"}), 400, "invalid_command"),
        (json!({"name": ""}), 400, "invalid_command"),
        (json!({"name": "x".repeat(65)}), 400, "invalid_command"),
        (json!({"payload": "x"}), 400, "invalid_body"),
        (json!({"name": "n", "colour": 1}), 400, "invalid_body"),
        (json!({"name": "n", "payload": 5}), 400, "invalid_body"),
        (
            json!({"name": "n", "payload_encoding": "hex"}),
            400,
            "invalid_body",
        ),
        (
            json!({"name": "n", "queue_if_offline": "yes"}),
            400,
            "invalid_body",
        ),
        (
            json!({"name": "n", "payload": "!!", "payload_encoding": "base64"}),
            400,
            "invalid_command",
        ),
        (json!({"name": "n", "ttl": "30"}), 400, "invalid_command"),
        (json!({"name": "n", "ttl": "0s"}), 400, "invalid_command"),
        (json!({"name": "n", "ttl": "8d"}), 400, "invalid_command"),
        (json!({"name": "n", "wait": "31s"}), 400, "invalid_command"),
        (json!({"name": "n", "wait": "soon"}), 400, "invalid_command"),
        // 200 - (2 + len("devices/dev-b/down/n") + 2) = 176 bytes fit.
        (
            json!({"name": "n", "payload": "x".repeat(177)}),
            413,
            "payload_too_large",
        ),
    ];
    for (body, status, code) in &cases {
        let (got, err) = api.post(&p, body).await;
        assert_eq!(got, *status, "{body}: {err}");
        assert_eq!(error_code(&err), *code, "{body}");
    }
    let (status, ok) = api
        .post(&p, &json!({"name": "n", "payload": "x".repeat(176)}))
        .await;
    assert_eq!(status, 201, "{ok}");
    assert_eq!(ok["payload_size"], 176);
    let (_, err) = api
        .post(&p, &json!({"name": "n", "payload": "x".repeat(177)}))
        .await;
    assert!(
        err["message"]
            .as_str()
            .is_some_and(|m| m.contains("mqtt.max_packet_size")),
        "{err}"
    );

    // Tokens: none or unknown 401, a read token 403; nothing is created.
    let body = json!({"name": "n"});
    for (token, status, code) in [
        (None, 401, "unauthorized"),
        (Some("nope"), 401, "unauthorized"),
        (Some(READ), 403, "insufficient_scope"),
    ] {
        assert_eq!(
            api.expect_error_of(Method::POST, &p, token, Some(&body), status)
                .await,
            code
        );
    }
    let (_, list) = api.get(&p).await;
    assert_eq!(list["commands"].as_array().map(Vec::len), Some(1), "{list}");

    // Paths and parameters.
    assert_eq!(
        api.expect_error_of(
            Method::POST,
            "/api/devices/a:b/commands",
            Some(WRITE),
            Some(&body),
            400
        )
        .await,
        "invalid_phy_id"
    );
    assert_eq!(
        api.expect_error_of(
            Method::POST,
            &format!("{p}?wait=1s"),
            Some(WRITE),
            Some(&body),
            400
        )
        .await,
        "invalid_query"
    );
    for (q, code) in [
        ("/api/commands/not-a-uuid", "invalid_command_id"),
        ("/api/commands/123", "invalid_command_id"),
        ("/api/devices/dev-b/commands?limit=0", "invalid_limit"),
        ("/api/devices/dev-b/commands?cursor=abc", "invalid_cursor"),
        (
            "/api/devices/dev-b/commands?before=yesterday",
            "invalid_query",
        ),
        ("/api/devices/dev-b/commands?status=acked", "invalid_query"),
    ] {
        assert_eq!(api.expect_error(q, Some(READ), 400).await, code, "{q}");
    }
    // A cursor of another list is refused.
    let other = api::cursor::TimeCursor {
        at: 1,
        id: Uuid::nil(),
    }
    .encode("l1");
    assert_eq!(
        api.expect_error(&format!("{p}?cursor={other}"), Some(READ), 400)
            .await,
        "invalid_cursor"
    );
    assert_eq!(
        api.expect_error(
            &format!("/api/commands/{}", Uuid::now_v7()),
            Some(READ),
            404
        )
        .await,
        "command_not_found"
    );
    // The command log needs PostgreSQL: this api has none.
    assert_eq!(
        api.expect_error("/api/commands?status=acked", Some(READ), 503)
            .await,
        "database_not_configured"
    );
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_log_keeps_every_change_even_two_alike_in_one_millisecond() {
    let api = TestApi::start_with_db().await;
    let archiver = Archiver::start(&api).await;
    let store = api.command_store().await;
    let now = now_ms();
    let new = NewCommand {
        phy_id: phy("dev-log"),
        name: "reboot".into(),
        payload: b"x".to_vec(),
        ttl: None,
        queue_if_offline: false,
    };
    let id = Uuid::now_v7();
    store
        .create(id, &new, Status::Dispatched, None, Some(("srv-l", 1)), now)
        .await
        .expect("create");
    // Waiting under the inflight limit, reported twice in one millisecond
    // (the creation's too), then failed.
    let wait = Transition::to(Status::Dispatched)
        .from(&[Status::Dispatched])
        .reason("inflight_limit");
    for _ in 0..2 {
        assert!(
            store
                .transition(&id, &wait, now)
                .await
                .expect("t")
                .is_some()
        );
    }
    let fail = Transition::to(Status::Failed).reason("device_gone");
    assert!(
        store
            .transition(&id, &fail, now)
            .await
            .expect("t")
            .is_some()
    );
    let db = api.store().await;
    let changes = iot_test_support::eventually(
        Duration::from_secs(20),
        "every change in the command log",
        || async {
            let c = db.command_changes(id).await.map_err(|e| e.to_string())?;
            if c.len() >= 4 {
                Ok(c)
            } else {
                Err(format!("{c:?}"))
            }
        },
    )
    .await;
    let st: Vec<&str> = changes.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(st, ["dispatched", "dispatched", "dispatched", "failed"]);
    archiver.stop().await;
    api.stop().await;
}
