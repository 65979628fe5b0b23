//! Command records, routing and the sweeper against a real Redis.

use std::time::Duration;

use futures::StreamExt;
use iot_core::control::Control;
use iot_core::registry::Owner;
use iot_core::{Keys, PhyId, ServerId};
use iot_downlink::command::field;
use iot_downlink::route::{self, Location};
use iot_downlink::sweeper;
use iot_downlink::{CommandStore, NewCommand, OpenCounts, Settings, Status, Transition};
use iot_service::RedisPool;
use iot_test_support::{RedisServer, eventually};

fn settings() -> Settings {
    Settings {
        ack_timeout: Duration::from_millis(200),
        queue_max: 3,
        default_ttl: Duration::from_secs(60),
        retention: Duration::from_secs(60),
        max_inflight: 4,
        stream_maxlen: iot_core::config::StreamCap::fixed(Some(10_000)),
    }
}

async fn store(redis: &RedisServer) -> CommandStore {
    let cfg = iot_core::config::RedisConfig {
        url: redis.url(),
        min_idle_conns: 2,
        ..Default::default()
    };
    let pool = RedisPool::connect(&cfg).await.expect("redis");
    CommandStore::new(pool, Keys::default(), settings())
}

fn phy(s: &str) -> PhyId {
    PhyId::new(s).expect("phy")
}

fn new(p: &str, queue: bool, ttl: Option<Duration>) -> NewCommand {
    NewCommand {
        phy_id: phy(p),
        name: "reboot".into(),
        payload: b"now".to_vec(),
        ttl,
        queue_if_offline: queue,
    }
}

/// The next control message on a subscribed channel.
async fn next_control(pubsub: &mut redis::aio::PubSub) -> Control {
    let msg = tokio::time::timeout(Duration::from_secs(5), pubsub.on_message().next())
        .await
        .expect("a message in time")
        .expect("a message");
    let payload: Vec<u8> = msg.get_payload().expect("payload");
    Control::decode(&payload).expect("decode")
}

/// Makes `phy` look connected to `server` with `epoch`.
/// Waits until nobody listens on `server`'s channel (a dropped Pub/Sub
/// connection unsubscribes when Redis notices it closed, not at once).
async fn no_listener(redis: &RedisServer, store: &CommandStore, server: &str) {
    let channel = store
        .keys()
        .downlink_channel(&ServerId::new(server).expect("id"));
    let client = redis::Client::open(redis.url()).expect("client");
    let conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connection");
    eventually(Duration::from_secs(5), "no listener on the channel", || {
        let mut conn = conn.clone();
        let channel = channel.clone();
        async move {
            let counts: Vec<(String, u64)> = redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg(&channel)
                .query_async(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
            match counts.first() {
                Some((_, 0)) | None => Ok(()),
                Some((_, n)) => Err(format!("{n} listening")),
            }
        }
    })
    .await;
}

async fn connect(store: &CommandStore, p: &str, server: &str, epoch: u64) {
    let owner = Owner {
        server_id: ServerId::new(server).expect("server"),
        epoch,
    };
    let mut c = store.redis().get();
    let _: () = redis::pipe()
        .cmd("SET")
        .arg(store.keys().owner(&phy(p)))
        .arg(owner.format())
        .cmd("SET")
        .arg(store.keys().liveness(&owner.server_id))
        .arg(1)
        .query_async(&mut c)
        .await
        .expect("set");
}

#[tokio::test]
async fn offline_without_queue_fails_and_is_logged() {
    let redis = RedisServer::start();
    let store = store(&redis).await;
    let cmd = route::submit(&store, new("d-1", false, None))
        .await
        .expect("submit");
    assert_eq!(cmd.status, Status::Failed);
    assert_eq!(cmd.reason.as_deref(), Some("offline"));
    let (read, log) = store
        .get_with_history(&cmd.id)
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(read.status, Status::Failed);
    assert_eq!(read.payload, b"now");
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].status, Status::Failed);
    let mut c = store.redis().get();
    let n: u64 = redis::cmd("XLEN")
        .arg(store.keys().command_events())
        .query_async(&mut c)
        .await
        .expect("xlen");
    assert_eq!(n, 1);
    let listed = store
        .list_for_device(&phy("d-1"), None, 10)
        .await
        .expect("list");
    assert_eq!(listed.len(), 1);
}

