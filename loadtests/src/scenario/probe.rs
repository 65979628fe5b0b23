//! Heartbeat-to-view latency: probe devices of the scenario's own that ping
//! at known instants and watch their view.
//!
//! A probe is one more MQTT device (its own connection, the project's
//! codec). Every `interval` (at a random phase per probe) it sends a
//! PINGREQ, notes the wall-clock millisecond just before, and then reads
//! `last_seen` of its view every `poll` (backing off past 20 ms, see
//! [`run`]) until the view covers the ping (`last_seen >= sent ms`: the
//! ingest
//! stamps the heartbeat when it reads the packet, on the same clock). The
//! latency is the time from just before the send to the first read that
//! saw it, so it overstates the truth by at most one poll interval plus one
//! Redis round trip. Between pings the probe is silent, so no other
//! heartbeat of the same device can satisfy the check. `last_seen` is read
//! as every reader of a view takes it: the larger of the view's field
//! (`HGET session:device:{phyID} last_seen`) and the device's score in its
//! shard's seen set (`ZSCORE presence:seen:{shard} phyID`), in one round
//! trip.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::BytesMut;
use iot_core::{Keys, PhyId};
use iot_mqtt::{Connect, ConnectReturnCode, MqttStr, PINGREQ_BYTES, Packet};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep, sleep_until, timeout};

use crate::histogram::{LatencyHistogram, LatencySummary};
use crate::rng::SplitMix64;

/// How the probes run.
#[derive(Debug, Clone)]
pub struct ProbePlan {
    /// Ingest MQTT listeners; probe `i` uses `targets[i % len]`.
    pub targets: Vec<SocketAddr>,
    /// Number of probe devices.
    pub probes: u32,
    /// phyID prefix (`{prefix}{i}`).
    pub prefix: String,
    /// Time between a probe's pings.
    pub interval: Duration,
    /// Time between reads of the view.
    pub poll: Duration,
    /// A ping not in the view after this is counted as missed.
    pub limit: Duration,
    /// How long the probes measure.
    pub duration: Duration,
    /// The services' `streams.shards` (which seen set holds a probe).
    pub shards: u16,
}

/// What the probes measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProbeResults {
    /// Probe devices.
    pub probes: u32,
    /// View read interval, ms (the resolution of the figure for samples
    /// under 20 ms; 5 ms up to 200 ms, 20 ms beyond).
    pub poll_ms: f64,
    /// Pings whose heartbeat reached the view.
    pub samples: u64,
    /// Pings not in the view within the limit.
    pub missed: u64,
    /// PINGREQ sent -> view's `last_seen` covers it.
    pub latency: LatencySummary,
}

/// Connects probe `i` and waits for its CONNACK.
async fn connect(target: SocketAddr, phy: &str) -> anyhow::Result<TcpStream> {
    let mut s = TcpStream::connect(target)
        .await
        .with_context(|| format!("probe {phy} cannot connect to {target}"))?;
    s.set_nodelay(true)?;
    let mut c = Connect::new(MqttStr::try_from(phy)?);
    c.keep_alive = 120;
    let mut out = BytesMut::new();
    Packet::Connect(c).write(&mut out);
    s.write_all(&out).await?;
    let mut buf = BytesMut::new();
    let ack = timeout(Duration::from_secs(10), async {
        loop {
            if let Some(p) = Packet::read(&mut buf, 1024)? {
                return anyhow::Ok(p);
            }
            if s.read_buf(&mut buf).await? == 0 {
                bail!("closed before CONNACK");
            }
        }
    })
    .await
    .with_context(|| format!("probe {phy}: no CONNACK within 10 s"))??;
    match ack {
        Packet::ConnAck(a) if a.code == ConnectReturnCode::Accepted => Ok(s),
        other => bail!("probe {phy}: CONNECT answered with {other:?}"),
    }
}

async fn last_seen(
    redis: &mut redis::aio::MultiplexedConnection,
    keys: &(String, String),
    phy: &str,
) -> anyhow::Result<Option<i64>> {
    let (stored, seen): (Option<String>, Option<f64>) = redis::pipe()
        .cmd("HGET")
        .arg(&keys.0)
        .arg(iot_core::view::field::LAST_SEEN)
        .cmd("ZSCORE")
        .arg(&keys.1)
        .arg(phy)
        .query_async(redis)
        .await?;
    let stored: Option<i64> = stored.and_then(|s| s.parse().ok());
    Ok(stored.max(seen.filter(|t| t.is_finite()).map(|t| t as i64)))
}

