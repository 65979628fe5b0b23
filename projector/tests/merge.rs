//! The Lua merge and policy against their pure twins in `iot-core`.
//!
//! - Random event sets over a few devices with several epochs (every kind,
//!   every tcp_down reason, clean disconnects, heartbeats in batches),
//!   shuffled and duplicated, applied through the scripts under two key
//!   prefixes in two different orders and batchings, at a `now` that
//!   advances batch by batch, with due rounds in between and some batches
//!   redelivered: heartbeats take both paths (the seen set only, and the
//!   device function). After a last evaluation of every device, both stores
//!   hold the same hashes, field by field but `last_seen`, equal to
//!   `SessionView`'s fold; `last_seen` with the seen score folded in equals
//!   the fold's; online state and reason equal `Policy::evaluate` of the
//!   folded view, and the online index and bound epochs follow them. The
//!   instances' connection sets hold exactly the folded views' live bound
//!   connections, and exactly the bound connections have a connection key
//!   (naming their device). The run checks that the seen-set path was taken
//!   in a tenth of the cases at least.
//! - The Lua policy against `Policy::evaluate` on random inputs: online,
//!   reason, score (bit for bit) and next change time.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use common::*;
use iot_core::event::{Heartbeat, HeartbeatBatch};
use iot_core::keys::shard_of;
use iot_core::view::field;
use iot_core::{Entry, Event, EventKind, Keys, Policy, PolicyInput, TcpDownReason};
use iot_test_support::{RedisServer, unique_prefix};
use projector::projection::{Item, Lifecycle, fold};
use projector::{Projection, Settings};
use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestRunner};
use redis::AsyncCommands;
use redis::aio::ConnectionManager;

const T0: i64 = 1_000_000;
/// The time of the last evaluation (events are from T0 to T0 + 50 s).
const NOW: i64 = T0 + 52_000;
const DEVICES: [&str; 3] = ["dev-a", "dev-b", "dev-c"];

thread_local! {
    // One server per test thread (proptest runs a test's cases on its
    // thread), stopped when the thread ends: a static would never be
    // dropped and would leave the process behind.
    static REDIS: RedisServer = RedisServer::start();
}

fn url() -> String {
    REDIS.with(RedisServer::url)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn policy() -> Policy {
    Policy {
        enabled: true,
        heartbeat_timeout_ms: 20_000,
        tcp_down_window_ms: 10_000,
        ack_window_ms: 15_000,
        tcp_down_penalty: 0.5,
        ack_timeout_penalty: 0.3,
        threshold: 0.5,
    }
}

fn projection(prefix: &str, policy: Policy) -> Projection {
    let config = config(&url(), prefix, 4);
    let mut settings = Settings::from_config(&config, &srv("test"));
    settings.policy = policy;
    Projection::new(Arc::new(settings))
}

fn arb_kind() -> impl Strategy<Value = EventKind> {
    prop_oneof![
        2 => Just(connected()),
        4 => Just(EventKind::Heartbeat),
        1 => Just(EventKind::Uplink { topic: "devices/x/up/t".into(), qos: 1, payload: vec![1] }),
        1 => Just(EventKind::Disconnected),
        1 => Just(ack_timeout()),
        1 => Just(EventKind::Ack { command_id: uuid::Uuid::nil() }),
        2 => prop::sample::select(TcpDownReason::ALL.to_vec()).prop_map(tcp_down),
    ]
}

fn arb_events() -> impl Strategy<Value = Vec<Event>> {
    prop::collection::vec(
        (
            prop::sample::select(DEVICES.to_vec()),
            0u64..5,
            0i64..50_000,
            arb_kind(),
        )
            // One epoch is one connection on one instance.
            .prop_map(|(p, epoch, dt, kind)| {
                ev(p, epoch, &format!("srv-{}", epoch % 3), T0 + dt, kind)
            }),
        0..40,
    )
}

fn shuffle<T>(v: &mut [T], mut seed: u64) {
    for i in (1..v.len()).rev() {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        v.swap(i, (seed >> 33) as usize % (i + 1));
    }
}

/// Packs events into entries: runs of heartbeats of one instance and distinct
/// devices become one heartbeat batch, the rest single events.
fn pack(events: &[Event]) -> Vec<Entry> {
    let mut out: Vec<Entry> = Vec::new();
    for e in events {
        if e.kind == EventKind::Heartbeat
            && let Some(Entry::Heartbeats(b)) = out.last_mut()
            && b.server_id == e.server_id
            && b.beats.iter().all(|x| x.phy_id != e.phy_id)
        {
            b.beats.push(Heartbeat {
                phy_id: e.phy_id.clone(),
                conn_id: e.conn_id,
                epoch: e.epoch,
                ts_ms: e.ts_ms,
            });
            continue;
        }
        if e.kind == EventKind::Heartbeat {
            out.push(Entry::Heartbeats(HeartbeatBatch {
                server_id: e.server_id.clone(),
                beats: vec![Heartbeat {
                    phy_id: e.phy_id.clone(),
                    conn_id: e.conn_id,
                    epoch: e.epoch,
                    ts_ms: e.ts_ms,
                }],
            }));
        } else {
            out.push(Entry::Event(e.clone()));
        }
    }
    out
}

/// One step of a schedule: how far `now` advances before the batch (ms),
/// whether a due round follows it, whether the batch counts as redelivered.
type Step = (i64, bool, bool);

/// What a replay went through.
#[derive(Debug, Default, Clone, Copy)]
struct Paths {
    /// Heartbeats that went to the seen set only.
    seen_only: u64,
    /// Heartbeats that took the device function.
    device: u64,
    /// Devices evaluated by due rounds.
    due: u64,
}

/// How `now` advances from batch to batch (never beyond NOW).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Clock {
    /// By each step's advance.
    Steps,
    /// To the newest event time applied so far, plus a tenth of the step's
    /// advance (a projector keeping up with the streams).
    Follow,
}

