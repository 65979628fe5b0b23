//! The fixed header: packet type, flags and the remaining length varint.
//!
//! Everything here works on a borrowed `&[u8]` so a server can learn how long
//! the next frame is (and refuse it if too large) before the body has arrived
//! and before anything is allocated for it.

use bytes::{BufMut, BytesMut};

use crate::{Error, PacketType};

/// The largest remaining length a 4-byte varint can express (256 MiB - 1).
pub const MAX_REMAINING_LENGTH: usize = 268_435_455;

/// A parsed and validated fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedHeader {
    /// The packet type (high nibble of the first byte).
    pub packet_type: PacketType,
    /// The flags (low nibble of the first byte), already checked against the
    /// spec for this packet type.
    pub flags: u8,
    /// Length of the fixed header itself: 2 to 5 bytes.
    pub header_len: usize,
    /// Length of the variable header plus payload that follow.
    pub remaining_len: usize,
}

impl FixedHeader {
    /// Parses the fixed header at the start of `buf`.
    ///
    /// Returns `Ok(None)` while the header is incomplete. Fails as early as
    /// the bytes allow: a bad packet type or flags on the first byte, a
    /// remaining length over `max_packet_size` or longer than 4 bytes as soon
    /// as the length bytes are in, without waiting for the body.
    pub fn parse(buf: &[u8], max_packet_size: usize) -> Result<Option<FixedHeader>, Error> {
        let Some(&byte1) = buf.first() else {
            return Ok(None);
        };
        let packet_type = PacketType::from_nibble(byte1 >> 4)?;
        let flags = byte1 & 0x0f;
        check_flags(packet_type, flags)?;

        let mut remaining_len = 0usize;
        for (i, &byte) in buf.iter().skip(1).take(4).enumerate() {
            remaining_len |= usize::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                if remaining_len > max_packet_size {
                    return Err(Error::PacketTooLarge {
                        size: remaining_len,
                        max: max_packet_size,
                    });
                }
                return Ok(Some(FixedHeader {
                    packet_type,
                    flags,
                    header_len: 2 + i,
                    remaining_len,
                }));
            }
        }
        if buf.len() >= 5 {
            // Four length bytes, all with the continuation bit set.
            Err(Error::MalformedRemainingLength)
        } else {
            Ok(None)
        }
    }

    /// Length of the whole frame: fixed header plus remaining length.
    pub fn frame_len(&self) -> usize {
        self.header_len + self.remaining_len
    }
}

/// How long the next frame in `buf` is, if all of it is there.
///
/// `Ok(None)` means more bytes are needed. Errors are those of
/// [`FixedHeader::parse`], reported as soon as the header shows them.
pub fn frame_len(buf: &[u8], max_packet_size: usize) -> Result<Option<usize>, Error> {
    Ok(FixedHeader::parse(buf, max_packet_size)?
        .map(|header| header.frame_len())
        .filter(|&len| buf.len() >= len))
}

/// Checks the flag nibble against MQTT 3.1.1 section 2.2.2.
fn check_flags(packet_type: PacketType, flags: u8) -> Result<(), Error> {
    let malformed = Err(Error::MalformedFlags { packet_type, flags });
    match packet_type {
        PacketType::Publish => {
            let qos = (flags >> 1) & 0b11;
            if qos == 3 {
                return Err(Error::InvalidQoS(qos));
            }
            // MQTT-3.3.1-2: DUP must be 0 on QoS 0 messages.
            if qos == 0 && flags & 0b1000 != 0 {
                return malformed;
            }
            Ok(())
        }
        PacketType::PubRel | PacketType::Subscribe | PacketType::Unsubscribe => {
            if flags == 0b0010 {
                Ok(())
            } else {
                malformed
            }
        }
        _ => {
            if flags == 0 {
                Ok(())
            } else {
                malformed
            }
        }
    }
}

