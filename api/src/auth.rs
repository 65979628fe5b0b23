//! Bearer-token access.
//!
//! Every `/api` route needs `Authorization: Bearer <token>` with a token
//! from `api.read_tokens` or `api.write_tokens`; write routes (every method
//! but GET, HEAD and OPTIONS: POST, PATCH, DELETE) need one of the latter,
//! and a read token there is a 403 `insufficient_scope`. `/health*`,
//! `/metrics` and `/openapi.json` are open while `api.open_health` is true
//! and need a read token otherwise.
//!
//! Tokens are kept as SHA-256 digests and compared in constant time against
//! every configured digest (no early exit), so neither the token's length nor
//! how much of it matched shows in the timing. A refused request is answered
//! here, before any handler runs: it costs no Redis call.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use iot_core::config::ApiConfig;
use sha2::{Digest, Sha256};

use crate::error::ApiError;

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read tokens and write tokens.
    Read,
    /// Write tokens only.
    Write,
}

impl Access {
    /// What a request with `method` needs: reading for GET, HEAD and
    /// OPTIONS, writing for everything else.
    pub fn for_method(method: &Method) -> Self {
        match *method {
            Method::GET | Method::HEAD | Method::OPTIONS => Self::Read,
            _ => Self::Write,
        }
    }
}

/// The configured tokens, as digests.
#[derive(Clone, Default)]
pub struct Tokens {
    read: Vec<[u8; 32]>,
    write: Vec<[u8; 32]>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("read", &self.read.len())
            .field("write", &self.write.len())
            .finish()
    }
}

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

/// `a == b` in time independent of where they differ.
fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a
        .iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Whether `d` equals any of `set`, looking at all of them.
fn any_ct(set: &[[u8; 32]], d: &[u8; 32]) -> bool {
    set.iter().fold(false, |found, t| found | ct_eq(t, d))
}

impl Tokens {
    /// From `api.read_tokens` and `api.write_tokens`; empty strings and
    /// surrounding blanks (from `IOT_API_READ_TOKENS=a, b`) are dropped.
    pub fn from_config(cfg: &ApiConfig) -> Self {
        let set = |v: &[String]| {
            v.iter()
                .map(|t| t.trim())
                .filter(|t| !t.is_empty())
                .map(|t| digest(t.as_bytes()))
                .collect()
        };
        Self {
            read: set(&cfg.read_tokens),
            write: set(&cfg.write_tokens),
        }
    }

    /// No token at all is configured: every protected route answers 401.
    pub fn is_empty(&self) -> bool {
        self.read.is_empty() && self.write.is_empty()
    }

    /// Checks the `Authorization` header for `need`.
    pub fn check(&self, headers: &HeaderMap, need: Access) -> Result<(), ApiError> {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return Err(ApiError::Unauthorized(
                "this route needs a bearer token: send `Authorization: Bearer <token>` with a token from api.read_tokens or api.write_tokens".into(),
            ));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                let (scheme, rest) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            })
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                ApiError::Unauthorized("the Authorization header is not `Bearer <token>`".into())
            })?;
        let d = digest(token.as_bytes());
        let is_write = any_ct(&self.write, &d);
        let is_read = any_ct(&self.read, &d);
        match (need, is_write, is_read) {
            (_, true, _) | (Access::Read, _, true) => Ok(()),
            (Access::Write, false, true) => Err(ApiError::Forbidden(
                "this route changes state and needs a token from api.write_tokens; the token given is a read token".into(),
            )),
            _ => Err(ApiError::Unauthorized(
                "the bearer token is not one of api.read_tokens or api.write_tokens".into(),
            )),
        }
    }
}

async fn require(tokens: &Tokens, need: Access, req: Request, next: Next) -> Response {
    match tokens.check(req.headers(), need) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// Middleware: the token the request's method needs
/// ([`Access::for_method`]).
pub async fn require_by_method(
    State(tokens): State<Arc<Tokens>>,
    req: Request,
    next: Next,
) -> Response {
    let need = Access::for_method(req.method());
    require(&tokens, need, req, next).await
}

/// Middleware: a read or write token.
pub async fn require_read(State(tokens): State<Arc<Tokens>>, req: Request, next: Next) -> Response {
    require(&tokens, Access::Read, req, next).await
}

/// Middleware: a write token.
pub async fn require_write(
    State(tokens): State<Arc<Tokens>>,
    req: Request,
    next: Next,
) -> Response {
    require(&tokens, Access::Write, req, next).await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use axum::http::{HeaderValue, StatusCode};

    fn tokens() -> Tokens {
        Tokens::from_config(&ApiConfig {
            read_tokens: vec!["r1".into(), " r2 ".into(), "".into()],
            write_tokens: vec!["w1".into()],
            open_health: true,
        })
    }

    fn auth(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        h
    }

    fn status(r: Result<(), ApiError>) -> Option<StatusCode> {
        r.err().map(|e| e.status())
    }

    #[test]
    fn read_routes_take_read_and_write_tokens() {
        let t = tokens();
        for ok in ["Bearer r1", "Bearer r2", "bearer w1", "BEARER  r1 "] {
            assert_eq!(status(t.check(&auth(ok), Access::Read)), None, "{ok}");
        }
    }

    #[test]
    fn write_routes_take_write_tokens_only() {
        let t = tokens();
        assert_eq!(status(t.check(&auth("Bearer w1"), Access::Write)), None);
        assert_eq!(
            status(t.check(&auth("Bearer r1"), Access::Write)),
            Some(StatusCode::FORBIDDEN)
        );
        assert_eq!(
            status(t.check(&auth("Bearer nope"), Access::Write)),
            Some(StatusCode::UNAUTHORIZED)
        );
    }

    #[test]
    fn missing_malformed_and_unknown_tokens_are_401() {
        let t = tokens();
        assert_eq!(
            status(t.check(&HeaderMap::new(), Access::Read)),
            Some(StatusCode::UNAUTHORIZED)
        );
        for bad in [
            "r1",
            "Basic cjE6",
            "Bearer",
            "Bearer ",
            "Bearer r1x",
            "Bearer R1",
            "Bearer ",
        ] {
            assert_eq!(
                status(t.check(&auth(bad), Access::Read)),
                Some(StatusCode::UNAUTHORIZED),
                "{bad}"
            );
        }
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_bytes(b"Bearer \xff\xfe").unwrap(),
        );
        assert_eq!(
            status(t.check(&h, Access::Read)),
            Some(StatusCode::UNAUTHORIZED)
        );
    }

    #[test]
    fn empty_token_lists_refuse_everything() {
        let t = Tokens::from_config(&ApiConfig {
            read_tokens: vec!["".into()],
            write_tokens: vec![],
            open_health: true,
        });
        assert!(t.is_empty());
        assert_eq!(
            status(t.check(&auth("Bearer "), Access::Read)),
            Some(StatusCode::UNAUTHORIZED)
        );
    }

    #[test]
    fn methods_that_change_state_need_writing() {
        assert_eq!(Access::for_method(&Method::GET), Access::Read);
        assert_eq!(Access::for_method(&Method::HEAD), Access::Read);
        for m in [Method::POST, Method::PATCH, Method::DELETE, Method::PUT] {
            assert_eq!(Access::for_method(&m), Access::Write, "{m}");
        }
    }

    #[test]
    fn constant_time_compare_is_equality() {
        let a = digest(b"a");
        assert!(ct_eq(&a, &digest(b"a")));
        assert!(!ct_eq(&a, &digest(b"b")));
        assert!(any_ct(&[digest(b"x"), a], &a));
        assert!(!any_ct(&[], &a));
    }
}
