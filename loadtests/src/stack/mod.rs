//! The system under test, started by a scenario for itself: a private
//! redis-server, N `iot-ingest` processes, one `iot-projector` and one
//! `iot-api`, each on free loopback ports with its own `SERVER_ID`, all
//! killed when the [`Stack`] is dropped (on success and on error alike).
//!
//! Services are configured through environment overrides only
//! (`REDIS_URL`, `SERVER_ID`, `IOT_<SECTION>_<KEY>`); a scenario adds its
//! own (a policy, a liveness TTL) and `--service-env` adds anything else.

pub mod api;
pub mod binaries;
pub mod http;
pub mod service;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use serde::{Deserialize, Serialize};

use crate::baseline::redis_target::parse_info_cpu;
use crate::loopback::free_port;
use crate::proc_stat;
use crate::servers::RedisProcess;

pub use api::ApiClient;
pub use binaries::ServiceBins;
pub use service::ServiceProcess;

/// Read token the stack's api accepts.
pub const READ_TOKEN: &str = "bench-read-token";
/// Write token the stack's api accepts.
pub const WRITE_TOKEN: &str = "bench-write-token";

/// How long a service may take to answer `/health` at start.
const START_LIMIT: Duration = Duration::from_secs(60);

fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// Options every scenario shares: where the services are and how they run.
#[derive(Debug, Clone, Args)]
pub struct StackArgs {
    /// Directory holding iot-ingest, iot-projector and iot-api (default:
    /// beside this executable). Build them with `cargo build --release
    /// --bins`.
    #[arg(long, env = "IOT_BIN_DIR")]
    pub bin_dir: Option<PathBuf>,

    /// redis-server executable for the private Redis.
    #[arg(long, default_value = "redis-server")]
    pub redis_server_bin: String,

    /// Log level of the services (`IOT_LOG_LEVEL`): `warn` keeps logging
    /// out of the figures; `info` adds a tracing span per connection.
    #[arg(long, default_value = "warn")]
    pub log_level: String,

    /// Keep the services' logs in this directory (default: a temporary
    /// directory, removed at the end).
    #[arg(long)]
    pub logs: Option<PathBuf>,

    /// Extra environment for every service, `KEY=VALUE` (repeatable), e.g.
    /// `--service-env IOT_STREAMS_FLUSH_INTERVAL=1ms`.
    #[arg(long = "service-env", value_parser = parse_kv)]
    pub env: Vec<(String, String)>,
}

impl Default for StackArgs {
    fn default() -> Self {
        Self {
            bin_dir: None,
            redis_server_bin: "redis-server".to_owned(),
            log_level: "warn".to_owned(),
            logs: None,
            env: Vec::new(),
        }
    }
}

/// What a scenario needs running.
#[derive(Debug, Clone)]
pub struct StackPlan {
    /// Ingest processes.
    pub ingests: u32,
    /// Start the projector.
    pub projector: bool,
    /// Start the api (needs the projector to be useful).
    pub api: bool,
    /// Environment every service gets (after the stack's own, before
    /// `--service-env`).
    pub env: Vec<(String, String)>,
}

impl StackPlan {
    /// `ingests` ingest processes, a projector and an api.
    pub fn full(ingests: u32) -> Self {
        Self {
            ingests,
            projector: true,
            api: true,
            env: Vec::new(),
        }
    }

    /// Adds `KEY=VALUE` to every service's environment.
    pub fn with_env(mut self, key: &str, value: impl ToString) -> Self {
        self.env.push((key.to_owned(), value.to_string()));
        self
    }
}

/// One ingest instance of the stack.
#[derive(Debug)]
pub struct Ingest {
    /// Its `SERVER_ID`.
    pub server_id: String,
    /// Its MQTT listener (`127.0.0.1:port`).
    pub mqtt: SocketAddr,
    /// The process.
    pub process: ServiceProcess,
}

