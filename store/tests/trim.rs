//! The trim point and the lost-entry count against a real redis-server,
//! with group states built step by step (no archiver running), so that the
//! race between `XINFO GROUPS` and `XPENDING` happens every time.

use iot_store::trim::{self, GroupProgress};
use iot_test_support::RedisServer;
use redis::aio::MultiplexedConnection;

const KEY: &str = "stream:events:{0}";

async fn conn(redis: &RedisServer) -> MultiplexedConnection {
    let c = redis::Client::open(redis.url()).expect("url");
    let mut conn = c.get_multiplexed_async_connection().await.expect("connect");
    // Two entries per radix tree node: `XTRIM MINID ~` can trim at almost
    // any entry, so a wrong trim point shows.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("stream-node-max-entries")
        .arg(2)
        .query_async(&mut conn)
        .await
        .expect("CONFIG SET");
    conn
}

async fn xadd(conn: &mut MultiplexedConnection, ids: std::ops::RangeInclusive<u64>) {
    for i in ids {
        let _: String = redis::cmd("XADD")
            .arg(KEY)
            .arg(format!("{i}-0"))
            .arg("e")
            .arg(i)
            .query_async(conn)
            .await
            .expect("XADD");
    }
}

async fn group(conn: &mut MultiplexedConnection, name: &str) {
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(KEY)
        .arg(name)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(conn)
        .await
        .expect("XGROUP CREATE");
}

/// Reads up to `count` new entries for `group`; returns their ids.
async fn read(conn: &mut MultiplexedConnection, group: &str, count: usize) -> Vec<String> {
    let reply: Option<redis::streams::StreamReadReply> = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(group)
        .arg("c")
        .arg("COUNT")
        .arg(count)
        .arg("STREAMS")
        .arg(KEY)
        .arg(">")
        .query_async(conn)
        .await
        .expect("XREADGROUP");
    reply
        .map(|r| {
            r.keys
                .into_iter()
                .flat_map(|k| k.ids.into_iter().map(|i| i.id))
                .collect()
        })
        .unwrap_or_default()
}

async fn ack(conn: &mut MultiplexedConnection, group: &str, ids: &[String]) {
    let _: u64 = redis::cmd("XACK")
        .arg(KEY)
        .arg(group)
        .arg(ids)
        .query_async(conn)
        .await
        .expect("XACK");
}

async fn ids_in_stream(conn: &mut MultiplexedConnection) -> Vec<String> {
    let r: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(KEY)
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await
        .expect("XRANGE");
    r.ids.into_iter().map(|i| i.id).collect()
}

fn of<'a>(groups: &'a [GroupProgress], name: &str) -> &'a GroupProgress {
    groups.iter().find(|g| g.name == name).expect("group")
}

#[tokio::test]
async fn a_group_that_acks_everything_between_xinfo_and_xpending_still_bounds_the_trim() {
    let redis = RedisServer::start();
    let mut conn = conn(&redis).await;
    group(&mut conn, "archivers").await;
    group(&mut conn, "projectors").await;
    xadd(&mut conn, 1..=10).await;
    // The projectors have read 1..=5 (pending); the archive has read and
    // acknowledged everything.
    let projected = read(&mut conn, "projectors", 5).await;
    assert_eq!(projected.len(), 5);
    let archived = read(&mut conn, "archivers", 10).await;
    ack(&mut conn, "archivers", &archived).await;

    let snapshot = trim::group_progress(&mut conn, KEY).await.expect("XINFO");
    assert_eq!(of(&snapshot, "projectors").pending, 5);
    // The race: the projectors acknowledge everything right after the
    // snapshot, so XPENDING finds nothing for them.
    ack(&mut conn, "projectors", &projected).await;

    let point = trim::safe_trim_point(&mut conn, KEY, &snapshot)
        .await
        .expect("trim point");
    assert_eq!(
        point.as_deref(),
        Some("5-1"),
        "bounded by the entry after the projectors' last delivered one, not by the archive alone"
    );
    let trimmed = trim::trim_below(&mut conn, KEY, &snapshot)
        .await
        .expect("XTRIM");
    assert!(trimmed > 0 && trimmed <= 5, "trimmed {trimmed}");
    let left = ids_in_stream(&mut conn).await;
    for i in 6..=10 {
        assert!(
            left.contains(&format!("{i}-0")),
            "entry {i} was not read by the projectors yet and must stay: {left:?}"
        );
    }
    let unread = read(&mut conn, "projectors", 100).await;
    assert_eq!(unread, ["6-0", "7-0", "8-0", "9-0", "10-0"]);
}

