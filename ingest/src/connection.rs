//! One device connection: the only task per socket, from accept to close.
//!
//! 1. Handshake (boxed, since it is large and runs once): read the hello
//!    within `mqtt.connect_timeout`, authenticate, take the epoch and the
//!    ownership in Redis (a failure answers "server unavailable"), register
//!    locally (closing an older connection of the device), kick the previous
//!    owner instance, queue `connected`, answer CONNACK.
//! 2. Session loop: wait for bytes, a close request (takeover, shutdown,
//!    keepalive expiry found by the registry's sweep, revocation), the write
//!    of a QoS 1 uplink, mail (downlink commands, drain requests) or the
//!    downlink timer; decode with the [`DeviceProtocol`], hand events to the
//!    writer, answer, deliver commands ([`crate::downlink`]) and hand their
//!    state changes to the [`crate::reporter`].
//! 3. Close: deregister, hand the commands still held to the reporter
//!    (they follow a takeover, go back to the queue or fail), and queue
//!    `disconnected` or `tcp_down(reason)`.
//!
//! Memory matters (tens of thousands of idle connections per process): an
//! idle connection holds no read buffer (it waits for readability, reads
//! into a buffer allocated then, and frees it once drained), no timer, no
//! per-connection channel, and a task future kept small ([`task_size`]:
//! about 210 bytes in a release build); the rarely used big steps
//! (handshake, decoding, answering, downlinks) run in boxed futures. What a
//! busy connection holds (QoS 1 uplinks waiting for their write, commands
//! in flight and their timer) sits behind one pointer, allocated while it
//! is busy.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Duration;

use bytes::BytesMut;
use iot_core::event::Heartbeat;
use iot_core::{Event, EventKind, PhyId, TcpDownReason};
use iot_service::Status;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};
use tracing::Instrument;
use uuid::Uuid;

use crate::auth::Decision;
use crate::downlink::{Delivery, Downlinks, Effect, Mail, Step};
use crate::instance::Instance;
use crate::protocol::{DeviceProtocol, Hello, Inbound, Refusal, RefuseReason};
use crate::registry::ConnHandle;
use crate::reporter::Report;

/// Bytes reserved for each read.
const READ_CHUNK: usize = 512;
/// QoS 1 uplinks waiting for their write before reading stops.
const MAX_PENDING_ACKS: usize = 32;
/// Longest a write to a device may block (its receive window is full).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves one accepted socket until it closes. The accept loop has taken
/// (and forgotten) a permit of `inst.slots` for it; it is given back when
/// the returned future ends or is dropped.
pub fn serve(inst: Arc<Instance>, stream: TcpStream) -> impl Future<Output = ()> + Send + 'static {
    let proto = inst.protocol;
    connection(inst, proto, stream)
}

/// Size in bytes of the task future of one connection, i.e. what an idle
/// connection costs besides its socket, its handle and its tracing span.
pub fn task_size() -> usize {
    fn output_size<A, B, F: std::future::Future>(_: impl FnOnce(A, B) -> F) -> usize {
        std::mem::size_of::<F>()
    }
    output_size(serve)
}

/// What the handshake hands to the session loop.
struct Established<S> {
    session: S,
    conn: Conn,
    /// Bytes that arrived after the hello.
    buf: BytesMut,
}

/// An accepted connection: its device and its handle (which carries the
/// connection id and epoch stamped on its events).
struct Conn {
    phy: PhyId,
    handle: Arc<ConnHandle>,
}

impl Conn {
    fn event(&self, inst: &Instance, kind: EventKind) -> Event {
        Event {
            phy_id: self.phy.clone(),
            conn_id: self.handle.conn_id,
            server_id: inst.server_id.clone(),
            epoch: self.handle.epoch(),
            ts_ms: iot_core::time::now_ms(),
            kind,
        }
    }

