//! The in-process broker and what the tests need around it: channels
//! (plaintext or mutual TLS), the admin and health stubs, a scrape of
//! `/metrics`, a capture of what the broker logs, and `eventually`.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use secrets_broker::{
    app::{App, AppError, Listeners},
    config::{BrokerArgs, Settings},
};
use secrets_broker_client::{
    ClientConfig, SecretsClient,
    proto::{
        GetCacheStatsRequest, GetCacheStatsResponse, GetSecretRequest, Secret,
        admin_service_client::AdminServiceClient, secrets_service_client::SecretsServiceClient,
    },
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::oneshot,
    task::JoinHandle,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

pub use crate::pki::{Issued, Pki};

/// The SecretsService stub on a channel of its own.
pub type Secrets = SecretsServiceClient<Channel>;

/// A broker running in this process until `stop`.
pub struct Running {
    /// The gRPC address (port 0 bound).
    pub addr: SocketAddr,
    /// The metrics and probes address, when `metrics_listen` was set.
    pub probes: Option<SocketAddr>,
    /// The CA that signed the server's certificate, when TLS is on.
    server_ca: Option<PathBuf>,
    /// How much the process log held when this broker started.
    log_start: usize,
    stop: Option<oneshot::Sender<()>>,
    run: JoinHandle<Result<(), AppError>>,
}

impl Running {
    /// Starts the broker on the dev secrets, plaintext on 127.0.0.1:0,
    /// after `configure` has changed what it wants.
    pub async fn start(configure: impl FnOnce(&mut BrokerArgs)) -> Self {
        let mut args = BrokerArgs {
            dev: true,
            listen: Some("127.0.0.1:0".into()),
            ..BrokerArgs::default()
        };
        configure(&mut args);
        let log_start = process_log().position();
        // The test PKI signs the server's certificate with the client CA.
        let server_ca = args
            .tls_cert
            .as_ref()
            .and(args.tls_client_ca.as_ref())
            .map(PathBuf::from);
        let settings = Settings::resolve(&args, &|_| None).expect("valid settings");
        let listeners = Listeners::bind(&settings).await.expect("bound");
        let addr = listeners.grpc_addr().expect("a TCP address");
        let probes = listeners.probes_addr();
        let app = App::build(&settings, listeners).expect("built");
        let (stop, stopped) = oneshot::channel::<()>();
        let run = tokio::spawn(app.run(async move {
            let _ = stopped.await;
        }));
        Self {
            addr,
            probes,
            server_ca,
            log_start,
            stop: Some(stop),
            run,
        }
    }

    /// Starts a mutual-TLS broker with the PKI's server certificate, its
    /// CA for clients, and `policy` if given.
    pub async fn start_tls(pki: &Pki, policy: Option<PathBuf>) -> Self {
        let server = pki.server();
        let ca = pki.ca();
        Self::start(move |args| {
            args.tls_cert = Some(server.cert.to_string_lossy().into_owned());
            args.tls_key = Some(server.key.to_string_lossy().into_owned());
            args.tls_client_ca = Some(ca.to_string_lossy().into_owned());
            args.policy = policy.map(|path| path.to_string_lossy().into_owned());
        })
        .await
    }

    /// The client crate's client, without retries.
    pub async fn client(&self) -> SecretsClient {
        let mut config = ClientConfig::new(self.addr.to_string());
        config.max_retries = 0;
        SecretsClient::connect(config).await.expect("a client")
    }

    /// A new plaintext connection.
    pub async fn channel(&self) -> Channel {
        Endpoint::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .expect("connected")
    }

    /// A new mutual-TLS connection presenting `client`.
    pub async fn mtls(&self, client: &Issued) -> Channel {
        self.try_mtls(client).await.expect("an mTLS connection")
    }

    /// An mTLS connection as `client`, or why there is none.
    pub async fn try_mtls(&self, client: &Issued) -> Result<Channel, tonic::transport::Error> {
        let ca = self.server_ca.as_ref().expect("a TLS broker");
        let read = |path: &PathBuf| std::fs::read(path).expect("PEM file");
        let tls = ClientTlsConfig::new()
            .domain_name("localhost")
            .ca_certificate(Certificate::from_pem(read(ca)))
            .identity(Identity::from_pem(read(&client.cert), read(&client.key)));
        Endpoint::from_shared(format!("https://{}", self.addr))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
    }

    /// The SecretsService stub on a new plaintext connection.
    pub async fn raw(&self) -> Secrets {
        SecretsServiceClient::new(self.channel().await)
    }

    /// A plain HTTP/2 connection of its own (h2's client, driven in a
    /// task), for streams no gRPC client would send.
    pub async fn h2(&self) -> h2::client::SendRequest<bytes::Bytes> {
        let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let (connection, driver) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(driver);
        connection
    }

    /// The body of `GET /metrics`.
    pub async fn metrics(&self) -> String {
        let addr = self.probes.expect("metrics_listen set");
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        body.to_owned()
    }

    /// Stops the broker, waits for its run to end cleanly, and checks
    /// that no dev secret's value was logged while it ran (by it or by a
    /// broker of another test running beside it).
    pub async fn stop(mut self) {
        let _ = self.stop.take().expect("running").send(());
        tokio::time::timeout(Duration::from_secs(10), self.run)
            .await
            .expect("the run ends")
            .expect("no panic")
            .expect("a clean stop");
        let log = process_log().since(self.log_start);
        for value in dev_values() {
            assert!(!log.contains(&value), "a dev secret's value was logged");
        }
    }
}

/// The dev secrets' values that are secret: the raw values, and each
/// string inside a JSON one that is marked as a fake secret (`NOT-REAL`).
/// Settings that are not secret (a region, a hostname) may be logged.
fn dev_values() -> Vec<String> {
    let file: serde_json::Value =
        serde_json::from_str(include_str!("../../src/backend/dev_secrets.json")).unwrap();
    let mut values = Vec::new();
    for secret in file["secrets"].as_array().unwrap() {
        for version in secret["versions"].as_array().unwrap() {
            let raw = version["value"].as_str().unwrap();
            if let Ok(serde_json::Value::Object(fields)) = serde_json::from_str(raw) {
                let strings = fields.values().filter_map(serde_json::Value::as_str);
                values.extend(
                    strings
                        .filter(|s| s.contains("NOT-REAL"))
                        .map(str::to_owned),
                );
            }
            values.push(raw.to_owned());
        }
    }
    values
}

/// A client certificate the test CA signed that names nobody: an empty
/// subject and no SAN.
pub fn unnamed(pki: &Pki) -> Issued {
    use rcgen::{CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, KeyUsagePurpose};
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("client params");
    params.distinguished_name = DistinguishedName::new();
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    pki.issue("unnamed", params)
}

/// Replaces `path` by writing a new file and renaming it over, as editors
/// and Kubernetes config maps do.
pub fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The value of the unlabelled sample `name` in an OpenMetrics text.
pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix(name)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

/// A read of `name` (short or full).
pub fn read(name: &str) -> GetSecretRequest {
    GetSecretRequest {
        name: name.into(),
        ..Default::default()
    }
}

/// Reads `name`; the secret or the status.
pub async fn get(stub: &mut Secrets, name: &str) -> Result<Secret, tonic::Status> {
    let response = stub.get_secret(read(name)).await?.into_inner();
    Ok(response.secret.expect("a secret"))
}

/// A secret's string value.
pub fn value(secret: &Secret) -> &str {
    match &secret.value {
        Some(secrets_broker_client::proto::secret::Value::StringValue(text)) => text,
        other => panic!("not a string value: {}", other.is_some()),
    }
}

/// The cache statistics, asked on `channel`.
pub async fn stats(channel: Channel) -> Result<GetCacheStatsResponse, tonic::Status> {
    AdminServiceClient::new(channel)
        .get_cache_stats(GetCacheStatsRequest::default())
        .await
        .map(tonic::Response::into_inner)
}

/// Whether the broker answers SERVING to a health check on `channel`.
pub async fn serving(channel: Channel) -> bool {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    let status = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .expect("a health answer")
        .into_inner()
        .status;
    status == ServingStatus::Serving as i32
}

/// The reason of a status's `ErrorInfo` (empty without one), after
/// checking that the detail is the broker's.
pub fn reason(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    match status.get_details_error_info() {
        Some(info) => {
            assert_eq!(info.domain, "secretsbroker", "{status:?}");
            info.reason
        }
        None => String::new(),
    }
}

/// Nothing of a dev secret in a status: message, details or metadata.
pub fn assert_no_dev_value(status: &tonic::Status) {
    let details = String::from_utf8_lossy(status.details()).into_owned();
    let metadata = format!("{:?}", status.metadata());
    for value in dev_values() {
        for text in [status.message(), details.as_str(), metadata.as_str()] {
            assert!(!text.contains(&value), "a dev secret's value in {status:?}");
        }
    }
}

/// Polls `check` every 50 ms until it holds; panics naming `what` after
/// `bound`. Returns how long it took.
pub async fn eventually<F, Fut>(bound: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if check().await {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < bound,
            "{what}: not seen within {bound:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Bytes logged, shared between the subscriber's writer and the test.
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    /// Everything logged so far.
    pub fn text(&self) -> String {
        self.since(0)
    }

    /// What was logged after the first `start` bytes.
    pub fn since(&self, start: usize) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()[start..]).into_owned()
    }

    /// How many bytes were logged so far.
    pub fn position(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

impl io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What the broker logs at DEBUG and above on any thread (file watches log
/// from threads of their own), for every test of this binary: look for
/// lines naming the test's own files. One process-wide subscriber, because
/// `tracing` caches per call site whether anyone listens: scoped
/// subscribers alone, of tests running side by side, would miss events.
/// (`thread_log`'s scoped subscriber is safe beside it: it is made after
/// this one, with the same level and no filter of its own, so every call
/// site's interest is the same for both.)
pub fn process_log() -> Captured {
    static LOG: OnceLock<Captured> = OnceLock::new();
    LOG.get_or_init(|| {
        let log = Captured::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("the only global subscriber");
        log
    })
    .clone()
}

/// What this test's own thread logs, also kept in the process log (which
/// `Running::stop` checks for secret values). On tokio's default runtime
/// for tests, a current-thread one, the broker's calls run on the test's
/// thread: the audit lines here are this test's broker's, never those of
/// a broker of another test running beside it. Lines the broker logs on
/// other threads (file watches) are only in the process log.
pub fn thread_log() -> (Captured, tracing::subscriber::DefaultGuard) {
    let global = process_log();
    let local = Captured::default();
    let writer = Tee(local.clone(), global);
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    (local, tracing::subscriber::set_default(subscriber))
}

/// Writes to both logs.
#[derive(Clone)]
struct Tee(Captured, Captured);

impl io::Write for Tee {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0.write_all(bytes)?;
        self.1.write_all(bytes)?;
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The headers that carry an answer's grpc-status: its headers when it is
/// trailers-only, else its trailers (the body read to its end).
pub async fn answer_headers(response: h2::client::ResponseFuture) -> http::HeaderMap {
    let response = tokio::time::timeout(Duration::from_secs(5), response)
        .await
        .expect("an answer in time")
        .unwrap();
    if response.headers().contains_key("grpc-status") {
        return response.headers().clone();
    }
    let mut body = response.into_body();
    while let Some(data) = body.data().await {
        drop(data);
    }
    body.trailers().await.unwrap().unwrap_or_default()
}

/// Opens a stream for `path` with its headers alone: no request follows.
pub async fn headers_only(
    connection: &mut h2::client::SendRequest<bytes::Bytes>,
    path: &str,
) -> (h2::client::ResponseFuture, h2::SendStream<bytes::Bytes>) {
    let request = http::Request::post(path)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let ready = connection.clone().ready().await.expect("room for a stream");
    *connection = ready;
    connection.send_request(request, false).unwrap()
}
