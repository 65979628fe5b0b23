//! A raw MQTT test device: the `iot-mqtt` codec over a plain `TcpStream`.
//!
//! Well-behaved clients in tests use a real client crate; this one exists
//! for what a real client will not do: send random bytes, send a packet
//! before CONNECT, send half a CONNECT and stall, announce a packet larger
//! than the server allows, go silent to let a keepalive lapse, or abort the
//! connection with a RST.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use iot_mqtt::{Connect, ConnectReturnCode, MqttStr, Packet, Publish, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest packet the test device accepts from a server.
const MAX_PACKET: usize = 1 << 20;

/// One raw connection to an MQTT server.
pub struct TestDevice {
    stream: TcpStream,
    buf: BytesMut,
}

/// A CONNECT with this client id and keepalive (seconds), clean session.
pub fn connect_packet(client_id: &str, keep_alive: u16) -> Packet {
    let id = MqttStr::try_from(client_id.to_owned()).expect("client id is a valid MQTT string");
    let mut c = Connect::new(id);
    c.keep_alive = keep_alive;
    Packet::Connect(c)
}

/// A PUBLISH of `payload` on `topic`; `pkid` is used for QoS 1 and 2.
pub fn publish_packet(topic: &str, payload: &[u8], qos: QoS, pkid: u16) -> Packet {
    let topic = MqttStr::try_from(topic.to_owned()).expect("topic is a valid MQTT string");
    let mut p = Publish::new(topic, Bytes::copy_from_slice(payload));
    p.qos = qos;
    if qos != QoS::AtMostOnce {
        p.pkid = pkid;
    }
    Packet::Publish(p)
}

impl TestDevice {
    /// Opens a TCP connection to `addr` and sends nothing.
    pub async fn open(addr: &str) -> Self {
        let stream = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {addr}: {e}"));
        Self {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// Opens a connection, sends CONNECT and returns the CONNACK's code
    /// (panics if the server answers anything else within 10 s).
    pub async fn connect(
        addr: &str,
        client_id: &str,
        keep_alive: u16,
    ) -> (Self, ConnectReturnCode) {
        let mut d = Self::open(addr).await;
        d.send(&connect_packet(client_id, keep_alive)).await;
        match d.recv(Duration::from_secs(10)).await {
            Some(Packet::ConnAck(ack)) => (d, ack.code),
            other => panic!("expected CONNACK for {client_id:?}, got {other:?}"),
        }
    }

    /// [`connect`](Self::connect), asserting the CONNECT is accepted.
    pub async fn connected(addr: &str, client_id: &str, keep_alive: u16) -> Self {
        let (d, code) = Self::connect(addr, client_id, keep_alive).await;
        assert_eq!(
            code,
            ConnectReturnCode::Accepted,
            "CONNECT of {client_id} refused"
        );
        d
    }

    /// The local address of the connection (as the server sees the peer).
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.stream.local_addr().expect("local address")
    }

    /// Sends a packet (panics if the socket fails).
    pub async fn send(&mut self, packet: &Packet) {
        let mut out = BytesMut::new();
        packet.write(&mut out);
        self.stream
            .write_all(&out)
            .await
            .unwrap_or_else(|e| panic!("cannot send {:?}: {e}", packet.packet_type()));
    }

    /// Sends raw bytes; the result tells whether the socket took them.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// The next packet from the server, or `None` once the server has closed
    /// the connection (end of stream or reset). Panics if neither happens
    /// within `timeout` or the server sends bytes that do not decode.
    pub async fn recv(&mut self, timeout: Duration) -> Option<Packet> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match Packet::read(&mut self.buf, MAX_PACKET) {
                Ok(Some(p)) => return Some(p),
                Ok(None) => {}
                Err(e) => panic!("server sent an undecodable packet: {e}"),
            }
            self.buf.reserve(1024);
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => panic!("nothing from the server within {timeout:?}"),
                Ok(Ok(0)) | Ok(Err(_)) => return None,
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Waits until the server closes the connection and returns the packets
    /// it sent before; panics if it stays open for `timeout`.
    pub async fn closed_within(&mut self, timeout: Duration) -> Vec<Packet> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut got = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                panic!("the server did not close the connection within {timeout:?}; got {got:?}");
            }
            match self.recv(left).await {
                Some(p) => got.push(p),
                None => return got,
            }
        }
    }

    /// Whether the server has closed the connection, without waiting.
    pub async fn is_closed(&mut self) -> bool {
        let mut probe = [0u8; 64];
        match tokio::time::timeout(Duration::from_millis(1), self.stream.peek(&mut probe)).await {
            Ok(Ok(0)) | Ok(Err(_)) => true,
            Ok(Ok(_)) | Err(_) => false,
        }
    }

    /// Aborts the connection: sets `SO_LINGER` to 0 and drops the socket, so
    /// the kernel sends a RST instead of a FIN (what a crashing client or a
    /// middlebox dropping the connection looks like to the server).
    pub fn reset(self) {
        self.stream
            .set_zero_linger()
            .unwrap_or_else(|e| panic!("cannot set SO_LINGER 0: {e}"));
        drop(self.stream);
    }

    /// PINGREQ, then waits for the PINGRESP (panics otherwise).
    pub async fn ping(&mut self) {
        self.send(&Packet::PingReq).await;
        match self.recv(Duration::from_secs(10)).await {
            Some(Packet::PingResp) => {}
            other => panic!("expected PINGRESP, got {other:?}"),
        }
    }
}
