//! The event path against the fake store: what each kind of message does
//! to the cache, the watchers and the counters.

use std::{sync::Arc, time::Duration};

use super::*;
use crate::{
    backend::{VersionSelector, fake::FakeStore},
    cache::{Cache, CacheKey},
    watch::{WatchEvent, tests::hub_over},
};

fn label_moved(event_id: &str, name: &str, version: &str) -> String {
    serde_json::json!({
        "id": event_id,
        "source": "aws.secretsmanager",
        "detail-type": "Secret Label Updated",
        "time": "2026-11-30T12:00:00Z",
        "detail": {"name": name, "labelUpdated": "AWSCURRENT", "versionId": version}
    })
    .to_string()
}

fn deleted(name: &str) -> String {
    serde_json::json!({
        "id": "delete-1",
        "source": "aws.secretsmanager",
        "detail-type": "AWS API Call via CloudTrail",
        "detail": {
            "eventSource": "secretsmanager.amazonaws.com",
            "eventName": "DeleteSecret",
            "requestParameters": {"secretId": name}
        }
    })
    .to_string()
}

async fn cached(cache: &Cache, name: &str) -> String {
    let key = CacheKey::new(name.into(), VersionSelector::current());
    cache
        .get(key, false)
        .await
        .unwrap()
        .version
        .version_id
        .clone()
}

fn setup(names: &[&str]) -> (Arc<FakeStore>, WatchHub, Cache, Events) {
    let store = FakeStore::with(names);
    let (hub, cache) = hub_over(&store);
    let events = Events::new(Some(EventSource::Queue("http://sqs.local/q".into())));
    (store, hub, cache, events)
}

#[tokio::test]
async fn an_event_rereads_the_secret_once_and_tells_its_watchers() {
    let (store, hub, cache, events) = setup(&["db"]);
    assert_eq!(cached(&cache, "db").await, "v1");
    let mut watcher = hub
        .subscribe("db".into(), "AWSCURRENT".into(), false)
        .await
        .unwrap();
    store.set("db", "v2");
    let reads = store.calls();

    let first = label_moved("e1", "db", "v2");
    let again = label_moved("e2", "db", "v2");
    events.handle(&hub, &[("m1", &first), ("m2", &again)]).await;

    assert_eq!(
        store.calls(),
        reads + 1,
        "two events of one secret: one read"
    );
    assert_eq!(cached(&cache, "db").await, "v2");
    let state = watcher.changes.borrow_and_update().clone();
    assert_eq!(
        (state.event, state.version.version_id.as_str()),
        (WatchEvent::Rotated, "v2")
    );
    let stats = events.stats();
    assert_eq!((stats.received, stats.applied, stats.ignored), (2, 2, 0));
    assert!(stats.last_lag.is_some());
}

#[tokio::test]
async fn duplicates_foreign_malformed_and_untracked_are_dropped_without_reads() {
    let (store, hub, cache, events) = setup(&["db", "elsewhere"]);
    cached(&cache, "db").await;
    store.set("db", "v2");
    let event = label_moved("e1", "db", "v2");
    events.handle(&hub, &[("m1", &event)]).await;
    let reads = store.calls();

    let foreign = event.replace("aws.secretsmanager", "aws.ec2");
    let untracked = label_moved("e3", "elsewhere", "v9");
    let current = label_moved("e4", "db", "v2");
    let bodies = [
        ("m2", event.as_str()),
        ("m3", foreign.as_str()),
        ("m4", "{not json"),
        ("m5", untracked.as_str()),
        ("m6", current.as_str()),
    ];
    events.handle(&hub, &bodies).await;

    assert_eq!(store.calls(), reads, "none of them reads upstream");
    let stats = events.stats();
    assert_eq!((stats.received, stats.applied, stats.ignored), (6, 1, 5));
    assert_eq!(cached(&cache, "db").await, "v2");
}

#[tokio::test]
async fn a_deletion_event_drops_the_secret_and_tells_watchers() {
    let (store, hub, cache, events) = setup(&["db"]);
    let mut watcher = hub
        .subscribe("db".into(), "AWSCURRENT".into(), false)
        .await
        .unwrap();
    store.delete("db");
    events.handle(&hub, &[("m1", &deleted("db"))]).await;
    assert_eq!(
        watcher.changes.borrow_and_update().event,
        WatchEvent::Deleted
    );
    assert_eq!(cache.stats().total_entries, 0);
    assert_eq!(events.stats().applied, 1);
}

/// AWS failing for a moment as an event lands: the failure is counted,
/// the entry kept, and the secret read again shortly, not left to the
/// sweep while other replicas are current.
#[tokio::test(start_paused = true)]
async fn a_failed_reread_is_counted_and_read_again_shortly() {
    let (store, hub, cache, events) = setup(&["db"]);
    cached(&cache, "db").await;
    store.fail_with(Some(crate::backend::StoreError::Throttled));
    store.set("db", "v2");
    events
        .handle(&hub, &[("m1", &label_moved("e1", "db", "v2"))])
        .await;
    assert_eq!(events.stats().failed, 1);
    store.fail_with(None);
    assert_eq!(cached(&cache, "db").await, "v1", "the entry is kept");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(cached(&cache, "db").await, "v2", "read again");
}

