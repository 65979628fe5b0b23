//! `Packet`: any MQTT 3.1.1 control packet, and the decode/encode entry points.

use std::fmt;

use bytes::BytesMut;

use crate::disconnect::DISCONNECT_BYTES;
use crate::fields::read_empty;
use crate::ping::{PINGREQ_BYTES, PINGRESP_BYTES};
use crate::{
    ConnAck, Connect, Error, FixedHeader, PubAck, PubComp, PubRec, PubRel, Publish, SubAck,
    Subscribe, UnsubAck, Unsubscribe,
};

/// The packet type from the high nibble of the fixed header's first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PacketType {
    /// Client request to connect.
    Connect = 1,
    /// Connect acknowledgment.
    ConnAck = 2,
    /// Publish message.
    Publish = 3,
    /// Publish acknowledgment (QoS 1).
    PubAck = 4,
    /// Publish received (QoS 2, part 1).
    PubRec = 5,
    /// Publish release (QoS 2, part 2).
    PubRel = 6,
    /// Publish complete (QoS 2, part 3).
    PubComp = 7,
    /// Subscribe request.
    Subscribe = 8,
    /// Subscribe acknowledgment.
    SubAck = 9,
    /// Unsubscribe request.
    Unsubscribe = 10,
    /// Unsubscribe acknowledgment.
    UnsubAck = 11,
    /// Ping request.
    PingReq = 12,
    /// Ping response.
    PingResp = 13,
    /// Client is disconnecting.
    Disconnect = 14,
}

impl PacketType {
    /// Maps the high nibble of the first byte; 0 and 15 are reserved.
    pub fn from_nibble(nibble: u8) -> Result<PacketType, Error> {
        Ok(match nibble {
            1 => PacketType::Connect,
            2 => PacketType::ConnAck,
            3 => PacketType::Publish,
            4 => PacketType::PubAck,
            5 => PacketType::PubRec,
            6 => PacketType::PubRel,
            7 => PacketType::PubComp,
            8 => PacketType::Subscribe,
            9 => PacketType::SubAck,
            10 => PacketType::Unsubscribe,
            11 => PacketType::UnsubAck,
            12 => PacketType::PingReq,
            13 => PacketType::PingResp,
            14 => PacketType::Disconnect,
            other => return Err(Error::InvalidPacketType(other)),
        })
    }

    /// The name the spec uses, e.g. `"PUBACK"`.
    pub fn name(self) -> &'static str {
        match self {
            PacketType::Connect => "CONNECT",
            PacketType::ConnAck => "CONNACK",
            PacketType::Publish => "PUBLISH",
            PacketType::PubAck => "PUBACK",
            PacketType::PubRec => "PUBREC",
            PacketType::PubRel => "PUBREL",
            PacketType::PubComp => "PUBCOMP",
            PacketType::Subscribe => "SUBSCRIBE",
            PacketType::SubAck => "SUBACK",
            PacketType::Unsubscribe => "UNSUBSCRIBE",
            PacketType::UnsubAck => "UNSUBACK",
            PacketType::PingReq => "PINGREQ",
            PacketType::PingResp => "PINGRESP",
            PacketType::Disconnect => "DISCONNECT",
        }
    }
}

impl fmt::Display for PacketType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Any MQTT 3.1.1 control packet.
///
/// The decoder does not know which side of the connection it is on: a server
/// that receives, say, a CONNACK gets `Packet::ConnAck` and must treat it as a
/// protocol violation itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// CONNECT.
    Connect(Connect),
    /// CONNACK.
    ConnAck(ConnAck),
    /// PUBLISH.
    Publish(Publish),
    /// PUBACK.
    PubAck(PubAck),
    /// PUBREC.
    PubRec(PubRec),
    /// PUBREL.
    PubRel(PubRel),
    /// PUBCOMP.
    PubComp(PubComp),
    /// SUBSCRIBE.
    Subscribe(Subscribe),
    /// SUBACK.
    SubAck(SubAck),
    /// UNSUBSCRIBE.
    Unsubscribe(Unsubscribe),
    /// UNSUBACK.
    UnsubAck(UnsubAck),
    /// PINGREQ.
    PingReq,
    /// PINGRESP.
    PingResp,
    /// DISCONNECT.
    Disconnect,
}

