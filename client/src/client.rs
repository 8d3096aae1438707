//! `SecretsClient`: the typed API over the broker's two services.
//!
//! One cheap-to-clone handle over two HTTP/2 connections (tonic
//! multiplexes calls on each): one for calls, one for watch streams, so
//! that long-lived watches (a cache holds one per secret) never take the
//! room the broker gives a connection's calls
//! (`--max-concurrent-calls-per-connection`). Every call has a deadline
//! (`request_timeout`, retries and the wait for a connection included)
//! and retries only what `Error::is_retryable` says may pass; values come
//! back as `SecretValue`, in zeroizing memory.

use std::{future::IntoFuture, pin::Pin, time::Duration};

use tokio::time::Instant;

use futures::Future;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use zeroize::Zeroizing;

use crate::{
    ClientConfig, Error, SecretValue,
    proto::{
        self, admin_service_client::AdminServiceClient,
        secrets_service_client::SecretsServiceClient,
    },
    typed::TypedConfig,
    watch::{self, WatchStream},
};

/// A client of one broker. Cheap to clone: clones share its two HTTP/2
/// connections (calls; watch streams), each opened on first use and
/// re-opened when lost. Under mutual TLS, each new connection reads the
/// TLS files again: a certificate renewed in place is used from then on.
///
/// ```no_run
/// # async fn run() -> Result<(), secrets_broker_client::Error> {
/// use secrets_broker_client::{ClientConfig, SecretsClient};
/// let client = SecretsClient::connect(ClientConfig::from_env()?).await?;
/// let api_key = client.get_mistral_api_key().await?;
/// let jwt = client.get_jwt_config().await?;
/// let previous = client.get_secret("mistral-api-key").version_stage("AWSPREVIOUS").await?;
/// # let _ = (api_key, jwt, previous); Ok(()) }
/// ```
#[derive(Clone)]
pub struct SecretsClient {
    secrets: SecretsServiceClient<Channel>,
    /// On a connection of their own: see the module doc.
    watches: SecretsServiceClient<Channel>,
    admin: AdminServiceClient<Channel>,
    health: HealthClient<Channel>,
    max_retries: u32,
    request_timeout: Duration,
    /// As configured, for errors that name it.
    endpoint: std::sync::Arc<str>,
    /// Mutual TLS is configured (what a closed connection likely means).
    tls: bool,
}

/// First wait between retries; doubles each time.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// HTTP/2 pings: how often, and how long one may go unanswered.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(5);

impl SecretsClient {
    /// Prepares a client. The connection itself is made lazily, at the
    /// first call, so a broker that starts later is not an error here.
    pub async fn connect(config: ClientConfig) -> Result<Self, Error> {
        let url = config.url()?;
        let tls = match config.tls_files()? {
            Some((ca, cert, key)) => {
                // Checked now, so that a mistake is named at once.
                crate::tls_files::read(ca, cert, key)?;
                Some(TlsServer::at(&url, &config, [ca, cert, key])?)
            }
            None => None,
        };
        // Under TLS the connector makes the TLS: tonic sees plain HTTP/2.
        let endpoint = Endpoint::from_shared(url.replacen("https://", "http://", 1))
            .map_err(|e| Error::Config(format!("endpoint {}: {e}", config.endpoint)))?
            .connect_timeout(config.connect_timeout)
            .tcp_nodelay(true)
            // A broker that stops answering without closing (frozen, a
            // network partition) is noticed within 10 s: well within a
            // cached value's `max_stale` (30 s), which counts from then.
            .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
            .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        let connect = || match (config.unix_path(), &tls) {
            (Some(path), _) => endpoint.connect_with_connector_lazy(unix_connector(path)),
            (None, Some(server)) => endpoint.connect_with_connector_lazy(tls_connector(server)),
            (None, None) => endpoint.connect_lazy(),
        };
        let calls = connect();
        Ok(Self {
            watches: SecretsServiceClient::new(connect()),
            secrets: SecretsServiceClient::new(calls.clone()),
            admin: AdminServiceClient::new(calls.clone()),
            health: HealthClient::new(calls),
            max_retries: config.max_retries,
            request_timeout: config.request_timeout,
            endpoint: config.endpoint.as_str().into(),
            tls: tls.is_some(),
        })
    }

