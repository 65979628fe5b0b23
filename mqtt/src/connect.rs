//! CONNECT: the first packet a client sends (MQTT 3.1.1 section 3.1).

use bytes::{BufMut, Bytes, BytesMut};

use crate::fields::{
    expect_end, read_binary, read_str, read_u8, read_u16, write_binary, write_str,
};
use crate::framing::{frame_len_for, write_fixed_header};
use crate::topic::check_name;
use crate::{Error, MqttStr, PacketType, QoS};

const PROTOCOL_NAME: &[u8] = b"MQTT";
const PROTOCOL_LEVEL: u8 = 4;
const MQTT31_PROTOCOL_NAME: &[u8] = b"MQIsdp";
const MQTT31_PROTOCOL_LEVEL: u8 = 3;

// Connect flags, section 3.1.2.3.
const RESERVED: u8 = 0b0000_0001;
const CLEAN_SESSION: u8 = 0b0000_0010;
const WILL: u8 = 0b0000_0100;
const WILL_QOS_SHIFT: u8 = 3;
const WILL_QOS_MASK: u8 = 0b0001_1000;
const WILL_RETAIN: u8 = 0b0010_0000;
const PASSWORD: u8 = 0b0100_0000;
const USERNAME: u8 = 0b1000_0000;

/// Protocol name, level, flags and keep alive.
const VARIABLE_HEADER_LEN: usize = 2 + PROTOCOL_NAME.len() + 1 + 1 + 2;

/// A client's request to open a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    /// Keep alive in seconds; 0 disables it.
    pub keep_alive: u16,
    /// Client identifier; may be empty (the server decides whether to accept
    /// that, see section 3.1.3.1).
    pub client_id: MqttStr,
    /// Start a fresh session and discard it on disconnect.
    pub clean_session: bool,
    /// Message the server publishes if the client disappears.
    pub will: Option<Will>,
    /// User name.
    pub username: Option<MqttStr>,
    /// Password: binary data. Encoding one without a `username` produces a
    /// packet servers reject (section 3.1.2.9).
    pub password: Option<Bytes>,
}

/// The last will of a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    /// Topic name to publish on (validated on decode: no wildcards, not empty).
    pub topic: MqttStr,
    /// Message payload (binary, at most 65,535 bytes).
    pub payload: Bytes,
    /// QoS to publish with.
    pub qos: QoS,
    /// Whether to publish it retained.
    pub retain: bool,
}

impl Connect {
    /// A clean-session CONNECT with a 60 second keep alive and no will or
    /// credentials.
    pub fn new(client_id: MqttStr) -> Connect {
        Connect {
            keep_alive: 60,
            client_id,
            clean_session: true,
            will: None,
            username: None,
            password: None,
        }
    }

    pub(crate) fn read(mut body: Bytes) -> Result<Connect, Error> {
        let protocol_name = read_binary(&mut body, "protocol name")?;
        let level = read_u8(&mut body, "protocol level")?;
        match (&protocol_name[..], level) {
            (PROTOCOL_NAME, PROTOCOL_LEVEL) => {}
            (PROTOCOL_NAME, other) => return Err(Error::UnsupportedProtocolLevel(other)),
            (MQTT31_PROTOCOL_NAME, MQTT31_PROTOCOL_LEVEL) => return Err(Error::Mqtt31Unsupported),
            _ => return Err(Error::InvalidProtocolName(protocol_name)),
        }

        let flags = read_u8(&mut body, "connect flags")?;
        if flags & RESERVED != 0 {
            return Err(Error::ReservedConnectFlag(flags));
        }
        if flags & WILL == 0 && flags & (WILL_QOS_MASK | WILL_RETAIN) != 0 {
            return Err(Error::WillFlagsWithoutWill(flags));
        }
        if flags & PASSWORD != 0 && flags & USERNAME == 0 {
            return Err(Error::PasswordWithoutUsername);
        }
        // Checked before the payload so a QoS 3 will is reported as such.
        let will_qos = QoS::try_from((flags & WILL_QOS_MASK) >> WILL_QOS_SHIFT)?;
        let keep_alive = read_u16(&mut body, "keep alive")?;

        // Payload, in the order of section 3.1.3.
        let client_id = read_str(&mut body, "client identifier")?;
        let will = if flags & WILL != 0 {
            let topic = check_name(read_str(&mut body, "will topic")?)?;
            let payload = read_binary(&mut body, "will message")?;
            Some(Will {
                topic,
                payload,
                qos: will_qos,
                retain: flags & WILL_RETAIN != 0,
            })
        } else {
            None
        };
        let username = if flags & USERNAME != 0 {
            Some(read_str(&mut body, "user name")?)
        } else {
            None
        };
        let password = if flags & PASSWORD != 0 {
            Some(read_binary(&mut body, "password")?)
        } else {
            None
        };
        expect_end(&body, PacketType::Connect)?;

        Ok(Connect {
            keep_alive,
            client_id,
            clean_session: flags & CLEAN_SESSION != 0,
            will,
            username,
            password,
        })
    }

