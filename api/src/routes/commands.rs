//! Downlink commands: send one to a device, follow its fate, list a
//! device's commands (Redis) and search the command log (PostgreSQL).
//!
//! `POST /api/devices/{phyID}/commands` needs a write token (a read token
//! gets 403); the GET routes a read or write token. A command is created
//! and routed at once (`iot-downlink`): dispatched to the ingest instance
//! holding the device, queued for an offline device when it may wait, or
//! failed. Every command reaches a terminal state (acked, timed_out,
//! expired, failed) that these routes show; its record stays in Redis for
//! `downlink.retention` after its ttl, and the command log in PostgreSQL
//! keeps it for good.

use std::collections::BTreeSet;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use chrono::{TimeZone as _, Utc};
use iot_core::PhyId;
use iot_downlink::{Change, Command, NewCommand, Status, route};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::command_log::{self, LoggedChange, LoggedCommand};
use crate::cursor::TimeCursor;
use crate::downlink;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{CommandIdPath, DevicePath, NoParams, StrictJson, StrictQuery};
use crate::paging::{self, Start};
use crate::params;
use crate::state::AppState;
use crate::timestamp::{rfc3339, rfc3339_dt, rfc3339_opt};

/// Longest `ttl` of a command.
pub const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Longest `wait` of `POST /api/devices/{phyID}/commands`.
pub const MAX_WAIT: Duration = Duration::from_secs(30);

/// Cursor tag of `GET /api/devices/{phyID}/commands` (times in ms).
const DEVICE_CURSOR: &str = "c1";
/// Cursor tag of `GET /api/commands` (times in µs).
const LOG_CURSOR: &str = "l1";

/// How the `payload` string of a command is to be read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PayloadEncoding {
    /// The payload is the text's UTF-8 bytes.
    #[default]
    Utf8,
    /// The payload is base64 (RFC 4648 standard alphabet, padding optional).
    Base64,
}

/// A command to send.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandRequest {
    /// The topic level after `devices/{phyID}/down/`: 1 to 64 characters of
    /// `[A-Za-z0-9._-]`.
    #[schema(example = "reboot")]
    pub name: String,
    /// The payload, as text or base64 (see `payload_encoding`); default
    /// empty. At most what a QoS 1 PUBLISH on the command's topic can carry
    /// within `mqtt.max_packet_size` (else 413).
    #[serde(default)]
    #[schema(example = "{\"delay\": 5}")]
    pub payload: String,
    /// `utf8` (default) or `base64`.
    #[serde(default)]
    pub payload_encoding: PayloadEncoding,
    /// Time to live, such as `30s` or `1h`, at most 7 days; default
    /// `downlink.queue_ttl`. A command not delivered by then ends `expired`.
    #[schema(example = "10m")]
    pub ttl: Option<String>,
    /// Wait in the device's offline queue (capped at `downlink.queue_max`)
    /// while it is not connected; default false: fail with reason `offline`.
    #[serde(default)]
    pub queue_if_offline: bool,
    /// Answer when the command reaches a terminal state or this passes
    /// (such as `5s`, at most 30s), with the state then; default: answer
    /// at once.
    #[schema(example = "5s")]
    pub wait: Option<String>,
}