#[tokio::test]
async fn the_oldest_pending_entry_and_an_unread_group_bound_the_trim() {
    let redis = RedisServer::start();
    let mut conn = conn(&redis).await;
    group(&mut conn, "archivers").await;
    xadd(&mut conn, 1..=10).await;
    let read_ids = read(&mut conn, "archivers", 10).await;
    // 3 and everything after it still pending.
    ack(&mut conn, "archivers", &read_ids[..2]).await;
    let groups = trim::group_progress(&mut conn, KEY).await.expect("XINFO");
    assert_eq!(
        trim::safe_trim_point(&mut conn, KEY, &groups)
            .await
            .expect("point")
            .as_deref(),
        Some("3-0")
    );
    // A group that has read nothing keeps everything.
    group(&mut conn, "audit").await;
    let groups = trim::group_progress(&mut conn, KEY).await.expect("XINFO");
    assert_eq!(
        trim::trim_below(&mut conn, KEY, &groups)
            .await
            .expect("XTRIM"),
        0
    );
    assert_eq!(ids_in_stream(&mut conn).await.len(), 10);
}

#[tokio::test]
async fn entries_a_writer_trims_before_the_archive_reads_them_are_counted() {
    let redis = RedisServer::start();
    let mut conn = conn(&redis).await;
    group(&mut conn, "archivers").await;
    xadd(&mut conn, 1..=10).await;
    let first = read(&mut conn, "archivers", 3).await;
    ack(&mut conn, "archivers", &first).await;
    let groups = trim::group_progress(&mut conn, KEY).await.expect("XINFO");
    let stream = trim::stream_progress(&mut conn, KEY)
        .await
        .expect("XINFO STREAM")
        .expect("stream exists");
    assert_eq!(
        trim::unread_removed(&stream, trim::archiver_group(&groups).expect("ours")),
        Some(0)
    );

    // A writer capping the stream (exactly) at 2 entries: 4..=8 are gone
    // unread.
    let _: u64 = redis::cmd("XTRIM")
        .arg(KEY)
        .arg("MAXLEN")
        .arg(2)
        .query_async(&mut conn)
        .await
        .expect("XTRIM");
    let groups = trim::group_progress(&mut conn, KEY).await.expect("XINFO");
    let stream = trim::stream_progress(&mut conn, KEY)
        .await
        .expect("XINFO STREAM")
        .expect("stream exists");
    assert_eq!(stream.first_entry_id.as_deref(), Some("9-0"));
    assert_eq!(
        trim::unread_removed(&stream, trim::archiver_group(&groups).expect("ours")),
        Some(5)
    );
    assert!(
        trim::stream_progress(&mut conn, "no-such-stream")
            .await
            .expect("XINFO")
            .is_none()
    );
    assert!(
        trim::group_progress(&mut conn, "no-such-stream")
            .await
            .expect("XINFO")
            .is_empty()
    );
}

async fn xlen(conn: &mut MultiplexedConnection, key: &str) -> u64 {
    redis::cmd("XLEN")
        .arg(key)
        .query_async(conn)
        .await
        .expect("XLEN")
}