    /// The connection's tracing span. Every piece of the connection's work
    /// (the handshake, each batch of packets, each downlink step, the close)
    /// runs in a `conn` span with the device and connection ids, but the
    /// span is made for that piece of work and dropped after it, not kept
    /// for the life of the connection: an idle connection would otherwise
    /// pay ~0.3 KiB for the span's formatted fields (measured; see
    /// BENCHMARKS.md). Log lines carry the same fields either way.
    fn span(&self) -> tracing::Span {
        tracing::info_span!("conn", phy_id = %self.phy, conn_id = %self.handle.conn_id)
    }

    fn heartbeat(&self) -> Heartbeat {
        Heartbeat {
            phy_id: self.phy.clone(),
            conn_id: self.handle.conn_id,
            epoch: self.handle.epoch(),
            ts_ms: iot_core::time::now_ms(),
        }
    }
}

async fn handshake<P: DeviceProtocol>(
    inst: &Instance,
    proto: &P,
    stream: &mut TcpStream,
) -> Option<Established<P::Session>> {
    let mut buf = BytesMut::new();
    let read = tokio::time::timeout(
        inst.connect_timeout,
        read_hello(proto, stream, &mut buf, inst),
    );
    let hello = tokio::select! {
        r = read => match r {
            Ok(Ok(hello)) => hello,
            Ok(Err(refusal)) => return refuse(proto, stream, refusal).await,
            Err(_) => {
                let detail = format!(
                    "no complete CONNECT within {:?} of accept ({} bytes received)",
                    inst.connect_timeout,
                    buf.len()
                );
                return refuse(proto, stream, Refusal::new(RefuseReason::ConnectTimeout, detail)).await;
            }
        },
        _ = inst.shutdown.cancelled() => {
            let r = Refusal::new(RefuseReason::ShuttingDown, "the instance is shutting down");
            return refuse(proto, stream, r).await;
        }
    };
    let span = tracing::Span::current();
    span.record("phy_id", tracing::field::display(&hello.phy));

    let peer_ip: Option<IpAddr> = stream.peer_addr().ok().map(|a| a.ip());
    match inst.auth.authenticate(&hello, peer_ip).await {
        Decision::Allow => {}
        Decision::Deny(why) => {
            let r = Refusal::new(RefuseReason::NotAuthorized, why);
            return refuse(proto, stream, r).await;
        }
        Decision::Unavailable(why) => {
            let r = Refusal::new(RefuseReason::ServerUnavailable, why);
            return refuse(proto, stream, r).await;
        }
    }
    if inst.health.status_of(crate::writer::HEALTH_CHECK) != Some(Status::Ok) {
        let r = Refusal::new(
            RefuseReason::ServerUnavailable,
            "events cannot be written to Redis right now",
        );
        return refuse(proto, stream, r).await;
    }
    let claim = tokio::time::timeout(
        inst.redis_timeout,
        inst.takeover.claim(&inst.redis, &hello.phy),
    )
    .await;
    let claim = match claim {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            crate::metrics::redis_error("claim");
            let r = Refusal::new(
                RefuseReason::ServerUnavailable,
                format!("cannot take an epoch in Redis: {e}"),
            );
            return refuse(proto, stream, r).await;
        }
        Err(_) => {
            crate::metrics::redis_error("claim");
            let r = Refusal::new(
                RefuseReason::ServerUnavailable,
                format!("Redis did not answer within {:?}", inst.redis_timeout),
            );
            return refuse(proto, stream, r).await;
        }
    };

    let silence = hello.keepalive + hello.keepalive / 2;
    let conn = Conn {
        phy: hello.phy.clone(),
        handle: ConnHandle::new(Uuid::new_v4(), claim.epoch, silence, inst.registry.now_ms()),
    };
    span.record("conn_id", tracing::field::display(conn.handle.conn_id));
    inst.registry.register(&conn.phy, &conn.handle);
    if let Some(prev) = claim.previous.filter(|p| p.server_id != inst.server_id) {
        let kick = inst
            .takeover
            .kick(&inst.redis, &prev.server_id, &conn.phy, claim.epoch);
        match tokio::time::timeout(inst.redis_timeout, kick).await {
            Ok(Ok(())) => tracing::info!(
                previous_owner = %prev.server_id,
                previous_epoch = prev.epoch,
                "asked the previous owner instance to close its connection"
            ),
            Ok(Err(e)) => {
                crate::metrics::redis_error("kick");
                tracing::warn!(previous_owner = %prev.server_id, error = %e, "cannot send the takeover kick");
            }
            Err(_) => {
                crate::metrics::redis_error("kick");
                tracing::warn!(previous_owner = %prev.server_id, "sending the takeover kick timed out");
            }
        }
    }

    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    tracing::info!(
        %peer,
        epoch = claim.epoch,
        keepalive_secs = hello.keepalive_secs,
        enforced_keepalive_secs = hello.keepalive.as_secs(),
        "device connected"
    );
    let connected = EventKind::Connected {
        keepalive_secs: hello.keepalive_secs,
        peer,
    };
    inst.writer.event(conn.event(inst, connected)).await;
    crate::metrics::connected();
    inst.connections.fetch_add(1, Ordering::Relaxed);
    let mut out = BytesMut::new();
    proto.write_accept(&mut out);
    // A failed write shows up as a reset on the next read.
    let _ = write_out(stream, &out).await;
    if buf.is_empty() {
        // The usual case: nothing came after CONNECT. Do not keep the
        // handshake's read buffer for the life of an idle connection.
        buf = BytesMut::new();
    }
    Some(Established {
        session: proto.start(&hello),
        conn,
        buf,
    })
}

