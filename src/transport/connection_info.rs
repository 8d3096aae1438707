//! What a connection tells each of its calls: who the caller is, and the
//! bounds its calls share (call slots, health watches). Made once per
//! connection by the listener, after the TLS handshake; tonic copies it
//! into every request's extensions, where the gate and the handlers read it.

use std::sync::Arc;

use super::untaken_answers::UntakenAnswers;
use crate::identity::Identity;

/// What a connection tells each of its calls.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub identity: Identity,
    /// The connection's call slots: a call (a stream, for as long as it is
    /// open) holds one from its headers on; none left means
    /// RESOURCE_EXHAUSTED.
    pub call_slots: Arc<tokio::sync::Semaphore>,
    /// Its `grpc.health.v1.Health/Watch` streams (`HEALTH_WATCHES` at
    /// most): they stay open and need no grant, so without a bound of their
    /// own any caller could hold every call slot of the broker with them.
    pub health_watches: Arc<tokio::sync::Semaphore>,
    /// Its short calls' answers not taken yet: one left past a whole call
    /// timeout closes the connection (`untaken_answers`).
    pub untaken_answers: Arc<UntakenAnswers>,
}

/// Health watch streams one connection may hold: a client watches the
/// overall status and the two services at most.
pub const HEALTH_WATCHES: usize = 4;

impl ConnectionInfo {
    /// A connection's info, with its slots.
    pub fn new(identity: Identity, max_calls: usize) -> Self {
        Self {
            identity,
            call_slots: Arc::new(tokio::sync::Semaphore::new(max_calls)),
            health_watches: Arc::new(tokio::sync::Semaphore::new(HEALTH_WATCHES)),
            untaken_answers: Arc::default(),
        }
    }
}
