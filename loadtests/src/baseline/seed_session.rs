//! The seed's session record, exactly as its document shows it: one JSON
//! string per device at `session:device:{phyID}`, rewritten whole on every
//! heartbeat (GET, change `last_seen`, SETEX with 2 x heartbeat timeout).
//!
//! Timestamps are Go `time.Time` JSON (RFC 3339, UTC, fractional seconds
//! only when present; the zero time for "never"), as the seed's Go code
//! writes them.

use serde::{Deserialize, Serialize};

/// Go's zero `time.Time` in JSON: the seed's "never".
pub const GO_ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// `session:device:{phyID}` of the seed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeedSession {
    /// Device id.
    pub phy_id: String,
    /// Connection id (uuid).
    pub conn_id: String,
    /// Instance holding the connection.
    pub server_id: String,
    /// Last heartbeat.
    pub last_seen: String,
    /// Last TCP drop (zero time: never).
    pub last_tcp_down: String,
    /// Last ACK timeout (zero time: never).
    pub last_ack_timeout: String,
}

/// Go `time.Time` JSON of `ms` since the epoch.
pub fn go_time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
        .unwrap_or_else(|| GO_ZERO_TIME.to_owned())
}

/// Parses a Go `time.Time` JSON string back to ms (the zero time and
/// garbage are `None`).
pub fn parse_go_time(s: &str) -> Option<i64> {
    if s == GO_ZERO_TIME {
        return None;
    }
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.timestamp_millis())
}

impl SeedSession {
    /// A fresh session (the seed's Bind), last seen `now_ms`.
    pub fn new(phy_id: &str, conn_id: &str, server_id: &str, now_ms: i64) -> SeedSession {
        SeedSession {
            phy_id: phy_id.to_owned(),
            conn_id: conn_id.to_owned(),
            server_id: server_id.to_owned(),
            last_seen: go_time(now_ms),
            last_tcp_down: GO_ZERO_TIME.to_owned(),
            last_ack_timeout: GO_ZERO_TIME.to_owned(),
        }
    }

    /// The seed's OnHeartbeat between its GET and its SETEX: the stored
    /// JSON (if any, and if readable) with `last_seen` set to `now_ms`, or a
    /// fresh session; returned encoded.
    pub fn heartbeat(
        stored: Option<&[u8]>,
        phy_id: &str,
        conn_id: &str,
        server_id: &str,
        now_ms: i64,
    ) -> Vec<u8> {
        let mut session = stored
            .and_then(|b| serde_json::from_slice::<SeedSession>(b).ok())
            .unwrap_or_else(|| SeedSession::new(phy_id, conn_id, server_id, now_ms));
        session.last_seen = go_time(now_ms);
        session.encode()
    }

    /// The JSON bytes.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The seed's IsOnline: the last heartbeat is at most `timeout_ms` old.
    pub fn is_online(&self, now_ms: i64, timeout_ms: i64) -> bool {
        parse_go_time(&self.last_seen).is_some_and(|seen| now_ms - seen <= timeout_ms)
    }

    /// Decodes stored JSON and applies [`is_online`](Self::is_online);
    /// unreadable JSON counts as offline.
    pub fn stored_is_online(stored: &[u8], now_ms: i64, timeout_ms: i64) -> bool {
        serde_json::from_slice::<SeedSession>(stored)
            .map(|s| s.is_online(now_ms, timeout_ms))
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: i64 = 1_759_658_400_000; // 2025-10-05T10:00:00Z

    #[test]
    fn json_has_the_seed_fields_and_go_times() {
        let s = SeedSession::new("device-001", "c1", "iot-server-host-abc123", T);
        let v: serde_json::Value = serde_json::from_slice(&s.encode()).expect("json");
        assert_eq!(v["phy_id"], "device-001");
        assert_eq!(v["last_seen"], "2025-10-05T10:00:00Z");
        assert_eq!(v["last_tcp_down"], GO_ZERO_TIME);
        assert_eq!(v["last_ack_timeout"], GO_ZERO_TIME);
        assert_eq!(go_time(T + 123), "2025-10-05T10:00:00.123Z");
    }

    #[test]
    fn heartbeat_updates_only_last_seen() {
        let mut old = SeedSession::new("d", "c1", "s1", T);
        old.last_tcp_down = go_time(T - 5);
        let new = SeedSession::heartbeat(Some(&old.encode()), "d", "c2", "s2", T + 1000);
        let new: SeedSession = serde_json::from_slice(&new).expect("json");
        assert_eq!(new.conn_id, "c1");
        assert_eq!(new.server_id, "s1");
        assert_eq!(new.last_tcp_down, old.last_tcp_down);
        assert_eq!(parse_go_time(&new.last_seen), Some(T + 1000));
        // Nothing stored, or garbage: a fresh session.
        for stored in [None, Some(&b"not json"[..])] {
            let fresh = SeedSession::heartbeat(stored, "d", "c2", "s2", T);
            let fresh: SeedSession = serde_json::from_slice(&fresh).expect("json");
            assert_eq!(fresh.conn_id, "c2");
        }
    }

    #[test]
    fn online_is_heartbeat_age() {
        let s = SeedSession::new("d", "c", "s", T);
        assert!(s.is_online(T + 300_000, 300_000));
        assert!(!s.is_online(T + 300_001, 300_000));
        assert!(SeedSession::stored_is_online(&s.encode(), T, 1));
        assert!(!SeedSession::stored_is_online(b"{}", T, 1));
        assert_eq!(parse_go_time(GO_ZERO_TIME), None);
    }
}
