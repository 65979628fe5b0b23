//! The instances' connection sets under the epoch rule, on a real Redis,
//! with two projections racing: a projector's write of an older state that
//! arrives after another projector's write of a newer one changes nothing
//! (a `connected` whose set write lands after its connection's `tcp_down`;
//! a reaped epoch's end landing after the same connection was announced
//! again with a new epoch); a redelivered entry whose writes were lost
//! (the projector died between the device function and its follow-up)
//! repairs the set; heartbeats of online devices never touch the sets; the
//! marks expire; `rebuild --reset` clears sets and marks.
//!
//! The races are made with a connection that holds back (or loses) the
//! follow-up pipeline carrying the set writes until the test lets it go:
//! every command still runs on the real Redis, in the order of the race.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use iot_core::{Entry, Event, EventKind, Keys, TcpDownReason};
use iot_test_support::{RedisServer, unique_prefix};
use projector::projection::{Applied, Item, Lifecycle, marks_generation_ms};
use projector::{Projection, Settings};
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::{AsyncCommands, Cmd, Pipeline, RedisFuture, Value};
use tokio::sync::oneshot;

const SHARDS: u16 = 2;

/// What the gate does with the next pipeline that writes a connection set.
enum Mode {
    /// Sends it.
    Pass,
    /// Says so on `reached`, waits for `release`, then sends it.
    Hold {
        reached: oneshot::Sender<()>,
        release: oneshot::Receiver<()>,
    },
    /// Fails without sending it (the projector died before it).
    Lose,
}

/// A connection to the real Redis that can hold back or lose the pipeline
/// carrying the connection-set writes (`FCALL …_conns`); counts those
/// pipelines.
#[derive(Clone)]
struct Gate {
    inner: ConnectionManager,
    mode: Arc<Mutex<Mode>>,
    set_writes: Arc<AtomicUsize>,
}

impl Gate {
    fn new(inner: ConnectionManager) -> Self {
        Self {
            inner,
            mode: Arc::new(Mutex::new(Mode::Pass)),
            set_writes: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Holds the next set write: returns (reached, release).
    fn hold(&self) -> (oneshot::Receiver<()>, oneshot::Sender<()>) {
        let (reached_tx, reached_rx) = oneshot::channel();
        let (release_tx, release_rx) = oneshot::channel();
        *self.mode.lock().unwrap() = Mode::Hold {
            reached: reached_tx,
            release: release_rx,
        };
        (reached_rx, release_tx)
    }

    fn lose(&self) {
        *self.mode.lock().unwrap() = Mode::Lose;
    }

    fn set_writes(&self) -> usize {
        self.set_writes.load(Ordering::SeqCst)
    }
}

fn writes_sets(pipeline: &Pipeline) -> bool {
    pipeline.cmd_iter().any(|cmd| {
        let mut args = cmd.args_iter().map(|a| match a {
            redis::Arg::Simple(b) => b.to_vec(),
            _ => Vec::new(),
        });
        args.next().as_deref() == Some(b"FCALL".as_slice())
            && args.next().is_some_and(|name| name.ends_with(b"_conns"))
    })
}

impl ConnectionLike for Gate {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        self.inner.req_packed_command(cmd)
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            if writes_sets(pipeline) {
                self.set_writes.fetch_add(1, Ordering::SeqCst);
                let mode = std::mem::replace(&mut *self.mode.lock().unwrap(), Mode::Pass);
                match mode {
                    Mode::Pass => {}
                    Mode::Hold { reached, release } => {
                        let _ = reached.send(());
                        let _ = release.await;
                    }
                    Mode::Lose => {
                        return Err(redis::RedisError::from(std::io::Error::new(
                            std::io::ErrorKind::ConnectionReset,
                            "follow-up lost (test)",
                        )));
                    }
                }
            }
            self.inner
                .req_packed_commands(pipeline, offset, count)
                .await
        })
    }

    fn get_db(&self) -> i64 {
        self.inner.get_db()
    }
}

