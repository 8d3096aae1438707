//! The event path: Secrets Manager's change events, read from SQS, make
//! every cached entry and watcher of the changed secret current within
//! about a second, on every replica.
//!
//! Design, and why:
//! - AWS's own bus carries the changes (EventBridge → SNS → one SQS queue
//!   per replica, or EventBridge → one queue); nothing home-made runs
//!   between replicas. `queue` holds the SQS/SNS calls, `message` what a
//!   message says.
//! - An event never carries a value: it makes the broker re-read the secret
//!   upstream (`WatchHub::refresh_secret`), and the cache and the watchers
//!   take the answer in one step. Events of one receive for the same secret
//!   make one re-read; an event saying a label moved to the version already
//!   held makes none.
//! - Every message is deleted once taken, whatever it said: a malformed,
//!   foreign or duplicate one is logged (a reason, never its body) and
//!   dropped, so nothing loops. A re-read that fails is tried again after
//!   1, 2, 4 and 8 s; past that the sweep covers it.
//! - Each receive's messages are handled in a task of their own, and the
//!   next receive does not wait for it: AWS slow to answer the re-read of
//!   one secret (up to the SDK's timeout) must not hold back the events of
//!   every other. At most `BATCHES_AT_ONCE` are handled at a time.
//! - The consumer's failures never fail readiness: with SQS away, the sweep
//!   and the TTL still hold; it backs off and resumes by itself.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant, SystemTime},
};

use tokio_util::sync::CancellationToken;

use crate::{
    config::EventSource,
    watch::{Refreshed, WatchHub},
};

mod message;
mod queue;

use message::{Change, Message};
use queue::Queue;

/// What `check` says of the event source (`--events-queue-url` or
/// `--events-topic-arn`), read-only; an error names the call that failed
/// and what to check.
pub async fn check_source(source: &EventSource, region: &str) -> Result<String, String> {
    Queue::check_source(source, region)
        .await
        .map_err(|error| error.to_string())
}

/// Event ids remembered to drop a second delivery (SQS and SNS deliver at
/// least once).
const REMEMBERED_IDS: usize = 4096;
/// Receives handled at once; past this many the consumer waits for one to
/// end before it receives again (so a hung AWS cannot pile tasks up).
const BATCHES_AT_ONCE: usize = 16;
/// Waits between attempts while SQS fails.
const FIRST_RETRY: Duration = Duration::from_secs(1);
const LAST_RETRY: Duration = Duration::from_secs(30);
/// When an event's re-read still finds the state before the change (AWS
/// answers reads with it for a moment after), the waits before reading
/// again: about 15 s in all, then the sweep is left to find it.
const BEHIND_RETRIES: [Duration; 4] = [
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
    Duration::from_secs(8),
];

/// The event path's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EventStats {
    /// Messages received.
    pub received: u64,
    /// Events that re-read at least one cached or watched entry.
    pub applied: u64,
    /// Messages dropped: malformed, foreign, duplicate, or about a secret
    /// not held here (or already current).
    pub ignored: u64,
    /// Events whose re-read failed (the secret is read again after 1, 2, 4 and 8 s; past that the sweep covers it).
    pub failed: u64,
    /// From the last applied event's time to its application.
    pub last_lag: Option<Duration>,
}

/// The consumer's state, for CheckUpstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsumerState {
    /// No event source is configured.
    Off,
    /// Opening the queue (and in topic mode, making it).
    Starting,
    /// Reading this queue.
    Consuming(String),
    /// The last SQS call failed; retrying.
    Failing(String),
}

/// A handle to the event path's state; cheap to clone.
#[derive(Clone)]
pub struct Events {
    shared: Arc<Shared>,
}

struct Shared {
    source: Option<EventSource>,
    state: Mutex<ConsumerState>,
    received: AtomicU64,
    applied: AtomicU64,
    ignored: AtomicU64,
    failed: AtomicU64,
    /// Milliseconds, plus one (0: none yet).
    last_lag_ms: AtomicU64,
    seen: Mutex<RecentIds>,
    /// Ends the re-reads of events that were ahead of AWS's reads.
    stopping: std::sync::OnceLock<CancellationToken>,
    /// Secrets being read again (one task each, whatever the events).
    reading_again: Mutex<std::collections::HashSet<String>>,
    /// Receives being handled (see `BATCHES_AT_ONCE`).
    batches: Arc<tokio::sync::Semaphore>,
}

