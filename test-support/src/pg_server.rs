//! A private PostgreSQL server per test, for tests that stop and restart the
//! database (outages). Tests that only need a database use [`crate::TestDb`]
//! on the shared local server instead: starting a cluster takes seconds.

use std::process::Command;
use std::time::{Duration, Instant};

/// A PostgreSQL cluster in a temp dir on a free loopback port, trust auth,
/// user `postgres`, database `postgres`. Stopped when dropped.
pub struct PgServer {
    dir: tempfile::TempDir,
    bin: std::path::PathBuf,
    port: u16,
    running: bool,
}

fn bin_dir() -> std::path::PathBuf {
    if let Ok(d) = std::env::var("PG_BIN_DIR") {
        return d.into();
    }
    let mut found: Vec<std::path::PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
        .into_iter()
        .rev()
        .find(|p| p.join("initdb").exists())
        .expect("PostgreSQL server binaries not found under /usr/lib/postgresql (set PG_BIN_DIR)")
}

/// Runs a PostgreSQL tool, as the `postgres` user when we are root
/// (PostgreSQL refuses to run as root).
fn run(bin: &std::path::Path, tool: &str, args: &[&str]) -> std::process::Output {
    let exe = bin.join(tool);
    let mut cmd = if nix::unistd::Uid::effective().is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(&exe);
        c
    } else {
        Command::new(&exe)
    };
    cmd.args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", exe.display()))
}

impl PgServer {
    /// Initialises and starts a cluster; waits until it accepts connections.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir for PostgreSQL");
        if nix::unistd::Uid::effective().is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres"])
                .arg(dir.path())
                .status()
                .expect("chown");
            assert!(status.success(), "chown of the PostgreSQL temp dir failed");
        }
        let bin = bin_dir();
        let data = dir.path().join("data");
        let out = run(
            &bin,
            "initdb",
            &[
                "-D",
                &data.display().to_string(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
            ],
        );
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut server = Self {
            dir,
            bin,
            port: crate::free_port(),
            running: false,
        };
        server.start_again();
        server
    }

    /// `postgres://postgres@127.0.0.1:{port}/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server immediately (like a crash; `pg_ctl -m immediate`).
    pub fn stop(&mut self) {
        if !self.running {
            return;
        }
        let data = self.dir.path().join("data").display().to_string();
        let _ = run(
            &self.bin,
            "pg_ctl",
            &["-D", &data, "-m", "immediate", "-w", "stop"],
        );
        self.running = false;
    }

    /// Starts the (stopped) server again on the same port, keeping its data.
    pub fn start_again(&mut self) {
        assert!(!self.running, "PostgreSQL is running");
        let data = self.dir.path().join("data").display().to_string();
        let sock = self.dir.path().display().to_string();
        let log = self.dir.path().join("server.log").display().to_string();
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {sock} -c fsync=off",
            self.port
        );
        let out = run(
            &self.bin,
            "pg_ctl",
            &["-D", &data, "-l", &log, "-o", &opts, "-w", "start"],
        );
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "PostgreSQL did not listen on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.running = true;
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
    }
}
