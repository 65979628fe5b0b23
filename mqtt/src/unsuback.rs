//! UNSUBACK: acknowledges an UNSUBSCRIBE (MQTT 3.1.1 section 3.11).

use bytes::{Bytes, BytesMut};

use crate::fields::{encode_pkid_only, read_pkid_only};
use crate::{Error, PacketType};

/// Unsubscribe acknowledgment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnsubAck {
    /// Packet identifier of the acknowledged UNSUBSCRIBE (nonzero).
    pub pkid: u16,
}

impl UnsubAck {
    /// Encoded length: always 4 bytes.
    pub const LEN: usize = 4;

    /// Encodes an UNSUBACK without a buffer.
    pub const fn encode(pkid: u16) -> [u8; 4] {
        encode_pkid_only(0xb0, pkid)
    }

    pub(crate) fn read(body: Bytes) -> Result<UnsubAck, Error> {
        Ok(UnsubAck {
            pkid: read_pkid_only(body, PacketType::UnsubAck)?,
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
        let mut buf = BytesMut::new();
        UnsubAck { pkid: 9 }.write(&mut buf);
        assert_eq!(&buf[..], &[0xb0, 0x02, 0x00, 0x09]);
        assert_eq!(
            Packet::read(&mut buf, 16),
            Ok(Some(Packet::UnsubAck(UnsubAck { pkid: 9 })))
        );
    }

    #[test]
    fn rejects_trailing_bytes_and_zero() {
        let read = |bytes: &[u8]| Packet::read(&mut BytesMut::from(bytes), 16);
        assert_eq!(
            read(&[0xb0, 0x02, 0x00, 0x00]),
            Err(Error::ZeroPacketId(PacketType::UnsubAck))
        );
        assert_eq!(
            read(&[0xb0, 0x04, 0x00, 0x01, 0x00, 0x00]),
            Err(Error::TrailingBytes {
                packet_type: PacketType::UnsubAck,
                extra: 2
            })
        );
    }
}