/// A command and where it stands.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CommandInfo {
    /// Its id (UUID v7: time-ordered).
    pub id: String,
    /// The device.
    #[schema(example = "dev-001")]
    pub phy_id: String,
    /// Topic level after `devices/{phyID}/down/`.
    #[schema(example = "reboot")]
    pub name: String,
    /// `queued`, `dispatched`, `sent`, `acked`, `timed_out`, `expired` or
    /// `failed`.
    #[schema(example = "dispatched")]
    pub status: String,
    /// Whether the status is final (acked, timed_out, expired, failed).
    pub terminal: bool,
    /// Why: for `failed` one of `offline`, `no_subscription`,
    /// `device_gone`, `rejected`, `queue_full`; otherwise a note (such as
    /// `offline` for a command queued after its owner vanished) or null.
    pub reason: Option<String>,
    /// The payload, base64.
    pub payload_base64: String,
    /// The payload as text, when it is valid UTF-8.
    pub payload_utf8: Option<String>,
    /// Payload size, bytes.
    pub payload_size: usize,
    /// Whether it may wait in the offline queue (null from the command log).
    pub queue_if_offline: Option<bool>,
    /// Instance it was last dispatched to.
    pub server_id: Option<String>,
    /// Epoch of the connection it was dispatched to.
    pub epoch: Option<u64>,
    /// Forwards to a new owner after the device moved (at most 1; null
    /// from the command log).
    pub hops: Option<u8>,
    /// Transmissions to the device (2 after a retransmission; null from the
    /// command log).
    pub attempts: Option<u32>,
    /// Created, RFC 3339.
    pub created_at: String,
    /// Last change, RFC 3339.
    pub updated_at: String,
    /// When its ttl ends, RFC 3339.
    pub expires_at: Option<String>,
    /// First transmission to the device, RFC 3339.
    pub sent_at: Option<String>,
    /// The device's PUBACK, RFC 3339.
    pub acked_at: Option<String>,
    /// Where this was read: `redis` (the live record) or `command_log`
    /// (PostgreSQL, after the record expired from Redis).
    #[schema(example = "redis")]
    pub source: String,
}

/// One state change of a command.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CommandChange {
    /// Its place in the command's history, from 1 (the order of changes
    /// that share a status and a millisecond); null when read from the
    /// command log, or for a change recorded before this was kept.
    pub seq: Option<u64>,
    /// The new status.
    #[schema(example = "sent")]
    pub status: String,
    /// When, RFC 3339.
    pub at: String,
    /// Reason or note.
    pub reason: Option<String>,
    /// Where (`{server_id} epoch {n}`) or other detail.
    pub detail: Option<String>,
}

/// A command with its history.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CommandDetail {
    /// The command.
    #[serde(flatten)]
    pub command: CommandInfo,
    /// Every state change, oldest first.
    pub history: Vec<CommandChange>,
}

/// A command in a device's list.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeviceCommand {
    /// The command.
    #[serde(flatten)]
    pub command: CommandInfo,
    /// Every state change, oldest first, as in `GET /api/commands/{id}`;
    /// only with `history=true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<Vec<CommandChange>>,
}

/// A page of a device's commands.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CommandList {
    /// The device.
    pub phy_id: String,
    /// Newest first.
    pub commands: Vec<DeviceCommand>,
    /// Pass as `cursor` for the next page; null after the last page.
    pub next_cursor: Option<String>,
}

/// A command in the command log.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CommandLogEntry {
    /// Its id.
    pub id: String,
    /// The device.
    pub phy_id: String,
    /// Topic level.
    pub name: String,
    /// Latest status logged.
    pub status: String,
    /// Whether that status is final.
    pub terminal: bool,
    /// Latest reason.
    pub reason: Option<String>,
    /// Created, RFC 3339.
    pub created_at: String,
    /// Last change, RFC 3339.
    pub updated_at: String,
}

/// A page of the command log.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CommandLogList {
    /// Newest first.
    pub commands: Vec<CommandLogEntry>,
    /// Pass as `cursor` for the next page; null after the last page.
    pub next_cursor: Option<String>,
}

/// `GET /api/devices/{phyID}/commands`: paging.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct CommandPageParams {
    /// Commands per page, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000, example = 100)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page; absent for the first page.
    pub cursor: Option<String>,
    /// Only commands created before this instant (ms since the Unix epoch
    /// or RFC 3339); not together with `cursor`.
    #[param(example = "2024-05-01T12:00:00Z")]
    pub before: Option<String>,
    /// `true`: each command with its `history` (every state change with
    /// its time, as in `GET /api/commands/{id}`); default `false`.
    #[param(example = true)]
    pub history: Option<bool>,
}

/// `GET /api/commands`: filters and paging.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct CommandLogParams {
    /// Only commands whose latest status is this (`queued`, `dispatched`,
    /// `sent`, `acked`, `timed_out`, `expired`, `failed`).
    #[param(example = "acked")]
    pub status: Option<String>,
    /// Only this device's commands.
    #[param(example = "dev-001")]
    pub phy_id: Option<String>,
    /// Commands per page, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000, example = 100)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page; absent for the first page.
    pub cursor: Option<String>,
    /// Only commands created before this instant (ms since the Unix epoch
    /// or RFC 3339); not together with `cursor`.
    #[param(example = "2024-05-01T12:00:00Z")]
    pub before: Option<String>,
}

