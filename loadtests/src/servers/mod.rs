//! Private server processes for benchmarks: a redis-server and Mosquitto
//! of our own on free loopback ports, killed by process id when dropped.
//!
//! Benchmarks never measure the shared servers of the machine: a private
//! server carries no other load and can be emptied and sized at will.

mod mosquitto;
mod redis_server;

pub use mosquitto::{DEFAULT_BIN as MOSQUITTO_BIN, MosquittoProcess};
pub use redis_server::RedisProcess;

use std::process::Child;
use std::time::Duration;

use anyhow::bail;
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep};

/// Waits until something accepts TCP connections on 127.0.0.1:`port`, or
/// the child exits, or `limit` passes.
async fn wait_for_port(
    what: &str,
    port: u16,
    child: &mut Child,
    limit: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!("{what} exited at start with {status}");
        }
        if Instant::now() >= deadline {
            bail!("{what} did not listen on 127.0.0.1:{port} within {limit:?}");
        }
        sleep(Duration::from_millis(20)).await;
    }
}
