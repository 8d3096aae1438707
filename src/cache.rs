//! The shared cache: one copy of each secret version for every caller.
//!
//! Design, and why:
//! - Entries sit in a `DashMap` keyed by full name + version selector. A hit
//!   is a shard read lock, an `Arc` clone and a few relaxed atomics: nothing
//!   on the hot path allocates or waits on another caller.
//! - Misses are coalesced: the first caller starts a fetch (a spawned task,
//!   so it finishes even if that caller goes away) and registers it in
//!   `inflight`; every other caller for the same key awaits the same fetch.
//!   N concurrent misses make one upstream call.
//! - Refresh-ahead: a hit in the last tenth of an entry's TTL starts one
//!   background fetch, so a hot secret is renewed before it expires and no
//!   caller waits, and there is no herd of upstream calls at expiry.
//! - Stale-on-error: when a fetch fails transiently (timeout, 5xx,
//!   throttling), the last good value is served, marked stale, until it is
//!   `max_stale` past its TTL. Definite answers (not found, deleted, access
//!   denied) are never hidden: they drop the entry.
//! - An entry due for renewal (expired, or refreshed ahead) is first
//!   revalidated with DescribeSecret: when the stage still points at the
//!   cached version, the entry is renewed without reading the value again
//!   (a version's value never changes upstream). DescribeSecret has four
//!   times GetSecretValue's quota, and no secret bytes cross the wire.
//!   Bypass reads and RefreshSecret always read the value.
//! - The entry count is bounded; inserting past it evicts the least
//!   recently used entry.
//! - Fetches are numbered; an answer older than the cached one never
//!   replaces it, so a slow fetch cannot roll a fresh value back.
//! - Whoever needs to know when a key's version changes (the watch layer)
//!   registers one `ChangeListener`; every stored answer is offered to it,
//!   so a bypass read or a refresh that finds a new version is announced at
//!   once. The cache itself knows nothing of watchers.

use std::{
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use dashmap::{DashMap, mapref::entry::Entry as MapEntry};
use futures::{
    FutureExt,
    future::{BoxFuture, Shared as SharedFuture},
};
use tokio::time::Instant;

use crate::{
    backend::{SecretStore, StoreError, VersionSelector},
    names,
    secret::SecretVersion,
};

/// What identifies a cache entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    /// Full secret name (or ARN).
    pub name: String,
    pub selector: VersionSelector,
}

impl CacheKey {
    pub fn new(name: String, selector: VersionSelector) -> Self {
        Self { name, selector }
    }
}

/// The cache's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheSettings {
    /// How long a value is served without asking upstream.
    pub ttl: Duration,
    /// How many entries at most.
    pub max_entries: usize,
    /// How long past its TTL a value may still be served when the upstream
    /// fails transiently.
    pub max_stale: Duration,
}

/// A value as the cache answers it.
#[derive(Debug, Clone)]
pub struct Lookup {
    pub version: Arc<SecretVersion>,
    /// Answered without an upstream call made for this request.
    pub hit: bool,
    /// Time since the value was read upstream.
    pub age: Duration,
    /// Past its TTL, served because the upstream failed.
    pub stale: bool,
}

impl Lookup {
    /// A value just read upstream for this request.
    pub fn fresh(version: Arc<SecretVersion>) -> Self {
        Self {
            version,
            hit: false,
            age: Duration::ZERO,
            stale: false,
        }
    }
}

/// The cache's counters and sizes at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CacheStats {
    pub total_entries: u64,
    pub valid_entries: u64,
    pub expired_entries: u64,
    pub hits: u64,
    pub misses: u64,
    pub coalesced: u64,
    pub stale_served: u64,
    pub upstream_calls: u64,
    pub upstream_errors: u64,
    pub evictions: u64,
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

/// A handle to the shared cache; cheap to clone.
#[derive(Clone)]
pub struct Cache {
    shared: Arc<Shared>,
}

/// Told of every version the cache stores, right after it is stored, with
/// the number of the read that produced it: listeners may be called out of
/// order by concurrent stores, and a lower number is older news.
pub type ChangeListener = Box<dyn Fn(&CacheKey, &Arc<SecretVersion>, u64) + Send + Sync>;

type FetchResult = Result<Arc<SecretVersion>, StoreError>;
type Fetch = SharedFuture<BoxFuture<'static, FetchResult>>;

struct Shared {
    store: Arc<dyn SecretStore>,
    settings: CacheSettings,
    entries: DashMap<CacheKey, Arc<Entry>>,
    inflight: DashMap<CacheKey, Fetch>,
    /// The clock's origin, for `Entry::last_used`.
    epoch: Instant,
    /// Numbers fetches in the order they start.
    next_fetch: AtomicU64,
    counters: Counters,
    listener: OnceLock<ChangeListener>,
}

