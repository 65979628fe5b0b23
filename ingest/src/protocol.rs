//! The device protocol seen by a connection: a small trait, implemented for
//! MQTT 3.1.1 over the `iot-mqtt` codec.
//!
//! A connection only needs to turn bytes into a hello (who is this device),
//! then into a few protocol-neutral inputs (alive, uplink, leaving), and to
//! write the protocol's answers. Another device protocol (a vendor's binary
//! frames, say) implements [`DeviceProtocol`] and reuses the whole pipeline:
//! authentication, epochs, takeover, the event writer, keepalive.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use iot_core::PhyId;
use iot_mqtt::{
    ConnAck, ConnectReturnCode, MqttStr, Packet, PubAck, Publish, QoS, SubscribeReturnCode,
};

use crate::session::{self, Action, Reply, Session};
use crate::topics;

/// A device's validated request to open a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The device.
    pub phy: PhyId,
    /// Keepalive the device asked for, in seconds (0: none).
    pub keepalive_secs: u16,
    /// Keepalive enforced: as asked, or the configured maximum when the
    /// device asks for none or more than it. Silence for 1.5 x this closes
    /// the connection.
    pub keepalive: Duration,
    /// User name, if given.
    pub username: Option<String>,
    /// Password, if given.
    pub password: Option<Bytes>,
}

/// Why a connection was refused before or at its hello. Also the label of
/// `iot_ingest_connects_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseReason {
    /// Over the connection limit.
    MaxConnections,
    /// Over the per-IP connect rate.
    RateLimited,
    /// The client id is not a valid phyID.
    IdentifierRejected,
    /// The credentials were refused.
    NotAuthorized,
    /// Redis is unreachable (no epoch can be taken).
    ServerUnavailable,
    /// An unsupported protocol version.
    BadProtocol,
    /// No complete hello within the connect timeout.
    ConnectTimeout,
    /// Bytes that are not a valid hello, or another packet first.
    Malformed,
    /// The peer closed before completing its hello.
    ClosedBeforeConnect,
    /// The instance is shutting down.
    ShuttingDown,
}

impl RefuseReason {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::MaxConnections => "max_connections",
            Self::RateLimited => "rate_limited",
            Self::IdentifierRejected => "identifier_rejected",
            Self::NotAuthorized => "not_authorized",
            Self::ServerUnavailable => "server_unavailable",
            Self::BadProtocol => "bad_protocol",
            Self::ConnectTimeout => "connect_timeout",
            Self::Malformed => "malformed",
            Self::ClosedBeforeConnect => "closed_before_connect",
            Self::ShuttingDown => "shutting_down",
        }
    }
}

/// A refused hello: why, and what the log should say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Why.
    pub reason: RefuseReason,
    /// Details for the log line.
    pub detail: String,
}

impl Refusal {
    /// A refusal with a detail message.
    pub fn new(reason: RefuseReason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

/// What a connected device sent, as far as the pipeline cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// The device is alive (PINGREQ, SUBSCRIBE, a PUBACK...): a heartbeat.
    Alive,
    /// An application message for the event log.
    Uplink {
        /// Full topic name.
        topic: String,
        /// QoS (0 or 1).
        qos: u8,
        /// Payload.
        payload: Bytes,
        /// For QoS 1: the id to acknowledge once the event is written.
        ack: Option<u16>,
    },
    /// The device acknowledged the downlink with this packet id (also a
    /// sign of life).
    DownlinkAck(u16),
    /// The device subscribed to (some of) its downlinks: queued commands
    /// may be delivered now (also a sign of life).
    Subscribed,
    /// The device leaves cleanly.
    Disconnect,
}

/// The device broke the protocol: the connection closes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Metric label, such as `qos2` or `publish_other_device`.
    pub kind: &'static str,
    /// Details for the log line.
    pub detail: String,
}

impl Violation {
    /// A violation with a detail message.
    pub fn new(kind: &'static str, detail: impl Into<String>) -> Self {
        Self {
            kind,
            detail: detail.into(),
        }
    }
}

/// Limits every protocol applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest packet body accepted, in bytes.
    pub max_packet_size: usize,
    /// Keepalive enforced when a device asks for none or for more.
    pub max_keepalive: Duration,
}