impl Events {
    /// The event path for `source` (`None`: off).
    pub fn new(source: Option<EventSource>) -> Self {
        let state = match source {
            Some(_) => ConsumerState::Starting,
            None => ConsumerState::Off,
        };
        Self {
            shared: Arc::new(Shared {
                source,
                state: Mutex::new(state),
                received: AtomicU64::new(0),
                applied: AtomicU64::new(0),
                ignored: AtomicU64::new(0),
                failed: AtomicU64::new(0),
                last_lag_ms: AtomicU64::new(0),
                seen: Mutex::new(RecentIds::default()),
                stopping: std::sync::OnceLock::new(),
                reading_again: Mutex::default(),
                batches: Arc::new(tokio::sync::Semaphore::new(BATCHES_AT_ONCE)),
            }),
        }
    }

    /// Counters now.
    pub fn stats(&self) -> EventStats {
        let shared = &self.shared;
        let lag = shared.last_lag_ms.load(Relaxed);
        EventStats {
            received: shared.received.load(Relaxed),
            applied: shared.applied.load(Relaxed),
            ignored: shared.ignored.load(Relaxed),
            failed: shared.failed.load(Relaxed),
            last_lag: (lag > 0).then(|| Duration::from_millis(lag - 1)),
        }
    }

    /// The consumer's state now.
    pub fn state(&self) -> ConsumerState {
        self.shared.state.lock().unwrap().clone()
    }

    /// Notes a failure; whether it is news (the log says each failure
    /// once, not at every retry while it lasts).
    fn failing(&self, error: &queue::QueueError) -> bool {
        let now = ConsumerState::Failing(error.to_string());
        let mut state = self.shared.state.lock().unwrap();
        let news = *state != now;
        if !news {
            tracing::debug!(%error, "the event queue still fails");
        }
        *state = now;
        news
    }

    fn set_state(&self, state: ConsumerState) {
        *self.shared.state.lock().unwrap() = state;
    }

    /// Reads the source until `stop`, then (topic mode) removes the queue
    /// it made, whose name carries `host`. Returns at once when no source
    /// is configured.
    pub async fn consume(
        self,
        region: String,
        host: String,
        hub: WatchHub,
        stop: CancellationToken,
    ) {
        let Some(source) = self.shared.source.clone() else {
            return;
        };
        let _ = self.shared.stopping.set(stop.clone());
        // Between rebuilds of a deleted queue: a queue that keeps being
        // deleted is not remade in a tight loop.
        let mut rebuild = FIRST_RETRY;
        loop {
            // A new name each time: SQS refuses, for 60 s, the name of a
            // queue just deleted.
            let name = queue::queue_name(&host);
            let Some(queue) = self.open(&source, &region, &name, &stop).await else {
                return;
            };
            self.set_state(ConsumerState::Consuming(queue.url().to_owned()));
            tracing::info!(queue = %queue.url(), "reading secret change events");
            match self.read(&queue, &hub, &stop).await {
                ReadEnd::Stopped => return queue.close().await,
                ReadEnd::Rebuild(why) => {
                    tracing::warn!(queue = %queue.url(), "{why}");
                    queue.forget().await;
                    if !pause(&stop, &mut rebuild).await {
                        return;
                    }
                }
            }
        }
    }

    /// Opens the source, trying again until it opens; `None` at `stop`.
    async fn open(
        &self,
        source: &EventSource,
        region: &str,
        name: &str,
        stop: &CancellationToken,
    ) -> Option<Queue> {
        let mut retry = FIRST_RETRY;
        loop {
            match Queue::open(source, region, name).await {
                Ok(queue) => return Some(queue),
                Err(error) => {
                    if self.failing(&error) {
                        tracing::warn!(%error, "the event queue could not be opened; the sweep keeps secrets fresh meanwhile, and it is tried again (at most every 30 s)");
                    }
                    if !pause(stop, &mut retry).await {
                        if matches!(source, EventSource::Topic(_)) {
                            Queue::remove_made(region, name).await;
                        }
                        return None;
                    }
                }
            }
        }
    }

