//! The transport: the tonic server with the broker's services, gRPC health,
//! and server reflection (v1, and v1alpha for older grpcurl), on a TCP
//! address or a unix socket, until a shutdown signal.

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
    proto::{
        self, admin_service_server::AdminServiceServer,
        secrets_service_server::SecretsServiceServer,
    },
    watch::WatchHub,
};

/// Why the broker could not start or stopped on an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Secrets(#[from] FileStoreError),
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
/// ignoring them: a policy that is silently not enforced is worse than none.
pub fn ensure_supported(settings: &Settings) -> Result<(), ServeError> {
    if settings.tls.is_some() {
        return Err(ServeError::NotYetAvailable("mutual TLS (--tls-cert...)"));
    }
    if settings.policy.is_some() {
        return Err(ServeError::NotYetAvailable(
            "the authorization policy (--policy)",
        ));
    }
    if settings.metrics_listen.is_some() {
        return Err(ServeError::NotYetAvailable(
            "the metrics endpoint (--metrics-listen)",
        ));
    }
    Ok(())
}

/// The store the settings choose.
pub fn open_store(settings: &Settings) -> Result<Arc<dyn SecretStore>, ServeError> {
    ensure_supported(settings)?;
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
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let cache = Cache::new(Arc::clone(&store), settings.cache);
    let watch = WatchHub::new(cache.clone(), settings.watch_interval);
    let detector = watch.spawn_detector();
    let context = ApiContext {
        cache,
        names: name_resolver(settings),
        watch: watch.clone(),
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
    match &settings.listen {
        ListenAddr::Tcp(addr) => {
            // Small unary answers must leave at once, not wait for Nagle.
            let incoming = TcpIncoming::bind(*addr)
                .map_err(listen_error)?
                .with_nodelay(Some(true));
            tracing::info!(addr = %settings.listen, "listening");
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await?;
        }
        ListenAddr::Unix(path) => {
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
