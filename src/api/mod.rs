//! The gRPC handlers: SecretsService and AdminService.
//!
//! Handlers turn requests into cache lookups (resolving and validating names
//! first, so a bad name never costs an upstream call), decode typed configs,
//! and build responses. Errors stay typed (`ApiError`) until the handler's
//! last line, where `status` maps them to a gRPC status once.

mod admin;
mod message;
mod secrets;
pub mod status;
pub mod typed;

pub use admin::AdminApi;
pub use secrets::SecretsApi;

use crate::{cache::Cache, names::NameResolver, watch::WatchHub};

/// What every handler needs; cheap to clone.
#[derive(Clone)]
pub struct ApiContext {
    pub cache: Cache,
    pub names: NameResolver,
    pub watch: WatchHub,
}
