//! Downlink commands on one connection: the subscription check, the
//! inflight limit, the QoS 1 PUBLISH, one retransmission and the ACK
//! timeout.
//!
//! Pure: [`Downlinks`] is a plain state machine fed with commands, PUBACKs
//! and the time; it answers with [`Effect`]s that the connection carries
//! out (write a PUBLISH, report a state change to the [`crate::reporter`],
//! write an `ack` or `ack_timeout` event). It exists only while a
//! connection has commands: an idle connection holds none of it.
//!
//! ```text
//! offer -> held already?       -> where it stands is reported again (a re-dispatch)
//!       -> expired?            -> expired
//!       -> not subscribed?     -> queued again (queue_if_offline),
//!                                 parked for a grace (it followed its device), or
//!                                 failed(no_subscription)
//!       -> waiting list full?  -> failed(queue_full)
//!       -> inflight full?      -> waiting, in order
//!       -> PUBLISH QoS 1       -> sent (attempts 1)
//!            PUBACK            -> acked + `ack` event
//!            ack_timeout / 2   -> PUBLISH again with DUP (attempts 2)
//!            ack_timeout       -> timed_out + `ack_timeout` event
//! the connection ends          -> forwarded (takeover), queued again, or failed(device_gone)
//! ```

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use iot_core::EventKind;
use iot_core::control::Dispatch;
use iot_downlink::{Command, FailReason};
use tokio::time::Instant;
use uuid::Uuid;

use crate::reporter::Report;

/// A command on its way to the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Command id.
    pub id: Uuid,
    /// Topic level after `devices/{phyID}/down/`.
    pub name: String,
    /// Payload.
    pub payload: Bytes,
    /// Expiry, ms since the Unix epoch.
    pub expires_at_ms: i64,
    /// Whether it may wait in the device's queue.
    pub queue_if_offline: bool,
    /// Taken from the device's offline queue (status queued), rather than
    /// dispatched to this connection (status dispatched).
    pub from_queue: bool,
    /// It followed its device here (forwarded after a takeover or a lost
    /// owner): the device has most likely just connected and may not have
    /// subscribed yet.
    pub followed: bool,
}

impl Delivery {
    /// A command dispatched to this instance over Pub/Sub.
    pub fn dispatched(d: Dispatch) -> Self {
        Self {
            id: d.id,
            name: d.name,
            payload: Bytes::from(d.payload),
            expires_at_ms: d.expires_at_ms,
            queue_if_offline: d.queue_if_offline,
            from_queue: false,
            followed: d.hops > 0,
        }
    }

    /// A command taken from the device's offline queue.
    pub fn queued(c: Command) -> Self {
        Self {
            id: c.id,
            name: c.name,
            payload: Bytes::from(c.payload),
            expires_at_ms: c.expires_at_ms,
            queue_if_offline: c.queue_if_offline,
            from_queue: true,
            followed: false,
        }
    }
}

/// What other tasks post to a connection (see
/// [`ConnHandle::post`](crate::registry::ConnHandle::post)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mail {
    /// A command to deliver.
    Deliver(Delivery),
    /// Commands wait in the device's queue: take them if the device listens
    /// for downlinks (for the one named, if given).
    Drain(Option<String>),
}

/// Per-connection downlink limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// PUBACK deadline from the first transmission; the retransmission goes
    /// out at half of it.
    pub ack_timeout: Duration,
    /// Commands sent and not yet acknowledged at once.
    pub max_inflight: usize,
    /// Commands waiting for a place under the inflight limit at once
    /// (`downlink.queue_max`, the same cap as the offline queue): more fail
    /// with `queue_full`, so a device that does not keep up cannot make its
    /// connection hold without bound.
    pub max_waiting: usize,
    /// How long a command that followed its device to this connection,
    /// and may not wait in the offline queue, waits for the device to
    /// subscribe before it fails with `no_subscription` (never past its
    /// ttl). The ACK timeout: what a sender already waits for an answer.
    pub subscribe_grace: Duration,
}

impl Limits {
    /// From the `downlink` config section.
    pub fn from_config(c: &iot_core::config::DownlinkConfig) -> Self {
        let ack_timeout = c.ack_timeout.max(Duration::from_millis(10));
        Self {
            ack_timeout,
            max_inflight: (c.max_inflight as usize).max(1),
            max_waiting: (c.queue_max as usize).max(1),
            subscribe_grace: ack_timeout,
        }
    }
}

