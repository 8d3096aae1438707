//! One memory budget for requests still arriving, shared by every call.
//!
//! tonic keeps the bytes of a request message until the whole message is
//! there, and hyper hands HTTP/2 flow-control credit back as soon as tonic
//! has read the bytes, so the windows do not bound what waits. A caller can
//! declare a message of `--max-message-size`, send all but its last byte,
//! and do so on every stream of every connection it opens: per connection
//! that is the call limit times the message size (256 MiB at the defaults).
//!
//! So each request body passes through `Budgeted`, which follows gRPC's
//! framing (a 5-byte header, then the message) and, from the header on,
//! holds budget for the whole length the message declares (tonic reserves
//! that much as soon as it reads the header), giving it back once the
//! message is whole (tonic decodes it then) or the call ends. A call that finds the
//! budget spent is answered RESOURCE_EXHAUSTED (`REQUEST_MEMORY`),
//! rather than waiting: waiting would let the callers holding the budget
//! stall everyone else's calls for as long as the call timeout.
//!
//! A message that arrives whole in one HTTP/2 DATA frame, as every small
//! request does, never touches the budget.
//!
//! A request that may outlive its call (server reflection's, a
//! bidirectional stream) is given the call's end: then the body gives its
//! budget back and fails, which ends the handler reading it.
//!
//! The body also tells the call's slot (`call_slots`) when its request has
//! come: the message and the end of the request for every RPC of one request
//! message (tonic does not run the handler before the end), the first
//! message for a bidirectional stream (reflection). Until then the call is
//! still opening, and another call may take its slot, which makes this body
//! fail with `TOO_MANY_CALLS`: a message sent without its end cannot hold a
//! slot for good.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{
    call_slots::{CallSlot, Ended},
    gate::CallEnd,
};
use crate::api::status::ApiError;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// gRPC's length-prefixed message header: a compression flag, 4 bytes of
/// length.
const HEADER: usize = 5;

/// The bytes of unfinished request messages the broker holds at once.
#[derive(Debug, Clone)]
pub struct RequestBudget {
    bytes: Arc<Semaphore>,
    /// `--max-message-size`: a message declaring more is refused at its
    /// header, as too large, not as a lack of request memory.
    max_message: usize,
}

impl RequestBudget {
    pub fn new(bytes: usize) -> Self {
        Self {
            bytes: Arc::new(Semaphore::new(bytes.min(Semaphore::MAX_PERMITS))),
            max_message: usize::MAX,
        }
    }

    /// Refuses messages that declare more than `limit` bytes.
    pub fn with_message_limit(mut self, limit: usize) -> Self {
        self.max_message = limit;
        self
    }

    /// `body`, holding budget for its unfinished message; with `ends`, the
    /// call's end, past which the body fails (a bidirectional stream's: its
    /// call opens at its first message); with `slot`, the call's slot.
    pub(super) fn wrap<B>(
        &self,
        body: B,
        ends: Option<CallEnd>,
        slot: Option<Arc<CallSlot>>,
    ) -> Budgeted<B> {
        let opens_at_first_message = ends.is_some();
        Budgeted {
            body,
            budget: Arc::clone(&self.bytes),
            max_message: self.max_message,
            framing: Framing::default(),
            held: None,
            ends,
            opening: slot,
            opens_at_first_message,
            done: false,
        }
    }

    #[cfg(test)]
    fn available(&self) -> usize {
        self.bytes.available_permits()
    }
}

/// Where a request body is in gRPC's framing.
#[derive(Debug, Default)]
struct Framing {
    header: [u8; HEADER],
    /// Header bytes seen of the current message.
    header_seen: usize,
    /// Message bytes still to come after a whole header.
    body_left: usize,
    /// Bytes the current (unfinished) message holds: the header bytes seen,
    /// then, once the header is whole, the header and the declared length.
    unfinished: usize,
    /// A message has arrived whole.
    whole: bool,
    /// The longest message length a header has declared.
    longest: usize,
}

