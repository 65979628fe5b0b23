//! One simulated device: a raw TCP socket speaking MQTT through the
//! project's codec (`iot-mqtt`), in one small tokio task.
//!
//! A full MQTT client per device (rumqttc) costs tens of KiB and a few
//! tasks; this costs one task, one socket and two small buffers, which is
//! what lets one process hold 15,000+ devices and a few processes 100,000+.
//!
//! The life of a device: connect (bound to its source address), CONNECT,
//! wait for CONNACK, SUBSCRIBE if asked, then a loop that answers the
//! server, pings, publishes, acknowledges downlinks (at once, late or never),
//! and, for its role, drops the connection (flapping) or takes its own
//! session over from a second connection. It leaves when the run is
//! cancelled. Every transition is counted in [`Stats`] and recorded in the
//! ground truth.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use iot_mqtt::{
    Connect, ConnectReturnCode, DISCONNECT_BYTES, MqttStr, PINGREQ_BYTES, Packet, PubAck, Publish,
    QoS, Subscribe, SubscribeReturnCode,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::{Instant, sleep, sleep_until, timeout, timeout_at};
use tokio_util::sync::CancellationToken;

use crate::rng::SplitMix64;
use crate::sim::config::{DropMode, EndMode, SimConfig};
use crate::sim::roles::{AckMode, Role};
use crate::sim::stats::{ConnectFailure, DisconnectReason, Latency, Stats};
use crate::sim::truth::{TruthKind, TruthLog};

/// What every device of a process shares.
#[derive(Debug)]
pub struct DeviceCtx {
    /// The run's options.
    pub config: Arc<SimConfig>,
    /// Counters and histograms.
    pub stats: Arc<Stats>,
    /// Ground truth sink.
    pub truth: TruthLog,
    /// Cancelled when the run ends: devices leave.
    pub cancel: CancellationToken,
    /// Limits connection attempts in flight (TCP connect to CONNACK).
    pub connect_permits: Semaphore,
    /// Every target of the run.
    pub targets: Arc<[SocketAddr]>,
}

/// How a connection's session ended.
enum SessionEnd {
    /// The run is over; the device left.
    Stop,
    /// The device dropped the connection on purpose.
    Flapped,
    /// The server or the network ended it.
    Lost,
}

/// One open MQTT connection.
struct Conn {
    stream: TcpStream,
    rbuf: BytesMut,
    seq: u16,
}

/// Per-connection protocol state.
struct Session {
    conn: Conn,
    ping_at: Option<Instant>,
    ping_sent: Option<Instant>,
    uplink_at: Option<Instant>,
    flap_at: Option<Instant>,
    takeover_at: Option<Instant>,
    /// Unacknowledged QoS 1 uplinks: (pkid, sent at).
    inflight: VecDeque<(u16, Instant)>,
    /// Late acknowledgements due: (due, pkid, received at).
    late_acks: VecDeque<(Instant, u16, Instant)>,
    next_pkid: u16,
}

impl Session {
    fn pkid(&mut self) -> u16 {
        let id = self.next_pkid;
        self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
        id
    }
}

/// A simulated device.
pub struct Device {
    index: u32,
    client_id: MqttStr,
    up_topic: MqttStr,
    down_filter: MqttStr,
    role: Role,
    /// Index into `ctx.targets` of the current target.
    target: usize,
    source: Option<Ipv4Addr>,
    rng: SplitMix64,
    ctx: Arc<DeviceCtx>,
    conn_seq: u16,
    ever_connected: bool,
}

/// The connection broke; why.
struct Broken(DisconnectReason);

impl Device {
    /// Device `index` (global), connecting to `ctx.targets[target]` from
    /// `source`.
    pub fn new(
        index: u32,
        target: usize,
        source: Option<Ipv4Addr>,
        ctx: Arc<DeviceCtx>,
    ) -> Result<Self, iot_mqtt::Error> {
        let config = &ctx.config;
        let phy = config.phy_id(index);
        Ok(Self {
            index,
            client_id: MqttStr::try_from(phy.as_str())?,
            up_topic: MqttStr::try_from(format!("devices/{phy}/up/telemetry"))?,
            down_filter: MqttStr::try_from(format!("devices/{phy}/down/#"))?,
            role: Role::of(config, index),
            target,
            source,
            rng: SplitMix64::new(config.seed, u64::from(index)),
            ctx,
            conn_seq: 0,
            ever_connected: false,
        })
    }

