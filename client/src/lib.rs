//! `secrets-broker-client`: the crate services depend on to read secrets
//! from a secrets-broker.
//!
//! It is deliberately empty for now: the typed client (connection setup,
//! `get_secret`, the typed configs, `watch_secret`, error mapping) is built in
//! its own piece of work. It already lives in the workspace so that its
//! dependency tree, which must never contain an AWS SDK crate, is checked from
//! the start.
