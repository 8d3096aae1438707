//! The transport's limits: the largest request, calls in flight on one
//! connection, and open connections. Each refusal is immediate and names
//! what was refused; nothing else on the broker notices.

use std::time::{Duration, Instant};

use secrets_broker_client::proto::{
    WatchEventType, WatchSecretRequest, WatchSecretResponse,
    secrets_service_client::SecretsServiceClient,
};
use tonic::Code;

use crate::harness::{
    Running, Secrets, answer_headers, eventually, get, headers_only, reason, sample, value,
};

const MISTRAL: &str = "dev-mistral-key-NOT-A-REAL-KEY-0000";

#[tokio::test]
async fn a_request_over_the_message_size_is_resource_exhausted() {
    let broker = Running::start(|args| args.max_message_size = Some("1024".into())).await;
    let mut raw = broker.raw().await;
    let over = get(&mut raw, &"a".repeat(2000)).await.unwrap_err();
    assert_eq!(
        (over.code(), reason(&over).as_str()),
        (Code::ResourceExhausted, "MESSAGE_TOO_LARGE"),
        "{over:?}"
    );
    assert!(over.message().contains("--max-message-size"), "{over:?}");
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
async fn health_and_reflection_take_the_same_message_limit() {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest,
    };

    let broker = Running::start(|args| args.max_message_size = Some("1024".into())).await;
    let over = HealthClient::new(broker.channel().await)
        .check(HealthCheckRequest {
            service: "a".repeat(2000),
        })
        .await
        .unwrap_err();
    assert_eq!(over.code(), Code::ResourceExhausted, "{over:?}");

    let ask = |symbol: String| async {
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(symbol)),
        };
        let channel = broker.channel().await;
        ServerReflectionClient::new(channel)
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .unwrap()
            .into_inner()
            .message()
            .await
    };
    // tonic's reflection ends its stream OK when a request cannot be read;
    // the broker says why. Under the limit the same question is answered
    // (with "not found").
    let over = ask("a".repeat(2000)).await.unwrap_err();
    assert_eq!(
        (over.code(), reason(&over).as_str()),
        (Code::ResourceExhausted, "MESSAGE_TOO_LARGE"),
        "{over:?}"
    );
    let under = ask("a".repeat(500)).await.unwrap_err();
    assert_eq!(under.code(), Code::NotFound, "{under:?}");
    // A whole exchange, ended by the caller's half-close, ends OK.
    let listed = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = ServerReflectionClient::new(broker.channel().await)
        .server_reflection_info(tokio_stream::iter([listed]))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(answers.message().await, Ok(Some(_))));
    let end = answers.message().await;
    assert!(matches!(end, Ok(None)), "{end:?}");
    broker.stop().await;
}

#[tokio::test]
async fn a_reflection_stream_ends_at_the_call_timeout() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest,
    };

    let broker = Running::start(|args| args.call_timeout = Some("1".into())).await;
    // One question, then the stream stays open, as a caller that never
    // finishes would keep it.
    let (questions, asked) = tokio::sync::mpsc::channel(1);
    questions
        .send(ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        })
        .await
        .unwrap();
    let mut stream = ServerReflectionClient::new(broker.channel().await)
        .server_reflection_info(tokio_stream::wrappers::ReceiverStream::new(asked))
        .await
        .unwrap()
        .into_inner();
    let listed = stream.message().await.unwrap().expect("an answer");
    assert!(format!("{listed:?}").contains("secretsbroker.v1.SecretsService"));

    let started = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("the stream ended by the call timeout")
        .unwrap_err();
    assert_eq!(
        (ended.code(), reason(&ended).as_str()),
        (Code::DeadlineExceeded, "CALL_TIMEOUT")
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    drop(questions);
    broker.stop().await;
}

/// Opens a GetSecret stream on `connection` and sends the gRPC header of a
/// `declared`-byte message and `sent` bytes of it, leaving the rest unsent.
async fn unfinished_get(
    connection: &mut h2::client::SendRequest<bytes::Bytes>,
    declared: usize,
    sent: usize,
) -> (h2::client::ResponseFuture, h2::SendStream<bytes::Bytes>) {
    unfinished_call(
        connection,
        "/secretsbroker.v1.SecretsService/GetSecret",
        declared,
        sent,
    )
    .await
}

