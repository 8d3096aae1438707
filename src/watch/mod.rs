//! Freshness: rotation notifications for watchers, and keeping every
//! cached secret current (not only the watched ones) between TTLs.
//!
//! Design, and why:
//! - Each watched (secret, stage) is a *topic* holding its latest state in a
//!   `tokio::sync::watch` channel. Sending never waits for receivers, and a
//!   receiver only ever sees the newest state: a slow watcher cannot block
//!   the others, and can never see an older version after a newer one (it
//!   may skip intermediate ones). An idle watcher costs one receiver (a
//!   pointer and a counter) plus its gRPC stream.
//! - What is *tracked* is every cached entry read by stage plus every topic.
//!   Two things keep it fresh, each ending in the same step (`reread`):
//!   - events (`crate::events`): a message that a secret changed makes
//!     `refresh_secret` re-read every tracked stage of that name at once;
//!   - the sweep (`sweep`), every `interval` (±10% jitter, so that replicas
//!     do not poll in step): the upstream's *metadata* of every tracked
//!     secret (ListSecrets pages), at most one call per 20 tracked secrets,
//!     and a value read only where a stage moved. A store that can tell it
//!     changed (the file backend) wakes it at once.
//!
//!   The cache's TTL stays the last resort behind both.
//! - Re-reads go through the cache, and the cache tells this module of every
//!   version it stores (its change listener). So a change found by an
//!   event, the sweep, a bypass read or AdminService.RefreshSecret updates
//!   the cache and reaches the watchers in one step, and a GetSecret after
//!   it returns the new version.
//! - A deletion is confirmed upstream (a read or DescribeSecret that says
//!   so) before watchers hear DELETED; the secret's entries are dropped.
//! - On shutdown every stream ends with UNAVAILABLE so that clients
//!   reconnect (to another replica) with `since_version_id`.

use std::{
    sync::{
        Arc, Weak,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, SystemTime},
};

use dashmap::DashMap;
use tokio::sync::watch;

use crate::{
    backend::{StoreError, VersionSelector},
    cache::{Cache, CacheKey},
    secret::SecretVersion,
};

/// The secrets someone still follows. Topics stay until the sweep drops
/// them; a secret watched at two stages, or by name and by ARN, is one.
fn watched_secrets(topics: &DashMap<TopicKey, Arc<Topic>>) -> u64 {
    topics
        .iter()
        .filter(|topic| topic.state.receiver_count() > 0)
        .map(|topic| crate::names::secret_name(&topic.key().name).to_owned())
        .collect::<std::collections::HashSet<_>>()
        .len() as u64
}

/// What last happened to a watched secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchEvent {
    /// Nothing since the topic started: its first known version.
    Current,
    Rotated,
    Deleted,
    Restored,
}

/// A topic's latest state.
#[derive(Debug, Clone)]
pub struct WatchState {
    pub event: WatchEvent,
    /// The version the stage points at (for `Deleted`, the last one known).
    pub version: Arc<SecretVersion>,
    pub observed_at: SystemTime,
    /// The number of the cache read that brought `version`: an offer with
    /// a lower one is older news and must not roll watchers back.
    read_number: u64,
}

#[cfg(test)]
impl WatchState {
    /// A state as a topic would hold it, for tests of what is sent.
    pub(crate) fn new_for_tests(event: WatchEvent, version: Arc<SecretVersion>) -> Self {
        Self {
            event,
            version,
            observed_at: SystemTime::UNIX_EPOCH,
            read_number: 0,
        }
    }
}

/// What a new watcher gets: the state now, and the changes after it.
pub struct Subscription {
    pub first: WatchState,
    /// Whether `first` was checked with the upstream for a watcher that
    /// resumes: when AWS did not answer in time, the cached state may be
    /// older than the version the watcher holds (read from a replica that
    /// saw a rotation this one has not), and must not be told as a change.
    pub checked: bool,
    pub changes: watch::Receiver<WatchState>,
    /// Becomes `true` when the broker shuts down.
    pub shutdown: watch::Receiver<bool>,
    /// Counts the watcher until dropped.
    pub _guard: WatcherGuard,
}

