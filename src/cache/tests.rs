//! The cache against a fake store that counts calls and fails on demand.
//! Time is tokio's paused clock, so TTLs are crossed exactly.

use super::*;
use crate::{
    backend::{VersionSelector, fake::FakeStore},
    config::UpstreamLimits,
};

const TTL: Duration = Duration::from_secs(300);
const MAX_STALE: Duration = Duration::from_secs(3600);
const UPSTREAM_WAIT: Duration = Duration::from_secs(1);
const NEGATIVE_TTL: Duration = Duration::from_secs(30);

fn cache_over(store: &Arc<FakeStore>, max_entries: usize) -> Cache {
    Cache::new(
        Arc::clone(store) as Arc<dyn SecretStore>,
        CacheSettings {
            ttl: TTL,
            max_entries,
            max_stale: MAX_STALE,
            upstream_wait: UPSTREAM_WAIT,
            negative_ttl: NEGATIVE_TTL,
            upstream: UpstreamLimits {
                concurrency: 32,
                queue: 1000,
            },
        },
    )
}

/// A caller's deadline at `at`; `callers`: its own, not the call timeout.
fn deadline_at(at: Instant, callers: bool) -> Deadline {
    Deadline { at, callers }
}

fn key(name: &str) -> CacheKey {
    CacheKey::new(name.to_owned(), VersionSelector::current())
}

async fn version_of(cache: &Cache, name: &str) -> String {
    cache
        .get(key(name), false)
        .await
        .unwrap()
        .version
        .version_id
        .clone()
}

#[tokio::test(start_paused = true)]
async fn concurrent_misses_make_one_upstream_call() {
    let store = FakeStore::with(&["s"]);
    *store.delay.lock().unwrap() = Duration::from_millis(50);
    let cache = cache_over(&store, 100);

    let burst = || {
        futures::future::join_all((0..200).map(|_| {
            let cache = cache.clone();
            async move { cache.get(key("s"), false).await.unwrap() }
        }))
    };
    let first = burst().await;
    assert_eq!(store.calls(), 1);
    assert!(first.iter().all(|lookup| lookup.version.version_id == "v1"));
    let stats = cache.stats();
    assert_eq!((stats.misses, stats.coalesced, stats.hits), (1, 199, 0));

    let second = burst().await;
    assert_eq!(
        store.calls(),
        1,
        "a burst within the TTL is served from cache"
    );
    assert!(second.iter().all(|lookup| lookup.hit));
    assert_eq!(cache.stats().hits, 200);
    assert_eq!(cache.stats().upstream_calls, 1);
}