/// `unfinished_get` for the method at `path`.
async fn unfinished_call(
    connection: &mut h2::client::SendRequest<bytes::Bytes>,
    path: &str,
    declared: usize,
    sent: usize,
) -> (h2::client::ResponseFuture, h2::SendStream<bytes::Bytes>) {
    let (response, mut body) = headers_only(connection, path).await;
    // GetSecretRequest{name: "aaa..."}: field 1, a 2-byte length.
    let mut message = vec![0];
    message.extend_from_slice(&(declared as u32).to_be_bytes());
    message.extend_from_slice(&[
        0x0a,
        0x80 | ((declared - 3) & 0x7f) as u8,
        ((declared - 3) >> 7) as u8,
    ]);
    message.resize(5 + sent, b'a');
    body.send_data(message.into(), false).unwrap();
    (response, body)
}

/// The grpc-status and reason of an answer (trailers-only, or trailers).
async fn grpc_answer(response: h2::client::ResponseFuture) -> (String, String) {
    let headers = answer_headers(response).await;
    // grpc-message is percent-encoded; spaces are all these tests read.
    let field = |name: &str| {
        headers
            .get(name)
            .map(|value| value.to_str().unwrap().replace("%20", " "))
            .unwrap_or_default()
    };
    (field("grpc-status"), field("grpc-message"))
}

