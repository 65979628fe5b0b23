//! The local connection registry: phyID -> the connection that holds the
//! device on this instance, and the takeover rules that use it.
//!
//! A newer connection (higher epoch) of a device closes the older one with
//! `tcp_down(takeover)`, whether it arrives here (local takeover) or on
//! another instance, which then sends a kick over Pub/Sub (remote takeover,
//! see [`crate::control`]). A kick that arrives before the connection it
//! targets has registered is remembered for a short while so the race
//! cannot leave two live connections behind.
//!
//! A connection's handle is also its mailbox: other tasks (the control
//! subscriber, the downlink reporter) post downlink commands and drain
//! requests to it, and the connection task takes them when it wakes. The
//! mailbox allocates only while mail waits, and is closed when the
//! connection ends, so that whatever is posted afterwards goes back to its
//! sender instead of being lost.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU16, AtomicU64, Ordering};
use std::time::Duration;

use std::task::{Context, Poll};

use dashmap::DashMap;
use futures::task::AtomicWaker;
use iot_core::{PhyId, TcpDownReason};
use parking_lot::Mutex;
use tokio::time::Instant;
use uuid::Uuid;

use crate::downlink::Mail;

/// How long a kick without a matching connection is remembered.
const KICK_MEMORY: Duration = Duration::from_secs(30);

/// `last_seen_ms` of a connection that does not read for now: never silent.
const PAUSED: u64 = u64::MAX;

/// The part of a connection other tasks can reach: who it is and a way to
/// ask it to close. Small on purpose: one per connection.
#[derive(Debug)]
pub struct ConnHandle {
    /// The connection id.
    pub conn_id: Uuid,
    /// The connection's epoch: taken at CONNECT, raised when the session is
    /// re-announced ([`crate::rebind`]); stamped on every event.
    epoch: AtomicU64,
    /// A new epoch for the connection task to take and announce with a
    /// `connected` event (0: none).
    announce: AtomicU64,
    /// Silence after which the connection is closed (1.5 x keepalive), ms.
    silence_ms: u64,
    /// When the device last sent anything, in [`Registry::now_ms`] units;
    /// [`PAUSED`] while the connection does not read (it waits for its
    /// QoS 1 uplinks to be written), so that our own back-pressure is not
    /// taken for the device's silence.
    last_seen_ms: AtomicU64,
    /// 0: open; otherwise 1 + the index of the close reason in
    /// [`TcpDownReason::ALL`].
    close: AtomicU8,
    /// The connection task, woken when a close is asked or mail arrives.
    waker: AtomicWaker,
    /// Whether mail waits (checked without the lock on every wake).
    has_mail: AtomicBool,
    /// Mail for the connection task.
    inbox: Mutex<Inbox>,
    /// The last packet id given to a downlink PUBLISH.
    pkid: AtomicU16,
}

/// A connection's mailbox.
#[derive(Debug, Default)]
struct Inbox {
    /// Allocated only while mail waits.
    #[allow(
        clippy::box_collection,
        reason = "one pointer instead of a 24-byte Vec in every connection's handle"
    )]
    mail: Option<Box<Vec<Mail>>>,
    /// The connection has ended: nothing is taken any more.
    closed: bool,
}

impl ConnHandle {
    /// A handle for a new connection that closes after `silence` without
    /// traffic; `now_ms` is [`Registry::now_ms`].
    pub fn new(conn_id: Uuid, epoch: u64, silence: Duration, now_ms: u64) -> Arc<Self> {
        Arc::new(Self {
            conn_id,
            epoch: AtomicU64::new(epoch),
            announce: AtomicU64::new(0),
            silence_ms: u64::try_from(silence.as_millis()).unwrap_or(u64::MAX),
            last_seen_ms: AtomicU64::new(now_ms),
            close: AtomicU8::new(0),
            waker: AtomicWaker::new(),
            has_mail: AtomicBool::new(false),
            inbox: Mutex::new(Inbox::default()),
            pkid: AtomicU16::new(0),
        })
    }