impl Packet {
    /// Decodes the next packet from the front of `buf`.
    ///
    /// - `Ok(None)`: the frame is incomplete; `buf` is untouched. Read more
    ///   bytes and call again.
    /// - `Ok(Some(packet))`: the frame was split off `buf`; strings and
    ///   payloads in `packet` are slices of it (no copies).
    /// - `Err(_)`: the connection must be closed. Header errors (type, flags,
    ///   size over `max_packet_size`, malformed length) are reported as soon as
    ///   the header bytes are in, before the body arrives, and leave `buf`
    ///   untouched; body errors consume the frame.
    ///
    /// `max_packet_size` bounds the remaining length (variable header plus
    /// payload, not counting the 2 to 5 byte fixed header).
    pub fn read(buf: &mut BytesMut, max_packet_size: usize) -> Result<Option<Packet>, Error> {
        let Some(header) = FixedHeader::parse(buf, max_packet_size)? else {
            return Ok(None);
        };
        if buf.len() < header.frame_len() {
            return Ok(None);
        }
        let mut body = buf.split_to(header.frame_len()).freeze();
        let body = body.split_off(header.header_len);
        let packet = match header.packet_type {
            PacketType::Connect => Packet::Connect(Connect::read(body)?),
            PacketType::ConnAck => Packet::ConnAck(ConnAck::read(body)?),
            PacketType::Publish => Packet::Publish(Publish::read(header.flags, body)?),
            PacketType::PubAck => Packet::PubAck(PubAck::read(body)?),
            PacketType::PubRec => Packet::PubRec(PubRec::read(body)?),
            PacketType::PubRel => Packet::PubRel(PubRel::read(body)?),
            PacketType::PubComp => Packet::PubComp(PubComp::read(body)?),
            PacketType::Subscribe => Packet::Subscribe(Subscribe::read(body)?),
            PacketType::SubAck => Packet::SubAck(SubAck::read(body)?),
            PacketType::Unsubscribe => Packet::Unsubscribe(Unsubscribe::read(body)?),
            PacketType::UnsubAck => Packet::UnsubAck(UnsubAck::read(body)?),
            PacketType::PingReq => {
                read_empty(&body, PacketType::PingReq)?;
                Packet::PingReq
            }
            PacketType::PingResp => {
                read_empty(&body, PacketType::PingResp)?;
                Packet::PingResp
            }
            PacketType::Disconnect => {
                read_empty(&body, PacketType::Disconnect)?;
                Packet::Disconnect
            }
        };
        Ok(Some(packet))
    }

    /// Appends the encoded packet to `out`.
    ///
    /// # Panics
    ///
    /// Only for locally built packets that MQTT cannot express: a password or
    /// will payload over 65,535 bytes, or a packet over 256 MiB. Decoded
    /// packets always re-encode.
    pub fn write(&self, out: &mut BytesMut) {
        match self {
            Packet::Connect(p) => p.write(out),
            Packet::ConnAck(p) => p.write(out),
            Packet::Publish(p) => p.write(out),
            Packet::PubAck(p) => p.write(out),
            Packet::PubRec(p) => p.write(out),
            Packet::PubRel(p) => p.write(out),
            Packet::PubComp(p) => p.write(out),
            Packet::Subscribe(p) => p.write(out),
            Packet::SubAck(p) => p.write(out),
            Packet::Unsubscribe(p) => p.write(out),
            Packet::UnsubAck(p) => p.write(out),
            Packet::PingReq => out.extend_from_slice(&PINGREQ_BYTES),
            Packet::PingResp => out.extend_from_slice(&PINGRESP_BYTES),
            Packet::Disconnect => out.extend_from_slice(&DISCONNECT_BYTES),
        }
    }

