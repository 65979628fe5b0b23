//! Service binaries as child processes, for tests that signal or kill them.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A running service binary whose stderr is collected.
pub struct ServiceProcess {
    child: Child,
    stderr: Arc<Mutex<String>>,
}

impl ServiceProcess {
    /// Starts `bin` with `args` and extra environment `env` (on top of this
    /// process's environment, minus variables starting with `IOT_`, and
    /// minus `SERVER_ID`, `REDIS_URL` and `DATABASE_URL`, so the test decides).
    pub fn spawn(bin: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, _) in std::env::vars() {
            if k.starts_with("IOT_")
                || matches!(k.as_str(), "SERVER_ID" | "REDIS_URL" | "DATABASE_URL")
            {
                cmd.env_remove(k);
            }
        }
        cmd.envs(env.iter().copied());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
        let stderr = Arc::new(Mutex::new(String::new()));
        if let Some(err) = child.stderr.take() {
            let sink = stderr.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    let mut s = sink.lock().unwrap();
                    s.push_str(&line);
                    s.push('\n');
                }
            });
        }
        Self { child, stderr }
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything written to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: Signal) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), signal);
    }

    /// SIGTERM.
    pub fn terminate(&self) {
        self.signal(Signal::SIGTERM);
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls `GET http://{addr}{path}` until it answers 200, or panics with
    /// the process's stderr after `timeout`.
    pub fn wait_http_ok(&mut self, addr: &str, path: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(200) = crate::http_get(addr, path).map(|(code, _)| code) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "service exited with {status} before {path} answered; stderr:\n{}",
                    self.stderr()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "{path} on {addr} did not answer 200 within {timeout:?}; stderr:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The start-up contract every service binary keeps, checked end to end:
/// `--help` lists the options and config keys; with a private Redis the
/// service answers `/health` and `/metrics`, and SIGTERM stops it with exit
/// code 0, as SIGINT (Ctrl-C) does; without Redis (unreachable or disabled) it exits non-zero with one
/// line saying Redis is required; a bad config key exits 2 naming the key.
pub fn check_service_binary(bin: &str) {
    // --help
    let out = Command::new(bin)
        .arg("--help")
        .output()
        .expect("run --help");
    assert!(out.status.success(), "--help failed");
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "--config",
        "session.heartbeat_timeout",
        "redis.addr",
        "api.read_tokens",
    ] {
        assert!(help.contains(needle), "--help lacks {needle}:\n{help}");
    }

    let redis = crate::RedisServer::start();
    let mqtt = format!("127.0.0.1:{}", crate::free_port());
    let url = redis.url();
    // SIGTERM (an orchestrator) and SIGINT (Ctrl-C) both stop it cleanly.
    for signal in [Signal::SIGTERM, Signal::SIGINT] {
        let http = format!("127.0.0.1:{}", crate::free_port());
        let env = [
            ("REDIS_URL", url.as_str()),
            ("IOT_HTTP_LISTEN", http.as_str()),
            ("IOT_MQTT_LISTEN", mqtt.as_str()),
            ("SERVER_ID", "bin-test-1"),
            ("IOT_SHUTDOWN_GRACE", "5s"),
        ];
        let mut svc = ServiceProcess::spawn(bin, &[], &env);
        svc.wait_http_ok(&http, "/health", Duration::from_secs(30));
        let (code, body) = crate::http_get(&http, "/health").expect("GET /health");
        assert_eq!(code, 200);
        assert!(body.contains("\"server_id\":\"bin-test-1\""), "{body}");
        let (code, metrics) = crate::http_get(&http, "/metrics").expect("GET /metrics");
        assert_eq!(code, 200);
        assert!(metrics.contains("iot_build_info"), "{metrics}");
        let (code, _) = crate::http_get(&http, "/health/live").expect("GET /health/live");
        assert_eq!(code, 200);
        svc.signal(signal);
        let status = svc.wait_exit(Duration::from_secs(15)).unwrap_or_else(|| {
            panic!("no exit within 15 s of {signal}; stderr:\n{}", svc.stderr())
        });
        assert!(
            status.success(),
            "exit {status} after {signal}; stderr:\n{}",
            svc.stderr()
        );
    }

    // Redis required: unreachable, then disabled.
    let dead = format!("redis://127.0.0.1:{}/0", crate::free_port());
    let http2 = format!("127.0.0.1:{}", crate::free_port());
    for (extra, expect) in [
        (
            ("REDIS_URL", dead.as_str()),
            "Redis is required: cannot reach",
        ),
        (
            ("IOT_REDIS_ENABLED", "false"),
            "Redis is required: redis.enabled is false",
        ),
    ] {
        let mut env: Vec<(&str, &str)> = vec![
            ("IOT_HTTP_LISTEN", http2.as_str()),
            ("IOT_MQTT_LISTEN", mqtt.as_str()),
            ("IOT_REDIS_DIAL_TIMEOUT", "1s"),
        ];
        env.push(extra);
        let mut svc = ServiceProcess::spawn(bin, &[], &env);
        let status = svc
            .wait_exit(Duration::from_secs(15))
            .expect("exit without Redis");
        assert!(!status.success(), "started without Redis");
        // Give the stderr reader a moment to drain the pipe.
        let err = crate::eventually_sync(Duration::from_secs(5), "stderr", || {
            let s = svc.stderr();
            if s.contains(expect) { Ok(s) } else { Err(s) }
        });
        let lines: Vec<&str> = err
            .lines()
            .filter(|l| l.contains("Redis is required"))
            .collect();
        assert_eq!(lines.len(), 1, "one clear line expected:\n{err}");
    }

    // A bad key names itself and the variable.
    let mut svc = ServiceProcess::spawn(bin, &[], &[("IOT_SESSION_HEARTBEAT_TIMEOUT", "soon")]);
    let status = svc
        .wait_exit(Duration::from_secs(15))
        .expect("exit on bad config");
    assert_eq!(status.code(), Some(2));
    let err = crate::eventually_sync(Duration::from_secs(5), "stderr", || {
        let s = svc.stderr();
        if s.contains("session.heartbeat_timeout") {
            Ok(s)
        } else {
            Err(s)
        }
    });
    assert!(err.contains("IOT_SESSION_HEARTBEAT_TIMEOUT"), "{err}");
}
