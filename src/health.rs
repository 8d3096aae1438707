//! Health: the gRPC health service's statuses, the upstream check that
//! drives them, and the plain-HTTP endpoint for probes and Prometheus
//! (`/healthz`, `/readyz`, `/metrics`).
//!
//! `secretsbroker.v1.SecretsService` turns NOT_SERVING while the store does
//! not answer its check, so that load balancers can route around a broker
//! cut off from AWS; the overall "" status stays SERVING (the process is
//! alive and may still serve cached values). The check logs once when the
//! upstream starts failing and once when it recovers, never per round.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU8, Ordering::Relaxed},
    },
    time::Duration,
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use futures::FutureExt;
use tokio_util::sync::CancellationToken;
use tonic_health::server::HealthReporter;

use crate::{
    api::{AdminApi, SecretsApi},
    backend::SecretStore,
    metrics::Metrics,
    proto::{
        admin_service_server::AdminServiceServer, secrets_service_server::SecretsServiceServer,
    },
    transport::probe_listener::ProbeListener,
};

/// Whether the upstream answers, as the probes and the health service see
/// it; cheap to clone.
#[derive(Clone)]
pub struct Health {
    reporter: HealthReporter,
    upstream: Arc<AtomicU8>,
    /// The broker is stopping: not ready, whatever the upstream says (and
    /// `upstream_up` keeps the last check's answer, so that a rollout fires
    /// no alert).
    stopping: Arc<AtomicBool>,
}

/// What the last upstream check said (`Health::upstream`).
const NOT_CHECKED_YET: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

impl Health {
    /// The reporter behind the gRPC health service, and the service.
    pub async fn new() -> (
        Self,
        tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    ) {
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter
            .set_serving::<SecretsServiceServer<SecretsApi>>()
            .await;
        reporter.set_serving::<AdminServiceServer<AdminApi>>().await;
        let health = Self {
            reporter,
            upstream: Arc::new(AtomicU8::new(NOT_CHECKED_YET)),
            stopping: Arc::new(AtomicBool::new(false)),
        };
        (health, service)
    }

    /// Checks the upstream every `every` until `stop`. The gRPC health
    /// status starts SERVING (a caller may be served from a file or the
    /// cache before the first answer); the readiness probe waits for the
    /// first check.
    pub async fn follow_upstream(
        self,
        store: Arc<dyn SecretStore>,
        every: Duration,
        stop: CancellationToken,
    ) {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut was_up = true;
        loop {
            tokio::select! {
                () = stop.cancelled() => {
                    // New traffic should go to other replicas while the
                    // calls in flight finish.
                    self.stopping.store(true, Relaxed);
                    return;
                }
                _ = ticks.tick() => {}
            }
            // A panic inside the store (an SDK's, say) must not end this
            // task: readiness would stay at its last answer for good.
            let checked = std::panic::AssertUnwindSafe(store.check())
                .catch_unwind()
                .await;
            let up = match checked {
                Ok(Ok(_)) => true,
                Ok(Err(error)) => {
                    if was_up {
                        tracing::warn!(%error, "upstream check failed");
                    }
                    false
                }
                Err(_panic) => {
                    if was_up {
                        tracing::warn!("upstream check failed: it panicked (see the panic's line)");
                    }
                    false
                }
            };
            self.upstream.store(if up { UP } else { DOWN }, Relaxed);
            if up != was_up {
                self.report(up).await;
                if up {
                    tracing::info!("upstream check succeeds again");
                }
                was_up = up;
            }
        }
    }

    /// Registers `upstream_up`: 1 while the last upstream check answered.
    pub fn register_metrics(&self, metrics: &Metrics) {
        let upstream = Arc::clone(&self.upstream);
        metrics.register_state(move |e| {
            crate::metrics::gauge(
                e,
                "upstream_up",
                "1 while the last upstream check answered; 0 before the first and while it fails",
                i64::from(upstream.load(Relaxed) == UP),
            )
        });
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

/// What the HTTP endpoint reports.
#[derive(Clone)]
struct Probes {
    metrics: Metrics,
    upstream: Arc<AtomicU8>,
    stopping: Arc<AtomicBool>,
}

/// Serves `/metrics`, `/healthz` and `/readyz` until `shutdown`: at the
/// broker's very end, so that probes and the last scrape still get answers
/// while calls in flight finish (readiness is then 503).
pub async fn serve_probes(
    listener: tokio::net::TcpListener,
    metrics: Metrics,
    health: Health,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let probes = Probes {
        metrics,
        upstream: Arc::clone(&health.upstream),
        stopping: Arc::clone(&health.stopping),
    };
    let app = Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readiness))
        .with_state(probes);
    axum::serve(ProbeListener::new(listener), app)
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
    if probes.stopping.load(Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
    }
    match probes.upstream.load(Relaxed) {
        UP => (StatusCode::OK, "ready\n"),
        NOT_CHECKED_YET => (
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream not checked yet\n",
        ),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "upstream unreachable\n"),
    }
}
