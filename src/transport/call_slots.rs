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
//! Long-lived streams hold their slots for as long as they are open, and a
//! caller may open as many as it likes: once its request has come, such a
//! stream also needs a place in a share of the slots, half of them for
//! WatchSecret, an eighth for health's Watch and a sixteenth for server
//! reflection (which need no grant, and reflection's stream lasts a call
//! timeout), so that such streams can never leave the broker without slots
//! for reads. A stream past its share is refused at once. The place is taken when the request
//! has come, not at the headers: a stream that never sends its request
//! cannot hold a place, and its slot goes to newer calls as above.
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
    /// The long-lived streams' shares of the slots, in `Share::ALL`'s order.
    shares: [Places; 3],
    /// The calls still opening, by arrival: the first is the oldest.
    opening: Mutex<BTreeMap<u64, Arc<CallSlot>>>,
    next: AtomicU64,
    displaced: AtomicU64,
    refused: AtomicU64,
}

/// A share of the slots for one kind of long-lived stream.
struct Places {
    permits: Arc<Semaphore>,
    limit: usize,
    refused: AtomicU64,
}

impl Places {
    fn new(limit: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(limit)),
            limit,
            refused: AtomicU64::new(0),
        }
    }

    fn in_use(&self) -> i64 {
        i64::try_from(self.limit - self.permits.available_permits()).unwrap_or(i64::MAX)
    }
}

/// The long-lived streams that need a place in a share of the slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Share {
    /// WatchSecret: half of the slots.
    Watches,
    /// Health's Watch (no grant needed): an eighth.
    HealthWatches,
    /// Server reflection (no grant needed; its stream lasts until the call
    /// timeout): a sixteenth.
    Reflection,
}

impl Share {
    const ALL: [Self; 3] = [Self::Watches, Self::HealthWatches, Self::Reflection];

    /// The part of the slots it may hold: `limit / divisor`, and in words.
    fn part(self) -> (usize, &'static str) {
        match self {
            Self::Watches => (2, "half"),
            Self::HealthWatches => (8, "an eighth"),
            Self::Reflection => (16, "a sixteenth"),
        }
    }

    /// The part of the call slots it may hold, in words.
    pub fn part_in_words(self) -> &'static str {
        self.part().1
    }

    /// Its streams, as messages and metrics name them.
    pub fn streams(self) -> &'static str {
        match self {
            Self::Watches => "watch streams",
            Self::HealthWatches => "health watch streams",
            Self::Reflection => "reflection streams",
        }
    }

    fn metric(self) -> &'static str {
        match self {
            Self::Watches => "watches",
            Self::HealthWatches => "health_watches",
            Self::Reflection => "reflection_streams",
        }
    }
}

/// A long-lived stream refused: its share of the slots is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShareFull {
    pub share: Share,
    pub limit: usize,
}

/// One call's slot, shared by its request body and its answer; the slot is
/// given back when both are gone.
pub struct CallSlot {
    id: u64,
    slots: Arc<Shared>,
    /// The share this call needs a place in once its request has come.
    share: Option<Share>,
    place: std::sync::OnceLock<OwnedSemaphorePermit>,
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
        Self {
            shared: Arc::new(Shared {
                permits: Arc::new(Semaphore::new(limit)),
                limit,
                shares: Share::ALL.map(|share| Places::new((limit / share.part().0).max(1))),
                opening: Mutex::default(),
                next: AtomicU64::new(0),
                displaced: AtomicU64::new(0),
                refused: AtomicU64::new(0),
            }),
        }
    }

    /// A slot for a new call: a free one, or the slot of the call opening
    /// longest. `None` when every slot is held by a call under way. A
    /// long-lived stream names its `share`.
    pub fn take(&self, share: Option<Share>) -> Option<Arc<CallSlot>> {
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
            share,
            place: std::sync::OnceLock::new(),
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
            for share in Share::ALL {
                let (places, streams) = (shared.places(share), share.streams());
                let part = share.part_in_words();
                gauge(
                    e,
                    &format!("{}_in_flight", share.metric()),
                    &format!("The {streams} open over every connection (at most {part} of the call slots)"),
                    places.in_use(),
                )?;
                counter(
                    e,
                    &format!("{}_refused_share_full", share.metric()),
                    &format!("The {streams} refused at once: their part of the call slots ({part}) was held"),
                    places.refused.load(Ordering::Relaxed),
                )?;
            }
            Ok(())
        });
    }
}

