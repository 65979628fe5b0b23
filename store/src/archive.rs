//! The archive: every event and transition of the streams, and one row per
//! connection, written in batches, idempotent by stream entry.

use std::collections::{BTreeSet, HashMap};

use base64::Engine as _;
use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use iot_core::event::{Entry, EventKind};
use iot_core::view::Ended;
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::Row as _;
use uuid::Uuid;

use crate::{Store, StoreError};

/// One event row.
#[derive(Debug, Clone, PartialEq)]
pub struct ArchivedEvent {
    /// Event time, ms.
    pub ts_ms: i64,
    /// Stream key it was read from.
    pub stream: String,
    /// Stream entry id.
    pub entry_id: String,
    /// Position inside the entry (heartbeat batches hold many events).
    pub seq: i32,
    /// The device.
    pub phy_id: String,
    /// Its connection.
    pub conn_id: Uuid,
    /// Instance holding the connection.
    pub server_id: String,
    /// Connection epoch.
    pub epoch: i64,
    /// `connected`, `heartbeat`, ...
    pub kind: &'static str,
    /// Kind-specific fields (reason, topic, payload, command id).
    pub detail: Option<Value>,
    /// For connected / tcp_down / disconnected: what it says about the session.
    session: Option<SessionPart>,
}

#[derive(Debug, Clone, PartialEq)]
enum SessionPart {
    Connected { peer: String, keepalive_secs: i32 },
    Ended(Ended),
}

/// One transition row (from a lifecycle stream entry).
#[derive(Debug, Clone, PartialEq)]
pub struct ArchivedTransition {
    /// When the transition happened, ms.
    pub at_ms: i64,
    /// Lifecycle stream key.
    pub stream: String,
    /// Stream entry id.
    pub entry_id: String,
    /// The device.
    pub phy_id: String,
    /// New state.
    pub online: bool,
    /// Lifecycle reason (`connected`, `heartbeat_expired`, `tcp_down:reset`, ...).
    pub reason: String,
    /// Epoch of the binding at the time, if recorded.
    pub epoch: Option<i64>,
    /// Projection revision, if recorded.
    pub rev: Option<i64>,
}

impl ArchivedEvent {
    /// The rows of one stream entry.
    pub fn from_entry(stream: &str, entry_id: &str, entry: Entry) -> Vec<Self> {
        entry
            .into_events()
            .into_iter()
            .enumerate()
            .map(|(seq, e)| {
                let (detail, session) = match &e.kind {
                    EventKind::Connected {
                        keepalive_secs,
                        peer,
                    } => (
                        Some(json!({"keepalive_secs": keepalive_secs, "peer": peer})),
                        Some(SessionPart::Connected {
                            peer: peer.clone(),
                            keepalive_secs: i32::from(*keepalive_secs),
                        }),
                    ),
                    EventKind::Uplink {
                        topic,
                        qos,
                        payload,
                    } => (
                        Some(json!({
                            "topic": topic,
                            "qos": qos,
                            "size": payload.len(),
                            "payload_base64": base64::engine::general_purpose::STANDARD.encode(payload),
                        })),
                        None,
                    ),
                    EventKind::TcpDown { reason } => (
                        Some(json!({"reason": reason.as_str()})),
                        Some(SessionPart::Ended(Ended::TcpDown(*reason))),
                    ),
                    EventKind::Disconnected => (None, Some(SessionPart::Ended(Ended::Disconnected))),
                    EventKind::Ack { command_id } | EventKind::AckTimeout { command_id } => {
                        (Some(json!({"command_id": command_id})), None)
                    }
                    EventKind::Heartbeat => (None, None),
                };
                ArchivedEvent {
                    ts_ms: e.ts_ms,
                    stream: stream.to_owned(),
                    entry_id: entry_id.to_owned(),
                    seq: i32::try_from(seq).unwrap_or(i32::MAX),
                    phy_id: e.phy_id.to_string(),
                    conn_id: e.conn_id,
                    server_id: e.server_id.to_string(),
                    epoch: i64::try_from(e.epoch).unwrap_or(i64::MAX),
                    kind: e.kind.name(),
                    detail,
                    session,
                }
            })
            .collect()
    }
}

