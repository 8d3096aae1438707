//! One step both freshness paths end in: what is *tracked* (cached entries
//! read by stage, and topics), re-reading a tracked stage through the cache
//! (which tells its topic), and forgetting a secret that is gone.

use std::sync::atomic::Ordering::Relaxed;

use super::{Refreshed, Shared, TopicKey, WatchEvent, WatchHub};
use crate::{
    backend::{AWSCURRENT, StoreError, VersionSelector},
    cache::CacheKey,
    names,
    secret::may_be_one_secret,
};

impl WatchHub {
    /// Re-reads every tracked stage of the secret that one of `ids` (names
    /// or ARNs, as an event gives them) stands for, coalesced per stage,
    /// and tells its watchers. `hint` is the (stage, version id) the event
    /// says a label moved to: stages already holding it are not re-read.
    pub async fn refresh_secret(&self, ids: &[String], hint: Option<(&str, &str)>) -> Refreshed {
        let names: Vec<&str> = ids.iter().map(|id| names::secret_name(id)).collect();
        let wanted = |id: &str| names.contains(&names::secret_name(id));
        // A name (or a stage of it) found missing may exist now.
        self.shared.cache.forget_misses_where(wanted);
        // A first read under way may have been answered before the change,
        // and nothing would re-read what it stores (the helper's case: an
        // event during a replica's first read of a rotating secret left
        // the old value to the sweep).
        self.shared.cache.forget_reads_under_way(wanted);
        // What was read by version id tells stages that may have moved;
        // it is not tracked (a version's value never changes), so it is
        // read again when next asked rather than re-read here.
        for name in &names {
            self.shared.cache.forget_version_ids(name);
        }
        let tracked = self
            .shared
            .tracked(|id| names.contains(&names::secret_name(id)));
        if tracked.is_empty() {
            return Refreshed::Untracked;
        }
        // The secret's complete ARN, when the event gave one (a label
        // event's `resources`): the hint's version id held under another
        // ARN is another secret's, created again under the name.
        let arn = ids
            .iter()
            .map(String::as_str)
            .find(|id| names::is_one_secret(id));
        let stale: Vec<&Tracked> = tracked
            .iter()
            .filter(|t| match hint {
                Some((stage, version)) => !(t.key.stage == stage && t.holds_only(arn, version)),
                None => true,
            })
            .collect();
        if stale.is_empty() {
            return Refreshed::AlreadyCurrent;
        }
        let rereads = stale.iter().map(|t| self.shared.reread(t));
        let outcomes = futures::future::join_all(rereads).await;
        let mut changed = 0;
        for outcome in outcomes {
            match outcome {
                Reread::Changed => changed += 1,
                Reread::Same | Reread::Refused => {}
                Reread::Failed(error) => return Refreshed::Failed(error),
            }
        }
        let behind = hint.is_some_and(|(stage, version)| {
            self.shared
                .tracked(|id| names.contains(&names::secret_name(id)))
                .iter()
                .any(|t| t.key.stage == stage && !t.holds_only(arn, version))
        });
        Refreshed::Reread {
            reads: stale.len(),
            changed,
            behind,
        }
    }
}

/// One tracked (secret, stage): a cached entry read by stage, a topic, or
/// both, with the versions they hold.
#[derive(Debug)]
pub(super) struct Tracked {
    /// The id it is read by (a full name or an ARN) and the stage.
    pub(super) key: TopicKey,
    /// The versions held, as (ARN, version id): the entry's and the
    /// topic's, the same but for a moment.
    pub(super) held: Vec<(String, String)>,
    /// The stages the cached entry's version carried when read (none
    /// without an entry): a label moved onto or off it changes them, not
    /// the version the stage points at.
    pub(super) cached_stages: Option<Vec<String>>,
    /// Its topic stands at DELETED: any version found is news.
    pub(super) deleted: bool,
}

impl Tracked {
    /// Whether only the version `version_id` is held, of the secret at
    /// `arn` when it is known (an event's hint names a version id alone).
    /// As everywhere, an ARN missing on either side leaves the version id
    /// to say it.
    pub(super) fn holds_only(&self, arn: Option<&str>, version_id: &str) -> bool {
        !self.deleted
            && self.held.iter().all(|(held_arn, held_id)| {
                held_id == version_id && arn.is_none_or(|arn| may_be_one_secret(arn, held_arn))
            })
    }

    /// Whether the cached entry's stages differ from `listed`, the
    /// stages the metadata gives its version (in any order).
    pub(super) fn stages_differ(&self, listed: &[String]) -> bool {
        self.cached_stages.as_ref().is_some_and(|cached| {
            cached.len() != listed.len() || cached.iter().any(|stage| !listed.contains(stage))
        })
    }

    fn cache_key(&self) -> CacheKey {
        self.key.cache_key()
    }
}

/// What one re-read found.
pub(super) enum Reread {
    Changed,
    Same,
    /// AWS refused it (access, a KMS key): nothing learned.
    Refused,
    Failed(StoreError),
}

