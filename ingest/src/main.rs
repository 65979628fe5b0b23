//! `iot-ingest`: Ingest: the MQTT device gateway that writes the event log.

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
            let ctx = Context::start(config, shutdown).await?;
            let http = bind(http_addr, "http.listen").await?;
            ingest::run(ctx, http).await
        },
    )
}
