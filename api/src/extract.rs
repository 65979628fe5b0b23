//! Request extractors that turn every malformed input into a JSON 400.
//!
//! - [`StrictQuery`]: the query string, at most [`MAX_QUERY_BYTES`], into a
//!   struct that denies unknown fields; duplicates and unparsable values are
//!   refused too.
//! - [`DevicePath`]: the `{phyID}` path segment, validated as a [`PhyId`].
//! - [`CommandIdPath`]: the `{id}` path segment, a command id (UUID).
//! - [`StrictJson`]: an `application/json` body into a struct that denies
//!   unknown fields; errors name the JSON path (`labels.site`) at fault.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use iot_core::PhyId;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::error::ApiError;

/// Longest query string accepted, in bytes.
pub const MAX_QUERY_BYTES: usize = 2048;

/// A query string parsed strictly into `T` (which should be
/// `#[serde(deny_unknown_fields)]`).
#[derive(Debug, Clone)]
pub struct StrictQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for StrictQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let len = parts.uri.query().map_or(0, str::len);
        if len > MAX_QUERY_BYTES {
            return Err(ApiError::bad_request(
                "query_too_long",
                format!("the query string is {len} bytes; at most {MAX_QUERY_BYTES} are accepted"),
            ));
        }
        match Query::<T>::try_from_uri(&parts.uri) {
            Ok(Query(v)) => Ok(Self(v)),
            Err(rejection) => Err(ApiError::bad_request(
                "invalid_query",
                format!(
                    "{}; see /openapi.json for the parameters of this route",
                    rejection.body_text()
                ),
            )),
        }
    }
}

/// The validated `{phyID}` of a device route.
#[derive(Debug, Clone)]
pub struct DevicePath(pub PhyId);

impl<S: Send + Sync> FromRequestParts<S> for DevicePath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|r| {
                ApiError::bad_request(
                    "invalid_path",
                    format!(
                        "{:.300}; a phyID is 1 to 64 characters of [A-Za-z0-9._-]",
                        r.body_text()
                    ),
                )
            })?;
        PhyId::new(raw)
            .map(Self)
            .map_err(|e| ApiError::bad_request("invalid_phy_id", e.to_string()))
    }
}

/// Query of routes that take no parameters: any parameter is refused.
#[derive(Debug, Clone, Copy, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

/// The validated `{id}` of a command route.
#[derive(Debug, Clone, Copy)]
pub struct CommandIdPath(pub Uuid);

impl<S: Send + Sync> FromRequestParts<S> for CommandIdPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let bad = |what: String| {
            ApiError::bad_request(
                "invalid_command_id",
                format!(
                    "{what:.200} is not a command id; give the UUID that POST /api/devices/{{phyID}}/commands returned"
                ),
            )
        };
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|r| bad(r.body_text()))?;
        Uuid::parse_str(&raw).map(Self).map_err(|_| bad(raw))
    }
}

/// Whether a `Content-Type` value is JSON (`application/json`, or an
/// `application/...+json` type), parameters ignored.
fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// A JSON request body parsed strictly into `T` (which should be
/// `#[serde(deny_unknown_fields)]`).
///
/// A body without a JSON `Content-Type` is a 415; one over the body limit a
/// 413; an empty one, one that does not parse, has unknown fields or values
/// of the wrong type a 400 `invalid_body` naming the JSON path at fault.
#[derive(Debug, Clone)]
pub struct StrictJson<T>(pub T);

impl<T, S> FromRequest<S> for StrictJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let content_type = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        if !content_type.as_deref().is_some_and(is_json) {
            return Err(ApiError::UnsupportedMediaType(format!(
                "the body must be JSON sent with `Content-Type: application/json`, not {:.80}",
                content_type.as_deref().unwrap_or("no Content-Type")
            )));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|r| {
            if r.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge(format!("{:.200}", r.body_text()))
            } else {
                ApiError::bad_request(
                    "invalid_body",
                    format!("cannot read the body: {:.200}", r.body_text()),
                )
            }
        })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::bad_request(
                "invalid_body",
                "the request needs a JSON object as its body; see /openapi.json",
            ));
        }
        let mut de = serde_json::Deserializer::from_slice(&bytes);
        let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let at = if path == "." {
                String::new()
            } else {
                format!(" at `{path:.100}`")
            };
            ApiError::bad_request(
                "invalid_body",
                format!("the JSON body is invalid{at}: {inner:.300}; see /openapi.json for this route's body"),
            )
        })?;
        de.end().map_err(|e| {
            ApiError::bad_request(
                "invalid_body",
                format!("the JSON body has trailing data: {e:.200}"),
            )
        })?;
        Ok(Self(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_types() {
        for ok in [
            "application/json",
            "application/json; charset=utf-8",
            "Application/JSON",
            "application/merge-patch+json",
        ] {
            assert!(is_json(ok), "{ok}");
        }
        for bad in [
            "",
            "text/plain",
            "application/x-www-form-urlencoded",
            "json",
        ] {
            assert!(!is_json(bad), "{bad}");
        }
    }
}