    /// Reads `queue` until `stop`, or until the broker's own queue turns
    /// out deleted (topic mode: a clean-up job, a person); a queue given to
    /// the broker is someone else's to make again, and is tried until then.
    async fn read(&self, queue: &Queue, hub: &WatchHub, stop: &CancellationToken) -> ReadEnd {
        let mut retry = FIRST_RETRY;
        // The subscription is checked as often as the sweep runs (between
        // receives, so up to a long poll later): both are what keeps a
        // replica fresh when events stop coming.
        let mut checked = Instant::now();
        let mut check_failed_before = false;
        loop {
            if checked.elapsed() >= hub.interval() {
                checked = Instant::now();
                let answer = tokio::select! {
                    () = stop.cancelled() => return ReadEnd::Stopped,
                    answer = queue.still_subscribed() => answer,
                };
                match answer {
                    Ok(true) => check_failed_before = false,
                    Ok(false) => return ReadEnd::Rebuild(UNSUBSCRIBED),
                    // Said once while it lasts (a grant missing after an
                    // upgrade would otherwise go unnoticed).
                    Err(error) if !check_failed_before => {
                        check_failed_before = true;
                        tracing::warn!(%error, "could not check that this broker's queue is still subscribed to the events topic (sns:ListSubscriptionsByTopic); events still come while it is");
                    }
                    Err(error) => {
                        tracing::debug!(%error, "could not check this broker's subscription to the events topic")
                    }
                }
            }
            let received = tokio::select! {
                () = stop.cancelled() => return ReadEnd::Stopped,
                received = queue.receive() => received,
            };
            let result = match received {
                Ok(messages) => match self.take_batch(hub, messages, stop).await {
                    Some(receipts) => queue.delete(receipts).await,
                    None => return ReadEnd::Stopped,
                },
                Err(error) => Err(error),
            };
            match result {
                Ok(()) => {
                    if retry != FIRST_RETRY {
                        tracing::info!("the event queue answers again");
                        self.set_state(ConsumerState::Consuming(queue.url().to_owned()));
                    }
                    retry = FIRST_RETRY;
                }
                Err(error) if error.queue_gone && queue.is_own() => {
                    return ReadEnd::Rebuild(OWN_QUEUE_GONE);
                }
                Err(error) => {
                    if self.failing(&error) {
                        tracing::warn!(%error, "reading the event queue failed; the sweep keeps secrets fresh meanwhile, and it is tried again (at most every 30 s)");
                    }
                    if !pause(stop, &mut retry).await {
                        return ReadEnd::Stopped;
                    }
                }
            }
        }
    }

