//! SUBSCRIBE: a client's request for messages on topic filters (MQTT 3.1.1
//! section 3.8).

use bytes::{BufMut, Bytes, BytesMut};

use crate::fields::{read_pkid, read_str, read_u8, write_str};
use crate::framing::{frame_len_for, write_fixed_header};
use crate::topic::check_filter;
use crate::{Error, MqttStr, PacketType, QoS};

/// Subscribe request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    /// Packet identifier (nonzero), echoed by the SUBACK.
    pub pkid: u16,
    /// At least one filter, in request order.
    pub filters: Vec<SubscribeFilter>,
}

/// One topic filter of a SUBSCRIBE and the maximum QoS requested for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeFilter {
    /// Topic filter (validated on decode, see [`crate::topic::validate_topic_filter`]).
    pub filter: MqttStr,
    /// Maximum QoS the client wants to receive on it.
    pub qos: QoS,
}

impl SubscribeFilter {
    /// A filter with its requested QoS.
    pub fn new(filter: MqttStr, qos: QoS) -> SubscribeFilter {
        SubscribeFilter { filter, qos }
    }
}

impl Subscribe {
    /// A SUBSCRIBE for a single filter.
    pub fn new(pkid: u16, filter: MqttStr, qos: QoS) -> Subscribe {
        Subscribe {
            pkid,
            filters: vec![SubscribeFilter::new(filter, qos)],
        }
    }

    pub(crate) fn read(mut body: Bytes) -> Result<Subscribe, Error> {
        let pkid = read_pkid(&mut body, PacketType::Subscribe)?;
        let mut filters = Vec::new();
        while !body.is_empty() {
            let filter = check_filter(read_str(&mut body, "topic filter")?)?;
            let options = read_u8(&mut body, "requested QoS")?;
            if options & !0b11 != 0 {
                return Err(Error::InvalidSubscribeOptions(options));
            }
            let qos = QoS::try_from(options)?;
            filters.push(SubscribeFilter { filter, qos });
        }
        if filters.is_empty() {
            // MQTT-3.8.3-3: at least one filter.
            return Err(Error::EmptyPayload(PacketType::Subscribe));
        }
        Ok(Subscribe { pkid, filters })
    }

    fn remaining_len(&self) -> usize {
        2 + self
            .filters
            .iter()
            .map(|f| 2 + f.filter.len() + 1)
            .sum::<usize>()
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
        write_fixed_header(out, 0x82, self.remaining_len());
        out.put_u16(self.pkid);
        for f in &self.filters {
            write_str(out, &f.filter);
            out.put_u8(f.qos as u8);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Packet, TopicError};

    fn read(bytes: &[u8]) -> Result<Option<Packet>, Error> {
        Packet::read(&mut BytesMut::from(bytes), 1024)
    }

    #[test]
    fn round_trips_several_filters() {
        let subscribe = Subscribe {
            pkid: 10,
            filters: vec![
                SubscribeFilter::new(MqttStr::from_static("a/+"), QoS::AtLeastOnce),
                SubscribeFilter::new(MqttStr::from_static("#"), QoS::ExactlyOnce),
            ],
        };
        let mut out = BytesMut::new();
        subscribe.write(&mut out);
        assert_eq!(&out[..], b"\x82\x0c\x00\x0a\x00\x03a/+\x01\x00\x01#\x02");
        assert_eq!(out.len(), subscribe.len());
        assert_eq!(read(&out), Ok(Some(Packet::Subscribe(subscribe))));
    }

    #[test]
    fn requires_at_least_one_filter_and_nonzero_id() {
        assert_eq!(
            read(b"\x82\x02\x00\x01"),
            Err(Error::EmptyPayload(PacketType::Subscribe))
        );
        assert_eq!(
            read(b"\x82\x06\x00\x00\x00\x01a\x00"),
            Err(Error::ZeroPacketId(PacketType::Subscribe))
        );
    }

    #[test]
    fn validates_options_and_filters() {
        assert_eq!(
            read(b"\x82\x06\x00\x01\x00\x01a\x03"),
            Err(Error::InvalidQoS(3))
        );
        assert_eq!(
            read(b"\x82\x06\x00\x01\x00\x01a\x04"),
            Err(Error::InvalidSubscribeOptions(4))
        );
        assert_eq!(
            read(b"\x82\x07\x00\x01\x00\x02a#\x00"),
            Err(Error::InvalidTopicFilter {
                filter: MqttStr::from_static("a#"),
                reason: TopicError::MisplacedMultiLevelWildcard
            })
        );
        assert_eq!(
            read(b"\x82\x05\x00\x01\x00\x01a"),
            Err(Error::Truncated {
                field: "requested QoS"
            })
        );
        assert_eq!(
            read(b"\x82\x03\x00\x01\x00"),
            Err(Error::Truncated {
                field: "topic filter"
            })
        );
    }

    #[test]
    fn requires_flags_0010() {
        assert_eq!(
            read(b"\x80\x06\x00\x01\x00\x01a\x00"),
            Err(Error::MalformedFlags {
                packet_type: PacketType::Subscribe,
                flags: 0
            })
        );
    }
}