struct Setup {
    _redis: RedisServer,
    keys: Keys,
    proj: Arc<Projection>,
    conn: ConnectionManager,
    gate: Gate,
}

async fn setup() -> Setup {
    let redis = RedisServer::start();
    let prefix = unique_prefix();
    let c = config(&redis.url(), &prefix, SHARDS);
    let proj = Arc::new(Projection::new(Arc::new(Settings::from_config(
        &c,
        &srv("t"),
    ))));
    let mut conn = connect(&redis.url()).await;
    proj.scripts().load(&mut conn).await.unwrap();
    let gate = Gate::new(connect(&redis.url()).await);
    Setup {
        _redis: redis,
        keys: Keys::new(prefix).unwrap(),
        proj,
        conn,
        gate,
    }
}

fn items(entries: &[Entry], redelivered: bool) -> Vec<Item> {
    entries
        .iter()
        .map(|entry| Item {
            entry: entry.clone(),
            redelivered,
        })
        .collect()
}

async fn apply<C: ConnectionLike>(p: &Projection, conn: &mut C, e: Entry, now: i64) -> Applied {
    p.apply(conn, &items(&[e], false), Lifecycle::Emit, now)
        .await
        .unwrap()
}

async fn members(conn: &mut ConnectionManager, keys: &Keys, server: &str) -> BTreeSet<String> {
    conn.smembers(keys.server_conns(&srv(server)))
        .await
        .unwrap()
}

/// Applies `first` through the gate with its set write held back, then
/// `second` directly, then lets the held write go.
async fn race(s: &mut Setup, first: Entry, second: Entry, now: i64) {
    let (reached, release) = s.gate.hold();
    let (proj, mut gate) = (s.proj.clone(), s.gate.clone());
    let held = tokio::spawn(async move { apply(&proj, &mut gate, first, now).await });
    reached
        .await
        .expect("the first apply reaches its set write");
    apply(&s.proj, &mut s.conn, second, now + 1).await;
    release.send(()).unwrap();
    held.await.unwrap();
}

#[tokio::test]
async fn a_connected_whose_set_write_lands_after_its_tcp_down_stays_out() {
    let mut s = setup().await;
    let (d, t) = ("dev-r", iot_core::time::now_ms());
    let c = conn_of(d, 1).to_string();
    // Projector A merged connected (the view said live), projector B then
    // merged the tcp_down and wrote the set; A's write arrives last.
    race(
        &mut s,
        Entry::Event(ev(d, 1, "s1", t, connected())),
        Entry::Event(ev(d, 1, "s1", t + 5, tcp_down(TcpDownReason::Reset))),
        t + 5,
    )
    .await;
    let v = view(&mut s.conn, &s.keys, d).await;
    assert_eq!(v.get("ended").map(String::as_str), Some("reset"), "{v:?}");
    assert!(
        !members(&mut s.conn, &s.keys, "s1").await.contains(&c),
        "a dead connection stays out of its instance's set"
    );

    // The same with a new connection on another instance: its connected
    // lands after the old one's end, and stays in.
    let c2 = conn_of(d, 2).to_string();
    race(
        &mut s,
        Entry::Event(ev(d, 2, "s2", t + 10, connected())),
        Entry::Event(ev(d, 1, "s1", t + 11, tcp_down(TcpDownReason::Takeover))),
        t + 11,
    )
    .await;
    assert_eq!(
        members(&mut s.conn, &s.keys, "s2").await,
        BTreeSet::from([c2])
    );
    assert!(members(&mut s.conn, &s.keys, "s1").await.is_empty());
}

