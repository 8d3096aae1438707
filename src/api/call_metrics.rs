//! What the API records per call: calls by RPC and status code, their
//! latency, and (only with `--metrics-secret-names`) reads by secret name.

use std::{sync::OnceLock, time::Duration};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
};
use strum::EnumCount;

use super::rpc::Rpc;
use crate::metrics::{LatencyHistogram, Metrics, latency_histogram};

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
struct SecretLabels {
    secret: String,
}

type Histograms<L> = Family<L, LatencyHistogram, fn() -> LatencyHistogram>;

/// gRPC status codes run from 0 to 16.
const CODES: usize = 17;

/// The per-call metrics; cheap to clone.
#[derive(Clone)]
pub struct CallMetrics {
    shared: std::sync::Arc<Shared>,
}

struct Shared {
    calls: Family<CallLabels, Counter>,
    call_seconds: Histograms<RpcLabels>,
    /// Handles into `calls` and `call_seconds`, resolved on first use: a
    /// family lookup takes a lock and hashes labels, a handle is one atomic.
    call_counters: [[OnceLock<Counter>; CODES]; Rpc::COUNT],
    call_histograms: [OnceLock<LatencyHistogram>; Rpc::COUNT],
    secret_reads: Option<Family<SecretLabels, Counter>>,
}

impl CallMetrics {
    /// Registers the call metrics; reads by secret name only when
    /// `secret_names` says so.
    pub fn register(metrics: &Metrics, secret_names: bool) -> Self {
        let calls = Family::<CallLabels, Counter>::default();
        metrics.register("calls", "Calls by RPC and status code", calls.clone());
        let call_seconds = Histograms::<RpcLabels>::new_with_constructor(latency_histogram);
        metrics.register(
            "call_duration_seconds",
            "Latency of calls by RPC",
            call_seconds.clone(),
        );
        let secret_reads = secret_names.then(|| {
            let family = Family::<SecretLabels, Counter>::default();
            metrics.register("secret_reads", "Reads by secret name", family.clone());
            family
        });
        Self {
            shared: std::sync::Arc::new(Shared {
                calls,
                call_seconds,
                call_counters: std::array::from_fn(|_| std::array::from_fn(|_| OnceLock::new())),
                call_histograms: std::array::from_fn(|_| OnceLock::new()),
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
        let slot = &shared.call_counters[rpc.index()][(code as usize).min(CODES - 1)];
        slot.get_or_init(|| {
            let labels = CallLabels {
                rpc: rpc.name(),
                code: code_name,
            };
            shared.calls.get_or_create(&labels).clone()
        })
        .inc();
        shared.call_histograms[rpc.index()]
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
}