impl Shared {
    /// Everything tracked whose id `wanted` picks, one item per (id, stage).
    /// Topics nobody watches any more are dropped first.
    pub(super) fn tracked(&self, wanted: impl Fn(&str) -> bool) -> Vec<Tracked> {
        self.topics
            .retain(|_, topic| topic.state.receiver_count() > 0);
        let mut tracked: std::collections::BTreeMap<TopicKey, Tracked> = Default::default();
        let staged = self.cache.entries_where(|key| {
            matches!(key.selector, VersionSelector::Stage(_)) && wanted(&key.name)
        });
        for (key, version) in staged {
            let VersionSelector::Stage(stage) = key.selector else {
                continue;
            };
            let key = TopicKey {
                name: key.name,
                stage,
            };
            let item = tracked.entry(key.clone()).or_insert_with(|| Tracked {
                key,
                held: Vec::new(),
                cached_stages: None,
                deleted: false,
            });
            item.held
                .push((version.arn.clone(), version.version_id.clone()));
            item.cached_stages = Some(version.version_stages.clone());
        }
        for topic in self.topics.iter().filter(|t| wanted(&t.key().name)) {
            let state = topic.state.borrow();
            let item = tracked
                .entry(topic.key().clone())
                .or_insert_with(|| Tracked {
                    key: topic.key().clone(),
                    held: Vec::new(),
                    cached_stages: None,
                    deleted: false,
                });
            item.held
                .push((state.version.arn.clone(), state.version.version_id.clone()));
            item.deleted |= state.event == WatchEvent::Deleted;
        }
        tracked.into_values().collect()
    }

    /// Reads one tracked stage upstream now, through the cache (which
    /// tells its topic); a definite "gone" drops the whole secret.
    pub(super) async fn reread(&self, tracked: &Tracked) -> Reread {
        match self.cache.refresh(tracked.cache_key(), None).await {
            Ok((version, _)) if tracked.holds_only(Some(&version.arn), &version.version_id) => {
                Reread::Same
            }
            Ok(_) => {
                // A change: what was remembered missing of this secret (a
                // stage, a version id, the ARN before a restore) may be
                // there now, as the event path forgets too.
                let name = names::secret_name(&tracked.key.name);
                self.cache
                    .forget_misses_where(|id| names::secret_name(id) == name);
                Reread::Changed
            }
            Err(StoreError::NotFound { .. } | StoreError::Deleted { .. })
                if tracked.key.stage == AWSCURRENT =>
            {
                self.forget_deleted_id(&tracked.key.name);
                Reread::Changed
            }
            Err(StoreError::NotFound { .. } | StoreError::Deleted { .. }) => {
                // The stage is gone (e.g. no AWSPREVIOUS any more), not
                // necessarily the secret.
                self.forget_gone_stage(&tracked.key);
                Reread::Changed
            }
            Err(error) if error.is_transient() => Reread::Failed(error),
            Err(error) => {
                tracing::debug!(secret = %tracked.key.name, %error, "a re-read was refused; skipped");
                Reread::Refused
            }
        }
    }

    /// A read found the stage of `id` gone (a bypass read, RefreshSecret, a
    /// resuming watcher's read...). When something is held of it, the rest
    /// is told now: AWSCURRENT gone is the secret gone.
    pub(super) fn stage_gone(&self, id: &str, stage: &str, was_cached: bool) {
        let key = TopicKey {
            name: id.to_owned(),
            stage: stage.to_owned(),
        };
        // Nothing held of it: nothing to tell (a NOT_FOUND of a name never
        // read costs one look). A topic already at DELETED still goes on:
        // other keys may have been read since.
        if !was_cached && !self.topics.contains_key(&key) {
            return;
        }
        if stage == AWSCURRENT {
            self.forget_deleted_id(id);
        } else {
            self.forget_gone_stage(&key);
        }
    }

    /// One stage of a secret is gone (not necessarily the secret): its
    /// entry goes, late reads of it are held back, its watchers are told.
    fn forget_gone_stage(&self, key: &TopicKey) {
        self.cache.remove_deleted(&key.cache_key());
        self.mark_deleted(key);
    }

    /// The secret read by `id` is gone upstream. A complete ARN's secret
    /// only: its name may already belong to a new one, whose readers by
    /// name must not hear of it.
    pub(super) fn forget_deleted_id(&self, id: &str) {
        if names::is_one_secret(id) {
            self.forget_deleted_where(|other| other == id);
        } else {
            self.forget_deleted(names::secret_name(id));
        }
    }

    /// The secret `name` is gone upstream: its entries are dropped (every
    /// selector, by name or ARN) and its watchers told.
    pub(super) fn forget_deleted(&self, name: &str) {
        self.forget_deleted_where(|id| names::secret_name(id) == name);
    }

    /// The secret read by the ids `belongs` picks is gone upstream.
    fn forget_deleted_where(&self, belongs: impl Fn(&str) -> bool) {
        self.cache.remove_deleted_where(&belongs);
        let keys: Vec<TopicKey> = self
            .topics
            .iter()
            .filter(|t| belongs(&t.key().name))
            .map(|t| t.key().clone())
            .collect();
        self.forget_listing_behind(&belongs);
        for key in keys {
            // A watched stage whose entry went (evicted) or is still being
            // read is marked too: a late read must not restore it.
            self.forget_gone_stage(&key);
        }
    }

    fn mark_deleted(&self, key: &TopicKey) {
        if let Some(topic) = self.topics.get(key)
            && topic.mark_deleted()
        {
            self.events.fetch_add(1, Relaxed);
            tracing::info!(secret = %key.name, stage = key.stage.as_str(), "secret deletion observed");
        }
    }
}
