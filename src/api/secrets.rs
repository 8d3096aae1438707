//! SecretsService: what applications call.

use std::pin::Pin;

use futures::{Stream, StreamExt, future::join_all};
use tonic::{Request, Response, Status};

use super::{
    ApiContext,
    message::{self, Contents},
    status::ApiError,
    typed::{self, Malformed},
};
use crate::{
    backend::{VersionSelector, check_version_field},
    cache::{CacheKey, Lookup},
    proto::{
        BatchGetSecretsRequest, BatchGetSecretsResponse, BatchGetSecretsResult,
        GetAwsServicesConfigRequest, GetAwsServicesConfigResponse, GetDatabaseConfigRequest,
        GetDatabaseConfigResponse, GetJwtConfigRequest, GetJwtConfigResponse, GetSecretRequest,
        GetSecretResponse, GetSecurityConfigRequest, GetSecurityConfigResponse, WatchSecretRequest,
        WatchSecretResponse, batch_get_secrets_result, secrets_service_server::SecretsService,
    },
    secret::SecretValue,
    watch::Subscription,
};

/// The most names one BatchGetSecrets call may ask for.
pub const MAX_BATCH_NAMES: usize = 100;

/// The SecretsService implementation.
pub struct SecretsApi {
    context: ApiContext,
}

impl SecretsApi {
    pub fn new(context: ApiContext) -> Self {
        Self { context }
    }

    async fn lookup(
        &self,
        name: &str,
        selector: VersionSelector,
        bypass: bool,
    ) -> Result<Lookup, ApiError> {
        let full_name = self.context.names.resolve(name)?;
        let key = CacheKey::new(full_name, selector);
        Ok(self.context.cache.get(key, bypass).await?)
    }

    async fn get_secret(&self, request: GetSecretRequest) -> Result<GetSecretResponse, ApiError> {
        let selector = VersionSelector::from_request(&request.version_id, &request.version_stage)?;
        let lookup = self
            .lookup(&request.name, selector, request.bypass_cache)
            .await?;
        Ok(GetSecretResponse {
            secret: Some(message::secret(&lookup, Contents::WithValue)),
        })
    }

    async fn batch_result(&self, name: String, bypass: bool) -> BatchGetSecretsResult {
        let result = match self.lookup(&name, VersionSelector::current(), bypass).await {
            Ok(lookup) => batch_get_secrets_result::Result::Secret(message::secret(
                &lookup,
                Contents::WithValue,
            )),
            Err(error) => batch_get_secrets_result::Result::Error(error.to_secret_error()),
        };
        BatchGetSecretsResult {
            name,
            result: Some(result),
        }
    }

    async fn subscribe(&self, request: &WatchSecretRequest) -> Result<Subscription, ApiError> {
        let name = self.context.names.resolve(&request.name)?;
        check_version_field("since_version_id", &request.since_version_id)?;
        let stage = match VersionSelector::from_request("", &request.version_stage)? {
            VersionSelector::Stage(stage) => stage,
            VersionSelector::Id { .. } => unreachable!("no version id was given"),
        };
        Ok(self.context.watch.subscribe(name, stage).await?)
    }

    /// Reads the current version of a typed config's secret and decodes it.
    async fn typed_config<T>(
        &self,
        name: &str,
        default_kind: &'static str,
        bypass: bool,
        decode: fn(&SecretValue) -> Result<T, Malformed>,
    ) -> Result<(T, String), ApiError> {
        let full_name = self.context.names.resolve_or_default(name, default_kind)?;
        let key = CacheKey::new(full_name, VersionSelector::current());
        let lookup = self.context.cache.get(key, bypass).await?;
        let version = &lookup.version;
        let config = decode(&version.value).map_err(|source| ApiError::Malformed {
            name: version.name.clone(),
            kind: kind_label(default_kind),
            source,
        })?;
        Ok((config, version.version_id.clone()))
    }
}

/// The changes after the first message, until the broker shuts down (then
/// one UNAVAILABLE, so the client reconnects elsewhere with its version).
fn watch_stream(
    subscription: Subscription,
) -> impl Stream<Item = Result<WatchSecretResponse, Status>> + Send + 'static {
    futures::stream::unfold(Some(subscription), |subscription| async move {
        let mut subscription = subscription?;
        let shutting_down =
            || Status::unavailable("the broker is shutting down; reconnect with since_version_id");
        let changed = tokio::select! {
            biased;
            _ = subscription.shutdown.wait_for(|stop| *stop) => false,
            changed = subscription.changes.changed() => changed.is_ok(),
        };
        if !changed {
            return Some((Err(shutting_down()), None));
        }
        let state = subscription.changes.borrow_and_update().clone();
        Some((Ok(message::watch_event(&state)), Some(subscription)))
    })
}

