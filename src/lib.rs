//! secrets-broker: a gRPC secrets broker in front of AWS Secrets Manager.
//!
//! The crate follows the request's path: `transport` (listeners, TLS and
//! identity, the gate every stream passes), `server` (start-up, health,
//! reflection) → `api` (handlers, typed configs, the one mapping of
//! errors to gRPC statuses) → `cache` (the shared cache) → `backend` (the
//! `SecretStore` trait: AWS, or the embedded file backend); `watch` (the
//! change detector and the WatchSecret broadcast) sits beside the cache and
//! is told of every version it stores. `config` turns
//! flags, environment and a TOML file into validated `Settings`. Nothing
//! below a layer knows about the layer above it.

pub mod api;
pub mod backend;
pub mod cache;
pub mod check;
pub mod config;
pub mod file_watch;
pub mod identity;
pub mod metrics;
pub mod names;
pub mod operator;
pub mod policy;
pub mod secret;
pub mod server;
pub mod telemetry;
pub mod transport;
pub mod watch;

/// The code generated from `proto/secretsbroker/v1`.
pub mod proto {
    pub use secrets_broker_client::proto::*;
    tonic::include_proto!("secretsbroker.v1");

    /// The encoded descriptors of the contract, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("secretsbroker_descriptor");
}
