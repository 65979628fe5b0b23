//! Test helpers shared by every crate's tests.
//!
//! - [`RedisServer`]: a private `redis-server` on a free loopback port,
//!   stopped by its process id when dropped (or on demand, to test outages).
//! - [`TestDb`]: a PostgreSQL database of its own for one test, dropped after.
//! - [`PgServer`]: a private PostgreSQL cluster, for tests that stop the database.
//! - [`eventually`]: poll a condition until it holds or a deadline passes;
//!   tests wait on conditions, never on fixed sleeps.
//! - [`TestDevice`]: a raw MQTT connection (the `iot-mqtt` codec over TCP)
//!   for tests that send what a real client never would.
//! - [`ServiceProcess`]: a service binary as a child process, to signal or kill.
//! - [`TcpProxy`]: a TCP proxy a test can cut, to partition one service
//!   from Redis while the others still reach it.
//! - [`free_port`], [`unique_prefix`] and [`http_get`].
//!
//! Helpers panic with a clear message when the environment cannot provide
//! what a test needs (no redis-server, no PostgreSQL): a test that cannot run
//! must fail, not pass silently.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod device;
mod pg_server;
mod postgres;
mod process;
mod proxy;
mod redis;
mod wait;

pub use device::{TestDevice, connect_packet, publish_packet};
pub use pg_server::PgServer;
pub use postgres::TestDb;
pub use process::{ServiceProcess, check_service_binary};
pub use proxy::TcpProxy;
pub use redis::{RedisCli, RedisServer};
pub use wait::{eventually, eventually_sync};

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("cannot bind an ephemeral port on 127.0.0.1")
}

/// A key prefix no other test uses, such as `t3f2a9c1:`.
pub fn unique_prefix() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("t{}:", &id[..8])
}

/// A minimal blocking `GET http://{addr}{path}` (HTTP/1.0, no body sent):
/// returns the status code and the body, or `None` if nothing answered.
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .ok()?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf);
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((code, body))
}
