//! The broker's call slots: one for each HTTP/2 stream in flight, over every
//! connection. A stream costs memory from its headers on, whether or not
//! its request ever arrives, and the connection limit times the per-connection
//! call limit (ten million at the defaults) bounds nothing a machine has; this
//! bounds the whole.
//!
//! A stream takes a slot at the gate and keeps it until its call is done:
//! its request body and its answer both gone. Until its request message has
//! arrived whole, a call is *opening*, and its slot can be taken from it:
//! when every slot is held, a new stream takes the slot of the call that has
//! been opening longest, and that call is answered RESOURCE_EXHAUSTED
//! (`TOO_MANY_CALLS`). Without this, anyone able to open streams could hold
//! every slot with streams that never send their request (headers alone),
//! and nobody else would be served until the call timeout. A call whose
//! request has arrived (a call under way, a watch) keeps its slot: once every
//! slot is held by one, new streams are refused.
//!
//! Long-lived streams (WatchSecret, health's Watch) hold their slots for as
//! long as they are open, and a caller may open as many as it has grants
//! for: they also need one of a share of the slots (`stream_limit`, half of
//! them), so that watches alone can never leave the broker without slots for
//! reads. A stream past the share is refused at once.
//!
//! Taking a slot is one semaphore permit. A call enters the map of calls
//! waiting for their request (those a newcomer may displace) only when a
//! read of its request finds nothing there yet (`waiting`): a request that
//! arrives with its headers, as clients send it, never enters it, so the
//! common call takes no lock here.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering},
    },
    task::Context,
};

use futures::task::AtomicWaker;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::{Metrics, counter, gauge};

/// The slots of every call in flight; cheap to clone.
#[derive(Clone)]
pub struct CallSlots {
    shared: Arc<Shared>,
}

struct Shared {
    permits: Arc<Semaphore>,
    limit: usize,
    /// The long-lived streams' share of the slots.
    streams: Arc<Semaphore>,
    stream_limit: usize,
    streams_refused: AtomicU64,
    /// The calls still opening, by arrival: the first is the oldest.
    opening: Mutex<BTreeMap<u64, Arc<CallSlot>>>,
    next: AtomicU64,
    displaced: AtomicU64,
    refused: AtomicU64,
}

/// One call's slot, shared by its request body and its answer; the slot is
/// given back when both are gone.
pub struct CallSlot {
    id: u64,
    slots: Arc<Shared>,
    permit: Mutex<Option<OwnedSemaphorePermit>>,
    state: AtomicU8,
    /// In the map of calls waiting for their request (or about to be).
    listed: AtomicBool,
    /// The request body's task, woken when the call is ended (displaced,
    /// or the broker stopping).
    end_waker: AtomicWaker,
}

const OPENING: u8 = 0;
/// Its request message came.
const OPENED: u8 = 1;
const DISPLACED: u8 = 2;
/// Its request body ended, or was dropped, without a message.
const GAVE_UP: u8 = 3;
/// Its request body failed before a message: the stream was reset or the
/// connection lost.
const BROKEN: u8 = 4;
/// Ended because the broker is stopping.
const SHUT: u8 = 5;

/// Why a call still opening was ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// A newer call took its slot.
    Displaced,
    /// The broker is stopping.
    ShuttingDown,
}

impl CallSlots {
    /// `limit` slots (at least one).
    pub fn new(limit: usize) -> Self {
        let limit = limit.clamp(1, Semaphore::MAX_PERMITS);
        let stream_limit = (limit / 2).max(1);
        Self {
            shared: Arc::new(Shared {
                permits: Arc::new(Semaphore::new(limit)),
                limit,
                streams: Arc::new(Semaphore::new(stream_limit)),
                stream_limit,
                streams_refused: AtomicU64::new(0),
                opening: Mutex::default(),
                next: AtomicU64::new(0),
                displaced: AtomicU64::new(0),
                refused: AtomicU64::new(0),
            }),
        }
    }

    /// A slot for a new call: a free one, or the slot of the call opening
    /// longest. `None` when every slot is held by a call under way.
    pub fn take(&self) -> Option<Arc<CallSlot>> {
        let permit = match Arc::clone(&self.shared.permits).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => match self.displace_oldest() {
                Some(permit) => permit,
                None => {
                    self.shared.refused.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
            },
        };
        let id = self.shared.next.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(CallSlot {
            id,
            slots: Arc::clone(&self.shared),
            permit: Mutex::new(Some(permit)),
            state: AtomicU8::new(OPENING),
            listed: AtomicBool::new(false),
            end_waker: AtomicWaker::new(),
        });
        Some(slot)
    }

