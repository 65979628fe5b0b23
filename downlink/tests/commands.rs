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
        stream_maxlen: Some(10_000),
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

/// Makes `phy` look connected to `server` with `epoch`.
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
    store
        .requeue_front(&phy("d-2"), &ids[1..])
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
    // srv-c never answers either: no second forward; it waits in the queue.
    sweeper::sweep_once(&store, later + 20_000)
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
    let back = route::requeue(&store, &phy("d-rq"), &items, "device_gone", now)
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
        "no_subscription",
        now,
    )
    .await
    .expect("park");
    assert_eq!(status, Some(Status::Queued));
    store
        .requeue_front(&phy("d-rq"), &order)
        .await
        .expect("back");
    let queue = store.take_queued(&phy("d-rq"), 10).await.expect("take");
    let all: Vec<_> = queue.iter().map(|c| c.id).collect();
    assert_eq!(all, [sent[0].id, sent[1].id, older, parked.id]);
    let got = store.get(&parked.id).await.expect("get").expect("record");
    assert_eq!(got.reason.as_deref(), Some("no_subscription"));

    // Parking a terminal command does nothing; a full queue fails it.
    let again = route::park(&store, &phy("d-rq"), &sent[2].id, i64::MAX, "x", now)
        .await
        .expect("park");
    assert_eq!(again, None);
    store.requeue_front(&phy("d-rq"), &all).await.expect("back");
    let status = route::park(
        &store,
        &phy("d-rq"),
        &parked.id,
        parked.expires_at_ms,
        "no_subscription",
        now,
    )
    .await
    .expect("park");
    assert_eq!(status, Some(Status::Failed));
    let got = store.get(&parked.id).await.expect("get").expect("record");
    assert_eq!(got.reason.as_deref(), Some("queue_full"));
}
