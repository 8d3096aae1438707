//! Start-up: the broker built from `Settings` in one step, run in another.
//!
//! `Listeners::bind` (in `transport::bind`) binds the sockets (so that a
//! test can bind port 0 and learn the address); `App::build` makes every
//! part from the settings (store, security, metrics, cache, watch hub,
//! events); `App::run` adds the health service, whose statuses follow the
//! run, and serves until a shutdown future completes. One `JoinSet` owns
//! the background tasks (sweep, upstream check, reloads, accept loop, probe
//! server) and one token tells them to stop; the event consumer is awaited
//! on its own first (in topic mode it removes its queue on the way out) and
//! cut if its clean-up overruns. When `run` returns, none of them is left,
//! and the listening sockets are closed.
//!
//! Shutdown order: the watch streams end first (`WatchHub::shutdown`: they
//! never finish by themselves), the accept loop stops and drops its socket,
//! idle connections close, calls in flight get `--shutdown-grace` to
//! finish. The probe endpoint answers until the end, `/readyz` with 503.

use std::{future::Future, sync::Arc};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic_health::pb::health_server::{Health as HealthRpc, HealthServer};

use crate::{
    api::{ApiContext, CallMetrics},
    backend::{AwsStore, FileStore, MeteredStore, SecretStore, file::FileStoreError},
    cache::Cache,
    config::{BackendChoice, ListenAddr, Settings},
    events::Events,
    health::Health,
    metrics::Metrics,
    names::NameResolver,
    policy::{Authorizer, PolicyError},
    reload::{self, Reload},
    transport::{
        bind::BindError,
        call_slots::CallSlots,
        descriptors,
        listener::{self, ConnectionCounters},
        server::{self, ServerError},
        tls::{TlsError, TlsTerminator},
    },
    watch::WatchHub,
};

pub use crate::transport::bind::Listeners;