/// Keeps a watcher counted while it lives.
pub struct WatcherGuard {
    shared: Arc<Shared>,
}

impl Drop for WatcherGuard {
    fn drop(&mut self) {
        self.shared.watchers.fetch_sub(1, Relaxed);
    }
}

/// Counters of the watch layer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WatchStats {
    pub watchers: u64,
    /// Changes broadcast (rotations, deletions, restorations).
    pub events: u64,
    pub watched_secrets: u64,
    /// Sweep rounds that had something to check.
    pub rounds: u64,
    /// Upstream calls of the sweep (listings, descriptions, re-reads).
    pub upstream_calls: u64,
    /// Tracked entries the sweep found changed (re-read or deleted).
    pub sweep_changes: u64,
}

/// What `refresh_secret` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refreshed {
    /// Nothing of that secret is cached or watched here.
    Untracked,
    /// Its tracked stages were re-read (`changed` of them held another
    /// version than before, or it is gone). `behind`: the stage the event
    /// names still does not hold the version it names (AWS may answer a
    /// read with the state before the change for a moment after it).
    Reread {
        reads: usize,
        changed: usize,
        behind: bool,
    },
    /// Every tracked stage already holds the version the event names.
    AlreadyCurrent,
    /// A re-read failed for a reason that says nothing of the secret (the
    /// upstream was down or busy): the sweep will look again.
    Failed(StoreError),
}

/// A handle to the watch layer; cheap to clone.
#[derive(Clone)]
pub struct WatchHub {
    shared: Arc<Shared>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct TopicKey {
    name: String,
    stage: String,
}

impl TopicKey {
    /// The cache's key for the same (id, stage).
    fn cache_key(&self) -> CacheKey {
        CacheKey::new(
            self.name.clone(),
            VersionSelector::Stage(self.stage.clone()),
        )
    }
}

struct Topic {
    state: watch::Sender<WatchState>,
}

struct Shared {
    cache: Cache,
    interval: Duration,
    /// What the sweep lists: the secret prefix with its slash (`""`: all).
    listed_prefix: String,
    topics: DashMap<TopicKey, Arc<Topic>>,
    watchers: AtomicU64,
    rounds: AtomicU64,
    upstream_calls: AtomicU64,
    sweep_changes: AtomicU64,
    events: AtomicU64,
    /// Where a listing left off when a round's budget ran out.
    cursor: std::sync::Mutex<sweep::Cursor>,
    shutdown: watch::Sender<bool>,
}

impl WatchHub {
    /// Creates the hub and registers it as the cache's change listener.
    /// The sweep runs every `interval` and lists the secrets whose names
    /// start with `listed_prefix` (the secret prefix and its slash).
    pub fn new(cache: Cache, interval: Duration, listed_prefix: &str) -> Self {
        let shared = Arc::new(Shared {
            cache: cache.clone(),
            interval,
            listed_prefix: listed_prefix.to_owned(),
            topics: DashMap::new(),
            watchers: AtomicU64::new(0),
            rounds: AtomicU64::new(0),
            upstream_calls: AtomicU64::new(0),
            sweep_changes: AtomicU64::new(0),
            events: AtomicU64::new(0),
            cursor: std::sync::Mutex::default(),
            shutdown: watch::Sender::new(false),
        });
        // Weak: the cache (held by the hub) must not keep the hub alive.
        let listener: Weak<Shared> = Arc::downgrade(&shared);
        cache.set_change_listener(Box::new(move |key, version, number| {
            if let (Some(shared), VersionSelector::Stage(stage)) =
                (listener.upgrade(), &key.selector)
            {
                let topic_key = TopicKey {
                    name: key.name.clone(),
                    stage: stage.clone(),
                };
                if let Some(event) = shared.topics.get(&topic_key).and_then(|t| t.offer(version, number)) {
                    shared.events.fetch_add(1, Relaxed);
                    tracing::info!(secret = %key.name, stage = stage.as_str(), version_id = version.version_id.as_str(), ?event, "secret change observed");
                }
            }
        }));
        let gone: Weak<Shared> = Arc::downgrade(&shared);
        cache.set_gone_listener(Box::new(move |key, was_cached| {
            if let (Some(shared), VersionSelector::Stage(stage)) = (gone.upgrade(), &key.selector) {
                shared.stage_gone(&key.name, stage, was_cached);
            }
        }));
        // A late read found another version than the cache holds: the
        // secret is read again now, as after an event, rather than the
        // cache (and its watchers) keeping what may be the older one until
        // the sweep.
        let doubt: Weak<Shared> = Arc::downgrade(&shared);
        cache.set_doubt_listener(Box::new(move |key, version| {
            if let (Some(shared), VersionSelector::Stage(stage)) = (doubt.upgrade(), &key.selector)
            {
                WatchHub { shared }.spread_change(&key.name, stage, &version.version_id);
            }
        }));
        Self { shared }
    }

