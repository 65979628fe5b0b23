//! Quality of service levels.

use crate::Error;

/// MQTT delivery guarantee. Ordered, so `requested.min(granted_max)` works.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum QoS {
    /// QoS 0: fire and forget.
    AtMostOnce = 0,
    /// QoS 1: acknowledged with PUBACK, may be redelivered.
    AtLeastOnce = 1,
    /// QoS 2: four-way handshake. Decoded so a server can refuse it clearly.
    ExactlyOnce = 2,
}

impl TryFrom<u8> for QoS {
    type Error = Error;

    /// Fails with [`Error::InvalidQoS`] for anything but 0, 1 and 2.
    fn try_from(value: u8) -> Result<Self, Error> {
        match value {
            0 => Ok(QoS::AtMostOnce),
            1 => Ok(QoS::AtLeastOnce),
            2 => Ok(QoS::ExactlyOnce),
            other => Err(Error::InvalidQoS(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_from_u8() {
        assert_eq!(QoS::try_from(0), Ok(QoS::AtMostOnce));
        assert_eq!(QoS::try_from(1), Ok(QoS::AtLeastOnce));
        assert_eq!(QoS::try_from(2), Ok(QoS::ExactlyOnce));
        assert_eq!(QoS::try_from(3), Err(Error::InvalidQoS(3)));
        assert_eq!(QoS::ExactlyOnce as u8, 2);
        assert!(QoS::AtMostOnce < QoS::AtLeastOnce);
    }
}