    /// Posts mail to the connection and wakes it; gives the mail back if the
    /// connection has ended.
    pub fn post(&self, mail: Mail) -> Result<(), Mail> {
        self.post_all(vec![mail])
            .map_err(|mut back| back.pop().expect("the one mail posted"))
    }

    /// Posts several mails at once, in order; gives them back if the
    /// connection has ended.
    pub fn post_all(&self, mail: Vec<Mail>) -> Result<(), Vec<Mail>> {
        if mail.is_empty() {
            return Ok(());
        }
        {
            let mut inbox = self.inbox.lock();
            if inbox.closed {
                return Err(mail);
            }
            match &mut inbox.mail {
                Some(waiting) => waiting.extend(mail),
                None => inbox.mail = Some(Box::new(mail)),
            }
            self.has_mail.store(true, Ordering::Release);
        }
        self.waker.wake();
        Ok(())
    }

    /// Whether mail waits.
    pub fn has_mail(&self) -> bool {
        self.has_mail.load(Ordering::Acquire)
    }

    /// Takes the waiting mail, oldest first.
    pub fn take_mail(&self) -> Vec<Mail> {
        let mut inbox = self.inbox.lock();
        self.has_mail.store(false, Ordering::Release);
        inbox.mail.take().map(|m| *m).unwrap_or_default()
    }

    /// Closes the mailbox (the connection has ended) and returns what was
    /// still waiting; later posts are refused.
    pub fn close_inbox(&self) -> Vec<Mail> {
        let mut inbox = self.inbox.lock();
        inbox.closed = true;
        self.has_mail.store(false, Ordering::Release);
        inbox.mail.take().map(|m| *m).unwrap_or_default()
    }

    /// The next packet id for a downlink PUBLISH: 1 to 65535, then around
    /// again (never 0), so a late PUBACK rarely meets a reused id.
    pub fn next_pkid(&self) -> u16 {
        loop {
            let id = self.pkid.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
            if id != 0 {
                return id;
            }
        }
    }

    /// The connection's epoch (stamped on its events).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The keepalive this connection is held to, in seconds (the silence
    /// allowance is 1.5 times it).
    pub fn keepalive_secs(&self) -> u16 {
        u16::try_from(self.silence_ms.saturating_mul(2) / 3 / 1000).unwrap_or(u16::MAX)
    }

    /// Asks the connection task to take `epoch` (if higher than its own) and
    /// announce the session again with a `connected` event; the task does
    /// both, so the announcement is ordered with the connection's own
    /// events (none is written for a connection that has ended).
    pub fn announce(&self, epoch: u64) {
        self.announce.fetch_max(epoch, Ordering::AcqRel);
        self.waker.wake();
    }

    /// Whether an announcement waits (see [`announce`](Self::announce)).
    pub fn has_announcement(&self) -> bool {
        self.announce.load(Ordering::Acquire) > self.epoch()
    }

    /// Takes a waiting announcement: the connection now has the new epoch,
    /// which is returned (`None`: none waits, or it is not higher).
    pub fn take_announcement(&self) -> Option<u64> {
        let next = self.announce.swap(0, Ordering::AcqRel);
        let prev = self.epoch.fetch_max(next, Ordering::AcqRel);
        (next > prev).then_some(next)
    }

    /// The device sent something at `now_ms` ([`Registry::now_ms`]).
    pub fn touch(&self, now_ms: u64) {
        self.last_seen_ms.store(now_ms, Ordering::Relaxed);
    }

    /// The connection stops reading for now (it waits for its own writes):
    /// the keepalive sweep leaves it alone until the next [`touch`](Self::touch).
    pub fn pause_silence(&self) {
        self.last_seen_ms.store(PAUSED, Ordering::Relaxed);
    }

