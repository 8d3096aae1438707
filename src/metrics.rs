//! Prometheus metrics, and the HTTP endpoint that serves them with the
//! liveness and readiness probes (`/metrics`, `/healthz`, `/readyz`).
//!
//! Two kinds of figures:
//! - per-event ones, recorded where the event happens: calls by RPC and
//!   status code with their latency (at the API's edge, with the audit
//!   event), upstream calls by operation and outcome with their latency (a
//!   `SecretStore` decorator, so the cache and the backend stay unaware);
//! - state the components already count (cache, watchers, connections,
//!   TLS, policy), read when Prometheus scrapes, so nothing is counted
//!   twice.
//!
//! Secret names never become label values unless `--metrics-secret-names`
//! is set: they are unbounded (cardinality) and may say more than they
//! should (privacy).

use std::{
    fmt,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::ConstGauge,
        histogram::{Histogram, exponential_buckets},
        info::Info,
    },
    registry::Registry,
};

use crate::{
    backend::{BatchAnswer, SecretDescription, SecretStore, StoreError, VersionSelector},
    cache::Cache,
    policy::Authorizer,
    secret::SecretVersion,
    transport::listener::ConnectionCounters,
    transport::tls::TlsTerminator,
    watch::WatchHub,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    rpc: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    rpc: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    operation: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SecretLabels {
    secret: String,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// The broker's own RPCs, as the metrics and the audit trail name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rpc {
    GetSecret,
    BatchGetSecrets,
    GetJwtConfig,
    GetDatabaseConfig,
    GetAwsServicesConfig,
    GetSecurityConfig,
    WatchSecret,
    GetCacheStats,
    ClearCache,
    RefreshSecret,
    CheckUpstream,
}

const RPCS: usize = 11;
/// gRPC status codes run from 0 to 16.
const CODES: usize = 17;

impl Rpc {
    pub fn name(self) -> &'static str {
        match self {
            Self::GetSecret => "GetSecret",
            Self::BatchGetSecrets => "BatchGetSecrets",
            Self::GetJwtConfig => "GetJwtConfig",
            Self::GetDatabaseConfig => "GetDatabaseConfig",
            Self::GetAwsServicesConfig => "GetAwsServicesConfig",
            Self::GetSecurityConfig => "GetSecurityConfig",
            Self::WatchSecret => "WatchSecret",
            Self::GetCacheStats => "GetCacheStats",
            Self::ClearCache => "ClearCache",
            Self::RefreshSecret => "RefreshSecret",
            Self::CheckUpstream => "CheckUpstream",
        }
    }
}

fn latency_histogram() -> Histogram {
    // 50 µs to ~1.6 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

/// The broker's metrics; cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    shared: Arc<Shared>,
}

struct Shared {
    registry: Mutex<Registry>,
    calls: Family<CallLabels, Counter>,
    call_seconds: Histograms<RpcLabels>,
    /// Handles into `calls` and `call_seconds`, resolved on first use: a
    /// family lookup takes a lock and hashes labels, a handle is one atomic.
    call_counters: [[OnceLock<Counter>; CODES]; RPCS],
    call_histograms: [OnceLock<Histogram>; RPCS],
    upstream_calls: Family<UpstreamLabels, Counter>,
    upstream_seconds: Histograms<OperationLabels>,
    /// Only with `--metrics-secret-names`.
    secret_reads: Option<Family<SecretLabels, Counter>>,
}

impl Metrics {
    pub fn new(secret_names: bool) -> Self {
        let mut registry = Registry::with_prefix("secretsbroker");
        let calls = Family::<CallLabels, Counter>::default();
        registry.register("calls", "Calls by RPC and status code", calls.clone());
        let call_seconds = Histograms::<RpcLabels>::new_with_constructor(latency_histogram);
        registry.register(
            "call_duration_seconds",
            "Latency of calls by RPC",
            call_seconds.clone(),
        );
        let upstream_calls = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "upstream_calls",
            "Calls to the upstream store by operation and outcome",
            upstream_calls.clone(),
        );
        let upstream_seconds =
            Histograms::<OperationLabels>::new_with_constructor(latency_histogram);
        registry.register(
            "upstream_duration_seconds",
            "Latency of upstream calls by operation",
            upstream_seconds.clone(),
        );
        let secret_reads = secret_names.then(|| {
            let family = Family::<SecretLabels, Counter>::default();
            registry.register("secret_reads", "Reads by secret name", family.clone());
            family
        });
        registry.register(
            "build",
            "The broker's version",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        Self {
            shared: Arc::new(Shared {
                registry: Mutex::new(registry),
                calls,
                call_seconds,
                call_counters: std::array::from_fn(|_| std::array::from_fn(|_| OnceLock::new())),
                call_histograms: std::array::from_fn(|_| OnceLock::new()),
                upstream_calls,
                upstream_seconds,
                secret_reads,
            }),
        }
    }

