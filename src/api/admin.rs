//! AdminService: what operators call to inspect and steer the cache
//! (stats, ClearCache, RefreshSecret, CheckUpstream).
//!
//! Apart from SecretsService because its callers are others: every call
//! needs an admin grant of the policy (without a policy file, plaintext
//! callers on loopback may do everything and mTLS callers nothing), and
//! its audit line names the secrets it acted on, so that a cleared or
//! refreshed cache can be traced to who did it.

use std::time::Instant;

use tonic::{Request, Response, Status};

use super::{
    ApiContext, NOTED_NAMES,
    audit::Audit,
    message::{self, Contents},
    refuse, respond,
    status::ApiError,
};
use crate::{
    api::rpc::Rpc,
    backend::{StoreError, VersionSelector},
    cache::{CacheKey, Lookup, answer_by},
    events::ConsumerState,
    proto::{
        CheckUpstreamRequest, CheckUpstreamResponse, ClearCacheRequest, ClearCacheResponse,
        EventConsumer, GetCacheStatsRequest, GetCacheStatsResponse, RefreshSecretRequest,
        RefreshSecretResponse, admin_service_server::AdminService,
    },
};

/// The AdminService implementation.
pub struct AdminApi {
    context: ApiContext,
}

impl AdminApi {
    pub fn new(context: ApiContext) -> Self {
        Self { context }
    }

    /// Every AdminService call starts here: admin identities only. The
    /// names the call asks about go into its audit line first, so that a
    /// refusal says what was asked too.
    fn admit<T>(&self, rpc: Rpc, request: &Request<T>, asked: &[String]) -> Result<Audit, Status> {
        let mut audit = self.context.admit(rpc, request);
        self.context.note_asked(&mut audit, asked);
        match self.context.authorizer.check_admin(audit.identity()) {
            Ok(()) => Ok(audit),
            Err(denied) => Err(refuse(audit, ApiError::from(denied))),
        }
    }

    fn clear_cache(
        &self,
        audit: &mut Audit,
        names: &[String],
    ) -> Result<ClearCacheResponse, ApiError> {
        let resolved = names
            .iter()
            .enumerate()
            .map(|(index, name)| {
                self.context
                    .names
                    .resolve(name)
                    .map_err(|source| ApiError::InvalidNameInList { index, source })
            })
            .collect::<Result<Vec<_>, _>>();
        let full_names = match resolved {
            Ok(full_names) => full_names,
            Err(refused) => {
                // The audit line shows the name refused, also past the
                // names it lists.
                if let ApiError::InvalidNameInList { index, .. } = &refused
                    && *index >= NOTED_NAMES
                {
                    audit.refused_name(&names[*index]);
                }
                return Err(refused);
            }
        };
        Ok(ClearCacheResponse {
            cleared: self.context.cache.clear(&full_names),
        })
    }

    async fn refresh_secret(
        &self,
        audit: &mut Audit,
        name: &str,
    ) -> Result<RefreshSecretResponse, ApiError> {
        // `admit` noted the name.
        let full_name = self.context.names.resolve(name)?;
        // Admin rights are about the cache, not about secrets: what a
        // refresh tells (name, ARN, versions, existence) needs the read
        // grant too.
        self.context
            .authorizer
            .check_read(audit.identity(), &full_name)?;
        let key = CacheKey::new(full_name, VersionSelector::current());
        // Spread only a move from a version held here: `changed` is true
        // of a key that was not cached at all, too.
        let held = self.context.cache.held_version(&key);
        let (version, changed) = self
            .context
            .cache
            .refresh_the_secret(key.clone(), audit.deadline())
            .await?;
        self.context
            .spread_if_moved(&key.name, held, &version.version_id);
        let lookup = Lookup::fresh(version);
        Ok(RefreshSecretResponse {
            secret: Some(message::secret(&lookup, Contents::MetadataOnly)),
            changed,
        })
    }
}

