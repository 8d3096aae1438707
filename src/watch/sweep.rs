//! The sweep: every interval, the upstream's metadata of every tracked
//! secret, compared with what is held; values are read only where a stage
//! moved.
//!
//! Budget, and why: ListSecrets has a quota of 100 calls a second per
//! account and Region, shared with everything else in the account, so a
//! round makes at most one upstream call (a ListSecrets page or a
//! DescribeSecret) per `PER_CALL` tracked secrets (GetSecretValue re-reads
//! of changed ones aside). Secrets under the
//! prefix are listed by page (`LIST_PAGE_SIZE` to a page, no values); a
//! listing longer than the budget goes on from where it stopped in the next
//! round. Tracked secrets outside the prefix (read by the ARN of another
//! name) are described one by one, taking turns when they alone would pass
//! the budget. A listed name filter cannot do better: AWS's name filter is a
//! prefix match of at most 10 values.
//!
//! When fewer secrets are tracked under the prefix than the listing has
//! pages (a few cached among thousands), they are described one by one
//! instead, as those outside it are: fewer calls, and each fresh sooner.
//!
//! What is cached by version id is swept too, by the name's metadata: a
//! version's value never changes, but its stages do, and an entry whose
//! stages the metadata no longer shows is forgotten (read again when next
//! asked). Such a name counts in the budget as a tracked one.
//!
//! A secret missing from a complete listing is described before anyone is
//! told it is gone: AWS documents that ListSecrets may lag changes by up to
//! five minutes, so absence alone proves nothing. At most a budget's worth
//! (or `PER_CALL`) of those are described a round, and one already known
//! deleted is not described again while the listing leaves it out.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, atomic::Ordering::Relaxed},
};

use super::{
    Shared, TopicKey, changed, jittered,
    refresh::{Reread, Tracked},
};
use crate::{
    backend::{SecretDescription, SecretStore, StoreError, VersionSelector},
    names,
};

/// Tracked secrets per upstream call of a round.
const PER_CALL: usize = 20;

/// How long a listing found behind is trusted to be only behind, the
/// first time: a re-read that found the version held may also have raced
/// a stage moving back and forth (A, B, A, B), which the listing, showing
/// B all along, never tells. Each re-read that finds it behind again
/// doubles the wait, up to `LISTING_LAG`.
const FIRST_LISTING_TRUST: std::time::Duration = std::time::Duration::from_secs(30);

/// AWS documents ListSecrets lagging by up to five minutes.
const LISTING_LAG: std::time::Duration = std::time::Duration::from_secs(300);

/// Bound of `Cursor::listing_behind` (one per tracked secret and stage in
/// practice): past it, it starts over.
const LISTING_BEHIND_MAX: usize = 100_000;

/// Secrets known deleted (watched still) that are described one by one are
/// described again every this many rounds, to notice one re-created: at
/// the rounds one past a multiple of it, odd ones, where a one-call budget
/// shared with the listing goes to descriptions (`split_budget`).
pub(super) const RECHECK_DELETED_EVERY: u64 = 10;

/// Every item of `name` is known deleted (only its watchers' topics are
/// left, at DELETED). A name cached only by version id has no item.
fn known_deleted(by_name: &HashMap<String, Vec<Tracked>>, name: &str) -> bool {
    by_name
        .get(name)
        .is_some_and(|items| !items.is_empty() && items.iter().all(|t| t.deleted))
}

/// What is cached by version id, by secret name: each version's id and
/// the stages it carried when read.
type HeldIds = HashMap<String, Vec<(String, Vec<String>)>>;

/// A listing found behind a (secret, stage).
#[derive(Debug)]
struct ListingBehind {
    said: Option<String>,
    at: tokio::time::Instant,
    trusted_for: std::time::Duration,
}

/// Where a listing that spans rounds stands.
#[derive(Debug, Default)]
pub(super) struct Cursor {
    /// What the listing said of a (secret, stage) when a re-read found
    /// the version held already, when, and for how long that is trusted:
    /// the listing lags (ListSecrets can, by minutes), and is not re-read
    /// again each round while it says the same (`FIRST_LISTING_TRUST`,
    /// doubling up to `LISTING_LAG`).
    listing_behind: HashMap<TopicKey, ListingBehind>,
    /// The next page to read; `None`: start a new listing.
    page: Option<String>,
    /// Names seen since the listing started.
    seen: HashSet<String>,
    /// Whose turn it is among the secrets outside the prefix.
    outside_turn: usize,
    /// Whose turn it is among those known deleted, at their recheck.
    deleted_turn: usize,
    /// The last listing failed (an outage must not write a line a round).
    failing: bool,
    /// That failure was logged at WARN: its end is logged at INFO.
    warned: bool,
    /// Pages read since the listing started, and how many the last
    /// complete listing took (0: none complete yet).
    pages_read: usize,
    listing_pages: usize,
}

