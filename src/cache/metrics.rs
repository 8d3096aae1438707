//! The cache's metrics: its counters and sizes, and the upstream bound's,
//! read when Prometheus scrapes.

use super::{Cache, CacheStats};
use crate::metrics::{Metrics, counter, gauge};

/// A counter: name, help, and where it is in the stats.
type CounterRow = (&'static str, &'static str, fn(&CacheStats) -> u64);
/// A gauge, the same way.
type GaugeRow = (&'static str, &'static str, fn(&CacheStats) -> i64);

const COUNTERS: &[CounterRow] = &[
    ("cache_hits", "Reads answered from the cache", |s| s.hits),
    ("cache_misses", "Reads that started an upstream call", |s| {
        s.misses
    }),
    (
        "cache_coalesced",
        "Reads that joined another's upstream call",
        |s| s.coalesced,
    ),
    (
        "cache_stale_served",
        "Stale values served while upstream failed",
        |s| s.stale_served,
    ),
    (
        "cache_evictions",
        "Entries evicted by the size bound",
        |s| s.evictions,
    ),
    (
        "cache_negative_hits",
        "Reads answered by a remembered NOT_FOUND",
        |s| s.negative_hits,
    ),
    (
        "upstream_backoffs",
        "Times the upstream was backed off",
        |s| s.backoffs,
    ),
    (
        "upstream_queue_refused",
        "Upstream calls refused: the queue was full",
        |s| s.upstream.refused,
    ),
];

const GAUGES: &[GaugeRow] = &[
    ("cache_entries", "Entries in the cache", |s| {
        s.total_entries as i64
    }),
    (
        "cache_negative_entries",
        "NOT_FOUND answers remembered",
        |s| s.negative_entries as i64,
    ),
    (
        "upstream_backoff",
        "1 while the upstream is backed off",
        |s| i64::from(s.backoff_active),
    ),
    ("upstream_in_flight", "Upstream calls under way", |s| {
        s.upstream.in_flight as i64
    }),
    (
        "upstream_queue_length",
        "Upstream calls waiting for a turn",
        |s| s.upstream.waiting as i64,
    ),
];

impl Cache {
    /// Registers the cache's metrics.
    pub fn register_metrics(&self, metrics: &Metrics) {
        let cache = self.clone();
        metrics.register_state(move |e| {
            let stats = cache.stats();
            for (name, help, read) in COUNTERS {
                counter(e, name, help, read(&stats))?;
            }
            for (name, help, read) in GAUGES {
                gauge(e, name, help, read(&stats))?;
            }
            Ok(())
        });
    }
}
