//! The AWS Secrets Manager backend, through `aws-sdk-secretsmanager`.
//!
//! The SDK client is built on first use and then shared: one connection
//! pool for the whole broker, kept open. Credentials come from the SDK's
//! default chain (environment keys, profile, IAM role), the endpoint from
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
    Client,
    error::ProvideErrorMetadata as _,
    operation::get_secret_value::GetSecretValueOutput,
    types::{Filter, FilterNameStringType, SecretListEntry},
};
use tokio::sync::OnceCell;

use super::{
    LIST_PAGE_SIZE, SecretDescription, SecretPage, SecretStore, StoreError, VersionSelector,
    aws_error::{Service, Upstream, explain, says_secret_deleted},
};
use crate::secret::{SecretValue, SecretVersion};

/// A read of a version id and a stage that name different versions is, for
/// its caller, a read of a version that does not exist (as the file and
/// dev backends answer it). AWS may answer it as an invalid request
/// (moto does, "a VersionStage that is not associated to the provided
/// VersionId"), which would otherwise be a refusal of the broker's own,
/// logged as AWS refusing the broker. A refusal that names the KMS key is
/// the key's, and one that says the secret is deleted is a deletion,
/// whatever was asked.
fn no_version_of_both(
    (code, message): (Option<&str>, Option<&str>),
    selector: &VersionSelector,
) -> bool {
    let both = matches!(selector, VersionSelector::Id { stage: Some(_), .. });
    let message = message.unwrap_or_default();
    both && code == Some("InvalidRequestException")
        && !message.to_ascii_lowercase().contains("kms")
        && !says_secret_deleted(message)
}

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
                let config = sdk_config(&self.region).await;
                tracing::debug!(region = %self.region, "AWS Secrets Manager client ready");
                Client::new(&config)
            })
            .await
    }
}

/// The SDK configuration every AWS client of the broker shares: the
/// default credential chain, the region, endpoints from `AWS_ENDPOINT_URL`
/// (or a service's own, e.g. `AWS_ENDPOINT_URL_SQS`), bounded timeouts and
/// the standard retries.
pub(crate) async fn sdk_config(region: &str) -> aws_config::SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(region.to_owned()))
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                .operation_timeout(OPERATION_TIMEOUT)
                .build(),
        )
        .retry_config(RetryConfig::standard().with_max_attempts(MAX_ATTEMPTS))
        .load()
        .await
}

/// Removes the AWS endpoint variables that are set to nothing
/// (`AWS_ENDPOINT_URL=` left in an env file or a template): they mean
/// "not set", as they do in the broker's own messages (`Upstream`), but the
/// SDK takes an empty one for an endpoint and panics on it, and it offers no
/// way to read a filtered environment.
///
/// # Safety
///
/// Changes the process environment: call it before any other thread is
/// started (first thing in `main`), when nothing else can read it.
pub unsafe fn forget_blank_endpoint_vars() {
    let blank = Service::ALL
        .iter()
        .map(|service| service.endpoint_var())
        .chain(["AWS_ENDPOINT_URL"])
        .filter(|var| {
            std::env::var_os(var).is_some_and(|value| value.to_string_lossy().trim().is_empty())
        });
    for var in blank {
        // SAFETY: the caller promises no other thread runs yet.
        unsafe { std::env::remove_var(var) };
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
        let output = request.send().await.map_err(|e| {
            if no_version_of_both((e.code(), e.message()), selector) {
                tracing::debug!(
                    secret = name,
                    "AWS holds no version of both the id and the stage asked"
                );
                return StoreError::NotFound {
                    name: name.to_owned(),
                };
            }
            explain(&e, "GetSecretValue", name, &self.upstream)
        })?;
        into_version(output, name, &self.upstream)
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
                .map(stages_by_version)
                .unwrap_or_default(),
            deleted: output.deleted_date().is_some(),
        })
    }

    async fn list_secrets(
        &self,
        prefix: &str,
        page: Option<String>,
    ) -> Result<SecretPage, StoreError> {
        let mut request = self
            .client()
            .await
            .list_secrets()
            .max_results(LIST_PAGE_SIZE as i32)
            .include_planned_deletion(true)
            .set_next_token(page);
        if !prefix.is_empty() {
            // AWS's name filter is a case-insensitive prefix match: the
            // answer is filtered again below, exactly.
            request = request.filters(
                Filter::builder()
                    .key(FilterNameStringType::Name)
                    .values(prefix)
                    .build(),
            );
        }
        let output = request
            .send()
            .await
            .map_err(|e| explain(&e, "ListSecrets", prefix, &self.upstream))?;
        // Read as "no secrets", an empty answer would look like every
        // tracked secret gone from the listing.
        let entries = output.secret_list.as_deref().ok_or_else(|| {
            self.upstream
                .incomplete_answer("ListSecrets", prefix, "its SecretList")
        })?;
        Ok(SecretPage {
            secrets: entries
                .iter()
                .filter_map(listed)
                .filter(|secret| secret.name.starts_with(prefix))
                .collect(),
            // An empty token ends the listing too (moto sends one).
            next: output
                .next_token()
                .filter(|t| !t.is_empty())
                .map(str::to_owned),
        })
    }

    async fn check(&self) -> Result<String, StoreError> {
        let output = self
            .client()
            .await
            .list_secrets()
            .max_results(1)
            .send()
            .await
            .map_err(|e| explain(&e, "ListSecrets", "*", &self.upstream))?;
        // AWS sends the list even when it is empty: an answer without it
        // comes from something else (a proxy answering empty 200s), and a
        // broker behind it must not call itself ready.
        if output.secret_list.is_none() {
            return Err(self
                .upstream
                .incomplete_answer("ListSecrets", "*", "its SecretList"));
        }
        Ok(format!(
            "AWS Secrets Manager in {} answered ListSecrets",
            self.region
        ))
    }
}

