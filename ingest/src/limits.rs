//! How many device connections this process can hold, and the per-IP
//! connect rate limiter.
//!
//! Every connection is a file descriptor. At start the ingest raises its soft
//! `RLIMIT_NOFILE` to the hard limit (this machine caps a process at 20,000)
//! and keeps a reserve for Redis, HTTP and the rest, so a connect beyond the
//! limit is refused cleanly instead of failing `accept()` with EMFILE.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use tokio::time::Instant;

/// File descriptors kept free for everything that is not a device: Redis
/// connections, HTTP clients, log files, the listeners.
pub const FD_RESERVE: u64 = 64;

/// The open-file limits and the connection limit derived from them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// Soft open-file limit after raising it.
    pub soft: u64,
    /// Hard open-file limit.
    pub hard: u64,
    /// Device connections this instance accepts at once.
    pub max_connections: usize,
}

/// Raises the soft open-file limit to the hard one and derives the
/// connection limit: `configured` if not 0 (capped by what the descriptors
/// allow), else the soft limit minus [`FD_RESERVE`].
pub fn raise_and_compute(configured: u32) -> Capacity {
    let (soft, hard) = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(_) => rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap_or((1024, 1024)),
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open-file limit; keeping the current one");
            rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap_or((1024, 1024))
        }
    };
    compute(configured, soft, hard)
}

/// The pure part of [`raise_and_compute`].
pub fn compute(configured: u32, soft: u64, hard: u64) -> Capacity {
    let by_fds = soft.saturating_sub(FD_RESERVE).max(1);
    let max = if configured == 0 {
        by_fds
    } else {
        u64::from(configured).min(by_fds)
    };
    // An unlimited open-file limit (RLIM_INFINITY) must not overflow the
    // connection semaphore.
    let max = max.min(tokio::sync::Semaphore::MAX_PERMITS as u64);
    Capacity {
        soft,
        hard,
        max_connections: usize::try_from(max).unwrap_or(usize::MAX),
    }
}

/// A token bucket per source IP: `rate` new connections per second with
/// bursts of `burst`. Owned by the accept loop (no locking).
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: HashMap<IpAddr, Bucket>,
    last_prune: Instant,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// How often idle buckets are dropped.
const PRUNE_EVERY: Duration = Duration::from_secs(10);

impl RateLimiter {
    /// `rate` per second per IP with `burst` (at least 1); `rate` 0: unlimited.
    pub fn new(rate: u32, burst: u32) -> Self {
        Self {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            buckets: HashMap::new(),
            last_prune: Instant::now(),
        }
    }

    /// Whether a new connection from `ip` may proceed now.
    pub fn allow(&mut self, ip: IpAddr) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        let now = Instant::now();
        if now.duration_since(self.last_prune) >= PRUNE_EVERY {
            self.prune(now);
        }
        let (rate, burst) = (self.rate, self.burst);
        let b = self.buckets.entry(ip).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let elapsed = now.duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Drops buckets that have refilled completely: they behave exactly like
    /// a missing one.
    fn prune(&mut self, now: Instant) {
        let (rate, burst) = (self.rate, self.burst);
        self.buckets
            .retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst);
        self.last_prune = now;
    }

    /// IPs currently tracked.
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_comes_from_the_open_file_limit() {
        assert_eq!(compute(0, 20_000, 20_000).max_connections, 19_936);
        assert_eq!(compute(500, 20_000, 20_000).max_connections, 500);
        assert_eq!(compute(50_000, 20_000, 20_000).max_connections, 19_936);
        assert_eq!(compute(0, 10, 10).max_connections, 1);
        assert_eq!(
            compute(0, u64::MAX, u64::MAX).max_connections,
            tokio::sync::Semaphore::MAX_PERMITS
        );
    }

    #[test]
    fn raising_reaches_the_hard_limit() {
        let c = raise_and_compute(0);
        assert_eq!(c.soft, c.hard);
        assert!(c.max_connections as u64 + FD_RESERVE <= c.soft.max(FD_RESERVE + 1));
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[tokio::test(start_paused = true)]
    async fn bucket_allows_a_burst_then_the_rate() {
        let mut l = RateLimiter::new(10, 3);
        assert!(l.allow(ip(1)));
        assert!(l.allow(ip(1)));
        assert!(l.allow(ip(1)));
        assert!(!l.allow(ip(1)), "burst of 3 spent");
        // Another IP has its own bucket.
        assert!(l.allow(ip(2)));
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(l.allow(ip(1)), "one token per 100 ms");
        assert!(!l.allow(ip(1)));
        tokio::time::advance(Duration::from_secs(60)).await;
        for _ in 0..3 {
            assert!(l.allow(ip(1)));
        }
        assert!(!l.allow(ip(1)), "refill is capped at the burst");
    }

    #[tokio::test(start_paused = true)]
    async fn zero_rate_is_unlimited_and_idle_buckets_are_pruned() {
        let mut open = RateLimiter::new(0, 0);
        for _ in 0..10_000 {
            assert!(open.allow(ip(1)));
        }
        assert_eq!(open.tracked(), 0);

        let mut l = RateLimiter::new(100, 200);
        for i in 0..50 {
            assert!(l.allow(ip(i)));
        }
        assert_eq!(l.tracked(), 50);
        tokio::time::advance(PRUNE_EVERY).await;
        assert!(l.allow(ip(200)));
        assert_eq!(l.tracked(), 1, "refilled buckets are dropped");
    }
}