/// Number of bytes the varint encoding of `remaining_len` takes.
pub(crate) const fn varint_len(remaining_len: usize) -> usize {
    match remaining_len {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// Whole frame length for a packet with this remaining length.
pub(crate) const fn frame_len_for(remaining_len: usize) -> usize {
    1 + varint_len(remaining_len) + remaining_len
}

/// Writes the first byte and the remaining length, reserving room for the
/// whole frame so the body writes do not reallocate.
///
/// # Panics
///
/// If `remaining_len` exceeds [`MAX_REMAINING_LENGTH`]; only a locally built
/// packet (a huge payload or topic list) can do that.
pub(crate) fn write_fixed_header(out: &mut BytesMut, byte1: u8, remaining_len: usize) {
    assert!(
        remaining_len <= MAX_REMAINING_LENGTH,
        "MQTT packet remaining length {remaining_len} exceeds the protocol maximum of {MAX_REMAINING_LENGTH}"
    );
    out.reserve(frame_len_for(remaining_len));
    out.put_u8(byte1);
    let mut value = remaining_len;
    loop {
        // Lossless: masked to 7 bits.
        let mut byte = (value & 0x7f) as u8;
        value >>= 7;
        if value > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if value == 0 {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = MAX_REMAINING_LENGTH;

    fn header(buf: &[u8]) -> Result<Option<FixedHeader>, Error> {
        FixedHeader::parse(buf, MAX)
    }

    #[test]
    fn parses_every_varint_width() {
        for (bytes, len, header_len) in [
            (&[0x30, 0x00][..], 0, 2),
            (&[0x30, 0x7f], 127, 2),
            (&[0x30, 0x80, 0x01], 128, 3),
            (&[0x30, 0xff, 0x7f], 16_383, 3),
            (&[0x30, 0x80, 0x80, 0x01], 16_384, 4),
            (&[0x30, 0xff, 0xff, 0x7f], 2_097_151, 4),
            (&[0x30, 0x80, 0x80, 0x80, 0x01], 2_097_152, 5),
            (&[0x30, 0xff, 0xff, 0xff, 0x7f], MAX, 5),
        ] {
            let h = header(bytes).unwrap().unwrap();
            assert_eq!(h.remaining_len, len);
            assert_eq!(h.header_len, header_len);
            assert_eq!(h.packet_type, PacketType::Publish);
            assert_eq!(varint_len(len) + 1, header_len);

            let mut out = BytesMut::new();
            write_fixed_header(&mut out, 0x30, len);
            assert_eq!(&out[..], bytes);
        }
    }

    #[test]
    fn incomplete_header_is_none() {
        assert_eq!(header(&[]), Ok(None));
        assert_eq!(header(&[0x30]), Ok(None));
        assert_eq!(header(&[0x30, 0x80]), Ok(None));
        assert_eq!(header(&[0x30, 0x80, 0x80, 0x80]), Ok(None));
    }

    #[test]
    fn five_length_bytes_are_malformed() {
        assert_eq!(
            header(&[0x30, 0xff, 0xff, 0xff, 0xff]),
            Err(Error::MalformedRemainingLength)
        );
        assert_eq!(
            header(&[0x30, 0x80, 0x80, 0x80, 0x80, 0x01]),
            Err(Error::MalformedRemainingLength)
        );
    }

    #[test]
    fn size_limit_is_checked_before_the_body() {
        // 1000 bytes announced, none present.
        let buf = [0x30, 0xe8, 0x07];
        assert_eq!(
            FixedHeader::parse(&buf, 999),
            Err(Error::PacketTooLarge {
                size: 1000,
                max: 999
            })
        );
        assert_eq!(frame_len(&buf, 1000), Ok(None));
        assert_eq!(
            FixedHeader::parse(&buf, 1000).unwrap().unwrap().frame_len(),
            1003
        );
    }

    #[test]
    fn frame_len_waits_for_the_body() {
        assert_eq!(frame_len(&[0xc0], MAX), Ok(None));
        assert_eq!(frame_len(&[0xc0, 0x00], MAX), Ok(Some(2)));
        assert_eq!(frame_len(&[0x40, 0x02, 0x00], MAX), Ok(None));
        assert_eq!(frame_len(&[0x40, 0x02, 0x00, 0x01, 0xff], MAX), Ok(Some(4)));
    }

    #[test]
    fn reserved_packet_types_fail_on_the_first_byte() {
        assert_eq!(header(&[0x00]), Err(Error::InvalidPacketType(0)));
        assert_eq!(header(&[0xf0]), Err(Error::InvalidPacketType(15)));
    }

    #[test]
    fn flags_are_checked_per_type() {
        let malformed = |byte1: u8| {
            let packet_type = PacketType::from_nibble(byte1 >> 4).unwrap();
            Err(Error::MalformedFlags {
                packet_type,
                flags: byte1 & 0x0f,
            })
        };
        // Fixed 0b0010.
        for ok in [0x62, 0x82, 0xa2] {
            assert!(header(&[ok, 0]).is_ok(), "{ok:#x}");
        }
        for bad in [0x60, 0x80, 0xa0, 0x63, 0x8a] {
            assert_eq!(header(&[bad, 0]), malformed(bad), "{bad:#x}");
        }
        // Fixed 0.
        for ok in [0x10, 0x20, 0x40, 0x50, 0x70, 0x90, 0xb0, 0xc0, 0xd0, 0xe0] {
            assert!(header(&[ok, 0]).is_ok(), "{ok:#x}");
            assert_eq!(header(&[ok | 1, 0]), malformed(ok | 1));
            assert_eq!(header(&[ok | 2, 0]), malformed(ok | 2));
        }
        // PUBLISH: dup/qos/retain.
        for ok in [0x30, 0x31, 0x32, 0x33, 0x34, 0x3a, 0x3d] {
            assert!(header(&[ok, 0]).is_ok(), "{ok:#x}");
        }
        assert_eq!(header(&[0x36, 0]), Err(Error::InvalidQoS(3)));
        assert_eq!(header(&[0x3f, 0]), Err(Error::InvalidQoS(3)));
        assert_eq!(header(&[0x38, 0]), malformed(0x38));
    }

    #[test]
    #[should_panic(expected = "exceeds the protocol maximum")]
    fn writing_an_oversized_length_panics() {
        write_fixed_header(&mut BytesMut::new(), 0x30, MAX + 1);
    }
}