/// A device protocol, as a connection drives it.
///
/// Decoding never blocks and never allocates for incomplete input: the
/// connection appends received bytes to a buffer and calls the `read_*`
/// methods until they return `Ok(None)`.
pub trait DeviceProtocol: Send + Sync + 'static {
    /// Per-connection protocol state after the hello.
    type Session: Send + 'static;

    /// Decodes the hello at the front of `buf`. `Ok(None)`: incomplete.
    fn read_hello(&self, buf: &mut BytesMut, limits: &Limits) -> Result<Option<Hello>, Refusal>;

    /// Writes the answer to a refused hello, if the protocol has one for
    /// `reason` (otherwise the connection just closes).
    fn write_refusal(&self, reason: RefuseReason, out: &mut BytesMut);

    /// Writes the answer to an accepted hello.
    fn write_accept(&self, out: &mut BytesMut);

    /// The session state of an accepted hello.
    fn start(&self, hello: &Hello) -> Self::Session;

    /// Decodes the next input of device `phy` at the front of `buf`,
    /// writing any immediate answer (PINGRESP, SUBACK...) to `out`.
    /// `Ok(None)`: incomplete.
    fn read(
        &self,
        session: &mut Self::Session,
        phy: &PhyId,
        buf: &mut BytesMut,
        limits: &Limits,
        out: &mut BytesMut,
    ) -> Result<Option<Inbound>, Violation>;

    /// Writes the acknowledgement of an uplink whose event is written.
    fn write_uplink_ack(&self, ack: u16, out: &mut BytesMut);

    /// Whether the device listens for the downlink `name`, or for any
    /// downlink when `None`.
    fn listens(&self, session: &Self::Session, name: Option<&str>) -> bool;

    /// Writes downlink `name` with `payload` to device `phy` as packet
    /// `pkid` (`dup`: a retransmission). Returns false if it cannot be
    /// encoded (nothing is written).
    fn write_downlink(
        &self,
        phy: &PhyId,
        name: &str,
        payload: &Bytes,
        pkid: u16,
        dup: bool,
        out: &mut BytesMut,
    ) -> bool;
}

/// MQTT 3.1.1 (protocol level 4).
#[derive(Debug, Clone, Copy, Default)]
pub struct Mqtt;

impl DeviceProtocol for Mqtt {
    type Session = Session;

    fn read_hello(&self, buf: &mut BytesMut, limits: &Limits) -> Result<Option<Hello>, Refusal> {
        match Packet::read(buf, limits.max_packet_size) {
            Ok(None) => Ok(None),
            Ok(Some(packet)) => session::accept_connect(packet, limits.max_keepalive).map(Some),
            Err(e) => Err(session::refusal_for_decode_error(&e)),
        }
    }

    fn write_refusal(&self, reason: RefuseReason, out: &mut BytesMut) {
        if let Some(code) = session::connack_code(reason) {
            out.extend_from_slice(&ConnAck::encode(code, false));
        }
    }

    fn write_accept(&self, out: &mut BytesMut) {
        // No session state is kept between connections, so never "present"
        // (MQTT-3.2.2-2 allows 0 whenever the server has no stored session).
        out.extend_from_slice(&ConnAck::encode(ConnectReturnCode::Accepted, false));
    }

    fn start(&self, _hello: &Hello) -> Session {
        Session::new()
    }

    fn read(
        &self,
        session: &mut Session,
        phy: &PhyId,
        buf: &mut BytesMut,
        limits: &Limits,
        out: &mut BytesMut,
    ) -> Result<Option<Inbound>, Violation> {
        let packet = match Packet::read(buf, limits.max_packet_size) {
            Ok(None) => return Ok(None),
            Ok(Some(packet)) => packet,
            Err(e) => return Err(session::violation_for_decode_error(&e)),
        };
        Ok(Some(match session.handle(phy, packet)? {
            Action::Alive { reply, refused } => {
                let subscribed = matches!(&reply, Some(Reply::SubAck(ack))
                    if ack.return_codes.iter().any(|c| matches!(c, SubscribeReturnCode::Success(_))));
                if let Some(reply) = reply {
                    reply.write(out);
                }
                if let Some(filters) = refused {
                    tracing::warn!(%filters, "SUBSCRIBE filters refused (0x80): outside the device's downlink tree, or over the per-connection limit");
                    crate::metrics::violation("subscribe_refused");
                }
                if subscribed {
                    Inbound::Subscribed
                } else {
                    Inbound::Alive
                }
            }
            Action::DownlinkAck(pkid) => Inbound::DownlinkAck(pkid),
            Action::Uplink(p) => Inbound::Uplink {
                topic: p.topic.as_str().to_owned(),
                qos: p.qos as u8,
                payload: p.payload,
                ack: (p.qos == iot_mqtt::QoS::AtLeastOnce).then_some(p.pkid),
            },
            Action::Disconnect => Inbound::Disconnect,
        }))
    }

    fn write_uplink_ack(&self, ack: u16, out: &mut BytesMut) {
        out.extend_from_slice(&PubAck::encode(ack));
    }

    fn listens(&self, session: &Session, name: Option<&str>) -> bool {
        session.listens(name)
    }

