//! Query parameters of the presence routes, and how they become a policy,
//! an instant and a page size.

use std::time::Duration;

use iot_core::Policy;
use iot_core::config::duration;
use serde::Deserialize;
use utoipa::IntoParams;

use crate::error::ApiError;
use crate::timestamp::parse_now;

/// Default page size of `GET /api/devices/online`.
pub const DEFAULT_LIMIT: u32 = 100;
/// Largest page size; more is refused with 400 rather than silently cut, so
/// a client never mistakes a short page for the end.
pub const MAX_LIMIT: u32 = 1000;

/// `GET /api/devices/{phyID}/online`: every field of the policy, named like
/// its config key; what is not given comes from the config.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PolicyParams {
    /// `false`: online means heartbeat fresh, penalties are ignored
    /// (config `policy.enabled`).
    pub enabled: Option<bool>,
    /// A heartbeat at most this old is fresh, such as `30s` or `5m`
    /// (config `session.heartbeat_timeout`).
    #[param(example = "5m")]
    pub heartbeat_timeout: Option<String>,
    /// How long a TCP drop penalises the device (config `policy.tcp_down_window`).
    #[param(example = "1m")]
    pub tcp_down_window: Option<String>,
    /// How long an ACK timeout penalises the device (config `policy.ack_window`).
    #[param(example = "1m")]
    pub ack_window: Option<String>,
    /// Subtracted from the score within the TCP drop window; a number from
    /// -1e9 to 1e9 (config `policy.tcp_down_penalty`).
    #[param(example = 0.5)]
    pub tcp_down_penalty: Option<f64>,
    /// Subtracted from the score within the ACK window; a number from -1e9
    /// to 1e9 (config `policy.ack_timeout_penalty`).
    #[param(example = 0.3)]
    pub ack_timeout_penalty: Option<f64>,
    /// Online when the score is at least this; a number from -1e9 to 1e9
    /// (config `policy.threshold`).
    #[param(example = 0.5)]
    pub threshold: Option<f64>,
    /// The instant to answer for: milliseconds since the Unix epoch or
    /// RFC 3339 (encode `+` as `%2B`). Default: the current time.
    #[param(example = "2024-05-01T12:00:00Z")]
    pub now: Option<String>,
}

/// `GET /api/devices/{phyID}`: the instant to evaluate the configured policy at.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct NowParams {
    /// The instant to answer for: milliseconds since the Unix epoch or
    /// RFC 3339 (encode `+` as `%2B`). Default: the current time.
    #[param(example = "2024-05-01T12:00:00Z")]
    pub now: Option<String>,
}

/// `GET /api/devices/online`: paging.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// Devices per page, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000, example = 100)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page; absent for the first page.
    pub cursor: Option<String>,
}

fn bad(message: String) -> ApiError {
    ApiError::bad_request("invalid_query", message)
}

fn dur(name: &str, v: &Option<String>, base: i64) -> Result<i64, ApiError> {
    match v {
        None => Ok(base),
        Some(s) => duration::parse(s)
            .map(|d: Duration| iot_core::config::millis(d))
            .map_err(|e| bad(format!("{name}: {e:.200}"))),
    }
}

/// Largest magnitude of a penalty or threshold: far beyond any useful
/// weight, and small enough that the score stays a finite number.
pub const MAX_WEIGHT: f64 = 1e9;

fn num(name: &str, v: Option<f64>, base: f64) -> Result<f64, ApiError> {
    match v {
        None => Ok(base),
        Some(x) if x.is_finite() && x.abs() <= MAX_WEIGHT => Ok(x),
        Some(x) => Err(bad(format!(
            "{name}={x} is out of range; give a number from -{MAX_WEIGHT:e} to {MAX_WEIGHT:e}"
        ))),
    }
}

/// The instant asked for, or `default`.
pub fn now_or(now: Option<&str>, default: i64) -> Result<i64, ApiError> {
    now.map_or(Ok(default), |s| parse_now(s).map_err(bad))
}

impl PolicyParams {
    /// `base` with the given fields replaced.
    pub fn policy(&self, base: &Policy) -> Result<Policy, ApiError> {
        Ok(Policy {
            enabled: self.enabled.unwrap_or(base.enabled),
            heartbeat_timeout_ms: dur(
                "heartbeat_timeout",
                &self.heartbeat_timeout,
                base.heartbeat_timeout_ms,
            )?,
            tcp_down_window_ms: dur(
                "tcp_down_window",
                &self.tcp_down_window,
                base.tcp_down_window_ms,
            )?,
            ack_window_ms: dur("ack_window", &self.ack_window, base.ack_window_ms)?,
            tcp_down_penalty: num(
                "tcp_down_penalty",
                self.tcp_down_penalty,
                base.tcp_down_penalty,
            )?,
            ack_timeout_penalty: num(
                "ack_timeout_penalty",
                self.ack_timeout_penalty,
                base.ack_timeout_penalty,
            )?,
            threshold: num("threshold", self.threshold, base.threshold)?,
        })
    }
}

