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
//! - Slow is not down: a caller of an expired entry waits at most
//!   `upstream_wait` (and never past its own deadline) for the renewal, then
//!   gets the stale value while the renewal goes on in the background. A
//!   renewal that overran that wait, or a transient failure, backs the
//!   upstream off (`backoff`): meanwhile callers with a stale value get it at
//!   once, and one probe at a time asks again.
//! - The upstream is asked at most `upstream.concurrency` calls at a time,
//!   with a bounded queue behind (`backend::bounded`), and a NOT_FOUND is
//!   remembered for `negative_ttl` (`negative`): floods of misses reach AWS
//!   as a trickle.
//! - An entry due for renewal (expired, or refreshed ahead) is first
//!   revalidated with DescribeSecret: when the stage still points at the
//!   cached version, the entry is renewed without reading the value again
//!   (a version's value never changes upstream). DescribeSecret has four
//!   times GetSecretValue's quota, and no secret bytes cross the wire.
//!   Bypass reads and RefreshSecret always read the value.
//! - The entry count is bounded; inserting past it evicts by CLOCK
//!   (`eviction`): amortized O(1), recently read entries stay.
//! - Fetches are numbered; an answer older than the cached one never
//!   replaces it, so a slow fetch cannot roll a fresh value back.
//! - A secret may be cached under several ids (its name, its ARN) and
//!   selectors (stages, version ids). A clear names secrets, and drops
//!   every entry of each, whatever the id; an admin refresh drops the
//!   secret's other entries once AWS answered (a revoked read must end for
//!   every id). What was read by version id tells the stages that version
//!   carried: a stage that moves, or is first stored at another version,
//!   drops those entries (looked for only in secrets read so: `read_by_id`).
//! - Whoever needs to know when a key's version changes (the watch layer)
//!   registers one `ChangeListener`; every stored answer is offered to it,
//!   so a bypass read or a refresh that finds a new version is announced at
//!   once. The cache itself knows nothing of watchers.

