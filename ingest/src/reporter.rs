//! The downlink reporter: writes what the connections decide about commands
//! (sent, acked, timed out, back to the queue, ...) to the command records
//! in Redis, and does the Redis work a connection needs for its queue.
//!
//! A connection never waits for Redis on its packet loop: it hands a
//! [`Report`] to [`ReporterHandle::report`], which never blocks. Behind it
//! run a few lanes, each one task with a bounded channel; a job's lane
//! follows from its device (the same hash as the stream shards), so the
//! changes of one command, and the queue operations of one device, are
//! applied in the order they were decided, while different devices proceed
//! side by side over the multiplexed Redis connection. One task per lane
//! instead of a task per change: no spawn per PUBACK, and a natural order.
//!
//! When a lane's channel is full (Redis far behind), the job runs in a task
//! of its own (counted), up to [`OVERFLOW_TASKS`] at once: only the order
//! under overload is given up, and the command state machine's
//! compare-and-set keeps a late change from overwriting a verdict. Beyond
//! that bound a job is shed, counted (`iot_downlink_reports_shed_total`)
//! and logged: memory stays bounded however far Redis falls behind, and the
//! sweeper resolves those commands later, as it does for a change that
//! cannot be written (Redis down, timeout; logged and counted). At shutdown
//! the lanes finish what was handed to them, within the grace period.
//!
//! Every verdict carries the connection that decided it (this instance and
//! the connection's epoch): the state machine refuses it as stale when the
//! command has been dispatched elsewhere meanwhile (counted in
//! `iot_downlink_stale_verdicts_total`, logged at debug).

use std::sync::Arc;
use std::time::Duration;

use iot_core::control::Control;
use iot_core::{PhyId, ServerId};
use iot_downlink::command::field;
use iot_downlink::route::{self, Location};
use iot_downlink::{CommandStore, FailReason, Outcome, Refusal, Status, Transition};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use uuid::Uuid;

use crate::downlink::{Delivery, Mail};
use crate::registry::Registry;

/// Number of lanes.
pub const LANES: u16 = 4;
/// Jobs waiting per lane before jobs run in tasks of their own.
pub const LANE_CAPACITY: usize = 4096;
/// Jobs running in tasks of their own at once (lanes full); more are shed.
pub const OVERFLOW_TASKS: usize = 1024;

/// A state change of a command, or queue work, for one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// Written to the device: `sent` (attempt 1, from dispatched or queued)
    /// or retransmitted (attempt 2); also where a command held here stands
    /// when it is dispatched here again.
    Sent {
        /// Command id.
        id: Uuid,
        /// Transmissions so far.
        attempts: u32,
        /// The first transmission, ms.
        sent_at_ms: i64,
        /// When, ms.
        at_ms: i64,
    },
    /// The device's PUBACK: `acked`.
    Acked {
        /// Command id.
        id: Uuid,
        /// When, ms.
        at_ms: i64,
    },
    /// No PUBACK after the retransmission: `timed_out`.
    TimedOut {
        /// Command id.
        id: Uuid,
        /// When, ms.
        at_ms: i64,
    },
    /// Its time-to-live passed before it was sent: `expired`.
    Expired {
        /// Command id.
        id: Uuid,
        /// When, ms.
        at_ms: i64,
    },
    /// It cannot be delivered: `failed` with the reason.
    Failed {
        /// Command id.
        id: Uuid,
        /// Why.
        reason: FailReason,
        /// When, ms.
        at_ms: i64,
        /// Only if it still waits in the device's queue (taken out of it
        /// first; a drain that took it first wins).
        only_queued: bool,
    },
    /// Waiting here for a place under the inflight limit. Dispatched:
    /// noted in its log (which also tells the sweeper it is not stuck).
    /// Taken from the queue (still `queued`): its sweeper deadline moves
    /// on, so that the sweeper does not take it for lost by a dead drain.
    Waiting {
        /// Command id.
        id: Uuid,
        /// When, ms.
        at_ms: i64,
    },
    /// The device does not listen on its topic: to the tail of the queue,
    /// delivered after a matching SUBSCRIBE.
    Park {
        /// Command id.
        id: Uuid,
        /// Its name (a connection that subscribes meanwhile drains it).
        name: String,
        /// Expiry, ms.
        expires_at_ms: i64,
        /// For a command that may not wait in the queue: the end of its
        /// subscription grace, ms (the sweeper fails it then if it is
        /// still queued).
        fail_at_ms: Option<i64>,
        /// When, ms.
        at_ms: i64,
    },
    /// Back to the head of the queue, in this order (`(id, expires_at_ms)`).
    Requeue {
        /// The commands, oldest first.
        items: Vec<(Uuid, i64)>,
        /// The reason in their logs.
        reason: &'static str,
        /// The connection ended: if the device is connected again, tell
        /// its connection to drain the queue.
        nudge: bool,
        /// When, ms.
        at_ms: i64,
    },
    /// Send it after the device: it moved (takeover), or was dispatched to
    /// a connection that is not here.
    Forward {
        /// Command id.
        id: Uuid,
        /// The reason in its log.
        reason: &'static str,
    },
    /// Take the device's queued commands and deliver them to its connection
    /// here (of the job's epoch or newer).
    Drain,
}

