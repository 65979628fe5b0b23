//! The archiver against real Redis and PostgreSQL: exactly the stream's
//! entries end up in the archive, across a killed archiver and a database
//! outage.

use std::collections::BTreeSet;
use std::time::Duration;

use iot_core::event::{
    ENTRY_FIELD, Entry, Event, EventKind, Heartbeat, HeartbeatBatch, TcpDownReason,
};
use iot_core::keys::Keys;
use iot_core::{PhyId, ServerId};
use iot_service::health::{Health, Status};
use iot_service::redis::RedisPool;
use iot_store::Store;
use iot_store::archiver::{self, ArchiverOptions};
use iot_test_support::{PgServer, RedisServer, TestDb, eventually};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const SHARDS: u16 = 4;

/// XPENDING summary: count, smallest id, greatest id, per-consumer counts.
type PendingSummary = (
    u64,
    Option<String>,
    Option<String>,
    Option<Vec<(String, String)>>,
);

async fn pool(redis: &RedisServer) -> RedisPool {
    let cfg = iot_core::config::RedisConfig {
        url: redis.url(),
        min_idle_conns: 2,
        ..Default::default()
    };
    RedisPool::connect(&cfg).await.expect("redis")
}

async fn store_at(url: &str) -> Store {
    let cfg = iot_core::config::DatabaseConfig {
        url: url.to_owned(),
        connect_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let store = Store::connect(&cfg).await.expect("store");
    store.migrate().await.expect("migrate");
    store
}

fn opts(consumer: &str) -> ArchiverOptions {
    ArchiverOptions {
        keys: Keys::default(),
        shards: SHARDS,
        consumer: consumer.to_owned(),
        batch: 50,
        block: Duration::from_millis(50),
        claim_idle: Duration::from_millis(300),
        maintenance_interval: Duration::from_millis(100),
    }
}

fn phy(i: usize) -> PhyId {
    PhyId::new(format!("dev-{i}")).expect("phy")
}

/// Appends `n` entries (events and heartbeat batches) to the event shards
/// and a lifecycle entry every 10th; returns the (stream, id, seq) of every
/// row the archive must end up with.
async fn append(redis: &RedisPool, from: usize, n: usize) -> BTreeSet<(String, String, i32)> {
    let keys = Keys::default();
    let server = ServerId::new("srv-1").expect("server id");
    let mut expected = BTreeSet::new();
    let mut conn = redis.get();
    for i in from..from + n {
        let shard = (i % SHARDS as usize) as u16;
        let ts = 1_795_000_000_000 + i as i64;
        let (entry, rows) = if i % 3 == 0 {
            let beats = (0..5)
                .map(|j| Heartbeat {
                    phy_id: phy(i * 10 + j),
                    conn_id: Uuid::from_u128(i as u128),
                    epoch: 1,
                    ts_ms: ts,
                })
                .collect();
            (
                Entry::Heartbeats(HeartbeatBatch {
                    server_id: server.clone(),
                    beats,
                }),
                5,
            )
        } else {
            let kind = match i % 3 {
                1 => EventKind::Connected {
                    keepalive_secs: 30,
                    peer: "127.0.0.1:1".into(),
                },
                _ => EventKind::TcpDown {
                    reason: TcpDownReason::Reset,
                },
            };
            let e = Event {
                phy_id: phy(i),
                conn_id: Uuid::from_u128(i as u128),
                server_id: server.clone(),
                epoch: 1,
                ts_ms: ts,
                kind,
            };
            (Entry::Event(e), 1)
        };
        let stream = keys.events(shard);
        let id: String = redis::cmd("XADD")
            .arg(&stream)
            .arg("*")
            .arg(ENTRY_FIELD)
            .arg(entry.encode())
            .query_async(&mut conn)
            .await
            .expect("XADD");
        for seq in 0..rows {
            expected.insert((stream.clone(), id.clone(), seq));
        }
        if i % 10 == 0 {
            let lstream = keys.lifecycle(shard);
            let _: String = redis::cmd("XADD")
                .arg(&lstream)
                .arg("*")
                .arg(&[
                    ("phy_id", phy(i).to_string()),
                    ("online", "1".to_owned()),
                    ("reason", "connected".to_owned()),
                    ("at_ms", ts.to_string()),
                    ("epoch", "1".to_owned()),
                    ("rev", "1".to_owned()),
                ])
                .query_async(&mut conn)
                .await
                .expect("XADD lifecycle");
        }
    }
    // A garbage entry is skipped, not retried forever.
    let _: String = redis::cmd("XADD")
        .arg(keys.events(0))
        .arg("*")
        .arg(ENTRY_FIELD)
        .arg(b"\x09junk".as_slice())
        .query_async(&mut conn)
        .await
        .expect("XADD junk");
    expected
}

async fn archived(store: &Store) -> BTreeSet<(String, String, i32)> {
    sqlx::query_as::<_, (String, String, i32)>("SELECT stream, entry_id, seq FROM events")
        .fetch_all(store.pool())
        .await
        .expect("select")
        .into_iter()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_holds_exactly_the_stream_after_a_killed_archiver() {
    let redis = RedisServer::start();
    let db = TestDb::create().await;
    let store = store_at(db.url()).await;
    let pool = pool(&redis).await;

    let mut expected = append(&pool, 0, 1500).await;
    let first = tokio::spawn(archiver::run(
        pool.clone(),
        store.clone(),
        Health::default(),
        opts("archiver-a"),
        CancellationToken::new(),
    ));
    // Kill it mid-run: some batches stored, the rest not.
    eventually(Duration::from_secs(20), "first rows archived", || async {
        let n = store.count_events().await.map_err(|e| e.to_string())?;
        if n > 0 {
            Ok(n)
        } else {
            Err(format!("{n} rows"))
        }
    })
    .await;
    first.abort();
    let _ = first.await;
    let partial = store.count_events().await.expect("count") as usize;
    assert!(
        partial < expected.len(),
        "the kill came too late to test anything"
    );

    expected.extend(append(&pool, 1500, 500).await);
    let token = CancellationToken::new();
    let second = tokio::spawn(archiver::run(
        pool.clone(),
        store.clone(),
        Health::default(),
        opts("archiver-b"),
        token.clone(),
    ));
    let got = eventually(Duration::from_secs(60), "every entry archived", || async {
        let got = archived(&store).await;
        if got.len() >= expected.len() {
            Ok(got)
        } else {
            Err(format!("{} of {}", got.len(), expected.len()))
        }
    })
    .await;
    assert_eq!(got, expected, "archive must hold exactly the stream's rows");

    let transitions: i64 = sqlx::query_scalar("SELECT count(*) FROM transitions")
        .fetch_one(store.pool())
        .await
        .expect("count");
    assert_eq!(transitions, 200);

    // Everything processed by every group: the streams are trimmed.
    let mut conn = pool.get();
    eventually(Duration::from_secs(20), "streams trimmed", || {
        let mut conn = conn.clone();
        async move {
            let mut total = 0u64;
            for s in 0..SHARDS {
                let n: u64 = redis::cmd("XLEN")
                    .arg(Keys::default().events(s))
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| e.to_string())?;
                total += n;
            }
            if total < 500 {
                Ok(total)
            } else {
                Err(format!("{total} entries left"))
            }
        }
    })
    .await;
    // Nothing left pending in the archivers' group.
    for s in 0..SHARDS {
        let pending: PendingSummary = redis::cmd("XPENDING")
            .arg(Keys::default().events(s))
            .arg(iot_core::keys::ARCHIVER_GROUP)
            .query_async(&mut conn)
            .await
            .expect("XPENDING");
        assert_eq!(pending.0, 0, "shard {s} has pending entries");
    }
    token.cancel();
    second.await.expect("archiver task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_loses_nothing() {
    let redis = RedisServer::start();
    let mut pg = PgServer::start();
    let store = store_at(&pg.url()).await;
    let pool = pool(&redis).await;
    let health = Health::default();
    let token = CancellationToken::new();
    let task = tokio::spawn(archiver::run(
        pool.clone(),
        store.clone(),
        health.clone(),
        opts("archiver-a"),
        token.clone(),
    ));
    let mut expected = append(&pool, 0, 300).await;
    eventually(
        Duration::from_secs(20),
        "first entries archived",
        || async {
            let n = archived(&store).await.len();
            if n == expected.len() { Ok(()) } else { Err(n) }
        },
    )
    .await;

    pg.stop();
    expected.extend(append(&pool, 300, 300).await);
    eventually(
        Duration::from_secs(20),
        "archive reported degraded",
        || async {
            match health.status_of("archive") {
                Some(Status::Degraded) => Ok(()),
                other => Err(other),
            }
        },
    )
    .await;
    pg.start_again();
    let got = eventually(
        Duration::from_secs(60),
        "backlog archived after the outage",
        || async {
            let got = archived(&store).await;
            if got.len() >= expected.len() {
                Ok(got)
            } else {
                Err(got.len())
            }
        },
    )
    .await;
    assert_eq!(got, expected);
    eventually(Duration::from_secs(10), "archive healthy again", || async {
        match health.status_of("archive") {
            Some(Status::Ok) => Ok(()),
            other => Err(other),
        }
    })
    .await;
    token.cancel();
    task.await.expect("archiver task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_log_holds_every_state_change() {
    use iot_downlink::{CommandStore, NewCommand, Settings, Status, Transition, route};
    let redis = RedisServer::start();
    let db = TestDb::create().await;
    let store = store_at(db.url()).await;
    let pool = pool(&redis).await;
    let commands = CommandStore::new(
        pool.clone(),
        Keys::default(),
        Settings::from(&iot_core::config::DownlinkConfig::default()),
    );
    let new = |queue| NewCommand {
        phy_id: PhyId::new("dev-cmd").expect("phy"),
        name: "reboot".into(),
        payload: vec![0, 1, 2],
        ttl: None,
        queue_if_offline: queue,
    };
    let failed = route::submit(&commands, new(false)).await.expect("submit");
    let queued = route::submit(&commands, new(true)).await.expect("submit");
    let now = iot_core::time::now_ms();
    commands
        .transition(&queued.id, &Transition::to(Status::Sent), now + 1)
        .await
        .expect("sent");
    commands
        .transition(&queued.id, &Transition::to(Status::Acked), now + 2)
        .await
        .expect("acked");

    let token = CancellationToken::new();
    let task = tokio::spawn(archiver::run(
        pool.clone(),
        store.clone(),
        Health::default(),
        opts("archiver-a"),
        token.clone(),
    ));
    let rows = eventually(Duration::from_secs(20), "commands archived", || async {
        let rows = store
            .commands(Some("dev-cmd"), None, None, 10)
            .await
            .map_err(|e| e.to_string())?;
        if rows.len() == 2 && rows.iter().any(|r| r.status == "acked") {
            Ok(rows)
        } else {
            Err(format!("{rows:?}"))
        }
    })
    .await;
    let f = rows.iter().find(|r| r.id == failed.id).expect("failed one");
    assert_eq!(f.status, "failed");
    assert_eq!(f.reason.as_deref(), Some("offline"));
    let changes = store.command_changes(queued.id).await.expect("changes");
    assert_eq!(
        changes.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>(),
        ["queued", "sent", "acked"]
    );
    let by_status = store
        .commands(None, Some("acked"), None, 10)
        .await
        .expect("by status");
    assert_eq!(by_status.len(), 1);
    token.cancel();
    task.await.expect("archiver");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_and_command_streams_are_trimmed_only_after_they_are_archived() {
    use iot_downlink::{CommandStore, NewCommand, Settings, route};
    let redis = RedisServer::start();
    let db = TestDb::create().await;
    let store = store_at(db.url()).await;
    let pool = pool(&redis).await;
    let keys = Keys::default();
    let mut conn = pool.get();

    // As the services configure it with the archive on: no MAXLEN.
    let commands = CommandStore::new(
        pool.clone(),
        keys.clone(),
        Settings {
            stream_maxlen: None,
            ..Settings::from(&iot_core::config::DownlinkConfig::default())
        },
    );
    const COMMANDS: usize = 150;
    for i in 0..COMMANDS {
        let new = NewCommand {
            phy_id: phy(i),
            name: "reboot".into(),
            payload: vec![],
            ttl: None,
            queue_if_offline: false,
        };
        route::submit(&commands, new).await.expect("submit");
    }
    const TRANSITIONS: usize = 400;
    let lifecycle = keys.lifecycle(1);
    for i in 0..TRANSITIONS {
        let _: String = redis::cmd("XADD")
            .arg(&lifecycle)
            .arg("*")
            .arg(&[
                ("phy_id", phy(i).to_string()),
                ("online", (i % 2).to_string()),
                ("reason", "connected".to_owned()),
                ("at_ms", (1_795_000_000_000 + i as i64).to_string()),
                ("epoch", "1".to_owned()),
                ("rev", "1".to_owned()),
            ])
            .query_async(&mut conn)
            .await
            .expect("XADD lifecycle");
    }
    let xlen = |key: String| {
        let mut conn = conn.clone();
        async move {
            redis::cmd("XLEN")
                .arg(key)
                .query_async::<u64>(&mut conn)
                .await
                .map_err(|e| e.to_string())
        }
    };
    let command_entries = xlen(keys.command_events()).await.expect("XLEN");
    // One change each (created failed: the devices are offline).
    assert_eq!(command_entries, COMMANDS as u64);

    let token = CancellationToken::new();
    let task = tokio::spawn(archiver::run(
        pool.clone(),
        store.clone(),
        Health::default(),
        opts("archiver-a"),
        token.clone(),
    ));
    eventually(Duration::from_secs(30), "archived, then trimmed", || async {
        let rows: (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM transitions), (SELECT count(DISTINCT command_id) FROM command_events)",
        )
        .fetch_one(store.pool())
        .await
        .map_err(|e| e.to_string())?;
        let left = (
            xlen(lifecycle.clone()).await?,
            xlen(keys.command_events()).await?,
        );
        if rows == (TRANSITIONS as i64, COMMANDS as i64)
            && left.0 < TRANSITIONS as u64
            && left.1 < command_entries
        {
            Ok(())
        } else {
            Err(format!("rows {rows:?}, stream lengths {left:?}"))
        }
    })
    .await;
    token.cancel();
    task.await.expect("archiver");
}