    /// A unary request with the call deadline (watch streams have none).
    fn request<T>(&self, message: T) -> tonic::Request<T> {
        request_within(message, self.request_timeout)
    }

    /// Where watch streams go: the client's connection for them.
    pub(crate) fn origin(&self) -> watch::Origin {
        watch::Origin {
            client: self.watches.clone(),
            endpoint: std::sync::Arc::clone(&self.endpoint),
            tls: self.tls,
        }
    }

    /// The error of a failed call: the broker's, or the connection's.
    fn error(&self, status: tonic::Status) -> Error {
        Error::from_call(status, &self.endpoint, self.tls)
    }

    /// `call`, cut at `deadline`. tonic bounds a request by its
    /// `grpc-timeout` only once it is on a connection: the wait for the
    /// connection itself (up to `connect_timeout` per attempt, against an
    /// address that drops packets) is bounded here.
    async fn by<T>(
        &self,
        deadline: Instant,
        call: impl Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        tokio::time::timeout_at(deadline, call)
            .await
            .unwrap_or_else(|_| {
                Err(Error::Unreachable {
                    endpoint: self.endpoint.to_string(),
                    reason: format!(
                        "no answer within the request timeout ({:?}), waiting for the \
                         connection or the broker: timed out (BROKER_ENDPOINT, the network, \
                         a firewall)",
                        self.request_timeout
                    ),
                })
            })
    }

    /// One call with the call deadline, no retries.
    async fn once<T>(
        &self,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, Error> {
        self.by(Instant::now() + self.request_timeout, self.answered(call))
            .await
    }

    /// A call's message, or its error.
    async fn answered<T>(
        &self,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, Error> {
        call.await
            .map(tonic::Response::into_inner)
            .map_err(|status| self.error(status))
    }

    /// Runs an idempotent call, retrying UNAVAILABLE with backoff, all of
    /// it within `request_timeout` (a call's time, not an attempt's):
    /// `call` is given the time its attempt may take.
    async fn retrying<T, F, Fut>(&self, call: F) -> Result<T, Error>
    where
        F: Fn(Duration) -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        let deadline = Instant::now() + self.request_timeout;
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 0;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.by(deadline, call(left)).await {
                Err(error)
                    if error.is_retryable()
                        && attempt < self.max_retries
                        // Time for the wait and for some of an attempt.
                        && deadline.saturating_duration_since(Instant::now()) > backoff * 2 =>
                {
                    attempt += 1;
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
                result => return result,
            }
        }
    }

    /// One idempotent SecretsService call, with deadline and retries.
    async fn call<Req, Resp, Rpc, Fut>(&self, message: Req, rpc: Rpc) -> Result<Resp, Error>
    where
        Req: Clone,
        Rpc: Fn(SecretsServiceClient<Channel>, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        self.retrying(|left| {
            self.answered(rpc(
                self.secrets.clone(),
                request_within(message.clone(), left),
            ))
        })
        .await
    }

    /// Reads a secret by short name, full name or ARN; chain
    /// `.version_id(..)`, `.version_stage(..)` or `.bypass_cache()` before
    /// awaiting.
    pub fn get_secret(&self, name: impl Into<String>) -> GetSecret<'_> {
        GetSecret {
            client: self,
            request: proto::GetSecretRequest {
                name: name.into(),
                ..Default::default()
            },
        }
    }

