//! The HTTP side every service has: `/health`, `/health/live`,
//! `/health/ready` and `/metrics`, served with graceful shutdown.
//!
//! `/health` and `/health/ready` answer 200 when every check is ok and 503
//! otherwise (with the report as JSON either way); `/health/live` answers 200
//! while the process runs, so point liveness probes there: an ingest that
//! buffers through a Redis outage must not be restarted.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::health::{Health, Report, Status};

/// Who is answering.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceInfo {
    /// `ingest`, `projector` or `api`.
    pub service: &'static str,
    /// This instance's id.
    pub server_id: String,
    /// Crate version.
    pub version: &'static str,
}

#[derive(Clone)]
struct BaseState {
    health: Health,
    metrics: PrometheusHandle,
    info: Arc<ServiceInfo>,
}

#[derive(Serialize)]
struct HealthBody<'a> {
    #[serde(flatten)]
    info: &'a ServiceInfo,
    #[serde(flatten)]
    report: Report,
}

/// The health and metrics routes, to merge into a service's router.
pub fn base_router(health: Health, metrics: PrometheusHandle, info: ServiceInfo) -> Router {
    metrics::gauge!("iot_build_info", "service" => info.service, "version" => info.version)
        .set(1.0);
    let state = BaseState {
        health,
        metrics,
        info: Arc::new(info),
    };
    Router::new()
        .route("/health", get(health_handler))
        .route("/health/ready", get(health_handler))
        .route("/health/live", get(live_handler))
        .route("/metrics", get(metrics_handler))
        .with_state(state)
}

async fn health_handler(State(s): State<BaseState>) -> Response {
    let report = s.health.report();
    let code = if report.status == Status::Ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        axum::Json(HealthBody {
            info: &s.info,
            report,
        }),
    )
        .into_response()
}

async fn live_handler(State(s): State<BaseState>) -> Response {
    (
        StatusCode::OK,
        axum::Json(serde_json::json!({"status": "alive", "service": s.info.service, "server_id": s.info.server_id})),
    )
        .into_response()
}

async fn metrics_handler(State(s): State<BaseState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::render(&s.metrics),
    )
        .into_response()
}

/// Serves `router` on `listener` until `shutdown` is cancelled, then lets
/// requests in flight finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
