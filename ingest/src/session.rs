//! The MQTT session state machine: given a decoded packet, what to answer and
//! what happened. Pure: no I/O, no clocks, no Redis; the connection task
//! ([`crate::connection`]) does the I/O around it.
//!
//! Before CONNECT, [`accept_connect`] validates the first packet. After it,
//! [`Session::handle`] answers each packet with an [`Action`] or a
//! [`Violation`] (which closes the connection).

use std::time::Duration;

use bytes::BytesMut;
use iot_core::PhyId;
use iot_mqtt::{ConnectReturnCode, Packet, Publish, QoS, SubAck, SubscribeReturnCode, UnsubAck};

use crate::protocol::{Hello, Refusal, RefuseReason, Violation};
use crate::topics::{self, Subscriptions};

/// Highest QoS granted on a downlink subscription (QoS 2 is not supported;
/// MQTT-3.9.3 lets the server grant less than asked).
pub const MAX_GRANTED_QOS: QoS = QoS::AtLeastOnce;

/// Validates the first packet of a connection as a CONNECT.
///
/// The client id must be a valid phyID (1 to 64 of `[A-Za-z0-9._-]`); the
/// keepalive is enforced as asked unless the device asks for none (0) or for
/// more than `max_keepalive`, which then applies.
pub fn accept_connect(packet: Packet, max_keepalive: Duration) -> Result<Hello, Refusal> {
    let Packet::Connect(connect) = packet else {
        return Err(Refusal::new(
            RefuseReason::Malformed,
            format!(
                "first packet is {}, expected CONNECT",
                packet.packet_type().name()
            ),
        ));
    };
    let phy = PhyId::new(connect.client_id.as_str()).map_err(|e| {
        Refusal::new(
            RefuseReason::IdentifierRejected,
            format!("client id {:?} rejected: {e}", connect.client_id.as_str()),
        )
    })?;
    let asked = Duration::from_secs(u64::from(connect.keep_alive));
    let keepalive = if asked.is_zero() || asked > max_keepalive {
        max_keepalive
    } else {
        asked
    };
    Ok(Hello {
        phy,
        keepalive_secs: connect.keep_alive,
        keepalive,
        username: connect.username.map(|u| u.as_str().to_owned()),
        password: connect.password,
    })
}

/// The refusal for a first packet that does not decode.
pub fn refusal_for_decode_error(e: &iot_mqtt::Error) -> Refusal {
    let reason = if e.connack_code().is_some() {
        RefuseReason::BadProtocol
    } else {
        RefuseReason::Malformed
    };
    Refusal::new(reason, e.to_string())
}

/// The CONNACK return code that answers a refusal, if MQTT has one; the
/// others close without an answer (MQTT-3.1.4-1: a malformed CONNECT is
/// just closed).
pub fn connack_code(reason: RefuseReason) -> Option<ConnectReturnCode> {
    match reason {
        RefuseReason::BadProtocol => Some(ConnectReturnCode::UnacceptableProtocolVersion),
        RefuseReason::IdentifierRejected => Some(ConnectReturnCode::IdentifierRejected),
        RefuseReason::ServerUnavailable | RefuseReason::ShuttingDown => {
            Some(ConnectReturnCode::ServerUnavailable)
        }
        RefuseReason::NotAuthorized => Some(ConnectReturnCode::NotAuthorized),
        RefuseReason::MaxConnections
        | RefuseReason::RateLimited
        | RefuseReason::ConnectTimeout
        | RefuseReason::Malformed
        | RefuseReason::ClosedBeforeConnect => None,
    }
}

/// The violation for a packet that does not decode after CONNECT.
pub fn violation_for_decode_error(e: &iot_mqtt::Error) -> Violation {
    let kind = match e {
        iot_mqtt::Error::PacketTooLarge { .. } => "packet_too_large",
        iot_mqtt::Error::MalformedRemainingLength => "malformed_length",
        _ => "malformed",
    };
    Violation::new(kind, e.to_string())
}

