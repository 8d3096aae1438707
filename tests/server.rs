//! The broker in-process: `App` built on port 0 over the file backend (the
//! dev secrets or a secrets file), called through the client crate and
//! tonic's generated clients. Errors, limits, the cache, a watch, bad
//! input (names, malformed typed configs, nothing echoed or logged), and a
//! clean stop. Behaviour of the broker alone lives here; the tests against
//! moto and the real binary (tests/client.rs, tests/integration/) keep what
//! needs AWS's peer, another language or a tool.

use std::{net::SocketAddr, time::Duration};

use secrets_broker::{
    app::{App, Listeners},
    config::{BrokerArgs, Settings},
};
use secrets_broker_client::{
    ClientConfig, Error, SecretsClient,
    proto::{GetSecretRequest, WatchSecretRequest, secrets_service_client::SecretsServiceClient},
};
use tokio::{sync::oneshot, task::JoinHandle};

/// A broker running in this process until `stop`.
struct Running {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    run: JoinHandle<Result<(), secrets_broker::app::AppError>>,
}

impl Running {
    async fn start(configure: impl FnOnce(&mut BrokerArgs)) -> Self {
        let mut args = BrokerArgs {
            dev: true,
            listen: Some("127.0.0.1:0".into()),
            ..BrokerArgs::default()
        };
        configure(&mut args);
        let settings = Settings::resolve(&args, &|_| None).expect("valid settings");
        let listeners = Listeners::bind(&settings).await.expect("bound");
        let addr = listeners.grpc_addr().expect("a TCP address");
        let app = App::build(&settings, listeners).expect("built");
        let (stop, stopped) = oneshot::channel::<()>();
        let run = tokio::spawn(app.run(async move {
            let _ = stopped.await;
        }));
        Self {
            addr,
            stop: Some(stop),
            run,
        }
    }

    async fn client(&self) -> SecretsClient {
        let mut config = ClientConfig::new(self.addr.to_string());
        config.max_retries = 0;
        SecretsClient::connect(config).await.expect("a client")
    }

    async fn raw(&self) -> SecretsServiceClient<tonic::transport::Channel> {
        SecretsServiceClient::connect(format!("http://{}", self.addr))
            .await
            .expect("connected")
    }

    async fn stop(mut self) {
        let _ = self.stop.take().expect("running").send(());
        tokio::time::timeout(Duration::from_secs(10), self.run)
            .await
            .expect("the run ends")
            .expect("no panic")
            .expect("a clean stop");
    }
}

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
async fn errors_carry_their_code_and_reason() {
    let broker = Running::start(|_| {}).await;
    let client = broker.client().await;
    let missing = client.get_secret("no-such-secret").await.unwrap_err();
    assert_eq!(missing.reason(), Some("SECRET_NOT_FOUND"), "{missing}");
    let invalid = client.get_secret("has space").await.unwrap_err();
    assert!(
        matches!(&invalid, Error::InvalidArgument { field: Some(f), .. } if f == "name"),
        "{invalid}"
    );
    let smuggled = "arn:aws:secretsmanager:ap-east-1:123456789012:secret:a:b";
    let refused = client.get_secret(smuggled).await.unwrap_err();
    assert_eq!(refused.reason(), Some("INVALID_SECRET_NAME"), "{refused}");
    drop(client);
    broker.stop().await;
}

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

#[tokio::test]
async fn streams_past_the_connection_limit_are_refused() {
    let broker = Running::start(|args| {
        args.max_concurrent_calls_per_connection = Some("2".into());
    })
    .await;
    let mut raw = broker.raw().await;
    let watch = || WatchSecretRequest {
        name: "production/jwt".into(),
        ..Default::default()
    };
    let mut first = raw.watch_secret(watch()).await.unwrap().into_inner();
    let mut second = raw.watch_secret(watch()).await.unwrap().into_inner();
    assert!(first.message().await.unwrap().is_some());
    assert!(second.message().await.unwrap().is_some());
    let third = raw
        .get_secret(GetSecretRequest {
            name: "production/jwt".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(third.code(), tonic::Code::ResourceExhausted);
    drop((first, second, raw));
    broker.stop().await;
}

#[tokio::test]
async fn an_edit_of_the_secrets_file_reaches_a_watcher() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("secrets.json");
    let write = |value: &str| {
        let text = format!(
            r#"{{"secrets": [{{"name": "app/key", "versions": [{{"value": "{value}"}}]}}]}}"#
        );
        let tmp = dir.path().join("secrets.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
    };
    write("first-7f1e");
    let path = file.to_str().unwrap().to_owned();
    let broker = Running::start(move |args| {
        args.dev = false;
        args.secrets_file = Some(path);
    })
    .await;
    let mut raw = broker.raw().await;
    let mut stream = raw
        .watch_secret(WatchSecretRequest {
            name: "app/key".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    write("second-7f1e");
    let next = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("the edit is seen")
        .unwrap()
        .unwrap();
    assert_ne!(
        first.secret.unwrap().version_id,
        next.secret.unwrap().version_id
    );
    drop((stream, raw));
    broker.stop().await;
}

// --------------------------------------------------------------------------
// Bad input: bad names and malformed typed configs get precise errors (code,
// reason, the field at fault), no value is echoed in an error or a log line,
// and the broker serves on afterwards.

mod bad_input {
    use std::{
        io,
        sync::{Arc, Mutex},
    };

    use secrets_broker_client::proto::{
        BatchGetSecretsRequest, GetAwsServicesConfigRequest, GetDatabaseConfigRequest,
        GetJwtConfigRequest, GetSecurityConfigRequest, batch_get_secrets_result,
    };
    use serde_json::{Value, json};
    use tonic::{Code, Status, transport::Channel};
    use tonic_types::StatusExt;

    use super::*;

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

    /// Everything the broker logs while the test runs.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
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
            Some(batch_get_secrets_result::Result::Error(error)) => {
                (error.code, error.reason.clone())
            }
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
        let log = Captured::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(move || writer.clone())
            .finish();
        // The current-thread runtime runs every task of the broker here.
        let _capture = tracing::subscriber::set_default(subscriber);
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

        let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
        assert!(
            text.contains("MALFORMED_SECRET") || text.contains("FAILED_PRECONDITION"),
            "audited: {text}"
        );
        for value in forbidden() {
            assert!(!text.contains(&value), "{value:?} logged");
        }
    }
}
