//! REST API: presence queries that explain themselves, downlink commands,
//! the device registry and history, health and metrics.
//!
//! Any api instance answers for every device, whichever ingest holds it: it
//! reads the session views, the online index and the registry that the
//! projectors and ingests keep in Redis (see `DESIGN.md`), and computes a
//! device's online state with the weighted policy for the instant asked. It
//! sends downlink commands through `iot-downlink` (Redis Pub/Sub to the
//! owning ingest), and serves the device registry, the event archive and
//! the command log from PostgreSQL when `database.url` is set.
//!
//! Routes (the OpenAPI document at `/openapi.json` is generated from the
//! handlers), with a bearer token (a write token for POST, PATCH, DELETE):
//! `GET /api/devices/online`, `GET|PATCH|DELETE /api/devices/{phyID}`,
//! `GET /api/devices/{phyID}/online`, `GET|POST /api/devices`,
//! `GET|POST /api/devices/{phyID}/commands`, `GET /api/commands/{id}`,
//! `GET /api/commands`, `GET /api/devices/{phyID}/events`,
//! `GET /api/devices/{phyID}/sessions`, `GET /api/servers`,
//! `GET /api/stats`; and `GET /health`, `/health/live`, `/health/ready`,
//! `/health/redis`, `/metrics`, `/openapi.json` (open while
//! `api.open_health`). `iot-api migrate` applies the PostgreSQL migrations.
//!
//! # Layout
//!
//! - [`run`] and [`router`]: the service and its middleware stack.
//! - [`state`]: what the handlers share ([`AppState`]).
//! - [`routes`]: the handlers, one file per resource (`devices`,
//!   `registry`, `commands`, `history`, `servers`, `stats`, `health`,
//!   `openapi`).
//! - [`presence`]: reading device views, the online and known indexes and
//!   the lag record from Redis.
//! - [`instances`]: reading the ingest registry, beats and liveness keys.
//! - [`downlink`]: a device's command index, waiting for a command's fate.
//! - [`database`]: PostgreSQL at start, its health probe, `migrate`.
//! - [`command_log`]: one command from the PostgreSQL command log.
//! - [`labels`]: registry labels and the label filter.
//! - [`model`]: JSON shapes shared by routes (the policy's explanation, lag).
//! - [`params`]: query parameters: policy overrides, `now`, paging.
//! - [`cursor`]: the opaque paging cursors.
//! - [`paging`]: exact newest-first pages over sources with time ties.
//! - [`timestamp`]: RFC 3339 on the wire.
//! - [`extract`]: strict query, path and JSON body extractors (bad input is
//!   a 400).
//! - [`auth`]: bearer tokens.
//! - [`error`]: [`ApiError`](error::ApiError) and the error policy.
//! - [`metrics`]: the api's metrics and the request-tracking middleware.

pub mod auth;
pub mod command_log;
pub mod cursor;
pub mod database;
pub mod downlink;
pub mod error;
pub mod extract;
pub mod instances;
pub mod labels;
pub mod metrics;
pub mod model;
pub mod paging;
pub mod params;
pub mod presence;
pub mod routes;
pub mod state;
pub mod timestamp;

use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, State};
use axum::http::{Method, Uri};
use axum::middleware::{from_fn, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use iot_service::startup::Context;
use tokio::net::TcpListener;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;
use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;

pub use state::AppState;

use crate::error::ApiError;

/// The service's default HTTP port (`http.listen` empty).
pub const DEFAULT_HTTP_PORT: u16 = 8080;

/// Smallest limit on request bodies; see [`body_limit`].
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Largest limit on request bodies, whatever `mqtt.max_packet_size`.
pub const MAX_BODY_LIMIT: usize = 16 * 1024 * 1024;

/// Longest a request may take in all; Redis and PostgreSQL work have their
/// own, shorter, deadlines (`redis.read_timeout`,
/// `database.connect_timeout`).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest `POST /api/devices/{phyID}/commands` may take: its `wait` (at
/// most [`routes::commands::MAX_WAIT`]) plus [`REQUEST_TIMEOUT`].
pub const COMMAND_REQUEST_TIMEOUT: Duration =
    Duration::from_secs(routes::commands::MAX_WAIT.as_secs() + REQUEST_TIMEOUT.as_secs());

/// The limit on request bodies: room for a command whose payload fills a
/// packet of `mqtt.max_packet_size`, in base64, plus the rest of the JSON;
/// at least [`MAX_BODY_BYTES`], at most [`MAX_BODY_LIMIT`].
pub fn body_limit(max_packet_size: usize) -> usize {
    (max_packet_size.div_ceil(3).saturating_mul(4) + 4096).clamp(MAX_BODY_BYTES, MAX_BODY_LIMIT)
}

/// The OpenAPI document of every route [`router`] serves.
pub fn openapi() -> utoipa::openapi::OpenApi {
    OpenApiRouter::with_openapi(routes::openapi::ApiDoc::openapi())
        .merge(routes::api())
        .merge(routes::open())
        .into_openapi()
}

async fn not_found(state: axum::extract::State<AppState>, req: axum::extract::Request) -> Response {
    let path = req.uri().path();
    // Under /api, an unauthenticated caller learns nothing about routes.
    if (path == "/api" || path.starts_with("/api/"))
        && let Err(e) = state.tokens.check(req.headers(), auth::Access::Read)
    {
        return e.into_response();
    }
    ApiError::no_route(path).into_response()
}

async fn method_not_allowed(uri: Uri, method: axum::http::Method) -> Response {
    ApiError::MethodNotAllowed(format!(
        "{method} is not served on {:.200}; see /openapi.json",
        uri.path()
    ))
    .into_response()
}

/// Refuses a declared body over the limit ([`body_limit`]) before anything
/// reads it; extractors enforce the same limit on bodies without a length.
async fn refuse_large_bodies(
    State(limit): State<usize>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(n) if n > limit as u64 => ApiError::PayloadTooLarge(format!(
            "the request body is {n} bytes; at most {limit} are accepted"
        ))
        .into_response(),
        _ => next.run(req).await,
    }
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    ApiError::Internal("the request handler panicked; this is a bug, please report it".into())
        .into_response()
}

