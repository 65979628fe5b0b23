//! PUBLISH: an application message, in either direction (MQTT 3.1.1
//! section 3.3).

use bytes::{BufMut, Bytes, BytesMut};

use crate::fields::{read_pkid, read_str, write_str};
use crate::framing::{frame_len_for, write_fixed_header};
use crate::topic::check_name;
use crate::{Error, MqttStr, PacketType, QoS};

const DUP: u8 = 0b1000;
const RETAIN: u8 = 0b0001;

/// An application message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// Redelivery of an earlier attempt (never set for QoS 0).
    pub dup: bool,
    /// Delivery guarantee.
    pub qos: QoS,
    /// Whether the server should retain the message.
    pub retain: bool,
    /// Topic name (validated on decode: no wildcards, not empty).
    pub topic: MqttStr,
    /// Packet identifier: nonzero for QoS 1 and 2; 0 for QoS 0, where it is
    /// neither encoded nor decoded.
    pub pkid: u16,
    /// Application payload; may be empty.
    pub payload: Bytes,
}

impl Publish {
    /// A QoS 0, non-retained message. Set `qos` and `pkid` for QoS 1.
    pub fn new(topic: MqttStr, payload: Bytes) -> Publish {
        Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic,
            pkid: 0,
            payload,
        }
    }

    /// Decodes the body; `flags` were validated by the fixed header parser.
    pub(crate) fn read(flags: u8, mut body: Bytes) -> Result<Publish, Error> {
        let qos = QoS::try_from((flags >> 1) & 0b11)?;
        let topic = check_name(read_str(&mut body, "topic name")?)?;
        let pkid = match qos {
            QoS::AtMostOnce => 0,
            QoS::AtLeastOnce | QoS::ExactlyOnce => read_pkid(&mut body, PacketType::Publish)?,
        };
        Ok(Publish {
            dup: flags & DUP != 0,
            qos,
            retain: flags & RETAIN != 0,
            topic,
            pkid,
            payload: body,
        })
    }

    fn remaining_len(&self) -> usize {
        let pkid_len = if self.qos == QoS::AtMostOnce { 0 } else { 2 };
        2 + self.topic.len() + pkid_len + self.payload.len()
    }

    /// Encoded length in bytes, fixed header included.
    pub fn len(&self) -> usize {
        frame_len_for(self.remaining_len())
    }

    /// Appends the encoded packet to `out`.
    ///
    /// # Panics
    ///
    /// If the packet is larger than MQTT allows (256 MiB).
    pub fn write(&self, out: &mut BytesMut) {
        let mut byte1 = 0x30 | ((self.qos as u8) << 1);
        if self.dup {
            byte1 |= DUP;
        }
        if self.retain {
            byte1 |= RETAIN;
        }
        write_fixed_header(out, byte1, self.remaining_len());
        write_str(out, &self.topic);
        if self.qos != QoS::AtMostOnce {
            out.put_u16(self.pkid);
        }
        out.put_slice(&self.payload);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Packet, TopicError};

    fn read(bytes: &[u8]) -> Result<Option<Packet>, Error> {
        Packet::read(&mut BytesMut::from(bytes), 1024)
    }

    #[test]
    fn qos0_has_no_packet_id() {
        let publish = Publish::new(MqttStr::from_static("a/b"), Bytes::from_static(b"hi"));
        let mut out = BytesMut::new();
        publish.write(&mut out);
        assert_eq!(&out[..], b"\x30\x07\x00\x03a/bhi");
        assert_eq!(publish.len(), out.len());
        assert_eq!(read(&out), Ok(Some(Packet::Publish(publish))));
    }

    #[test]
    fn qos1_and_qos2_carry_flags_and_packet_id() {
        let publish = Publish {
            dup: true,
            qos: QoS::AtLeastOnce,
            retain: true,
            topic: MqttStr::from_static("t"),
            pkid: 0x1234,
            payload: Bytes::new(),
        };
        let mut out = BytesMut::new();
        publish.write(&mut out);
        assert_eq!(&out[..], b"\x3b\x05\x00\x01t\x12\x34");
        assert_eq!(read(&out), Ok(Some(Packet::Publish(publish))));

        let Ok(Some(Packet::Publish(publish))) = read(b"\x34\x05\x00\x01t\x00\x01") else {
            panic!("expected PUBLISH");
        };
        assert_eq!(publish.qos, QoS::ExactlyOnce);
        assert_eq!(publish.pkid, 1);
    }

    #[test]
    fn rejects_bad_topics_and_packet_ids() {
        assert_eq!(
            read(b"\x30\x03\x00\x01+"),
            Err(Error::InvalidTopicName {
                topic: MqttStr::from_static("+"),
                reason: TopicError::Wildcard
            })
        );
        assert_eq!(
            read(b"\x30\x02\x00\x00"),
            Err(Error::InvalidTopicName {
                topic: MqttStr::default(),
                reason: TopicError::Empty
            })
        );
        assert_eq!(
            read(b"\x32\x05\x00\x01t\x00\x00"),
            Err(Error::ZeroPacketId(PacketType::Publish))
        );
        assert_eq!(
            read(b"\x32\x04\x00\x01t\x00"),
            Err(Error::Truncated {
                field: "packet identifier"
            })
        );
        assert_eq!(
            read(b"\x30\x01\x00"),
            Err(Error::Truncated {
                field: "topic name"
            })
        );
    }

    #[test]
    fn payload_is_a_slice_of_the_frame() {
        let mut buf = BytesMut::from(&b"\x30\x08\x00\x01tpayl\x00"[..]);
        let start = buf.as_ptr() as usize;
        let Ok(Some(Packet::Publish(publish))) = Packet::read(&mut buf, 1024) else {
            panic!("expected PUBLISH");
        };
        assert_eq!(&publish.payload[..], b"payl\x00");
        assert_eq!(publish.payload.as_ptr() as usize, start + 5);
    }
}
