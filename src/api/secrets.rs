//! SecretsService: what applications call (reads, typed configs, the
//! WatchSecret stream).
//!
//! Each handler admits its call (identity, audit record), checks the policy
//! before the cache or AWS is touched, then answers from the cache. A
//! cached GetSecret takes a path of its own (`get_secret_now`, which
//! `routes` calls without boxing a future) that awaits nothing and
//! allocates nothing, because it is nearly every call the broker serves.
//! Errors stay `ApiError` until `respond` maps them once.

use std::{pin::Pin, sync::Arc};

use futures::{Stream, StreamExt, future::join_all};
use prost::Message as _;
use tonic::{Request, Response, Status};

use super::{
    ApiContext,
    audit::{Audit, ItemOutcome, refused_shown},
    message::{self, Contents},
    refuse, respond,
    status::ApiError,
    typed::TypedConfigRpc,
};
use secrets_broker_contract::encoded::EncodedGetSecretResponse;

use crate::{
    api::rpc::Rpc,
    backend::{SelectorRef, StoreError, VersionSelector, check_version_field},
    cache::{CacheKey, KeyRef, Lookup},
    identity::Identity,
    names::NameRoom,
    policy::{Authorizer, Denied},
    proto::{
        BatchGetSecretsRequest, BatchGetSecretsResponse, BatchGetSecretsResult,
        GetAwsServicesConfigRequest, GetAwsServicesConfigResponse, GetDatabaseConfigRequest,
        GetDatabaseConfigResponse, GetJwtConfigRequest, GetJwtConfigResponse, GetSecretRequest,
        GetSecurityConfigRequest, GetSecurityConfigResponse, WatchSecretRequest,
        WatchSecretResponse, batch_get_secrets_result, secrets_service_server::SecretsService,
    },
    watch::Subscription,
};

/// The most names one BatchGetSecrets call may ask for.
pub const MAX_BATCH_NAMES: usize = 100;

/// The most bytes one BatchGetSecrets answer takes, per-item errors aside.
/// gRPC clients refuse a message over 4 MiB by default (grpc-core,
/// grpc-go, grpc-js, tonic), and 100 secrets of AWS's 64 KB would make
/// 6.4 MB: the secrets past this get an error of their own
/// (`ANSWER_TOO_LARGE`), to be read in another call, rather than the whole
/// answer being refused by the client. The names, echoed in each result,
/// are counted against it; the room left under 4 MiB holds the per-item
/// errors (at most 100, each well under a KiB).
pub const MAX_BATCH_ANSWER: usize = 4 * 1024 * 1024 - 128 * 1024;

/// A result's framing in the answer (its key and length) and its name's,
/// at most.
const RESULT_FRAMING: usize = 8;

/// What the cache alone could do for a GetSecret.
enum FromCache {
    Answered(EncodedGetSecretResponse),
    /// Not a fresh hit (or a bypass): this key is read through the cache.
    Missed(CacheKey),
}

/// A GetSecret after its first, synchronous step (`get_secret_now`).
pub(super) enum GetSecretCall {
    /// Answered from the cache, or refused; audited.
    Done(Result<Response<EncodedGetSecretResponse>, Status>),
    /// To be read through the cache (`get_secret_read`). Boxed: a hit's
    /// answer, nearly every call, need not carry a miss's room.
    Read(Box<GetSecretRead>),
}

/// A GetSecret the cache could not answer at once: its audit record, its
/// request, and the key to read.
pub(super) struct GetSecretRead {
    audit: Audit,
    request: GetSecretRequest,
    key: CacheKey,
}

/// The SecretsService implementation.
pub struct SecretsApi {
    context: ApiContext,
}

impl SecretsApi {
    pub fn new(context: ApiContext) -> Self {
        Self { context }
    }

    /// Resolves a name and checks the caller may read it: before any cache
    /// or upstream access, so a refused caller learns nothing of the secret.
    /// The name is noted in the audit record before the check, so that a
    /// refusal is audited with what was refused.
    fn authorized_name(&self, audit: &mut Audit, name: &str) -> Result<String, ApiError> {
        let mut room = NameRoom::new();
        self.authorized_in(audit, name, &mut room)
            .map(str::to_owned)
    }