/// Submits a command for an offline device (it fails at once): each one
/// appends to `stream:commands`, capped as the store's settings say.
async fn submit(commands: &iot_downlink::CommandStore, i: usize) {
    let new = iot_downlink::NewCommand {
        phy_id: iot_core::PhyId::new(format!("cap-dev-{i}")).expect("phy"),
        name: "reboot".into(),
        payload: vec![],
        ttl: None,
        queue_if_offline: false,
    };
    iot_downlink::route::submit(commands, new)
        .await
        .expect("submit");
}

#[tokio::test]
async fn writers_drop_their_maxlen_once_an_archiver_marked_the_archive_on() {
    const MAXLEN: u64 = 4;
    let redis = RedisServer::start();
    // Two entries per node: `MAXLEN ~ 4` keeps fewer than 4 + 2 entries.
    let mut conn = conn(&redis).await;
    let keys = iot_core::Keys::new("w:").expect("prefix");
    // A service without `database.url` (an ingest in open mode) caps...
    let mut config = iot_core::Config::default();
    config.redis.url = redis.url();
    config.redis.key_prefix = "w:".into();
    config.streams.maxlen = MAXLEN;
    assert!(!trim::archive_is_on(&mut conn, &keys).await.expect("GET"));
    let token = tokio_util::sync::CancellationToken::new();
    let ctx = iot_service::startup::Context::start(config.clone(), token.clone())
        .await
        .expect("context");
    assert_eq!(ctx.config.stream_maxlen(), Some(MAXLEN));
    // A real writer of this service: the command store, on `stream:commands`.
    let commands = iot_downlink::CommandStore::new(
        ctx.redis.clone(),
        ctx.config.keys(),
        iot_downlink::Settings::from_config(&ctx.config),
    );
    let stream = keys.command_events();
    for i in 0..40 {
        submit(&commands, i).await;
    }
    let capped = xlen(&mut conn, &stream).await;
    assert!(capped < MAXLEN + 2, "MAXLEN ~ {MAXLEN} caps: {capped}");

    // ...until an archiver marks the archive on: the running writer notices
    // within a re-read of the marker, without a restart, and leaves trimming
    // to the archiver.
    trim::mark_archive_on(&mut conn, &keys).await.expect("SET");
    assert!(trim::archive_is_on(&mut conn, &keys).await.expect("GET"));
    let (writer, key, probe) = (&commands, stream.as_str(), conn.clone());
    let mut i = 40;
    let grown = iot_test_support::eventually(
        iot_service::startup::ARCHIVER_POLL * 5,
        "the writer stops capping stream:commands",
        move || {
            i += 1;
            let mut conn = probe.clone();
            async move {
                submit(writer, i).await;
                let len = xlen(&mut conn, key).await;
                if len > 8 * MAXLEN { Ok(len) } else { Err(len) }
            }
        },
    )
    .await;
    assert!(grown > 8 * MAXLEN, "{grown}");
    assert_eq!(ctx.config.stream_maxlen(), None);
    // Sticky: the writer does not cap again when the marker is gone (an
    // archiver stopped for a while has not stored what a cap would drop).
    let _: u64 = redis::cmd("DEL")
        .arg(keys.archive_marker())
        .query_async(&mut conn)
        .await
        .expect("DEL");
    for j in 0..10 {
        submit(&commands, 10_000 + j).await;
    }
    assert!(xlen(&mut conn, &stream).await >= grown + 10);
    token.cancel();

    // A service started while the marker is there does not cap at all.
    trim::mark_archive_on(&mut conn, &keys).await.expect("SET");
    let token = tokio_util::sync::CancellationToken::new();
    let ctx = iot_service::startup::Context::start(config, token.clone())
        .await
        .expect("context");
    token.cancel();
    assert_eq!(ctx.config.stream_maxlen(), None);
    let ttl: i64 = redis::cmd("PTTL")
        .arg(keys.archive_marker())
        .query_async(&mut conn)
        .await
        .expect("PTTL");
    assert!(
        ttl > 0 && ttl as u128 <= trim::MARKER_TTL.as_millis(),
        "{ttl}"
    );
}