    fn write_downlink(
        &self,
        phy: &PhyId,
        name: &str,
        payload: &Bytes,
        pkid: u16,
        dup: bool,
        out: &mut BytesMut,
    ) -> bool {
        let Ok(topic) = MqttStr::try_from(topics::down_topic(phy, name)) else {
            return false;
        };
        let mut p = Publish::new(topic, payload.clone());
        p.qos = QoS::AtLeastOnce;
        p.pkid = pkid;
        p.dup = dup;
        Packet::Publish(p).write(out);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iot_mqtt::{Connect, PINGREQ_BYTES, Subscribe, SubscribeFilter};

    const LIMITS: Limits = Limits {
        max_packet_size: 1024,
        max_keepalive: Duration::from_secs(300),
    };

    #[test]
    fn mqtt_hello_then_inputs() {
        let mut buf = BytesMut::new();
        Packet::Connect(Connect::new(MqttStr::from_static("dev-1"))).write(&mut buf);
        let hello = Mqtt
            .read_hello(&mut buf, &LIMITS)
            .expect("valid")
            .expect("complete");
        assert_eq!(hello.phy.as_str(), "dev-1");
        assert_eq!(hello.keepalive, Duration::from_secs(60));
        let mut s = Mqtt.start(&hello);

        buf.extend_from_slice(&PINGREQ_BYTES);
        let mut p = Publish::new(
            MqttStr::from_static("devices/dev-1/up/t"),
            Bytes::from_static(b"21"),
        );
        p.qos = QoS::AtLeastOnce;
        p.pkid = 9;
        Packet::Publish(p).write(&mut buf);
        buf.extend_from_slice(&[0xc0]);

        let mut out = BytesMut::new();
        assert_eq!(
            Mqtt.read(&mut s, &hello.phy, &mut buf, &LIMITS, &mut out),
            Ok(Some(Inbound::Alive))
        );
        assert_eq!(&out[..], &iot_mqtt::PINGRESP_BYTES);
        assert_eq!(
            Mqtt.read(&mut s, &hello.phy, &mut buf, &LIMITS, &mut out),
            Ok(Some(Inbound::Uplink {
                topic: "devices/dev-1/up/t".into(),
                qos: 1,
                payload: Bytes::from_static(b"21"),
                ack: Some(9),
            }))
        );
        assert_eq!(
            Mqtt.read(&mut s, &hello.phy, &mut buf, &LIMITS, &mut out),
            Ok(None)
        );
        out.clear();
        Mqtt.write_uplink_ack(9, &mut out);
        assert_eq!(&out[..], &PubAck::encode(9));
    }

    #[test]
    fn mqtt_refusal_answers() {
        let mut out = BytesMut::new();
        Mqtt.write_refusal(RefuseReason::Malformed, &mut out);
        assert!(out.is_empty());
        Mqtt.write_refusal(RefuseReason::ServerUnavailable, &mut out);
        assert_eq!(&out[..], &[0x20, 0x02, 0x00, 0x03]);
    }

    #[test]
    fn mqtt_downlinks_subscribe_ack_and_write() {
        let phy = PhyId::new("dev-1").expect("valid");
        let mut s = Session::new();
        assert!(!Mqtt.listens(&s, None));
        let mut buf = BytesMut::new();
        let mut out = BytesMut::new();
        let refused = Subscribe {
            pkid: 1,
            filters: vec![SubscribeFilter::new(
                MqttStr::from_static("devices/dev-2/down/#"),
                QoS::AtLeastOnce,
            )],
        };
        Packet::Subscribe(refused).write(&mut buf);
        assert_eq!(
            Mqtt.read(&mut s, &phy, &mut buf, &LIMITS, &mut out),
            Ok(Some(Inbound::Alive)),
            "nothing granted"
        );
        let sub = Subscribe {
            pkid: 2,
            filters: vec![SubscribeFilter::new(
                MqttStr::from_static("devices/dev-1/down/#"),
                QoS::AtLeastOnce,
            )],
        };
        Packet::Subscribe(sub).write(&mut buf);
        Packet::PubAck(PubAck { pkid: 9 }).write(&mut buf);
        assert_eq!(
            Mqtt.read(&mut s, &phy, &mut buf, &LIMITS, &mut out),
            Ok(Some(Inbound::Subscribed))
        );
        assert_eq!(
            Mqtt.read(&mut s, &phy, &mut buf, &LIMITS, &mut out),
            Ok(Some(Inbound::DownlinkAck(9)))
        );
        assert!(Mqtt.listens(&s, Some("reboot")));

        out.clear();
        assert!(Mqtt.write_downlink(
            &phy,
            "reboot",
            &Bytes::from_static(b"now"),
            7,
            true,
            &mut out
        ));
        match Packet::read(&mut out, 1024) {
            Ok(Some(Packet::Publish(p))) => {
                assert_eq!(p.topic.as_str(), "devices/dev-1/down/reboot");
                assert_eq!((p.qos, p.pkid, p.dup), (QoS::AtLeastOnce, 7, true));
                assert_eq!(&p.payload[..], b"now");
            }
            other => panic!("{other:?}"),
        }
    }
}