use std::{
    collections::HashSet,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use dashmap::{DashMap, mapref::entry::Entry as MapEntry};
use futures::future::{BoxFuture, Shared as SharedFuture};
use tokio::time::Instant;

use crate::{
    backend::{SecretStore, StoreError, VersionSelector, bounded::BoundedStore},
    names::secret_name,
    secret::SecretVersion,
};

pub use crate::config::CacheSettings;

mod backoff;
mod eviction;
mod fetch;
mod key;
mod metrics;
mod negative;
mod stats;

use backoff::{Backoff, Permit};
use eviction::{Clock, Slotted};
use key::Keyed;
pub use key::{CacheKey, KeyRef};
use negative::NegativeEntries;
pub use stats::CacheStats;
use stats::{Counters, bump};

/// A value as the cache answers it.
#[derive(Debug, Clone)]
pub struct Lookup {
    /// The version answered.
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

/// A handle to the shared cache; cheap to clone.
#[derive(Clone)]
pub struct Cache {
    shared: Arc<Shared>,
}

/// Told of every version the cache stores, right after it is stored, with
/// the number of the read that produced it: listeners may be called out of
/// order by concurrent stores, and a lower number is older news.
pub type ChangeListener = Box<dyn Fn(&CacheKey, &Arc<SecretVersion>, u64) + Send + Sync>;

/// Told when a read of a stage found the secret (or the stage) gone, and
/// whether the key was cached: a bypass read or a RefreshSecret can be
/// the first to see a deletion, and the secret's other keys and watchers
/// must hear of it then, not at the next sweep round.
pub type GoneListener = Box<dyn Fn(&CacheKey, bool) + Send + Sync>;

/// Told when a read of a stage that started before the one cached ended
/// with another version: it is not stored (an older read never replaces a
/// newer one), but which of the two AWS holds now is not known (the read
/// started later may have reached AWS first), so the secret is read again.
pub type DoubtListener = Box<dyn Fn(&CacheKey, &SecretVersion) + Send + Sync>;

type FetchResult = Result<Arc<SecretVersion>, StoreError>;
type Fetch = SharedFuture<BoxFuture<'static, FetchResult>>;

struct Shared {
    /// The store behind the bound: what the cache and the change detector
    /// ask.
    store: Arc<dyn SecretStore>,
    bounded: Arc<BoundedStore>,
    settings: CacheSettings,
    /// Hashed with foldhash (seeded per process), not SipHash: every call
    /// hashes its key here, and only secrets that exist upstream (read
    /// and authorized) become keys, so there is little to collide with.
    entries: DashMap<CacheKey, Arc<Entry>, foldhash::quality::RandomState>,
    inflight: DashMap<CacheKey, fetch::Registered>,
    bypass_inflight: DashMap<CacheKey, fetch::Registered>,
    negative: NegativeEntries,
    backoff: Backoff,
    clock: Clock,
    /// Numbers fetches in the order they start.
    next_fetch: AtomicU64,
    /// Keys whose secret (or stage) was found deleted, with the first
    /// fetch number after that: an older read of the key that ends late
    /// must not put the deleted value back (and announce it). Per key: a
    /// stage gone, or an ARN whose name another secret has now, says
    /// nothing of the secret's other keys.
    deleted_before: DashMap<CacheKey, u64>,
    /// Keys cleared by name (ClearCache), with the first fetch number
    /// after: an older read that ends late does not put back what the
    /// clear forgot (what it read is still news to watchers).
    cleared_keys: DashMap<CacheKey, u64>,
    /// The first fetch number after the last clear of every entry: the
    /// same rule for all keys at once.
    cleared_before: AtomicU64,
    /// Secrets (by name) of which something was cached by version id:
    /// only theirs are looked for when a stage tells that those entries'
    /// stages may be out of date, so that a cache nobody reads by version
    /// id is never scanned for them. Bounded by the secrets that exist
    /// (only a read that answered stores), emptied by a clear of all.
    read_by_id: dashmap::DashSet<String>,
    counters: Counters,
    listener: OnceLock<ChangeListener>,
    gone_listener: OnceLock<GoneListener>,
    doubt_listener: OnceLock<DoubtListener>,
}

struct Entry {
    version: Arc<SecretVersion>,
    fetched_at: Instant,
    /// When GetSecretValue last answered this value (a renewal by
    /// DescribeSecret keeps it): see `fetch::VALUE_READ_EVERY`.
    value_read_at: Instant,
    /// The number of the fetch that read it.
    fetch_number: u64,
    /// Its place in the eviction clock (kept when the value is replaced).
    slot: u64,
    /// Read since the clock last passed it.
    referenced: AtomicBool,
    /// A refresh-ahead is under way.
    refreshing: AtomicBool,
}

impl Slotted for Arc<Entry> {
    fn slot(&self) -> u64 {
        self.slot
    }

    fn take_reference(&self) -> bool {
        self.referenced.swap(false, Relaxed)
    }
}

impl Cache {
    /// A cache over `store`, within `settings`.
    pub fn new(store: Arc<dyn SecretStore>, settings: CacheSettings) -> Self {
        let bounded = BoundedStore::wrap(store, settings.upstream);
        Self {
            shared: Arc::new(Shared {
                store: Arc::clone(&bounded) as Arc<dyn SecretStore>,
                bounded,
                settings,
                entries: DashMap::default(),
                inflight: DashMap::new(),
                bypass_inflight: DashMap::new(),
                negative: NegativeEntries::new(settings.negative_ttl, settings.max_entries),
                backoff: Backoff::default(),
                clock: Clock::default(),
                next_fetch: AtomicU64::new(0),
                deleted_before: DashMap::new(),
                cleared_keys: DashMap::new(),
                cleared_before: AtomicU64::new(0),
                read_by_id: dashmap::DashSet::new(),
                counters: Counters::default(),
                listener: OnceLock::new(),
                gone_listener: OnceLock::new(),
                doubt_listener: OnceLock::new(),
            }),
        }
    }

    /// Registers the one listener told of every stored version. A second
    /// registration is refused (returns false).
    pub fn set_change_listener(&self, listener: ChangeListener) -> bool {
        self.shared.listener.set(listener).is_ok()
    }

    /// Registers the one listener told of reads that found a stage gone. A
    /// second registration is refused (returns false).
    pub fn set_gone_listener(&self, listener: GoneListener) -> bool {
        self.shared.gone_listener.set(listener).is_ok()
    }

    /// Registers the one listener told of late reads that found another
    /// version than the one cached (`DoubtListener`). A second
    /// registration is refused (returns false).
    pub fn set_doubt_listener(&self, listener: DoubtListener) -> bool {
        self.shared.doubt_listener.set(listener).is_ok()
    }

    /// Stores a version read by someone else (the change detector), as a
    /// fresh entry; the listener hears of it.
    pub fn put(&self, key: &CacheKey, version: Arc<SecretVersion>) {
        let number = self.shared.next_fetch.fetch_add(1, Relaxed);
        self.shared
            .store_entry(key, version, Instant::now(), number);
    }

    /// Drops what is cached by version id of `id`'s secret: its stages
    /// have changed upstream (an event, or a listing, said so), and those
    /// entries tell the stages each version carried when read.
    pub fn forget_version_ids(&self, id: &str) {
        self.shared.forget_version_ids(id);
    }

    /// Forgets the remembered misses (NOT_FOUND) of every id `wanted`
    /// picks, whatever their version selector: a change was seen.
    pub fn forget_misses_where(&self, wanted: impl Fn(&str) -> bool) {
        self.shared.negative.forget_where(|key| wanted(&key.name));
    }

    /// `forget_misses_where`, of reads by stage only: `wanted` picks by
    /// id and stage.
    pub fn forget_stage_misses_where(&self, wanted: impl Fn(&str, &str) -> bool) {
        self.shared
            .negative
            .forget_where(|key| match &key.selector {
                VersionSelector::Stage(stage) => wanted(&key.name, stage),
                VersionSelector::Id { .. } => false,
            });
    }

    /// Drops `key`'s entry: its secret (or stage) was found deleted
    /// upstream. Reads under way since before then are not stored when
    /// they end.
    pub fn remove_deleted(&self, key: &CacheKey) {
        self.shared.room_for_marks(&self.shared.deleted_before, 1);
        self.shared.mark_deleted(key);
    }

    /// `remove_deleted` for every key whose id `belongs` picks, cached or
    /// being read now (a version id, an ARN not cached yet): the secret was
    /// found deleted upstream.
    pub fn remove_deleted_where(&self, belongs: impl Fn(&str) -> bool) {
        let shared = &self.shared;
        let keys = shared.keys_where(|key| belongs(&key.name));
        shared.room_for_marks(&shared.deleted_before, keys.len());
        for key in keys {
            shared.mark_deleted(&key);
        }
    }

    /// The cached keys `wanted` picks, with the version each holds (what
    /// the sweep compares with the upstream's listing).
    pub fn entries_where(
        &self,
        wanted: impl Fn(&CacheKey) -> bool,
    ) -> Vec<(CacheKey, Arc<SecretVersion>)> {
        self.shared
            .entries
            .iter()
            .filter(|entry| wanted(entry.key()))
            .map(|entry| (entry.key().clone(), Arc::clone(&entry.version)))
            .collect()
    }

    /// The version id cached for `key`, if any (not counted as a read).
    pub fn held_version(&self, key: &CacheKey) -> Option<String> {
        let entry = self.shared.entries.get(key)?;
        Some(entry.version.version_id.clone())
    }

    /// The store behind the cache, within the upstream bound
    /// (`--upstream-concurrency`): what every call upstream goes through,
    /// the sweep's and the health check's too.
    pub fn upstream(&self) -> &Arc<dyn SecretStore> {
        &self.shared.store
    }

    /// Reads through the cache. `bypass` asks upstream now, and the answer
    /// replaces the cached one for everybody.
    pub async fn get(&self, key: CacheKey, bypass: bool) -> Result<Lookup, StoreError> {
        self.get_until(key, bypass, None).await
    }

    /// A fresh hit for a borrowed key, without waiting or allocating (the
    /// hot path); `None` when the cache must be read with `get_until`.
    /// `now` is the call's start, which the caller has already read (the
    /// call reads the clock once less): the age is measured up to it, a few
    /// microseconds short, and an entry whose TTL ends in between is
    /// still served as fresh.
    pub fn hit(&self, key: KeyRef<'_>, now: Instant) -> Option<Lookup> {
        self.shared.fresh_hit(&key, true, now)
    }

    /// `get` for a caller that gives up at `deadline`: an expired entry's
    /// renewal is waited for at most `upstream_wait`, and never past it; a
    /// bypass read of a held value gets that value, marked stale, just
    /// before the deadline; a miss or a bypass read with nothing to fall
    /// back on is answered UNAVAILABLE just before the caller's own
    /// deadline (`before`; at the call timeout the gate answers
    /// CALL_TIMEOUT by itself).
    pub async fn get_until(
        &self,
        key: CacheKey,
        bypass: bool,
        deadline: Option<Deadline>,
    ) -> Result<Lookup, StoreError> {
        let callers = deadline.filter(|d| d.callers).map(|d| d.at);
        let deadline = deadline.map(|d| d.at);
        let shared = &self.shared;
        if bypass {
            shared.negative.forget(&key);
            // With a value to fall back on, whoever set the deadline, the
            // read must give way in time for the value to be served.
            let answer_by = match shared.stale_entry(&key) {
                Some(_) => deadline,
                None => callers,
            };
            let result = before(answer_by, shared.read_anew(&key)).await;
            return shared.answer(&key, result);
        }
        if let Some(lookup) = shared.fresh_hit(&key, true, Instant::now()) {
            return Ok(lookup);
        }
        if let Some(error) = shared.negative.get(&key) {
            bump(&shared.counters.negative_hits);
            return Err(error);
        }
        let Some(stale) = shared.stale_entry(&key) else {
            // Nothing to fall back on: the caller waits for the upstream.
            return match shared.join_or_start_fetch(&key, true) {
                Joined::Hit(lookup) => Ok(lookup),
                Joined::Fetch(fetch) => shared.answer(&key, before(callers, fetch).await),
            };
        };
        let _probe = match shared.backoff.permit() {
            Permit::Fallback => return Ok(shared.serve_stale(&stale)),
            Permit::Probe => Some(ProbeGuard(&shared.backoff)),
            Permit::Ask => None,
        };
        let fetch = match shared.join_or_start_fetch(&key, true) {
            Joined::Hit(lookup) => return Ok(lookup),
            Joined::Fetch(fetch) => fetch,
        };
        match tokio::time::timeout(shared.wait_until(deadline), fetch).await {
            Ok(result) => shared.answer(&key, result),
            Err(_overdue) => {
                // The renewal goes on in the background; it ends the backoff
                // when it answers.
                shared.backoff.overdue(&OVERDUE);
                Ok(shared.serve_stale(&stale))
            }
        }
    }

    /// Whether callers are being kept off the upstream now (a backoff):
    /// a read that may wait should not start one of its own meanwhile.
    pub fn upstream_backed_off(&self) -> bool {
        self.shared.backoff.active()
    }

    /// Reads upstream now, joining a read of the same key already under
    /// way (so a crowd asking at once still makes one call); the answer
    /// replaces the entry. For callers that must not act on a cached value,
    /// e.g. a watch's first state, compared with what the caller holds.
    pub async fn get_fresh(&self, key: CacheKey) -> Result<Lookup, StoreError> {
        self.shared.negative.forget(&key);
        match self.shared.join_or_start_fetch(&key, false) {
            Joined::Hit(lookup) => Ok(lookup),
            Joined::Fetch(fetch) => Ok(Lookup::fresh(fetch.await?)),
        }
    }

    /// `get_fresh` for a caller that may fall back on the cached entry (a
    /// watch's first state): with an entry within the staleness bound, the
    /// read is waited for at most `upstream_wait` (not at all while the
    /// upstream is backed off, but for one probe at a time), and an overdue
    /// read or a transient failure answers the entry (marked stale past its
    /// TTL). Slow is not down: a watcher is not
    /// refused, nor kept waiting for the SDK's timeout, while the broker
    /// holds a good value.
    pub async fn get_fresh_or_cached(&self, key: CacheKey) -> Result<Checked, StoreError> {
        let shared = &self.shared;
        let upstream = |lookup| Checked {
            lookup,
            upstream_answered: true,
        };
        let Some(cached) = shared.stale_entry(&key) else {
            return self.get_fresh(key).await.map(upstream);
        };
        // Within its TTL the entry is answered as a hit, past it as stale.
        let fallback = || Checked {
            lookup: shared
                .fresh_hit(&key, false, Instant::now())
                .unwrap_or_else(|| shared.serve_stale(&cached)),
            upstream_answered: false,
        };
        // As `get_until`: while backed off, one caller probes at a time.
        let _probe = match shared.backoff.permit() {
            Permit::Fallback => return Ok(fallback()),
            Permit::Probe => Some(ProbeGuard(&shared.backoff)),
            Permit::Ask => None,
        };
        match tokio::time::timeout(shared.settings.upstream_wait, self.get_fresh(key.clone())).await
        {
            Ok(Err(error)) if error.is_transient() => Ok(fallback()),
            Ok(answer) => answer.map(upstream),
            Err(_overdue) => {
                // The read goes on in the background, and tells the
                // watchers (the change listener) when it answers.
                shared.backoff.overdue(&OVERDUE);
                Ok(fallback())
            }
        }
    }

    /// Reads upstream now, replaces the entry, and tells whether the version
    /// differs from the one cached before (the watch layer's re-reads). A
    /// caller's own deadline is answered as `get_until` answers a miss.
    pub async fn refresh(
        &self,
        key: CacheKey,
        deadline: Option<Deadline>,
    ) -> Result<(Arc<SecretVersion>, bool), StoreError> {
        let held = self
            .shared
            .entries
            .get(&key)
            .map(|entry| Arc::clone(&entry.version));
        self.shared.negative.forget(&key);
        let callers = deadline.filter(|d| d.callers).map(|d| d.at);
        let version = before(callers, self.shared.read_anew(&key)).await?;
        let changed = !held.is_some_and(|held| held.same_version(&version));
        Ok((version, changed))
    }

    /// `refresh` for AdminService.RefreshSecret: once AWS has answered, yes
    /// or no, every other entry of the secret (read by its ARN, another
    /// stage, a version id) is read anew when next asked. A refresh that
    /// finds the read revoked ends it for the secret, not only for the id
    /// refreshed; one that finds a new version leaves no entry telling the
    /// old stages. After a transient failure they stay, to be served stale.
    /// Not for the watch layer's re-reads: those re-read each tracked
    /// entry, and would drop one another's.
    pub async fn refresh_the_secret(
        &self,
        key: CacheKey,
        deadline: Option<Deadline>,
    ) -> Result<(Arc<SecretVersion>, bool), StoreError> {
        let result = self.refresh(key.clone(), deadline).await;
        if result
            .as_ref()
            .map_or_else(|error| !error.is_transient(), |_| true)
        {
            self.clear_others_of_the_secret(&key);
        }
        result
    }

    /// Drops every entry of `key`'s secret but `key`'s own.
    fn clear_others_of_the_secret(&self, key: &CacheKey) {
        let secret = secret_name(&key.name);
        self.clear_where(false, |other| {
            other != key && secret_name(&other.name) == secret
        });
    }

    /// Drops the entries of these secrets (full names or ARNs: every id the
    /// secret was read by, name or ARN, and every version selector), or
    /// every entry when `names` is empty. Returns how many were dropped.
    ///
    /// Every id: a value cached under the secret's ARN is the same secret's
    /// value, and a clear that left it would leave a revoked read served.
    ///
    /// A read under way since before the clear still answers its callers,
    /// but neither stores what it read nor is joined by a read after the
    /// clear: it may have been answered before a rotation that a bypass
    /// read has since told a caller of.
    pub fn clear(&self, names: &[String]) -> u64 {
        let secrets: HashSet<&str> = names.iter().map(|id| secret_name(id)).collect();
        self.clear_where(names.is_empty(), |key| {
            secrets.contains(secret_name(&key.name))
        })
    }

    /// A change of the secrets `wanted` picks was heard (an event): their
    /// reads under way with nothing stored yet (a first read, or one after
    /// an eviction) may have been answered before it, so, as after a
    /// clear, they answer their callers but store nothing, and the next
    /// read goes upstream. Stored entries are left: the change re-reads
    /// them.
    pub fn forget_reads_under_way(&self, wanted: impl Fn(&str) -> bool) {
        let shared = &self.shared;
        let mark = shared.next_fetch.load(Relaxed);
        let keys: Vec<CacheKey> = shared
            .inflight
            .iter()
            .map(|fetch| fetch.key().clone())
            .chain(
                shared
                    .bypass_inflight
                    .iter()
                    .map(|fetch| fetch.key().clone()),
            )
            .filter(|key| wanted(&key.name) && !shared.entries.contains_key(key))
            .collect();
        shared.room_for_marks(&shared.cleared_keys, keys.len());
        for key in keys {
            shared.cleared_keys.insert(key.clone(), mark);
            shared
                .inflight
                .remove_if(&key, |_, running| running.number < mark);
        }
    }

    /// `clear`, of every entry when `all`, else of the keys `belongs` picks.
    fn clear_where(&self, all: bool, belongs: impl Fn(&CacheKey) -> bool) -> u64 {
        let shared = &self.shared;
        let before = shared.entries.len();
        let mark = shared.next_fetch.load(Relaxed);
        if all {
            shared.negative.forget_where(|_| true);
            // Written before the entries go: a read that stores after its
            // shard was cleared sees it (see `store_entry`). `max`: a
            // concurrent clear may have written a later one.
            shared.cleared_before.fetch_max(mark, Relaxed);
            shared.cleared_keys.clear();
            shared.read_by_id.clear();
            shared.inflight.retain(|_, running| running.number >= mark);
            shared.entries.clear();
            shared.clock.clear();
        } else {
            shared.clear_keys_where(mark, belongs);
        }
        before.saturating_sub(shared.entries.len()) as u64
    }
}

/// Lets the next caller probe once this one is done.
struct ProbeGuard<'a>(&'a Backoff);

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        self.0.probe_done();
    }
}

