//! The store against a real PostgreSQL: migrations, registry, archive.

use iot_core::event::{Entry, Event, EventKind, Heartbeat, HeartbeatBatch, TcpDownReason};
use iot_core::{PhyId, ServerId};
use iot_store::archive::{ArchivedEvent, ArchivedTransition, EventCursor};
use iot_store::devices::{Credential, DeviceFilter};
use iot_store::{Store, StoreError};
use iot_test_support::TestDb;
use serde_json::{Map, Value, json};
use uuid::Uuid;

async fn store() -> (TestDb, Store) {
    let db = TestDb::create().await;
    let cfg = iot_core::config::DatabaseConfig {
        url: db.url().to_owned(),
        ..Default::default()
    };
    let store = Store::connect(&cfg).await.expect("connect");
    (db, store)
}

fn phy(s: &str) -> PhyId {
    PhyId::new(s).expect("valid phyID")
}

#[tokio::test]
async fn schema_check_names_missing_migrations_until_migrated() {
    let (_db, store) = store().await;
    match store.check_schema().await {
        Err(StoreError::SchemaOutdated { missing }) => {
            assert!(missing.iter().any(|m| m.contains("devices")), "{missing:?}");
            let msg = StoreError::SchemaOutdated { missing }.to_string();
            assert!(msg.contains("iot-api migrate"), "{msg}");
        }
        other => panic!("expected SchemaOutdated, got {other:?}"),
    }
    assert_eq!(
        store.migrate().await.unwrap(),
        iot_store::MIGRATOR.iter().count()
    );
    store.check_schema().await.unwrap();
    assert_eq!(
        store.migrate().await.unwrap(),
        0,
        "second run applies nothing"
    );
}

#[tokio::test]
async fn unreachable_database_is_a_clear_error() {
    let cfg = iot_core::config::DatabaseConfig {
        url: format!(
            "postgres://u:pw@127.0.0.1:{}/x",
            iot_test_support::free_port()
        ),
        connect_timeout: std::time::Duration::from_secs(2),
        ..Default::default()
    };
    let err = Store::connect(&cfg).await.unwrap_err().to_string();
    assert!(
        err.starts_with("cannot reach PostgreSQL at postgres://u:***@"),
        "{err}"
    );
    let empty = iot_core::config::DatabaseConfig::default();
    assert!(matches!(
        Store::connect(&empty).await,
        Err(StoreError::NotConfigured)
    ));
}

