//! Records that one service writes to Redis and others read: the registry
//! of ingest instances and the projectors' lag.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// One ingest instance, as stored (JSON) in the `servers:registry` hash under
/// its server id. The ingest rewrites it on every liveness beat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// The instance's id.
    pub server_id: String,
    /// Host it runs on.
    pub hostname: String,
    /// Process id.
    pub pid: u32,
    /// MQTT listen address.
    pub mqtt_listen: String,
    /// HTTP listen address (`/health`, `/metrics`).
    pub http_listen: String,
    /// Crate version.
    pub version: String,
    /// Start time, ms since the Unix epoch.
    pub started_at_ms: i64,
    /// Time of this beat, ms.
    pub last_beat_ms: i64,
    /// Device connections held at this beat.
    pub connections: u64,
    /// `running`, `degraded` (Redis writes failing) or `draining` (shutting down).
    pub status: String,
}

/// The instance that accepted a device's newest CONNECT, as stored in
/// `session:owner:{phyID}` by the ingest: `"<server_id> <epoch>"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// The instance.
    pub server_id: crate::ids::ServerId,
    /// The epoch of that connection.
    pub epoch: u64,
}

impl Owner {
    /// The stored form.
    pub fn format(&self) -> String {
        format!("{} {}", self.server_id, self.epoch)
    }

    /// Parses the stored form; `None` if malformed.
    pub fn parse(s: &str) -> Option<Self> {
        let (server, epoch) = s.rsplit_once(' ')?;
        Some(Self {
            server_id: crate::ids::ServerId::new(server).ok()?,
            epoch: epoch.parse().ok()?,
        })
    }
}

/// Field names of the `projector:lag` hash.
pub mod lag_field {
    /// Entries delivered to a projector and not yet acknowledged (all shards).
    pub const PENDING: &str = "pending";
    /// Entries not yet delivered to any projector (all shards).
    pub const UNDELIVERED: &str = "undelivered";
    /// Age in ms of the oldest entry not yet applied (pending or undelivered);
    /// 0 when caught up.
    pub const OLDEST_AGE_MS: &str = "oldest_age_ms";
    /// Stream entries appended per second over the last interval (all
    /// shards). An entry may carry a batch of heartbeats: this counts
    /// entries, not events.
    pub const ADDED_PER_SEC: &str = "added_per_sec";
    /// Stream entries acknowledged per second by all projectors over the last
    /// interval.
    pub const APPLIED_PER_SEC: &str = "applied_per_sec";
    /// Events (a heartbeat batch counts each heartbeat) applied per second by
    /// all projectors over the last interval, from [`EVENTS_APPLIED`].
    pub const EVENTS_APPLIED_PER_SEC: &str = "events_applied_per_sec";
    /// Events applied by all projectors since the record was created: a
    /// counter each projector adds to (HINCRBY) before it measures, never
    /// part of the HSET of [`super::Lag::to_fields`].
    pub const EVENTS_APPLIED: &str = "events_applied";
    /// Consumers in the group.
    pub const CONSUMERS: &str = "consumers";
    /// When this record was written, ms.
    pub const UPDATED_AT_MS: &str = "updated_at_ms";
}

/// The projectors' consumer-group lag, as published in `projector:lag`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Lag {
    /// See [`lag_field::PENDING`].
    pub pending: u64,
    /// See [`lag_field::UNDELIVERED`].
    pub undelivered: u64,
    /// See [`lag_field::OLDEST_AGE_MS`].
    pub oldest_age_ms: i64,
    /// See [`lag_field::ADDED_PER_SEC`].
    pub added_per_sec: f64,
    /// See [`lag_field::APPLIED_PER_SEC`].
    pub applied_per_sec: f64,
    /// See [`lag_field::EVENTS_APPLIED_PER_SEC`].
    pub events_applied_per_sec: f64,
    /// See [`lag_field::CONSUMERS`].
    pub consumers: u64,
    /// See [`lag_field::UPDATED_AT_MS`].
    pub updated_at_ms: i64,
}

impl Lag {
    /// Fields for HSET.
    pub fn to_fields(&self) -> Vec<(&'static str, String)> {
        vec![
            (lag_field::PENDING, self.pending.to_string()),
            (lag_field::UNDELIVERED, self.undelivered.to_string()),
            (lag_field::OLDEST_AGE_MS, self.oldest_age_ms.to_string()),
            (lag_field::ADDED_PER_SEC, self.added_per_sec.to_string()),
            (lag_field::APPLIED_PER_SEC, self.applied_per_sec.to_string()),
            (
                lag_field::EVENTS_APPLIED_PER_SEC,
                self.events_applied_per_sec.to_string(),
            ),
            (lag_field::CONSUMERS, self.consumers.to_string()),
            (lag_field::UPDATED_AT_MS, self.updated_at_ms.to_string()),
        ]
    }

    /// Reads HGETALL output; missing or unparsable fields read as 0.
    pub fn from_fields(f: &HashMap<String, String>) -> Self {
        fn n<T: std::str::FromStr + Default>(f: &HashMap<String, String>, k: &str) -> T {
            f.get(k).and_then(|v| v.parse().ok()).unwrap_or_default()
        }
        Self {
            pending: n(f, lag_field::PENDING),
            undelivered: n(f, lag_field::UNDELIVERED),
            oldest_age_ms: n(f, lag_field::OLDEST_AGE_MS),
            added_per_sec: n(f, lag_field::ADDED_PER_SEC),
            applied_per_sec: n(f, lag_field::APPLIED_PER_SEC),
            events_applied_per_sec: n(f, lag_field::EVENTS_APPLIED_PER_SEC),
            consumers: n(f, lag_field::CONSUMERS),
            updated_at_ms: n(f, lag_field::UPDATED_AT_MS),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_round_trips_through_fields() {
        let lag = Lag {
            pending: 3,
            undelivered: 10,
            oldest_age_ms: 250,
            added_per_sec: 1234.5,
            applied_per_sec: 1200.0,
            events_applied_per_sec: 90_000.0,
            consumers: 2,
            updated_at_ms: 1_700_000_000_000,
        };
        let map: HashMap<String, String> = lag
            .to_fields()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        assert_eq!(Lag::from_fields(&map), lag);
        assert_eq!(Lag::from_fields(&HashMap::new()), Lag::default());
    }

    #[test]
    fn owner_round_trips() {
        let o = Owner {
            server_id: crate::ids::ServerId::new("srv-1").unwrap(),
            epoch: 42,
        };
        assert_eq!(o.format(), "srv-1 42");
        assert_eq!(Owner::parse(&o.format()), Some(o));
        assert_eq!(Owner::parse("srv-1"), None);
        assert_eq!(Owner::parse("bad id 4"), None);
        assert_eq!(Owner::parse("srv x"), None);
    }

    #[test]
    fn instance_info_is_json() {
        let i = InstanceInfo {
            server_id: "s".into(),
            hostname: "h".into(),
            pid: 1,
            mqtt_listen: "0.0.0.0:1883".into(),
            http_listen: "0.0.0.0:9100".into(),
            version: "0.1.0".into(),
            started_at_ms: 1,
            last_beat_ms: 2,
            connections: 3,
            status: "running".into(),
        };
        let s = serde_json::to_string(&i).unwrap();
        assert_eq!(serde_json::from_str::<InstanceInfo>(&s).unwrap(), i);
    }
}
