//! The project's one MQTT 3.1.1 codec, shared by the ingest gateway (decodes
//! client packets, encodes server packets) and the load generator (the other
//! way round).
//!
//! Every packet type both encodes and decodes. Decoding is strict (the server
//! side of the spec: reserved flags, protocol name and level, topic syntax,
//! packet identifiers, trailing bytes) and zero-copy: topics, strings and
//! payloads are `Bytes` slices of the received frame.
//!
//! ```
//! use bytes::BytesMut;
//! use iot_mqtt::{Packet, PubAck, Publish, MqttStr};
//!
//! let mut buf = BytesMut::new();
//! Packet::Publish(Publish::new(MqttStr::from_static("devices/1"), "21.5".into())).write(&mut buf);
//! // A server reads from the socket into `buf`, then:
//! match Packet::read(&mut buf, 64 * 1024)? {
//!     Some(Packet::Publish(publish)) => assert_eq!(publish.topic, "devices/1"),
//!     Some(_) => unreachable!(),
//!     None => { /* incomplete: read more bytes */ }
//! }
//! assert_eq!(PubAck::encode(7), [0x40, 0x02, 0x00, 0x07]);
//! # Ok::<(), iot_mqtt::Error>(())
//! ```
//!
//! # Layout
//!
//! - `packet.rs`: [`Packet`] and [`PacketType`], the decode/encode entry points.
//! - `framing.rs`: the fixed header and remaining-length varint; [`frame_len`]
//!   checks the size limit before the body arrives.
//! - `fields.rs`: primitive fields (u16, packet id, length-prefixed strings
//!   and binary) shared by the packet codecs.
//! - One file per packet: `connect.rs`, `connack.rs`, `publish.rs`,
//!   `puback.rs`, `qos2.rs` (PUBREC, PUBREL, PUBCOMP), `subscribe.rs`,
//!   `suback.rs`, `unsubscribe.rs`, `unsuback.rs`, `ping.rs`, `disconnect.rs`;
//!   each with its `read`, `write`, `len` and tests.
//! - `mqtt_str.rs`: [`MqttStr`], a validated UTF-8 string over `Bytes`.
//! - `qos.rs`: [`QoS`].
//! - `topic.rs`: topic name and filter validation and [`topic::matches`].
//! - `error.rs`: [`Error`] and the error policy.

// `len()` on a packet is its encoded size; a packet is never "empty".
#![allow(clippy::len_without_is_empty)]

mod connack;
mod connect;
mod disconnect;
mod error;
mod fields;
mod framing;
mod mqtt_str;
mod packet;
mod ping;
mod puback;
mod publish;
mod qos;
mod qos2;
mod suback;
mod subscribe;
pub mod topic;
mod unsuback;
mod unsubscribe;

pub use connack::{ConnAck, ConnectReturnCode};
pub use connect::{Connect, Will};
pub use disconnect::DISCONNECT_BYTES;
pub use error::{Error, TopicError};
pub use framing::{FixedHeader, MAX_REMAINING_LENGTH, frame_len};
pub use mqtt_str::MqttStr;
pub use packet::{Packet, PacketType};
pub use ping::{PINGREQ_BYTES, PINGRESP_BYTES};
pub use puback::PubAck;
pub use publish::Publish;
pub use qos::QoS;
pub use qos2::{PubComp, PubRec, PubRel};
pub use suback::{SubAck, SubscribeReturnCode};
pub use subscribe::{Subscribe, SubscribeFilter};
pub use unsuback::UnsubAck;
pub use unsubscribe::Unsubscribe;