/// Applies entries in batches of `batch` through the scripts, `now`
/// advancing from T0 by the clock and the schedule, with due rounds between
/// batches where it says so.
async fn apply_all(
    conn: &mut ConnectionManager,
    p: &Projection,
    entries: Vec<Entry>,
    batch: usize,
    clock: Clock,
    schedule: &[Step],
) -> Paths {
    let mut paths = Paths::default();
    let mut now = T0;
    let mut newest = T0;
    for (i, chunk) in entries.chunks(batch.max(1)).enumerate() {
        let (advance, due, redelivered) = schedule[i % schedule.len()];
        for e in chunk {
            match e {
                Entry::Event(ev) => newest = newest.max(ev.ts_ms),
                Entry::Heartbeats(b) => {
                    newest = b.beats.iter().map(|x| x.ts_ms).fold(newest, i64::max);
                }
            }
        }
        now = match clock {
            Clock::Steps => now + advance,
            Clock::Follow => now.max(newest + advance / 10),
        }
        .min(NOW);
        let items: Vec<Item> = chunk
            .iter()
            .map(|entry| Item {
                entry: entry.clone(),
                redelivered,
            })
            .collect();
        let beats: u64 = chunk
            .iter()
            .map(|e| match e {
                Entry::Heartbeats(b) => b.beats.len() as u64,
                Entry::Event(_) => 0,
            })
            .sum();
        let applied = p
            .apply(conn, &items, Lifecycle::Emit, now)
            .await
            .expect("apply");
        paths.seen_only += applied.seen_only;
        paths.device += beats - applied.seen_only;
        if due {
            let (applied, _) = projector::due::round(conn, p, now)
                .await
                .expect("due round");
            paths.due += applied.evaluated;
        }
    }
    paths
}

/// Evaluates every device at NOW with its seen score, as a due round would.
async fn evaluate_all(conn: &mut ConnectionManager, p: &Projection) {
    let keys = &p.settings().keys;
    let mut phys = Vec::new();
    for d in DEVICES {
        let seen: Option<f64> = conn
            .zscore(keys.seen(shard_of(d, p.settings().shards)), d)
            .await
            .expect("zscore");
        phys.push((phy(d), seen.map(|t| t as i64)));
    }
    p.evaluate(conn, &phys, false, NOW).await.expect("evaluate");
}

/// Each device's hash as stored (without the seen score).
async fn raw(
    conn: &mut ConnectionManager,
    keys: &Keys,
) -> BTreeMap<String, HashMap<String, String>> {
    let mut out = BTreeMap::new();
    for d in DEVICES {
        let v: HashMap<String, String> = conn.hgetall(keys.device(&phy(d))).await.expect("hgetall");
        if !v.is_empty() {
            out.insert(d.to_owned(), v);
        }
    }
    out
}

/// The merge fields of a hash but `last_seen`, which the seen set shares.
fn without_last_seen(v: &HashMap<String, String>) -> BTreeMap<String, String> {
    let mut m = merge_fields(v);
    m.remove(field::LAST_SEEN);
    m
}

/// The union of the shards' bound hashes: phy -> bound epoch.
async fn bound_epochs(conn: &mut ConnectionManager, p: &Projection) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for shard in p.settings().shard_range() {
        let m: HashMap<String, String> = conn
            .hgetall(p.settings().keys.bound(shard))
            .await
            .expect("hgetall");
        out.extend(m);
    }
    out
}

