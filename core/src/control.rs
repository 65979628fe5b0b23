//! Messages on an instance's Pub/Sub channel (`downlink:{server_id}`).
//!
//! Encoded like stream entries: one version byte, then compact rmp-serde.

use serde::{Deserialize, Serialize};

use crate::event::{DecodeError, FORMAT_VERSION};
use crate::ids::PhyId;
use uuid::Uuid;

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
    /// Deliver a downlink command to the device's connection with `epoch`.
    Command(Dispatch),
    /// Commands are waiting in `downlink:queue:{phyID}`: deliver them if the
    /// device is connected here (sent after queueing, in case the device
    /// connected meanwhile).
    DrainQueue {
        /// The device.
        phy_id: PhyId,
    },
}

/// A downlink command on its way to the instance holding the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dispatch {
    /// Command id (its record is `command:{id}`).
    pub id: Uuid,
    /// The device.
    pub phy_id: PhyId,
    /// Epoch of the connection it was routed to.
    pub epoch: u64,
    /// Topic level after `devices/{phyID}/down/`.
    pub name: String,
    /// Payload, as sent to the device.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    /// After this (ms since the Unix epoch) the command is expired.
    pub expires_at_ms: i64,
    /// Put it back in the device's queue if the connection is gone.
    pub queue_if_offline: bool,
    /// How often it was forwarded to a new owner already (at most once).
    pub hops: u8,
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

/// A device disabled or deleted in the registry, published by the api on
/// [`crate::Keys::auth_revocations`] to every ingest: each drops its cached
/// credential verdicts for the device and closes its connection (reason
/// `revoked`). A best-effort fast path: an ingest that misses it (not
/// subscribed at that moment) still finds the change at its periodic
/// re-check of connected devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// The device.
    pub phy_id: PhyId,
    /// `disabled` or `deleted` (for logs).
    pub why: String,
}

impl Revocation {
    /// Version byte, then the rmp-serde body (like [`Control::encode`]).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![FORMAT_VERSION];
        if let Err(e) = rmp_serde::encode::write(&mut out, self) {
            debug_assert!(false, "revocation encoding failed: {e}");
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
mod revocation_tests {
    use super::*;

    #[test]
    fn revocation_round_trips_and_rejects_garbage() {
        let r = Revocation {
            phy_id: PhyId::new("d-1").unwrap(),
            why: "disabled".into(),
        };
        assert_eq!(Revocation::decode(&r.encode()).unwrap(), r);
        assert!(Revocation::decode(&[]).is_err());
        assert!(Revocation::decode(&[FORMAT_VERSION, 0xc1]).is_err());
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
        let d = Control::Command(Dispatch {
            id: Uuid::from_u128(5),
            phy_id: PhyId::new("d-1").unwrap(),
            epoch: 3,
            name: "reboot".into(),
            payload: vec![1, 2],
            expires_at_ms: 99,
            queue_if_offline: true,
            hops: 0,
        });
        assert_eq!(Control::decode(&d.encode()).unwrap(), d);
        assert!(matches!(
            Control::decode(&[7, 0]),
            Err(DecodeError::UnknownVersion { found: 7 })
        ));
    }
}