fn bad_command(message: impl Into<String>) -> ApiError {
    ApiError::bad_request("invalid_command", message)
}

fn payload_fields(payload: &[u8]) -> (String, Option<String>, usize) {
    (
        STANDARD.encode(payload),
        std::str::from_utf8(payload).ok().map(str::to_owned),
        payload.len(),
    )
}

impl From<&Command> for CommandInfo {
    fn from(c: &Command) -> Self {
        let (payload_base64, payload_utf8, payload_size) = payload_fields(&c.payload);
        Self {
            id: c.id.to_string(),
            phy_id: c.phy_id.to_string(),
            name: c.name.clone(),
            status: c.status.as_str().to_owned(),
            terminal: c.status.is_terminal(),
            reason: c.reason.clone().filter(|r| !r.is_empty()),
            payload_base64,
            payload_utf8,
            payload_size,
            queue_if_offline: Some(c.queue_if_offline),
            server_id: c.server_id.clone(),
            epoch: c.epoch,
            hops: Some(c.hops),
            attempts: Some(c.attempts),
            created_at: rfc3339(c.created_at_ms).unwrap_or_default(),
            updated_at: rfc3339(c.updated_at_ms.max(c.created_at_ms)).unwrap_or_default(),
            expires_at: rfc3339(c.expires_at_ms),
            sent_at: rfc3339_opt(c.sent_at_ms),
            acked_at: rfc3339_opt(c.acked_at_ms),
            source: "redis".into(),
        }
    }
}

fn nonempty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

impl From<&Change> for CommandChange {
    fn from(c: &Change) -> Self {
        Self {
            seq: (c.seq > 0).then_some(c.seq),
            status: c.status.as_str().to_owned(),
            at: rfc3339(c.at_ms).unwrap_or_default(),
            reason: nonempty(&c.reason),
            detail: nonempty(&c.detail),
        }
    }
}

fn is_terminal(status: &str) -> bool {
    Status::parse(status).is_some_and(Status::is_terminal)
}

fn from_log(c: &LoggedCommand, changes: &[LoggedChange]) -> CommandDetail {
    let (payload_base64, payload_utf8, payload_size) = payload_fields(&c.payload);
    let first = |s: &str| {
        changes
            .iter()
            .find(|x| x.status == s)
            .map(|x| rfc3339_dt(&x.at))
    };
    CommandDetail {
        command: CommandInfo {
            id: c.id.to_string(),
            phy_id: c.phy_id.clone(),
            name: c.name.clone(),
            status: c.status.clone(),
            terminal: is_terminal(&c.status),
            reason: c.reason.clone(),
            payload_base64,
            payload_utf8,
            payload_size,
            queue_if_offline: None,
            server_id: None,
            epoch: None,
            hops: None,
            attempts: None,
            created_at: rfc3339_dt(&c.created_at),
            updated_at: rfc3339_dt(&c.updated_at),
            expires_at: c.expires_at.as_ref().map(rfc3339_dt),
            sent_at: first("sent"),
            acked_at: first("acked"),
            source: "command_log".into(),
        },
        history: changes
            .iter()
            .map(|x| CommandChange {
                seq: None,
                status: x.status.clone(),
                at: rfc3339_dt(&x.at),
                reason: x.reason.clone(),
                detail: x.detail.clone(),
            })
            .collect(),
    }
}

fn decode_payload(payload: String, encoding: PayloadEncoding) -> Result<Vec<u8>, ApiError> {
    match encoding {
        PayloadEncoding::Utf8 => Ok(payload.into_bytes()),
        PayloadEncoding::Base64 => {
            let t = payload.trim();
            STANDARD
                .decode(t)
                .or_else(|_| STANDARD_NO_PAD.decode(t))
                .map_err(|e| {
                    bad_command(format!(
                        "payload is not base64 ({e}); send standard base64, or set payload_encoding to utf8 for text"
                    ))
                })
        }
    }
}

