//! Downlink commands: any api instance sends a command to any device; Redis
//! Pub/Sub carries it to the ingest instance holding the device's socket;
//! the device's PUBACK, or its absence, decides the command's fate.
//!
//! This crate holds what the api (submit, read), the ingest (deliver,
//! report) and the projector (sweep) share, so the state machine lives in
//! one place.
//!
//! # Layout
//!
//! - [`command`]: states, failure reasons, the record, name rules.
//! - [`store`]: records, change log, offline queue and deadlines in Redis.
//! - [`route`]: find the owner and publish, or queue, or fail.
//! - [`sweeper`]: expire and re-route commands nobody else decides.
//! - [`metrics`]: the downlink metrics.

pub mod command;
pub mod metrics;
pub mod route;
pub mod store;
pub mod sweeper;

pub use command::{Change, Command, FailReason, Status};
pub use store::{CommandStore, NewCommand, OpenCounts, Outcome, Refusal, Settings, Transition};
