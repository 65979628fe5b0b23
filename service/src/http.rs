//! The HTTP side every service has: `/health`, `/health/live`,
//! `/health/ready` and `/metrics`, served with graceful shutdown.
//!
//! `/health` answers 200 when every check is ok and 503 otherwise, with the
//! report as JSON either way (every check, degraded ones included).
//! `/health/ready` answers from the same report, but only the checks the
//! service cannot serve without decide it (Redis; the ingest's event
//! writer): a degraded PostgreSQL check ([`Health::mark_optional`]) keeps it
//! 200, so a database outage does not pull every instance out of a load
//! balancer while devices and presence still work. `/health/live` answers
//! 200 while the process runs, so point liveness probes there: an ingest
//! that buffers through a Redis outage must not be restarted.

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
        .route("/health/ready", get(ready_handler))
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

async fn ready_handler(State(s): State<BaseState>) -> Response {
    let report = s.health.report();
    let code = if s.health.is_ready() {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    async fn status_of(addr: &str, path: &str) -> u16 {
        reqwest::get(format!("http://{addr}{path}"))
            .await
            .expect("GET")
            .status()
            .as_u16()
    }

    #[tokio::test]
    async fn readiness_ignores_optional_checks_and_health_reports_them() {
        let health = Health::default();
        health.set("redis", Status::Ok, None, None);
        health.set("database", Status::Degraded, Some("away".into()), None);
        health.mark_optional("database");
        let info = ServiceInfo {
            service: "api",
            server_id: "t".into(),
            version: "0",
        };
        let router = base_router(health.clone(), crate::metrics::handle(), info);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let token = CancellationToken::new();
        let server = tokio::spawn(serve(listener, router, token.clone()));

        assert_eq!(status_of(&addr, "/health").await, 503);
        assert_eq!(status_of(&addr, "/health/ready").await, 200);
        let body: serde_json::Value = reqwest::get(format!("http://{addr}/health/ready"))
            .await
            .expect("GET")
            .json()
            .await
            .expect("JSON");
        assert_eq!(body["checks"]["database"]["status"], "degraded");
        assert_eq!(body["status"], "degraded");

        health.set("redis", Status::Degraded, Some("gone".into()), None);
        assert_eq!(status_of(&addr, "/health/ready").await, 503);
        health.set("redis", Status::Ok, None, None);
        health.set("database", Status::Ok, None, None);
        assert_eq!(status_of(&addr, "/health").await, 200);
        assert_eq!(status_of(&addr, "/health/live").await, 200);
        token.cancel();
        server.await.expect("task").expect("serve");
    }
}
