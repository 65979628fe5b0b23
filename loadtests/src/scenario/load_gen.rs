//! An HTTP load generator: a fixed request rate (open loop) or as fast as
//! the connections go (closed loop), over keep-alive connections.
//!
//! Open loop: request `i` is due at `start + i / rate`; each connection
//! takes the next due request, waits for its time and sends it. A request
//! that had to wait for a free connection is late, and its latency counted
//! from the time it was due ([`LoadResult::corrected`]) shows the queueing
//! that a closed-loop client would hide (coordinated omission). The
//! service time ([`LoadResult::latency`]) is from send to the whole
//! response. tokio's timer wakes at millisecond granularity, so requests go
//! out in 1 ms bursts; [`LoadResult::send_lag`] shows how late they left.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::{Instant, sleep_until};

use crate::histogram::{LatencyHistogram, LatencySummary};
use crate::stack::http::HttpConn;

/// How one request went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Done, with this HTTP status.
    Status(u16),
    /// Done, and the request's own check failed (counted as an error).
    Failed,
    /// The connection failed; it is reopened.
    ConnectionError,
}

/// A boxed future of one request.
pub type RequestFuture<'a> = Pin<Box<dyn Future<Output = Outcome> + Send + 'a>>;

/// What the generator sends: request number `i` on `conn`.
pub trait Request: Send + Sync + 'static {
    /// Makes request `i`.
    fn call<'a>(&'a self, conn: &'a mut HttpConn, i: u64) -> RequestFuture<'a>;
}

/// A `GET` of a path chosen per request.
pub struct Get<F>(pub F);

impl<F> Request for Get<F>
where
    F: Fn(u64) -> String + Send + Sync + 'static,
{
    fn call<'a>(&'a self, conn: &'a mut HttpConn, i: u64) -> RequestFuture<'a> {
        Box::pin(async move {
            let path = (self.0)(i);
            match conn.get(&path).await {
                Ok(r) => Outcome::Status(r.status),
                Err(_) => Outcome::ConnectionError,
            }
        })
    }
}

/// How to load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadPlan {
    /// Requests per second; 0: closed loop, as fast as the connections go.
    pub rate: f64,
    /// Keep-alive connections.
    pub connections: u32,
    /// How long.
    #[serde(with = "humantime_serde_secs")]
    pub duration: Duration,
    /// Bearer token.
    pub token: Option<String>,
}

mod humantime_serde_secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let v = f64::deserialize(d)?;
        Duration::try_from_secs_f64(v).map_err(serde::de::Error::custom)
    }
}

/// What a load run measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadResult {
    /// Requested rate (0: closed loop).
    pub target_rate: f64,
    /// Connections.
    pub connections: u32,
    /// Requests completed (any outcome).
    pub requests: u64,
    /// 2xx answers.
    pub ok: u64,
    /// Non-2xx answers, failed checks and connection errors.
    pub errors: u64,
    /// Answers by status.
    pub statuses: BTreeMap<u16, u64>,
    /// Connection errors.
    pub connection_errors: u64,
    /// Wall time, s.
    pub elapsed_s: f64,
    /// Completed requests per second.
    pub achieved_per_s: f64,
    /// Send to whole response.
    pub latency: LatencySummary,
    /// Due time to whole response (open loop; equals `latency` plus
    /// `send_lag`).
    pub corrected: LatencySummary,
    /// Due time to send (open loop): how late the generator was.
    pub send_lag: LatencySummary,
}

impl LoadResult {
    /// One line.
    pub fn line(&self) -> String {
        let mut s = format!(
            "{:.0} req/s ({} ok, {} errors) latency {}",
            self.achieved_per_s,
            self.ok,
            self.errors,
            self.latency.line(),
        );
        if self.corrected.count > 0 {
            s.push_str(&format!(
                " | from due time p99 {:.3} ms (send lag p99 {:.3} ms)",
                self.corrected.p99_ms, self.send_lag.p99_ms
            ));
        }
        s
    }
}

struct Tally {
    requests: u64,
    ok: u64,
    errors: u64,
    connection_errors: u64,
    statuses: BTreeMap<u16, u64>,
    latency: LatencyHistogram,
    corrected: LatencyHistogram,
    send_lag: LatencyHistogram,
}

