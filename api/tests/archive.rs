//! What the api reads from the PostgreSQL archive, written by the real
//! archiver (`iot_store::archiver::run`) from the Redis streams: a device's
//! events and sessions, and the command log.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use iot_core::event::{ENTRY_FIELD, Entry, Event, EventKind, Heartbeat, HeartbeatBatch};
use iot_core::keys::shard_of;
use iot_core::time::now_ms;
use iot_core::{PhyId, TcpDownReason};
use iot_downlink::command::field;
use iot_downlink::{Status, Transition};
use iot_store::archive::ArchivedEvent;
use iot_test_support::eventually;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);

/// Appends `entry` to `phy`'s event shard; returns the rows the archive
/// gets from it for `phy`: (ts ms, stream, entry id, seq, kind).
async fn append(
    api: &TestApi,
    conn: &mut redis::aio::MultiplexedConnection,
    phy: &PhyId,
    entry: Entry,
) -> Vec<(i64, String, String, i32, &'static str)> {
    let stream = api
        .keys
        .events(shard_of(phy.as_str(), api.config.streams.shards));
    let id: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg(ENTRY_FIELD)
        .arg(entry.encode())
        .query_async(conn)
        .await
        .expect("XADD");
    ArchivedEvent::from_entry(&stream, &id, entry)
        .into_iter()
        .filter(|r| r.phy_id == phy.as_str())
        .map(|r| (r.ts_ms, r.stream, r.entry_id, r.seq, r.kind))
        .collect()
}

