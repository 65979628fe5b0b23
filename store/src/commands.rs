//! The command log: every downlink command and each of its state changes,
//! archived from the `stream:commands` stream.
//!
//! A change is keyed by its command and its place in the command's log in
//! Redis (`seq`, from 1), so a change archived twice is stored once and two
//! changes with the same status in the same millisecond are both kept.
//! Changes written before the stream carried `seq` are keyed by (command,
//! status, time), as they always were.

use std::collections::HashMap;

use chrono::{DateTime, TimeZone, Utc};
use serde::Serialize;
use serde_json::json;
use sqlx::Row as _;
use uuid::Uuid;

use crate::{Store, StoreError};

/// One state change read from `stream:commands`. The first change of a
/// command carries its device, name, payload and expiry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandChange {
    /// Command id.
    pub id: Uuid,
    /// Its place in the command's log, from 1 (`None` from writers that
    /// did not carry it).
    pub seq: Option<i32>,
    /// New status.
    pub status: String,
    /// Reason (empty for none).
    pub reason: String,
    /// Detail (empty for none).
    pub detail: String,
    /// When, ms.
    pub at_ms: i64,
    /// Present on the creating change.
    pub created: Option<Created>,
}

/// What the creating change adds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    /// The device.
    pub phy_id: String,
    /// Topic level.
    pub name: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// Expiry, ms.
    pub expires_at_ms: i64,
}

impl CommandChange {
    /// Reads a `stream:commands` entry (binary-safe fields); `None` if a
    /// required field is missing or malformed.
    pub fn from_fields(f: &HashMap<String, Vec<u8>>) -> Option<Self> {
        let s = |k: &str| f.get(k).and_then(|v| String::from_utf8(v.clone()).ok());
        let created = match (s("phy_id"), s("name")) {
            (Some(phy_id), Some(name)) => Some(Created {
                phy_id,
                name,
                payload: f.get("payload").cloned().unwrap_or_default(),
                expires_at_ms: s("expires_at")?.parse().ok()?,
            }),
            _ => None,
        };
        Some(Self {
            id: Uuid::parse_str(&s("id")?).ok()?,
            seq: match s("seq") {
                Some(v) => Some(v.parse().ok().filter(|n: &i32| *n > 0)?),
                None => None,
            },
            status: s("status")?,
            reason: s("reason").unwrap_or_default(),
            detail: s("detail").unwrap_or_default(),
            at_ms: s("at_ms")?.parse().ok()?,
            created,
        })
    }
}

fn ts(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
}

/// A command as the log shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CommandRecord {
    /// Id.
    pub id: Uuid,
    /// Device.
    pub phy_id: String,
    /// Topic level.
    pub name: String,
    /// Latest status.
    pub status: String,
    /// Latest reason.
    pub reason: Option<String>,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

impl Store {
    /// Writes state changes (in stream order), idempotently: a change seen
    /// twice inserts nothing twice, and a late change never overwrites a
    /// newer status.
    pub async fn archive_commands(&self, changes: &[CommandChange]) -> Result<u64, StoreError> {
        if changes.is_empty() {
            return Ok(0);
        }
        let mut tx = self.pool.begin().await?;
        for c in changes.iter().filter(|c| c.created.is_some()) {
            let Some(cr) = &c.created else { continue };
            sqlx::query(
                "INSERT INTO commands (id, phy_id, name, payload, status, reason, created_at, updated_at, expires_at)
                 VALUES ($1, $2, $3, $4, $5, NULLIF($6, ''), $7, $7, $8)
                 ON CONFLICT (id) DO NOTHING",
            )
            .bind(c.id)
            .bind(&cr.phy_id)
            .bind(&cr.name)
            .bind(&cr.payload)
            .bind(&c.status)
            .bind(&c.reason)
            .bind(ts(c.at_ms))
            .bind(ts(cr.expires_at_ms))
            .execute(&mut *tx)
            .await?;
        }
        let inserted = sqlx::query(
            "INSERT INTO command_events (command_id, status, at, detail, seq)
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::timestamptz[], $4::jsonb[], $5::integer[])
             ON CONFLICT DO NOTHING",
        )
        .bind(changes.iter().map(|c| c.id).collect::<Vec<_>>())
        .bind(
            changes
                .iter()
                .map(|c| c.status.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(changes.iter().map(|c| ts(c.at_ms)).collect::<Vec<_>>())
        .bind(
            changes
                .iter()
                .map(|c| json!({"reason": c.reason, "detail": c.detail}))
                .collect::<Vec<_>>(),
        )
        .bind(changes.iter().map(|c| c.seq).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        for c in changes {
            sqlx::query(
                "UPDATE commands SET status = $2, reason = NULLIF($3, ''), updated_at = $4
                 WHERE id = $1 AND updated_at <= $4
                   AND status NOT IN ('acked', 'timed_out', 'expired', 'failed')",
            )
            .bind(c.id)
            .bind(&c.status)
            .bind(&c.reason)
            .bind(ts(c.at_ms))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(inserted)
    }

    /// Commands by device and/or status, newest first, created before `before`.
    pub async fn commands(
        &self,
        phy: Option<&str>,
        status: Option<&str>,
        before: Option<DateTime<Utc>>,
        limit: i64,
    ) -> Result<Vec<CommandRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, phy_id, name, status, reason, created_at, updated_at FROM commands
             WHERE ($1::text IS NULL OR phy_id = $1) AND ($2::text IS NULL OR status = $2)
               AND ($3::timestamptz IS NULL OR created_at < $3)
             ORDER BY created_at DESC LIMIT $4",
        )
        .bind(phy)
        .bind(status)
        .bind(before)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(CommandRecord {
                    id: r.try_get("id")?,
                    phy_id: r.try_get("phy_id")?,
                    name: r.try_get("name")?,
                    status: r.try_get("status")?,
                    reason: r.try_get("reason")?,
                    created_at: r.try_get("created_at")?,
                    updated_at: r.try_get("updated_at")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// A command's archived state changes, oldest first: by `seq`, after
    /// those archived without one (by time).
    pub async fn command_changes(
        &self,
        id: Uuid,
    ) -> Result<Vec<(String, DateTime<Utc>)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT status, at FROM command_events WHERE command_id = $1
             ORDER BY seq NULLS FIRST, at, status",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?)
    }
}
