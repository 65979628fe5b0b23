//! Helpers shared by the projector's integration tests: configs, events,
//! injection into the streams and reading back the views and indexes.
#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use iot_core::event::{ENTRY_FIELD, Heartbeat, HeartbeatBatch};
use iot_core::keys::{PROJECTOR_GROUP, shard_of};
use iot_core::view::field;
use iot_core::{Config, Entry, Event, EventKind, Keys, PhyId, ServerId, TcpDownReason};
use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use uuid::Uuid;

/// The merge fields of a view (what `SessionView::to_fields` writes).
pub const MERGE_FIELDS: [&str; 11] = [
    field::PHY_ID,
    field::EPOCH,
    field::CONN_ID,
    field::SERVER_ID,
    field::CONNECTED_AT,
    field::ENDED,
    field::ENDED_AT,
    field::LAST_SEEN,
    field::LAST_TCP_DOWN,
    field::LAST_TCP_DOWN_REASON,
    field::LAST_ACK_TIMEOUT,
];

/// A config for tests: this Redis, this prefix, `shards` shards, fast loops.
pub fn config(url: &str, prefix: &str, shards: u16) -> Config {
    let mut c = Config::default();
    c.redis.url = url.to_owned();
    c.redis.key_prefix = prefix.to_owned();
    c.redis.min_idle_conns = 2;
    c.streams.shards = shards;
    c.projector.block = Duration::from_millis(50);
    c.projector.due_interval = Duration::from_millis(100);
    c.projector.lag_interval = Duration::from_millis(200);
    c.projector.reaper_interval = Duration::from_millis(200);
    c.projector.claim_interval = Duration::from_millis(500);
    c.projector.claim_idle = Duration::from_secs(1);
    c
}

pub async fn connect(url: &str) -> ConnectionManager {
    let client = redis::Client::open(url).expect("client");
    ConnectionManager::new(client).await.expect("connect")
}

pub fn phy(s: &str) -> PhyId {
    PhyId::new(s).expect("phy")
}

pub fn srv(s: &str) -> ServerId {
    ServerId::new(s).expect("server")
}

