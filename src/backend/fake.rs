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
    LIST_PAGE_SIZE, SecretDescription, SecretPage, SecretStore, StoreError, VersionSelector,
};
use crate::secret::{SecretValue, SecretVersion};

/// See the module doc.
#[derive(Default)]
pub struct FakeStore {
    /// name → current version id (`None`: marked deleted).
    versions: Mutex<HashMap<String, Option<String>>>,
    /// name → ARN, for secrets made by `create_again` (others have none).
    arns: Mutex<HashMap<String, String>>,
    /// `create_again` calls so far: each gives an ARN never given before.
    created_again: AtomicUsize,
    failure: Mutex<Option<StoreError>>,
    calls: AtomicUsize,
    list_calls: AtomicUsize,
    describe_calls: AtomicUsize,
    /// GetSecretValue alone fails with this (a KMS key it cannot use...).
    pub value_failure: Mutex<Option<StoreError>>,
    /// DescribeSecret alone fails with this (an IAM policy without it,
    /// its own throttling quota...).
    pub describe_failure: Mutex<Option<StoreError>>,
    /// How long each call takes (under a paused clock, advanced by tokio).
    pub delay: Mutex<Duration>,
    /// How long GetSecretValue of these names takes instead of `delay`.
    pub slow: Mutex<HashMap<String, Duration>>,
    /// Reads of the key answer with the value (and name) of the other
    /// secret: an upstream that resolved an id differently than the policy.
    pub answers_instead: Mutex<HashMap<String, String>>,
    /// Listings leave these names out (AWS's ListSecrets lags changes).
    pub unlisted: Mutex<Vec<String>>,
    /// Listings show these names at this version (still the one before).
    pub listed_as: Mutex<HashMap<String, String>>,
    /// Reads answer with the version current when they began, delivered
    /// after `delay`: an answer on its way while the secret rotates.
    pub answers_as_of_the_start: std::sync::atomic::AtomicBool,
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

    /// `name` deleted for good and created again, at `version_id`: a new
    /// secret under the old name, with an ARN (and values) of its own,
    /// whatever version ids it is given.
    pub fn create_again(&self, name: &str, version_id: &str) {
        let mut arns = self.arns.lock().unwrap();
        let generation = self.created_again.fetch_add(1, SeqCst) + 1;
        arns.insert(
            name.to_owned(),
            // The six characters AWS adds after the name.
            format!(
                "arn:aws:secretsmanager:us-east-1:123456789012:secret:{name}-gen{generation:03}"
            ),
        );
        drop(arns);
        self.set(name, version_id);
    }

    fn arn_of(&self, name: &str) -> String {
        self.arns
            .lock()
            .unwrap()
            .get(name)
            .cloned()
            .unwrap_or_default()
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

    /// Removes `name` altogether (deleted past its recovery window).
    pub fn remove(&self, name: &str) {
        self.versions.lock().unwrap().remove(name);
    }

    /// ListSecrets pages read.
    pub fn list_calls(&self) -> usize {
        self.list_calls.load(SeqCst)
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
        let arn = self.arn_of(&name);
        let value = match arn.rsplit_once('-') {
            Some((_, generation)) => format!("value-of-{version_id}-{generation}"),
            None => format!("value-of-{version_id}"),
        };
        Ok(SecretVersion {
            name,
            arn,
            version_id: version_id.clone(),
            version_stages: vec!["AWSCURRENT".into()],
            created_date: None,
            value: SecretValue::text(value),
            encoded: Default::default(),
        })
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
        let delay = self.slow.lock().unwrap().get(name).copied();
        let delay = delay.unwrap_or(*self.delay.lock().unwrap());
        let instead = self.answers_instead.lock().unwrap().get(name).cloned();
        let name = instead.as_deref().unwrap_or(name);
        let at_the_start = self
            .answers_as_of_the_start
            .load(SeqCst)
            .then(|| self.current(name));
        tokio::time::sleep(delay).await;
        if let Some(failure) = self.value_failure.lock().unwrap().clone() {
            return Err(failure);
        }
        at_the_start.unwrap_or_else(|| self.current(name))
    }

    async fn describe_secret(&self, name: &str) -> Result<SecretDescription, StoreError> {
        self.describe_calls.fetch_add(1, SeqCst);
        let delay = *self.delay.lock().unwrap();
        tokio::time::sleep(delay).await;
        if let Some(failure) = self.describe_failure.lock().unwrap().clone() {
            return Err(failure);
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
            arn: self.arn_of(name),
            versions: current
                .iter()
                .map(|id| (id.clone(), vec!["AWSCURRENT".to_owned()]))
                .collect(),
            deleted: current.is_none(),
        })
    }

    async fn check(&self) -> Result<String, StoreError> {
        let delay = *self.delay.lock().unwrap();
        tokio::time::sleep(delay).await;
        Ok("fake".into())
    }

    async fn list_secrets(
        &self,
        prefix: &str,
        page: Option<String>,
    ) -> Result<SecretPage, StoreError> {
        self.list_calls.fetch_add(1, SeqCst);
        if let Some(failure) = self.failure.lock().unwrap().clone() {
            return Err(failure);
        }
        let unlisted = self.unlisted.lock().unwrap().clone();
        let listed_as = self.listed_as.lock().unwrap().clone();
        let mut names: Vec<(String, Option<String>)> = self
            .versions
            .lock()
            .unwrap()
            .iter()
            .filter(|(name, _)| name.starts_with(prefix) && !unlisted.contains(name))
            .map(|(name, id)| (name.clone(), listed_as.get(name).cloned().or(id.clone())))
            .collect();
        names.sort();
        let start: usize = page.map_or(0, |token| token.parse().unwrap());
        let end = (start + LIST_PAGE_SIZE).min(names.len());
        Ok(SecretPage {
            secrets: names[start..end]
                .iter()
                .map(|(name, id)| SecretDescription {
                    name: name.clone(),
                    arn: self.arn_of(name),
                    versions: id
                        .iter()
                        .map(|id| (id.clone(), vec!["AWSCURRENT".to_owned()]))
                        .collect(),
                    deleted: id.is_none(),
                })
                .collect(),
            next: (end < names.len()).then(|| end.to_string()),
        })
    }
}