/// Something the connection must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Write a QoS 1 PUBLISH on `devices/{phyID}/down/{name}`.
    Publish {
        /// Packet id.
        pkid: u16,
        /// A retransmission.
        dup: bool,
        /// Topic level after `devices/{phyID}/down/`.
        name: String,
        /// Payload.
        payload: Bytes,
    },
    /// Record a state change in Redis (through the reporter).
    Report(Report),
    /// Write an event of the device (`ack`, `ack_timeout`).
    Event(EventKind),
}

/// Where packet ids for downlink PUBLISHes come from (the connection's
/// handle: ids keep counting across the connection's life, so a late PUBACK
/// rarely meets a reused id).
pub trait PacketIds {
    /// The next packet id (never 0).
    fn next_pkid(&self) -> u16;
}

impl PacketIds for crate::registry::ConnHandle {
    fn next_pkid(&self) -> u16 {
        crate::registry::ConnHandle::next_pkid(self)
    }
}

/// The clock, the limits, packet ids and the effects of one step.
pub struct Step<'a> {
    /// Now (monotonic): transmission times and deadlines.
    pub now: Instant,
    /// Now, ms since the Unix epoch: expiry and the times reported.
    pub now_ms: i64,
    /// The limits.
    pub limits: Limits,
    /// Gives the next packet id.
    pub pkids: &'a dyn PacketIds,
    /// Where the effects go, in order.
    pub out: &'a mut Vec<Effect>,
}

impl Step<'_> {
    fn report(&mut self, r: Report) {
        self.out.push(Effect::Report(r));
    }
}

#[derive(Debug)]
struct Inflight {
    pkid: u16,
    d: Delivery,
    first_sent: Instant,
    /// The first transmission, ms since the Unix epoch.
    first_sent_ms: i64,
    attempts: u32,
}

impl Inflight {
    /// When something must happen next: the retransmission, then the timeout.
    fn deadline(&self, ack_timeout: Duration) -> Instant {
        if self.attempts < 2 {
            self.first_sent + ack_timeout / 2
        } else {
            self.first_sent + ack_timeout
        }
    }
}

#[derive(Debug)]
struct Waiting {
    d: Delivery,
    /// Since when (or the last report of) its wait: a command that waits
    /// long is reported again, so that the sweeper does not take it for
    /// stuck (dispatched) or lost (taken from the queue, still `queued`
    /// until it is sent: the report pushes its sweeper deadline on).
    since: Instant,
}

/// A command parked in the device's queue until the device subscribes
/// (it followed the device here and may not wait otherwise): when its
/// grace ends and it is still in the queue, it fails (`no_subscription`).
#[derive(Debug)]
struct Subscribing {
    id: Uuid,
    until: Instant,
}

/// The commands of one connection: sent and waiting for PUBACK, or waiting
/// for a place under the inflight limit, or parked until the device
/// subscribes.
#[derive(Debug, Default)]
pub struct Downlinks {
    /// In the order they were sent.
    inflight: Vec<Inflight>,
    /// In arrival order.
    waiting: VecDeque<Waiting>,
    /// Parked in the queue for a subscription, with the end of the grace.
    subscribing: Vec<Subscribing>,
}

/// Why a command offered to a connection is not sent.
fn fails_name(name: &str) -> bool {
    iot_downlink::command::validate_name(name).is_err()
}

impl Downlinks {
    /// Whether no command is held (nor a subscription grace running).
    pub fn is_empty(&self) -> bool {
        self.inflight.is_empty() && self.waiting.is_empty() && self.subscribing.is_empty()
    }

