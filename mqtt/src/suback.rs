//! SUBACK: the server's answer to SUBSCRIBE (MQTT 3.1.1 section 3.9).

use bytes::{BufMut, Bytes, BytesMut};

use crate::fields::{read_pkid, read_u8};
use crate::framing::{frame_len_for, write_fixed_header};
use crate::{Error, PacketType, QoS};

const FAILURE: u8 = 0x80;

/// The outcome for one filter of a SUBSCRIBE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeReturnCode {
    /// Subscribed with this maximum QoS (0x00, 0x01 or 0x02).
    Success(QoS),
    /// Refused (0x80).
    Failure,
}

impl SubscribeReturnCode {
    /// The byte on the wire.
    pub const fn as_u8(self) -> u8 {
        match self {
            SubscribeReturnCode::Success(qos) => qos as u8,
            SubscribeReturnCode::Failure => FAILURE,
        }
    }
}

impl TryFrom<u8> for SubscribeReturnCode {
    type Error = Error;

    fn try_from(code: u8) -> Result<Self, Error> {
        match code {
            FAILURE => Ok(SubscribeReturnCode::Failure),
            0..=2 => QoS::try_from(code).map(SubscribeReturnCode::Success),
            other => Err(Error::InvalidSubAckReturnCode(other)),
        }
    }
}

/// Subscribe acknowledgment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubAck {
    /// Packet identifier of the acknowledged SUBSCRIBE (nonzero).
    pub pkid: u16,
    /// One return code per requested filter, in request order.
    pub return_codes: Vec<SubscribeReturnCode>,
}

impl SubAck {
    /// A SUBACK.
    pub fn new(pkid: u16, return_codes: Vec<SubscribeReturnCode>) -> SubAck {
        SubAck { pkid, return_codes }
    }

    pub(crate) fn read(mut body: Bytes) -> Result<SubAck, Error> {
        let pkid = read_pkid(&mut body, PacketType::SubAck)?;
        let mut return_codes = Vec::with_capacity(body.len());
        while !body.is_empty() {
            let code = read_u8(&mut body, "return code")?;
            return_codes.push(SubscribeReturnCode::try_from(code)?);
        }
        if return_codes.is_empty() {
            // A SUBSCRIBE has at least one filter, so its SUBACK at least one code.
            return Err(Error::EmptyPayload(PacketType::SubAck));
        }
        Ok(SubAck { pkid, return_codes })
    }

    fn remaining_len(&self) -> usize {
        2 + self.return_codes.len()
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
        write_fixed_header(out, 0x90, self.remaining_len());
        out.put_u16(self.pkid);
        for code in &self.return_codes {
            out.put_u8(code.as_u8());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Packet;

    fn read(bytes: &[u8]) -> Result<Option<Packet>, Error> {
        Packet::read(&mut BytesMut::from(bytes), 1024)
    }

    #[test]
    fn round_trips_every_code() {
        let suback = SubAck::new(
            5,
            vec![
                SubscribeReturnCode::Success(QoS::AtMostOnce),
                SubscribeReturnCode::Success(QoS::AtLeastOnce),
                SubscribeReturnCode::Success(QoS::ExactlyOnce),
                SubscribeReturnCode::Failure,
            ],
        );
        let mut out = BytesMut::new();
        suback.write(&mut out);
        assert_eq!(&out[..], &[0x90, 0x06, 0x00, 0x05, 0x00, 0x01, 0x02, 0x80]);
        assert_eq!(out.len(), suback.len());
        assert_eq!(read(&out), Ok(Some(Packet::SubAck(suback))));
    }

    #[test]
    fn rejects_bad_codes_and_empty() {
        assert_eq!(
            read(&[0x90, 0x03, 0x00, 0x01, 0x03]),
            Err(Error::InvalidSubAckReturnCode(3))
        );
        assert_eq!(
            read(&[0x90, 0x03, 0x00, 0x01, 0x81]),
            Err(Error::InvalidSubAckReturnCode(0x81))
        );
        assert_eq!(
            read(&[0x90, 0x02, 0x00, 0x01]),
            Err(Error::EmptyPayload(PacketType::SubAck))
        );
        assert_eq!(
            read(&[0x90, 0x03, 0x00, 0x00, 0x00]),
            Err(Error::ZeroPacketId(PacketType::SubAck))
        );
    }
}
