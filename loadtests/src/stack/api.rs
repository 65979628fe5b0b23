//! The api as the scenarios ask it: typed answers of the routes they use,
//! over a small pool of keep-alive connections.
//!
//! Only the fields a scenario compares are read; the api's own tests cover
//! the rest of each answer.

use std::net::SocketAddr;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Deserialize;

use crate::stack::http::{HttpConn, HttpError, Response};

/// Deadline of one api request made by scenario code.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// `GET /api/devices/{phyID}`, the fields the scenarios compare.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct DeviceAnswer {
    /// The policy's answer at the time of the request.
    pub online: bool,
    /// Whether the bound connection is up as far as the events tell.
    pub connected: bool,
    /// Instance holding the bound connection.
    pub server_id: Option<String>,
    /// The reason of the state (`heartbeat_fresh`, `tcp_down`, ...).
    pub reason: String,
    /// How the bound connection ended, if it did.
    #[serde(default)]
    pub ended: Option<String>,
}

/// `GET /api/stats`, the fields the scenarios compare.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct StatsAnswer {
    /// Devices online (the online index).
    pub online: u64,
    /// Connections tracked in Redis.
    pub connected: u64,
    /// Devices with a view.
    pub known: u64,
    /// Stream entry rates (one entry holds one event or a heartbeat batch).
    pub entries_per_second: EntryRates,
    /// Event rates (each heartbeat of a batch counts).
    pub events_per_second: EventRates,
    /// Projection lag.
    pub lag: Lag,
}

/// Stream entry rates of `/api/stats`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct EntryRates {
    /// Entries appended per second.
    pub added: f64,
    /// Entries the projectors acknowledged per second.
    pub applied: f64,
}

/// Event rates of `/api/stats`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct EventRates {
    /// Events the projectors applied per second.
    pub applied: f64,
}

/// Projection lag of `/api/stats`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Lag {
    /// Entries not yet applied (pending + undelivered).
    #[serde(default)]
    pub entries: u64,
    /// Age of the oldest entry not yet applied, ms.
    #[serde(default)]
    pub oldest_age_ms: i64,
}

/// `POST /api/devices/{phyID}/commands`, the fields the scenarios read.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CommandAnswer {
    /// Command id.
    pub id: String,
    /// Its status when the api answered.
    pub status: String,
    /// Whether that status is final.
    pub terminal: bool,
    /// Why, for failures.
    #[serde(default)]
    pub reason: Option<String>,
}

/// Why an api call failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request failed.
    #[error("api request {path}: {source}")]
    Http {
        /// The path asked.
        path: String,
        /// What failed.
        source: HttpError,
    },
    /// The api answered with an unexpected status.
    #[error("api request {path}: status {status}: {body}")]
    Status {
        /// The path asked.
        path: String,
        /// The status.
        status: u16,
        /// The start of the body.
        body: String,
    },
}

/// A client of one api instance.
#[derive(Debug)]
pub struct ApiClient {
    addr: SocketAddr,
    read_token: String,
    write_token: String,
    idle: Mutex<Vec<HttpConn>>,
    idle_write: Mutex<Vec<HttpConn>>,
}

impl ApiClient {
    /// A client of the api at `addr` with a read and a write token.
    pub fn new(addr: SocketAddr, read_token: &str, write_token: &str) -> ApiClient {
        ApiClient {
            addr,
            read_token: read_token.to_owned(),
            write_token: write_token.to_owned(),
            idle: Mutex::new(Vec::new()),
            idle_write: Mutex::new(Vec::new()),
        }
    }

    /// The api's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The read token.
    pub fn read_token(&self) -> &str {
        &self.read_token
    }

    /// The write token.
    pub fn write_token(&self) -> &str {
        &self.write_token
    }