impl ArchivedTransition {
    /// Reads a lifecycle stream entry's fields (`phy_id`, `online`, `reason`,
    /// `at_ms`, optional `epoch` and `rev`); `None` if a required one is
    /// missing or malformed.
    pub fn from_fields(
        stream: &str,
        entry_id: &str,
        fields: &HashMap<String, String>,
    ) -> Option<Self> {
        Some(Self {
            at_ms: fields.get("at_ms")?.parse().ok()?,
            stream: stream.to_owned(),
            entry_id: entry_id.to_owned(),
            phy_id: fields.get("phy_id")?.clone(),
            online: match fields.get("online")?.as_str() {
                "1" => true,
                "0" => false,
                _ => return None,
            },
            reason: fields.get("reason")?.clone(),
            epoch: fields.get("epoch").and_then(|v| v.parse().ok()),
            rev: fields.get("rev").and_then(|v| v.parse().ok()),
        })
    }
}

/// Rows written by one [`Store::archive`] call (new rows only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ArchiveCounts {
    /// Event rows inserted.
    pub events: u64,
    /// Transition rows inserted.
    pub transitions: u64,
}

fn ts(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
}

fn day_of(ms: i64) -> NaiveDate {
    ts(ms).date_naive()
}

/// Merged session facts of one connection inside a batch.
#[derive(Default)]
struct SessionRow {
    phy_id: String,
    server_id: String,
    epoch: i64,
    peer: Option<String>,
    keepalive_secs: Option<i32>,
    connected_at: Option<i64>,
    ended: Option<(i64, Ended)>,
}

