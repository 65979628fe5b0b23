//! `iot-api`: REST API: presence queries, downlink commands, device
//! registry and history, health and metrics; `iot-api migrate` applies the
//! PostgreSQL migrations.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use iot_service::cli::CommonArgs;
use iot_service::startup::{Context, bind, main_with};

/// REST API: presence queries, downlink commands, device registry and history, health and metrics.
#[derive(Debug, Parser)]
#[command(name = "iot-api", version, about)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Apply the PostgreSQL migrations not applied yet (database.url or
    /// DATABASE_URL), print how many ran, and exit. Needs no Redis.
    Migrate,
}

fn main() -> ExitCode {
    let cli: Cli = iot_service::cli::parse();
    main_with(
        cli.common.config.as_deref(),
        |config, shutdown| async move {
            match cli.command {
                Some(Command::Migrate) => {
                    let done = api::database::migrate(&config.database)
                        .await
                        .map_err(|e| anyhow::anyhow!("iot-api migrate: {e}"))?;
                    println!("{done}");
                    Ok(())
                }
                None => {
                    let http_addr = config
                        .http
                        .listen_addr(api::DEFAULT_HTTP_PORT)
                        .map_err(anyhow::Error::msg)?;
                    let ctx = Context::start(config, shutdown).await?;
                    let http = bind(http_addr, "http.listen").await?;
                    api::run(ctx, http).await
                }
            }
        },
    )
}