async fn read_hello<P: DeviceProtocol>(
    proto: &P,
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    inst: &Instance,
) -> Result<Hello, Refusal> {
    loop {
        if let Some(hello) = proto.read_hello(buf, &inst.limits)? {
            return Ok(hello);
        }
        buf.reserve(READ_CHUNK);
        match stream.read_buf(buf).await {
            Ok(0) => {
                return Err(Refusal::new(
                    RefuseReason::ClosedBeforeConnect,
                    format!(
                        "the peer closed the connection before CONNECT ({} bytes received)",
                        buf.len()
                    ),
                ));
            }
            Ok(_) => {}
            Err(e) => {
                return Err(Refusal::new(
                    RefuseReason::ClosedBeforeConnect,
                    format!("read failed before CONNECT: {e}"),
                ));
            }
        }
    }
}

/// Answers a refused hello (if the protocol has an answer), counts and logs
/// it; the caller then drops (closes) the socket.
async fn refuse<P: DeviceProtocol, S>(
    proto: &P,
    stream: &mut TcpStream,
    refusal: Refusal,
) -> Option<S> {
    let mut out = BytesMut::new();
    proto.write_refusal(refusal.reason, &mut out);
    if !out.is_empty() {
        let _ = write_out(stream, &out).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
    }
    crate::metrics::refused(refusal.reason.label());
    let reason = refusal.reason.label();
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "unknown".to_owned(), |a| a.to_string());
    match refusal.reason {
        RefuseReason::ConnectTimeout
        | RefuseReason::ClosedBeforeConnect
        | RefuseReason::ShuttingDown => {
            tracing::info!(reason, %peer, detail = %refusal.detail, "connection closed before CONNECT completed");
        }
        _ => tracing::warn!(reason, %peer, detail = %refusal.detail, "CONNECT refused"),
    }
    None
}

/// How a session ended.
enum End {
    /// DISCONNECT: a clean leave.
    Disconnect,
    /// Any other end.
    Down(TcpDownReason),
}