    /// Starts watching `name` (a full name) at `stage`.
    ///
    /// A new topic's first state is read from upstream, not from the cache;
    /// so is an existing topic's when the watcher `resumes` (it presents the
    /// version it holds): it must learn of a rotation that neither the cache
    /// nor the topic may show yet, and first. That read is coalesced with
    /// any other of the same key, and what it finds reaches the topic's
    /// other watchers too. While the upstream is slow or down, that read is
    /// waited for at most `upstream_wait`, and the cached value (within the
    /// staleness bound) is the first state instead, marked not `checked`
    /// (the API then waits for the read with `confirm_first` when the state
    /// would tell the watcher something); the sweep tells of any change
    /// once the upstream answers. A plain new watcher of a watched
    /// secret starts from the topic's state, which the detector keeps
    /// current (a known deletion included). A secret that cannot be read
    /// (not found, deleted, upstream down with nothing cached) is refused
    /// at once.
    pub async fn subscribe(
        &self,
        name: String,
        stage: String,
        resumes: bool,
    ) -> Result<Subscription, StoreError> {
        let shared = &self.shared;
        let topic_key = TopicKey { name, stage };
        let cache_key = topic_key.cache_key();
        // Subscribing under the map's guard: a detector round drops topics
        // with no receivers, and must not drop this one in between.
        let subscribed = shared.topics.get(&topic_key).map(|t| t.state.subscribe());
        let mut checked = true;
        let mut changes = match subscribed {
            Some(changes) if !resumes => changes,
            Some(changes) => match shared.cache.get_fresh_or_cached(cache_key).await {
                // The read told the topic (the cache's change listener).
                Ok(answer) => {
                    checked = answer.upstream_answered;
                    changes
                }
                Err(error) if error.is_transient() => {
                    checked = false;
                    changes
                }
                // Marked for deletion (the sweep may not have seen it yet):
                // everyone is told, and the stream goes on at DELETED.
                Err(StoreError::Deleted { .. }) => {
                    shared.forget_deleted_id(&topic_key.name);
                    changes
                }
                Err(error) => return Err(error),
            },
            None => {
                // A secret marked for deletion can be restored: its stream
                // opens at DELETED (a watcher that reconnects to a broker
                // started since keeps waiting for the restore).
                let topic = match shared.cache.get_fresh_or_cached(cache_key.clone()).await {
                    Ok(answer) => {
                        checked = answer.upstream_answered;
                        Topic::new(answer.lookup.version)
                    }
                    Err(StoreError::Deleted { .. }) => {
                        // A read under way since before must not restore it.
                        shared.cache.remove_deleted(&cache_key);
                        Topic::deleted(&topic_key.name)
                    }
                    Err(error) => return Err(error),
                };
                shared
                    .topics
                    .entry(topic_key)
                    .or_insert_with(|| Arc::new(topic))
                    .state
                    .subscribe()
            }
        };
        let first = changes.borrow_and_update().clone();
        shared.watchers.fetch_add(1, Relaxed);
        Ok(Subscription {
            first,
            checked,
            changes,
            shutdown: shared.shutdown.subscribe(),
            _guard: WatcherGuard {
                shared: Arc::clone(shared),
            },
        })
    }

