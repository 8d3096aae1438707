//! The latency histogram every call records into.
//!
//! prometheus-client's `Histogram` takes a write lock per observation: on
//! the hot path, both worker threads take the same lock for every call to
//! the same RPC, and its cache line moves between cores each time. This
//! one counts into one of a few stripes of atomics, picked per thread, and
//! adds the stripes up when Prometheus scrapes. The exposition is the
//! same: the same buckets, cumulative counts, `+Inf`, sum and count.

use std::sync::{
    Arc,
    atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
};

use prometheus_client::{
    encoding::{EncodeMetric, MetricEncoder, NoLabelSet},
    metrics::{MetricType, TypedMetric},
};

/// Upper bounds: 50 µs doubling 16 times, to about 1.6 s; `+Inf` after.
const BOUNDS: usize = 16;
/// Stripes per histogram: more than the worker threads, so that two
/// threads rarely share one.
const STRIPES: usize = 8;

/// A latency histogram in seconds; cheap to clone (the clones share it).
#[derive(Clone, Debug)]
pub struct LatencyHistogram {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    bounds: [f64; BOUNDS],
    stripes: [Stripe; STRIPES],
}

/// One thread's counts, on cache lines of its own.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Stripe {
    /// Observations per bucket (not cumulative); the last is `+Inf`.
    buckets: [AtomicU64; BOUNDS + 1],
    /// The sum of observations, in nanoseconds.
    sum_nanos: AtomicU64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyHistogram {
    /// An empty histogram with the broker's latency buckets.
    pub fn new() -> Self {
        Self {
            shared: Arc::new(Shared {
                bounds: std::array::from_fn(|i| 0.000_05 * 2f64.powi(i as i32)),
                stripes: Default::default(),
            }),
        }
    }

    /// Records one observation, in seconds.
    pub fn observe(&self, seconds: f64) {
        let shared = &*self.shared;
        let bucket = shared
            .bounds
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(BOUNDS);
        let stripe = &shared.stripes[this_thread_stripe()];
        stripe.buckets[bucket].fetch_add(1, Relaxed);
        stripe.sum_nanos.fetch_add((seconds * 1e9) as u64, Relaxed);
    }

    /// Sum (seconds), count and per-bucket counts over every stripe.
    fn totals(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let shared = &*self.shared;
        let mut counts = [0u64; BOUNDS + 1];
        let mut sum_nanos = 0u64;
        for stripe in &shared.stripes {
            for (total, bucket) in counts.iter_mut().zip(&stripe.buckets) {
                *total += bucket.load(Relaxed);
            }
            sum_nanos += stripe.sum_nanos.load(Relaxed);
        }
        let buckets = shared
            .bounds
            .iter()
            .copied()
            // prometheus-client writes f64::MAX as `+Inf`.
            .chain([f64::MAX])
            .zip(counts)
            .collect();
        (sum_nanos as f64 / 1e9, counts.iter().sum(), buckets)
    }
}

/// The stripe of the calling thread: threads take stripes in turn.
fn this_thread_stripe() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static STRIPE: usize = NEXT.fetch_add(1, Relaxed) % STRIPES;
    }
    STRIPE.with(|stripe| *stripe)
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> std::fmt::Result {
        let (sum, count, buckets) = self.totals();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::{
        metrics::histogram::{Histogram, exponential_buckets},
        registry::Registry,
    };

    use super::*;

    fn exposition(metric: impl prometheus_client::registry::Metric) -> String {
        let mut registry = Registry::default();
        registry.register("latency", "Latency", metric);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text
    }

    #[test]
    fn it_writes_what_prometheus_clients_histogram_writes() {
        let ours = LatencyHistogram::new();
        let theirs = Histogram::new(exponential_buckets(0.000_05, 2.0, 16));
        // On bounds, between them, past the last, from several threads.
        let samples = [
            0.000_01, 0.000_05, 0.000_07, 0.001, 0.0016, 0.25, 1.6384, 3.0, 60.0,
        ];
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for seconds in samples {
                        ours.observe(seconds);
                        theirs.observe(seconds);
                    }
                });
            }
        });
        let (ours, theirs) = (exposition(ours), exposition(theirs));
        let without_sum = |text: &str| -> Vec<String> {
            text.lines()
                .filter(|line| !line.starts_with("latency_sum"))
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(without_sum(&ours), without_sum(&theirs), "{ours}\n{theirs}");
        assert!(ours.contains("latency_count 36"), "{ours}");
        assert!(ours.contains("latency_bucket{le=\"+Inf\"} 36"), "{ours}");
        // Sums agree to the nanosecond the stripes count in.
        let sum = |text: &str| -> f64 {
            let line = text.lines().find(|l| l.starts_with("latency_sum")).unwrap();
            line.split(' ').nth(1).unwrap().parse().unwrap()
        };
        assert!((sum(&ours) - sum(&theirs)).abs() < 1e-6, "{ours}\n{theirs}");
    }
}