    /// One call answered; `code_name` is the code as gRPC names it.
    pub fn record_call(
        &self,
        rpc: Rpc,
        code: tonic::Code,
        code_name: &'static str,
        took: Duration,
    ) {
        let shared = &self.shared;
        let slot = &shared.call_counters[rpc as usize][(code as usize).min(CODES - 1)];
        slot.get_or_init(|| {
            let labels = CallLabels {
                rpc: rpc.name(),
                code: code_name,
            };
            shared.calls.get_or_create(&labels).clone()
        })
        .inc();
        shared.call_histograms[rpc as usize]
            .get_or_init(|| {
                let labels = RpcLabels { rpc: rpc.name() };
                shared.call_seconds.get_or_create(&labels).clone()
            })
            .observe(took.as_secs_f64());
    }

    /// A secret read, counted by name only when allowed.
    pub fn record_secret_read(&self, secret: &str) {
        if let Some(reads) = &self.shared.secret_reads {
            reads
                .get_or_create(&SecretLabels {
                    secret: secret.to_owned(),
                })
                .inc();
        }
    }

    fn record_upstream(&self, operation: &'static str, ok: bool, calls: u64, took: Duration) {
        let outcome = if ok { "ok" } else { "error" };
        self.shared
            .upstream_calls
            .get_or_create(&UpstreamLabels { operation, outcome })
            .inc_by(calls);
        self.shared
            .upstream_seconds
            .get_or_create(&OperationLabels { operation })
            .observe(took.as_secs_f64());
    }

    /// Registers the components whose state is read at scrape time.
    pub fn watch_state(&self, state: BrokerState) {
        self.registry().register_collector(Box::new(state));
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry());
        text
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.shared
            .registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

/// The components whose own counters are exported.
pub struct BrokerState {
    pub cache: Cache,
    pub watch: WatchHub,
    pub connections: Arc<ConnectionCounters>,
    pub tls: Option<Arc<TlsTerminator>>,
    pub authorizer: Arc<Authorizer>,
}

impl fmt::Debug for BrokerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BrokerState")
    }
}

fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: i64) -> fmt::Result {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

impl Collector for BrokerState {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let e = &mut encoder;
        let cache = self.cache.stats();
        counter(e, "cache_hits", "Reads answered from the cache", cache.hits)?;
        counter(
            e,
            "cache_misses",
            "Reads that started an upstream call",
            cache.misses,
        )?;
        counter(
            e,
            "cache_coalesced",
            "Reads that joined another's upstream call",
            cache.coalesced,
        )?;
        counter(
            e,
            "cache_stale_served",
            "Stale values served while upstream failed",
            cache.stale_served,
        )?;
        counter(
            e,
            "cache_evictions",
            "Entries evicted by the size bound",
            cache.evictions,
        )?;
        gauge(
            e,
            "cache_entries",
            "Entries in the cache",
            cache.total_entries as i64,
        )?;
        gauge(
            e,
            "cache_negative_entries",
            "NOT_FOUND answers remembered",
            cache.negative_entries as i64,
        )?;
        counter(
            e,
            "cache_negative_hits",
            "Reads answered by a remembered NOT_FOUND",
            cache.negative_hits,
        )?;
        gauge(
            e,
            "upstream_backoff",
            "1 while the upstream is backed off",
            i64::from(cache.backoff_active),
        )?;
        counter(
            e,
            "upstream_backoffs",
            "Times the upstream was backed off",
            cache.backoffs,
        )?;
        gauge(
            e,
            "upstream_in_flight",
            "Upstream calls under way",
            cache.upstream.in_flight as i64,
        )?;
        gauge(
            e,
            "upstream_queue_length",
            "Upstream calls waiting for a turn",
            cache.upstream.waiting as i64,
        )?;
        counter(
            e,
            "upstream_queue_refused",
            "Upstream calls refused: the queue was full",
            cache.upstream.refused,
        )?;
        let watch = self.watch.stats();
        gauge(
            e,
            "watchers",
            "Open WatchSecret streams",
            watch.watchers as i64,
        )?;
        gauge(
            e,
            "watched_secrets",
            "Secrets with at least one watcher",
            watch.watched_secrets as i64,
        )?;
        counter(
            e,
            "watch_events",
            "Changes broadcast to watchers",
            watch.events,
        )?;
        counter(
            e,
            "watch_rounds",
            "Rounds of the change detector",
            watch.rounds,
        )?;
        let connections = &self.connections;
        counter(
            e,
            "connections_accepted",
            "Connections accepted",
            connections.accepted.load(Relaxed),
        )?;
        counter(
            e,
            "connections_refused",
            "Connections closed at once: too many open",
            connections.refused.load(Relaxed),
        )?;
        counter(
            e,
            "tls_handshake_failures",
            "TLS handshakes refused or timed out",
            connections.handshake_failures.load(Relaxed),
        )?;
        counter(
            e,
            "connections_silent",
            "Connections dropped: no HTTP/2 preface within the first-request timeout",
            connections.silent.load(Relaxed),
        )?;
        counter(
            e,
            "policy_denials",
            "Calls refused by the policy",
            self.authorizer.denials(),
        )?;
        if let Some(expiry) = self.tls.as_ref().and_then(|tls| tls.certificate_expiry()) {
            gauge(
                e,
                "tls_certificate_expiry_timestamp_seconds",
                "When the server certificate in use expires (Unix time)",
                expiry,
            )?;
        }
        Ok(())
    }
}

/// A `SecretStore` that times and counts every call of the one it wraps.
pub struct MeteredStore {
    inner: Arc<dyn SecretStore>,
    metrics: Metrics,
}

impl MeteredStore {
    pub fn wrap(inner: Arc<dyn SecretStore>, metrics: Metrics) -> Arc<dyn SecretStore> {
        Arc::new(Self { inner, metrics })
    }

    fn record<T>(&self, operation: &'static str, started: Instant, result: &Result<T, StoreError>) {
        self.metrics
            .record_upstream(operation, result.is_ok(), 1, started.elapsed());
    }
}

#[async_trait]
impl SecretStore for MeteredStore {
    async fn get_secret_value(
        &self,
        name: &str,
        selector: &VersionSelector,
    ) -> Result<SecretVersion, StoreError> {
        let started = Instant::now();
        let result = self.inner.get_secret_value(name, selector).await;
        self.record("GetSecretValue", started, &result);
        result
    }

    async fn describe_secret(&self, name: &str) -> Result<SecretDescription, StoreError> {
        let started = Instant::now();
        let result = self.inner.describe_secret(name).await;
        self.record("DescribeSecret", started, &result);
        result
    }

    async fn check(&self) -> Result<String, StoreError> {
        let started = Instant::now();
        let result = self.inner.check().await;
        self.record("ListSecrets", started, &result);
        result
    }

    async fn get_current_batch(&self, names: &[String]) -> Result<BatchAnswer, StoreError> {
        let started = Instant::now();
        let result = self.inner.get_current_batch(names).await;
        let calls = result.as_ref().map_or(1, |answer| answer.upstream_calls);
        self.metrics.record_upstream(
            "BatchGetSecretValue",
            result.is_ok(),
            calls,
            started.elapsed(),
        );
        result
    }

    fn change_signal(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.inner.change_signal()
    }
}

/// What the probes report.
#[derive(Clone)]
pub struct Probes {
    pub metrics: Metrics,
    /// Whether the upstream check succeeds.
    pub upstream_up: Arc<AtomicBool>,
}

/// Serves `/metrics`, `/healthz` and `/readyz` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    probes: Probes,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readiness))
        .with_state(probes);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn metrics_page(State(probes): State<Probes>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        probes.metrics.encode(),
    )
}

async fn readiness(State(probes): State<Probes>) -> impl IntoResponse {
    if probes.upstream_up.load(Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "upstream unreachable\n")
    }
}
