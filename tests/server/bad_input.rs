//! Bad input: bad names and malformed typed configs get precise errors
//! (code, reason, the field at fault), no value is echoed in an error or a
//! log line, and the broker serves on afterwards.

use secrets_broker_client::proto::{
    BatchGetSecretsRequest, GetAwsServicesConfigRequest, GetDatabaseConfigRequest,
    GetJwtConfigRequest, GetSecurityConfigRequest, batch_get_secrets_result,
};
use serde_json::{Value, json};
use tonic::{Code, Status, transport::Channel};
use tonic_types::StatusExt;

use secrets_broker_client::proto::{
    GetSecretRequest, secrets_service_client::SecretsServiceClient,
};

use crate::harness::{Running, answer_headers, eventually, headers_only, process_log, thread_log};

type Raw = SecretsServiceClient<Channel>;

fn jwt_ok() -> Value {
    json!({
        "jwt_secret_key": "SENTINEL-jwt-signing-key-a41f",
        "jwt_algorithm": "HS256",
        "jwt_issuer": "SENTINEL-issuer-a41f",
        "jwt_audience": "SENTINEL-audience-a41f",
        "jwt_access_token_expire_minutes": 30,
    })
}

fn db_ok() -> Value {
    json!({
        "supabase_url": "https://sentinel-project.supabase.invalid",
        "supabase_anon_key": "SENTINEL-anon-key-77d0",
        "supabase_service_key": "SENTINEL-service-key-77d0",
        "database_password": "SENTINEL-db-password-77d0",
    })
}

fn aws_ok() -> Value {
    json!({
        "aws_ses_region": "ap-east-1",
        "aws_end_user_messaging_region": "ap-southeast-1",
        "s3_bucket_name": "SENTINEL-bucket-19be",
        "max_file_size_mb": 10,
    })
}

fn sec_ok() -> Value {
    json!({
        "encryption_key": "SENTINEL-encryption-key-e2a7",
        "encryption_salt": "SENTINEL-encryption-salt-e2a7",
        "allowed_hosts": "localhost",
        "cors_origins": ["http://localhost:3000"],
    })
}

fn without(mut value: Value, key: &str) -> Value {
    value.as_object_mut().unwrap().remove(key);
    value
}

fn with(mut value: Value, key: &str, new: Value) -> Value {
    value[key] = new;
    value
}

const NOT_JSON: &str = "SENTINEL-not-json-3c9b {this is: not json";

/// Short name → raw value of every secret of the file.
fn secrets() -> Vec<(&'static str, String)> {
    let as_text = |value: Value| value.to_string();
    vec![
        ("bad/not-json", NOT_JSON.to_owned()),
        (
            "bad/jwt-no-issuer",
            as_text(without(jwt_ok(), "jwt_issuer")),
        ),
        (
            "bad/jwt-zero-expire",
            as_text(with(jwt_ok(), "jwt_access_token_expire_minutes", json!(0))),
        ),
        (
            "bad/jwt-negative-expire",
            as_text(with(jwt_ok(), "jwt_access_token_expire_minutes", json!(-1))),
        ),
        (
            "bad/jwt-string-expire",
            as_text(with(
                jwt_ok(),
                "jwt_access_token_expire_minutes",
                json!("30"),
            )),
        ),
        (
            "bad/jwt-issuer-number",
            as_text(with(jwt_ok(), "jwt_issuer", json!(42))),
        ),
        (
            "bad/db-bad-url",
            as_text(with(db_ok(), "supabase_url", json!("not a url"))),
        ),
        (
            "bad/db-no-password",
            as_text(without(db_ok(), "database_password")),
        ),
        (
            "bad/aws-negative-size",
            as_text(with(aws_ok(), "max_file_size_mb", json!(-5))),
        ),
        (
            "bad/aws-string-size",
            as_text(with(aws_ok(), "max_file_size_mb", json!("10"))),
        ),
        (
            "bad/aws-zero-size",
            as_text(with(aws_ok(), "max_file_size_mb", json!(0))),
        ),
        (
            "bad/aws-fraction-size",
            as_text(with(aws_ok(), "max_file_size_mb", json!(2.5))),
        ),
        (
            "bad/aws-no-bucket",
            as_text(without(aws_ok(), "s3_bucket_name")),
        ),
        (
            "bad/sec-no-key",
            as_text(without(sec_ok(), "encryption_key")),
        ),
        (
            "bad/sec-hosts-number",
            as_text(with(sec_ok(), "allowed_hosts", json!(7))),
        ),
        ("good/jwt", as_text(jwt_ok())),
    ]
}

