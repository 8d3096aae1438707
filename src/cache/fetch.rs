//! The upstream side of the cache: fetches (spawned, so that they finish
//! even when their caller goes away; registered in `inflight` so that
//! concurrent misses join one, or in `bypass_inflight` so that reads that
//! must not be served from the cache join one that started after they came),
//! revalidation with DescribeSecret, what an
//! answer means for the entry (stored, kept stale, dropped, remembered as
//! missing), and eviction when the bound is passed.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::Duration,
};

use dashmap::mapref::entry::Entry as MapEntry;
use futures::FutureExt;
use tokio::time::Instant;

use super::{CacheKey, Entry, Fetch, FetchResult, Shared, bump};
use crate::{
    backend::{AWSCURRENT, StoreError, VersionSelector},
    names,
    secret::SecretVersion,
};

/// How long a value may be renewed by DescribeSecret alone before
/// GetSecretValue is asked again. DescribeSecret needs neither the
/// GetSecretValue permission nor the secret's KMS key: a role whose reads
/// were revoked, or a KMS key disabled as a kill switch, would otherwise go
/// on being served the value at every renewal, for ever. Within this, the
/// read is refused (ACCESS_DENIED, or UPSTREAM_REJECTED for the key) and
/// the entry dropped.
pub(super) const VALUE_READ_EVERY: Duration = Duration::from_secs(3600);

/// Where a fetch is registered for others to join.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Registry {
    /// `inflight`: misses and renewals.
    Inflight,
    /// `bypass_inflight`: reads that must not be served from the cache.
    Bypass,
}

/// Removes a fetch from its registry when its task ends, however it ends.
struct Leave {
    shared: Arc<Shared>,
    key: CacheKey,
    registry: Registry,
    number: u64,
}

impl Drop for Leave {
    /// Only its own registration: a clear may have let a newer fetch of
    /// the key register meanwhile.
    fn drop(&mut self) {
        let number = self.number;
        let registry = match self.registry {
            Registry::Inflight => &self.shared.inflight,
            Registry::Bypass => &self.shared.bypass_inflight,
        };
        registry.remove_if(&self.key, |_, running| running.number == number);
    }
}

/// A fetch under way, as its registry holds it.
pub(super) struct Registered {
    /// Its fetch number: which callers may join it (a bypass read's, those
    /// that came before it started), and whose it is to leave.
    pub(super) number: u64,
    pub(super) fetch: Fetch,
}

impl Shared {
    /// Reads upstream a value no older than this call (a bypass read, a
    /// refresh), joining such a read of the same key when one started after
    /// the call came: a crowd of bypass reads (or a batch naming one secret
    /// a hundred times) makes one or two upstream calls, not one each, and
    /// none of them is answered with a value read before it asked.
    pub(super) async fn read_anew(self: &Arc<Self>, key: &CacheKey) -> FetchResult {
        let came = self.next_fetch.load(Relaxed);
        loop {
            let (earlier, number) = match self.bypass_inflight.entry(key.clone()) {
                MapEntry::Occupied(running) if running.get().number >= came => {
                    bump(&self.counters.coalesced);
                    let fetch = running.get().fetch.clone();
                    drop(running);
                    return fetch.await;
                }
                MapEntry::Occupied(running) => (running.get().fetch.clone(), running.get().number),
                MapEntry::Vacant(slot) => {
                    bump(&self.counters.misses);
                    let (number, fetch) = self.spawn_fetch_with(key.clone(), Registry::Bypass);
                    // Inserted while the map's shard is held: the fetch's
                    // `Leave` cannot run before it.
                    slot.insert(Registered {
                        number,
                        fetch: fetch.clone(),
                    });
                    return fetch.await;
                }
            };
            // It started before this call came: it may have read the value
            // this call must not be given. Once it is done, read anew.
            let _ = earlier.await;
            self.bypass_inflight
                .remove_if(key, |_, running| running.number == number);
        }
    }

    /// A fetch for `inflight`, which it leaves when done.
    pub(super) fn spawn_fetch(self: &Arc<Self>, key: CacheKey) -> Registered {
        let (number, fetch) = self.spawn_fetch_with(key, Registry::Inflight);
        Registered { number, fetch }
    }

