//! The API's error policy, in one place.
//!
//! Every error answer is JSON `{"error": code, "message": text}` with a
//! stable machine-readable `code` and a message for people that says what
//! failed, with which input, and what to do. The status follows from the
//! variant:
//!
//! | status | codes | when |
//! | --- | --- | --- |
//! | 400 | `invalid_phy_id`, `invalid_path`, `invalid_query`, `invalid_limit`, `invalid_cursor`, `query_too_long`, `invalid_body`, `invalid_command`, `invalid_command_id`, `invalid_labels` | the request is malformed: a phyID outside `[A-Za-z0-9._-]{1,64}`, a path that does not decode, an unknown, duplicate or unparsable query parameter, a query string over [`crate::extract::MAX_QUERY_BYTES`], a JSON body that does not parse or has unknown fields, a bad command name, payload, ttl or wait, a command id that is not a UUID, bad labels |
//! | 401 | `unauthorized` | no bearer token, or one that is not configured; answered before any Redis call, with `WWW-Authenticate: Bearer` |
//! | 403 | `insufficient_scope` | a valid read token on a write route (POST, PATCH, DELETE; RFC 6750 §3.1) |
//! | 404 | `device_not_found`, `device_not_registered`, `command_not_found`, `not_found` | no session view for the phyID (never seen, or expired after 2 x heartbeat_timeout) and no registry entry; no registry entry (PATCH, DELETE); no command with that id in Redis or the command log; a path that no route matches |
//! | 405 | `method_not_allowed` | the path exists, the method does not |
//! | 409 | `device_exists` | registering a phyID that is registered already |
//! | 413 | `payload_too_large` | a request body over the limit, or a command payload larger than a QoS 1 PUBLISH of `mqtt.max_packet_size` can carry |
//! | 415 | `unsupported_media_type` | a body that is not sent as `application/json` |
//! | 500 | `internal` | a bug or corrupt data in Redis (a view field that does not parse); never caused by request input |
//! | 503 | `redis_unavailable`, `database_unavailable`, `database_not_configured`, `timeout` | Redis or PostgreSQL did not answer (in time), or the schema lacks migrations; a PostgreSQL route on an api without `database.url`; retry later (or configure the database) |
//!
//! Bad input never yields a 5xx: extractors turn every rejection into a 400
//! here. 4xx answers are logged at debug (401, 404) or info (400, 405, 413)
//! level, 5xx at warn; each is counted in `iot_api_errors_total{error}`.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// An error answer of the API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed.
    #[error("{message}")]
    BadRequest {
        /// Machine-readable code, such as `invalid_phy_id`.
        code: &'static str,
        /// What was wrong and how to fix it.
        message: String,
    },
    /// 401: missing or unknown bearer token.
    #[error("{0}")]
    Unauthorized(String),
    /// 403: the token is valid but may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// 404: no such device, command or route.
    #[error("{message}")]
    NotFound {
        /// `device_not_found`, `device_not_registered`, `command_not_found`
        /// or `not_found`.
        code: &'static str,
        /// What was not found.
        message: String,
    },
    /// 405: the method is not served on this path.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// 409: the resource exists already.
    #[error("{message}")]
    Conflict {
        /// Machine-readable code, such as `device_exists`.
        code: &'static str,
        /// What exists.
        message: String,
    },
    /// 413: the request body (or a command payload) is too large.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// 415: the body is not JSON.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 503: Redis failed or did not answer in time.
    #[error("Redis is unavailable: {0}; retry later")]
    RedisUnavailable(String),
    /// 503: PostgreSQL failed, did not answer in time, or lacks migrations.
    #[error("PostgreSQL is unavailable: {0}; retry later")]
    DatabaseUnavailable(String),
    /// 503: the route needs PostgreSQL and `database.url` is empty.
    #[error(
        "this route needs PostgreSQL, and this api has no database configured: set database.url or DATABASE_URL and restart it"
    )]
    DatabaseNotConfigured,
    /// 503: the request took too long.
    #[error("{0}")]
    Timeout(String),
    /// 500: a bug or corrupt stored data; never caused by request input.
    #[error("{0}")]
    Internal(String),
}

/// The JSON body of every error answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// Machine-readable code, stable across versions (see the table in the
    /// API's error policy), such as `invalid_phy_id` or `redis_unavailable`.
    #[schema(example = "invalid_phy_id")]
    pub error: String,
    /// What failed, with which input, and what to do.
    #[schema(example = "phyID holds ':' at byte 3; only [A-Za-z0-9._-] is allowed")]
    pub message: String,
}