    /// One request on a pooled connection (read or write token).
    pub async fn request(
        &self,
        write: bool,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Response, ApiError> {
        let pool = if write { &self.idle_write } else { &self.idle };
        let pooled = pool.lock().pop();
        let mut conn = match pooled {
            Some(c) => c,
            None => {
                let token = if write {
                    &self.write_token
                } else {
                    &self.read_token
                };
                HttpConn::connect(self.addr, Some(token))
                    .await
                    .map_err(|source| ApiError::Http {
                        path: path.to_owned(),
                        source,
                    })?
            }
        };
        let r = conn
            .request_within(REQUEST_TIMEOUT, method, path, body)
            .await
            .map_err(|source| ApiError::Http {
                path: path.to_owned(),
                source,
            })?;
        if conn.is_reusable() {
            pool.lock().push(conn);
        }
        Ok(r)
    }

    fn expect_ok(path: &str, r: &Response) -> Result<(), ApiError> {
        if r.is_success() {
            Ok(())
        } else {
            Err(ApiError::Status {
                path: path.to_owned(),
                status: r.status,
                body: String::from_utf8_lossy(&r.body[..r.body.len().min(300)]).into_owned(),
            })
        }
    }

    fn parse<T: serde::de::DeserializeOwned>(path: &str, r: &Response) -> Result<T, ApiError> {
        r.json().map_err(|source| ApiError::Http {
            path: path.to_owned(),
            source,
        })
    }

    /// `GET /api/devices/{phy}`; `None` when the api knows no such device
    /// (404).
    pub async fn device(&self, phy: &str) -> Result<Option<DeviceAnswer>, ApiError> {
        let path = format!("/api/devices/{phy}");
        let r = self.request(false, "GET", &path, None).await?;
        if r.status == 404 {
            return Ok(None);
        }
        Self::expect_ok(&path, &r)?;
        Self::parse(&path, &r).map(Some)
    }

    /// `GET /api/stats`.
    pub async fn stats(&self) -> Result<StatsAnswer, ApiError> {
        let path = "/api/stats";
        let r = self.request(false, "GET", path, None).await?;
        Self::expect_ok(path, &r)?;
        Self::parse(path, &r)
    }

    /// `POST /api/devices/{phy}/commands` with `body` (JSON).
    pub async fn post_command(&self, phy: &str, body: &str) -> Result<CommandAnswer, ApiError> {
        let path = format!("/api/devices/{phy}/commands");
        let r = self
            .request(true, "POST", &path, Some(body.as_bytes()))
            .await?;
        Self::expect_ok(&path, &r)?;
        Self::parse(&path, &r)
    }
}

/// Sums of every Prometheus sample of each metric name (labels summed over)
/// from a `/metrics` text.
pub fn metric_sums(text: &str) -> std::collections::HashMap<String, f64> {
    let mut out = std::collections::HashMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (name_labels, value) = match line.rsplit_once(' ') {
            Some(p) => p,
            None => continue,
        };
        let name = name_labels.split('{').next().unwrap_or_default().trim();
        if let Ok(v) = value.trim().parse::<f64>() {
            *out.entry(name.to_owned()).or_insert(0.0) += v;
        }
    }
    out
}

/// Reads a service's `/metrics` and sums every metric by name.
pub async fn scrape(addr: SocketAddr) -> Result<std::collections::HashMap<String, f64>, ApiError> {
    let path = "/metrics";
    let mut c = HttpConn::connect(addr, None)
        .await
        .map_err(|source| ApiError::Http {
            path: path.to_owned(),
            source,
        })?;
    let r = c
        .request_within(REQUEST_TIMEOUT, "GET", path, None)
        .await
        .map_err(|source| ApiError::Http {
            path: path.to_owned(),
            source,
        })?;
    ApiClient::expect_ok(path, &r)?;
    Ok(metric_sums(&String::from_utf8_lossy(&r.body)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_sums_add_up_labelled_samples() {
        let text = "# HELP x y\n# TYPE x counter\n\
                    iot_ingest_events_written_total{kind=\"heartbeat\"} 10\n\
                    iot_ingest_events_written_total{kind=\"connected\"} 5\n\
                    iot_ingest_connections 3\n\
                    broken_line\n";
        let m = metric_sums(text);
        assert_eq!(m["iot_ingest_events_written_total"], 15.0);
        assert_eq!(m["iot_ingest_connections"], 3.0);
        assert!(!m.contains_key("broken_line"));
    }

    #[test]
    fn device_answers_parse_from_the_api_shape() {
        let json = r#"{"phy_id":"d","conn_id":null,"server_id":"s1","epoch":3,
            "connected":true,"online":true,"score":1.0,"reason":"heartbeat_fresh",
            "terms":{"heartbeat":1.0,"tcp_down":0.0,"ack_timeout":0.0},"threshold":0.5,
            "as_of":"x","lag":{}}"#;
        let d: DeviceAnswer = serde_json::from_str(json).expect("parse");
        assert!(d.online && d.connected);
        assert_eq!(d.server_id.as_deref(), Some("s1"));
        assert_eq!(d.ended, None);
    }
}
