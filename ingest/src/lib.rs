//! Ingest: the MQTT device gateway that writes the event log.
//!
//! Devices connect with any MQTT 3.1.1 client and stay connected; every
//! CONNECT, heartbeat, uplink, clean DISCONNECT and TCP drop becomes an event
//! on the sharded Redis Streams (`stream:events:{shard}`), written in
//! pipelined batches by one writer per instance. A CONNECT takes the
//! device's next epoch in Redis and closes any older connection of the
//! device, here or on another instance (takeover). While Redis is away,
//! connections stay up and events wait in a bounded buffer.
//!
//! Downlink commands arrive over Redis Pub/Sub (`downlink:{server_id}`) or
//! from the device's offline queue; the connection sends them as QoS 1
//! PUBLISHes within the inflight limit, retransmits once, and reports acked
//! or timed_out (with `ack` / `ack_timeout` events); commands follow a
//! device that moves, and go back to the queue when its connection ends.
//! With `mqtt.auth: registry` devices authenticate against the PostgreSQL
//! device registry, cached.
//!
//! # Layout
//!
//! - [`run`]: the service, given its context and listeners; start-up and
//!   the graceful shutdown sequence.
//! - [`server`]: the accept loop: connection limit, per-IP rate, accept errors.
//! - [`connection`]: one task per device connection: handshake, session loop, close.
//! - [`session`]: the pure MQTT session state machine.
//! - [`protocol`]: the `DeviceProtocol` trait a connection drives, and its MQTT implementation.
//! - [`topics`]: which topics a device may publish and subscribe to.
//! - [`auth`]: device authentication: `open`, `registry` (PostgreSQL, with
//!   its cache, failure throttle and revocation re-check).
//! - [`writer`]: the batching event writer, heartbeat coalescing, outage buffer.
//! - [`downlink`]: one connection's downlink commands (pure state machine).
//! - [`reporter`]: command state changes and queue work in Redis, off the
//!   packet loops.
//! - [`registry`]: local connections by device, their mailboxes; takeover rules.
//! - [`takeover`]: epochs, owner keys and kicks in Redis.
//! - [`control`]: the Pub/Sub subscriber on `downlink:{server_id}` (kicks,
//!   commands, queue drains).
//! - [`liveness`]: the liveness key and the instance registry record.
//! - [`limits`]: open-file limit, connection capacity, per-IP rate limiter.
//! - [`instance`]: the state every connection shares.
//! - [`metrics`]: every metric, declared once.

pub mod auth;
pub mod connection;
pub mod control;
pub mod downlink;
pub mod instance;
pub mod limits;
pub mod liveness;
pub mod metrics;
pub mod protocol;
pub mod rebind;
pub mod registry;
pub mod reporter;
pub mod server;
pub mod session;
pub mod takeover;
pub mod topics;
pub mod writer;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use iot_core::TcpDownReason;
use iot_service::startup::Context;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::instance::Instance;
use crate::liveness::Liveness;
use crate::protocol::{Limits, Mqtt};
use crate::registry::Registry;
use crate::takeover::Takeover;

/// The service's default HTTP port (`http.listen` empty).
pub const DEFAULT_HTTP_PORT: u16 = 9100;

