//! A tiny deterministic random number generator (SplitMix64).
//!
//! The simulator derives each device's role and timing from `(seed, device
//! index)`, so a run is reproducible and a device behaves the same whichever
//! worker process it lands in. SplitMix64 is enough for spreading timers and
//! picking fractions; nothing here needs cryptographic quality.

use std::time::Duration;

/// SplitMix64 state.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator for one `(seed, stream)` pair (for example a device index
    /// and a purpose salt).
    pub fn new(seed: u64, stream: u64) -> Self {
        let mut s = Self(seed ^ stream.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        // Mix once so that neighbouring streams start far apart.
        s.next_u64();
        s
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A float in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A duration uniformly in `[min, max]` (`min` if `max <= min`).
    pub fn duration_between(&mut self, min: Duration, max: Duration) -> Duration {
        if max <= min {
            return min;
        }
        min + (max - min).mul_f64(self.unit())
    }
}

/// A deterministic value in `[0, 1)` for `(seed, index, salt)`: the same
/// device always gets the same draw for the same purpose.
pub fn unit_hash(seed: u64, index: u64, salt: u64) -> f64 {
    SplitMix64::new(seed ^ salt.rotate_left(32), index).unit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_per_stream_and_different_across_streams() {
        let a: Vec<u64> = (0..4).map(|_| SplitMix64::new(1, 7).next_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        assert_ne!(
            SplitMix64::new(1, 7).next_u64(),
            SplitMix64::new(1, 8).next_u64()
        );
    }

    #[test]
    fn unit_is_in_range_and_roughly_uniform() {
        let mut r = SplitMix64::new(42, 0);
        let draws: Vec<f64> = (0..10_000).map(|_| r.unit()).collect();
        assert!(draws.iter().all(|x| (0.0..1.0).contains(x)));
        let below_quarter = draws.iter().filter(|x| **x < 0.25).count();
        assert!((2200..2800).contains(&below_quarter), "{below_quarter}");
    }

    #[test]
    fn durations_stay_in_bounds() {
        let mut r = SplitMix64::new(3, 3);
        let (lo, hi) = (Duration::from_millis(10), Duration::from_millis(20));
        for _ in 0..1000 {
            let d = r.duration_between(lo, hi);
            assert!(d >= lo && d <= hi);
        }
        assert_eq!(r.duration_between(hi, lo), hi);
    }
}