    /// Encoded length in bytes, fixed header included.
    pub fn len(&self) -> usize {
        match self {
            Packet::Connect(p) => p.len(),
            Packet::ConnAck(p) => p.len(),
            Packet::Publish(p) => p.len(),
            Packet::PubAck(p) => p.len(),
            Packet::PubRec(p) => p.len(),
            Packet::PubRel(p) => p.len(),
            Packet::PubComp(p) => p.len(),
            Packet::Subscribe(p) => p.len(),
            Packet::SubAck(p) => p.len(),
            Packet::Unsubscribe(p) => p.len(),
            Packet::UnsubAck(p) => p.len(),
            Packet::PingReq | Packet::PingResp | Packet::Disconnect => 2,
        }
    }

    /// The packet's type.
    pub fn packet_type(&self) -> PacketType {
        match self {
            Packet::Connect(_) => PacketType::Connect,
            Packet::ConnAck(_) => PacketType::ConnAck,
            Packet::Publish(_) => PacketType::Publish,
            Packet::PubAck(_) => PacketType::PubAck,
            Packet::PubRec(_) => PacketType::PubRec,
            Packet::PubRel(_) => PacketType::PubRel,
            Packet::PubComp(_) => PacketType::PubComp,
            Packet::Subscribe(_) => PacketType::Subscribe,
            Packet::SubAck(_) => PacketType::SubAck,
            Packet::Unsubscribe(_) => PacketType::Unsubscribe,
            Packet::UnsubAck(_) => PacketType::UnsubAck,
            Packet::PingReq => PacketType::PingReq,
            Packet::PingResp => PacketType::PingResp,
            Packet::Disconnect => PacketType::Disconnect,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MAX_REMAINING_LENGTH;

    const MAX: usize = MAX_REMAINING_LENGTH;

    #[test]
    fn incomplete_input_leaves_the_buffer_untouched() {
        let mut buf = BytesMut::from(&[0x40, 0x02, 0x00][..]);
        assert_eq!(Packet::read(&mut buf, MAX), Ok(None));
        assert_eq!(&buf[..], &[0x40, 0x02, 0x00]);
    }

    #[test]
    fn reads_consecutive_packets() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&PINGREQ_BYTES);
        buf.extend_from_slice(&PubAck::encode(7));
        buf.extend_from_slice(&DISCONNECT_BYTES);
        buf.extend_from_slice(&[0x30]);
        assert_eq!(Packet::read(&mut buf, MAX), Ok(Some(Packet::PingReq)));
        assert_eq!(
            Packet::read(&mut buf, MAX),
            Ok(Some(Packet::PubAck(PubAck { pkid: 7 })))
        );
        assert_eq!(Packet::read(&mut buf, MAX), Ok(Some(Packet::Disconnect)));
        assert_eq!(Packet::read(&mut buf, MAX), Ok(None));
        assert_eq!(&buf[..], &[0x30]);
    }

    #[test]
    fn oversized_packet_fails_before_the_body_arrives() {
        let mut buf = BytesMut::from(&[0x30, 0x80, 0x08][..]);
        assert_eq!(
            Packet::read(&mut buf, 1023),
            Err(Error::PacketTooLarge {
                size: 1024,
                max: 1023
            })
        );
        assert_eq!(buf.len(), 3);
    }

    #[test]
    fn empty_packets_must_be_empty() {
        for (byte1, packet_type) in [
            (0xc0, PacketType::PingReq),
            (0xd0, PacketType::PingResp),
            (0xe0, PacketType::Disconnect),
        ] {
            let mut buf = BytesMut::from(&[byte1, 0x01, 0x00][..]);
            assert_eq!(
                Packet::read(&mut buf, MAX),
                Err(Error::TrailingBytes {
                    packet_type,
                    extra: 1
                })
            );
        }
    }

    #[test]
    fn packet_type_round_trips_through_the_nibble() {
        for nibble in 1..=14 {
            let packet_type = PacketType::from_nibble(nibble).unwrap();
            assert_eq!(packet_type as u8, nibble);
        }
        assert_eq!(PacketType::UnsubAck.to_string(), "UNSUBACK");
    }
}
