//! The plain-HTTP endpoint for probes and Prometheus, on its own port:
//! `/healthz` (the process answers), `/readyz` (ready for calls: the
//! upstream answers and the broker is not stopping) and `/metrics`. It is
//! served to the broker's very end, so that probes and the last scrape
//! still get answers while calls in flight finish (readiness is then 503).

use std::future::Future;

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};

use crate::{health::Health, metrics::Metrics, transport::probe_listener::ProbeListener};

/// What the endpoint reports.
#[derive(Clone)]
struct Probes {
    metrics: Metrics,
    health: Health,
}

/// Serves `/metrics`, `/healthz` and `/readyz` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Metrics,
    health: Health,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readiness))
        .with_state(Probes { metrics, health });
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
    match probes.health.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}
