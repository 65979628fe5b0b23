//! `/api/devices/...`: who is online, and why (presence, from Redis).

use axum::Json;
use axum::extract::State;
use iot_core::time::now_ms;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::cursor::Cursor;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{DevicePath, StrictQuery};
use crate::model::{Explanation, LagInfo, PolicyInfo};
use crate::params::{NowParams, PageParams, PolicyParams, now_or};
use crate::presence;
use crate::routes::registry::{self, RegistryInfo};
use crate::state::AppState;
use crate::timestamp::{rfc3339, rfc3339_opt};

/// One online device.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OnlineDevice {
    /// The device.
    #[schema(example = "dev-001")]
    pub phy_id: String,
    /// Instance holding its connection.
    pub server_id: Option<String>,
    /// Its connection id.
    pub conn_id: Option<String>,
    /// Online since, RFC 3339.
    pub since: Option<String>,
    /// Newest sign of life, RFC 3339.
    pub last_seen: Option<String>,
    /// Reason of the projected state (`heartbeat_fresh`).
    pub reason: Option<String>,
}

/// A page of the online devices.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OnlineList {
    /// Online devices in all (not just this page), from the online index.
    pub count: u64,
    /// When this was read, RFC 3339.
    pub as_of: String,
    /// The page, ordered by shard, then phyID.
    pub devices: Vec<OnlineDevice>,
    /// Pass as `cursor` for the next page; null after the last page.
    pub next_cursor: Option<String>,
}

/// A device's session and its online state, explained.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeviceInfo {
    /// The device.
    #[schema(example = "dev-001")]
    pub phy_id: String,
    /// Connection of the newest epoch.
    pub conn_id: Option<String>,
    /// Instance holding that connection.
    pub server_id: Option<String>,
    /// The newest connection's epoch (grows with every CONNECT).
    pub epoch: u64,
    /// Whether that connection is up, as far as the events tell.
    pub connected: bool,
    /// When that connection was accepted, RFC 3339.
    pub connected_at: Option<String>,
    /// How that connection ended (a TCP drop reason or `disconnected`);
    /// null while it is up.
    pub ended: Option<String>,
    /// When it ended, RFC 3339.
    pub ended_at: Option<String>,
    /// Newest sign of life, RFC 3339.
    pub last_seen: Option<String>,
    /// Newest penalising TCP drop, RFC 3339.
    pub last_tcp_down: Option<String>,
    /// Its reason (`closed`, `reset`, `keepalive`, `server_shutdown`, `server_lost`).
    pub last_tcp_down_reason: Option<String>,
    /// Newest downlink ACK timeout, RFC 3339.
    pub last_ack_timeout: Option<String>,
    /// The configured policy evaluated at `as_of`.
    #[serde(flatten)]
    pub state: Explanation,
    /// The state the projector last wrote to the online index (may trail
    /// `online` by up to a second, plus the lag).
    pub projected_online: Option<bool>,
    /// The projector's reason for it.
    pub projected_reason: Option<String>,
    /// When the projected state last changed, RFC 3339.
    pub since: Option<String>,
    /// Revision of the projected state (+1 per change).
    pub rev: Option<u64>,
    /// The instant evaluated, RFC 3339.
    pub as_of: String,
    /// How far the projection lags behind the events.
    pub lag: LagInfo,
    /// The device's registry entry, when PostgreSQL is configured, answers
    /// within a moment and the device is registered; absent otherwise (the
    /// presence answer never waits for PostgreSQL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<RegistryInfo>,
}

/// The online answer for one device with a given policy.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OnlineAnswer {
    /// The device.
    #[schema(example = "dev-001")]
    pub phy_id: String,
    /// The answer, its score, terms and reason.
    #[serde(flatten)]
    pub state: Explanation,
    /// The instant evaluated, RFC 3339.
    pub as_of: String,
    /// The policy used: the query's fields over the configured ones.
    pub policy: PolicyInfo,
    /// Input: newest sign of life, RFC 3339.
    pub last_seen: Option<String>,
    /// Input: newest penalising TCP drop, RFC 3339.
    pub last_tcp_down: Option<String>,
    /// Input: newest ACK timeout, RFC 3339.
    pub last_ack_timeout: Option<String>,
    /// Input: the connection ended with a clean DISCONNECT.
    pub disconnected: bool,
    /// The projector's state (computed with the configured policy).
    pub projected_online: Option<bool>,
    /// How far the projection lags behind the events.
    pub lag: LagInfo,
}

fn not_found(phy: &iot_core::PhyId) -> ApiError {
    ApiError::NotFound {
        code: "device_not_found",
        message: format!(
            "no session for device {phy}: it never connected, or its session expired (2 x session.heartbeat_timeout after its last event)"
        ),
    }
}

/// The online devices, a page at a time, with their count.
///
/// The count is the sum of the online index's shards (O(shards), whatever the
/// number of devices); the list pages through the index with an opaque cursor.
#[utoipa::path(get, path = "/api/devices/online", tag = "devices",
    params(PageParams),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A page of online devices", body = OnlineList),
        (status = 400, description = "Bad limit, cursor or parameter", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 503, description = "Redis unavailable", body = ErrorBody),
    ))]
pub async fn online_list(
    State(state): State<AppState>,
    StrictQuery(q): StrictQuery<PageParams>,
) -> Result<Json<OnlineList>, ApiError> {
    let limit = q.limit()?;
    let cursor = match q.cursor.as_deref() {
        None => Cursor::start(),
        Some(c) => Cursor::decode(c, state.shards)?,
    };
    let as_of = now_ms();
    let page = state
        .redis(presence::online_page(&state, cursor, limit))
        .await?;
    Ok(Json(OnlineList {
        count: page.count,
        as_of: rfc3339(as_of).unwrap_or_default(),
        devices: page
            .devices
            .into_iter()
            .map(|d| OnlineDevice {
                phy_id: d.phy_id.to_string(),
                server_id: d.server_id,
                conn_id: d.conn_id,
                since: rfc3339_opt(d.since),
                last_seen: rfc3339_opt(d.last_seen),
                reason: d.reason,
            })
            .collect(),
        next_cursor: page.next.map(|c| c.encode()),
    }))
}

