//! What the cache reports: its counters (bumped on the hot path with
//! relaxed atomics) and a snapshot of them with its sizes, for
//! GetCacheStats and the metrics.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use tokio::time::Instant;

use super::Cache;
use crate::backend::bounded::UpstreamLoad;

/// The cache's counters and sizes at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CacheStats {
    /// Entries held.
    pub total_entries: u64,
    /// Entries within their TTL.
    pub valid_entries: u64,
    /// Entries past their TTL, kept to serve stale.
    pub expired_entries: u64,
    /// Reads answered from the cache.
    pub hits: u64,
    /// Reads that started an upstream call.
    pub misses: u64,
    /// Reads that joined another's upstream call.
    pub coalesced: u64,
    /// Stale values served while the upstream failed.
    pub stale_served: u64,
    /// Calls made upstream.
    pub upstream_calls: u64,
    /// Upstream calls that returned no value (not found and denied included).
    pub upstream_errors: u64,
    /// Entries evicted by the size bound.
    pub evictions: u64,
    /// NOT_FOUND answers remembered now.
    pub negative_entries: u64,
    /// Reads answered by a remembered NOT_FOUND.
    pub negative_hits: u64,
    /// The upstream is backed off now.
    pub backoff_active: bool,
    /// Times the upstream was backed off.
    pub backoffs: u64,
    /// The upstream bound: calls under way and waiting.
    pub upstream: UpstreamLoad,
}

impl CacheStats {
    /// hits / (hits + misses), 0 without reads.
    pub fn hit_ratio(&self) -> f64 {
        let reads = self.hits + self.misses;
        if reads == 0 {
            0.0
        } else {
            self.hits as f64 / reads as f64
        }
    }
}

/// The counters the cache bumps as it answers.
#[derive(Default)]
pub(super) struct Counters {
    pub(super) hits: AtomicU64,
    pub(super) misses: AtomicU64,
    pub(super) coalesced: AtomicU64,
    pub(super) stale_served: AtomicU64,
    pub(super) upstream_calls: AtomicU64,
    pub(super) upstream_errors: AtomicU64,
    pub(super) evictions: AtomicU64,
    pub(super) negative_hits: AtomicU64,
}

/// Counts one more.
pub(super) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Relaxed);
}

impl Cache {
    /// Counters and sizes now.
    pub fn stats(&self) -> CacheStats {
        let shared = &self.shared;
        let now = Instant::now();
        // One pass counts both: entries stored or dropped between a len()
        // and a pass would make `valid` exceed `total`.
        let (mut total, mut valid) = (0_u64, 0_u64);
        for entry in shared.entries.iter() {
            total += 1;
            valid += u64::from(now.duration_since(entry.fetched_at) < shared.settings.ttl);
        }
        let read = |counter: &AtomicU64| counter.load(Relaxed);
        let counters = &shared.counters;
        CacheStats {
            total_entries: total,
            valid_entries: valid,
            expired_entries: total - valid,
            hits: read(&counters.hits),
            misses: read(&counters.misses),
            coalesced: read(&counters.coalesced),
            stale_served: read(&counters.stale_served),
            upstream_calls: read(&counters.upstream_calls),
            upstream_errors: read(&counters.upstream_errors),
            evictions: read(&counters.evictions),
            negative_entries: shared.negative.len() as u64,
            negative_hits: read(&counters.negative_hits),
            backoff_active: shared.backoff.active(),
            backoffs: shared.backoff.times_started(),
            upstream: shared.bounded.load(),
        }
    }
}