    /// `authorized_name` without allocating (GetSecret's hit path): a
    /// prefixed name is written into `room`.
    fn authorized_in<'a>(
        &self,
        audit: &mut Audit,
        name: &'a str,
        room: &'a mut NameRoom,
    ) -> Result<&'a str, ApiError> {
        let resolved = self.context.names.resolve_in(name, room);
        match &resolved {
            Ok(full_name) => audit.secret(full_name),
            Err(_) => audit.refused_name(name),
        }
        // Who asks comes before what was asked: an unauthenticated caller
        // learns nothing of the names' rules (and is audited with them).
        self.context.authorizer.check_identity(audit.identity())?;
        let full_name = resolved?;
        self.context
            .authorizer
            .check_read(audit.identity(), full_name)?;
        Ok(full_name)
    }

    async fn lookup(
        &self,
        audit: &mut Audit,
        full_name: String,
        selector: VersionSelector,
        bypass: bool,
    ) -> Result<Lookup, ApiError> {
        let key = CacheKey::new(full_name, selector);
        let lookup = self.context.read(key, bypass, audit.deadline()).await?;
        audit.cache_hit(lookup.hit);
        Ok(lookup)
    }

    /// GetSecret as far as it goes without awaiting anything: answered
    /// from the cache or refused, with its audit event; or the read through
    /// the cache left to do.
    pub(super) fn get_secret_now(&self, request: Request<GetSecretRequest>) -> GetSecretCall {
        let mut audit = self.context.admit(Rpc::GetSecret, &request);
        let request = request.into_inner();
        match self.answer_from_cache(&mut audit, &request) {
            Ok(FromCache::Answered(response)) => GetSecretCall::Done(respond(audit, Ok(response))),
            Ok(FromCache::Missed(key)) => GetSecretCall::Read(Box::new(GetSecretRead {
                audit,
                request,
                key,
            })),
            Err(error) => GetSecretCall::Done(Err(refuse(audit, error))),
        }
    }

    /// The rest of a GetSecret the cache could not answer at once.
    pub(super) async fn get_secret_read(
        &self,
        read: Box<GetSecretRead>,
    ) -> Result<Response<EncodedGetSecretResponse>, Status> {
        let GetSecretRead {
            mut audit,
            request,
            key,
        } = *read;
        let result = self
            .lookup(&mut audit, key.name, key.selector, request.bypass_cache)
            .await
            .map(|lookup| message::get_secret_response(&lookup))
            .map_err(|error| error.naming_the_version(&request.version_id, &request.version_stage));
        respond(audit, result)
    }

    /// GetSecret's hit path, without awaiting anything: the resolved name
    /// (in a `NameRoom`) and the borrowed key live on this stack frame only,
    /// not in the call's future. A miss hands back the owned key to read.
    fn answer_from_cache(
        &self,
        audit: &mut Audit,
        request: &GetSecretRequest,
    ) -> Result<FromCache, ApiError> {
        let mut room = NameRoom::new();
        let full_name = self.authorized_in(audit, &request.name, &mut room)?;
        let selector = SelectorRef::from_request(&request.version_id, &request.version_stage)?;
        let key = KeyRef {
            name: full_name,
            selector,
        };
        if !request.bypass_cache
            && let Some(lookup) = self.context.cache.hit(key, audit.started())
        {
            audit.cache_hit(true);
            return Ok(FromCache::Answered(message::get_secret_response(&lookup)));
        }
        Ok(FromCache::Missed(key.to_owned()))
    }

    async fn batch_get_secrets(
        &self,
        audit: &mut Audit,
        request: BatchGetSecretsRequest,
    ) -> Result<BatchGetSecretsResponse, ApiError> {
        // A caller that is not authenticated is refused as a whole, as
        // every other call is, not name by name.
        if let Err(denied) = self.context.authorizer.check_identity(audit.identity()) {
            self.context.note_asked(audit, &request.names);
            return Err(denied.into());
        }
        if request.names.len() > MAX_BATCH_NAMES {
            // Refused as a whole: the line names what was asked, as
            // ClearCache's does (the first names, then how many more).
            self.context.note_asked(audit, &request.names);
            return Err(ApiError::TooManyNames {
                count: request.names.len(),
                limit: MAX_BATCH_NAMES,
            });
        }
        let caller = audit.identity().clone();
        let deadline = audit.deadline();
        let bypass = request.bypass_cache;
        // Each outcome carries the resolved name when there is one, for
        // the audit trail.
        let outcomes = join_all(request.names.iter().map(|name| async {
            let full_name = self
                .context
                .names
                .resolve(name)
                .map_err(|e| (None, ApiError::from(e)))?;
            let denied = self.context.authorizer.check_read(&caller, &full_name);
            if let Err(denied) = denied {
                return Err((Some(full_name), ApiError::from(denied)));
            }
            let key = CacheKey::new(full_name.clone(), VersionSelector::current());
            match self.context.read(key, bypass, deadline).await {
                Ok(lookup) => Ok((full_name, lookup)),
                Err(error) => Err((Some(full_name), ApiError::from(error))),
            }
        }))
        .await;
        // The echoed names first: what is left is the secrets' room.
        let mut answer_len: usize = request
            .names
            .iter()
            .map(|name| name.len() + RESULT_FRAMING)
            .sum();
        let results = request
            .names
            .into_iter()
            .zip(outcomes)
            .map(|(name, outcome)| {
                let outcome = outcome.and_then(|(full_name, lookup)| {
                    let secret = message::secret(&lookup, Contents::WithValue);
                    let len = secret.encoded_len() + RESULT_FRAMING;
                    if answer_len + len > MAX_BATCH_ANSWER {
                        let limit = MAX_BATCH_ANSWER;
                        return Err((Some(full_name), ApiError::BatchAnswerFull { limit }));
                    }
                    answer_len += len;
                    Ok((full_name, lookup.hit, secret))
                });
                let result = match outcome {
                    Ok((full_name, hit, secret)) => {
                        audit.batch_item(&full_name, ItemOutcome::Served { hit });
                        batch_get_secrets_result::Result::Secret(secret)
                    }
                    Err((full_name, error)) => {
                        let shown = full_name.unwrap_or_else(|| refused_shown(&name));
                        audit.batch_item(&shown, ItemOutcome::refused(&error));
                        batch_get_secrets_result::Result::Error(error.to_secret_error())
                    }
                };
                BatchGetSecretsResult {
                    name,
                    result: Some(result),
                }
            })
            .collect();
        Ok(BatchGetSecretsResponse { results })
    }

    async fn subscribe(
        &self,
        audit: &mut Audit,
        request: &WatchSecretRequest,
    ) -> Result<(Subscription, String), ApiError> {
        let full_name = self.authorized_name(audit, &request.name)?;
        check_version_field("since_version_id", &request.since_version_id)?;
        check_since_arn(&request.since_arn)?;
        let stage = match VersionSelector::from_request("", &request.version_stage)? {
            VersionSelector::Stage(stage) => stage,
            VersionSelector::Id { .. } => unreachable!("no version id was given"),
        };
        let held = (
            request.since_version_id.as_str(),
            request.since_arn.as_str(),
        );
        let watch = &self.context.watch;
        let subscribed = async {
            let resumes = !request.since_version_id.is_empty();
            let mut subscription = watch
                .subscribe(full_name.clone(), stage.clone(), resumes)
                .await?;
            if !subscription.checked && message::tells_a_change(&subscription.first, held) {
                watch
                    .confirm_first(&mut subscription, &full_name, &stage)
                    .await?;
            }
            Ok(subscription)
        };
        // A stream that would end with the shutdown anyway does not hold
        // the drain while its first read waits on a slow upstream.
        let subscribed = tokio::select! {
            biased;
            () = watch.stopped() => return Err(ApiError::WatchShutDown),
            subscribed = subscribed => subscribed,
        };
        let subscription = subscribed.map_err(|error: StoreError| {
            ApiError::from(error).naming_the_version("", &request.version_stage)
        })?;
        // Still unconfirmed (AWS failing, or backed off): only AWS can say
        // which of the two versions is newer.
        if !subscription.checked && message::tells_a_change(&subscription.first, held) {
            return Err(ApiError::Store(StoreError::Unavailable {
                detail: "AWS could not be read to tell whether the version this watcher \
                         holds or the one this broker holds is newer; reconnect with \
                         since_version_id"
                    .into(),
            }));
        }
        Ok((subscription, full_name))
    }

    /// Reads the current version of a typed config's secret and decodes it.
    async fn typed_config<R: TypedConfigRpc>(
        &self,
        audit: &mut Audit,
        request: &R,
    ) -> Result<R::Response, ApiError> {
        let resolved = self
            .context
            .names
            .resolve_or_default(request.name(), R::KIND);
        match &resolved {
            Ok(full_name) => audit.secret(full_name),
            Err(_) => audit.refused_name(request.name()),
        }
        self.context.authorizer.check_identity(audit.identity())?;
        let full_name = resolved?;
        self.context
            .authorizer
            .check_read(audit.identity(), &full_name)?;
        let lookup = self
            .lookup(
                audit,
                full_name,
                VersionSelector::current(),
                request.bypass_cache(),
            )
            .await?;
        let version = &lookup.version;
        let config = R::decode(&version.value).map_err(|source| ApiError::Malformed {
            name: version.name.clone(),
            kind: R::LABEL,
            source,
        })?;
        Ok(R::respond(config, &lookup))
    }

    /// The typed-config RPCs' one handler.
    async fn serve_typed<R: TypedConfigRpc>(
        &self,
        request: Request<R>,
    ) -> Result<Response<R::Response>, Status> {
        let mut audit = self.context.admit(R::RPC, &request);
        let result = self.typed_config(&mut audit, request.get_ref()).await;
        respond(audit, result)
    }
}

