//! The transport's limits: the largest request, calls in flight on one
//! connection, and open connections. Each refusal is immediate and names
//! what was refused; nothing else on the broker notices.

use std::time::{Duration, Instant};

use secrets_broker_client::proto::{WatchEventType, WatchSecretRequest};
use tonic::Code;

use crate::harness::{Running, Secrets, eventually, get, reason, sample, value};

const MISTRAL: &str = "dev-mistral-key-NOT-A-REAL-KEY-0000";

#[tokio::test]
async fn a_request_over_the_message_size_is_resource_exhausted() {
    let broker = Running::start(|args| args.max_message_size = Some("1024".into())).await;
    let mut raw = broker.raw().await;
    let over = get(&mut raw, &"a".repeat(2000)).await.unwrap_err();
    assert_eq!(over.code(), Code::ResourceExhausted, "{over:?}");
    // Under the limit the same kind of request reaches the handler (a name
    // too long for AWS).
    let under = get(&mut raw, &"a".repeat(900)).await.unwrap_err();
    assert_eq!(
        (under.code(), reason(&under).as_str()),
        (Code::InvalidArgument, "INVALID_SECRET_NAME")
    );
    assert_eq!(
        value(&get(&mut raw, "mistral-api-key").await.unwrap()),
        MISTRAL
    );
    drop(raw);
    broker.stop().await;
}

#[tokio::test]
async fn calls_past_the_per_connection_limit_are_refused_at_once() {
    let broker = Running::start(|args| {
        args.max_concurrent_calls_per_connection = Some("4".into());
    })
    .await;
    let mut raw = broker.raw().await;
    let mut watches = Vec::new();
    for _ in 0..4 {
        let request = WatchSecretRequest {
            name: "mistral-api-key".into(),
            ..Default::default()
        };
        let mut stream = raw.watch_secret(request).await.unwrap().into_inner();
        let first = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .expect("the first event in time")
            .unwrap()
            .expect("an event");
        assert_eq!(first.r#type(), WatchEventType::Current);
        watches.push(stream);
    }

    let started = Instant::now();
    let fifth = get(&mut raw, "mistral-api-key").await.unwrap_err();
    assert_eq!(fifth.code(), Code::ResourceExhausted, "{fifth:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused after {:?}, not at once",
        started.elapsed()
    );
    // The four streams are untouched, and another connection is not limited.
    for stream in &mut watches {
        let next = tokio::time::timeout(Duration::from_millis(200), stream.message()).await;
        assert!(next.is_err(), "a watch stream was disturbed: {next:?}");
    }
    let mut other = broker.raw().await;
    assert_eq!(
        value(&get(&mut other, "mistral-api-key").await.unwrap()),
        MISTRAL
    );

    // Closed streams give their places back (the server sees the resets a
    // moment later), and then four calls at once are all served.
    drop(watches);
    eventually(
        Duration::from_secs(3),
        "a call after the streams closed",
        || {
            let mut raw = raw.clone();
            async move {
                match get(&mut raw, "mistral-api-key").await {
                    Ok(_) => true,
                    Err(status) if status.code() == Code::ResourceExhausted => false,
                    Err(status) => panic!("{status:?}"),
                }
            }
        },
    )
    .await;
    let calls = (0..4).map(|_| {
        let mut raw = raw.clone();
        async move { get(&mut raw, "mistral-api-key").await }
    });
    for answer in futures::future::join_all(calls).await {
        assert_eq!(value(&answer.unwrap()), MISTRAL);
    }
    drop((raw, other));
    broker.stop().await;
}

#[tokio::test]
async fn connections_past_the_limit_are_closed_and_counted() {
    let broker = Running::start(|args| {
        args.max_connections = Some("2".into());
        args.metrics_listen = Some("127.0.0.1:0".into());
    })
    .await;
    let mut first = broker.raw().await;
    let mut second = broker.raw().await;
    for raw in [&mut first, &mut second] {
        assert_eq!(value(&get(raw, "mistral-api-key").await.unwrap()), MISTRAL);
    }

    let third = third_connection(&broker).await;
    assert!(third.is_err(), "a third connection was served");
    let refused = sample(
        &broker.metrics().await,
        "secretsbroker_connections_refused_total",
    );
    assert!(
        refused >= Some(1.0),
        "connections_refused_total: {refused:?}"
    );
    for raw in [&mut first, &mut second] {
        assert_eq!(value(&get(raw, "mistral-api-key").await.unwrap()), MISTRAL);
    }

    // A connection closed frees its place.
    drop(first);
    eventually(
        Duration::from_secs(3),
        "a connection after one closed",
        || async { third_connection(&broker).await.is_ok() },
    )
    .await;
    assert_eq!(
        value(&get(&mut second, "mistral-api-key").await.unwrap()),
        MISTRAL
    );
    drop(second);
    broker.stop().await;
}

/// A read on a new connection. The broker closes a connection past the
/// limit at once, before HTTP/2 starts: the client sees no connection, or
/// (depending on when it notices) UNAVAILABLE, CANCELLED or UNKNOWN from
/// its transport; never an answer of the broker's (an `ErrorInfo`).
async fn third_connection(broker: &Running) -> Result<(), tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", broker.addr))
        .unwrap()
        .connect()
        .await
        .map_err(|error| tonic::Status::unavailable(error.to_string()))?;
    let mut raw: Secrets = Secrets::new(channel);
    match get(&mut raw, "mistral-api-key").await {
        Err(status) if !reason(&status).is_empty() => {
            panic!("a refused connection answered {status:?}")
        }
        answer => answer.map(drop),
    }
}
