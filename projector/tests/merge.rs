//! The Lua merge and policy against their pure twins in `iot-core`.
//!
//! - Random event sets over a few devices with several epochs (every kind,
//!   every tcp_down reason, clean disconnects, heartbeats in batches),
//!   shuffled and duplicated, applied through the scripts under two key
//!   prefixes in two different orders and batchings: both stores hold the
//!   same hashes, equal to `SessionView`'s fold, and the same online state
//!   and reason as `Policy::evaluate` of the folded view.
//! - The Lua policy against `Policy::evaluate` on random inputs: online,
//!   reason, score (bit for bit) and next change time.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use common::*;
use iot_core::event::{Heartbeat, HeartbeatBatch};
use iot_core::{Entry, Event, EventKind, Keys, Policy, PolicyInput, TcpDownReason};
use iot_test_support::{RedisServer, unique_prefix};
use projector::projection::{Item, Lifecycle, fold};
use projector::{Projection, Settings};
use proptest::prelude::*;
use redis::aio::ConnectionManager;

const T0: i64 = 1_000_000;
const NOW: i64 = T0 + 40_000;
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

/// Applies entries in batches of `batch` through the scripts at NOW.
async fn apply_all(
    conn: &mut ConnectionManager,
    p: &Projection,
    entries: Vec<Entry>,
    batch: usize,
    redelivered: bool,
) {
    let items: Vec<Item> = entries
        .into_iter()
        .map(|entry| Item { entry, redelivered })
        .collect();
    for chunk in items.chunks(batch.max(1)) {
        p.apply(conn, chunk, Lifecycle::Emit, NOW)
            .await
            .expect("apply");
    }
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

proptest! {
    // PROPTEST_CASES raises the number of cases for a deeper run.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(200),
        .. ProptestConfig::default()
    })]

    #[test]
    fn lua_merge_equals_the_pure_merge_in_any_order(
        events in arb_events(),
        seed_a in any::<u64>(),
        seed_b in any::<u64>(),
        dups in prop::collection::vec(any::<prop::sample::Index>(), 0..15),
        batch_a in 1usize..8,
        batch_b in 1usize..40,
        redelivered in any::<bool>(),
    ) {
        let (rt, url) = (rt(), url());
        let (pa, pb) = (unique_prefix(), unique_prefix());
        let (proj_a, proj_b) = (projection(&pa, policy()), projection(&pb, policy()));
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
        let (sa, sb) = rt.block_on(async {
            let mut conn = connect(&url).await;
            apply_all(&mut conn, &proj_a, pack(&a), batch_a, redelivered).await;
            apply_all(&mut conn, &proj_b, pack(&b), batch_b, false).await;
            (
                stored(&mut conn, &proj_a.settings().keys).await,
                stored(&mut conn, &proj_b.settings().keys).await,
            )
        });
        let merge_a: BTreeMap<_, _> = sa.iter().map(|(k, v)| (k.clone(), merge_fields(v))).collect();
        let merge_b: BTreeMap<_, _> = sb.iter().map(|(k, v)| (k.clone(), merge_fields(v))).collect();
        prop_assert_eq!(&merge_a, &merge_b);
        for d in DEVICES {
            let mine: Vec<&Event> = events.iter().filter(|x| x.phy_id.as_str() == d).collect();
            if mine.is_empty() {
                prop_assert!(!merge_a.contains_key(d));
                continue;
            }
            let pure = fold(mine.iter().copied());
            let expected: BTreeMap<String, String> = pure
                .to_fields(&phy(d))
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect();
            prop_assert_eq!(merge_a.get(d), Some(&expected), "device {}", d);
            let eval = policy().evaluate(&pure.policy_input(), NOW);
            for s in [&sa, &sb] {
                let v = &s[d];
                prop_assert_eq!(v.get("online").map(String::as_str), Some(if eval.online { "1" } else { "0" }));
                prop_assert_eq!(v.get("reason"), Some(&eval.reason.name()));
            }
        }
    }

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
