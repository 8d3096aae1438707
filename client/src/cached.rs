//! `CachedSecrets`: secrets held in this process's memory and kept fresh by
//! the broker's WatchSecret stream, as Envoy keeps its SDS secrets.
//!
//! A read answers from memory: no network, no broker CPU. The first read
//! of a name asks the broker and opens a WatchSecret stream for it, on the
//! client's connection for watch streams; a rotation replaces the value in place (and is
//! announced to `changes` subscribers, for whoever must rebuild a pool or a
//! signer). When a stream breaks, it reconnects by itself with the version
//! it holds (`since_version_id`), so a rotation missed meanwhile arrives
//! first. A value is served from memory while its stream is connected, and
//! for at most `max_stale` after it broke; past that, reads ask the broker
//! again rather than serve a value nobody can vouch for. While the stream
//! is connected it has the last word: a read answered by the broker before
//! a rotation does not put the older value back.
//!
//! Typed configs (`get_config::<JwtConfig>()`) are held the same way: the
//! broker decodes them once per version of their secret.
//!
//! The number of names held is bounded (`max_entries`, by default well
//! below the broker's 1,024 streams per connection): past it, the name read
//! least recently is dropped with its stream.

use std::{
    any::{Any, TypeId},
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant},
};

use futures::{
    FutureExt, StreamExt,
    future::{BoxFuture, Shared as SharedFuture},
};
use tokio::sync::{broadcast, watch};
use zeroize::{Zeroize, Zeroizing};

use crate::{
    Error, SecretValue, SecretsClient, TypedConfig,
    watch::{WatchEventKind, WatchStream, follow},
};

/// How `CachedSecrets` holds its values.
#[derive(Debug, Clone, Copy)]
pub struct CacheLimits {
    /// Names held at most (each holds one stream on the connection).
    pub max_entries: usize,
    /// How long a value is served after its stream broke.
    pub max_stale: Duration,
}

impl Default for CacheLimits {
    fn default() -> Self {
        Self {
            max_entries: 256,
            max_stale: Duration::from_secs(30),
        }
    }
}

/// A change of a held secret, for subscribers of `CachedSecrets::changes`.
#[derive(Debug, Clone)]
pub struct SecretChange {
    /// The name as it was asked.
    pub name: String,
    /// What happened.
    pub kind: WatchEventKind,
    /// The version now current (the last known one for a deletion).
    pub version_id: String,
}

/// Takes a read out of `Shared::reading` when dropped.
struct LeaveReading {
    shared: Weak<Shared>,
    name: String,
}

impl Drop for LeaveReading {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            lock(&shared.reading).remove(&self.name);
        }
    }
}

/// A read of the broker that several callers await.
type SharedRead = SharedFuture<BoxFuture<'static, Result<SecretValue, Error>>>;

/// Secrets in memory, fresh by push; cheap to clone.
#[derive(Clone)]
pub struct CachedSecrets {
    shared: Arc<Shared>,
}

struct Shared {
    client: SecretsClient,
    limits: CacheLimits,
    entries: Mutex<HashMap<String, Arc<Held>>>,
    /// Typed configs by type: the secret and version they were read from,
    /// and the config.
    configs: Mutex<HashMap<TypeId, HeldConfig>>,
    changes: broadcast::Sender<SecretChange>,
    /// Reads from the broker under way, by name, shared by the callers
    /// that missed it meanwhile. (A read whose callers all went away is
    /// driven by the next caller of the name.)
    reading: Mutex<HashMap<String, SharedRead>>,
}

struct HeldConfig {
    name: String,
    version_id: String,
    /// The ARN of the secret it was read from: a version id alone does
    /// not name one secret's version.
    arn: String,
    config: Box<dyn Any + Send + Sync>,
}

/// One name held in memory.
struct Held {
    /// `None` after a deletion: reads ask the broker.
    value: Mutex<Option<SecretValue>>,
    /// Whether its stream is connected.
    live: watch::Receiver<bool>,
    /// When the value was last known current: read from the broker, or
    /// the stream connected (seen at a read, an event, or its break).
    confirmed: Mutex<Instant>,
    /// When it was last read, for eviction.
    read: Mutex<Instant>,
    /// Ends the stream's tasks when the name is dropped.
    follower: tokio::task::AbortHandle,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.follower.abort();
    }
}