    /// Whether [`pause_silence`](Self::pause_silence) holds.
    pub fn is_paused(&self) -> bool {
        self.last_seen_ms.load(Ordering::Relaxed) == PAUSED
    }

    /// Whether the device has been silent for its whole allowance at `now_ms`.
    pub fn is_silent(&self, now_ms: u64) -> bool {
        let last = self.last_seen_ms.load(Ordering::Relaxed);
        last != PAUSED && now_ms.saturating_sub(last) >= self.silence_ms
    }

    /// Asks the connection to close for `reason`. The first reason wins;
    /// returns whether this call set it.
    pub fn close(&self, reason: TcpDownReason) -> bool {
        let code = TcpDownReason::ALL
            .iter()
            .position(|r| *r == reason)
            .map_or(1, |i| i as u8 + 1);
        let set = self
            .close
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if set {
            self.waker.wake();
        }
        set
    }

    /// The close reason, once asked.
    pub fn close_reason(&self) -> Option<TcpDownReason> {
        match self.close.load(Ordering::Acquire) {
            0 => None,
            code => TcpDownReason::ALL.get(usize::from(code) - 1).copied(),
        }
    }

    /// Ready with the reason once the connection is asked to close; the
    /// connection task polls this with its other events (only the last
    /// task to poll is woken).
    pub fn poll_closed(&self, cx: &mut Context<'_>) -> Poll<TcpDownReason> {
        if let Some(r) = self.close_reason() {
            return Poll::Ready(r);
        }
        self.waker.register(cx.waker());
        // A close asked between the check and the registration.
        match self.close_reason() {
            Some(r) => Poll::Ready(r),
            None => Poll::Pending,
        }
    }

    /// Completes when the connection is asked to close.
    pub async fn closed(&self) -> TcpDownReason {
        std::future::poll_fn(|cx| self.poll_closed(cx)).await
    }
}

/// Where a takeover came from (metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// A newer CONNECT on this instance.
    Local,
    /// A kick from another instance.
    Remote,
}

impl Scope {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Scope::Local => "local",
            Scope::Remote => "remote",
        }
    }
}

/// Every device connection of this instance.
///
/// It also enforces keepalives: one sweep over all connections every
/// [`KEEPALIVE_SWEEP`] closes those silent for 1.5 x their keepalive. A
/// timer per connection would cost every idle connection its timer entry.
#[derive(Debug)]
pub struct Registry {
    conns: DashMap<PhyId, Arc<ConnHandle>>,
    /// Kicks that found no older connection here: phy -> (epoch, when).
    kicks: Mutex<HashMap<PhyId, (u64, Instant)>>,
    draining: AtomicBool,
    /// The zero of [`now_ms`](Self::now_ms).
    origin: Instant,
}

/// How often silent connections are looked for.
pub const KEEPALIVE_SWEEP: Duration = Duration::from_millis(200);