impl Framing {
    /// Follows `chunk`; afterwards `unfinished` is what the message in
    /// progress holds.
    fn follow(&mut self, mut chunk: &[u8]) {
        // The common case, one whole message in one frame, in a few steps.
        if self.header_seen == 0
            && self.body_left == 0
            && let Some(length) = chunk.get(1..HEADER)
            && u32::from_be_bytes([length[0], length[1], length[2], length[3]]) as usize
                == chunk.len() - HEADER
        {
            self.whole = true;
            self.longest = self.longest.max(chunk.len() - HEADER);
            return;
        }
        while !chunk.is_empty() {
            if self.body_left == 0 {
                let take = (HEADER - self.header_seen).min(chunk.len());
                self.header[self.header_seen..self.header_seen + take]
                    .copy_from_slice(&chunk[..take]);
                self.header_seen += take;
                self.unfinished += take;
                chunk = &chunk[take..];
                if self.header_seen == HEADER {
                    let length = u32::from_be_bytes([
                        self.header[1],
                        self.header[2],
                        self.header[3],
                        self.header[4],
                    ]);
                    self.header_seen = 0;
                    self.body_left = length as usize;
                    self.longest = self.longest.max(self.body_left);
                    self.unfinished = if self.body_left == 0 {
                        self.whole = true;
                        0
                    } else {
                        HEADER + self.body_left
                    };
                }
            } else {
                let take = self.body_left.min(chunk.len());
                self.body_left -= take;
                chunk = &chunk[take..];
                if self.body_left == 0 {
                    self.unfinished = 0;
                    self.whole = true;
                }
            }
        }
    }
}

/// A request body that holds budget for its unfinished message (see the
/// module doc).
pub struct Budgeted<B> {
    body: B,
    budget: Arc<Semaphore>,
    max_message: usize,
    framing: Framing,
    held: Option<OwnedSemaphorePermit>,
    ends: Option<CallEnd>,
    /// The call's slot, until its request has come.
    opening: Option<Arc<CallSlot>>,
    /// A bidirectional stream: its request has come with its first message.
    opens_at_first_message: bool,
    /// Failed or ended: nothing more is read.
    done: bool,
}

impl<B> Drop for Budgeted<B> {
    /// A body dropped before its message came (a reset, a refusal) no
    /// longer waits for it.
    fn drop(&mut self) {
        self.give_up();
    }
}

impl<B> Budgeted<B> {
    /// The request has come: the call's slot can no longer be taken, and a
    /// long-lived stream takes its place in its share. Why not, if it was
    /// taken already or the share is full.
    fn stop_opening(&mut self) -> Result<(), ApiError> {
        let Some(slot) = self.opening.take() else {
            return Ok(());
        };
        if !slot.opened() {
            return Err(ApiError::Displaced);
        }
        slot.take_place().map_err(ApiError::from)
    }

    /// The body ended before its first message.
    fn give_up(&mut self) {
        if let Some(slot) = self.opening.take() {
            slot.gave_up();
        }
    }

    /// The request has ended (its last frame, or trailers): nothing more
    /// is read, no budget is held (a message cut short holds none).
    fn end(&mut self) {
        self.held = None;
        self.done = true;
        self.note_end();
    }

    /// Tells a stream's answer how its request ended: whole, or inside a
    /// message (tonic then fails the read, and reflection would end its
    /// answer OK).
    fn note_end(&self) {
        let Some(ends) = &self.ends else {
            return;
        };
        if self.framing.unfinished > 0 {
            let cut = ApiError::MalformedRequest {
                detail: "the request ended inside a message".into(),
            };
            ends.request_failed(&tonic::Status::from(cut));
        } else {
            ends.request_ended();
        }
    }

    /// Gives the budget back and ends the body with `error`.
    fn fail(&mut self, error: ApiError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.held = None;
        self.done = true;
        let status = tonic::Status::from(error);
        if let Some(ends) = &self.ends {
            ends.request_failed(&status);
        }
        Poll::Ready(Some(Err(Box::new(status))))
    }

    /// Holds exactly what the unfinished message has received; false when
    /// the budget cannot cover it.
    fn hold_unfinished(&mut self) -> bool {
        let want = self.framing.unfinished;
        let held = self.held.as_ref().map_or(0, |permit| permit.num_permits());
        if want == 0 {
            self.held = None;
        } else if want < held {
            if let Some(permit) = &mut self.held {
                drop(permit.split(held - want));
            }
        } else if want > held {
            let Ok(more) = u32::try_from(want - held) else {
                return false;
            };
            let Ok(more) = Arc::clone(&self.budget).try_acquire_many_owned(more) else {
                return false;
            };
            match &mut self.held {
                Some(permit) => permit.merge(more),
                None => self.held = Some(more),
            }
        }
        true
    }
}

