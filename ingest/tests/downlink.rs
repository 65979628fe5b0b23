//! Downlink commands end to end: ingest instances in this process on one
//! private Redis, real MQTT clients (rumqttc; manual acks where the test
//! decides when the device answers), commands submitted the way the api
//! does (`iot_downlink::route::submit`), and the sweeper where a command
//! needs it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{
    Client, Ingest, Projector, command_store, new_command, phy, phy_id, statuses, wait_command,
    wait_events, wait_status,
};
use iot_core::control::{Control, Dispatch};
use iot_core::view::field as view_field;
use iot_core::{EventKind, ServerId};
use iot_downlink::{Status, route, sweeper};
use iot_test_support::{RedisServer, eventually};

const KEEPALIVE: Duration = Duration::from_secs(30);
const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_reaches_the_device_on_the_other_instance_and_is_acked() {
    let redis = RedisServer::start();
    let a = Ingest::start(&redis.url(), "dl-a", |_| {}).await;
    let b = Ingest::start(&redis.url(), "dl-b", |_| {}).await;
    let store = command_store(&redis.url(), |_| {}).await;
    let id = phy("far");

    let mut dev = Client::connect(&b.mqtt, &id, KEEPALIVE).await;
    dev.subscribe_down(&id).await;
    let cmd = route::submit(&store, new_command(&id, "reboot", b"now", false, None))
        .await
        .unwrap();
    assert_eq!(cmd.status, Status::Dispatched);
    assert_eq!(cmd.server_id.as_deref(), Some("dl-b"));

    let p = dev.publish(WAIT).await;
    assert_eq!(p.topic, format!("devices/{id}/down/reboot"));
    assert_eq!(&p.payload[..], b"now");
    assert_eq!(p.qos, rumqttc::QoS::AtLeastOnce);
    assert!(!p.dup);

    let (done, log) = wait_status(&store, cmd.id, Status::Acked, WAIT).await;
    assert_eq!(statuses(&log), ["dispatched", "sent", "acked"]);
    assert_eq!(done.attempts, 1);
    assert!(done.sent_at_ms.is_some() && done.acked_at_ms >= done.sent_at_ms);
    assert_eq!(log[1].detail, format!("dl-b epoch {}", cmd.epoch.unwrap()));

    let conn = b.redis().await;
    let events = wait_events(&conn, &b.keys, &id, "the ack event", |ev| {
        ev.iter()
            .any(|e| e.kind == EventKind::Ack { command_id: cmd.id })
    })
    .await;
    let ack = events.iter().find(|e| e.kind.name() == "ack").expect("ack");
    assert_eq!(ack.server_id.as_str(), "dl-b");
    assert!(
        b.metric("iot_downlink_commands_total{status=\"acked\"}")
            .await
            >= 1.0
    );
    assert!(
        b.metric("iot_ingest_downlink_publishes_total{attempt=\"first\"}")
            .await
            >= 1.0
    );
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_routed_to_the_old_owner_follows_the_device_once() {
    let redis = RedisServer::start();
    let a = Ingest::start(&redis.url(), "fw-a", |_| {}).await;
    let b = Ingest::start(&redis.url(), "fw-b", |_| {}).await;
    let store = command_store(&redis.url(), |_| {}).await;
    let id = phy("mover");

    // The device was on A and is now on B (a higher epoch).
    let mut old = Client::connect(&a.mqtt, &id, KEEPALIVE).await;
    let mut dev = Client::connect(&b.mqtt, &id, KEEPALIVE).await;
    old.ended(WAIT).await;
    dev.subscribe_down(&id).await;

    // An api looked the owner up just before the move: the command went to A.
    let now = iot_core::time::now_ms();
    let cmd = store
        .create(
            uuid::Uuid::now_v7(),
            &new_command(&id, "config", b"v2", false, None),
            Status::Dispatched,
            None,
            Some(("fw-a", 1)),
            now,
        )
        .await
        .unwrap();
    let dispatch = Control::Command(Dispatch {
        id: cmd.id,
        phy_id: phy_id(&id),
        epoch: 1,
        name: cmd.name.clone(),
        payload: cmd.payload.clone(),
        expires_at_ms: cmd.expires_at_ms,
        queue_if_offline: false,
        hops: 0,
    });
    let receivers = route::publish(&store, &ServerId::new("fw-a").unwrap(), &dispatch)
        .await
        .unwrap();
    assert_eq!(receivers, 1, "A listens");

    let p = dev.publish(WAIT).await;
    assert_eq!(&p.payload[..], b"v2");
    let (done, log) = wait_status(&store, cmd.id, Status::Acked, WAIT).await;
    assert_eq!(
        statuses(&log),
        ["dispatched", "dispatched", "sent", "acked"]
    );
    assert_eq!(log[1].reason, "moved");
    assert_eq!(done.hops, 1);
    assert_eq!(done.server_id.as_deref(), Some("fw-b"));
    let mut conn = b.redis().await;
    let owner: String = redis::cmd("GET")
        .arg(b.keys.owner(&phy_id(&id)))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        owner,
        format!("fw-b {}", done.epoch.unwrap()),
        "dispatched to B's connection"
    );
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_never_acks_gets_a_retransmission_then_times_out_and_goes_offline() {
    let redis = RedisServer::start();
    let ack_timeout = Duration::from_millis(1500);
    let ingest = Ingest::start(&redis.url(), "to-srv", |c| {
        c.downlink.ack_timeout = ack_timeout;
    })
    .await;
    // The projector turns the ack_timeout event into the online penalty:
    // with a fresh heartbeat (1) and this penalty the score is 0.4 < 0.5.
    let projector = Projector::start(&redis.url(), "to-proj", |c| {
        c.policy.ack_timeout_penalty = 0.6;
        c.downlink.ack_timeout = ack_timeout;
    })
    .await;
    let store = command_store(&redis.url(), |d| d.ack_timeout = ack_timeout).await;
    let id = phy("mute");

    let mut dev = Client::connect_manual_acks(&ingest.mqtt, &id, KEEPALIVE).await;
    dev.subscribe_down(&id).await;
    let conn = ingest.redis().await;
    let device_key = ingest.keys.device(&phy_id(&id));
    eventually(WAIT, "the device online in the view", || {
        let mut conn = conn.clone();
        let key = device_key.clone();
        async move {
            let online: Option<String> = redis::cmd("HGET")
                .arg(&key)
                .arg(view_field::ONLINE)
                .query_async(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
            if online.as_deref() == Some("1") {
                Ok(())
            } else {
                Err(format!("{online:?}"))
            }
        }
    })
    .await;

    let cmd = route::submit(&store, new_command(&id, "reboot", b"x", false, None))
        .await
        .unwrap();
    let first = dev.publish(WAIT).await;
    assert!(!first.dup);
    let again = dev.publish(WAIT).await;
    assert!(again.dup, "the retransmission carries DUP");
    assert_eq!(again.pkid, first.pkid, "with the same packet id");
    assert_eq!(again.payload, first.payload);

    let (done, log) = wait_status(&store, cmd.id, Status::TimedOut, WAIT).await;
    assert_eq!(done.attempts, 2);
    assert_eq!(statuses(&log), ["dispatched", "sent", "sent", "timed_out"]);
    assert_eq!(log[2].reason, "retransmit");
    wait_events(&conn, &ingest.keys, &id, "the ack_timeout event", |ev| {
        ev.iter()
            .any(|e| e.kind == EventKind::AckTimeout { command_id: cmd.id })
    })
    .await;
    // A late PUBACK changes nothing.
    dev.ack(&again).await;

    eventually(WAIT, "the device offline for ack_timeout", || {
        let mut conn = conn.clone();
        let key = device_key.clone();
        async move {
            let (online, reason): (Option<String>, Option<String>) = redis::pipe()
                .cmd("HGET")
                .arg(&key)
                .arg(view_field::ONLINE)
                .cmd("HGET")
                .arg(&key)
                .arg(view_field::REASON)
                .query_async(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
            if online.as_deref() == Some("0") && reason.as_deref() == Some("ack_timeout") {
                Ok(())
            } else {
                Err(format!("online {online:?}, reason {reason:?}"))
            }
        }
    })
    .await;
    let (still, _) = wait_status(&store, cmd.id, Status::TimedOut, WAIT).await;
    assert_eq!(still.acked_at_ms, None);
    assert!(
        ingest
            .metric("iot_ingest_downlink_publishes_total{attempt=\"retransmit\"}")
            .await
            >= 1.0
    );
    projector.stop().await;
    ingest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_commands_arrive_in_order_after_reconnecting_and_an_expired_one_ends_expired() {
    let redis = RedisServer::start();
    let ingest = Ingest::start(&redis.url(), "q-srv", |_| {}).await;
    let store = command_store(&redis.url(), |_| {}).await;
    let id = phy("sleeper");

    // Offline: they wait in the queue.
    let mut queued = Vec::new();
    for i in 0..3 {
        let c = new_command(
            &id,
            &format!("step{i}"),
            format!("p{i}").as_bytes(),
            true,
            None,
        );
        let c = route::submit(&store, c).await.unwrap();
        assert_eq!(c.status, Status::Queued);
        queued.push(c.id);
    }
    let short = new_command(
        &id,
        "flash",
        b"late",
        true,
        Some(Duration::from_millis(300)),
    );
    let short = route::submit(&store, short).await.unwrap();
    assert_eq!(store.queue_len(&phy_id(&id)).await.unwrap(), 4);

    // The sweeper expires the short one in the queue.
    eventually(WAIT, "the short command expired", || {
        let store = &store;
        async move {
            sweeper::sweep_once(store, iot_core::time::now_ms())
                .await
                .map_err(|e| e.to_string())?;
            match store.get(&short.id).await {
                Ok(Some(c)) if c.status == Status::Expired => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    assert_eq!(store.queue_len(&phy_id(&id)).await.unwrap(), 3);

    // Back online: after SUBSCRIBE the three arrive in order.
    let mut dev = Client::connect(&ingest.mqtt, &id, KEEPALIVE).await;
    dev.subscribe_down(&id).await;
    let mut got = Vec::new();
    for _ in 0..3 {
        let p = dev.publish(WAIT).await;
        got.push(String::from_utf8_lossy(&p.payload).into_owned());
    }
    assert_eq!(got, ["p0", "p1", "p2"]);
    for id in &queued {
        let (_, log) = wait_status(&store, *id, Status::Acked, WAIT).await;
        assert_eq!(statuses(&log), ["queued", "sent", "acked"]);
    }
    assert_eq!(store.queue_len(&phy_id(&id)).await.unwrap(), 0);
    let (expired, _) = wait_status(&store, short.id, Status::Expired, WAIT).await;
    assert_eq!(expired.sent_at_ms, None, "never sent");
    assert!(
        dev.publish_within(Duration::from_millis(300))
            .await
            .is_none()
    );
    ingest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inflight_limit_holds_commands_back_in_order() {
    let redis = RedisServer::start();
    let ingest = Ingest::start(&redis.url(), "lim-srv", |c| {
        c.downlink.max_inflight = 2;
    })
    .await;
    let store = command_store(&redis.url(), |_| {}).await;
    let id = phy("slow");
    let mut dev = Client::connect_manual_acks(&ingest.mqtt, &id, KEEPALIVE).await;
    dev.subscribe_down(&id).await;

    let mut ids = Vec::new();
    for i in 0..5 {
        let c = new_command(&id, "step", format!("c{i}").as_bytes(), false, None);
        ids.push(route::submit(&store, c).await.unwrap().id);
    }
    let mut unacked = std::collections::VecDeque::new();
    let mut order = Vec::new();
    for acked in 0..5 {
        // Two in flight (or what is left), the others held back by the
        // connection: each has the wait in its log.
        let sent = (5 - acked).min(2);
        let held = 5 - acked - sent;
        while unacked.len() < sent {
            let p = dev.publish(WAIT).await;
            order.push(String::from_utf8_lossy(&p.payload).into_owned());
            unacked.push_back(p);
        }
        let what = format!("{acked} acked, {sent} sent, {held} held back");
        eventually(WAIT, &what, || {
            let store = &store;
            let ids = &ids;
            async move {
                let mut seen = (0, 0, 0);
                for id in ids {
                    let (c, log) = store
                        .get_with_history(id)
                        .await
                        .map_err(|e| e.to_string())?
                        .ok_or("record gone")?;
                    match c.status {
                        Status::Acked => seen.0 += 1,
                        Status::Sent => seen.1 += 1,
                        Status::Dispatched if log.iter().any(|l| l.reason == "inflight_limit") => {
                            seen.2 += 1
                        }
                        _ => {}
                    }
                }
                if seen == (acked, sent, held) {
                    Ok(())
                } else {
                    Err(format!("(acked, sent, held) = {seen:?}"))
                }
            }
        })
        .await;
        // The connection decided to hold them back before that was
        // recorded, and only a PUBACK frees a place.
        assert!(
            dev.publish_within(Duration::ZERO).await.is_none(),
            "a third command while two are unacknowledged"
        );
        let oldest = unacked.pop_front().unwrap();
        dev.ack(&oldest).await;
    }
    assert_eq!(order, ["c0", "c1", "c2", "c3", "c4"]);
    for id in &ids {
        wait_status(&store, *id, Status::Acked, WAIT).await;
    }
    let (_, log) = wait_status(&store, ids[4], Status::Acked, WAIT).await;
    assert_eq!(
        log[1].reason, "inflight_limit",
        "the wait is in its log: {log:?}"
    );
    ingest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_device_holds_at_most_queue_max_commands_back_the_rest_fail_queue_full() {
    let redis = RedisServer::start();
    let ingest = Ingest::start(&redis.url(), "cap-srv", |c| {
        c.downlink.max_inflight = 1;
        c.downlink.queue_max = 2;
    })
    .await;
    let store = command_store(&redis.url(), |_| {}).await;
    let id = phy("laggard");
    let mut dev = Client::connect_manual_acks(&ingest.mqtt, &id, KEEPALIVE).await;
    dev.subscribe_down(&id).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let c = new_command(&id, "step", format!("c{i}").as_bytes(), false, None);
        ids.push(route::submit(&store, c).await.unwrap().id);
    }
    let first = dev.publish(WAIT).await;
    assert_eq!(&first.payload[..], b"c0");
    wait_status(&store, ids[0], Status::Sent, WAIT).await;
    for id in &ids[3..] {
        let (c, _) = wait_status(&store, *id, Status::Failed, WAIT).await;
        assert_eq!(c.reason.as_deref(), Some("queue_full"));
    }
    // The two held back go out in order as places free up.
    let mut got = Vec::new();
    let mut last = first;
    for _ in 0..2 {
        dev.ack(&last).await;
        last = dev.publish(WAIT).await;
        got.push(String::from_utf8_lossy(&last.payload).into_owned());
    }
    dev.ack(&last).await;
    assert_eq!(got, ["c1", "c2"]);
    for id in &ids[..3] {
        wait_status(&store, *id, Status::Acked, WAIT).await;
    }
    ingest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_owner_cannot_time_out_a_command_dispatched_elsewhere_meanwhile() {
    let redis = RedisServer::start();
    let ack_timeout = Duration::from_millis(800);
    let ingest = Ingest::start(&redis.url(), "old-srv", |c| {
        c.downlink.ack_timeout = ack_timeout;
    })
    .await;
    let store = command_store(&redis.url(), |d| d.ack_timeout = ack_timeout).await;
    let id = phy("moved-on");
    let mut dev = Client::connect_manual_acks(&ingest.mqtt, &id, KEEPALIVE).await;
    dev.subscribe_down(&id).await;
    let cmd = route::submit(&store, new_command(&id, "reboot", b"x", false, None))
        .await
        .unwrap();
    dev.publish(WAIT).await;
    wait_status(&store, cmd.id, Status::Sent, WAIT).await;
    // Meanwhile the command was sent after the device to another instance
    // (what a forward writes).
    let t = iot_downlink::Transition::to(Status::Dispatched)
        .from(&[Status::Sent])
        .reason("owner_lost")
        .set(iot_downlink::command::field::SERVER_ID, "new-srv")
        .set(iot_downlink::command::field::EPOCH, 99)
        .set(iot_downlink::command::field::HOPS, 1);
    assert!(
        store
            .transition(&cmd.id, &t, iot_core::time::now_ms())
            .await
            .unwrap()
            .is_some()
    );
    // The old connection's retransmission and timeout are refused.
    eventually(WAIT, "the stale timeout refused", || async {
        let n = ingest
            .metric("iot_downlink_stale_verdicts_total{op=\"timed_out\"}")
            .await;
        if n >= 1.0 { Ok(()) } else { Err(n) }
    })
    .await;
    let (c, log) = store.get_with_history(&cmd.id).await.unwrap().unwrap();
    assert_eq!(c.status, Status::Dispatched, "{log:?}");
    assert_eq!(c.server_id.as_deref(), Some("new-srv"));
    assert_eq!(statuses(&log), ["dispatched", "sent", "dispatched"]);
    ingest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_not_subscribed_fails_the_command_or_gets_it_after_subscribing() {
    let redis = RedisServer::start();
    let ingest = Ingest::start(&redis.url(), "ns-srv", |_| {}).await;
    let store = command_store(&redis.url(), |_| {}).await;
    let id = phy("deaf");
    let mut dev = Client::connect(&ingest.mqtt, &id, KEEPALIVE).await;

    let once = route::submit(&store, new_command(&id, "reboot", b"a", false, None))
        .await
        .unwrap();
    assert_eq!(once.status, Status::Dispatched);
    let (failed, _) = wait_status(&store, once.id, Status::Failed, WAIT).await;
    assert_eq!(failed.reason.as_deref(), Some("no_subscription"));

    let later = route::submit(&store, new_command(&id, "reboot", b"b", true, None))
        .await
        .unwrap();
    let (parked, log) = wait_status(&store, later.id, Status::Queued, WAIT).await;
    assert_eq!(parked.reason.as_deref(), Some("no_subscription"));
    assert_eq!(statuses(&log), ["dispatched", "queued"]);
    assert!(
        dev.publish_within(Duration::from_millis(200))
            .await
            .is_none()
    );

    dev.subscribe_down(&id).await;
    let p = dev.publish(WAIT).await;
    assert_eq!(&p.payload[..], b"b");
    wait_status(&store, later.id, Status::Acked, WAIT).await;
    ingest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_mid_command_sends_it_after_the_device() {
    let redis = RedisServer::start();
    let a = Ingest::start(&redis.url(), "tko-a", |_| {}).await;
    let b = Ingest::start(&redis.url(), "tko-b", |_| {}).await;
    let store = command_store(&redis.url(), |_| {}).await;
    let id = phy("hopper");

    let mut first = Client::connect_manual_acks(&a.mqtt, &id, KEEPALIVE).await;
    first.subscribe_down(&id).await;
    let cmd = route::submit(&store, new_command(&id, "reboot", b"go", true, None))
        .await
        .unwrap();
    let p = first.publish(WAIT).await;
    assert_eq!(&p.payload[..], b"go");
    wait_status(&store, cmd.id, Status::Sent, WAIT).await;

    // Not acknowledged: the device connects again on B (and subscribes).
    let mut second = Client::connect(&b.mqtt, &id, KEEPALIVE).await;
    first.ended(WAIT).await;
    second.subscribe_down(&id).await;
    let p = second.publish(WAIT).await;
    assert_eq!(&p.payload[..], b"go");
    let (done, log) = wait_status(&store, cmd.id, Status::Acked, WAIT).await;
    assert_eq!(done.server_id.as_deref(), Some("tko-b"));
    assert_eq!(done.hops, 1);
    let st = statuses(&log);
    assert_eq!(st[..3], ["dispatched", "sent", "dispatched"], "{log:?}");
    assert_eq!(log[2].reason, "takeover");
    assert_eq!(st.last(), Some(&"acked"));
    // Whether it reached B before or after the SUBSCRIBE, it was sent once
    // there: it may wait in the queue in between.
    assert!(
        st[3..]
            .iter()
            .all(|s| ["queued", "sent", "acked"].contains(s)),
        "{st:?}"
    );
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_mid_command_without_queueing_waits_for_the_new_connection_to_subscribe() {
    let redis = RedisServer::start();
    // The subscription grace is the ACK timeout.
    let ack_timeout = Duration::from_secs(3);
    let a = Ingest::start(&redis.url(), "tkn-a", |c| {
        c.downlink.ack_timeout = ack_timeout
    })
    .await;
    let b = Ingest::start(&redis.url(), "tkn-b", |c| {
        c.downlink.ack_timeout = ack_timeout
    })
    .await;
    let store = command_store(&redis.url(), |d| d.ack_timeout = ack_timeout).await;

    // One device that subscribes on its new connection, one that never does.
    let (keen, deaf) = (phy("keen"), phy("deaf-after-move"));
    let mut cmds = Vec::new();
    let mut new_conns = Vec::new();
    for id in [&keen, &deaf] {
        let mut first = Client::connect_manual_acks(&a.mqtt, id, KEEPALIVE).await;
        first.subscribe_down(id).await;
        let cmd = route::submit(&store, new_command(id, "reboot", b"go", false, None))
            .await
            .unwrap();
        first.publish(WAIT).await;
        wait_status(&store, cmd.id, Status::Sent, WAIT).await;
        // Not acknowledged: the device connects again on B, and has not
        // subscribed there when the command follows it.
        let second = Client::connect(&b.mqtt, id, KEEPALIVE).await;
        first.ended(WAIT).await;
        let (parked, _) = wait_command(&store, cmd.id, "parked for the subscription", WAIT, |c| {
            c.status == Status::Queued
        })
        .await;
        assert_eq!(parked.reason.as_deref(), Some("no_subscription"));
        assert_eq!(parked.server_id.as_deref(), Some("tkn-b"));
        cmds.push(cmd.id);
        new_conns.push(second);
    }

    // The keen one subscribes within the grace and gets it.
    new_conns[0].subscribe_down(&keen).await;
    let p = new_conns[0].publish(WAIT).await;
    assert_eq!(&p.payload[..], b"go");
    let (done, log) = wait_status(&store, cmds[0], Status::Acked, WAIT).await;
    assert_eq!(done.hops, 1);
    assert_eq!(
        statuses(&log),
        [
            "dispatched",
            "sent",
            "dispatched",
            "queued",
            "sent",
            "acked"
        ]
    );
    assert_eq!(log[2].reason, "takeover");
    assert_eq!(
        log[4].detail,
        format!("tkn-b epoch {}", done.epoch.unwrap())
    );

    // The deaf one fails when the grace ends, not before, and not offline.
    let (failed, log) = wait_status(&store, cmds[1], Status::Failed, WAIT).await;
    assert_eq!(failed.reason.as_deref(), Some("no_subscription"), "{log:?}");
    let parked_at = log[3].at_ms;
    assert!(
        failed.updated_at_ms - parked_at >= ack_timeout.as_millis() as i64 - 50,
        "{log:?}"
    );
    assert_eq!(store.queue_len(&phy_id(&deaf)).await.unwrap(), 0);
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_puts_commands_back_in_the_queue_or_fails_them() {
    let redis = RedisServer::start();
    let ingest = Ingest::start(&redis.url(), "gs-srv", |_| {}).await;
    let store = command_store(&redis.url(), |_| {}).await;
    let id = phy("leaver");
    let mut dev = Client::connect_manual_acks(&ingest.mqtt, &id, KEEPALIVE).await;
    dev.subscribe_down(&id).await;
    let keep = route::submit(&store, new_command(&id, "a", b"keep", true, None))
        .await
        .unwrap();
    let drop = route::submit(&store, new_command(&id, "b", b"drop", false, None))
        .await
        .unwrap();
    dev.publish(WAIT).await;
    dev.publish(WAIT).await;
    wait_status(&store, drop.id, Status::Sent, WAIT).await;

    ingest.stop().await.unwrap();
    let (kept, _) = wait_status(&store, keep.id, Status::Queued, WAIT).await;
    assert_eq!(kept.reason.as_deref(), Some("device_gone"));
    assert_eq!(store.queue_len(&phy_id(&id)).await.unwrap(), 1);
    let (failed, _) = wait_status(&store, drop.id, Status::Failed, WAIT).await;
    assert_eq!(failed.reason.as_deref(), Some("device_gone"));
    // The queued one keeps a deadline: the sweeper will decide it (it
    // first checks that it is in the queue, then waits for its expiry).
    let deadline = store.deadline(&keep.id).await.unwrap().expect("deadline");
    let check = store
        .settings()
        .check_at(kept.expires_at_ms, kept.updated_at_ms);
    assert_eq!(deadline, check as f64);
    let now = iot_core::time::now_ms();
    while sweeper::sweep_once(&store, check.max(now)).await.unwrap() > 0 {}
    assert_eq!(
        store.deadline(&keep.id).await.unwrap(),
        Some(kept.expires_at_ms as f64)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_commands_lost_by_a_dead_drain_are_delivered_after_reconnecting() {
    let redis = RedisServer::start();
    let ingest = Ingest::start(&redis.url(), "ld-srv", |c| {
        c.downlink.ack_timeout = Duration::from_secs(1);
    })
    .await;
    // The sweeper's view of "lost": 2 x 1 s + 2 s after the drain took them.
    let store = command_store(&redis.url(), |d| d.ack_timeout = Duration::from_secs(1)).await;
    let id = phy("drained");

    // Offline: they wait in the queue.
    let mut queued = Vec::new();
    for i in 0..3 {
        let c = new_command(&id, "step", format!("p{i}").as_bytes(), true, None);
        let c = route::submit(&store, c).await.unwrap();
        assert_eq!(c.status, Status::Queued);
        queued.push(c.id);
    }
    // An instance's drain took them out of the queue (as the reporter's
    // drain does) and died before any was sent: still `queued`, in no
    // queue.
    let taken = store.take_queued(&phy_id(&id), 100).await.unwrap();
    assert_eq!(taken.len(), 3);
    let taken_at = iot_core::time::now_ms();

    // The device is back and subscribes: its queue is empty.
    let mut dev = Client::connect(&ingest.mqtt, &id, KEEPALIVE).await;
    dev.subscribe_down(&id).await;
    assert!(
        dev.publish_within(Duration::from_millis(300))
            .await
            .is_none()
    );

    // The sweeper finds them lost, puts them back in order and tells the
    // device's instance to drain the queue: they arrive, in order.
    let token = tokio_util::sync::CancellationToken::new();
    let sweeping = tokio::spawn(sweeper::run(
        store.clone(),
        Duration::from_millis(200),
        token.clone(),
    ));
    let mut got = Vec::new();
    for _ in 0..3 {
        let p = dev.publish(Duration::from_secs(20)).await;
        got.push(String::from_utf8_lossy(&p.payload).into_owned());
    }
    assert!(
        iot_core::time::now_ms() >= taken_at + 4_000,
        "not before they count as lost"
    );
    assert_eq!(got, ["p0", "p1", "p2"]);
    for c in &queued {
        let (_, log) = wait_status(&store, *c, Status::Acked, WAIT).await;
        assert_eq!(statuses(&log), ["queued", "queued", "sent", "acked"]);
        assert_eq!(log[1].reason, sweeper::REQUEUED);
    }
    assert_eq!(store.queue_len(&phy_id(&id)).await.unwrap(), 0);
    token.cancel();
    sweeping.await.unwrap();
    ingest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_in_flight_on_a_killed_instance_end_rerouted_or_failed_never_stuck() {
    use iot_test_support::{ServiceProcess, free_port};

    let redis = RedisServer::start();
    let url = redis.url();
    let mqtt = format!("127.0.0.1:{}", free_port());
    let http = format!("127.0.0.1:{}", free_port());
    let shards = common::SHARDS.to_string();
    let svc = ServiceProcess::spawn(
        env!("CARGO_BIN_EXE_iot-ingest"),
        &[],
        &[
            ("REDIS_URL", url.as_str()),
            ("IOT_MQTT_LISTEN", mqtt.as_str()),
            ("IOT_HTTP_LISTEN", http.as_str()),
            ("SERVER_ID", "kill-srv"),
            ("IOT_STREAMS_SHARDS", shards.as_str()),
            ("IOT_SESSION_LIVENESS_TTL", "1s"),
            ("IOT_MQTT_CONNECT_RATE_PER_IP", "0"),
        ],
    );
    let svc_http = http.clone();
    let mut svc = tokio::task::spawn_blocking(move || {
        let mut svc = svc;
        svc.wait_http_ok(&svc_http, "/health", Duration::from_secs(30));
        svc
    })
    .await
    .unwrap();
    let survivor = Ingest::start(&url, "kill-b", |_| {}).await;
    // The sweeper's view of "stuck": 2 x 1 s + 2 s after the last change.
    let store = command_store(&url, |d| d.ack_timeout = Duration::from_secs(1)).await;

    // `back` reconnects to the survivor; `lost` never comes back.
    let (back, lost) = (phy("back"), phy("lost"));
    let mut dev = Client::connect_manual_acks(&mqtt, &back, KEEPALIVE).await;
    dev.subscribe_down(&back).await;
    let mut gone = Client::connect_manual_acks(&mqtt, &lost, KEEPALIVE).await;
    gone.subscribe_down(&lost).await;
    let mut for_back = Vec::new();
    for (i, queue) in [(0, true), (1, false), (2, true)] {
        let c = new_command(&back, "step", format!("b{i}").as_bytes(), queue, None);
        for_back.push(route::submit(&store, c).await.unwrap().id);
    }
    let lost_fail = route::submit(&store, new_command(&lost, "x", b"f", false, None))
        .await
        .unwrap()
        .id;
    let lost_queue = route::submit(&store, new_command(&lost, "x", b"q", true, None))
        .await
        .unwrap()
        .id;
    for _ in 0..3 {
        dev.publish(WAIT).await;
    }
    for _ in 0..2 {
        gone.publish(WAIT).await;
    }
    for id in for_back.iter().chain([&lost_fail, &lost_queue]) {
        wait_status(&store, *id, Status::Sent, WAIT).await;
    }

    tokio::task::spawn_blocking(move || {
        svc.kill();
        svc
    })
    .await
    .unwrap();
    dev.ended(WAIT).await;
    gone.ended(WAIT).await;
    let mut dev = Client::connect(&survivor.mqtt, &back, KEEPALIVE).await;
    dev.subscribe_down(&back).await;

    // The sweeper finds them stuck and sends them after their devices.
    let token = tokio_util::sync::CancellationToken::new();
    let sweeping = tokio::spawn(sweeper::run(
        store.clone(),
        Duration::from_millis(200),
        token.clone(),
    ));
    let mut got = Vec::new();
    for _ in 0..3 {
        let p = dev.publish(Duration::from_secs(20)).await;
        got.push(String::from_utf8_lossy(&p.payload).into_owned());
    }
    got.sort();
    assert_eq!(got, ["b0", "b1", "b2"]);
    for id in &for_back {
        let (c, log) = wait_status(&store, *id, Status::Acked, Duration::from_secs(20)).await;
        assert_eq!(c.server_id.as_deref(), Some("kill-b"), "{log:?}");
        assert_eq!(c.hops, 1);
        assert!(
            log.iter().any(|l| l.reason == "owner_lost"),
            "re-routed by the sweeper: {log:?}"
        );
    }
    let (failed, _) = wait_status(&store, lost_fail, Status::Failed, Duration::from_secs(20)).await;
    assert_eq!(failed.reason.as_deref(), Some("offline"));
    let (queued, _) =
        wait_status(&store, lost_queue, Status::Queued, Duration::from_secs(20)).await;
    assert_eq!(queued.reason.as_deref(), Some("offline"));
    // (The status changes just before the id is appended to the queue.)
    eventually(WAIT, "the lost device's command in its queue", || {
        let store = &store;
        let lost = phy_id(&lost);
        async move {
            match store.queue_len(&lost).await {
                Ok(1) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    token.cancel();
    sweeping.await.unwrap();
    survivor.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_channel_stays_subscribed_through_its_keepalive_pings() {
    // A PING on a subscribed connection answers ["pong", ""]: taking that
    // for a dead connection resubscribed every few seconds, and commands
    // published meanwhile found nobody listening.
    let redis = RedisServer::start();
    let ingest = Ingest::start(&redis.url(), "ping-srv", |_| {}).await;
    let mut conn = ingest.redis().await;
    let channel = ingest.keys.downlink_channel(&ingest.server_id);
    let until =
        tokio::time::Instant::now() + ingest::control::PING_EVERY * 2 + Duration::from_millis(500);
    let mut samples = 0;
    while tokio::time::Instant::now() < until {
        let (_, n): (String, u64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(&channel)
            .query_async::<Vec<(String, u64)>>(&mut conn)
            .await
            .unwrap()
            .pop()
            .unwrap();
        assert_eq!(n, 1, "subscriber gone after {samples} samples");
        samples += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        ingest
            .metric("iot_ingest_redis_errors_total{op=\"subscribe\"}")
            .await,
        0.0
    );
    ingest.stop().await.unwrap();
}
