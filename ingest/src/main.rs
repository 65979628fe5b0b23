//! `iot-ingest`: Ingest: the MQTT device gateway that writes the event log.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use iot_service::cli::CommonArgs;
use iot_service::startup::{Context, bind, main_with};

/// Ingest: the MQTT device gateway that writes the event log.
#[derive(Debug, Parser)]
#[command(name = "iot-ingest", version, about)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> ExitCode {
    let cli: Cli = iot_service::cli::parse();
    main_with(
        cli.common.config.as_deref(),
        |config, shutdown| async move {
            let http_addr = config
                .http
                .listen_addr(ingest::DEFAULT_HTTP_PORT)
                .map_err(anyhow::Error::msg)?;
            let mqtt_addr: SocketAddr = config.mqtt.listen.trim().parse().map_err(|e| {
                anyhow::anyhow!(
                    "mqtt.listen {:?} is not host:port ({e})",
                    config.mqtt.listen
                )
            })?;
            let ctx = Context::start(config, shutdown).await?;
            let mqtt = ingest::server::bind(mqtt_addr)
                .map_err(|e| anyhow::anyhow!("cannot listen on {mqtt_addr} (mqtt.listen): {e}"))?;
            let http = bind(http_addr, "http.listen").await?;
            ingest::run(ctx, mqtt, http).await
        },
    )
}