impl Report {
    /// Label for the log.
    pub fn op(&self) -> &'static str {
        match self {
            Self::Sent { .. } => "sent",
            Self::Acked { .. } => "acked",
            Self::TimedOut { .. } => "timed_out",
            Self::Expired { .. } => "expired",
            Self::Failed { .. } => "failed",
            Self::Waiting { .. } => "waiting",
            Self::Park { .. } => "park",
            Self::Requeue { .. } => "requeue",
            Self::Forward { .. } => "forward",
            Self::Drain => "drain",
        }
    }
}

/// A report and whose it is.
#[derive(Debug)]
pub struct Job {
    /// The device.
    pub phy: PhyId,
    /// Epoch of the connection it concerns.
    pub epoch: u64,
    /// What to do.
    pub report: Report,
}

struct Shared {
    store: CommandStore,
    registry: Arc<Registry>,
    server_id: ServerId,
    op_timeout: Duration,
    drain_max: usize,
    /// Places for jobs that found their lane full.
    overflow: Arc<tokio::sync::Semaphore>,
    /// When a shed job was last logged (ms), to log at most once a second.
    shed_logged_ms: std::sync::atomic::AtomicI64,
}

/// Where connections and the control subscriber hand their reports.
#[derive(Clone)]
pub struct ReporterHandle {
    shared: Arc<Shared>,
    lanes: Arc<[mpsc::Sender<Job>]>,
}

impl std::fmt::Debug for ReporterHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReporterHandle")
            .field("lanes", &self.lanes.len())
            .finish()
    }
}

/// Tells the lanes to finish.
#[derive(Debug)]
pub struct ReporterControl {
    finish: watch::Sender<Option<Instant>>,
    joins: Vec<tokio::task::JoinHandle<()>>,
}

/// Starts the lanes. Each Redis operation may take `op_timeout`.
pub fn spawn(
    store: CommandStore,
    registry: Arc<Registry>,
    server_id: ServerId,
    op_timeout: Duration,
) -> (ReporterHandle, ReporterControl) {
    let drain_max = (store.settings().queue_max as usize).max(1);
    let shared = Arc::new(Shared {
        store,
        registry,
        server_id,
        op_timeout,
        drain_max,
        overflow: Arc::new(tokio::sync::Semaphore::new(OVERFLOW_TASKS)),
        shed_logged_ms: std::sync::atomic::AtomicI64::new(0),
    });
    let (finish, finish_rx) = watch::channel(None);
    let mut lanes = Vec::new();
    let mut joins = Vec::new();
    for _ in 0..LANES {
        let (tx, rx) = mpsc::channel(LANE_CAPACITY);
        lanes.push(tx);
        joins.push(tokio::spawn(lane(shared.clone(), rx, finish_rx.clone())));
    }
    (
        ReporterHandle {
            shared,
            lanes: lanes.into(),
        },
        ReporterControl { finish, joins },
    )
}