/// `get_fresh_or_cached`'s answer, and whether the upstream gave it: when
/// it did not (slow, failing, backed off), the cached entry may be behind
/// a version its caller already holds from another replica.
pub struct Checked {
    /// The state answered.
    pub lookup: Lookup,
    /// The upstream's answer, not the cached entry.
    pub upstream_answered: bool,
}

/// When a caller must have its answer, and whose limit that is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    /// The instant.
    pub at: Instant,
    /// The caller's own (`grpc-timeout`, shorter than the broker's call
    /// timeout). At the call timeout the broker answers by itself, with
    /// its reason (CALL_TIMEOUT); before a caller's own, nobody would.
    pub callers: bool,
}

/// Why a backoff started when a read overran the upstream wait.
const OVERDUE: &str = "AWS did not answer within --upstream-wait (the read goes on)";

/// How long before a caller's deadline its answer is given, at least, so
/// that it still reaches the caller.
const ANSWER_MARGIN: Duration = Duration::from_millis(100);

/// When to answer a caller that gives up at `deadline`, which is read from
/// `grpc-timeout`. Clients round that header up: grpc-core (Python, Node's
/// native client, C++...) to 10 ms below 10 s, to 100 ms below 100 s, then
/// to the second, so up to about 1% late, and grpcio sends a 10 s timeout
/// as `10100m`. An answer 100 ms before such a deadline lands as the
/// client gives up. So the margin is a fortieth of what is left, at least
/// `ANSWER_MARGIN`, and never over a tenth of it (a caller allowing 100 ms
/// still gets 90 of them for AWS's answer).
pub fn answer_by(deadline: Instant) -> Instant {
    let left = deadline.saturating_duration_since(Instant::now());
    deadline - answer_margin(left)
}