    /// Reads several current secrets at once; each name has its own
    /// outcome, in order.
    pub async fn batch_get_secrets(
        &self,
        names: &[&str],
    ) -> Result<Vec<(String, Result<SecretValue, Error>)>, Error> {
        let request = proto::BatchGetSecretsRequest {
            names: names.iter().map(|n| (*n).to_owned()).collect(),
            bypass_cache: false,
        };
        let response = self
            .call(
                request,
                |mut c, r| async move { c.batch_get_secrets(r).await },
            )
            .await?;
        Ok(response
            .results
            .into_iter()
            .map(|item| {
                let outcome = match item.result {
                    Some(proto::batch_get_secrets_result::Result::Secret(secret)) => {
                        Ok(SecretValue::from_proto(secret))
                    }
                    Some(proto::batch_get_secrets_result::Result::Error(error)) => {
                        let code = tonic::Code::from(error.code as i32);
                        Err(Error::from_parts(code, error.reason, None, error.message))
                    }
                    None => Err(Error::Decode("the broker sent an empty result".into())),
                };
                (item.name, outcome)
            })
            .collect())
    }

    /// A typed config at its default name (`<environment>/<kind>`); the
    /// four below are this with their type.
    pub async fn get_config<C: TypedConfig>(&self) -> Result<C, Error> {
        self.get_config_from::<C>("").await
    }

    /// A typed config read from the secret `name` (short name, full name
    /// or ARN) rather than its default, e.g. another service's database:
    /// `client.get_config_from::<DatabaseConfig>("billing/database")`.
    pub async fn get_config_from<C: TypedConfig>(&self, name: &str) -> Result<C, Error> {
        let response = self.typed_response::<C>(name).await?;
        C::config(response).ok_or_else(|| Error::Decode("the broker sent no config".into()))
    }

    /// A typed config's whole response (config, and where it came from).
    pub(crate) async fn typed_response<C: TypedConfig>(
        &self,
        name: &str,
    ) -> Result<C::Response, Error> {
        self.call(C::request(name), |client, request| C::call(client, request))
            .await
    }

    /// The JWT settings (`<environment>/jwt`).
    pub async fn get_jwt_config(&self) -> Result<proto::JwtConfig, Error> {
        self.get_config().await
    }

    /// The database settings (`<environment>/database`).
    pub async fn get_database_config(&self) -> Result<proto::DatabaseConfig, Error> {
        self.get_config().await
    }

    /// The AWS services settings (`<environment>/aws-services`).
    pub async fn get_aws_services_config(&self) -> Result<proto::AwsServicesConfig, Error> {
        self.get_config().await
    }

    /// The security settings (`<environment>/security`).
    pub async fn get_security_config(&self) -> Result<proto::SecurityConfig, Error> {
        self.get_config().await
    }

    /// The Mistral API key (`mistral-api-key`), as text.
    pub async fn get_mistral_api_key(&self) -> Result<Zeroizing<String>, Error> {
        let secret = self.get_secret("mistral-api-key").await?;
        secret
            .as_str()
            .map(|key| Zeroizing::new(key.to_owned()))
            .ok_or_else(|| Error::Decode("mistral-api-key is binary, not text".into()))
    }

    /// Whether the broker answers and reaches AWS: the gRPC health status
    /// of `secretsbroker.v1.SecretsService`, which any caller may ask (as
    /// the Python client's `test_connection`). `false` when the broker does
    /// not answer or is cut off from AWS; never an error.
    pub async fn test_connection(&self) -> bool {
        let mut health = self.health.clone();
        let request = self.request(HealthCheckRequest {
            service: "secretsbroker.v1.SecretsService".into(),
        });
        matches!(
            self.once(health.check(request)).await.map(|r| r.status()),
            Ok(ServingStatus::Serving)
        )
    }

    /// Whether the broker reaches AWS: `reachable` of
    /// AdminService.CheckUpstream (needs an admin identity); the rest of
    /// its answer (what was checked, the event consumer) is not returned.
    pub async fn check_upstream(&self) -> Result<bool, Error> {
        let mut client = self.admin.clone();
        let response = self
            .once(client.check_upstream(self.request(proto::CheckUpstreamRequest {})))
            .await?;
        Ok(response.reachable)
    }

