//! `iot-api`: REST API: presence queries, health and metrics.

use std::process::ExitCode;

use clap::Parser;
use iot_service::cli::CommonArgs;
use iot_service::startup::{Context, bind, main_with};

/// REST API: presence queries, health and metrics.
#[derive(Debug, Parser)]
#[command(name = "iot-api", version, about)]
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
                .listen_addr(api::DEFAULT_HTTP_PORT)
                .map_err(anyhow::Error::msg)?;
            let ctx = Context::start(config, shutdown).await?;
            let http = bind(http_addr, "http.listen").await?;
            api::run(ctx, http).await
        },
    )
}
