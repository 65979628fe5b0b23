//! The command model: states, failure reasons and the record kept in Redis.
//!
//! ```text
//!            +--> queued ----+           (device offline, queue_if_offline)
//! submit ----+               v
//!            +--> dispatched --> sent --> acked
//!            |         |          |  \--> timed_out   (no PUBACK after one retransmission)
//!            |         v          v
//!            +------> failed (offline, no_subscription, device_gone, rejected, queue_full)
//! queued / dispatched / sent --> expired               (ttl passed before delivery)
//! ```
//!
//! Terminal states (acked, timed_out, expired, failed) never change again.

use std::collections::HashMap;

use iot_core::PhyId;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Where a command is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Waiting in the device's offline queue.
    Queued,
    /// Handed to the instance holding the device.
    Dispatched,
    /// Written to the device as a QoS 1 PUBLISH; waiting for PUBACK.
    Sent,
    /// The device acknowledged it (terminal).
    Acked,
    /// No PUBACK within the ACK timeout, after one retransmission (terminal).
    TimedOut,
    /// Its time-to-live passed before it was delivered (terminal).
    Expired,
    /// It cannot be delivered; see the reason (terminal).
    Failed,
}

impl Status {
    /// Every status.
    pub const ALL: [Status; 7] = [
        Self::Queued,
        Self::Dispatched,
        Self::Sent,
        Self::Acked,
        Self::TimedOut,
        Self::Expired,
        Self::Failed,
    ];

    /// snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Dispatched => "dispatched",
            Self::Sent => "sent",
            Self::Acked => "acked",
            Self::TimedOut => "timed_out",
            Self::Expired => "expired",
            Self::Failed => "failed",
        }
    }

    /// Parses [`as_str`](Self::as_str).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }

    /// Whether the command's fate is decided.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Acked | Self::TimedOut | Self::Expired | Self::Failed
        )
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a command failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailReason {
    /// The device is not connected and the command was not to be queued.
    Offline,
    /// The device is connected but not subscribed to the command's topic.
    NoSubscription,
    /// The connection it was routed to went away before an answer.
    DeviceGone,
    /// Refused (for example larger than the device's packet limit).
    Rejected,
    /// The offline queue of the device is full (`downlink.queue_max`).
    QueueFull,
}

impl FailReason {
    /// snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Offline => "offline",
            Self::NoSubscription => "no_subscription",
            Self::DeviceGone => "device_gone",
            Self::Rejected => "rejected",
            Self::QueueFull => "queue_full",
        }
    }
}

/// Longest command name (the topic level after `devices/{phyID}/down/`).
pub const NAME_MAX_LEN: usize = 64;

/// A command name is one topic level: 1 to 64 characters of `[A-Za-z0-9._-]`.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > NAME_MAX_LEN {
        return Err(format!(
            "command name must be 1 to {NAME_MAX_LEN} characters, got {}",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "command name holds {c:?}; only [A-Za-z0-9._-] is allowed (it becomes a topic level)"
        ));
    }
    Ok(())
}

/// Hash field names of `command:{id}`.
pub mod field {
    /// Command id.
    pub const ID: &str = "id";
    /// The device.
    pub const PHY_ID: &str = "phy_id";
    /// Topic level.
    pub const NAME: &str = "name";
    /// Raw payload bytes.
    pub const PAYLOAD: &str = "payload";
    /// Current status.
    pub const STATUS: &str = "status";
    /// Failure reason (failed) or note.
    pub const REASON: &str = "reason";
    /// Created, ms.
    pub const CREATED_AT: &str = "created_at";
    /// Last change, ms.
    pub const UPDATED_AT: &str = "updated_at";
    /// Expiry, ms.
    pub const EXPIRES_AT: &str = "expires_at";
    /// `1` to wait in the offline queue.
    pub const QUEUE_IF_OFFLINE: &str = "queue_if_offline";
    /// Instance it was dispatched to.
    pub const SERVER_ID: &str = "server_id";
    /// Epoch of the connection it was dispatched to.
    pub const EPOCH: &str = "epoch";
    /// Forwards to a new owner so far.
    pub const HOPS: &str = "hops";
    /// Transmissions to the device (2 after a retransmission).
    pub const ATTEMPTS: &str = "attempts";
    /// First transmission, ms.
    pub const SENT_AT: &str = "sent_at";
    /// PUBACK received, ms.
    pub const ACKED_AT: &str = "acked_at";
}

