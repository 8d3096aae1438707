//! The metrics registry: plumbing only.
//!
//! Each component registers its own metrics here, where it is built: the
//! API its calls (`api::CallMetrics`), the store wrapper its upstream calls
//! (`backend::MeteredStore`), and the cache, the watch hub, the listener,
//! the policy and TLS the state they already count (read when Prometheus
//! scrapes, so nothing is counted twice). This module only holds the
//! registry, renders it, and offers the two helpers collectors write with.
//!
//! Secret names never become label values unless `--metrics-secret-names`
//! is set: they are unbounded (cardinality) and may say more than they
//! should (privacy).

mod latency;

pub use latency::LatencyHistogram;

use std::{
    fmt,
    sync::{Arc, Mutex},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge, info::Info},
    registry::{Metric, Registry},
};

/// The broker's metrics registry; cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with the `secretsbroker_` prefix and the build info.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("secretsbroker");
        registry.register(
            "build",
            "The broker's version",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        Self {
            registry: Arc::new(Mutex::new(registry)),
        }
    }

    /// Registers a metric the caller records into.
    pub fn register(&self, name: &str, help: &str, metric: impl Metric) {
        self.registry().register(name, help, metric);
    }

    /// Registers state read at scrape time: `encode` writes it with
    /// `counter` and `gauge`.
    pub fn register_state<F>(&self, encode: F)
    where
        F: Fn(&mut DescriptorEncoder) -> fmt::Result + Send + Sync + 'static,
    {
        self.registry()
            .register_collector(Box::new(StateCollector(encode)));
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry());
        text
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A component's state, read at scrape time.
struct StateCollector<F>(F);

impl<F> fmt::Debug for StateCollector<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StateCollector")
    }
}

impl<F> Collector for StateCollector<F>
where
    F: Fn(&mut DescriptorEncoder) -> fmt::Result + Send + Sync + 'static,
{
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        (self.0)(&mut encoder)
    }
}

/// Latency buckets from 50 µs to ~1.6 s.
pub fn latency_histogram() -> LatencyHistogram {
    LatencyHistogram::new()
}

/// Writes a counter read at scrape time.
pub fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

/// Writes a gauge read at scrape time.
pub fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: i64) -> fmt::Result {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}