impl ReporterHandle {
    /// Hands a report over; never waits.
    pub fn report(&self, phy: &PhyId, epoch: u64, report: Report) {
        let lane = usize::from(iot_core::keys::shard_of(phy.as_str(), LANES));
        let job = Job {
            phy: phy.clone(),
            epoch,
            report,
        };
        match self.lanes[lane].try_send(job) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(job)) => {
                match self.shared.overflow.clone().try_acquire_owned() {
                    Ok(permit) => {
                        crate::metrics::report_overflow();
                        let shared = self.shared.clone();
                        tokio::spawn(async move {
                            execute(&shared, job).await;
                            drop(permit);
                        });
                    }
                    Err(_) => self.shed(&job),
                }
            }
            Err(mpsc::error::TrySendError::Closed(job)) => {
                crate::metrics::reports_dropped(1);
                tracing::warn!(
                    phy_id = %job.phy,
                    op = job.report.op(),
                    "command state change after the reporter finished; the sweeper will resolve the command"
                );
            }
        }
    }
}

impl ReporterHandle {
    /// Drops a job that found its lane and the overflow full: counted, and
    /// logged at most once a second.
    fn shed(&self, job: &Job) {
        iot_downlink::metrics::report_shed();
        let now = iot_core::time::now_ms();
        let last = self
            .shared
            .shed_logged_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        if now - last >= 1000
            && self
                .shared
                .shed_logged_ms
                .compare_exchange(
                    last,
                    now,
                    std::sync::atomic::Ordering::Relaxed,
                    std::sync::atomic::Ordering::Relaxed,
                )
                .is_ok()
        {
            tracing::warn!(
                phy_id = %job.phy,
                op = job.report.op(),
                lanes = LANES,
                lane_capacity = LANE_CAPACITY,
                overflow = OVERFLOW_TASKS,
                "downlink reporter overloaded (Redis far behind): command state changes shed; the sweeper will resolve those commands"
            );
        }
    }
}

impl ReporterControl {
    /// Stops taking reports, applies those handed over already, and returns;
    /// what is left at `deadline` is dropped (and counted).
    pub async fn finish(self, deadline: Instant) {
        let _ = self.finish.send(Some(deadline));
        let margin = Duration::from_millis(250);
        for join in self.joins {
            if tokio::time::timeout_at(deadline + margin, join)
                .await
                .is_err()
            {
                tracing::error!("downlink reporter did not finish by the shutdown deadline");
            }
        }
    }
}

async fn lane(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<Job>,
    mut finish: watch::Receiver<Option<Instant>>,
) {
    let mut deadline: Option<Instant> = None;
    loop {
        let job = if deadline.is_none() {
            tokio::select! {
                job = rx.recv() => job,
                changed = finish.changed() => {
                    let asked = match changed {
                        Ok(()) => *finish.borrow(),
                        Err(_) => None,
                    };
                    // Dropped without `finish`: the service is failing.
                    deadline = Some(asked.unwrap_or_else(|| Instant::now() + Duration::from_secs(1)));
                    rx.close();
                    continue;
                }
            }
        } else {
            rx.recv().await
        };
        let Some(job) = job else {
            return;
        };
        match deadline {
            Some(d) if Instant::now() >= d => {
                let mut lost = 1;
                while rx.try_recv().is_ok() {
                    lost += 1;
                }
                crate::metrics::reports_dropped(lost);
                tracing::warn!(
                    lost,
                    "command state changes left at the shutdown deadline; the sweeper will resolve them"
                );
                return;
            }
            Some(d) => {
                let _ = tokio::time::timeout_at(d, execute(&shared, job)).await;
            }
            None => execute(&shared, job).await,
        }
    }
}

/// Applies one job, bounded in time; failures are logged and counted.
async fn execute(shared: &Shared, job: Job) {
    let op = job.report.op();
    match tokio::time::timeout(shared.op_timeout, apply(shared, &job)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            crate::metrics::redis_error("command_report");
            tracing::warn!(phy_id = %job.phy, op, error = %e,
                "cannot record a command's state change in Redis; the sweeper will resolve the command");
        }
        Err(_) => {
            crate::metrics::redis_error("command_report");
            tracing::warn!(phy_id = %job.phy, op, timeout = ?shared.op_timeout,
                "recording a command's state change timed out; the sweeper will resolve the command");
        }
    }
}

