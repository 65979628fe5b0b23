//! Worker processes: how one run spreads over several processes.
//!
//! A process may hold at most `ulimit -Hn` (20,000 here) open files, so a
//! run of more devices re-executes `iot-sim --worker` K times. The parent
//! writes each child one line of JSON on stdin (a [`WorkerSpec`]: its slice
//! of devices, connect rate and source addresses) and keeps stdin open;
//! closing it tells the child to stop (so a dying parent never leaves
//! children behind). Each child writes JSON lines on stdout
//! ([`WorkerMessage`]): progress every 250 ms, ground-truth records as they
//! come, and its report at the end. The parent merges them into one
//! progress, one ground truth and one report.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior, interval, sleep_until, timeout};
use tokio_util::sync::CancellationToken;

use crate::sim::config::SimConfig;
use crate::sim::engine::run_devices;
use crate::sim::report::SimReport;
use crate::sim::stats::{Progress, Stats};
use crate::sim::truth::{GroundTruth, TruthLog, TruthRecord, TruthTap};

/// How often progress is sampled (and sent by workers).
pub const TICK: Duration = Duration::from_millis(250);

/// Most truth records in one worker message line.
const TRUTH_BATCH: usize = 20_000;

/// Extra time the parent gives workers past the run's duration to report.
const REPORT_GRACE: Duration = Duration::from_secs(30);

/// The hidden flag that makes `iot-sim` a worker.
pub const WORKER_FLAG: &str = "--worker";

/// What the parent sends a worker: its slice of the run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSpec {
    /// Worker number, from 0.
    pub index: u32,
    /// The slice (see [`SimConfig::slice`]).
    pub config: SimConfig,
}

/// One line a worker writes on stdout.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WorkerMessage {
    /// Cumulative counters.
    Progress {
        /// The snapshot.
        progress: Progress,
    },
    /// Ground-truth records since the last message.
    Truth {
        /// The records.
        records: Vec<TruthRecord>,
    },
    /// The final report (the last line).
    Report {
        /// The report.
        report: Box<SimReport>,
    },
}

/// Runs the devices of `config` in this process until the duration passes,
/// `stop` fires, or (with `stop_when_connected`) every device has connected;
/// calls `on_tick` every [`TICK`] with the progress and the new truth
/// records, and once more at the end.
///
/// `tap` receives every ground-truth record the moment a device makes it.
pub async fn drive_local(
    config: SimConfig,
    targets: Arc<[SocketAddr]>,
    stop: CancellationToken,
    tap: Option<TruthTap>,
    mut on_tick: impl FnMut(Progress, Vec<TruthRecord>),
) -> SimReport {
    let started_ms = iot_core::time::now_ms();
    let started = Instant::now();
    let deadline = started + config.duration;
    let config = Arc::new(config);
    let stats = Arc::new(Stats::new(config.devices));
    let truth = TruthLog::with_tap(tap);
    let run = CancellationToken::new();
    let engine = tokio::spawn(run_devices(
        config.clone(),
        targets,
        stats.clone(),
        truth.clone(),
        run.clone(),
    ));
    let mut tick = interval(TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut max_connected = 0;
    let mut truth_records = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => {}
            _ = sleep_until(deadline) => {}
        }
        let p = stats.progress(started.elapsed());
        max_connected = max_connected.max(p.connected_now);
        let end = stop.is_cancelled()
            || Instant::now() >= deadline
            || (config.stop_when_connected && p.all_connected());
        let records = truth.drain();
        truth_records += records.len() as u64;
        on_tick(p, records);
        if end {
            break;
        }
    }
    run.cancel();
    let _ = engine.await;
    let p = stats.progress(started.elapsed());
    let records = truth.drain();
    truth_records += records.len() as u64;
    on_tick(p, records);
    SimReport::from_stats(
        &config,
        &stats,
        started_ms,
        started.elapsed().as_secs_f64(),
        max_connected,
        truth_records,
    )
}

/// The worker side: reads the spec from stdin, runs, reports on stdout.
pub async fn run_child() -> anyhow::Result<()> {
    crate::sim::raise_fd_limit();
    let mut stdin = BufReader::new(tokio::io::stdin());
    let mut line = String::new();
    stdin
        .read_line(&mut line)
        .await
        .context("reading the worker spec from stdin")?;
    let spec: WorkerSpec = serde_json::from_str(&line).context(
        "the first stdin line is not a worker spec (iot-sim --worker is started by iot-sim itself)",
    )?;
    let targets = crate::sim::resolve_targets(&spec.config)?;
    // Ctrl-C reaches the whole process group: the parent handles it and
    // closes our stdin, so that we still send our report.
    tokio::spawn(async { while tokio::signal::ctrl_c().await.is_ok() {} });
    let stop = CancellationToken::new();
    let on_eof = stop.clone();
    tokio::spawn(async move {
        // The parent closes stdin to stop us (or by dying).
        let mut rest = Vec::new();
        let _ = stdin.read_to_end(&mut rest).await;
        on_eof.cancel();
    });
    let report = drive_local(spec.config, targets, stop, None, |progress, records| {
        emit(&WorkerMessage::Progress { progress });
        for chunk in records.chunks(TRUTH_BATCH) {
            emit(&WorkerMessage::Truth {
                records: chunk.to_vec(),
            });
        }
    })
    .await;
    emit(&WorkerMessage::Report {
        report: Box::new(report),
    });
    Ok(())
}