/// The whole life of a connection, in one future (nesting a second future
/// for the session would keep a copy of the handshake's result beside it).
async fn connection<P: DeviceProtocol>(inst: Arc<Instance>, proto: P, mut stream: TcpStream) {
    // Released when this future ends (or is dropped), whatever the path.
    let _slot = Slot(&inst.slots);
    // The handshake's span fills in the ids as they become known.
    let hello_span = tracing::info_span!(
        "conn",
        phy_id = tracing::field::Empty,
        conn_id = tracing::field::Empty
    );
    let Some(mut est) =
        Box::pin(handshake(&inst, &proto, &mut stream).instrument(hello_span)).await
    else {
        return;
    };
    // Fields are used in place: destructuring would copy them into a second
    // set of slots in this (long-lived) future.
    // Keepalive is enforced by the registry's sweep (see `Registry`): the
    // connection only reports traffic, and hears `keepalive` as a close.
    let mut busy = Busy::default();

    let end = loop {
        if !est.buf.is_empty() && busy.acks_len() < MAX_PENDING_ACKS {
            // Boxed: decoding and queueing events needs far more stack
            // than waiting, and an idle connection only waits.
            let step = process(
                &inst,
                &proto,
                &mut est.session,
                &est.conn,
                &mut stream,
                &mut est.buf,
                &mut busy,
            );
            if let Err(end) = Box::pin(step.instrument(est.conn.span())).await {
                break end;
            }
            if est.buf.is_empty() {
                // Drop the allocation while idle.
                est.buf = BytesMut::new();
            }
        }
        // One hand-written poll instead of `select!`: the futures of a
        // select (readiness, notification) would live in every idle
        // connection's task; polling the socket, the close flag, the
        // mailbox, the downlink timer and the oldest pending write directly
        // keeps the task small.
        let can_read = busy.acks_len() < MAX_PENDING_ACKS;
        // Not reading is our doing (the QoS 1 uplinks wait for Redis), not
        // the device's silence: the keepalive clock waits too.
        if !can_read {
            est.conn.handle.pause_silence();
        } else if est.conn.handle.is_paused() {
            est.conn.handle.touch(inst.registry.now_ms());
        }
        let wake = std::future::poll_fn(|cx| {
            if let Poll::Ready(reason) = est.conn.handle.poll_closed(cx) {
                return Poll::Ready(Wake::Close(reason));
            }
            // Checked after `poll_closed` registered the waker: a post
            // after this check wakes the task.
            if est.conn.handle.has_announcement() {
                return Poll::Ready(Wake::Announce);
            }
            if est.conn.handle.has_mail() {
                return Poll::Ready(Wake::Downlink);
            }
            if busy.poll_timer(cx).is_ready() {
                return Poll::Ready(Wake::Downlink);
            }
            if let Some((_, rx)) = busy.front_ack_mut()
                && let Poll::Ready(written) = Pin::new(rx).poll(cx)
            {
                return Poll::Ready(Wake::Written(written.is_ok()));
            }
            if can_read && let Poll::Ready(r) = stream.poll_read_ready(cx) {
                return Poll::Ready(Wake::Readable(r.is_ok()));
            }
            Poll::Pending
        })
        .await;
        match wake {
            Wake::Close(reason) => break End::Down(reason),
            Wake::Announce => {
                // Boxed like `process`: not part of the idle state.
                Box::pin(announce(&inst, &est.conn, &stream).instrument(est.conn.span())).await;
            }
            Wake::Downlink => {
                // Boxed like `process`: not part of the idle state.
                let step = downlinks(
                    &inst,
                    &proto,
                    &est.session,
                    &est.conn,
                    &mut stream,
                    &mut busy,
                );
                if let Err(end) = Box::pin(step.instrument(est.conn.span())).await {
                    break end;
                }
            }
            Wake::Written(ok) => {
                let Some((pkid, _)) = busy.pop_ack() else {
                    continue;
                };
                if ok {
                    // Boxed like `process`: not part of the idle state.
                    let ack = Box::pin(async {
                        let mut out = BytesMut::new();
                        proto.write_uplink_ack(pkid, &mut out);
                        write_out(&mut stream, &out).await
                    });
                    if ack.await.is_err() {
                        break End::Down(TcpDownReason::Reset);
                    }
                } else {
                    let _span = est.conn.span().entered();
                    tracing::warn!(
                        pkid,
                        "uplink dropped before it was written (writer buffer full); no PUBACK"
                    );
                }
            }
            Wake::Readable(ok) => {
                if !ok {
                    break End::Down(TcpDownReason::Reset);
                }
                est.buf.reserve(READ_CHUNK);
                match stream.try_read_buf(&mut est.buf) {
                    Ok(0) => break End::Down(TcpDownReason::Closed),
                    Ok(_) => est.conn.handle.touch(inst.registry.now_ms()),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => break End::Down(TcpDownReason::Reset),
                }
                if est.buf.is_empty() {
                    est.buf = BytesMut::new();
                }
            }
        }
    };
    let span = est.conn.span();
    let inst = &inst;
    // Boxed and in the connection's span, like every other step.
    Box::pin(
        async move {
            drop(est.buf);
            inst.registry.deregister(&est.conn.phy, &est.conn.handle);
            // Mail posted from now on goes back to its sender.
            let unread = est.conn.handle.close_inbox();
            let takeover = matches!(end, End::Down(TcpDownReason::Takeover));
            close_downlinks(inst, &est.conn, busy, unread, takeover);
            inst.connections.fetch_sub(1, Ordering::Relaxed);
            let (kind, label) = match end {
                End::Disconnect => (EventKind::Disconnected, "disconnect"),
                End::Down(reason) => (EventKind::TcpDown { reason }, reason.as_str()),
            };
            inst.writer.event(est.conn.event(inst, kind)).await;
            crate::metrics::disconnected(label);
            tracing::info!(
                reason = label,
                epoch = est.conn.handle.epoch(),
                "device connection closed"
            );
        }
        .instrument(span),
    )
    .await;
}