/// The margin `answer_by` keeps when `left` is left before the deadline.
fn answer_margin(left: Duration) -> Duration {
    ANSWER_MARGIN.max(left / 40).min(left / 10)
}

/// `read` for a caller that gives up at `deadline`: just before it the
/// caller is told that AWS has not answered (UNAVAILABLE, transient),
/// rather than left to hit its own DEADLINE_EXCEEDED with no word of why.
/// The read goes on (fetches are tasks of their own), and what it finds is
/// cached for the next caller.
async fn before(deadline: Option<Instant>, read: impl Future<Output = FetchResult>) -> FetchResult {
    let Some(deadline) = deadline else {
        return read.await;
    };
    tokio::time::timeout_at(answer_by(deadline), read)
        .await
        .unwrap_or_else(|_| {
            Err(StoreError::Unavailable {
                detail: "AWS did not answer within the call's deadline; the read goes on, \
                         and its answer is cached for the next call"
                    .into(),
            })
        })
}

enum Joined {
    /// A fetch finished between the first look and joining: its value.
    Hit(Lookup),
    Fetch(Fetch),
}

impl Shared {
    /// Makes room for `more` marks (deletions, or clears and evictions),
    /// bounded like the entries. When full, the marks go, before the new
    /// ones are written: forgetting them risks only a late read of a key
    /// marked earlier being kept (a deleted one, until the next sweep round
    /// or event finds it deleted again).
    fn room_for_marks(&self, marks: &DashMap<CacheKey, u64>, more: usize) {
        if marks.len() + more > self.settings.max_entries.max(1) {
            marks.clear();
        }
    }

