//! A private Mosquitto broker, the reference for idle-connection memory
//! and connect rate.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;

use crate::loopback::free_port;

/// Debian's Mosquitto.
pub const DEFAULT_BIN: &str = "/usr/sbin/mosquitto";

/// A `mosquitto` on 127.0.0.1 and a free port with a generated config (no
/// connection limit, no persistence, anonymous), killed when dropped.
///
/// It inherits this process's open-file limit: call
/// [`crate::sim::raise_fd_limit`] first so it can hold as many connections
/// as the machine allows one process.
#[derive(Debug)]
pub struct MosquittoProcess {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl MosquittoProcess {
    /// Whether `bin` exists.
    pub fn available(bin: &Path) -> bool {
        bin.is_file()
    }

    /// The generated configuration for `port`.
    pub fn config(port: u16) -> String {
        format!(
            "listener {port} 127.0.0.1\n\
             allow_anonymous true\n\
             max_connections -1\n\
             persistence false\n\
             log_dest stderr\n\
             log_type error\n\
             log_type warning\n"
        )
    }

    /// Starts `bin` and waits until it listens.
    pub async fn start(bin: &Path) -> anyhow::Result<MosquittoProcess> {
        let dir = tempfile::tempdir().context("cannot create a temp dir for mosquitto")?;
        let port = free_port().context("no free port on 127.0.0.1")?;
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(&conf, Self::config(port)).context("cannot write mosquitto.conf")?;
        let log = std::fs::File::create(dir.path().join("mosquitto.log"))
            .context("cannot create mosquitto.log")?;
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| {
                format!(
                    "cannot run {} (apt-get install mosquitto, or pass --mosquitto-bin)",
                    bin.display()
                )
            })?;
        let mut me = MosquittoProcess { child, port, dir };
        if let Err(e) =
            super::wait_for_port("mosquitto", port, &mut me.child, Duration::from_secs(10)).await
        {
            let log = std::fs::read_to_string(me.log_path()).unwrap_or_default();
            return Err(e.context(format!("mosquitto log: {}", log.trim())));
        }
        Ok(me)
    }

    /// `127.0.0.1:{port}`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The process id (for memory figures).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Mosquitto's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("mosquitto.log")
    }
}

impl Drop for MosquittoProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