impl AdminApi {
    /// The event consumer's state as CheckUpstream reports it.
    fn event_consumer(&self) -> EventConsumer {
        let events = &self.context.events;
        let (state, queue_url, detail) = match events.state() {
            ConsumerState::Off => ("off", String::new(), String::new()),
            ConsumerState::Starting => ("starting", String::new(), String::new()),
            ConsumerState::Consuming(url) => ("consuming", url, String::new()),
            ConsumerState::Failing(why) => ("failing", String::new(), why),
        };
        EventConsumer {
            state: state.to_owned(),
            queue_url,
            detail,
            last_lag: events
                .stats()
                .last_lag
                .and_then(|lag| prost_types::Duration::try_from(lag).ok()),
        }
    }
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn get_cache_stats(
        &self,
        request: Request<GetCacheStatsRequest>,
    ) -> Result<Response<GetCacheStatsResponse>, Status> {
        let audit = self.admit(Rpc::GetCacheStats, &request, &[])?;
        let stats = self.context.cache.stats();
        let watch = self.context.watch.stats();
        let events = self.context.events.stats();
        respond(
            audit,
            Ok(GetCacheStatsResponse {
                total_entries: stats.total_entries,
                valid_entries: stats.valid_entries,
                expired_entries: stats.expired_entries,
                hits: stats.hits,
                misses: stats.misses,
                coalesced: stats.coalesced,
                stale_served: stats.stale_served,
                upstream_calls: stats.upstream_calls,
                upstream_errors: stats.upstream_errors,
                evictions: stats.evictions,
                watchers: watch.watchers,
                hit_ratio: stats.hit_ratio(),
                watched_secrets: watch.watched_secrets,
                watch_rounds: watch.rounds,
                watch_upstream_calls: watch.upstream_calls,
                negative_entries: stats.negative_entries,
                negative_hits: stats.negative_hits,
                upstream_backoff: stats.backoff_active,
                upstream_backoffs: stats.backoffs,
                upstream_in_flight: stats.upstream.in_flight,
                upstream_waiting: stats.upstream.waiting,
                upstream_queue_refused: stats.upstream.refused,
                sweep_changes: watch.sweep_changes,
                events_received: events.received,
                events_applied: events.applied,
                events_ignored: events.ignored,
                events_failed: events.failed,
            }),
        )
    }

    async fn clear_cache(
        &self,
        request: Request<ClearCacheRequest>,
    ) -> Result<Response<ClearCacheResponse>, Status> {
        let mut audit = self.admit(Rpc::ClearCache, &request, &request.get_ref().names)?;
        let result = self.clear_cache(&mut audit, &request.get_ref().names);
        respond(audit, result)
    }

    async fn refresh_secret(
        &self,
        request: Request<RefreshSecretRequest>,
    ) -> Result<Response<RefreshSecretResponse>, Status> {
        let asked = std::slice::from_ref(&request.get_ref().name);
        let mut audit = self.admit(Rpc::RefreshSecret, &request, asked)?;
        let result = self
            .refresh_secret(&mut audit, &request.into_inner().name)
            .await;
        respond(audit, result)
    }

    async fn check_upstream(
        &self,
        request: Request<CheckUpstreamRequest>,
    ) -> Result<Response<CheckUpstreamResponse>, Status> {
        let audit = self.admit(Rpc::CheckUpstream, &request, &[])?;
        let started = Instant::now();
        let check = self.context.cache.upstream().check();
        // A caller's deadline, or the broker's call timeout when it comes
        // first, gets "not reachable in time", just before it, rather than
        // DEADLINE_EXCEEDED with no word of AWS.
        let outcome = match audit.deadline() {
            Some(deadline) => tokio::time::timeout_at(answer_by(deadline.at), check)
                .await
                .unwrap_or_else(|_| {
                    let within = if deadline.callers {
                        "the call's deadline"
                    } else {
                        "the broker's call timeout (--call-timeout)"
                    };
                    Err(StoreError::Unavailable {
                        detail: format!("AWS did not answer within {within}"),
                    })
                }),
            None => check.await,
        };
        let latency = prost_types::Duration::try_from(started.elapsed()).ok();
        let (reachable, detail) = match outcome {
            Ok(detail) => (true, detail),
            Err(error) => (false, error.to_string()),
        };
        respond(
            audit,
            Ok(CheckUpstreamResponse {
                reachable,
                detail,
                latency,
                events: Some(self.event_consumer()),
            }),
        )
    }
}