    /// Drops the entries and remembered misses `belongs` picks, cached or
    /// being read now, marked cleared as of fetch number `mark`: a read
    /// that started before does not store what it read.
    fn clear_keys_where(&self, mark: u64, belongs: impl Fn(&CacheKey) -> bool) {
        self.negative.forget_where(&belongs);
        let keys = self.keys_where(&belongs);
        self.room_for_marks(&self.cleared_keys, keys.len());
        for key in keys {
            // Marked first, as a deletion is (see `mark_deleted`).
            self.cleared_keys.insert(key.clone(), mark);
            self.entries.remove(&key);
            self.inflight
                .remove_if(&key, |_, running| running.number < mark);
        }
    }

    /// The keys `belongs` picks, cached or being read now.
    fn keys_where(&self, belongs: impl Fn(&CacheKey) -> bool) -> HashSet<CacheKey> {
        // The fetches first: one that leaves its registry meanwhile has
        // stored its value already, and the entries, looked at after, have it.
        self.inflight
            .iter()
            .map(|fetch| fetch.key().clone())
            .chain(self.bypass_inflight.iter().map(|fetch| fetch.key().clone()))
            .chain(self.entries.iter().map(|entry| entry.key().clone()))
            .filter(|key| belongs(key))
            .collect()
    }

