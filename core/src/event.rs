//! Events: what ingest appends to the Redis Streams and projectors merge.
//!
//! A stream entry has one field, [`ENTRY_FIELD`], whose value is one byte of
//! format version ([`FORMAT_VERSION`]) followed by an [`Entry`] encoded with
//! rmp-serde in its compact (array) form. An entry holds either one event or a
//! batch of heartbeats from one instance: heartbeats are the bulk of the
//! traffic and only the newest per device matters, so they travel together.
//!
//! Every event carries the device (`phy_id`), its connection (`conn_id`), the
//! instance that holds the socket (`server_id`), the connection's `epoch`
//! (taken with `INCR session:epoch:{phyID}` at CONNECT) and a wall-clock
//! timestamp in milliseconds since the Unix epoch.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ids::{PhyId, ServerId};

/// The encoding version written as the first byte of every entry.
pub const FORMAT_VERSION: u8 = 1;

/// The single field name of a stream entry.
pub const ENTRY_FIELD: &str = "e";

/// Why a connection went down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TcpDownReason {
    /// The device closed the TCP connection without DISCONNECT.
    Closed,
    /// The connection failed with an I/O error (reset, broken pipe, timeout).
    Reset,
    /// The device was silent for longer than 1.5 x its keepalive.
    Keepalive,
    /// A newer CONNECT with the same phyID took the session over.
    Takeover,
    /// The instance holding the socket shut down gracefully.
    ServerShutdown,
    /// The instance holding the socket stopped refreshing its liveness key.
    ServerLost,
    /// The device broke the protocol and the server closed the connection.
    ProtocolError,
    /// The device's credentials were revoked (disabled or deleted device).
    Revoked,
}

impl TcpDownReason {
    /// Every reason, in rank order (used to break timestamp ties).
    pub const ALL: [TcpDownReason; 8] = [
        Self::Closed,
        Self::Reset,
        Self::Keepalive,
        Self::Takeover,
        Self::ServerShutdown,
        Self::ServerLost,
        Self::ProtocolError,
        Self::Revoked,
    ];

    /// The snake_case name used in Redis, metrics and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Reset => "reset",
            Self::Keepalive => "keepalive",
            Self::Takeover => "takeover",
            Self::ServerShutdown => "server_shutdown",
            Self::ServerLost => "server_lost",
            Self::ProtocolError => "protocol_error",
            Self::Revoked => "revoked",
        }
    }

    /// Parses the name given by [`as_str`](Self::as_str).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// Whether this drop says something about the device's health. A takeover
    /// only says the device connected again, so it does not feed the
    /// `last_tcp_down` penalty of the online policy.
    pub fn penalises(self) -> bool {
        self != Self::Takeover
    }
}

impl std::fmt::Display for TcpDownReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    /// CONNECT accepted: the connection with this epoch exists.
    Connected {
        /// Keepalive the device asked for, in seconds (0: none).
        keepalive_secs: u16,
        /// The device's address as `ip:port`.
        peer: String,
    },
    /// PINGREQ or any other packet: the device is alive.
    Heartbeat,
    /// PUBLISH on `devices/{phyID}/up/...`.
    Uplink {
        /// Full topic name.
        topic: String,
        /// QoS of the PUBLISH (0 or 1).
        qos: u8,
        /// Application payload, as sent.
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
    },
    /// The TCP connection ended without a clean DISCONNECT.
    TcpDown {
        /// Why it ended.
        reason: TcpDownReason,
    },
    /// The device sent DISCONNECT: it left on purpose.
    Disconnected,
    /// The device acknowledged a downlink command.
    Ack {
        /// The command's id.
        command_id: Uuid,
    },
    /// The device did not acknowledge a downlink command in time.
    AckTimeout {
        /// The command's id.
        command_id: Uuid,
    },
}

impl EventKind {
    /// Stable snake_case name, for metrics labels and the archive.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Connected { .. } => "connected",
            Self::Heartbeat => "heartbeat",
            Self::Uplink { .. } => "uplink",
            Self::TcpDown { .. } => "tcp_down",
            Self::Disconnected => "disconnected",
            Self::Ack { .. } => "ack",
            Self::AckTimeout { .. } => "ack_timeout",
        }
    }
}

/// One event of one connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// The device.
    pub phy_id: PhyId,
    /// The connection (a fresh UUID per accepted CONNECT).
    pub conn_id: Uuid,
    /// The instance holding the connection's socket.
    pub server_id: ServerId,
    /// The connection's epoch: higher epochs own the binding.
    pub epoch: u64,
    /// When it happened, in ms since the Unix epoch (the instance's clock).
    pub ts_ms: i64,
    /// What happened.
    pub kind: EventKind,
}