/// Logs a change the state machine refused (the command moved on or was
/// decided elsewhere): not an error, but worth a debug line; a stale
/// verdict is counted too.
fn refused(outcome: Outcome, id: &Uuid, op: &'static str) {
    match outcome {
        Outcome::Applied { .. } => {}
        Outcome::Refused(Refusal::Stale) => {
            iot_downlink::metrics::stale_verdict(op);
            tracing::debug!(command_id = %id, op,
                "stale command verdict refused: the command is dispatched to another connection now");
        }
        Outcome::Refused(why) => {
            tracing::debug!(command_id = %id, op, why = why.as_str(),
                "command state change not applied: it was decided or moved on meanwhile");
        }
    }
}

async fn apply(shared: &Shared, job: &Job) -> redis::RedisResult<()> {
    let store = &shared.store;
    let op = job.report.op();
    // Verdicts of this connection: refused while the command is dispatched
    // or sent to another one.
    let mine = |t: Transition| t.by(shared.server_id.as_str(), job.epoch);
    let by = Some((shared.server_id.as_str(), job.epoch));
    match &job.report {
        Report::Sent {
            id,
            attempts,
            sent_at_ms,
            at_ms,
        } => {
            let t = if *attempts <= 1 {
                Transition::to(Status::Sent)
                    .from(&[Status::Dispatched, Status::Queued])
                    .detail(format!("{} epoch {}", shared.server_id, job.epoch))
            } else {
                // A retransmission, or (from dispatched) a command held here
                // and dispatched here again.
                Transition::to(Status::Sent)
                    .from(&[Status::Sent, Status::Dispatched])
                    .reason("retransmit")
            };
            let t = mine(t)
                .set(field::ATTEMPTS, attempts)
                .set(field::SENT_AT, sent_at_ms)
                .set(field::SERVER_ID, &shared.server_id)
                .set(field::EPOCH, job.epoch);
            refused(store.transition_checked(id, &t, *at_ms).await?, id, op);
        }
        Report::Acked { id, at_ms } => {
            // A PUBACK is proof of delivery: taken from queued too (the
            // command was put back while its PUBACK was on the way).
            let t = Transition::to(Status::Acked)
                .from(&[Status::Sent, Status::Dispatched, Status::Queued])
                .set(field::ACKED_AT, at_ms);
            refused(
                store.transition_checked(id, &mine(t), *at_ms).await?,
                id,
                op,
            );
        }
        Report::TimedOut { id, at_ms } => {
            let t = Transition::to(Status::TimedOut)
                .from(&[Status::Sent, Status::Dispatched])
                .reason("ack_timeout");
            refused(
                store.transition_checked(id, &mine(t), *at_ms).await?,
                id,
                op,
            );
        }
        Report::Expired { id, at_ms } => {
            let t = Transition::to(Status::Expired);
            refused(
                store.transition_checked(id, &mine(t), *at_ms).await?,
                id,
                op,
            );
        }
        Report::Failed {
            id,
            reason,
            at_ms,
            only_queued,
        } => {
            if *only_queued && !store.dequeue(&job.phy, id).await? {
                // A drain took it: it is being delivered.
                return Ok(());
            }
            let mut t = Transition::to(Status::Failed).reason(reason.as_str());
            if *only_queued {
                t = t.from(&[Status::Queued]);
            }
            refused(
                store.transition_checked(id, &mine(t), *at_ms).await?,
                id,
                op,
            );
        }
        Report::Waiting { id, at_ms } => {
            let t = Transition::to(Status::Dispatched)
                .from(&[Status::Dispatched])
                .reason("inflight_limit")
                .detail(format!("{} epoch {}", shared.server_id, job.epoch));
            match store.transition_checked(id, &mine(t), *at_ms).await? {
                // Not dispatched: taken from the queue and held here, still
                // `queued` until it is sent. Alive, not lost: the sweeper
                // looks again later (see `iot_downlink::store`).
                Outcome::Refused(Refusal::NotAllowed) => {
                    let stuck = iot_downlink::metrics::ms(store.settings().stuck_after());
                    store.set_deadline(id, at_ms.saturating_add(stuck)).await?;
                }
                outcome => refused(outcome, id, op),
            }
        }
        Report::Park {
            id,
            name,
            expires_at_ms,
            fail_at_ms,
            at_ms,
        } => {
            let after = route::park(
                store,
                &job.phy,
                id,
                *expires_at_ms,
                fail_at_ms.unwrap_or(*expires_at_ms),
                FailReason::NoSubscription.as_str(),
                by,
                *at_ms,
            )
            .await?;
            // The device may have subscribed while this was on its way.
            if after == Some(Status::Queued)
                && let Some(conn) = shared.registry.get(&job.phy)
            {
                let _ = conn.post(Mail::Drain(Some(name.clone())));
            }
        }
        Report::Requeue {
            items,
            reason,
            nudge,
            at_ms,
        } => {
            let back = route::requeue(store, &job.phy, items, reason, by, *at_ms).await?;
            if *nudge && !back.is_empty() {
                self::nudge(shared, &job.phy, job.epoch).await?;
            }
        }
        Report::Forward { id, reason } => {
            if let Some(cmd) = store.get(id).await?
                && !cmd.status.is_terminal()
            {
                // This instance's connection of the job's epoch (or an
                // older one) does not hold the device: not a place for it.
                let gone = Some((&shared.server_id, job.epoch));
                let after = route::forward(store, cmd, reason, gone).await?;
                tracing::debug!(command_id = %id, status = %after.status, server_id = ?after.server_id,
                    "command forwarded after its device");
            }
        }
        Report::Drain => drain(shared, &job.phy, job.epoch).await?,
    }
    Ok(())
}

