//! Latency histograms: hdrhistogram in microseconds, and the percentile
//! summary that reports carry.
//!
//! A summary keeps the whole histogram too (`hdr`: the standard compressed
//! V2 encoding, base64), so the parent of several worker processes merges
//! their histograms exactly instead of averaging percentiles, and any
//! HdrHistogram tool can re-read a report later.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer as _, V2DeflateSerializer};
use serde::{Deserialize, Serialize};

/// Highest value tracked without resizing: one hour in microseconds.
const HIGH_US: u64 = 3_600_000_000;

/// A latency histogram with microsecond resolution and 3 significant digits.
#[derive(Debug, Clone)]
pub struct LatencyHistogram(Histogram<u64>);

/// Why a serialized histogram could not be read back.
#[derive(Debug, thiserror::Error)]
#[error("cannot decode a histogram from a report: {0}")]
pub struct HistogramDecodeError(String);

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyHistogram {
    /// An empty histogram (1 µs to 1 h, growing beyond if needed).
    pub fn new() -> Self {
        // Creation fails only for invalid bounds or precision; these are
        // constants that hdrhistogram documents as valid.
        let mut h = Histogram::new_with_bounds(1, HIGH_US, 3)
            .expect("1 µs to 1 h at 3 significant digits is a valid histogram");
        h.auto(true);
        Self(h)
    }

    /// Records one duration (at least 1 µs).
    pub fn record(&mut self, d: Duration) {
        self.record_us(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    }

    /// Records one value in microseconds (at least 1).
    pub fn record_us(&mut self, us: u64) {
        self.0.saturating_record(us.max(1));
    }

    /// Number of recorded values.
    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// Adds every value of `other`.
    pub fn merge(&mut self, other: &LatencyHistogram) {
        // With auto-resize on, addition cannot run out of range; if it
        // fails anyway the other histogram's values are skipped rather than
        // aborting a report.
        let _ = self.0.add(&other.0);
    }

    /// The value (µs) at quantile `q` (0.0 to 1.0); 0 when empty.
    pub fn quantile_us(&self, q: f64) -> u64 {
        if self.0.is_empty() {
            0
        } else {
            self.0.value_at_quantile(q)
        }
    }

    /// The percentile summary, with the histogram encoded for merging.
    pub fn summary(&self) -> LatencySummary {
        let ms = |us: u64| us as f64 / 1000.0;
        let empty = self.0.is_empty();
        LatencySummary {
            count: self.0.len(),
            min_ms: if empty { 0.0 } else { ms(self.0.min()) },
            mean_ms: if empty { 0.0 } else { self.0.mean() / 1000.0 },
            p50_ms: ms(self.quantile_us(0.5)),
            p90_ms: ms(self.quantile_us(0.9)),
            p99_ms: ms(self.quantile_us(0.99)),
            p999_ms: ms(self.quantile_us(0.999)),
            max_ms: if empty { 0.0 } else { ms(self.0.max()) },
            hdr: self.encode(),
        }
    }

    /// Base64 of the compressed V2 encoding; empty string if encoding fails.
    pub fn encode(&self) -> String {
        let mut bytes = Vec::new();
        match V2DeflateSerializer::new().serialize(&self.0, &mut bytes) {
            Ok(_) => STANDARD.encode(bytes),
            Err(_) => String::new(),
        }
    }

    /// Reads back what [`encode`](Self::encode) wrote (empty string: empty
    /// histogram).
    pub fn decode(hdr: &str) -> Result<Self, HistogramDecodeError> {
        if hdr.is_empty() {
            return Ok(Self::new());
        }
        let bytes = STANDARD
            .decode(hdr)
            .map_err(|e| HistogramDecodeError(e.to_string()))?;
        let h: Histogram<u64> = Deserializer::new()
            .deserialize(&mut bytes.as_slice())
            .map_err(|e| HistogramDecodeError(format!("{e:?}")))?;
        let mut out = Self::new();
        let _ = out.0.add(&h);
        Ok(out)
    }
}

/// Percentiles of one latency, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Number of samples; every other figure is 0 when this is 0.
    pub count: u64,
    /// Smallest sample.
    pub min_ms: f64,
    /// Mean.
    pub mean_ms: f64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Largest sample.
    pub max_ms: f64,
    /// The whole histogram: base64 of HdrHistogram's compressed V2 encoding
    /// (microseconds).
    pub hdr: String,
}

impl LatencySummary {
    /// The histogram back from `hdr`.
    pub fn histogram(&self) -> Result<LatencyHistogram, HistogramDecodeError> {
        LatencyHistogram::decode(&self.hdr)
    }

    /// One line: `n=1000 p50=0.21ms p90=.. p99=.. p99.9=.. max=..`.
    pub fn line(&self) -> String {
        if self.count == 0 {
            return "no samples".to_owned();
        }
        format!(
            "n={} p50={:.3}ms p90={:.3}ms p99={:.3}ms p99.9={:.3}ms max={:.3}ms",
            self.count, self.p50_ms, self.p90_ms, self.p99_ms, self.p999_ms, self.max_ms
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut h = LatencyHistogram::new();
        for us in 1..=1000 {
            h.record_us(us);
        }
        let s = h.summary();
        assert_eq!(s.count, 1000);
        assert!((s.p50_ms - 0.5).abs() < 0.01, "{s:?}");
        assert!((s.p99_ms - 0.99).abs() < 0.01, "{s:?}");
        assert!((s.max_ms - 1.0).abs() < 0.01, "{s:?}");
    }

    #[test]
    fn encoding_round_trips_and_merges_exactly() {
        let mut a = LatencyHistogram::new();
        let mut b = LatencyHistogram::new();
        for us in 0..500 {
            a.record_us(100 + us);
            b.record_us(10_000 + us);
        }
        let a2 = a.summary().histogram().expect("decode");
        assert_eq!(a2.count(), 500);
        let mut merged = a2;
        merged.merge(&LatencyHistogram::decode(&b.encode()).expect("decode"));
        assert_eq!(merged.count(), 1000);
        assert!(merged.quantile_us(0.25) < 1000);
        assert!(merged.quantile_us(0.75) >= 10_000);
    }

    #[test]
    fn empty_histogram_reports_zeros_and_decodes() {
        let s = LatencyHistogram::new().summary();
        assert_eq!(s.count, 0);
        assert_eq!(s.p99_ms, 0.0);
        assert_eq!(s.line(), "no samples");
        assert_eq!(LatencyHistogram::decode("").expect("empty").count(), 0);
        assert!(LatencyHistogram::decode("not base64!").is_err());
    }

    #[test]
    fn huge_values_saturate_instead_of_failing() {
        let mut h = LatencyHistogram::new();
        h.record(Duration::from_secs(10 * 3600));
        assert_eq!(h.count(), 1);
    }
}