/// An answer the server sends right away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// To PINGREQ.
    PingResp,
    /// To SUBSCRIBE.
    SubAck(SubAck),
    /// To UNSUBSCRIBE, with its packet id.
    UnsubAck(u16),
}

impl Reply {
    /// Appends the encoded answer.
    pub fn write(&self, out: &mut BytesMut) {
        match self {
            Reply::PingResp => out.extend_from_slice(&iot_mqtt::PINGRESP_BYTES),
            Reply::SubAck(s) => s.write(out),
            Reply::UnsubAck(pkid) => out.extend_from_slice(&UnsubAck::encode(*pkid)),
        }
    }
}

/// What a packet of a connected device amounts to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// The device is alive (a heartbeat); send the reply, if any.
    Alive {
        /// The answer to send.
        reply: Option<Reply>,
        /// SUBSCRIBE filters refused (answered 0x80), for the log and the
        /// metric.
        refused: Option<String>,
    },
    /// A PUBLISH on the device's uplink tree, QoS 0 or 1.
    Uplink(Publish),
    /// PUBACK of a downlink command with this packet id (also a sign of life).
    DownlinkAck(u16),
    /// DISCONNECT: the device leaves cleanly.
    Disconnect,
}

impl Action {
    fn alive(reply: Option<Reply>) -> Self {
        Action::Alive {
            reply,
            refused: None,
        }
    }
}

/// The state of one connected device: its downlink subscriptions.
///
/// The device's phyID is not kept here (the connection has it and passes it
/// in): an idle connection should hold each thing once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Session {
    subscriptions: Subscriptions,
}

impl Session {
    /// A session just accepted.
    pub fn new() -> Self {
        Self::default()
    }

    /// The downlink filters the device holds.
    pub fn subscriptions(&self) -> &Subscriptions {
        &self.subscriptions
    }

    /// Whether the device listens for the downlink named `name` (the part
    /// after `devices/{phy}/down/`), or for any downlink when `None`.
    ///
    /// Commands always go out with QoS 1, whatever QoS the matching filter
    /// was granted: the PUBACK is what decides a command's fate, and device
    /// clients acknowledge a QoS 1 PUBLISH on any subscription.
    pub fn listens(&self, name: Option<&str>) -> bool {
        match name {
            Some(n) => self.subscriptions.granted(n).is_some(),
            None => !self.subscriptions.is_empty(),
        }
    }

