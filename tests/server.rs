//! The broker in-process: `App` built on port 0 over the file backend (the
//! dev secrets or a secrets file), called through the client crate and
//! tonic's generated clients. Errors, limits, the cache, a watch, bad
//! input, and a clean stop. These add to the tests against moto and the
//! real binary (tests/client.rs, tests/integration/), they replace none.

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