/// A round's `budget` of calls, shared between listing pages (when there
/// are secrets under the prefix) and descriptions of the `outside`
/// secrets: the listing keeps a page; when the budget is a single call and
/// both need it, they take turns by `round`. Returns (descriptions, pages).
fn split_budget(budget: usize, listing: bool, outside: usize, round: u64) -> (usize, usize) {
    if !listing {
        return (outside.min(budget), 0);
    }
    let described = outside.min(budget - 1);
    if described == 0 && outside > 0 && budget == 1 && round % 2 == 1 {
        return (1, 0);
    }
    (described, budget - described)
}

/// What a sweep round will call (`Shared::plan`).
struct RoundPlan {
    /// The tracked names under the listed prefix, which the listing covers.
    listed: Vec<String>,
    /// The names to describe, by turns.
    to_describe: Vec<String>,
    /// The listing's pages to read.
    pages: usize,
}

/// `calls` of `names` (in name order), from where `turn` stands; `turn`
/// moves past them, so that each name gets its turn.
fn take_turns(turn: &mut usize, names: &[String], calls: usize) -> Vec<String> {
    if names.is_empty() || calls == 0 {
        return Vec::new();
    }
    let start = *turn % names.len();
    *turn = start + calls;
    let mut sorted = names.to_vec();
    sorted.sort();
    sorted.into_iter().cycle().skip(start).take(calls).collect()
}

