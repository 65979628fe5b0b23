//! A device's history from the PostgreSQL archive: its events and its
//! sessions (connect to disconnect, with reasons and durations), newest
//! first, a page at a time.
//!
//! The archive is written by the archivers' consumer group from the Redis
//! streams, so it trails the live view by a batch. A device without
//! history has empty pages (not 404): the archive does not know which
//! devices exist. Without `database.url` these routes answer 503
//! `database_not_configured`; while PostgreSQL is away, 503
//! `database_unavailable`.

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::cursor::{self, SessionCursor};
use crate::error::{ApiError, ErrorBody};
use crate::extract::{DevicePath, StrictQuery};
use crate::params;
use crate::state::AppState;
use crate::timestamp::rfc3339_dt;

/// The event kinds the archive holds.
pub const KINDS: [&str; 7] = [
    "connected",
    "heartbeat",
    "uplink",
    "tcp_down",
    "disconnected",
    "ack",
    "ack_timeout",
];

/// `GET /api/devices/{phyID}/events`: filter and paging.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventParams {
    /// Events per page, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000, example = 100)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page; absent for the first page.
    pub cursor: Option<String>,
    /// Only these kinds, comma-separated: `connected`, `heartbeat`,
    /// `uplink`, `tcp_down`, `disconnected`, `ack`, `ack_timeout`.
    #[param(example = "connected,tcp_down")]
    pub kinds: Option<String>,
}

/// `GET /api/devices/{phyID}/sessions`: paging.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SessionParams {
    /// Sessions per page, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000, example = 100)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page; absent for the first page.
    pub cursor: Option<String>,
}

/// One archived event.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ArchivedEventInfo {
    /// When it happened, RFC 3339.
    pub ts: String,
    /// `connected`, `heartbeat`, `uplink`, `tcp_down`, `disconnected`,
    /// `ack` or `ack_timeout`.
    #[schema(example = "connected")]
    pub kind: String,
    /// Its connection.
    pub conn_id: String,
    /// Instance holding the connection.
    pub server_id: String,
    /// The connection's epoch.
    pub epoch: i64,
    /// Kind-specific fields: `reason` (tcp_down), `peer` and
    /// `keepalive_secs` (connected), `topic`, `qos`, `size` and
    /// `payload_base64` (uplink), `command_id` (ack, ack_timeout).
    #[schema(value_type = Option<Object>)]
    pub detail: Option<serde_json::Value>,
    /// The stream it was archived from.
    pub stream: String,
    /// Its stream entry id.
    pub entry_id: String,
    /// Its position inside the entry (heartbeat batches hold many).
    pub seq: i32,
}

/// A page of a device's events.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EventPage {
    /// The device.
    pub phy_id: String,
    /// Newest first.
    pub events: Vec<ArchivedEventInfo>,
    /// Pass as `cursor` for the next page; null after the last page.
    pub next_cursor: Option<String>,
}

/// One connection of a device.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SessionInfo {
    /// The connection id.
    pub conn_id: String,
    /// Instance that held it.
    pub server_id: String,
    /// Its epoch (grows with every CONNECT of the device).
    pub epoch: i64,
    /// The device's address.
    pub peer: Option<String>,
    /// Keepalive the device asked for, s.
    pub keepalive_secs: Option<i32>,
    /// Accepted at, RFC 3339.
    pub connected_at: Option<String>,
    /// Ended at, RFC 3339; null while it is up or its end is not archived yet.
    pub ended_at: Option<String>,
    /// How it ended: `disconnected` (clean) or a TCP drop reason (`closed`,
    /// `reset`, `keepalive`, `takeover`, `server_shutdown`, `server_lost`).
    pub end_reason: Option<String>,
    /// `ended_at - connected_at`, ms, when both are known.
    pub duration_ms: Option<i64>,
}

/// A page of a device's sessions.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SessionPage {
    /// The device.
    pub phy_id: String,
    /// Newest epoch first.
    pub sessions: Vec<SessionInfo>,
    /// Pass as `cursor` for the next page; null after the last page.
    pub next_cursor: Option<String>,
}

fn parse_kinds(s: &str) -> Result<Vec<String>, ApiError> {
    let mut out: Vec<String> = Vec::new();
    for k in s.split(',').map(str::trim) {
        if !KINDS.contains(&k) {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!(
                    "kinds holds {k:.40?}, which is not an event kind; give some of {}",
                    KINDS.join(", ")
                ),
            ));
        }
        if !out.iter().any(|x| x == k) {
            out.push(k.to_owned());
        }
    }
    Ok(out)
}