/// WatchSecret's `since_arn`: empty (a backend without ARNs), or a
/// secret's ARN, as `Secret.arn` gives it; anything else was not taken
/// from an answer, and is refused by name rather than compared.
fn check_since_arn(arn: &str) -> Result<(), ApiError> {
    if arn.is_empty() {
        return Ok(());
    }
    if arn.len() > crate::names::MAX_ARN_LEN {
        return Err(ApiError::InvalidSinceArn {
            problem: "longer than 2,048 characters",
        });
    }
    match crate::names::SecretArn::parse(arn) {
        // A partial ARN names a secret by name, not one secret: compared,
        // it would tell a rotation of the very version held.
        Ok(parsed) if parsed.suffix.is_none() => Err(ApiError::InvalidSinceArn {
            problem: "a partial ARN (without the six characters AWS appends); send Secret.arn as given",
        }),
        Ok(_) => Ok(()),
        Err(crate::names::InvalidName::BadArn { problem }) => {
            Err(ApiError::InvalidSinceArn { problem })
        }
        Err(_) => Err(ApiError::InvalidSinceArn {
            problem: "not a secret's ARN",
        }),
    }
}

/// The changes after the first message. The stream ends with UNAVAILABLE
/// when the broker shuts down (the client reconnects elsewhere with its
/// version), and with PERMISSION_DENIED when a policy reload takes the
/// caller's right to the secret away.
fn watch_stream(
    subscription: Subscription,
    access: WatchAccess,
) -> impl Stream<Item = Result<WatchSecretResponse, Status>> + Send + 'static {
    futures::stream::unfold(Some((subscription, access)), |state| async move {
        let (mut subscription, mut access) = state?;
        loop {
            let event = tokio::select! {
                biased;
                _ = subscription.shutdown.wait_for(|stop| *stop) => WatchWake::Shutdown,
                reloaded = access.reloads.changed() => match reloaded {
                    Ok(()) => WatchWake::PolicyReloaded,
                    Err(_) => WatchWake::Shutdown,
                },
                changed = subscription.changes.changed() => match changed {
                    Ok(()) => WatchWake::Changed,
                    Err(_) => WatchWake::Shutdown,
                },
            };
            match event {
                WatchWake::Shutdown => {
                    return Some((Err(Status::from(ApiError::WatchShutDown)), None));
                }
                WatchWake::PolicyReloaded => {
                    if let Err(denied) = access.recheck() {
                        let refusal = ApiError::from(denied);
                        tracing::info!(target: "audit", identity = access.caller.shown(), rpc = Rpc::WatchSecret.name(), secrets = access.secret.as_str(), outcome = "PERMISSION_DENIED", reason = refusal.reason(), "watch ended by a policy reload");
                        return Some((Err(Status::from(refusal)), None));
                    }
                }
                WatchWake::Changed => {
                    let state = subscription.changes.borrow_and_update().clone();
                    let message = message::watch_event(&state);
                    return Some((Ok(message), Some((subscription, access))));
                }
            }
        }
    })
}

