//! CONNACK: the server's answer to CONNECT (MQTT 3.1.1 section 3.2).

use bytes::{Bytes, BytesMut};

use crate::fields::{expect_end, read_u8};
use crate::{Error, PacketType};

const SESSION_PRESENT: u8 = 0b0000_0001;

/// CONNACK return code (section 3.2.2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ConnectReturnCode {
    /// Connection accepted.
    Accepted = 0,
    /// The server does not support the requested protocol level.
    UnacceptableProtocolVersion = 1,
    /// The client identifier is well formed but not allowed.
    IdentifierRejected = 2,
    /// The MQTT service is unavailable.
    ServerUnavailable = 3,
    /// The user name or password is malformed.
    BadUserNamePassword = 4,
    /// The client is not authorized to connect.
    NotAuthorized = 5,
}

impl TryFrom<u8> for ConnectReturnCode {
    type Error = Error;

    fn try_from(code: u8) -> Result<Self, Error> {
        Ok(match code {
            0 => ConnectReturnCode::Accepted,
            1 => ConnectReturnCode::UnacceptableProtocolVersion,
            2 => ConnectReturnCode::IdentifierRejected,
            3 => ConnectReturnCode::ServerUnavailable,
            4 => ConnectReturnCode::BadUserNamePassword,
            5 => ConnectReturnCode::NotAuthorized,
            other => return Err(Error::InvalidConnectReturnCode(other)),
        })
    }
}

/// Connect acknowledgment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnAck {
    /// Whether the server resumed a stored session. Must be false unless
    /// `code` is `Accepted`.
    pub session_present: bool,
    /// Accepted, or why not.
    pub code: ConnectReturnCode,
}

impl ConnAck {
    /// Encoded length: always 4 bytes.
    pub const LEN: usize = 4;

    /// A CONNACK.
    pub fn new(code: ConnectReturnCode, session_present: bool) -> ConnAck {
        ConnAck {
            session_present,
            code,
        }
    }

    /// Encodes a CONNACK without a buffer.
    pub const fn encode(code: ConnectReturnCode, session_present: bool) -> [u8; 4] {
        [0x20, 0x02, session_present as u8, code as u8]
    }

    pub(crate) fn read(mut body: Bytes) -> Result<ConnAck, Error> {
        let flags = read_u8(&mut body, "connect acknowledge flags")?;
        if flags & !SESSION_PRESENT != 0 {
            return Err(Error::InvalidConnAckFlags(flags));
        }
        let code = ConnectReturnCode::try_from(read_u8(&mut body, "connect return code")?)?;
        expect_end(&body, PacketType::ConnAck)?;
        let session_present = flags & SESSION_PRESENT != 0;
        // MQTT-3.2.2-4: a refused connection has no session.
        if session_present && code != ConnectReturnCode::Accepted {
            return Err(Error::SessionPresentOnRefusal(code));
        }
        Ok(ConnAck {
            session_present,
            code,
        })
    }

    /// Encoded length in bytes, fixed header included.
    pub fn len(&self) -> usize {
        Self::LEN
    }

    /// Appends the encoded packet to `out`.
    pub fn write(&self, out: &mut BytesMut) {
        out.extend_from_slice(&Self::encode(self.code, self.session_present));
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
    fn encodes_and_decodes() {
        let ack = ConnAck::new(ConnectReturnCode::Accepted, true);
        let mut out = BytesMut::new();
        ack.write(&mut out);
        assert_eq!(&out[..], &[0x20, 0x02, 0x01, 0x00]);
        assert_eq!(out.len(), ack.len());
        assert_eq!(read(&out), Ok(Some(Packet::ConnAck(ack))));
        assert_eq!(
            ConnAck::encode(ConnectReturnCode::UnacceptableProtocolVersion, false),
            [0x20, 0x02, 0x00, 0x01]
        );
    }

    #[test]
    fn every_return_code_round_trips() {
        for code in 0..=5u8 {
            let code = ConnectReturnCode::try_from(code).unwrap();
            let bytes = ConnAck::encode(code, false);
            assert_eq!(
                read(&bytes),
                Ok(Some(Packet::ConnAck(ConnAck::new(code, false))))
            );
        }
    }

    #[test]
    fn rejects_bad_fields() {
        assert_eq!(
            read(&[0x20, 0x02, 0x02, 0x00]),
            Err(Error::InvalidConnAckFlags(0x02))
        );
        assert_eq!(
            read(&[0x20, 0x02, 0x00, 0x06]),
            Err(Error::InvalidConnectReturnCode(6))
        );
        assert_eq!(
            read(&[0x20, 0x02, 0x01, 0x05]),
            Err(Error::SessionPresentOnRefusal(
                ConnectReturnCode::NotAuthorized
            ))
        );
        assert_eq!(
            read(&[0x20, 0x01, 0x00]),
            Err(Error::Truncated {
                field: "connect return code"
            })
        );
        assert_eq!(
            read(&[0x20, 0x03, 0x00, 0x00, 0x00]),
            Err(Error::TrailingBytes {
                packet_type: PacketType::ConnAck,
                extra: 1
            })
        );
    }
}
