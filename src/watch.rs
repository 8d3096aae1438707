//! Rotation notifications: one change detector for the whole broker and a
//! per-secret broadcast of the latest state.
//!
//! Design, and why:
//! - Each watched (secret, stage) is a *topic* holding its latest state in a
//!   `tokio::sync::watch` channel. Sending never waits for receivers, and a
//!   receiver only ever sees the newest state: a slow watcher cannot block
//!   the detector or the others, and can never see an older version after
//!   a newer one (it may skip intermediate ones). An idle watcher costs one
//!   receiver (a pointer and a counter) plus its gRPC stream.
//! - The detector runs every `interval` (±10% jitter, so that replicas do
//!   not poll in step) and checks every watched secret: current versions in
//!   batches (one BatchGetSecretValue per 20 secrets), other stages one call
//!   each. Its cost depends on the number of watched secrets, never on the
//!   number of watchers. A store that can tell it changed (the file
//!   backend) wakes it at once.
//! - A batch answer whose version does not carry the watched stage (AWS's
//!   short consistency delays; moto's batch answers after a stage move) is
//!   not trusted: that secret is read directly by stage in the same round,
//!   so a rotation is never put off to a next round that may answer the
//!   same.
//! - What the detector reads goes into the cache, and the cache tells this
//!   module of every version it stores (its change listener). So a change
//!   found by the detector, a bypass read or an AdminService.RefreshSecret
//!   updates the cache and reaches the watchers in one step, and a GetSecret
//!   after the event returns the new version.
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
    backend::{AWSCURRENT, SecretStore, StoreError, VersionSelector},
    cache::{Cache, CacheKey},
    names,
    secret::SecretVersion,
};

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

/// What a new watcher gets: the state now, and the changes after it.
pub struct Subscription {
    pub first: WatchState,
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
    pub rounds: u64,
    pub upstream_calls: u64,
}