    /// Commands sent and not yet acknowledged.
    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// Commands waiting for a place under the inflight limit.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Takes commands for the device, in order. `listens(name)` says whether
    /// the device is subscribed to a filter matching `devices/{phy}/down/{name}`.
    pub fn offer(
        &mut self,
        deliveries: impl IntoIterator<Item = Delivery>,
        listens: &dyn Fn(&str) -> bool,
        step: &mut Step<'_>,
    ) {
        // Queued commands that must go back keep their order at the head
        // of the queue.
        let mut back: Vec<(Uuid, i64)> = Vec::new();
        for d in deliveries {
            // Its grace ends here: it came back from the queue.
            self.subscribing.retain(|s| s.id != d.id);
            if self.restate(&d, step) {
                continue;
            }
            if step.now_ms >= d.expires_at_ms {
                step.report(Report::Expired {
                    id: d.id,
                    at_ms: step.now_ms,
                });
                continue;
            }
            if fails_name(&d.name) {
                step.report(Report::Failed {
                    id: d.id,
                    reason: FailReason::Rejected,
                    at_ms: step.now_ms,
                    only_queued: false,
                });
                continue;
            }
            if !listens(&d.name) {
                let grace = step.limits.subscribe_grace;
                if !d.queue_if_offline && d.followed && !d.from_queue && !grace.is_zero() {
                    // It followed its device, which has likely not
                    // subscribed yet: wait in the queue for the SUBSCRIBE
                    // (which drains it), for the grace at most.
                    let fail_at_ms = step
                        .now_ms
                        .saturating_add(iot_core::config::millis(grace))
                        .min(d.expires_at_ms);
                    self.subscribing.push(Subscribing {
                        id: d.id,
                        until: step.now + grace,
                    });
                    step.report(Report::Park {
                        id: d.id,
                        name: d.name,
                        expires_at_ms: d.expires_at_ms,
                        fail_at_ms: Some(fail_at_ms),
                        at_ms: step.now_ms,
                    });
                } else if !d.queue_if_offline {
                    step.report(Report::Failed {
                        id: d.id,
                        reason: FailReason::NoSubscription,
                        at_ms: step.now_ms,
                        only_queued: false,
                    });
                } else if d.from_queue {
                    back.push((d.id, d.expires_at_ms));
                } else {
                    step.report(Report::Park {
                        id: d.id,
                        name: d.name,
                        expires_at_ms: d.expires_at_ms,
                        fail_at_ms: None,
                        at_ms: step.now_ms,
                    });
                }
                continue;
            }
            if self.inflight.len() >= step.limits.max_inflight || !self.waiting.is_empty() {
                if self.waiting.len() >= step.limits.max_waiting {
                    step.report(Report::Failed {
                        id: d.id,
                        reason: FailReason::QueueFull,
                        at_ms: step.now_ms,
                        only_queued: false,
                    });
                    continue;
                }
                if !d.from_queue {
                    step.report(Report::Waiting {
                        id: d.id,
                        at_ms: step.now_ms,
                    });
                }
                self.waiting.push_back(Waiting { d, since: step.now });
                continue;
            }
            self.send(d, step);
        }
        if !back.is_empty() {
            step.report(Report::Requeue {
                items: back,
                reason: "no_subscription",
                nudge: false,
                at_ms: step.now_ms,
            });
        }
    }

    /// A command held here already (dispatched again because a report or
    /// its first dispatch seemed lost): nothing is sent twice, where it
    /// stands is reported again. Returns whether it was held.
    fn restate(&self, d: &Delivery, step: &mut Step<'_>) -> bool {
        if let Some(f) = self.inflight.iter().find(|f| f.d.id == d.id) {
            step.report(Report::Sent {
                id: d.id,
                attempts: f.attempts,
                sent_at_ms: f.first_sent_ms,
                at_ms: step.now_ms,
            });
            return true;
        }
        if self.waiting.iter().any(|w| w.d.id == d.id) {
            if !d.from_queue {
                step.report(Report::Waiting {
                    id: d.id,
                    at_ms: step.now_ms,
                });
            }
            return true;
        }
        false
    }

    fn send(&mut self, d: Delivery, step: &mut Step<'_>) {
        let pkid = loop {
            let id = step.pkids.next_pkid();
            if !self.inflight.iter().any(|i| i.pkid == id) {
                break id;
            }
        };
        step.out.push(Effect::Publish {
            pkid,
            dup: false,
            name: d.name.clone(),
            payload: d.payload.clone(),
        });
        step.report(Report::Sent {
            id: d.id,
            attempts: 1,
            sent_at_ms: step.now_ms,
            at_ms: step.now_ms,
        });
        self.inflight.push(Inflight {
            pkid,
            d,
            first_sent: step.now,
            first_sent_ms: step.now_ms,
            attempts: 1,
        });
    }

    /// Sends waiting commands while there is room under the limit.
    fn promote(&mut self, step: &mut Step<'_>) {
        while self.inflight.len() < step.limits.max_inflight {
            let Some(w) = self.waiting.pop_front() else {
                return;
            };
            if step.now_ms >= w.d.expires_at_ms {
                step.report(Report::Expired {
                    id: w.d.id,
                    at_ms: step.now_ms,
                });
                continue;
            }
            self.send(w.d, step);
        }
    }

    /// The device acknowledged packet `pkid`. Returns the time from the
    /// first transmission, or `None` if no command waits for that id.
    pub fn ack(&mut self, pkid: u16, step: &mut Step<'_>) -> Option<Duration> {
        let i = self.inflight.iter().position(|i| i.pkid == pkid)?;
        let done = self.inflight.remove(i);
        step.report(Report::Acked {
            id: done.d.id,
            at_ms: step.now_ms,
        });
        step.out.push(Effect::Event(EventKind::Ack {
            command_id: done.d.id,
        }));
        self.promote(step);
        Some(step.now.saturating_duration_since(done.first_sent))
    }

