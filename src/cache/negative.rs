//! Negative entries: a secret the upstream just said does not exist is not
//! asked for again for `ttl`, so that a caller (or a flood of them) asking
//! for missing names does not turn every ask into an upstream call.
//!
//! NOT_FOUND and "marked for deletion" are remembered (a refusal or a
//! failure is the upstream's news to repeat); a restore is a change event
//! like a creation, and ends the entry at once where events are on. An entry goes when its time is up, or at once on a
//! bypass read, a RefreshSecret, a version of that key stored by anyone
//! (the change detector included), or a change event about its secret
//! (every selector of it: a creation, or a rotation that made an
//! AWSPREVIOUS). WatchSecret reads afresh, as a bypass read does.
//!
//! The count is bounded: entries are kept in the order they were
//! remembered, which with one `ttl` for all is the order they expire in.
//! Expired ones are dropped from the front at each new entry and whenever
//! the count is read (`GetCacheStats`, a metrics scrape), so a flood of
//! missing names does not hold its memory after it stops; when full, the
//! oldest goes, so the newest answers are the ones remembered. Both are
//! constant work per entry on average, however full the map.

use std::{
    collections::VecDeque,
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use dashmap::DashMap;
use tokio::time::Instant;

use super::CacheKey;
use crate::backend::StoreError;

/// Remembered NOT_FOUND answers.
pub struct NegativeEntries {
    ttl: Duration,
    max_entries: usize,
    entries: DashMap<CacheKey, (Instant, StoreError)>,
    /// Each key as it was remembered, oldest first. An item whose entry was
    /// forgotten or remembered again since is skipped when reached.
    order: Mutex<VecDeque<(CacheKey, Instant)>>,
}

impl NegativeEntries {
    /// `ttl` zero: nothing is remembered.
    pub fn new(ttl: Duration, max_entries: usize) -> Self {
        Self {
            ttl,
            max_entries,
            entries: DashMap::new(),
            order: Mutex::default(),
        }
    }

    /// The remembered answer for `key`, if still in time.
    pub fn get(&self, key: &CacheKey) -> Option<StoreError> {
        if self.entries.is_empty() {
            return None;
        }
        let (at, error) = self.entries.get(key).map(|entry| entry.value().clone())?;
        if at.elapsed() < self.ttl {
            Some(error)
        } else {
            self.entries
                .remove_if(key, |_, (stored_at, _)| *stored_at == at);
            None
        }
    }

    /// Remembers a NOT_FOUND or marked-for-deletion answer (others are
    /// ignored).
    pub fn remember(&self, key: &CacheKey, error: &StoreError) {
        let remembered = matches!(
            error,
            StoreError::NotFound { .. } | StoreError::Deleted { .. }
        );
        if self.ttl.is_zero() || !remembered {
            return;
        }
        let now = Instant::now();
        let mut order = self.order();
        self.drop_expired(&mut order, now);
        while self.entries.len() >= self.max_entries.max(1) {
            let Some(oldest) = order.pop_front() else {
                break;
            };
            self.drop_item(oldest);
        }
        // Forgotten entries leave their items behind: swept once they
        // outnumber the live ones, as the cache's eviction queue is.
        if order.len() > self.max_entries.saturating_mul(2).max(64) {
            order.retain(|(key, at)| self.entries.get(key).is_some_and(|entry| entry.0 == *at));
        }
        self.entries.insert(key.clone(), (now, error.clone()));
        order.push_back((key.clone(), now));
    }

    /// Drops the entries remembered `ttl` or more before `now`.
    fn drop_expired(&self, order: &mut VecDeque<(CacheKey, Instant)>, now: Instant) {
        while order
            .front()
            .is_some_and(|(_, at)| now.duration_since(*at) >= self.ttl)
        {
            if let Some(expired) = order.pop_front() {
                self.drop_item(expired);
            }
        }
    }

    /// Removes the entry an item of `order` stands for, unless it was
    /// remembered again since.
    fn drop_item(&self, (key, at): (CacheKey, Instant)) {
        self.entries
            .remove_if(&key, |_, (stored_at, _)| *stored_at == at);
    }

    fn order(&self) -> MutexGuard<'_, VecDeque<(CacheKey, Instant)>> {
        self.order.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets `key` (a value was stored for it, or it was asked again
    /// on purpose).
    pub fn forget(&self, key: &CacheKey) {
        if !self.entries.is_empty() {
            self.entries.remove(key);
        }
    }

    /// Forgets every entry whose key `wanted` picks.
    pub fn forget_where(&self, wanted: impl Fn(&CacheKey) -> bool) {
        if !self.entries.is_empty() {
            self.entries.retain(|key, _| !wanted(key));
        }
    }

    /// How many answers are remembered and still in time.
    pub fn len(&self) -> usize {
        if !self.entries.is_empty() {
            self.drop_expired(&mut self.order(), Instant::now());
        }
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::VersionSelector;

    fn key(name: &str) -> CacheKey {
        CacheKey::new(name.to_owned(), VersionSelector::current())
    }

    fn not_found(name: &str) -> StoreError {
        StoreError::NotFound { name: name.into() }
    }

    #[tokio::test(start_paused = true)]
    async fn not_found_is_remembered_for_the_ttl_only() {
        let negative = NegativeEntries::new(Duration::from_secs(30), 10);
        negative.remember(&key("a"), &not_found("a"));
        negative.remember(&key("b"), &StoreError::Throttled);
        assert_eq!(negative.get(&key("a")), Some(not_found("a")));
        assert_eq!(negative.get(&key("b")), None, "only NOT_FOUND");
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(negative.get(&key("a")), None);
        assert_eq!(negative.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_count_is_bounded_and_the_newest_answers_are_kept() {
        let negative = NegativeEntries::new(Duration::from_secs(30), 2);
        for name in ["a", "b", "c"] {
            negative.remember(&key(name), &not_found(name));
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        assert_eq!(negative.len(), 2);
        assert_eq!(negative.get(&key("a")), None, "the oldest went");
        assert_eq!(negative.get(&key("c")), Some(not_found("c")));
        tokio::time::advance(Duration::from_secs(31)).await;
        negative.remember(&key("d"), &not_found("d"));
        assert_eq!(negative.len(), 1, "expired ones were dropped");
    }

    /// A flood of missing names leaves nothing behind once it is over, and
    /// the count says so without a read of each name.
    #[tokio::test(start_paused = true)]
    async fn expired_answers_go_without_being_asked_for() {
        let negative = NegativeEntries::new(Duration::from_secs(30), 1000);
        for i in 0..500 {
            negative.remember(&key(&format!("flood-{i}")), &not_found("x"));
        }
        assert_eq!(negative.len(), 500);
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(negative.len(), 0);
        assert_eq!(negative.entries.len(), 0, "the memory is given back");
    }

    /// Entries forgotten (a value stored, a bypass read) and remembered
    /// again, over and over, do not pile up items in the order kept.
    #[tokio::test(start_paused = true)]
    async fn forgotten_entries_leave_no_trail() {
        let negative = NegativeEntries::new(Duration::from_secs(30), 10);
        for _ in 0..10_000 {
            negative.remember(&key("again"), &not_found("again"));
            negative.forget(&key("again"));
        }
        assert!(
            negative.order().len() <= 64 + 1,
            "{}",
            negative.order().len()
        );
    }

    #[test]
    fn zero_ttl_remembers_nothing() {
        let negative = NegativeEntries::new(Duration::ZERO, 10);
        negative.remember(&key("a"), &not_found("a"));
        assert_eq!(negative.len(), 0);
    }
}