/// Where a page starts, from `cursor` or `before` (ms; `scale` turns ms
/// into the source's unit).
fn start_of(
    cursor: Option<&str>,
    before: Option<&str>,
    tag: &str,
    scale: i64,
) -> Result<Start, ApiError> {
    match (cursor, before) {
        (Some(_), Some(_)) => Err(ApiError::bad_request(
            "invalid_query",
            "give either cursor or before, not both: a cursor already holds its position",
        )),
        (Some(c), None) => Ok(Start::after(TimeCursor::decode(c, tag)?)),
        (None, Some(b)) => Ok(Start::before(
            params::instant("before", b)?.saturating_mul(scale),
        )),
        (None, None) => Ok(Start::newest()),
    }
}

/// Sends a command to a device.
///
/// The command is created and routed at once: `dispatched` to the ingest
/// instance holding the device, `queued` when the device is offline and
/// `queue_if_offline` is true, else `failed` (reason `offline`, or
/// `queue_full`). All are 201: the command exists and its fate can be
/// followed at `GET /api/commands/{id}` (the `Location` header). With
/// `wait`, the answer comes when the command reaches a terminal state or
/// the wait ends, with the state then. Needs a write token (a read token is
/// 403).
#[utoipa::path(post, path = "/api/devices/{phyID}/commands", operation_id = "submit_command", tag = "commands",
    params(
        ("phyID" = String, Path, description = "The device: 1 to 64 characters of [A-Za-z0-9._-]",
         max_length = 64, pattern = "^[A-Za-z0-9._-]{1,64}$"),
    ),
    request_body = CommandRequest,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "The command, as it stands after routing (or after `wait`)",
         body = CommandInfo,
         headers(("Location" = String, description = "/api/commands/{id}"))),
        (status = 400, description = "Invalid phyID, body, name, payload, ttl or wait", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 403, description = "A read token: this route needs a write token", body = ErrorBody),
        (status = 413, description = "Payload larger than a downlink packet can carry", body = ErrorBody),
        (status = 415, description = "The body is not application/json", body = ErrorBody),
        (status = 503, description = "Redis unavailable", body = ErrorBody),
    ))]
pub async fn submit(
    State(state): State<AppState>,
    DevicePath(phy): DevicePath,
    StrictQuery(NoParams {}): StrictQuery<NoParams>,
    StrictJson(req): StrictJson<CommandRequest>,
) -> Result<Response, ApiError> {
    iot_downlink::command::validate_name(&req.name).map_err(bad_command)?;
    let payload = decode_payload(req.payload, req.payload_encoding)?;
    let room = downlink::max_payload(state.max_packet_size, &phy, &req.name);
    if payload.len() > room {
        return Err(ApiError::PayloadTooLarge(format!(
            "the command payload is {} bytes; a QoS 1 PUBLISH on {} carries at most {room} within mqtt.max_packet_size={}",
            payload.len(),
            downlink::topic(&phy, &req.name),
            state.max_packet_size
        )));
    }
    let ttl = req
        .ttl
        .as_deref()
        .map(|s| {
            params::duration_within(
                "ttl",
                s,
                Duration::from_millis(1),
                MAX_TTL,
                "invalid_command",
            )
        })
        .transpose()?;
    let wait = req
        .wait
        .as_deref()
        .map(|s| params::duration_within("wait", s, Duration::ZERO, MAX_WAIT, "invalid_command"))
        .transpose()?;
    let new = NewCommand {
        phy_id: phy.clone(),
        name: req.name,
        payload,
        ttl,
        queue_if_offline: req.queue_if_offline,
    };
    // The submission runs in a task of its own (see `route::submit`): when
    // Redis is too slow to answer in time it may still create the command,
    // so the client is told to look before it sends the command again.
    let cmd = state
        .redis(async { Ok(route::submit(&state.commands, new).await?) })
        .await
        .map_err(|e| match e {
            ApiError::RedisUnavailable(why) => ApiError::RedisUnavailable(format!(
                "{why}; the command may have been created all the same: look at GET /api/devices/{phy}/commands before sending it again"
            )),
            other => other,
        })?;
    tracing::info!(
        id = %cmd.id,
        phy_id = %phy,
        name = %cmd.name,
        status = %cmd.status,
        reason = cmd.reason.as_deref().unwrap_or_default(),
        "command submitted"
    );
    let cmd = match wait {
        Some(w) if !w.is_zero() => downlink::wait_for_fate(&state, cmd, w).await,
        _ => cmd,
    };
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/api/commands/{}", cmd.id))],
        Json(CommandInfo::from(&cmd)),
    )
        .into_response())
}

