//! The transport: the tonic server with the broker's services, gRPC health,
//! and server reflection (v1, and v1alpha for older grpcurl), on a TCP
//! address (plaintext on loopback, or mutual TLS) or a unix socket, until a
//! shutdown signal. The TLS files and the policy follow their files and
//! reload on SIGHUP.

use std::{future::Future, sync::Arc};

use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::{Server, server::TcpIncoming};
use tonic_health::server::HealthReporter;

use crate::{
    api::{AdminApi, ApiContext, SecretsApi},
    backend::{AwsStore, FileStore, SecretStore, file::FileStoreError},
    cache::Cache,
    config::{BackendChoice, ListenAddr, Settings},
    names::NameResolver,
    policy::{Authorizer, PolicyError},
    proto::{
        self, admin_service_server::AdminServiceServer,
        secrets_service_server::SecretsServiceServer,
    },
    tls::{TlsError, TlsTerminator},
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
    #[error("{0} is not available in this version of the broker yet")]
    NotYetAvailable(&'static str),
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

/// Refuses settings whose feature this build does not have, rather than
/// ignoring them.
pub fn ensure_supported(settings: &Settings) -> Result<(), ServeError> {
    if settings.metrics_listen.is_some() {
        return Err(ServeError::NotYetAvailable(
            "the metrics endpoint (--metrics-listen)",
        ));
    }
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

/// Serves until `shutdown` completes, then lets in-flight calls finish.
pub async fn serve(
    settings: &Settings,
    store: Arc<dyn SecretStore>,
    security: Security,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let reloads = security.follow_changes();
    let cache = Cache::new(Arc::clone(&store), settings.cache);
    let watch = WatchHub::new(cache.clone(), settings.watch_interval);
    let detector = watch.spawn_detector();
    let context = ApiContext {
        cache,
        names: name_resolver(settings),
        watch: watch.clone(),
        authorizer: Arc::clone(&security.authorizer),
    };
    // Watch streams never finish by themselves: end them first, so that the
    // graceful shutdown only waits for calls in flight.
    let shutdown = async move {
        shutdown.await;
        watch.shutdown();
    };
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    mark_serving(&health_reporter).await;
    let upstream_watch = UpstreamHealth {
        store,
        reporter: health_reporter,
        every: settings.watch_interval,
    }
    .spawn();
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let router = Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(SecretsServiceServer::new(SecretsApi::new(context.clone())))
        .add_service(AdminServiceServer::new(AdminApi::new(context)));

    let listen_error = |source| ServeError::Listen {
        addr: settings.listen.to_string(),
        source,
    };
    match (&settings.listen, security.tls) {
        (ListenAddr::Tcp(addr), Some(tls)) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(listen_error)?;
            tracing::info!(addr = %settings.listen, "listening (mutual TLS)");
            router
                .serve_with_incoming_shutdown(tls.incoming(listener), shutdown)
                .await?;
        }
        (ListenAddr::Tcp(addr), None) => {
            // Small unary answers must leave at once, not wait for Nagle.
            let incoming = TcpIncoming::bind(*addr)
                .map_err(listen_error)?
                .with_nodelay(Some(true));
            tracing::info!(addr = %settings.listen, "listening");
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await?;
        }
        (ListenAddr::Unix(path), _) => {
            remove_stale_socket(path).map_err(listen_error)?;
            let listener = tokio::net::UnixListener::bind(path).map_err(listen_error)?;
            tracing::info!(addr = %settings.listen, "listening");
            router
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
                .await?;
        }
    }
    upstream_watch.abort();
    detector.abort();
    reloads.abort();
    tracing::info!("stopped");
    Ok(())
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
