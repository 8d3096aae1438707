//! The shared cache as a caller sees it.

use secrets_broker_client::proto::GetSecretRequest;

use crate::harness::Running;

#[tokio::test]
async fn the_second_read_is_a_cache_hit() {
    let broker = Running::start(|_| {}).await;
    let mut raw = broker.raw().await;
    let read = |bypass| GetSecretRequest {
        name: "production/jwt".into(),
        bypass_cache: bypass,
        ..Default::default()
    };
    let first = raw.get_secret(read(false)).await.unwrap().into_inner();
    let second = raw.get_secret(read(false)).await.unwrap().into_inner();
    let hit = |response: &secrets_broker_client::proto::GetSecretResponse| {
        response
            .secret
            .as_ref()
            .unwrap()
            .cache
            .as_ref()
            .unwrap()
            .hit
    };
    assert!(!hit(&first) && hit(&second));
    let bypassed = raw.get_secret(read(true)).await.unwrap().into_inner();
    assert!(!hit(&bypassed), "a bypass read asks the store");
    drop(raw);
    broker.stop().await;
}

/// The client crate's cache: tasks that miss the same name at once share
/// one read of the broker (a service starting up would otherwise send one
/// call per task).
#[tokio::test]
async fn a_crowd_missing_one_name_in_the_client_cache_makes_one_call() {
    let broker = Running::start(|args| {
        args.metrics_listen = Some("127.0.0.1:0".into());
    })
    .await;
    let secrets = broker
        .client()
        .await
        .cached(secrets_broker_client::CacheLimits::default());
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let secrets = secrets.clone();
        tasks.spawn(async move { secrets.get("mistral-api-key").await });
    }
    while let Some(done) = tasks.join_next().await {
        let value = done.unwrap().unwrap();
        assert_eq!(value.as_str(), Some("dev-mistral-key-NOT-A-REAL-KEY-0000"));
    }
    let metrics = broker.metrics().await;
    let calls = crate::harness::sample(
        &metrics,
        r#"secretsbroker_calls_total{rpc="GetSecret",code="OK"}"#,
    );
    assert_eq!(calls, Some(1.0), "GetSecret calls");
    broker.stop().await;
}

/// A read of the client cache whose caller gave up still ends: the value
/// is held without another call (a read left half done would be resumed
/// by the next caller, long after).
#[tokio::test]
async fn a_client_cache_read_whose_caller_gave_up_still_ends() {
    use futures::FutureExt;

    let broker = Running::start(|_| {}).await;
    let secrets = broker
        .client()
        .await
        .cached(secrets_broker_client::CacheLimits::default());
    // Polled once, then dropped: the caller went away mid-read.
    assert!(secrets.get("mistral-api-key").now_or_never().is_none());
    crate::harness::eventually(
        std::time::Duration::from_secs(5),
        "the read held",
        || async { secrets.len() == 1 },
    )
    .await;
    broker.stop().await;
}