    fn config(&self) -> &SimConfig {
        &self.ctx.config
    }

    fn target(&self) -> SocketAddr {
        self.ctx.targets[self.target % self.ctx.targets.len()]
    }

    /// With --failover, the next attempt goes to the next target.
    fn fail_over(&mut self) {
        if self.config().failover {
            self.target = (self.target + 1) % self.ctx.targets.len().max(1);
        }
    }

    fn truth(&self, conn: u16, kind: TruthKind) {
        self.ctx.truth.record(self.index, conn, kind);
    }

    /// Runs the device until the run is cancelled (or, with --no-retry,
    /// until its connection fails or is lost).
    pub async fn run(mut self) {
        let cancel = self.ctx.cancel.clone();
        loop {
            if cancel.is_cancelled() {
                return;
            }
            let opened = tokio::select! {
                _ = cancel.cancelled() => return,
                r = self.open(TruthKind::Connected) => r,
            };
            let pause = match opened {
                Ok(conn) => match self.session(conn).await {
                    SessionEnd::Stop => return,
                    SessionEnd::Flapped => {
                        let r = self.config().flap_downtime;
                        self.rng.duration_between(r.min, r.max)
                    }
                    SessionEnd::Lost if self.config().no_retry => return,
                    SessionEnd::Lost => {
                        self.fail_over();
                        self.retry_pause()
                    }
                },
                Err(_) if self.config().no_retry => return,
                Err(_) => {
                    self.fail_over();
                    self.retry_pause()
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = sleep(pause) => {}
            }
        }
    }

    /// The retry delay with +-50% jitter, so that a mass disconnect does not
    /// come back as one wave.
    fn retry_pause(&mut self) -> Duration {
        let d = self.config().retry_delay;
        self.rng.duration_between(d / 2, d + d / 2)
    }

    /// Opens a connection and completes CONNECT/CONNACK; counts and records
    /// the outcome (`kind`: `Connected`, or `TakeoverConnected` for a second
    /// connection).
    async fn open(&mut self, kind: TruthKind) -> Result<Conn, ConnectFailure> {
        let ctx = self.ctx.clone();
        let _permit = ctx
            .connect_permits
            .acquire()
            .await
            .map_err(|_| ConnectFailure::Io)?;
        self.conn_seq = self.conn_seq.checked_add(1).unwrap_or(1);
        let seq = self.conn_seq;
        let started = Instant::now();
        ctx.stats.connect_started(iot_core::time::now_ms());
        match self.handshake(seq).await {
            Ok(conn) => {
                let first = !self.ever_connected;
                self.ever_connected = true;
                ctx.stats
                    .connected(first, iot_core::time::now_ms(), started.elapsed());
                self.truth(seq, kind);
                Ok(conn)
            }
            Err(why) => {
                ctx.stats.failed(why);
                self.truth(seq, TruthKind::ConnectFailed);
                Err(why)
            }
        }
    }

    async fn handshake(&self, seq: u16) -> Result<Conn, ConnectFailure> {
        let cfg = self.config();
        let target = self.target();
        let socket = if target.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|e| ConnectFailure::of_io(&e))?;
        if let (Some(src), true) = (self.source, target.is_ipv4()) {
            // Let the kernel pick the port at connect time, per 4-tuple, so
            // one source address serves many targets without running out.
            let _ = nix::sys::socket::setsockopt(
                &socket,
                nix::sys::socket::sockopt::IpBindAddressNoPort,
                &true,
            );
            socket.bind(SocketAddr::new(src.into(), 0)).map_err(
                |e| match ConnectFailure::of_io(&e) {
                    ConnectFailure::FileLimit => ConnectFailure::FileLimit,
                    _ => ConnectFailure::Bind,
                },
            )?;
        }
        let mut stream = timeout(cfg.connect_timeout, socket.connect(target))
            .await
            .map_err(|_| ConnectFailure::Timeout)?
            .map_err(|e| ConnectFailure::of_io(&e))?;
        let _ = stream.set_nodelay(true);

        let mut connect = Connect::new(self.client_id.clone());
        connect.keep_alive = u16::try_from(cfg.keepalive.as_secs()).unwrap_or(u16::MAX);
        if let Some(user) = &cfg.username {
            connect.username =
                Some(MqttStr::try_from(user.as_str()).map_err(|_| ConnectFailure::Protocol)?);
        }
        if let Some(pw) = &cfg.password {
            connect.password = Some(Bytes::copy_from_slice(pw.as_bytes()));
        }
        let mut out = BytesMut::with_capacity(connect.len());
        Packet::Connect(connect).write(&mut out);
        stream
            .write_all(&out)
            .await
            .map_err(|e| ConnectFailure::of_io(&e))?;
        self.ctx.stats.sent(out.len());

        let deadline = Instant::now() + cfg.connect_timeout;
        let mut rbuf = BytesMut::with_capacity(64);
        loop {
            match Packet::read(&mut rbuf, cfg.max_packet_size) {
                Ok(Some(Packet::ConnAck(ack))) => {
                    self.ctx.stats.packets_received.inc();
                    if ack.code != ConnectReturnCode::Accepted {
                        return Err(ConnectFailure::ConnAckRefused);
                    }
                    return Ok(Conn { stream, rbuf, seq });
                }
                Ok(Some(_)) | Err(_) => return Err(ConnectFailure::Protocol),
                Ok(None) => {}
            }
            let n = timeout_at(deadline, stream.read_buf(&mut rbuf))
                .await
                .map_err(|_| ConnectFailure::ConnAckTimeout)?
                .map_err(|e| ConnectFailure::of_io(&e))?;
            if n == 0 {
                return Err(ConnectFailure::Reset);
            }
            self.ctx.stats.bytes_received.add(n as u64);
        }
    }

