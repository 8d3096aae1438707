//! Which entry goes when the cache is full: CLOCK (second chance), in
//! amortized O(1) per insert.
//!
//! Keys join a queue in the order they enter the cache. A hit sets its
//! entry's `referenced` bit. To make room, the oldest key is taken from the
//! queue: referenced, it loses the bit and goes to the back; otherwise it is
//! evicted. Each bit a hit sets is cleared once, so the work per insert is
//! constant on average, whatever the cache's size (a scan for the least
//! recently used entry costs the whole map on every insert past the bound).
//! CLOCK keeps what LRU keeps that matters here: a secret read since the
//! last pass stays; a secret read once and never again goes first.
//!
//! The queue names an entry by key and slot number (kept when an entry's
//! value is replaced), so a key removed and inserted again is not confused
//! with its old place. Places of entries removed by other means are skipped
//! when reached, and swept out when the queue holds more than twice as
//! many places as there are entries, at an insert as at an eviction: a key
//! cleared and read again, over and over, must not grow the queue while
//! the cache is below its bound.

use std::{
    collections::VecDeque,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
};

use super::CacheKey;

/// The insertion order of the cache's entries.
#[derive(Default)]
pub struct Clock {
    queue: Mutex<VecDeque<(CacheKey, u64)>>,
    next_slot: AtomicU64,
}

/// What the clock needs to know of an entry.
pub trait Slotted {
    fn slot(&self) -> u64;
    /// Clears the referenced bit; returns whether it was set.
    fn take_reference(&self) -> bool;
}

impl Clock {
    /// A slot number for a key entering the cache; `push` it once stored.
    pub fn new_slot(&self) -> u64 {
        self.next_slot.fetch_add(1, Relaxed)
    }

    /// Queues a key just stored in a new slot. `entry` looks a key up;
    /// `live` is the number of entries. Dead places are swept here too,
    /// not only when the cache is full: entries removed by other means
    /// (a clear, a deletion, a rotation forgetting other stages) and read
    /// again would otherwise grow the queue without bound below it.
    pub fn push<E: Slotted>(
        &self,
        key: CacheKey,
        slot: u64,
        live: usize,
        entry: impl Fn(&CacheKey) -> Option<E>,
    ) {
        let mut queue = self.lock();
        queue.push_back((key, slot));
        sweep_if_mostly_dead(&mut queue, live, entry);
    }

    /// The next key to evict. `entry` looks a key up; `live` is the number
    /// of entries, used to sweep dead places out of the queue.
    pub fn victim<E: Slotted>(
        &self,
        live: usize,
        entry: impl Fn(&CacheKey) -> Option<E>,
    ) -> Option<CacheKey> {
        let mut queue = self.lock();
        sweep_if_mostly_dead(&mut queue, live, &entry);
        while let Some((key, slot)) = queue.pop_front() {
            let Some(current) = entry(&key) else { continue };
            if current.slot() != slot {
                continue;
            }
            if current.take_reference() {
                queue.push_back((key, slot));
                continue;
            }
            return Some(key);
        }
        None
    }

    pub fn clear(&self) {
        self.lock().clear();
    }

    /// How many places the queue holds, dead ones included.
    #[cfg(test)]
    fn places(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(CacheKey, u64)>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Keeps only the places of live entries once the queue holds more than
/// twice as many places as there are entries (and more than 64): each
/// sweep at least halves the queue, so its cost is constant per push on
/// average.
fn sweep_if_mostly_dead<E: Slotted>(
    queue: &mut VecDeque<(CacheKey, u64)>,
    live: usize,
    entry: impl Fn(&CacheKey) -> Option<E>,
) {
    if queue.len() > live.saturating_mul(2).max(64) {
        queue.retain(|(key, slot)| entry(key).is_some_and(|e| e.slot() == *slot));
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashMap,
        sync::{Arc, atomic::AtomicBool},
    };

    use super::*;
    use crate::backend::VersionSelector;

    struct Fake {
        slot: u64,
        referenced: Arc<AtomicBool>,
    }

    impl Slotted for Fake {
        fn slot(&self) -> u64 {
            self.slot
        }
        fn take_reference(&self) -> bool {
            self.referenced.swap(false, Relaxed)
        }
    }

    fn key(name: &str) -> CacheKey {
        CacheKey::new(name.to_owned(), VersionSelector::current())
    }

    #[test]
    fn referenced_entries_get_a_second_chance() {
        let clock = Clock::default();
        let mut entries: HashMap<CacheKey, (u64, Arc<AtomicBool>)> = HashMap::new();
        for name in ["a", "b", "c"] {
            let slot = clock.new_slot();
            clock.push(key(name), slot, 0, |_| None::<Fake>);
            entries.insert(key(name), (slot, Arc::new(AtomicBool::new(false))));
        }
        entries[&key("a")].1.store(true, Relaxed);
        let lookup = |k: &CacheKey| {
            entries.get(k).map(|(slot, referenced)| Fake {
                slot: *slot,
                referenced: Arc::clone(referenced),
            })
        };
        assert_eq!(
            clock.victim(3, lookup),
            Some(key("b")),
            "a was read: b goes"
        );
    }

    #[test]
    fn dead_and_replaced_places_are_skipped() {
        let clock = Clock::default();
        let none = |_: &CacheKey| None::<Fake>;
        clock.push(key("gone"), clock.new_slot(), 0, none);
        clock.push(key("again"), clock.new_slot(), 0, none);
        let again_now = clock.new_slot();
        clock.push(key("again"), again_now, 0, none);
        let lookup = |k: &CacheKey| {
            (k == &key("again")).then(|| Fake {
                slot: again_now,
                referenced: Arc::new(AtomicBool::new(false)),
            })
        };
        assert_eq!(clock.victim(1, lookup), Some(key("again")));
        assert_eq!(clock.victim(1, lookup), None);
    }

    #[test]
    fn places_of_entries_removed_by_other_means_do_not_pile_up_below_the_bound() {
        // A key read, removed (a clear, a rotation), read again, over and
        // over, while the cache holds a handful of entries and is never
        // full: the queue must not keep every old place.
        let clock = Clock::default();
        let live: HashMap<CacheKey, u64> = (0..5)
            .map(|i| {
                let slot = clock.new_slot();
                (key(&format!("kept-{i}")), slot)
            })
            .collect();
        let lookup = |k: &CacheKey| {
            live.get(k).map(|slot| Fake {
                slot: *slot,
                referenced: Arc::new(AtomicBool::new(false)),
            })
        };
        for (k, slot) in &live {
            clock.push(k.clone(), *slot, live.len(), lookup);
        }
        for _ in 0..10_000 {
            clock.push(
                key("cleared-and-read-again"),
                clock.new_slot(),
                live.len(),
                lookup,
            );
        }
        assert!(
            clock.places() <= 64 + 1,
            "{} places for {} entries",
            clock.places(),
            live.len()
        );
        let mut left: Vec<_> = std::iter::from_fn(|| clock.victim(live.len(), lookup)).collect();
        left.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(
            left.len(),
            5,
            "the live entries keep their places: {left:?}"
        );
    }
}
