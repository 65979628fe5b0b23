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
        /// How far back the PostgreSQL archive is replayed (when
        /// database.url is set) for what the streams no longer hold, like
        /// `2h`; default: the session time-to-live (2 x heartbeat timeout).
        #[arg(long, value_name = "DURATION", value_parser = iot_core::config::duration::parse)]
        archive_since: Option<std::time::Duration>,
        /// Use only the streams, even when PostgreSQL is configured.
        #[arg(long)]
        no_archive: bool,
    },
}

fn main() -> ExitCode {
    let cli: Cli = iot_service::cli::parse();
    main_with(
        cli.common.config.as_deref(),
        |config, shutdown| async move {
            match cli.command {
                Some(Command::Rebuild {
                    reset,
                    archive_since,
                    no_archive,
                }) => {
                    let archive = if no_archive || config.database.url.trim().is_empty() {
                        None
                    } else {
                        let store = iot_store::Store::connect(&config.database).await?;
                        store.check_schema().await?;
                        Some(projector::rebuild::ArchiveSource {
                            store,
                            since: archive_since.unwrap_or_else(|| config.session_ttl()),
                        })
                    };
                    let ctx = Context::start(config, shutdown).await?;
                    let summary = projector::rebuild(&ctx, reset, archive).await?;
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
