//! The api's metrics, declared in one place.
//!
//! - `iot_api_requests_total{route,method,status}`: answered requests.
//! - `iot_api_request_duration_seconds{route,method,status}`: time to answer.
//! - `iot_api_errors_total{error}`: error answers by code (see [`crate::error`]).
//! - `iot_build_info{service="api",version}`: always 1.
//!
//! `route` is the matched route template (`/api/devices/{phyID}`), never the
//! raw path, and `unmatched` for paths no route matches; `method` is one of
//! the standard methods or `other`. So every label has a bounded set of
//! values whatever clients send.

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;

/// Declares the metrics (help texts and units) and sets `iot_build_info`.
pub fn describe() {
    metrics::describe_counter!(
        "iot_api_requests_total",
        "HTTP requests answered by the api, by matched route, method and status"
    );
    metrics::describe_histogram!(
        "iot_api_request_duration_seconds",
        metrics::Unit::Seconds,
        "Time from request to response head, by matched route, method and status"
    );
    metrics::describe_counter!(
        "iot_api_errors_total",
        "Error answers of the api, by error code"
    );
    metrics::gauge!("iot_build_info", "service" => "api", "version" => env!("CARGO_PKG_VERSION"))
        .set(1.0);
}

/// Counts one error answer.
pub fn error(code: &'static str) {
    metrics::counter!("iot_api_errors_total", "error" => code).increment(1);
}

fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Middleware: counts and times every request by matched route.
pub async fn track(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = method_label(req.method());
    let start = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    let labels = [
        ("route", route),
        ("method", method.to_owned()),
        ("status", status),
    ];
    metrics::counter!("iot_api_requests_total", &labels).increment(1);
    metrics::histogram!("iot_api_request_duration_seconds", &labels)
        .record(start.elapsed().as_secs_f64());
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_map_to_a_bounded_set() {
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(method_label(&Method::CONNECT), "other");
        let odd = Method::from_bytes(b"FROBNICATE").expect("a valid token");
        assert_eq!(method_label(&odd), "other");
    }
}
