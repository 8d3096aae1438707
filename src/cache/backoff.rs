//! The upstream's backoff: after a transient failure, or while a renewal is
//! overdue, callers that have a value to fall back on stop waiting for the
//! upstream for a while.
//!
//! The wait grows exponentially (jittered, so that replicas do not retry in
//! step) from `FIRST` up to `LONGEST`: it doubles once per wait that ends
//! in another failure, not per failed call, so that a crowd of reads
//! failing together counts as one failure (otherwise a burst of fifty
//! would jump straight to the longest wait, and a short outage would
//! leave values stale for half a minute after it). When the wait ends,
//! one caller at a time may probe the upstream; the others keep being
//! served stale values at once until the probe answers. Any answer that
//! is not transient (a value, not found, access denied) ends the backoff.
//!
//! Each backoff is said in the log when it starts, with its cause, and
//! when it ends. A start within a minute of the last WARN is said at INFO
//! (an upstream slow on and off is not a WARN pair each time, nor
//! silent), at most 10 a minute (past them at DEBUG, the next INFO start
//! counting them in `held_back`). A backoff started by a read that was only slow (the SDK still
//! retrying) says the real cause once a read fails with one, e.g.
//! throttling.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use tokio::time::Instant;

use crate::telemetry::LineBudget;

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
    /// This backoff's start was logged (its end is logged then).
    announced: AtomicBool,
    /// ... at WARN.
    announced_at_warn: AtomicBool,
    /// A failure's own cause (not only slowness) was logged in this backoff.
    cause_said: AtomicBool,
    /// This backoff's start was said at INFO or WARN: its end is too.
    end_to_say: AtomicBool,
    /// Starts said at INFO (within `WARN_EVERY` of a WARN): an upstream
    /// failing and answering in turns must not fill the log with them.
    info_starts: InfoStarts,
}

/// At most 10 INFO starts a minute.
struct InfoStarts(LineBudget);

impl Default for InfoStarts {
    fn default() -> Self {
        Self(LineBudget::new(WARN_EVERY, 10))
    }
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
    pub fn succeeded(&self) -> Option<Said> {
        let mut until = self.until.lock().unwrap_or_else(|e| e.into_inner());
        let mut said = None;
        if until.take().is_some() {
            let failures = self.failures.load(Relaxed);
            self.cause_said.store(false, Relaxed);
            let announced = self.announced.swap(false, Relaxed);
            if self.end_to_say.swap(false, Relaxed) && announced {
                tracing::info!(
                    failures,
                    "reads of the upstream answer again; backoff ended"
                );
                said = Some(Said::Ended);
            } else {
                tracing::debug!(
                    failures,
                    "reads of the upstream answer again; backoff ended"
                );
            }
        }
        self.failures.store(0, Relaxed);
        said
    }

    /// A transient failure (`cause`, for the operator: the health check
    /// alone would not say it when reads fail and listing works, e.g.
    /// reads throttled).
    pub fn failed(&self, cause: &dyn std::fmt::Display) -> Option<Said> {
        self.record(cause, true)
    }

    /// A renewal that did not answer within the wait (`cause` says so);
    /// the read goes on, and says its own cause if it fails.
    pub fn overdue(&self, cause: &dyn std::fmt::Display) -> Option<Said> {
        self.record(cause, false)
    }

    fn record(&self, cause: &dyn std::fmt::Display, own_cause: bool) -> Option<Said> {
        let now = Instant::now();
        let mut until = self.until.lock().unwrap_or_else(|e| e.into_inner());
        if until.is_none() {
            self.started.fetch_add(1, Relaxed);
        }
        // Calls that fail within the wait were made before it (or by
        // callers with nothing to fall back on): the wait already stands
        // for them.
        if until.is_none_or(|until| now >= until) {
            let failures = self.failures.fetch_add(1, Relaxed).saturating_add(1);
            *until = Some(now + backoff_for(failures));
        }
        // Said under the lock: a success in between would end the
        // backoff before its start is said, and the start's flags would
        // outlive it (the next outage then said nothing).
        let said = self.say(cause, own_cause);
        drop(until);
        said
    }

