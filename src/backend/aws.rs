//! The AWS Secrets Manager backend, through `aws-sdk-secretsmanager`.
//!
//! The SDK client is built on first use and then shared: one connection
//! pool for the whole broker (the guide's "lazy initialization" and
//! "persistent connections"). Credentials come from the SDK's default chain
//! (environment keys, profile, IAM role), the endpoint from
//! `AWS_ENDPOINT_URL` when set (moto in tests), and the SDK's HTTP client
//! honours `HTTP_PROXY`/`HTTPS_PROXY`/`NO_PROXY`. Every call has a connect
//! and an operation timeout, and the SDK's standard retries (with backoff on
//! throttling) run before a failure reaches the cache.
//!
//! Failures are explained once (`aws_error`): classified so the cache can
//! tell a transient outage from a definite answer, and told in one line that
//! names the cause and the fix.

use std::{
    collections::HashMap,
    time::{Duration, SystemTime},
};

use async_trait::async_trait;
use aws_config::{BehaviorVersion, Region, retry::RetryConfig, timeout::TimeoutConfig};
use aws_sdk_secretsmanager::{
    Client, operation::get_secret_value::GetSecretValueOutput, types::SecretValueEntry,
};
use tokio::sync::OnceCell;

use super::{
    BATCH_LIMIT, BatchAnswer, SecretDescription, SecretStore, StoreError, VersionSelector,
    aws_error::{Upstream, explain, explain_code},
};
use crate::secret::{SecretValue, SecretVersion};

/// Timeouts that keep a caller's wait bounded when AWS is slow or away.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
const OPERATION_TIMEOUT: Duration = Duration::from_secs(12);
const MAX_ATTEMPTS: u32 = 3;

/// A `SecretStore` over AWS Secrets Manager.
pub struct AwsStore {
    region: String,
    /// Where the calls go, for error messages.
    upstream: Upstream,
    client: OnceCell<Client>,
}

impl AwsStore {
    /// Nothing is contacted until the first call.
    pub fn new(region: &str) -> Self {
        Self {
            region: region.to_owned(),
            upstream: Upstream::from_env(region, &|var| std::env::var(var).ok()),
            client: OnceCell::new(),
        }
    }

    async fn client(&self) -> &Client {
        self.client
            .get_or_init(|| async {
                let config = aws_config::defaults(BehaviorVersion::latest())
                    .region(Region::new(self.region.clone()))
                    .timeout_config(
                        TimeoutConfig::builder()
                            .connect_timeout(CONNECT_TIMEOUT)
                            .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                            .operation_timeout(OPERATION_TIMEOUT)
                            .build(),
                    )
                    .retry_config(RetryConfig::standard().with_max_attempts(MAX_ATTEMPTS))
                    .load()
                    .await;
                tracing::debug!(region = %self.region, "AWS Secrets Manager client ready");
                Client::new(&config)
            })
            .await
    }
}

#[async_trait]
impl SecretStore for AwsStore {
    async fn get_secret_value(
        &self,
        name: &str,
        selector: &VersionSelector,
    ) -> Result<SecretVersion, StoreError> {
        let request = self.client().await.get_secret_value().secret_id(name);
        // The stage is always sent for stage reads (AWS's default is
        // AWSCURRENT too, but saying it keeps the request self-explaining).
        let request = match selector {
            VersionSelector::Stage(stage) => request.version_stage(stage),
            VersionSelector::Id { id, stage } => {
                request.version_id(id).set_version_stage(stage.clone())
            }
        };
        let output = request
            .send()
            .await
            .map_err(|e| explain(&e, "GetSecretValue", name, &self.upstream))?;
        Ok(into_version(output, name))
    }

    async fn describe_secret(&self, name: &str) -> Result<SecretDescription, StoreError> {
        let output = self
            .client()
            .await
            .describe_secret()
            .secret_id(name)
            .send()
            .await
            .map_err(|e| explain(&e, "DescribeSecret", name, &self.upstream))?;
        Ok(SecretDescription {
            name: output.name().unwrap_or(name).to_owned(),
            arn: output.arn().unwrap_or_default().to_owned(),
            versions: output
                .version_ids_to_stages()
                .map(|map| {
                    map.iter()
                        .map(|(id, stages)| (id.clone(), stages.clone()))
                        .collect()
                })
                .unwrap_or_default(),
            deleted: output.deleted_date().is_some(),
        })
    }

