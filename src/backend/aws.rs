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
//! Failures are classified by the AWS error code, so the cache can tell a
//! transient outage from a definite answer.

use std::{
    collections::HashMap,
    time::{Duration, SystemTime},
};

use async_trait::async_trait;
use aws_config::{BehaviorVersion, Region, retry::RetryConfig, timeout::TimeoutConfig};
use aws_sdk_secretsmanager::{
    Client,
    error::{DisplayErrorContext, ProvideErrorMetadata, SdkError},
    operation::get_secret_value::GetSecretValueOutput,
    types::SecretValueEntry,
};
use tokio::sync::OnceCell;

use super::{
    BATCH_LIMIT, BatchAnswer, SecretDescription, SecretStore, StoreError, VersionSelector,
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
    client: OnceCell<Client>,
}

impl AwsStore {
    /// Nothing is contacted until the first call.
    pub fn new(region: &str) -> Self {
        Self {
            region: region.to_owned(),
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
        let output = request.send().await.map_err(|e| classify(&e, name))?;
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
            .map_err(|e| classify(&e, name))?;
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
                    .map_err(|e| classify(&e, "(BatchGetSecretValue)"))?;
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
                    let failure = classify_code(
                        error.error_code().unwrap_or_default(),
                        error.message().unwrap_or_default(),
                        id.clone(),
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
            .map_err(|e| classify(&e, "(ListSecrets)"))?;
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

/// Sorts an SDK failure into what the cache needs to know. AWS's messages
/// name secrets and rules, never values, so they may be kept as detail.
fn classify<E, R>(error: &SdkError<E, R>, name: &str) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let name = name.to_owned();
    match error {
        SdkError::ServiceError(service) => {
            let err = service.err();
            let code = err.code().unwrap_or_default();
            let message = err.message().unwrap_or_default();
            classify_code(code, message, name)
        }
        SdkError::TimeoutError(_) => StoreError::Unavailable {
            detail: "the call to AWS timed out".into(),
        },
        SdkError::DispatchFailure(failure) if failure.is_timeout() => StoreError::Unavailable {
            detail: "connecting to AWS timed out".into(),
        },
        SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => StoreError::Unavailable {
            detail: DisplayErrorContext(error).to_string(),
        },
        _ => StoreError::Rejected {
            detail: DisplayErrorContext(error).to_string(),
        },
    }
}

fn classify_code(code: &str, message: &str, name: String) -> StoreError {
    match code {
        "ResourceNotFoundException" => StoreError::NotFound { name },
        "InvalidRequestException"
            if message.to_ascii_lowercase().contains("deleted")
                || message.to_ascii_lowercase().contains("deletion") =>
        {
            StoreError::Deleted { name }
        }
        "AccessDeniedException"
        | "UnrecognizedClientException"
        | "InvalidSignatureException"
        | "ExpiredTokenException" => StoreError::AccessDenied { name },
        "ThrottlingException" | "TooManyRequestsException" | "RequestLimitExceeded" => {
            StoreError::Throttled
        }
        "InternalServiceError" | "InternalFailure" | "ServiceUnavailable" => {
            StoreError::Unavailable {
                detail: format!("AWS answered {code}"),
            }
        }
        _ => {
            // AWS's message may name accounts or keys: it goes to the log,
            // the caller gets the code.
            tracing::warn!(secret = %name, code, message, "AWS refused a request");
            StoreError::Rejected {
                detail: format!("AWS answered {code}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aws_codes_map_to_what_the_cache_needs() {
        let name = || "insurecove/x".to_owned();
        assert_eq!(
            classify_code("ResourceNotFoundException", "", name()),
            StoreError::NotFound { name: name() }
        );
        assert_eq!(
            classify_code(
                "InvalidRequestException",
                "You can't perform this operation on the secret because it was marked for deletion.",
                name()
            ),
            StoreError::Deleted { name: name() }
        );
        assert!(matches!(
            classify_code(
                "InvalidRequestException",
                "rotation is not configured",
                name()
            ),
            StoreError::Rejected { .. }
        ));
        assert_eq!(
            classify_code("AccessDeniedException", "", name()),
            StoreError::AccessDenied { name: name() }
        );
        assert_eq!(
            classify_code("ThrottlingException", "Rate exceeded", name()),
            StoreError::Throttled
        );
        assert!(classify_code("InternalServiceError", "", name()).is_transient());
        assert!(!classify_code("DecryptionFailure", "", name()).is_transient());
    }
}
