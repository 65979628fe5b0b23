//! Work that runs beside the projection in the projector process: the
//! PostgreSQL archiver (when `database.url` is set) and the downlink command
//! sweeper. Both are crash-only consumers of Redis like the projection, so
//! they live with it rather than in a process of their own.

use std::time::Duration;

use iot_downlink::{CommandStore, Settings as DownlinkSettings};
use iot_service::startup::Context;
use iot_store::Store;
use iot_store::archiver::{self, ArchiverOptions};

use crate::settings::Settings;

/// Name of the archive's health check.
pub const HEALTH_CHECK: &str = "archive";

/// How often the sweeper looks for commands nobody else will decide.
const SWEEP_INTERVAL: Duration = Duration::from_millis(500);

/// Spawns the archiver (if PostgreSQL is configured) and the command sweeper
/// on `tasks`. Fails only when PostgreSQL answers with a schema that lacks
/// migrations (an operator error to fix, said clearly); an unreachable
/// database only delays the archive.
pub async fn spawn(
    ctx: &Context,
    settings: &Settings,
    tasks: &mut tokio::task::JoinSet<()>,
) -> anyhow::Result<()> {
    let commands = CommandStore::new(
        ctx.redis.clone(),
        ctx.config.keys(),
        DownlinkSettings::from_config(&ctx.config),
    );
    tasks.spawn(iot_downlink::sweeper::run(
        commands,
        SWEEP_INTERVAL,
        ctx.shutdown.clone(),
    ));

    if ctx.config.database.url.trim().is_empty() {
        tracing::info!("database.url is empty: no PostgreSQL archive");
        return Ok(());
    }
    let store = Store::connect_lazy(&ctx.config.database)?;
    store.check_at_start(&ctx.health, HEALTH_CHECK).await?;
    let opts = ArchiverOptions {
        keys: ctx.config.keys(),
        shards: settings.shards,
        consumer: settings.consumer.clone(),
        batch: ctx.config.projector.batch_size as usize,
        block: ctx.config.projector.block,
        claim_idle: ctx.config.projector.claim_idle,
        maintenance_interval: ctx.config.projector.claim_interval,
    };
    tasks.spawn(archiver::run(
        ctx.redis.clone(),
        store,
        ctx.health.clone(),
        opts,
        ctx.shutdown.clone(),
    ));
    Ok(())
}