enum WatchWake {
    Shutdown,
    PolicyReloaded,
    Changed,
}

/// What a watch stream needs to re-check its caller after a policy reload.
struct WatchAccess {
    authorizer: Arc<Authorizer>,
    reloads: tokio::sync::watch::Receiver<u64>,
    caller: Identity,
    secret: String,
}

impl WatchAccess {
    fn recheck(&self) -> Result<(), Denied> {
        self.authorizer.check_read(&self.caller, &self.secret)
    }
}

#[tonic::async_trait]
impl SecretsService for SecretsApi {
    /// The server routes GetSecret to `routes::SecretsRoutes`, which takes
    /// the same two steps without this method's boxing.
    async fn get_secret(
        &self,
        request: Request<GetSecretRequest>,
    ) -> Result<Response<EncodedGetSecretResponse>, Status> {
        match self.get_secret_now(request) {
            GetSecretCall::Done(answer) => answer,
            GetSecretCall::Read(read) => self.get_secret_read(read).await,
        }
    }

    async fn batch_get_secrets(
        &self,
        request: Request<BatchGetSecretsRequest>,
    ) -> Result<Response<BatchGetSecretsResponse>, Status> {
        let mut audit = self.context.admit(Rpc::BatchGetSecrets, &request);
        let result = self
            .batch_get_secrets(&mut audit, request.into_inner())
            .await;
        respond(audit, result)
    }