/// Runs `plan` against `addr`.
pub async fn run(addr: SocketAddr, plan: &LoadPlan, request: Arc<dyn Request>) -> LoadResult {
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + plan.duration;
    let mut tasks = Vec::new();
    for _ in 0..plan.connections.max(1) {
        let next = next.clone();
        let request = request.clone();
        let rate = plan.rate;
        let token = plan.token.clone();
        tasks.push(tokio::spawn(async move {
            let mut t = Tally {
                requests: 0,
                ok: 0,
                errors: 0,
                connection_errors: 0,
                statuses: BTreeMap::new(),
                latency: LatencyHistogram::new(),
                corrected: LatencyHistogram::new(),
                send_lag: LatencyHistogram::new(),
            };
            let mut conn: Option<HttpConn> = None;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let due = if rate > 0.0 {
                    start + Duration::from_secs_f64(i as f64 / rate)
                } else {
                    Instant::now()
                };
                if due >= deadline {
                    break;
                }
                sleep_until(due).await;
                let c = match conn.as_mut() {
                    Some(c) if c.is_reusable() => c,
                    _ => match HttpConn::connect(addr, token.as_deref()).await {
                        Ok(c) => conn.insert(c),
                        Err(_) => {
                            t.connection_errors += 1;
                            t.errors += 1;
                            t.requests += 1;
                            conn = None;
                            // Do not spin on a refused connection.
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    },
                };
                let sent = Instant::now();
                let outcome = request.call(c, i).await;
                let done = Instant::now();
                t.requests += 1;
                match outcome {
                    Outcome::Status(s) => {
                        *t.statuses.entry(s).or_insert(0) += 1;
                        if (200..300).contains(&s) {
                            t.ok += 1;
                        } else {
                            t.errors += 1;
                        }
                    }
                    Outcome::Failed => t.errors += 1,
                    Outcome::ConnectionError => {
                        t.errors += 1;
                        t.connection_errors += 1;
                        conn = None;
                    }
                }
                t.latency.record(done - sent);
                if rate > 0.0 {
                    t.corrected.record(done.saturating_duration_since(due));
                    t.send_lag.record(sent.saturating_duration_since(due));
                }
            }
            t
        }));
    }
    let mut out = LoadResult {
        target_rate: plan.rate,
        connections: plan.connections.max(1),
        ..LoadResult::default()
    };
    let mut latency = LatencyHistogram::new();
    let mut corrected = LatencyHistogram::new();
    let mut send_lag = LatencyHistogram::new();
    for task in tasks {
        let Ok(t) = task.await else { continue };
        out.requests += t.requests;
        out.ok += t.ok;
        out.errors += t.errors;
        out.connection_errors += t.connection_errors;
        for (s, n) in t.statuses {
            *out.statuses.entry(s).or_insert(0) += n;
        }
        latency.merge(&t.latency);
        corrected.merge(&t.corrected);
        send_lag.merge(&t.send_lag);
    }
    out.elapsed_s = start.elapsed().as_secs_f64();
    out.achieved_per_s = out.requests as f64 / out.elapsed_s.max(1e-9);
    out.latency = latency.summary();
    out.corrected = corrected.summary();
    out.send_lag = send_lag.summary();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A keep-alive server answering every request with 200 (or 500 for
    /// paths containing "bad").
    async fn server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let Ok(n) = s.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let bad = String::from_utf8_lossy(&buf[..end]).contains("bad");
                            buf.drain(..end + 4);
                            let reply: &[u8] = if bad {
                                b"HTTP/1.1 500 X\r\ncontent-length: 0\r\n\r\n"
                            } else {
                                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                            };
                            if s.write_all(reply).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn open_loop_keeps_the_rate_and_counts_statuses() {
        let addr = server().await;
        let plan = LoadPlan {
            rate: 500.0,
            connections: 4,
            duration: Duration::from_millis(1000),
            token: None,
        };
        let req = Arc::new(Get(|i: u64| {
            if i.is_multiple_of(10) {
                "/bad".to_owned()
            } else {
                format!("/ok/{i}")
            }
        }));
        let r = run(addr, &plan, req).await;
        assert!((450..=510).contains(&r.requests), "{r:?}");
        assert_eq!(r.requests, r.ok + r.errors);
        assert_eq!(
            r.statuses.get(&500).copied().unwrap_or(0),
            r.requests.div_ceil(10)
        );
        assert_eq!(r.latency.count, r.requests);
        assert_eq!(r.corrected.count, r.requests);
        assert!(r.latency.p50_ms > 0.0 && r.latency.p50_ms <= r.latency.p99_ms);
        assert!(r.corrected.p99_ms >= r.latency.p50_ms);
    }

    #[tokio::test]
    async fn closed_loop_goes_as_fast_as_it_can_and_survives_refusals() {
        let addr = server().await;
        let plan = LoadPlan {
            rate: 0.0,
            connections: 2,
            duration: Duration::from_millis(300),
            token: Some("t".to_owned()),
        };
        let r = run(addr, &plan, Arc::new(Get(|_| "/".to_owned()))).await;
        assert!(r.ok > 100, "{r:?}");
        assert_eq!(r.corrected.count, 0);
        // Nobody listens: every attempt is a connection error, none hangs.
        let port = crate::loopback::free_port().expect("port");
        let r = run(
            SocketAddr::from(([127, 0, 0, 1], port)),
            &plan,
            Arc::new(Get(|_| "/".to_owned())),
        )
        .await;
        assert_eq!(r.ok, 0);
        assert!(r.connection_errors > 0 && r.connection_errors == r.errors);
    }
}