    /// Marks `key` deleted as of now and drops its entry; marked first: a
    /// late read stores only after it checked the mark, under the entry's
    /// lock.
    fn mark_deleted(&self, key: &CacheKey) {
        let next = self.next_fetch.load(Relaxed);
        self.deleted_before.insert(key.clone(), next);
        self.entries.remove(key);
    }

    /// The hot path: a fresh entry, counted as a hit, with refresh-ahead
    /// unless the caller holds `inflight`'s lock for this key.
    fn fresh_hit(
        self: &Arc<Self>,
        key: &dyn Keyed,
        may_refresh: bool,
        now: Instant,
    ) -> Option<Lookup> {
        // Read under the shard's guard: no clone of the entry, only of the
        // version answered.
        let entry = self.entries.get(key)?;
        // `saturating`: an entry stored after the caller's `now` is of age 0.
        let age = now.saturating_duration_since(entry.fetched_at);
        let ttl = self.settings.ttl;
        if age >= ttl {
            return None;
        }
        if !entry.referenced.load(Relaxed) {
            entry.referenced.store(true, Relaxed);
        }
        bump(&self.counters.hits);
        let refresh = may_refresh
            && age >= ttl - ttl / 10
            && !self.backoff.holding_back()
            && !entry.refreshing.swap(true, Relaxed);
        let lookup = Lookup {
            version: Arc::clone(&entry.version),
            hit: true,
            age,
            stale: false,
        };
        // The refresh's fetch stores into this map: not under its guard.
        drop(entry);
        if refresh {
            self.refresh_ahead(key);
        }
        Some(lookup)
    }

