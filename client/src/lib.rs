//! `secrets-broker-client`: the crate services depend on to read secrets
//! from a secrets-broker, the gRPC broker in front of AWS Secrets Manager.
//!
//! It offers what the Python package (`clients/python`) offers, through
//! the broker: secrets by short name (the broker adds the prefix),
//! by version or stage, bypassing the cache; the typed configs; the
//! connection test; and a stream of rotations. Cache statistics and
//! clearing differ: the Python package's act on its own local cache, while
//! here `get_cache_stats` and `clear_cache` are AdminService calls on the
//! broker's shared cache and need an admin identity (`CachedSecrets`, this
//! crate's local cache, has neither). It has no AWS SDK in its dependency
//! tree.
//!
//! ```no_run
//! use secrets_broker_client::{ClientConfig, Error, SecretsClient};
//!
//! # async fn run() -> Result<(), Error> {
//! // BROKER_ENDPOINT, BROKER_CA_FILE, BROKER_CERT_FILE, BROKER_KEY_FILE...
//! let client = SecretsClient::connect(ClientConfig::from_env()?).await?;
//! let db = client.get_database_config().await?;
//! match client.get_secret("mistral-api-key").await {
//!     Ok(secret) => println!("version {}", secret.version_id()),
//!     Err(Error::NotFound { .. }) => println!("no such secret"),
//!     Err(Error::AccessDenied { reason, .. }) => println!("denied: {reason}"),
//!     Err(other) => return Err(other),
//! }
//! # let _ = db; Ok(()) }
//! ```

#![deny(missing_docs)]

mod cached;
mod client;
mod config;
mod error;
mod tls_files;
mod typed;
mod value;
mod watch;

pub use cached::{CacheLimits, CachedSecrets, SecretChange};
pub use client::{GetSecret, SecretsClient};
pub use config::ClientConfig;
pub use error::Error;
pub use typed::TypedConfig;
pub use value::{CacheFacts, SecretValue};
pub use watch::{WatchEvent, WatchEventKind, WatchStream};

/// The generated protobuf types and gRPC stubs of `secretsbroker.v1`, for
/// what the typed API does not cover.
pub use secrets_broker_contract::proto;

/// The typed configs, as the broker decodes and validates them.
pub use proto::{
    AwsServicesConfig, DatabaseConfig, GetCacheStatsResponse as CacheStats, JwtConfig,
    SecurityConfig,
};
