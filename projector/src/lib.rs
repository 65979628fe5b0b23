//! Projector: turns the event streams into session views, the online index and the lifecycle stream.
//!
//! # Layout
//!
//! - [`run`]: the service, given its context and listeners.

use iot_service::startup::Context;
use tokio::net::TcpListener;

/// The service's default HTTP port (`http.listen` empty).
pub const DEFAULT_HTTP_PORT: u16 = 9101;

/// Runs the service until `ctx.shutdown` is cancelled.
pub async fn run(ctx: Context, http: TcpListener) -> anyhow::Result<()> {
    let router = ctx.base_router("projector");
    tracing::info!(server_id = %ctx.server_id, http = %http.local_addr()?, "iot-projector started");
    iot_service::http::serve(http, router, ctx.shutdown.clone()).await?;
    tracing::info!("iot-projector stopped");
    Ok(())
}