impl Store {
    /// Creates the daily partition of `table` holding `day` if missing.
    async fn ensure_partition(&self, table: &str, day: NaiveDate) -> Result<(), StoreError> {
        let name = format!("{table}_p{}", day.format("%Y%m%d"));
        if self
            .partitions
            .lock()
            .map(|p| p.contains(&name))
            .unwrap_or(false)
        {
            return Ok(());
        }
        let next = day.succ_opt().unwrap_or(day);
        // Names and bounds are generated here from a date, never from input.
        let ddl = format!(
            "CREATE TABLE IF NOT EXISTS {name} PARTITION OF {table} FOR VALUES FROM ('{day}') TO ('{next}')"
        );
        if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(ddl))
            .execute(&self.pool)
            .await
        {
            // Another archiver may have created it at the same moment.
            let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
                .bind(&name)
                .fetch_one(&self.pool)
                .await?;
            if !exists {
                return Err(e.into());
            }
        }
        if let Ok(mut p) = self.partitions.lock() {
            p.insert(name);
        }
        Ok(())
    }

    /// Writes a batch: events, the sessions they tell about, and transitions,
    /// in one transaction. Rows already archived (same stream entry) are
    /// skipped, so redelivering a batch is harmless.
    pub async fn archive(
        &self,
        events: &[ArchivedEvent],
        transitions: &[ArchivedTransition],
    ) -> Result<ArchiveCounts, StoreError> {
        let days: BTreeSet<NaiveDate> = events.iter().map(|e| day_of(e.ts_ms)).collect();
        for d in days {
            self.ensure_partition("events", d).await?;
        }
        let days: BTreeSet<NaiveDate> = transitions.iter().map(|t| day_of(t.at_ms)).collect();
        for d in days {
            self.ensure_partition("transitions", d).await?;
        }

        let mut sessions: HashMap<Uuid, SessionRow> = HashMap::new();
        for e in events {
            let Some(part) = &e.session else { continue };
            let row = sessions.entry(e.conn_id).or_insert_with(|| SessionRow {
                phy_id: e.phy_id.clone(),
                server_id: e.server_id.clone(),
                epoch: e.epoch,
                ..SessionRow::default()
            });
            match part {
                SessionPart::Connected {
                    peer,
                    keepalive_secs,
                } => {
                    row.peer = Some(peer.clone());
                    row.keepalive_secs = Some(*keepalive_secs);
                    row.connected_at = Some(row.connected_at.map_or(e.ts_ms, |t| t.max(e.ts_ms)));
                }
                SessionPart::Ended(how) => {
                    let cand = (e.ts_ms, *how);
                    row.ended = Some(match row.ended {
                        Some(cur) if (cur.0, cur.1.rank()) >= (cand.0, cand.1.rank()) => cur,
                        _ => cand,
                    });
                }
            }
        }

        let mut tx = self.pool.begin().await?;
        let mut counts = ArchiveCounts::default();
        if !events.is_empty() {
            let done = sqlx::query(
                "INSERT INTO events (ts, stream, entry_id, seq, phy_id, conn_id, server_id, epoch, kind, detail)
                 SELECT * FROM UNNEST($1::timestamptz[], $2::text[], $3::text[], $4::int[], $5::text[],
                                      $6::uuid[], $7::text[], $8::bigint[], $9::text[], $10::jsonb[])
                 ON CONFLICT DO NOTHING",
            )
            .bind(events.iter().map(|e| ts(e.ts_ms)).collect::<Vec<_>>())
            .bind(events.iter().map(|e| e.stream.as_str()).collect::<Vec<_>>())
            .bind(events.iter().map(|e| e.entry_id.as_str()).collect::<Vec<_>>())
            .bind(events.iter().map(|e| e.seq).collect::<Vec<_>>())
            .bind(events.iter().map(|e| e.phy_id.as_str()).collect::<Vec<_>>())
            .bind(events.iter().map(|e| e.conn_id).collect::<Vec<_>>())
            .bind(events.iter().map(|e| e.server_id.as_str()).collect::<Vec<_>>())
            .bind(events.iter().map(|e| e.epoch).collect::<Vec<_>>())
            .bind(events.iter().map(|e| e.kind).collect::<Vec<_>>())
            .bind(events.iter().map(|e| e.detail.clone()).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
            counts.events = done.rows_affected();
        }
        if !sessions.is_empty() {
            let rows: Vec<(Uuid, SessionRow)> = sessions.into_iter().collect();
            sqlx::query(
                "INSERT INTO sessions (conn_id, phy_id, server_id, epoch, peer, keepalive_secs,
                                       connected_at, ended_at, end_reason)
                 SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::bigint[], $5::text[],
                                      $6::int[], $7::timestamptz[], $8::timestamptz[], $9::text[])
                 ON CONFLICT (conn_id) DO UPDATE SET
                   peer = COALESCE(sessions.peer, EXCLUDED.peer),
                   keepalive_secs = COALESCE(sessions.keepalive_secs, EXCLUDED.keepalive_secs),
                   connected_at = GREATEST(sessions.connected_at, EXCLUDED.connected_at),
                   end_reason = CASE WHEN EXCLUDED.ended_at IS NOT NULL
                                      AND (sessions.ended_at IS NULL OR EXCLUDED.ended_at > sessions.ended_at)
                                     THEN EXCLUDED.end_reason ELSE sessions.end_reason END,
                   ended_at = GREATEST(sessions.ended_at, EXCLUDED.ended_at)",
            )
            .bind(rows.iter().map(|(id, _)| *id).collect::<Vec<_>>())
            .bind(rows.iter().map(|(_, r)| r.phy_id.as_str()).collect::<Vec<_>>())
            .bind(rows.iter().map(|(_, r)| r.server_id.as_str()).collect::<Vec<_>>())
            .bind(rows.iter().map(|(_, r)| r.epoch).collect::<Vec<_>>())
            .bind(rows.iter().map(|(_, r)| r.peer.clone()).collect::<Vec<_>>())
            .bind(rows.iter().map(|(_, r)| r.keepalive_secs).collect::<Vec<_>>())
            .bind(rows.iter().map(|(_, r)| r.connected_at.map(ts)).collect::<Vec<_>>())
            .bind(rows.iter().map(|(_, r)| r.ended.map(|(t, _)| ts(t))).collect::<Vec<_>>())
            .bind(
                rows.iter()
                    .map(|(_, r)| r.ended.map(|(_, how)| how.as_str()))
                    .collect::<Vec<_>>(),
            )
            .execute(&mut *tx)
            .await?;
        }
        if !transitions.is_empty() {
            let done = sqlx::query(
                "INSERT INTO transitions (at, stream, entry_id, phy_id, online, reason, epoch, rev)
                 SELECT * FROM UNNEST($1::timestamptz[], $2::text[], $3::text[], $4::text[],
                                      $5::boolean[], $6::text[], $7::bigint[], $8::bigint[])
                 ON CONFLICT DO NOTHING",
            )
            .bind(transitions.iter().map(|t| ts(t.at_ms)).collect::<Vec<_>>())
            .bind(
                transitions
                    .iter()
                    .map(|t| t.stream.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(
                transitions
                    .iter()
                    .map(|t| t.entry_id.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(
                transitions
                    .iter()
                    .map(|t| t.phy_id.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(transitions.iter().map(|t| t.online).collect::<Vec<_>>())
            .bind(
                transitions
                    .iter()
                    .map(|t| t.reason.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(transitions.iter().map(|t| t.epoch).collect::<Vec<_>>())
            .bind(transitions.iter().map(|t| t.rev).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
            counts.transitions = done.rows_affected();
        }
        tx.commit().await?;
        Ok(counts)
    }
}

/// One archived event, as the history endpoint shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventRecord {
    /// Event time.
    pub ts: DateTime<Utc>,
    /// Kind.
    pub kind: String,
    /// Connection.
    pub conn_id: Uuid,
    /// Instance.
    pub server_id: String,
    /// Epoch.
    pub epoch: i64,
    /// Kind-specific fields.
    pub detail: Option<Value>,
    /// Stream key and entry id (the archive's identity of the row).
    pub stream: String,
    /// Stream entry id.
    pub entry_id: String,
    /// Position inside the entry.
    pub seq: i32,
}

/// Position after which a history page continues (newest first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventCursor {
    /// Time of the last row shown, µs.
    pub ts_us: i64,
    /// Its stream.
    pub stream: String,
    /// Its entry id.
    pub entry_id: String,
    /// Its position.
    pub seq: i32,
}

/// One connection of a device, from connect to end.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SessionRecord {
    /// Connection id.
    pub conn_id: Uuid,
    /// Instance.
    pub server_id: String,
    /// Epoch.
    pub epoch: i64,
    /// Device address.
    pub peer: Option<String>,
    /// Keepalive asked for, s.
    pub keepalive_secs: Option<i32>,
    /// Accepted at.
    pub connected_at: Option<DateTime<Utc>>,
    /// Ended at (None: still up, or its end is not archived yet).
    pub ended_at: Option<DateTime<Utc>>,
    /// `closed`, `keepalive`, `takeover`, `disconnected`, ...
    pub end_reason: Option<String>,
    /// `ended_at - connected_at`, ms, when both are known.
    pub duration_ms: Option<i64>,
}

impl Store {
    /// A device's archived events, newest first, after `before`.
    pub async fn events_page(
        &self,
        phy: &str,
        kinds: &[String],
        before: Option<&EventCursor>,
        limit: i64,
    ) -> Result<Vec<EventRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT ts, kind, conn_id, server_id, epoch, detail, stream, entry_id, seq FROM events
             WHERE phy_id = $1
               AND (cardinality($2::text[]) = 0 OR kind = ANY($2))
               AND ($3::timestamptz IS NULL OR (ts, stream, entry_id, seq) < ($3, $4, $5, $6))
             ORDER BY ts DESC, stream DESC, entry_id DESC, seq DESC
             LIMIT $7",
        )
        .bind(phy)
        .bind(kinds)
        .bind(before.and_then(|c| Utc.timestamp_micros(c.ts_us).single()))
        .bind(before.map(|c| c.stream.as_str()).unwrap_or_default())
        .bind(before.map(|c| c.entry_id.as_str()).unwrap_or_default())
        .bind(before.map(|c| c.seq).unwrap_or_default())
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(EventRecord {
                    ts: r.try_get("ts")?,
                    kind: r.try_get("kind")?,
                    conn_id: r.try_get("conn_id")?,
                    server_id: r.try_get("server_id")?,
                    epoch: r.try_get("epoch")?,
                    detail: r.try_get("detail")?,
                    stream: r.try_get("stream")?,
                    entry_id: r.try_get("entry_id")?,
                    seq: r.try_get("seq")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// A device's connections, newest epoch first, below `before_epoch`.
    pub async fn sessions_page(
        &self,
        phy: &str,
        before_epoch: Option<i64>,
        limit: i64,
    ) -> Result<Vec<SessionRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT conn_id, server_id, epoch, peer, keepalive_secs, connected_at, ended_at, end_reason
             FROM sessions WHERE phy_id = $1 AND ($2::bigint IS NULL OR epoch < $2)
             ORDER BY epoch DESC LIMIT $3",
        )
        .bind(phy)
        .bind(before_epoch)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let connected_at: Option<DateTime<Utc>> = r.try_get("connected_at")?;
                let ended_at: Option<DateTime<Utc>> = r.try_get("ended_at")?;
                Ok(SessionRecord {
                    conn_id: r.try_get("conn_id")?,
                    server_id: r.try_get("server_id")?,
                    epoch: r.try_get("epoch")?,
                    peer: r.try_get("peer")?,
                    keepalive_secs: r.try_get("keepalive_secs")?,
                    connected_at,
                    ended_at,
                    end_reason: r.try_get("end_reason")?,
                    duration_ms: match (connected_at, ended_at) {
                        (Some(a), Some(b)) => Some((b - a).num_milliseconds()),
                        _ => None,
                    },
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// Number of archived event rows (all devices).
    pub async fn count_events(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(&self.pool)
            .await?)
    }

    /// Number of archived transition rows (all devices).
    pub async fn count_transitions(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM transitions")
            .fetch_one(&self.pool)
            .await?)
    }

    /// The identity (stream, entry id, position) of every archived event
    /// row, sorted, duplicates kept: for audits that compare the archive
    /// with what the streams held. Reads the whole table.
    pub async fn event_keys(&self) -> Result<Vec<(String, String, i32)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT stream, entry_id, seq FROM events ORDER BY stream, entry_id, seq",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// The identity (stream, entry id) of every archived transition row,
    /// sorted, duplicates kept (see [`event_keys`](Self::event_keys)).
    pub async fn transition_keys(&self) -> Result<Vec<(String, String)>, StoreError> {
        Ok(
            sqlx::query_as("SELECT stream, entry_id FROM transitions ORDER BY stream, entry_id")
                .fetch_all(&self.pool)
                .await?,
        )
    }
}

/// An archived event turned back into an [`Event`], with its stream identity.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayedEvent {
    /// Stream entry id it was archived from.
    pub entry_id: String,
    /// Position inside the entry.
    pub seq: i32,
    /// The event (uplink payloads come back empty: a replay does not need them).
    pub event: iot_core::Event,
}

/// Position after which [`Store::replay_events`] continues.
pub type ReplayCursor = (DateTime<Utc>, String, i32);

fn kind_from_row(kind: &str, detail: Option<&Value>) -> Option<EventKind> {
    let d = |k: &str| detail.and_then(|v| v.get(k));
    let command = || {
        d("command_id")
            .and_then(Value::as_str)
            .and_then(|s| Uuid::parse_str(s).ok())
    };
    Some(match kind {
        "connected" => EventKind::Connected {
            keepalive_secs: d("keepalive_secs")
                .and_then(Value::as_u64)
                .and_then(|v| u16::try_from(v).ok())
                .unwrap_or(0),
            peer: d("peer")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
        },
        "heartbeat" => EventKind::Heartbeat,
        "uplink" => EventKind::Uplink {
            topic: d("topic")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            qos: d("qos")
                .and_then(Value::as_u64)
                .and_then(|v| u8::try_from(v).ok())
                .unwrap_or(0),
            payload: Vec::new(),
        },
        "tcp_down" => EventKind::TcpDown {
            reason: iot_core::TcpDownReason::parse(d("reason").and_then(Value::as_str)?)?,
        },
        "disconnected" => EventKind::Disconnected,
        "ack" => EventKind::Ack {
            command_id: command()?,
        },
        "ack_timeout" => EventKind::AckTimeout {
            command_id: command()?,
        },
        _ => return None,
    })
}

impl Store {
    /// Archived events of one stream with `ts >= since`, in archive order
    /// after `after`, at most `limit`; rows that no longer parse are skipped.
    /// Used by `iot-projector rebuild` for what the streams no longer hold.
    pub async fn replay_events(
        &self,
        stream: &str,
        since: DateTime<Utc>,
        after: Option<&ReplayCursor>,
        limit: i64,
    ) -> Result<(Vec<ReplayedEvent>, Option<ReplayCursor>), StoreError> {
        let rows = sqlx::query(
            "SELECT ts, entry_id, seq, phy_id, conn_id, server_id, epoch, kind, detail FROM events
             WHERE stream = $1 AND ts >= $2
               AND ($3::timestamptz IS NULL OR (ts, entry_id, seq) > ($3, $4, $5))
             ORDER BY ts, entry_id, seq LIMIT $6",
        )
        .bind(stream)
        .bind(since)
        .bind(after.map(|a| a.0))
        .bind(after.map(|a| a.1.as_str()).unwrap_or_default())
        .bind(after.map(|a| a.2).unwrap_or_default())
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        let mut last = None;
        for r in &rows {
            let ts: DateTime<Utc> = r.try_get("ts")?;
            let entry_id: String = r.try_get("entry_id")?;
            let seq: i32 = r.try_get("seq")?;
            last = Some((ts, entry_id.clone(), seq));
            let kind: String = r.try_get("kind")?;
            let detail: Option<Value> = r.try_get("detail")?;
            let phy: String = r.try_get("phy_id")?;
            let server: String = r.try_get("server_id")?;
            let epoch: i64 = r.try_get("epoch")?;
            let (Some(kind), Ok(phy_id), Ok(server_id)) = (
                kind_from_row(&kind, detail.as_ref()),
                iot_core::PhyId::new(phy),
                iot_core::ServerId::new(server),
            ) else {
                continue;
            };
            out.push(ReplayedEvent {
                entry_id,
                seq,
                event: iot_core::Event {
                    phy_id,
                    conn_id: r.try_get("conn_id")?,
                    server_id,
                    epoch: u64::try_from(epoch).unwrap_or(0),
                    ts_ms: ts.timestamp_millis(),
                    kind,
                },
            });
        }
        Ok((out, last))
    }
}