impl SecretsClient {
    /// A cache of this client's secrets in process memory, kept fresh by
    /// WatchSecret streams (see `CachedSecrets`).
    pub fn cached(&self, limits: CacheLimits) -> CachedSecrets {
        let (changes, _) = broadcast::channel(64);
        CachedSecrets {
            shared: Arc::new(Shared {
                client: self.clone(),
                limits,
                entries: Mutex::new(HashMap::new()),
                configs: Mutex::new(HashMap::new()),
                changes,
                reading: Mutex::new(HashMap::new()),
            }),
        }
    }
}

impl CachedSecrets {
    /// The current version of `name`: from memory when it is held and
    /// vouched for, else from the broker (which then starts holding it).
    ///
    /// Callers that miss the same name at once share one read of it: a
    /// crowd of tasks starting up makes one call, not one each.
    pub async fn get(&self, name: &str) -> Result<SecretValue, Error> {
        if let Some(value) = self.shared.fresh(name) {
            return Ok(value);
        }
        let read = {
            let mut reading = lock(&self.shared.reading);
            // A read that ended between the miss above and this lock has
            // stored its value (before leaving the map).
            if let Some(value) = self.shared.fresh(name) {
                return Ok(value);
            }
            let read = reading
                .entry(name.to_owned())
                .or_insert_with(|| self.shared.start_read(name));
            read.clone()
        };
        read.await
    }

    /// A typed config (JWT, database...) at its default name, decoded by
    /// the broker, held in memory for as long as the secret it was read
    /// from is held and has not rotated: a rotation makes the next read ask
    /// the broker again. (One per type: for a config from another secret,
    /// `SecretsClient::get_config_from`.)
    pub async fn get_config<C>(&self) -> Result<C, Error>
    where
        C: TypedConfig + Clone + Sync + Zeroize,
    {
        let key = TypeId::of::<C>();
        let held = {
            let configs = lock(&self.shared.configs);
            configs.get(&key).and_then(|held| {
                let config = (**held.config.downcast_ref::<Zeroizing<C>>()?).clone();
                Some((
                    held.name.clone(),
                    held.version_id.clone(),
                    held.arn.clone(),
                    config,
                ))
            })
        };
        if let Some((name, version_id, arn, config)) = held
            && self
                .shared
                .fresh(&name)
                .is_some_and(|secret| secret.is_version(&version_id, &arn))
        {
            return Ok(config);
        }
        let response = self.shared.client.typed_response::<C>("").await?;
        let (name, version_id) = C::source(&response);
        let (name, version_id, arn) = (
            name.to_owned(),
            version_id.to_owned(),
            C::arn(&response).to_owned(),
        );
        let config =
            C::config(response).ok_or_else(|| Error::Decode("the broker sent no config".into()))?;
        // The secret behind it is held (and followed) like any other. The
        // config's ARN is the response's: one read from the secret held a
        // moment later could be another secret's, created again under the
        // name with the same version id.
        if self.shared.fresh(&name).is_none() {
            self.get(&name).await?;
        }
        lock(&self.shared.configs).insert(
            key,
            HeldConfig {
                name,
                version_id,
                arn,
                // Wiped when it is replaced or the cache goes.
                config: Box::new(Zeroizing::new(config.clone())),
            },
        );
        Ok(config)
    }

    /// Changes of the held secrets, from now on: rotations, deletions,
    /// restorations. A name that stops being held is not told here: one
    /// evicted (`max_entries`), or one whose stream the broker ended for
    /// good (access revoked by its policy, the secret gone) is dropped,
    /// and its next read asks the broker and returns its answer (the
    /// error, then). The channel holds the last 64 changes for a receiver
    /// that falls behind; past them its `recv` returns `Lagged(n)`: read
    /// the secrets you depend on again.
    pub fn changes(&self) -> broadcast::Receiver<SecretChange> {
        self.shared.changes.subscribe()
    }

    /// How many names are held.
    pub fn len(&self) -> usize {
        self.shared.lock_entries().len()
    }