/// One heartbeat inside a [`HeartbeatBatch`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The device.
    pub phy_id: PhyId,
    /// Its connection.
    pub conn_id: Uuid,
    /// The connection's epoch.
    pub epoch: u64,
    /// Time of the newest heartbeat of this device in the flush, ms.
    pub ts_ms: i64,
}

/// The newest heartbeat of each device of one instance in one flush.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatBatch {
    /// The instance that wrote the batch (and holds every connection in it).
    pub server_id: ServerId,
    /// One heartbeat per device.
    pub beats: Vec<Heartbeat>,
}

impl HeartbeatBatch {
    /// The batch as individual events.
    pub fn events(&self) -> impl Iterator<Item = Event> + '_ {
        self.beats.iter().map(|b| Event {
            phy_id: b.phy_id.clone(),
            conn_id: b.conn_id,
            server_id: self.server_id.clone(),
            epoch: b.epoch,
            ts_ms: b.ts_ms,
            kind: EventKind::Heartbeat,
        })
    }
}

/// The content of one stream entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Entry {
    /// A single event.
    Event(Event),
    /// Coalesced heartbeats.
    Heartbeats(HeartbeatBatch),
}

/// Why a stream entry could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The entry has no bytes at all.
    #[error("empty stream entry: expected a version byte and an rmp-serde body")]
    Empty,
    /// The entry was written by a newer (or foreign) encoder.
    #[error("unknown event format version {found} (this build reads version {FORMAT_VERSION})")]
    UnknownVersion {
        /// The version byte found.
        found: u8,
    },
    /// The body ends before the entry is complete.
    #[error("truncated stream entry: {0}")]
    Truncated(String),
    /// The body is not a valid entry of this version.
    #[error("malformed stream entry: {0}")]
    Malformed(String),
    /// The body decoded but bytes are left over.
    #[error("malformed stream entry: {0} trailing bytes after the entry")]
    Trailing(usize),
}

