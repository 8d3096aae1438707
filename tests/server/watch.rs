//! Watch streams over the file backend: edits of the file are rotations,
//! a broken file changes nothing, and a missing secret is NOT_FOUND at once.

use std::time::{Duration, Instant};

use secrets_broker_client::proto::{
    WatchEventType, WatchSecretRequest, WatchSecretResponse,
    secrets_service_client::SecretsServiceClient,
};
use tonic::{Code, Streaming};
use tonic_types::StatusExt;

use crate::harness::{Running, get, process_log, reason, replace_file, stats, value};

/// A broker on the secrets file at `path`, its sweep (a minute) out of the
/// way: what a watcher hears comes from the file's edits.
async fn on_the_file(path: &std::path::Path) -> Running {
    let file = path.to_string_lossy().into_owned();
    Running::start(move |args| {
        args.dev = false;
        args.secrets_file = Some(file);
        args.watch_interval = Some("60".into());
    })
    .await
}

/// The secrets file with `file-watched` at `versions` (id, value) and one
/// other secret.
fn secrets_file(versions: &[(&str, &str)]) -> String {
    let versions: Vec<_> = versions
        .iter()
        .map(|(id, value)| serde_json::json!({"version_id": id, "value": value}))
        .collect();
    serde_json::json!({"secrets": [
        {"name": "file-watched", "versions": versions},
        {"name": "file-other", "versions": [{"value": "other-value"}]},
    ]})
    .to_string()
}

/// The next event within `bound`: (type, version id, value).
async fn next_event(
    stream: &mut Streaming<WatchSecretResponse>,
    bound: Duration,
) -> (WatchEventType, String, String) {
    let event = tokio::time::timeout(bound, stream.message())
        .await
        .expect("an event in time")
        .expect("an open stream")
        .expect("an event");
    let secret = event.secret.as_ref().expect("a secret");
    assert_eq!(secret.name, "insurecove/file-watched");
    (
        event.r#type(),
        secret.version_id.clone(),
        value(secret).to_owned(),
    )
}

async fn nothing_within(stream: &mut Streaming<WatchSecretResponse>, quiet: Duration) {
    if let Ok(event) = tokio::time::timeout(quiet, stream.message()).await {
        panic!("an event where none was due: {event:?}");
    }
}