async fn stored(
    conn: &mut ConnectionManager,
    keys: &Keys,
) -> BTreeMap<String, HashMap<String, String>> {
    let mut out = BTreeMap::new();
    for d in DEVICES {
        let v = view(conn, keys, d).await;
        if !v.is_empty() {
            out.insert(d.to_owned(), v);
        }
    }
    out
}

/// The instances' connection sets (srv-0..srv-2): (instance, connection).
async fn server_sets(conn: &mut ConnectionManager, keys: &Keys) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for s in ["srv-0", "srv-1", "srv-2"] {
        let m: Vec<String> = conn
            .smembers(keys.server_conns(&srv(s)))
            .await
            .expect("smembers");
        out.extend(m.into_iter().map(|c| (s.to_owned(), c)));
    }
    out
}

/// The connection keys of every connection the events name: conn -> phy.
async fn conn_keys(
    conn: &mut ConnectionManager,
    keys: &Keys,
    events: &[Event],
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for e in events {
        let v: Option<String> = conn.get(keys.conn(&e.conn_id)).await.expect("get");
        if let Some(v) = v {
            out.insert(e.conn_id.to_string(), v);
        }
    }
    out
}

/// A random event set, its two orders (a shuffle; a shuffle sorted by
/// event time give or take 5 s, the streams' near order) and batchings, and
/// two schedules.
#[derive(Debug, Clone)]
struct Case {
    events: Vec<Event>,
    a: Vec<Event>,
    b: Vec<Event>,
    batch_a: usize,
    batch_b: usize,
    schedule_a: Vec<Step>,
    schedule_b: Vec<Step>,
}

fn arb_schedule(redelivered: bool) -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(
        (
            0i64..3000,
            prop::bool::weighted(0.3),
            prop::bool::weighted(if redelivered { 0.25 } else { 0.0 }),
        ),
        1..20,
    )
}

fn arb_case() -> impl Strategy<Value = Case> {
    (
        arb_events(),
        any::<u64>(),
        any::<u64>(),
        prop::collection::vec(any::<prop::sample::Index>(), 0..15),
        1usize..8,
        1usize..40,
        arb_schedule(true),
        arb_schedule(false),
    )
        .prop_map(
            |(events, seed_a, seed_b, dups, batch_a, batch_b, schedule_a, schedule_b)| {
                let mut a = events.clone();
                let mut b = events.clone();
                for d in &dups {
                    if !events.is_empty() {
                        a.push(events[d.index(events.len())].clone());
                        b.insert(d.index(b.len() + 1), events[d.index(events.len())].clone());
                    }
                }
                shuffle(&mut a, seed_a);
                shuffle(&mut b, seed_b);
                let mut jitter = seed_b;
                let mut keyed: Vec<(i64, Event)> = b
                    .into_iter()
                    .map(|e| {
                        jitter = jitter
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        (e.ts_ms + (jitter >> 33) as i64 % 5000, e)
                    })
                    .collect();
                keyed.sort_by_key(|(k, _)| *k);
                let b = keyed.into_iter().map(|(_, e)| e).collect();
                Case {
                    events,
                    a,
                    b,
                    batch_a,
                    batch_b,
                    schedule_a,
                    schedule_b,
                }
            },
        )
}