#[tokio::test]
async fn offline_with_queue_waits_in_order_until_full() {
    let redis = RedisServer::start();
    let store = store(&redis).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let c = route::submit(&store, new("d-2", true, None))
            .await
            .expect("submit");
        assert_eq!(c.status, Status::Queued);
        ids.push(c.id);
    }
    let full = route::submit(&store, new("d-2", true, None))
        .await
        .expect("submit");
    assert_eq!(full.status, Status::Failed);
    assert_eq!(full.reason.as_deref(), Some("queue_full"));
    let open = store.open_counts().await.expect("counts");
    assert_eq!(open.queued, 3, "the refused one is not counted: {open:?}");
    let taken = store.take_queued(&phy("d-2"), 10).await.expect("take");
    assert_eq!(taken.iter().map(|c| c.id).collect::<Vec<_>>(), ids);
    // Putting them back keeps the order.
    let back: Vec<_> = taken[1..].iter().map(|c| (c.id, c.expires_at_ms)).collect();
    store
        .requeue_front(&phy("d-2"), &back, iot_core::time::now_ms())
        .await
        .expect("requeue");
    let again = store.take_queued(&phy("d-2"), 10).await.expect("take");
    assert_eq!(again.iter().map(|c| c.id).collect::<Vec<_>>(), ids[1..]);
    // Newest first in the device's history.
    let listed = store
        .list_for_device(&phy("d-2"), None, 2)
        .await
        .expect("list");
    assert_eq!(listed[0].id, full.id);
}

#[tokio::test]
async fn terminal_states_are_final_and_from_is_checked() {
    let redis = RedisServer::start();
    let store = store(&redis).await;
    let c = route::submit(&store, new("d-3", true, None))
        .await
        .expect("submit");
    let now = iot_core::time::now_ms();
    assert_eq!(store.open_counts().await.expect("counts").queued, 1);
    // Not from `sent`: it is queued.
    let t = Transition::to(Status::Acked).from(&[Status::Sent]);
    assert_eq!(store.transition(&c.id, &t, now).await.expect("t"), None);
    let t = Transition::to(Status::Sent).set(field::ATTEMPTS, 1);
    assert_eq!(
        store.transition(&c.id, &t, now).await.expect("t"),
        Some(Status::Queued)
    );
    let open = |queued, sent| OpenCounts {
        queued,
        dispatched: 0,
        sent,
    };
    assert_eq!(store.open_counts().await.expect("counts"), open(0, 1));
    let t = Transition::to(Status::Acked).from(&[Status::Sent]);
    assert_eq!(
        store.transition(&c.id, &t, now + 5).await.expect("t"),
        Some(Status::Sent)
    );
    assert_eq!(store.open_counts().await.expect("counts"), open(0, 0));
    let t = Transition::to(Status::TimedOut);
    assert_eq!(
        store.transition(&c.id, &t, now + 6).await.expect("t"),
        None,
        "terminal is final"
    );
    assert_eq!(
        store.open_counts().await.expect("counts"),
        OpenCounts::default(),
        "a refused change moves no count"
    );
    let (read, log) = store
        .get_with_history(&c.id)
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(read.status, Status::Acked);
    assert_eq!(read.attempts, 1);
    assert_eq!(
        log.iter().map(|c| c.status).collect::<Vec<_>>(),
        [Status::Queued, Status::Sent, Status::Acked]
    );
    assert_eq!(
        store
            .transition(&uuid::Uuid::nil(), &Transition::to(Status::Sent), now)
            .await
            .expect("t"),
        None
    );
}

