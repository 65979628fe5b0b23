//! The archiver against real Redis and PostgreSQL: exactly the stream's
//! entries end up in the archive (compared as multisets, with `count(*)`),
//! across an aborted archiver task and a database outage; entries
//! PostgreSQL rejects become dead letters instead of stalling the archive;
//! entries a writer trims before the archive reads them are reported.
//! (`projector/tests/archive_kill.rs` SIGKILLs a real `iot-projector`.)

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

/// What the archive must end up with.
#[derive(Debug, Default)]
struct Expected {
    /// (stream, entry id, seq) of every event row.
    events: BTreeSet<(String, String, i32)>,
    /// (stream, entry id) of every transition row.
    transitions: BTreeSet<(String, String)>,
}

impl Expected {
    fn extend(&mut self, other: Expected) {
        self.events.extend(other.events);
        self.transitions.extend(other.transitions);
    }
}

/// Appends `n` entries (events and heartbeat batches) to the event shards
/// and a lifecycle entry every 10th, plus one undecodable entry; returns
/// the rows the archive must end up with.
async fn append(redis: &RedisPool, from: usize, n: usize) -> Expected {
    let keys = Keys::default();
    let server = ServerId::new("srv-1").expect("server id");
    let mut expected = Expected::default();
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
            expected.events.insert((stream.clone(), id.clone(), seq));
        }
        if i % 10 == 0 {
            let lstream = keys.lifecycle(shard);
            let lid: String = redis::cmd("XADD")
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
            expected.transitions.insert((lstream, lid));
        }
    }
    // A garbage entry becomes a dead letter, not retried forever.
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

/// Every archived event row's identity, sorted, duplicates kept.
async fn archived(store: &Store) -> Vec<(String, String, i32)> {
    sqlx::query_as::<_, (String, String, i32)>(
        "SELECT stream, entry_id, seq FROM events ORDER BY stream, entry_id, seq",
    )
    .fetch_all(store.pool())
    .await
    .expect("select")
}

/// Every archived transition row's identity, sorted, duplicates kept.
async fn archived_transitions(store: &Store) -> Vec<(String, String)> {
    sqlx::query_as::<_, (String, String)>(
        "SELECT stream, entry_id FROM transitions ORDER BY stream, entry_id",
    )
    .fetch_all(store.pool())
    .await
    .expect("select")
}

async fn count(store: &Store, table: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
        .fetch_one(store.pool())
        .await
        .expect("count")
}

/// The archive holds exactly `expected`: same multiset, same count.
async fn assert_archive_is(store: &Store, expected: &Expected) {
    let events = archived(store).await;
    let want: Vec<_> = expected.events.iter().cloned().collect();
    assert_eq!(events, want, "event rows (sorted, duplicates kept)");
    assert_eq!(count(store, "events").await, want.len() as i64);
    let transitions = archived_transitions(store).await;
    let want: Vec<_> = expected.transitions.iter().cloned().collect();
    assert_eq!(transitions, want, "transition rows");
    assert_eq!(count(store, "transitions").await, want.len() as i64);
}

fn command_store(pool: &RedisPool) -> iot_downlink::CommandStore {
    iot_downlink::CommandStore::new(
        pool.clone(),
        Keys::default(),
        iot_downlink::Settings {
            stream_maxlen: iot_core::config::StreamCap::fixed(None),
            ..iot_downlink::Settings::from(&iot_core::config::DownlinkConfig::default())
        },
    )
}

/// Commands `from..to`: even ones queued, sent and acked, odd ones failed
/// at once (their device is offline); returns every (command, status)
/// change the command log must hold.
async fn command_changes(
    commands: &iot_downlink::CommandStore,
    from: usize,
    to: usize,
) -> BTreeSet<(Uuid, String)> {
    use iot_downlink::{NewCommand, Status, Transition, route};
    let mut out = BTreeSet::new();
    for i in from..to {
        let queue = i % 2 == 0;
        let new = NewCommand {
            phy_id: PhyId::new(format!("cmd-dev-{i}")).expect("phy"),
            name: "reboot".into(),
            payload: vec![i as u8],
            ttl: None,
            queue_if_offline: queue,
        };
        let cmd = route::submit(commands, new).await.expect("submit");
        if queue {
            let now = iot_core::time::now_ms();
            for (k, to) in [Status::Sent, Status::Acked].into_iter().enumerate() {
                commands
                    .transition(&cmd.id, &Transition::to(to), now + 1 + k as i64)
                    .await
                    .expect("transition");
            }
            for s in ["queued", "sent", "acked"] {
                out.insert((cmd.id, s.to_owned()));
            }
        } else {
            out.insert((cmd.id, "failed".to_owned()));
        }
    }
    out
}