struct Entry {
    version: Arc<SecretVersion>,
    fetched_at: Instant,
    /// The number of the fetch that read it.
    fetch_number: u64,
    /// Milliseconds since `epoch` of the last read, for LRU eviction.
    last_used: AtomicU64,
    /// A refresh-ahead is under way.
    refreshing: AtomicBool,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    coalesced: AtomicU64,
    stale_served: AtomicU64,
    upstream_calls: AtomicU64,
    upstream_errors: AtomicU64,
    evictions: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Relaxed);
}

impl Cache {
    pub fn new(store: Arc<dyn SecretStore>, settings: CacheSettings) -> Self {
        Self {
            shared: Arc::new(Shared {
                store,
                settings,
                entries: DashMap::new(),
                inflight: DashMap::new(),
                epoch: Instant::now(),
                next_fetch: AtomicU64::new(0),
                counters: Counters::default(),
                listener: OnceLock::new(),
            }),
        }
    }

    /// Registers the one listener told of every stored version. A second
    /// registration is refused (returns false).
    pub fn set_change_listener(&self, listener: ChangeListener) -> bool {
        self.shared.listener.set(listener).is_ok()
    }

    /// Stores a version read by someone else (the change detector), as a
    /// fresh entry; the listener hears of it.
    pub fn put(&self, key: &CacheKey, version: Arc<SecretVersion>) {
        let number = self.shared.next_fetch.fetch_add(1, Relaxed);
        self.shared
            .store_entry(key, version, Instant::now(), number);
    }

    /// Drops one entry (the secret was deleted upstream).
    pub fn remove(&self, key: &CacheKey) {
        self.shared.entries.remove(key);
    }

    /// The store behind the cache.
    pub fn store(&self) -> &Arc<dyn SecretStore> {
        &self.shared.store
    }

    /// Reads through the cache. `bypass` asks upstream now, and the answer
    /// replaces the cached one for everybody.
    pub async fn get(&self, key: CacheKey, bypass: bool) -> Result<Lookup, StoreError> {
        if !bypass && let Some(lookup) = self.shared.fresh_hit(&key, true) {
            return Ok(lookup);
        }
        let fetch = if bypass {
            bump(&self.shared.counters.misses);
            self.shared.start_fetch(key.clone())
        } else {
            match self.shared.join_or_start_fetch(&key, true) {
                Joined::Hit(lookup) => return Ok(lookup),
                Joined::Fetch(fetch) => fetch,
            }
        };
        match fetch.await {
            Ok(version) => Ok(Lookup::fresh(version)),
            Err(error) if error.is_transient() => self.shared.stale_or(&key, error),
            Err(error) => Err(error),
        }
    }

    /// Reads upstream now, joining a read of the same key already under
    /// way (so a crowd asking at once still makes one call); the answer
    /// replaces the entry. For callers that must not act on a cached value,
    /// e.g. a watch's first state, compared with what the caller holds.
    pub async fn get_fresh(&self, key: CacheKey) -> Result<Lookup, StoreError> {
        match self.shared.join_or_start_fetch(&key, false) {
            Joined::Hit(lookup) => Ok(lookup),
            Joined::Fetch(fetch) => Ok(Lookup::fresh(fetch.await?)),
        }
    }

    /// Reads upstream now, replaces the entry, and tells whether the version
    /// differs from the one cached before (AdminService.RefreshSecret).
    pub async fn refresh(&self, key: CacheKey) -> Result<(Arc<SecretVersion>, bool), StoreError> {
        let before = self
            .shared
            .entries
            .get(&key)
            .map(|entry| entry.version.version_id.clone());
        bump(&self.shared.counters.misses);
        let version = self.shared.start_fetch(key).await?;
        let changed = before.as_deref() != Some(version.version_id.as_str());
        Ok((version, changed))
    }

    /// Drops the entries of these full names (every version selector), or
    /// every entry when `names` is empty. Returns how many were dropped.
    pub fn clear(&self, names: &[String]) -> u64 {
        let before = self.shared.entries.len();
        if names.is_empty() {
            self.shared.entries.clear();
        } else {
            self.shared
                .entries
                .retain(|key, _| !names.contains(&key.name));
        }
        before.saturating_sub(self.shared.entries.len()) as u64
    }

    pub fn stats(&self) -> CacheStats {
        let shared = &self.shared;
        let now = Instant::now();
        let total = shared.entries.len() as u64;
        let valid = shared
            .entries
            .iter()
            .filter(|entry| now.duration_since(entry.fetched_at) < shared.settings.ttl)
            .count() as u64;
        let read = |counter: &AtomicU64| counter.load(Relaxed);
        let counters = &shared.counters;
        CacheStats {
            total_entries: total,
            valid_entries: valid,
            expired_entries: total.saturating_sub(valid),
            hits: read(&counters.hits),
            misses: read(&counters.misses),
            coalesced: read(&counters.coalesced),
            stale_served: read(&counters.stale_served),
            upstream_calls: read(&counters.upstream_calls),
            upstream_errors: read(&counters.upstream_errors),
            evictions: read(&counters.evictions),
        }
    }
}

