//! The transport: how callers reach the broker, before any handler runs.
//!
//! - `bind`: binding the sockets the settings name;
//! - `listener`: accepting TCP and unix-socket connections within bounds,
//!   the TLS handshake, the first-request timeout, closing idle connections
//!   at shutdown;
//! - `tls`: mutual TLS with files that reload, and the caller's identity
//!   read from its certificate;
//! - `client_cas`: the client CA bundle as trusted: only the CAs within
//!   their dates;
//! - `opening_slots`: connection slots held by connections still opening,
//!   the oldest giving its slot up when every slot is taken;
//! - `peer_trust`: closing a connection whose client certificate expired or
//!   no longer verifies after a reload;
//! - `token_watch`: the cheap per-read "has this connection been told to
//!   close?";
//! - `gate`: what every HTTP/2 stream passes (gRPC content types only, the
//!   per-connection call slots, the call timeout);
//! - `budget`: one memory budget for requests still arriving, shared by
//!   every call;
//! - `connection_info`: what a connection tells its calls (identity, slots);
//! - `call_slots`: the bound on calls in flight over every connection, and
//!   the shares of it that long-lived streams (watches, health watches,
//!   reflection) may take;
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
