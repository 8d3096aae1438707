//! What an insert costs once the cache is full, at 1k, 10k and 100k
//! entries: each insert past the bound evicts one entry. The cost per
//! insert should not grow with the cache's size (CLOCK eviction is
//! amortized O(1)); the 100k figure is compared with the 1k one in the same
//! run.
//!
//! Run: `cargo bench --bench eviction` (prints ns per insert and the ratio).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use secrets_broker::{
    backend::{
        SecretDescription, SecretPage, SecretStore, StoreError, VersionSelector,
        bounded::UpstreamLimits,
    },
    cache::{Cache, CacheKey, CacheSettings},
    secret::{SecretValue, SecretVersion},
};

/// Never asked: the benchmark only stores versions.
struct NoStore;

#[async_trait]
impl SecretStore for NoStore {
    async fn get_secret_value(
        &self,
        name: &str,
        _: &VersionSelector,
    ) -> Result<SecretVersion, StoreError> {
        Err(StoreError::NotFound { name: name.into() })
    }
    async fn describe_secret(&self, name: &str) -> Result<SecretDescription, StoreError> {
        Err(StoreError::NotFound { name: name.into() })
    }
    async fn check(&self) -> Result<String, StoreError> {
        Ok("none".into())
    }
    async fn list_secrets(&self, _: &str, _: Option<String>) -> Result<SecretPage, StoreError> {
        Ok(SecretPage::default())
    }
}

fn cache(max_entries: usize) -> Cache {
    Cache::new(
        Arc::new(NoStore),
        CacheSettings {
            ttl: Duration::from_secs(300),
            max_entries,
            max_stale: Duration::from_secs(3600),
            upstream_wait: Duration::from_secs(1),
            negative_ttl: Duration::from_secs(30),
            upstream: UpstreamLimits {
                concurrency: 32,
                queue: 1000,
            },
        },
    )
}

fn version(name: &str) -> Arc<SecretVersion> {
    Arc::new(SecretVersion {
        name: name.to_owned(),
        arn: String::new(),
        version_id: "v1".into(),
        version_stages: vec!["AWSCURRENT".into()],
        created_date: None,
        value: SecretValue::text("x".to_owned()),
        encoded: Default::default(),
    })
}

/// Nanoseconds per insert past the bound, median of five rounds.
fn ns_per_insert(max_entries: usize) -> f64 {
    let cache = cache(max_entries);
    let key = |i: usize| CacheKey::new(format!("insurecove/s{i}"), VersionSelector::current());
    for i in 0..max_entries {
        cache.put(&key(i), version("fill"));
    }
    let inserts = 20_000;
    let mut rounds: Vec<f64> = (0..5)
        .map(|round| {
            let keys: Vec<CacheKey> = (0..inserts)
                .map(|i| key(max_entries + round * inserts + i))
                .collect();
            let value = version("new");
            let started = Instant::now();
            for key in &keys {
                cache.put(key, Arc::clone(&value));
            }
            started.elapsed().as_nanos() as f64 / inserts as f64
        })
        .collect();
    assert_eq!(cache.stats().total_entries, max_entries as u64);
    rounds.sort_by(f64::total_cmp);
    rounds[2]
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let _guard = runtime.enter();
    let sizes = [1_000, 10_000, 100_000];
    let figures: Vec<(usize, f64)> = sizes.iter().map(|&n| (n, ns_per_insert(n))).collect();
    for (n, ns) in &figures {
        println!("eviction: {n:>7} entries: {ns:8.0} ns per insert past the bound (median of 5)");
    }
    let ratio = figures[2].1 / figures[0].1;
    println!("eviction: 100k / 1k = {ratio:.2}");
}
