//! A private redis-server process per test.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` on 127.0.0.1 and a free port, with no persistence, killed
/// by pid on drop. [`stop`](Self::stop) and [`start_again`](Self::start_again)
/// simulate an outage on the same port.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    /// Append-only file with `appendfsync always`: every acknowledged write
    /// survives a SIGKILL and a restart.
    persistent: bool,
    /// Cluster mode, one node serving every slot.
    cluster: bool,
}

fn binary() -> String {
    std::env::var("REDIS_SERVER_BIN").unwrap_or_else(|_| "redis-server".to_owned())
}

fn pings(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    ) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers PING. It
    /// keeps nothing on disk: a restart comes back empty.
    pub fn start() -> Self {
        Self::start_with(false, false)
    }

    /// Like [`start`](Self::start), but the server keeps an append-only file
    /// fsynced on every write, so [`stop`](Self::stop) (SIGKILL) and
    /// [`start_again`](Self::start_again) keep every acknowledged write: a
    /// Redis deployed with persistence.
    pub fn start_persistent() -> Self {
        Self::start_with(true, false)
    }

    /// A Redis Cluster of one node that serves all 16,384 slots: a plain
    /// client works against it, but every command (and every script or
    /// function) that touches keys of more than one hash slot fails with
    /// `CROSSSLOT`, as on a real cluster. Only database 0 exists.
    pub fn start_single_node_cluster() -> Self {
        let server = Self::start_with(false, true);
        let added = server
            .cli()
            .raw(&["CLUSTER", "ADDSLOTSRANGE", "0", "16383"]);
        assert!(added.starts_with("+OK"), "CLUSTER ADDSLOTSRANGE: {added}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !server
            .cli()
            .raw(&["CLUSTER", "INFO"])
            .contains("cluster_state:ok")
        {
            assert!(
                Instant::now() < deadline,
                "the one-node cluster did not reach cluster_state:ok"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    fn start_with(persistent: bool, cluster: bool) -> Self {
        let mut dir = tempfile::tempdir().expect("cannot create a temp dir for redis-server");
        for _ in 0..5 {
            let port = crate::free_port();
            let mut server = Self {
                child: None,
                port,
                dir,
                persistent,
                cluster,
            };
            if server.spawn() {
                return server;
            }
            dir = std::mem::replace(
                &mut server.dir,
                tempfile::tempdir().expect("cannot create a temp dir"),
            );
        }
        panic!(
            "redis-server did not start on any of 5 free ports (is it installed? set REDIS_SERVER_BIN)"
        );
    }

    fn spawn(&mut self) -> bool {
        let (appendonly, fsync) = if self.persistent {
            ("yes", "always")
        } else {
            ("no", "everysec")
        };
        let cluster_args: Vec<String> = if self.cluster {
            vec![
                "--cluster-enabled".into(),
                "yes".into(),
                "--cluster-config-file".into(),
                self.dir.path().join("nodes.conf").display().to_string(),
            ]
        } else {
            Vec::new()
        };
        let child = Command::new(binary())
            .args(&cluster_args)
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
                "--save",
                "",
                "--appendonly",
                appendonly,
                "--appendfsync",
                fsync,
                "--dir",
                &self.dir.path().display().to_string(),
                "--maxclients",
                "10000",
                "--loglevel",
                "warning",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e} (install redis-server)", binary()));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if pings(self.port) {
                return true;
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(_)) = c.try_wait()
            {
                self.child = None;
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop();
        false
    }

    /// `redis://127.0.0.1:{port}/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// `127.0.0.1:{port}`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server (SIGKILL by pid) and waits for it to exit. Its data
    /// is gone, unless it was started with
    /// [`start_persistent`](Self::start_persistent).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port (empty, or with what it had
    /// written if persistent) and waits for PING.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "redis-server is still running");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.spawn() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("redis-server did not start again on port {}", self.port);
    }

    /// A synchronous client connection, for assertions.
    pub fn cli(&self) -> RedisCli {
        RedisCli { port: self.port }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs `redis-cli`-like commands with a minimal RESP client, for tests that
/// want to look at Redis without an async runtime.
pub struct RedisCli {
    port: u16,
}

impl RedisCli {
    /// Sends one command and returns the raw RESP reply.
    pub fn raw(&self, args: &[&str]) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect to test redis");
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes()).expect("write to test redis");
        s.set_read_timeout(Some(Duration::from_secs(5))).ok();
        let mut out = Vec::new();
        let mut buf = [0u8; 65536];
        // Read until the reply looks complete (good enough for small replies).
        loop {
            let n = s.read(&mut buf).expect("read from test redis");
            out.extend_from_slice(&buf[..n]);
            if n == 0 || out.ends_with(b"\r\n") && n < buf.len() {
                break;
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}