/// A command's state and every change of it with its time.
///
/// Read from Redis while the record lives there (`downlink.retention` past
/// its ttl); after that from the PostgreSQL command log when one is
/// configured (`source: command_log`; instance, epoch, hops and attempts
/// are not logged and are null).
#[utoipa::path(get, path = "/api/commands/{id}", operation_id = "get_command", tag = "commands",
    params(("id" = String, Path, description = "The command id (a UUID)", format = Uuid)),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The command and its history", body = CommandDetail),
        (status = 400, description = "The id is not a UUID, or a parameter was given", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 404, description = "No such command in Redis or the command log", body = ErrorBody),
        (status = 503, description = "Redis unavailable, or PostgreSQL unavailable while the record is only in the log", body = ErrorBody),
    ))]
pub async fn command(
    State(state): State<AppState>,
    CommandIdPath(id): CommandIdPath,
    StrictQuery(NoParams {}): StrictQuery<NoParams>,
) -> Result<Json<CommandDetail>, ApiError> {
    let live = state
        .redis(async { Ok(state.commands.get_with_history(&id).await?) })
        .await?;
    if let Some((cmd, changes)) = live {
        return Ok(Json(CommandDetail {
            command: CommandInfo::from(&cmd),
            history: changes.iter().map(CommandChange::from).collect(),
        }));
    }
    let not_found = |where_: &str| ApiError::NotFound {
        code: "command_not_found",
        message: format!("no command {id} {where_}"),
    };
    let Some(store) = state.db.as_ref() else {
        return Err(not_found(
            "in Redis (records stay downlink.retention after their ttl), and no PostgreSQL command log is configured",
        ));
    };
    let logged = state
        .db(async { Ok(command_log::get(store, id).await?) })
        .await?;
    match logged {
        Some((cmd, changes)) => Ok(Json(from_log(&cmd, &changes))),
        None => Err(not_found("in Redis or the command log")),
    }
}

/// A device's commands, newest first, from Redis (those whose record has
/// not expired; older ones are in `GET /api/commands?phy_id=`). With
/// `history=true` each carries every state change with its time.
#[utoipa::path(get, path = "/api/devices/{phyID}/commands", operation_id = "list_device_commands", tag = "commands",
    params(
        ("phyID" = String, Path, description = "The device: 1 to 64 characters of [A-Za-z0-9._-]",
         max_length = 64, pattern = "^[A-Za-z0-9._-]{1,64}$"),
        CommandPageParams,
    ),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A page of the device's commands (empty for a device without any)", body = CommandList),
        (status = 400, description = "Invalid phyID, limit, cursor or parameter", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 503, description = "Redis unavailable", body = ErrorBody),
    ))]
pub async fn device_commands(
    State(state): State<AppState>,
    DevicePath(phy): DevicePath,
    StrictQuery(q): StrictQuery<CommandPageParams>,
) -> Result<Json<CommandList>, ApiError> {
    let limit = params::limit(q.limit)?;
    let start = start_of(q.cursor.as_deref(), q.before.as_deref(), DEVICE_CURSOR, 1)?;
    let (index, next) = paging::page(
        start,
        limit,
        |r: &(i64, Uuid)| *r,
        |at, n| state.redis(downlink::device_index(&state, &phy, at, n)),
    )
    .await?;
    let ids: Vec<Uuid> = index.iter().map(|(_, id)| *id).collect();
    let commands: Vec<DeviceCommand> = if q.history == Some(true) {
        state
            .redis(async { Ok(state.commands.get_many_with_history(&ids).await?) })
            .await?
            .iter()
            .map(|(c, log)| DeviceCommand {
                command: CommandInfo::from(c),
                history: Some(log.iter().map(CommandChange::from).collect()),
            })
            .collect()
    } else {
        state
            .redis(async { Ok(state.commands.get_many(&ids).await?) })
            .await?
            .iter()
            .map(|c| DeviceCommand {
                command: CommandInfo::from(c),
                history: None,
            })
            .collect()
    };
    Ok(Json(CommandList {
        phy_id: phy.to_string(),
        commands,
        next_cursor: next.map(|c| c.encode(DEVICE_CURSOR)),
    }))
}