    /// Starts a background fetch that callers missing meanwhile will join.
    fn refresh_ahead(self: &Arc<Self>, key: &dyn Keyed) {
        let key = key.key().to_owned();
        if let MapEntry::Vacant(slot) = self.inflight.entry(key.clone()) {
            slot.insert(self.spawn_fetch(key.clone()));
        }
    }

    /// Joins the fetch under way for `key`, or starts one. With
    /// `recheck_cache`, a value stored meanwhile answers instead: a fetch
    /// that just ended stored its value before leaving `inflight`.
    fn join_or_start_fetch(self: &Arc<Self>, key: &CacheKey, recheck_cache: bool) -> Joined {
        match self.inflight.entry(key.clone()) {
            MapEntry::Occupied(running) => {
                bump(&self.counters.coalesced);
                Joined::Fetch(running.get().fetch.clone())
            }
            MapEntry::Vacant(slot) => {
                if recheck_cache && let Some(lookup) = self.fresh_hit(key, false, Instant::now()) {
                    return Joined::Hit(lookup);
                }
                bump(&self.counters.misses);
                let registered = self.spawn_fetch(key.clone());
                let fetch = registered.fetch.clone();
                slot.insert(registered);
                Joined::Fetch(fetch)
            }
        }
    }

    /// The answer of a fetch to its caller: a value, or after a transient
    /// failure the last good value within the staleness bound.
    fn answer(&self, key: &CacheKey, result: FetchResult) -> Result<Lookup, StoreError> {
        match result {
            Ok(version) => Ok(Lookup::fresh(version)),
            Err(error) if error.is_transient() => self.stale_or(key, error),
            Err(error) => Err(error),
        }
    }