    async fn get_jwt_config(
        &self,
        request: Request<GetJwtConfigRequest>,
    ) -> Result<Response<GetJwtConfigResponse>, Status> {
        self.serve_typed(request).await
    }

    async fn get_database_config(
        &self,
        request: Request<GetDatabaseConfigRequest>,
    ) -> Result<Response<GetDatabaseConfigResponse>, Status> {
        self.serve_typed(request).await
    }

    async fn get_aws_services_config(
        &self,
        request: Request<GetAwsServicesConfigRequest>,
    ) -> Result<Response<GetAwsServicesConfigResponse>, Status> {
        self.serve_typed(request).await
    }

    async fn get_security_config(
        &self,
        request: Request<GetSecurityConfigRequest>,
    ) -> Result<Response<GetSecurityConfigResponse>, Status> {
        self.serve_typed(request).await
    }

    type WatchSecretStream =
        Pin<Box<dyn Stream<Item = Result<WatchSecretResponse, Status>> + Send + 'static>>;

    async fn watch_secret(
        &self,
        request: Request<WatchSecretRequest>,
    ) -> Result<Response<Self::WatchSecretStream>, Status> {
        let mut audit = self.context.admit(Rpc::WatchSecret, &request);
        let caller = audit.identity().clone();
        let request = request.into_inner();
        // Taken before subscribing, so that no reload between the check and
        // the stream's start goes unnoticed.
        let reloads = self.context.authorizer.reloads();
        let subscribed = self.subscribe(&mut audit, &request).await;
        let (subscription, secret) = respond(audit, subscribed)?.into_inner();
        let access = WatchAccess {
            authorizer: Arc::clone(&self.context.authorizer),
            reloads,
            caller,
            secret,
        };
        let first = message::first_watch_event(
            &subscription.first,
            &request.since_version_id,
            &request.since_arn,
        );
        let changes = watch_stream(subscription, access);
        let stream = futures::stream::once(async move { Ok(first) }).chain(changes);
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        alloc_count::allocations_in, api::CallMetrics, backend::fake::FakeStore, events::Events,
        names::NameResolver, watch::tests::hub_over,
    };