/// One case: both replays, then every comparison. Returns what the replays
/// went through.
fn check_case(case: &Case) -> Result<(Paths, Paths), TestCaseError> {
    let (rt, url) = (rt(), url());
    let (pa, pb) = (unique_prefix(), unique_prefix());
    let (proj_a, proj_b) = (projection(&pa, policy()), projection(&pb, policy()));
    let (ka, kb) = (&proj_a.settings().keys, &proj_b.settings().keys);
    let (paths, raw_a, raw_b, sa, sb, bound_a, bound_b, online_a, online_b, links) =
        rt.block_on(async {
            let mut conn = connect(&url).await;
            let paths = (
                apply_all(
                    &mut conn,
                    &proj_a,
                    pack(&case.a),
                    case.batch_a,
                    Clock::Steps,
                    &case.schedule_a,
                )
                .await,
                apply_all(
                    &mut conn,
                    &proj_b,
                    pack(&case.b),
                    case.batch_b,
                    Clock::Follow,
                    &case.schedule_b,
                )
                .await,
            );
            evaluate_all(&mut conn, &proj_a).await;
            evaluate_all(&mut conn, &proj_b).await;
            (
                paths,
                raw(&mut conn, ka).await,
                raw(&mut conn, kb).await,
                stored(&mut conn, ka).await,
                stored(&mut conn, kb).await,
                bound_epochs(&mut conn, &proj_a).await,
                bound_epochs(&mut conn, &proj_b).await,
                online_set(&mut conn, ka, 4).await,
                online_set(&mut conn, kb, 4).await,
                [
                    (
                        server_sets(&mut conn, ka).await,
                        conn_keys(&mut conn, ka, &case.events).await,
                    ),
                    (
                        server_sets(&mut conn, kb).await,
                        conn_keys(&mut conn, kb, &case.events).await,
                    ),
                ],
            )
        });
    // The connection sets and keys follow the folded views: the live bound
    // connections are members of their instances' sets, the bound ones
    // have a key; nothing else (superseded and ended connections left).
    let mut want_sets = BTreeSet::new();
    let mut want_keys = BTreeMap::new();
    for d in DEVICES {
        let pure = fold(case.events.iter().filter(|x| x.phy_id.as_str() == d));
        if let (Some(c), Some(s)) = (pure.conn_id, &pure.server_id)
            && pure.epoch > 0
        {
            want_keys.insert(c.to_string(), d.to_owned());
            if pure.connected() {
                want_sets.insert((s.to_string(), c.to_string()));
            }
        }
    }
    for (sets, conn_keys) in &links {
        prop_assert_eq!(sets, &want_sets, "connection sets");
        prop_assert_eq!(conn_keys, &want_keys, "connection keys");
    }
    // The views with the seen score folded in.
    let merge_a: BTreeMap<_, _> = sa
        .iter()
        .map(|(k, v)| (k.clone(), merge_fields(v)))
        .collect();
    let merge_b: BTreeMap<_, _> = sb
        .iter()
        .map(|(k, v)| (k.clone(), merge_fields(v)))
        .collect();
    prop_assert_eq!(&merge_a, &merge_b);
    // The hashes as stored, field by field, but last_seen (some of it may
    // be only in the seen set, depending on the path each heartbeat took).
    let bare_a: BTreeMap<_, _> = raw_a
        .iter()
        .map(|(k, v)| (k.clone(), without_last_seen(v)))
        .collect();
    let bare_b: BTreeMap<_, _> = raw_b
        .iter()
        .map(|(k, v)| (k.clone(), without_last_seen(v)))
        .collect();
    prop_assert_eq!(&bare_a, &bare_b);
    for d in DEVICES {
        let mine: Vec<&Event> = case
            .events
            .iter()
            .filter(|x| x.phy_id.as_str() == d)
            .collect();
        if mine.is_empty() {
            prop_assert!(!merge_a.contains_key(d));
            prop_assert!(!raw_a.contains_key(d) && !raw_b.contains_key(d));
            continue;
        }
        let pure = fold(mine.iter().copied());
        let expected: BTreeMap<String, String> = pure
            .to_fields(&phy(d))
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        prop_assert_eq!(merge_a.get(d), Some(&expected), "device {}", d);
        let mut bare = expected.clone();
        bare.remove(field::LAST_SEEN);
        prop_assert_eq!(bare_a.get(d), Some(&bare), "stored hash of {}", d);
        let want_seen = pure.last_seen.map(|t| t.to_string());
        let eval = policy().evaluate(&pure.policy_input(), NOW);
        for (s, r) in [(&sa, &raw_a), (&sb, &raw_b)] {
            prop_assert_eq!(
                s[d].get(field::LAST_SEEN),
                want_seen.as_ref(),
                "folded last_seen of {}",
                d
            );
            let stored_seen = r[d]
                .get(field::LAST_SEEN)
                .map(|v| v.parse::<i64>().expect("last_seen"));
            prop_assert!(
                stored_seen <= pure.last_seen,
                "stored last_seen of {} above the merge",
                d
            );
            let v = &s[d];
            prop_assert_eq!(
                v.get("online").map(String::as_str),
                Some(if eval.online { "1" } else { "0" })
            );
            prop_assert_eq!(v.get("reason"), Some(&eval.reason.name()));
        }
        // The online index and the bound epochs follow the views.
        for (online, bound) in [(&online_a, &bound_a), (&online_b, &bound_b)] {
            prop_assert_eq!(online.contains(d), eval.online, "online index of {}", d);
            let want = eval.online.then(|| pure.epoch.to_string());
            prop_assert_eq!(bound.get(d), want.as_ref(), "bound epoch of {}", d);
        }
    }
    Ok(paths)
}