    fn flags(&self) -> u8 {
        let mut flags = 0;
        if self.clean_session {
            flags |= CLEAN_SESSION;
        }
        if let Some(will) = &self.will {
            flags |= WILL | ((will.qos as u8) << WILL_QOS_SHIFT);
            if will.retain {
                flags |= WILL_RETAIN;
            }
        }
        if self.username.is_some() {
            flags |= USERNAME;
        }
        if self.password.is_some() {
            flags |= PASSWORD;
        }
        flags
    }

    fn remaining_len(&self) -> usize {
        let mut len = VARIABLE_HEADER_LEN + 2 + self.client_id.len();
        if let Some(will) = &self.will {
            len += 2 + will.topic.len() + 2 + will.payload.len();
        }
        if let Some(username) = &self.username {
            len += 2 + username.len();
        }
        if let Some(password) = &self.password {
            len += 2 + password.len();
        }
        len
    }

    /// Encoded length in bytes, fixed header included.
    pub fn len(&self) -> usize {
        frame_len_for(self.remaining_len())
    }

    /// Appends the encoded packet to `out`.
    ///
    /// # Panics
    ///
    /// If the password or will payload is longer than 65,535 bytes.
    pub fn write(&self, out: &mut BytesMut) {
        write_fixed_header(out, 0x10, self.remaining_len());
        write_binary(out, PROTOCOL_NAME);
        out.put_u8(PROTOCOL_LEVEL);
        out.put_u8(self.flags());
        out.put_u16(self.keep_alive);
        write_str(out, &self.client_id);
        if let Some(will) = &self.will {
            write_str(out, &will.topic);
            write_binary(out, &will.payload);
        }
        if let Some(username) = &self.username {
            write_str(out, username);
        }
        if let Some(password) = &self.password {
            write_binary(out, password);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Packet, TopicError};

    /// A CONNECT frame with the given variable header fields and raw payload.
    fn frame(name: &[u8], level: u8, flags: u8, payload: &[u8]) -> BytesMut {
        let mut body = BytesMut::new();
        write_binary(&mut body, name);
        body.put_u8(level);
        body.put_u8(flags);
        body.put_u16(30);
        body.put_slice(payload);
        let mut out = BytesMut::new();
        write_fixed_header(&mut out, 0x10, body.len());
        out.put_slice(&body);
        out
    }

    fn read(mut buf: BytesMut) -> Result<Connect, Error> {
        match Packet::read(&mut buf, 1 << 20)? {
            Some(Packet::Connect(connect)) => {
                assert!(buf.is_empty());
                Ok(connect)
            }
            other => panic!("expected CONNECT, got {other:?}"),
        }
    }

    #[test]
    fn decodes_a_minimal_connect() {
        let connect = read(frame(b"MQTT", 4, CLEAN_SESSION, b"\x00\x03dev")).unwrap();
        assert_eq!(connect.client_id, "dev");
        assert_eq!(connect.keep_alive, 30);
        assert!(connect.clean_session);
        assert_eq!(connect.will, None);
    }

    #[test]
    fn decodes_a_full_connect() {
        let flags =
            CLEAN_SESSION | WILL | (1 << WILL_QOS_SHIFT) | WILL_RETAIN | USERNAME | PASSWORD;
        let payload = b"\x00\x01c\x00\x03a/b\x00\x03bye\x00\x04user\x00\x02\xff\x00";
        let connect = read(frame(b"MQTT", 4, flags, payload)).unwrap();
        assert_eq!(
            connect,
            Connect {
                keep_alive: 30,
                client_id: MqttStr::from_static("c"),
                clean_session: true,
                will: Some(Will {
                    topic: MqttStr::from_static("a/b"),
                    payload: Bytes::from_static(b"bye"),
                    qos: QoS::AtLeastOnce,
                    retain: true,
                }),
                username: Some(MqttStr::from_static("user")),
                password: Some(Bytes::from_static(b"\xff\x00")),
            }
        );
        let mut out = BytesMut::new();
        connect.write(&mut out);
        assert_eq!(out, frame(b"MQTT", 4, flags, payload));
        assert_eq!(out.len(), connect.len());
    }

    #[test]
    fn protocol_version_errors_are_distinct() {
        assert_eq!(
            read(frame(b"MQTT", 5, 0, b"\x00\x00")),
            Err(Error::UnsupportedProtocolLevel(5))
        );
        assert_eq!(
            read(frame(b"MQTT", 3, 0, b"\x00\x00")),
            Err(Error::UnsupportedProtocolLevel(3))
        );
        assert_eq!(
            read(frame(b"MQIsdp", 3, 0, b"\x00\x00")),
            Err(Error::Mqtt31Unsupported)
        );
        assert_eq!(
            read(frame(b"MQIsdp", 4, 0, b"\x00\x00")),
            Err(Error::InvalidProtocolName(Bytes::from_static(b"MQIsdp")))
        );
        assert_eq!(
            read(frame(b"mqtt", 4, 0, b"\x00\x00")),
            Err(Error::InvalidProtocolName(Bytes::from_static(b"mqtt")))
        );
    }

    #[test]
    fn connect_flags_are_strict() {
        let empty_id = b"\x00\x00";
        assert_eq!(
            read(frame(b"MQTT", 4, RESERVED, empty_id)),
            Err(Error::ReservedConnectFlag(RESERVED))
        );
        assert_eq!(
            read(frame(b"MQTT", 4, WILL_RETAIN, empty_id)),
            Err(Error::WillFlagsWithoutWill(WILL_RETAIN))
        );
        assert_eq!(
            read(frame(b"MQTT", 4, 1 << WILL_QOS_SHIFT, empty_id)),
            Err(Error::WillFlagsWithoutWill(1 << WILL_QOS_SHIFT))
        );
        assert_eq!(
            read(frame(b"MQTT", 4, WILL | WILL_QOS_MASK, empty_id)),
            Err(Error::InvalidQoS(3))
        );
        assert_eq!(
            read(frame(b"MQTT", 4, PASSWORD, b"\x00\x00\x00\x01p")),
            Err(Error::PasswordWithoutUsername)
        );
    }

    #[test]
    fn payload_is_validated() {
        assert_eq!(
            read(frame(b"MQTT", 4, 0, b"\x00\x02a\x00")),
            Err(Error::NullCharacter {
                field: "client identifier"
            })
        );
        assert_eq!(
            read(frame(b"MQTT", 4, USERNAME, b"\x00\x00\x00\x01\xc3")),
            Err(Error::InvalidUtf8 { field: "user name" })
        );
        assert_eq!(
            read(frame(b"MQTT", 4, WILL, b"\x00\x00\x00\x03a/#\x00\x00")),
            Err(Error::InvalidTopicName {
                topic: MqttStr::from_static("a/#"),
                reason: TopicError::Wildcard
            })
        );
        assert_eq!(
            read(frame(b"MQTT", 4, USERNAME, b"\x00\x00")),
            Err(Error::Truncated { field: "user name" })
        );
        assert_eq!(
            read(frame(b"MQTT", 4, 0, b"\x00\x00\x01")),
            Err(Error::TrailingBytes {
                packet_type: PacketType::Connect,
                extra: 1
            })
        );
        assert_eq!(
            read(frame(b"MQTT", 4, 0, b"")),
            Err(Error::Truncated {
                field: "client identifier"
            })
        );
    }

    #[test]
    fn decoded_strings_borrow_the_frame() {
        let mut buf = frame(b"MQTT", 4, 0, b"\x00\x03dev");
        let start = buf.as_ptr() as usize;
        let end = start + buf.len();
        let Ok(Some(Packet::Connect(connect))) = Packet::read(&mut buf, 1024) else {
            panic!("expected CONNECT");
        };
        let id = connect.client_id.as_bytes().as_ptr() as usize;
        assert!((start..end).contains(&id));
    }

    #[test]
    fn new_is_a_clean_session() {
        let connect = Connect::new(MqttStr::from_static("sim-1"));
        let mut out = BytesMut::new();
        connect.write(&mut out);
        assert_eq!(
            &out[..],
            b"\x10\x11\x00\x04MQTT\x04\x02\x00\x3c\x00\x05sim-1"
        );
    }
}
