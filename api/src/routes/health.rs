//! `/health*` and `/metrics`: open while `api.open_health` is true.
//!
//! `/health` and `/health/ready` answer from the health checks (the Redis
//! probe refreshes its check every second), so a load balancer's probes cost
//! no Redis call; `/health/redis` (the seed's endpoint) makes a real PING on
//! every call and answers within [`PING_TIMEOUT`](crate::state::PING_TIMEOUT)
//! even while Redis is away.

use std::collections::BTreeMap;
use std::time::Instant;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use iot_service::Status;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::state::{AppState, PING_TIMEOUT};

/// One health check.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HealthCheck {
    /// `ok`, `degraded` or `down`.
    #[schema(example = "ok")]
    pub status: String,
    /// Why, when not ok.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Round trip of the last probe, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
    /// When the check was last set, ms since the Unix epoch.
    pub updated_at_ms: i64,
}

/// The service's health: who answers, the overall status and each check.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HealthReport {
    /// `api`.
    pub service: String,
    /// This instance's id.
    pub server_id: String,
    /// Crate version.
    pub version: String,
    /// The worst status of all checks: `ok`, `degraded` or `down`.
    #[schema(example = "ok")]
    pub status: String,
    /// Each check by name (`redis`).
    pub checks: BTreeMap<String, HealthCheck>,
}

/// `GET /health/live`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Liveness {
    /// Always `alive`.
    #[schema(example = "alive")]
    pub status: String,
    /// `api`.
    pub service: String,
    /// This instance's id.
    pub server_id: String,
}

/// `GET /health/redis`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RedisHealth {
    /// `ok` or `down`.
    #[schema(example = "ok")]
    pub status: String,
    /// PING round trip, ms (when ok).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
    /// What failed (when down).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn status_name(s: Status) -> String {
    match s {
        Status::Ok => "ok",
        Status::Degraded => "degraded",
        Status::Down => "down",
    }
    .to_owned()
}

fn report(state: &AppState) -> Response {
    let r = state.health.report();
    let code = if r.status == Status::Ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = HealthReport {
        service: state.info.service.to_owned(),
        server_id: state.info.server_id.clone(),
        version: state.info.version.to_owned(),
        status: status_name(r.status),
        checks: r
            .checks
            .into_iter()
            .map(|(k, c)| {
                (
                    k,
                    HealthCheck {
                        status: status_name(c.status),
                        detail: c.detail,
                        latency_ms: c.latency_ms,
                        updated_at_ms: c.updated_at_ms,
                    },
                )
            })
            .collect(),
    };
    (code, Json(body)).into_response()
}

/// Overall health: 200 when every check is ok, 503 otherwise.
#[utoipa::path(get, path = "/health", tag = "health",
    responses(
        (status = 200, description = "Every check is ok", body = HealthReport),
        (status = 503, description = "A check is degraded or down", body = HealthReport),
    ))]
pub async fn health(State(state): State<AppState>) -> Response {
    report(&state)
}

/// Readiness for orchestrators and load balancers: ready when Redis answers
/// (the Redis check, refreshed every second). A degraded `database` check
/// is reported in the body but does not make the api unready: presence and
/// commands need Redis only. 200 or 503.
#[utoipa::path(get, path = "/health/ready", tag = "health",
    responses(
        (status = 200, description = "Ready: Redis answers", body = HealthReport),
        (status = 503, description = "Not ready", body = HealthReport),
    ))]
pub async fn ready(State(state): State<AppState>) -> Response {
    let mut response = report(&state);
    *response.status_mut() = if state.health.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    response
}

/// Liveness: 200 while the process serves HTTP.
#[utoipa::path(get, path = "/health/live", tag = "health",
    responses((status = 200, description = "The process is alive", body = Liveness)))]
pub async fn live(State(state): State<AppState>) -> Json<Liveness> {
    Json(Liveness {
        status: "alive".into(),
        service: state.info.service.to_owned(),
        server_id: state.info.server_id.clone(),
    })
}

/// The seed's Redis check: a real PING on every call, with a short timeout.
/// 200 with the round trip, or 503 with the error. Follows Redis outages
/// without a restart.
#[utoipa::path(get, path = "/health/redis", tag = "health",
    responses(
        (status = 200, description = "Redis answered PING", body = RedisHealth,
         example = json!({"status": "ok", "latency_ms": 0.21})),
        (status = 503, description = "Redis did not answer", body = RedisHealth,
         example = json!({"status": "down", "error": "no PONG within 1s"})),
    ))]
pub async fn redis(State(state): State<AppState>) -> Response {
    let start = Instant::now();
    let result = match tokio::time::timeout(PING_TIMEOUT, state.redis.ping()).await {
        Ok(Ok(_)) => Ok(start.elapsed()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no PONG within {PING_TIMEOUT:?}")),
    };
    match result {
        Ok(rtt) => {
            state.health.set("redis", Status::Ok, None, Some(rtt));
            let body = RedisHealth {
                status: "ok".into(),
                latency_ms: Some(rtt.as_secs_f64() * 1000.0),
                error: None,
            };
            (StatusCode::OK, Json(body)).into_response()
        }
        Err(e) => {
            crate::metrics::error("redis_unavailable");
            tracing::warn!(error = %e, "GET /health/redis: Redis does not answer");
            state
                .health
                .set("redis", Status::Degraded, Some(e.clone()), None);
            let body = RedisHealth {
                status: "down".into(),
                latency_ms: None,
                error: Some(e),
            };
            (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
        }
    }
}

/// Prometheus metrics, text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "health",
    responses((status = 200, description = "Prometheus text format", body = String,
               content_type = "text/plain")))]
pub async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        iot_service::metrics::render(&state.metrics),
    )
        .into_response()
}
