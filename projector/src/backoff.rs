//! Waiting between retries of a failed Redis operation. The projector never
//! exits on a transient fault: it logs, counts, waits and tries again.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Exponential backoff, from 50 ms doubling up to 2 s; reset on success.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

const MIN: Duration = Duration::from_millis(50);
const MAX: Duration = Duration::from_secs(2);

impl Default for Backoff {
    fn default() -> Self {
        Self { next: MIN }
    }
}

impl Backoff {
    /// After a success: the next failure waits the minimum again.
    pub fn reset(&mut self) {
        self.next = MIN;
    }

    /// The wait before the next retry.
    pub fn current(&self) -> Duration {
        self.next
    }

    /// Waits before the next retry; `false` if `shutdown` came first.
    pub async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        let d = self.next;
        self.next = (self.next * 2).min(MAX);
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn doubles_up_to_the_cap_and_stops_on_shutdown() {
        let token = CancellationToken::new();
        let mut b = Backoff::default();
        let mut seen = Vec::new();
        for _ in 0..8 {
            seen.push(b.current());
            assert!(b.wait(&token).await);
        }
        assert_eq!(seen[0], Duration::from_millis(50));
        assert_eq!(seen[1], Duration::from_millis(100));
        assert_eq!(*seen.last().expect("some"), MAX);
        b.reset();
        assert_eq!(b.current(), MIN);
        token.cancel();
        assert!(!b.wait(&token).await);
    }
}