    /// Starts a fetch registered in `registry`; its number, and the fetch.
    fn spawn_fetch_with(self: &Arc<Self>, key: CacheKey, registry: Registry) -> (u64, Fetch) {
        let shared = Arc::clone(self);
        let number = self.next_fetch.fetch_add(1, Relaxed);
        // Shared fetches renew entries and may revalidate; a bypass read
        // was asked for a value read now.
        let revalidate = registry == Registry::Inflight;
        let task = tokio::spawn(async move {
            // Leaves its registry even if the fetch panics, so that the key
            // is not stuck on a dead fetch.
            let _leave = Leave {
                shared: Arc::clone(&shared),
                key: key.clone(),
                registry,
                number,
            };
            shared.fetch(&key, number, revalidate).await
        });
        let fetch = async move {
            task.await.unwrap_or_else(|join_error| {
                // A panic's text is for the broker's log (where the panic
                // hook wrote it), not for callers.
                let detail = if join_error.is_panic() {
                    "the upstream call failed inside the broker (see the broker's log)"
                } else {
                    "the upstream call was aborted"
                };
                Err(StoreError::Unavailable {
                    detail: detail.to_owned(),
                })
            })
        }
        .boxed()
        .shared();
        (number, fetch)
    }

    /// An upstream read (after a revalidation, when allowed and useful),
    /// and what it means for the cache.
    pub(super) async fn fetch(&self, key: &CacheKey, number: u64, revalidate: bool) -> FetchResult {
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
    /// version moved, or DescribeSecret failed). DescribeSecret is only a
    /// cheaper way to the same answer: when it fails, even transiently (its
    /// own throttling quota, a 5xx of its own, an IAM or proxy rule on that
    /// action alone), GetSecretValue is asked rather than the entry
    /// failing while AWS may still serve the value. In a whole outage that
    /// is one more failing call per renewal, and the backoff bounds those.
    pub(super) async fn revalidate(&self, key: &CacheKey, number: u64) -> Option<FetchResult> {
        if !matches!(key.selector, VersionSelector::Stage(_)) {
            return None;
        }
        let cached = self
            .entries
            .get(key)
            .filter(|entry| entry.value_read_at.elapsed() < VALUE_READ_EVERY)
            .map(|entry| Arc::clone(&entry.version))?;
        bump(&self.counters.upstream_calls);
        let started = Instant::now();
        match self.store.describe_secret(&key.name).await {
            Ok(description)
                if !description.deleted
                    && description
                        .selected_version(&key.selector)
                        .is_some_and(|listed| {
                            // An answer without the ARN vouches for the
                            // version id alone.
                            let arn = if description.arn.is_empty() {
                                &cached.arn
                            } else {
                                &description.arn
                            };
                            cached.is(arn, listed)
                        }) =>
            {
                Some(self.settle(key, number, started, Ok(cached)))
            }
            Ok(_) => None,
            Err(error) => {
                tracing::debug!(secret = %key.name, %error, "DescribeSecret failed; reading the value instead");
                None
            }
        }
    }

    /// Records a read's outcome in the cache.
    pub(super) fn settle(
        &self,
        key: &CacheKey,
        number: u64,
        started: Instant,
        result: FetchResult,
    ) -> FetchResult {
        match &result {
            Err(error @ (StoreError::Throttled | StoreError::Unavailable { .. })) => {
                self.backoff.failed(error);
            }
            // Our own queue being full says nothing about the upstream.
            Err(StoreError::QueueFull) => {}
            _ => {
                self.backoff.succeeded();
            }
        }
        match result {
            Ok(version) => {
                self.store_entry(key, Arc::clone(&version), started, number);
                Ok(version)
            }
            Err(error) => {
                bump(&self.counters.upstream_errors);
                if let Some(entry) = self.entries.get(key) {
                    entry.refreshing.store(false, Relaxed);
                }
                if self.overtaken(key, number) {
                    tracing::debug!(secret = %key.name, %error, "a read overtaken by a newer one, a deletion or a clear failed");
                    return Err(error);
                }
                self.negative.remember(key, &error);
                if error.is_transient() {
                    // The upstream's state changes are logged by the health
                    // check, once each way; a line per failed read would
                    // repeat them.
                    tracing::debug!(secret = %key.name, %error, "upstream read failed; the last good value may be served, marked stale");
                } else {
                    tracing::debug!(secret = %key.name, %error, "upstream read refused");
                }
                if !error.is_transient() {
                    // Not an entry a newer read stored meanwhile.
                    let was_cached = self
                        .entries
                        .remove_if(key, |_, entry| entry.fetch_number < number)
                        .is_some();
                    let gone = matches!(
                        error,
                        StoreError::NotFound { .. } | StoreError::Deleted { .. }
                    );
                    if let (true, VersionSelector::Stage(_), Some(listener)) =
                        (gone, &key.selector, self.gone_listener.get())
                    {
                        listener(key, was_cached);
                    }
                }
                Err(error)
            }
        }
    }

    pub(super) fn store_entry(
        &self,
        key: &CacheKey,
        version: Arc<SecretVersion>,
        at: Instant,
        number: u64,
    ) {
        let mut older_than_a_clear = false;
        let entry = |slot, value_read_at| {
            Arc::new(Entry {
                version: Arc::clone(&version),
                fetched_at: at,
                value_read_at,
                fetch_number: number,
                slot,
                referenced: AtomicBool::new(false),
                refreshing: AtomicBool::new(false),
            })
        };
        let mut stage_moved = false;
        let mut doubted = false;
        let (stored, new_slot) = match self.entries.entry(key.clone()) {
            // Asked under the entry's lock, which `Cache::remove_deleted`
            // takes after writing its mark: a read that started before a
            // deletion never stores after it.
            _ if self.deleted_since(key, number) => return,
            // The same for a clear (`Cache::clear`); what was read is still
            // news to watchers, who may not have heard of it.
            _ if self.cleared_since(key, number) => {
                older_than_a_clear = true;
                (false, None)
            }
            MapEntry::Occupied(mut current) => {
                // An older fetch that ends late must not roll the value back.
                let newer = current.get().fetch_number < number;
                doubted = !newer
                    && matches!(key.selector, VersionSelector::Stage(_))
                    && !current.get().version.same_version(&version);
                if newer {
                    stage_moved = matches!(key.selector, VersionSelector::Stage(_))
                        && !current.get().version.same_version(&version);
                    let slot = current.get().slot;
                    // A renewal by DescribeSecret stores the same value
                    // again: it was not read now.
                    let value_read_at = if Arc::ptr_eq(&current.get().version, &version) {
                        current.get().value_read_at
                    } else {
                        at
                    };
                    current.insert(entry(slot, value_read_at));
                }
                (newer, None)
            }
            MapEntry::Vacant(vacant) => {
                let slot = self.clock.new_slot();
                vacant.insert(entry(slot, at));
                (true, Some(slot))
            }
        };
        if !older_than_a_clear {
            self.negative.forget(key);
        }
        if stored {
            // A newer read: the marks have done their work (unless newer
            // ones were written meanwhile).
            self.deleted_before
                .remove_if(key, |_, deleted| number >= *deleted);
            self.cleared_keys
                .remove_if(key, |_, cleared| number >= *cleared);
        }
        if stored && matches!(key.selector, VersionSelector::Id { .. }) {
            self.note_read_by_id(&key.name);
        }
        let stage_new = new_slot.is_some();
        if let Some(slot) = new_slot {
            let lookup = |key: &CacheKey| self.entries.get(key).map(|entry| Arc::clone(&*entry));
            self.clock
                .push(key.clone(), slot, self.entries.len(), lookup);
            self.evict_over_capacity(key);
        }
        if stage_moved {
            self.forget_version_ids(&key.name);
            if matches!(&key.selector, VersionSelector::Stage(stage) if stage == AWSCURRENT) {
                self.forget_other_stages(&key.name);
            }
        } else if let (true, VersionSelector::Stage(stage)) = (stage_new, &key.selector) {
            self.forget_version_ids_disagreeing(&key.name, stage, &version);
        }
        if let (true, Some(listener)) = (stored || older_than_a_clear, self.listener.get()) {
            listener(key, &version, number);
        }
        if let (true, Some(listener)) = (doubted, self.doubt_listener.get()) {
            listener(key, &version);
        }
    }

    /// Whether fetch `number` of `key` started before a clear of it.
    fn cleared_since(&self, key: &CacheKey, number: u64) -> bool {
        number < self.cleared_before.load(Relaxed) || marked_since(&self.cleared_keys, key, number)
    }

    /// Whether fetch `number` of `key` started before it was found deleted.
    fn deleted_since(&self, key: &CacheKey, number: u64) -> bool {
        marked_since(&self.deleted_before, key, number)
    }

    /// Whether a failed fetch has been overtaken: the key was found
    /// deleted or cleared since it started, or a newer read is stored. Its
    /// callers get its error; the cache and the watchers do not act on it.
    fn overtaken(&self, key: &CacheKey, number: u64) -> bool {
        self.cleared_since(key, number)
            || self.deleted_since(key, number)
            || self
                .entries
                .get(key)
                .is_some_and(|entry| entry.fetch_number > number)
    }

    /// A stage of `id`'s secret moved: what was cached by version id is read
    /// again when next asked. A version's value never changes, but the
    /// stages it carries do (they are in the answer), and a version asked
    /// with a stage is answered only while it carries it.
    pub(super) fn forget_version_ids(&self, id: &str) {
        self.forget_version_ids_where(id, |_| true);
    }

    /// `stage` was first stored for `id`'s secret, at `version`: what is
    /// cached by version id and tells otherwise (another version carrying
    /// the stage, or this one without it) is read again when next asked.
    /// A stage entry stored anew, not changed, has no older version to
    /// compare with: the version ids cached may be from before a rotation.
    fn forget_version_ids_disagreeing(&self, id: &str, stage: &str, version: &SecretVersion) {
        self.forget_version_ids_where(id, |cached| {
            cached.same_version(version) != cached.version_stages.iter().any(|s| s == stage)
        });
    }

    /// `id`'s current version moved: a rotation moves the other stages too
    /// (AWSPREVIOUS), so what is cached or remembered missing by another
    /// stage is read again when next asked, and a read of one already under
    /// way (it may have been answered before the rotation) stores nothing.
    /// Without this, a client told of the rotation at once and reading
    /// AWSPREVIOUS again got the version from before it, and kept it.
    /// Rotations are rare: a pass over the map each is cheap.
    fn forget_other_stages(&self, id: &str) {
        let name = names::secret_name(id);
        let mark = self.next_fetch.load(Relaxed);
        let other_stage = |key: &CacheKey| {
            matches!(&key.selector, VersionSelector::Stage(stage) if stage != AWSCURRENT)
                && names::secret_name(&key.name) == name
        };
        // Every key is marked, as ClearCache marks them: a read under way
        // may no longer be registered (a clear took it out of `inflight`)
        // and still store when it ends.
        self.clear_keys_where(mark, other_stage);
    }

    /// Drops what is cached by version id for `id`'s secret whose version
    /// `outdated` picks; nothing is looked at for a secret never read so.
    fn forget_version_ids_where(&self, id: &str, outdated: impl Fn(&SecretVersion) -> bool) {
        let name = names::secret_name(id);
        if !self.read_by_id.contains(name) {
            return;
        }
        self.entries.retain(|key, entry| {
            !(matches!(key.selector, VersionSelector::Id { .. })
                && names::secret_name(&key.name) == name
                && outdated(&entry.version))
        });
    }

    /// Notes that `id`'s secret has something cached by version id.
    fn note_read_by_id(&self, id: &str) {
        let name = names::secret_name(id);
        if !self.read_by_id.contains(name) {
            self.read_by_id.insert(name.to_owned());
        }
    }

    /// Evicts entries the clock picks (never `keep`, just stored) until the
    /// cache is within its bound.
    pub(super) fn evict_over_capacity(&self, keep: &CacheKey) {
        let bound = self.settings.max_entries.max(1);
        while self.entries.len() > bound {
            let lookup = |key: &CacheKey| {
                (key != keep)
                    .then(|| self.entries.get(key).map(|entry| Arc::clone(&*entry)))
                    .flatten()
            };
            let Some(victim) = self.clock.victim(self.entries.len(), lookup) else {
                return;
            };
            if let Some((victim, evicted)) = self.entries.remove(&victim) {
                bump(&self.counters.evictions);
                // A read older than the evicted value, still under way,
                // must not store into the empty slot what a caller may
                // already have seen replaced (a clear's rule, for one key).
                if self.inflight.contains_key(&victim) || self.bypass_inflight.contains_key(&victim)
                {
                    self.room_for_marks(&self.cleared_keys, 1);
                    self.cleared_keys
                        .insert(victim, evicted.fetch_number.saturating_add(1));
                }
            }
        }
    }
}

/// Whether `marks` holds a mark for `key` written after fetch `number`
/// started.
fn marked_since(marks: &dashmap::DashMap<CacheKey, u64>, key: &CacheKey, number: u64) -> bool {
    marks.get(key).is_some_and(|mark| number < *mark)
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
