//! The device simulator: N MQTT devices on raw sockets, in this process or
//! spread over worker processes.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use loadtests::sim::{self, SimConfig};
//! let handle = sim::start(SimConfig { devices: 100, ..SimConfig::default() }).await?;
//! handle.wait_for(std::time::Duration::from_secs(30), |p| p.all_connected()).await;
//! let outcome = handle.finish().await?;
//! println!("{}", outcome.report.summary());
//! # Ok(()) }
//! ```
//!
//! Scenario code drives a run through [`SimHandle`]: it watches the
//! [`Progress`], reads the [`GroundTruth`] while the run goes on (to compare
//! with what the api answers), stops the run when its measurement is done,
//! and gets the merged [`SimReport`].

pub mod config;
pub mod device;
pub mod engine;
pub mod report;
pub mod roles;
pub mod stats;
pub mod truth;
pub mod worker;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::SimConfig;
pub use report::SimReport;
pub use stats::Progress;
pub use truth::{GroundTruth, TruthKind, TruthRecord, TruthTap};

/// Open files a process needs besides its device sockets.
const FD_RESERVE: u64 = 64;

/// Raises the soft open-file limit to the hard limit; returns the new soft
/// limit (or the old one if raising failed). Child processes inherit it.
pub fn raise_fd_limit() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => n,
        Err(_) => rlimit::getrlimit(rlimit::Resource::NOFILE)
            .map(|(soft, _)| soft)
            .unwrap_or(1024),
    }
}

/// Resolves the targets of `config`, refusing anything but loopback.
pub fn resolve_targets(config: &SimConfig) -> anyhow::Result<Arc<[SocketAddr]>> {
    let mut out = Vec::with_capacity(config.targets.len());
    for t in &config.targets {
        out.push(crate::loopback::resolve_loopback(t)?);
    }
    Ok(out.into())
}

/// A finished run: the report and everything the devices did.
#[derive(Debug)]
pub struct SimOutcome {
    /// The (merged) report.
    pub report: SimReport,
    /// The ground truth, sorted by time.
    pub truth: GroundTruth,
}

/// A running simulation.
#[derive(Debug)]
pub struct SimHandle {
    progress: watch::Receiver<Progress>,
    truth: Arc<Mutex<GroundTruth>>,
    pids: Arc<Mutex<Vec<u32>>>,
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<SimReport>>,
}

/// Starts a run: validates the options, resolves the targets (loopback
/// only), raises the open-file limit and starts the devices, in this
/// process or in worker processes (see [`SimConfig::worker_count`]).
pub async fn start(config: SimConfig) -> anyhow::Result<SimHandle> {
    start_with_tap(config, None).await
}

/// [`start`], with a live feed of ground-truth records: in this process a
/// record reaches `tap` the moment the device makes it; from worker
/// processes up to one progress tick (250 ms) later.
pub async fn start_with_tap(config: SimConfig, tap: Option<TruthTap>) -> anyhow::Result<SimHandle> {
    config.validate()?;
    let targets = resolve_targets(&config)?;
    let fd_limit = raise_fd_limit();
    let workers = config.worker_count();
    let (tx, rx) = watch::channel(Progress {
        devices: u64::from(config.devices),
        ..Progress::default()
    });
    let truth = Arc::new(Mutex::new(GroundTruth::new()));
    let pids = Arc::new(Mutex::new(Vec::new()));
    let stop = CancellationToken::new();
    let task = if workers <= 1 {
        // Takeover devices hold two sockets for a moment.
        let needed = (f64::from(config.devices) * (1.0 + config.takeover_fraction)).ceil() as u64;
        if needed + FD_RESERVE > fd_limit {
            bail!(
                "{} devices need about {} open files but this process may open {fd_limit}; use --workers (or --devices-per-worker) to spread them over processes",
                config.devices,
                needed + FD_RESERVE
            );
        }
        let truth = truth.clone();
        let stop = stop.clone();
        pids.lock().push(std::process::id());
        tokio::spawn(async move {
            let report = worker::drive_local(config, targets, stop, tap, |p, records| {
                tx.send_replace(p);
                if !records.is_empty() {
                    truth.lock().extend(records);
                }
            })
            .await;
            Ok(report)
        })
    } else {
        worker::worker_exe(&config)?;
        tokio::spawn(worker::drive_workers(
            config,
            workers,
            stop.clone(),
            tx,
            worker::WorkerShared {
                truth: truth.clone(),
                tap,
                pids: pids.clone(),
            },
        ))
    };
    Ok(SimHandle {
        progress: rx,
        truth,
        pids,
        stop,
        task,
    })
}

impl SimHandle {
    /// The latest progress.
    pub fn progress(&self) -> Progress {
        self.progress.borrow().clone()
    }

    /// A receiver of progress updates (every 250 ms).
    pub fn subscribe(&self) -> watch::Receiver<Progress> {
        self.progress.clone()
    }

    /// The ground truth collected so far (shared; it grows while the run
    /// goes on).
    pub fn truth(&self) -> Arc<Mutex<GroundTruth>> {
        self.truth.clone()
    }

    /// The processes running the devices (this process for an in-process
    /// run, else the workers started so far), for CPU and memory figures.
    pub fn pids(&self) -> Vec<u32> {
        self.pids.lock().clone()
    }

    /// Asks the run to end now: devices leave (DISCONNECT with `--end
    /// clean`) and the report is built.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// A token that stops the run when cancelled (for signal handlers).
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Waits until `done` holds for the progress, or `limit` passes, or the
    /// run ends; returns the last progress seen and whether `done` held.
    pub async fn wait_for(
        &self,
        limit: Duration,
        done: impl Fn(&Progress) -> bool,
    ) -> (Progress, bool) {
        let mut rx = self.progress.clone();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let p = rx.borrow_and_update().clone();
            if done(&p) {
                return (p, true);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => {
                    let p = rx.borrow().clone();
                    let ok = done(&p);
                    return (p, ok);
                }
            }
        }
    }

    /// Waits for the run to end (by its duration, [`stop`](Self::stop) or
    /// `--stop-when-connected`) and returns the report and the ground truth.
    pub async fn finish(self) -> anyhow::Result<SimOutcome> {
        let report = self
            .task
            .await
            .context("the simulator task panicked or was cancelled")??;
        let mut truth = std::mem::take(&mut *self.truth.lock());
        truth.sort();
        Ok(SimOutcome { report, truth })
    }
}

/// Prints one progress line per second on stderr until the run ends.
pub fn print_progress(mut rx: watch::Receiver<Progress>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut previous = Progress::default();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                changed = rx.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    continue;
                }
            }
            let now = rx.borrow().clone();
            eprintln!("{}", now.line(&previous));
            previous = now;
        }
    })
}
