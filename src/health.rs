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
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::Duration,
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use tokio_util::sync::CancellationToken;
use tonic_health::server::HealthReporter;

use crate::{
    api::{AdminApi, SecretsApi},
    backend::SecretStore,
    metrics::Metrics,
    proto::{
        admin_service_server::AdminServiceServer, secrets_service_server::SecretsServiceServer,
    },
};

/// Whether the upstream answers, as the probes and the health service see
/// it; cheap to clone.
#[derive(Clone)]
pub struct Health {
    reporter: HealthReporter,
    upstream_up: Arc<AtomicBool>,
}

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
            upstream_up: Arc::new(AtomicBool::new(true)),
        };
        (health, service)
    }

    /// Checks the upstream every `every` until `stop`.
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
                () = stop.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let up = match store.check().await {
                Ok(_) => true,
                Err(error) => {
                    if was_up {
                        tracing::warn!(%error, "upstream check failed");
                    }
                    false
                }
            };
            if up != was_up {
                self.upstream_up.store(up, Relaxed);
                self.report(up).await;
                if up {
                    tracing::info!("upstream check succeeds again");
                }
                was_up = up;
            }
        }
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
    upstream_up: Arc<AtomicBool>,
}

/// Serves `/metrics`, `/healthz` and `/readyz` until `shutdown`.
pub async fn serve_probes(
    listener: tokio::net::TcpListener,
    metrics: Metrics,
    health: Health,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let probes = Probes {
        metrics,
        upstream_up: Arc::clone(&health.upstream_up),
    };
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
