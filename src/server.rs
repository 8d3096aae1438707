//! The transport: the tonic server with the broker's services, gRPC health,
//! and server reflection (v1, and v1alpha for older grpcurl), on a TCP
//! address (plaintext on loopback, or mutual TLS) or a unix socket, until a
//! shutdown signal. The TLS files and the policy follow their files and
//! reload on SIGHUP.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
};

use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic_health::server::HealthReporter;
use tower::util::MapResponseLayer;

use crate::{
    api::{AdminApi, ApiContext, SecretsApi},
    backend::{AwsStore, FileStore, SecretStore, file::FileStoreError},
    cache::Cache,
    config::{BackendChoice, ListenAddr, Settings},
    metrics::{self, BrokerState, MeteredStore, Metrics, Probes},
    names::NameResolver,
    policy::{Authorizer, PolicyError},
    proto::{
        self, admin_service_server::AdminServiceServer,
        secrets_service_server::SecretsServiceServer,
    },
    transport::{
        gate::GateLayer,
        listener::{self, Bound, ConnectionCounters, ConnectionLimits},
        tls::{TlsError, TlsTerminator},
    },
    watch::WatchHub,
};

/// Why the broker could not start or stopped on an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Secrets(#[from] FileStoreError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("mutual TLS is served on TCP addresses only, not on {0}")]
    TlsOnUnixSocket(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("the server stopped: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Refuses combinations the broker cannot serve.
pub fn ensure_supported(settings: &Settings) -> Result<(), ServeError> {
    if let (Some(_), ListenAddr::Unix(_)) = (&settings.tls, &settings.listen) {
        return Err(ServeError::TlsOnUnixSocket(settings.listen.to_string()));
    }
    Ok(())
}

/// Who may connect and what they may do: the TLS terminator (when mutual
/// TLS is on) and the authorizer, both following their files.
#[derive(Clone)]
pub struct Security {
    pub tls: Option<Arc<TlsTerminator>>,
    pub authorizer: Arc<Authorizer>,
}

impl Security {
    pub fn load(settings: &Settings) -> Result<Self, ServeError> {
        ensure_supported(settings)?;
        let tls = settings.tls.as_ref().map(TlsTerminator::load).transpose()?;
        let authorizer = Authorizer::new(settings.policy.as_deref(), tls.is_some())?;
        Ok(Self { tls, authorizer })
    }

    /// Reloads on file changes (until dropped) and on SIGHUP.
    fn follow_changes(&self) -> tokio::task::JoinHandle<()> {
        if let Some(tls) = &self.tls
            && let Err(error) = tls.follow_files()
        {
            tracing::warn!(%error, "cannot follow the TLS files; they reload on SIGHUP only");
        }
        if let Err(error) = self.authorizer.follow_file() {
            tracing::warn!(%error, "cannot follow the policy file; it reloads on SIGHUP only");
        }
        let security = self.clone();
        tokio::spawn(async move {
            let Ok(mut hangups) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            else {
                return;
            };
            while hangups.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading certificates and policy");
                if let Some(tls) = &security.tls {
                    tls.reload_and_log();
                }
                security.authorizer.reload_and_log();
            }
        })
    }
}

/// The store the settings choose.
pub fn open_store(settings: &Settings) -> Result<Arc<dyn SecretStore>, ServeError> {
    let names = name_resolver(settings);
    match &settings.backend {
        BackendChoice::File { path: Some(path) } => {
            let store = Arc::new(FileStore::open(path, &names)?);
            // Edits of the file reach watchers at once; without the watch
            // they still do, at the detector's next round.
            if let Err(error) = store.watch_file() {
                tracing::warn!(%error, file = %path.display(), "cannot follow the secrets file; its changes are polled");
            }
            Ok(store)
        }
        BackendChoice::File { path: None } => Ok(Arc::new(FileStore::dev(&names)?)),
        BackendChoice::Aws { region } => Ok(Arc::new(AwsStore::new(region))),
    }
}

pub fn name_resolver(settings: &Settings) -> NameResolver {
    NameResolver::new(&settings.secret_prefix, &settings.environment)
}

/// Serves until `shutdown` completes; then ends watch streams, lets calls
/// in flight finish within the shutdown grace, and returns.
pub async fn serve(
    settings: &Settings,
    store: Arc<dyn SecretStore>,
    security: Security,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let metrics = Metrics::new(settings.metrics_secret_names);
    let store = MeteredStore::wrap(store, metrics.clone());
    let reloads = security.follow_changes();
    let cache = Cache::new(Arc::clone(&store), settings.cache);
    let watch = WatchHub::new(cache.clone(), settings.watch_interval);
    let detector = watch.spawn_detector();
    let connections = Arc::new(ConnectionCounters::default());
    metrics.watch_state(BrokerState {
        cache: cache.clone(),
        watch: watch.clone(),
        connections: Arc::clone(&connections),
        tls: security.tls.clone(),
        authorizer: Arc::clone(&security.authorizer),
    });
    let context = ApiContext {
        cache,
        names: name_resolver(settings),
        watch: watch.clone(),
        authorizer: Arc::clone(&security.authorizer),
        metrics: metrics.clone(),
        call_timeout: settings.limits.call_timeout,
    };

    // One signal, several listeners: the watch streams end first (they
    // never finish by themselves), then the servers drain.
    let stopping = CancellationToken::new();
    let trigger = stopping.clone();
    let signal_task = tokio::spawn(async move {
        shutdown.await;
        watch.shutdown();
        trigger.cancel();
    });

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    mark_serving(&health_reporter).await;
    let upstream_up = Arc::new(AtomicBool::new(true));
    let upstream_watch = UpstreamHealth {
        store,
        reporter: health_reporter,
        every: settings.watch_interval,
        up: Arc::clone(&upstream_up),
    }
    .spawn();
    let metrics_server = match settings.metrics_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Listen {
                    addr: addr.to_string(),
                    source,
                })?;
            tracing::info!(%addr, "metrics and probes listening");
            let probes = Probes {
                metrics: metrics.clone(),
                upstream_up,
            };
            Some(tokio::spawn(metrics::serve(
                listener,
                probes,
                stopping.clone().cancelled_owned(),
            )))
        }
        None => None,
    };

    let limits = &settings.limits;
    // Every stream holds a call slot of its connection from its headers on
    // (transport::gate); h2's own cap, advertised to peers, sits above
    // that, so that a peer ignoring the slots' answers can hold at most
    // twice the limit before h2 refuses streams itself.
    let stream_cap =
        u32::try_from(limits.max_calls_per_connection.saturating_mul(2)).unwrap_or(u32::MAX);
    let router = Server::builder()
        .max_concurrent_streams(Some(stream_cap))
        .http2_keepalive_interval(Some(limits.keepalive_interval))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .layer(GateLayer::new(limits.call_timeout))
        .layer(MapResponseLayer::new(
            message_too_large_is_resource_exhausted,
        ))
        .add_service(health_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .add_service(
            SecretsServiceServer::new(SecretsApi::new(context.clone()))
                .max_decoding_message_size(limits.max_message_size),
        )
        .add_service(
            AdminServiceServer::new(AdminApi::new(context))
                .max_decoding_message_size(limits.max_message_size),
        );

    let bound = bind(&settings.listen).await?;
    let mode = if security.tls.is_some() {
        "mutual TLS"
    } else {
        "plaintext"
    };
    tracing::info!(addr = %settings.listen, mode, "listening");
    let bounds = ConnectionLimits {
        max_connections: limits.max_connections,
        max_calls_per_connection: limits.max_calls_per_connection,
        first_request_timeout: limits.first_request_timeout,
    };
    let incoming = listener::incoming(
        bound,
        security.tls.clone(),
        bounds,
        connections,
        stopping.clone(),
    );
    let drain = stopping.clone().cancelled_owned();
    let serving = async {
        router.serve_with_incoming_shutdown(incoming, drain).await?;
        Ok::<(), ServeError>(())
    };
    let grace = limits.shutdown_grace;
    let outcome = tokio::select! {
        outcome = serving => outcome,
        () = async { stopping.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(?grace, "calls still in flight after the shutdown grace; stopping anyway");
            Ok(())
        }
    };
    signal_task.abort();
    upstream_watch.abort();
    detector.abort();
    reloads.abort();
    if let Some(server) = metrics_server {
        server.abort();
    }
    tracing::info!("stopped");
    outcome
}