/// Runs the service until `ctx.shutdown` is cancelled, then shuts down
/// gracefully within `shutdown.grace`: stop accepting, close every device
/// connection with `tcp_down(server_shutdown)` (their downlink commands go
/// back to the queue or fail), record the command changes, flush the
/// writer, remove the instance's liveness key, connection set and registry
/// entry.
///
/// Fails at start when the configuration cannot work: `mqtt.auth: registry`
/// without `database.url`, or a registry database missing migrations.
pub async fn run(ctx: Context, mqtt: TcpListener, http: TcpListener) -> anyhow::Result<()> {
    metrics::describe();
    let config = &ctx.config;
    let auth = auth::from_config(config, &ctx.health).await?;
    let capacity = limits::raise_and_compute(config.mqtt.max_connections);
    ::metrics::gauge!(metrics::CONNECTION_LIMIT).set(capacity.max_connections as f64);
    tracing::info!(
        max_connections = capacity.max_connections,
        open_files_soft = capacity.soft,
        open_files_hard = capacity.hard,
        task_bytes = connection::task_size(),
        "this instance can hold {} device connections",
        capacity.max_connections
    );

    let keys = config.keys();
    // Longest wait for one Redis call on the hot paths (CONNECT, flush).
    let redis_timeout = config
        .redis
        .read_timeout
        .max(config.redis.write_timeout)
        .max(Duration::from_millis(100));
    let (writer, writer_control) = writer::spawn(
        writer::WriterConfig::from_config(config, redis_timeout),
        ctx.redis.clone(),
        &keys,
        ctx.server_id.clone(),
        ctx.health.clone(),
    );
    let registry = Arc::new(Registry::new());
    let connections = Arc::new(AtomicU64::new(0));
    let takeover = Takeover::new(keys.clone(), ctx.server_id.clone(), config.session_ttl());
    let commands = iot_downlink::CommandStore::new(
        ctx.redis.clone(),
        keys.clone(),
        iot_downlink::Settings::from_config(config),
    );
    let (reporter, reporter_control) = reporter::spawn(
        commands,
        registry.clone(),
        ctx.server_id.clone(),
        redis_timeout,
    );
    let inst = Arc::new(Instance {
        server_id: ctx.server_id.clone(),
        redis: ctx.redis.clone(),
        health: ctx.health.clone(),
        writer,
        reporter: reporter.clone(),
        downlink: downlink::Limits::from_config(&config.downlink),
        registry: registry.clone(),
        takeover: takeover.clone(),
        auth: auth.authenticator,
        protocol: Mqtt,
        limits: Limits {
            max_packet_size: config.mqtt.max_packet_size as usize,
            max_keepalive: config.mqtt.max_keepalive.max(Duration::from_secs(1)),
        },
        connect_timeout: config.mqtt.connect_timeout,
        redis_timeout,
        slots: tokio::sync::Semaphore::new(capacity.max_connections),
        connections: connections.clone(),
        shutdown: ctx.shutdown.clone(),
    });

    // Background tasks stop with `ctx.shutdown`.
    let background = ctx.shutdown.child_token();
    let (control_task, subscribed) = control::spawn(
        ctx.redis.clone(),
        keys.downlink_channel(&ctx.server_id),
        registry.clone(),
        reporter,
        background.clone(),
    );
    if tokio::time::timeout(config.redis.dial_timeout, subscribed)
        .await
        .is_err()
    {
        tracing::warn!(
            "control channel not subscribed yet; takeovers from other instances may be missed until it is"
        );
    }
    let liveness = Arc::new(Liveness::new(
        keys.clone(),
        ctx.server_id.clone(),
        config.session.liveness_ttl,
        mqtt.local_addr()?.to_string(),
        http.local_addr()?.to_string(),
    ));
    let started = match liveness.beat(&ctx.redis, "running", 0).await {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(error = %e, "first liveness beat failed; retrying in the background");
            false
        }
    };
    let lapsed = Arc::new(tokio::sync::Notify::new());
    let liveness_task = liveness.clone().spawn(
        ctx.redis.clone(),
        ctx.health.clone(),
        registry.clone(),
        connections.clone(),
        started,
        lapsed.clone(),
        background.clone(),
    );
    let rebind_task = rebind::spawn(inst.clone(), lapsed, background.clone());
    let renewer = takeover.spawn_renewer(ctx.redis.clone(), registry.clone(), background.clone());
    let keepalive = registry.clone().spawn_keepalive(background.clone());
    let mut registry_tasks = Vec::new();
    if let Some(reg) = auth.registry {
        // The `database` check: ok while the registry answers.
        let every = reg
            .ttl()
            .clamp(Duration::from_millis(200), Duration::from_secs(5));
        let store = reg.store().clone();
        registry_tasks.push(iot_service::health::spawn_probe(
            ctx.health.clone(),
            auth::HEALTH_CHECK,
            every,
            reg.query_timeout(),
            background.clone(),
            move || {
                let store = store.clone();
                async move { store.probe().await }
            },
        ));
        let every = reg.ttl();
        registry_tasks.push(auth::revocation::spawn(
            reg,
            registry.clone(),
            every,
            background.clone(),
        ));
    }

    let http_addr = http.local_addr()?;
    let router = ctx.base_router("ingest");
    let http_task = tokio::spawn(iot_service::http::serve(http, router, ctx.shutdown.clone()));
    tracing::info!(
        server_id = %ctx.server_id,
        mqtt = %mqtt.local_addr()?,
        http = %http_addr,
        auth = inst.auth.name(),
        "iot-ingest started"
    );

    let tracker = TaskTracker::new();
    let limiter = limits::RateLimiter::new(
        config.mqtt.connect_rate_per_ip,
        config.mqtt.connect_burst_per_ip,
    );
    server::accept_loop(inst.clone(), mqtt, limiter, tracker.clone()).await;

    // Graceful shutdown, all within the grace period.
    let started = Instant::now();
    let grace = config.shutdown.grace;
    let deadline = started + grace;
    // Time kept for removing the instance's keys at the end.
    let cleanup_reserve = (grace / 4).min(Duration::from_secs(1));
    let closing = registry.close_all(TcpDownReason::ServerShutdown);
    tracing::info!(
        connections = closing,
        grace_secs = grace.as_secs_f64(),
        "shutting down: listener closed, closing device connections"
    );
    let _ = tokio::time::timeout_at(
        deadline,
        liveness.beat(&ctx.redis, "draining", closing as u64),
    )
    .await;
    tracker.close();
    if tokio::time::timeout_at(deadline - cleanup_reserve, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            left = tracker.len(),
            "device connections still closing at the shutdown deadline"
        );
    }
    // The closed connections' commands are back in their queues (or
    // failed) before the last events are written.
    reporter_control.finish(deadline - cleanup_reserve).await;
    writer_control.finish(deadline - cleanup_reserve).await;
    // No beat may land after the keys are removed.
    background.cancel();
    let tasks = [control_task, liveness_task, rebind_task, renewer, keepalive]
        .into_iter()
        .chain(registry_tasks);
    for task in tasks {
        task.abort();
        let _ = task.await;
    }
    match tokio::time::timeout_at(deadline, liveness.clear(&ctx.redis)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "cannot remove the instance's keys from Redis"),
        Err(_) => tracing::warn!("removing the instance's keys timed out"),
    }
    match http_task.await {
        Ok(r) => r?,
        Err(e) => tracing::warn!(error = %e, "HTTP server task failed"),
    }
    tracing::info!(
        took_secs = started.elapsed().as_secs_f64(),
        "iot-ingest stopped"
    );
    Ok(())
}
