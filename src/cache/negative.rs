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
//! AWSPREVIOUS). The count is bounded: when full, expired
//! entries are swept out, and a new one is not remembered if none were.

use std::time::Duration;

use dashmap::DashMap;
use tokio::time::Instant;

use super::CacheKey;
use crate::backend::StoreError;

/// Remembered NOT_FOUND answers.
pub struct NegativeEntries {
    ttl: Duration,
    max_entries: usize,
    entries: DashMap<CacheKey, (Instant, StoreError)>,
}

impl NegativeEntries {
    /// `ttl` zero: nothing is remembered.
    pub fn new(ttl: Duration, max_entries: usize) -> Self {
        Self {
            ttl,
            max_entries,
            entries: DashMap::new(),
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
        if self.entries.len() >= self.max_entries {
            let ttl = self.ttl;
            self.entries.retain(|_, (at, _)| at.elapsed() < ttl);
            if self.entries.len() >= self.max_entries {
                return;
            }
        }
        self.entries
            .insert(key.clone(), (Instant::now(), error.clone()));
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

    pub fn len(&self) -> usize {
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
    async fn the_count_is_bounded() {
        let negative = NegativeEntries::new(Duration::from_secs(30), 2);
        for name in ["a", "b", "c"] {
            negative.remember(&key(name), &not_found(name));
        }
        assert_eq!(negative.len(), 2);
        tokio::time::advance(Duration::from_secs(31)).await;
        negative.remember(&key("c"), &not_found("c"));
        assert_eq!(negative.len(), 1, "expired ones were swept to make room");
    }

    #[test]
    fn zero_ttl_remembers_nothing() {
        let negative = NegativeEntries::new(Duration::ZERO, 10);
        negative.remember(&key("a"), &not_found("a"));
        assert_eq!(negative.len(), 0);
    }
}
