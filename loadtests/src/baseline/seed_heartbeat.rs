//! Baseline: the seed's heartbeat path.
//!
//! For each heartbeat, exactly what the seed describes: a synchronous
//! `GET session:device:{phyID}`, decode the JSON, set `last_seen`, then
//! `SETEX session:device:{phyID} <2 x heartbeat timeout> <JSON>`; one device
//! at a time per connection, `--clients` connections in parallel cycling over
//! `--devices` devices. Reports heartbeats per second and the Redis CPU time
//! per heartbeat (INFO CPU before and after), to set against our pipeline at
//! the same device count.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};
use iot_core::PhyId;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::baseline::redis_target::RedisTarget;
use crate::baseline::resp::{Reply, RespConn};
use crate::baseline::seed_session::SeedSession;
use crate::bench_report::BenchReport;
use crate::histogram::{LatencyHistogram, LatencySummary};

/// Options of `iot-bench seed-heartbeat`.
#[derive(Debug, Clone, Args)]
pub struct SeedHeartbeatArgs {
    /// Redis to use (loopback only); default: a private redis-server.
    #[arg(long)]
    pub redis_url: Option<String>,

    /// redis-server executable for the private server.
    #[arg(long, default_value = "redis-server")]
    pub redis_server_bin: String,

    /// Key prefix (default: none on a private server, a unique one on
    /// --redis-url).
    #[arg(long)]
    pub prefix: Option<String>,

    /// Connections in parallel, each doing one heartbeat at a time.
    #[arg(long, default_value_t = 50)]
    pub clients: u32,

    /// Devices the clients cycle over.
    #[arg(long, default_value_t = 10_000)]
    pub devices: u32,

    /// Measured time.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,

    /// Redis client of the benchmark: `raw` (one command at a time on a
    /// socket, cheap enough to saturate Redis) or `redis-rs` (the redis
    /// crate's multiplexed connection; costs more client CPU).
    #[arg(long, value_enum, default_value_t = Client::Raw)]
    pub client: Client,

    /// The seed's heartbeat timeout (keys expire after twice this).
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub heartbeat_timeout: Duration,

    /// Write the JSON report here (`-` for stdout).
    #[arg(long)]
    pub report: Option<PathBuf>,
}

/// The benchmark's Redis client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Client {
    /// [`crate::baseline::resp`]: one command at a time on a socket.
    Raw,
    /// redis-rs's multiplexed connection.
    RedisRs,
}

/// Figures of `seed-heartbeat`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeedHeartbeatResults {
    /// Redis URL (private or given).
    pub redis: String,
    /// redis_version.
    pub redis_version: String,
    /// The benchmark's Redis client.
    pub client: Client,
    /// Parallel connections.
    pub clients: u32,
    /// Devices cycled over.
    pub devices: u32,
    /// Measured seconds.
    pub elapsed_s: f64,
    /// Heartbeats completed (GET + SETEX each).
    pub heartbeats: u64,
    /// Heartbeats that failed (Redis errors).
    pub errors: u64,
    /// Heartbeats per second.
    pub heartbeats_per_s: f64,
    /// GET + SETEX round trip per heartbeat.
    pub latency: LatencySummary,
    /// Redis CPU seconds (user + sys) during the measurement.
    pub redis_cpu_s: f64,
    /// Redis CPU seconds per wall second (1.0: one core saturated).
    pub redis_cpu_utilisation: f64,
    /// Redis CPU microseconds per heartbeat.
    pub redis_cpu_us_per_heartbeat: f64,
    /// This client's CPU microseconds per heartbeat.
    pub client_cpu_us_per_heartbeat: f64,
}

impl SeedHeartbeatResults {
    /// The human summary.
    pub fn summary(&self) -> String {
        format!(
            "seed-heartbeat: {} clients ({:?}) over {} devices for {:.1}s against {} (Redis {})\n  \
             {:.0} heartbeats/s ({} done, {} errors)\n  \
             GET+SETEX {}\n  \
             Redis CPU {:.2}s = {:.0}% of one core, {:.2} us/heartbeat; client CPU {:.2} us/heartbeat\n",
            self.clients,
            self.client,
            self.devices,
            self.elapsed_s,
            self.redis,
            self.redis_version,
            self.heartbeats_per_s,
            self.heartbeats,
            self.errors,
            self.latency.line(),
            self.redis_cpu_s,
            self.redis_cpu_utilisation * 100.0,
            self.redis_cpu_us_per_heartbeat,
            self.client_cpu_us_per_heartbeat,
        )
    }
}

struct Device {
    phy: String,
    key: String,
    conn_id: String,
}

struct ClientResult {
    heartbeats: u64,
    errors: u64,
    latency: LatencyHistogram,
}