fn kind_label(default_kind: &str) -> &'static str {
    match default_kind {
        "jwt" => "a JWT config",
        "database" => "a database config",
        "aws-services" => "an AWS services config",
        _ => "a security config",
    }
}

/// The edge: a handler's typed result becomes a gRPC answer here.
fn respond<T>(result: Result<T, ApiError>) -> Result<Response<T>, Status> {
    result.map(Response::new).map_err(Status::from)
}

#[tonic::async_trait]
impl SecretsService for SecretsApi {
    async fn get_secret(
        &self,
        request: Request<GetSecretRequest>,
    ) -> Result<Response<GetSecretResponse>, Status> {
        respond(self.get_secret(request.into_inner()).await)
    }

    async fn batch_get_secrets(
        &self,
        request: Request<BatchGetSecretsRequest>,
    ) -> Result<Response<BatchGetSecretsResponse>, Status> {
        let request = request.into_inner();
        if request.names.len() > MAX_BATCH_NAMES {
            return Err(Status::invalid_argument(format!(
                "names holds {} names; at most {MAX_BATCH_NAMES} are allowed per call",
                request.names.len()
            )));
        }
        let bypass = request.bypass_cache;
        let results = join_all(
            request
                .names
                .into_iter()
                .map(|name| self.batch_result(name, bypass)),
        )
        .await;
        Ok(Response::new(BatchGetSecretsResponse { results }))
    }

    async fn get_jwt_config(
        &self,
        request: Request<GetJwtConfigRequest>,
    ) -> Result<Response<GetJwtConfigResponse>, Status> {
        let request = request.into_inner();
        let result = self
            .typed_config(
                &request.name,
                "jwt",
                request.bypass_cache,
                typed::jwt_config,
            )
            .await;
        respond(result.map(|(config, version_id)| GetJwtConfigResponse {
            config: Some(config),
            version_id,
        }))
    }

    async fn get_database_config(
        &self,
        request: Request<GetDatabaseConfigRequest>,
    ) -> Result<Response<GetDatabaseConfigResponse>, Status> {
        let request = request.into_inner();
        let result = self
            .typed_config(
                &request.name,
                "database",
                request.bypass_cache,
                typed::database_config,
            )
            .await;
        respond(
            result.map(|(config, version_id)| GetDatabaseConfigResponse {
                config: Some(config),
                version_id,
            }),
        )
    }

    async fn get_aws_services_config(
        &self,
        request: Request<GetAwsServicesConfigRequest>,
    ) -> Result<Response<GetAwsServicesConfigResponse>, Status> {
        let request = request.into_inner();
        let result = self
            .typed_config(
                &request.name,
                "aws-services",
                request.bypass_cache,
                typed::aws_services_config,
            )
            .await;
        respond(
            result.map(|(config, version_id)| GetAwsServicesConfigResponse {
                config: Some(config),
                version_id,
            }),
        )
    }

    async fn get_security_config(
        &self,
        request: Request<GetSecurityConfigRequest>,
    ) -> Result<Response<GetSecurityConfigResponse>, Status> {
        let request = request.into_inner();
        let result = self
            .typed_config(
                &request.name,
                "security",
                request.bypass_cache,
                typed::security_config,
            )
            .await;
        respond(
            result.map(|(config, version_id)| GetSecurityConfigResponse {
                config: Some(config),
                version_id,
            }),
        )
    }

    type WatchSecretStream =
        Pin<Box<dyn Stream<Item = Result<WatchSecretResponse, Status>> + Send + 'static>>;

    async fn watch_secret(
        &self,
        request: Request<WatchSecretRequest>,
    ) -> Result<Response<Self::WatchSecretStream>, Status> {
        let request = request.into_inner();
        let subscription = self.subscribe(&request).await.map_err(Status::from)?;
        let first = message::first_watch_event(&subscription.first, &request.since_version_id);
        let changes = watch_stream(subscription);
        let stream = futures::stream::once(async move { Ok(first) }).chain(changes);
        Ok(Response::new(Box::pin(stream)))
    }
}