#[test]
fn lua_merge_equals_the_pure_merge_in_any_order() {
    // PROPTEST_CASES raises the number of cases for a deeper run.
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let mut runner = TestRunner::new(ProptestConfig {
        cases,
        source_file: Some(file!()),
        ..ProptestConfig::default()
    });
    let totals = std::cell::Cell::new((0u64, Paths::default()));
    runner
        .run(&arb_case(), |case| {
            let (a, b) = check_case(&case)?;
            let (mut fast_cases, mut t) = totals.get();
            fast_cases += u64::from(a.seen_only + b.seen_only > 0);
            t.seen_only += a.seen_only + b.seen_only;
            t.device += a.device + b.device;
            t.due += a.due + b.due;
            totals.set((fast_cases, t));
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    // Both heartbeat paths and the due evaluation were exercised (in the
    // cases run, shrinking included).
    let (fast_cases, t) = totals.get();
    println!("cases with a heartbeat in the seen set only: {fast_cases}; {t:?}");
    assert!(
        fast_cases >= u64::from(cases) / 10,
        "fast path in {fast_cases} cases only: {t:?}"
    );
    assert!(t.device > 0 && t.due > 0, "{t:?}");
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(200),
        .. ProptestConfig::default()
    })]

    #[test]
    fn lua_policy_equals_rust_policy(
        seen in proptest::option::of(0i64..400_000),
        tcp in proptest::option::of(0i64..400_000),
        reason in prop::sample::select(TcpDownReason::ALL.to_vec()),
        ack in proptest::option::of(0i64..400_000),
        disconnected in any::<bool>(),
        now in 0i64..500_000,
        hb in 0i64..200_000,
        tw in 0i64..200_000,
        aw in 0i64..200_000,
        p1 in 0.0f64..1.2,
        p2 in 0.0f64..1.2,
        th in -0.2f64..1.2,
        enabled in any::<bool>(),
    ) {
        let (rt, url) = (rt(), url());
        let p = Policy { enabled, heartbeat_timeout_ms: hb, tcp_down_window_ms: tw, ack_window_ms: aw,
                         tcp_down_penalty: p1, ack_timeout_penalty: p2, threshold: th };
        let input = PolicyInput {
            last_seen: seen,
            last_tcp_down: tcp,
            last_tcp_down_reason: tcp.map(|_| reason),
            last_ack_timeout: ack,
            disconnected,
        };
        let proj = projection("policy:", p);
        let got: Vec<String> = rt.block_on(async {
            let mut conn = connect(&url).await;
            proj.scripts().load(&mut conn).await.expect("load");
            proj.scripts()
                .device_policy(proj.settings(), "policy:x", &input, now)
                .query_async(&mut conn)
                .await
                .expect("policy")
        });
        let want = p.evaluate(&input, now);
        prop_assert_eq!(&got[0], if want.online { "1" } else { "0" });
        prop_assert_eq!(&got[1], &want.reason.name());
        let score: f64 = got[2].parse().expect("score");
        prop_assert_eq!(score.to_bits(), want.score.to_bits(), "score {} vs {}", score, want.score);
        let next = (!got[3].is_empty()).then(|| got[3].parse::<i64>().expect("next"));
        prop_assert_eq!(next, want.next_change_ms);
    }
}

#[test]
fn seed_example_through_the_script() {
    // Heartbeat, TCP drop and ACK timeout at t: offline at t+10 s (score
    // 0.2), online again at t+2 min while the heartbeat is fresh.
    let (rt, url) = (rt(), url());
    let p = Policy::default();
    let t = 1_700_000_000_000;
    let input = PolicyInput {
        last_seen: Some(t),
        last_tcp_down: Some(t),
        last_tcp_down_reason: Some(TcpDownReason::Reset),
        last_ack_timeout: Some(t),
        disconnected: false,
    };
    let proj = projection("seed:", p);
    let ask = |now: i64| -> Vec<String> {
        rt.block_on(async {
            let mut conn = connect(&url).await;
            proj.scripts().load(&mut conn).await.expect("load");
            proj.scripts()
                .device_policy(proj.settings(), "seed:x", &input, now)
                .query_async(&mut conn)
                .await
                .expect("policy")
        })
    };
    let at10 = ask(t + 10_000);
    assert_eq!(at10[0], "0");
    assert_eq!(at10[1], "tcp_down:reset");
    assert!((at10[2].parse::<f64>().unwrap() - 0.2).abs() < 1e-9);
    assert_eq!(at10[3], (t + 60_001).to_string());
    let at120 = ask(t + 120_000);
    assert_eq!(at120[0], "1");
    assert_eq!(at120[1], "heartbeat_fresh");
}