    /// The broker's cache counters (needs an admin identity).
    pub async fn get_cache_stats(&self) -> Result<proto::GetCacheStatsResponse, Error> {
        let mut client = self.admin.clone();
        self.once(client.get_cache_stats(self.request(proto::GetCacheStatsRequest {})))
            .await
    }

    /// Drops these secrets from the broker's cache, or everything when
    /// `names` is empty; returns how many entries went (needs admin).
    pub async fn clear_cache(&self, names: &[&str]) -> Result<u64, Error> {
        let mut client = self.admin.clone();
        let request = proto::ClearCacheRequest {
            names: names.iter().map(|n| (*n).to_owned()).collect(),
        };
        Ok(self
            .once(client.clear_cache(self.request(request)))
            .await?
            .cleared)
    }

    /// Makes the broker re-read a secret now; returns its metadata and
    /// whether the version changed (needs admin).
    pub async fn refresh_secret(&self, name: &str) -> Result<(SecretValue, bool), Error> {
        let mut client = self.admin.clone();
        let request = proto::RefreshSecretRequest { name: name.into() };
        let response = self
            .once(client.refresh_secret(self.request(request)))
            .await?;
        let secret = response
            .secret
            .ok_or_else(|| Error::Decode("the broker sent no secret".into()))?;
        Ok((SecretValue::from_proto(secret), response.changed))
    }

    /// Follows a secret's current version: the state at once, then each
    /// rotation, deletion and restoration. The stream reconnects by itself
    /// (with backoff, telling the broker the version it holds), so a broker
    /// restart loses no rotation; it ends only on an error that a retry
    /// cannot fix (not found, access denied), or when dropped.
    ///
    /// ```no_run
    /// # async fn run(client: secrets_broker_client::SecretsClient) {
    /// use futures::StreamExt;
    /// let mut events = client.watch_secret("production/jwt");
    /// while let Some(event) = events.next().await {
    ///     match event {
    ///         Ok(event) => println!("{:?} {}", event.kind, event.secret.version_id()),
    ///         Err(error) => eprintln!("watch ended: {error}"),
    ///     }
    /// }
    /// # }
    /// ```
    pub fn watch_secret(&self, name: impl Into<String>) -> WatchStream {
        watch::follow(self.origin(), name.into(), String::new())
    }

    /// Like `watch_secret`, for another staging label.
    pub fn watch_secret_stage(
        &self,
        name: impl Into<String>,
        stage: impl Into<String>,
    ) -> WatchStream {
        watch::follow(self.origin(), name.into(), stage.into())
    }
}

/// A GetSecret call being built; await it (or call `send`).
#[must_use = "a GetSecret does nothing until awaited"]
pub struct GetSecret<'a> {
    client: &'a SecretsClient,
    request: proto::GetSecretRequest,
}

impl GetSecret<'_> {
    /// Reads this version id.
    pub fn version_id(mut self, version_id: impl Into<String>) -> Self {
        self.request.version_id = version_id.into();
        self
    }

    /// Reads the version with this staging label (default AWSCURRENT).
    pub fn version_stage(mut self, stage: impl Into<String>) -> Self {
        self.request.version_stage = stage.into();
        self
    }

    /// Asks AWS now; the answer also refreshes the broker's cache. When AWS
    /// cannot answer, this is an error (`Unavailable`, reason
    /// `UPSTREAM_UNAVAILABLE`), never the broker's older value: a read
    /// without `bypass_cache` gets that, marked `cache().stale`.
    pub fn bypass_cache(mut self) -> Self {
        self.request.bypass_cache = true;
        self
    }

    /// Sends the call.
    pub async fn send(self) -> Result<SecretValue, Error> {
        let bypass = self.request.bypass_cache;
        let response = self
            .client
            .call(
                self.request,
                |mut c, r| async move { c.get_secret(r).await },
            )
            .await?;
        let secret = response
            .secret
            .ok_or_else(|| Error::Decode("the broker sent no secret".into()))?;
        let secret = SecretValue::from_proto(secret);
        // The broker answers a bypass read AWS failed with its last good
        // value, marked stale: that is not what this read asked for.
        if bypass && secret.cache().stale {
            return Err(Error::Unavailable {
                reason: "UPSTREAM_UNAVAILABLE".into(),
                message: format!(
                    "AWS could not be read now for {}; the broker's last good value is {} s \
                     old (a read without bypass_cache serves it, marked stale)",
                    secret.name(),
                    secret.cache().age.as_secs()
                ),
            });
        }
        Ok(secret)
    }
}