    /// Handles one packet from device `phy`.
    pub fn handle(&mut self, phy: &PhyId, packet: Packet) -> Result<Action, Violation> {
        match packet {
            Packet::PingReq => Ok(Action::alive(Some(Reply::PingResp))),
            Packet::Publish(p) => Self::publish(phy, p),
            // The connection matches it to its command (an unknown id is
            // only a sign of life).
            Packet::PubAck(p) => Ok(Action::DownlinkAck(p.pkid)),
            Packet::Subscribe(s) => {
                let mut refused = Vec::new();
                let codes = s
                    .filters
                    .iter()
                    .map(|f| match topics::down_filter(phy, f.filter.as_str()) {
                        Some(relative) => {
                            let qos = f.qos.min(MAX_GRANTED_QOS);
                            if self.subscriptions.add(relative, qos) {
                                SubscribeReturnCode::Success(qos)
                            } else {
                                refused.push(format!(
                                    "{} (over the limit of {} filters per connection)",
                                    f.filter.as_str(),
                                    topics::MAX_FILTERS
                                ));
                                SubscribeReturnCode::Failure
                            }
                        }
                        None => {
                            refused.push(f.filter.as_str().to_owned());
                            SubscribeReturnCode::Failure
                        }
                    })
                    .collect();
                Ok(Action::Alive {
                    reply: Some(Reply::SubAck(SubAck::new(s.pkid, codes))),
                    refused: (!refused.is_empty()).then(|| refused.join(", ")),
                })
            }
            Packet::Unsubscribe(u) => {
                for f in &u.filters {
                    self.subscriptions.remove(phy, f.as_str());
                }
                Ok(Action::alive(Some(Reply::UnsubAck(u.pkid))))
            }
            Packet::Disconnect => Ok(Action::Disconnect),
            Packet::Connect(_) => Err(Violation::new(
                "second_connect",
                "a second CONNECT on an established connection (MQTT-3.1.0-2)",
            )),
            Packet::PubRec(_) | Packet::PubRel(_) | Packet::PubComp(_) => Err(Violation::new(
                "qos2",
                format!(
                    "{} received; QoS 2 is not supported",
                    packet.packet_type().name()
                ),
            )),
            Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
                Err(Violation::new(
                    "server_packet",
                    format!(
                        "{} is a server-to-client packet",
                        packet.packet_type().name()
                    ),
                ))
            }
        }
    }

    fn publish(phy: &PhyId, p: Publish) -> Result<Action, Violation> {
        if p.qos == QoS::ExactlyOnce {
            return Err(Violation::new(
                "qos2",
                format!(
                    "PUBLISH with QoS 2 on {:?}; QoS 2 is not supported",
                    p.topic.as_str()
                ),
            ));
        }
        topics::check_publish(phy, p.topic.as_str()).map_err(|why| {
            Violation::new(
                why.kind(),
                format!("PUBLISH to {:?} refused: {why}", p.topic.as_str()),
            )
        })?;
        Ok(Action::Uplink(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use iot_mqtt::{Connect, MqttStr, PubAck, Subscribe, SubscribeFilter, Unsubscribe};

    const MAX_KA: Duration = Duration::from_secs(300);

    fn connect(id: &str, keep_alive: u16) -> Packet {
        let mut c = Connect::new(MqttStr::try_from(id.to_owned()).expect("mqtt string"));
        c.keep_alive = keep_alive;
        Packet::Connect(c)
    }

    fn phy() -> PhyId {
        PhyId::new("dev-1").expect("valid")
    }

    fn session() -> Session {
        Session::new()
    }

    fn publish(topic: &str, qos: QoS) -> Packet {
        let mut p = Publish::new(
            MqttStr::try_from(topic.to_owned()).expect("mqtt string"),
            Bytes::from_static(b"x"),
        );
        p.qos = qos;
        p.pkid = if qos == QoS::AtMostOnce { 0 } else { 5 };
        Packet::Publish(p)
    }

    #[test]
    fn connect_validates_the_client_id() {
        let hello = accept_connect(connect("dev-1", 30), MAX_KA).expect("accepted");
        assert_eq!(hello.phy.as_str(), "dev-1");
        assert_eq!(hello.keepalive_secs, 30);
        assert_eq!(hello.keepalive, Duration::from_secs(30));
        let long = "x".repeat(65);
        for bad in ["", &long, "a{b", "a}b", "a:b", "a*b", "a b", "dév"] {
            let r = accept_connect(connect(bad, 30), MAX_KA).expect_err(bad);
            assert_eq!(r.reason, RefuseReason::IdentifierRejected, "{bad}");
            assert_eq!(
                connack_code(r.reason),
                Some(ConnectReturnCode::IdentifierRejected)
            );
        }
    }

    #[test]
    fn keepalive_zero_or_too_long_gets_the_maximum() {
        for (asked, enforced) in [(0, 300), (301, 300), (65535, 300), (300, 300), (1, 1)] {
            let hello = accept_connect(connect("d", asked), MAX_KA).expect("accepted");
            assert_eq!(hello.keepalive, Duration::from_secs(enforced), "{asked}");
            assert_eq!(hello.keepalive_secs, asked);
        }
    }

    #[test]
    fn credentials_are_carried() {
        let mut c = Connect::new(MqttStr::from_static("d"));
        c.username = Some(MqttStr::from_static("user"));
        c.password = Some(Bytes::from_static(b"pw"));
        let hello = accept_connect(Packet::Connect(c), MAX_KA).expect("accepted");
        assert_eq!(hello.username.as_deref(), Some("user"));
        assert_eq!(hello.password.as_deref(), Some(&b"pw"[..]));
    }

    #[test]
    fn another_packet_first_is_malformed() {
        for p in [Packet::PingReq, publish("devices/d/up/x", QoS::AtMostOnce)] {
            let r = accept_connect(p, MAX_KA).expect_err("refused");
            assert_eq!(r.reason, RefuseReason::Malformed);
            assert!(r.detail.contains("expected CONNECT"), "{}", r.detail);
            assert_eq!(connack_code(r.reason), None);
        }
    }

    #[test]
    fn decode_errors_map_to_refusals_and_violations() {
        let r = refusal_for_decode_error(&iot_mqtt::Error::UnsupportedProtocolLevel(5));
        assert_eq!(r.reason, RefuseReason::BadProtocol);
        assert_eq!(
            connack_code(r.reason),
            Some(ConnectReturnCode::UnacceptableProtocolVersion)
        );
        let r = refusal_for_decode_error(&iot_mqtt::Error::MalformedRemainingLength);
        assert_eq!(r.reason, RefuseReason::Malformed);
        let v = violation_for_decode_error(&iot_mqtt::Error::PacketTooLarge { size: 9, max: 1 });
        assert_eq!(v.kind, "packet_too_large");
        let v = violation_for_decode_error(&iot_mqtt::Error::MalformedRemainingLength);
        assert_eq!(v.kind, "malformed_length");
    }

    #[test]
    fn ping_is_a_sign_of_life_and_puback_names_its_packet() {
        let mut s = session();
        assert_eq!(
            s.handle(&phy(), Packet::PingReq),
            Ok(Action::Alive {
                reply: Some(Reply::PingResp),
                refused: None
            })
        );
        assert_eq!(
            s.handle(&phy(), Packet::PubAck(PubAck { pkid: 77 })),
            Ok(Action::DownlinkAck(77))
        );
    }

    #[test]
    fn listening_follows_the_subscriptions() {
        let mut s = session();
        assert!(!s.listens(None));
        assert!(!s.listens(Some("reboot")));
        let sub = Subscribe {
            pkid: 1,
            filters: vec![SubscribeFilter::new(
                MqttStr::from_static("devices/dev-1/down/+"),
                QoS::AtMostOnce,
            )],
        };
        s.handle(&phy(), Packet::Subscribe(sub)).expect("subscribe");
        assert!(s.listens(None));
        assert!(s.listens(Some("reboot")), "a QoS 0 grant still listens");
        assert!(!s.listens(Some("a/b")));
    }

    #[test]
    fn publishes_are_uplinks_on_the_own_tree_only() {
        let mut s = session();
        for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
            match s.handle(&phy(), publish("devices/dev-1/up/temp", qos)) {
                Ok(Action::Uplink(p)) => assert_eq!(p.qos, qos),
                other => panic!("{other:?}"),
            }
        }
        let v = s
            .handle(&phy(), publish("devices/dev-2/up/temp", QoS::AtMostOnce))
            .expect_err("other device");
        assert_eq!(v.kind, "publish_other_device");
        let v = s
            .handle(&phy(), publish("devices/dev-1/down/x", QoS::AtMostOnce))
            .expect_err("not up");
        assert_eq!(v.kind, "publish_outside_up");
        let v = s
            .handle(&phy(), publish("devices/dev-1/up/temp", QoS::ExactlyOnce))
            .expect_err("qos2");
        assert_eq!(v.kind, "qos2");
    }

    #[test]
    fn filters_over_the_per_connection_limit_are_refused() {
        let mut s = session();
        let filters: Vec<SubscribeFilter> = (0..=topics::MAX_FILTERS)
            .map(|i| {
                SubscribeFilter::new(
                    MqttStr::try_from(format!("devices/dev-1/down/cmd{i}")).expect("filter"),
                    QoS::AtLeastOnce,
                )
            })
            .collect();
        let sub = Subscribe { pkid: 5, filters };
        let Ok(Action::Alive {
            reply: Some(Reply::SubAck(ack)),
            refused,
        }) = s.handle(&phy(), Packet::Subscribe(sub))
        else {
            panic!("expected a SUBACK");
        };
        let ok = SubscribeReturnCode::Success(QoS::AtLeastOnce);
        assert!(
            ack.return_codes[..topics::MAX_FILTERS]
                .iter()
                .all(|c| *c == ok)
        );
        assert_eq!(
            ack.return_codes[topics::MAX_FILTERS],
            SubscribeReturnCode::Failure
        );
        let refused = refused.expect("the refused filter is logged");
        assert!(refused.contains("over the limit"), "{refused}");
        assert_eq!(s.subscriptions().len(), topics::MAX_FILTERS);
    }

    #[test]
    fn subscribe_grants_own_down_filters_and_refuses_the_rest() {
        let mut s = session();
        let sub = Subscribe {
            pkid: 3,
            filters: vec![
                SubscribeFilter::new(
                    MqttStr::from_static("devices/dev-1/down/#"),
                    QoS::ExactlyOnce,
                ),
                SubscribeFilter::new(
                    MqttStr::from_static("devices/dev-2/down/#"),
                    QoS::AtMostOnce,
                ),
                SubscribeFilter::new(
                    MqttStr::from_static("devices/dev-1/down/reboot"),
                    QoS::AtMostOnce,
                ),
            ],
        };
        let Ok(Action::Alive {
            reply: Some(Reply::SubAck(ack)),
            refused,
        }) = s.handle(&phy(), Packet::Subscribe(sub))
        else {
            panic!("expected a SUBACK");
        };
        assert_eq!(ack.pkid, 3);
        assert_eq!(
            ack.return_codes,
            vec![
                SubscribeReturnCode::Success(QoS::AtLeastOnce),
                SubscribeReturnCode::Failure,
                SubscribeReturnCode::Success(QoS::AtMostOnce),
            ]
        );
        assert_eq!(refused.as_deref(), Some("devices/dev-2/down/#"));
        assert_eq!(s.subscriptions().len(), 2);
        assert_eq!(s.subscriptions().granted("config"), Some(QoS::AtLeastOnce));

        let unsub = Unsubscribe::new(9, MqttStr::from_static("devices/dev-1/down/#"));
        assert_eq!(
            s.handle(&phy(), Packet::Unsubscribe(unsub)),
            Ok(Action::Alive {
                reply: Some(Reply::UnsubAck(9)),
                refused: None
            })
        );
        assert_eq!(s.subscriptions().granted("config"), None);
        assert_eq!(s.subscriptions().granted("reboot"), Some(QoS::AtMostOnce));
    }

    #[test]
    fn protocol_violations_close() {
        let mut s = session();
        assert_eq!(
            s.handle(&phy(), connect("dev-1", 30))
                .expect_err("second")
                .kind,
            "second_connect"
        );
        assert_eq!(
            s.handle(&phy(), Packet::PingResp).expect_err("server").kind,
            "server_packet"
        );
        assert_eq!(
            s.handle(&phy(), Packet::PubRel(iot_mqtt::PubRel { pkid: 1 }))
                .expect_err("qos2")
                .kind,
            "qos2"
        );
        assert_eq!(s.handle(&phy(), Packet::Disconnect), Ok(Action::Disconnect));
    }

    #[test]
    fn replies_encode() {
        let mut out = BytesMut::new();
        Reply::PingResp.write(&mut out);
        Reply::UnsubAck(4).write(&mut out);
        Reply::SubAck(SubAck::new(4, vec![SubscribeReturnCode::Failure])).write(&mut out);
        assert_eq!(
            &out[..],
            &[
                0xd0, 0x00, 0xb0, 0x02, 0x00, 0x04, 0x90, 0x03, 0x00, 0x04, 0x80
            ]
        );
    }
}