    /// Runs one connection until it ends.
    async fn session(&mut self, conn: Conn) -> SessionEnd {
        let mut s = self.new_session(conn);
        if let Err(Broken(why)) = self.subscribe(&mut s).await {
            return self.lost(s, why);
        }
        let cancel = self.ctx.cancel.clone();
        loop {
            let far = Instant::now() + Duration::from_secs(3600);
            let late_at = s.late_acks.front().map(|(due, _, _)| *due);
            let step = tokio::select! {
                _ = cancel.cancelled() => {
                    self.leave(s).await;
                    return SessionEnd::Stop;
                }
                r = s.conn.stream.read_buf(&mut s.conn.rbuf) => match r {
                    Ok(0) => Err(Broken(DisconnectReason::ServerClosed)),
                    Ok(n) => {
                        self.ctx.stats.bytes_received.add(n as u64);
                        self.on_readable(&mut s).await
                    }
                    Err(_) => Err(Broken(DisconnectReason::Reset)),
                },
                _ = sleep_until(s.ping_at.unwrap_or(far)), if s.ping_at.is_some() => {
                    self.ping(&mut s).await
                }
                _ = sleep_until(s.uplink_at.unwrap_or(far)), if s.uplink_at.is_some() => {
                    self.uplink(&mut s).await
                }
                _ = sleep_until(late_at.unwrap_or(far)), if late_at.is_some() => {
                    self.late_acks(&mut s).await
                }
                _ = sleep_until(s.flap_at.unwrap_or(far)), if s.flap_at.is_some() => {
                    self.flap(s);
                    return SessionEnd::Flapped;
                }
                _ = sleep_until(s.takeover_at.unwrap_or(far)), if s.takeover_at.is_some() => {
                    s = self.take_over(s).await;
                    self.subscribe(&mut s).await
                }
            };
            if let Err(Broken(why)) = step {
                return self.lost(s, why);
            }
        }
    }

    fn new_session(&mut self, conn: Conn) -> Session {
        let now = Instant::now();
        let cfg = self.ctx.config.clone();
        let ping_at = cfg
            .ping_every()
            .map(|p| now + self.rng.duration_between(Duration::ZERO, p));
        let uplink_at = (cfg.uplink_rate > 0.0).then(|| {
            let every = Duration::from_secs_f64(1.0 / cfg.uplink_rate);
            now + self.rng.duration_between(Duration::ZERO, every)
        });
        let flap_at = self.role.flaps.then(|| {
            now + self
                .rng
                .duration_between(cfg.flap_every.min, cfg.flap_every.max)
        });
        let takeover_at = self.role.takes_over.then(|| {
            now + self
                .rng
                .duration_between(cfg.takeover_every.min, cfg.takeover_every.max)
        });
        Session {
            conn,
            ping_at,
            ping_sent: None,
            uplink_at,
            flap_at,
            takeover_at,
            inflight: VecDeque::new(),
            late_acks: VecDeque::new(),
            next_pkid: 1,
        }
    }