/// Removes a fetch from `inflight` when its task ends, however it ends.
struct LeaveInflight {
    shared: Arc<Shared>,
    key: CacheKey,
}

impl Drop for LeaveInflight {
    fn drop(&mut self) {
        self.shared.inflight.remove(&self.key);
    }
}

enum Joined {
    /// A fetch finished between the first look and joining: its value.
    Hit(Lookup),
    Fetch(Fetch),
}

impl Shared {
    fn now_millis(&self) -> u64 {
        self.millis_at(Instant::now())
    }

    fn millis_at(&self, at: Instant) -> u64 {
        at.duration_since(self.epoch).as_millis() as u64
    }

    /// The hot path: a fresh entry, counted as a hit, with refresh-ahead
    /// unless the caller holds `inflight`'s lock for this key.
    fn fresh_hit(self: &Arc<Self>, key: &CacheKey, may_refresh: bool) -> Option<Lookup> {
        let entry = Arc::clone(&*self.entries.get(key)?);
        let now = Instant::now();
        let age = now.duration_since(entry.fetched_at);
        let ttl = self.settings.ttl;
        if age >= ttl {
            return None;
        }
        entry.last_used.store(self.millis_at(now), Relaxed);
        bump(&self.counters.hits);
        if may_refresh && age >= ttl - ttl / 10 && !entry.refreshing.swap(true, Relaxed) {
            self.refresh_ahead(key);
        }
        Some(Lookup {
            version: Arc::clone(&entry.version),
            hit: true,
            age,
            stale: false,
        })
    }

    /// Starts a background fetch that callers missing meanwhile will join.
    fn refresh_ahead(self: &Arc<Self>, key: &CacheKey) {
        if let MapEntry::Vacant(slot) = self.inflight.entry(key.clone()) {
            let fetch = self.spawn_fetch(key.clone());
            slot.insert(fetch);
        }
    }

    /// Joins the fetch under way for `key`, or starts one. With
    /// `recheck_cache`, a value stored meanwhile answers instead: a fetch
    /// that just ended stored its value before leaving `inflight`.
    fn join_or_start_fetch(self: &Arc<Self>, key: &CacheKey, recheck_cache: bool) -> Joined {
        match self.inflight.entry(key.clone()) {
            MapEntry::Occupied(running) => {
                bump(&self.counters.coalesced);
                Joined::Fetch(running.get().clone())
            }
            MapEntry::Vacant(slot) => {
                if recheck_cache && let Some(lookup) = self.fresh_hit(key, false) {
                    return Joined::Hit(lookup);
                }
                bump(&self.counters.misses);
                let fetch = self.spawn_fetch(key.clone());
                slot.insert(fetch.clone());
                Joined::Fetch(fetch)
            }
        }
    }

    /// A fetch of its own, not shared with waiting callers (bypass, refresh).
    fn start_fetch(self: &Arc<Self>, key: CacheKey) -> Fetch {
        self.spawn_fetch_with(key, false)
    }

    /// A fetch registered in `inflight`, which it leaves when done.
    fn spawn_fetch(self: &Arc<Self>, key: CacheKey) -> Fetch {
        self.spawn_fetch_with(key, true)
    }

    fn spawn_fetch_with(self: &Arc<Self>, key: CacheKey, registered: bool) -> Fetch {
        let shared = Arc::clone(self);
        let number = self.next_fetch.fetch_add(1, Relaxed);
        // Shared fetches renew entries and may revalidate; a fetch of its
        // own was asked for a fresh value.
        let revalidate = registered;
        let task = tokio::spawn(async move {
            // Leaves `inflight` even if the fetch panics, so that the key
            // is not stuck on a dead fetch.
            let _leave = registered.then(|| LeaveInflight {
                shared: Arc::clone(&shared),
                key: key.clone(),
            });
            shared.fetch(&key, number, revalidate).await
        });
        async move {
            task.await.unwrap_or_else(|join_error| {
                Err(StoreError::Unavailable {
                    detail: format!("the upstream call was aborted: {join_error}"),
                })
            })
        }
        .boxed()
        .shared()
    }

    /// An upstream read (after a revalidation, when allowed and useful),
    /// and what it means for the cache.
    async fn fetch(&self, key: &CacheKey, number: u64, revalidate: bool) -> FetchResult {
        if revalidate && let Some(renewed) = self.revalidate(key, number).await {
            return renewed;
        }
        bump(&self.counters.upstream_calls);
        let started = Instant::now();
        let result = self
            .store
            .get_secret_value(&key.name, &key.selector)
            .await
            .and_then(|version| answered_as_asked(&key.name, version));
        self.settle(key, number, started, result.map(Arc::new))
    }

