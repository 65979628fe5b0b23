//! Decoding errors.
//!
//! Policy: every way a peer can send a malformed or unsupported packet has its
//! own variant carrying the offending value, so a server can log exactly what
//! was wrong and close the connection. Incomplete input is never an error (the
//! decoder returns `Ok(None)`). Two errors are answered rather than just closed:
//! [`Error::UnsupportedProtocolLevel`] and [`Error::Mqtt31Unsupported`], for
//! which the spec wants a CONNACK with return code 1 first; see
//! [`Error::connack_code`].
//!
//! Encoding does not return errors: the packet types make most invalid
//! encodings unrepresentable, and the few remaining limits (a binary field over
//! 65,535 bytes, a packet over 256 MiB) are documented panics on locally built
//! packets.

use bytes::Bytes;

use crate::{ConnectReturnCode, MqttStr, PacketType};

/// Why a topic name or a topic filter is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// Topic names and filters must be at least one character long.
    #[error("it is empty")]
    Empty,
    /// Topic names (PUBLISH, will topic) must not contain `+` or `#`.
    #[error("a topic name must not contain the wildcards '+' or '#'")]
    Wildcard,
    /// `#` must be the last character and occupy a whole level (`a/#`, `#`).
    #[error("'#' must be the last character and occupy a whole level, as in \"a/#\"")]
    MisplacedMultiLevelWildcard,
    /// `+` must occupy a whole level (`a/+/b`, `+`).
    #[error("'+' must occupy a whole level, as in \"a/+/b\"")]
    MisplacedSingleLevelWildcard,
}

