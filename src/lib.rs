//! secrets-broker: a gRPC secrets broker in front of AWS Secrets Manager.
//!
//! `command` is what each subcommand does; start-up is `app` (build the
//! broker from `Settings`, run it until shutdown, on `signals`). Then the
//! crate follows the request's path: `transport`
//! (listeners, TLS and identity, the gate every stream passes, the tonic
//! server) → `policy` (who may read what) → `api` (handlers, typed configs,
//! audit, the one mapping of errors to gRPC statuses) → `cache` (the shared
//! cache: coalescing, staleness, backoff, negative entries, eviction) →
//! `backend` (the `SecretStore` trait: AWS, the file backend, the upstream
//! bound and metrics). `watch` (freshness: the sweep of every cached secret
//! and the WatchSecret broadcast) sits beside the cache and is told of every
//! version it stores; `events` (Secrets Manager's change events from SQS)
//! drives it to re-read a changed secret at once.
//! Around them: `config` (flags, environment and a TOML file into validated
//! `Settings`), `health` (health statuses, readiness), `probes` (the
//! `/healthz`, `/readyz` and `/metrics` port), `metrics` (the registry
//! each component registers into), `reload` (values that follow their
//! files), `telemetry` (logs, one line per event). A layer knows only the
//! layers after it on that path, with one exception: what `transport`
//! attaches to each request (the call's deadline, its connection's identity
//! and slots) is read by `identity` and `api`, and a full share of call
//! slots is mapped to a status with the other errors in `api`.

#![warn(missing_docs)]

#[cfg(test)]
mod alloc_count;
pub(crate) mod api;
pub mod app;
pub mod backend;
pub mod cache;
pub mod check;
pub mod command;
pub mod config;
pub(crate) mod events;
pub(crate) mod file_watch;
pub(crate) mod health;
pub(crate) mod identity;
pub(crate) mod metrics;
pub(crate) mod names;
pub mod operator;
pub(crate) mod policy;
pub(crate) mod probes;
pub(crate) mod reload;
pub mod secret;
pub(crate) mod signals;
pub mod telemetry;
pub(crate) mod transport;
pub(crate) mod watch;

/// The code generated from `proto/secretsbroker/v1` (the contract crate).
pub use secrets_broker_contract::proto;