#[tokio::test(start_paused = true)]
async fn values_live_for_the_ttl_and_bypass_refreshes_for_everyone() {
    let store = FakeStore::with(&["s"]);
    let cache = cache_over(&store, 100);
    assert_eq!(version_of(&cache, "s").await, "v1");

    store.set("s", "v2");
    tokio::time::advance(TTL / 2).await;
    assert_eq!(version_of(&cache, "s").await, "v1", "cached within the TTL");

    let bypassed = cache.get(key("s"), true).await.unwrap();
    assert_eq!(bypassed.version.version_id, "v2");
    assert!(!bypassed.hit);
    let after = cache.get(key("s"), false).await.unwrap();
    assert_eq!((after.version.version_id.as_str(), after.hit), ("v2", true));

    store.set("s", "v3");
    tokio::time::advance(TTL).await;
    assert_eq!(version_of(&cache, "s").await, "v3", "re-read after the TTL");
    assert_eq!(store.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn bypass_reads_join_one_that_started_after_they_came() {
    let store = FakeStore::with(&["s"]);
    *store.delay.lock().unwrap() = Duration::from_millis(50);
    let cache = cache_over(&store, 100);

    // A hundred at once (a batch naming one secret a hundred times): the
    // first starts a read; the others came after it started, so they wait
    // for it and share the next.
    let burst = futures::future::join_all((0..100).map(|_| {
        let cache = cache.clone();
        async move { cache.get(key("s"), true).await.unwrap() }
    }))
    .await;
    assert_eq!(store.calls(), 2);
    assert!(burst.iter().all(|lookup| !lookup.hit));

    // One that comes while another's read is under way is not given that
    // read's answer: it may predate a change the caller just made.
    let first = tokio::spawn({
        let cache = cache.clone();
        async move { cache.get(key("s"), true).await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    let second = cache.get(key("s"), true).await.unwrap();
    first.await.unwrap();
    assert_eq!(store.calls(), 4, "the second read its own");
    assert!(!second.hit);
    assert_eq!(
        cache.shared.bypass_inflight.len(),
        0,
        "finished reads leave the registry"
    );
}

#[tokio::test(start_paused = true)]
async fn transient_failures_serve_stale_within_the_bound() {
    let store = FakeStore::with(&["s", "never-read"]);
    let cache = cache_over(&store, 100);
    version_of(&cache, "s").await;

    store.fail_with(Some(StoreError::Unavailable {
        detail: "connection refused".into(),
    }));
    tokio::time::advance(TTL + Duration::from_secs(1)).await;
    let stale = cache.get(key("s"), false).await.unwrap();
    assert!(stale.stale && stale.hit);
    assert_eq!(stale.version.version_id, "v1");
    assert_eq!(cache.stats().stale_served, 1);

    let uncached = cache.get(key("never-read"), false).await;
    assert!(matches!(uncached, Err(StoreError::Unavailable { .. })));

    tokio::time::advance(MAX_STALE).await;
    let too_old = cache.get(key("s"), false).await;
    assert!(matches!(too_old, Err(StoreError::Unavailable { .. })));

    store.fail_with(None);
    let back = cache.get(key("s"), false).await.unwrap();
    assert!(!back.stale && !back.hit);
}

#[tokio::test(start_paused = true)]
async fn throttling_is_transient_too() {
    let store = FakeStore::with(&["s"]);
    let cache = cache_over(&store, 100);
    version_of(&cache, "s").await;
    store.fail_with(Some(StoreError::Throttled));
    let stale = cache.get(key("s"), true).await.unwrap();
    assert!(
        stale.stale,
        "a bypass read that fails transiently is marked stale"
    );
    assert_eq!(cache.stats().upstream_errors, 1);
}

#[tokio::test(start_paused = true)]
async fn definite_answers_are_never_hidden_and_drop_the_entry() {
    for failure in [
        StoreError::NotFound { name: "s".into() },
        StoreError::Deleted { name: "s".into() },
        StoreError::AccessDenied {
            name: "s".into(),
            detail: "IAM".into(),
        },
    ] {
        let store = FakeStore::with(&["s"]);
        let cache = cache_over(&store, 100);
        version_of(&cache, "s").await;
        store.fail_with(Some(failure.clone()));
        tokio::time::advance(TTL).await;
        assert_eq!(cache.get(key("s"), false).await.unwrap_err(), failure);
        assert_eq!(cache.stats().total_entries, 0);
    }
}

#[tokio::test(start_paused = true)]
async fn an_entry_read_since_the_last_pass_stays_when_room_is_needed() {
    let store = FakeStore::with(&["a", "b", "c"]);
    let cache = cache_over(&store, 2);
    version_of(&cache, "a").await;
    tokio::time::advance(Duration::from_millis(10)).await;
    version_of(&cache, "b").await;
    tokio::time::advance(Duration::from_millis(10)).await;
    version_of(&cache, "a").await; // a is read again, b is not
    tokio::time::advance(Duration::from_millis(10)).await;
    version_of(&cache, "c").await;

    let stats = cache.stats();
    assert_eq!((stats.total_entries, stats.evictions), (2, 1));
    let calls = store.calls();
    version_of(&cache, "a").await;
    assert_eq!(store.calls(), calls, "a stayed cached");
    version_of(&cache, "b").await;
    assert_eq!(store.calls(), calls + 1, "b was evicted");
}

#[tokio::test(start_paused = true)]
async fn a_hit_near_expiry_refreshes_in_the_background() {
    let store = FakeStore::with(&["s"]);
    let cache = cache_over(&store, 100);
    version_of(&cache, "s").await;
    store.set("s", "v2");

    tokio::time::advance(TTL - TTL / 20).await;
    let near_expiry = cache.get(key("s"), false).await.unwrap();
    assert!(near_expiry.hit);
    assert_eq!(
        near_expiry.version.version_id, "v1",
        "the caller does not wait"
    );
    // Let the background refresh run.
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(store.calls(), 2);

    tokio::time::advance(TTL / 10).await;
    let renewed = cache.get(key("s"), false).await.unwrap();
    assert_eq!(
        (renewed.version.version_id.as_str(), renewed.hit),
        ("v2", true),
        "past the first TTL the renewed entry is served without a wait"
    );
    assert_eq!(store.calls(), 2, "one refresh, not one per hit");
}

#[tokio::test(start_paused = true)]
async fn clear_drops_named_entries_or_all() {
    let store = FakeStore::with(&["a", "b", "c"]);
    let cache = cache_over(&store, 100);
    for name in ["a", "b", "c"] {
        version_of(&cache, name).await;
    }
    assert_eq!(cache.clear(&["a".into(), "zzz".into()]), 1);
    assert_eq!(cache.stats().total_entries, 2);
    assert_eq!(cache.clear(&[]), 2);
    assert_eq!(cache.stats().total_entries, 0);
}

#[tokio::test(start_paused = true)]
async fn refresh_reports_whether_the_version_changed() {
    let store = FakeStore::with(&["s"]);
    let cache = cache_over(&store, 100);
    version_of(&cache, "s").await;
    let (_, changed) = cache.refresh(key("s"), None).await.unwrap();
    assert!(!changed);
    store.set("s", "v2");
    let (version, changed) = cache.refresh(key("s"), None).await.unwrap();
    assert!(changed);
    assert_eq!(version.version_id, "v2");
    assert_eq!(version_of(&cache, "s").await, "v2");
}

#[tokio::test(start_paused = true)]
async fn stats_split_valid_and_expired_entries() {
    let store = FakeStore::with(&["a", "b"]);
    let cache = cache_over(&store, 100);
    version_of(&cache, "a").await;
    tokio::time::advance(TTL).await;
    version_of(&cache, "b").await;
    let stats = cache.stats();
    assert_eq!(
        (
            stats.total_entries,
            stats.valid_entries,
            stats.expired_entries
        ),
        (2, 1, 1)
    );
    assert_eq!(stats.hit_ratio(), 0.0);
    version_of(&cache, "b").await;
    assert!((cache.stats().hit_ratio() - 1.0 / 3.0).abs() < 1e-9);
}

#[tokio::test(start_paused = true)]
async fn an_expired_entry_is_revalidated_without_reading_the_value() {
    let store = FakeStore::with(&["s"]);
    let cache = cache_over(&store, 100);
    version_of(&cache, "s").await;

    tokio::time::advance(TTL).await;
    let renewed = cache.get(key("s"), false).await.unwrap();
    assert_eq!(renewed.version.version_id, "v1");
    assert_eq!(
        (store.calls(), store.describe_calls()),
        (1, 1),
        "DescribeSecret only"
    );
    let hit = cache.get(key("s"), false).await.unwrap();
    assert!(hit.hit, "the renewed entry serves a full TTL again");

    store.set("s", "v2");
    tokio::time::advance(TTL).await;
    assert_eq!(
        version_of(&cache, "s").await,
        "v2",
        "a moved stage reads the value"
    );
    assert_eq!((store.calls(), store.describe_calls()), (2, 2));
}

#[tokio::test(start_paused = true)]
async fn a_renewal_does_not_take_a_new_secret_of_the_name_for_the_one_held() {
    let store = FakeStore::with(&[]);
    store.create_again("s", "v1");
    let cache = cache_over(&store, 100);
    let before = cache.get(key("s"), false).await.unwrap().version;

    // The same version id, under the ARN of a secret created again.
    store.create_again("s", "v1");
    tokio::time::advance(TTL).await;
    let renewed = cache.get(key("s"), false).await.unwrap().version;
    assert_ne!(renewed.arn, before.arn, "the value was read again");
    assert_ne!(renewed.value, before.value);
    assert_eq!(store.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn bypass_and_refused_describe_read_the_value() {
    let store = FakeStore::with(&["s"]);
    let cache = cache_over(&store, 100);
    version_of(&cache, "s").await;
    cache.get(key("s"), true).await.unwrap();
    assert_eq!(
        (store.calls(), store.describe_calls()),
        (2, 0),
        "bypass reads the value"
    );

    *store.describe_failure.lock().unwrap() = Some(StoreError::AccessDenied {
        name: "s".into(),
        detail: "DescribeSecret is not allowed".into(),
    });
    tokio::time::advance(TTL).await;
    assert_eq!(version_of(&cache, "s").await, "v1");
    assert_eq!(
        (store.calls(), store.describe_calls()),
        (3, 1),
        "without DescribeSecret rights, the value is read"
    );
}

#[tokio::test(start_paused = true)]
async fn a_describe_failing_on_its_own_does_not_stop_a_renewal() {
    for failure in [
        StoreError::Throttled,
        StoreError::Unavailable {
            detail: "AWS answered InternalServiceError".into(),
        },
    ] {
        let store = FakeStore::with(&["s"]);
        let cache = cache_over(&store, 100);
        version_of(&cache, "s").await;
        *store.describe_failure.lock().unwrap() = Some(failure.clone());
        store.set("s", "v2");
        tokio::time::advance(TTL).await;
        let renewed = cache.get(key("s"), false).await.unwrap();
        assert_eq!(
            (renewed.version.version_id.as_str(), renewed.stale),
            ("v2", false),
            "{failure:?}: GetSecretValue still answers"
        );
        assert_eq!((store.calls(), store.describe_calls()), (2, 1));
    }
}

#[tokio::test(start_paused = true)]
async fn a_deleted_secret_is_not_revalidated_into_the_cache() {
    let store = FakeStore::with(&["s"]);
    let cache = cache_over(&store, 100);
    version_of(&cache, "s").await;
    store.delete("s");
    tokio::time::advance(TTL).await;
    let refused = cache.get(key("s"), false).await.unwrap_err();
    assert!(matches!(refused, StoreError::Deleted { .. }), "{refused:?}");
}

#[tokio::test(start_paused = true)]
async fn an_answer_for_another_secret_is_refused_and_not_cached() {
    let store = FakeStore::with(&["insurecove/shared/x", "insurecove/production/database"]);
    store.answers_instead.lock().unwrap().insert(
        "insurecove/shared/x".into(),
        "insurecove/production/database".into(),
    );
    let cache = cache_over(&store, 100);
    let error = cache
        .get(key("insurecove/shared/x"), false)
        .await
        .unwrap_err();
    assert_eq!(
        error,
        StoreError::Mismatch {
            asked: "insurecove/shared/x".into(),
            answered: "insurecove/production/database".into(),
        }
    );
    assert_eq!(cache.stats().total_entries, 0, "nothing cached");
    assert!(cache.get(key("insurecove/shared/x"), false).await.is_err());
    assert_eq!(store.calls(), 2, "not served from the cache either");
}

/// What the upstream answered is not vetted: the caller's error shows it
/// escaped, on one line, and cut.
#[tokio::test(start_paused = true)]
async fn another_secrets_name_is_shown_escaped_and_cut() {
    let forged = format!("x\nINFO audit: forged{}", "y".repeat(200));
    let store = FakeStore::with(&["s", &forged]);
    store
        .answers_instead
        .lock()
        .unwrap()
        .insert("s".into(), forged.clone());
    let cache = cache_over(&store, 100);
    let error = cache.get(key("s"), false).await.unwrap_err().to_string();
    assert!(!error.contains('\n'), "{error}");
    assert!(error.contains(r#""x\nINFO audit: forged"#), "{error}");
    assert!(error.len() < 250, "cut: {error}");
}

#[tokio::test(start_paused = true)]
async fn a_hung_upstream_costs_the_first_caller_upstream_wait_and_the_rest_nothing() {
    let store = FakeStore::with(&["s"]);
    let cache = cache_over(&store, 100);
    version_of(&cache, "s").await;
    tokio::time::advance(TTL + Duration::from_secs(1)).await;
    *store.delay.lock().unwrap() = Duration::from_secs(20);

    let started = Instant::now();
    let first = cache.get(key("s"), false).await.unwrap();
    assert!(first.stale && first.hit);
    assert_eq!(started.elapsed(), UPSTREAM_WAIT, "bounded by upstream-wait");
    assert!(cache.stats().backoff_active, "an overdue renewal backs off");

    for _ in 0..100 {
        let started = Instant::now();
        let again = cache.get(key("s"), false).await.unwrap();
        assert!(again.stale);
        assert_eq!(
            started.elapsed(),
            Duration::ZERO,
            "no wait while backed off"
        );
    }
    // A caller whose own deadline is nearer than upstream-wait.
    tokio::time::advance(Duration::from_secs(40)).await;
    *store.delay.lock().unwrap() = Duration::ZERO;
    // The hung renewal has answered by now: the backoff is over and the
    // entry fresh again.
    let fresh = cache.get(key("s"), false).await.unwrap();
    assert!(!fresh.stale, "{fresh:?}");
    assert!(!cache.stats().backoff_active);
}

#[tokio::test(start_paused = true)]
async fn the_wait_ends_before_the_callers_deadline() {
    let store = FakeStore::with(&["s"]);
    let cache = cache_over(&store, 100);
    version_of(&cache, "s").await;
    tokio::time::advance(TTL + Duration::from_secs(1)).await;
    *store.delay.lock().unwrap() = Duration::from_secs(20);
    let started = Instant::now();
    let deadline = deadline_at(started + Duration::from_millis(500), false);
    let stale = cache
        .get_until(key("s"), false, Some(deadline))
        .await
        .unwrap();
    assert!(stale.stale);
    assert!(started.elapsed() < Duration::from_millis(500));
}

#[tokio::test(start_paused = true)]
async fn a_miss_or_bypass_with_a_hung_upstream_is_answered_before_the_callers_deadline() {
    let store = FakeStore::with(&["s", "t", "u"]);
    let cache = cache_over(&store, 100);
    *store.delay.lock().unwrap() = Duration::from_secs(20);
    for bypass in [false, true] {
        let started = Instant::now();
        let deadline = deadline_at(started + Duration::from_secs(10), true);
        let refused = cache
            .get_until(key("s"), bypass, Some(deadline))
            .await
            .unwrap_err();
        assert!(
            matches!(&refused, StoreError::Unavailable { detail } if detail.contains("deadline")),
            "bypass {bypass}: {refused:?}"
        );
        // A fortieth of 10 s: past what a client's rounding of its
        // grpc-timeout adds (grpcio sends 10 s as 10.1 s).
        assert_eq!(started.elapsed(), Duration::from_millis(9750));
    }
    // The first read went on and filled the cache: once it answers, the
    // value is there without a new upstream call.
    tokio::time::advance(Duration::from_secs(20)).await;
    let started = Instant::now();
    assert!(cache.get_until(key("s"), false, None).await.is_ok());
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(store.calls(), 2, "no new read");
    // Bound only by the broker's call timeout (whose own answer says why,
    // CALL_TIMEOUT, at the gate), or by nothing, the read is waited for.
    let started = Instant::now();
    let call_timeout = deadline_at(started + Duration::from_secs(10), false);
    assert!(
        cache
            .get_until(key("t"), false, Some(call_timeout))
            .await
            .is_ok()
    );
    assert_eq!(started.elapsed(), Duration::from_secs(20));
    // A short deadline still leaves nine tenths of it to AWS.
    *store.delay.lock().unwrap() = Duration::from_millis(30);
    let started = Instant::now();
    let short = deadline_at(started + Duration::from_millis(100), true);
    assert!(cache.get_until(key("u"), false, Some(short)).await.is_ok());
    assert_eq!(started.elapsed(), Duration::from_millis(30));
}

#[tokio::test(start_paused = true)]
async fn a_bypass_read_of_a_held_value_with_a_hung_upstream_gets_it_before_the_call_timeout() {
    let store = FakeStore::with(&["s"]);
    let cache = cache_over(&store, 100);
    version_of(&cache, "s").await;
    *store.delay.lock().unwrap() = Duration::from_secs(20);
    // Bound by the broker's call timeout alone (no grpc-timeout), as by a
    // caller's own deadline: the held value, stale, in time.
    for callers in [false, true] {
        let started = Instant::now();
        let deadline = deadline_at(started + Duration::from_secs(5), callers);
        let lookup = cache
            .get_until(key("s"), true, Some(deadline))
            .await
            .unwrap_or_else(|e| panic!("callers {callers}: {e:?}"));
        assert!(lookup.stale, "callers {callers}");
        assert_eq!(started.elapsed(), Duration::from_millis(4875));
    }
}

#[tokio::test(start_paused = true)]
async fn transient_failures_back_off_and_one_probe_asks_again() {
    let store = FakeStore::with(&["a", "b"]);
    let cache = cache_over(&store, 100);
    version_of(&cache, "a").await;
    version_of(&cache, "b").await;
    tokio::time::advance(TTL + Duration::from_secs(1)).await;
    store.fail_with(Some(StoreError::Unavailable {
        detail: "down".into(),
    }));
    assert!(cache.get(key("a"), false).await.unwrap().stale);
    let calls = store.calls() + store.describe_calls();
    assert!(cache.get(key("b"), false).await.unwrap().stale);
    assert_eq!(
        store.calls() + store.describe_calls(),
        calls,
        "backed off: b is served stale without asking"
    );
    store.fail_with(None);
    tokio::time::advance(Duration::from_secs(31)).await;
    // The backoff is over: the next caller probes, and it works.
    assert!(!cache.get(key("b"), false).await.unwrap().stale);
    assert!(!cache.stats().backoff_active);
}

#[tokio::test(start_paused = true)]
async fn not_found_is_remembered_until_a_bypass_read() {
    let store = FakeStore::with(&[]);
    let cache = cache_over(&store, 100);
    for _ in 0..2 {
        assert!(matches!(
            cache.get(key("missing"), false).await,
            Err(StoreError::NotFound { .. })
        ));
    }
    assert_eq!(store.calls(), 1, "the second ask is answered from memory");
    assert_eq!(cache.stats().negative_hits, 1);
    store.set("missing", "v1");
    assert!(
        cache.get(key("missing"), false).await.is_err(),
        "within the TTL"
    );
    assert_eq!(version_of_bypass(&cache, "missing").await, "v1");
    assert_eq!(version_of(&cache, "missing").await, "v1");
    assert_eq!(cache.stats().negative_entries, 0);
    tokio::time::advance(NEGATIVE_TTL).await;
}

/// A secret marked for deletion is remembered as such too: callers asking
/// again do not each reach AWS.
#[tokio::test(start_paused = true)]
async fn a_deletion_is_remembered_like_a_miss() {
    let store = FakeStore::with(&["gone"]);
    store.delete("gone");
    let cache = cache_over(&store, 100);
    for _ in 0..5 {
        assert!(matches!(
            cache.get(key("gone"), false).await,
            Err(StoreError::Deleted { .. })
        ));
    }
    assert_eq!(store.calls(), 1, "asked once");
}

#[tokio::test(start_paused = true)]
async fn remembered_misses_expire() {
    let store = FakeStore::with(&[]);
    let cache = cache_over(&store, 100);
    assert!(cache.get(key("later"), false).await.is_err());
    store.set("later", "v1");
    tokio::time::advance(NEGATIVE_TTL).await;
    assert_eq!(version_of(&cache, "later").await, "v1");
}

async fn version_of_bypass(cache: &Cache, name: &str) -> String {
    cache
        .get(key(name), true)
        .await
        .unwrap()
        .version
        .version_id
        .clone()
}

/// The key of a read of `name`'s version `id`, asked with AWSCURRENT.
fn pinned_to_current(name: &str, id: &str) -> CacheKey {
    CacheKey::new(
        name.into(),
        VersionSelector::Id {
            id: id.into(),
            stage: Some("AWSCURRENT".into()),
        },
    )
}

/// A plain read that finds the current stage moved forgets what was cached
/// by version id (its answer tells stages that are no longer true).
#[tokio::test(start_paused = true)]
async fn a_moved_stage_forgets_the_by_id_entries() {
    let store = FakeStore::with(&["s"]);
    let cache = cache_over(&store, 100);
    version_of(&cache, "s").await;
    let by_id = pinned_to_current("s", "v1");
    cache.get(by_id.clone(), false).await.unwrap();
    store.set("s", "v2");
    tokio::time::advance(TTL).await;
    assert_eq!(version_of(&cache, "s").await, "v2");
    assert!(
        cache.entries_where(|key| *key == by_id).is_empty(),
        "the by-id entry is forgotten"
    );
}

/// The key of a read of `name`'s AWSPREVIOUS.
fn previous_of(name: &str) -> CacheKey {
    CacheKey::new(name.into(), VersionSelector::Stage("AWSPREVIOUS".into()))
}

/// A read that finds the current version moved (here one that bypasses
/// the cache) forgets what was cached by another stage: a rotation moved
/// AWSPREVIOUS too, and a client told of the rotation reads it at once.
#[tokio::test(start_paused = true)]
async fn a_moved_current_version_forgets_the_other_stages() {
    let store = FakeStore::with(&["s"]);
    let cache = cache_over(&store, 100);
    version_of(&cache, "s").await;
    let previous = previous_of("s");
    cache.get(previous.clone(), false).await.unwrap();
    store.set("s", "v2");
    let bypassed = cache.get(key("s"), true).await.unwrap();
    assert_eq!(bypassed.version.version_id, "v2");
    assert!(
        cache.entries_where(|cached| *cached == previous).is_empty(),
        "the AWSPREVIOUS entry is forgotten"
    );
    assert_eq!(cache.entries_where(|cached| *cached == key("s")).len(), 1);
}

/// A read of AWSPREVIOUS answered before the rotation and ending after it
/// does not put the version from before it back.
#[tokio::test(start_paused = true)]
async fn a_stage_read_straddling_a_rotation_stores_nothing() {
    let store = FakeStore::with(&["s"]);
    let cache = cache_over(&store, 100);
    version_of(&cache, "s").await;
    let previous = previous_of("s");
    store
        .answers_as_of_the_start
        .store(true, std::sync::atomic::Ordering::SeqCst);
    *store.delay.lock().unwrap() = Duration::from_secs(3);
    let slow = read_under_way(&cache, previous.clone(), false).await;
    store.set("s", "v2");
    *store.delay.lock().unwrap() = Duration::ZERO;
    cache.get(key("s"), true).await.unwrap();
    slow.await.unwrap().unwrap();
    assert!(
        cache.entries_where(|cached| *cached == previous).is_empty(),
        "the read from before the rotation is not kept"
    );
}

/// A read of `key` that has started (its fetch is under way) when this
/// returns.
async fn read_under_way(
    cache: &Cache,
    key: CacheKey,
    bypass: bool,
) -> tokio::task::JoinHandle<Result<Lookup, StoreError>> {
    let read = tokio::spawn({
        let cache = cache.clone();
        async move { cache.get(key, bypass).await }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    read
}

/// A miss of `s` whose answer (v1) is on its way while `s` rotates to v2;
/// later reads answer at once.
async fn a_miss_answered_before_a_rotation(
    store: &Arc<FakeStore>,
    cache: &Cache,
) -> tokio::task::JoinHandle<Result<Lookup, StoreError>> {
    store
        .answers_as_of_the_start
        .store(true, std::sync::atomic::Ordering::SeqCst);
    *store.delay.lock().unwrap() = Duration::from_secs(3);
    let slow = read_under_way(cache, key("s"), false).await;
    store.set("s", "v2");
    *store.delay.lock().unwrap() = Duration::ZERO;
    slow
}

#[tokio::test(start_paused = true)]
async fn a_read_under_way_at_a_clear_neither_stores_nor_is_joined_after_it() {
    for named in [false, true] {
        let store = FakeStore::with(&["s"]);
        let cache = cache_over(&store, 100);
        let slow = a_miss_answered_before_a_rotation(&store, &cache).await;
        // A caller is told of v2, then the cache is cleared.
        let bypass = cache.get(key("s"), true).await.unwrap();
        assert_eq!(bypass.version.version_id, "v2");
        let names = if named { vec!["s".to_owned()] } else { vec![] };
        cache.clear(&names);
        // A read after the clear does not join the read from before it.
        assert_eq!(version_of(&cache, "s").await, "v2", "named {named}");
        // That read's own caller gets what it read; it is not stored.
        let late = slow.await.unwrap().unwrap();
        assert_eq!(late.version.version_id, "v1");
        assert_eq!(version_of(&cache, "s").await, "v2", "named {named}");
        let held: Vec<_> = cache
            .entries_where(|_| true)
            .into_iter()
            .map(|(_, version)| version.version_id.clone())
            .collect();
        assert_eq!(held, ["v2"], "named {named}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_read_a_clear_overtook_is_still_news_and_its_failure_changes_nothing() {
    let store = FakeStore::with(&["s"]);
    let cache = cache_over(&store, 100);
    let heard = Arc::new(std::sync::Mutex::new(Vec::new()));
    let hears = Arc::clone(&heard);
    assert!(cache.set_change_listener(Box::new(move |_, version, _| {
        hears.lock().unwrap().push(version.version_id.clone());
    })));
    let gone = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let goes = Arc::clone(&gone);
    assert!(cache.set_gone_listener(Box::new(move |_, _| {
        goes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    })));
    version_of(&cache, "s").await;
    heard.lock().unwrap().clear();

    // A read under way at a clear finds v2: not kept, but told.
    *store.delay.lock().unwrap() = Duration::from_secs(3);
    let slow = read_under_way(&cache, key("s"), true).await;
    cache.clear(&[]);
    store.set("s", "v2");
    assert_eq!(slow.await.unwrap().unwrap().version.version_id, "v2");
    assert!(cache.entries_where(|_| true).is_empty());
    assert_eq!(*heard.lock().unwrap(), ["v2"]);

    // A read under way at a clear that fails (AWS answered "deleted"
    // before a restore), after a newer read stored the restored version:
    // its callers get the failure, the cache and the watchers nothing.
    store
        .answers_as_of_the_start
        .store(true, std::sync::atomic::Ordering::SeqCst);
    store.delete("s");
    let slow = read_under_way(&cache, key("s"), true).await;
    store.set("s", "v3");
    cache.clear(&["s".to_owned()]);
    *store.delay.lock().unwrap() = Duration::ZERO;
    assert_eq!(version_of(&cache, "s").await, "v3");
    assert!(slow.await.unwrap().is_err());
    assert_eq!(gone.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert_eq!(version_of(&cache, "s").await, "v3");
    assert_eq!(cache.stats().negative_entries, 0);
}

#[tokio::test(start_paused = true)]
async fn a_read_older_than_an_evicted_value_does_not_store_it_back() {
    let store = FakeStore::with(&["s", "t"]);
    let cache = cache_over(&store, 1);
    let slow = a_miss_answered_before_a_rotation(&store, &cache).await;
    assert_eq!(
        cache.get(key("s"), true).await.unwrap().version.version_id,
        "v2"
    );
    // Another secret read: the cache holds one entry, and s's goes.
    version_of(&cache, "t").await;
    assert_eq!(slow.await.unwrap().unwrap().version.version_id, "v1");
    // The late answer did not take the empty slot.
    assert_eq!(version_of(&cache, "s").await, "v2");
}

#[tokio::test(start_paused = true)]
async fn a_read_that_ends_after_its_secret_was_found_deleted_does_not_put_it_back() {
    let store = FakeStore::with(&["s"]);
    let cache = cache_over(&store, 100);
    let heard = Arc::new(std::sync::Mutex::new(Vec::new()));
    let hears = Arc::clone(&heard);
    assert!(cache.set_change_listener(Box::new(move |key, version, _| {
        hears
            .lock()
            .unwrap()
            .push((key.name.clone(), version.version_id.clone()));
    })));
    version_of(&cache, "s").await;
    heard.lock().unwrap().clear();

    // A bypass read AWS answers before the deletion, delivered after it.
    *store.delay.lock().unwrap() = Duration::from_millis(50);
    let late = read_under_way(&cache, key("s"), true).await;
    // Found deleted meanwhile (by the sweep or an event); the fake's
    // answer, still the value, stands for the one AWS gave before.
    cache.remove_deleted(&key("s"));
    late.await.unwrap().expect("its caller gets what was read");

    assert!(
        cache.entries_where(|_| true).is_empty(),
        "the deleted secret's value came back"
    );
    assert!(heard.lock().unwrap().is_empty(), "and was announced");

    // A read that starts after the deletion is stored as usual.
    *store.delay.lock().unwrap() = Duration::ZERO;
    store.set("s", "v2");
    assert_eq!(version_of(&cache, "s").await, "v2");
    assert_eq!(cache.entries_where(|_| true).len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_deletion_holds_back_late_reads_of_every_key_of_the_secret() {
    let store = FakeStore::with(&["s"]);
    let cache = cache_over(&store, 100);
    version_of(&cache, "s").await;
    // A read by version id, not cached, on its way when the secret is
    // found deleted.
    let by_id = CacheKey::by_version_id("s", "v1");
    *store.delay.lock().unwrap() = Duration::from_millis(50);
    let late = read_under_way(&cache, by_id.clone(), false).await;
    cache.remove_deleted_where(|id| id == "s");
    late.await.unwrap().expect("its caller gets what was read");
    assert!(
        cache.entries_where(|_| true).is_empty(),
        "a late read of another key of the deleted secret was stored"
    );
    // A stage found gone says nothing of the secret's other keys: a read
    // of AWSCURRENT under way then is stored.
    store.set("s", "v2");
    let current = read_under_way(&cache, key("s"), true).await;
    cache.remove_deleted(&CacheKey::new(
        "s".into(),
        VersionSelector::Stage("AWSPENDING".into()),
    ));
    current.await.unwrap().unwrap();
    let held = cache.entries_where(|_| true);
    assert_eq!(held.len(), 1);
    assert_eq!(
        (&held[0].0, held[0].1.version_id.as_str()),
        (&key("s"), "v2")
    );
}

/// DescribeSecret needs neither the read permission nor the KMS key: a
/// value renewed by it alone is read with GetSecretValue again within
/// `VALUE_READ_EVERY`, so that a revoked read or a disabled key ends
/// serving it.
#[tokio::test(start_paused = true)]
async fn a_value_renewed_by_describe_alone_is_read_again_within_the_hour() {
    let store = FakeStore::with(&["s"]);
    let cache = cache_over(&store, 100);
    version_of(&cache, "s").await;
    let mut elapsed = Duration::ZERO;
    while elapsed + TTL < super::fetch::VALUE_READ_EVERY {
        tokio::time::advance(TTL).await;
        elapsed += TTL;
        cache.get(key("s"), false).await.unwrap();
    }
    assert!(store.describe_calls() > 10, "renewed many times");
    assert_eq!(store.calls(), 1, "within the hour, by DescribeSecret alone");
    tokio::time::advance(TTL).await;
    cache.get(key("s"), false).await.unwrap();
    assert_eq!(store.calls(), 2, "past it, GetSecretValue is asked again");
}

/// The secret `s` as an ARN names it; the fake answers it as `s`.
fn arn_of_s(store: &FakeStore) -> CacheKey {
    const ARN: &str = "arn:aws:secretsmanager:us-east-1:111122223333:secret:s-AbCdEf";
    store
        .answers_instead
        .lock()
        .unwrap()
        .insert(ARN.into(), "s".into());
    CacheKey::new(ARN.into(), VersionSelector::current())
}

/// ClearCache names a secret; what was read by its ARN is the same
/// secret's value, and goes too.
#[tokio::test(start_paused = true)]
async fn a_clear_by_name_drops_what_was_read_by_the_secrets_arn() {
    let store = FakeStore::with(&["s", "t"]);
    let cache = cache_over(&store, 100);
    let by_arn = arn_of_s(&store);
    cache.get(by_arn.clone(), false).await.unwrap();
    version_of(&cache, "s").await;
    version_of(&cache, "t").await;
    assert_eq!(cache.clear(&["s".into()]), 2);
    assert!(cache.entries_where(|key| *key == by_arn).is_empty());
    assert_eq!(
        cache.stats().total_entries,
        1,
        "another secret's entry stays"
    );
}

/// A RefreshSecret that finds the read revoked ends every entry of the
/// secret (its ARN's too: renewed by DescribeSecret, it would be served
/// for up to an hour); one that fails transiently leaves them to be
/// served stale.
#[tokio::test(start_paused = true)]
async fn a_refresh_that_finds_the_read_revoked_ends_every_entry_of_the_secret() {
    let store = FakeStore::with(&["s"]);
    let cache = cache_over(&store, 100);
    let by_arn = arn_of_s(&store);
    cache.get(by_arn.clone(), false).await.unwrap();
    version_of(&cache, "s").await;

    *store.value_failure.lock().unwrap() = Some(StoreError::Unavailable {
        detail: "503".into(),
    });
    cache.refresh_the_secret(key("s"), None).await.unwrap_err();
    assert!(cache.get(by_arn.clone(), false).await.unwrap().hit);

    let denied = StoreError::AccessDenied {
        name: "s".into(),
        detail: "IAM".into(),
    };
    *store.value_failure.lock().unwrap() = Some(denied.clone());
    assert_eq!(
        cache.refresh_the_secret(key("s"), None).await.unwrap_err(),
        denied
    );
    assert_eq!(cache.stats().total_entries, 0);
    assert_eq!(cache.get(by_arn, false).await.unwrap_err(), denied);
}

/// A version asked with a stage is answered only while it carries it:
/// the stage's entry, first stored after a rotation (nothing older to
/// compare with), still drops the pinned entry of the version before.
#[tokio::test(start_paused = true)]
async fn a_stage_first_stored_after_a_rotation_drops_the_version_pinned_with_it() {
    let store = FakeStore::with(&["s"]);
    let cache = cache_over(&store, 100);
    let pinned = pinned_to_current("s", "v1");
    cache.get(pinned.clone(), false).await.unwrap();
    store.set("s", "v2");
    assert_eq!(version_of(&cache, "s").await, "v2");
    assert!(
        cache.entries_where(|key| *key == pinned).is_empty(),
        "v1 no longer carries AWSCURRENT"
    );
}

/// An event (or a listing) that says the secret changed drops what was
/// read by version id even when no stage of it is cached: those entries
/// tell stages that may have moved.
#[tokio::test(start_paused = true)]
async fn forgetting_version_ids_drops_only_that_secrets() {
    let store = FakeStore::with(&["s", "t"]);
    let cache = cache_over(&store, 100);
    let by_id = |name: &str| CacheKey::by_version_id(name, "v1");
    cache.get(by_id("s"), false).await.unwrap();
    cache.get(by_id("t"), false).await.unwrap();
    cache.forget_version_ids("s");
    assert!(cache.entries_where(|key| *key == by_id("s")).is_empty());
    assert_eq!(cache.entries_where(|key| *key == by_id("t")).len(), 1);
}

/// The margin before a caller's deadline outgrows what clients add when
/// they round their grpc-timeout up (to 10 ms below 10 s, 100 ms below
/// 100 s, the second past that), and leaves most of a short deadline to AWS.
#[test]
fn the_answer_margin_outgrows_the_rounding_of_grpc_timeout() {
    let ms = Duration::from_millis;
    for (left, rounding) in [
        (ms(1_000), ms(10)),
        (ms(9_990), ms(10)),
        (ms(10_100), ms(100)),
        (ms(30_100), ms(100)),
        (ms(99_900), ms(100)),
        (ms(101_000), ms(1_000)),
        (ms(900_000), ms(1_000)),
    ] {
        assert!(
            answer_margin(left) >= rounding * 2,
            "{left:?}: {:?}",
            answer_margin(left)
        );
    }
    assert_eq!(answer_margin(ms(100)), ms(10));
    assert_eq!(answer_margin(ms(2_000)), ms(100));
}
