//! The transport: how callers reach the broker, before any handler runs.
//!
//! - `bind`: binding the sockets the settings name;
//! - `listener`: accepting TCP and unix-socket connections within bounds,
//!   the TLS handshake, the first-request timeout, closing idle connections
//!   at shutdown;
//! - `tls`: mutual TLS with files that reload, and the caller's identity
//!   read from its certificate;
//! - `gate`: what every HTTP/2 stream passes (gRPC content types only, the
//!   per-connection call slots, the call timeout);
//! - `connection_info`: what a connection tells its calls (identity, slots);
//! - `call_slots`: the bound on calls in flight over every connection;
//! - `untaken_answers`: closing a connection whose peer does not take its
//!   answers;
//! - `descriptors`: the open-files limit, raised or the connections fitted
//!   to it;
//! - `server`: the tonic server with every service behind the gate;
//! - `probe_listener`: the bounded listener of the probes and metrics port.

pub mod bind;
pub mod budget;
pub mod call_slots;
mod client_cas;
pub mod connection_info;
pub mod descriptors;
pub mod gate;
pub mod listener;
mod opening_slots;
mod peer_trust;
pub mod probe_listener;
pub mod server;
pub mod tls;
mod token_watch;
pub mod untaken_answers;
