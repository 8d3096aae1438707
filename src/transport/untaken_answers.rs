//! A connection whose peer does not take its answers is closed. HTTP/2
//! lets a client open a stream window of zero bytes and never widen it:
//! the answer of each of its calls is then ready and never sent, and hyper
//! does not poll a body it cannot send, so neither the call timeout nor
//! the end of the call ever comes. Each such call would keep its call slot
//! (and its answer, secret values included, in memory) for as long as the
//! peer keeps the connection alive by answering pings: a caller with no
//! grant at all could hold every slot of the broker with `Health/Check`.
//!
//! Each answer of a short call (everything but the long-lived streams)
//! is counted, from when its handler answers until its body is done,
//! under the connection's current *period*; the connection turns a period
//! every call timeout (`Connection::poll_read`). An answer still not taken
//! from the period before last was ready for at least a call timeout, and
//! at most two: its connection is closed, and every stream on it dropped.
//! The cost of a call is two atomic additions on the connection's counts.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    task::{Context, Waker},
    time::Duration,
};

use tokio::time::{Instant, Sleep};

/// A connection's answers not taken yet, by period, shared by its calls.
#[derive(Debug, Default)]
pub struct UntakenAnswers {
    period: AtomicU64,
    /// Answers not taken, of the current period and of the one before.
    pending: [AtomicU64; 2],
}

impl UntakenAnswers {
    /// An answer is ready: counted until the guard is dropped.
    pub fn answered(self: &Arc<Self>) -> PendingAnswer {
        let slot = (self.period.load(Relaxed) % 2) as usize;
        self.pending[slot].fetch_add(1, Relaxed);
        PendingAnswer {
            answers: Arc::clone(self),
            slot,
        }
    }

    /// Turns a period, unless answers of the period before last are still
    /// not taken: then `true`, and the connection is to be closed.
    pub fn turn(&self) -> bool {
        let next = self.period.load(Relaxed) + 1;
        // The slot the next period reuses holds the period before last.
        if self.pending[(next % 2) as usize].load(Relaxed) > 0 {
            return true;
        }
        self.period.store(next, Relaxed);
        false
    }
}

/// The connection's side: turns its periods, and says when to close it.
pub struct PeriodTurns {
    answers: Arc<UntakenAnswers>,
    period: Duration,
    turn: Pin<Box<Sleep>>,
    /// The waker `turn` holds.
    registered: Option<Waker>,
    stalled: bool,
}

impl PeriodTurns {
    pub fn new(answers: Arc<UntakenAnswers>, period: Duration) -> Self {
        Self {
            answers,
            period,
            turn: Box::pin(tokio::time::sleep(period)),
            registered: None,
            stalled: false,
        }
    }

    /// Whether an answer of the connection has waited past a whole period
    /// (then it is to be closed); otherwise the task of `cx` is woken at
    /// the next turn. Asked on every read: the timer is polled only when
    /// it has passed or the task's waker changed.
    pub fn stalled(&mut self, cx: &mut Context<'_>) -> bool {
        if self.stalled {
            return true;
        }
        let registered = self
            .registered
            .as_ref()
            .is_some_and(|waker| waker.will_wake(cx.waker()));
        if registered && !self.turn.is_elapsed() {
            return false;
        }
        if self.turn.as_mut().poll(cx).is_ready() {
            if self.answers.turn() {
                self.stalled = true;
                return true;
            }
            // From now, not from when it was due: a connection polled late
            // must not turn twice at once, which would count answers made
            // just now as a period old.
            self.turn.as_mut().reset(Instant::now() + self.period);
            let _ = self.turn.as_mut().poll(cx);
        }
        self.registered = Some(cx.waker().clone());
        false
    }

    pub fn period(&self) -> Duration {
        self.period
    }
}

/// An answer not taken yet (see the module doc).
#[derive(Debug)]
pub struct PendingAnswer {
    answers: Arc<UntakenAnswers>,
    slot: usize,
}

impl Drop for PendingAnswer {
    fn drop(&mut self) {
        self.answers.pending[self.slot].fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_left_past_a_whole_period_closes_its_connection() {
        let answers = Arc::new(UntakenAnswers::default());
        let taken = answers.answered();
        let left = answers.answered();
        drop(taken);
        assert!(!answers.turn(), "answers of the current period may wait");
        assert!(answers.turn(), "one ready a whole period ago");
        drop(left);
        assert!(!answers.turn());
    }

    #[test]
    fn answers_taken_in_time_never_close_it() {
        let answers = Arc::new(UntakenAnswers::default());
        for _ in 0..10 {
            let answer = answers.answered();
            assert!(!answers.turn());
            drop(answer);
            assert!(!answers.turn());
        }
    }
}
