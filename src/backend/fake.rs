//! A `SecretStore` for unit tests: one secret per name whose current version
//! the test replaces, deletes or breaks, counting every call.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering::SeqCst},
    },
    time::Duration,
};

use async_trait::async_trait;

use super::{
    BATCH_LIMIT, BatchAnswer, SecretDescription, SecretStore, StoreError, VersionSelector,
};
use crate::secret::{SecretValue, SecretVersion};

/// See the module doc.
#[derive(Default)]
pub struct FakeStore {
    /// name → current version id (`None`: marked deleted).
    versions: Mutex<HashMap<String, Option<String>>>,
    failure: Mutex<Option<StoreError>>,
    calls: AtomicUsize,
    batch_calls: AtomicUsize,
    describe_calls: AtomicUsize,
    /// DescribeSecret answers AccessDenied (an IAM policy without it).
    pub refuse_describe: std::sync::atomic::AtomicBool,
    /// How long each call takes (under a paused clock, advanced by tokio).
    pub delay: Mutex<Duration>,
    /// Reads of the key answer with the value (and name) of the other
    /// secret: an upstream that resolved an id differently than the policy.
    pub answers_instead: Mutex<HashMap<String, String>>,
    /// Batched reads answer an old version labelled AWSPREVIOUS, as moto's
    /// BatchGetSecretValue does after a stage move.
    pub batch_lags: std::sync::atomic::AtomicBool,
}

impl FakeStore {
    /// A store holding `names`, each at version `v1`.
    pub fn with(names: &[&str]) -> Arc<Self> {
        let store = Self::default();
        for name in names {
            store.set(name, "v1");
        }
        Arc::new(store)
    }

    /// Makes `version_id` the current version of `name`.
    pub fn set(&self, name: &str, version_id: &str) {
        self.versions
            .lock()
            .unwrap()
            .insert(name.to_owned(), Some(version_id.to_owned()));
    }

    /// Marks `name` deleted.
    pub fn delete(&self, name: &str) {
        self.versions.lock().unwrap().insert(name.to_owned(), None);
    }

    /// Every call fails with `failure` (until `None`).
    pub fn fail_with(&self, failure: Option<StoreError>) {
        *self.failure.lock().unwrap() = failure;
    }

    /// Single-secret reads.
    pub fn calls(&self) -> usize {
        self.calls.load(SeqCst)
    }

    /// Batched reads.
    pub fn batch_calls(&self) -> usize {
        self.batch_calls.load(SeqCst)
    }

    /// DescribeSecret calls.
    pub fn describe_calls(&self) -> usize {
        self.describe_calls.load(SeqCst)
    }

    fn current(&self, name: &str) -> Result<SecretVersion, StoreError> {
        if let Some(failure) = self.failure.lock().unwrap().clone() {
            return Err(failure);
        }
        let name = name.to_owned();
        let version_id = match self.versions.lock().unwrap().get(&name) {
            None => return Err(StoreError::NotFound { name }),
            Some(None) => return Err(StoreError::Deleted { name }),
            Some(Some(id)) => id.clone(),
        };
        Ok(SecretVersion {
            name,
            arn: String::new(),
            version_id: version_id.clone(),
            version_stages: vec!["AWSCURRENT".into()],
            created_date: None,
            value: SecretValue::text(format!("value-of-{version_id}")),
        })
    }
}

impl FakeStore {
    fn batch_answer(&self, name: &str) -> Result<SecretVersion, StoreError> {
        let mut version = self.current(name)?;
        if self.batch_lags.load(SeqCst) {
            version.version_id = "previous".into();
            version.version_stages = vec!["AWSPREVIOUS".into()];
        }
        Ok(version)
    }
}

#[async_trait]
impl SecretStore for FakeStore {
    async fn get_secret_value(
        &self,
        name: &str,
        _selector: &VersionSelector,
    ) -> Result<SecretVersion, StoreError> {
        self.calls.fetch_add(1, SeqCst);
        let delay = *self.delay.lock().unwrap();
        tokio::time::sleep(delay).await;
        let instead = self.answers_instead.lock().unwrap().get(name).cloned();
        self.current(instead.as_deref().unwrap_or(name))
    }

    async fn describe_secret(&self, name: &str) -> Result<SecretDescription, StoreError> {
        self.describe_calls.fetch_add(1, SeqCst);
        let delay = *self.delay.lock().unwrap();
        tokio::time::sleep(delay).await;
        if self.refuse_describe.load(SeqCst) {
            return Err(StoreError::AccessDenied {
                name: name.to_owned(),
                detail: "DescribeSecret is not allowed".into(),
            });
        }
        if let Some(failure) = self.failure.lock().unwrap().clone() {
            return Err(failure);
        }
        let current = self.versions.lock().unwrap().get(name).cloned();
        let current = current.ok_or_else(|| StoreError::NotFound {
            name: name.to_owned(),
        })?;
        Ok(SecretDescription {
            name: name.to_owned(),
            arn: String::new(),
            versions: current
                .iter()
                .map(|id| (id.clone(), vec!["AWSCURRENT".to_owned()]))
                .collect(),
            deleted: current.is_none(),
        })
    }

    async fn check(&self) -> Result<String, StoreError> {
        Ok("fake".into())
    }

    async fn get_current_batch(&self, names: &[String]) -> Result<BatchAnswer, StoreError> {
        let calls = names.len().div_ceil(BATCH_LIMIT);
        self.batch_calls.fetch_add(calls, SeqCst);
        Ok(BatchAnswer {
            items: names
                .iter()
                .map(|name| (name.clone(), self.batch_answer(name)))
                .collect(),
            upstream_calls: calls as u64,
        })
    }
}