/// The device's connection of `epoch` has ended with commands put back in
/// the queue: if the device is connected again, its connection drains them.
async fn nudge(shared: &Shared, phy: &PhyId, epoch: u64) -> redis::RedisResult<()> {
    if let Some(conn) = shared.registry.get(phy)
        && conn.epoch() > epoch
    {
        let _ = conn.post(Mail::Drain(None));
        return Ok(());
    }
    if let Location::Connected(owner) = route::locate(&shared.store, phy).await?
        && owner.server_id != shared.server_id
    {
        let msg = Control::DrainQueue {
            phy_id: phy.clone(),
        };
        route::publish(&shared.store, &owner.server_id, &msg).await?;
    }
    Ok(())
}

/// Takes the device's queued commands (expiring the expired ones) and posts
/// them, in order, to its connection here; if that connection is gone,
/// they go back to the head of the queue. They stay `queued` until they
/// are sent; if this instance dies before that, the sweeper finds them in
/// no queue and puts them back ([`CommandStore::take_queued`] pushes their
/// sweeper deadlines before it takes them).
async fn drain(shared: &Shared, phy: &PhyId, epoch: u64) -> redis::RedisResult<()> {
    let store = &shared.store;
    let taken = store.take_queued(phy, shared.drain_max).await?;
    if taken.is_empty() {
        return Ok(());
    }
    let now = iot_core::time::now_ms();
    let mut mail = Vec::with_capacity(taken.len());
    for cmd in taken {
        // Decided meanwhile (the sweeper expired it): nothing to deliver.
        if cmd.status != Status::Queued {
            continue;
        }
        if now >= cmd.expires_at_ms {
            let t = Transition::to(Status::Expired).from(&[Status::Queued]);
            store.transition(&cmd.id, &t, now).await?;
            continue;
        }
        mail.push(Mail::Deliver(Delivery::queued(cmd)));
    }
    if mail.is_empty() {
        return Ok(());
    }
    let n = mail.len();
    let refused = match shared.registry.get(phy).filter(|c| c.epoch() >= epoch) {
        Some(conn) => conn.post_all(mail).err(),
        None => Some(mail),
    };
    match refused {
        None => {
            crate::metrics::drained(n);
            tracing::debug!(phy_id = %phy, commands = n, "queued commands handed to the connection");
        }
        Some(back) => {
            let items: Vec<(Uuid, i64)> = back
                .iter()
                .filter_map(|m| match m {
                    Mail::Deliver(d) => Some((d.id, d.expires_at_ms)),
                    Mail::Drain(_) => None,
                })
                .collect();
            store.requeue_front(phy, &items, now).await?;
            nudge(shared, phy, epoch).await?;
        }
    }
    Ok(())
}
