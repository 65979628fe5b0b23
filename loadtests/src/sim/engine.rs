//! The devices of one process: spawns them at the connect rate, spreads
//! them over targets and source addresses, and waits for them to leave.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use crate::sim::config::SimConfig;
use crate::sim::device::{Device, DeviceCtx};
use crate::sim::stats::Stats;
use crate::sim::truth::TruthLog;

/// How long devices get to leave after the run is cancelled before their
/// tasks are aborted.
const LEAVE_GRACE: Duration = Duration::from_secs(10);

/// Runs `config.devices` devices (indices `first_device..`) until `cancel`
/// fires, then waits for them to leave.
///
/// Device `i` connects to `targets[i % targets.len()]` from source address
/// `k % addrs.len()` of this process's list (`k`: its position in the slice).
pub async fn run_devices(
    config: Arc<SimConfig>,
    targets: Arc<[SocketAddr]>,
    stats: Arc<Stats>,
    truth: TruthLog,
    cancel: CancellationToken,
) {
    let ctx = Arc::new(DeviceCtx {
        config: config.clone(),
        stats,
        truth,
        cancel: cancel.clone(),
        connect_permits: Semaphore::new(config.max_pending_connects as usize),
        targets: targets.clone(),
    });
    let mut devices = JoinSet::new();
    let start = Instant::now();
    let addrs = &config.source_addrs.0;
    for k in 0..config.devices {
        if cancel.is_cancelled() {
            break;
        }
        if config.connect_rate > 0.0 {
            let at = start + Duration::from_secs_f64(f64::from(k) / config.connect_rate);
            if at > Instant::now() {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = sleep_until(at) => {}
                }
            }
        } else if k % 256 == 0 {
            // Unpaced: let the devices already spawned make progress.
            tokio::task::yield_now().await;
        }
        let index = config.first_device + k;
        if targets.is_empty() {
            break;
        }
        let target = index as usize % targets.len();
        let source = (!addrs.is_empty()).then(|| addrs[k as usize % addrs.len()]);
        match Device::new(index, target, source, ctx.clone()) {
            Ok(device) => {
                devices.spawn(device.run());
            }
            // The config was validated, so phyIDs and topics are valid MQTT
            // strings; a failure here would be a bug worth seeing.
            Err(e) => eprintln!("iot-sim: device {index} cannot be built: {e}"),
        }
    }
    cancel.cancelled().await;
    let left = tokio::time::timeout(LEAVE_GRACE, async {
        while devices.join_next().await.is_some() {}
    })
    .await;
    if left.is_err() {
        devices.abort_all();
        while devices.join_next().await.is_some() {}
    }
}