/// A packet that cannot be decoded, or a string that cannot be encoded.
///
/// After any decoding error the connection must be closed: the byte stream can
/// no longer be trusted to be in step with packet boundaries.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The remaining length in the fixed header exceeds the configured limit.
    #[error(
        "packet remaining length {size} bytes exceeds the limit of {max} bytes; raise max_packet_size or send smaller packets"
    )]
    PacketTooLarge {
        /// The remaining length announced by the fixed header.
        size: usize,
        /// The configured `max_packet_size`.
        max: usize,
    },
    /// The remaining length field has a continuation bit on its fourth byte.
    #[error("malformed remaining length: longer than the 4 bytes MQTT allows")]
    MalformedRemainingLength,
    /// The packet type nibble is 0 or 15, both reserved in MQTT 3.1.1.
    #[error("invalid packet type {0} in the fixed header (0 and 15 are reserved)")]
    InvalidPacketType(u8),
    /// The flag nibble of the fixed header is not what the spec requires for
    /// this packet type (also: DUP set on a QoS 0 PUBLISH).
    #[error("malformed fixed header flags {flags:#06b} for {packet_type}")]
    MalformedFlags {
        /// The packet type from the fixed header.
        packet_type: PacketType,
        /// The low nibble of the first byte.
        flags: u8,
    },
    /// The packet ended (as announced by its remaining length) in the middle
    /// of a field.
    #[error("packet too short: it ends before or inside its {field}")]
    Truncated {
        /// The field that could not be read.
        field: &'static str,
    },
    /// Bytes remain after the last field of a packet whose length is fully
    /// determined by its contents.
    #[error("{extra} unexpected trailing bytes at the end of {packet_type}")]
    TrailingBytes {
        /// The packet that had trailing bytes.
        packet_type: PacketType,
        /// How many bytes were left over.
        extra: usize,
    },
    /// The CONNECT protocol name is neither `MQTT` (3.1.1) nor `MQIsdp` (3.1).
    #[error("invalid CONNECT protocol name {0:?}; expected \"MQTT\"")]
    InvalidProtocolName(Bytes),
    /// CONNECT named protocol `MQTT` with a level other than 4. Answer with
    /// CONNACK return code 1 (unacceptable protocol version), then close.
    #[error("unsupported MQTT protocol level {0}; only level 4 (MQTT 3.1.1) is supported")]
    UnsupportedProtocolLevel(u8),
    /// CONNECT from an MQTT 3.1 client (`MQIsdp`, level 3). Answer with
    /// CONNACK return code 1 (unacceptable protocol version), then close.
    #[error("MQTT 3.1 (protocol \"MQIsdp\" level 3) is not supported; use MQTT 3.1.1")]
    Mqtt31Unsupported,
    /// The reserved bit 0 of the CONNECT flags is set.
    #[error("CONNECT flags {0:#010b} have the reserved bit 0 set")]
    ReservedConnectFlag(u8),
    /// The CONNECT flags set will QoS or will retain without the will flag.
    #[error("CONNECT flags {0:#010b} set will QoS or will retain without the will flag")]
    WillFlagsWithoutWill(u8),
    /// The CONNECT flags set the password flag without the user name flag.
    #[error("CONNECT sets the password flag without the user name flag")]
    PasswordWithoutUsername,
    /// A QoS value of 3 (in PUBLISH flags, CONNECT will QoS or a SUBSCRIBE
    /// request); only 0, 1 and 2 exist.
    #[error("invalid QoS {0}; must be 0, 1 or 2")]
    InvalidQoS(u8),
    /// A string field is not valid UTF-8.
    #[error("{field} is not valid UTF-8")]
    InvalidUtf8 {
        /// The field that held the string.
        field: &'static str,
    },
    /// A string field contains U+0000, which MQTT forbids.
    #[error("{field} contains the null character U+0000")]
    NullCharacter {
        /// The field that held the string.
        field: &'static str,
    },
    /// A string is longer than the 65,535 bytes a length prefix can express.
    #[error("string of {0} bytes is longer than the MQTT limit of 65535 bytes")]
    StringTooLong(usize),
    /// A topic name (PUBLISH or will topic) is invalid.
    #[error("invalid topic name {topic:?}: {reason}")]
    InvalidTopicName {
        /// The offending topic name.
        topic: MqttStr,
        /// What is wrong with it.
        reason: TopicError,
    },
    /// A topic filter (SUBSCRIBE or UNSUBSCRIBE) is invalid.
    #[error("invalid topic filter {filter:?}: {reason}")]
    InvalidTopicFilter {
        /// The offending topic filter.
        filter: MqttStr,
        /// What is wrong with it.
        reason: TopicError,
    },
    /// A packet identifier is 0, which MQTT forbids.
    #[error("{0} has packet identifier 0; packet identifiers must be nonzero")]
    ZeroPacketId(PacketType),
    /// A SUBSCRIBE, UNSUBSCRIBE or SUBACK carries no topic filter or return code.
    #[error("{0} has an empty payload; at least one topic filter or return code is required")]
    EmptyPayload(PacketType),
    /// A SUBSCRIBE requested-QoS byte has reserved upper bits set.
    #[error(
        "SUBSCRIBE options byte {0:#010b} has reserved bits set; only the low 2 bits may be used"
    )]
    InvalidSubscribeOptions(u8),
    /// The CONNACK acknowledge flags have reserved bits set.
    #[error(
        "CONNACK flags {0:#010b} have reserved bits set; only bit 0 (session present) may be used"
    )]
    InvalidConnAckFlags(u8),
    /// A CONNACK refuses the connection but claims a session is present.
    #[error("CONNACK refuses the connection ({0:?}) but sets session present")]
    SessionPresentOnRefusal(ConnectReturnCode),
    /// A CONNACK return code outside 0..=5.
    #[error("invalid CONNACK return code {0}; must be 0 to 5")]
    InvalidConnectReturnCode(u8),
    /// A SUBACK return code other than 0x00, 0x01, 0x02 or 0x80.
    #[error("invalid SUBACK return code {0:#04x}; must be 0x00, 0x01, 0x02 or 0x80")]
    InvalidSubAckReturnCode(u8),
}

impl Error {
    /// The CONNACK return code a server should send before closing, if the
    /// spec asks for one: `Some(UnacceptableProtocolVersion)` for an
    /// unsupported protocol level or an MQTT 3.1 client, `None` for every
    /// other error (close without answering).
    pub fn connack_code(&self) -> Option<ConnectReturnCode> {
        match self {
            Error::UnsupportedProtocolLevel(_) | Error::Mqtt31Unsupported => {
                Some(ConnectReturnCode::UnacceptableProtocolVersion)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_protocol_version_errors_get_a_connack() {
        assert_eq!(
            Error::UnsupportedProtocolLevel(5).connack_code(),
            Some(ConnectReturnCode::UnacceptableProtocolVersion)
        );
        assert_eq!(
            Error::Mqtt31Unsupported.connack_code(),
            Some(ConnectReturnCode::UnacceptableProtocolVersion)
        );
        assert_eq!(Error::MalformedRemainingLength.connack_code(), None);
    }

    #[test]
    fn messages_name_the_offending_value() {
        let e = Error::MalformedFlags {
            packet_type: PacketType::Subscribe,
            flags: 0,
        };
        assert_eq!(
            e.to_string(),
            "malformed fixed header flags 0b0000 for SUBSCRIBE"
        );
        let e = Error::InvalidTopicName {
            topic: MqttStr::from_static("a/+"),
            reason: TopicError::Wildcard,
        };
        assert!(e.to_string().contains("\"a/+\""), "{e}");
    }
}