/// Why the broker could not start or stopped on an error.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // each variant's #[error] message is its documentation
pub enum AppError {
    #[error(transparent)]
    Secrets(#[from] FileStoreError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Listen(#[from] BindError),
    #[error(transparent)]
    Server(#[from] ServerError),
}

/// Who may connect and what they may do: the TLS terminator (when mutual
/// TLS is on) and the authorizer, both following their files.
#[derive(Clone)]
pub struct Security {
    /// The TLS side, when mutual TLS is on.
    pub tls: Option<Arc<TlsTerminator>>,
    /// The policy in force.
    pub authorizer: Arc<Authorizer>,
}

impl Security {
    /// Reads the certificates and the policy the settings name.
    pub fn load(settings: &Settings) -> Result<Self, AppError> {
        let tls = settings.tls.as_ref().map(TlsTerminator::load).transpose()?;
        let authorizer = Authorizer::for_prefix(
            settings.policy.as_deref(),
            tls.is_some(),
            name_resolver(settings).prefix(),
        )?;
        Ok(Self { tls, authorizer })
    }

    /// The values that follow their files: certificates and policy.
    fn reloadables(&self) -> Vec<Arc<dyn Reload>> {
        let mut values = vec![self.authorizer.reloadable()];
        values.extend(self.tls.as_ref().map(|tls| tls.reloadable()));
        values
    }
}

/// The store the settings choose, and what of it follows a file.
pub struct Store {
    /// The store.
    pub store: Arc<dyn SecretStore>,
    /// The secrets file, when there is one: edits reach watchers at once.
    pub file: Option<Arc<dyn Reload>>,
}

/// Opens the store the settings choose.
pub fn open_store(settings: &Settings) -> Result<Store, AppError> {
    let names = name_resolver(settings);
    Ok(match &settings.backend {
        BackendChoice::File { path } => {
            let store = FileStore::open(path, &names)?;
            let file = Some(store.reloadable());
            Store {
                store: Arc::new(store),
                file,
            }
        }
        BackendChoice::Dev => Store {
            store: Arc::new(FileStore::dev(&names)?),
            file: None,
        },
        BackendChoice::Aws { region } => Store {
            store: Arc::new(AwsStore::new(region)),
            file: None,
        },
    })
}

/// The name resolver the settings' prefix and environment make.
pub fn name_resolver(settings: &Settings) -> NameResolver {
    NameResolver::new(&settings.secret_prefix, &settings.environment)
}

/// The broker, built and ready to run.
pub struct App {
    settings: Settings,
    listeners: Listeners,
    security: Security,
    reloadables: Vec<Arc<dyn Reload>>,
    metrics: Metrics,
    watch: WatchHub,
    context: ApiContext,
    connections: Arc<ConnectionCounters>,
    calls: CallSlots,
}

impl App {
    /// Builds every part from the settings, on already-bound listeners.
    pub fn build(settings: &Settings, listeners: Listeners) -> Result<Self, AppError> {
        let mut settings = settings.clone();
        if let Some(descriptors) = descriptors::fit_connections(&settings.limits) {
            if let Some(warning) = descriptors.shortfall(settings.limits.max_connections) {
                tracing::warn!("{warning}");
            }
            settings.limits.max_connections = descriptors.connections;
        }
        let settings = &settings;
        let security = Security::load(settings)?;
        for warning in security
            .authorizer
            .warnings(name_resolver(settings).prefix())
        {
            tracing::warn!("policy {warning}");
        }
        if let Some(tls) = &security.tls {
            tls.warn_if_expiring_soon();
        }
        let Store { store, file } = open_store(settings)?;
        let mut app = Self::assemble(settings, listeners, security, store);
        app.reloadables.extend(file);
        Ok(app)
    }

    /// Builds the broker's parts over the opened store.
    fn assemble(
        settings: &Settings,
        listeners: Listeners,
        security: Security,
        store: Arc<dyn SecretStore>,
    ) -> Self {
        let metrics = Metrics::new();
        let store = MeteredStore::wrap(store, &metrics);
        let cache = Cache::new(Arc::clone(&store), settings.cache);
        cache.register_metrics(&metrics);
        let names = name_resolver(settings);
        let watch = WatchHub::new(cache.clone(), settings.watch_interval, names.prefix());
        watch.register_metrics(&metrics);
        let events = Events::new(settings.events.clone());
        events.register_metrics(&metrics);
        let connections = Arc::new(ConnectionCounters::default());
        connections.register_metrics(&metrics);
        let calls = CallSlots::new(settings.limits.max_calls);
        calls.register_metrics(&metrics);
        security.authorizer.register_metrics(&metrics);
        if let Some(tls) = &security.tls {
            tls.register_metrics(&metrics);
        }
        let context = ApiContext {
            cache,
            names,
            watch: watch.clone(),
            events,
            authorizer: Arc::clone(&security.authorizer),
            metrics: CallMetrics::register(&metrics, settings.metrics_secret_names),
            call_timeout: settings.limits.call_timeout,
        };
        Self {
            settings: settings.clone(),
            listeners,
            reloadables: security.reloadables(),
            security,
            metrics,
            watch,
            context,
            connections,
            calls,
        }
    }

    /// Serves until `shutdown` completes, then drains (see the module doc)
    /// and returns once every task of the broker has ended.
    pub async fn run(
        mut self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), AppError> {
        let stop = CancellationToken::new();
        // The probe endpoint answers until the very end (see `probes`).
        let probes_stop = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let (health, health_service) = Health::new(stop.clone()).await;
        health.register_metrics(&self.metrics);
        for value in &self.reloadables {
            Arc::clone(value).register_metrics(&self.metrics);
        }
        self.spawn_background(&mut tasks, &health, &stop, &probes_stop);
        // Awaited on its own before the others are stopped: in topic mode
        // it removes its queue and subscription on the way out.
        let events = tokio::spawn(
            self.context.events.clone().consume(
                self.settings
                    .backend
                    .region()
                    .unwrap_or_default()
                    .to_owned(),
                self.settings.host_name.clone(),
                self.watch.clone(),
                stop.clone(),
            ),
        );
        tasks.spawn(stop_on(shutdown, self.watch.clone(), stop.clone()));
        // When the stop came: the event queue's clean-up starts then, and
        // its time is counted from then.
        let stopped_at = {
            let stop = stop.clone();
            tokio::spawn(async move {
                stop.cancelled().await;
                tokio::time::Instant::now()
            })
        };

        let watch = self.watch.clone();
        let socket = match &self.settings.listen {
            ListenAddr::Unix(path) => Some(path.clone()),
            ListenAddr::Tcp(_) => None,
        };
        let outcome = self.serve(&mut tasks, health_service, &stop).await;
        stop.cancel();
        watch.shutdown();
        let cleanup_ends = stopped_at
            .await
            .unwrap_or_else(|_| tokio::time::Instant::now())
            + EVENTS_CLEANUP;
        let mut events = events;
        let ended = tokio::select! {
            finished = tokio::time::timeout_at(cleanup_ends, &mut events) => {
                if finished.is_err() {
                    tracing::warn!(
                        ?EVENTS_CLEANUP,
                        "the event consumer did not finish its clean-up in time"
                    );
                }
                finished.is_ok()
            },
            () = crate::signals::received() => {
                tracing::warn!("a stop signal during the event queue's clean-up: stopping now");
                false
            }
        };
        // Cut if it overran or a second signal came: no task outlives `run`.
        if !ended {
            events.abort();
            let _ = events.await;
        }
        probes_stop.cancel();
        tasks.shutdown().await;
        // A unix socket's file outlives its listener: removed, so that the
        // path does not look like a broker still there.
        if let Some(path) = socket {
            let _ = std::fs::remove_file(path);
        }
        tracing::info!("stopped");
        outcome
    }

    /// Starts what runs beside the calls: file reloads, the sweep, the
    /// upstream health check and the probe endpoint.
    fn spawn_background(
        &mut self,
        tasks: &mut JoinSet<()>,
        health: &Health,
        stop: &CancellationToken,
        probes_stop: &CancellationToken,
    ) {
        tasks.spawn(reload::follow(self.reloadables.clone(), stop.clone()));
        tasks.spawn(self.watch.clone().sweep());
        tasks.spawn(health.clone().follow_upstream(
            // The cache's store: the upstream bound applies to the check too.
            Arc::clone(self.context.cache.upstream()),
            self.settings.watch_interval,
            stop.clone(),
        ));
        if let Some(listener) = self.listeners.probes.take() {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "metrics and probes listening");
            }
            let probes = crate::probes::serve(
                listener,
                self.metrics.clone(),
                health.clone(),
                probes_stop.clone().cancelled_owned(),
            );
            tasks.spawn(async move {
                if let Err(error) = probes.await {
                    tracing::warn!(%error, "the probe endpoint stopped");
                }
            });
        }
    }

