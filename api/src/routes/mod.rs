//! The HTTP routes, one file per resource. Each handler carries its
//! OpenAPI annotation; [`api`] and [`open`] mount them with utoipa-axum so
//! the router and the document come from the same list.

pub mod commands;
pub mod devices;
pub mod health;
pub mod history;
pub mod openapi;
pub mod registry;
pub mod servers;
pub mod stats;

use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::state::AppState;

/// Routes that need a token: a read or write token for GET, a write token
/// for POST, PATCH and DELETE (see [`crate::auth::require_by_method`]).
pub fn api() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(devices::online_list))
        .routes(routes!(devices::device, registry::update, registry::delete))
        .routes(routes!(devices::device_online))
        .routes(routes!(registry::list, registry::register))
        .routes(routes!(commands::device_commands, commands::submit))
        .routes(routes!(commands::command))
        .routes(routes!(commands::log))
        .routes(routes!(history::events))
        .routes(routes!(history::sessions))
        .routes(routes!(servers::servers))
        .routes(routes!(stats::stats))
}

/// Routes open while `api.open_health` is true (a read token otherwise).
pub fn open() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(health::health))
        .routes(routes!(health::ready))
        .routes(routes!(health::live))
        .routes(routes!(health::redis))
        .routes(routes!(health::metrics))
        .routes(routes!(openapi::openapi_json))
}