/// Runs the baseline.
pub async fn run(args: &SeedHeartbeatArgs) -> anyhow::Result<BenchReport<SeedHeartbeatResults>> {
    anyhow::ensure!(args.clients >= 1, "--clients must be at least 1");
    anyhow::ensure!(args.devices >= 1, "--devices must be at least 1");
    let target = RedisTarget::open(
        args.redis_url.as_deref(),
        &args.redis_server_bin,
        args.prefix.as_deref(),
    )
    .await?;
    let ttl_s = (args.heartbeat_timeout.as_secs() * 2).max(1);
    let server_id = format!("iot-server-bench-{}", uuid::Uuid::new_v4().simple());
    let mut devices = Vec::with_capacity(args.devices as usize);
    for i in 0..args.devices {
        let phy = format!("seed-{i}");
        let key = target.keys.device(&PhyId::new(phy.as_str())?);
        devices.push(Device {
            phy,
            key,
            conn_id: uuid::Uuid::new_v4().to_string(),
        });
    }
    let devices = Arc::new(devices);

    // The seed's Bind: every device has a session before heartbeats start.
    populate(&target, &devices, &server_id, ttl_s).await?;

    let mut conns = Vec::new();
    for _ in 0..args.clients {
        conns.push(match args.client {
            Client::Raw => Conn::Raw(target.resp_conn().await?),
            Client::RedisRs => Conn::Lib(target.conn().await?),
        });
    }
    let cpu_before = target.cpu_seconds().await?;
    let own_before = crate::proc_stat::own_cpu_time().unwrap_or_default();
    let started = Instant::now();
    let deadline = started + args.duration;
    let mut tasks = Vec::new();
    for (c, mut conn) in conns.into_iter().enumerate() {
        let devices = devices.clone();
        let server_id = server_id.clone();
        let clients = args.clients as usize;
        tasks.push(tokio::spawn(async move {
            let mut r = ClientResult {
                heartbeats: 0,
                errors: 0,
                latency: LatencyHistogram::new(),
            };
            let mut i = c % devices.len();
            while Instant::now() < deadline {
                let d = &devices[i];
                let t0 = Instant::now();
                match conn.heartbeat(d, &server_id, ttl_s).await {
                    Ok(()) => {
                        r.latency.record(t0.elapsed());
                        r.heartbeats += 1;
                    }
                    Err(_) => r.errors += 1,
                }
                i = (i + clients) % devices.len();
            }
            r
        }));
    }
    let mut heartbeats = 0;
    let mut errors = 0;
    let mut latency = LatencyHistogram::new();
    for t in tasks {
        let r = t.await?;
        heartbeats += r.heartbeats;
        errors += r.errors;
        latency.merge(&r.latency);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let own_cpu = crate::proc_stat::own_cpu_time()
        .unwrap_or_default()
        .saturating_sub(own_before)
        .as_secs_f64();
    let redis_cpu_s = target.cpu_seconds().await? - cpu_before;
    let per_hb = |s: f64| {
        if heartbeats > 0 {
            s * 1e6 / heartbeats as f64
        } else {
            0.0
        }
    };
    let results = SeedHeartbeatResults {
        redis: target.url().to_owned(),
        redis_version: target.version().await,
        client: args.client,
        clients: args.clients,
        devices: args.devices,
        elapsed_s: elapsed,
        heartbeats,
        errors,
        heartbeats_per_s: heartbeats as f64 / elapsed.max(1e-9),
        latency: latency.summary(),
        redis_cpu_s,
        redis_cpu_utilisation: redis_cpu_s / elapsed.max(1e-9),
        redis_cpu_us_per_heartbeat: per_hb(redis_cpu_s),
        client_cpu_us_per_heartbeat: per_hb(own_cpu),
    };
    if !target.is_private() {
        target.clear().await?;
    }
    Ok(BenchReport::new("seed-heartbeat", results))
}

/// One client connection.
enum Conn {
    Raw(RespConn),
    Lib(redis::aio::MultiplexedConnection),
}

impl Conn {
    /// One heartbeat the seed's way: GET, then SETEX, each awaited.
    async fn heartbeat(&mut self, d: &Device, server_id: &str, ttl_s: u64) -> anyhow::Result<()> {
        let now = iot_core::time::now_ms();
        match self {
            Conn::Raw(c) => {
                let stored = match c.call(&[b"GET", d.key.as_bytes()]).await? {
                    Reply::Bulk(b) => b,
                    _ => None,
                };
                let json =
                    SeedSession::heartbeat(stored.as_deref(), &d.phy, &d.conn_id, server_id, now);
                let ttl = ttl_s.to_string();
                c.call(&[b"SETEX", d.key.as_bytes(), ttl.as_bytes(), &json])
                    .await?;
            }
            Conn::Lib(c) => {
                let stored: Option<Vec<u8>> = redis::cmd("GET").arg(&d.key).query_async(c).await?;
                let json =
                    SeedSession::heartbeat(stored.as_deref(), &d.phy, &d.conn_id, server_id, now);
                let _: () = redis::cmd("SETEX")
                    .arg(&d.key)
                    .arg(ttl_s)
                    .arg(json)
                    .query_async(c)
                    .await?;
            }
        }
        Ok(())
    }
}

async fn populate(
    target: &RedisTarget,
    devices: &[Device],
    server_id: &str,
    ttl_s: u64,
) -> anyhow::Result<()> {
    let mut conn = target.conn().await?;
    let now = iot_core::time::now_ms();
    for chunk in devices.chunks(5_000) {
        let mut pipe = redis::pipe();
        for d in chunk {
            let s = SeedSession::new(&d.phy, &d.conn_id, server_id, now);
            pipe.cmd("SETEX")
                .arg(&d.key)
                .arg(ttl_s)
                .arg(s.encode())
                .ignore();
        }
        let _: () = pipe.query_async(&mut conn).await?;
    }
    Ok(())
}
