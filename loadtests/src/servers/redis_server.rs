//! A private redis-server.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;

use crate::loopback::free_port;

/// A `redis-server` on 127.0.0.1 and a free port, without persistence,
/// killed when dropped.
#[derive(Debug)]
pub struct RedisProcess {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl RedisProcess {
    /// Starts `bin` (e.g. `redis-server`) and waits until it listens.
    pub async fn start(bin: &str) -> anyhow::Result<RedisProcess> {
        let dir = tempfile::tempdir().context("cannot create a temp dir for redis-server")?;
        let port = free_port().context("no free port on 127.0.0.1")?;
        let child = Command::new(bin)
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--maxclients", "10000", "--loglevel", "warning"])
            .arg("--dir")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| {
                format!("cannot run {bin} (install redis-server or pass --redis-url)")
            })?;
        let mut me = RedisProcess {
            child,
            port,
            _dir: dir,
        };
        super::wait_for_port("redis-server", port, &mut me.child, Duration::from_secs(10)).await?;
        Ok(me)
    }

    /// `redis://127.0.0.1:{port}/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// The process id (for CPU and memory figures).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
