//! A clean stop: when the run returns, nothing of the broker is left.

use std::time::Duration;

use crate::harness::{Running, headers_only};
use tonic_types::StatusExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_run_the_port_is_free_and_no_task_is_left() {
    let tasks_before = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    let broker = Running::start(|_| {}).await;
    let addr = broker.addr;
    let client = broker.client().await;
    assert_eq!(
        client.get_secret("mistral-api-key").await.unwrap().name(),
        "insurecove/mistral-api-key"
    );
    drop(client);
    broker.stop().await;
    std::net::TcpListener::bind(addr).expect("the port can be bound again at once");
    // Tasks end asynchronously after being aborted; give them a moment.
    let mut alive = usize::MAX;
    for _ in 0..50 {
        alive = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();
        if alive <= tasks_before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        alive <= tasks_before,
        "{alive} tasks alive after the run, {tasks_before} before"
    );
}

#[tokio::test]
async fn a_stream_still_waiting_for_its_request_does_not_hold_the_shutdown() {
    let broker = Running::start(|args| args.shutdown_grace = Some("20".into())).await;
    let mut connection = broker.h2().await;
    let (response, _body) = headers_only(
        &mut connection,
        "/secretsbroker.v1.SecretsService/GetSecret",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let started = std::time::Instant::now();
    broker.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the stop waited {:?} for a request that never came",
        started.elapsed()
    );
    let answer = tokio::time::timeout(Duration::from_secs(2), response)
        .await
        .expect("an answer")
        .unwrap();
    let status = answer
        .headers()
        .get("grpc-status")
        .map(|value| value.to_str().unwrap().to_owned());
    assert_eq!(status.as_deref(), Some("14"), "{:?}", answer.headers());
}

#[tokio::test]
async fn health_watches_say_not_serving_then_end_so_they_do_not_hold_the_shutdown() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let broker = Running::start(|args| args.shutdown_grace = Some("20".into())).await;
    let mut health = HealthClient::new(broker.channel().await);
    let mut watches = Vec::new();
    for service in ["", "secretsbroker.v1.SecretsService"] {
        let request = HealthCheckRequest {
            service: service.into(),
        };
        let mut watch = health.watch(request).await.unwrap().into_inner();
        let first = watch.message().await.unwrap().expect("a first status");
        assert_eq!(first.status, ServingStatus::Serving as i32, "{service:?}");
        watches.push((service, watch));
    }

    let started = std::time::Instant::now();
    let stopped = tokio::spawn(broker.stop());
    for (service, mut watch) in watches {
        let said = within(watch.message()).await.unwrap();
        assert_eq!(
            said.map(|s| s.status),
            Some(ServingStatus::NotServing as i32),
            "{service:?}"
        );
        let ended = within(watch.message()).await.unwrap_err();
        // The broker's own ending, with its reason, as every refusal of its.
        let reason = ended.get_details_error_info().map(|info| info.reason);
        assert_eq!(
            (ended.code(), reason.as_deref()),
            (tonic::Code::Unavailable, Some("SHUTTING_DOWN")),
            "{service:?}: {ended:?}"
        );
    }
    tokio::time::timeout(Duration::from_secs(3), stopped)
        .await
        .expect("the stop does not wait for health watches")
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(3));
}

async fn within<T>(what: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(3), what)
        .await
        .expect("the watch moves on when the broker stops")
}

#[tokio::test]
async fn an_open_reflection_stream_ends_at_the_stop() {
    let broker = Running::start(|args| args.shutdown_grace = Some("20".into())).await;
    let mut connection = broker.h2().await;
    let (response, mut request) = headers_only(
        &mut connection,
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    )
    .await;
    // ServerReflectionRequest { list_services: "" }, and the stream kept open.
    let list_services = bytes::Bytes::from_static(&[0, 0, 0, 0, 2, 0x3a, 0]);
    request.send_data(list_services, false).unwrap();
    let mut answer = within(response).await.unwrap().into_body();
    let services = within(answer.data()).await.expect("the list").unwrap();
    assert!(
        String::from_utf8_lossy(&services).contains("secretsbroker.v1.SecretsService"),
        "{services:?}"
    );

    let started = std::time::Instant::now();
    let stopped = tokio::spawn(broker.stop());
    assert!(within(answer.data()).await.is_none(), "no more messages");
    let trailers = within(answer.trailers()).await.unwrap().expect("trailers");
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.to_str().unwrap()),
        Some("14"),
        "{trailers:?}"
    );
    within(stopped).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the stop waited {:?} for the reflection stream",
        started.elapsed()
    );
}

#[tokio::test]
async fn an_open_watch_ends_at_the_stop_with_a_reason_to_branch_on() {
    use secrets_broker::proto::WatchSecretRequest;
    use tonic_types::StatusExt;

    let broker = Running::start(|args| args.shutdown_grace = Some("20".into())).await;
    let mut raw = broker.raw().await;
    let request = WatchSecretRequest {
        name: "mistral-api-key".into(),
        ..Default::default()
    };
    let mut stream = raw.watch_secret(request).await.unwrap().into_inner();
    within(stream.message())
        .await
        .unwrap()
        .expect("the current version first");

    let stopped = tokio::spawn(broker.stop());
    let ended = within(stream.message())
        .await
        .expect_err("the stream ends with a status");
    assert_eq!(ended.code(), tonic::Code::Unavailable, "{ended:?}");
    assert!(ended.message().contains("since_version_id"), "{ended:?}");
    let info = ended.get_details_error_info().expect("an ErrorInfo");
    assert_eq!(info.reason, "SHUTTING_DOWN");
    within(stopped).await.unwrap();
}
