//! Primitive fields shared by the packet codecs: bytes, `u16`, packet
//! identifiers, length-prefixed strings and binary data.
//!
//! Readers take the packet body as `Bytes` and split fields off its front, so
//! strings and payloads are slices of the received frame. Every read checks the
//! length first: a short body is [`Error::Truncated`], never a panic.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::{Error, MqttStr, PacketType};

pub(crate) fn read_u8(body: &mut Bytes, field: &'static str) -> Result<u8, Error> {
    if body.is_empty() {
        return Err(Error::Truncated { field });
    }
    Ok(body.get_u8())
}

pub(crate) fn read_u16(body: &mut Bytes, field: &'static str) -> Result<u16, Error> {
    if body.len() < 2 {
        return Err(Error::Truncated { field });
    }
    Ok(body.get_u16())
}

/// Reads a packet identifier, which must be nonzero in every packet carrying one.
pub(crate) fn read_pkid(body: &mut Bytes, packet_type: PacketType) -> Result<u16, Error> {
    match read_u16(body, "packet identifier")? {
        0 => Err(Error::ZeroPacketId(packet_type)),
        pkid => Ok(pkid),
    }
}

/// Reads 2-byte-length-prefixed binary data.
pub(crate) fn read_binary(body: &mut Bytes, field: &'static str) -> Result<Bytes, Error> {
    let len = usize::from(read_u16(body, field)?);
    if body.len() < len {
        return Err(Error::Truncated { field });
    }
    Ok(body.split_to(len))
}

/// Reads a 2-byte-length-prefixed UTF-8 string.
pub(crate) fn read_str(body: &mut Bytes, field: &'static str) -> Result<MqttStr, Error> {
    MqttStr::from_bytes(read_binary(body, field)?, field)
}

/// Fails if anything is left after the last field of a fixed-length packet.
pub(crate) fn expect_end(body: &Bytes, packet_type: PacketType) -> Result<(), Error> {
    if body.is_empty() {
        Ok(())
    } else {
        Err(Error::TrailingBytes {
            packet_type,
            extra: body.len(),
        })
    }
}

/// Writes 2-byte-length-prefixed binary data.
///
/// # Panics
///
/// If `data` is longer than 65,535 bytes. [`MqttStr`] cannot be; only a locally
/// built password or will payload can.
pub(crate) fn write_binary(out: &mut BytesMut, data: &[u8]) {
    let Ok(len) = u16::try_from(data.len()) else {
        panic!(
            "MQTT binary field of {} bytes exceeds the 65535-byte limit",
            data.len()
        );
    };
    out.put_u16(len);
    out.put_slice(data);
}

pub(crate) fn write_str(out: &mut BytesMut, s: &MqttStr) {
    write_binary(out, s.as_bytes());
}

/// Encodes a packet that is just a fixed header and a packet identifier
/// (PUBACK, PUBREC, PUBREL, PUBCOMP, UNSUBACK).
pub(crate) const fn encode_pkid_only(byte1: u8, pkid: u16) -> [u8; 4] {
    let [hi, lo] = pkid.to_be_bytes();
    [byte1, 2, hi, lo]
}

/// Decodes the body of a packet that is just a packet identifier.
pub(crate) fn read_pkid_only(mut body: Bytes, packet_type: PacketType) -> Result<u16, Error> {
    let pkid = read_pkid(&mut body, packet_type)?;
    expect_end(&body, packet_type)?;
    Ok(pkid)
}

/// Decodes the body of a packet that has none (PINGREQ, PINGRESP, DISCONNECT).
pub(crate) fn read_empty(body: &Bytes, packet_type: PacketType) -> Result<(), Error> {
    expect_end(body, packet_type)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_bodies_are_truncated_errors() {
        let mut body = Bytes::from_static(&[0x00]);
        assert_eq!(
            read_u16(&mut body, "keep alive"),
            Err(Error::Truncated {
                field: "keep alive"
            })
        );
        let mut body = Bytes::from_static(&[0x00, 0x03, b'a', b'b']);
        assert_eq!(
            read_str(&mut body, "topic name"),
            Err(Error::Truncated {
                field: "topic name"
            })
        );
        assert_eq!(
            read_u8(&mut Bytes::new(), "flags"),
            Err(Error::Truncated { field: "flags" })
        );
    }

    #[test]
    fn strings_are_slices_of_the_body() {
        let body = Bytes::from_static(&[0x00, 0x02, b'h', b'i', 0xff]);
        let mut rest = body.clone();
        let s = read_str(&mut rest, "topic name").unwrap();
        assert_eq!(s, "hi");
        assert_eq!(s.as_bytes().as_ptr(), body[2..].as_ptr());
        assert_eq!(&rest[..], &[0xff]);
    }

    #[test]
    fn zero_pkid_is_rejected() {
        assert_eq!(
            read_pkid_only(Bytes::from_static(&[0, 0]), PacketType::PubAck),
            Err(Error::ZeroPacketId(PacketType::PubAck))
        );
        assert_eq!(
            read_pkid_only(Bytes::from_static(&[0, 1, 0]), PacketType::PubAck),
            Err(Error::TrailingBytes {
                packet_type: PacketType::PubAck,
                extra: 1
            })
        );
    }

    #[test]
    #[should_panic(expected = "65535-byte limit")]
    fn oversized_binary_panics() {
        write_binary(&mut BytesMut::new(), &vec![0; 65_536]);
    }
}