impl<B> Body for Budgeted<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.done {
            return Poll::Ready(None);
        }
        if let Some(ended) = self.ends.as_mut().and_then(|end| end.passed(cx)) {
            return self.fail(ended);
        }
        if let Some(ended) = self.opening.as_ref().and_then(|slot| slot.ended(cx)) {
            self.opening = None;
            return self.fail(match ended {
                Ended::Displaced => ApiError::Displaced,
                Ended::ShuttingDown => ApiError::ShuttingDown,
            });
        }
        let frame = match Pin::new(&mut self.body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Ready(Some(Err(error))) => {
                self.held = None;
                self.done = true;
                if let Some(slot) = self.opening.take() {
                    slot.broke();
                }
                return Poll::Ready(Some(Err(error.into())));
            }
            Poll::Ready(None) => {
                self.end();
                if self.framing.whole {
                    if let Err(refused) = self.stop_opening() {
                        return self.fail(refused);
                    }
                } else {
                    self.give_up();
                }
                return Poll::Ready(None);
            }
            Poll::Pending => {
                if let Some(slot) = &self.opening {
                    slot.waiting();
                }
                return Poll::Pending;
            }
        };
        if frame.is_trailers() {
            // tonic reads no further: the request ends here.
            self.end();
        }
        if let Some(data) = frame.data_ref() {
            self.framing.follow(data);
            // Checked here too for a message that came whole (tonic would
            // refuse it, but a stream's handler may not say so: reflection).
            if self.framing.longest > self.max_message {
                let limit = self.max_message;
                return self.fail(ApiError::MessageTooLarge { limit });
            }
            if !self.hold_unfinished() {
                return self.fail(ApiError::RequestMemory);
            }
            let request_came =
                self.framing.whole && (self.opens_at_first_message || self.body.is_end_stream());
            if request_came && let Err(refused) = self.stop_opening() {
                return self.fail(refused);
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(length: usize) -> Vec<u8> {
        let mut framed = vec![0];
        framed.extend_from_slice(&(length as u32).to_be_bytes());
        framed.extend(std::iter::repeat_n(b'x', length));
        framed
    }

    /// Feeds `chunks` as DATA frames; the budget left after each.
    fn feed(budget: &RequestBudget, chunks: &[&[u8]]) -> Vec<Result<usize, String>> {
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = chunks
            .iter()
            .map(|chunk| Ok(Frame::data(Bytes::copy_from_slice(chunk))))
            .collect();
        let body = http_body_util::StreamBody::new(futures::stream::iter(frames));
        let mut body = budget.wrap(body, None, None);
        let mut seen = Vec::new();
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        for _ in chunks {
            match Pin::new(&mut body).poll_frame(&mut cx) {
                Poll::Ready(Some(Ok(_))) => seen.push(Ok(budget.available())),
                Poll::Ready(Some(Err(error))) => seen.push(Err(error.to_string())),
                other => panic!("a frame was expected: {other:?}"),
            }
        }
        drop(body);
        seen
    }

    #[test]
    fn a_message_declaring_more_than_the_limit_is_too_large_at_its_header() {
        let budget = RequestBudget::new(1000).with_message_limit(500);
        let mut header = vec![0];
        header.extend_from_slice(&u32::MAX.to_be_bytes());
        let seen = feed(&budget, &[&header]);
        assert!(
            seen[0].as_ref().is_err_and(|e| e.contains("500")),
            "{seen:?}"
        );
        assert_eq!(budget.available(), 1000);
        let fits = message(500);
        assert_eq!(feed(&budget, &[&fits[..10]]), vec![Ok(495)]);
    }

    #[test]
    fn a_whole_message_in_one_frame_holds_nothing() {
        let budget = RequestBudget::new(100);
        let mut two = message(300);
        two.extend(message(0));
        assert_eq!(feed(&budget, &[&two]), vec![Ok(100)]);
    }

    #[test]
    fn an_unfinished_message_holds_its_declared_length_until_it_is_whole() {
        let budget = RequestBudget::new(1000);
        let whole = message(100);
        let (head, tail) = whole.split_at(40);
        let (middle, last) = tail.split_at(50);
        // 3 header bytes; then the header is whole: 105 held, the length
        // tonic reserves, however little of it has come.
        assert_eq!(
            feed(&budget, &[&whole[..3], &head[3..], middle, last]),
            vec![Ok(997), Ok(895), Ok(895), Ok(1000)]
        );
        assert_eq!(budget.available(), 1000);
    }

    #[test]
    fn a_frame_that_ends_one_message_and_starts_the_next_holds_the_next() {
        let budget = RequestBudget::new(1000);
        let mut stream = message(10);
        stream.extend(message(20));
        let (first, rest) = stream.split_at(20);
        assert_eq!(feed(&budget, &[first, rest]), vec![Ok(975), Ok(1000)]);
    }

    #[test]
    fn a_header_alone_holds_the_length_it_declares() {
        let budget = RequestBudget::new(1000);
        let big = message(600);
        let seen = feed(&budget, &[&big[..5], &big[5..6]]);
        assert_eq!(seen, vec![Ok(395), Ok(395)]);
    }

    #[test]
    fn past_the_budget_the_call_is_refused_and_the_budget_given_back() {
        let budget = RequestBudget::new(600);
        let big = message(500);
        let other = message(200);
        let mut held = budget.wrap(
            http_body_util::StreamBody::new(futures::stream::iter([Ok::<
                _,
                std::convert::Infallible,
            >(Frame::data(
                Bytes::copy_from_slice(&other[..10]),
            ))])),
            None,
            None,
        );
        let waker = futures::task::noop_waker();
        assert!(matches!(
            Pin::new(&mut held).poll_frame(&mut Context::from_waker(&waker)),
            Poll::Ready(Some(Ok(_)))
        ));
        assert_eq!(budget.available(), 395);
        let seen = feed(&budget, &[&big[..60]]);
        drop(held);
        assert!(
            seen[0]
                .as_ref()
                .is_err_and(|e| e.contains("request memory")),
            "{seen:?}"
        );
        assert_eq!(
            budget.available(),
            600,
            "ended calls give their budget back"
        );
    }

    #[test]
    fn a_call_dropped_mid_message_gives_its_budget_back() {
        let budget = RequestBudget::new(1000);
        let big = message(500);
        assert_eq!(feed(&budget, &[&big[..100]]), vec![Ok(495)]);
        assert_eq!(budget.available(), 1000);
    }

    #[tokio::test]
    async fn a_call_opens_when_its_request_has_come_and_fails_when_displaced() {
        use http_body_util::BodyExt;

        use crate::transport::call_slots::CallSlots;

        let budget = RequestBudget::new(1000);
        let slots = CallSlots::new(1);
        let whole = message(10);
        let frames = futures::stream::iter([
            Ok::<_, std::convert::Infallible>(Frame::data(Bytes::copy_from_slice(&whole[..3]))),
            Ok(Frame::data(Bytes::copy_from_slice(&whole[3..]))),
        ]);
        let slot = slots.take(None).unwrap();
        let mut body = budget.wrap(
            http_body_util::StreamBody::new(frames),
            None,
            Some(Arc::clone(&slot)),
        );
        assert!(body.frame().await.unwrap().is_ok());
        assert!(slot.is_opening(), "half a header is not a message");
        assert!(body.frame().await.unwrap().is_ok());
        assert!(
            slot.is_opening(),
            "a whole message without the request's end can still be displaced"
        );
        assert!(body.frame().await.is_none());
        assert!(!slot.is_opening(), "the request has come");
        assert!(slots.take(None).is_none(), "an opened call keeps its slot");
        drop((body, slot));

        // A call whose message never comes loses its slot to a newcomer,
        // and its body fails at once.
        let silent = futures::stream::pending::<Result<Frame<Bytes>, std::convert::Infallible>>();
        let mut body = budget.wrap(
            http_body_util::StreamBody::new(silent),
            None,
            slots.take(None),
        );
        let waiting = tokio::spawn(async move { body.frame().await });
        tokio::task::yield_now().await;
        let newcomer = slots.take(None).expect("the silent call's slot");
        let failed = waiting.await.unwrap().unwrap().unwrap_err();
        assert!(
            failed.to_string().contains("request had not arrived"),
            "{failed}"
        );
        assert!(newcomer.opened());
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_given_an_end_fails_there_and_gives_its_budget_back() {
        use futures::StreamExt;
        use http_body_util::BodyExt;

        let budget = RequestBudget::new(1000);
        let big = message(500);
        let frames = futures::stream::iter([Ok::<_, std::convert::Infallible>(Frame::data(
            Bytes::copy_from_slice(&big[..100]),
        ))])
        .chain(futures::stream::pending());
        let mut body = budget.wrap(
            http_body_util::StreamBody::new(frames),
            Some(CallEnd::after(std::time::Duration::from_secs(30))),
            None,
        );
        assert!(body.frame().await.unwrap().is_ok());
        assert_eq!(budget.available(), 495);
        let ended = body.frame().await.unwrap().unwrap_err();
        assert!(ended.to_string().contains("call timeout"), "{ended}");
        assert_eq!(budget.available(), 1000);
        assert!(body.frame().await.is_none(), "nothing after the end");
    }
}