    /// Waits for a fresh read of the subscription's secret, and takes the
    /// state it leaves as the first one. For a resuming watcher whose
    /// first state AWS did not confirm and that would tell it something
    /// (another version, or DELETED): this replica may be behind the
    /// watcher (its version older) or ahead of it (a rotation the watcher
    /// missed), and only AWS can say which. The read is the one under way
    /// (joined) or a new one, bounded by AWS's own timeouts; none is made
    /// while the upstream is backed off (the watcher reconnects), nor
    /// waited for past shutdown. Only a value read confirms the state: a
    /// transient failure leaves it unconfirmed, and any other is the
    /// watcher's answer, as when it subscribes.
    pub async fn confirm_first(
        &self,
        subscription: &mut Subscription,
        name: &str,
        stage: &str,
    ) -> Result<(), StoreError> {
        let cache = &self.shared.cache;
        if cache.upstream_backed_off() {
            return Ok(());
        }
        let key = TopicKey {
            name: name.to_owned(),
            stage: stage.to_owned(),
        }
        .cache_key();
        let mut shutdown = subscription.shutdown.clone();
        let read = tokio::select! {
            read = cache.get_fresh(key) => read,
            _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
        };
        match read {
            // The answer reached the topic through the cache's change
            // listener before the read returned.
            Ok(_) => {
                subscription.checked = true;
                subscription.first = subscription.changes.borrow_and_update().clone();
                Ok(())
            }
            Err(error) if error.is_transient() => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// A read outside the detector (a bypass read, RefreshSecret) found
    /// `id`'s `stage` at `version_id`, a change: the secret's other tracked
    /// stages and ids (AWSPREVIOUS, its ARN beside its name) are re-read
    /// now, as after an event, in the background; otherwise their watchers
    /// and entries would wait for the sweep.
    pub fn spread_change(&self, id: &str, stage: &str, version_id: &str) {
        let hub = self.clone();
        let ids = vec![id.to_owned()];
        let hint = (stage.to_owned(), version_id.to_owned());
        tokio::spawn(async move {
            let hint = Some((hint.0.as_str(), hint.1.as_str()));
            let _ = hub.refresh_secret(&ids, hint).await;
        });
    }

    /// How often the sweep runs (before jitter).
    pub fn interval(&self) -> Duration {
        self.shared.interval
    }

    pub fn stats(&self) -> WatchStats {
        let shared = &self.shared;
        WatchStats {
            watchers: shared.watchers.load(Relaxed),
            events: shared.events.load(Relaxed),
            watched_secrets: watched_secrets(&shared.topics),
            rounds: shared.rounds.load(Relaxed),
            upstream_calls: shared.upstream_calls.load(Relaxed),
            sweep_changes: shared.sweep_changes.load(Relaxed),
        }
    }

    /// Ends every stream (with UNAVAILABLE) and the sweep.
    pub fn shutdown(&self) {
        self.shared.shutdown.send_replace(true);
    }

    /// Resolves once `shutdown` has been called (at once if it has).
    pub fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut shutdown = self.shared.shutdown.subscribe();
        async move {
            // An error means the hub is gone: stopped too.
            let _ = shutdown.wait_for(|stop| *stop).await;
        }
    }

    /// Runs the sweep until shutdown.
    pub async fn sweep(self) {
        let store = Arc::clone(self.shared.cache.upstream());
        Arc::clone(&self.shared).sweep(store).await
    }
}

impl Topic {
    fn new(version: Arc<SecretVersion>) -> Self {
        Self {
            state: watch::Sender::new(WatchState {
                event: WatchEvent::Current,
                version,
                observed_at: SystemTime::now(),
                read_number: 0,
            }),
        }
    }