    async fn write(&self, s: &mut Session, bytes: &[u8]) -> Result<(), Broken> {
        s.conn
            .stream
            .write_all(bytes)
            .await
            .map_err(|_| Broken(DisconnectReason::Reset))?;
        self.ctx.stats.sent(bytes.len());
        Ok(())
    }

    async fn subscribe(&self, s: &mut Session) -> Result<(), Broken> {
        if !self.config().subscribe {
            return Ok(());
        }
        let pkid = s.pkid();
        let mut out = BytesMut::new();
        Packet::Subscribe(Subscribe::new(
            pkid,
            self.down_filter.clone(),
            QoS::AtLeastOnce,
        ))
        .write(&mut out);
        self.write(s, &out).await?;
        self.ctx.stats.subscribes.inc();
        Ok(())
    }

    /// Decodes and answers every complete packet in the read buffer.
    async fn on_readable(&self, s: &mut Session) -> Result<(), Broken> {
        loop {
            let packet = match Packet::read(&mut s.conn.rbuf, self.config().max_packet_size) {
                Ok(Some(p)) => p,
                Ok(None) => return Ok(()),
                Err(_) => return Err(Broken(DisconnectReason::Protocol)),
            };
            self.ctx.stats.packets_received.inc();
            let stats = &self.ctx.stats;
            match packet {
                Packet::PingResp => {
                    if let Some(sent) = s.ping_sent.take() {
                        stats.record(Latency::Ping, sent.elapsed());
                    }
                    stats.pongs.inc();
                }
                Packet::PubAck(ack) => {
                    if let Some(pos) = s.inflight.iter().position(|(id, _)| *id == ack.pkid) {
                        if let Some((_, sent)) = s.inflight.remove(pos) {
                            stats.record(Latency::PubAck, sent.elapsed());
                        }
                        stats.pubacks.inc();
                    }
                }
                Packet::SubAck(ack) => {
                    stats.subacks.inc();
                    let refused = ack
                        .return_codes
                        .iter()
                        .filter(|c| matches!(c, SubscribeReturnCode::Failure))
                        .count();
                    stats.suback_refused.add(refused as u64);
                }
                Packet::Publish(p) => self.on_downlink(s, p).await?,
                // Anything else is not ours to answer; a gateway may send
                // nothing else to a client.
                _ => {}
            }
        }
    }

    async fn on_downlink(&self, s: &mut Session, p: Publish) -> Result<(), Broken> {
        let stats = &self.ctx.stats;
        let seq = s.conn.seq;
        stats.downlinks_received.inc();
        self.truth(seq, TruthKind::DownlinkReceived);
        if p.qos != QoS::AtLeastOnce {
            return Ok(());
        }
        let now = Instant::now();
        match self.role.ack {
            AckMode::Ack => {
                self.write(s, &PubAck::encode(p.pkid)).await?;
                stats.record(Latency::DownlinkAck, now.elapsed());
                stats.downlinks_acked.inc();
                self.truth(seq, TruthKind::DownlinkAcked);
            }
            AckMode::Late => {
                s.late_acks
                    .push_back((now + self.config().late_ack_delay, p.pkid, now));
            }
            AckMode::Never => {
                stats.downlinks_withheld.inc();
                self.truth(seq, TruthKind::AckWithheld);
            }
        }
        Ok(())
    }

    async fn late_acks(&self, s: &mut Session) -> Result<(), Broken> {
        let now = Instant::now();
        while let Some((due, pkid, received)) = s.late_acks.front().copied() {
            if due > now {
                break;
            }
            s.late_acks.pop_front();
            self.write(s, &PubAck::encode(pkid)).await?;
            self.ctx
                .stats
                .record(Latency::DownlinkAck, received.elapsed());
            self.ctx.stats.downlinks_acked.inc();
            self.truth(s.conn.seq, TruthKind::DownlinkAcked);
        }
        Ok(())
    }

    async fn ping(&self, s: &mut Session) -> Result<(), Broken> {
        let Some(every) = self.config().ping_every() else {
            s.ping_at = None;
            return Ok(());
        };
        self.write(s, &PINGREQ_BYTES).await?;
        let now = Instant::now();
        // One outstanding ping is timed; a second before its answer is not.
        s.ping_sent.get_or_insert(now);
        s.ping_at = s.ping_at.map(|at| (at + every).max(now));
        self.ctx.stats.pings_sent.inc();
        if self.config().record_pings {
            self.truth(s.conn.seq, TruthKind::PingSent);
        }
        Ok(())
    }