/// Takes the new epoch waiting on the connection's handle and announces the
/// session again with a `connected` event of that epoch ([`crate::rebind`]).
async fn announce(inst: &Instance, conn: &Conn, stream: &TcpStream) {
    let Some(epoch) = conn.handle.take_announcement() else {
        return;
    };
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let connected = EventKind::Connected {
        keepalive_secs: conn.handle.keepalive_secs(),
        peer,
    };
    inst.writer.event(conn.event(inst, connected)).await;
    tracing::info!(epoch, "session announced again with a new epoch");
}

/// A connection's place under the connection limit, taken by the accept
/// loop ([`crate::server`]) and given back here. A reference to the
/// instance's semaphore: half the size of a semaphore permit, in a future
/// that every idle connection keeps.
struct Slot<'a>(&'a tokio::sync::Semaphore);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.add_permits(1);
    }
}

/// What a busy connection holds: QoS 1 uplinks waiting for their write
/// (oldest first), downlink commands and their timer. Allocated on first
/// use; the downlink part is freed again when no command is held, so an
/// idle connection pays one pointer.
#[derive(Default)]
struct Busy(Option<Box<BusyParts>>);

#[derive(Default)]
struct BusyParts {
    acks: VecDeque<PendingAck>,
    downlinks: Downlinks,
    /// Set while commands are held: when [`Downlinks::tick`] is due.
    timer: Option<Pin<Box<Sleep>>>,
}

/// A QoS 1 uplink's packet id and the signal that its event is written.
type PendingAck = (u16, oneshot::Receiver<()>);

impl Busy {
    fn acks_len(&self) -> usize {
        self.0.as_ref().map_or(0, |b| b.acks.len())
    }

    fn front_ack_mut(&mut self) -> Option<&mut PendingAck> {
        self.0.as_mut()?.acks.front_mut()
    }

    fn pop_ack(&mut self) -> Option<PendingAck> {
        self.0.as_mut()?.acks.pop_front()
    }

    fn push_ack(&mut self, pending: PendingAck) {
        self.0
            .get_or_insert_with(Box::default)
            .acks
            .push_back(pending);
    }

    /// The downlink state, allocated if needed.
    fn downlinks(&mut self) -> &mut Downlinks {
        &mut self.0.get_or_insert_with(Box::default).downlinks
    }