#[tokio::test]
async fn edits_of_the_secrets_file_reach_a_watcher_and_a_broken_file_changes_nothing() {
    let log = process_log();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("secrets.json");
    std::fs::write(&path, secrets_file(&[("fv1", "file-v1-a5e0")])).unwrap();
    let broker = on_the_file(&path).await;
    let mut raw = broker.raw().await;
    let request = WatchSecretRequest {
        name: "file-watched".into(),
        ..Default::default()
    };
    let mut stream = raw.watch_secret(request).await.unwrap().into_inner();
    let bound = Duration::from_secs(2);
    let current = (WatchEventType::Current, "fv1".into(), "file-v1-a5e0".into());
    assert_eq!(next_event(&mut stream, bound).await, current);

    // Edited in place.
    std::fs::write(
        &path,
        secrets_file(&[("fv1", "file-v1-a5e0"), ("fv2", "file-v2-a5e0")]),
    )
    .unwrap();
    let rotated = (WatchEventType::Rotated, "fv2".into(), "file-v2-a5e0".into());
    assert_eq!(next_event(&mut stream, bound).await, rotated);
    let read = get(&mut raw, "file-watched").await.unwrap();
    assert_eq!(
        (read.version_id.as_str(), value(&read)),
        ("fv2", "file-v2-a5e0")
    );

    // A broken file: no event; the last good content is served, cached or not.
    let file_name = path.to_string_lossy().into_owned();
    let warned = || {
        log.text()
            .lines()
            .filter(|line| line.contains("secrets file not reloaded") && line.contains(&file_name))
            .count()
    };
    let before = warned();
    replace_file(
        &path,
        r#"{"secrets": [ {"name": "file-watched", "versions": [ {"value": "#,
    );
    let started = Instant::now();
    while warned() == before {
        assert!(
            started.elapsed() < bound,
            "no warning about the broken file"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    nothing_within(&mut stream, Duration::from_secs(1)).await;
    for bypass_cache in [false, true] {
        let mut request = crate::harness::read("file-watched");
        request.bypass_cache = bypass_cache;
        let read = raw
            .get_secret(request)
            .await
            .unwrap()
            .into_inner()
            .secret
            .unwrap();
        assert_eq!(
            (read.version_id.as_str(), value(&read)),
            ("fv2", "file-v2-a5e0")
        );
    }

    // Valid again: events resume.
    replace_file(
        &path,
        &secrets_file(&[("fv2", "file-v2-a5e0"), ("fv3", "file-v3-a5e0")]),
    );
    let rotated = (WatchEventType::Rotated, "fv3".into(), "file-v3-a5e0".into());
    assert_eq!(next_event(&mut stream, bound).await, rotated);
    nothing_within(&mut stream, Duration::from_millis(500)).await;
    drop((stream, raw));
    broker.stop().await;
}

/// The status a watch is refused with, at its opening or as its first
/// message.
async fn refusal_of(
    channel: &tonic::transport::Channel,
    request: WatchSecretRequest,
) -> tonic::Status {
    match SecretsServiceClient::new(channel.clone())
        .watch_secret(request)
        .await
    {
        Ok(stream) => stream.into_inner().message().await.unwrap_err(),
        Err(status) => status,
    }
}

/// A name read while missing is remembered so for the negative TTL (30 s);
/// an edit of the file that adds it is news at once.
#[tokio::test]
async fn a_secret_added_to_the_file_is_read_at_once_though_it_was_missing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("secrets.json");
    std::fs::write(&path, secrets_file(&[("fv1", "file-v1-a5e0")])).unwrap();
    let broker = on_the_file(&path).await;
    let mut raw = broker.raw().await;
    let missing = get(&mut raw, "file-added").await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let with_it = serde_json::json!({"secrets": [
        {"name": "file-watched", "versions": [{"version_id": "fv1", "value": "file-v1-a5e0"}]},
        {"name": "file-added", "versions": [{"value": "added-value-3d1f"}]},
    ]});
    replace_file(&path, &with_it.to_string());
    let started = Instant::now();
    loop {
        match get(&mut raw, "file-added").await {
            Ok(secret) => {
                assert_eq!(value(&secret), "added-value-3d1f");
                break;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::NotFound, "{status:?}");
                assert!(
                    started.elapsed() < Duration::from_secs(5),
                    "still NOT_FOUND 5 s after the file gained it"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    broker.stop().await;
}

#[tokio::test]
async fn a_watch_of_a_missing_secret_is_not_found_at_once() {
    let broker = Running::start(|_| {}).await;
    let channel = broker.channel().await;
    let started = Instant::now();
    let request = WatchSecretRequest {
        name: "watch-no-such-secret".into(),
        ..Default::default()
    };
    let status = refusal_of(&channel, request).await;
    assert_eq!(
        (status.code(), reason(&status).as_str()),
        (Code::NotFound, "SECRET_NOT_FOUND")
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // A stage the secret does not have is named, as GetSecret names it.
    let request = WatchSecretRequest {
        name: "mistral-api-key".into(),
        version_stage: "NOPE".into(),
        ..Default::default()
    };
    let status = refusal_of(&channel, request).await;
    let field = status
        .get_details_error_info()
        .and_then(|info| info.metadata.get("field").cloned());
    assert_eq!(
        (status.code(), field.as_deref()),
        (Code::NotFound, Some("version_stage")),
        "{status:?}"
    );
    assert!(status.message().contains("NOPE"), "{status:?}");
    let stats = stats(channel).await.unwrap();
    assert_eq!((stats.watchers, stats.watched_secrets), (0, 0));
    broker.stop().await;
}

#[tokio::test]
async fn a_secret_marked_for_deletion_is_watched_until_it_is_restored() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("secrets.json");
    let file = |deleted: bool| {
        serde_json::json!({"secrets": [{
            "name": "file-watched",
            "deleted": deleted,
            "versions": [{"version_id": "fv1", "value": "file-v1-a5e0"}],
        }]})
        .to_string()
    };
    std::fs::write(&path, file(true)).unwrap();
    let broker = on_the_file(&path).await;
    let mut raw = broker.raw().await;
    let bound = Duration::from_secs(2);
    // A new watch, and one resuming (as after a restart of the broker).
    let mut streams = Vec::new();
    for since_version_id in ["", "fv1"] {
        let request = WatchSecretRequest {
            name: "file-watched".into(),
            since_version_id: since_version_id.into(),
            ..Default::default()
        };
        let mut stream = raw.watch_secret(request).await.unwrap().into_inner();
        let first = tokio::time::timeout(bound, stream.message())
            .await
            .expect("an event in time")
            .expect("an open stream, not NOT_FOUND")
            .expect("an event");
        let secret = first.secret.as_ref().expect("a secret");
        assert_eq!(
            (first.r#type(), secret.name.as_str(), secret.value.is_none()),
            (WatchEventType::Deleted, "insurecove/file-watched", true)
        );
        streams.push(stream);
    }
    let read = raw.get_secret(crate::harness::read("file-watched")).await;
    assert_eq!(reason(&read.unwrap_err()), "SECRET_DELETED");

    replace_file(&path, &file(false));
    let restored = (
        WatchEventType::Restored,
        "fv1".into(),
        "file-v1-a5e0".into(),
    );
    for stream in &mut streams {
        assert_eq!(next_event(stream, bound).await, restored);
    }
    drop((streams, raw));
    broker.stop().await;
}

/// A client crate watch that ends with an error keeps that error as its
/// last failure (not an earlier, retried one, nor none).
#[tokio::test]
async fn a_client_watch_ended_by_an_error_keeps_it_as_its_last_failure() {
    use futures::StreamExt;

    let broker = Running::start(|_| {}).await;
    let client = broker.client().await;
    let mut watch = client.watch_secret("no-such-secret");
    let ended = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("an answer in time")
        .expect("an item");
    let Err(error) = ended else {
        panic!("an event for a secret that does not exist: {ended:?}");
    };
    assert!(
        matches!(error, secrets_broker_client::Error::NotFound { .. }),
        "{error:?}"
    );
    let kept = watch.last_failure().expect("the error is kept");
    assert_eq!(kept.to_string(), error.to_string());
    broker.stop().await;
}
