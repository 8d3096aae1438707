//! The upstream's backoff: after a transient failure, or while a renewal is
//! overdue, callers that have a value to fall back on stop waiting for the
//! upstream for a while.
//!
//! The wait grows exponentially (jittered, so that replicas do not retry in
//! step) from `FIRST` up to `LONGEST`. When it ends, one caller at a time
//! may probe the upstream; the others keep being served stale values at
//! once until the probe answers. Any answer that is not transient (a value,
//! not found, access denied) ends the backoff.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use tokio::time::Instant;

/// The first backoff after a failure.
const FIRST: Duration = Duration::from_millis(500);
/// The longest backoff.
const LONGEST: Duration = Duration::from_secs(30);

/// Whether callers may wait on the upstream.
#[derive(Default)]
pub struct Backoff {
    /// Until when the upstream is left alone (`None`: not backed off).
    until: Mutex<Option<Instant>>,
    /// Failures in a row.
    failures: AtomicU32,
    /// A probe is under way.
    probing: AtomicBool,
    /// Times the backoff started, for the stats.
    started: AtomicU64,
    /// When a start was last logged at WARN: at most one a minute, so
    /// that an upstream slow on and off is not a pair of lines each time.
    warned_at: Mutex<Option<Instant>>,
    /// This backoff's start was logged at WARN (its end is logged then).
    announced: AtomicBool,
}

/// The least time between two WARN lines of a backoff's start.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// What a caller with a fallback value may do now.
#[derive(Debug, PartialEq, Eq)]
pub enum Permit {
    /// Ask the upstream (not backed off).
    Ask,
    /// Ask the upstream as the one probe; report with `probe_done`.
    Probe,
    /// Serve the fallback at once.
    Fallback,
}

impl Backoff {
    /// Whether callers are held back from the upstream until an answer
    /// ends the backoff: refresh-ahead waits for that, so that the end of
    /// a wait brings one probe, not one refresh per hot key.
    pub fn holding_back(&self) -> bool {
        self.until
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Whether the upstream is backed off now, as the gauge shows it:
    /// within the wait, or while the probe after it is under way. A wait
    /// that ended with no caller to probe holds nothing back (the next
    /// caller asks), so it does not count: otherwise the gauge would stay
    /// up for as long as no reads came, after one transient failure.
    pub fn active(&self) -> bool {
        let until = *self.until.lock().unwrap_or_else(|e| e.into_inner());
        until.is_some_and(|until| Instant::now() < until || self.probing.load(Relaxed))
    }

    /// Times a backoff started.
    pub fn times_started(&self) -> u64 {
        self.started.load(Relaxed)
    }

    /// May a caller that has a fallback value ask the upstream?
    pub fn permit(&self) -> Permit {
        let until = *self.until.lock().unwrap_or_else(|e| e.into_inner());
        match until {
            None => Permit::Ask,
            Some(until) if Instant::now() < until => Permit::Fallback,
            Some(_) if !self.probing.swap(true, Relaxed) => Permit::Probe,
            Some(_) => Permit::Fallback,
        }
    }

    /// The probe's caller is done (whatever the outcome was reported as).
    pub fn probe_done(&self) {
        self.probing.store(false, Relaxed);
    }

    /// An answer that says the upstream works.
    pub fn succeeded(&self) {
        let mut until = self.until.lock().unwrap_or_else(|e| e.into_inner());
        if until.take().is_some() {
            let failures = self.failures.load(Relaxed);
            if self.announced.swap(false, Relaxed) {
                tracing::info!(
                    failures,
                    "reads of the upstream answer again; backoff ended"
                );
            } else {
                tracing::debug!(
                    failures,
                    "reads of the upstream answer again; backoff ended"
                );
            }
        }
        self.failures.store(0, Relaxed);
    }

    /// A transient failure, or a renewal that did not answer in time
    /// (`cause`, for the operator: the start of a backoff is logged once,
    /// with it, and its end once; the health check alone would not say it
    /// when reads fail and listing works, e.g. reads throttled).
    pub fn failed(&self, cause: &dyn std::fmt::Display) {
        let failures = self.failures.fetch_add(1, Relaxed).saturating_add(1);
        let wait = backoff_for(failures);
        let mut until = self.until.lock().unwrap_or_else(|e| e.into_inner());
        let later = Instant::now() + wait;
        if until.is_none() {
            self.started.fetch_add(1, Relaxed);
        }
        // Said at the start, unless a start was said within WARN_EVERY; then
        // at the first failure past it, if the backoff still lasts (a long
        // outage right after a blip is said too).
        if !self.announced.load(Relaxed) {
            let mut warned_at = self.warned_at.lock().unwrap_or_else(|e| e.into_inner());
            if warned_at.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
                *warned_at = Some(Instant::now());
                self.announced.store(true, Relaxed);
                tracing::warn!(
                    error = %cause,
                    "reads of the upstream are slow or failing; serving cached values while backing off"
                );
            } else {
                tracing::debug!(error = %cause, "reads of the upstream are slow or failing again; backing off");
            }
        }
        if until.is_none_or(|current| current < later) {
            *until = Some(later);
        }
    }
}

/// `FIRST` doubled per failure after the first, up to `LONGEST`, then
/// between half and all of it (full jitter would let a replica retry at
/// once).
fn backoff_for(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    let ceiling = FIRST.saturating_mul(1 << doublings).min(LONGEST);
    ceiling.mul_f64(0.5 + fastrand::f64() * 0.5)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_stays_bounded() {
        assert!(backoff_for(1) <= FIRST && backoff_for(1) >= FIRST / 2);
        assert!(backoff_for(3) <= FIRST * 4 && backoff_for(3) >= FIRST * 2);
        assert!(backoff_for(40) <= LONGEST && backoff_for(40) >= LONGEST / 2);
    }

    #[tokio::test(start_paused = true)]
    async fn one_probe_at_a_time_after_the_wait() {
        let backoff = Backoff::default();
        assert_eq!(backoff.permit(), Permit::Ask);
        backoff.failed(&"a test's failure");
        assert!(backoff.active());
        assert_eq!(backoff.permit(), Permit::Fallback);
        tokio::time::advance(LONGEST).await;
        assert!(
            !backoff.active(),
            "the wait is over and no probe is under way"
        );
        assert!(
            backoff.holding_back(),
            "refresh-ahead still waits for an answer"
        );
        assert_eq!(backoff.permit(), Permit::Probe);
        assert!(
            backoff.active(),
            "callers are held back while the probe runs"
        );
        assert_eq!(backoff.permit(), Permit::Fallback, "one probe at a time");
        backoff.probe_done();
        backoff.succeeded();
        assert!(!backoff.active());
        assert!(!backoff.holding_back());
        assert_eq!(backoff.permit(), Permit::Ask);
        assert_eq!(backoff.times_started(), 1);
    }
}
