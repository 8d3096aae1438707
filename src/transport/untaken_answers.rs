//! A connection whose peer does not take its answers is closed. HTTP/2
//! lets a client give its streams a window of zero bytes (or one) and
//! never widen it: an answer's bytes then wait in hyper's or h2's queue,
//! never sent, and nothing ends the call: a body hyper cannot send is not
//! polled again, so neither the call timeout nor the end of the call
//! comes. Each such call would keep its call slot, or at least its answer
//! (secret values included) and its h2 stream, for as long as the peer
//! keeps the connection alive by answering pings: a caller with no grant
//! at all could hold every slot of the broker with `Health/Check`.
//!
//! Each answer is counted on its connection, under the connection's
//! current *period*, from when its handler answers until its body is done,
//! and each chunk of its bytes until h2 lets go of it (written out, or the
//! stream reset): the count rides in the chunk's `Bytes`. The connection
//! turns a period every call timeout (at least a second), from its own
//! `Connection::poll_read`. An answer still not taken from the period
//! before last was ready for at least a period, at most two: its
//! connection is closed, and every stream on it dropped. A server
//! reflection stream, which may rightly last a call timeout, is closed
//! only when left from three periods back (`reflection`). Per call: a
//! few atomic additions and the chunk's owner.

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

/// The shortest period: a connection's timer fires at most once a second.
const SHORTEST_PERIOD: Duration = Duration::from_secs(1);

/// A connection's answers not taken yet, by period, shared by its calls.
#[derive(Debug, Default)]
pub struct UntakenAnswers {
    period: AtomicU64,
    /// Answers (and chunks) of the current period and the one before.
    short: [AtomicU64; 2],
    /// Reflection streams of the current period and the two before.
    long: [AtomicU64; 3],
}

impl UntakenAnswers {
    /// An answer, or a chunk of one, is ready: counted until the guard is
    /// dropped.
    pub fn answered(self: &Arc<Self>) -> PendingAnswer {
        self.count(Kind::Short)
    }

    /// A reflection stream began: counted until the guard is dropped.
    pub fn reflection(self: &Arc<Self>) -> PendingAnswer {
        self.count(Kind::Long)
    }

    fn count(self: &Arc<Self>, kind: Kind) -> PendingAnswer {
        let period = self.period.load(Relaxed);
        self.slot(kind, period).fetch_add(1, Relaxed);
        PendingAnswer {
            answers: Arc::clone(self),
            kind,
            period,
        }
    }

    /// The count of `kind` answers of `period`.
    fn slot(&self, kind: Kind, period: u64) -> &AtomicU64 {
        match kind {
            Kind::Short => &self.short[(period % 2) as usize],
            Kind::Long => &self.long[(period % 3) as usize],
        }
    }

    /// Turns a period, unless answers of the period before last (or
    /// reflection streams of the one before that) are still not taken:
    /// then `true`, and the connection is to be closed.
    pub fn turn(&self) -> bool {
        let next = self.period.load(Relaxed) + 1;
        // The slots the next period reuses hold the oldest periods.
        let stalled = self.slot(Kind::Short, next).load(Relaxed) > 0
            || self.slot(Kind::Long, next).load(Relaxed) > 0;
        if !stalled {
            self.period.store(next, Relaxed);
        }
        stalled
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Short,
    Long,
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
    /// Periods of `call_timeout`, at least a second.
    pub fn new(answers: Arc<UntakenAnswers>, call_timeout: Duration) -> Self {
        let period = call_timeout.max(SHORTEST_PERIOD);
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
    kind: Kind,
    period: u64,
}

impl PendingAnswer {
    /// A count for a chunk of this answer's bytes, made now.
    pub fn chunk(&self) -> PendingAnswer {
        self.answers.answered()
    }
}

impl Drop for PendingAnswer {
    fn drop(&mut self) {
        self.answers
            .slot(self.kind, self.period)
            .fetch_sub(1, Relaxed);
    }
}

/// A chunk of an answer's bytes that keeps a count until h2 lets go of
/// it: written out, or its stream reset.
struct CountedChunk {
    bytes: bytes::Bytes,
    _pending: PendingAnswer,
}

impl AsRef<[u8]> for CountedChunk {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

/// `bytes`, counted as `pending` until the last of them is dropped.
pub fn counted(bytes: bytes::Bytes, pending: PendingAnswer) -> bytes::Bytes {
    bytes::Bytes::from_owner(CountedChunk {
        bytes,
        _pending: pending,
    })
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

    #[test]
    fn a_reflection_stream_may_last_a_period_more() {
        let answers = Arc::new(UntakenAnswers::default());
        let stream = answers.reflection();
        assert!(!answers.turn());
        assert!(!answers.turn(), "a stream may last a whole period");
        assert!(answers.turn(), "not two");
        drop(stream);
        assert!(!answers.turn());
    }

    #[test]
    fn a_chunk_keeps_its_count_until_its_last_bytes_go() {
        let answers = Arc::new(UntakenAnswers::default());
        let answer = answers.answered();
        let chunk = counted(bytes::Bytes::from_static(b"value"), answer.chunk());
        drop(answer);
        let rest = chunk.slice(1..);
        drop(chunk);
        assert!(!answers.turn());
        assert!(answers.turn(), "h2 still holds part of the chunk");
        assert_eq!(&rest[..], b"alue");
        drop(rest);
        assert!(!answers.turn());
    }
}
