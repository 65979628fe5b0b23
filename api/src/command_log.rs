//! Reading one command from the PostgreSQL command log, for a command whose
//! Redis record has expired (`downlink.retention` after its ttl). The log's
//! lists come from [`iot_store::Store::commands`]; what the store does not
//! offer (one command by id with its payload, its changes with their
//! reasons) is read here.

use chrono::{DateTime, Utc};
use iot_store::{Store, StoreError};
use serde_json::Value;
use sqlx::Row as _;
use uuid::Uuid;

/// A command as the log holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct LoggedCommand {
    /// Id.
    pub id: Uuid,
    /// Device.
    pub phy_id: String,
    /// Topic level.
    pub name: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// Latest status.
    pub status: String,
    /// Latest reason.
    pub reason: Option<String>,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// Expiry.
    pub expires_at: Option<DateTime<Utc>>,
}

/// One logged state change.
#[derive(Debug, Clone, PartialEq)]
pub struct LoggedChange {
    /// New status.
    pub status: String,
    /// When.
    pub at: DateTime<Utc>,
    /// Reason, if any.
    pub reason: Option<String>,
    /// Detail, if any.
    pub detail: Option<String>,
}

fn text(detail: &Option<Value>, k: &str) -> Option<String> {
    detail
        .as_ref()
        .and_then(|d| d.get(k))
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// Order of changes logged in the same instant: the log has no sequence,
/// so non-terminal states come first (by name, which puts `dispatched`
/// before `queued` before `sent`) and the terminal one last.
fn rank(status: &str) -> (u8, String) {
    let terminal = iot_downlink::Status::parse(status).is_some_and(|s| s.is_terminal());
    (u8::from(terminal), status.to_owned())
}

/// The command `id` and its changes (oldest first), if the log has it.
pub async fn get(
    store: &Store,
    id: Uuid,
) -> Result<Option<(LoggedCommand, Vec<LoggedChange>)>, StoreError> {
    let row = sqlx::query(
        "SELECT id, phy_id, name, payload, status, reason, created_at, updated_at, expires_at
         FROM commands WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(store.pool())
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let cmd = LoggedCommand {
        id: row.try_get("id")?,
        phy_id: row.try_get("phy_id")?,
        name: row.try_get("name")?,
        payload: row.try_get("payload")?,
        status: row.try_get("status")?,
        reason: row.try_get("reason")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        expires_at: row.try_get("expires_at")?,
    };
    let rows = sqlx::query(
        "SELECT status, at, detail FROM command_events WHERE command_id = $1 ORDER BY at",
    )
    .bind(id)
    .fetch_all(store.pool())
    .await?;
    let mut changes = rows
        .iter()
        .map(|r| {
            let detail: Option<Value> = r.try_get("detail")?;
            Ok(LoggedChange {
                status: r.try_get("status")?,
                at: r.try_get("at")?,
                reason: text(&detail, "reason"),
                detail: text(&detail, "detail"),
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    changes.sort_by_key(|a| (a.at, rank(&a.status)));
    Ok(Some((cmd, changes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_states_sort_last_within_an_instant() {
        let mut v = vec!["failed", "queued", "dispatched", "acked", "sent"];
        v.sort_by_key(|s| rank(s));
        assert_eq!(v, ["dispatched", "queued", "sent", "acked", "failed"]);
    }
}