/// Answers 503 `timeout` when a request takes longer than
/// [`REQUEST_TIMEOUT`] ([`COMMAND_REQUEST_TIMEOUT`] for posting a command,
/// which may wait for its fate).
async fn deadline(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let posts_command = req.method() == Method::POST
        && req
            .extensions()
            .get::<MatchedPath>()
            .is_some_and(|p| p.as_str() == "/api/devices/{phyID}/commands");
    let limit = if posts_command {
        COMMAND_REQUEST_TIMEOUT
    } else {
        REQUEST_TIMEOUT
    };
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(r) => r,
        Err(_) => ApiError::Timeout(format!(
            "the request took longer than {limit:?}; retry later"
        ))
        .into_response(),
    }
}

/// The whole HTTP service: routes, access control and middleware.
///
/// Layers, outermost first: panics become a JSON 500; a tracing span per
/// request; per-route metrics (so refused requests are counted too); a
/// deadline of [`REQUEST_TIMEOUT`] (JSON 503); bodies over the limit
/// ([`body_limit`]) a JSON 413; then, on protected routes, the token check
/// (a write token for POST, PATCH and DELETE). Unmatched paths and methods
/// get JSON 404 and 405.
pub fn router(state: AppState) -> Router {
    let guard = from_fn_with_state(state.tokens.clone(), auth::require_by_method);
    let read_guard = from_fn_with_state(state.tokens.clone(), auth::require_read);
    let (api, _) = routes::api().split_for_parts();
    let (open, _) = routes::open().split_for_parts();
    let api = api.route_layer(guard);
    let open = if state.open_health {
        open
    } else {
        open.route_layer(read_guard)
    };
    let body_limit = state.max_body_bytes;
    api.merge(open)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(from_fn_with_state(body_limit, refuse_large_bodies))
        .layer(from_fn(deadline))
        .layer(from_fn(metrics::track))
        .layer(TraceLayer::new_for_http())
        .layer(CatchPanicLayer::custom(panic_response))
}

/// Runs the service until `ctx.shutdown` is cancelled.
///
/// With `database.url` set it checks the PostgreSQL schema first and
/// refuses to start when migrations are missing (`iot-api migrate` applies
/// them); an unreachable database only makes the `database` check
/// degraded, and a probe follows it from then on.
pub async fn run(ctx: Context, http: TcpListener) -> anyhow::Result<()> {
    metrics::describe();
    iot_downlink::metrics::describe();
    let db = database::open(&ctx.config.database)
        .map_err(|e| anyhow::anyhow!("database.url / DATABASE_URL is unusable: {e}"))?;
    match &db {
        Some(store) => {
            store
                .check_at_start(&ctx.health, database::HEALTH_CHECK)
                .await?;
            database::spawn_probe(
                store.clone(),
                ctx.health.clone(),
                database::PROBE_INTERVAL,
                database::request_timeout(&ctx.config.database),
                ctx.shutdown.clone(),
            );
        }
        None => tracing::info!(
            "database.url is empty: registry, history and command-log routes answer 503 database_not_configured"
        ),
    }
    let state = AppState::with_store(&ctx, db);
    if state.tokens.is_empty() {
        tracing::warn!(
            "no api.read_tokens or api.write_tokens configured: every /api route will answer 401"
        );
    }
    let router = router(state);
    tracing::info!(server_id = %ctx.server_id, http = %http.local_addr()?, "iot-api started");
    iot_service::http::serve(http, router, ctx.shutdown.clone()).await?;
    tracing::info!("iot-api stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_limit_fits_a_full_packet_in_base64() {
        assert_eq!(body_limit(0), MAX_BODY_BYTES);
        // 65536 bytes are 87384 in base64, plus room for the rest.
        assert_eq!(body_limit(65_536), 87_384 + 4096);
        assert_eq!(body_limit(268_435_455), MAX_BODY_LIMIT);
    }
}