/// The PostgreSQL command log: every command, newest first, by latest
/// status and/or device. Needs `database.url` (else 503
/// `database_not_configured`); it trails Redis by the archiver's batch
/// interval.
#[utoipa::path(get, path = "/api/commands", operation_id = "list_command_log", tag = "commands",
    params(CommandLogParams),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A page of the command log", body = CommandLogList),
        (status = 400, description = "Invalid status, phy_id, limit, cursor or parameter", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 503, description = "PostgreSQL unavailable or not configured", body = ErrorBody),
    ))]
pub async fn log(
    State(state): State<AppState>,
    StrictQuery(q): StrictQuery<CommandLogParams>,
) -> Result<Json<CommandLogList>, ApiError> {
    let limit = params::limit(q.limit)?;
    let status = match q.status.as_deref() {
        None => None,
        Some(s) => Some(Status::parse(s).ok_or_else(|| {
            let all: BTreeSet<&str> = Status::ALL.iter().map(|s| s.as_str()).collect();
            ApiError::bad_request(
                "invalid_query",
                format!(
                    "status={s:.40} is not a command status; give one of {}",
                    all.into_iter().collect::<Vec<_>>().join(", ")
                ),
            )
        })?),
    };
    let phy = q
        .phy_id
        .as_deref()
        .map(|p| PhyId::new(p).map_err(|e| ApiError::bad_request("invalid_phy_id", e.to_string())))
        .transpose()?;
    let start = start_of(q.cursor.as_deref(), q.before.as_deref(), LOG_CURSOR, 1000)?;
    let store = state.store()?;
    let (rows, next) = paging::page(
        start,
        limit,
        |r: &iot_store::commands::CommandRecord| (r.created_at.timestamp_micros(), r.id),
        |at_most, n| {
            let before = if at_most == i64::MAX {
                None
            } else {
                Utc.timestamp_micros(at_most.saturating_add(1)).single()
            };
            let phy = phy.as_ref().map(PhyId::as_str);
            let status = status.map(Status::as_str);
            state.db(async move {
                Ok(store
                    .commands(phy, status, before, i64::try_from(n).unwrap_or(i64::MAX))
                    .await?)
            })
        },
    )
    .await?;
    Ok(Json(CommandLogList {
        commands: rows
            .iter()
            .map(|r| CommandLogEntry {
                id: r.id.to_string(),
                phy_id: r.phy_id.clone(),
                name: r.name.clone(),
                status: r.status.clone(),
                terminal: is_terminal(&r.status),
                reason: r.reason.clone(),
                created_at: rfc3339_dt(&r.created_at),
                updated_at: rfc3339_dt(&r.updated_at),
            })
            .collect(),
        next_cursor: next.map(|c| c.encode(LOG_CURSOR)),
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn payloads_decode_by_encoding() {
        assert_eq!(
            decode_payload("hé".into(), PayloadEncoding::Utf8).unwrap(),
            "hé".as_bytes()
        );
        assert_eq!(
            decode_payload("AP8=".into(), PayloadEncoding::Base64).unwrap(),
            [0, 255]
        );
        assert_eq!(
            decode_payload("AP8".into(), PayloadEncoding::Base64).unwrap(),
            [0, 255]
        );
        let e = decode_payload("!!".into(), PayloadEncoding::Base64).unwrap_err();
        assert_eq!(e.code(), "invalid_command");
    }

    #[test]
    fn cursor_and_before_exclude_each_other() {
        let c = TimeCursor {
            at: 1,
            id: Uuid::nil(),
        }
        .encode(DEVICE_CURSOR);
        assert!(start_of(Some(&c), Some("5"), DEVICE_CURSOR, 1).is_err());
        assert_eq!(
            start_of(None, Some("5"), LOG_CURSOR, 1000).unwrap(),
            Start::before(5000)
        );
        assert_eq!(
            start_of(None, None, DEVICE_CURSOR, 1).unwrap(),
            Start::newest()
        );
        assert_eq!(
            start_of(Some(&c), None, LOG_CURSOR, 1000)
                .unwrap_err()
                .code(),
            "invalid_cursor"
        );
    }
}
