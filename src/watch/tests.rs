//! The watch layer against the fake store, rounds driven by hand.

use super::*;
use crate::{
    backend::{AWSCURRENT, SecretStore, fake::FakeStore},
    cache::CacheSettings,
};

/// A hub over a cache over `store`; the sweep lists every name.
pub(crate) fn hub_over(store: &Arc<FakeStore>) -> (WatchHub, Cache) {
    hub_listing(store, "")
}

/// `hub_over`, whose sweep lists the names under `prefix` only.
fn hub_listing(store: &Arc<FakeStore>, prefix: &str) -> (WatchHub, Cache) {
    let cache = Cache::new(
        Arc::clone(store) as Arc<dyn SecretStore>,
        CacheSettings {
            ttl: Duration::from_secs(300),
            max_entries: 100,
            max_stale: Duration::from_secs(60),
            upstream_wait: Duration::from_secs(1),
            negative_ttl: Duration::from_secs(30),
            upstream: crate::backend::bounded::UpstreamLimits {
                concurrency: 32,
                queue: 1000,
            },
        },
    );
    (
        WatchHub::new(cache.clone(), Duration::from_secs(30), prefix),
        cache,
    )
}

async fn subscribe(hub: &WatchHub, name: &str) -> Subscription {
    hub.subscribe(name.to_owned(), AWSCURRENT.to_owned(), false)
        .await
        .unwrap()
}

async fn round(hub: &WatchHub, store: &Arc<FakeStore>) {
    hub.shared.round(store.as_ref()).await;
}

fn latest(subscription: &mut Subscription) -> (WatchEvent, String) {
    let state = subscription.changes.borrow_and_update();
    (state.event, state.version.version_id.clone())
}

#[tokio::test]
async fn a_rotation_reaches_the_watcher_and_the_cache() {
    let store = FakeStore::with(&["s"]);
    let (hub, cache) = hub_over(&store);
    let mut watcher = subscribe(&hub, "s").await;
    assert_eq!(watcher.first.event, WatchEvent::Current);
    assert_eq!(watcher.first.version.version_id, "v1");

    round(&hub, &store).await;
    assert!(
        !watcher.changes.has_changed().unwrap(),
        "no change, no event"
    );

    store.set("s", "v2");
    round(&hub, &store).await;
    assert!(watcher.changes.has_changed().unwrap());
    assert_eq!(latest(&mut watcher), (WatchEvent::Rotated, "v2".into()));

    let key = CacheKey::new("s".into(), VersionSelector::current());
    let cached = cache.get(key, false).await.unwrap();
    assert_eq!(
        (cached.hit, cached.version.version_id.as_str()),
        (true, "v2")
    );
}

/// A secret "s" (with an ARN) at v1, watched and cached: the store, the
/// hub, the watcher, the cache, its key, and the version read.
async fn held_with_an_arn() -> (
    Arc<FakeStore>,
    WatchHub,
    Subscription,
    Cache,
    CacheKey,
    Arc<SecretVersion>,
) {
    let store = FakeStore::with(&[]);
    store.create_again("s", "v1");
    let (hub, cache) = hub_over(&store);
    let watcher = subscribe(&hub, "s").await;
    let key = CacheKey::new("s".into(), VersionSelector::current());
    let before = cache.get(key.clone(), false).await.unwrap().version;
    (store, hub, watcher, cache, key, before)
}

#[tokio::test]
async fn a_secret_created_again_with_its_old_version_ids_is_news() {
    let (store, hub, mut watcher, cache, key, before) = held_with_an_arn().await;
    // Deleted for good and created again between two rounds, given the
    // same version id (a caller's ClientRequestToken): another secret,
    // another value, under a new ARN.
    store.create_again("s", "v1");
    round(&hub, &store).await;
    assert!(
        watcher.changes.has_changed().unwrap(),
        "the new secret is news"
    );
    let told = Arc::clone(&watcher.changes.borrow_and_update().version);
    let cached = cache.get(key, false).await.unwrap();
    assert_ne!(told.arn, before.arn);
    assert_eq!(cached.version.arn, told.arn, "served as it was told");
    assert_ne!(cached.version.value, before.value);
}

