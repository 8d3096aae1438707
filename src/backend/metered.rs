//! A `SecretStore` that times and counts every call of the one it wraps:
//! upstream calls by operation and outcome, and their latency. The cache
//! and the backends stay unaware of metrics.

use std::{sync::Arc, time::Instant};

use async_trait::async_trait;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
};

use super::{SecretDescription, SecretPage, SecretStore, StoreError, VersionSelector};
use crate::{
    metrics::{LatencyHistogram, Metrics, latency_histogram},
    secret::SecretVersion,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    operation: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    operation: &'static str,
}

/// See the module doc.
pub struct MeteredStore {
    inner: Arc<dyn SecretStore>,
    calls: Family<UpstreamLabels, Counter>,
    seconds: Family<OperationLabels, LatencyHistogram, fn() -> LatencyHistogram>,
}

impl MeteredStore {
    /// Wraps `inner`, registering the upstream metrics.
    pub fn wrap(inner: Arc<dyn SecretStore>, metrics: &Metrics) -> Arc<dyn SecretStore> {
        let calls = Family::<UpstreamLabels, Counter>::default();
        metrics.register(
            "upstream_calls",
            "Calls to the upstream store by operation and outcome",
            calls.clone(),
        );
        let seconds = Family::<OperationLabels, LatencyHistogram, fn() -> LatencyHistogram>::new_with_constructor(
            latency_histogram,
        );
        metrics.register(
            "upstream_duration_seconds",
            "Latency of upstream calls by operation",
            seconds.clone(),
        );
        Arc::new(Self {
            inner,
            calls,
            seconds,
        })
    }

    fn record<T>(
        &self,
        operation: &'static str,
        result: &Result<T, StoreError>,
        calls: u64,
        started: Instant,
    ) {
        let outcome = outcome_of(result);
        self.calls
            .get_or_create(&UpstreamLabels { operation, outcome })
            .inc_by(calls);
        self.seconds
            .get_or_create(&OperationLabels { operation })
            .observe(started.elapsed().as_secs_f64());
    }
}

/// A call's `outcome` label. A definite answer about a secret (it does not
/// exist, it was deleted, the broker may not read it) is the upstream
/// working, not failing: only the rest is an `error`, which is what
/// dashboards alert on.
fn outcome_of<T>(result: &Result<T, StoreError>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(StoreError::NotFound { .. } | StoreError::Deleted { .. }) => "not_found",
        Err(StoreError::AccessDenied { .. }) => "denied",
        Err(_) => "error",
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
        self.record("GetSecretValue", &result, 1, started);
        result
    }

    async fn describe_secret(&self, name: &str) -> Result<SecretDescription, StoreError> {
        let started = Instant::now();
        let result = self.inner.describe_secret(name).await;
        self.record("DescribeSecret", &result, 1, started);
        result
    }

    async fn check(&self) -> Result<String, StoreError> {
        let started = Instant::now();
        let result = self.inner.check().await;
        self.record("ListSecrets", &result, 1, started);
        result
    }

    async fn list_secrets(
        &self,
        prefix: &str,
        page: Option<String>,
    ) -> Result<SecretPage, StoreError> {
        let started = Instant::now();
        let result = self.inner.list_secrets(prefix, page).await;
        self.record("ListSecrets", &result, 1, started);
        result
    }

    fn change_signal(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.inner.change_signal()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::fake::FakeStore;

    #[tokio::test]
    async fn a_missing_secret_is_not_counted_as_an_upstream_error() {
        let metrics = Metrics::new();
        let store = MeteredStore::wrap(FakeStore::with(&["present"]), &metrics);
        let current = VersionSelector::current();
        store.get_secret_value("present", &current).await.unwrap();
        store
            .get_secret_value("absent", &current)
            .await
            .unwrap_err();
        let text = metrics.encode();
        let count = |outcome: &str| {
            format!(
                "secretsbroker_upstream_calls_total{{operation=\"GetSecretValue\",outcome=\"{outcome}\"}} 1"
            )
        };
        assert!(text.contains(&count("ok")), "{text}");
        assert!(text.contains(&count("not_found")), "{text}");
        assert!(!text.contains("outcome=\"error\""), "{text}");
    }
}