    /// A secret found marked for deletion before anything of it was held:
    /// its state is DELETED, with its name (and ARN, when watched by it)
    /// and no version.
    fn deleted(id: &str) -> Self {
        let name = crate::names::secret_name(id);
        // An id that is not the name is the ARN it was watched by.
        let arn = if name == id {
            String::new()
        } else {
            id.to_owned()
        };
        let version = SecretVersion {
            name: name.to_owned(),
            arn,
            version_id: String::new(),
            version_stages: Vec::new(),
            created_date: None,
            value: crate::secret::SecretValue::text(String::new()),
            encoded: Default::default(),
        };
        let topic = Self::new(Arc::new(version));
        topic.mark_deleted();
        topic
    }

    /// A version read upstream: an event if it is news (returns which).
    fn offer(&self, version: &Arc<SecretVersion>, read_number: u64) -> Option<WatchEvent> {
        let mut news = None;
        self.state.send_if_modified(|state| {
            if read_number < state.read_number {
                return false;
            }
            state.read_number = read_number;
            let event = if state.event == WatchEvent::Deleted {
                WatchEvent::Restored
            } else if !state.version.same_version(version) {
                WatchEvent::Rotated
            } else {
                return false;
            };
            *state = WatchState {
                event,
                version: Arc::clone(version),
                observed_at: SystemTime::now(),
                read_number,
            };
            news = Some(event);
            true
        });
        news
    }

    /// Returns whether this is news.
    fn mark_deleted(&self) -> bool {
        self.state.send_if_modified(|state| {
            if state.event == WatchEvent::Deleted {
                return false;
            }
            state.event = WatchEvent::Deleted;
            state.observed_at = SystemTime::now();
            true
        })
    }
}

/// Completes when the store signals a change; never without a signal.
async fn changed(signal: &mut Option<watch::Receiver<u64>>) {
    let Some(receiver) = signal else {
        return std::future::pending().await;
    };
    if receiver.changed().await.is_ok() {
        return;
    }
    // The store is gone: nothing more will come.
    *signal = None;
    std::future::pending().await
}

/// The interval ±10%, so that replicas started together drift apart.
fn jittered(interval: Duration) -> Duration {
    interval.mul_f64(0.9 + fastrand::f64() * 0.2)
}

impl WatchHub {
    /// Registers the watch layer's metrics.
    pub fn register_metrics(&self, metrics: &crate::metrics::Metrics) {
        use crate::metrics::{counter, gauge};
        let hub = self.clone();
        metrics.register_state(move |e| {
            let watch = hub.stats();
            gauge(
                e,
                "watchers",
                "Open WatchSecret streams",
                watch.watchers as i64,
            )?;
            gauge(
                e,
                "watched_secrets",
                "Secrets with at least one watcher",
                watch.watched_secrets as i64,
            )?;
            counter(
                e,
                "watch_events",
                "Changes broadcast to watchers",
                watch.events,
            )?;
            counter(
                e,
                "watch_rounds",
                "Rounds of the sweep that had secrets to check",
                watch.rounds,
            )?;
            counter(
                e,
                "sweep_upstream_calls",
                "Upstream calls of the sweep (listings, descriptions, re-reads)",
                watch.upstream_calls,
            )?;
            counter(
                e,
                "sweep_changes",
                "Cached or watched secrets the sweep found changed",
                watch.sweep_changes,
            )?;
            Ok(())
        });
    }
}

mod refresh;
mod sweep;
#[cfg(test)]
pub(crate) mod tests;
