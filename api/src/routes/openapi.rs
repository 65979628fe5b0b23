//! `GET /openapi.json`: the OpenAPI 3.1 document, generated from the
//! handlers' annotations and the routes they are mounted on (utoipa-axum),
//! so it cannot drift from what the router serves.

use std::sync::OnceLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

/// Title, description, tags and the bearer security scheme; the paths are
/// added by [`crate::openapi`].
#[derive(OpenApi)]
#[openapi(
    info(
        title = "iot-api",
        description = "Presence of IoT devices: which devices are online, why, and on which ingest instance; downlink commands and their fate; the device registry and history (PostgreSQL); health and metrics.\n\nEvery `/api` route needs `Authorization: Bearer <token>`: GET takes a token from api.read_tokens or api.write_tokens, POST, PATCH and DELETE one from api.write_tokens (a read token is 403 `insufficient_scope`). Errors are JSON `{\"error\": code, \"message\": text}`. The registry, history and command-log routes need PostgreSQL (`database.url`): without it they answer 503 `database_not_configured`, while it is away 503 `database_unavailable`.",
        license(name = "Apache-2.0"),
    ),
    tags(
        (name = "devices", description = "Device presence, explained"),
        (name = "commands", description = "Downlink commands to devices, with acknowledgement, status and history"),
        (name = "registry", description = "Registered devices and their secrets (PostgreSQL)"),
        (name = "history", description = "Archived events and sessions of a device (PostgreSQL)"),
        (name = "servers", description = "Ingest instances and deployment counts"),
        (name = "health", description = "Health probes and metrics (open while api.open_health is true)"),
        (name = "meta", description = "This document"),
    ),
    modifiers(&BearerScheme),
)]
pub struct ApiDoc;

struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "meta",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API",
               body = Object, content_type = "application/json")))]
pub async fn openapi_json() -> Response {
    static DOC: OnceLock<String> = OnceLock::new();
    let body = DOC.get_or_init(|| {
        crate::openapi()
            .to_pretty_json()
            .unwrap_or_else(|e| format!("{{\"error\":\"internal\",\"message\":\"{e}\"}}"))
    });
    ([(header::CONTENT_TYPE, "application/json")], body.clone()).into_response()
}
