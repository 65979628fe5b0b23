//! Projector: turns the event streams into session views, the online index
//! and the lifecycle stream.
//!
//! Any number of projectors read the event shards as one consumer group
//! (`projectors`). Redis may hand the events of one device to different
//! projectors in any order, so the projection is a merge: each event is
//! applied atomically to its device's view by a Redis function (Lua) that is
//! the twin of [`iot_core::SessionView::apply`] and
//! [`iot_core::Policy::evaluate`], and the shard-level index (online index,
//! bound hash, revisions, lifecycle, due and known sets) is updated by a
//! second function that accepts a state only if its revision is newer than the stored one.
//! Every multi-key operation stays in one hash slot (the device's `{phy}` or
//! the shard's `{n}`), except the consumer's read of all shard streams in
//! one `XREADGROUP` (see [`consumer`]), which must be split per slot before
//! the projector can run on Redis Cluster.
//!
//! Heartbeats take the cheapest path: one `ZADD GT` per shard and batch into
//! the shard's seen set (`presence:seen:{n}`) and one `HMGET` of the
//! shard's bound hash (`presence:bound:{n}`: the bound epoch of each online
//! device). Only heartbeats of devices that are not online, or of an epoch
//! above the bound one, go on to their view (they may bring the device
//! online, or bind it: a view that lost its binding gets it back). Readers
//! take `last_seen` as the larger of the view's field and the seen score,
//! and the due evaluation folds the score into the view (refreshing its TTL)
//! before the view could expire. Uplinks and ACKs take a fast path
//! (max-merge of `last_seen`, lazy TTL refresh, the policy only when a stale
//! view turns fresh); the rare binding events (connect, drop, disconnect)
//! and ACK timeouts take the full
//! merge and always update the shard index. Time-based changes (heartbeat
//! expiry, end of a penalty window, view expiry) are found through each
//! shard's due set.
//!
//! # Layout
//!
//! - [`settings`]: what the projector takes from the configuration.
//! - [`script`]: the Redis function library (`src/lua/`), its calls and
//!   the records they return.
//! - [`stream`]: stream entries as read, and their decoding.
//! - [`projection`]: applying events (device scripts, then index and
//!   single-key follow-ups).
//! - [`consumer`]: the consumer group loop: read, apply, ack, claim.
//! - [`due`]: re-evaluation of devices whose state changes with time.
//! - [`reaper`]: `tcp_down` (server_lost) for the sessions of lapsed ingests.
//! - [`lag`]: the consumer group's lag, for the API and the metrics.
//! - [`rebuild`](mod@rebuild): re-deriving every view from the streams.
//! - [`archive`](mod@archive): the PostgreSQL archiver and the downlink command
//!   sweeper, run beside the projection.
//! - [`backoff`]: waiting between retries of a failed Redis operation.
//! - [`metrics`]: the projector's metrics.
//! - [`run`]: the service, given its context and listener.

pub mod archive;
pub mod backoff;
pub mod consumer;
pub mod due;
pub mod lag;
pub mod metrics;
pub mod projection;
pub mod reaper;
pub mod rebuild;
pub mod script;
pub mod settings;
pub mod stream;

use std::sync::Arc;

use iot_service::Status;
use iot_service::startup::Context;
use tokio::net::TcpListener;
use tracing::Instrument;

pub use projection::Projection;
pub use rebuild::{RebuildSummary, rebuild};
pub use settings::Settings;

/// The service's default HTTP port (`http.listen` empty).
pub const DEFAULT_HTTP_PORT: u16 = 9101;

/// Runs the service until `ctx.shutdown` is cancelled: the consumer, the due
/// loop, the reaper, the lag publisher and the HTTP endpoints.
pub async fn run(ctx: Context, http: TcpListener) -> anyhow::Result<()> {
    metrics::describe();
    let settings = Arc::new(Settings::from_config(&ctx.config, &ctx.server_id));
    let projection = Arc::new(Projection::new(settings.clone()));
    ctx.health
        .set(consumer::HEALTH_CHECK, Status::Ok, None, None);
    let span = tracing::info_span!("projector", consumer = %settings.consumer);

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(
        consumer::Consumer::new(
            projection.clone(),
            ctx.redis.clone(),
            ctx.health.clone(),
            ctx.shutdown.clone(),
        )
        .run()
        .instrument(span.clone()),
    );
    tasks.spawn(
        due::run(projection.clone(), ctx.redis.clone(), ctx.shutdown.clone())
            .instrument(span.clone()),
    );
    tasks.spawn(
        reaper::run(
            reaper::Reaper::new(settings.clone(), settings.consumer.clone()),
            ctx.redis.clone(),
            ctx.shutdown.clone(),
        )
        .instrument(span.clone()),
    );
    tasks.spawn(
        lag::run(settings.clone(), ctx.redis.clone(), ctx.shutdown.clone())
            .instrument(span.clone()),
    );

    if let Err(e) = archive::spawn(&ctx, &settings, &mut tasks).await {
        ctx.shutdown.cancel();
        while tasks.join_next().await.is_some() {}
        return Err(e);
    }

    let router = ctx.base_router("projector");
    tracing::info!(server_id = %ctx.server_id, consumer = %settings.consumer,
        shards = settings.shards, http = %http.local_addr()?, "iot-projector started");
    let served = iot_service::http::serve(http, router, ctx.shutdown.clone()).await;
    // The HTTP server ends on shutdown (or on an error: stop the rest too).
    ctx.shutdown.cancel();
    while let Some(r) = tasks.join_next().await {
        if let Err(e) = r {
            tracing::error!(error = %e, "a projector task failed");
        }
    }
    served?;
    tracing::info!("iot-projector stopped");
    Ok(())
}