impl PageParams {
    /// The page size, checked.
    pub fn limit(&self) -> Result<usize, ApiError> {
        limit(self.limit)
    }
}

/// A page size given as `limit`, checked: 1 to [`MAX_LIMIT`], default
/// [`DEFAULT_LIMIT`].
pub fn limit(given: Option<u32>) -> Result<usize, ApiError> {
    match given.unwrap_or(DEFAULT_LIMIT) {
        n @ 1..=MAX_LIMIT => Ok(n as usize),
        n => Err(ApiError::bad_request(
            "invalid_limit",
            format!("limit={n} is out of range; give 1 to {MAX_LIMIT} (default {DEFAULT_LIMIT})"),
        )),
    }
}

/// Parses the instant query parameter `name` (ms since the Unix epoch or
/// RFC 3339) into ms.
pub fn instant(name: &str, s: &str) -> Result<i64, ApiError> {
    crate::timestamp::parse_instant(name, s).map_err(bad)
}

/// Parses the duration `name` (such as `30s`), which must lie within
/// `min..=max`.
pub fn duration_within(
    name: &str,
    s: &str,
    min: Duration,
    max: Duration,
    code: &'static str,
) -> Result<Duration, ApiError> {
    let d =
        duration::parse(s).map_err(|e| ApiError::bad_request(code, format!("{name}: {e:.200}")))?;
    if d < min || d > max {
        return Err(ApiError::bad_request(
            code,
            format!(
                "{name}={s:.40} is out of range; give {} to {}",
                duration::format(min),
                duration::format(max)
            ),
        ));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn overrides_replace_only_what_is_given() {
        let base = Policy::default();
        assert_eq!(PolicyParams::default().policy(&base).unwrap(), base);
        let p = PolicyParams {
            enabled: Some(false),
            heartbeat_timeout: Some("30s".into()),
            threshold: Some(0.8),
            ..Default::default()
        }
        .policy(&base)
        .unwrap();
        assert!(!p.enabled);
        assert_eq!(p.heartbeat_timeout_ms, 30_000);
        assert_eq!(p.threshold, 0.8);
        assert_eq!(p.tcp_down_window_ms, base.tcp_down_window_ms);
        assert_eq!(p.ack_timeout_penalty, base.ack_timeout_penalty);
    }

    #[test]
    fn bad_values_are_400_naming_the_parameter() {
        let base = Policy::default();
        for (params, name) in [
            (
                PolicyParams {
                    ack_window: Some("30".into()),
                    ..Default::default()
                },
                "ack_window",
            ),
            (
                PolicyParams {
                    tcp_down_window: Some("soon".into()),
                    ..Default::default()
                },
                "tcp_down_window",
            ),
            (
                PolicyParams {
                    threshold: Some(f64::NAN),
                    ..Default::default()
                },
                "threshold",
            ),
            (
                PolicyParams {
                    tcp_down_penalty: Some(f64::INFINITY),
                    ..Default::default()
                },
                "tcp_down_penalty",
            ),
            // Finite, but two of them would make the score -inf.
            (
                PolicyParams {
                    ack_timeout_penalty: Some(1.7e308),
                    ..Default::default()
                },
                "ack_timeout_penalty",
            ),
        ] {
            let e = params.policy(&base).unwrap_err();
            assert_eq!(e.status().as_u16(), 400);
            assert!(e.to_string().contains(name), "{e}");
        }
    }

    #[test]
    fn limit_is_checked() {
        let p = |l| PageParams {
            limit: l,
            cursor: None,
        };
        assert_eq!(p(None).limit().unwrap(), 100);
        assert_eq!(p(Some(1000)).limit().unwrap(), 1000);
        assert_eq!(p(Some(0)).limit().unwrap_err().code(), "invalid_limit");
        assert_eq!(p(Some(1001)).limit().unwrap_err().code(), "invalid_limit");
    }

    #[test]
    fn now_defaults_and_parses() {
        assert_eq!(now_or(None, 7).unwrap(), 7);
        assert_eq!(now_or(Some("1000"), 7).unwrap(), 1000);
        assert_eq!(now_or(Some("x"), 7).unwrap_err().code(), "invalid_query");
    }
}