/// A device's archived events, newest first.
#[utoipa::path(get, path = "/api/devices/{phyID}/events", operation_id = "device_events", tag = "history",
    params(
        ("phyID" = String, Path, description = "The device: 1 to 64 characters of [A-Za-z0-9._-]",
         max_length = 64, pattern = "^[A-Za-z0-9._-]{1,64}$"),
        EventParams,
    ),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A page of events (empty for a device without history)", body = EventPage),
        (status = 400, description = "Invalid phyID, limit, cursor, kinds or parameter", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 503, description = "PostgreSQL unavailable or not configured", body = ErrorBody),
    ))]
pub async fn events(
    State(state): State<AppState>,
    DevicePath(phy): DevicePath,
    StrictQuery(q): StrictQuery<EventParams>,
) -> Result<Json<EventPage>, ApiError> {
    let limit = params::limit(q.limit)?;
    let before = q
        .cursor
        .as_deref()
        .map(cursor::decode_event_cursor)
        .transpose()?;
    let kinds = q
        .kinds
        .as_deref()
        .map(parse_kinds)
        .transpose()?
        .unwrap_or_default();
    let store = state.store()?;
    let mut rows = state
        .db(async {
            Ok(store
                .events_page(phy.as_str(), &kinds, before.as_ref(), limit as i64 + 1)
                .await?)
        })
        .await?;
    let more = rows.len() > limit;
    rows.truncate(limit);
    let next_cursor = more.then(|| rows.last()).flatten().map(|r| {
        cursor::event_cursor(&iot_store::archive::EventCursor {
            ts_us: r.ts.timestamp_micros(),
            stream: r.stream.clone(),
            entry_id: r.entry_id.clone(),
            seq: r.seq,
        })
    });
    Ok(Json(EventPage {
        phy_id: phy.to_string(),
        events: rows
            .into_iter()
            .map(|r| ArchivedEventInfo {
                ts: rfc3339_dt(&r.ts),
                kind: r.kind,
                conn_id: r.conn_id.to_string(),
                server_id: r.server_id,
                epoch: r.epoch,
                detail: r.detail,
                stream: r.stream,
                entry_id: r.entry_id,
                seq: r.seq,
            })
            .collect(),
        next_cursor,
    }))
}

/// A device's sessions (connect to disconnect), newest epoch first, with
/// how each ended and how long it lasted.
#[utoipa::path(get, path = "/api/devices/{phyID}/sessions", operation_id = "device_sessions", tag = "history",
    params(
        ("phyID" = String, Path, description = "The device: 1 to 64 characters of [A-Za-z0-9._-]",
         max_length = 64, pattern = "^[A-Za-z0-9._-]{1,64}$"),
        SessionParams,
    ),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A page of sessions (empty for a device without history)", body = SessionPage),
        (status = 400, description = "Invalid phyID, limit, cursor or parameter", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 503, description = "PostgreSQL unavailable or not configured", body = ErrorBody),
    ))]
pub async fn sessions(
    State(state): State<AppState>,
    DevicePath(phy): DevicePath,
    StrictQuery(q): StrictQuery<SessionParams>,
) -> Result<Json<SessionPage>, ApiError> {
    let limit = params::limit(q.limit)?;
    let before = q.cursor.as_deref().map(SessionCursor::decode).transpose()?;
    let store = state.store()?;
    let mut rows = state
        .db(async {
            Ok(store
                .sessions_page(
                    phy.as_str(),
                    before.map(|c| c.before_epoch),
                    limit as i64 + 1,
                )
                .await?)
        })
        .await?;
    let more = rows.len() > limit;
    rows.truncate(limit);
    let next_cursor = more.then(|| rows.last()).flatten().map(|r| {
        SessionCursor {
            before_epoch: r.epoch,
        }
        .encode()
    });
    Ok(Json(SessionPage {
        phy_id: phy.to_string(),
        sessions: rows
            .into_iter()
            .map(|r| SessionInfo {
                conn_id: r.conn_id.to_string(),
                server_id: r.server_id,
                epoch: r.epoch,
                peer: r.peer,
                keepalive_secs: r.keepalive_secs,
                connected_at: r.connected_at.as_ref().map(rfc3339_dt),
                ended_at: r.ended_at.as_ref().map(rfc3339_dt),
                end_reason: r.end_reason,
                duration_ms: r.duration_ms,
            })
            .collect(),
        next_cursor,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_checked_and_deduplicated() {
        assert_eq!(
            parse_kinds("connected, tcp_down,connected").expect("kinds"),
            ["connected", "tcp_down"]
        );
        for bad in ["", "online", "connected,,tcp_down"] {
            assert_eq!(parse_kinds(bad).unwrap_err().code(), "invalid_query");
        }
    }
}