    /// The time has come for something (see [`next_deadline`](Self::next_deadline)):
    /// retransmissions, timeouts, long waits.
    pub fn tick(&mut self, step: &mut Step<'_>) {
        let ack_timeout = step.limits.ack_timeout;
        let mut i = 0;
        while i < self.inflight.len() {
            let f = &mut self.inflight[i];
            if step.now >= f.first_sent + ack_timeout {
                let gone = self.inflight.remove(i);
                step.report(Report::TimedOut {
                    id: gone.d.id,
                    at_ms: step.now_ms,
                });
                step.out.push(Effect::Event(EventKind::AckTimeout {
                    command_id: gone.d.id,
                }));
                continue;
            }
            if f.attempts < 2 && step.now >= f.first_sent + ack_timeout / 2 {
                f.attempts = 2;
                step.out.push(Effect::Publish {
                    pkid: f.pkid,
                    dup: true,
                    name: f.d.name.clone(),
                    payload: f.d.payload.clone(),
                });
                let (id, sent_at_ms, at_ms) = (f.d.id, f.first_sent_ms, step.now_ms);
                step.report(Report::Sent {
                    id,
                    attempts: 2,
                    sent_at_ms,
                    at_ms,
                });
            }
            i += 1;
        }
        let now = step.now;
        let (over, left): (Vec<_>, Vec<_>) = std::mem::take(&mut self.subscribing)
            .into_iter()
            .partition(|s| now >= s.until);
        self.subscribing = left;
        for s in over {
            // Still in the queue (no SUBSCRIBE drained it): it fails.
            step.report(Report::Failed {
                id: s.id,
                reason: FailReason::NoSubscription,
                at_ms: step.now_ms,
                only_queued: true,
            });
        }
        for w in &mut self.waiting {
            if step.now >= w.since + ack_timeout {
                w.since = step.now;
                step.out.push(Effect::Report(Report::Waiting {
                    id: w.d.id,
                    at_ms: step.now_ms,
                }));
            }
        }
        self.promote(step);
    }

    /// When [`tick`](Self::tick) must run next, if anything is held.
    pub fn next_deadline(&self, ack_timeout: Duration) -> Option<Instant> {
        let inflight = self.inflight.iter().map(|f| f.deadline(ack_timeout));
        let waiting = self.waiting.iter().map(|w| w.since + ack_timeout);
        let subscribing = self.subscribing.iter().map(|s| s.until);
        inflight.chain(waiting).chain(subscribing).min()
    }

    /// The PUBLISH of packet `pkid` could not be encoded for the device
    /// (the protocol refused it): the command fails (`rejected`) instead of
    /// waiting for a PUBACK that cannot come, and the next waiting command
    /// takes its place. Returns its id, or `None` if no command is in
    /// flight with that packet id.
    pub fn reject(&mut self, pkid: u16, step: &mut Step<'_>) -> Option<Uuid> {
        let i = self.inflight.iter().position(|i| i.pkid == pkid)?;
        let gone = self.inflight.remove(i);
        step.report(Report::Failed {
            id: gone.d.id,
            reason: FailReason::Rejected,
            at_ms: step.now_ms,
            only_queued: false,
        });
        self.promote(step);
        Some(gone.d.id)
    }

