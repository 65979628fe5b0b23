//! `iot-projector`: turns the event streams into session views, the online
//! index and the lifecycle stream; `iot-projector rebuild` re-derives them.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use iot_service::cli::CommonArgs;
use iot_service::startup::{Context, bind, main_with};

/// Projector: turns the event streams into session views, the online index and the lifecycle stream.
#[derive(Debug, Parser)]
#[command(name = "iot-projector", version, about)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Re-derive every session view and index from what the event streams
    /// still hold, then exit (safe while projectors run).
    Rebuild {
        /// Delete the views, their connection keys and the shard indexes
        /// first, for a clean rebuild (no lifecycle entries are written).
        #[arg(long)]
        reset: bool,
    },
}

fn main() -> ExitCode {
    let cli: Cli = iot_service::cli::parse();
    main_with(
        cli.common.config.as_deref(),
        |config, shutdown| async move {
            match cli.command {
                Some(Command::Rebuild { reset }) => {
                    let ctx = Context::start(config, shutdown).await?;
                    let summary = projector::rebuild(&ctx, reset).await?;
                    println!("{summary}");
                    Ok(())
                }
                None => {
                    let http_addr = config
                        .http
                        .listen_addr(projector::DEFAULT_HTTP_PORT)
                        .map_err(anyhow::Error::msg)?;
                    let ctx = Context::start(config, shutdown).await?;
                    let http = bind(http_addr, "http.listen").await?;
                    projector::run(ctx, http).await
                }
            }
        },
    )
}
