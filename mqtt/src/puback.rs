//! PUBACK: acknowledges a QoS 1 PUBLISH (MQTT 3.1.1 section 3.4).

use bytes::{Bytes, BytesMut};

use crate::fields::{encode_pkid_only, read_pkid_only};
use crate::{Error, PacketType};

/// Publish acknowledgment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PubAck {
    /// Packet identifier of the acknowledged PUBLISH (nonzero).
    pub pkid: u16,
}

impl PubAck {
    /// Encoded length: always 4 bytes.
    pub const LEN: usize = 4;

    /// Encodes a PUBACK without a buffer, for the server's hot path.
    pub const fn encode(pkid: u16) -> [u8; 4] {
        encode_pkid_only(0x40, pkid)
    }

    pub(crate) fn read(body: Bytes) -> Result<PubAck, Error> {
        Ok(PubAck {
            pkid: read_pkid_only(body, PacketType::PubAck)?,
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

    #[test]
    fn round_trips() {
        assert_eq!(PubAck::encode(0x0102), [0x40, 0x02, 0x01, 0x02]);
        let mut buf = BytesMut::new();
        PubAck { pkid: 0x0102 }.write(&mut buf);
        assert_eq!(&buf[..], &PubAck::encode(0x0102));
        assert_eq!(
            Packet::read(&mut buf, 16),
            Ok(Some(Packet::PubAck(PubAck { pkid: 0x0102 })))
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn rejects_wrong_lengths_and_zero() {
        let read = |bytes: &[u8]| Packet::read(&mut BytesMut::from(bytes), 16);
        assert_eq!(
            read(&[0x40, 0x02, 0x00, 0x00]),
            Err(Error::ZeroPacketId(PacketType::PubAck))
        );
        assert_eq!(
            read(&[0x40, 0x01, 0x01]),
            Err(Error::Truncated {
                field: "packet identifier"
            })
        );
        assert_eq!(
            read(&[0x40, 0x03, 0x00, 0x01, 0x00]),
            Err(Error::TrailingBytes {
                packet_type: PacketType::PubAck,
                extra: 1
            })
        );
    }
}