/// An event's hint names a version id; with the ARN the event gave, the
/// same version id held under the old ARN is not taken for current.
#[tokio::test]
async fn an_event_naming_a_held_version_id_of_a_secret_created_again_is_news() {
    let (store, hub, mut watcher, cache, key, before) = held_with_an_arn().await;
    store.create_again("s", "v1");
    let new_arn = store.describe_secret("s").await.unwrap().arn;
    let ids = ["s".to_owned(), new_arn.clone()];
    let outcome = hub.refresh_secret(&ids, Some((AWSCURRENT, "v1"))).await;
    assert_ne!(outcome, Refreshed::AlreadyCurrent);
    assert_eq!(watcher.changes.borrow_and_update().version.arn, new_arn);
    let cached = cache.get(key, false).await.unwrap().version;
    assert_ne!(cached.value, before.value);
}

#[tokio::test]
async fn a_slow_watcher_gets_the_latest_state_only() {
    let store = FakeStore::with(&["s"]);
    let (hub, _) = hub_over(&store);
    let mut slow = subscribe(&hub, "s").await;
    for version in ["v2", "v3", "v4"] {
        store.set("s", version);
        round(&hub, &store).await;
    }
    assert_eq!(latest(&mut slow), (WatchEvent::Rotated, "v4".into()));
    assert!(!slow.changes.has_changed().unwrap());
}

#[tokio::test]
async fn deletion_and_restoration_are_events() {
    let store = FakeStore::with(&["s"]);
    let (hub, cache) = hub_over(&store);
    let mut watcher = subscribe(&hub, "s").await;

    store.delete("s");
    round(&hub, &store).await;
    assert_eq!(latest(&mut watcher), (WatchEvent::Deleted, "v1".into()));
    assert_eq!(
        cache.stats().total_entries,
        0,
        "a deleted secret leaves the cache"
    );
    round(&hub, &store).await;
    assert!(!watcher.changes.has_changed().unwrap(), "deleted once");

    store.set("s", "v1");
    round(&hub, &store).await;
    assert_eq!(latest(&mut watcher), (WatchEvent::Restored, "v1".into()));
}

