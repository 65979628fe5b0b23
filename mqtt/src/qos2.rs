//! PUBREC, PUBREL and PUBCOMP: the QoS 2 handshake (MQTT 3.1.1 sections 3.5
//! to 3.7).
//!
//! The server does not support QoS 2; these are decoded so it can recognise
//! them and refuse clearly, and encoded for tests and simulators.

use bytes::{Bytes, BytesMut};

use crate::fields::{encode_pkid_only, read_pkid_only};
use crate::{Error, PacketType};

/// Publish received (QoS 2, part 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PubRec {
    /// Packet identifier of the PUBLISH (nonzero).
    pub pkid: u16,
}

/// Publish release (QoS 2, part 2). Its fixed header flags are 0b0010.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PubRel {
    /// Packet identifier of the PUBLISH (nonzero).
    pub pkid: u16,
}

/// Publish complete (QoS 2, part 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PubComp {
    /// Packet identifier of the PUBLISH (nonzero).
    pub pkid: u16,
}

impl PubRec {
    /// Encoded length: always 4 bytes.
    pub const LEN: usize = 4;

    /// Encodes a PUBREC without a buffer.
    pub const fn encode(pkid: u16) -> [u8; 4] {
        encode_pkid_only(0x50, pkid)
    }

    pub(crate) fn read(body: Bytes) -> Result<PubRec, Error> {
        Ok(PubRec {
            pkid: read_pkid_only(body, PacketType::PubRec)?,
        })
    }

    /// Encoded length in bytes, fixed header included.
    pub fn len(&self) -> usize {
        Self::LEN
    }

    /// Appends the encoded packet to `out`.
    pub fn write(&self, out: &mut BytesMut) {
        out.extend_from_slice(&Self::encode(self.pkid));
    }
}

impl PubRel {
    /// Encoded length: always 4 bytes.
    pub const LEN: usize = 4;

    /// Encodes a PUBREL without a buffer.
    pub const fn encode(pkid: u16) -> [u8; 4] {
        encode_pkid_only(0x62, pkid)
    }

    pub(crate) fn read(body: Bytes) -> Result<PubRel, Error> {
        Ok(PubRel {
            pkid: read_pkid_only(body, PacketType::PubRel)?,
        })
    }

    /// Encoded length in bytes, fixed header included.
    pub fn len(&self) -> usize {
        Self::LEN
    }

    /// Appends the encoded packet to `out`.
    pub fn write(&self, out: &mut BytesMut) {
        out.extend_from_slice(&Self::encode(self.pkid));
    }
}

impl PubComp {
    /// Encoded length: always 4 bytes.
    pub const LEN: usize = 4;

    /// Encodes a PUBCOMP without a buffer.
    pub const fn encode(pkid: u16) -> [u8; 4] {
        encode_pkid_only(0x70, pkid)
    }

    pub(crate) fn read(body: Bytes) -> Result<PubComp, Error> {
        Ok(PubComp {
            pkid: read_pkid_only(body, PacketType::PubComp)?,
        })
    }

    /// Encoded length in bytes, fixed header included.
    pub fn len(&self) -> usize {
        Self::LEN
    }

    /// Appends the encoded packet to `out`.
    pub fn write(&self, out: &mut BytesMut) {
        out.extend_from_slice(&Self::encode(self.pkid));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Packet;

    fn read(bytes: &[u8]) -> Result<Option<Packet>, Error> {
        Packet::read(&mut BytesMut::from(bytes), 16)
    }

    #[test]
    fn round_trip() {
        let cases = [
            (Packet::PubRec(PubRec { pkid: 1 }), [0x50, 0x02, 0x00, 0x01]),
            (Packet::PubRel(PubRel { pkid: 2 }), [0x62, 0x02, 0x00, 0x02]),
            (
                Packet::PubComp(PubComp { pkid: 3 }),
                [0x70, 0x02, 0x00, 0x03],
            ),
        ];
        for (packet, bytes) in cases {
            let mut out = BytesMut::new();
            packet.write(&mut out);
            assert_eq!(&out[..], &bytes);
            assert_eq!(packet.len(), 4);
            assert_eq!(read(&bytes), Ok(Some(packet)));
        }
    }

    #[test]
    fn pubrel_requires_flags_0010() {
        assert_eq!(
            read(&[0x60, 0x02, 0x00, 0x01]),
            Err(Error::MalformedFlags {
                packet_type: PacketType::PubRel,
                flags: 0
            })
        );
        assert_eq!(
            read(&[0x52, 0x02, 0x00, 0x01]),
            Err(Error::MalformedFlags {
                packet_type: PacketType::PubRec,
                flags: 2
            })
        );
    }

    #[test]
    fn rejects_zero_and_trailing_bytes() {
        assert_eq!(
            read(&[0x70, 0x02, 0x00, 0x00]),
            Err(Error::ZeroPacketId(PacketType::PubComp))
        );
        assert_eq!(
            read(&[0x50, 0x03, 0x00, 0x01, 0x00]),
            Err(Error::TrailingBytes {
                packet_type: PacketType::PubRec,
                extra: 1
            })
        );
    }
}
