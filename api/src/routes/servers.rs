//! `GET /api/servers`: the ingest instances.

use axum::Json;
use axum::extract::State;
use iot_core::time::now_ms;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{ApiError, ErrorBody};
use crate::extract::{NoParams, StrictQuery};
use crate::instances;
use crate::state::AppState;
use crate::timestamp::{rfc3339, rfc3339_opt};

/// One ingest instance.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ServerInfo {
    /// Its id.
    pub server_id: String,
    /// Its liveness key exists (it beat within `session.liveness_ttl`).
    pub alive: bool,
    /// `running`, `degraded` (Redis writes failing) or `draining`, as of its
    /// last beat; null without a registry entry.
    pub status: Option<String>,
    /// Its last liveness beat, RFC 3339.
    pub last_beat: Option<String>,
    /// Device connections it reported at its last beat.
    pub connections: Option<u64>,
    /// Members of its connection set in Redis (`session:server:{id}:conns`).
    pub tracked_connections: u64,
    /// Host it runs on.
    pub hostname: Option<String>,
    /// Process id.
    pub pid: Option<u32>,
    /// MQTT listen address.
    pub mqtt_listen: Option<String>,
    /// HTTP listen address.
    pub http_listen: Option<String>,
    /// Its version.
    pub version: Option<String>,
    /// When it started, RFC 3339.
    pub started_at: Option<String>,
}

/// The ingest instances.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ServerList {
    /// Instances listed.
    pub count: usize,
    /// Of which alive.
    pub alive: usize,
    /// When this was read, RFC 3339.
    pub as_of: String,
    /// Every instance in the registry or the beats, by id.
    pub servers: Vec<ServerInfo>,
}

/// Every ingest instance known to Redis, alive or not, with its connection
/// count and last beat.
#[utoipa::path(get, path = "/api/servers", tag = "servers",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The instances", body = ServerList),
        (status = 400, description = "Unknown parameter", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 503, description = "Redis unavailable", body = ErrorBody),
    ))]
pub async fn servers(
    State(state): State<AppState>,
    StrictQuery(NoParams {}): StrictQuery<NoParams>,
) -> Result<Json<ServerList>, ApiError> {
    let as_of = now_ms();
    let list = state.redis(instances::list(&state)).await?;
    let servers: Vec<ServerInfo> = list
        .into_iter()
        .map(|i| {
            let info = i.info;
            ServerInfo {
                server_id: i.server_id.to_string(),
                alive: i.alive,
                status: info.as_ref().map(|x| x.status.clone()),
                last_beat: rfc3339_opt(i.last_beat_ms),
                connections: info.as_ref().map(|x| x.connections),
                tracked_connections: i.live_connections,
                hostname: info.as_ref().map(|x| x.hostname.clone()),
                pid: info.as_ref().map(|x| x.pid),
                mqtt_listen: info.as_ref().map(|x| x.mqtt_listen.clone()),
                http_listen: info.as_ref().map(|x| x.http_listen.clone()),
                version: info.as_ref().map(|x| x.version.clone()),
                started_at: rfc3339_opt(info.as_ref().map(|x| x.started_at_ms)),
            }
        })
        .collect();
    Ok(Json(ServerList {
        count: servers.len(),
        alive: servers.iter().filter(|s| s.alive).count(),
        as_of: rfc3339(as_of).unwrap_or_default(),
        servers,
    }))
}