    /// Asks whether the cached version is still the one the stage points
    /// at. `None`: read the value (nothing cached, a version-id key, the
    /// version moved, or DescribeSecret refused, e.g. by IAM).
    async fn revalidate(&self, key: &CacheKey, number: u64) -> Option<FetchResult> {
        if !matches!(key.selector, VersionSelector::Stage(_)) {
            return None;
        }
        let cached = self
            .entries
            .get(key)
            .map(|entry| Arc::clone(&entry.version))?;
        bump(&self.counters.upstream_calls);
        let started = Instant::now();
        match self.store.describe_secret(&key.name).await {
            Ok(description)
                if !description.deleted
                    && description.selected_version(&key.selector)
                        == Some(cached.version_id.as_str()) =>
            {
                Some(self.settle(key, number, started, Ok(cached)))
            }
            Ok(_) => None,
            Err(error) if error.is_transient() => {
                Some(self.settle(key, number, started, Err(error)))
            }
            Err(_) => None,
        }
    }

    /// Records a read's outcome in the cache.
    fn settle(
        &self,
        key: &CacheKey,
        number: u64,
        started: Instant,
        result: FetchResult,
    ) -> FetchResult {
        match result {
            Ok(version) => {
                self.store_entry(key, Arc::clone(&version), started, number);
                Ok(version)
            }
            Err(error) => {
                bump(&self.counters.upstream_errors);
                if error.is_transient() {
                    tracing::warn!(secret = %key.name, %error, "upstream read failed; the last good value may be served, marked stale");
                } else {
                    tracing::debug!(secret = %key.name, %error, "upstream read refused");
                }
                if let Some(entry) = self.entries.get(key) {
                    entry.refreshing.store(false, Relaxed);
                }
                if !error.is_transient() {
                    // Not an entry a newer read stored meanwhile.
                    self.entries
                        .remove_if(key, |_, entry| entry.fetch_number < number);
                }
                Err(error)
            }
        }
    }

    fn store_entry(&self, key: &CacheKey, version: Arc<SecretVersion>, at: Instant, number: u64) {
        let entry = Arc::new(Entry {
            version: Arc::clone(&version),
            fetched_at: at,
            fetch_number: number,
            last_used: AtomicU64::new(self.now_millis()),
            refreshing: AtomicBool::new(false),
        });
        let (stored, is_new) = match self.entries.entry(key.clone()) {
            MapEntry::Occupied(mut current) => {
                // An older fetch that ends late must not roll the value back.
                let newer = current.get().fetch_number < number;
                if newer {
                    current.insert(entry);
                }
                (newer, false)
            }
            MapEntry::Vacant(slot) => {
                slot.insert(entry);
                (true, true)
            }
        };
        if is_new {
            self.evict_over_capacity(key);
        }
        if let (true, Some(listener)) = (stored, self.listener.get()) {
            listener(key, &version, number);
        }
    }

    /// Drops least recently used entries (never `keep`, just stored) until
    /// the cache is within its bound.
    fn evict_over_capacity(&self, keep: &CacheKey) {
        while self.entries.len() > self.settings.max_entries.max(1) {
            let oldest = self
                .entries
                .iter()
                .filter(|entry| entry.key() != keep)
                .min_by_key(|entry| entry.last_used.load(Relaxed))
                .map(|entry| entry.key().clone());
            let Some(oldest) = oldest else { return };
            if self.entries.remove(&oldest).is_some() {
                bump(&self.counters.evictions);
            }
        }
    }

    /// After a transient failure: the last good value within the staleness
    /// bound, or the failure. It is marked stale even within its TTL (a
    /// bypass read asked for a fresher one and did not get it).
    fn stale_or(&self, key: &CacheKey, error: StoreError) -> Result<Lookup, StoreError> {
        let Some(entry) = self.entries.get(key).map(|e| Arc::clone(&*e)) else {
            return Err(error);
        };
        let age = Instant::now().duration_since(entry.fetched_at);
        if age > self.settings.ttl + self.settings.max_stale {
            return Err(error);
        }
        bump(&self.counters.stale_served);
        Ok(Lookup {
            version: Arc::clone(&entry.version),
            hit: true,
            age,
            stale: true,
        })
    }
}

/// The second wall behind the policy: the secret the upstream answered
/// with must be the one asked for (and so the one the policy allowed).
fn answered_as_asked(asked: &str, version: SecretVersion) -> Result<SecretVersion, StoreError> {
    if names::answer_matches(asked, &version.name, &version.arn) {
        Ok(version)
    } else {
        Err(StoreError::Mismatch {
            asked: asked.to_owned(),
            answered: version.name.clone(),
        })
    }
}

#[cfg(test)]
mod tests;