impl Entry {
    /// Encodes the entry: version byte, then the compact rmp-serde body.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        self.encode_into(&mut out);
        out
    }

    /// Appends the encoded entry to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.push(FORMAT_VERSION);
        // Writing into a Vec cannot fail and every field type is serialisable,
        // so an error here is a programming error in this module; it still must
        // not take a server down: the entry is then written without a body and
        // rejected by every reader as truncated.
        if let Err(e) = rmp_serde::encode::write(out, self) {
            debug_assert!(false, "entry encoding failed: {e}");
        }
    }

    /// Decodes an entry written by [`encode`](Self::encode).
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let (&version, mut body) = bytes.split_first().ok_or(DecodeError::Empty)?;
        if version != FORMAT_VERSION {
            return Err(DecodeError::UnknownVersion { found: version });
        }
        let entry = rmp_serde::decode::from_read(&mut body).map_err(|e| {
            use rmp_serde::decode::Error as E;
            match &e {
                E::InvalidMarkerRead(io) | E::InvalidDataRead(io)
                    if io.kind() == std::io::ErrorKind::UnexpectedEof =>
                {
                    DecodeError::Truncated(e.to_string())
                }
                _ => DecodeError::Malformed(e.to_string()),
            }
        })?;
        if !body.is_empty() {
            return Err(DecodeError::Trailing(body.len()));
        }
        Ok(entry)
    }

    /// The events of the entry (a heartbeat batch expands to one per device).
    pub fn into_events(self) -> Vec<Event> {
        match self {
            Entry::Event(e) => vec![e],
            Entry::Heartbeats(b) => b.events().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: EventKind) -> Event {
        Event {
            phy_id: PhyId::new("dev-1").unwrap(),
            conn_id: Uuid::from_u128(0x1234),
            server_id: ServerId::new("srv-a").unwrap(),
            epoch: 7,
            ts_ms: 1_700_000_000_123,
            kind,
        }
    }

    fn all_kinds() -> Vec<EventKind> {
        let mut kinds = vec![
            EventKind::Connected {
                keepalive_secs: 30,
                peer: "127.0.0.1:5555".into(),
            },
            EventKind::Heartbeat,
            EventKind::Uplink {
                topic: "devices/dev-1/up/temp".into(),
                qos: 1,
                payload: vec![0, 1, 2, 255],
            },
            EventKind::Disconnected,
            EventKind::Ack {
                command_id: Uuid::from_u128(9),
            },
            EventKind::AckTimeout {
                command_id: Uuid::from_u128(10),
            },
        ];
        kinds.extend(
            TcpDownReason::ALL
                .into_iter()
                .map(|reason| EventKind::TcpDown { reason }),
        );
        kinds
    }

    #[test]
    fn every_kind_round_trips() {
        for kind in all_kinds() {
            let entry = Entry::Event(ev(kind));
            let bytes = entry.encode();
            assert_eq!(bytes[0], FORMAT_VERSION);
            assert_eq!(Entry::decode(&bytes).unwrap(), entry);
        }
    }

    #[test]
    fn heartbeat_batch_round_trips_and_expands() {
        let batch = HeartbeatBatch {
            server_id: ServerId::new("srv-a").unwrap(),
            beats: (0..3)
                .map(|i| Heartbeat {
                    phy_id: PhyId::new(format!("d{i}")).unwrap(),
                    conn_id: Uuid::from_u128(i),
                    epoch: i as u64 + 1,
                    ts_ms: 1000 + i as i64,
                })
                .collect(),
        };
        let entry = Entry::Heartbeats(batch.clone());
        let decoded = Entry::decode(&entry.encode()).unwrap();
        assert_eq!(decoded, entry);
        let events = decoded.into_events();
        assert_eq!(events.len(), 3);
        assert_eq!(events[2].phy_id.as_str(), "d2");
        assert_eq!(events[2].server_id.as_str(), "srv-a");
        assert_eq!(events[2].epoch, 3);
        assert_eq!(events[2].kind, EventKind::Heartbeat);
    }

    #[test]
    fn compact_heartbeat_encoding_is_small() {
        // Heartbeats are the bulk of the traffic; keep them small.
        let batch = Entry::Heartbeats(HeartbeatBatch {
            server_id: ServerId::new("srv-a").unwrap(),
            beats: vec![Heartbeat {
                phy_id: PhyId::new("dev-000001").unwrap(),
                conn_id: Uuid::from_u128(1),
                epoch: 1,
                ts_ms: 1_700_000_000_000,
            }],
        });
        assert!(batch.encode().len() < 64, "{}", batch.encode().len());
    }

    #[test]
    fn unknown_version_is_a_clear_error() {
        let mut bytes = Entry::Event(ev(EventKind::Heartbeat)).encode();
        bytes[0] = 9;
        let err = Entry::decode(&bytes).unwrap_err();
        assert!(matches!(err, DecodeError::UnknownVersion { found: 9 }));
        assert!(err.to_string().contains("version 9"), "{err}");
    }

    #[test]
    fn truncated_entries_are_errors_at_every_length() {
        let bytes = Entry::Event(ev(EventKind::Uplink {
            topic: "devices/dev-1/up/x".into(),
            qos: 0,
            payload: vec![7; 40],
        }))
        .encode();
        assert!(matches!(Entry::decode(&[]), Err(DecodeError::Empty)));
        for cut in 1..bytes.len() {
            match Entry::decode(&bytes[..cut]) {
                Err(DecodeError::Truncated(_)) | Err(DecodeError::Malformed(_)) => {}
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
        assert!(matches!(
            Entry::decode(&bytes[..bytes.len() - 1]),
            Err(DecodeError::Truncated(_))
        ));
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let mut bytes = Entry::Event(ev(EventKind::Heartbeat)).encode();
        bytes.push(0);
        assert!(matches!(
            Entry::decode(&bytes),
            Err(DecodeError::Trailing(1))
        ));
    }

    #[test]
    fn invalid_phy_id_inside_an_entry_is_rejected() {
        // A writer that bypassed validation must not smuggle a bad id into a key.
        #[derive(Serialize)]
        struct RawEvent<'a> {
            phy_id: &'a str,
            conn_id: Uuid,
            server_id: &'a str,
            epoch: u64,
            ts_ms: i64,
            kind: EventKind,
        }
        #[derive(Serialize)]
        enum RawEntry<'a> {
            Event(RawEvent<'a>),
        }
        let mut bytes = vec![FORMAT_VERSION];
        rmp_serde::encode::write(
            &mut bytes,
            &RawEntry::Event(RawEvent {
                phy_id: "bad}id",
                conn_id: Uuid::nil(),
                server_id: "s",
                epoch: 1,
                ts_ms: 1,
                kind: EventKind::Heartbeat,
            }),
        )
        .unwrap();
        assert!(matches!(
            Entry::decode(&bytes),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn random_bytes_never_panic() {
        use proptest::prelude::*;
        proptest!(|(bytes in proptest::collection::vec(any::<u8>(), 0..200))| {
            let mut b = bytes;
            if !b.is_empty() { b[0] = FORMAT_VERSION; }
            let _ = Entry::decode(&b);
        });
    }

    #[test]
    fn reason_names_round_trip() {
        for r in TcpDownReason::ALL {
            assert_eq!(TcpDownReason::parse(r.as_str()), Some(r));
        }
        assert_eq!(TcpDownReason::parse("nope"), None);
        assert!(!TcpDownReason::Takeover.penalises());
        assert!(TcpDownReason::ServerLost.penalises());
    }
}