/// A handle to the watch layer; cheap to clone.
#[derive(Clone)]
pub struct WatchHub {
    shared: Arc<Shared>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct TopicKey {
    name: String,
    stage: String,
}

struct Topic {
    state: watch::Sender<WatchState>,
}

struct Shared {
    cache: Cache,
    interval: Duration,
    topics: DashMap<TopicKey, Arc<Topic>>,
    watchers: AtomicU64,
    rounds: AtomicU64,
    upstream_calls: AtomicU64,
    events: AtomicU64,
    shutdown: watch::Sender<bool>,
}

impl WatchHub {
    /// Creates the hub and registers it as the cache's change listener.
    pub fn new(cache: Cache, interval: Duration) -> Self {
        let shared = Arc::new(Shared {
            cache: cache.clone(),
            interval,
            topics: DashMap::new(),
            watchers: AtomicU64::new(0),
            rounds: AtomicU64::new(0),
            upstream_calls: AtomicU64::new(0),
            events: AtomicU64::new(0),
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
                    tracing::info!(secret = %key.name, %stage, version_id = %version.version_id, ?event, "secret change observed");
                }
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
    /// other watchers too. A plain new watcher of a watched secret starts
    /// from the topic's state, which the detector keeps current (a known
    /// deletion included). A secret that cannot be read (not found,
    /// deleted, upstream down with no topic) is refused at once.
    pub async fn subscribe(
        &self,
        name: String,
        stage: String,
        resumes: bool,
    ) -> Result<Subscription, StoreError> {
        let shared = &self.shared;
        let topic_key = TopicKey { name, stage };
        let cache_key = CacheKey::new(
            topic_key.name.clone(),
            VersionSelector::Stage(topic_key.stage.clone()),
        );
        // Subscribing under the map's guard: a detector round drops topics
        // with no receivers, and must not drop this one in between.
        let subscribed = shared.topics.get(&topic_key).map(|t| t.state.subscribe());
        let mut changes = match subscribed {
            Some(changes) if !resumes => changes,
            Some(changes) => match shared.cache.get_fresh(cache_key).await {
                // The read told the topic (the cache's change listener).
                Ok(_) => changes,
                Err(error) if error.is_transient() => changes,
                Err(error) => return Err(error),
            },
            None => {
                let lookup = shared.cache.get_fresh(cache_key).await?;
                shared
                    .topics
                    .entry(topic_key)
                    .or_insert_with(|| Arc::new(Topic::new(lookup.version)))
                    .state
                    .subscribe()
            }
        };
        let first = changes.borrow_and_update().clone();
        shared.watchers.fetch_add(1, Relaxed);
        Ok(Subscription {
            first,
            changes,
            shutdown: shared.shutdown.subscribe(),
            _guard: WatcherGuard {
                shared: Arc::clone(shared),
            },
        })
    }

    pub fn stats(&self) -> WatchStats {
        let shared = &self.shared;
        WatchStats {
            watchers: shared.watchers.load(Relaxed),
            events: shared.events.load(Relaxed),
            watched_secrets: shared.topics.len() as u64,
            rounds: shared.rounds.load(Relaxed),
            upstream_calls: shared.upstream_calls.load(Relaxed),
        }
    }

    /// Ends every stream (with UNAVAILABLE) and the detector.
    pub fn shutdown(&self) {
        self.shared.shutdown.send_replace(true);
    }

    /// Runs the change detector until shutdown.
    pub async fn detect_changes(self) {
        let store = Arc::clone(self.shared.cache.store());
        Arc::clone(&self.shared).detect_changes(store).await
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
            } else if state.version.version_id != version.version_id {
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

impl Shared {
    async fn detect_changes(self: Arc<Self>, store: Arc<dyn SecretStore>) {
        let mut shutdown = self.shutdown.subscribe();
        let mut store_changed = store.change_signal();
        loop {
            tokio::select! {
                () = tokio::time::sleep(jittered(self.interval)) => {}
                () = changed(&mut store_changed) => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            self.round(store.as_ref()).await;
        }
    }

    /// Checks every watched secret once.
    async fn round(&self, store: &dyn SecretStore) {
        // Topics nobody watches any more are dropped first.
        self.topics
            .retain(|_, topic| topic.state.receiver_count() > 0);
        if self.topics.is_empty() {
            return;
        }
        self.rounds.fetch_add(1, Relaxed);
        let keys: Vec<TopicKey> = self.topics.iter().map(|t| t.key().clone()).collect();
        let (current, other): (Vec<_>, Vec<_>) =
            keys.into_iter().partition(|key| key.stage == AWSCURRENT);

        let names: Vec<String> = current.into_iter().map(|key| key.name).collect();
        let mut direct = other;
        if !names.is_empty() {
            match store.get_current_batch(&names).await {
                Ok(answer) => {
                    self.upstream_calls
                        .fetch_add(answer.upstream_calls, Relaxed);
                    for (name, result) in answer.items {
                        let stage = AWSCURRENT.to_owned();
                        let key = TopicKey { name, stage };
                        if let Some(lagging) = self.apply(key, result) {
                            direct.push(lagging);
                        }
                    }
                }
                Err(error) => tracing::warn!(%error, "change detection failed this round"),
            }
        }
        for key in direct {
            self.upstream_calls.fetch_add(1, Relaxed);
            let selector = VersionSelector::Stage(key.stage.clone());
            let result = store.get_secret_value(&key.name, &selector).await;
            if let Some(key) = self.apply(key, result) {
                tracing::debug!(secret = %key.name, stage = %key.stage, "a read by stage answered a version without that stage; skipped");
            }
        }
    }

    /// One secret's answer: into the cache (which tells the topic), or a
    /// deletion. Returns the key back when the answer lacks the watched
    /// stage: it must be read again by stage.
    fn apply(&self, key: TopicKey, result: Result<SecretVersion, StoreError>) -> Option<TopicKey> {
        let cache_key = CacheKey::new(key.name.clone(), VersionSelector::Stage(key.stage.clone()));
        match result {
            // An answer that does not carry the watched label would be a
            // step back.
            Ok(version) if !version.version_stages.contains(&key.stage) => return Some(key),
            Ok(version) if !names::answer_matches(&key.name, &version.name, &version.arn) => {
                tracing::warn!(secret = %key.name, answered = %version.name, "change detection got another secret than the one watched; skipped")
            }
            Ok(version) => self.cache.put(&cache_key, Arc::new(version)),
            Err(StoreError::NotFound { .. } | StoreError::Deleted { .. }) => {
                self.cache.remove(&cache_key);
                if let Some(topic) = self.topics.get(&key)
                    && topic.mark_deleted()
                {
                    self.events.fetch_add(1, Relaxed);
                    tracing::info!(secret = %key.name, stage = %key.stage, "secret deletion observed");
                }
            }
            Err(error) => {
                tracing::debug!(secret = %key.name, %error, "change detection skipped a secret")
            }
        }
        None
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
                "Rounds of the change detector",
                watch.rounds,
            )?;
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests;