    /// The most calls in flight at once.
    pub fn limit(&self) -> usize {
        self.shared.limit
    }

    /// A place among the long-lived streams, held with the stream's slot
    /// (`take`); `None` when their share is full.
    pub fn take_stream(&self) -> Option<OwnedSemaphorePermit> {
        let taken = Arc::clone(&self.shared.streams).try_acquire_owned().ok();
        if taken.is_none() {
            self.shared.streams_refused.fetch_add(1, Ordering::Relaxed);
        }
        taken
    }

    /// The most long-lived streams open at once.
    pub fn stream_limit(&self) -> usize {
        self.shared.stream_limit
    }

    /// Takes the slot of the call opening longest, and wakes that call.
    fn displace_oldest(&self) -> Option<OwnedSemaphorePermit> {
        loop {
            let (_, oldest) = self.shared.lock().pop_first()?;
            // It may have opened since it was looked at: then it keeps its
            // slot, and the next oldest is tried.
            if oldest
                .state
                .compare_exchange(OPENING, DISPLACED, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                continue;
            }
            let permit = lock(&oldest.permit).take();
            oldest.end_waker.wake();
            self.shared.displaced.fetch_add(1, Ordering::Relaxed);
            if permit.is_some() {
                return permit;
            }
        }
    }

    /// Ends every call still waiting for its request: the broker is
    /// stopping, and such a call would otherwise hold the shutdown for the
    /// whole grace (a call whose request came is left to finish).
    pub fn end_opening(&self) {
        let opening = std::mem::take(&mut *self.shared.lock());
        for (_, call) in opening {
            if call
                .state
                .compare_exchange(OPENING, SHUT, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                call.end_waker.wake();
            }
        }
    }

    /// Registers the broker-wide call counts.
    pub fn register_metrics(&self, metrics: &Metrics) {
        let shared = Arc::clone(&self.shared);
        metrics.register_state(move |e| {
            let in_flight = shared.limit - shared.permits.available_permits();
            gauge(
                e,
                "calls_in_flight",
                "Calls (HTTP/2 streams of any service) in flight over every connection",
                i64::try_from(in_flight).unwrap_or(i64::MAX),
            )?;
            counter(
                e,
                "calls_displaced",
                "Calls ended before their request arrived: every call slot was held, and a newer call took theirs",
                shared.displaced.load(Ordering::Relaxed),
            )?;
            counter(
                e,
                "calls_refused_broker_full",
                "Calls refused at once: every call slot of the broker was held by a call under way",
                shared.refused.load(Ordering::Relaxed),
            )?;
            let streams = shared.stream_limit - shared.streams.available_permits();
            gauge(
                e,
                "streams_in_flight",
                "Long-lived streams (WatchSecret, health's Watch) open over every connection",
                i64::try_from(streams).unwrap_or(i64::MAX),
            )?;
            counter(
                e,
                "streams_refused_share_full",
                "Long-lived streams refused at once: their share of the call slots (half) was held",
                shared.streams_refused.load(Ordering::Relaxed),
            )
        });
    }
}

impl std::fmt::Debug for CallSlots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallSlots")
            .field("limit", &self.shared.limit)
            .field("free", &self.shared.permits.available_permits())
            .field("stream_limit", &self.shared.stream_limit)
            .field("streams_free", &self.shared.streams.available_permits())
            .finish()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, Arc<CallSlot>>> {
        lock(&self.opening)
    }
}

