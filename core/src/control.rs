//! Messages on an instance's Pub/Sub channel (`downlink:{server_id}`).
//!
//! Encoded like stream entries: one version byte, then compact rmp-serde.

use serde::{Deserialize, Serialize};

use crate::event::{DecodeError, FORMAT_VERSION};
use crate::ids::PhyId;

/// A message to the instance that holds a device's socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Control {
    /// A newer CONNECT for `phy_id` (with `epoch`) was accepted elsewhere:
    /// close any older connection of the device (MQTT 3.1.1, 3.1.4-2).
    Kick {
        /// The device.
        phy_id: PhyId,
        /// The new connection's epoch; connections with a lower one close.
        epoch: u64,
    },
}

impl Control {
    /// Version byte, then the rmp-serde body.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![FORMAT_VERSION];
        if let Err(e) = rmp_serde::encode::write(&mut out, self) {
            debug_assert!(false, "control encoding failed: {e}");
        }
        out
    }

    /// Decodes [`encode`](Self::encode).
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let (&version, body) = bytes.split_first().ok_or(DecodeError::Empty)?;
        if version != FORMAT_VERSION {
            return Err(DecodeError::UnknownVersion { found: version });
        }
        rmp_serde::from_slice(body).map_err(|e| DecodeError::Malformed(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kick_round_trips_and_rejects_garbage() {
        let k = Control::Kick {
            phy_id: PhyId::new("d-1").unwrap(),
            epoch: 42,
        };
        assert_eq!(Control::decode(&k.encode()).unwrap(), k);
        assert!(Control::decode(&[]).is_err());
        assert!(Control::decode(&[FORMAT_VERSION, 0xc1]).is_err());
        assert!(matches!(
            Control::decode(&[7, 0]),
            Err(DecodeError::UnknownVersion { found: 7 })
        ));
    }
}