impl std::fmt::Debug for CallSlots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallSlots")
            .field("limit", &self.shared.limit)
            .field("free", &self.shared.permits.available_permits())
            .field("watches", &self.shared.places(Share::Watches).limit)
            .field(
                "health_watches",
                &self.shared.places(Share::HealthWatches).limit,
            )
            .field(
                "reflection_streams",
                &self.shared.places(Share::Reflection).limit,
            )
            .finish()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, Arc<CallSlot>>> {
        lock(&self.opening)
    }

    fn places(&self, share: Share) -> &Places {
        &self.shares[share as usize]
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

    /// For a long-lived stream whose request has come: its place in its
    /// share, held with the slot. Other calls need none.
    pub fn take_place(&self) -> Result<(), ShareFull> {
        let Some(share) = self.share else {
            return Ok(());
        };
        if self.place.get().is_some() {
            return Ok(());
        }
        let places = self.slots.places(share);
        match Arc::clone(&places.permits).try_acquire_owned() {
            Ok(permit) => {
                let _ = self.place.set(permit);
                Ok(())
            }
            Err(_) => {
                places.refused.fetch_add(1, Ordering::Relaxed);
                Err(ShareFull {
                    share,
                    limit: places.limit,
                })
            }
        }
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
        let first = slots.take(None).unwrap();
        first.waiting();
        let second = slots.take(None).unwrap();
        second.waiting();
        let third = slots.take(None).expect("the first call's slot");
        assert_eq!(first.ended(&cx()), Some(Ended::Displaced));
        assert!(!first.opened(), "a displaced call cannot open");
        assert_eq!(second.ended(&cx()), None);
        assert!(second.opened());
        assert!(third.opened());
        // Both slots are held by calls under way: nothing to take.
        assert!(slots.take(None).is_none());
        assert_eq!(slots.shared.refused.load(Ordering::Relaxed), 1);
        assert_eq!(slots.shared.displaced.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn long_lived_streams_take_a_place_in_their_share_once_their_request_came() {
        let slots = CallSlots::new(16);
        assert_eq!(slots.shared.places(Share::Watches).limit, 8);
        assert_eq!(slots.shared.places(Share::HealthWatches).limit, 2);
        // Streams still waiting for their request hold no place.
        let waiting: Vec<_> = (0..4)
            .map(|_| slots.take(Some(Share::HealthWatches)).unwrap())
            .collect();
        let health: Vec<_> = (0..2)
            .map(|_| {
                let call = slots.take(Some(Share::HealthWatches)).unwrap();
                assert!(call.opened());
                call.take_place().unwrap();
                call
            })
            .collect();
        let third = slots.take(Some(Share::HealthWatches)).unwrap();
        assert!(third.opened());
        let full = third.take_place().unwrap_err();
        assert_eq!(full.share, Share::HealthWatches);
        assert_eq!(full.limit, 2);
        // The other share and plain calls are not touched.
        let watch = slots.take(Some(Share::Watches)).unwrap();
        assert!(watch.opened());
        watch.take_place().unwrap();
        let read = slots.take(None).unwrap();
        assert!(read.opened());
        read.take_place().unwrap();
        // A place comes back with its call.
        drop(health);
        let again = slots.take(Some(Share::HealthWatches)).unwrap();
        assert!(again.opened());
        again.take_place().unwrap();
        assert_eq!(
            slots
                .shared
                .places(Share::HealthWatches)
                .refused
                .load(Ordering::Relaxed),
            1
        );
        drop(waiting);
        assert_eq!(
            CallSlots::new(1).shared.places(Share::Watches).limit,
            1,
            "never none"
        );
    }

    #[test]
    fn a_slot_comes_back_when_its_call_is_done() {
        let slots = CallSlots::new(1);
        let call = slots.take(None).unwrap();
        assert!(call.opened());
        let answer = Arc::clone(&call);
        assert!(slots.take(None).is_none());
        drop(call);
        assert!(slots.take(None).is_none(), "the answer still holds it");
        drop(answer);
        let next = slots.take(None).expect("the slot is free again");
        assert!(next.is_opening());
    }

    #[test]
    fn a_displaced_call_gives_its_slot_to_the_newcomer_at_once() {
        let slots = CallSlots::new(1);
        let silent = slots.take(None).unwrap();
        silent.waiting();
        let newcomer = slots.take(None).expect("the silent call's slot");
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
