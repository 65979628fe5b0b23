//! Domain core of the IoT session server.
//!
//! Pure types and functions shared by the `ingest`, `projector` and `api`
//! services: no I/O except reading a config file.
//!
//! # Layout
//!
//! - [`ids`]: phyID and server id validation, the server id rule.
//! - [`event`]: the events on the Redis Streams and their versioned encoding.
//! - [`view`]: the session view of a device and the order-independent merge.
//! - [`policy`]: the weighted online policy, with its explanation.
//! - [`keys`]: the Redis key schema (no other file spells a key).
//! - [`control`]: messages on an instance's Pub/Sub channel.
//! - [`registry`]: the ingest instance registry and the projectors' lag record.
//! - [`config`]: typed configuration sections, YAML plus environment.
//! - [`time`]: milliseconds since the Unix epoch.

pub mod config;
pub mod control;
pub mod event;
pub mod ids;
pub mod keys;
pub mod policy;
pub mod registry;
pub mod time;
pub mod view;

pub use config::Config;
pub use event::{Entry, Event, EventKind, TcpDownReason};
pub use ids::{PhyId, ServerId};
pub use keys::Keys;
pub use policy::{Evaluation, Policy, PolicyInput, Reason};
pub use view::SessionView;