/// Follows `next_cursor` from `first` (a path with a query) to the end;
/// returns every item of `key`.
async fn walk(api: &TestApi, first: &str, key: &str) -> Vec<Value> {
    let mut all = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..500 {
        let path = match &cursor {
            None => first.to_owned(),
            Some(c) => format!("{first}&cursor={c}"),
        };
        let (status, page) = api.get(&path).await;
        assert_eq!(status, 200, "{path}: {page}");
        all.extend(page[key].as_array().expect("items").iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return all,
        }
    }
    panic!("too many pages: {first}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_through_the_archived_events_and_sessions() {
    let api = TestApi::start_with_db().await;
    let archiver = Archiver::start(&api).await;
    let mut conn = api.conn().await;
    let me = phy("hist-1");
    let other = phy("hist-2");
    let a = srv("ingest-a");
    let t0 = now_ms() - 3_600_000;
    let mut expected = Vec::new();
    let reasons = [
        TcpDownReason::Closed,
        TcpDownReason::Reset,
        TcpDownReason::Keepalive,
        TcpDownReason::Takeover,
    ];
    // 12 connections: connect, heartbeats (batched with another device,
    // some at the same instant), an end (a drop or a clean disconnect);
    // the last one stays up.
    for epoch in 1..=12u64 {
        let start = t0 + epoch as i64 * 60_000;
        let ev = |ts, kind| Event {
            phy_id: me.clone(),
            conn_id: conn_id(&me, epoch),
            server_id: a.clone(),
            epoch,
            ts_ms: ts,
            kind,
        };
        expected.extend(append(&api, &mut conn, &me, Entry::Event(ev(start, connected()))).await);
        for k in 0..3 {
            let beats = HeartbeatBatch {
                server_id: a.clone(),
                beats: vec![
                    Heartbeat {
                        phy_id: other.clone(),
                        conn_id: conn_id(&other, 1),
                        epoch: 1,
                        ts_ms: start + 1_000,
                    },
                    Heartbeat {
                        phy_id: me.clone(),
                        conn_id: conn_id(&me, epoch),
                        epoch,
                        // Two batches at the same instant: ties on time.
                        ts_ms: start + 1_000 + (k / 2) * 1_000,
                    },
                ],
            };
            expected.extend(append(&api, &mut conn, &me, Entry::Heartbeats(beats)).await);
        }
        if epoch < 12 {
            let end = start + 30_000 + epoch as i64;
            let kind = if epoch % 5 == 0 {
                EventKind::Disconnected
            } else {
                EventKind::TcpDown {
                    reason: reasons[epoch as usize % reasons.len()],
                }
            };
            expected.extend(append(&api, &mut conn, &me, Entry::Event(ev(end, kind))).await);
        }
        let noise = Event {
            phy_id: other.clone(),
            conn_id: conn_id(&other, 1),
            server_id: a.clone(),
            epoch: 1,
            ts_ms: start + 5,
            kind: EventKind::Heartbeat,
        };
        append(&api, &mut conn, &other, Entry::Event(noise)).await;
    }
    // Newest first: time, then stream, entry id and position descending.
    expected.sort_by(|x, y| (y.0, &y.1, &y.2, y.3).cmp(&(x.0, &x.1, &x.2, x.3)));
    let key = |v: &Value| {
        (
            v["entry_id"].as_str().expect("entry_id").to_owned(),
            v["seq"].as_i64().expect("seq") as i32,
        )
    };
    let expected_keys: Vec<(String, i32)> = expected.iter().map(|e| (e.2.clone(), e.3)).collect();

    let everything = "/api/devices/hist-1/events?limit=1000";
    eventually(WAIT, "every event archived", || async {
        let (_, page) = api.get(everything).await;
        let n = page["events"].as_array().map_or(0, Vec::len);
        if n == expected.len() { Ok(()) } else { Err(n) }
    })
    .await;

    for limit in [1, 7, 1000] {
        let seen = walk(
            &api,
            &format!("/api/devices/hist-1/events?limit={limit}"),
            "events",
        )
        .await;
        let keys: Vec<(String, i32)> = seen.iter().map(key).collect();
        let unique: HashSet<&(String, i32)> = keys.iter().collect();
        assert_eq!(unique.len(), keys.len(), "limit {limit}: duplicates");
        assert_eq!(keys, expected_keys, "limit {limit}: order or omissions");
        assert!(seen.iter().all(|e| e["server_id"] == "ingest-a"));
    }
    let first = &walk(&api, "/api/devices/hist-1/events?limit=1", "events").await[0];
    assert_eq!(first["kind"], "heartbeat");
    assert!(first["ts"].as_str().is_some_and(|t| t.ends_with('Z')));

    // Only some kinds.
    let picked = walk(
        &api,
        "/api/devices/hist-1/events?limit=5&kinds=connected,tcp_down",
        "events",
    )
    .await;
    let want: Vec<(String, i32)> = expected
        .iter()
        .filter(|e| e.4 == "connected" || e.4 == "tcp_down")
        .map(|e| (e.2.clone(), e.3))
        .collect();
    assert_eq!(picked.iter().map(key).collect::<Vec<_>>(), want);
    assert_eq!(want.len(), 12 + 9, "12 connects, 9 drops");
    let drop = picked
        .iter()
        .find(|e| e["kind"] == "tcp_down")
        .expect("a drop");
    assert!(drop["detail"]["reason"].as_str().is_some(), "{drop}");
    let connect = picked
        .iter()
        .find(|e| e["kind"] == "connected")
        .expect("a connect");
    assert_eq!(connect["detail"]["peer"], "127.0.0.1:5000");

    // Sessions: newest epoch first, with how and when each ended.
    for limit in [1, 5, 100] {
        let sessions = walk(
            &api,
            &format!("/api/devices/hist-1/sessions?limit={limit}"),
            "sessions",
        )
        .await;
        let epochs: Vec<i64> = sessions
            .iter()
            .map(|s| s["epoch"].as_i64().expect("epoch"))
            .collect();
        assert_eq!(
            epochs,
            (1..=12).rev().collect::<Vec<i64>>(),
            "limit {limit}"
        );
    }
    let sessions = walk(&api, "/api/devices/hist-1/sessions?limit=100", "sessions").await;
    let open = &sessions[0];
    assert!(
        open["ended_at"].is_null() && open["end_reason"].is_null() && open["duration_ms"].is_null()
    );
    assert!(open["connected_at"].as_str().is_some());
    for s in &sessions[1..] {
        let epoch = s["epoch"].as_i64().expect("epoch");
        assert_eq!(s["duration_ms"], 30_000 + epoch, "{s}");
        let want = if epoch % 5 == 0 {
            "disconnected".to_owned()
        } else {
            reasons[epoch as usize % reasons.len()].as_str().to_owned()
        };
        assert_eq!(s["end_reason"], want.as_str(), "{s}");
        assert_eq!(s["conn_id"], conn_id(&me, epoch as u64).to_string());
        assert_eq!(s["keepalive_secs"], 30);
    }
    // A device without history: empty pages.
    let (status, none) = api.get("/api/devices/nobody/events").await;
    assert_eq!(status, 200);
    assert_eq!(none["events"], json!([]));
    assert!(none["next_cursor"].is_null());
    let (_, none) = api.get("/api/devices/nobody/sessions").await;
    assert_eq!(none["sessions"], json!([]));
    // Bad parameters.
    for (q, code) in [
        ("/api/devices/hist-1/events?kinds=online", "invalid_query"),
        ("/api/devices/hist-1/events?limit=1001", "invalid_limit"),
        ("/api/devices/hist-1/events?cursor=eHl6", "invalid_cursor"),
        ("/api/devices/hist-1/sessions?cursor=eHl6", "invalid_cursor"),
        (
            "/api/devices/hist-1/sessions?kinds=connected",
            "invalid_query",
        ),
    ] {
        assert_eq!(api.expect_error(q, Some(READ), 400).await, code, "{q}");
    }
    archiver.stop().await;
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_log_is_queryable_by_status_and_device() {
    let api = TestApi::start_with_db().await;
    let archiver = Archiver::start(&api).await;
    let store = api.command_store().await;
    let mut failed = Vec::new();
    for i in 0..3 {
        let (s, c) = api
            .post(
                "/api/devices/log-a/commands",
                &json!({"name": format!("c{i}")}),
            )
            .await;
        assert_eq!(s, 201);
        failed.push(c["id"].as_str().expect("id").to_owned());
    }
    let mut queued = Vec::new();
    for i in 0..2 {
        let (_, c) = api
            .post(
                "/api/devices/log-b/commands",
                &json!({"name": format!("q{i}"), "queue_if_offline": true}),
            )
            .await;
        assert_eq!(c["status"], "queued");
        queued.push(c["id"].as_str().expect("id").to_owned());
    }
    // One acked: dispatched to a (simulated) owner that reports the ack.
    let mut pipe = redis::pipe();
    pipe.cmd("SET")
        .arg(api.keys.owner(&phy("log-c")))
        .arg("ingest-z 3")
        .cmd("SET")
        .arg(api.keys.liveness(&srv("ingest-z")))
        .arg(1);
    let () = pipe
        .query_async(&mut api.conn().await)
        .await
        .expect("owner");
    let client = redis::Client::open(api.redis.url()).expect("client");
    let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
    pubsub
        .subscribe(api.keys.downlink_channel(&srv("ingest-z")))
        .await
        .expect("subscribe");
    let (_, c) = api
        .post(
            "/api/devices/log-c/commands",
            &json!({"name": "reboot", "payload": "p"}),
        )
        .await;
    assert_eq!(c["status"], "dispatched");
    let acked: uuid::Uuid = c["id"].as_str().expect("id").parse().expect("uuid");
    let now = now_ms();
    for (t, at) in [
        (
            Transition::to(Status::Sent)
                .set(field::ATTEMPTS, 1)
                .set(field::SENT_AT, now),
            now,
        ),
        (
            Transition::to(Status::Acked).set(field::ACKED_AT, now + 1),
            now + 1,
        ),
    ] {
        assert!(store.transition(&acked, &t, at).await.expect("t").is_some());
    }

    let ids = |v: &[Value]| -> Vec<String> {
        v.iter()
            .map(|c| c["id"].as_str().expect("id").to_owned())
            .collect()
    };
    eventually(WAIT, "the acked command in the log", || async {
        let (_, page) = api.get("/api/commands?status=acked").await;
        let got = ids(page["commands"].as_array().map_or(&[][..], Vec::as_slice));
        if got == [acked.to_string()] {
            Ok(())
        } else {
            Err(page)
        }
    })
    .await;
    let (_, page) = api.get("/api/commands?status=acked").await;
    let entry = &page["commands"][0];
    assert_eq!(entry["phy_id"], "log-c");
    assert_eq!(entry["name"], "reboot");
    assert_eq!(entry["terminal"], true);

    let mut want_failed = failed.clone();
    want_failed.reverse();
    assert_eq!(
        ids(&walk(&api, "/api/commands?status=failed&limit=2", "commands").await),
        want_failed
    );
    let mut want_queued = queued.clone();
    want_queued.reverse();
    assert_eq!(
        ids(&walk(&api, "/api/commands?phy_id=log-b&limit=1", "commands").await),
        want_queued
    );
    let all = walk(&api, "/api/commands?limit=2", "commands").await;
    assert_eq!(all.len(), 6);
    assert_eq!(ids(&all).iter().collect::<HashSet<_>>().len(), 6);
    assert!(
        walk(&api, "/api/commands?phy_id=log-a&status=queued", "commands")
            .await
            .is_empty()
    );

    // Once the Redis record is gone, the command is read from the log.
    let mut conn = api.conn().await;
    let () = redis::pipe()
        .del(api.keys.command(&acked))
        .del(api.keys.command_log(&acked))
        .query_async(&mut conn)
        .await
        .expect("DEL");
    let (status, d) = api.get(&format!("/api/commands/{acked}")).await;
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["source"], "command_log");
    assert_eq!(d["status"], "acked");
    assert_eq!(d["payload_utf8"], "p");
    assert!(d["attempts"].is_null() && d["server_id"].is_null());
    assert!(
        d["sent_at"].as_str().is_some() && d["acked_at"].as_str().is_some(),
        "{d}"
    );
    let history: Vec<&str> = d["history"]
        .as_array()
        .expect("history")
        .iter()
        .map(|c| c["status"].as_str().expect("status"))
        .collect();
    assert_eq!(history, ["dispatched", "sent", "acked"]);
    assert_eq!(d["history"][0]["detail"], "ingest-z epoch 3");
    assert_eq!(
        api.expect_error(
            &format!("/api/commands/{}", uuid::Uuid::now_v7()),
            Some(READ),
            404
        )
        .await,
        "command_not_found"
    );
    for (q, code) in [
        ("/api/commands?status=done", "invalid_query"),
        ("/api/commands?phy_id=a:b", "invalid_phy_id"),
        ("/api/commands?before=1&cursor=x", "invalid_query"),
    ] {
        assert_eq!(api.expect_error(q, Some(READ), 400).await, code, "{q}");
    }
    archiver.stop().await;
    api.stop().await;
}