/// Every operation leaves the map and the permit whole: a panic elsewhere
/// while one was held does not make them wrong.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl CallSlot {
    /// The call's request message has arrived: its slot can no longer be
    /// taken. False if it was displaced first.
    pub fn opened(&self) -> bool {
        self.leave_opening(OPENED)
    }

    /// The call's request body ended (or was dropped) without a message:
    /// nothing left to wait for, and nothing to displace.
    pub fn gave_up(&self) {
        self.leave_opening(GAVE_UP);
    }

    /// The call's request body failed before a message came.
    pub fn broke(&self) {
        self.leave_opening(BROKEN);
    }

    /// Whether the request failed before a message came: the caller reset
    /// the stream or its connection went.
    pub fn caller_went_away(&self) -> bool {
        self.state.load(Ordering::Acquire) == BROKEN
    }

    fn leave_opening(&self, to: u8) -> bool {
        match self
            .state
            .compare_exchange(OPENING, to, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) => {
                if self.listed.load(Ordering::SeqCst) {
                    self.slots.lock().remove(&self.id);
                }
                true
            }
            Err(state) => state == OPENED,
        }
    }

    /// A read of the request found nothing yet: from now on a newcomer may
    /// take this call's slot. Once per call.
    pub fn waiting(self: &Arc<Self>) {
        if self.state.load(Ordering::SeqCst) != OPENING || self.listed.swap(true, Ordering::SeqCst)
        {
            return;
        }
        let mut opening = self.slots.lock();
        opening.insert(self.id, Arc::clone(self));
        // It may have opened meanwhile, and not seen itself listed yet.
        if self.state.load(Ordering::SeqCst) != OPENING {
            opening.remove(&self.id);
        }
    }

    /// Whether the call is still waiting for its request.
    #[cfg(test)]
    pub fn is_opening(&self) -> bool {
        self.state.load(Ordering::Acquire) == OPENING
    }

    /// Whether the call's request never came, and no other call took its
    /// slot: a call no handler saw, whose end the gate must audit.
    pub fn never_got_its_request(&self) -> bool {
        matches!(
            self.state.load(Ordering::Acquire),
            OPENING | GAVE_UP | BROKEN
        )
    }

    /// Whether the call was ended while it waited for its request (another
    /// call took its slot, or the broker is stopping); until then, the task
    /// of `cx` is woken when that happens.
    pub fn ended(&self, cx: &Context<'_>) -> Option<Ended> {
        if self.state.load(Ordering::Acquire) == OPENING {
            self.end_waker.register(cx.waker());
        }
        match self.state.load(Ordering::Acquire) {
            DISPLACED => Some(Ended::Displaced),
            SHUT => Some(Ended::ShuttingDown),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::task::Waker;

    use super::*;

    fn cx() -> Context<'static> {
        Context::from_waker(Waker::noop())
    }

    #[test]
    fn a_full_broker_takes_the_slot_of_the_call_opening_longest() {
        let slots = CallSlots::new(2);
        let first = slots.take().unwrap();
        first.waiting();
        let second = slots.take().unwrap();
        second.waiting();
        let third = slots.take().expect("the first call's slot");
        assert_eq!(first.ended(&cx()), Some(Ended::Displaced));
        assert!(!first.opened(), "a displaced call cannot open");
        assert_eq!(second.ended(&cx()), None);
        assert!(second.opened());
        assert!(third.opened());
        // Both slots are held by calls under way: nothing to take.
        assert!(slots.take().is_none());
        assert_eq!(slots.shared.refused.load(Ordering::Relaxed), 1);
        assert_eq!(slots.shared.displaced.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn long_lived_streams_get_half_the_slots_and_give_their_place_back() {
        let slots = CallSlots::new(9);
        assert_eq!(slots.stream_limit(), 4);
        let streams: Vec<_> = (0..4).map(|_| slots.take_stream().unwrap()).collect();
        assert!(slots.take_stream().is_none(), "the share is full");
        assert_eq!(slots.shared.streams_refused.load(Ordering::Relaxed), 1);
        drop(streams);
        assert!(slots.take_stream().is_some(), "places come back");
        assert_eq!(CallSlots::new(1).stream_limit(), 1, "never none");
    }

    #[test]
    fn a_slot_comes_back_when_its_call_is_done() {
        let slots = CallSlots::new(1);
        let call = slots.take().unwrap();
        assert!(call.opened());
        let answer = Arc::clone(&call);
        assert!(slots.take().is_none());
        drop(call);
        assert!(slots.take().is_none(), "the answer still holds it");
        drop(answer);
        let next = slots.take().expect("the slot is free again");
        assert!(next.is_opening());
    }

    #[test]
    fn a_displaced_call_gives_its_slot_to_the_newcomer_at_once() {
        let slots = CallSlots::new(1);
        let silent = slots.take().unwrap();
        silent.waiting();
        let newcomer = slots.take().expect("the silent call's slot");
        // The silent call's structures still exist, yet the semaphore is
        // not overdrawn: the permit moved.
        assert_eq!(slots.shared.permits.available_permits(), 0);
        assert_eq!(silent.ended(&cx()), Some(Ended::Displaced));
        drop(silent);
        assert_eq!(slots.shared.permits.available_permits(), 0);
        // Its request came and it is done.
        assert!(newcomer.opened());
        drop(newcomer);
        assert_eq!(slots.shared.permits.available_permits(), 1);
    }
}