/// How long an HTTP/2 ping may go unanswered before the connection (and
/// its watch streams) is dropped.
const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// tonic answers a request over `max_decoding_message_size` with
/// OUT_OF_RANGE; gRPC's convention (and our contract) is RESOURCE_EXHAUSTED.
/// The broker's own handlers never answer OUT_OF_RANGE, so the remap
/// touches nothing else.
fn message_too_large_is_resource_exhausted<B>(
    mut response: http::Response<B>,
) -> http::Response<B> {
    let out_of_range = http::HeaderValue::from_static("11");
    if response.headers().get("grpc-status") == Some(&out_of_range) {
        response
            .headers_mut()
            .insert("grpc-status", http::HeaderValue::from_static("8"));
    }
    response
}

/// Keeps the health status of `secretsbroker.v1.SecretsService` in step with
/// the upstream: NOT_SERVING while the store does not answer its check, so
/// that load balancers and probes can route around a broker cut off from
/// AWS. (The overall "" status stays SERVING: the process is alive and may
/// still serve cached values.)
struct UpstreamHealth {
    store: Arc<dyn SecretStore>,
    reporter: HealthReporter,
    every: std::time::Duration,
    /// Read by the readiness probe.
    up: Arc<AtomicBool>,
}

impl UpstreamHealth {
    fn spawn(self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(self.every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut was_up = true;
            loop {
                ticks.tick().await;
                let up = match self.store.check().await {
                    Ok(_) => true,
                    Err(error) => {
                        if was_up {
                            tracing::warn!(%error, "upstream check failed");
                        }
                        false
                    }
                };
                if up != was_up {
                    self.up.store(up, Relaxed);
                    self.report(up).await;
                    if up {
                        tracing::info!("upstream check succeeds again");
                    }
                    was_up = up;
                }
            }
        })
    }

    async fn report(&self, up: bool) {
        if up {
            self.reporter
                .set_serving::<SecretsServiceServer<SecretsApi>>()
                .await;
        } else {
            self.reporter
                .set_not_serving::<SecretsServiceServer<SecretsApi>>()
                .await;
        }
    }
}

/// Reflection knows the contract, health, and `google.rpc` error details,
/// so that grpcurl can decode the ErrorInfo of an error too.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
}

async fn mark_serving(reporter: &HealthReporter) {
    reporter
        .set_serving::<SecretsServiceServer<SecretsApi>>()
        .await;
    reporter.set_serving::<AdminServiceServer<AdminApi>>().await;
}

/// Binds the broker's listening socket.
async fn bind(listen: &ListenAddr) -> Result<Bound, ServeError> {
    let listen_error = |source| ServeError::Listen {
        addr: listen.to_string(),
        source,
    };
    match listen {
        ListenAddr::Tcp(addr) => Ok(Bound::Tcp(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(listen_error)?,
        )),
        ListenAddr::Unix(path) => {
            remove_stale_socket(path).map_err(listen_error)?;
            Ok(Bound::Unix(
                tokio::net::UnixListener::bind(path).map_err(listen_error)?,
            ))
        }
    }
}

/// A socket file left by a broker that did not stop cleanly blocks `bind`;
/// anything else at that path is left alone (bind then fails clearly).
fn remove_stale_socket(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path),
        _ => Ok(()),
    }
}

/// Completes on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown requested; finishing calls in flight");
}