/// What no error or log line may show: every value, every distinctive
/// string inside one, and the bad URL.
fn forbidden() -> Vec<String> {
    let mut found = vec!["this is: not json".to_owned(), "not a url".to_owned()];
    for (_, raw) in secrets() {
        if let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(&raw) {
            found.extend(
                fields
                    .values()
                    .filter_map(Value::as_str)
                    .filter(|s| s.contains("SENTINEL") || s.contains("sentinel"))
                    .map(str::to_owned),
            );
        }
        found.push(raw);
    }
    found
}

async fn start() -> (Running, Raw, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("secrets.json");
    let entries: Vec<Value> = secrets()
        .into_iter()
        .map(|(name, raw)| json!({"name": name, "versions": [{"value": raw}]}))
        .collect();
    std::fs::write(&file, json!({ "secrets": entries }).to_string()).unwrap();
    let path = file.to_str().unwrap().to_owned();
    let broker = Running::start(move |args| {
        args.dev = false;
        args.secrets_file = Some(path);
    })
    .await;
    let raw = broker.raw().await;
    (broker, raw, dir)
}

/// The status's code, reason and `field`, after checking it echoes no
/// value (message or details).
fn described(status: &Status) -> (Code, String, Option<String>) {
    let details = String::from_utf8_lossy(status.details());
    for value in forbidden() {
        assert!(
            !status.message().contains(&value),
            "{value:?} echoed: {status:?}"
        );
        assert!(!details.contains(&value), "{value:?} in the details");
    }
    let info = status.get_details_error_info().expect("an ErrorInfo");
    (
        status.code(),
        info.reason,
        info.metadata.get("field").cloned(),
    )
}

async fn typed(raw: &mut Raw, rpc: &str, name: &str) -> Result<(), Status> {
    let name = name.to_owned();
    match rpc {
        "GetJwtConfig" => raw
            .get_jwt_config(GetJwtConfigRequest {
                name,
                ..Default::default()
            })
            .await
            .map(drop),
        "GetDatabaseConfig" => raw
            .get_database_config(GetDatabaseConfigRequest {
                name,
                ..Default::default()
            })
            .await
            .map(drop),
        "GetAwsServicesConfig" => raw
            .get_aws_services_config(GetAwsServicesConfigRequest {
                name,
                ..Default::default()
            })
            .await
            .map(drop),
        "GetSecurityConfig" => raw
            .get_security_config(GetSecurityConfigRequest {
                name,
                ..Default::default()
            })
            .await
            .map(drop),
        other => panic!("no such typed RPC: {other}"),
    }
}

const TYPED: [&str; 4] = [
    "GetJwtConfig",
    "GetDatabaseConfig",
    "GetAwsServicesConfig",
    "GetSecurityConfig",
];

