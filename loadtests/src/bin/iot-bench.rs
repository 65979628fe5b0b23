//! `iot-bench`: baselines and scenarios, each one bounded command. See
//! `iot-bench --help` and `loadtests::bench_cli`.

use clap::Parser;
use loadtests::bench_cli::{self, BenchCommand};

/// Benchmarks of the IoT session server and the baselines it is compared
/// with. Each subcommand is bounded in time, prints a summary and, with
/// --report FILE, writes a JSON report (machine, date, command, figures).
/// Only loopback targets are accepted.
#[derive(Debug, Parser)]
#[command(name = "iot-bench", version)]
struct Cli {
    #[command(subcommand)]
    command: BenchCommand,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    bench_cli::run(cli.command).await
}