#[tokio::test]
async fn registry_round_trip() {
    let (_db, store) = store().await;
    store.migrate().await.unwrap();
    let mut labels = Map::new();
    labels.insert("site".into(), json!("berlin"));
    let (dev, secret) = store
        .register_device(&phy("dev-1"), labels.clone(), true)
        .await
        .unwrap();
    assert_eq!(dev.phy_id, "dev-1");
    assert!(dev.enabled);
    assert_eq!(dev.labels, labels);
    assert!(matches!(
        store.register_device(&phy("dev-1"), Map::new(), true).await,
        Err(StoreError::Conflict)
    ));

    // Only the hash is stored.
    let stored: Vec<u8> =
        sqlx::query_scalar("SELECT secret_hash FROM devices WHERE phy_id = 'dev-1'")
            .fetch_one(store.pool())
            .await
            .unwrap();
    assert_eq!(stored.len(), 32);
    assert!(!String::from_utf8_lossy(&stored).contains(&secret));

    assert_eq!(
        store
            .check_credentials(&phy("dev-1"), secret.as_bytes())
            .await
            .unwrap(),
        Credential::Valid
    );
    assert_eq!(
        store
            .check_credentials(&phy("dev-1"), b"wrong")
            .await
            .unwrap(),
        Credential::WrongSecret
    );
    assert_eq!(
        store.check_credentials(&phy("nope"), b"x").await.unwrap(),
        Credential::Unknown
    );

    let disabled = store
        .update_device(&phy("dev-1"), Some(false), None)
        .await
        .unwrap();
    assert!(!disabled.enabled);
    assert_eq!(disabled.labels, labels, "labels kept when not given");
    assert_eq!(
        store
            .check_credentials(&phy("dev-1"), secret.as_bytes())
            .await
            .unwrap(),
        Credential::Disabled
    );
    assert!(matches!(
        store.update_device(&phy("ghost"), Some(true), None).await,
        Err(StoreError::NotFound)
    ));

    for i in 0..5 {
        let mut l = Map::new();
        l.insert(
            "site".into(),
            Value::from(if i % 2 == 0 { "paris" } else { "rome" }),
        );
        store
            .register_device(&phy(&format!("x-{i}")), l, true)
            .await
            .unwrap();
    }
    let page1 = store
        .list_devices(&DeviceFilter::default(), None, 3)
        .await
        .unwrap();
    let page2 = store
        .list_devices(&DeviceFilter::default(), Some(&page1[2].phy_id), 3)
        .await
        .unwrap();
    let ids: Vec<_> = page1
        .iter()
        .chain(&page2)
        .map(|d| d.phy_id.clone())
        .collect();
    assert_eq!(ids, ["dev-1", "x-0", "x-1", "x-2", "x-3", "x-4"]);
    let mut f = DeviceFilter::default();
    f.labels.insert("site".into(), json!("paris"));
    let paris = store.list_devices(&f, None, 10).await.unwrap();
    assert_eq!(paris.len(), 3);
    let f = DeviceFilter {
        enabled: Some(false),
        ..Default::default()
    };
    assert_eq!(store.list_devices(&f, None, 10).await.unwrap().len(), 1);

    assert!(store.delete_device(&phy("x-0")).await.unwrap());
    assert!(!store.delete_device(&phy("x-0")).await.unwrap());
    assert!(store.device(&phy("x-0")).await.unwrap().is_none());

    // Re-checking connected devices: disabled (dev-1), deleted (x-0) and
    // never registered (ghost) ones are not in the answer.
    let asked = [
        phy("dev-1"),
        phy("x-0"),
        phy("x-1"),
        phy("x-2"),
        phy("ghost"),
    ];
    let enabled = store.enabled_devices(&asked).await.unwrap();
    let mut enabled: Vec<_> = enabled.into_iter().collect();
    enabled.sort();
    assert_eq!(enabled, ["x-1", "x-2"]);
    assert!(store.enabled_devices(&[]).await.unwrap().is_empty());
}

fn event(epoch: u64, conn: u128, ts: i64, kind: EventKind) -> Entry {
    Entry::Event(Event {
        phy_id: phy("dev-a"),
        conn_id: Uuid::from_u128(conn),
        server_id: ServerId::new("srv-1").expect("valid server id"),
        epoch,
        ts_ms: ts,
        kind,
    })
}