#[tokio::test]
async fn bad_names_are_refused_with_their_reason() {
    let (broker, mut raw, _dir) = start().await;
    let long_full = "a".repeat(513 - "insurecove/".len());
    let bad_names = [
        "".to_owned(),
        "a".repeat(513),
        long_full,
        "bad name".into(),
        "bad*name".into(),
        "*".into(),
        "bad\nname".into(),
        "geheim-schlüssel".into(),
        // A character of several bytes where AWS's suffix would be.
        "arn:aws:secretsmanager:us-east-1:123456789012:secret:€23456".into(),
    ];
    for name in &bad_names {
        let request = GetSecretRequest {
            name: name.clone(),
            ..Default::default()
        };
        let status = raw.get_secret(request).await.unwrap_err();
        let (code, reason, _) = described(&status);
        assert_eq!(
            (code, reason.as_str()),
            (Code::InvalidArgument, "INVALID_SECRET_NAME"),
            "{name:?}"
        );
    }
    // 512 characters once prefixed is a valid name (that does not exist).
    let longest = "a".repeat(512 - "insurecove/".len());
    let request = GetSecretRequest {
        name: longest,
        ..Default::default()
    };
    let (code, reason, _) = described(&raw.get_secret(request).await.unwrap_err());
    assert_eq!(
        (code, reason.as_str()),
        (Code::NotFound, "SECRET_NOT_FOUND")
    );
    for rpc in TYPED {
        for name in ["bad name", "bad*name", &"a".repeat(513)] {
            let status = typed(&mut raw, rpc, name).await.unwrap_err();
            let (code, reason, _) = described(&status);
            assert_eq!(
                (code, reason.as_str()),
                (Code::InvalidArgument, "INVALID_SECRET_NAME"),
                "{rpc}"
            );
        }
    }
    drop(raw);
    broker.stop().await;
}

