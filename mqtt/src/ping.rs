//! PINGREQ and PINGRESP: keep-alive probes (MQTT 3.1.1 sections 3.12 and
//! 3.13). Both are a bare fixed header, so they are plain constants here and
//! unit variants of [`crate::Packet`].

/// A complete PINGREQ packet.
pub const PINGREQ_BYTES: [u8; 2] = [0xc0, 0x00];

/// A complete PINGRESP packet.
pub const PINGRESP_BYTES: [u8; 2] = [0xd0, 0x00];

#[cfg(test)]
mod tests {
    use bytes::BytesMut;

    use super::*;
    use crate::{Error, Packet, PacketType};

    #[test]
    fn round_trip() {
        for (packet, bytes) in [
            (Packet::PingReq, PINGREQ_BYTES),
            (Packet::PingResp, PINGRESP_BYTES),
        ] {
            let mut out = BytesMut::new();
            packet.write(&mut out);
            assert_eq!(&out[..], &bytes);
            assert_eq!(packet.len(), 2);
            assert_eq!(Packet::read(&mut out, 0), Ok(Some(packet)));
        }
    }

    #[test]
    fn flags_must_be_zero() {
        assert_eq!(
            Packet::read(&mut BytesMut::from(&[0xc1, 0x00][..]), 0),
            Err(Error::MalformedFlags {
                packet_type: PacketType::PingReq,
                flags: 1
            })
        );
    }
}