#[tokio::test]
async fn sweep_cost_depends_on_secrets_not_watchers() {
    let names: Vec<String> = (0..25).map(|i| format!("s{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let store = FakeStore::with(&refs);
    let (hub, _) = hub_over(&store);

    let mut watchers = Vec::new();
    for _ in 0..1000 {
        watchers.push(subscribe(&hub, "s0").await);
    }
    let reads = store.calls();
    round(&hub, &store).await;
    assert_eq!(
        store.list_calls(),
        1,
        "1000 watchers of one secret: one call"
    );

    for name in &names[1..] {
        watchers.push(subscribe(&hub, name).await);
    }
    round(&hub, &store).await;
    assert_eq!(store.list_calls(), 2, "25 secrets: one page");
    let reads_of_subscribes = 24;
    assert_eq!(
        store.calls(),
        reads + reads_of_subscribes,
        "nothing changed: no value read"
    );
    let stats = hub.stats();
    assert_eq!(stats.watchers, 1024);
    assert_eq!(stats.watched_secrets, 25);
    assert_eq!(stats.upstream_calls, 2);
    assert_eq!(stats.rounds, 2);

    // The last watcher of a secret gone, it is watched no more, before any
    // sweep drops its topic.
    watchers.truncate(1000);
    assert_eq!(hub.stats().watched_secrets, 1);
    watchers.clear();
    let stats = hub.stats();
    assert_eq!((stats.watchers, stats.watched_secrets), (0, 0));
}

#[tokio::test]
async fn every_cached_secret_is_swept_not_only_watched_ones() {
    let names: Vec<String> = (0..100).map(|i| format!("s{i:03}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let store = FakeStore::with(&refs);
    let (hub, cache) = hub_over(&store);
    for name in &names {
        let key = CacheKey::new(name.clone(), VersionSelector::current());
        cache.get(key, false).await.unwrap();
    }
    let (reads, lists, describes) = (store.calls(), store.list_calls(), store.describe_calls());
    round(&hub, &store).await;
    let calls = (store.list_calls() - lists) + (store.describe_calls() - describes);
    assert!(calls <= 5, "100 secrets: at most 5 calls, made {calls}");
    assert_eq!(store.calls(), reads, "nothing changed: no value read");

    store.set("s042", "v2");
    round(&hub, &store).await;
    assert_eq!(store.calls(), reads + 1, "only the rotated one is read");
    let key = CacheKey::new("s042".into(), VersionSelector::current());
    let cached = cache.get(key, false).await.unwrap();
    assert_eq!(
        (cached.hit, cached.version.version_id.as_str()),
        (true, "v2")
    );
    assert_eq!(hub.stats().sweep_changes, 1);
}

#[tokio::test]
async fn a_long_listing_spreads_over_rounds_within_the_budget() {
    // 250 secrets upstream, 3 held: one call a round, three rounds a listing.
    let names: Vec<String> = (0..250).map(|i| format!("s{i:03}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let store = FakeStore::with(&refs);
    let (hub, cache) = hub_over(&store);
    for name in ["s000", "s120", "s249"] {
        let key = CacheKey::new(name.into(), VersionSelector::current());
        cache.get(key, false).await.unwrap();
    }
    store.set("s249", "v2");
    let reads = store.calls();
    for round_number in 1..=3 {
        round(&hub, &store).await;
        assert_eq!(store.list_calls(), round_number, "one page a round");
    }
    assert_eq!(store.calls(), reads + 1, "the last page found the rotation");
    assert_eq!(store.describe_calls(), 0, "every held secret was listed");
}

/// `s` rotated to v2 and held (a bypass read, an event), while the listing
/// still shows v1: ListSecrets lags, by minutes on AWS.
async fn held_ahead_of_the_listing(hub: &WatchHub, store: &Arc<FakeStore>) {
    store.set("s", "v2");
    store
        .listed_as
        .lock()
        .unwrap()
        .insert("s".into(), "v1".into());
    hub.refresh_secret(&["s".to_owned()], None).await;
}

#[tokio::test]
async fn a_listing_that_lags_a_rotation_already_held_is_not_reread_every_round() {
    let store = FakeStore::with(&["s"]);
    let (hub, _cache) = hub_over(&store);
    let mut watcher = subscribe(&hub, "s").await;
    held_ahead_of_the_listing(&hub, &store).await;
    assert_eq!(latest(&mut watcher), (WatchEvent::Rotated, "v2".into()));
    let reads = store.calls();
    round(&hub, &store).await;
    assert_eq!(store.calls(), reads + 1, "the listing differs: read once");
    for _ in 0..3 {
        round(&hub, &store).await;
    }
    assert_eq!(store.calls(), reads + 1, "not again while it says the same");

    // The listing moves on (to a version not held): read again.
    store.set("s", "v3");
    store.listed_as.lock().unwrap().clear();
    round(&hub, &store).await;
    assert_eq!(store.calls(), reads + 2);
    assert_eq!(latest(&mut watcher), (WatchEvent::Rotated, "v3".into()));
}

#[tokio::test(start_paused = true)]
async fn a_listing_found_behind_is_trusted_30_s_first_then_twice_as_long_each_time() {
    let store = FakeStore::with(&["s"]);
    let (hub, _cache) = hub_over(&store);
    let _watcher = subscribe(&hub, "s").await;
    held_ahead_of_the_listing(&hub, &store).await;
    let reads = store.calls();
    let (hub, store) = (&hub, &store);
    let reads_after = |seconds: u64| async move {
        tokio::time::advance(Duration::from_secs(seconds)).await;
        round(hub, store).await;
        store.calls() - reads
    };
    assert_eq!(reads_after(0).await, 1, "found behind");
    assert_eq!(reads_after(29).await, 1, "trusted for 30 s");
    assert_eq!(reads_after(2).await, 2, "then read again");
    assert_eq!(reads_after(31).await, 2, "trusted for 60 s now");
    assert_eq!(reads_after(30).await, 3);
}

#[tokio::test]
async fn a_deletion_a_bypass_read_finds_reaches_watchers_and_the_other_keys_at_once() {
    let store = FakeStore::with(&["s"]);
    let (hub, cache) = hub_over(&store);
    let mut watcher = subscribe(&hub, "s").await;
    let by_id = CacheKey::by_version_id("s", "v1");
    cache.get(by_id.clone(), false).await.unwrap();
    store.delete("s");
    // No sweep round (none runs here): the bypass read is the first to see it.
    let read = cache
        .get(CacheKey::new("s".into(), VersionSelector::current()), true)
        .await;
    assert!(matches!(read, Err(StoreError::Deleted { .. })), "{read:?}");
    assert_eq!(latest(&mut watcher), (WatchEvent::Deleted, "v1".into()));
    assert!(
        cache.entries_where(|_| true).is_empty(),
        "the version-id entry went too"
    );
}

#[tokio::test]
async fn a_refused_reread_is_not_taken_for_a_listing_that_lags() {
    let store = FakeStore::with(&["s"]);
    let (hub, _cache) = hub_over(&store);
    let mut watcher = subscribe(&hub, "s").await;
    // Rotated, and the new version's KMS key not usable by the broker yet.
    store.set("s", "v2");
    *store.value_failure.lock().unwrap() = Some(StoreError::Rejected {
        detail: "AWS answered DecryptionFailure (HTTP 400)".into(),
    });
    round(&hub, &store).await;
    assert!(!watcher.changes.has_changed().unwrap());
    // The key is fixed: the next round reads the rotation.
    *store.value_failure.lock().unwrap() = None;
    round(&hub, &store).await;
    assert_eq!(latest(&mut watcher), (WatchEvent::Rotated, "v2".into()));
}

#[tokio::test]
async fn a_secret_marked_for_deletion_is_watched_at_deleted_however_it_is_asked() {
    let store = FakeStore::with(&["s", "t"]);
    let (hub, _cache) = hub_over(&store);
    // Deleted before anyone watched it: the stream opens at DELETED.
    store.delete("t");
    let fresh = subscribe(&hub, "t").await;
    assert_eq!(fresh.first.event, WatchEvent::Deleted);
    assert_eq!(fresh.first.version.name, "t");

    // Deleted while watched, before the sweep saw it: a watcher resuming
    // (after a broker restart elsewhere) is told, and so is the first.
    let mut watching = subscribe(&hub, "s").await;
    store.delete("s");
    let resumed = hub
        .subscribe("s".to_owned(), AWSCURRENT.to_owned(), true)
        .await
        .expect("a deleted secret can be restored: not refused");
    assert_eq!(resumed.first.event, WatchEvent::Deleted);
    assert_eq!(latest(&mut watching).0, WatchEvent::Deleted);
}

#[tokio::test]
async fn a_change_the_sweep_finds_forgets_what_was_remembered_missing_of_the_secret() {
    let store = FakeStore::with(&["s"]);
    let (hub, cache) = hub_over(&store);
    let mut watcher = subscribe(&hub, "s").await;
    // A version not there yet is asked for: its NOT_FOUND is remembered.
    let by_id = CacheKey::by_version_id("s", "v2");
    store.fail_with(Some(StoreError::NotFound { name: "s".into() }));
    assert!(cache.get(by_id.clone(), false).await.is_err());
    store.fail_with(None);

    store.set("s", "v2");
    round(&hub, &store).await;
    assert_eq!(latest(&mut watcher), (WatchEvent::Rotated, "v2".into()));
    let read = cache.get(by_id, false).await.expect("no longer missing");
    assert_eq!(read.version.version_id, "v2");
}

#[tokio::test]
async fn absence_from_the_listing_is_confirmed_before_deleted() {
    let store = FakeStore::with(&["s"]);
    let (hub, cache) = hub_over(&store);
    let mut watcher = subscribe(&hub, "s").await;
    store.unlisted.lock().unwrap().push("s".into());
    round(&hub, &store).await;
    assert_eq!(store.describe_calls(), 1, "described, as the listing lags");
    assert!(
        !watcher.changes.has_changed().unwrap(),
        "still there: no event"
    );

    store.remove("s");
    round(&hub, &store).await;
    assert_eq!(latest(&mut watcher), (WatchEvent::Deleted, "v1".into()));
    assert_eq!(cache.stats().total_entries, 0);
}

#[tokio::test]
async fn refresh_secret_rereads_every_tracked_stage_once() {
    let store = FakeStore::with(&["s", "other"]);
    let (hub, cache) = hub_over(&store);
    let mut watcher = subscribe(&hub, "s").await;
    let by_id = CacheKey::by_version_id("s", "v1");
    cache.get(by_id.clone(), false).await.unwrap();
    store.set("s", "v2");
    let reads = store.calls();

    let ids = ["s".to_owned()];
    let outcome = hub.refresh_secret(&ids, None).await;
    // The stages moved: the by-id answer (which tells its stages) is read
    // again when next asked, not re-read now.
    assert!(
        cache.entries_where(|key| *key == by_id).is_empty(),
        "the by-id entry is forgotten"
    );
    assert_eq!(
        outcome,
        Refreshed::Reread {
            reads: 1,
            changed: 1,
            behind: false
        }
    );
    assert_eq!(
        store.calls(),
        reads + 1,
        "one read: a version id never changes"
    );
    assert_eq!(latest(&mut watcher), (WatchEvent::Rotated, "v2".into()));

    let hint = Some(("AWSCURRENT", "v2"));
    assert_eq!(
        hub.refresh_secret(&ids, hint).await,
        Refreshed::AlreadyCurrent
    );
    let untracked = ["other".to_owned()];
    assert_eq!(
        hub.refresh_secret(&untracked, None).await,
        Refreshed::Untracked
    );
    assert_eq!(store.calls(), reads + 1);

    store.delete("s");
    hub.refresh_secret(&ids, None).await;
    assert_eq!(latest(&mut watcher), (WatchEvent::Deleted, "v2".into()));
    assert_eq!(cache.stats().total_entries, 0, "every selector dropped");
}

#[tokio::test]
async fn a_bypass_read_that_finds_a_new_version_notifies_at_once() {
    let store = FakeStore::with(&["s"]);
    let (hub, cache) = hub_over(&store);
    let mut watcher = subscribe(&hub, "s").await;
    store.set("s", "v2");
    let key = CacheKey::new("s".into(), VersionSelector::current());
    cache.get(key.clone(), true).await.unwrap();
    assert_eq!(latest(&mut watcher), (WatchEvent::Rotated, "v2".into()));

    store.set("s", "v3");
    cache.refresh(key, None).await.unwrap();
    assert_eq!(latest(&mut watcher), (WatchEvent::Rotated, "v3".into()));
}

#[tokio::test]
async fn missing_secrets_are_refused_at_once() {
    let store = FakeStore::with(&[]);
    let (hub, _) = hub_over(&store);
    let refused = hub.subscribe("nope".into(), AWSCURRENT.into(), false).await;
    assert!(matches!(refused, Err(StoreError::NotFound { .. })));
    assert_eq!(hub.stats().watchers, 0);
}

#[tokio::test(start_paused = true)]
async fn the_sweep_polls_and_stops_on_shutdown() {
    let store = FakeStore::with(&["s"]);
    let (hub, _) = hub_over(&store);
    let mut watcher = subscribe(&hub, "s").await;
    let detector = tokio::spawn(hub.clone().sweep());

    store.set("s", "v2");
    // Within one interval plus jitter.
    tokio::time::sleep(Duration::from_secs(34)).await;
    assert_eq!(latest(&mut watcher), (WatchEvent::Rotated, "v2".into()));

    hub.shutdown();
    assert!(*watcher.shutdown.borrow_and_update());
    tokio::time::timeout(Duration::from_secs(1), detector)
        .await
        .expect("the sweep ends on shutdown")
        .unwrap();
}

#[tokio::test]
async fn a_new_topic_starts_from_upstream_not_from_the_cache() {
    let store = FakeStore::with(&["s"]);
    let (hub, cache) = hub_over(&store);
    let key = CacheKey::new("s".into(), VersionSelector::current());
    cache.get(key, false).await.unwrap();
    store.set("s", "v2");
    // A client reconnecting with v1 must not be told v1 is current.
    let watcher = subscribe(&hub, "s").await;
    assert_eq!(watcher.first.version.version_id, "v2");
}

#[tokio::test]
async fn a_known_deletion_is_the_first_state_of_a_new_watcher() {
    let store = FakeStore::with(&["s"]);
    let (hub, _) = hub_over(&store);
    let _first = subscribe(&hub, "s").await;
    store.delete("s");
    round(&hub, &store).await;
    let second = subscribe(&hub, "s").await;
    assert_eq!(second.first.event, WatchEvent::Deleted);
}

#[tokio::test]
async fn a_resuming_watcher_of_a_live_topic_gets_a_fresh_read_first() {
    let store = FakeStore::with(&["s"]);
    let (hub, _) = hub_over(&store);
    let mut staying = subscribe(&hub, "s").await;
    store.set("s", "v2");
    let resumed = hub
        .subscribe("s".into(), AWSCURRENT.into(), true)
        .await
        .unwrap();
    assert_eq!(resumed.first.version.version_id, "v2");
    assert_eq!(resumed.first.event, WatchEvent::Rotated);
    assert_eq!(
        latest(&mut staying),
        (WatchEvent::Rotated, "v2".into()),
        "the news reaches the topic's other watchers"
    );
    let plain = subscribe(&hub, "s").await;
    assert_eq!(plain.first.version.version_id, "v2");
}

/// Slow is not down: while the upstream hangs, a watch of a cached secret
/// starts from the cache within `upstream_wait` (1 s here), whether it
/// opens a topic or resumes one; with nothing cached it still waits for
/// the upstream's answer.
#[tokio::test(start_paused = true)]
async fn a_watch_starts_from_the_cache_while_the_upstream_hangs() {
    let store = FakeStore::with(&["s", "t"]);
    let (hub, cache) = hub_over(&store);
    let key = CacheKey::new("s".into(), VersionSelector::current());
    cache.get(key, false).await.unwrap();
    *store.delay.lock().unwrap() = Duration::from_secs(600);

    let started = tokio::time::Instant::now();
    let watcher = subscribe(&hub, "s").await;
    assert!(
        started.elapsed() <= Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(watcher.first.version.version_id, "v1");

    let started = tokio::time::Instant::now();
    let resumed = hub
        .subscribe("s".to_owned(), AWSCURRENT.to_owned(), true)
        .await
        .unwrap();
    assert!(
        started.elapsed() <= Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(resumed.first.version.version_id, "v1");

    // Nothing cached: the upstream's answer is waited for.
    let started = tokio::time::Instant::now();
    let uncached = subscribe(&hub, "t").await;
    assert!(started.elapsed() >= Duration::from_secs(600));
    assert_eq!(uncached.first.version.version_id, "v1");
}

/// Down, not slow: a transient failure starts the watch from the cache; a
/// secret never cached is refused.
#[tokio::test]
async fn a_watch_starts_from_the_cache_while_the_upstream_is_down() {
    let store = FakeStore::with(&["s", "t"]);
    let (hub, cache) = hub_over(&store);
    let key = CacheKey::new("s".into(), VersionSelector::current());
    cache.get(key, false).await.unwrap();
    store.fail_with(Some(StoreError::Unavailable {
        detail: "down".into(),
    }));
    let watcher = subscribe(&hub, "s").await;
    assert_eq!(watcher.first.version.version_id, "v1");
    let refused = hub
        .subscribe("t".to_owned(), AWSCURRENT.to_owned(), false)
        .await
        .err();
    assert!(
        matches!(refused, Some(StoreError::Unavailable { .. })),
        "{refused:?}"
    );
}

/// A few held among many under the prefix: once a listing has shown how
/// long it is, each round describes the held one instead of listing pages,
/// and finds its rotation the next round.
#[tokio::test]
async fn few_held_among_many_are_described_instead_of_listed() {
    let names: Vec<String> = (0..450).map(|i| format!("s{i:03}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let store = FakeStore::with(&refs);
    let (hub, cache) = hub_over(&store);
    let key = CacheKey::new("s100".into(), VersionSelector::current());
    cache.get(key.clone(), false).await.unwrap();
    for _ in 0..5 {
        round(&hub, &store).await;
    }
    assert_eq!(
        store.list_calls(),
        5,
        "one complete listing, a page a round"
    );
    store.set("s100", "v2");
    round(&hub, &store).await;
    assert_eq!(
        (store.list_calls(), store.describe_calls()),
        (5, 1),
        "one call: a description"
    );
    assert_eq!(
        cache.get(key, false).await.unwrap().version.version_id,
        "v2"
    );
}

/// Held secrets deleted all at once are described at most `PER_CALL` a
/// round, and once known deleted, not again at every listing.
#[tokio::test]
async fn secrets_known_deleted_are_not_described_at_every_round() {
    let names: Vec<String> = (0..40).map(|i| format!("d{i:02}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let store = FakeStore::with(&refs);
    let (hub, _) = hub_over(&store);
    let mut watchers = Vec::new();
    for name in &names {
        watchers.push(subscribe(&hub, name).await);
    }
    for name in &names {
        store.remove(name);
    }
    round(&hub, &store).await;
    assert_eq!(store.describe_calls(), 20, "at most PER_CALL a round");
    round(&hub, &store).await;
    assert_eq!(store.describe_calls(), 40);
    for watcher in &mut watchers {
        assert_eq!(latest(watcher).0, WatchEvent::Deleted);
    }
    round(&hub, &store).await;
    round(&hub, &store).await;
    assert_eq!(
        store.describe_calls(),
        40,
        "known deleted: not described again"
    );
}

/// Described one by one, a watched secret known deleted is described again
/// only every tenth round (it may come back), not at every round.
#[tokio::test]
async fn a_known_deletion_is_described_now_and_then_only() {
    let names: Vec<String> = (0..450).map(|i| format!("s{i:03}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let store = FakeStore::with(&refs);
    let (hub, _) = hub_over(&store);
    let mut watcher = subscribe(&hub, "s100").await;
    for _ in 0..5 {
        round(&hub, &store).await;
    }
    store.remove("s100");
    round(&hub, &store).await;
    assert_eq!(latest(&mut watcher).0, WatchEvent::Deleted);
    let described = store.describe_calls();
    for _ in 0..4 {
        round(&hub, &store).await;
    }
    assert_eq!(store.describe_calls(), described, "rounds 7 to 10: none");
    round(&hub, &store).await;
    assert_eq!(store.describe_calls(), described + 1, "round 11: once");
}

/// At its recheck a watched secret known deleted is described, even when
/// the round has one call and another secret described one by one sorts
/// after it (it was passed over at every recheck: never RESTORED).
#[tokio::test]
async fn a_known_deletion_gets_its_recheck_whatever_else_is_described() {
    let names: Vec<String> = (0..450).map(|i| format!("s{i:03}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let store = FakeStore::with(&refs);
    let (hub, _) = hub_over(&store);
    let mut deleted = subscribe(&hub, "s100").await;
    let _live = subscribe(&hub, "s200").await;
    for _ in 0..5 {
        round(&hub, &store).await;
    }
    store.delete("s100");
    for _ in 0..3 {
        round(&hub, &store).await;
    }
    assert_eq!(latest(&mut deleted).0, WatchEvent::Deleted);

    store.set("s100", "v1");
    for _ in 0..sweep::RECHECK_DELETED_EVERY {
        round(&hub, &store).await;
    }
    assert_eq!(latest(&mut deleted).0, WatchEvent::Restored);
}

/// With a one-call budget shared with the listing, a watched secret outside
/// the prefix known deleted still gets its recheck: the listing and the
/// descriptions take turns by round, and the recheck falls on a
/// description's turn.
#[tokio::test]
async fn a_known_deletion_outside_the_prefix_gets_its_recheck_beside_a_listing() {
    let store = FakeStore::with(&["in/a", "out/x"]);
    let (hub, _) = hub_listing(&store, "in/");
    let _inside = subscribe(&hub, "in/a").await;
    let mut outside = subscribe(&hub, "out/x").await;
    store.delete("out/x");
    for _ in 0..3 {
        round(&hub, &store).await;
    }
    assert_eq!(latest(&mut outside).0, WatchEvent::Deleted);

    store.set("out/x", "v1");
    for _ in 0..sweep::RECHECK_DELETED_EVERY {
        round(&hub, &store).await;
    }
    assert_eq!(latest(&mut outside).0, WatchEvent::Restored);
}

#[test]
fn an_arn_missing_on_either_side_leaves_the_version_id_to_say() {
    let tracked = |held_arn: &str| refresh::Tracked {
        key: TopicKey {
            name: "s".to_owned(),
            stage: AWSCURRENT.to_owned(),
        },
        held: vec![(held_arn.to_owned(), "v1".to_owned())],
        cached_stages: None,
        deleted: false,
    };
    let arn = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:s-AbC123";
    let other = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:s-XyZ789";
    assert!(tracked(arn).holds_only(Some(arn), "v1"));
    assert!(
        !tracked(arn).holds_only(Some(other), "v1"),
        "another secret"
    );
    assert!(!tracked(arn).holds_only(Some(arn), "v2"));
    assert!(tracked("").holds_only(Some(arn), "v1"), "no ARN held");
    assert!(tracked(arn).holds_only(Some(""), "v1"), "no ARN told");
    assert!(tracked(arn).holds_only(None, "v1"));
}

/// A name remembered missing is read again once a listing shows it (made,
/// or restored), not when the miss expires: nobody watches it meanwhile.
#[tokio::test(start_paused = true)]
async fn a_secret_the_listing_shows_is_no_longer_remembered_missing() {
    let store = FakeStore::with(&["held"]);
    let (hub, cache) = hub_over(&store);
    let key = |name: &str| CacheKey::new(name.into(), VersionSelector::current());
    cache.get(key("held"), false).await.unwrap();
    cache.get(key("later"), false).await.unwrap_err();
    store.set("later", "v1");
    assert!(
        cache.get(key("later"), false).await.is_err(),
        "remembered missing"
    );
    round(&hub, &store).await;
    let found = cache.get(key("later"), false).await.unwrap();
    assert_eq!(found.version.version_id, "v1");
}

/// An event re-reads every tracked entry of the secret, by name and by ARN
/// alike: each keeps its entry, at the new version (a re-read must not drop
/// another's, as an admin RefreshSecret drops the secret's others).
#[tokio::test(start_paused = true)]
async fn an_event_keeps_every_entry_of_the_secret_at_the_new_version() {
    const ARN: &str = "arn:aws:secretsmanager:us-east-1:111122223333:secret:s-AbCdEf";
    let store = FakeStore::with(&["s"]);
    store
        .answers_instead
        .lock()
        .unwrap()
        .insert(ARN.into(), "s".into());
    let (hub, cache) = hub_over(&store);
    let by_name = CacheKey::new("s".into(), VersionSelector::current());
    let by_arn = CacheKey::new(ARN.into(), VersionSelector::current());
    cache.get(by_name.clone(), false).await.unwrap();
    cache.get(by_arn.clone(), false).await.unwrap();
    store.set("s", "v2");
    hub.refresh_secret(&["s".to_owned()], None).await;
    for key in [by_name, by_arn] {
        let held = cache.entries_where(|k| *k == key);
        assert_eq!(held.len(), 1, "{key:?} kept");
        assert_eq!(held[0].1.version_id, "v2", "{key:?}");
    }
}

/// What is cached by version id is swept too: a version's value never
/// changes, but a rotation moves its stages, and the entry (which answers
/// them) is read again when next asked.
#[tokio::test]
async fn a_version_cached_by_id_is_read_again_once_its_stages_move() {
    let store = FakeStore::with(&["s"]);
    let (hub, cache) = hub_over(&store);
    let by_id = CacheKey::new(
        "s".into(),
        VersionSelector::Id {
            id: "v1".into(),
            stage: None,
        },
    );
    let read = cache.get(by_id.clone(), false).await.unwrap();
    assert_eq!(read.version.version_stages, [AWSCURRENT]);
    round(&hub, &store).await;
    let calls = store.calls();
    cache.get(by_id.clone(), false).await.unwrap();
    assert_eq!(store.calls(), calls, "nothing moved: still cached");

    store.set("s", "v2");
    round(&hub, &store).await;
    cache.get(by_id, false).await.unwrap();
    assert_eq!(store.calls(), calls + 1, "its stages moved: read again");
}

#[tokio::test(start_paused = true)]
async fn a_late_read_that_found_a_newer_version_has_the_secret_read_again() {
    let store = FakeStore::with(&["s"]);
    let (hub, cache) = hub_over(&store);
    let mut watcher = subscribe(&hub, "s").await;
    assert_eq!(latest(&mut watcher), (WatchEvent::Current, "v1".into()));
    cache.clear(&[]);
    // A miss whose request reaches AWS late; a read started after it (an
    // event's, a bypass) answers first, with v1, and is stored.
    *store.delay.lock().unwrap() = Duration::from_secs(2);
    let key = CacheKey::new("s".to_owned(), VersionSelector::current());
    let slow = tokio::spawn({
        let cache = cache.clone();
        let key = key.clone();
        async move { cache.get(key, false).await }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    *store.delay.lock().unwrap() = Duration::ZERO;
    assert_eq!(
        cache
            .get(key.clone(), true)
            .await
            .unwrap()
            .version
            .version_id,
        "v1"
    );
    // The secret rotates; the late read finds v2, after the v1 stored.
    store.set("s", "v2");
    let late = slow.await.unwrap().unwrap();
    assert_eq!(late.version.version_id, "v2");
    // Which of the two AWS holds now is not known: it is asked again,
    // and the cache and the watcher follow the answer.
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        if cache.held_version(&key).as_deref() == Some("v2") {
            break;
        }
    }
    assert_eq!(cache.held_version(&key).as_deref(), Some("v2"));
    assert_eq!(latest(&mut watcher), (WatchEvent::Rotated, "v2".into()));
}
