//! Ingest: the MQTT device gateway that writes the event log.
//!
//! # Layout
//!
//! - [`run`]: the service, given its context and listeners.

use iot_service::startup::Context;
use tokio::net::TcpListener;

/// The service's default HTTP port (`http.listen` empty).
pub const DEFAULT_HTTP_PORT: u16 = 9100;

/// Runs the service until `ctx.shutdown` is cancelled.
pub async fn run(ctx: Context, http: TcpListener) -> anyhow::Result<()> {
    let router = ctx.base_router("ingest");
    tracing::info!(server_id = %ctx.server_id, http = %http.local_addr()?, "iot-ingest started");
    iot_service::http::serve(http, router, ctx.shutdown.clone()).await?;
    tracing::info!("iot-ingest stopped");
    Ok(())
}