    /// Accepts and serves calls until `stop`, then lets calls in flight
    /// finish within the shutdown grace.
    async fn serve(
        self,
        tasks: &mut JoinSet<()>,
        health_service: HealthServer<impl HealthRpc>,
        stop: &CancellationToken,
    ) -> Result<(), AppError> {
        let limits = &self.settings.limits;
        let mode = if self.security.tls.is_some() {
            "mutual TLS"
        } else {
            "plaintext"
        };
        // The bound address: with port 0 the system chose the port.
        match self.listeners.grpc_addr() {
            Some(addr) => tracing::info!(%addr, mode, "listening"),
            None => tracing::info!(addr = %self.settings.listen, mode, "listening"),
        }
        let (incoming, accept_loop) = listener::incoming(
            self.listeners.grpc,
            self.security.tls.clone(),
            *limits,
            Arc::clone(&self.connections),
            stop.clone(),
        );
        tasks.spawn(accept_loop);
        let serving = server::serve(
            self.context,
            health_service,
            limits,
            self.calls.clone(),
            incoming,
            stop.clone(),
        );
        let grace = limits.shutdown_grace;
        let calls = self.calls;
        let cut = async {
            stop.cancelled().await;
            calls.end_opening();
            tokio::select! {
                () = tokio::time::sleep(grace) => {
                    tracing::warn!(?grace, "calls still in flight after the shutdown grace; stopping anyway");
                }
                // An operator pressing Ctrl-C twice means now.
                () = crate::signals::received() => {
                    tracing::warn!("a second stop signal: stopping now, calls in flight are cut");
                }
            }
        };
        tokio::select! {
            outcome = serving => outcome.map_err(AppError::from),
            () = cut => Ok(()),
        }
    }
}

/// Waits for `shutdown` (or another stop), then ends the watch streams and
/// stops everything else.
async fn stop_on(
    shutdown: impl Future<Output = ()> + Send + 'static,
    watch: WatchHub,
    stop: CancellationToken,
) {
    tokio::select! {
        () = shutdown => {}
        () = stop.cancelled() => {}
    }
    watch.shutdown();
    stop.cancel();
}

/// How long the event consumer may take to remove its queue on shutdown,
/// from the stop (the long poll in flight is cancelled then, and the
/// clean-up runs beside the drain): Unsubscribe and DeleteQueue against a
/// slow AWS may take this long. The broker waits for it after the drain,
/// up to this long past the stop; the deploy files leave 25 s past the
/// grace, so there is a margin.
const EVENTS_CLEANUP: std::time::Duration = std::time::Duration::from_secs(25);