    /// Whether no name is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Shared {
    /// A read of `name` from the broker in a task of its own, so that it
    /// ends (holds the value, leaves `reading`) even when every caller
    /// awaiting it gives up: a read left half done would be resumed by the
    /// next caller long after, past its deadline, or with an answer as old
    /// as its start.
    fn start_read(self: &Arc<Self>, name: &str) -> SharedRead {
        // Weak: the cache holds the read, which must not hold it.
        let shared = Arc::downgrade(self);
        let (client, name) = (self.client.clone(), name.to_owned());
        let task = tokio::spawn(async move {
            // Leaves the map however the task ends (a panic, its runtime
            // going): a finished read left there would answer every later
            // caller of the name.
            let _leave = LeaveReading {
                shared: shared.clone(),
                name: name.clone(),
            };
            let result = client.get_secret(&name).await;
            if let (Some(shared), Ok(value)) = (shared.upgrade(), &result) {
                shared.hold(&name, value.clone());
            }
            result
        });
        async move {
            task.await.unwrap_or_else(|_| {
                Err(Error::Other {
                    code: tonic::Code::Cancelled,
                    reason: String::new(),
                    message: "the read of the broker was cut short (the runtime is shutting down)"
                        .into(),
                })
            })
        }
        .boxed()
        .shared()
    }

    fn lock_entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Held>>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The held value, if its stream vouches for it.
    fn fresh(&self, name: &str) -> Option<SecretValue> {
        let held = Arc::clone(self.lock_entries().get(name)?);
        let now = Instant::now();
        *lock(&held.read) = now;
        let vouched = if *held.live.borrow() {
            *lock(&held.confirmed) = now;
            true
        } else {
            now.duration_since(*lock(&held.confirmed)) <= self.limits.max_stale
        };
        if !vouched {
            return None;
        }
        lock(&held.value).clone()
    }

    /// Starts holding `name` (or refreshes its value), with its stream.
    fn hold(self: &Arc<Self>, name: &str, value: SecretValue) {
        let mut entries = self.lock_entries();
        if let Some(held) = entries.get(name) {
            let version_id = value.version_id().to_owned();
            let kind = held.refresh(value);
            drop(entries);
            // Read while the stream was away: its reconnection will find
            // this version current and say nothing, so it is said here.
            if let Some(kind) = kind {
                let _ = self.changes.send(SecretChange {
                    name: name.to_owned(),
                    kind,
                    version_id,
                });
            }
            return;
        }
        if entries.len() >= self.limits.max_entries.max(1) {
            let oldest = entries
                .iter()
                .min_by_key(|(_, held)| *lock(&held.read))
                .map(|(name, _)| name.clone());
            if let Some(oldest) = oldest {
                entries.remove(&oldest);
            }
        }
        let stream = follow(self.client.origin(), name.to_owned(), String::new());
        let live = stream.connected();
        let follower = tokio::spawn(follow_events(Arc::downgrade(self), name.to_owned(), stream))
            .abort_handle();
        let held = Arc::new(Held {
            value: Mutex::new(Some(value)),
            live,
            confirmed: Mutex::new(Instant::now()),
            read: Mutex::new(Instant::now()),
            follower,
        });
        entries.insert(name.to_owned(), held);
    }

    /// The value when the stream was last seen connected.
    fn confirm_at_break(&self, name: &str) {
        if let Some(held) = self.lock_entries().get(name) {
            *lock(&held.confirmed) = Instant::now();
        }
    }

    /// An event of `name`'s stream: the value replaced in place.
    fn apply(&self, name: &str, kind: WatchEventKind, secret: SecretValue) {
        let Some(held) = self.lock_entries().get(name).cloned() else {
            return;
        };
        let version_id = secret.version_id().to_owned();
        let changed = {
            let mut value = lock(&held.value);
            let changed = !value
                .as_ref()
                .is_some_and(|held| held.is_same_version(&secret))
                || kind == WatchEventKind::Deleted;
            *value = match kind {
                WatchEventKind::Deleted => None,
                _ => Some(secret),
            };
            changed
        };
        *lock(&held.confirmed) = Instant::now();
        if changed {
            // A stream's first state that differs from the value read just
            // before is a rotation in between.
            let kind = match kind {
                WatchEventKind::Current => WatchEventKind::Rotated,
                other => other,
            };
            let _ = self.changes.send(SecretChange {
                name: name.to_owned(),
                kind,
                version_id,
            });
        }
    }
}