    /// A SecretsApi over a fake store holding `insurecove/db`, that
    /// secret already cached (its answer is encoded at the first hit), and
    /// the runtime it was read on.
    pub(in crate::api) fn api_holding_db(
        authorizer: Arc<Authorizer>,
    ) -> (tokio::runtime::Runtime, SecretsApi) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let api = {
            let _entered = runtime.enter();
            let store = FakeStore::with(&["insurecove/db"]);
            let (watch, cache) = hub_over(&store);
            let registry = crate::metrics::Metrics::new();
            SecretsApi::new(ApiContext {
                cache,
                names: NameResolver::new("insurecove", "production"),
                watch,
                events: Events::new(None),
                authorizer,
                metrics: CallMetrics::register(&registry, false),
                call_timeout: Duration::from_secs(30),
            })
        };
        // The miss, then the first answer from the cache (which encodes).
        runtime
            .block_on(api.context.cache.get(
                CacheKey::new("insurecove/db".into(), VersionSelector::current()),
                false,
            ))
            .unwrap();
        (runtime, api)
    }

    /// The allocations of a cached GetSecret in the broker's part
    /// (resolve, authorize, look up, audit, metrics, answer), for a caller
    /// on `connection` under `authorizer`.
    fn allocations_of_a_hit(
        authorizer: Arc<Authorizer>,
        connection: Option<crate::transport::connection_info::ConnectionInfo>,
    ) -> u64 {
        let (runtime, api) = api_holding_db(authorizer);
        let _entered = runtime.enter();
        let call = |request: Request<GetSecretRequest>| match api.get_secret_now(request) {
            GetSecretCall::Done(answer) => answer,
            GetSecretCall::Read(_) => panic!("a cached answer does not wait"),
        };
        let request = || {
            let mut request = Request::new(GetSecretRequest {
                name: "db".into(),
                ..GetSecretRequest::default()
            });
            if let Some(connection) = &connection {
                request.extensions_mut().insert(connection.clone());
            }
            request
        };
        call(request()).unwrap();

        let next = request();
        let (answer, allocations) = allocations_in(|| call(next));
        let answer = answer.expect("the caller may read the secret").into_inner();
        assert!(answer.cache().hit);
        allocations
    }

    #[test]
    fn a_cached_get_secret_allocates_nothing_in_the_broker() {
        let plaintext = allocations_of_a_hit(Authorizer::new(None, false).unwrap(), None);
        assert_eq!(plaintext, 0, "plaintext, no policy");
    }

    #[test]
    fn a_cached_get_secret_under_mtls_and_a_policy_allocates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let policy = dir.path().join("policy.toml");
        std::fs::write(
            &policy,
            "[[grant]]\nidentity = \"spiffe://insurecove/*\"\nsecrets = [\"insurecove/other\", \"insurecove/d*\"]\n",
        )
        .unwrap();
        let connection = crate::transport::connection_info::ConnectionInfo::new(
            crate::identity::Identity::uri("spiffe://insurecove/auth-service"),
            8,
        );
        let mtls = allocations_of_a_hit(
            Authorizer::new(Some(&policy), true).unwrap(),
            Some(connection),
        );
        assert_eq!(mtls, 0, "certificate identity, glob grants");
    }
}