impl Shared {
    /// Runs a round each interval (or at once when the store says it
    /// changed) until shutdown.
    pub(super) async fn sweep(self: Arc<Self>, store: Arc<dyn SecretStore>) {
        let mut shutdown = self.shutdown.subscribe();
        let mut store_changed = store.change_signal();
        loop {
            tokio::select! {
                () = tokio::time::sleep(jittered(self.interval)) => {}
                () = changed(&mut store_changed) => {
                    // The store says what it holds changed (a file edited):
                    // a name remembered missing may be there now.
                    self.cache.forget_misses_where(|_| true);
                }
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            self.round(store.as_ref()).await;
        }
    }

    /// Checks every tracked secret once, within the budget.
    pub(super) async fn round(&self, store: &dyn SecretStore) {
        let tracked = self.tracked(|_| true);
        let held_ids = self.held_ids();
        if tracked.is_empty() && held_ids.is_empty() {
            return;
        }
        self.rounds.fetch_add(1, Relaxed);
        let mut by_name: HashMap<String, Vec<Tracked>> = HashMap::new();
        for item in tracked {
            let name = names::secret_name(&item.key.name).to_owned();
            by_name.entry(name).or_default().push(item);
        }
        for name in held_ids.keys() {
            by_name.entry(name.clone()).or_default();
        }
        let budget = by_name.len().div_ceil(PER_CALL);
        let plan = self.plan(&by_name, budget);
        let mut to_describe = plan.to_describe;
        if plan.pages > 0 {
            // Absent from a complete listing: described before anyone is
            // told, at most a budget's worth (or `PER_CALL`) a round (the
            // rest are absent again at the next complete listing). One
            // already known deleted is not described again at every
            // listing; it is news again only when the listing shows it.
            let missing = self.list(store, plan.pages, &by_name, &held_ids).await;
            to_describe.extend(
                missing
                    .into_iter()
                    .filter(|name| plan.listed.contains(name) && !known_deleted(&by_name, name))
                    .take(budget.max(PER_CALL)),
            );
        }
        for name in to_describe {
            if let Some(items) = by_name.get(&name) {
                self.describe(store, &name, items, &by_name, &held_ids)
                    .await;
            }
        }
    }

    /// How this round spends its `budget` of calls: pages of the listing
    /// for the names under the listed prefix, DescribeSecret by turns for
    /// the others.
    fn plan(&self, by_name: &HashMap<String, Vec<Tracked>>, budget: usize) -> RoundPlan {
        let (mut inside, mut outside): (Vec<String>, Vec<String>) = by_name
            .keys()
            .cloned()
            .partition(|name| name.starts_with(&self.listed_prefix));
        // Few tracked secrets under a prefix that holds many: describing
        // them one by one costs fewer calls than a pass of the listing (and
        // keeps each of them fresh every round or few). A listing left half
        // way starts over when listing comes back.
        {
            let mut cursor = self.cursor.lock().unwrap();
            if inside.len() < cursor.listing_pages {
                outside.append(&mut inside);
                cursor.page = None;
                cursor.seen.clear();
                cursor.pages_read = 0;
            }
        }
        // A secret known deleted is described again only now and then (it
        // may come back), not at every turn; then first, by turns of their
        // own: among the others, one could be passed over at every recheck.
        let recheck = self.rounds.load(Relaxed) % RECHECK_DELETED_EVERY == 1;
        let (mut deleted, live): (Vec<String>, Vec<String>) = outside
            .into_iter()
            .partition(|name| known_deleted(by_name, name));
        if !recheck {
            deleted.clear();
        }
        let (outside_calls, pages) = split_budget(
            budget,
            !inside.is_empty(),
            deleted.len() + live.len(),
            self.rounds.load(Relaxed),
        );
        let deleted_calls = outside_calls.min(deleted.len());
        let mut cursor = self.cursor.lock().unwrap();
        let mut to_describe = take_turns(&mut cursor.deleted_turn, &deleted, deleted_calls);
        to_describe.extend(take_turns(
            &mut cursor.outside_turn,
            &live,
            outside_calls - deleted_calls,
        ));
        RoundPlan {
            listed: inside,
            to_describe,
            pages,
        }
    }

    /// Describes one tracked secret (`name`, read as `items`) and tells
    /// what moved.
    async fn describe(
        &self,
        store: &dyn SecretStore,
        name: &str,
        items: &[Tracked],
        by_name: &HashMap<String, Vec<Tracked>>,
        held_ids: &HeldIds,
    ) {
        self.upstream_calls.fetch_add(1, Relaxed);
        // By an id it is read by (an ARN may name another account),
        // the name rather than a complete ARN: that ARN's secret may be
        // gone while the name is another secret's now (`compare` tells
        // that ARN's readers). A name cached only by version id, by
        // its name.
        let id = items
            .iter()
            .find(|item| !names::is_one_secret(&item.key.name))
            .or(items.first())
            .map_or(name, |item| item.key.name.as_str());
        match store.describe_secret(id).await {
            Ok(description) => {
                self.compare(&description, items).await;
                self.compare_held_ids(&description, held_ids);
            }
            Err(StoreError::NotFound { .. } | StoreError::Deleted { .. }) => {
                if !known_deleted(by_name, name) {
                    self.sweep_changes.fetch_add(1, Relaxed);
                }
                self.forget_deleted_id(id);
            }
            Err(error) => {
                tracing::debug!(secret = %name, %error, "the sweep could not describe a secret this round")
            }
        }
    }

    /// A secret, or a stage of it, remembered missing (NOT_FOUND, or
    /// deleted) that a listing shows (created, restored, a label added) is
    /// read at its next ask, not when the miss expires: nobody watches what
    /// is not there, so nothing else would tell. Reads by stage only: a
    /// listing names versions that carry a stage, not every version id.
    fn forget_misses_now_listed(&self, listed: &[SecretDescription]) {
        let live: HashMap<&str, HashSet<&str>> = listed
            .iter()
            .filter(|description| !description.deleted)
            .map(|description| {
                let stages = description.versions.iter().flat_map(|(_, stages)| stages);
                let stages = stages.map(String::as_str).collect();
                (description.name.as_str(), stages)
            })
            .collect();
        self.cache.forget_stage_misses_where(|id, stage| {
            live.get(names::secret_name(id))
                .is_some_and(|stages| stages.contains(stage))
        });
    }

    /// Whether the listing said `listed` of `key` when a re-read last found
    /// the version held, within the time that is trusted.
    fn behind_still(&self, key: &TopicKey, listed: &Option<String>) -> bool {
        self.cursor
            .lock()
            .unwrap()
            .listing_behind
            .get(key)
            .is_some_and(|behind| {
                &behind.said == listed && behind.at.elapsed() < behind.trusted_for
            })
    }

    fn note_behind(&self, key: &TopicKey, listed: Option<String>) {
        let mut cursor = self.cursor.lock().unwrap();
        if cursor.listing_behind.len() >= LISTING_BEHIND_MAX {
            cursor.listing_behind.clear();
        }
        let trusted_for = match cursor.listing_behind.get(key) {
            Some(before) if before.said == listed => (before.trusted_for * 2).min(LISTING_LAG),
            _ => FIRST_LISTING_TRUST,
        };
        cursor.listing_behind.insert(
            key.clone(),
            ListingBehind {
                said: listed,
                at: tokio::time::Instant::now(),
                trusted_for,
            },
        );
    }

    /// What was noted of listings lagging, for the ids `belongs` picks
    /// (found deleted: a restore must be read at once).
    pub(super) fn forget_listing_behind(&self, belongs: &dyn Fn(&str) -> bool) {
        self.cursor
            .lock()
            .unwrap()
            .listing_behind
            .retain(|key, _| !belongs(&key.name));
    }

    /// A listing failed: said once per outage (at WARN when the upstream
    /// check does not say it already).
    fn cannot_list(&self, error: &StoreError, told_by_the_check: bool) {
        let mut cursor = self.cursor.lock().unwrap();
        cursor.failing = true;
        if cursor.warned || told_by_the_check {
            tracing::debug!(%error, "the sweep cannot list secrets; it tries again each round");
        } else {
            cursor.warned = true;
            tracing::warn!(%error, "the sweep cannot list secrets; it tries again each round");
        }
    }

    /// A listing worked: the end of a failure is said as its start was.
    fn listed_again(&self) {
        let mut cursor = self.cursor.lock().unwrap();
        if std::mem::replace(&mut cursor.failing, false) {
            if std::mem::replace(&mut cursor.warned, false) {
                tracing::info!("the sweep lists secrets again");
            } else {
                tracing::debug!("the sweep lists secrets again");
            }
        }
    }

    /// Reads up to `pages` pages of the listing and compares what it finds.
    /// Returns the tracked names a complete listing left out (to be
    /// described), and none while the listing is unfinished or failed.
    async fn list(
        &self,
        store: &dyn SecretStore,
        pages: usize,
        by_name: &HashMap<String, Vec<Tracked>>,
        held_ids: &HeldIds,
    ) -> Vec<String> {
        let (mut page, mut seen) = {
            let mut cursor = self.cursor.lock().unwrap();
            (cursor.page.take(), std::mem::take(&mut cursor.seen))
        };
        for _ in 0..pages {
            self.upstream_calls.fetch_add(1, Relaxed);
            self.cursor.lock().unwrap().pages_read += 1;
            let listing = match store.list_secrets(&self.listed_prefix, page.take()).await {
                Ok(listing) => listing,
                Err(error) => {
                    // The next round starts over; events and the TTL hold
                    // meanwhile.
                    self.cursor.lock().unwrap().pages_read = 0;
                    // The upstream check lists secrets too, and says once
                    // when that starts and stops failing (AWS down, the
                    // credentials, IAM): a line of the sweep's would repeat
                    // it. Other failures are the sweep's own to tell, once.
                    // (Throttling and a full upstream queue are the sweep's
                    // own: its pages are many calls, the check's one.)
                    let told_by_the_check = matches!(
                        error,
                        StoreError::Unavailable { .. } | StoreError::AccessDenied { .. }
                    );
                    self.cannot_list(&error, told_by_the_check);
                    return Vec::new();
                }
            };
            self.listed_again();
            self.forget_misses_now_listed(&listing.secrets);
            for description in &listing.secrets {
                seen.insert(description.name.clone());
                if let Some(items) = by_name.get(&description.name) {
                    self.compare(description, items).await;
                    self.compare_held_ids(description, held_ids);
                }
            }
            page = listing.next;
            if page.is_none() {
                let mut cursor = self.cursor.lock().unwrap();
                cursor.listing_pages = std::mem::take(&mut cursor.pages_read);
                drop(cursor);
                return by_name
                    .keys()
                    .filter(|name| !seen.contains(*name))
                    .cloned()
                    .collect();
            }
        }
        let mut cursor = self.cursor.lock().unwrap();
        cursor.page = page;
        cursor.seen = seen;
        Vec::new()
    }

    /// What is cached by version id, by secret name. Read by name only: a
    /// complete ARN may be another account's secret of the same name,
    /// whose versions this account's metadata never shows.
    fn held_ids(&self) -> HeldIds {
        let mut held = HeldIds::new();
        let by_id = self.cache.entries_where(|key| {
            matches!(key.selector, VersionSelector::Id { .. }) && !names::is_one_secret(&key.name)
        });
        for (key, version) in by_id {
            let name = names::secret_name(&key.name).to_owned();
            let stages = version.version_stages.clone();
            held.entry(name)
                .or_default()
                .push((version.version_id.clone(), stages));
        }
        held
    }

    /// A secret's metadata against what is cached of it by version id: a
    /// version whose stages moved is forgotten, every version id of the
    /// name with it, and read again when next asked.
    fn compare_held_ids(&self, description: &SecretDescription, held_ids: &HeldIds) {
        let Some(held) = held_ids.get(&description.name) else {
            return;
        };
        if description.deleted {
            // Read again when next asked: the read says it is deleted.
            self.sweep_changes.fetch_add(1, Relaxed);
            self.cache.forget_version_ids(&description.name);
            return;
        }
        let stages_of = |version: &str| -> Vec<&str> {
            let mut stages: Vec<&str> = description
                .versions
                .iter()
                .filter(|(id, _)| id == version)
                .flat_map(|(_, stages)| stages.iter().map(String::as_str))
                .collect();
            stages.sort_unstable();
            stages
        };
        let moved = held.iter().any(|(version, stages)| {
            let mut cached: Vec<&str> = stages.iter().map(String::as_str).collect();
            cached.sort_unstable();
            cached != stages_of(version)
        });
        if moved {
            self.sweep_changes.fetch_add(1, Relaxed);
            self.cache.forget_version_ids(&description.name);
        }
    }

    /// One secret's metadata against what is held of it: a deletion, or a
    /// re-read of each stage that moved or whose version's labels did.
    async fn compare(&self, description: &SecretDescription, items: &[Tracked]) {
        if description.deleted {
            if items.iter().any(|item| !item.deleted) {
                self.sweep_changes.fetch_add(1, Relaxed);
                self.forget_deleted(&description.name);
            }
            return;
        }
        for item in items {
            let listed = names::answer_matches(&item.key.name, &description.name, &description.arn);
            // The ARN of a secret no longer under this name (deleted, and
            // the name given to a new secret) is re-read, once: AWS says it
            // is gone, and its readers and watchers are told. (Another
            // account's or region's ARN is not this secret's at all.)
            let replaced =
                !listed && !item.deleted && names::replaced_by(&item.key.name, &description.arn);
            if !listed && !replaced {
                continue;
            }
            let stage = VersionSelector::Stage(item.key.stage.clone());
            let listed_version = description.selected_version(&stage).map(str::to_owned);
            // A listing without ARNs says nothing of them: an ARN it lacks
            // must not read as a new secret every round.
            let listed_arn = Some(description.arn.as_str()).filter(|arn| !arn.is_empty());
            let moved = !listed
                || listed_version
                    .as_deref()
                    .is_none_or(|listed| !item.holds_only(listed_arn, listed));
            // The stage points where it did, but a label moved onto or off
            // its version: the cached answer's stage list is out of date.
            let relabelled = !moved
                && listed_version.as_deref().is_some_and(|version| {
                    description
                        .versions
                        .iter()
                        .find(|(id, _)| id == version)
                        .is_some_and(|(_, stages)| item.stages_differ(stages))
                });
            if !moved && !relabelled {
                self.cursor.lock().unwrap().listing_behind.remove(&item.key);
                continue;
            }
            // A re-read that finds the version held (AWS answered, not
            // refused) while the listing says otherwise: the listing lags,
            // or the stage moved back meanwhile. A change after that makes
            // the listing say something else, or is read when the trust
            // runs out (30 s first).
            let lags = listed && !item.deleted;
            if lags && !relabelled && self.behind_still(&item.key, &listed_version) {
                continue;
            }
            self.upstream_calls.fetch_add(1, Relaxed);
            match self.reread(item).await {
                Reread::Changed => {
                    self.sweep_changes.fetch_add(1, Relaxed);
                    self.cursor.lock().unwrap().listing_behind.remove(&item.key);
                }
                // A relabelled version is read again while the listing
                // and the read disagree on its labels (one read a round):
                // noting the listing behind would hold back the next
                // relabelling of the same version.
                Reread::Same if lags && !relabelled => self.note_behind(&item.key, listed_version),
                Reread::Same | Reread::Refused => {}
                Reread::Failed(error) => {
                    tracing::debug!(secret = %item.key.name, %error, "the sweep could not re-read a secret this round")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::split_budget;

    #[test]
    fn the_budget_is_never_passed() {
        for budget in 1..6 {
            for outside in 0..12 {
                for listing in [false, true] {
                    for round in 0..4 {
                        let (described, pages) = split_budget(budget, listing, outside, round);
                        assert!(described + pages <= budget, "{budget} {outside} {listing}");
                        assert!(described <= outside);
                        let listing_turn = !(budget == 1 && outside > 0 && round % 2 == 1);
                        if listing && listing_turn {
                            assert!(pages >= 1, "the listing keeps a page");
                        }
                    }
                }
            }
        }
        // One call a round, both needing it: they take turns.
        assert_eq!(split_budget(1, true, 1, 0), (0, 1));
        assert_eq!(split_budget(1, true, 1, 1), (1, 0));
        // Room for both: the listing keeps its page.
        assert_eq!(split_budget(3, true, 5, 0), (2, 1));
        assert_eq!(split_budget(3, false, 5, 0), (3, 0));
    }
}