#[tokio::test]
async fn archive_is_idempotent_and_builds_sessions() {
    let (_db, store) = store().await;
    store.migrate().await.unwrap();
    let day = 1_795_000_000_000i64; // 2026-11
    let entries = [
        (
            "1-0",
            event(
                1,
                1,
                day,
                EventKind::Connected {
                    keepalive_secs: 30,
                    peer: "127.0.0.1:5".into(),
                },
            ),
        ),
        (
            "2-0",
            Entry::Heartbeats(HeartbeatBatch {
                server_id: ServerId::new("srv-1").unwrap(),
                beats: vec![
                    Heartbeat {
                        phy_id: phy("dev-a"),
                        conn_id: Uuid::from_u128(1),
                        epoch: 1,
                        ts_ms: day + 1000,
                    },
                    Heartbeat {
                        phy_id: phy("dev-b"),
                        conn_id: Uuid::from_u128(9),
                        epoch: 1,
                        ts_ms: day + 1000,
                    },
                ],
            }),
        ),
        (
            "3-0",
            event(
                1,
                1,
                day + 5000,
                EventKind::TcpDown {
                    reason: TcpDownReason::Keepalive,
                },
            ),
        ),
        // The next day: a second partition.
        (
            "4-0",
            event(
                2,
                2,
                day + 86_400_000,
                EventKind::Connected {
                    keepalive_secs: 60,
                    peer: "127.0.0.1:6".into(),
                },
            ),
        ),
        (
            "5-0",
            event(
                2,
                2,
                day + 86_400_000 + 10,
                EventKind::Uplink {
                    topic: "devices/dev-a/up/t".into(),
                    qos: 1,
                    payload: vec![1, 2, 3],
                },
            ),
        ),
    ];
    let rows: Vec<ArchivedEvent> = entries
        .iter()
        .flat_map(|(id, e)| ArchivedEvent::from_entry("stream:events:{3}", id, e.clone()))
        .collect();
    assert_eq!(rows.len(), 6);
    let mut lf = std::collections::HashMap::new();
    for (k, v) in [
        ("phy_id", "dev-a"),
        ("online", "0"),
        ("reason", "tcp_down:keepalive"),
        ("at_ms", &(day + 5001).to_string()),
        ("epoch", "1"),
        ("rev", "2"),
    ] {
        lf.insert(k.to_owned(), v.to_owned());
    }
    let tr = ArchivedTransition::from_fields("stream:lifecycle:{3}", "9-0", &lf).unwrap();

    let first = store
        .archive(&rows, std::slice::from_ref(&tr))
        .await
        .unwrap();
    assert_eq!(first.events, 6);
    assert_eq!(first.transitions, 1);
    // Redelivery (a crash before XACK) inserts nothing twice.
    let again = store
        .archive(&rows, std::slice::from_ref(&tr))
        .await
        .unwrap();
    assert_eq!(again.events, 0);
    assert_eq!(again.transitions, 0);
    assert_eq!(store.count_events().await.unwrap(), 6);

    let sessions = store.sessions_page("dev-a", None, 10).await.unwrap();
    assert_eq!(sessions.len(), 2);
    assert_eq!(sessions[0].epoch, 2);
    assert!(sessions[0].ended_at.is_none());
    assert_eq!(sessions[1].end_reason.as_deref(), Some("keepalive"));
    assert_eq!(sessions[1].duration_ms, Some(5000));
    assert_eq!(sessions[1].peer.as_deref(), Some("127.0.0.1:5"));

    // The end arriving in a later batch than the connect merges in.
    let end = ArchivedEvent::from_entry(
        "stream:events:{3}",
        "6-0",
        event(2, 2, day + 86_400_000 + 50, EventKind::Disconnected),
    );
    store.archive(&end, &[]).await.unwrap();
    let s = store.sessions_page("dev-a", None, 1).await.unwrap();
    assert_eq!(s[0].end_reason.as_deref(), Some("disconnected"));
    assert_eq!(s[0].duration_ms, Some(50));

    // Paging newest first, with a cursor and a kind filter.
    let p1 = store.events_page("dev-a", &[], None, 2).await.unwrap();
    assert_eq!(
        p1.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(),
        ["disconnected", "uplink"]
    );
    let last = p1.last().unwrap();
    let cursor = EventCursor {
        ts_us: last.ts.timestamp_micros(),
        stream: last.stream.clone(),
        entry_id: last.entry_id.clone(),
        seq: last.seq,
    };
    let p2 = store
        .events_page("dev-a", &[], Some(&cursor), 10)
        .await
        .unwrap();
    assert_eq!(
        p2.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(),
        ["connected", "tcp_down", "heartbeat", "connected"]
    );
    let only = store
        .events_page("dev-a", &["tcp_down".into()], None, 10)
        .await
        .unwrap();
    assert_eq!(only.len(), 1);
    assert_eq!(only[0].detail, Some(json!({"reason": "keepalive"})));
    let up = store
        .events_page("dev-a", &["uplink".into()], None, 10)
        .await
        .unwrap();
    assert_eq!(up[0].detail.as_ref().unwrap()["payload_base64"], "AQID");
}