#[tokio::test]
async fn a_reaped_epoch_ending_late_does_not_remove_the_connection_announced_again() {
    let mut s = setup().await;
    let (d, t) = ("dev-b", iot_core::time::now_ms());
    let c = conn_of(d, 1);
    apply(
        &s.proj,
        &mut s.conn,
        Entry::Event(ev(d, 1, "s1", t, connected())),
        t,
    )
    .await;
    assert!(
        members(&mut s.conn, &s.keys, "s1")
            .await
            .contains(&c.to_string())
    );
    // The reaper's tcp_down (server_lost) of epoch 1 is merged by A, whose
    // set write is late; meanwhile the ingest announced the same connection
    // again with epoch 2 (its rebind) and B merged that.
    let rebind = Event {
        epoch: 2,
        ..ev(d, 1, "s1", t + 20, connected())
    };
    race(
        &mut s,
        Entry::Event(ev(d, 1, "s1", t + 10, tcp_down(TcpDownReason::ServerLost))),
        Entry::Event(rebind.clone()),
        t + 20,
    )
    .await;
    let v = view(&mut s.conn, &s.keys, d).await;
    assert_eq!(v["epoch"], "2");
    assert!(!v.contains_key("ended"), "{v:?}");
    assert_eq!(
        members(&mut s.conn, &s.keys, "s1").await,
        BTreeSet::from([c.to_string()]),
        "the announced connection is a member at its new epoch"
    );
    let key: Option<String> = s.conn.get(s.keys.conn(&c)).await.unwrap();
    assert_eq!(key.as_deref(), Some(d));
    // The new epoch's end removes it.
    let down = Event {
        ts_ms: t + 30,
        kind: tcp_down(TcpDownReason::Closed),
        ..rebind
    };
    apply(&s.proj, &mut s.conn, Entry::Event(down), t + 30).await;
    assert!(members(&mut s.conn, &s.keys, "s1").await.is_empty());
}

#[tokio::test]
async fn a_redelivered_entry_repairs_the_set_writes_its_first_delivery_lost() {
    let mut s = setup().await;
    let (d, t) = ("dev-l", iot_core::time::now_ms());
    let (c1, c2) = (conn_of(d, 1), conn_of(d, 2));
    // The projector died after the device function, before its follow-up.
    let first = [Entry::Event(ev(d, 1, "s1", t, connected()))];
    s.gate.lose();
    let lost = s
        .proj
        .apply(&mut s.gate, &items(&first, false), Lifecycle::Emit, t)
        .await;
    assert!(lost.is_err());
    assert!(members(&mut s.conn, &s.keys, "s1").await.is_empty());
    // Another projector claims the entry: the view is merged already, the
    // writes are made again.
    s.proj
        .apply(&mut s.gate, &items(&first, true), Lifecycle::Emit, t + 1)
        .await
        .unwrap();
    assert_eq!(
        members(&mut s.conn, &s.keys, "s1").await,
        BTreeSet::from([c1.to_string()])
    );
    let key: Option<String> = s.conn.get(s.keys.conn(&c1)).await.unwrap();
    assert_eq!(key.as_deref(), Some(d));

    // An uplink of a newer connection binds the view (its connected is
    // late); its writes are lost, then it is redelivered: the redelivered
    // uplink takes the short path (nothing left to merge) and still states
    // the binding.
    let up = [Entry::Event(ev(
        d,
        2,
        "s2",
        t + 10,
        EventKind::Uplink {
            topic: format!("devices/{d}/up/t"),
            qos: 0,
            payload: vec![1],
        },
    ))];
    s.gate.lose();
    assert!(
        s.proj
            .apply(&mut s.gate, &items(&up, false), Lifecycle::Emit, t + 10)
            .await
            .is_err()
    );
    assert!(members(&mut s.conn, &s.keys, "s2").await.is_empty());
    s.proj
        .apply(&mut s.gate, &items(&up, true), Lifecycle::Emit, t + 11)
        .await
        .unwrap();
    assert_eq!(
        members(&mut s.conn, &s.keys, "s2").await,
        BTreeSet::from([c2.to_string()])
    );
    let key: Option<String> = s.conn.get(s.keys.conn(&c2)).await.unwrap();
    assert_eq!(key.as_deref(), Some(d));
    // The lost write also held the superseded connection's exit; the old
    // connection's own end (the ingest's tcp_down on the takeover) makes it.
    assert!(
        members(&mut s.conn, &s.keys, "s1")
            .await
            .contains(&c1.to_string())
    );
    apply(
        &s.proj,
        &mut s.gate,
        Entry::Event(ev(d, 1, "s1", t + 12, tcp_down(TcpDownReason::Takeover))),
        t + 12,
    )
    .await;
    assert!(members(&mut s.conn, &s.keys, "s1").await.is_empty());
    let key: Option<String> = s.conn.get(s.keys.conn(&c1)).await.unwrap();
    assert_eq!(key, None, "the superseded connection's key went");
}