    async fn uplink(&self, s: &mut Session) -> Result<(), Broken> {
        let cfg = self.config();
        let every = Duration::from_secs_f64(1.0 / cfg.uplink_rate.max(1e-9));
        let now = Instant::now();
        s.uplink_at = s.uplink_at.map(|at| (at + every).max(now));
        let qos1 = cfg.qos == 1;
        if qos1 && s.inflight.len() >= cfg.max_inflight {
            self.ctx.stats.uplinks_skipped.inc();
            return Ok(());
        }
        let mut publish = Publish::new(self.up_topic.clone(), payload(cfg.payload_size));
        if qos1 {
            publish.qos = QoS::AtLeastOnce;
            publish.pkid = s.pkid();
            s.inflight.push_back((publish.pkid, now));
        }
        let mut out = BytesMut::with_capacity(publish.len());
        Packet::Publish(publish).write(&mut out);
        self.write(s, &out).await?;
        self.ctx.stats.publishes_sent.inc();
        Ok(())
    }

    /// Drops the connection without DISCONNECT.
    fn flap(&self, s: Session) {
        if self.config().flap_mode == DropMode::Reset {
            let _ = s.conn.stream.set_zero_linger();
        }
        self.ctx.stats.disconnected(DisconnectReason::Flap);
        self.truth(s.conn.seq, TruthKind::Dropped);
        drop(s);
    }

    /// Opens a second connection with the same phyID; once it is accepted,
    /// waits for the server to close the old one and carries on with the
    /// new. If the second connection fails, carries on with the old one.
    async fn take_over(&mut self, mut old: Session) -> Session {
        let every = self.config().takeover_every;
        let next = Instant::now() + self.rng.duration_between(every.min, every.max);
        let new_conn = match self.open(TruthKind::TakeoverConnected).await {
            Ok(c) => c,
            Err(_) => {
                old.takeover_at = Some(next);
                return old;
            }
        };
        let stats = self.ctx.stats.clone();
        stats.takeovers.inc();
        let accepted = Instant::now();
        let old_seq = old.conn.seq;
        let closed = timeout(self.config().connect_timeout, drain(&mut old.conn.stream)).await;
        match closed {
            Ok(()) => {
                stats.record(Latency::Takeover, accepted.elapsed());
                stats.disconnected(DisconnectReason::TakenOver);
                self.truth(old_seq, TruthKind::TakenOver);
            }
            Err(_) => stats.disconnected(DisconnectReason::TakeoverNotClosed),
        }
        drop(old);
        let mut s = self.new_session(new_conn);
        s.takeover_at = Some(next);
        s
    }

    /// Leaves at the end of the run.
    async fn leave(&self, mut s: Session) {
        if self.config().end == EndMode::Clean {
            // Best effort: the server may already be gone.
            let _ = timeout(Duration::from_secs(1), async {
                if s.conn.stream.write_all(&DISCONNECT_BYTES).await.is_ok() {
                    self.ctx.stats.sent(DISCONNECT_BYTES.len());
                }
                let _ = s.conn.stream.shutdown().await;
            })
            .await;
        }
        self.ctx.stats.disconnected(DisconnectReason::End);
        self.truth(s.conn.seq, TruthKind::Disconnected);
    }

    fn lost(&self, s: Session, why: DisconnectReason) -> SessionEnd {
        self.ctx.stats.disconnected(why);
        self.truth(s.conn.seq, TruthKind::Lost);
        SessionEnd::Lost
    }
}

/// Reads and discards until the peer closes (or the connection breaks).
async fn drain(stream: &mut TcpStream) {
    let mut buf = [0u8; 512];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 {
            return;
        }
    }
}

/// An uplink payload of `size` bytes: the send time (µs since the Unix
/// epoch, u64 big-endian) first when it fits, then zeros.
pub fn payload(size: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(size);
    if size >= 8 {
        let us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        b.put_u64(us);
    }
    b.resize(size, 0);
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_carries_its_send_time() {
        let p = payload(32);
        assert_eq!(p.len(), 32);
        let us = u64::from_be_bytes(p[..8].try_into().expect("8 bytes"));
        let now_us = iot_core::time::now_ms() as u64 * 1000;
        assert!(now_us.abs_diff(us) < 5_000_000, "{us} vs {now_us}");
        assert_eq!(payload(4).len(), 4);
        assert!(payload(0).is_empty());
    }
}
