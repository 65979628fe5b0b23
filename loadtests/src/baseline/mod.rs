//! The baselines our figures are compared with, each measured on this
//! machine in the same run as ours:
//!
//! - [`seed_heartbeat`]: the seed's GET-then-SETEX heartbeat.
//! - [`count_scan`]: the seed's SCAN-every-key online count against our
//!   O(1) count.
//! - [`idle_connections`]: Mosquitto (or any MQTT server) holding idle
//!   connections: connect rate and memory per connection.
//!
//! [`seed_session`] is the seed's session record they share,
//! [`redis_target`] the Redis they run against, and [`resp`] the minimal
//! client that lets the seed-heartbeat baseline saturate Redis.

pub mod count_scan;
pub mod idle_connections;
pub mod redis_target;
pub mod resp;
pub mod seed_heartbeat;
pub mod seed_session;