    /// An expired entry that may still be served stale.
    fn stale_entry(&self, key: &CacheKey) -> Option<Arc<Entry>> {
        let entry = self.entries.get(key).map(|e| Arc::clone(&*e))?;
        let age = Instant::now().duration_since(entry.fetched_at);
        (age <= self.settings.ttl + self.settings.max_stale).then_some(entry)
    }

    fn serve_stale(&self, entry: &Entry) -> Lookup {
        bump(&self.counters.stale_served);
        Lookup {
            version: Arc::clone(&entry.version),
            hit: true,
            age: Instant::now().duration_since(entry.fetched_at),
            stale: true,
        }
    }

    /// How long a caller with a stale value waits for its renewal: at most
    /// `upstream_wait`, and ending a little before the caller's deadline so
    /// that the stale answer still reaches it.
    fn wait_until(&self, deadline: Option<Instant>) -> Duration {
        let wait = self.settings.upstream_wait;
        match deadline {
            // At least `ANSWER_MARGIN` before it: the stale value is there
            // to be given, and a short deadline has little room for the
            // answer to travel.
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                wait.min(left.saturating_sub(answer_margin(left).max(ANSWER_MARGIN)))
            }
            None => wait,
        }
    }

    /// After a transient failure: the last good value within the staleness
    /// bound, or the failure. It is marked stale even within its TTL (a
    /// bypass read asked for a fresher one and did not get it).
    fn stale_or(&self, key: &CacheKey, error: StoreError) -> Result<Lookup, StoreError> {
        match self.stale_entry(key) {
            Some(entry) => Ok(self.serve_stale(&entry)),
            None => Err(error),
        }
    }
}

#[cfg(test)]
mod tests;
