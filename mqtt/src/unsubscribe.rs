//! UNSUBSCRIBE: a client's request to drop topic filters (MQTT 3.1.1
//! section 3.10).

use bytes::{BufMut, Bytes, BytesMut};

use crate::fields::{read_pkid, read_str, write_str};
use crate::framing::{frame_len_for, write_fixed_header};
use crate::topic::check_filter;
use crate::{Error, MqttStr, PacketType};

/// Unsubscribe request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    /// Packet identifier (nonzero), echoed by the UNSUBACK.
    pub pkid: u16,
    /// At least one topic filter (validated on decode).
    pub filters: Vec<MqttStr>,
}

impl Unsubscribe {
    /// An UNSUBSCRIBE for a single filter.
    pub fn new(pkid: u16, filter: MqttStr) -> Unsubscribe {
        Unsubscribe {
            pkid,
            filters: vec![filter],
        }
    }

    pub(crate) fn read(mut body: Bytes) -> Result<Unsubscribe, Error> {
        let pkid = read_pkid(&mut body, PacketType::Unsubscribe)?;
        let mut filters = Vec::new();
        while !body.is_empty() {
            filters.push(check_filter(read_str(&mut body, "topic filter")?)?);
        }
        if filters.is_empty() {
            // MQTT-3.10.3-2: at least one filter.
            return Err(Error::EmptyPayload(PacketType::Unsubscribe));
        }
        Ok(Unsubscribe { pkid, filters })
    }

    fn remaining_len(&self) -> usize {
        2 + self.filters.iter().map(|f| 2 + f.len()).sum::<usize>()
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
        write_fixed_header(out, 0xa2, self.remaining_len());
        out.put_u16(self.pkid);
        for filter in &self.filters {
            write_str(out, filter);
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
    fn round_trips() {
        let unsubscribe = Unsubscribe {
            pkid: 3,
            filters: vec![MqttStr::from_static("a/#"), MqttStr::from_static("+")],
        };
        let mut out = BytesMut::new();
        unsubscribe.write(&mut out);
        assert_eq!(&out[..], b"\xa2\x0a\x00\x03\x00\x03a/#\x00\x01+");
        assert_eq!(out.len(), unsubscribe.len());
        assert_eq!(read(&out), Ok(Some(Packet::Unsubscribe(unsubscribe))));
    }

    #[test]
    fn rejects_empty_bad_filters_and_flags() {
        assert_eq!(
            read(b"\xa2\x02\x00\x01"),
            Err(Error::EmptyPayload(PacketType::Unsubscribe))
        );
        assert_eq!(
            read(b"\xa2\x04\x00\x01\x00\x00"),
            Err(Error::InvalidTopicFilter {
                filter: MqttStr::default(),
                reason: TopicError::Empty
            })
        );
        assert_eq!(
            read(b"\xa0\x05\x00\x01\x00\x01a"),
            Err(Error::MalformedFlags {
                packet_type: PacketType::Unsubscribe,
                flags: 0
            })
        );
        assert_eq!(
            read(b"\xa2\x05\x00\x00\x00\x01a"),
            Err(Error::ZeroPacketId(PacketType::Unsubscribe))
        );
    }
}
