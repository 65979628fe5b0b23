//! What the api reads from the PostgreSQL archive, written by the real
//! archiver (`iot_store::archiver::run`) from the Redis streams: a device's
//! events and sessions, and the command log.

mod common;

use std::collections::{BTreeSet, HashSet};
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

/// Every entry of `key`, oldest first.
async fn xrange(
    conn: &mut redis::aio::MultiplexedConnection,
    key: &str,
) -> Vec<redis::streams::StreamId> {
    let r: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await
        .expect("XRANGE");
    r.ids
}

/// What the streams hold (kept whole by an idle audit group), as archive
/// rows: event rows, transition rows, command changes (id, status) sorted.
async fn stream_contents(
    api: &TestApi,
    conn: &mut redis::aio::MultiplexedConnection,
) -> (
    Vec<(String, String, i32)>,
    Vec<(String, String)>,
    Vec<(String, String)>,
) {
    let mut events = Vec::new();
    let mut transitions = Vec::new();
    for s in 0..api.config.streams.shards {
        let key = api.keys.events(s);
        for id in xrange(conn, &key).await {
            let bytes: Vec<u8> =
                redis::from_redis_value(id.map[ENTRY_FIELD].clone()).expect("entry bytes");
            let entry = Entry::decode(&bytes).expect("entry");
            for r in ArchivedEvent::from_entry(&key, &id.id, entry) {
                events.push((r.stream, r.entry_id, r.seq));
            }
        }
        let key = api.keys.lifecycle(s);
        for id in xrange(conn, &key).await {
            transitions.push((key.clone(), id.id));
        }
    }
    let mut changes = Vec::new();
    for id in xrange(conn, &api.keys.command_events()).await {
        let fields: std::collections::HashMap<String, Vec<u8>> = id
            .map
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    redis::from_redis_value(v.clone()).expect("bytes"),
                )
            })
            .collect();
        let c = iot_store::commands::CommandChange::from_fields(&fields).expect("a change");
        changes.push((c.id.to_string(), c.status));
    }
    events.sort();
    transitions.sort();
    changes.sort();
    (events, transitions, changes)
}

/// The same from the archive.
async fn archive_contents(
    store: &iot_store::Store,
    ids: &[String],
) -> Result<
    (
        Vec<(String, String, i32)>,
        Vec<(String, String)>,
        Vec<(String, String)>,
    ),
    String,
> {
    let events = store.event_keys().await.map_err(|e| e.to_string())?;
    let transitions = store.transition_keys().await.map_err(|e| e.to_string())?;
    let mut changes = Vec::new();
    for id in ids {
        let uuid = uuid::Uuid::parse_str(id).map_err(|e| e.to_string())?;
        for (status, _) in store
            .command_changes(uuid)
            .await
            .map_err(|e| e.to_string())?
        {
            changes.push((id.clone(), status));
        }
    }
    changes.sort();
    Ok((events, transitions, changes))
}

/// A device on the in-process ingest (rumqttc, open auth), subscribed to
/// its downlink topic (rumqttc acknowledges commands by itself).
struct Device {
    client: rumqttc::AsyncClient,
    task: tokio::task::JoinHandle<()>,
}

