//! The gRPC handlers: SecretsService and AdminService.
//!
//! Handlers turn requests into cache lookups (resolving and validating names
//! first, so a bad name never costs an upstream call), check the caller's
//! right to each secret before the cache is touched (cache hit or not),
//! decode typed configs, and build responses. Every call leaves one audit
//! event. Errors stay typed (`ApiError`) until the handler's
//! last line, where `status` maps them to a gRPC status once.

mod admin;
mod audit;
mod call_metrics;
mod message;
mod routes;
pub mod rpc;
mod secrets;
pub mod status;
pub mod typed;

pub use admin::AdminApi;
pub use audit::{refused_before_the_handler, refused_unknown_method};
pub use call_metrics::CallMetrics;
pub use routes::SecretsRoutes;
pub use secrets::SecretsApi;

use std::sync::Arc;

use tonic::{Code, Response, Status};

use crate::{
    backend::{AWSCURRENT, StoreError, VersionSelector},
    cache::{Cache, CacheKey, Deadline, Lookup},
    identity,
    names::NameResolver,
    policy::Authorizer,
    transport::gate::CallDeadline,
    watch::WatchHub,
};
use audit::Audit;
use rpc::Rpc;
pub(crate) use status::ApiError;

/// What every handler needs; cheap to clone.
#[derive(Clone)]
pub struct ApiContext {
    pub cache: Cache,
    pub names: NameResolver,
    pub watch: WatchHub,
    /// The change-event consumer's state (CheckUpstream, stats).
    pub events: crate::events::Events,
    pub authorizer: Arc<Authorizer>,
    pub metrics: CallMetrics,
    /// `--call-timeout`: a call dropped past it is audited as
    /// DEADLINE_EXCEEDED (the gate answered the caller so).
    pub call_timeout: std::time::Duration,
}

/// How many of the names a call asks about its audit line lists, when
/// the call is refused as a whole or asks about many (AdminService).
const NOTED_NAMES: usize = 20;

impl ApiContext {
    /// Reads `key` through the cache. A bypass read that finds AWSCURRENT
    /// moved from what was cached tells the secret's other watchers and
    /// entries too (`WatchHub::spread_change`).
    async fn read(
        &self,
        key: CacheKey,
        bypass: bool,
        deadline: Option<Deadline>,
    ) -> Result<Lookup, StoreError> {
        if !bypass {
            return self.cache.get_until(key, false, deadline).await;
        }
        // AWSCURRENT only: a rotation moves it, and the other stages with it.
        let current = matches!(&key.selector, VersionSelector::Stage(stage) if stage == AWSCURRENT);
        let held = current.then(|| self.cache.held_version(&key)).flatten();
        let name = key.name.clone();
        let lookup = self.cache.get_until(key, true, deadline).await?;
        if !lookup.stale {
            self.spread_if_moved(&name, held, &lookup.version.version_id);
        }
        Ok(lookup)
    }

    /// Tells the secret's other watchers and entries of a new AWSCURRENT
    /// (`WatchHub::spread_change`) when a read found it at another version
    /// than the one `held` here. Nothing when nothing was held: a read of a
    /// key not cached says nothing about what the others hold.
    fn spread_if_moved(&self, name: &str, held: Option<String>, answered: &str) {
        if held.is_some_and(|held| held != answered) {
            self.watch.spread_change(name, AWSCURRENT, answered);
        }
    }

    /// Notes the names a call asks about in its audit record (resolved
    /// when they resolve), at most `NOTED_NAMES` of them: a ClearCache or
    /// a refused batch may name thousands.
    fn note_asked(&self, audit: &mut Audit, asked: &[String]) {
        for name in asked.iter().take(NOTED_NAMES) {
            match self.names.resolve(name) {
                Ok(full_name) => audit.secret(&full_name),
                Err(_) => audit.refused_name(name),
            }
        }
        if asked.len() > NOTED_NAMES {
            audit.secret(&format!("(and {} more)", asked.len() - NOTED_NAMES));
        }
    }

    /// Starts a call: its audit record (and metrics). The call's slot on
    /// its connection was taken at the gate (`transport::gate`), before any
    /// handler ran.
    fn admit<T>(&self, rpc: Rpc, request: &tonic::Request<T>) -> Audit {
        Audit::new(
            rpc,
            identity::of_request(request),
            self.metrics.clone(),
            self.call_timeout,
        )
        .with_deadline(CallDeadline::of_request(request))
    }
}

/// The edge: a handler's typed result becomes a gRPC answer here, and the
/// call's audit event is emitted with its outcome.
fn respond<T>(audit: Audit, result: Result<T, ApiError>) -> Result<Response<T>, Status> {
    match result {
        Ok(answer) => {
            audit.finish(Code::Ok);
            Ok(Response::new(answer))
        }
        Err(error) => Err(refuse(audit, error)),
    }
}

/// The edge for a refused call: its status, and its audit event.
fn refuse(audit: Audit, error: ApiError) -> Status {
    let reason = error.reason();
    let status = Status::from(error);
    audit.refused(status.code(), reason);
    status
}