#[test]
fn remembered_ids_are_bounded() {
    let mut ids = RecentIds::default();
    assert!(ids.insert("a"));
    assert!(!ids.insert("a"));
    for i in 0..REMEMBERED_IDS {
        ids.insert(&i.to_string());
    }
    assert!(ids.insert("a"), "the oldest is forgotten");
    assert!(ids.set.len() <= REMEMBERED_IDS);
}

/// AWS may answer a read with the state before a change for a moment
/// after its event: the event's version is read again until it shows.
#[tokio::test(start_paused = true)]
async fn an_event_ahead_of_aws_reads_is_read_again_until_it_shows() {
    let (store, hub, cache, events) = setup(&["db"]);
    assert_eq!(cached(&cache, "db").await, "v1");
    let mut watcher = hub
        .subscribe("db".into(), "AWSCURRENT".into(), false)
        .await
        .unwrap();
    let ahead = label_moved("e1", "db", "v2");
    events.handle(&hub, &[("m1", &ahead)]).await;
    assert_eq!(cached(&cache, "db").await, "v1", "AWS does not show v2 yet");

    store.set("db", "v2");
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(cached(&cache, "db").await, "v2");
    let state = watcher.changes.borrow_and_update().clone();
    assert_eq!(
        (state.event, state.version.version_id.as_str()),
        (WatchEvent::Rotated, "v2")
    );
    let reads = store.calls();
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(store.calls(), reads, "no reads once it showed");
}

/// A name remembered as missing is asked again after an event about it
/// (a CreateSecret), every selector of it.
#[tokio::test]
async fn an_event_about_a_missing_name_forgets_the_miss() {
    let (store, hub, cache, events) = setup(&["db"]);
    let key = CacheKey::new("late".into(), VersionSelector::current());
    assert!(cache.get(key.clone(), false).await.is_err());
    store.set("late", "v1");
    assert!(
        cache.get(key.clone(), false).await.is_err(),
        "remembered as missing"
    );
    let created = serde_json::json!({
        "id": "create-1",
        "source": "aws.secretsmanager",
        "detail-type": "AWS API Call via CloudTrail",
        "detail": {
            "eventSource": "secretsmanager.amazonaws.com",
            "eventName": "CreateSecret",
            "requestParameters": {"name": "late"}
        }
    })
    .to_string();
    events.handle(&hub, &[("m1", &created)]).await;
    assert_eq!(
        cache.get(key, false).await.unwrap().version.version_id,
        "v1"
    );
}

/// A replica's first read of a secret under way when its change event
/// comes: the read may have been answered before the change, and nothing
/// held would be re-read, so what it read is not kept.
#[tokio::test(start_paused = true)]
async fn an_event_during_a_first_read_keeps_that_read_from_being_stored() {
    let (store, hub, cache, events) = setup(&["db"]);
    // Reads take a second, and answer what was current when they began.
    *store.delay.lock().unwrap() = Duration::from_secs(1);
    store
        .answers_as_of_the_start
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let first = tokio::spawn({
        let cache = cache.clone();
        async move { cached(&cache, "db").await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    store.set("db", "v2");
    let event = label_moved("e1", "db", "v2");
    events.handle(&hub, &[("m1", &event)]).await;
    assert_eq!(first.await.unwrap(), "v1", "the read under way answers");
    assert_eq!(cached(&cache, "db").await, "v2", "and is not kept");
}

/// A slow re-read (AWS slow for one secret) holds up its own receive's
/// handling, not the events of the receives after it.
#[tokio::test(start_paused = true)]
async fn a_slow_reread_holds_up_no_later_event() {
    let (store, hub, cache, events) = setup(&["slow", "fast"]);
    assert_eq!(cached(&cache, "slow").await, "v1");
    assert_eq!(cached(&cache, "fast").await, "v1");
    store
        .slow
        .lock()
        .unwrap()
        .insert("slow".into(), Duration::from_secs(10));
    store.set("slow", "v2");
    store.set("fast", "v2");
    let received = |id: &str, body: String| queue::Received {
        id: id.into(),
        body,
        receipt: format!("receipt-{id}"),
    };
    let stop = CancellationToken::new();
    for (id, name) in [("m1", "slow"), ("m2", "fast")] {
        let batch = vec![received(id, label_moved(id, name, "v2"))];
        let receipts = events.take_batch(&hub, batch, &stop).await.unwrap();
        assert_eq!(receipts, [format!("receipt-{id}")], "taken at once");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(cached(&cache, "fast").await, "v2");
    assert_eq!(
        events.stats().applied,
        1,
        "the slow one is still being read"
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(events.stats().applied, 2);
    stop.cancel();
}