    fn say(&self, cause: &dyn std::fmt::Display, own_cause: bool) -> Option<Said> {
        if !self.announced.swap(true, Relaxed) {
            self.cause_said.store(own_cause, Relaxed);
            let mut warned_at = self.warned_at.lock().unwrap_or_else(|e| e.into_inner());
            let warn = warned_at.is_none_or(|at| at.elapsed() >= WARN_EVERY);
            self.announced_at_warn.store(warn, Relaxed);
            self.end_to_say.store(true, Relaxed);
            if warn {
                *warned_at = Some(Instant::now());
                tracing::warn!(
                    error = %cause,
                    "reads of the upstream are slow or failing; serving cached values while backing off"
                );
                Some(Said::Started { warn: true })
            } else if let Some(held_back) = self.info_starts.0.take() {
                tracing::info!(
                    error = %cause,
                    held_back,
                    "reads of the upstream are slow or failing again; serving cached values while backing off"
                );
                Some(Said::Started { warn: false })
            } else {
                // Unsaid: the next failure tries again (a WARN once the
                // minute since the last one is over), so that a long
                // outage after many short ones is still said.
                self.end_to_say.store(false, Relaxed);
                self.announced.store(false, Relaxed);
                tracing::debug!(error = %cause, "reads of the upstream are slow or failing again; backing off");
                None
            }
        } else if own_cause && self.end_to_say.load(Relaxed) && !self.cause_said.swap(true, Relaxed)
        {
            let warn = self.announced_at_warn.load(Relaxed);
            if warn {
                tracing::warn!(error = %cause, "reads of the upstream fail, not only slow");
            } else {
                tracing::info!(error = %cause, "reads of the upstream fail, not only slow");
            }
            Some(Said::Cause { warn })
        } else {
            None
        }
    }
}

/// The line a call of `Backoff` wrote (at INFO or WARN), for tests: a
/// scoped `tracing` subscriber cannot be relied on to see events whose
/// call sites other tests' threads reach at the same time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Said {
    /// The backoff started (at WARN, or at INFO within `WARN_EVERY` of
    /// the last WARN).
    Started { warn: bool },
    /// A backoff started by slowness got a failure's own cause.
    Cause { warn: bool },
    /// The backoff ended (INFO).
    Ended,
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

    #[tokio::test(start_paused = true)]
    async fn a_crowd_failing_together_is_one_failure() {
        let backoff = Backoff::default();
        for _ in 0..50 {
            backoff.failed(&"a test's failure");
        }
        tokio::time::advance(FIRST).await;
        assert_eq!(backoff.permit(), Permit::Probe, "the first wait is over");
        // The probe fails: the wait doubles, once.
        backoff.failed(&"a test's failure");
        backoff.probe_done();
        tokio::time::advance(FIRST).await;
        assert_eq!(backoff.permit(), Permit::Fallback, "within the second wait");
        tokio::time::advance(FIRST).await;
        assert_eq!(backoff.permit(), Permit::Probe, "the second wait is over");
    }

    #[tokio::test(start_paused = true)]
    async fn every_backoff_is_said_and_a_slow_start_gets_its_cause() {
        let backoff = Backoff::default();
        let said = |what| Some(what);
        assert_eq!(
            backoff.overdue(&"AWS did not answer in time"),
            said(Said::Started { warn: true })
        );
        assert_eq!(
            backoff.failed(&"AWS throttled the read"),
            said(Said::Cause { warn: true })
        );
        assert_eq!(backoff.failed(&"AWS throttled the read"), None);
        assert_eq!(backoff.succeeded(), said(Said::Ended));
        // A second outage within the minute: said, at INFO, its end too.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(
            backoff.failed(&"the connection was reset"),
            said(Said::Started { warn: false })
        );
        assert_eq!(backoff.succeeded(), said(Said::Ended));
        // An upstream failing and answering in turns: ten more INFO pairs
        // this minute (one was said above), then DEBUG.
        for turn in 0..12 {
            let said = backoff.failed(&"throttled");
            let ended = backoff.succeeded();
            if turn < 9 {
                assert_eq!(said, Some(Said::Started { warn: false }), "turn {turn}");
                assert_eq!(ended, Some(Said::Ended), "turn {turn}");
            } else {
                assert_eq!((said, ended), (None, None), "turn {turn}");
            }
        }
        // A long outage after them: said as soon as the minute allows.
        assert_eq!(backoff.failed(&"down"), None);
        tokio::time::advance(WARN_EVERY).await;
        assert_eq!(backoff.failed(&"down"), said(Said::Started { warn: true }));
        assert_eq!(backoff.succeeded(), said(Said::Ended));
        // Past the minute: WARN again.
        tokio::time::advance(WARN_EVERY).await;
        assert_eq!(
            backoff.failed(&"HTTP 500"),
            said(Said::Started { warn: true })
        );
    }
}