impl Device {
    async fn connect(addr: &str, id: &str) -> Self {
        let (host, port) = addr.rsplit_once(':').expect("host:port");
        let mut opts = rumqttc::MqttOptions::new(id, host, port.parse().expect("port"));
        opts.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 16);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok(ev) = eventloop.poll().await {
                let _ = tx.send(ev);
            }
        });
        client
            .subscribe(format!("devices/{id}/down/#"), rumqttc::QoS::AtLeastOnce)
            .await
            .expect("SUBSCRIBE");
        tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(ev) = rx.recv().await {
                if let rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)) = ev {
                    return;
                }
            }
            panic!("{id}: the connection ended before SUBACK");
        })
        .await
        .expect("SUBACK within 10 s");
        Self { client, task }
    }

    async fn uplink(&self, id: &str, n: usize) {
        for i in 0..n {
            self.client
                .publish(
                    format!("devices/{id}/up/t"),
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    format!("u{i}"),
                )
                .await
                .expect("PUBLISH");
        }
    }

    /// A clean MQTT DISCONNECT.
    async fn disconnect(self) {
        self.client.disconnect().await.expect("DISCONNECT");
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }

    /// The socket just goes away.
    fn drop_connection(self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_outage_loses_no_event_transition_or_command_change() {
    let mut pg = tokio::task::spawn_blocking(iot_test_support::PgServer::start)
        .await
        .expect("start PostgreSQL");
    let url = pg.url();
    store(&url).await.migrate().await.expect("migrate");
    let db_url = url.clone();
    let api = TestApi::start_with(move |c| {
        c.database.url = db_url;
        c.database.connect_timeout = Duration::from_millis(500);
        c.streams.shards = 4;
        c.projector.block = Duration::from_millis(50);
        c.projector.claim_interval = Duration::from_millis(300);
        c.projector.claim_idle = Duration::from_secs(1);
    })
    .await;
    let mut conn = api.conn().await;
    // An idle audit group on every archived stream keeps them whole, to
    // compare with the archive at the end.
    let mut audited: Vec<String> = (0..api.config.streams.shards)
        .flat_map(|s| [api.keys.events(s), api.keys.lifecycle(s)])
        .collect();
    audited.push(api.keys.command_events());
    for key in &audited {
        let () = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(key)
            .arg("audit")
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await
            .expect("XGROUP CREATE");
    }

    // The whole pipeline in this process: an ingest (open auth; with the
    // archive on it caps no stream) and a projector with the archiver.
    let start = |server_id: &str| {
        let mut cfg = api.config.clone();
        cfg.server_id = server_id.into();
        cfg.mqtt.connect_rate_per_ip = 0;
        cfg.shutdown.grace = Duration::from_secs(5);
        cfg
    };
    let ingest_token = tokio_util::sync::CancellationToken::new();
    let ctx = iot_service::startup::Context::start(start("outage-ingest"), ingest_token.clone())
        .await
        .expect("ingest context");
    let mqtt_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let mqtt = mqtt_listener.local_addr().expect("addr").to_string();
    let ingest_http = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let ingest_task = tokio::spawn(ingest::run(ctx, mqtt_listener, ingest_http));
    let projector_token = tokio_util::sync::CancellationToken::new();
    let ctx =
        iot_service::startup::Context::start(start("outage-projector"), projector_token.clone())
            .await
            .expect("projector context");
    let projector_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let projector_http = projector_listener.local_addr().expect("addr").to_string();
    let projector_task = tokio::spawn(projector::run(ctx, projector_listener));

    let mut commands = Vec::new();
    let command = |id: &str, queue: bool| {
        let body = json!({"name": "reboot", "queue_if_offline": queue});
        let path = format!("/api/devices/{id}/commands");
        let api = &api;
        async move {
            let (status, c) = api.post(&path, &body).await;
            assert_eq!(status, 201, "{c}");
            c["id"].as_str().expect("id").to_owned()
        }
    };

    // Before the outage.
    let mut devices = Vec::new();
    for i in 0..6 {
        let id = format!("out-a{i}");
        let d = Device::connect(&mqtt, &id).await;
        d.uplink(&id, 3).await;
        devices.push((id, d));
    }
    for (id, _) in &devices[..3] {
        commands.push(command(id, false).await);
    }
    commands.push(command("out-ghost", true).await);
    let store = store(&url).await;
    eventually(WAIT, "first events archived", || async {
        match store.count_events().await {
            Ok(n) if n > 0 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    let mut pg = {
        tokio::task::spawn_blocking(move || {
            pg.stop();
            pg
        })
        .await
        .expect("stop PostgreSQL")
    };
    // During it: commands, clean disconnects, drops, new devices, the
    // queued command delivered.
    for (id, _) in &devices[3..] {
        commands.push(command(id, false).await);
    }
    let mut rest = devices.split_off(2);
    for (_, d) in devices.drain(..) {
        d.disconnect().await;
    }
    let (_, dropped) = rest.remove(0);
    dropped.drop_connection();
    for i in 0..3 {
        let id = format!("out-b{i}");
        let d = Device::connect(&mqtt, &id).await;
        d.uplink(&id, 2).await;
        rest.push((id, d));
    }
    let ghost = Device::connect(&mqtt, "out-ghost").await;
    for _ in 0..2 {
        commands.push(command("out-b0", false).await);
    }
    eventually(WAIT, "the archive reports the outage", || async {
        let (_, body) =
            iot_test_support::http_get(&projector_http, "/health").ok_or("no answer")?;
        let health: Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
        if health["checks"]["archive"]["status"] == "degraded" {
            Ok(())
        } else {
            Err(body)
        }
    })
    .await;
    assert_eq!(
        iot_test_support::http_get(&projector_http, "/health/ready").map(|r| r.0),
        Some(200),
        "a database outage does not make the projector unready"
    );
    let (status, _) = api.get_as("/health/ready", None).await;
    assert_eq!(status, 200, "nor the api");
    assert_eq!(
        store.count_events().await.ok(),
        None,
        "the database is really away"
    );

    let pg = tokio::task::spawn_blocking(move || {
        pg.start_again();
        pg
    })
    .await
    .expect("restart PostgreSQL");
    // Everything the streams hold, and only that, ends up in the archive.
    let (want, got) = eventually(Duration::from_secs(60), "the archive caught up", || {
        let api = &api;
        let store = &store;
        let mut conn = conn.clone();
        async move {
            let want = stream_contents(api, &mut conn).await;
            let ids: BTreeSet<String> = want.2.iter().map(|c| c.0.clone()).collect();
            let got = archive_contents(store, &ids.into_iter().collect::<Vec<_>>()).await?;
            if got == want {
                Ok((want, got))
            } else {
                Err(format!(
                    "archive {} events / {} transitions / {} changes, streams {} / {} / {}",
                    got.0.len(),
                    got.1.len(),
                    got.2.len(),
                    want.0.len(),
                    want.1.len(),
                    want.2.len()
                ))
            }
        }
    })
    .await;
    assert_eq!(got, want);
    assert_eq!(
        store.count_events().await.expect("count") as usize,
        want.0.len()
    );
    assert_eq!(
        store.count_transitions().await.expect("count") as usize,
        want.1.len()
    );
    let kinds: BTreeSet<&str> = want.2.iter().map(|c| c.1.as_str()).collect();
    assert!(
        kinds.contains("acked") && kinds.contains("queued"),
        "commands went through their states: {kinds:?}"
    );
    assert!(
        want.2.iter().map(|c| &c.0).collect::<BTreeSet<_>>().len() >= commands.len(),
        "every command submitted is in the stream"
    );
    assert!(want.1.len() >= 9, "transitions: {}", want.1.len());

    drop(ghost);
    for (_, d) in rest {
        d.drop_connection();
    }
    ingest_token.cancel();
    projector_token.cancel();
    ingest_task.await.expect("ingest task").expect("ingest run");
    projector_task
        .await
        .expect("projector task")
        .expect("projector run");
    api.stop().await;
    drop(pg);
}
