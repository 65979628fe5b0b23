//! What every connection of an instance shares: who the instance is, the
//! writer, the downlink reporter, the registry, Redis, the protocol and its
//! limits.
//!
//! One `Arc<Instance>` per instance; a connection holds a clone (8 bytes)
//! instead of copies of its parts.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use iot_core::ServerId;
use iot_service::{Health, RedisPool};
use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::protocol::{Limits, Mqtt};
use crate::registry::Registry;
use crate::reporter::ReporterHandle;
use crate::takeover::Takeover;
use crate::writer::WriterHandle;

/// The shared state of one ingest instance.
pub struct Instance {
    /// This instance's id (in every event).
    pub server_id: ServerId,
    /// Redis.
    pub redis: RedisPool,
    /// Health checks (`event_writer` decides whether CONNECTs are taken).
    pub health: Health,
    /// The event writer.
    pub writer: WriterHandle,
    /// Where command state changes go (to Redis, off the packet loops).
    pub reporter: ReporterHandle,
    /// ACK timeout and inflight limit of downlink commands.
    pub downlink: crate::downlink::Limits,
    /// Local connections by device.
    pub registry: Arc<Registry>,
    /// Epochs, owners and kicks.
    pub takeover: Takeover,
    /// Credential checks.
    pub auth: Box<dyn Authenticator>,
    /// The device protocol.
    pub protocol: Mqtt,
    /// Packet size and keepalive limits.
    pub limits: Limits,
    /// Time from accept to a complete CONNECT.
    pub connect_timeout: Duration,
    /// Longest wait for Redis during a CONNECT.
    pub redis_timeout: Duration,
    /// The connection limit: one permit per connection task, taken (and
    /// forgotten) by the accept loop, given back by the task.
    pub slots: tokio::sync::Semaphore,
    /// Connections held (accepted CONNECT, not yet closed).
    pub connections: Arc<AtomicU64>,
    /// Cancelled when the instance shuts down.
    pub shutdown: CancellationToken,
}