#[tokio::test]
async fn heartbeats_of_online_devices_do_not_write_the_sets_and_marks_expire() {
    let mut s = setup().await;
    let (d, t) = ("dev-h", iot_core::time::now_ms());
    apply(
        &s.proj,
        &mut s.gate,
        Entry::Event(ev(d, 1, "s1", t, connected())),
        t,
    )
    .await;
    let writes = s.gate.set_writes();
    assert_eq!(writes, 1);
    for i in 1..5 {
        let a = apply(&s.proj, &mut s.gate, beats("s1", &[(d, 1, t + i)]), t + i).await;
        assert_eq!(a.seen_only, 1);
    }
    assert_eq!(s.gate.set_writes(), writes, "no set write for heartbeats");

    // Every marks hash has a TTL of at most three generations.
    let generation = marks_generation_ms(s.proj.settings());
    let pattern = s.keys.server_pattern();
    let names: Vec<String> = {
        let mut it: redis::AsyncIter<'_, String> = s.conn.scan_match(&pattern).await.unwrap();
        let mut v = Vec::new();
        while let Some(k) = it.next_item().await {
            v.push(k.unwrap());
        }
        v
    };
    let marks: Vec<&String> = names.iter().filter(|k| k.contains(":marks:")).collect();
    assert_eq!(marks.len(), 1, "{names:?}");
    let ttl: i64 = s.conn.pttl(marks[0]).await.unwrap();
    assert!(ttl > 0 && ttl <= 3 * generation, "{ttl}");
}

#[tokio::test]
async fn rebuild_with_reset_clears_the_sets_and_their_marks() {
    let mut s = setup().await;
    let t = iot_core::time::now_ms();
    inject(
        &mut s.conn,
        &s.keys,
        SHARDS,
        &[
            Entry::Event(ev("dev-x", 1, "s1", t - 100, connected())),
            Entry::Event(ev("dev-y", 1, "s1", t - 90, connected())),
            Entry::Event(ev("dev-y", 1, "s1", t - 80, EventKind::Disconnected)),
        ],
    )
    .await;
    // Leftovers: a ghost member, a set of a gone instance, and marks that
    // would keep dev-x's connection out.
    let ghost = conn_of("dev-ghost", 1).to_string();
    let x = conn_of("dev-x", 1).to_string();
    let _: () = s
        .conn
        .sadd(s.keys.server_conns(&srv("s1")), &ghost)
        .await
        .unwrap();
    let _: () = s
        .conn
        .sadd(s.keys.server_conns(&srv("s9")), &ghost)
        .await
        .unwrap();
    let generation = projector::projection::marks_generation(s.proj.settings(), t);
    for g in generation - 1..=generation + 1 {
        let _: () = s
            .conn
            .hset(s.keys.server_marks(&srv("s1"), g), &x, 99)
            .await
            .unwrap();
    }
    let summary = projector::rebuild::rebuild_with(&mut s.conn, &s.proj, true, None)
        .await
        .unwrap();
    assert!(summary.server_keys_deleted >= 5, "{summary:?}");
    assert_eq!(
        members(&mut s.conn, &s.keys, "s1").await,
        BTreeSet::from([x])
    );
    let gone: bool = s
        .conn
        .exists(s.keys.server_conns(&srv("s9")))
        .await
        .unwrap();
    assert!(!gone);
}