    /// The downlink state, if allocated.
    fn held_downlinks(&mut self) -> Option<&mut Downlinks> {
        self.0.as_mut().map(|b| &mut b.downlinks)
    }

    /// Commands in flight and waiting.
    fn held(&self) -> (usize, usize) {
        self.0
            .as_ref()
            .map_or((0, 0), |b| (b.downlinks.inflight(), b.downlinks.waiting()))
    }

    /// Ready when the downlink timer fires.
    fn poll_timer(&mut self, cx: &mut std::task::Context<'_>) -> Poll<()> {
        match self.0.as_mut().and_then(|b| b.timer.as_mut()) {
            Some(t) => t.as_mut().poll(cx),
            None => Poll::Pending,
        }
    }

    /// Sets the timer for the next downlink deadline, or removes it (and
    /// frees everything once nothing is held).
    fn rearm(&mut self, ack_timeout: Duration) {
        let Some(parts) = self.0.as_mut() else {
            return;
        };
        match parts.downlinks.next_deadline(ack_timeout) {
            Some(at) => match &mut parts.timer {
                Some(t) => t.as_mut().reset(at),
                None => parts.timer = Some(Box::pin(tokio::time::sleep_until(at))),
            },
            None => parts.timer = None,
        }
        if parts.acks.is_empty() && parts.downlinks.is_empty() {
            self.0 = None;
        }
    }

    /// Takes the downlink state (the connection has ended).
    fn take_downlinks(&mut self) -> Downlinks {
        self.0
            .as_mut()
            .map(|b| std::mem::take(&mut b.downlinks))
            .unwrap_or_default()
    }
}

/// What woke an idle connection.
enum Wake {
    /// A close was asked (takeover, shutdown).
    Close(TcpDownReason),
    /// The session is to be announced again with a new epoch.
    Announce,
    /// Mail arrived or the downlink timer fired.
    Downlink,
    /// The oldest pending QoS 1 uplink was written (true) or dropped.
    Written(bool),
    /// The socket is readable (false: it failed).
    Readable(bool),
}

/// Decodes and handles every complete input in `buf` (stopping early while
/// too many QoS 1 uplinks wait for their write).
async fn process<P: DeviceProtocol>(
    inst: &Instance,
    proto: &P,
    session: &mut P::Session,
    conn: &Conn,
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    busy: &mut Busy,
) -> Result<(), End> {
    let mut out = BytesMut::new();
    let mut alive = false;
    let mut result = Ok(());
    let mut effects = Vec::new();
    let held = busy.held();
    while busy.acks_len() < MAX_PENDING_ACKS {
        match proto.read(session, &conn.phy, buf, &inst.limits, &mut out) {
            Ok(None) => break,
            Ok(Some(Inbound::Alive)) => alive = true,
            Ok(Some(Inbound::DownlinkAck(pkid))) => {
                alive = true;
                let mut step = conn.step(inst, &mut effects);
                match busy.held_downlinks().and_then(|d| d.ack(pkid, &mut step)) {
                    Some(after) => crate::metrics::downlink_acked_after(after),
                    None => tracing::debug!(pkid, "PUBACK for no command in flight"),
                }
            }
            Ok(Some(Inbound::Subscribed)) => {
                alive = true;
                inst.reporter
                    .report(&conn.phy, conn.handle.epoch(), Report::Drain);
            }
            Ok(Some(Inbound::Uplink {
                topic,
                qos,
                payload,
                ack,
            })) => {
                let kind = EventKind::Uplink {
                    topic,
                    qos,
                    payload: payload.to_vec(),
                };
                let event = conn.event(inst, kind);
                match ack {
                    None => {
                        inst.writer.event(event).await;
                    }
                    Some(pkid) => {
                        if let Some(rx) = inst.writer.event_acked(event).await {
                            busy.push_ack((pkid, rx));
                        }
                    }
                }
            }
            Ok(Some(Inbound::Disconnect)) => {
                result = Err(End::Disconnect);
                break;
            }
            Err(v) => {
                crate::metrics::violation(v.kind);
                tracing::warn!(kind = v.kind, detail = %v.detail, "protocol violation; closing the connection");
                result = Err(End::Down(TcpDownReason::ProtocolError));
                break;
            }
        }
    }
    if !effects.is_empty() {
        apply(inst, proto, conn, busy, effects, &mut out).await;
    }
    busy.rearm(inst.downlink.ack_timeout);
    count_held(held, busy.held());
    if !out.is_empty() && write_out(stream, &out).await.is_err() && result.is_ok() {
        result = Err(End::Down(TcpDownReason::Reset));
    }
    if alive {
        inst.writer.heartbeat(conn.heartbeat()).await;
    }
    result
}