fn emit(msg: &WorkerMessage) {
    use std::io::Write;
    if let Ok(line) = serde_json::to_string(msg) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

/// Finds the `iot-sim` executable for workers: `--worker-exe`, this binary
/// if it is `iot-sim`, or `iot-sim` beside it (or one level up, for test
/// binaries in `target/*/deps`).
pub fn worker_exe(config: &SimConfig) -> anyhow::Result<PathBuf> {
    if let Some(p) = &config.worker_exe {
        return Ok(p.clone());
    }
    let me = std::env::current_exe().context("cannot find the running executable")?;
    if me.file_stem().and_then(|s| s.to_str()) == Some("iot-sim") {
        return Ok(me);
    }
    let dir = me.parent().unwrap_or(Path::new("."));
    for candidate in [dir.join("iot-sim"), dir.join("..").join("iot-sim")] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "cannot find the iot-sim binary beside {}; build it (cargo build --release -p loadtests) or pass --worker-exe",
        me.display()
    )
}

struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
}

/// What the parent shares with the code that drives a multi-process run.
#[derive(Debug, Clone, Default)]
pub struct WorkerShared {
    /// The ground truth, merged as records arrive.
    pub truth: Arc<Mutex<GroundTruth>>,
    /// Offered every record as it arrives from a worker (up to one [`TICK`]
    /// after the device made it).
    pub tap: Option<TruthTap>,
    /// Process ids of the running workers.
    pub pids: Arc<Mutex<Vec<u32>>>,
}

/// The parent side: runs `config` over `n` worker processes, publishing the
/// merged progress on `progress` and the ground truth into `shared.truth`.
pub async fn drive_workers(
    config: SimConfig,
    n: u32,
    stop: CancellationToken,
    progress: watch::Sender<Progress>,
    shared: WorkerShared,
) -> anyhow::Result<SimReport> {
    let truth = shared.truth.clone();
    let exe = worker_exe(&config)?;
    let started_ms = iot_core::time::now_ms();
    let started = Instant::now();
    let deadline = started + config.duration;
    let (tx, mut rx) = mpsc::channel::<(usize, WorkerMessage)>(1024);
    let mut workers = Vec::new();
    for k in 0..n {
        let spec = WorkerSpec {
            index: k,
            config: config.slice(k, n),
        };
        let mut child = Command::new(&exe)
            .arg(WORKER_FLAG)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start worker {k} ({})", exe.display()))?;
        if let Some(pid) = child.id() {
            shared.pids.lock().push(pid);
        }
        let mut stdin = child
            .stdin
            .take()
            .ok_or_else(|| anyhow!("worker {k} has no stdin"))?;
        let mut line = serde_json::to_string(&spec)?;
        line.push('\n');
        stdin
            .write_all(line.as_bytes())
            .await
            .with_context(|| format!("cannot send worker {k} its spec"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("worker {k} has no stdout"))?;
        let tx = tx.clone();
        let slot = k as usize;
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<WorkerMessage>(&line) {
                    Ok(msg) => {
                        if tx.send((slot, msg)).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => eprintln!("iot-sim: worker {slot} wrote an unreadable line: {e}"),
                }
            }
        });
        workers.push(Worker {
            child,
            stdin: Some(stdin),
        });
    }
    drop(tx);

    let mut parts = vec![Progress::default(); n as usize];
    let mut reports: Vec<Option<SimReport>> = vec![None; n as usize];
    let mut max_connected = 0;
    let mut stopping = false;
    let mut tick = interval(TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let hard_deadline = deadline + REPORT_GRACE;
    loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                Some((k, WorkerMessage::Progress { progress })) => parts[k] = progress,
                Some((_, WorkerMessage::Truth { records })) => {
                    if let Some(tap) = &shared.tap {
                        for r in &records {
                            tap.offer(*r);
                        }
                    }
                    truth.lock().extend(records);
                }
                Some((k, WorkerMessage::Report { report })) => {
                    parts[k].workers_done = 1;
                    reports[k] = Some(*report);
                    workers[k].stdin = None;
                }
                None => break,
            },
            _ = tick.tick() => {}
            _ = stop.cancelled(), if !stopping => {}
            _ = sleep_until(hard_deadline) => {
                eprintln!("iot-sim: workers did not report within {REPORT_GRACE:?} after the run; killing them");
                break;
            }
        }
        let mut merged = Progress::merge(&parts);
        merged.elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        max_connected = max_connected.max(merged.connected_now);
        if !stopping
            && (stop.is_cancelled()
                || Instant::now() >= deadline
                || (config.stop_when_connected && merged.all_connected()))
        {
            stopping = true;
            for w in &mut workers {
                w.stdin = None;
            }
        }
        progress.send_replace(merged);
    }
    for (k, w) in workers.iter_mut().enumerate() {
        w.stdin = None;
        match timeout(Duration::from_secs(15), w.child.wait()).await {
            Ok(Ok(status)) if !status.success() && reports[k].is_none() => {
                eprintln!("iot-sim: worker {k} exited with {status}");
            }
            Ok(_) => {}
            Err(_) => {
                let _ = w.child.kill().await;
            }
        }
    }
    let missing: Vec<usize> = (0..reports.len())
        .filter(|k| reports[*k].is_none())
        .collect();
    if !missing.is_empty() {
        bail!("worker(s) {missing:?} ended without a report (see their errors above)");
    }
    let reports: Vec<SimReport> = reports.into_iter().flatten().collect();
    Ok(SimReport::merge(
        &config,
        &reports,
        started_ms,
        started.elapsed().as_secs_f64(),
        max_connected,
    ))
}