    /// Takes one receive's messages: they are handled in a task of their
    /// own (see the module doc), until `stop`. Returns the receipts to
    /// delete, all of them, at once: a message is taken whatever its
    /// re-read finds (a replica stopped before that leaves the change to
    /// the sweep). `None` at `stop` while waiting for room.
    async fn take_batch(
        &self,
        hub: &WatchHub,
        messages: Vec<queue::Received>,
        stop: &CancellationToken,
    ) -> Option<Vec<String>> {
        let room = tokio::select! {
            () = stop.cancelled() => return None,
            room = Arc::clone(&self.shared.batches).acquire_owned() => room.ok()?,
        };
        let receipts = messages.iter().map(|m| m.receipt.clone()).collect();
        let (events, hub, stop) = (self.clone(), hub.clone(), stop.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = stop.cancelled() => {}
                () = events.handle_batch(&hub, messages) => {}
            }
            drop(room);
        });
        Some(receipts)
    }

    /// Handles one receive's messages. A fault of the broker's while
    /// handling them (a panic, logged by the panic hook) drops the batch,
    /// as an unreadable message is dropped: the consumer goes on, and no
    /// message that caused it comes back to do it again.
    async fn handle_batch(&self, hub: &WatchHub, messages: Vec<queue::Received>) {
        let bodies: Vec<(&str, &str)> = messages
            .iter()
            .map(|m| (m.id.as_str(), m.body.as_str()))
            .collect();
        let handled = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(
            self.handle(hub, &bodies),
        ))
        .await;
        if handled.is_err() {
            self.shared.ignored.fetch_add(bodies.len() as u64, Relaxed);
            tracing::error!(
                messages = bodies.len(),
                "handling event messages failed (a fault of the broker); they are dropped"
            );
        }
    }

    /// Handles message bodies (with their message ids, for the log):
    /// changes of one secret make one re-read.
    pub(crate) async fn handle(&self, hub: &WatchHub, bodies: &[(&str, &str)]) {
        let shared = &self.shared;
        shared.received.fetch_add(bodies.len() as u64, Relaxed);
        let mut changes: HashMap<Vec<String>, Vec<Change>> = HashMap::new();
        for (message_id, body) in bodies {
            match message::parse(body) {
                Ok(Message::Change(change)) if self.first_delivery(&change) => {
                    changes
                        .entry(change.names.clone())
                        .or_default()
                        .push(change);
                }
                Ok(Message::Change(change)) => {
                    shared.ignored.fetch_add(1, Relaxed);
                    tracing::debug!(
                        message_id,
                        event_id = change.event_id.as_str(),
                        "a duplicate event; dropped"
                    );
                }
                Ok(Message::Foreign(what)) => {
                    shared.ignored.fetch_add(1, Relaxed);
                    tracing::debug!(message_id, what, "not an event for the broker; dropped");
                }
                Err(why) => {
                    shared.ignored.fetch_add(1, Relaxed);
                    tracing::warn!(message_id, %why, "an unreadable event message; dropped");
                }
            }
        }
        let applying = changes
            .into_values()
            .map(|changes| self.apply(hub, changes));
        futures::future::join_all(applying).await;
    }

    /// Whether this event is new (and remembers it).
    fn first_delivery(&self, change: &Change) -> bool {
        change.event_id.is_empty() || self.shared.seen.lock().unwrap().insert(&change.event_id)
    }

    /// Changes of one secret: one re-read, counted per event.
    async fn apply(&self, hub: &WatchHub, changes: Vec<Change>) {
        let shared = &self.shared;
        let first = &changes[0];
        // One hint holds for all only when they agree.
        let hint = changes
            .iter()
            .all(|c| c.moved_to == first.moved_to)
            .then_some(first.moved_to.as_ref())
            .flatten()
            .map(|(stage, version)| (stage.as_str(), version.as_str()));
        let count = changes.len() as u64;
        let secret = &first.names[0];
        // The ARN goes with the names: `refresh_secret` reads the secret
        // by its names, and compares the hint's version under the ARN.
        let ids: Vec<String> = first
            .names
            .iter()
            .cloned()
            .chain(first.arn.clone())
            .collect();
        match hub.refresh_secret(&ids, hint).await {
            Refreshed::Reread {
                reads,
                changed,
                behind,
            } => {
                shared.applied.fetch_add(count, Relaxed);
                // Behind only ever comes with a hint.
                if behind {
                    self.read_again_later(hub, ids.clone(), hint);
                }
                let lag =
                    latest_time(&changes).and_then(|t| SystemTime::now().duration_since(t).ok());
                if let Some(lag) = lag {
                    shared
                        .last_lag_ms
                        .store(lag.as_millis() as u64 + 1, Relaxed);
                }
                tracing::info!(%secret, kind = %first.kind, reads, changed, lag_ms = lag.map(|l| l.as_millis() as u64), "secret change event applied");
            }
            Refreshed::Untracked | Refreshed::AlreadyCurrent => {
                shared.ignored.fetch_add(count, Relaxed);
                tracing::debug!(%secret, kind = %first.kind, "an event about a secret not held here, or already current; dropped");
            }
            Refreshed::Failed(error) => {
                // A passing failure as the event lands must not leave this
                // replica to the sweep while the others are current.
                shared.failed.fetch_add(count, Relaxed);
                tracing::warn!(%secret, %error, "an event's re-read failed; reading again shortly");
                self.read_again_later(hub, ids, hint);
            }
        }
    }

    /// The event's re-read failed (AWS failing for a moment), or named a
    /// version that it did not find yet (`hint`): read again a few times,
    /// in the background (the next events must not wait), until a read
    /// answers and the stage holds the hinted version.
    ///
    /// One task per secret: more events for it while it runs add nothing.
    /// (An event delivered out of order, naming a version older than the
    /// one read, looks the same; it costs these few reads, no more.)
    fn read_again_later(&self, hub: &WatchHub, names: Vec<String>, hint: Option<(&str, &str)>) {
        if !self
            .shared
            .reading_again
            .lock()
            .unwrap()
            .insert(names[0].clone())
        {
            return;
        }
        let (hub, shared) = (hub.clone(), Arc::clone(&self.shared));
        let hint = hint.map(|(stage, version)| (stage.to_owned(), version.to_owned()));
        let stop = self.shared.stopping.get().cloned().unwrap_or_default();
        tracing::debug!(secret = %names[0], ?hint, "an event's change is not read yet; reading again shortly");
        tokio::spawn(async move {
            let again = async {
                for wait in BEHIND_RETRIES {
                    tokio::time::sleep(wait).await;
                    let hint = hint.as_ref().map(|(s, v)| (s.as_str(), v.as_str()));
                    if let Refreshed::Reread { behind: true, .. } | Refreshed::Failed(_) =
                        hub.refresh_secret(&names, hint).await
                    {
                        continue;
                    }
                    return;
                }
                tracing::debug!(secret = %names[0], ?hint, "AWS's reads do not show the event's change (or show a newer one); the sweep will look again");
            };
            tokio::select! {
                () = stop.cancelled() => {}
                () = again => {}
            }
            shared.reading_again.lock().unwrap().remove(&names[0]);
        });
    }

    /// Registers the event path's metrics.
    pub fn register_metrics(&self, metrics: &crate::metrics::Metrics) {
        use crate::metrics::{counter, gauge};
        let events = self.clone();
        metrics.register_state(move |e| {
            let stats = events.stats();
            counter(
                e,
                "events_received",
                "Event messages received from SQS",
                stats.received,
            )?;
            counter(
                e,
                "events_applied",
                "Events that re-read a cached or watched secret",
                stats.applied,
            )?;
            counter(
                e,
                "events_ignored",
                "Event messages dropped: malformed, foreign, duplicate, or about a secret not held",
                stats.ignored,
            )?;
            counter(
                e,
                "events_failed",
                "Events whose re-read failed (the secret is read again after 1, 2, 4 and 8 s; past that the sweep covers it)",
                stats.failed,
            )?;
            let lag_ms = stats.last_lag.map_or(0, |lag| lag.as_millis() as i64);
            gauge(
                e,
                "events_lag_milliseconds",
                "From the last applied event's time to its application",
                lag_ms,
            )?;
            let consuming = matches!(events.state(), ConsumerState::Consuming(_));
            gauge(
                e,
                "events_consuming",
                "1 while the event queue is being read",
                i64::from(consuming),
            )?;
            Ok(())
        });
    }
}