impl Conn {
    /// A downlink step at the current time, with this connection's packet
    /// ids, collecting into `out`.
    fn step<'a>(&'a self, inst: &Instance, out: &'a mut Vec<Effect>) -> Step<'a> {
        Step {
            now: Instant::now(),
            now_ms: iot_core::time::now_ms(),
            limits: inst.downlink,
            pkids: &*self.handle,
            out,
        }
    }
}

/// Handles the mailbox (commands, drain requests) and the downlink timer.
async fn downlinks<P: DeviceProtocol>(
    inst: &Instance,
    proto: &P,
    session: &P::Session,
    conn: &Conn,
    stream: &mut TcpStream,
    busy: &mut Busy,
) -> Result<(), End> {
    let held = busy.held();
    let mut effects = Vec::new();
    let mut deliveries: Vec<Delivery> = Vec::new();
    for mail in conn.handle.take_mail() {
        match mail {
            Mail::Deliver(d) => deliveries.push(d),
            Mail::Drain(name) => {
                if proto.listens(session, name.as_deref()) {
                    inst.reporter
                        .report(&conn.phy, conn.handle.epoch(), Report::Drain);
                }
            }
        }
    }
    let listens = |name: &str| proto.listens(session, Some(name));
    if !deliveries.is_empty() {
        let mut step = conn.step(inst, &mut effects);
        busy.downlinks().offer(deliveries, &listens, &mut step);
    }
    if let Some(held) = busy.held_downlinks()
        && held
            .next_deadline(inst.downlink.ack_timeout)
            .is_some_and(|at| at <= Instant::now())
    {
        let mut step = conn.step(inst, &mut effects);
        held.tick(&mut step);
    }
    let mut out = BytesMut::new();
    apply(inst, proto, conn, busy, effects, &mut out).await;
    busy.rearm(inst.downlink.ack_timeout);
    count_held(held, busy.held());
    if !out.is_empty() && write_out(stream, &out).await.is_err() {
        return Err(End::Down(TcpDownReason::Reset));
    }
    Ok(())
}

/// Carries out downlink effects: PUBLISHes into `out`, reports to the
/// reporter, events to the writer. A PUBLISH the protocol cannot encode is
/// not reported sent: its command fails (`rejected`) and the next waiting
/// one takes its place, which may be refused in turn.
async fn apply<P: DeviceProtocol>(
    inst: &Instance,
    proto: &P,
    conn: &Conn,
    busy: &mut Busy,
    mut effects: Vec<Effect>,
    out: &mut BytesMut,
) {
    loop {
        let rejected = apply_once(inst, proto, conn, effects, out).await;
        if rejected.is_empty() {
            return;
        }
        let Some(held) = busy.held_downlinks() else {
            return;
        };
        effects = Vec::new();
        let mut step = conn.step(inst, &mut effects);
        for pkid in rejected {
            held.reject(pkid, &mut step);
        }
    }
}

