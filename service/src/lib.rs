//! Plumbing shared by the `iot-ingest`, `iot-projector` and `iot-api`
//! binaries.
//!
//! # Layout
//!
//! - [`cli`]: `--config` and the `--help` text listing every config key.
//! - [`startup`]: load the config, set up logging, connect to Redis.
//! - [`redis`]: the Redis connection pool; Redis is required.
//! - [`health`]: named checks and the overall status.
//! - [`http`]: `/health*` and `/metrics`, and serving with graceful shutdown.
//! - [`metrics`]: the Prometheus recorder and process gauges.
//! - [`shutdown`]: SIGTERM and Ctrl-C.

pub mod cli;
pub mod health;
pub mod http;
pub mod metrics;
pub mod redis;
pub mod shutdown;
pub mod startup;

pub use health::{Health, Status};
pub use redis::RedisPool;
