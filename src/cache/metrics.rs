//! The cache's metrics: its counters and sizes, and the upstream bound's,
//! read when Prometheus scrapes.

use super::Cache;
use crate::metrics::{Metrics, counter, gauge};

impl Cache {
    /// Registers the cache's metrics.
    pub fn register_metrics(&self, metrics: &Metrics) {
        let cache = self.clone();
        metrics.register_state(move |e| {
            let stats = cache.stats();
            counter(e, "cache_hits", "Reads answered from the cache", stats.hits)?;
            counter(
                e,
                "cache_misses",
                "Reads that started an upstream call",
                stats.misses,
            )?;
            counter(
                e,
                "cache_coalesced",
                "Reads that joined another's upstream call",
                stats.coalesced,
            )?;
            counter(
                e,
                "cache_stale_served",
                "Stale values served while upstream failed",
                stats.stale_served,
            )?;
            counter(
                e,
                "cache_evictions",
                "Entries evicted by the size bound",
                stats.evictions,
            )?;
            gauge(
                e,
                "cache_entries",
                "Entries in the cache",
                stats.total_entries as i64,
            )?;
            gauge(
                e,
                "cache_negative_entries",
                "NOT_FOUND answers remembered",
                stats.negative_entries as i64,
            )?;
            counter(
                e,
                "cache_negative_hits",
                "Reads answered by a remembered NOT_FOUND",
                stats.negative_hits,
            )?;
            gauge(
                e,
                "upstream_backoff",
                "1 while the upstream is backed off",
                i64::from(stats.backoff_active),
            )?;
            counter(
                e,
                "upstream_backoffs",
                "Times the upstream was backed off",
                stats.backoffs,
            )?;
            gauge(
                e,
                "upstream_in_flight",
                "Upstream calls under way",
                stats.upstream.in_flight as i64,
            )?;
            gauge(
                e,
                "upstream_queue_length",
                "Upstream calls waiting for a turn",
                stats.upstream.waiting as i64,
            )?;
            counter(
                e,
                "upstream_queue_refused",
                "Upstream calls refused: the queue was full",
                stats.upstream.refused,
            )?;
            Ok(())
        });
    }
}
