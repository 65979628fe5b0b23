//! What the projector takes from the configuration, in the units it uses.

use std::time::Duration;

use iot_core::config::{StreamCap, millis};
use iot_core::{Config, Keys, Policy, ServerId};

/// Largest window or timestamp magnitude (ms) handed to the Lua scripts:
/// 2^50 ms is 35,000 years, and keeps every sum and difference of two such
/// values exact in Lua's doubles.
pub const MAX_WINDOW_MS: i64 = 1 << 50;

/// Largest timestamp or epoch accepted from an event (2^52): beyond it Lua's
/// doubles could not compare them exactly. Such events are counted as bad.
pub const MAX_EVENT_VALUE: i64 = 1 << 52;

/// The projector's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Key schema (with the configured prefix).
    pub keys: Keys,
    /// Number of event shards.
    pub shards: u16,
    /// The online policy, windows clamped to [`MAX_WINDOW_MS`].
    pub policy: Policy,
    /// TTL of the views and connection keys (2 x heartbeat timeout), ms.
    pub ttl_ms: i64,
    /// Consumer name in the group.
    pub consumer: String,
    /// Entries per XREADGROUP (spread over the shards).
    pub batch_size: usize,
    /// XREADGROUP BLOCK.
    pub block: Duration,
    /// Idle time after which pending entries are claimed.
    pub claim_idle: Duration,
    /// How often entries are claimed.
    pub claim_interval: Duration,
    /// How often due devices are evaluated.
    pub due_interval: Duration,
    /// Wait after a small read (see `projector.linger`).
    pub linger: Duration,
    /// How often lapsed ingests are looked for.
    pub reaper_interval: Duration,
    /// How often the lag is published.
    pub lag_interval: Duration,
    /// TTL of an ingest's liveness key, ms.
    pub liveness_ttl_ms: i64,
    /// Approximate length cap of the lifecycle streams (and of the event
    /// streams, for the reaper's events), read at each write; none when the
    /// archive is on or an archiver has been seen, so that only the archiver
    /// trims (below what it has stored).
    pub maxlen: StreamCap,
}

impl Settings {
    /// Settings from the configuration; `server_id` names the consumer when
    /// `projector.consumer` is empty.
    pub fn from_config(config: &Config, server_id: &ServerId) -> Self {
        let mut policy = config.policy();
        policy.heartbeat_timeout_ms = policy.heartbeat_timeout_ms.clamp(0, MAX_WINDOW_MS);
        policy.tcp_down_window_ms = policy.tcp_down_window_ms.clamp(0, MAX_WINDOW_MS);
        policy.ack_window_ms = policy.ack_window_ms.clamp(0, MAX_WINDOW_MS);
        let p = &config.projector;
        let consumer = if p.consumer.trim().is_empty() {
            server_id.to_string()
        } else {
            p.consumer.trim().to_owned()
        };
        Self {
            keys: config.keys(),
            shards: config.streams.shards.max(1),
            policy,
            ttl_ms: millis(config.session_ttl()).clamp(1, MAX_WINDOW_MS),
            consumer,
            batch_size: (p.batch_size as usize).max(1),
            block: p.block,
            linger: p.linger,
            claim_idle: p.claim_idle,
            claim_interval: p.claim_interval.max(Duration::from_millis(10)),
            due_interval: p.due_interval.max(Duration::from_millis(10)),
            reaper_interval: p.reaper_interval.max(Duration::from_millis(10)),
            lag_interval: p.lag_interval.max(Duration::from_millis(10)),
            liveness_ttl_ms: millis(config.session.liveness_ttl),
            maxlen: config.stream_cap(),
        }
    }

    /// All shard numbers.
    pub fn shard_range(&self) -> std::ops::Range<u16> {
        0..self.shards
    }

    /// Entries to ask of each shard per XREADGROUP, so that one read returns
    /// about `batch_size` entries in all.
    pub fn per_shard_count(&self) -> usize {
        self.batch_size.div_ceil(usize::from(self.shards)).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumer_defaults_to_the_server_id_and_windows_are_clamped() {
        let mut c = Config::default();
        c.session.heartbeat_timeout = Duration::from_secs(u64::MAX / 2);
        let id = ServerId::new("p-1").expect("valid id");
        let s = Settings::from_config(&c, &id);
        assert_eq!(s.consumer, "p-1");
        assert_eq!(s.policy.heartbeat_timeout_ms, MAX_WINDOW_MS);
        assert_eq!(s.per_shard_count(), 32);
        c.projector.consumer = " worker-a ".into();
        assert_eq!(Settings::from_config(&c, &id).consumer, "worker-a");
    }

    #[test]
    fn lifecycle_streams_are_capped_only_without_the_archive() {
        let mut c = Config::default();
        let id = ServerId::new("p-1").expect("valid id");
        let s = Settings::from_config(&c, &id);
        assert_eq!(s.maxlen.get(), Some(c.streams.maxlen));
        c.streams.archiver_seen.set();
        assert_eq!(s.maxlen.get(), None, "an archiver seen later lifts the cap");
        c.database.url = "postgres://postgres@127.0.0.1/test".into();
        c.streams.archiver_seen = iot_core::config::ArchiverSeen::new(false);
        assert_eq!(Settings::from_config(&c, &id).maxlen.get(), None);
    }
}