#[tokio::test]
async fn a_batch_answers_invalid_names_item_by_item() {
    let (broker, mut raw, _dir) = start().await;
    let names: Vec<String> = ["good/jwt", "bad name", "", "bad*name", "no-such-secret"]
        .map(str::to_owned)
        .into();
    let results = raw
        .batch_get_secrets(BatchGetSecretsRequest {
            names: names.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    let asked: Vec<&str> = results.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(asked, names);
    let outcome = |i: usize| match &results[i].result {
        Some(batch_get_secrets_result::Result::Secret(secret)) => {
            (0, secret.value.is_some().to_string())
        }
        Some(batch_get_secrets_result::Result::Error(error)) => (error.code, error.reason.clone()),
        None => panic!("no result for {}", names[i]),
    };
    assert_eq!(outcome(0), (0, "true".into()));
    for (i, name) in names.iter().enumerate().take(4).skip(1) {
        assert_eq!(outcome(i), (3, "INVALID_SECRET_NAME".into()), "{name:?}");
    }
    assert_eq!(outcome(4), (5, "SECRET_NOT_FOUND".into()));
    drop(raw);
    broker.stop().await;
}

#[tokio::test]
async fn malformed_typed_configs_name_the_field_and_echo_nothing() {
    // Values are looked for in every broker's lines, audit lines in this one's.
    let log = process_log();
    let (own, _this_thread) = thread_log();
    let (broker, mut raw, _dir) = start().await;

    let malformed = [
        ("GetJwtConfig", "bad/jwt-no-issuer", "jwt_issuer"),
        (
            "GetJwtConfig",
            "bad/jwt-zero-expire",
            "jwt_access_token_expire_minutes",
        ),
        (
            "GetJwtConfig",
            "bad/jwt-negative-expire",
            "jwt_access_token_expire_minutes",
        ),
        (
            "GetJwtConfig",
            "bad/jwt-string-expire",
            "jwt_access_token_expire_minutes",
        ),
        ("GetJwtConfig", "bad/jwt-issuer-number", "jwt_issuer"),
        ("GetDatabaseConfig", "bad/db-bad-url", "supabase_url"),
        (
            "GetDatabaseConfig",
            "bad/db-no-password",
            "database_password",
        ),
        (
            "GetAwsServicesConfig",
            "bad/aws-negative-size",
            "max_file_size_mb",
        ),
        (
            "GetAwsServicesConfig",
            "bad/aws-string-size",
            "max_file_size_mb",
        ),
        (
            "GetAwsServicesConfig",
            "bad/aws-zero-size",
            "max_file_size_mb",
        ),
        (
            "GetAwsServicesConfig",
            "bad/aws-fraction-size",
            "max_file_size_mb",
        ),
        (
            "GetAwsServicesConfig",
            "bad/aws-no-bucket",
            "s3_bucket_name",
        ),
        ("GetSecurityConfig", "bad/sec-no-key", "encryption_key"),
        ("GetSecurityConfig", "bad/sec-hosts-number", "allowed_hosts"),
    ];
    for (rpc, secret, field) in malformed {
        let status = typed(&mut raw, rpc, secret).await.unwrap_err();
        let (code, reason, named) = described(&status);
        assert_eq!(
            (code, reason.as_str()),
            (Code::FailedPrecondition, "MALFORMED_SECRET"),
            "{secret}"
        );
        assert_eq!(named.as_deref(), Some(field), "{secret}");
        assert!(
            status.message().contains(field),
            "{secret}: {}",
            status.message()
        );
    }
    for rpc in TYPED {
        let status = typed(&mut raw, rpc, "bad/not-json").await.unwrap_err();
        let (code, reason, _) = described(&status);
        assert_eq!(
            (code, reason.as_str()),
            (Code::FailedPrecondition, "MALFORMED_SECRET"),
            "{rpc}"
        );
    }
    // A valid JWT secret read as database settings is malformed too.
    let status = typed(&mut raw, "GetDatabaseConfig", "good/jwt")
        .await
        .unwrap_err();
    let (code, reason, _) = described(&status);
    assert_eq!(
        (code, reason.as_str()),
        (Code::FailedPrecondition, "MALFORMED_SECRET")
    );
    // And a good one in the same file still decodes.
    let jwt = raw
        .get_jwt_config(GetJwtConfigRequest {
            name: "good/jwt".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .config
        .unwrap();
    assert_eq!(jwt.jwt_issuer, "SENTINEL-issuer-a41f");
    assert_eq!(jwt.jwt_access_token_expire_minutes, 30);

    // Still serving after all of it.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", broker.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let serving = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "secretsbroker.v1.SecretsService".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        serving,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    drop((raw, health));
    broker.stop().await;

    let audited = own
        .text()
        .lines()
        .any(|line| line.contains("insurecove/bad/") && line.contains("FAILED_PRECONDITION"));
    assert!(audited, "no audit line of a malformed read");
    let text = log.text();
    for value in forbidden() {
        assert!(!text.contains(&value), "{value:?} logged");
    }
}

#[tokio::test]
async fn requests_tonic_cannot_route_or_read_carry_the_brokers_error_info() {
    let broker = Running::start(|_| {}).await;
    let info = |status: &Status| {
        let info = status
            .get_details_error_info()
            .unwrap_or_else(|| panic!("no ErrorInfo: {status:?}"));
        assert_eq!(info.domain, "secretsbroker", "{status:?}");
        (status.code(), info.reason, info.metadata)
    };

    let not_text = send_bytes_name(
        broker.channel().await,
        "/secretsbroker.v1.SecretsService/GetSecret",
        vec![b'a', 0xff, 0xfe],
    )
    .await;
    let (code, reason, _) = info(&not_text);
    assert_eq!(
        (code, reason.as_str()),
        (Code::Internal, "MALFORMED_REQUEST")
    );
    assert!(not_text.message().contains("name"), "{not_text:?}");

    for (path, named) in [
        ("/secretsbroker.v1.SecretsService/NoSuchMethod", true),
        ("/other.v1.Elsewhere/Call", true),
        ("/grpc.health.v1.Health/NoSuchMethod", false),
    ] {
        let unknown = send_bytes_name(broker.channel().await, path, b"x".to_vec()).await;
        let (code, reason, metadata) = info(&unknown);
        assert_eq!(
            (code, reason.as_str()),
            (Code::Unimplemented, "UNKNOWN_METHOD")
        );
        assert_eq!(
            metadata.get("method").map(String::as_str),
            named.then_some(path)
        );
        assert!(unknown.message().contains("SecretsService"), "{unknown:?}");
    }

    // A compressed request, which the broker does not take.
    let mut connection = broker.h2().await;
    let request = http::Request::post("/secretsbroker.v1.SecretsService/GetSecret")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-encoding", "gzip")
        .body(())
        .unwrap();
    let (response, mut body) = connection.send_request(request, false).unwrap();
    body.send_data(vec![1, 0, 0, 0, 2, 0x1f, 0x8b].into(), true)
        .unwrap();
    let headers = answer_headers(response).await;
    assert_eq!(
        headers
            .get("grpc-accept-encoding")
            .map(|v| v.to_str().unwrap()),
        Some("identity"),
        "the refusal says which encodings are taken"
    );
    let compressed = Status::from_header_map(&headers).unwrap();
    let (code, reason, metadata) = info(&compressed);
    assert_eq!(
        (code, reason.as_str()),
        (Code::Unimplemented, "UNSUPPORTED_ENCODING")
    );
    assert_eq!(metadata["header"], "grpc-encoding");
    assert!(compressed.message().contains("gzip"), "{compressed:?}");

    // A reflection request that does not decode: tonic's reflection ends
    // its stream OK at it; the broker says why.
    let (response, mut body) = headers_only(&mut connection, REFLECTION).await;
    // ServerReflectionRequest{host: <not UTF-8>}.
    body.send_data(vec![0, 0, 0, 0, 4, 0x0a, 0x02, 0xff, 0xfe].into(), true)
        .unwrap();
    let unread = Status::from_header_map(&answer_headers(response).await).unwrap();
    let (code, reason, _) = info(&unread);
    assert_eq!(
        (code, reason.as_str()),
        (Code::Internal, "MALFORMED_REQUEST")
    );

    // One that ends inside its message: a header declaring 10 bytes, 3 sent.
    let (response, mut body) = headers_only(&mut connection, REFLECTION).await;
    body.send_data(vec![0, 0, 0, 0, 10, 0x0a, 0x01, b'x'].into(), true)
        .unwrap();
    let cut = Status::from_header_map(&answer_headers(response).await).unwrap();
    let (code, reason, _) = info(&cut);
    assert_eq!(
        (code, reason.as_str()),
        (Code::Internal, "MALFORMED_REQUEST"),
        "{cut:?}"
    );

    // A whole request ended by trailers rather than by its last DATA frame
    // is answered, and ends OK: ServerReflectionRequest{list_services: ""}.
    let (response, mut body) = headers_only(&mut connection, REFLECTION).await;
    body.send_data(vec![0, 0, 0, 0, 2, 0x3a, 0x00].into(), false)
        .unwrap();
    body.send_trailers(http::HeaderMap::new()).unwrap();
    let ended = answer_headers(response).await;
    assert_eq!(
        ended.get("grpc-status").map(|v| v.to_str().unwrap()),
        Some("0"),
        "{ended:?}"
    );
    broker.stop().await;
}

const REFLECTION: &str = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";

/// A request whose `name` (field 1) is raw bytes, to send what protobuf
/// decoding refuses.
#[derive(Clone, PartialEq, prost::Message)]
struct BytesName {
    #[prost(bytes = "vec", tag = "1")]
    name: Vec<u8>,
}

async fn send_bytes_name(channel: Channel, rpc: &'static str, name: Vec<u8>) -> Status {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static(rpc);
    let codec = tonic_prost::ProstCodec::<BytesName, BytesName>::default();
    grpc.unary(tonic::Request::new(BytesName { name }), path, codec)
        .await
        .unwrap_err()
}

#[tokio::test]
async fn calls_refused_before_their_handler_or_for_their_name_are_audited() {
    let (log, _this_thread) = thread_log();
    let broker = Running::start(|args| args.max_message_size = Some("1024".into())).await;
    let mut raw = broker.raw().await;

    let bad = "audit-refused name!";
    let refused = raw
        .get_secret(GetSecretRequest {
            name: bad.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    let not_text = send_bytes_name(
        broker.channel().await,
        "/secretsbroker.v1.SecretsService/GetJwtConfig",
        vec![b'a', 0xff, 0xfe],
    )
    .await;
    assert_eq!(not_text.code(), Code::Internal, "{not_text:?}");
    let too_large = send_bytes_name(
        broker.channel().await,
        "/secretsbroker.v1.SecretsService/GetSecurityConfig",
        vec![b'a'; 2000],
    )
    .await;
    assert_eq!(too_large.code(), Code::ResourceExhausted, "{too_large:?}");
    let too_many = raw
        .batch_get_secrets(BatchGetSecretsRequest {
            // Short names: the whole request fits --max-message-size.
            names: (0..101).map(|i| format!("t{i:03}")).collect(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(too_many.code(), Code::InvalidArgument, "{too_many:?}");

    let audit = audit_lines(&log.text());
    let seen = |rpc: &str, outcome: &str, secrets: &str| audited(&audit, rpc, outcome, secrets);
    // Refused as a whole, it still names what was asked.
    assert!(
        seen(
            "BatchGetSecrets",
            "INVALID_ARGUMENT",
            "insurecove/t000 insurecove/t001 "
        ) && seen("BatchGetSecrets", "INVALID_ARGUMENT", "(and 81 more)"),
        "{audit:#?}"
    );
    assert!(
        seen("GetSecret", "INVALID_ARGUMENT", "audit-refused name!"),
        "{audit:#?}"
    );
    assert!(
        seen("GetJwtConfig", "INTERNAL", "secrets=\"\""),
        "{audit:#?}"
    );
    assert!(
        seen("GetSecurityConfig", "RESOURCE_EXHAUSTED", "secrets=\"\""),
        "{audit:#?}"
    );
    // Each with the reason its caller was given, whoever refused it: the
    // handler, tonic (said again in the broker's words), the transport.
    for (rpc, reason) in [
        ("BatchGetSecrets", "TOO_MANY_NAMES"),
        ("GetSecret", "INVALID_SECRET_NAME"),
        ("GetJwtConfig", "MALFORMED_REQUEST"),
        ("GetSecurityConfig", "MESSAGE_TOO_LARGE"),
    ] {
        assert_eq!(reasons_of(&audit, rpc), [reason], "{audit:#?}");
    }
    broker.stop().await;
}

#[tokio::test]
async fn calls_that_never_reach_a_handler_are_audited_too() {
    use secrets_broker_client::proto::{
        ClearCacheRequest, admin_service_client::AdminServiceClient,
    };

    let (log, _this_thread) = thread_log();
    let broker = Running::start(|_| {}).await;

    // A stream reset before its request came.
    let mut connection = broker.h2().await;
    let (_response, mut body) = headers_only(
        &mut connection,
        "/secretsbroker.v1.SecretsService/GetSecret",
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    body.send_reset(h2::Reason::CANCEL);

    // A method the service does not have.
    let unknown = send_bytes_name(
        broker.channel().await,
        "/secretsbroker.v1.SecretsService/NoSuchMethod",
        b"x".to_vec(),
    )
    .await;
    assert_eq!(unknown.code(), Code::Unimplemented, "{unknown:?}");

    // An admin call says which names it was given.
    let mut admin = AdminServiceClient::new(broker.channel().await);
    let refused = admin
        .clear_cache(ClearCacheRequest {
            names: vec!["mistral-api-key".into(), "bad name!".into()],
        })
        .await
        .unwrap_err();
    // The field is the request's, and which of its names.
    let info = refused.get_details_error_info().expect("an ErrorInfo");
    assert_eq!(
        (
            refused.code(),
            info.reason.as_str(),
            info.metadata.get("field").map(String::as_str),
            info.metadata.get("index").map(String::as_str)
        ),
        (
            Code::InvalidArgument,
            "INVALID_SECRET_NAME",
            Some("names"),
            Some("1")
        ),
        "{refused:?}"
    );
    assert!(refused.message().contains("names[1]"), "{refused:?}");
    // Past the names the audit line lists, the refused one is shown too.
    let mut many: Vec<String> = (0..30).map(|i| format!("audit-many-{i}")).collect();
    many.push("bad name past the list!".into());
    let refused = admin
        .clear_cache(ClearCacheRequest { names: many })
        .await
        .unwrap_err();
    assert!(refused.message().contains("names[30]"), "{refused:?}");

    // The reset stream's line comes when the broker has seen the reset.
    let cancelled = || {
        audited(
            &audit_lines(&log.text()),
            "GetSecret",
            "CANCELLED",
            "secrets=\"\"",
        )
    };
    eventually(
        std::time::Duration::from_secs(5),
        "the reset stream's audit line",
        || std::future::ready(cancelled()),
    )
    .await;
    let audit = audit_lines(&log.text());
    let seen = |rpc: &str, outcome: &str, secrets: &str| audited(&audit, rpc, outcome, secrets);
    assert!(
        seen(
            "/secretsbroker.v1.SecretsService/NoSuchMethod",
            "UNIMPLEMENTED",
            ""
        ),
        "{audit:#?}"
    );
    assert!(
        seen(
            "ClearCache",
            "INVALID_ARGUMENT",
            r#"insurecove/mistral-api-key \"bad name!\""#
        ),
        "{audit:#?}"
    );
    assert!(
        seen(
            "ClearCache",
            "INVALID_ARGUMENT",
            r#"(and 11 more) \"bad name past the list!\""#
        ),
        "{audit:#?}"
    );
    // Refusals say their reason; a call its caller gave up on has none.
    assert_eq!(
        reasons_of(&audit, "/secretsbroker.v1.SecretsService/NoSuchMethod"),
        ["UNKNOWN_METHOD"],
        "{audit:#?}"
    );
    assert_eq!(
        reasons_of(&audit, "ClearCache"),
        ["INVALID_SECRET_NAME"; 2],
        "{audit:#?}"
    );
    assert_eq!(reasons_of(&audit, "GetSecret"), [""; 0], "{audit:#?}");
    broker.stop().await;
}

#[tokio::test]
async fn an_unknown_method_refused_at_the_gate_is_audited_with_its_path() {
    let (log, _this_thread) = thread_log();
    let broker = Running::start(|args| {
        args.max_concurrent_calls_per_connection = Some("1".into());
    })
    .await;
    let mut connection = broker.h2().await;
    // The connection's one call slot, held by a call whose request is
    // still to come.
    let (_held, _held_body) = headers_only(
        &mut connection,
        "/secretsbroker.v1.SecretsService/GetSecret",
    )
    .await;
    let unknown = "/secretsbroker.v1.SecretsService/NoSuchMethod";
    let (refused, _refused_body) = headers_only(&mut connection, unknown).await;
    let refused = tokio::time::timeout(std::time::Duration::from_secs(5), refused)
        .await
        .expect("refused at once")
        .unwrap();
    let status = refused
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap());
    assert_eq!(status, Some("8"), "{refused:?}");

    let audit = audit_lines(&log.text());
    assert!(
        audited(&audit, unknown, "RESOURCE_EXHAUSTED", "secrets=\"\""),
        "{audit:#?}"
    );
    assert_eq!(
        reasons_of(&audit, unknown),
        ["TOO_MANY_CALLS"],
        "{audit:#?}"
    );
    broker.stop().await;
}

/// The audit lines of a stretch of the log.
fn audit_lines(log: &str) -> Vec<String> {
    log.lines()
        .filter(|line| line.contains("audit"))
        .map(str::to_owned)
        .collect()
}

/// The reasons the audit lines of `rpc` give, in order.
fn reasons_of(audit: &[String], rpc: &str) -> Vec<String> {
    audit
        .iter()
        .filter(|line| line.contains(&format!("rpc=\"{rpc}\"")))
        .filter_map(|line| {
            let (_, rest) = line.split_once(" reason=\"")?;
            Some(rest.split('"').next()?.to_owned())
        })
        .collect()
}

/// Whether an audit line names `rpc`, `outcome`, and contains `secrets`.
fn audited(audit: &[String], rpc: &str, outcome: &str, secrets: &str) -> bool {
    audit.iter().any(|line| {
        line.contains(&format!("rpc=\"{rpc}\""))
            && line.contains(&format!("outcome=\"{outcome}\""))
            && line.contains(secrets)
    })
}
