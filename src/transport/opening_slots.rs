//! The connection slots held by connections still opening (in their TLS
//! handshake or before their HTTP/2 preface), so that the oldest of them
//! can give its slot up when every slot is taken.
//!
//! A slot is taken at accept, before anything is known of the peer: without
//! this, anyone who can reach the port could hold every slot with sockets
//! that never finish a handshake, and callers with a certificate could not
//! connect until `first_request_timeout` passed. With it, a new connection
//! that finds no free slot takes the slot of the connection that has been
//! opening longest (and that one is closed). Established connections never
//! give theirs up: once every slot is held by an established connection,
//! new ones are refused as before.
//!
//! The slot itself (the semaphore permit) is kept here while its connection
//! opens, so that handing it over is synchronous: no wait on the displaced
//! connection's task to notice and drop it.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, PoisonError},
};

use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// The slots of the connections still opening, oldest first.
#[derive(Clone, Default)]
pub(crate) struct OpeningSlots {
    shared: Arc<Mutex<Shared>>,
}

#[derive(Default)]
struct Shared {
    next: u64,
    /// By accept order: the first entry is the oldest.
    opening: BTreeMap<u64, Held>,
}

struct Held {
    slot: OwnedSemaphorePermit,
    displaced: CancellationToken,
}

/// A connection's claim on the slot it was given at accept, until it is
/// established (`establish`) or dropped.
pub(crate) struct OpeningClaim {
    slots: OpeningSlots,
    id: u64,
    displaced: CancellationToken,
}

impl OpeningSlots {
    /// Keeps `slot` for a connection that has just been accepted.
    pub(crate) fn hold(&self, slot: OwnedSemaphorePermit) -> OpeningClaim {
        let displaced = CancellationToken::new();
        let mut shared = self.lock();
        let id = shared.next;
        shared.next += 1;
        shared.opening.insert(
            id,
            Held {
                slot,
                displaced: displaced.clone(),
            },
        );
        OpeningClaim {
            slots: self.clone(),
            id,
            displaced,
        }
    }

    /// Takes the slot of the connection that has been opening longest, and
    /// tells that connection it is displaced. `None` when every slot is held
    /// by an established connection.
    pub(crate) fn displace_oldest(&self) -> Option<OwnedSemaphorePermit> {
        let (_, held) = self.lock().opening.pop_first()?;
        held.displaced.cancel();
        Some(held.slot)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        // The map is left whole by every operation on it: a panic elsewhere
        // while it was held does not make it wrong.
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl OpeningClaim {
    /// Resolves once another connection has taken this one's slot.
    pub(crate) fn on_displaced(&self) -> WaitForCancellationFutureOwned {
        self.displaced.clone().cancelled_owned()
    }

    /// The slot, for the connection now established; `None` if it was
    /// displaced meanwhile (the connection is then dropped).
    pub(crate) fn establish(self) -> Option<OwnedSemaphorePermit> {
        self.slots
            .lock()
            .opening
            .remove(&self.id)
            .map(|held| held.slot)
    }
}

impl Drop for OpeningClaim {
    /// A connection that failed, timed out or was dropped at shutdown gives
    /// its slot back (after `establish`, there is nothing left to remove).
    fn drop(&mut self) {
        self.slots.lock().opening.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::Semaphore;

    use super::*;

    fn slot(semaphore: &Arc<Semaphore>) -> OwnedSemaphorePermit {
        Arc::clone(semaphore).try_acquire_owned().unwrap()
    }

    #[tokio::test]
    async fn the_oldest_opening_connection_gives_its_slot_up() {
        let semaphore = Arc::new(Semaphore::new(2));
        let slots = OpeningSlots::default();
        let first = slots.hold(slot(&semaphore));
        let second = slots.hold(slot(&semaphore));
        assert!(Arc::clone(&semaphore).try_acquire_owned().is_err());

        let taken = slots.displace_oldest().expect("an opening connection");
        // The first is told at once, and has no slot left to establish with.
        first.on_displaced().await;
        assert!(first.establish().is_none());
        let third = slots.hold(taken);

        // The second is now the oldest, and can still establish.
        let second_slot = second.establish().expect("its slot");
        let fourth = slots.displace_oldest().expect("the third is opening");
        third.on_displaced().await;
        drop((second_slot, fourth));
        assert_eq!(semaphore.available_permits(), 2);
    }

    #[test]
    fn established_connections_keep_their_slots() {
        let semaphore = Arc::new(Semaphore::new(1));
        let slots = OpeningSlots::default();
        let established = slots.hold(slot(&semaphore)).establish().unwrap();
        assert!(slots.displace_oldest().is_none());
        drop(established);
        assert_eq!(semaphore.available_permits(), 1);
    }

    #[test]
    fn a_connection_that_fails_to_open_gives_its_slot_back() {
        let semaphore = Arc::new(Semaphore::new(1));
        let slots = OpeningSlots::default();
        drop(slots.hold(slot(&semaphore)));
        assert_eq!(semaphore.available_permits(), 1);
        assert!(slots.displace_oldest().is_none());
    }
}
