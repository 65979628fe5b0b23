//! DISCONNECT: the client's clean goodbye (MQTT 3.1.1 section 3.14). A bare
//! fixed header, so a constant here and a unit variant of [`crate::Packet`].
//! A server discards the will when it receives one.

/// A complete DISCONNECT packet.
pub const DISCONNECT_BYTES: [u8; 2] = [0xe0, 0x00];

#[cfg(test)]
mod tests {
    use bytes::BytesMut;

    use super::*;
    use crate::{Error, Packet, PacketType};

    #[test]
    fn round_trip() {
        let mut out = BytesMut::new();
        Packet::Disconnect.write(&mut out);
        assert_eq!(&out[..], &DISCONNECT_BYTES);
        assert_eq!(Packet::read(&mut out, 0), Ok(Some(Packet::Disconnect)));
    }

    #[test]
    fn must_be_empty() {
        assert_eq!(
            Packet::read(&mut BytesMut::from(&[0xe0, 0x01, 0x00][..]), 1),
            Err(Error::TrailingBytes {
                packet_type: PacketType::Disconnect,
                extra: 1
            })
        );
    }
}
