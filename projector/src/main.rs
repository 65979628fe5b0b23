//! `iot-projector`: Projector: turns the event streams into session views, the online index and the lifecycle stream.

use std::process::ExitCode;

use clap::Parser;
use iot_service::cli::CommonArgs;
use iot_service::startup::{Context, bind, main_with};

/// Projector: turns the event streams into session views, the online index and the lifecycle stream.
#[derive(Debug, Parser)]
#[command(name = "iot-projector", version, about)]
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
                .listen_addr(projector::DEFAULT_HTTP_PORT)
                .map_err(anyhow::Error::msg)?;
            let ctx = Context::start(config, shutdown).await?;
            let http = bind(http_addr, "http.listen").await?;
            projector::run(ctx, http).await
        },
    )
}