/// Every archived command change, sorted, duplicates kept.
async fn archived_changes(store: &Store) -> Vec<(Uuid, String)> {
    sqlx::query_as("SELECT command_id, status FROM command_events ORDER BY command_id, status")
        .fetch_all(store.pool())
        .await
        .expect("select")
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
        partial < expected.events.len(),
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
    eventually(Duration::from_secs(60), "every entry archived", || async {
        let got = archived(&store).await.len();
        let transitions = archived_transitions(&store).await.len();
        if got >= expected.events.len() && transitions >= expected.transitions.len() {
            Ok(())
        } else {
            Err(format!("{got} of {} rows", expected.events.len()))
        }
    })
    .await;
    assert_archive_is(&store, &expected).await;
    assert_eq!(expected.transitions.len(), 200);
    assert_eq!(
        count(&store, "archive_dead_letters").await,
        2,
        "the junk entry of each append, recorded once"
    );

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
    let commands = command_store(&pool);
    let mut expected = append(&pool, 0, 300).await;
    let mut changes = command_changes(&commands, 0, 5).await;
    eventually(
        Duration::from_secs(20),
        "first entries archived",
        || async {
            let n = archived(&store).await.len();
            if n == expected.events.len() {
                Ok(())
            } else {
                Err(n)
            }
        },
    )
    .await;

    pg.stop();
    expected.extend(append(&pool, 300, 300).await);
    changes.extend(command_changes(&commands, 5, 10).await);
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
    eventually(
        Duration::from_secs(60),
        "backlog archived after the outage",
        || async {
            let got = archived(&store).await.len();
            let t = archived_transitions(&store).await.len();
            let c = archived_changes(&store).await.len();
            if got >= expected.events.len() && t >= expected.transitions.len() && c >= changes.len()
            {
                Ok(())
            } else {
                Err((got, t, c))
            }
        },
    )
    .await;
    assert_archive_is(&store, &expected).await;
    // Every command change, before and during the outage, exactly once;
    // each command with its last status.
    let want: Vec<(Uuid, String)> = changes.iter().cloned().collect();
    assert_eq!(archived_changes(&store).await, want);
    assert_eq!(count(&store, "command_events").await, want.len() as i64);
    let statuses: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT id, status FROM commands ORDER BY id")
            .fetch_all(store.pool())
            .await
            .expect("commands");
    let mut last: std::collections::BTreeMap<Uuid, String> = Default::default();
    for (id, status) in &changes {
        let rank = |s: &str| {
            ["queued", "sent", "acked", "failed"]
                .iter()
                .position(|x| *x == s)
        };
        let keep = last.get(id).is_some_and(|cur| rank(cur) >= rank(status));
        if !keep {
            last.insert(*id, status.clone());
        }
    }
    assert_eq!(statuses, last.into_iter().collect::<Vec<_>>());
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
            stream_maxlen: iot_core::config::StreamCap::fixed(None),
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

async fn xadd_entry(
    conn: &mut redis::aio::ConnectionManager,
    stream: &str,
    entry: &Entry,
) -> String {
    redis::cmd("XADD")
        .arg(stream)
        .arg("*")
        .arg(ENTRY_FIELD)
        .arg(entry.encode())
        .query_async(conn)
        .await
        .expect("XADD")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_postgres_rejects_become_dead_letters_and_the_archive_goes_on() {
    let redis = RedisServer::start();
    let db = TestDb::create().await;
    let store = store_at(db.url()).await;
    let pool = pool(&redis).await;
    let keys = Keys::default();
    let mut conn = pool.get();

    let mut expected = append(&pool, 0, 120).await;
    let server = ServerId::new("srv-1").expect("server id");
    let uplink = |topic: &str, ts_ms| {
        Entry::Event(Event {
            phy_id: phy(9999),
            conn_id: Uuid::from_u128(9999),
            server_id: server.clone(),
            epoch: 1,
            ts_ms,
            kind: EventKind::Uplink {
                topic: topic.to_owned(),
                qos: 0,
                payload: b"x".to_vec(),
            },
        })
    };
    // jsonb cannot hold \u0000: PostgreSQL rejects the row (SQLSTATE 22P05).
    let poison_event = uplink("devices/x/up/bad\0topic", 1_795_000_000_000);
    let poison_event_id = xadd_entry(&mut conn, &keys.events(1), &poison_event).await;
    // text cannot hold NUL (SQLSTATE 22021).
    let poison_transition_id: String = redis::cmd("XADD")
        .arg(keys.lifecycle(2))
        .arg("*")
        .arg(&[
            ("phy_id", "dev-1"),
            ("online", "1"),
            ("reason", "bad\0reason"),
            ("at_ms", "1795000000000"),
        ])
        .query_async(&mut conn)
        .await
        .expect("XADD");
    // A time no day partition can hold: refused before PostgreSQL sees it.
    let far_id = xadd_entry(&mut conn, &keys.events(2), &uplink("t", i64::MIN / 2)).await;
    // Good entries after the poison in the same streams.
    expected.extend(append(&pool, 120, 60).await);

    let health = Health::default();
    let token = CancellationToken::new();
    let task = tokio::spawn(archiver::run(
        pool.clone(),
        store.clone(),
        health.clone(),
        opts("archiver-a"),
        token.clone(),
    ));
    let letters = eventually(Duration::from_secs(30), "everything handled", || async {
        let rows = archived(&store).await.len();
        let t = archived_transitions(&store).await.len();
        let letters = store.dead_letters(100).await.map_err(|e| e.to_string())?;
        if rows >= expected.events.len() && t >= expected.transitions.len() && letters.len() >= 5 {
            Ok(letters)
        } else {
            Err(format!(
                "{rows} rows, {t} transitions, {} dead letters",
                letters.len()
            ))
        }
    })
    .await;
    assert_archive_is(&store, &expected).await;
    assert_eq!(letters.len(), 5, "two junk, three poisoned: {letters:?}");
    // Entry ids are per stream: the same id may be in two streams.
    let letter = |stream: String, id: &str| {
        letters
            .iter()
            .find(|l| l.stream == stream && l.entry_id == id)
            .unwrap_or_else(|| panic!("no dead letter for {stream} {id}: {letters:?}"))
    };
    let e = letter(keys.events(1), &poison_event_id);
    assert!(!e.error.starts_with("undecodable"), "{}", e.error);
    use base64::Engine as _;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(e.fields["e"].as_str().expect("e field"))
        .expect("base64");
    assert_eq!(raw, poison_event.encode(), "the entry is kept as it was");
    let t = letter(keys.lifecycle(2), &poison_transition_id);
    assert!(
        !t.error.is_empty() && !t.error.starts_with("undecodable"),
        "{}",
        t.error
    );
    assert!(
        letter(keys.events(2), &far_id)
            .error
            .contains("outside the years"),
        "{letters:?}"
    );
    assert_eq!(
        health.status_of("archive"),
        Some(Status::Ok),
        "a rejected entry is not an outage"
    );

    // Nothing stalls: nothing left pending, and the streams are trimmed.
    eventually(Duration::from_secs(20), "acknowledged and trimmed", || {
        let mut conn = conn.clone();
        let keys = keys.clone();
        async move {
            let mut pending = 0;
            for key in [keys.events(1), keys.lifecycle(2), keys.events(2)] {
                let p: PendingSummary = redis::cmd("XPENDING")
                    .arg(&key)
                    .arg(iot_core::keys::ARCHIVER_GROUP)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| e.to_string())?;
                pending += p.0;
            }
            let left: u64 = redis::cmd("XLEN")
                .arg(keys.events(1))
                .query_async(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
            if pending == 0 && left < 40 {
                Ok(())
            } else {
                Err(format!("{pending} pending, {left} left in shard 1"))
            }
        }
    })
    .await;
    token.cancel();
    task.await.expect("archiver task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_trimmed_by_a_writer_before_the_archive_read_them_are_reported() {
    let redis = RedisServer::start();
    let db = TestDb::create().await;
    let store = store_at(db.url()).await;
    let pool = pool(&redis).await;
    let keys = Keys::default();
    let mut conn = pool.get();
    // Small radix tree nodes, so that the archiver's own `MINID ~` trims.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("stream-node-max-entries")
        .arg(2)
        .query_async(&mut conn)
        .await
        .expect("CONFIG SET");
    let stream = keys.events(0);
    let heartbeat = |i: usize| {
        Entry::Event(Event {
            phy_id: phy(i),
            conn_id: Uuid::from_u128(i as u128),
            server_id: ServerId::new("srv-1").expect("server id"),
            epoch: 1,
            ts_ms: 1_795_000_000_000 + i as i64,
            kind: EventKind::Heartbeat,
        })
    };
    let xlen = |conn: &redis::aio::ConnectionManager| {
        let mut conn = conn.clone();
        let stream = stream.clone();
        async move {
            redis::cmd("XLEN")
                .arg(stream)
                .query_async::<u64>(&mut conn)
                .await
                .map_err(|e| e.to_string())
        }
    };
    // Before the archive existed, a writer capped the stream: that is not
    // a loss of the archive.
    for i in 0..20 {
        xadd_entry(&mut conn, &stream, &heartbeat(i)).await;
    }
    let _: u64 = redis::cmd("XTRIM")
        .arg(&stream)
        .arg("MAXLEN")
        .arg(5)
        .query_async(&mut conn)
        .await
        .expect("XTRIM");

    let health = Health::default();
    let start = |consumer: &str| {
        let token = CancellationToken::new();
        let task = tokio::spawn(archiver::run(
            pool.clone(),
            store.clone(),
            health.clone(),
            opts(consumer),
            token.clone(),
        ));
        (token, task)
    };
    let (token, task) = start("archiver-a");
    // Archived and trimmed by the archiver itself (so a round that looked
    // for gaps has run).
    eventually(Duration::from_secs(20), "archived and trimmed", || async {
        let rows = store.count_events().await.map_err(|e| e.to_string())?;
        let left = xlen(&conn).await?;
        if rows == 5 && left <= 1 {
            Ok(())
        } else {
            Err(format!("{rows} rows, {left} left"))
        }
    })
    .await;
    assert_eq!(health.status_of("archive_gaps"), Some(Status::Ok));
    let marker: Option<String> = redis::cmd("GET")
        .arg(keys.archive_marker())
        .query_async(&mut conn)
        .await
        .expect("GET");
    assert_eq!(marker.as_deref(), Some(iot_core::keys::ARCHIVER_GROUP));
    assert!(
        iot_store::trim::archive_is_on(&mut conn, &keys)
            .await
            .expect("GET")
    );
    token.cancel();
    task.await.expect("archiver");

    // While no archiver runs, a writer with MAXLEN trims 50 unread entries.
    for i in 20..80 {
        xadd_entry(&mut conn, &stream, &heartbeat(i)).await;
    }
    let _: u64 = redis::cmd("XTRIM")
        .arg(&stream)
        .arg("MAXLEN")
        .arg(10)
        .query_async(&mut conn)
        .await
        .expect("XTRIM");
    let (token, task) = start("archiver-b");
    let detail = eventually(Duration::from_secs(20), "the gap reported", || async {
        let report = health.report();
        match report.checks.get("archive_gaps") {
            Some(c) if c.status == Status::Degraded => Ok(c.detail.clone().unwrap_or_default()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(
        detail.starts_with("50 stream entries left Redis before the archive stored them"),
        "{detail}"
    );
    assert!(detail.contains("database.url"), "says what to do: {detail}");
    assert!(health.is_optional("archive_gaps"), "not a readiness check");
    assert!(health.is_ready(), "a gap does not make the service unready");
    eventually(Duration::from_secs(20), "the rest archived", || async {
        let rows = store.count_events().await.map_err(|e| e.to_string())?;
        if rows == 15 {
            Ok(())
        } else {
            Err(format!("{rows} rows"))
        }
    })
    .await;
    token.cancel();
    task.await.expect("archiver");
}