    /// The connection has ended: what becomes of its commands (those held
    /// here, then `unread`, mail that arrived too late), oldest first. After
    /// a takeover they follow the device to its new connection; otherwise
    /// they go back to the head of the queue (`queue_if_offline`, not
    /// expired) or fail with `device_gone`. Commands parked for a
    /// subscription are in the queue already: the sweeper ends their grace
    /// (see `iot_downlink::route::park`), or the device's next connection
    /// drains them after subscribing.
    pub fn close(
        self,
        takeover: bool,
        unread: impl IntoIterator<Item = Delivery>,
        now_ms: i64,
    ) -> Vec<Report> {
        let all = self
            .inflight
            .into_iter()
            .map(|f| f.d)
            .chain(self.waiting.into_iter().map(|w| w.d))
            .chain(unread);
        let mut out = Vec::new();
        let mut back = Vec::new();
        for d in all {
            if takeover {
                out.push(Report::Forward {
                    id: d.id,
                    reason: "takeover",
                });
            } else if now_ms >= d.expires_at_ms {
                out.push(Report::Expired {
                    id: d.id,
                    at_ms: now_ms,
                });
            } else if d.queue_if_offline {
                back.push((d.id, d.expires_at_ms));
            } else {
                out.push(Report::Failed {
                    id: d.id,
                    reason: FailReason::DeviceGone,
                    at_ms: now_ms,
                    only_queued: false,
                });
            }
        }
        if !back.is_empty() {
            out.push(Report::Requeue {
                items: back,
                reason: "device_gone",
                nudge: true,
                at_ms: now_ms,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACK: Duration = Duration::from_secs(10);

    fn limits(max_inflight: usize) -> Limits {
        Limits {
            ack_timeout: ACK,
            max_inflight,
            max_waiting: 100,
            subscribe_grace: ACK,
        }
    }

    fn delivery(n: u128, name: &str) -> Delivery {
        Delivery {
            id: Uuid::from_u128(n),
            name: name.into(),
            payload: Bytes::from(format!("p{n}")),
            expires_at_ms: 1_000_000,
            queue_if_offline: false,
            from_queue: false,
            followed: false,
        }
    }

    /// Packet ids from 1.
    struct Counter(std::cell::Cell<u16>);

    impl PacketIds for Counter {
        fn next_pkid(&self) -> u16 {
            self.0.set(self.0.get() + 1);
            self.0.get()
        }
    }

    /// A test driver: a clock, packet ids from 1, collected effects.
    struct Driver {
        start: Instant,
        at: Duration,
        now_ms: i64,
        ids: Counter,
        limits: Limits,
    }

    impl Driver {
        fn new(max_inflight: usize) -> Self {
            Self {
                start: Instant::now(),
                at: Duration::ZERO,
                now_ms: 1000,
                ids: Counter(std::cell::Cell::new(0)),
                limits: limits(max_inflight),
            }
        }

        fn run(&mut self, f: impl FnOnce(&mut Step<'_>)) -> Vec<Effect> {
            let mut out = Vec::new();
            let mut step = Step {
                now: self.start + self.at,
                now_ms: self.now_ms,
                limits: self.limits,
                pkids: &self.ids,
                out: &mut out,
            };
            f(&mut step);
            out
        }

        fn advance(&mut self, d: Duration) {
            self.at += d;
            self.now_ms += d.as_millis() as i64;
        }
    }

    fn publishes(effects: &[Effect]) -> Vec<(u16, bool, String)> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Publish {
                    pkid, dup, payload, ..
                } => Some((*pkid, *dup, String::from_utf8_lossy(payload).into_owned())),
                _ => None,
            })
            .collect()
    }

    fn reports(effects: &[Effect]) -> Vec<Report> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Report(r) => Some(r.clone()),
                _ => None,
            })
            .collect()
    }

    fn yes(_: &str) -> bool {
        true
    }

    #[test]
    fn a_command_is_sent_then_acked_with_an_event() {
        let mut d = Driver::new(8);
        let mut dl = Downlinks::default();
        let fx = d.run(|s| dl.offer([delivery(1, "reboot")], &yes, s));
        assert_eq!(publishes(&fx), [(1, false, "p1".into())]);
        assert_eq!(
            reports(&fx),
            [Report::Sent {
                id: Uuid::from_u128(1),
                attempts: 1,
                sent_at_ms: 1000,
                at_ms: 1000
            }]
        );
        assert_eq!(dl.inflight(), 1);
        assert_eq!(dl.next_deadline(ACK), Some(d.start + ACK / 2));

        d.advance(Duration::from_millis(40));
        let mut rtt = None;
        let fx = d.run(|s| rtt = dl.ack(1, s));
        assert_eq!(rtt, Some(Duration::from_millis(40)));
        assert_eq!(
            fx,
            [
                Effect::Report(Report::Acked {
                    id: Uuid::from_u128(1),
                    at_ms: 1040
                }),
                Effect::Event(EventKind::Ack {
                    command_id: Uuid::from_u128(1)
                })
            ]
        );
        assert!(dl.is_empty());
        assert_eq!(dl.next_deadline(ACK), None);
        let fx = d.run(|s| assert_eq!(dl.ack(1, s), None, "a second PUBACK"));
        assert!(fx.is_empty());
    }

    #[test]
    fn no_puback_means_one_retransmission_then_timed_out() {
        let mut d = Driver::new(8);
        let mut dl = Downlinks::default();
        d.run(|s| dl.offer([delivery(1, "reboot")], &yes, s));
        d.advance(ACK / 2 - Duration::from_millis(1));
        assert!(d.run(|s| dl.tick(s)).is_empty(), "not yet");
        d.advance(Duration::from_millis(1));
        let fx = d.run(|s| dl.tick(s));
        assert_eq!(publishes(&fx), [(1, true, "p1".into())], "same id, DUP");
        assert!(matches!(
            reports(&fx)[..],
            [Report::Sent { attempts: 2, .. }]
        ));
        assert_eq!(dl.next_deadline(ACK), Some(d.start + ACK));
        d.advance(ACK / 2);
        let fx = d.run(|s| dl.tick(s));
        assert_eq!(
            fx,
            [
                Effect::Report(Report::TimedOut {
                    id: Uuid::from_u128(1),
                    at_ms: d.now_ms
                }),
                Effect::Event(EventKind::AckTimeout {
                    command_id: Uuid::from_u128(1)
                })
            ]
        );
        assert!(dl.is_empty());
    }

    #[test]
    fn the_inflight_limit_keeps_order() {
        let mut d = Driver::new(2);
        let mut dl = Downlinks::default();
        let fx = d.run(|s| dl.offer((1..=5).map(|n| delivery(n, "c")), &yes, s));
        assert_eq!(
            publishes(&fx),
            [(1, false, "p1".into()), (2, false, "p2".into())]
        );
        let waiting: Vec<_> = reports(&fx)
            .into_iter()
            .filter(|r| matches!(r, Report::Waiting { .. }))
            .collect();
        assert_eq!(
            waiting.len(),
            3,
            "dispatched commands that wait are reported"
        );
        assert_eq!((dl.inflight(), dl.waiting()), (2, 3));
        // A newcomer waits behind the others even when a place is free.
        let fx = d.run(|s| {
            dl.ack(2, s);
        });
        assert_eq!(publishes(&fx), [(3, false, "p3".into())]);
        let fx = d.run(|s| dl.offer([delivery(6, "c")], &yes, s));
        assert!(publishes(&fx).is_empty());
        let mut order = Vec::new();
        for pkid in [1, 3, 4, 5, 6] {
            let fx = d.run(|s| {
                dl.ack(pkid, s).expect("inflight");
            });
            order.extend(publishes(&fx).into_iter().map(|p| p.2));
            assert!(dl.inflight() <= 2);
        }
        assert_eq!(order, ["p4", "p5", "p6"]);
        assert!(dl.is_empty());
    }

    #[test]
    fn long_waits_are_reported_again_and_expired_waiters_expire() {
        let mut d = Driver::new(1);
        let mut dl = Downlinks::default();
        let mut short = delivery(2, "c");
        short.expires_at_ms = 1000 + 6000;
        d.run(|s| dl.offer([delivery(1, "c"), short, delivery(3, "c")], &yes, s));
        assert_eq!((dl.inflight(), dl.waiting()), (1, 2));
        d.advance(ACK / 2);
        d.run(|s| dl.tick(s));
        d.advance(ACK / 2);
        let fx = d.run(|s| dl.tick(s));
        let r = reports(&fx);
        assert!(r.contains(&Report::TimedOut {
            id: Uuid::from_u128(1),
            at_ms: d.now_ms
        }));
        assert!(r.contains(&Report::Expired {
            id: Uuid::from_u128(2),
            at_ms: d.now_ms
        }));
        assert!(
            r.iter()
                .any(|r| matches!(r, Report::Waiting { id, .. } if *id == Uuid::from_u128(3))),
            "{r:?}"
        );
        assert_eq!(publishes(&fx), [(2, false, "p3".into())]);
    }

    #[test]
    fn without_a_subscription_commands_are_parked_requeued_or_failed() {
        let mut d = Driver::new(8);
        let mut dl = Downlinks::default();
        let listens = |name: &str| name == "ok";
        let mut park = delivery(1, "other");
        park.queue_if_offline = true;
        let fail = delivery(2, "other");
        let mut q1 = delivery(3, "other");
        q1.queue_if_offline = true;
        q1.from_queue = true;
        let sent = Delivery {
            from_queue: true,
            ..delivery(4, "ok")
        };
        let mut q2 = delivery(5, "other");
        q2.queue_if_offline = true;
        q2.from_queue = true;
        let mut expired = delivery(6, "ok");
        expired.expires_at_ms = 1000;
        let bad = delivery(7, "a/b");
        let fx = d.run(|s| dl.offer([park, fail, q1, sent, q2, expired, bad], &listens, s));
        assert_eq!(publishes(&fx), [(1, false, "p4".into())]);
        assert_eq!(
            reports(&fx),
            [
                Report::Park {
                    id: Uuid::from_u128(1),
                    name: "other".into(),
                    expires_at_ms: 1_000_000,
                    fail_at_ms: None,
                    at_ms: 1000
                },
                Report::Failed {
                    id: Uuid::from_u128(2),
                    reason: FailReason::NoSubscription,
                    at_ms: 1000,
                    only_queued: false
                },
                Report::Sent {
                    id: Uuid::from_u128(4),
                    attempts: 1,
                    sent_at_ms: 1000,
                    at_ms: 1000
                },
                Report::Expired {
                    id: Uuid::from_u128(6),
                    at_ms: 1000
                },
                Report::Failed {
                    id: Uuid::from_u128(7),
                    reason: FailReason::Rejected,
                    at_ms: 1000,
                    only_queued: false
                },
                Report::Requeue {
                    items: vec![
                        (Uuid::from_u128(3), 1_000_000),
                        (Uuid::from_u128(5), 1_000_000)
                    ],
                    reason: "no_subscription",
                    nudge: false,
                    at_ms: 1000
                },
            ]
        );
    }

    #[test]
    fn at_the_end_commands_follow_a_takeover_or_go_back_or_fail() {
        let mut d = Driver::new(1);
        let held = |d: &mut Driver| {
            let mut dl = Downlinks::default();
            let mut a = delivery(1, "c");
            a.queue_if_offline = true;
            let b = delivery(2, "c");
            let mut c = delivery(3, "c");
            c.queue_if_offline = true;
            d.run(|s| dl.offer([a, b, c], &yes, s));
            dl
        };
        let mut late = delivery(4, "c");
        late.queue_if_offline = true;
        let forward = held(&mut d).close(true, [late.clone()], 2000);
        assert_eq!(
            forward,
            (1..=4)
                .map(|n| Report::Forward {
                    id: Uuid::from_u128(n),
                    reason: "takeover"
                })
                .collect::<Vec<_>>()
        );
        let mut gone = delivery(5, "c");
        gone.queue_if_offline = true;
        gone.expires_at_ms = 1500;
        let closed = held(&mut d).close(false, [late, gone], 2000);
        assert_eq!(
            closed,
            [
                Report::Failed {
                    id: Uuid::from_u128(2),
                    reason: FailReason::DeviceGone,
                    at_ms: 2000,
                    only_queued: false
                },
                Report::Expired {
                    id: Uuid::from_u128(5),
                    at_ms: 2000
                },
                Report::Requeue {
                    items: vec![
                        (Uuid::from_u128(1), 1_000_000),
                        (Uuid::from_u128(3), 1_000_000),
                        (Uuid::from_u128(4), 1_000_000)
                    ],
                    reason: "device_gone",
                    nudge: true,
                    at_ms: 2000
                }
            ]
        );
    }

    #[test]
    fn packet_ids_in_use_are_skipped() {
        let mut d = Driver::new(8);
        let mut dl = Downlinks::default();
        d.run(|s| dl.offer([delivery(1, "c")], &yes, s));
        d.ids.0.set(0); // the counter wraps onto the id in flight
        let fx = d.run(|s| dl.offer([delivery(2, "c")], &yes, s));
        assert_eq!(publishes(&fx), [(2, false, "p2".into())]);
    }

    #[test]
    fn a_command_held_already_is_not_sent_twice_but_restated() {
        let mut d = Driver::new(1);
        let mut dl = Downlinks::default();
        d.run(|s| dl.offer([delivery(1, "c"), delivery(2, "c")], &yes, s));
        d.advance(Duration::from_millis(500));
        // Both dispatched here again (the sweeper thought them lost).
        let fx = d.run(|s| dl.offer([delivery(1, "c"), delivery(2, "c")], &yes, s));
        assert!(publishes(&fx).is_empty(), "nothing is sent twice");
        assert_eq!(
            reports(&fx),
            [
                Report::Sent {
                    id: Uuid::from_u128(1),
                    attempts: 1,
                    sent_at_ms: 1000,
                    at_ms: 1500
                },
                Report::Waiting {
                    id: Uuid::from_u128(2),
                    at_ms: 1500
                }
            ]
        );
        assert_eq!((dl.inflight(), dl.waiting()), (1, 1));
    }

    #[test]
    fn the_waiting_list_is_capped_and_the_excess_fails_queue_full() {
        let mut d = Driver::new(1);
        d.limits.max_waiting = 2;
        let mut dl = Downlinks::default();
        let fx = d.run(|s| dl.offer((1..=5).map(|n| delivery(n, "c")), &yes, s));
        assert_eq!(publishes(&fx), [(1, false, "p1".into())]);
        assert_eq!((dl.inflight(), dl.waiting()), (1, 2));
        let full: Vec<_> = reports(&fx)
            .into_iter()
            .filter_map(|r| match r {
                Report::Failed {
                    id,
                    reason: FailReason::QueueFull,
                    ..
                } => Some(id),
                _ => None,
            })
            .collect();
        assert_eq!(full, [Uuid::from_u128(4), Uuid::from_u128(5)]);
    }

    #[test]
    fn a_command_that_followed_its_device_waits_a_grace_for_the_subscription() {
        let mut d = Driver::new(8);
        let mut dl = Downlinks::default();
        let no = |_: &str| false;
        let followed = |n| Delivery {
            followed: true,
            ..delivery(n, "c")
        };
        let fx = d.run(|s| dl.offer([followed(1), followed(2), delivery(3, "c")], &no, s));
        assert_eq!(
            reports(&fx),
            [
                Report::Park {
                    id: Uuid::from_u128(1),
                    name: "c".into(),
                    expires_at_ms: 1_000_000,
                    fail_at_ms: Some(1000 + ACK.as_millis() as i64),
                    at_ms: 1000
                },
                Report::Park {
                    id: Uuid::from_u128(2),
                    name: "c".into(),
                    expires_at_ms: 1_000_000,
                    fail_at_ms: Some(1000 + ACK.as_millis() as i64),
                    at_ms: 1000
                },
                // Not one that followed its device: no grace.
                Report::Failed {
                    id: Uuid::from_u128(3),
                    reason: FailReason::NoSubscription,
                    at_ms: 1000,
                    only_queued: false
                },
            ]
        );
        assert!(!dl.is_empty(), "the grace is held");
        assert_eq!(dl.next_deadline(ACK), Some(d.start + ACK));
        // The device subscribes: the first comes back from the queue.
        d.advance(Duration::from_millis(100));
        let back = Delivery {
            from_queue: true,
            ..delivery(1, "c")
        };
        let fx = d.run(|s| dl.offer([back], &yes, s));
        assert_eq!(publishes(&fx), [(1, false, "p1".into())]);
        // The grace of the other one ends: it fails if still queued.
        d.advance(ACK);
        let fx = d.run(|s| dl.tick(s));
        let failed: Vec<_> = reports(&fx)
            .into_iter()
            .filter(|r| matches!(r, Report::Failed { .. }))
            .collect();
        assert_eq!(
            failed,
            [Report::Failed {
                id: Uuid::from_u128(2),
                reason: FailReason::NoSubscription,
                at_ms: d.now_ms,
                only_queued: true
            }]
        );
        // A grace never outlives the command's ttl.
        let mut dl = Downlinks::default();
        let mut short = followed(4);
        short.expires_at_ms = d.now_ms + 50;
        let fx = d.run(|s| dl.offer([short], &no, s));
        assert!(matches!(
            reports(&fx)[..],
            [Report::Park { fail_at_ms: Some(at), .. }] if at == d.now_ms + 50
        ));
    }

    #[test]
    fn commands_from_the_queue_held_back_long_are_reported_as_alive() {
        // Taken from the queue, still `queued` until sent: a long wait is
        // reported (it pushes the sweeper deadline on, so the sweeper does
        // not take them for lost by a dead drain), but not on arrival.
        let mut d = Driver::new(1);
        let mut dl = Downlinks::default();
        let queued = |n| Delivery {
            from_queue: true,
            queue_if_offline: true,
            ..delivery(n, "c")
        };
        let fx = d.run(|s| dl.offer([queued(1), queued(2)], &yes, s));
        assert!(
            !reports(&fx)
                .iter()
                .any(|r| matches!(r, Report::Waiting { .. }))
        );
        assert_eq!(dl.waiting(), 1);
        d.advance(ACK / 2);
        d.run(|s| dl.tick(s));
        assert_eq!(dl.next_deadline(ACK), Some(d.start + ACK));
        d.advance(ACK / 2);
        let fx = d.run(|s| dl.tick(s));
        assert!(
            reports(&fx).contains(&Report::Waiting {
                id: Uuid::from_u128(2),
                at_ms: d.now_ms
            }),
            "{fx:?}"
        );
    }

    #[test]
    fn a_publish_that_cannot_be_encoded_fails_rejected_and_frees_its_place() {
        let mut d = Driver::new(1);
        let mut dl = Downlinks::default();
        d.run(|s| dl.offer([delivery(1, "c"), delivery(2, "c")], &yes, s));
        let mut id = None;
        let fx = d.run(|s| id = dl.reject(1, s));
        assert_eq!(id, Some(Uuid::from_u128(1)));
        assert_eq!(
            reports(&fx)[0],
            Report::Failed {
                id: Uuid::from_u128(1),
                reason: FailReason::Rejected,
                at_ms: 1000,
                only_queued: false
            }
        );
        assert_eq!(
            publishes(&fx),
            [(2, false, "p2".into())],
            "the next one goes"
        );
        let fx = d.run(|s| id = dl.reject(9, s));
        assert_eq!(id, None);
        assert!(fx.is_empty());
    }
}