/// A listed secret's metadata; `None` for an entry without a name.
fn listed(entry: &SecretListEntry) -> Option<SecretDescription> {
    Some(SecretDescription {
        name: entry.name()?.to_owned(),
        arn: entry.arn().unwrap_or_default().to_owned(),
        versions: entry
            .secret_versions_to_stages()
            .map(stages_by_version)
            .unwrap_or_default(),
        deleted: entry.deleted_date().is_some(),
    })
}

fn stages_by_version(map: &HashMap<String, Vec<String>>) -> Vec<(String, Vec<String>)> {
    map.iter()
        .map(|(id, stages)| (id.clone(), stages.clone()))
        .collect()
}

/// A GetSecretValue answer as a version. AWS always sends the version id
/// and a value (text or binary): an answer without them (an empty `{}` of
/// a proxy or a broken endpoint) is not a version, and must not replace
/// the one cached: it fails as an unavailable upstream (the last good value
/// stays served, marked stale).
fn into_version(
    output: GetSecretValueOutput,
    asked: &str,
    upstream: &Upstream,
) -> Result<SecretVersion, StoreError> {
    let incomplete = |missing| upstream.incomplete_answer("GetSecretValue", asked, missing);
    let value = match (output.secret_string, output.secret_binary) {
        (Some(text), _) => SecretValue::text(text),
        (None, Some(blob)) => SecretValue::binary(blob.into_inner()),
        (None, None) => return Err(incomplete("a value")),
    };
    let version_id = output
        .version_id
        .filter(|id| !id.is_empty())
        .ok_or_else(|| incomplete("a version id"))?;
    Ok(SecretVersion {
        name: output.name.unwrap_or_else(|| asked.to_owned()),
        arn: output.arn.unwrap_or_default(),
        version_id,
        version_stages: output.version_stages.unwrap_or_default(),
        created_date: output
            .created_date
            .and_then(|date| SystemTime::try_from(date).ok()),
        value,
        encoded: Default::default(),
    })
}

#[cfg(test)]
mod tests {
    use aws_sdk_secretsmanager::primitives::Blob;

    use super::*;

    fn answer(version_id: Option<&str>, text: Option<&str>) -> GetSecretValueOutput {
        GetSecretValueOutput::builder()
            .name("insurecove/db")
            .set_version_id(version_id.map(str::to_owned))
            .set_secret_string(text.map(str::to_owned))
            .build()
    }

    #[test]
    fn an_answer_without_a_version_id_or_a_value_is_not_a_version() {
        let upstream = Upstream::from_env("ap-east-1", &|_| None);
        for (output, missing) in [
            (answer(None, None), "a value"),
            (answer(Some("v1"), None), "a value"),
            (answer(None, Some("s3cr3t-value")), "a version id"),
            (answer(Some(""), Some("s3cr3t-value")), "a version id"),
        ] {
            match into_version(output, "insurecove/db", &upstream) {
                Err(StoreError::Unavailable { detail }) => {
                    assert!(detail.contains(missing), "{detail}");
                    assert!(!detail.contains("s3cr3t"), "{detail}");
                }
                other => panic!("{other:?}"),
            }
        }
        let version = into_version(answer(Some("v1"), Some("")), "insurecove/db", &upstream)
            .expect("an empty text is a value");
        assert_eq!(version.version_id, "v1");
        let binary = GetSecretValueOutput::builder()
            .version_id("v2")
            .secret_binary(Blob::new(vec![0u8, 1]))
            .build();
        let version = into_version(binary, "insurecove/db", &upstream).unwrap();
        assert_eq!(
            (version.name.as_str(), version.version_id.as_str()),
            ("insurecove/db", "v2")
        );
    }
}
