//! `iot-sim`: the device simulator. See `iot-sim --help` and
//! `loadtests::sim`.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use loadtests::sim::{self, SimConfig, worker};

/// Simulates N MQTT devices against loopback targets (ingest instances or
/// any MQTT broker): connect rate, keepalive pings, uplinks, downlink
/// acknowledgement (at once, late or never), flapping and takeovers. Spreads
/// connections over 127.0.0.x source addresses and over worker processes,
/// prints progress every second on stderr, stops by itself after
/// --duration, and prints a summary plus (with --report) a JSON report with
/// latency percentiles.
#[derive(Debug, Parser)]
#[command(name = "iot-sim", version)]
struct Cli {
    #[command(flatten)]
    sim: SimConfig,

    /// Write the JSON report here (`-` for stdout).
    #[arg(long)]
    report: Option<PathBuf>,

    /// No progress lines.
    #[arg(long, short = 'q')]
    quiet: bool,
}

fn main() -> anyhow::Result<()> {
    // A worker reads its slice from stdin; it has no other arguments.
    let worker_mode = std::env::args().nth(1).as_deref() == Some(worker::WORKER_FLAG);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    if worker_mode {
        let result = runtime.block_on(worker::run_child());
        // Do not wait for the stdin reader thread: the report is written.
        runtime.shutdown_timeout(std::time::Duration::from_secs(1));
        return result;
    }
    let cli = Cli::parse();
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let handle = sim::start(cli.sim).await?;
    let printer = (!cli.quiet).then(|| sim::print_progress(handle.subscribe()));
    let stopper = {
        let stop = handle.stop_token();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("iot-sim: interrupted, devices are leaving");
                stop.cancel();
            }
        })
    };
    let outcome = handle.finish().await?;
    stopper.abort();
    if let Some(p) = printer {
        let _ = p.await;
    }
    print!("{}", outcome.report.summary());
    if let Some(path) = cli.report {
        loadtests::bench_report::write_json(&path, &outcome.report)?;
    }
    Ok(())
}