/// A command as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// Id (UUID v7: time-ordered).
    pub id: Uuid,
    /// The device.
    pub phy_id: PhyId,
    /// Topic level after `devices/{phyID}/down/`.
    pub name: String,
    /// Payload bytes.
    pub payload: Vec<u8>,
    /// Current status.
    pub status: Status,
    /// Failure reason or note.
    pub reason: Option<String>,
    /// Created, ms.
    pub created_at_ms: i64,
    /// Last change, ms.
    pub updated_at_ms: i64,
    /// Expiry, ms.
    pub expires_at_ms: i64,
    /// Wait in the offline queue when the device is not connected.
    pub queue_if_offline: bool,
    /// Instance it was last dispatched to.
    pub server_id: Option<String>,
    /// Epoch of that connection.
    pub epoch: Option<u64>,
    /// Forwards to a new owner.
    pub hops: u8,
    /// Transmissions.
    pub attempts: u32,
    /// First transmission, ms.
    pub sent_at_ms: Option<i64>,
    /// PUBACK, ms.
    pub acked_at_ms: Option<i64>,
}

impl Command {
    /// Reads a record from HGETALL output (binary-safe); `None` if a
    /// required field is missing or malformed.
    pub fn from_fields(f: &HashMap<String, Vec<u8>>) -> Option<Self> {
        fn s<'a>(f: &'a HashMap<String, Vec<u8>>, k: &str) -> Option<&'a str> {
            f.get(k)
                .and_then(|v| std::str::from_utf8(v).ok())
                .filter(|v| !v.is_empty())
        }
        fn n<T: std::str::FromStr>(f: &HashMap<String, Vec<u8>>, k: &str) -> Option<T> {
            s(f, k).and_then(|v| v.parse().ok())
        }
        Some(Self {
            id: Uuid::parse_str(s(f, field::ID)?).ok()?,
            phy_id: PhyId::new(s(f, field::PHY_ID)?).ok()?,
            name: s(f, field::NAME)?.to_owned(),
            payload: f.get(field::PAYLOAD).cloned().unwrap_or_default(),
            status: Status::parse(s(f, field::STATUS)?)?,
            reason: s(f, field::REASON).map(str::to_owned),
            created_at_ms: n(f, field::CREATED_AT)?,
            updated_at_ms: n(f, field::UPDATED_AT).unwrap_or_default(),
            expires_at_ms: n(f, field::EXPIRES_AT)?,
            queue_if_offline: s(f, field::QUEUE_IF_OFFLINE) == Some("1"),
            server_id: s(f, field::SERVER_ID).map(str::to_owned),
            epoch: n(f, field::EPOCH),
            hops: n(f, field::HOPS).unwrap_or(0),
            attempts: n(f, field::ATTEMPTS).unwrap_or(0),
            sent_at_ms: n(f, field::SENT_AT),
            acked_at_ms: n(f, field::ACKED_AT),
        })
    }
}

/// One state change of a command, from its log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// Its place in the command's log, from 1: the order of the changes
    /// (two changes may share a status and a millisecond). 0 in entries
    /// written before the log carried it.
    #[serde(default)]
    pub seq: u64,
    /// New status.
    pub status: Status,
    /// When, ms.
    pub at_ms: i64,
    /// Reason or note (empty when none).
    #[serde(default)]
    pub reason: String,
    /// Where (instance, epoch) or other detail (empty when none).
    #[serde(default)]
    pub detail: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_single_topic_levels() {
        assert!(validate_name("reboot").is_ok());
        assert!(validate_name("set-config_v2.1").is_ok());
        for bad in ["", "a/b", "+", "#", "a b", "é", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn terminal_states() {
        let terminal: Vec<_> = Status::ALL
            .into_iter()
            .filter(|s| s.is_terminal())
            .collect();
        assert_eq!(
            terminal,
            [
                Status::Acked,
                Status::TimedOut,
                Status::Expired,
                Status::Failed
            ]
        );
        for s in Status::ALL {
            assert_eq!(Status::parse(s.as_str()), Some(s));
        }
    }

    #[test]
    fn record_round_trip_from_fields() {
        let mut f: HashMap<String, Vec<u8>> = HashMap::new();
        for (k, v) in [
            (field::ID, Uuid::from_u128(7).to_string()),
            (field::PHY_ID, "d-1".into()),
            (field::NAME, "reboot".into()),
            (field::STATUS, "sent".into()),
            (field::CREATED_AT, "10".into()),
            (field::EXPIRES_AT, "99".into()),
            (field::QUEUE_IF_OFFLINE, "1".into()),
            (field::EPOCH, "3".into()),
            (field::ATTEMPTS, "2".into()),
        ] {
            f.insert(k.to_owned(), v.into_bytes());
        }
        f.insert(field::PAYLOAD.into(), vec![0, 255]);
        let c = Command::from_fields(&f).unwrap();
        assert_eq!(c.status, Status::Sent);
        assert_eq!(c.payload, vec![0, 255]);
        assert!(c.queue_if_offline);
        assert_eq!(c.epoch, Some(3));
        assert_eq!(c.attempts, 2);
        f.remove(field::STATUS);
        assert!(Command::from_fields(&f).is_none());
    }
}