fn latest_time(changes: &[Change]) -> Option<SystemTime> {
    changes.iter().filter_map(|c| c.time).max()
}

/// Why reading a queue ended.
enum ReadEnd {
    Stopped,
    /// The broker's own queue is to be made again (why, for the log).
    Rebuild(&'static str),
}

const OWN_QUEUE_GONE: &str = "this broker's event queue was deleted (not by this broker); it \
                              makes a new one and subscribes it to the topic";
const UNSUBSCRIBED: &str = "this broker's event queue is no longer subscribed to the topic \
                            (unsubscribed, or the topic made again); it makes a new queue and \
                            subscribes it";

/// Sleeps `retry` (doubling it up to `LAST_RETRY`); false when stopped.
async fn pause(stop: &CancellationToken, retry: &mut Duration) -> bool {
    let wait = *retry;
    *retry = (*retry * 2).min(LAST_RETRY);
    tokio::select! {
        () = stop.cancelled() => false,
        () = tokio::time::sleep(wait) => true,
    }
}

/// The last `REMEMBERED_IDS` event ids, oldest first out.
#[derive(Default)]
struct RecentIds {
    order: VecDeque<String>,
    set: std::collections::HashSet<String>,
}

impl RecentIds {
    /// True when `id` was not remembered yet.
    fn insert(&mut self, id: &str) -> bool {
        if self.set.contains(id) {
            return false;
        }
        if self.order.len() == REMEMBERED_IDS
            && let Some(oldest) = self.order.pop_front()
        {
            self.set.remove(&oldest);
        }
        self.order.push_back(id.to_owned());
        self.set.insert(id.to_owned());
        true
    }
}

#[cfg(test)]
mod tests;