/// A deterministic connection id for (device, epoch).
pub fn conn_of(p: &str, epoch: u64) -> Uuid {
    let mut h: u128 = 0xcbf2_9ce4_8422_2325;
    for b in p.bytes() {
        h = (h ^ u128::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    Uuid::from_u128(h ^ (u128::from(epoch) << 64) ^ u128::from(epoch))
}

pub fn ev(p: &str, epoch: u64, server: &str, ts: i64, kind: EventKind) -> Event {
    Event {
        phy_id: phy(p),
        conn_id: conn_of(p, epoch),
        server_id: srv(server),
        epoch,
        ts_ms: ts,
        kind,
    }
}

pub fn connected() -> EventKind {
    EventKind::Connected {
        keepalive_secs: 30,
        peer: "127.0.0.1:40000".into(),
    }
}

pub fn tcp_down(reason: TcpDownReason) -> EventKind {
    EventKind::TcpDown { reason }
}

pub fn ack_timeout() -> EventKind {
    EventKind::AckTimeout {
        command_id: Uuid::from_u128(7),
    }
}

/// A heartbeat batch of one instance.
pub fn beats(server: &str, items: &[(&str, u64, i64)]) -> Entry {
    Entry::Heartbeats(HeartbeatBatch {
        server_id: srv(server),
        beats: items
            .iter()
            .map(|(p, epoch, ts)| Heartbeat {
                phy_id: phy(p),
                conn_id: conn_of(p, *epoch),
                epoch: *epoch,
                ts_ms: *ts,
            })
            .collect(),
    })
}

/// The shard of an entry (its first device).
pub fn entry_shard(e: &Entry, shards: u16) -> u16 {
    let p = match e {
        Entry::Event(ev) => ev.phy_id.as_str().to_owned(),
        Entry::Heartbeats(b) => b
            .beats
            .first()
            .map(|b| b.phy_id.as_str().to_owned())
            .unwrap_or_default(),
    };
    shard_of(&p, shards)
}

/// XADDs entries to their shards (pipelined in chunks).
pub async fn inject(conn: &mut ConnectionManager, keys: &Keys, shards: u16, entries: &[Entry]) {
    for chunk in entries.chunks(1000) {
        let mut pipe = redis::pipe();
        for e in chunk {
            pipe.cmd("XADD")
                .arg(keys.events(entry_shard(e, shards)))
                .arg("*")
                .arg(ENTRY_FIELD)
                .arg(e.encode())
                .ignore();
        }
        pipe.query_async::<()>(conn).await.expect("xadd");
    }
}

/// All fields of a device's view, with `last_seen` raised to the device's
/// score in the seen set (as every reader of a view does).
pub async fn view(conn: &mut ConnectionManager, keys: &Keys, p: &str) -> HashMap<String, String> {
    let mut f: HashMap<String, String> = conn.hgetall(keys.device(&phy(p))).await.expect("hgetall");
    fold_seen(conn, keys, p, &mut f).await;
    f
}

/// Raises `last_seen` in `f` to the device's seen score (looked up in every
/// shard's seen set: tests do not always know the shard count).
pub async fn fold_seen(
    conn: &mut ConnectionManager,
    keys: &Keys,
    p: &str,
    f: &mut HashMap<String, String>,
) {
    let sets = seen_sets(conn, keys).await;
    fold_seen_in(conn, &sets, p, f).await;
}

/// Every shard's seen set under `keys`.
pub async fn seen_sets(conn: &mut ConnectionManager, keys: &Keys) -> Vec<String> {
    let pattern = keys.seen(0).replace("{0}", "{*}");
    let mut sets: Vec<String> = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(10_000)
            .query_async(conn)
            .await
            .expect("scan");
        sets.extend(batch);
        if next == 0 {
            return sets;
        }
        cursor = next;
    }
}

async fn fold_seen_in(
    conn: &mut ConnectionManager,
    sets: &[String],
    p: &str,
    f: &mut HashMap<String, String>,
) {
    if f.is_empty() {
        return;
    }
    for set in sets {
        let score: Option<f64> = conn.zscore(set, p).await.expect("zscore");
        if let Some(t) = score.map(|t| t as i64) {
            let cur = f.get(field::LAST_SEEN).and_then(|v| v.parse::<i64>().ok());
            if cur.is_none_or(|c| t > c) {
                f.insert(field::LAST_SEEN.to_owned(), t.to_string());
            }
        }
    }
}

/// The merge fields of a view, sorted.
pub fn merge_fields(all: &HashMap<String, String>) -> BTreeMap<String, String> {
    all.iter()
        .filter(|(k, _)| MERGE_FIELDS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Every device's view under `keys`: phy -> (merge fields, online, reason).
pub async fn all_views(
    conn: &mut ConnectionManager,
    keys: &Keys,
) -> BTreeMap<String, (BTreeMap<String, String>, String, String)> {
    let mut names: Vec<String> = Vec::new();
    {
        let mut it: redis::AsyncIter<'_, String> =
            conn.scan_match(keys.device_pattern()).await.expect("scan");
        while let Some(k) = it.next_item().await {
            names.push(k.expect("key"));
        }
    }
    let sets = seen_sets(conn, keys).await;
    let mut out = BTreeMap::new();
    for k in names {
        let mut f: HashMap<String, String> = conn.hgetall(&k).await.expect("hgetall");
        let p = f.get(field::PHY_ID).cloned().unwrap_or_default();
        fold_seen_in(conn, &sets, &p, &mut f).await;
        out.insert(
            p,
            (
                merge_fields(&f),
                f.get(field::ONLINE).cloned().unwrap_or_default(),
                f.get(field::REASON).cloned().unwrap_or_default(),
            ),
        );
    }
    out
}

/// The union of the online indexes.
pub async fn online_set(
    conn: &mut ConnectionManager,
    keys: &Keys,
    shards: u16,
) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for s in 0..shards {
        let m: Vec<String> = conn.zrange(keys.online(s), 0, -1).await.expect("zrange");
        out.extend(m);
    }
    out
}

/// One lifecycle entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub phy: String,
    pub online: bool,
    pub reason: String,
    pub at_ms: i64,
    pub epoch: u64,
    pub rev: u64,
}

/// Every lifecycle entry of a device's shard for that device, in order.
pub async fn lifecycle(
    conn: &mut ConnectionManager,
    keys: &Keys,
    shards: u16,
    p: &str,
) -> Vec<Transition> {
    let reply: redis::streams::StreamRangeReply = conn
        .xrange_all(keys.lifecycle(shard_of(p, shards)))
        .await
        .expect("xrange");
    reply
        .ids
        .into_iter()
        .filter_map(|id| {
            let get = |k: &str| -> Option<String> { id.get(k) };
            let t = Transition {
                phy: get("phy_id")?,
                online: get("online")? == "1",
                reason: get("reason")?,
                at_ms: get("at_ms")?.parse().ok()?,
                epoch: get("epoch")?.parse().ok()?,
                rev: get("rev")?.parse().ok()?,
            };
            (t.phy == p).then_some(t)
        })
        .collect()
}

/// Entries pending or undelivered in the projectors' group, over all shards.
pub async fn backlog(conn: &mut ConnectionManager, keys: &Keys, shards: u16) -> (u64, u64) {
    let mut pending = 0;
    let mut lag = 0;
    for s in 0..shards {
        let v: redis::Value = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(keys.events(s))
            .query_async(conn)
            .await
            .unwrap_or(redis::Value::Nil);
        if let redis::Value::Array(groups) = v {
            for g in groups {
                let flat: Vec<redis::Value> = match g {
                    redis::Value::Array(a) => a,
                    redis::Value::Map(m) => m.into_iter().flat_map(|(k, v)| [k, v]).collect(),
                    _ => vec![],
                };
                let mut name = String::new();
                let mut p = 0;
                let mut l = 0;
                for pair in flat.chunks(2) {
                    let k: String = redis::from_redis_value(pair[0].clone()).unwrap_or_default();
                    match k.as_str() {
                        "name" => {
                            name = redis::from_redis_value(pair[1].clone()).unwrap_or_default()
                        }
                        "pending" => p = redis::from_redis_value(pair[1].clone()).unwrap_or(0),
                        "lag" => l = redis::from_redis_value(pair[1].clone()).unwrap_or(0),
                        _ => {}
                    }
                }
                if name == PROJECTOR_GROUP {
                    pending += p;
                    lag += l;
                }
            }
        }
    }
    (pending, lag)
}

/// A projector running in this process.
pub struct Running {
    pub token: tokio_util::sync::CancellationToken,
    pub handle: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub http: std::net::SocketAddr,
}

impl Running {
    /// Stops it and waits for `run` to return Ok.
    pub async fn stop(self) {
        self.token.cancel();
        let r = tokio::time::timeout(Duration::from_secs(10), self.handle)
            .await
            .expect("projector stops within 10 s")
            .expect("join");
        r.expect("projector run returned an error");
    }
}

/// Starts `projector::run` with `config` under server id `name`.
pub async fn start(mut config: Config, name: &str) -> Running {
    config.server_id = name.to_owned();
    let token = tokio_util::sync::CancellationToken::new();
    let ctx = iot_service::startup::Context::start(config, token.clone())
        .await
        .expect("context");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let http = listener.local_addr().expect("addr");
    let handle = tokio::spawn(projector::run(ctx, listener));
    Running {
        token,
        handle,
        http,
    }
}

/// Waits until every shard's group exists and nothing is pending or
/// undelivered.
pub async fn caught_up(conn: &mut ConnectionManager, keys: &Keys, shards: u16, timeout: Duration) {
    iot_test_support::eventually(timeout, "projectors caught up", || {
        let mut conn = conn.clone();
        let keys = keys.clone();
        async move {
            let groups = groups_present(&mut conn, &keys, shards).await;
            let (p, l) = backlog(&mut conn, &keys, shards).await;
            if groups && p == 0 && l == 0 {
                Ok(())
            } else {
                Err((groups, p, l))
            }
        }
    })
    .await
}

async fn groups_present(conn: &mut ConnectionManager, keys: &Keys, shards: u16) -> bool {
    for s in 0..shards {
        let v: redis::RedisResult<redis::Value> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(keys.events(s))
            .query_async(conn)
            .await;
        match v {
            Ok(redis::Value::Array(a)) if !a.is_empty() => {}
            _ => return false,
        }
    }
    true
}

/// A deterministic mixed workload over `devices` devices, timestamps from
/// `t0` on (1 ms apart per round): connects, `rounds` rounds of heartbeat
/// batches (50 devices per batch), uplinks, ACK timeouts, drops, reconnects
/// and clean disconnects. Returns the entries and the number of events.
pub fn workload(prefix: &str, devices: usize, rounds: usize, t0: i64) -> (Vec<Entry>, u64) {
    let name = |i: usize| format!("{prefix}{i:06}");
    let server = |i: usize, epoch: u64| format!("ing-{}", (i + epoch as usize) % 3);
    let mut out = Vec::new();
    let mut events = 0u64;
    for i in 0..devices {
        out.push(Entry::Event(ev(
            &name(i),
            1,
            &server(i, 1),
            t0 + i as i64 % 7,
            connected(),
        )));
        events += 1;
    }
    for r in 0..rounds {
        let ts = t0 + 10 + r as i64 * 10;
        for s in 0..3 {
            let members: Vec<usize> = (0..devices)
                .filter(|i| (i + 1) % 3 == s && !(r >= rounds / 2 && i % 5 == 0))
                .collect();
            for chunk in members.chunks(50) {
                let items: Vec<(String, u64, i64)> = chunk
                    .iter()
                    .map(|i| (name(*i), 1, ts + (*i as i64 % 5)))
                    .collect();
                let refs: Vec<(&str, u64, i64)> =
                    items.iter().map(|(p, e, t)| (p.as_str(), *e, *t)).collect();
                out.push(beats(&format!("ing-{s}"), &refs));
                events += refs.len() as u64;
            }
        }
        for i in (r % 4..devices).step_by(4) {
            let kind = match (i + r) % 6 {
                0 => EventKind::Uplink {
                    topic: format!("devices/{}/up/t", name(i)),
                    qos: 1,
                    payload: vec![r as u8],
                },
                1 => ack_timeout(),
                2 => EventKind::Ack {
                    command_id: Uuid::from_u128(r as u128),
                },
                _ => continue,
            };
            out.push(Entry::Event(ev(&name(i), 1, &server(i, 1), ts + 3, kind)));
            events += 1;
        }
        if r == rounds / 2 {
            // Every fifth device drops (keepalive) and reconnects with epoch
            // 2; the drop arrives after the reconnect for half of them.
            for i in (0..devices).step_by(5) {
                let down = Entry::Event(ev(
                    &name(i),
                    1,
                    &server(i, 1),
                    ts + 4,
                    tcp_down(TcpDownReason::Keepalive),
                ));
                let up = Entry::Event(ev(&name(i), 2, &server(i, 2), ts + 5, connected()));
                if i % 2 == 0 {
                    out.push(down);
                    out.push(up);
                } else {
                    out.push(up);
                    out.push(down);
                }
                events += 2;
            }
        }
    }
    // Every seventh device leaves cleanly at the end.
    for i in (0..devices).step_by(7) {
        let epoch = if i % 5 == 0 { 2 } else { 1 };
        let ts = t0 + 20 + rounds as i64 * 10;
        out.push(Entry::Event(ev(
            &name(i),
            epoch,
            &server(i, epoch),
            ts,
            EventKind::Disconnected,
        )));
        events += 1;
    }
    (out, events)
}

/// The snapshot two projections are compared by: every view's merge fields,
/// online and reason, and the online index.
pub async fn snapshot(
    conn: &mut ConnectionManager,
    keys: &Keys,
    shards: u16,
) -> (
    BTreeMap<String, (BTreeMap<String, String>, String, String)>,
    BTreeSet<String>,
) {
    (
        all_views(conn, keys).await,
        online_set(conn, keys, shards).await,
    )
}

/// The instances' connection sets (instance -> members) and the connection
/// keys of the views' bound connections (conn -> phy): the views outside
/// the devices' slots.
pub type Links = (
    BTreeMap<String, BTreeSet<String>>,
    BTreeMap<String, Option<String>>,
);

/// The [`Links`] under `keys`: every non-empty connection set found, and
/// the connection key of each view's bound connection.
pub async fn links(conn: &mut ConnectionManager, keys: &Keys) -> Links {
    let mut names: Vec<String> = Vec::new();
    {
        let mut it: redis::AsyncIter<'_, String> =
            conn.scan_match(keys.server_pattern()).await.expect("scan");
        while let Some(k) = it.next_item().await {
            names.push(k.expect("key"));
        }
    }
    let mut sets = BTreeMap::new();
    for k in names.iter().filter(|k| k.ends_with(":conns")) {
        let m: BTreeSet<String> = conn.smembers(k).await.expect("smembers");
        if !m.is_empty() {
            sets.insert(k.clone(), m);
        }
    }
    let mut conn_keys = BTreeMap::new();
    for (_, (fields, _, _)) in all_views(conn, keys).await {
        if let Some(id) = fields.get(field::CONN_ID) {
            let id = Uuid::parse_str(id).expect("conn id");
            let owner: Option<String> = conn.get(keys.conn(&id)).await.expect("get");
            conn_keys.insert(id.to_string(), owner);
        }
    }
    (sets, conn_keys)
}

/// The [`Links`] that views imply: each live bound connection (epoch above
/// 0, not ended) in its instance's set, each bound connection's key naming
/// its device.
pub fn links_of(
    keys: &Keys,
    views: &BTreeMap<String, (BTreeMap<String, String>, String, String)>,
) -> Links {
    let mut sets: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut conn_keys = BTreeMap::new();
    for (p, (f, _, _)) in views {
        let Some(c) = f.get(field::CONN_ID) else {
            continue;
        };
        conn_keys.insert(c.clone(), Some(p.clone()));
        let epoch: u64 = f
            .get(field::EPOCH)
            .and_then(|e| e.parse().ok())
            .unwrap_or(0);
        if let Some(s) = f.get(field::SERVER_ID)
            && epoch > 0
            && !f.contains_key(field::ENDED)
        {
            sets.entry(keys.server_conns(&srv(s)))
                .or_default()
                .insert(c.clone());
        }
    }
    (sets, conn_keys)
}

/// The environment that points an `iot-projector` process at this Redis
/// and prefix (plus `extra`).
pub fn process_env(
    url: &str,
    prefix: &str,
    shards: u16,
    http: &str,
    id: &str,
) -> Vec<(String, String)> {
    vec![
        ("REDIS_URL".into(), url.into()),
        ("IOT_REDIS_KEY_PREFIX".into(), prefix.into()),
        ("IOT_REDIS_MIN_IDLE_CONNS".into(), "2".into()),
        ("IOT_HTTP_LISTEN".into(), http.into()),
        ("SERVER_ID".into(), id.into()),
        ("IOT_STREAMS_SHARDS".into(), shards.to_string()),
        ("IOT_SESSION_HEARTBEAT_TIMEOUT".into(), "10m".into()),
        ("IOT_POLICY_TCP_DOWN_WINDOW".into(), "10m".into()),
        ("IOT_POLICY_ACK_WINDOW".into(), "10m".into()),
        ("IOT_PROJECTOR_CLAIM_IDLE".into(), "1s".into()),
        ("IOT_PROJECTOR_CLAIM_INTERVAL".into(), "300ms".into()),
        ("IOT_LOG_LEVEL".into(), "warn".into()),
    ]
}
