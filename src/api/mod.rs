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
mod message;
mod secrets;
pub mod status;
pub mod typed;

pub use admin::AdminApi;
pub use secrets::SecretsApi;

use std::sync::Arc;

use tonic::{Code, Response, Status};

use crate::{
    cache::Cache,
    identity,
    metrics::{Metrics, Rpc},
    names::NameResolver,
    policy::Authorizer,
    watch::WatchHub,
};
use audit::Audit;
use status::ApiError;

/// What every handler needs; cheap to clone.
#[derive(Clone)]
pub struct ApiContext {
    pub cache: Cache,
    pub names: NameResolver,
    pub watch: WatchHub,
    pub authorizer: Arc<Authorizer>,
    pub metrics: Metrics,
}

impl ApiContext {
    /// Starts a call: its audit record (and metrics), and a slot among its
    /// connection's calls. Without a free slot the call is refused with
    /// RESOURCE_EXHAUSTED (and audited as such).
    fn admit<T>(&self, rpc: Rpc, request: &tonic::Request<T>) -> Result<Audit, Status> {
        let mut audit = Audit::new(rpc, identity::of_request(request), self.metrics.clone());
        if let Some(connection) = identity::connection_of(request) {
            match Arc::clone(&connection.call_slots).try_acquire_owned() {
                Ok(slot) => audit.hold_call_slot(slot),
                Err(_) => return Err(refuse(audit, ApiError::TooManyCalls)),
            }
        }
        Ok(audit)
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
    let status = Status::from(error);
    audit.finish(status.code());
    status
}