#[tokio::test]
async fn connected_device_gets_a_dispatch_on_its_owner_channel() {
    let redis = RedisServer::start();
    let store = store(&redis).await;
    connect(&store, "d-4", "srv-a", 7).await;
    assert!(
        matches!(route::locate(&store, &phy("d-4")).await.expect("locate"), Location::Connected(o) if o.epoch == 7)
    );

    let client = redis::Client::open(redis.url()).expect("client");
    let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
    pubsub
        .subscribe(
            store
                .keys()
                .downlink_channel(&ServerId::new("srv-a").expect("id")),
        )
        .await
        .expect("subscribe");
    let cmd = route::submit(&store, new("d-4", false, None))
        .await
        .expect("submit");
    assert_eq!(cmd.status, Status::Dispatched);
    assert_eq!(cmd.server_id.as_deref(), Some("srv-a"));
    assert_eq!(cmd.epoch, Some(7));
    let msg = tokio::time::timeout(Duration::from_secs(5), pubsub.on_message().next())
        .await
        .expect("message in time")
        .expect("message");
    let payload: Vec<u8> = msg.get_payload().expect("payload");
    match Control::decode(&payload).expect("decode") {
        Control::Command(d) => {
            assert_eq!(d.id, cmd.id);
            assert_eq!(d.epoch, 7);
            assert_eq!(d.name, "reboot");
            assert_eq!(d.payload, b"now");
            assert_eq!(d.hops, 0);
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn owner_without_listener_counts_as_offline() {
    let redis = RedisServer::start();
    let store = store(&redis).await;
    connect(&store, "d-5", "srv-dead", 1).await;
    let cmd = route::submit(&store, new("d-5", true, None))
        .await
        .expect("submit");
    assert_eq!(cmd.status, Status::Queued, "PUBLISH reached nobody: queued");
    let (_, log) = store
        .get_with_history(&cmd.id)
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(
        log.iter().map(|c| c.status).collect::<Vec<_>>(),
        [Status::Dispatched, Status::Queued]
    );
    let cmd = route::submit(&store, new("d-5", false, None))
        .await
        .expect("submit");
    assert_eq!(cmd.status, Status::Failed);
}

#[tokio::test]
async fn sweeper_expires_queued_commands_and_reroutes_stuck_ones() {
    let redis = RedisServer::start();
    let store = store(&redis).await;
    let short = route::submit(&store, new("d-6", true, Some(Duration::from_millis(50))))
        .await
        .expect("submit");
    assert_eq!(short.status, Status::Queued);
    let now = iot_core::time::now_ms();
    sweeper::sweep_once(&store, now + 100).await.expect("sweep");
    let read = store.get(&short.id).await.expect("get").expect("exists");
    assert_eq!(read.status, Status::Expired);
    assert_eq!(store.queue_len(&phy("d-6")).await.expect("len"), 0);

    // Dispatched to an instance that then dies without answering.
    connect(&store, "d-7", "srv-b", 3).await;
    let client = redis::Client::open(redis.url()).expect("client");
    let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
    pubsub
        .subscribe(
            store
                .keys()
                .downlink_channel(&ServerId::new("srv-b").expect("id")),
        )
        .await
        .expect("subscribe");
    let stuck = route::submit(&store, new("d-7", true, None))
        .await
        .expect("submit");
    assert_eq!(stuck.status, Status::Dispatched);
    drop(pubsub);
    no_listener(&redis, &store, "srv-b").await;
    // The device reconnected to srv-c meanwhile: the command follows it once.
    connect(&store, "d-7", "srv-c", 4).await;
    let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
    pubsub
        .subscribe(
            store
                .keys()
                .downlink_channel(&ServerId::new("srv-c").expect("id")),
        )
        .await
        .expect("subscribe");
    let later = iot_core::time::now_ms() + 10_000;
    sweeper::sweep_once(&store, later).await.expect("sweep");
    let read = store.get(&stuck.id).await.expect("get").expect("exists");
    assert_eq!(read.status, Status::Dispatched);
    assert_eq!(read.server_id.as_deref(), Some("srv-c"));
    assert_eq!(read.hops, 1);
    // srv-c lives, holds the device with that epoch, and never answered
    // (a report or the message was lost): dispatched there again, which is
    // not a second hop.
    sweeper::sweep_once(&store, later + 20_000)
        .await
        .expect("sweep");
    let (read, log) = store
        .get_with_history(&stuck.id)
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(read.status, Status::Dispatched);
    assert_eq!(read.server_id.as_deref(), Some("srv-c"));
    assert_eq!(read.hops, 1);
    assert_eq!(log.last().map(|c| c.reason.as_str()), Some("redispatch"));
    match next_control(&mut pubsub).await {
        Control::Command(d) => assert_eq!((d.id, d.epoch, d.hops), (stuck.id, 4, 1)),
        other => panic!("unexpected {other:?}"),
    }
    match next_control(&mut pubsub).await {
        Control::Command(d) => assert_eq!((d.id, d.epoch, d.hops), (stuck.id, 4, 1)),
        other => panic!("unexpected {other:?}"),
    }
    // srv-c stops listening: no second forward; it waits in the queue.
    drop(pubsub);
    no_listener(&redis, &store, "srv-c").await;
    sweeper::sweep_once(&store, later + 40_000)
        .await
        .expect("sweep");
    let read = store.get(&stuck.id).await.expect("get").expect("exists");
    assert_eq!(read.status, Status::Queued);
    eventually(Duration::from_secs(2), "queued id", || async {
        let n = store
            .queue_len(&phy("d-7"))
            .await
            .map_err(|e| e.to_string())?;
        if n == 1 { Ok(()) } else { Err(n.to_string()) }
    })
    .await;
}

#[tokio::test]
async fn requeue_puts_commands_back_in_front_in_order_and_park_at_the_tail() {
    let redis = RedisServer::start();
    let store = store(&redis).await;
    connect(&store, "d-rq", "srv-x", 1).await;
    // Nobody listens on srv-x's channel: hold the dispatches there by hand.
    let now = iot_core::time::now_ms();
    let mut sent = Vec::new();
    for i in 0..3 {
        let n = NewCommand {
            name: format!("c{i}"),
            ..new("d-rq", i != 1, None)
        };
        let c = store
            .create(
                uuid::Uuid::now_v7(),
                &n,
                Status::Dispatched,
                None,
                Some(("srv-x", 1)),
                now,
            )
            .await
            .expect("create");
        sent.push(c);
    }
    let older = route::submit(&store, new("d-rq", true, None)).await;
    // The owner has no listener: the submitted one ends in the queue.
    assert_eq!(older.expect("submit").status, Status::Queued);
    let t = Transition::to(Status::Sent).from(&[Status::Dispatched]);
    store.transition(&sent[0].id, &t, now).await.expect("sent");
    // An expired one, and one that is terminal already.
    let expired = store
        .create(
            uuid::Uuid::now_v7(),
            &new("d-rq", true, Some(Duration::from_millis(1))),
            Status::Dispatched,
            None,
            Some(("srv-x", 1)),
            now - 10,
        )
        .await
        .expect("create");
    let t = Transition::to(Status::Acked);
    store.transition(&sent[2].id, &t, now).await.expect("acked");

    let items: Vec<(uuid::Uuid, i64)> = [&sent[0], &sent[1], &expired, &sent[2]]
        .iter()
        .map(|c| (c.id, c.expires_at_ms))
        .collect();
    let back = route::requeue(&store, &phy("d-rq"), &items, "device_gone", None, now)
        .await
        .expect("requeue");
    assert_eq!(back, [sent[0].id, sent[1].id], "terminal ones left alone");
    let got = store.get(&expired.id).await.expect("get").expect("record");
    assert_eq!(got.status, Status::Expired);
    let got = store.get(&sent[0].id).await.expect("get").expect("record");
    assert_eq!(got.status, Status::Queued);
    assert_eq!(got.reason.as_deref(), Some("device_gone"));

    let older = store
        .list_for_device(&phy("d-rq"), None, 10)
        .await
        .expect("list");
    let older = older
        .iter()
        .find(|c| c.status == Status::Queued && !back.contains(&c.id))
        .expect("the submitted one")
        .id;
    let queue = store.take_queued(&phy("d-rq"), 10).await.expect("take");
    let order: Vec<_> = queue.iter().map(|c| c.id).collect();
    let order_items: Vec<_> = queue.iter().map(|c| (c.id, c.expires_at_ms)).collect();
    assert_eq!(order, [sent[0].id, sent[1].id, older], "requeued in front");

    // Park goes to the tail.
    let parked = store
        .create(
            uuid::Uuid::now_v7(),
            &new("d-rq", true, None),
            Status::Dispatched,
            None,
            Some(("srv-x", 1)),
            now,
        )
        .await
        .expect("create");
    let status = route::park(
        &store,
        &phy("d-rq"),
        &parked.id,
        parked.expires_at_ms,
        parked.expires_at_ms,
        "no_subscription",
        None,
        now,
    )
    .await
    .expect("park");
    assert_eq!(status, Some(Status::Queued));
    store
        .requeue_front(&phy("d-rq"), &order_items, now)
        .await
        .expect("back");
    let queue = store.take_queued(&phy("d-rq"), 10).await.expect("take");
    let all: Vec<_> = queue.iter().map(|c| c.id).collect();
    let all_items: Vec<_> = queue.iter().map(|c| (c.id, c.expires_at_ms)).collect();
    assert_eq!(all, [sent[0].id, sent[1].id, older, parked.id]);
    let got = store.get(&parked.id).await.expect("get").expect("record");
    assert_eq!(got.reason.as_deref(), Some("no_subscription"));

    // Parking a terminal command does nothing; a full queue fails it.
    let again = route::park(
        &store,
        &phy("d-rq"),
        &sent[2].id,
        i64::MAX,
        i64::MAX,
        "x",
        None,
        now,
    )
    .await
    .expect("park");
    assert_eq!(again, None);
    store
        .requeue_front(&phy("d-rq"), &all_items, now)
        .await
        .expect("back");
    let status = route::park(
        &store,
        &phy("d-rq"),
        &parked.id,
        parked.expires_at_ms,
        parked.expires_at_ms,
        "no_subscription",
        None,
        now,
    )
    .await
    .expect("park");
    assert_eq!(status, Some(Status::Failed));
    let got = store.get(&parked.id).await.expect("get").expect("record");
    assert_eq!(got.reason.as_deref(), Some("queue_full"));
}

async fn pttl(store: &CommandStore, key: &str) -> i64 {
    redis::cmd("PTTL")
        .arg(key)
        .query_async(&mut store.redis().get())
        .await
        .expect("PTTL")
}

#[tokio::test]
async fn the_queue_and_history_expiries_only_ever_grow() {
    let redis = RedisServer::start();
    let store = store(&redis).await;
    let p = phy("d-exp");
    let queue = store.keys().downlink_queue(&p);
    let history = store.keys().device_commands(&p);
    let long = route::submit(&store, new("d-exp", true, Some(Duration::from_secs(3600))))
        .await
        .expect("submit");
    assert_eq!(long.status, Status::Queued);
    // A short-lived command after it must not shorten the life of the
    // queue or the history that hold the long one (1 h + 60 s retention).
    let short = route::submit(&store, new("d-exp", true, Some(Duration::from_millis(100))))
        .await
        .expect("submit");
    assert_eq!(short.status, Status::Queued);
    for key in [&queue, &history] {
        let left = pttl(&store, key).await;
        assert!(left > 3_600_000, "{key} expires in {left} ms");
    }
    // Taken out (the list is gone), then put back: the fresh list gets the
    // expiry of its longest-lived command, not none.
    let taken = store.take_queued(&p, 10).await.expect("take");
    assert_eq!(taken.len(), 2);
    assert_eq!(pttl(&store, &queue).await, -2, "empty: gone");
    let items: Vec<_> = taken.iter().map(|c| (c.id, c.expires_at_ms)).collect();
    store
        .requeue_front(&p, &items, iot_core::time::now_ms())
        .await
        .expect("requeue");
    let left = pttl(&store, &queue).await;
    assert!(left > 3_600_000, "requeued list expires in {left} ms");
    let again = store.take_queued(&p, 10).await.expect("take");
    assert_eq!(
        again.iter().map(|c| c.id).collect::<Vec<_>>(),
        [long.id, short.id]
    );
}

#[tokio::test]
async fn verdicts_of_a_connection_the_command_left_are_refused_as_stale() {
    use iot_downlink::{Outcome, Refusal};
    let redis = RedisServer::start();
    let store = store(&redis).await;
    let now = iot_core::time::now_ms();
    let c = store
        .create(
            uuid::Uuid::now_v7(),
            &new("d-st", false, None),
            Status::Dispatched,
            None,
            Some(("srv-b", 3)),
            now,
        )
        .await
        .expect("create");
    let sent = |by: &str, epoch| {
        Transition::to(Status::Sent)
            .from(&[Status::Dispatched])
            .by(by, epoch)
    };
    for (by, epoch) in [("srv-a", 3), ("srv-b", 2)] {
        assert_eq!(
            store
                .transition_checked(&c.id, &sent(by, epoch), now)
                .await
                .expect("t"),
            Outcome::Refused(Refusal::Stale),
            "{by} epoch {epoch}"
        );
    }
    // A newer connection of the device on the owner instance may take it.
    let t = sent("srv-b", 4).set(field::EPOCH, 4);
    assert_eq!(
        store.transition_checked(&c.id, &t, now).await.expect("t"),
        Outcome::Applied {
            prev: Status::Dispatched,
            seq: 2
        }
    );
    // An old owner's timeout or ack changes nothing...
    for to in [Status::TimedOut, Status::Acked] {
        let t = Transition::to(to).by("srv-a", 9);
        assert_eq!(
            store.transition_checked(&c.id, &t, now).await.expect("t"),
            Outcome::Refused(Refusal::Stale)
        );
        let t = Transition::to(to).by("srv-b", 3);
        assert_eq!(
            store.transition_checked(&c.id, &t, now).await.expect("t"),
            Outcome::Refused(Refusal::Stale),
            "older than the epoch it was sent with"
        );
    }
    // ...and a guard that does not hold neither.
    let t = Transition::to(Status::Dispatched).guard(field::HOPS, 1);
    assert_eq!(
        store.transition_checked(&c.id, &t, now).await.expect("t"),
        Outcome::Refused(Refusal::Guard)
    );
    // Two changes with the same status in the same millisecond are two.
    let retransmit = Transition::to(Status::Sent)
        .from(&[Status::Sent])
        .by("srv-b", 4);
    for seq in [3, 4] {
        assert_eq!(
            store
                .transition_checked(&c.id, &retransmit, now)
                .await
                .expect("t"),
            Outcome::Applied {
                prev: Status::Sent,
                seq
            }
        );
    }
    let t = Transition::to(Status::Acked).by("srv-b", 4);
    assert!(store.transition(&c.id, &t, now).await.expect("t").is_some());
    let (read, log) = store
        .get_with_history(&c.id)
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(read.status, Status::Acked);
    assert_eq!(
        log.iter().map(|c| c.seq).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    // The change stream carries the same places.
    let entries: Vec<redis::streams::StreamId> = {
        let r: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(store.keys().command_events())
            .arg("-")
            .arg("+")
            .query_async(&mut store.redis().get())
            .await
            .expect("XRANGE");
        r.ids
    };
    let seqs: Vec<String> = entries
        .iter()
        .filter_map(|e| e.get::<String>("seq"))
        .collect();
    assert_eq!(seqs, ["1", "2", "3", "4", "5"]);
}

#[tokio::test]
async fn a_command_is_forwarded_once_even_by_two_forwarders_at_once() {
    let redis = RedisServer::start();
    let store = store(&redis).await;
    let now = iot_core::time::now_ms();
    // Dispatched to srv-old epoch 1; the device is on srv-new epoch 2.
    let c = store
        .create(
            uuid::Uuid::now_v7(),
            &new("d-fw", false, None),
            Status::Dispatched,
            None,
            Some(("srv-old", 1)),
            now,
        )
        .await
        .expect("create");
    connect(&store, "d-fw", "srv-new", 2).await;
    let client = redis::Client::open(redis.url()).expect("client");
    let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
    pubsub
        .subscribe(
            store
                .keys()
                .downlink_channel(&ServerId::new("srv-new").expect("id")),
        )
        .await
        .expect("subscribe");
    // A reporter (takeover) and the sweeper read the same record, both
    // with hops 0, and forward at once.
    let old = ServerId::new("srv-old").expect("id");
    let (a, b) = futures::join!(
        route::forward(&store, c.clone(), "takeover", Some((&old, 1))),
        route::forward(&store, c.clone(), "owner_lost", None),
    );
    a.expect("forward");
    b.expect("forward");
    let (read, log) = store
        .get_with_history(&c.id)
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(read.hops, 1);
    assert_eq!(read.server_id.as_deref(), Some("srv-new"));
    assert_eq!(
        log.iter().map(|c| c.status).collect::<Vec<_>>(),
        [Status::Dispatched, Status::Dispatched],
        "one forward: {log:?}"
    );
    match next_control(&mut pubsub).await {
        Control::Command(d) => assert_eq!((d.id, d.epoch, d.hops), (c.id, 2, 1)),
        other => panic!("unexpected {other:?}"),
    }
    // Later: the connection that reports it does not hold the device (the
    // new owner itself) is not a place to send it again.
    let read = store.get(&c.id).await.expect("get").expect("exists");
    let new_owner = ServerId::new("srv-new").expect("id");
    let after = route::forward(&store, read, "moved", Some((&new_owner, 2)))
        .await
        .expect("forward");
    assert_eq!(after.status, Status::Failed);
    assert_eq!(after.reason.as_deref(), Some("offline"));
}

/// Every command record in Redis (`command:{id}`), by scanning: a submit
/// dropped half-way may not have written the device's history yet.
async fn all_records(store: &CommandStore) -> Vec<iot_downlink::Command> {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("command:{*}")
        .query_async(&mut store.redis().get())
        .await
        .expect("KEYS");
    let ids: Vec<uuid::Uuid> = keys
        .iter()
        .filter_map(|k| k.strip_prefix("command:{")?.strip_suffix('}'))
        .filter_map(|s| uuid::Uuid::parse_str(s).ok())
        .collect();
    store.get_many(&ids).await.expect("records")
}

/// Sweeps at `at` until nothing more is due then.
async fn sweep_all(store: &CommandStore, at: i64) {
    while sweeper::sweep_once(store, at).await.expect("sweep") > 0 {}
}

#[tokio::test]
async fn a_submit_dropped_at_any_point_leaves_every_command_to_the_sweeper() {
    let redis = RedisServer::start();
    let store = store(&redis).await;
    // One device online (its owner listens), one offline with a queue.
    connect(&store, "d-on", "srv-live", 1).await;
    let client = redis::Client::open(redis.url()).expect("client");
    let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
    pubsub
        .subscribe(
            store
                .keys()
                .downlink_channel(&ServerId::new("srv-live").expect("id")),
        )
        .await
        .expect("subscribe");
    let ttl = Some(Duration::from_secs(30));
    let mut dropped = 0;
    for i in 0..60u64 {
        for p in ["d-on", "d-off"] {
            // The submit's steps, in the caller's task, cut after a growing
            // time: before, between and after each of them.
            let limit = Duration::from_micros(i * 40);
            let submit = route::submit_in_task(&store, new(p, true, ttl));
            if tokio::time::timeout(limit, submit).await.is_err() {
                dropped += 1;
            }
        }
    }
    assert!(dropped > 0, "no submit was cut short");

    let now = iot_core::time::now_ms();
    let records = all_records(&store).await;
    assert!(!records.is_empty());
    // Once a record exists, the sweeper watches it.
    for c in &records {
        let deadline = store.deadline(&c.id).await.expect("ZSCORE");
        assert!(
            c.status.is_terminal() || deadline.is_some(),
            "{c:?} has no deadline"
        );
    }
    // When the sweeper looks (stuck_after: 2 x 200 ms + 2 s), every open
    // command is where it can be delivered: in its device's queue, or
    // dispatched (again) to the owner.
    let look = now + 2_400 + 100;
    sweep_all(&store, look).await;
    for c in all_records(&store).await {
        match c.status {
            Status::Queued => assert!(
                store.in_queue(&c.phy_id, &c.id).await.expect("LPOS"),
                "{c:?} queued in no queue"
            ),
            Status::Dispatched => assert_eq!(c.server_id.as_deref(), Some("srv-live")),
            // Failed only for a full queue (3 places).
            Status::Failed => assert_eq!(c.reason.as_deref(), Some("queue_full"), "{c:?}"),
            other => panic!("unexpected {other} for {c:?}"),
        }
        assert!(store.deadline(&c.id).await.expect("ZSCORE").is_some() || c.status.is_terminal());
    }
    // Nobody answers: past their ttl every one ends, and no deadline is
    // left behind (not even one whose record was never written).
    let end = now + 31_000 + iot_core::config::millis(iot_downlink::store::CREATE_GRACE);
    sweep_all(&store, end).await;
    for c in all_records(&store).await {
        assert!(c.status.is_terminal(), "{c:?} still open");
    }
    let left: u64 = redis::cmd("ZCARD")
        .arg(store.keys().command_deadlines())
        .query_async(&mut store.redis().get())
        .await
        .expect("ZCARD");
    assert_eq!(left, 0);
}

#[tokio::test]
async fn a_submit_whose_publish_fails_returns_the_command_and_the_sweeper_sends_it() {
    let redis = RedisServer::start();
    let store = store(&redis).await;
    connect(&store, "d-np", "srv-np", 2).await;
    // A client that may do everything but PUBLISH.
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("nopub")
        .arg("on")
        .arg("nopass")
        .arg("~*")
        .arg("&*")
        .arg("+@all")
        .arg("-publish")
        .query_async(&mut store.redis().get())
        .await
        .expect("ACL");
    let cfg = iot_core::config::RedisConfig {
        url: redis.url().replace("redis://", "redis://nopub:@"),
        min_idle_conns: 1,
        ..Default::default()
    };
    let nopub = CommandStore::new(
        RedisPool::connect(&cfg).await.expect("redis"),
        Keys::default(),
        settings(),
    );
    let client = redis::Client::open(redis.url()).expect("client");
    let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
    pubsub
        .subscribe(
            store
                .keys()
                .downlink_channel(&ServerId::new("srv-np").expect("id")),
        )
        .await
        .expect("subscribe");
    let cmd = route::submit(&nopub, new("d-np", false, None))
        .await
        .expect("the command exists: no error");
    assert_eq!(cmd.status, Status::Dispatched);
    assert!(store.deadline(&cmd.id).await.expect("ZSCORE").is_some());
    // The sweeper (with a client that may publish) dispatches it again.
    sweep_all(&store, iot_core::time::now_ms() + 2_500).await;
    match next_control(&mut pubsub).await {
        Control::Command(d) => assert_eq!((d.id, d.epoch), (cmd.id, 2)),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn queued_commands_taken_by_a_drain_that_died_go_back_in_order() {
    let redis = RedisServer::start();
    let store = store(&redis).await;
    let p = phy("d-dr");
    let mut ids = Vec::new();
    for _ in 0..3 {
        let c = route::submit(&store, new("d-dr", true, None))
            .await
            .expect("submit");
        assert_eq!(c.status, Status::Queued);
        ids.push(c.id);
    }
    let now = iot_core::time::now_ms();
    // The sweeper's first look: they are in the queue; the next is at
    // their expiry.
    sweep_all(&store, now + 2_500).await;
    for id in &ids {
        let c = store.get(id).await.expect("get").expect("record");
        assert_eq!(
            store.deadline(id).await.expect("ZSCORE"),
            Some(c.expires_at_ms as f64)
        );
    }
    // A drain takes them (as the ingest's reporter does) and its instance
    // dies before any is sent; a newer one comes first in the queue.
    let taken = store.take_queued(&p, 2).await.expect("take");
    assert_eq!(taken.iter().map(|c| c.id).collect::<Vec<_>>(), ids[..2]);
    let newer = route::submit(&store, new("d-dr", true, None))
        .await
        .expect("submit");
    assert_eq!(store.queue_len(&p).await.expect("len"), 2);
    // Their deadlines moved before they left the queue: the sweeper will
    // look long before their expiry, not at it.
    let taken_at = iot_core::time::now_ms();
    for id in &ids[..2] {
        let at = store.deadline(id).await.expect("ZSCORE").expect("deadline");
        assert!(at <= (taken_at + 2_400) as f64, "{at}");
    }
    // Not yet: a drain that is alive has that long to send them.
    sweep_all(&store, taken_at).await;
    assert_eq!(store.queue_len(&p).await.expect("len"), 2);

    // The device is back, on srv-new: the sweeper puts them back, oldest
    // first, and tells srv-new to drain the queue.
    connect(&store, "d-dr", "srv-new", 5).await;
    let mut pubsub = client_pubsub(&redis, &store, "srv-new").await;
    sweep_all(&store, taken_at + 2_500).await;
    match next_control(&mut pubsub).await {
        Control::DrainQueue { phy_id } => assert_eq!(phy_id, p),
        other => panic!("unexpected {other:?}"),
    }
    let again = store.take_queued(&p, 10).await.expect("take");
    assert_eq!(
        again.iter().map(|c| c.id).collect::<Vec<_>>(),
        [ids[0], ids[1], ids[2], newer.id]
    );
    for c in &again[..2] {
        assert_eq!(c.status, Status::Queued);
        assert_eq!(c.reason.as_deref(), Some(sweeper::REQUEUED));
    }
    // Delivered this time: a late put-back changes nothing.
    for c in &again {
        let t = Transition::to(Status::Sent).from(&[Status::Queued]);
        store.transition(&c.id, &t, taken_at).await.expect("sent");
    }
    sweep_all(&store, taken_at + 5_000).await;
    assert_eq!(store.queue_len(&p).await.expect("len"), 0);
}

#[tokio::test]
async fn a_drain_right_after_the_sweeper_leased_the_command_keeps_its_deadline() {
    let redis = RedisServer::start();
    let store = store(&redis).await;
    let p = phy("d-race");
    let c = route::submit(&store, new("d-race", true, None))
        .await
        .expect("submit");
    let now = iot_core::time::now_ms();
    // The sweeper leases it (its first look)...
    let lease = now + 10_000;
    let leased = store
        .lease_due(now + 2_500, 10, lease)
        .await
        .expect("lease");
    assert_eq!(leased, [c.id]);
    // ...a drain takes it meanwhile...
    let taken = store.take_queued(&p, 10).await.expect("take");
    assert_eq!(taken.len(), 1);
    let drained = store
        .deadline(&c.id)
        .await
        .expect("ZSCORE")
        .expect("deadline");
    // ...and the sweeper's move to the command's expiry does not apply.
    assert!(
        !store
            .reschedule(&c.id, lease, c.expires_at_ms)
            .await
            .expect("reschedule")
    );
    assert_eq!(store.deadline(&c.id).await.expect("ZSCORE"), Some(drained));
    assert!(drained < c.expires_at_ms as f64);
}

async fn client_pubsub(
    redis: &RedisServer,
    store: &CommandStore,
    server: &str,
) -> redis::aio::PubSub {
    let client = redis::Client::open(redis.url()).expect("client");
    let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
    pubsub
        .subscribe(
            store
                .keys()
                .downlink_channel(&ServerId::new(server).expect("id")),
        )
        .await
        .expect("subscribe");
    pubsub
}