impl<'a> IntoFuture for GetSecret<'a> {
    type Output = Result<SecretValue, Error>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send + 'a>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.send())
    }
}
/// A unary request that may take `timeout` (its `grpc-timeout`).
fn request_within<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    request
}

/// Connects every (re)connection of the channel to the unix socket at
/// `path`.
fn unix_connector(
    path: &str,
) -> impl tower::Service<
    tonic::transport::Uri,
    Response = hyper_util::rt::TokioIo<tokio::net::UnixStream>,
    Error = std::io::Error,
    Future = impl Send,
> + Clone
+ Send
+ 'static {
    let path = std::path::PathBuf::from(path);
    tower::service_fn(move |_: tonic::transport::Uri| {
        let path = path.clone();
        async move {
            let stream = tokio::net::UnixStream::connect(path).await?;
            Ok(hyper_util::rt::TokioIo::new(stream))
        }
    })
}

/// Where a mutual-TLS broker is, and the files to present to it.
#[derive(Clone)]
struct TlsServer {
    host: String,
    port: u16,
    /// The name its certificate must carry.
    name: rustls::pki_types::ServerName<'static>,
    /// CA, certificate, key.
    files: std::sync::Arc<[std::path::PathBuf; 3]>,
}

impl TlsServer {
    /// The broker at `url` (https), its certificate to name
    /// `BROKER_TLS_DOMAIN` or else the URL's host.
    fn at(
        url: &str,
        config: &ClientConfig,
        [ca, cert, key]: [&std::path::PathBuf; 3],
    ) -> Result<Self, Error> {
        let uri: tonic::transport::Uri = url
            .parse()
            .map_err(|e| Error::Config(format!("endpoint {}: {e}", config.endpoint)))?;
        // An IPv6 host comes in brackets; neither a socket address nor a
        // certificate's name has them.
        let host = uri
            .host()
            .unwrap_or_default()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let domain = config.tls_domain.clone().unwrap_or_else(|| host.clone());
        let name = rustls::pki_types::ServerName::try_from(domain).map_err(|e| {
            Error::Config(format!(
                "BROKER_TLS_DOMAIN (or the endpoint's host) is not a DNS name or IP address: {e}"
            ))
        })?;
        Ok(Self {
            name,
            port: uri.port_u16().unwrap_or(443),
            host,
            files: [ca.clone(), cert.clone(), key.clone()].into(),
        })
    }
}

/// Each new connection: TCP, then TLS with the files read now (see
/// `tls_files`). A file that cannot be used fails that connection with
/// the setting's name, and the next connection reads them again.
fn tls_connector(
    server: &TlsServer,
) -> impl tower::Service<
    tonic::transport::Uri,
    Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    Error = std::io::Error,
    Future = impl Send,
> + Clone
+ Send
+ 'static {
    let server = server.clone();
    tower::service_fn(move |_: tonic::transport::Uri| {
        let server = server.clone();
        async move {
            let [ca, cert, key] = &*server.files;
            // Typed, so that the call's error is this one (`Error::from_call`).
            let config =
                crate::tls_files::client_config(ca, cert, key).map_err(std::io::Error::other)?;
            let name = server.name.clone();
            let tcp = tokio::net::TcpStream::connect((server.host.as_str(), server.port)).await?;
            tcp.set_nodelay(true)?;
            let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
                .connect(name, tcp)
                .await?;
            Ok(hyper_util::rt::TokioIo::new(tls))
        }
    })
}