/// One pass of [`apply`]: returns the packet ids of the PUBLISHes that
/// could not be encoded (their `Sent` reports, which follow them, are
/// dropped).
async fn apply_once<P: DeviceProtocol>(
    inst: &Instance,
    proto: &P,
    conn: &Conn,
    effects: Vec<Effect>,
    out: &mut BytesMut,
) -> Vec<u16> {
    let mut rejected = Vec::new();
    let mut unsent = false;
    for effect in effects {
        match effect {
            Effect::Publish {
                pkid,
                dup,
                name,
                payload,
            } => {
                unsent = !proto.write_downlink(&conn.phy, &name, &payload, pkid, dup, out);
                if unsent {
                    tracing::warn!(%name, pkid, "downlink cannot be encoded for the device; the command fails (rejected)");
                    rejected.push(pkid);
                } else {
                    crate::metrics::downlink_publish(dup);
                }
            }
            Effect::Report(report) => {
                if std::mem::take(&mut unsent) && matches!(report, Report::Sent { .. }) {
                    continue;
                }
                count_outcome(&report);
                inst.reporter.report(&conn.phy, conn.handle.epoch(), report);
            }
            Effect::Event(kind) => {
                unsent = false;
                inst.writer.event(conn.event(inst, kind)).await;
            }
        }
    }
    rejected
}

/// Counts what a report decides about a command.
fn count_outcome(report: &Report) {
    let (outcome, n) = match report {
        Report::Acked { .. } => ("acked", 1),
        Report::TimedOut { .. } => ("timed_out", 1),
        Report::Expired { .. } => ("expired", 1),
        Report::Failed { reason, .. } => (reason.as_str(), 1),
        Report::Park { .. } => ("parked", 1),
        Report::Requeue { items, .. } => ("requeued", items.len() as u64),
        Report::Forward { .. } => ("forwarded", 1),
        Report::Sent { .. } | Report::Waiting { .. } | Report::Drain => return,
    };
    crate::metrics::downlink_outcome(outcome, n);
}

/// Moves the instance's inflight and waiting gauges by a connection's change.
fn count_held(before: (usize, usize), after: (usize, usize)) {
    if before != after {
        crate::metrics::downlink_held(
            after.0 as i64 - before.0 as i64,
            after.1 as i64 - before.1 as i64,
        );
    }
}

/// The connection has ended: its commands (held, or in mail that came too
/// late) follow a takeover, go back to the queue or fail.
fn close_downlinks(
    inst: &Instance,
    conn: &Conn,
    mut busy: Busy,
    unread: Vec<Mail>,
    takeover: bool,
) {
    let held = busy.held();
    let unread = unread.into_iter().filter_map(|m| match m {
        Mail::Deliver(d) => Some(d),
        Mail::Drain(_) => None,
    });
    let reports = busy
        .take_downlinks()
        .close(takeover, unread, iot_core::time::now_ms());
    count_held(held, (0, 0));
    if !reports.is_empty() {
        tracing::info!(
            commands = reports.len(),
            takeover,
            "connection closed with downlink commands held"
        );
    }
    for report in reports {
        count_outcome(&report);
        inst.reporter.report(&conn.phy, conn.handle.epoch(), report);
    }
}

/// Writes `bytes`: directly while the socket takes them (the usual case for
/// a few bytes of answer), else waiting at most [`WRITE_TIMEOUT`].
async fn write_out(stream: &mut TcpStream, bytes: &[u8]) -> io::Result<()> {
    let mut written = 0;
    while written < bytes.len() {
        match stream.try_write(&bytes[written..]) {
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let rest = &bytes[written..];
                let slow = Box::pin(tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(rest)));
                return match slow.await {
                    Ok(r) => r,
                    Err(_) => Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the device does not read its answers",
                    )),
                };
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_task_stays_small() {
        let size = task_size();
        // 224 bytes in a debug build, 208 in release when this was written.
        // tokio rounds a task cell up to 128 bytes and adds ~150 bytes to
        // the future: staying under ~230 keeps the cell at 384 bytes.
        println!("connection task future: {size} bytes");
        assert!(size <= 232, "connection task future is {size} bytes");
    }
}