impl Default for Registry {
    fn default() -> Self {
        Self {
            conns: DashMap::new(),
            kicks: Mutex::new(HashMap::new()),
            draining: AtomicBool::new(false),
            origin: Instant::now(),
        }
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Milliseconds since the registry was made (a monotonic clock).
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Asks every connection silent for its allowance to close with
    /// `keepalive`; returns how many.
    pub fn expire_silent(&self) -> usize {
        let now = self.now_ms();
        self.conns
            .iter()
            .filter(|e| e.value().is_silent(now) && e.value().close(TcpDownReason::Keepalive))
            .count()
    }

    /// Sweeps for silent connections every [`KEEPALIVE_SWEEP`] until `shutdown`.
    pub fn spawn_keepalive(
        self: Arc<Self>,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(KEEPALIVE_SWEEP);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                self.expire_silent();
            }
        })
    }

    /// Registers a freshly accepted connection of `phy`. An older connection
    /// of the device is asked to close (takeover); if a newer one is already
    /// here, or a newer kick was seen, or the instance is draining, the new
    /// connection itself is asked to close.
    pub fn register(&self, phy: &PhyId, handle: &Arc<ConnHandle>) {
        let mut superseded = None;
        match self.conns.entry(phy.clone()) {
            dashmap::Entry::Occupied(mut e) => {
                if e.get().epoch() < handle.epoch() {
                    superseded = Some(e.insert(handle.clone()));
                } else {
                    handle.close(TcpDownReason::Takeover);
                }
            }
            dashmap::Entry::Vacant(e) => {
                e.insert(handle.clone());
            }
        }
        if let Some(old) = superseded
            && old.close(TcpDownReason::Takeover)
        {
            crate::metrics::takeover(Scope::Local.label());
            tracing::info!(
                old_conn_id = %old.conn_id,
                old_epoch = old.epoch(),
                new_epoch = handle.epoch(),
                "session taken over on this instance"
            );
        }
        if let Some(&(epoch, _)) = self.kicks.lock().get(phy)
            && epoch > handle.epoch()
        {
            handle.close(TcpDownReason::Takeover);
        }
        if self.draining.load(Ordering::SeqCst) {
            handle.close(TcpDownReason::ServerShutdown);
        }
    }

    /// Removes `handle` if it is still the device's registered connection.
    pub fn deregister(&self, phy: &PhyId, handle: &Arc<ConnHandle>) {
        self.conns.remove_if(phy, |_, h| Arc::ptr_eq(h, handle));
    }

    /// The connection that holds `phy` here, if any.
    pub fn get(&self, phy: &PhyId) -> Option<Arc<ConnHandle>> {
        self.conns.get(phy).map(|h| h.clone())
    }

    /// Asks the connection of `phy` with `epoch`, if it is still the
    /// device's connection here, to close for `reason`. Returns whether this
    /// call asked it.
    pub fn close_device(&self, phy: &PhyId, epoch: u64, reason: TcpDownReason) -> bool {
        self.get(phy)
            .filter(|h| h.epoch() == epoch)
            .is_some_and(|h| h.close(reason))
    }

    /// A kick from another instance: a connection of `phy` with an epoch
    /// lower than `epoch` closes with `takeover`. Returns whether one did.
    pub fn kick(&self, phy: &PhyId, epoch: u64) -> bool {
        let target = self
            .conns
            .get(phy)
            .filter(|h| h.epoch() < epoch)
            .map(|h| h.clone());
        match target {
            Some(h) => {
                let closed = h.close(TcpDownReason::Takeover);
                if closed {
                    crate::metrics::takeover(Scope::Remote.label());
                    tracing::info!(
                        phy_id = %phy,
                        conn_id = %h.conn_id,
                        old_epoch = h.epoch(),
                        new_epoch = epoch,
                        "session taken over by another instance"
                    );
                }
                closed
            }
            None => {
                let now = Instant::now();
                let mut kicks = self.kicks.lock();
                kicks.retain(|_, (_, at)| now.duration_since(*at) < KICK_MEMORY);
                let e = kicks.entry(phy.clone()).or_insert((epoch, now));
                if epoch >= e.0 {
                    *e = (epoch, now);
                }
                false
            }
        }
    }

    /// Stops taking connections and asks every one to close for `reason`.
    /// Returns how many were asked.
    pub fn close_all(&self, reason: TcpDownReason) -> usize {
        self.draining.store(true, Ordering::SeqCst);
        self.conns
            .iter()
            .filter(|e| e.value().close(reason))
            .count()
    }

    /// Whether [`close_all`](Self::close_all) was called.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Registered connections.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// Whether no connection is registered.
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Every registered device with its connection's epoch.
    pub fn snapshot(&self) -> Vec<(PhyId, u64)> {
        self.conns
            .iter()
            .map(|e| (e.key().clone(), e.value().epoch()))
            .collect()
    }

    /// Every registered device with its connection's handle.
    pub fn handles(&self) -> Vec<(PhyId, Arc<ConnHandle>)> {
        self.conns
            .iter()
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phy() -> PhyId {
        PhyId::new("dev-1").expect("valid")
    }

    #[tokio::test]
    async fn a_newer_connection_takes_over_an_older_one() {
        let r = Registry::new();
        let old = ConnHandle::new(Uuid::from_u128(1), 1, Duration::from_secs(60), 0);
        let new = ConnHandle::new(Uuid::from_u128(2), 2, Duration::from_secs(60), 0);
        r.register(&phy(), &old);
        assert_eq!(old.close_reason(), None);
        r.register(&phy(), &new);
        assert_eq!(old.closed().await, TcpDownReason::Takeover);
        assert_eq!(new.close_reason(), None);
        // The old one leaving does not remove the new one.
        r.deregister(&phy(), &old);
        assert_eq!(r.len(), 1);
        r.deregister(&phy(), &new);
        assert!(r.is_empty());
    }

    #[test]
    fn a_late_older_connection_closes_itself() {
        let r = Registry::new();
        let new = ConnHandle::new(Uuid::from_u128(2), 5, Duration::from_secs(60), 0);
        let late = ConnHandle::new(Uuid::from_u128(1), 4, Duration::from_secs(60), 0);
        r.register(&phy(), &new);
        r.register(&phy(), &late);
        assert_eq!(late.close_reason(), Some(TcpDownReason::Takeover));
        assert_eq!(new.close_reason(), None);
    }

    #[test]
    fn kicks_close_only_lower_epochs_and_are_remembered() {
        let r = Registry::new();
        let h = ConnHandle::new(Uuid::from_u128(1), 3, Duration::from_secs(60), 0);
        r.register(&phy(), &h);
        assert!(!r.kick(&phy(), 3), "same epoch stays");
        assert!(!r.kick(&phy(), 2));
        assert_eq!(h.close_reason(), None);
        assert!(r.kick(&phy(), 4));
        assert_eq!(h.close_reason(), Some(TcpDownReason::Takeover));

        // A kick that arrives before its target registers.
        let other = PhyId::new("dev-2").expect("valid");
        assert!(!r.kick(&other, 10));
        let late = ConnHandle::new(Uuid::from_u128(2), 9, Duration::from_secs(60), 0);
        r.register(&other, &late);
        assert_eq!(late.close_reason(), Some(TcpDownReason::Takeover));
        let newer = ConnHandle::new(Uuid::from_u128(3), 11, Duration::from_secs(60), 0);
        r.register(&other, &newer);
        assert_eq!(newer.close_reason(), None);
    }

    #[test]
    fn close_all_drains_and_refuses_newcomers() {
        let r = Registry::new();
        let a = ConnHandle::new(Uuid::from_u128(1), 1, Duration::from_secs(60), 0);
        r.register(&phy(), &a);
        assert_eq!(r.close_all(TcpDownReason::ServerShutdown), 1);
        assert_eq!(a.close_reason(), Some(TcpDownReason::ServerShutdown));
        let b = ConnHandle::new(Uuid::from_u128(2), 1, Duration::from_secs(60), 0);
        r.register(&PhyId::new("dev-2").expect("valid"), &b);
        assert_eq!(b.close_reason(), Some(TcpDownReason::ServerShutdown));
        assert!(r.is_draining());
    }

    #[tokio::test(start_paused = true)]
    async fn silent_connections_are_closed_for_keepalive() {
        let r = Registry::new();
        let quiet = ConnHandle::new(
            Uuid::from_u128(1),
            1,
            Duration::from_millis(1500),
            r.now_ms(),
        );
        let chatty = ConnHandle::new(
            Uuid::from_u128(2),
            1,
            Duration::from_millis(1500),
            r.now_ms(),
        );
        r.register(&phy(), &quiet);
        r.register(&PhyId::new("dev-2").expect("valid"), &chatty);
        tokio::time::advance(Duration::from_millis(1000)).await;
        chatty.touch(r.now_ms());
        assert_eq!(r.expire_silent(), 0);
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(r.expire_silent(), 1);
        assert_eq!(quiet.close_reason(), Some(TcpDownReason::Keepalive));
        assert_eq!(chatty.close_reason(), None);
        tokio::time::advance(Duration::from_millis(1000)).await;
        assert_eq!(r.expire_silent(), 1);
        assert_eq!(chatty.close_reason(), Some(TcpDownReason::Keepalive));
    }

    #[test]
    fn mail_waits_until_taken_and_is_refused_after_the_end() {
        let h = ConnHandle::new(Uuid::nil(), 1, Duration::from_secs(60), 0);
        assert!(!h.has_mail());
        assert!(h.take_mail().is_empty());
        h.post(Mail::Drain(None)).expect("open");
        h.post_all(vec![
            Mail::Drain(Some("a".into())),
            Mail::Drain(Some("b".into())),
        ])
        .expect("open");
        assert!(h.has_mail());
        let got = h.take_mail();
        assert_eq!(
            got,
            vec![
                Mail::Drain(None),
                Mail::Drain(Some("a".into())),
                Mail::Drain(Some("b".into()))
            ]
        );
        assert!(!h.has_mail());
        h.post(Mail::Drain(None)).expect("open");
        assert_eq!(h.close_inbox(), vec![Mail::Drain(None)]);
        assert_eq!(h.post(Mail::Drain(None)), Err(Mail::Drain(None)));
        assert!(!h.has_mail());
    }

    #[tokio::test]
    async fn mail_wakes_the_connection() {
        let h = ConnHandle::new(Uuid::nil(), 1, Duration::from_secs(60), 0);
        let waiter = {
            let h = h.clone();
            tokio::spawn(async move {
                std::future::poll_fn(|cx| {
                    if h.poll_closed(cx).is_ready() || h.has_mail() {
                        Poll::Ready(())
                    } else {
                        Poll::Pending
                    }
                })
                .await
            })
        };
        tokio::task::yield_now().await;
        h.post(Mail::Drain(None)).expect("open");
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .expect("task");
    }

    #[test]
    fn packet_ids_skip_zero() {
        let h = ConnHandle::new(Uuid::nil(), 1, Duration::from_secs(60), 0);
        assert_eq!(h.next_pkid(), 1);
        assert_eq!(h.next_pkid(), 2);
        h.pkid.store(u16::MAX - 1, Ordering::Relaxed);
        assert_eq!(h.next_pkid(), u16::MAX);
        assert_eq!(h.next_pkid(), 1, "0 is not a packet id");
    }

    #[test]
    fn devices_are_found_and_closed_by_epoch() {
        let r = Registry::new();
        let h = ConnHandle::new(Uuid::from_u128(1), 4, Duration::from_secs(60), 0);
        r.register(&phy(), &h);
        assert!(r.get(&phy()).is_some_and(|g| Arc::ptr_eq(&g, &h)));
        assert!(r.get(&PhyId::new("other").expect("valid")).is_none());
        assert!(
            !r.close_device(&phy(), 3, TcpDownReason::Revoked),
            "another epoch"
        );
        assert_eq!(h.close_reason(), None);
        assert!(r.close_device(&phy(), 4, TcpDownReason::Revoked));
        assert_eq!(h.close_reason(), Some(TcpDownReason::Revoked));
    }

    #[test]
    fn the_first_close_reason_wins() {
        let h = ConnHandle::new(Uuid::nil(), 1, Duration::from_secs(60), 0);
        assert!(h.close(TcpDownReason::Takeover));
        assert!(!h.close(TcpDownReason::ServerShutdown));
        assert_eq!(h.close_reason(), Some(TcpDownReason::Takeover));
        for reason in TcpDownReason::ALL {
            let h = ConnHandle::new(Uuid::nil(), 1, Duration::from_secs(60), 0);
            h.close(reason);
            assert_eq!(h.close_reason(), Some(reason));
        }
    }
}
