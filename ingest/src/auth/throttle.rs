//! Repeated credential failures from one address are slowed down: the
//! refusal (CONNACK "not authorized") is answered after a delay that doubles
//! with each failure from that address within a window, up to a cap. Good
//! devices are never delayed (only refusals are), and an address that stops
//! failing is forgotten after the window.
//!
//! Pure: the caller brings the time and the lock.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use tokio::time::Instant;

/// Failures further apart than this start the count again.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Delay of the second failure in a row; it doubles from there.
pub const BASE: Duration = Duration::from_millis(100);
/// Longest delay.
pub const CAP: Duration = Duration::from_secs(5);

/// Failures per address.
#[derive(Debug)]
pub struct Throttle {
    failures: HashMap<IpAddr, (u32, Instant)>,
    last_prune: Instant,
}

impl Default for Throttle {
    fn default() -> Self {
        Self {
            failures: HashMap::new(),
            last_prune: Instant::now(),
        }
    }
}

/// The delay before refusing the `n`th failure in a row (1-based): none
/// for the first (a typo), then [`BASE`] doubling up to [`CAP`].
pub fn delay_for(n: u32) -> Duration {
    if n <= 1 {
        return Duration::ZERO;
    }
    let shift = (n - 2).min(16);
    BASE.saturating_mul(1 << shift).min(CAP)
}

impl Throttle {
    /// Records a failure from `ip` at `now`; returns how long to wait before
    /// answering it.
    pub fn failure(&mut self, ip: IpAddr, now: Instant) -> Duration {
        if now.duration_since(self.last_prune) >= WINDOW {
            self.prune(now);
        }
        let e = self.failures.entry(ip).or_insert((0, now));
        if now.duration_since(e.1) >= WINDOW {
            e.0 = 0;
        }
        e.0 = e.0.saturating_add(1);
        e.1 = now;
        delay_for(e.0)
    }

    /// Forgets addresses quiet for the window.
    pub fn prune(&mut self, now: Instant) {
        self.failures
            .retain(|_, (_, last)| now.duration_since(*last) < WINDOW);
        self.last_prune = now;
    }

    /// Addresses tracked.
    pub fn tracked(&self) -> usize {
        self.failures.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    #[test]
    fn delays_double_up_to_the_cap() {
        let d: Vec<u64> = (1..=9).map(|n| delay_for(n).as_millis() as u64).collect();
        assert_eq!(d, [0, 100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(delay_for(u32::MAX), CAP);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_counted_per_address_and_forgotten() {
        let mut t = Throttle::default();
        let now = Instant::now();
        assert_eq!(t.failure(ip(1), now), Duration::ZERO);
        assert_eq!(t.failure(ip(1), now), BASE);
        assert_eq!(t.failure(ip(1), now), BASE * 2);
        assert_eq!(t.failure(ip(2), now), Duration::ZERO, "its own count");
        tokio::time::advance(WINDOW).await;
        assert_eq!(
            t.failure(ip(1), Instant::now()),
            Duration::ZERO,
            "a quiet window starts again"
        );
        assert_eq!(t.tracked(), 1, "the quiet address was pruned");
    }
}