    async fn get_current_batch(&self, names: &[String]) -> Result<BatchAnswer, StoreError> {
        let client = self.client().await;
        let mut items = Vec::with_capacity(names.len());
        let mut upstream_calls = 0;
        for chunk in names.chunks(BATCH_LIMIT) {
            let mut found: HashMap<String, Result<SecretVersion, StoreError>> = HashMap::new();
            let mut next_token = None;
            loop {
                upstream_calls += 1;
                let output = client
                    .batch_get_secret_value()
                    .set_secret_id_list(Some(chunk.to_vec()))
                    .set_next_token(next_token.take())
                    .send()
                    .await
                    .map_err(|e| explain(&e, "BatchGetSecretValue", "(a batch)", &self.upstream))?;
                for value in output.secret_values() {
                    let version = batch_version(value);
                    // Asked by name or by ARN: answer under what was asked.
                    let asked = chunk
                        .iter()
                        .find(|id| **id == version.name || **id == version.arn)
                        .cloned()
                        .unwrap_or_else(|| version.name.clone());
                    found.insert(asked, Ok(version));
                }
                for error in output.errors() {
                    let id = error.secret_id().unwrap_or_default().to_owned();
                    let failure = explain_code(
                        error.error_code().unwrap_or_default(),
                        error.message().unwrap_or_default(),
                        "GetSecretValue",
                        &id,
                    );
                    found.insert(id, Err(failure));
                }
                next_token = output.next_token().map(str::to_owned);
                if next_token.is_none() {
                    break;
                }
            }
            for name in chunk {
                let result = found.remove(name).unwrap_or_else(|| {
                    Err(StoreError::Unavailable {
                        detail: "BatchGetSecretValue did not answer for this secret".into(),
                    })
                });
                items.push((name.clone(), result));
            }
        }
        Ok(BatchAnswer {
            items,
            upstream_calls,
        })
    }

    async fn check(&self) -> Result<String, StoreError> {
        self.client()
            .await
            .list_secrets()
            .max_results(1)
            .send()
            .await
            .map_err(|e| explain(&e, "ListSecrets", "*", &self.upstream))?;
        Ok(format!(
            "AWS Secrets Manager in {} answered ListSecrets",
            self.region
        ))
    }
}

fn batch_version(value: &SecretValueEntry) -> SecretVersion {
    let secret = match (value.secret_string(), value.secret_binary()) {
        (Some(text), _) => SecretValue::text(text),
        (None, Some(blob)) => SecretValue::binary(blob.as_ref()),
        (None, None) => SecretValue::text(String::new()),
    };
    SecretVersion {
        name: value.name().unwrap_or_default().to_owned(),
        arn: value.arn().unwrap_or_default().to_owned(),
        version_id: value.version_id().unwrap_or_default().to_owned(),
        version_stages: value.version_stages().to_vec(),
        created_date: value
            .created_date()
            .and_then(|date| SystemTime::try_from(*date).ok()),
        value: secret,
    }
}

fn into_version(output: GetSecretValueOutput, asked: &str) -> SecretVersion {
    let value = match (output.secret_string, output.secret_binary) {
        (Some(text), _) => SecretValue::text(text),
        (None, Some(blob)) => SecretValue::binary(blob.into_inner()),
        (None, None) => SecretValue::text(String::new()),
    };
    SecretVersion {
        name: output.name.unwrap_or_else(|| asked.to_owned()),
        arn: output.arn.unwrap_or_default(),
        version_id: output.version_id.unwrap_or_default(),
        version_stages: output.version_stages.unwrap_or_default(),
        created_date: output
            .created_date
            .and_then(|date| SystemTime::try_from(date).ok()),
        value,
    }
}