/// The wait before the next read of the view: `poll` for the first 20 ms,
/// then 5 ms, and 20 ms past 200 ms, so that a lagging pipeline is not
/// also flooded with reads (the resolution of slow samples is coarser, in
/// proportion).
fn backoff(poll: Duration, waited: Duration) -> Duration {
    if waited < Duration::from_millis(20) {
        poll
    } else if waited < Duration::from_millis(200) {
        poll.max(Duration::from_millis(5))
    } else {
        poll.max(Duration::from_millis(20))
    }
}

/// Runs the probes for `plan.duration` against the views in `redis`
/// (reads of a ping still missing after 20 ms back off: see `backoff`).
pub async fn run(
    plan: &ProbePlan,
    redis: redis::aio::MultiplexedConnection,
    keys: &Keys,
) -> anyhow::Result<ProbeResults> {
    anyhow::ensure!(!plan.targets.is_empty(), "probes need a target");
    let mut tasks = Vec::new();
    let start = Instant::now();
    let deadline = start + plan.duration;
    let plan = Arc::new(plan.clone());
    for i in 0..plan.probes {
        let phy = format!("{}{i}", plan.prefix);
        let id = PhyId::new(phy.as_str())?;
        let key = (
            keys.device(&id),
            keys.seen(iot_core::keys::shard_of(id.as_str(), plan.shards.max(1))),
        );
        let target = plan.targets[i as usize % plan.targets.len()];
        let mut redis = redis.clone();
        let plan = plan.clone();
        tasks.push(tokio::spawn(async move {
            let mut stream = connect(target, &phy).await?;
            // Wait for the view of the connect itself.
            let seen = timeout(Duration::from_secs(30), async {
                loop {
                    if last_seen(&mut redis, &key, &phy).await?.is_some() {
                        return anyhow::Ok(());
                    }
                    sleep(Duration::from_millis(20)).await;
                }
            })
            .await;
            if !matches!(seen, Ok(Ok(()))) {
                bail!("probe {phy}: its view did not appear within 30 s");
            }
            let mut h = LatencyHistogram::new();
            let mut missed = 0u64;
            let mut rng = SplitMix64::new(0x9e0b, u64::from(i));
            let mut next = Instant::now() + rng.duration_between(Duration::ZERO, plan.interval);
            let mut sink = [0u8; 256];
            while next < deadline {
                // Drain PINGRESPs while waiting for the next ping.
                tokio::select! {
                    _ = sleep_until(next) => {}
                    r = stream.read(&mut sink) => match r {
                        Ok(0) | Err(_) => bail!("probe {phy}: the ingest closed the connection"),
                        Ok(_) => continue,
                    }
                }
                next += plan.interval;
                let sent_ms = iot_core::time::now_ms();
                let t0 = Instant::now();
                stream.write_all(&PINGREQ_BYTES).await?;
                loop {
                    if last_seen(&mut redis, &key, &phy).await?.unwrap_or(0) >= sent_ms {
                        h.record(t0.elapsed());
                        break;
                    }
                    let waited = t0.elapsed();
                    if waited > plan.limit {
                        missed += 1;
                        break;
                    }
                    sleep(backoff(plan.poll, waited)).await;
                }
            }
            anyhow::Ok((h, missed))
        }));
    }
    let mut hist = LatencyHistogram::new();
    let mut missed = 0;
    for t in tasks {
        let (h, m) = t.await.context("a probe task panicked")??;
        hist.merge(&h);
        missed += m;
    }
    // The caller's measurement window is the whole duration.
    sleep_until(deadline).await;
    Ok(ProbeResults {
        probes: plan.probes,
        poll_ms: plan.poll.as_secs_f64() * 1000.0,
        samples: hist.count(),
        missed,
        latency: hist.summary(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_back_off_as_a_sample_gets_old() {
        let ms = Duration::from_millis;
        assert_eq!(backoff(ms(1), ms(3)), ms(1));
        assert_eq!(backoff(ms(1), ms(50)), ms(5));
        assert_eq!(backoff(ms(1), ms(500)), ms(20));
        assert_eq!(backoff(ms(30), ms(50)), ms(30));
    }
}
