//! `CachedSecrets`: secrets held in this process's memory and kept fresh by
//! the broker's WatchSecret stream, as Envoy keeps its SDS secrets.
//!
//! A read answers from memory: no network, no broker CPU. The first read
//! of a name asks the broker and opens a WatchSecret stream for it, on the
//! client's one connection; a rotation replaces the value in place (and is
//! announced to `changes` subscribers, for whoever must rebuild a pool or a
//! signer). When a stream breaks, it reconnects by itself with the version
//! it holds (`since_version_id`), so a rotation missed meanwhile arrives
//! first. A value is served from memory while its stream is connected, and
//! for at most `max_stale` after it broke; past that, reads ask the broker
//! again rather than serve a value nobody can vouch for.
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
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::StreamExt;
use tokio::sync::{broadcast, watch};
use zeroize::{Zeroize, Zeroizing};

use crate::{
    Error, SecretValue, SecretsClient, TypedConfig,
    watch::{WatchEventKind, follow_live},
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
}

struct HeldConfig {
    name: String,
    version_id: String,
    config: Box<dyn Any + Send + Sync>,
}

/// One name held in memory.
struct Held {
    /// `None` after a deletion: reads ask the broker.
    value: Mutex<Option<SecretValue>>,
    /// Whether its stream is connected.
    live: watch::Receiver<bool>,
    /// When the stream was last seen connected.
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
            }),
        }
    }
}

impl CachedSecrets {
    /// The current version of `name`: from memory when it is held and
    /// vouched for, else from the broker (which then starts holding it).
    pub async fn get(&self, name: &str) -> Result<SecretValue, Error> {
        if let Some(value) = self.shared.fresh(name) {
            return Ok(value);
        }
        let value = self.shared.client.get_secret(name).await?;
        self.shared.hold(name, value.clone());
        Ok(value)
    }

    /// A typed config (JWT, database...), decoded by the broker, held in
    /// memory for as long as the secret it was read from is held and has
    /// not rotated: a rotation makes the next read ask the broker again.
    pub async fn get_config<C>(&self) -> Result<C, Error>
    where
        C: TypedConfig + Clone + Sync + Zeroize,
    {
        let key = TypeId::of::<C>();
        let held = {
            let configs = lock(&self.shared.configs);
            configs.get(&key).and_then(|held| {
                let config = (**held.config.downcast_ref::<Zeroizing<C>>()?).clone();
                Some((held.name.clone(), held.version_id.clone(), config))
            })
        };
        if let Some((name, version_id, config)) = held
            && self
                .shared
                .fresh(&name)
                .is_some_and(|secret| secret.version_id() == version_id)
        {
            return Ok(config);
        }
        let response = self.shared.client.typed_response::<C>().await?;
        let (name, version_id) = C::source(&response);
        let (name, version_id) = (name.to_owned(), version_id.to_owned());
        let config =
            C::config(response).ok_or_else(|| Error::Decode("the broker sent no config".into()))?;
        // The secret behind it is held (and followed) like any other.
        if self.shared.fresh(&name).is_none() {
            self.get(&name).await?;
        }
        lock(&self.shared.configs).insert(
            key,
            HeldConfig {
                name,
                version_id,
                // Wiped when it is replaced or the cache goes.
                config: Box::new(Zeroizing::new(config.clone())),
            },
        );
        Ok(config)
    }

    /// Changes of the held secrets, from now on.
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
            *lock(&held.value) = Some(value);
            *lock(&held.confirmed) = Instant::now();
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
        let (stream, live) =
            follow_live(self.client.secrets_stub(), name.to_owned(), String::new());
        let weak = Arc::downgrade(self);
        let key = name.to_owned();
        let follower = tokio::spawn(async move {
            let mut stream = stream;
            while let Some(event) = stream.next().await {
                let Some(shared) = weak.upgrade() else { return };
                match event {
                    Ok(event) => shared.apply(&key, event.kind, event.secret),
                    Err(_final) => {
                        // Not found, access denied: the name stops being
                        // held; the next read asks the broker and returns
                        // its answer to the caller.
                        shared.lock_entries().remove(&key);
                        return;
                    }
                }
            }
        })
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

    /// An event of `name`'s stream: the value replaced in place.
    fn apply(&self, name: &str, kind: WatchEventKind, secret: SecretValue) {
        let Some(held) = self.lock_entries().get(name).cloned() else {
            return;
        };
        let version_id = secret.version_id().to_owned();
        let changed = {
            let mut value = lock(&held.value);
            let changed = value.as_ref().map(SecretValue::version_id) != Some(&version_id)
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

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