impl ApiError {
    /// A 400 with `code`.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::BadRequest {
            code,
            message: message.into(),
        }
    }

    /// 404 for a route that does not exist.
    pub fn no_route(path: &str) -> Self {
        Self::NotFound {
            code: "not_found",
            message: format!(
                "no route for {:.200}; see /openapi.json for the routes this API serves",
                path
            ),
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound { .. } => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::Conflict { .. } => StatusCode::CONFLICT,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::RedisUnavailable(_)
            | Self::DatabaseUnavailable(_)
            | Self::DatabaseNotConfigured
            | Self::Timeout(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest { code, .. }
            | Self::NotFound { code, .. }
            | Self::Conflict { code, .. } => code,
            Self::Unauthorized(_) => "unauthorized",
            Self::Forbidden(_) => "insufficient_scope",
            Self::MethodNotAllowed(_) => "method_not_allowed",
            Self::PayloadTooLarge(_) => "payload_too_large",
            Self::UnsupportedMediaType(_) => "unsupported_media_type",
            Self::RedisUnavailable(_) => "redis_unavailable",
            Self::DatabaseUnavailable(_) => "database_unavailable",
            Self::DatabaseNotConfigured => "database_not_configured",
            Self::Timeout(_) => "timeout",
            Self::Internal(_) => "internal",
        }
    }
}

impl From<redis::RedisError> for ApiError {
    fn from(e: redis::RedisError) -> Self {
        Self::RedisUnavailable(e.to_string())
    }
}

impl From<iot_store::StoreError> for ApiError {
    /// The generic mapping; handlers turn `NotFound` and `Conflict` into
    /// their own codes first. An unavailable database, a schema without its
    /// migrations or a missing configuration are 503, never 500.
    fn from(e: iot_store::StoreError) -> Self {
        use iot_store::StoreError as E;
        match e {
            E::NotConfigured => Self::DatabaseNotConfigured,
            E::NotFound => Self::NotFound {
                code: "not_found",
                message: "no such row in PostgreSQL".into(),
            },
            E::Conflict => Self::Conflict {
                code: "conflict",
                message: "the row exists already".into(),
            },
            e if crate::database::is_unavailable(&e) => Self::DatabaseUnavailable(e.to_string()),
            e @ (E::SchemaOutdated { .. } | E::Migration(_)) => {
                Self::DatabaseUnavailable(e.to_string())
            }
            // A table or column of ours is missing: a database that came
            // back (or was replaced) without the migrations.
            E::Db(sqlx::Error::Database(d))
                if d.code().is_some_and(|c| c == "42P01" || c == "42703") =>
            {
                Self::DatabaseUnavailable(format!(
                    "the PostgreSQL schema lacks this service's tables (run `iot-api migrate`): {d}"
                ))
            }
            e => Self::Internal(format!("unexpected PostgreSQL answer: {e}")),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let code = self.code();
        let message = self.to_string();
        crate::metrics::error(code);
        match status.as_u16() {
            401 | 404 => {
                tracing::debug!(status = status.as_u16(), error = code, %message, "request refused")
            }
            400..=499 => {
                tracing::info!(status = status.as_u16(), error = code, %message, "bad request")
            }
            _ => tracing::warn!(status = status.as_u16(), error = code, %message, "request failed"),
        }
        let mut resp = (
            status,
            Json(ErrorBody {
                error: code.to_owned(),
                message,
            }),
        )
            .into_response();
        let challenge = match &self {
            Self::Unauthorized(_) => Some(r#"Bearer realm="iot-api", error="invalid_token""#),
            Self::Forbidden(_) => Some(r#"Bearer realm="iot-api", error="insufficient_scope""#),
            _ => None,
        };
        if let Some(c) = challenge {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(c));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_has_a_4xx_or_5xx_status_and_a_code() {
        let all = [
            ApiError::bad_request("invalid_query", "x"),
            ApiError::Unauthorized("x".into()),
            ApiError::Forbidden("x".into()),
            ApiError::no_route("/x"),
            ApiError::MethodNotAllowed("x".into()),
            ApiError::Conflict {
                code: "device_exists",
                message: "x".into(),
            },
            ApiError::PayloadTooLarge("x".into()),
            ApiError::UnsupportedMediaType("x".into()),
            ApiError::RedisUnavailable("x".into()),
            ApiError::DatabaseUnavailable("x".into()),
            ApiError::DatabaseNotConfigured,
            ApiError::Timeout("x".into()),
            ApiError::Internal("x".into()),
        ];
        for e in all {
            let s = e.status().as_u16();
            assert!((400..600).contains(&s), "{e:?}");
            assert!(!e.code().is_empty());
            let resp = e.clone().into_response();
            assert_eq!(resp.status(), e.status());
            let challenge = resp.headers().get(header::WWW_AUTHENTICATE).is_some();
            assert_eq!(challenge, s == 401 || s == 403, "{e:?}");
        }
    }

    #[test]
    fn no_route_message_is_bounded() {
        let e = ApiError::no_route(&"x".repeat(10_000));
        assert!(e.to_string().len() < 400);
    }
}