#[tokio::test]
async fn unfinished_requests_share_one_memory_budget() {
    let broker = Running::start(|args| {
        args.max_message_size = Some("1024".into());
        args.max_request_memory = Some("2048".into());
    })
    .await;
    let mut connection = broker.h2().await;

    // Two messages of 1000 bytes, 600 of each sent: each holds the 1005
    // bytes it declares (tonic reserves them on reading the header).
    let mut open = Vec::new();
    for _ in 0..2 {
        open.push(unfinished_get(&mut connection, 1000, 600).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A third would pass the budget: refused at once, and named.
    let (third, _body) = unfinished_get(&mut connection, 1000, 10).await;
    let (status, message) = grpc_answer(third).await;
    assert_eq!(status, "8", "{status} {message}");
    assert!(message.contains("request memory"), "{message}");
    // A request sent whole holds nothing: other calls go on.
    let mut raw = broker.raw().await;
    assert_eq!(
        value(&get(&mut raw, "mistral-api-key").await.unwrap()),
        MISTRAL
    );

    // The unfinished calls end (their connection goes): the budget is back,
    // and a request sent in two parts is read whole.
    drop(open);
    drop(connection);
    let connection = broker.h2().await;
    eventually(Duration::from_secs(5), "the budget given back", || {
        let mut connection = connection.clone();
        async move {
            let (response, mut body) = unfinished_get(&mut connection, 1000, 800).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            body.send_data(vec![b'a'; 200].into(), true).unwrap();
            let (status, message) = grpc_answer(response).await;
            // The name is too long for AWS: the handler read it whole.
            status == "3" && message.contains("name")
        }
    })
    .await;
    broker.stop().await;
}

#[tokio::test]
async fn a_reflection_stream_gives_its_request_budget_back_at_the_call_timeout() {
    let broker = Running::start(|args| {
        args.max_message_size = Some("1024".into());
        args.max_request_memory = Some("2048".into());
        args.call_timeout = Some("1".into());
    })
    .await;
    let mut connection = broker.h2().await;
    // Two reflection requests left unfinished hold the whole budget; their
    // streams stay open on the caller's side.
    let reflection = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";
    let mut open = Vec::new();
    for _ in 0..2 {
        open.push(unfinished_call(&mut connection, reflection, 1000, 600).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (refused, _body) = unfinished_get(&mut connection, 1000, 10).await;
    assert_eq!(grpc_answer(refused).await.0, "8");
    // Past the call timeout both sides of each stream end, and the budget
    // is back.
    eventually(Duration::from_secs(5), "the budget given back", || {
        let mut connection = connection.clone();
        async move {
            let (response, mut body) = unfinished_get(&mut connection, 1000, 800).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = body.send_data(vec![b'a'; 200].into(), true);
            grpc_answer(response).await.0 == "3"
        }
    })
    .await;
    drop(open);
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
async fn calls_still_waiting_for_their_request_give_their_slots_to_callers() {
    let broker = Running::start(|args| {
        args.max_concurrent_calls = Some("4".into());
    })
    .await;
    let mut connection = broker.h2().await;
    // Every slot of the broker held by streams that never finish their
    // request: the oldest sends a whole message but never ends its request
    // (tonic would wait for the end before any handler runs); the others
    // send headers alone, to any service.
    let mut silent = vec![unfinished_get(&mut connection, 20, 20).await];
    let paths = [
        "/grpc.health.v1.Health/Check",
        "/secretsbroker.v1.SecretsService/WatchSecret",
        "/grpc.health.v1.Health/Watch",
    ];
    for path in paths {
        tokio::time::sleep(Duration::from_millis(20)).await;
        silent.push(headers_only(&mut connection, path).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    // A caller on another connection is served: it takes the slot of the
    // stream waiting longest, which is told why at once.
    let mut raw = broker.raw().await;
    assert_eq!(
        value(&get(&mut raw, "mistral-api-key").await.unwrap()),
        MISTRAL
    );
    let (oldest, _body) = silent.remove(0);
    let (status, message) = grpc_answer(oldest).await;
    assert_eq!(status, "8", "{message}");
    assert!(message.contains("request had not arrived"), "{message}");

    // Watches take at most half the slots (two of four): a third is
    // refused and says why, and reads are still served.
    drop(silent);
    drop(connection);
    let (watches, refused) = watches_then_one_more(&mut raw, 2).await;
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("watch streams open as it allows (2"),
        "{refused:?}"
    );
    assert_eq!(
        value(&get(&mut raw, "mistral-api-key").await.unwrap()),
        MISTRAL
    );

    // Calls under way keep their slots: with a reflection stream (its
    // request came; it lasts until the call timeout) and a health watch
    // open as well, and no stream left waiting, a new call is refused, and
    // says why.
    let reflection = (
        open_reflection(&broker).await,
        open_health_watch(&broker).await,
    );
    let refused = get(&mut raw, "mistral-api-key").await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("as many calls in flight as it allows (4)"),
        "{refused:?}"
    );
    drop((watches, reflection));
    broker.stop().await;
}

/// Watches take a place in their share only once their request has come:
/// streams that send headers alone cannot lock real watches out. Health's
/// Watch has a share of its own (an eighth), so that it cannot lock out
/// WatchSecret either, and reads go on past both.
#[tokio::test]
async fn watches_take_their_share_only_with_their_request() {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let broker = Running::start(|args| {
        args.max_concurrent_calls = Some("16".into());
    })
    .await;
    // Shares of 16 slots: 8 watches, 2 health watches.
    let mut connection = broker.h2().await;
    let mut silent = Vec::new();
    for path in [
        "/secretsbroker.v1.SecretsService/WatchSecret",
        "/grpc.health.v1.Health/Watch",
    ] {
        for _ in 0..2 {
            silent.push(headers_only(&mut connection, path).await);
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut raw = broker.raw().await;
    let (watches, refused) = watches_then_one_more(&mut raw, 8).await;
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("as many watch streams open as it allows (8, half"),
        "{refused:?}"
    );

    let health_watch = || async {
        let request = HealthCheckRequest {
            service: String::new(),
        };
        let mut health = HealthClient::new(broker.channel().await);
        let mut stream = health.watch(request).await?.into_inner();
        stream.message().await?;
        Ok::<_, tonic::Status>(stream)
    };
    let kept = [health_watch().await.unwrap(), health_watch().await.unwrap()];
    let refused = health_watch().await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("health watch streams open as it allows (2, an eighth"),
        "{refused:?}"
    );
    assert_eq!(
        value(&get(&mut raw, "mistral-api-key").await.unwrap()),
        MISTRAL
    );
    drop((watches, kept, silent, connection));
    broker.stop().await;
}

/// Server reflection needs no grant, and its stream lasts until the call
/// timeout: without a share of its own, callers with no grant (or no
/// certificate) could hold every call slot with reflection streams, opened
/// again as each one ends, and no read would be served.
#[tokio::test]
async fn reflection_streams_take_a_sixteenth_of_the_slots_at_most() {
    let broker = Running::start(|args| {
        args.max_concurrent_calls = Some("32".into());
    })
    .await;
    // A sixteenth of 32 slots: two reflection streams.
    let kept = [
        open_reflection(&broker).await,
        open_reflection(&broker).await,
    ];
    let refused = refused_reflection(&broker).await;
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("reflection streams open as it allows (2, a sixteenth"),
        "{refused:?}"
    );
    let mut raw = broker.raw().await;
    assert_eq!(
        value(&get(&mut raw, "mistral-api-key").await.unwrap()),
        MISTRAL
    );
    // A place is given back with its stream.
    drop(kept);
    eventually(
        Duration::from_secs(5),
        "a reflection stream in the place of one closed",
        || async { try_reflection(&broker).await.is_ok() },
    )
    .await;
    drop(raw);
    broker.stop().await;
}

/// A server reflection stream whose first request was answered, kept open
/// with its request side: a call under way that holds its slot.
async fn open_reflection(
    broker: &Running,
) -> (
    tokio::sync::mpsc::Sender<tonic_reflection::pb::v1::ServerReflectionRequest>,
    tonic::Streaming<tonic_reflection::pb::v1::ServerReflectionResponse>,
) {
    try_reflection(broker).await.unwrap()
}

/// A server reflection stream refused: why.
async fn refused_reflection(broker: &Running) -> tonic::Status {
    match try_reflection(broker).await {
        Ok(_) => panic!("a reflection stream was opened"),
        Err(refused) => refused,
    }
}

/// A server reflection stream once its first answer has come, or why not.
async fn try_reflection(
    broker: &Running,
) -> Result<
    (
        tokio::sync::mpsc::Sender<tonic_reflection::pb::v1::ServerReflectionRequest>,
        tonic::Streaming<tonic_reflection::pb::v1::ServerReflectionResponse>,
    ),
    tonic::Status,
> {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest,
    };
    let (requests, receiver) = tokio::sync::mpsc::channel(1);
    let question = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    requests.send(question).await.unwrap();
    let mut answers = ServerReflectionClient::new(broker.channel().await)
        .server_reflection_info(tokio_stream::wrappers::ReceiverStream::new(receiver))
        .await?
        .into_inner();
    let first = answers.message().await?;
    assert!(
        first.is_some(),
        "a reflection stream ended without an answer"
    );
    Ok((requests, answers))
}

/// A health Watch stream once its first answer has come.
async fn open_health_watch(
    broker: &Running,
) -> tonic::Streaming<tonic_health::pb::HealthCheckResponse> {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let request = HealthCheckRequest {
        service: String::new(),
    };
    let mut health = HealthClient::new(broker.channel().await);
    let mut stream = health.watch(request).await.unwrap().into_inner();
    assert!(stream.message().await.unwrap().is_some());
    stream
}

/// `count` WatchSecret streams, each once its first event has come, and
/// the refusal of one more.
async fn watches_then_one_more(
    raw: &mut Secrets,
    count: usize,
) -> (Vec<tonic::Streaming<WatchSecretResponse>>, tonic::Status) {
    let mut watches = Vec::new();
    for _ in 0..count {
        watches.push(eventually_watch(raw).await);
    }
    let request = WatchSecretRequest {
        name: "mistral-api-key".into(),
        ..Default::default()
    };
    let refused = raw.watch_secret(request).await.unwrap_err();
    (watches, refused)
}

/// A WatchSecret stream, once its first event has come; retried while the
/// slots of streams just closed are still held.
async fn eventually_watch(raw: &mut Secrets) -> tonic::Streaming<WatchSecretResponse> {
    let started = Instant::now();
    loop {
        let request = WatchSecretRequest {
            name: "mistral-api-key".into(),
            ..Default::default()
        };
        match raw.watch_secret(request).await {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                let first = tokio::time::timeout(Duration::from_secs(5), stream.message()).await;
                if let Ok(Ok(Some(event))) = first {
                    assert_eq!(event.r#type(), WatchEventType::Current);
                    return stream;
                }
            }
            Err(status) => assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no slot came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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

/// Sockets that connect and never say anything hold slots only until a
/// caller needs one: a new connection takes the slot of the one that has
/// been opening longest, which is closed. Connections that finished
/// opening keep theirs.
#[tokio::test]
async fn a_silent_socket_gives_its_slot_to_a_caller() {
    let broker = Running::start(|args| {
        args.max_connections = Some("3".into());
        args.metrics_listen = Some("127.0.0.1:0".into());
    })
    .await;
    let mut established = broker.raw().await;
    assert_eq!(
        value(&get(&mut established, "mistral-api-key").await.unwrap()),
        MISTRAL
    );
    let mut oldest = silent_socket(&broker).await;
    let mut newest = silent_socket(&broker).await;

    // Every slot is taken; before, this connection was refused until the
    // first-request timeout (10 s) dropped a silent socket.
    let mut caller = broker.raw().await;
    assert_eq!(
        value(&get(&mut caller, "mistral-api-key").await.unwrap()),
        MISTRAL
    );
    assert!(
        closed_by_the_broker(&mut oldest).await,
        "the oldest silent socket is still open"
    );
    let displaced = sample(
        &broker.metrics().await,
        "secretsbroker_connections_displaced_total",
    );
    assert_eq!(displaced, Some(1.0), "connections_displaced_total");

    // The other silent socket is next; the established connections are
    // never displaced: with all three slots held by them, a new connection
    // is refused.
    let mut third = broker.raw().await;
    assert_eq!(
        value(&get(&mut third, "mistral-api-key").await.unwrap()),
        MISTRAL
    );
    assert!(
        closed_by_the_broker(&mut newest).await,
        "the newer silent socket is still open"
    );
    assert!(
        third_connection(&broker).await.is_err(),
        "a fourth connection was served"
    );
    for stub in [&mut established, &mut caller, &mut third] {
        assert_eq!(value(&get(stub, "mistral-api-key").await.unwrap()), MISTRAL);
    }
    drop((established, caller, third));
    broker.stop().await;
}

/// The same under mutual TLS, where a silent socket is one that never
/// finishes its handshake: it cannot keep a caller with a certificate out.
#[tokio::test]
async fn an_unfinished_tls_handshake_gives_its_slot_to_a_caller() {
    use crate::harness::Pki;
    let pki = Pki::new();
    let (server, ca) = (pki.server(), pki.ca());
    let policy = pki.write_policy(
        "[[grant]]\nidentity = \"spiffe://insurecove/auth-service\"\nsecrets = [\"insurecove/**\"]\n",
    );
    let broker = Running::start(|args| {
        args.tls_cert = Some(server.cert.to_string_lossy().into_owned());
        args.tls_key = Some(server.key.to_string_lossy().into_owned());
        args.tls_client_ca = Some(ca.to_string_lossy().into_owned());
        args.policy = Some(policy.to_string_lossy().into_owned());
        args.max_connections = Some("2".into());
    })
    .await;
    let mut silent = [silent_socket(&broker).await, silent_socket(&broker).await];
    let client = pki.client("auth", "spiffe://insurecove/auth-service");
    let mut caller = SecretsServiceClient::new(broker.mtls(&client).await);
    assert_eq!(
        value(&get(&mut caller, "mistral-api-key").await.unwrap()),
        MISTRAL
    );
    assert!(
        closed_by_the_broker(&mut silent[0]).await,
        "the oldest silent socket is still open"
    );
    drop(caller);
    broker.stop().await;
}

/// A TCP connection to the broker that sends nothing, once the broker has
/// accepted it (and so given it a slot).
async fn silent_socket(broker: &Running) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpStream::connect(broker.addr).await.unwrap();
    // The accept loop runs beside this test: give it time to take the
    // socket in, so that the order of arrival is the order of accept.
    tokio::time::sleep(Duration::from_millis(100)).await;
    socket
}

/// Whether the broker closes `socket` within a few seconds (well before
/// the first-request timeout of 10 s).
async fn closed_by_the_broker(socket: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::from_secs(3), socket.read(&mut byte)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test]
async fn a_connection_holds_a_few_health_watches_at_most() {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let broker = Running::start(|_| {}).await;
    let mut health = HealthClient::new(broker.channel().await);
    let mut watches = Vec::new();
    // transport::connection_info::HEALTH_WATCHES
    for _ in 0..4 {
        let request = HealthCheckRequest {
            service: String::new(),
        };
        let mut stream = health.watch(request).await.unwrap().into_inner();
        assert!(stream.message().await.unwrap().is_some());
        watches.push(stream);
    }
    let request = HealthCheckRequest {
        service: String::new(),
    };
    let refused = health.watch(request).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("health watch"), "{refused:?}");
    // Checks are not limited, and another connection has its own.
    let check = HealthCheckRequest {
        service: String::new(),
    };
    health.check(check).await.unwrap();
    let mut other = HealthClient::new(broker.channel().await);
    let request = HealthCheckRequest {
        service: String::new(),
    };
    assert!(other.watch(request).await.is_ok());
    drop(watches);
    broker.stop().await;
}

/// The client crate's watch streams (a cache holds one per secret) go on a
/// connection of their own: as many as the per-connection limit leave the
/// client's calls room.
#[tokio::test]
async fn the_client_crates_watches_leave_its_calls_room() {
    use futures::StreamExt;

    let broker = Running::start(|args| {
        args.max_concurrent_calls_per_connection = Some("4".into());
    })
    .await;
    let client = broker.client().await;
    let mut watches = Vec::new();
    for _ in 0..4 {
        let mut watch = client.watch_secret("mistral-api-key");
        let first = tokio::time::timeout(Duration::from_secs(5), watch.next())
            .await
            .expect("the first event in time")
            .expect("an event")
            .expect("not an error");
        assert_eq!(first.secret.as_str(), Some(MISTRAL));
        watches.push(watch);
    }
    let value = client.get_secret("mistral-api-key").await.unwrap();
    assert_eq!(value.as_str(), Some(MISTRAL));
    broker.stop().await;
}