/// A device's session (the seed's fields), its online state under the
/// configured policy at `now` with score, terms and reason, the projector's
/// state, the projection lag and, with PostgreSQL, its registry entry.
///
/// A registered device that has no session view (it never connected, or
/// its view expired) is answered as never seen (200, `reason:
/// never_seen`) with its registry entry; a device that is neither is 404.
#[utoipa::path(get, path = "/api/devices/{phyID}", tag = "devices",
    params(
        ("phyID" = String, Path, description = "The device: 1 to 64 characters of [A-Za-z0-9._-]",
         max_length = 64, pattern = "^[A-Za-z0-9._-]{1,64}$"),
        NowParams,
    ),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The device", body = DeviceInfo),
        (status = 400, description = "Invalid phyID or parameter", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 404, description = "No session for this device, and it is not registered", body = ErrorBody),
        (status = 503, description = "Redis unavailable", body = ErrorBody),
    ))]
pub async fn device(
    State(state): State<AppState>,
    DevicePath(phy): DevicePath,
    StrictQuery(q): StrictQuery<NowParams>,
) -> Result<Json<DeviceInfo>, ApiError> {
    let now = now_or(q.now.as_deref(), now_ms())?;
    let (read, registry) = tokio::join!(
        state.redis(presence::device(&state, &phy)),
        registry::presence_lookup(&state, &phy)
    );
    let (dev, lag) = read?;
    let dev = match (dev, &registry) {
        (Some(d), _) => d,
        (None, Some(_)) => presence::Device {
            view: iot_core::SessionView::default(),
            projected: presence::Projected::default(),
        },
        (None, None) => return Err(not_found(&phy)),
    };
    let v = &dev.view;
    let eval = state.policy.evaluate(&v.policy_input(), now);
    Ok(Json(DeviceInfo {
        phy_id: phy.to_string(),
        conn_id: v.conn_id.map(|c| c.to_string()),
        server_id: v.server_id.as_ref().map(ToString::to_string),
        epoch: v.epoch,
        connected: v.connected(),
        connected_at: rfc3339_opt(v.connected_at),
        ended: v.ended.map(|(_, how)| how.as_str().to_owned()),
        ended_at: rfc3339_opt(v.ended.map(|(t, _)| t)),
        last_seen: rfc3339_opt(v.last_seen),
        last_tcp_down: rfc3339_opt(v.last_tcp_down.map(|(t, _)| t)),
        last_tcp_down_reason: v.last_tcp_down.map(|(_, r)| r.as_str().to_owned()),
        last_ack_timeout: rfc3339_opt(v.last_ack_timeout),
        state: Explanation::from(&eval),
        projected_online: dev.projected.online,
        projected_reason: dev.projected.reason,
        since: rfc3339_opt(dev.projected.since),
        rev: dev.projected.rev,
        as_of: rfc3339(now).unwrap_or_default(),
        lag: state.lag_info(&lag),
        registry,
    }))
}

/// The seed's IsOnlineWeighted with the caller's policy: any policy field
/// may be given as a query parameter (the rest come from the config), and
/// the answer is exact for `now` (default: the current time). A registered
/// device without a session view is offline (`never_seen`); a device that
/// is neither is 404.
#[utoipa::path(get, path = "/api/devices/{phyID}/online", tag = "devices",
    params(
        ("phyID" = String, Path, description = "The device: 1 to 64 characters of [A-Za-z0-9._-]",
         max_length = 64, pattern = "^[A-Za-z0-9._-]{1,64}$"),
        PolicyParams,
    ),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The answer, explained", body = OnlineAnswer),
        (status = 400, description = "Invalid phyID or policy parameter", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 404, description = "No session for this device, and it is not registered", body = ErrorBody),
        (status = 503, description = "Redis unavailable", body = ErrorBody),
    ))]
pub async fn device_online(
    State(state): State<AppState>,
    DevicePath(phy): DevicePath,
    StrictQuery(q): StrictQuery<PolicyParams>,
) -> Result<Json<OnlineAnswer>, ApiError> {
    let policy = q.policy(&state.policy)?;
    let now = now_or(q.now.as_deref(), now_ms())?;
    let (dev, lag) = state.redis(presence::device(&state, &phy)).await?;
    let dev = match dev {
        Some(d) => d,
        // Registered but never seen (or its view expired): offline, as for
        // `GET /api/devices/{phyID}`.
        None if registry::presence_lookup(&state, &phy).await.is_some() => presence::Device {
            view: iot_core::SessionView::default(),
            projected: presence::Projected::default(),
        },
        None => return Err(not_found(&phy)),
    };
    let input = dev.view.policy_input();
    let eval = policy.evaluate(&input, now);
    Ok(Json(OnlineAnswer {
        phy_id: phy.to_string(),
        state: Explanation::from(&eval),
        as_of: rfc3339(now).unwrap_or_default(),
        policy: PolicyInfo::from(&policy),
        last_seen: rfc3339_opt(input.last_seen),
        last_tcp_down: rfc3339_opt(input.last_tcp_down),
        last_ack_timeout: rfc3339_opt(input.last_ack_timeout),
        disconnected: input.disconnected,
        projected_online: dev.projected.online,
        lag: state.lag_info(&lag),
    }))
}
