//! `GET /api/stats`: device counts, entry and event rates and lag.

use axum::Json;
use axum::extract::State;
use iot_core::time::now_ms;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{ApiError, ErrorBody};
use crate::extract::{NoParams, StrictQuery};
use crate::model::LagInfo;
use crate::state::AppState;
use crate::timestamp::rfc3339;
use crate::{instances, presence};

/// Stream entry rates over the projectors' last interval. One entry holds
/// one event, or a batch of up to 500 heartbeats: see `events_per_second`
/// for events.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EntryRates {
    /// Stream entries appended per second.
    pub added: f64,
    /// Stream entries acknowledged by the projectors per second.
    pub applied: f64,
}

/// Event rates over the projectors' last interval (each heartbeat of a
/// batch counts). Only the projectors count events, so there is no rate of
/// events appended: `entries_per_second.added` counts entries.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EventRates {
    /// Events applied by the projectors per second (all projectors; trails
    /// by up to one `projector.lag_interval`).
    pub applied: f64,
}

/// Instance counts.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ServerCounts {
    /// Instances in the registry or the beats.
    pub total: usize,
    /// Of which alive.
    pub alive: usize,
}

/// Downlink commands not yet in a terminal state.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OpenCommands {
    /// Waiting in the offline queues of devices (all queues together).
    pub queued: u64,
    /// Published to the owning instance, not yet sent.
    pub dispatched: u64,
    /// Sent to the device, waiting for its PUBACK.
    pub sent: u64,
}

/// Counts over the whole deployment.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Stats {
    /// Devices online (the online index).
    pub online: u64,
    /// Device connections tracked in Redis (connection sets of all instances).
    pub connected: u64,
    /// Devices with a session view (the known index).
    pub known: u64,
    /// Stream entry rates.
    pub entries_per_second: EntryRates,
    /// Event rates.
    pub events_per_second: EventRates,
    /// How far the projection lags behind the events.
    pub lag: LagInfo,
    /// Ingest instances.
    pub servers: ServerCounts,
    /// Downlink commands in flight or queued.
    pub commands: OpenCommands,
    /// When this was read, RFC 3339.
    pub as_of: String,
}

/// Online, connected and known device counts, stream entries and events per
/// second and the projection lag.
#[utoipa::path(get, path = "/api/stats", tag = "servers",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The counts", body = Stats),
        (status = 400, description = "Unknown parameter", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 503, description = "Redis unavailable", body = ErrorBody),
    ))]
pub async fn stats(
    State(state): State<AppState>,
    StrictQuery(NoParams {}): StrictQuery<NoParams>,
) -> Result<Json<Stats>, ApiError> {
    let as_of = now_ms();
    let ((online, known), lag, servers, open) = state
        .redis(async {
            tokio::try_join!(
                presence::counts(&state),
                presence::lag(&state),
                instances::list(&state),
                async { Ok::<_, ApiError>(state.commands.open_counts().await?) }
            )
        })
        .await?;
    Ok(Json(Stats {
        online,
        connected: servers.iter().map(|s| s.live_connections).sum(),
        known,
        entries_per_second: EntryRates {
            added: lag.added_per_sec,
            applied: lag.applied_per_sec,
        },
        events_per_second: EventRates {
            applied: lag.events_applied_per_sec,
        },
        lag: state.lag_info(&lag),
        servers: ServerCounts {
            total: servers.len(),
            alive: servers.iter().filter(|s| s.alive).count(),
        },
        commands: OpenCommands {
            queued: open.queued,
            dispatched: open.dispatched,
            sent: open.sent,
        },
        as_of: rfc3339(as_of).unwrap_or_default(),
    }))
}
