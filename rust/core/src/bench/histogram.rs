//! A log-linear latency histogram (HdrHistogram's bucket layout, fixed precision): exact below
//! 128 ns, then 64 buckets per power of two, so any recorded value is known to within 1/64
//! (1.6 %). Recording is one `leading_zeros` and an increment; merging is adding arrays.

/// Sub-bucket bits: 2^SUB_BITS values are exact, then 2^(SUB_BITS-1) buckets per octave.
const SUB_BITS: u32 = 7;
const HALF: u64 = 1 << (SUB_BITS - 1);
/// Buckets for the whole u64 range.
const BUCKETS: usize = ((64 - SUB_BITS as usize) + 1) * HALF as usize + HALF as usize;

/// Latencies in nanoseconds.
#[derive(Clone, Debug)]
pub struct Histogram {
    counts: Vec<u64>,
    count: u64,
    sum: u128,
    min: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

/// The bucket a value falls into.
fn index(value: u64) -> usize {
    if value < 2 * HALF {
        return value as usize;
    }
    let msb = 63 - value.leading_zeros();
    let shift = msb - (SUB_BITS - 1);
    (u64::from(shift) * HALF + (value >> shift)) as usize
}

/// The smallest and largest value of bucket `i`.
fn bounds(i: usize) -> (u64, u64) {
    let i = i as u64;
    if i < 2 * HALF {
        return (i, i);
    }
    let shift = i / HALF - 1;
    let top = i - shift * HALF;
    let low = top << shift;
    (low, low + ((1u64 << shift) - 1))
}

impl Histogram {
    pub fn new() -> Self {
        Self {
            counts: vec![0; BUCKETS],
            count: 0,
            sum: 0,
            min: u64::MAX,
            max: 0,
        }
    }

    pub fn record(&mut self, nanos: u64) {
        self.counts[index(nanos)] += 1;
        self.count += 1;
        self.sum += u128::from(nanos);
        self.min = self.min.min(nanos);
        self.max = self.max.max(nanos);
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.count += other.count;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// Smallest value recorded (0 when empty).
    pub fn min(&self) -> u64 {
        if self.count == 0 {
            0
        } else {
            self.min
        }
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    /// Mean in nanoseconds (0 when empty).
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum as f64 / self.count as f64
        }
    }

    /// The value at or below which `percent` % of the recorded values lie: the middle of the
    /// bucket holding that rank, clamped to the recorded min and max (0 when empty).
    pub fn percentile(&self, percent: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((percent / 100.0) * self.count as f64).ceil().max(1.0) as u64;
        let mut seen = 0u64;
        for (i, &n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let (low, high) = bounds(i);
                return (low + (high - low) / 2).clamp(self.min, self.max);
            }
        }
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_cover_u64() {
        let mut prev_high = None;
        for i in 0..BUCKETS {
            let (low, high) = bounds(i);
            assert!(low <= high);
            if let Some(p) = prev_high {
                assert_eq!(low, p + 1, "bucket {i}");
            }
            assert_eq!(index(low), i);
            assert_eq!(index(high), i);
            prev_high = Some(high);
        }
        assert_eq!(prev_high, Some(u64::MAX));
    }

    #[test]
    fn percentiles_within_precision() {
        let mut h = Histogram::new();
        for v in 1..=100_000u64 {
            h.record(v * 10);
        }
        assert_eq!(h.count(), 100_000);
        assert_eq!(h.min(), 10);
        assert_eq!(h.max(), 1_000_000);
        for (p, exact) in [(50.0, 500_000.0), (90.0, 900_000.0), (99.9, 999_000.0)] {
            let got = h.percentile(p) as f64;
            assert!(
                (got - exact).abs() / exact < 1.0 / 64.0,
                "p{p}: {got} vs {exact}"
            );
        }
        assert!((h.mean() - 500_005.0).abs() < 1.0);
        let mut other = Histogram::new();
        other.record(5);
        h.merge(&other);
        assert_eq!(h.min(), 5);
        assert_eq!(h.percentile(0.0), 5);
        assert_eq!(Histogram::new().percentile(50.0), 0);
    }
}
