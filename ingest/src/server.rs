//! The accept loop: the connection limit, the per-IP connect rate and
//! `accept()` errors, then one task per connection.
//!
//! A connection over the limit or over its IP's rate is accepted and closed
//! at once (counted and logged, at most one line per second per cause), so
//! the listen backlog never fills with connections nobody will serve. When
//! `accept()` itself fails for lack of descriptors (EMFILE, ENFILE) the loop
//! backs off a few milliseconds instead of spinning.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::instance::Instance;
use crate::limits::RateLimiter;
use crate::protocol::RefuseReason;

/// Listen backlog of the device listener (the kernel caps it at somaxconn).
pub const BACKLOG: u32 = 4096;

/// Pause after an `accept()` failure.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

/// Binds the device listener with a backlog fit for connect storms.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// At most one log line per interval for a repeated condition.
#[derive(Debug)]
pub struct LogThrottle {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogThrottle {
    /// One line per `every`.
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// Records an occurrence; `Some(n)` when a line should be logged now,
    /// with `n` occurrences left unlogged since the last line.
    pub fn hit(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(t) if now.duration_since(t) < self.every => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// Accepts device connections until `inst.shutdown` is cancelled; each runs
/// in `tracker`, inside its own tracing span.
pub async fn accept_loop(
    inst: Arc<Instance>,
    listener: TcpListener,
    mut limiter: RateLimiter,
    tracker: TaskTracker,
) {
    let mut full_log = LogThrottle::new(Duration::from_secs(1));
    let mut rate_log = LogThrottle::new(Duration::from_secs(1));
    let mut error_log = LogThrottle::new(Duration::from_secs(1));
    loop {
        let accepted = tokio::select! {
            _ = inst.shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(v) => v,
            Err(e) => {
                if is_transient(&e) {
                    continue;
                }
                if let Some(suppressed) = error_log.hit() {
                    tracing::error!(error = %e, suppressed, "accept failed; backing off");
                }
                if is_fd_exhaustion(&e) {
                    crate::metrics::refused("fd_exhausted");
                }
                tokio::select! {
                    _ = inst.shutdown.cancelled() => break,
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                }
                continue;
            }
        };
        if !limiter.allow(peer.ip()) {
            crate::metrics::refused(RefuseReason::RateLimited.label());
            if let Some(suppressed) = rate_log.hit() {
                tracing::warn!(%peer, suppressed, "connection refused: over the per-IP connect rate (mqtt.connect_rate_per_ip)");
            }
            drop(stream);
            continue;
        }
        let Ok(permit) = inst.slots.try_acquire() else {
            crate::metrics::refused(RefuseReason::MaxConnections.label());
            if let Some(suppressed) = full_log.hit() {
                tracing::warn!(%peer, suppressed, "connection refused: connection limit reached (mqtt.max_connections)");
            }
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        // The connection task gives the slot back (see `connection::serve`).
        // Its work runs in `conn` spans it makes per step (see
        // `connection`), so an idle connection holds no span.
        permit.forget();
        tracker.spawn(crate::connection::serve(inst.clone(), stream));
    }
}

/// Errors of one incoming connection that say nothing about the listener.
fn is_transient(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::Interrupted
            | std::io::ErrorKind::WouldBlock
    )
}

fn is_fd_exhaustion(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn throttled_logging_counts_what_it_skips() {
        let mut t = LogThrottle::new(Duration::from_secs(1));
        assert_eq!(t.hit(), Some(0));
        assert_eq!(t.hit(), None);
        assert_eq!(t.hit(), None);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(t.hit(), Some(2));
        assert_eq!(t.hit(), None);
    }

    #[test]
    fn fd_exhaustion_is_recognised() {
        assert!(is_fd_exhaustion(&std::io::Error::from_raw_os_error(
            libc::EMFILE
        )));
        assert!(is_fd_exhaustion(&std::io::Error::from_raw_os_error(
            libc::ENFILE
        )));
        assert!(!is_fd_exhaustion(&std::io::Error::from_raw_os_error(
            libc::ECONNABORTED
        )));
        assert!(is_transient(&std::io::Error::from_raw_os_error(
            libc::ECONNABORTED
        )));
    }
}
