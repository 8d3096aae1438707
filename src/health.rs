//! Health: the gRPC health service's statuses, the upstream check that
//! drives them, and the readiness the probe endpoint (`probes`) reports.
//!
//! `secretsbroker.v1.SecretsService` turns NOT_SERVING while the store does
//! not answer its check, so that load balancers can route around a broker
//! cut off from AWS; the overall "" status stays SERVING (the process is
//! alive and may still serve cached values) until the broker stops. The
//! check logs once when the upstream starts failing and once when it
//! recovers, never per round.
//!
//! When the broker stops, every status turns NOT_SERVING (the overall one
//! too: new calls should go to other replicas while the calls in flight
//! finish), and each health Watch stream says so and then ends with
//! UNAVAILABLE. A Watch stream never ends by itself otherwise: left open,
//! the watches of clients that check health by watching (client-side
//! health checking, load balancers' gRPC checks) would hold the shutdown
//! for its whole grace.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU8, Ordering::Relaxed},
    },
    time::Duration,
};

use futures::{FutureExt, Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tonic_health::{
    ServingStatus,
    pb::{
        HealthCheckRequest, HealthCheckResponse, health_check_response,
        health_server::{Health as HealthRpc, HealthServer},
    },
    server::{HealthReporter, HealthService},
};

use crate::{
    api::{AdminApi, ApiError, SecretsApi},
    backend::{SecretStore, StoreError},
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
    /// Ready, or why not (one line, as `/readyz` says it): stopping, or
    /// the upstream not checked yet or not answering.
    pub fn readiness(&self) -> Result<(), &'static str> {
        if self.stopping.load(Relaxed) {
            return Err("shutting down");
        }
        match self.upstream.load(Relaxed) {
            UP => Ok(()),
            NOT_CHECKED_YET => Err("upstream not checked yet"),
            _ => Err("upstream unreachable"),
        }
    }

    /// The reporter behind the gRPC health service, and the service, whose
    /// Watch streams end at `stop`.
    pub async fn new(stop: CancellationToken) -> (Self, HealthServer<ServedHealth>) {
        let reporter = HealthReporter::new();
        let service = HealthServer::new(ServedHealth {
            statuses: HealthService::from_health_reporter(reporter.clone()),
            stop,
        });
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
                () = stop.cancelled() => return self.stopped().await,
                _ = ticks.tick() => {}
            }
            // A panic inside the store (an SDK's, say) must not end this
            // task: readiness would stay at its last answer for good. A
            // check may wait for a slow upstream longer than the shutdown
            // grace: the stop does not wait for it.
            let checked = tokio::select! {
                () = stop.cancelled() => return self.stopped().await,
                checked = std::panic::AssertUnwindSafe(store.check()).catch_unwind() => checked,
            };
            let up = match checked {
                Ok(Ok(_)) => true,
                // AWS answered: the credentials and the network work. The
                // account's quota is shared with every other tool in it, and
                // a burst of theirs must not take every replica out of
                // service at once (reads go on from the cache meanwhile).
                Ok(Err(StoreError::Throttled)) => {
                    tracing::debug!("the upstream check was throttled; AWS answers");
                    true
                }
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

    /// New traffic should go to other replicas while the calls in flight
    /// finish: readiness fails, and every status turns NOT_SERVING, the
    /// overall one too.
    async fn stopped(&self) {
        self.stopping.store(true, Relaxed);
        self.reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;
        self.reporter
            .set_not_serving::<SecretsServiceServer<SecretsApi>>()
            .await;
        self.reporter
            .set_not_serving::<AdminServiceServer<AdminApi>>()
            .await;
    }
}

/// `grpc.health.v1.Health`: tonic-health's service, whose Watch streams
/// end when the broker stops (see the module doc).
pub struct ServedHealth {
    statuses: HealthService,
    stop: CancellationToken,
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

type Answer<'a, T> = Pin<Box<dyn Future<Output = Result<Response<T>, Status>> + Send + 'a>>;

// Written out rather than with `#[tonic::async_trait]`: `check` hands back
// tonic-health's own future as it is, so a Check costs what tonic-health's
// costs (no second boxed future; the benchmark measures GetSecret against
// it).
impl HealthRpc for ServedHealth {
    fn check<'a, 'b>(
        &'a self,
        request: Request<HealthCheckRequest>,
    ) -> Answer<'b, HealthCheckResponse>
    where
        'a: 'b,
        Self: 'b,
    {
        self.statuses.check(request)
    }

    type WatchStream = WatchStream;

    fn watch<'a, 'b>(&'a self, request: Request<HealthCheckRequest>) -> Answer<'b, WatchStream>
    where
        'a: 'b,
        Self: 'b,
    {
        Box::pin(async move {
            let statuses = self.statuses.watch(request).await?.into_inner();
            let stream: WatchStream = Box::pin(until_stop(statuses, self.stop.clone()));
            Ok(Response::new(stream))
        })
    }
}

/// The statuses of `statuses` until `stop`; then NOT_SERVING (unless that
/// was the last one sent) and the end, with UNAVAILABLE.
fn until_stop(
    statuses: impl Stream<Item = Result<HealthCheckResponse, Status>> + Send + Unpin + 'static,
    stop: CancellationToken,
) -> impl Stream<Item = Result<HealthCheckResponse, Status>> + Send + 'static {
    let not_serving = health_check_response::ServingStatus::NotServing as i32;
    futures::stream::unfold(
        Some((statuses, stop, None::<i32>)),
        move |state| async move {
            let (mut statuses, stop, last_sent) = state?;
            tokio::select! {
                biased;
                () = stop.cancelled() => {
                    if last_sent == Some(not_serving) {
                        let ended = Status::from(ApiError::StreamShutDown);
                        return Some((Err(ended), None));
                    }
                    let said = HealthCheckResponse { status: not_serving };
                    Some((Ok(said), Some((statuses, stop, Some(not_serving)))))
                }
                next = statuses.next() => {
                    let next = next?;
                    let sent = next.as_ref().map_or(last_sent, |said| Some(said.status));
                    Some((next, Some((statuses, stop, sent))))
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::fake::FakeStore;

    #[tokio::test(start_paused = true)]
    async fn a_stop_during_a_slow_upstream_check_fails_readiness_at_once() {
        let store = FakeStore::with(&["a"]);
        *store.delay.lock().unwrap() = Duration::from_secs(60);
        let stop = CancellationToken::new();
        let (health, _service) = Health::new(stop.clone()).await;
        let following = tokio::spawn(health.clone().follow_upstream(
            store,
            Duration::from_secs(5),
            stop.clone(),
        ));
        // The first check is under way, and waits for the upstream.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!health.stopping.load(Relaxed));

        stop.cancel();
        tokio::time::timeout(Duration::from_secs(1), following)
            .await
            .expect("the stop does not wait for the check")
            .unwrap();
        assert!(
            health.stopping.load(Relaxed),
            "readiness fails from the stop on"
        );
    }
}