/// The running system under test.
#[derive(Debug)]
pub struct Stack {
    redis: RedisProcess,
    redis_client: redis::Client,
    /// The ingest instances.
    pub ingests: Vec<Ingest>,
    /// The projector, if started.
    pub projector: Option<ServiceProcess>,
    /// The api, if started.
    pub api: Option<ServiceProcess>,
    api_client: Option<ApiClient>,
    bins: ServiceBins,
    log_dir: PathBuf,
    _temp_logs: Option<tempfile::TempDir>,
    /// The environment every service got (the scenario's and
    /// `--service-env`), for the report.
    pub env: Vec<(String, String)>,
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

impl Stack {
    /// The services' `streams.shards` (from `IOT_STREAMS_SHARDS` when the
    /// scenario or `--service-env` set it, else the default).
    pub fn shards(&self) -> u16 {
        self.env
            .iter()
            .rev()
            .find(|(k, _)| k == "IOT_STREAMS_SHARDS")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or_else(|| iot_core::config::StreamsConfig::default().shards)
    }

    /// Starts Redis, then the projector and the api, then the ingests, and
    /// waits until each answers `/health`.
    pub async fn start(args: &StackArgs, plan: &StackPlan) -> anyhow::Result<Stack> {
        let bins = ServiceBins::locate(args.bin_dir.as_deref())?;
        // Services inherit the raised limit (an ingest raises it again).
        crate::sim::raise_fd_limit();
        let (log_dir, temp) = match &args.logs {
            Some(d) => {
                std::fs::create_dir_all(d)
                    .with_context(|| format!("cannot create {}", d.display()))?;
                (d.clone(), None)
            }
            None => {
                let t = tempfile::tempdir().context("cannot create a temp dir for logs")?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        let redis = RedisProcess::start(&args.redis_server_bin).await?;
        let redis_client = redis::Client::open(redis.url().as_str())?;
        let mut env = vec![
            ("REDIS_URL".to_owned(), redis.url()),
            ("IOT_LOG_LEVEL".to_owned(), args.log_level.clone()),
            ("IOT_API_READ_TOKENS".to_owned(), READ_TOKEN.to_owned()),
            ("IOT_API_WRITE_TOKENS".to_owned(), WRITE_TOKEN.to_owned()),
            ("IOT_MQTT_CONNECT_RATE_PER_IP".to_owned(), "0".to_owned()),
            ("IOT_SHUTDOWN_GRACE".to_owned(), "5s".to_owned()),
            // Many processes share one Redis: open few connections up front.
            ("IOT_REDIS_MIN_IDLE_CONNS".to_owned(), "2".to_owned()),
        ];
        env.extend(plan.env.iter().cloned());
        env.extend(args.env.iter().cloned());
        let mut me = Stack {
            redis,
            redis_client,
            ingests: Vec::new(),
            projector: None,
            api: None,
            api_client: None,
            bins,
            log_dir,
            _temp_logs: temp,
            env: plan.env.iter().chain(args.env.iter()).cloned().collect(),
        };
        if plan.projector {
            let http = loopback(free_port()?);
            let mut p = ServiceProcess::spawn(
                "projector",
                &me.bins.projector,
                &with(
                    &env,
                    &[
                        ("SERVER_ID", "bench-projector"),
                        ("IOT_HTTP_LISTEN", &http.to_string()),
                    ],
                ),
                http,
                &me.log_dir,
            )?;
            p.wait_healthy(START_LIMIT).await?;
            me.projector = Some(p);
        }
        if plan.api {
            let http = loopback(free_port()?);
            let mut p = ServiceProcess::spawn(
                "api",
                &me.bins.api,
                &with(
                    &env,
                    &[
                        ("SERVER_ID", "bench-api"),
                        ("IOT_HTTP_LISTEN", &http.to_string()),
                    ],
                ),
                http,
                &me.log_dir,
            )?;
            p.wait_healthy(START_LIMIT).await?;
            me.api_client = Some(ApiClient::new(http, READ_TOKEN, WRITE_TOKEN));
            me.api = Some(p);
        }
        // Start the ingests together, then wait for each.
        for k in 1..=plan.ingests {
            me.ingests.push(me.spawn_ingest(k, &env)?);
        }
        for idx in 0..me.ingests.len() {
            let mut respawned = 0;
            loop {
                match me.ingests[idx].process.wait_healthy(START_LIMIT).await {
                    Ok(()) => break,
                    // A port picked for it was taken before it could bind it
                    // (ports are picked before the processes start, and the
                    // services' own connections draw from the same range):
                    // start it again on other ports.
                    Err(_)
                        if respawned < 3
                            && me.ingests[idx]
                                .process
                                .log_tail(5)
                                .contains("Address already in use") =>
                    {
                        respawned += 1;
                        let k = u32::try_from(idx + 1).unwrap_or(u32::MAX);
                        me.ingests[idx] = me.spawn_ingest(k, &env)?;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(me)
    }

    fn spawn_ingest(&self, k: u32, env: &[(String, String)]) -> anyhow::Result<Ingest> {
        let server_id = format!("bench-ingest-{k}");
        let http = loopback(free_port()?);
        let mqtt = loopback(free_port()?);
        let process = ServiceProcess::spawn(
            &format!("ingest-{k}"),
            &self.bins.ingest,
            &with(
                env,
                &[
                    ("SERVER_ID", &server_id),
                    ("IOT_HTTP_LISTEN", &http.to_string()),
                    ("IOT_MQTT_LISTEN", &mqtt.to_string()),
                ],
            ),
            http,
            &self.log_dir,
        )?;
        Ok(Ingest {
            server_id,
            mqtt,
            process,
        })
    }

    /// The MQTT targets of the ingests, in order (`127.0.0.1:port`).
    pub fn mqtt_targets(&self) -> Vec<String> {
        self.ingests.iter().map(|i| i.mqtt.to_string()).collect()
    }

    /// The api client (an error if the plan had no api).
    pub fn api(&self) -> anyhow::Result<&ApiClient> {
        self.api_client
            .as_ref()
            .context("this scenario's stack has no api")
    }

    /// The private Redis URL.
    pub fn redis_url(&self) -> String {
        self.redis.url()
    }

    /// A client of the private Redis.
    pub fn redis_client(&self) -> &redis::Client {
        &self.redis_client
    }

    /// A new multiplexed connection to the private Redis.
    pub async fn redis_conn(&self) -> anyhow::Result<redis::aio::MultiplexedConnection> {
        self.redis_client
            .get_multiplexed_async_connection()
            .await
            .context("cannot connect to the stack's Redis")
    }

    /// The services' logs directory.
    pub fn log_dir(&self) -> &std::path::Path {
        &self.log_dir
    }

    /// Process ids by role: `redis`, `ingest` (all of them), `projector`,
    /// `api`.
    pub fn pids(&self) -> Vec<(&'static str, u32)> {
        let mut out = vec![("redis", self.redis.pid())];
        out.extend(self.ingests.iter().map(|i| ("ingest", i.process.pid())));
        if let Some(p) = &self.projector {
            out.push(("projector", p.pid()));
        }
        if let Some(p) = &self.api {
            out.push(("api", p.pid()));
        }
        out
    }

    /// Redis `INFO` sections as one text.
    pub async fn redis_info(&self, section: &str) -> anyhow::Result<String> {
        let mut c = self.redis_conn().await?;
        Ok(redis::cmd("INFO").arg(section).query_async(&mut c).await?)
    }

    /// Redis's slow log (`SLOWLOG GET`): the slowest recent commands,
    /// `(µs, command and first arguments)`, slowest first.
    pub async fn redis_slowlog(&self, n: usize) -> anyhow::Result<Vec<(u64, String)>> {
        let mut c = self.redis_conn().await?;
        let entries: Vec<redis::Value> = redis::cmd("SLOWLOG")
            .arg("GET")
            .arg(n.max(1) * 4)
            .query_async(&mut c)
            .await?;
        let mut out = Vec::new();
        for e in entries {
            let redis::Value::Array(fields) = e else {
                continue;
            };
            let us = match fields.get(2) {
                Some(redis::Value::Int(v)) => u64::try_from(*v).unwrap_or(0),
                _ => 0,
            };
            let args = match fields.get(3) {
                Some(redis::Value::Array(a)) => a
                    .iter()
                    .take(3)
                    .map(|v| match v {
                        redis::Value::BulkString(b) => {
                            String::from_utf8_lossy(&b[..b.len().min(40)]).into_owned()
                        }
                        other => format!("{other:?}"),
                    })
                    .collect::<Vec<_>>()
                    .join(" "),
                _ => String::new(),
            };
            out.push((us, args));
        }
        out.sort_by_key(|e| std::cmp::Reverse(e.0));
        out.truncate(n);
        Ok(out)
    }

    /// Sums a metric over every ingest's `/metrics` (every ingest must be
    /// running).
    pub async fn ingest_metric(&self, name: &str) -> anyhow::Result<f64> {
        let mut total = 0.0;
        for i in &self.ingests {
            let m = api::scrape(i.process.http_addr()).await?;
            total += m.get(name).copied().unwrap_or(0.0);
        }
        Ok(total)
    }

    /// SIGKILLs ingest `k` (0-based).
    pub fn kill_ingest(&mut self, k: usize) {
        if let Some(i) = self.ingests.get_mut(k) {
            i.process.kill();
        }
    }

    /// Stops every service (SIGTERM, ingests first so they flush), then
    /// Redis goes with the stack.
    pub async fn stop(mut self) {
        for i in &mut self.ingests {
            i.process.terminate(Duration::from_secs(10)).await;
        }
        if let Some(p) = &mut self.api {
            p.terminate(Duration::from_secs(5)).await;
        }
        if let Some(p) = &mut self.projector {
            p.terminate(Duration::from_secs(5)).await;
        }
    }
}

fn with(env: &[(String, String)], extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut out = env.to_vec();
    out.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    out
}

/// CPU and memory of the stack's processes (and any others) over a
/// measurement window, from `/proc` and Redis `INFO`.
#[derive(Debug, Clone)]
pub struct UsageWindow {
    started: tokio::time::Instant,
    pids: Vec<(String, u32)>,
    cpu_before: Vec<f64>,
    redis_cpu_before: f64,
    redis_calls_before: BTreeMap<String, (u64, u64)>,
}

/// What a window measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    /// Wall time of the window, s.
    pub elapsed_s: f64,
    /// CPU seconds per role (user + system, from /proc).
    pub cpu_s: BTreeMap<String, f64>,
    /// CPU seconds per wall second, per role (1.0 = one core).
    pub cpu_cores: BTreeMap<String, f64>,
    /// Resident memory per role at the end, KiB.
    pub rss_kib: BTreeMap<String, u64>,
    /// Redis CPU seconds from INFO CPU (its main thread and the rest).
    pub redis_cpu_s: f64,
    /// Redis calls per command during the window (INFO commandstats).
    pub redis_calls: BTreeMap<String, u64>,
    /// Redis CPU µs spent in each command during the window (INFO
    /// commandstats `usec`; commands called from a script or function
    /// count both in their own line and in the `fcall` line). The rest of
    /// `redis_cpu_s` is the event loop, networking and background work.
    #[serde(default)]
    pub redis_usec: BTreeMap<String, u64>,
}

impl UsageWindow {
    /// Starts a window over the stack's processes plus `extra` (role, pid).
    pub async fn start(stack: &Stack, extra: &[(String, u32)]) -> anyhow::Result<UsageWindow> {
        let mut pids: Vec<(String, u32)> = stack
            .pids()
            .into_iter()
            .map(|(r, p)| (r.to_owned(), p))
            .collect();
        pids.extend(extra.iter().cloned());
        let cpu_before = pids.iter().map(|(_, p)| cpu_of(*p)).collect::<Vec<f64>>();
        Ok(UsageWindow {
            started: tokio::time::Instant::now(),
            cpu_before,
            redis_cpu_before: redis_cpu(stack).await?,
            redis_calls_before: redis_calls(stack).await?,
            pids,
        })
    }

    /// Ends the window.
    pub async fn finish(&self, stack: &Stack) -> anyhow::Result<Usage> {
        let elapsed_s = self.started.elapsed().as_secs_f64();
        let mut u = Usage {
            elapsed_s,
            redis_cpu_s: redis_cpu(stack).await? - self.redis_cpu_before,
            ..Usage::default()
        };
        let calls = redis_calls(stack).await?;
        for (cmd, (n, us)) in calls {
            let (n0, us0) = self.redis_calls_before.get(&cmd).copied().unwrap_or((0, 0));
            if n > n0 {
                u.redis_calls.insert(cmd.clone(), n - n0);
                u.redis_usec.insert(cmd, us.saturating_sub(us0));
            }
        }
        for ((role, pid), before) in self.pids.iter().zip(&self.cpu_before) {
            let d = (cpu_of(*pid) - before).max(0.0);
            *u.cpu_s.entry(role.clone()).or_insert(0.0) += d;
            *u.rss_kib.entry(role.clone()).or_insert(0) += proc_stat::rss_kib(*pid).unwrap_or(0);
        }
        for (role, s) in &u.cpu_s {
            u.cpu_cores.insert(role.clone(), s / elapsed_s.max(1e-9));
        }
        Ok(u)
    }
}

impl Usage {
    /// CPU seconds of all roles together.
    pub fn total_cpu_s(&self) -> f64 {
        self.cpu_s.values().sum()
    }

    /// `redis 0.52 cores, ingest 0.61, ...`.
    pub fn line(&self) -> String {
        self.cpu_cores
            .iter()
            .map(|(r, c)| format!("{r} {c:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn cpu_of(pid: u32) -> f64 {
    proc_stat::cpu_time(pid)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

async fn redis_cpu(stack: &Stack) -> anyhow::Result<f64> {
    parse_info_cpu(&stack.redis_info("CPU").await?).context("INFO CPU has no used_cpu_*")
}

async fn redis_calls(stack: &Stack) -> anyhow::Result<BTreeMap<String, (u64, u64)>> {
    Ok(parse_commandstats(&stack.redis_info("commandstats").await?))
}

/// `cmdstat_xadd:calls=12,usec=30,...` lines -> command -> (calls, usec).
pub fn parse_commandstats(info: &str) -> BTreeMap<String, (u64, u64)> {
    let mut out = BTreeMap::new();
    for line in info.lines() {
        let Some(rest) = line.strip_prefix("cmdstat_") else {
            continue;
        };
        let Some((cmd, fields)) = rest.split_once(':') else {
            continue;
        };
        let field = |name: &str| -> Option<u64> {
            fields
                .split(',')
                .find_map(|f| f.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
        };
        if let Some(c) = field("calls=") {
            out.insert(cmd.to_owned(), (c, field("usec=").unwrap_or(0)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commandstats_and_env_pairs_parse() {
        let info = "# Commandstats\r\ncmdstat_xadd:calls=12,usec=30,usec_per_call=2.5\r\ncmdstat_fcall:calls=3,usec=9\r\n";
        let m = parse_commandstats(info);
        assert_eq!(m["xadd"], (12, 30));
        assert_eq!(m["fcall"], (3, 9));
        assert_eq!(
            parse_kv("IOT_X=1=2").expect("kv"),
            ("IOT_X".to_owned(), "1=2".to_owned())
        );
        assert!(parse_kv("novalue").is_err());
    }
}