/// The task that applies a held name's events: it holds the cache weakly
/// (the cache going ends it) and is aborted when the name is dropped,
/// which drops its stream.
async fn follow_events(shared: Weak<Shared>, name: String, mut stream: WatchStream) {
    let mut live = stream.connected();
    let mut was_live = false;
    let mut follower_running = true;
    loop {
        tokio::select! {
            event = stream.next() => {
                let Some(event) = event else { return };
                let Some(shared) = shared.upgrade() else { return };
                match event {
                    Ok(event) => shared.apply(&name, event.kind, event.secret),
                    Err(_final) => {
                        // Not found, access denied: the name stops being
                        // held; the next read asks the broker and returns
                        // its answer to the caller.
                        shared.lock_entries().remove(&name);
                        return;
                    }
                }
            }
            changed = live.changed(), if follower_running => {
                // Once the follower ends, its last events come above.
                follower_running = changed.is_ok();
                let Some(shared) = shared.upgrade() else { return };
                // `max_stale` counts from the break, not from the last
                // read while the stream was connected. (Failed attempts to
                // reconnect say "not connected" again: no break.)
                let is_live = follower_running && *live.borrow_and_update();
                if was_live && !is_live {
                    shared.confirm_at_break(&name);
                }
                was_live = is_live;
            }
        }
    }
}

impl Held {
    /// A value the broker answered: kept unless the stream is connected,
    /// whose word (a value, or a deletion) is then at least as new (the
    /// answer may have left the broker before a rotation or a deletion the
    /// stream already brought; a restore comes on the stream too).
    /// Returns what changed, when the version is not the one held:
    /// `Rotated`, or `Restored` after a deletion.
    fn refresh(&self, value: SecretValue) -> Option<WatchEventKind> {
        let mut held = lock(&self.value);
        if *self.live.borrow() {
            return None;
        }
        let change = match held.as_ref() {
            None => Some(WatchEventKind::Restored),
            Some(old) if !old.is_same_version(&value) => Some(WatchEventKind::Rotated),
            Some(_) => None,
        };
        *held = Some(value);
        *lock(&self.confirmed) = Instant::now();
        change
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto;

    fn version(id: &str) -> SecretValue {
        SecretValue::from_proto(proto::Secret {
            name: "insurecove/x".into(),
            version_id: id.into(),
            value: Some(proto::secret::Value::StringValue(format!("value {id}"))),
            ..Default::default()
        })
    }

    fn held(value: SecretValue, live: watch::Receiver<bool>) -> Held {
        Held {
            value: Mutex::new(Some(value)),
            live,
            confirmed: Mutex::new(Instant::now()),
            read: Mutex::new(Instant::now()),
            follower: tokio::spawn(async {}).abort_handle(),
        }
    }

    fn version_held(held: &Held) -> Option<String> {
        lock(&held.value)
            .as_ref()
            .map(|value| value.version_id().to_owned())
    }

    #[tokio::test]
    async fn a_late_answer_does_not_undo_what_a_connected_stream_brought() {
        let (live, receiver) = watch::channel(true);
        // The stream brought v2; a read answered with v1 before it comes back.
        let held = held(version("v2"), receiver);
        assert_eq!(held.refresh(version("v1")), None);
        assert_eq!(version_held(&held).as_deref(), Some("v2"));

        // Without a stream the broker's answer is the newest word, and a
        // new version read then is a change to tell (the stream, once
        // back, finds it current and says nothing).
        live.send_replace(false);
        assert_eq!(held.refresh(version("v3")), Some(WatchEventKind::Rotated));
        assert_eq!(version_held(&held).as_deref(), Some("v3"));
        assert_eq!(held.refresh(version("v3")), None);

        // A deletion the stream brought: a read that left before it does
        // not bring the value back (a restore comes on the stream).
        live.send_replace(true);
        *lock(&held.value) = None;
        assert_eq!(held.refresh(version("v3")), None);
        assert_eq!(version_held(&held), None);
        // Read with the stream away, the secret is back.
        live.send_replace(false);
        assert_eq!(held.refresh(version("v4")), Some(WatchEventKind::Restored));
    }
}
