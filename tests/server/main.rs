//! The broker in-process: `App` built on port 0 over the file backend (the
//! dev secrets or a secrets file), called through the client crate and
//! tonic's generated clients, in plaintext or mutual TLS.
//!
//! Behaviour of the broker alone lives here, one module a concern; the
//! tests against moto and the real binary (`tests/client.rs`,
//! `tests/integration/`) keep what needs AWS's peer, another language or
//! TLS stack, a signal, or a tool.

#[path = "../support/pki.rs"]
mod pki;

mod bad_input;
mod cache;
mod errors;
mod harness;
mod limits;
mod policy;
mod stop;
mod trust;
mod watch;
