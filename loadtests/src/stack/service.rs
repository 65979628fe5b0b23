//! One service under test (`iot-ingest`, `iot-projector`, `iot-api`) as a
//! child process: started with its environment, its output in a log file,
//! waited on until its `/health` answers 200, stopped by process id (and
//! always killed when dropped, so an error never leaves services behind).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::time::{Instant, sleep};

use crate::stack::http::HttpConn;

/// A running service.
#[derive(Debug)]
pub struct ServiceProcess {
    name: String,
    child: Child,
    http: SocketAddr,
    log: PathBuf,
    exited: bool,
}

impl ServiceProcess {
    /// Starts `bin` as `name` with `env` on top of this process's
    /// environment, less what would configure the service behind the
    /// scenario's back (`RUST_LOG`, `REDIS_URL`, `DATABASE_URL`,
    /// `SERVER_ID`, `IOT_CONFIG` and every other `IOT_*` variable, such as
    /// `IOT_BIN_DIR`, which a service would refuse as an unknown key),
    /// writing stdout and stderr to `{log_dir}/{name}.log`.
    pub fn spawn(
        name: &str,
        bin: &Path,
        env: &[(String, String)],
        http: SocketAddr,
        log_dir: &Path,
    ) -> anyhow::Result<ServiceProcess> {
        let log = log_dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let err = out
            .try_clone()
            .with_context(|| format!("cannot open {} twice", log.display()))?;
        let mut cmd = Command::new(bin);
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if k.starts_with("IOT_")
                || matches!(
                    k.as_ref(),
                    "RUST_LOG" | "REDIS_URL" | "DATABASE_URL" | "SERVER_ID"
                )
            {
                cmd.env_remove(&key);
            }
        }
        let child = cmd
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start {name} ({})", bin.display()))?;
        Ok(ServiceProcess {
            name: name.to_owned(),
            child,
            http,
            log,
            exited: false,
        })
    }

    /// Its name (`ingest-1`, `projector`, `api`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its HTTP address (`/health`, `/metrics`).
    pub fn http_addr(&self) -> SocketAddr {
        self.http
    }

    /// Its log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        !self.exited && matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits until `GET /health` answers 200, the process exits (an error
    /// with the end of its log) or `limit` passes.
    pub async fn wait_healthy(&mut self, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.exited = true;
                bail!(
                    "{} exited at start with {status}; the end of {}:\n{}",
                    self.name,
                    self.log.display(),
                    self.log_tail(20)
                );
            }
            let last = match HttpConn::connect(self.http, None).await {
                Ok(mut c) => match c
                    .request_within(Duration::from_secs(2), "GET", "/health", None)
                    .await
                {
                    Ok(r) if r.status == 200 => return Ok(()),
                    Ok(r) => format!(
                        "status {}: {}",
                        r.status,
                        String::from_utf8_lossy(&r.body[..r.body.len().min(300)])
                    ),
                    Err(e) => e.to_string(),
                },
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                bail!(
                    "{} did not answer /health with 200 on {} within {limit:?} (last: {last}); the end of {}:\n{}",
                    self.name,
                    self.http,
                    self.log.display(),
                    self.log_tail(20)
                );
            }
            sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL, then reaps it.
    pub fn kill(&mut self) {
        if self.exited {
            return;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.exited = true;
    }

    /// SIGTERM; waits up to `limit` for it to exit, then SIGKILL.
    pub async fn terminate(&mut self, limit: Duration) {
        if self.exited {
            return;
        }
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                self.exited = true;
                return;
            }
            sleep(Duration::from_millis(20)).await;
        }
        self.kill();
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
