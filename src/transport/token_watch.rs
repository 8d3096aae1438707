//! A cheap, repeated "has this token been cancelled?" for a connection's
//! reads, with the task woken when it is.
//!
//! A connection asks on every read (several times a call), so asking must
//! be cheap: one lock of a child token of the connection's own (not of one
//! that every connection takes on every read). The token's future, which
//! wakes the connection, is polled again only when the task's waker
//! changes; it keeps the waker it was last polled with.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Waker},
};

use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

pub(crate) struct TokenWatch {
    token: CancellationToken,
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
    /// The waker `cancelled` holds.
    registered: Option<Waker>,
    fired: bool,
}

impl TokenWatch {
    /// Watches a child of `parent`: cancelled when `parent` is.
    pub(crate) fn child_of(parent: &CancellationToken) -> Self {
        let token = parent.child_token();
        Self {
            cancelled: Box::pin(token.clone().cancelled_owned()),
            token,
            registered: None,
            fired: false,
        }
    }

    /// Whether the token has been cancelled; if not, the task of `cx` is
    /// woken when it is.
    pub(crate) fn fired(&mut self, cx: &mut Context<'_>) -> bool {
        if self.fired || self.token.is_cancelled() {
            self.fired = true;
            return true;
        }
        let registered = self
            .registered
            .as_ref()
            .is_some_and(|waker| waker.will_wake(cx.waker()));
        if !registered {
            if self.cancelled.as_mut().poll(cx).is_ready() {
                self.fired = true;
                return true;
            }
            self.registered = Some(cx.waker().clone());
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering::Relaxed},
        },
        task::{Context, Wake, Waker},
    };

    use super::*;

    #[derive(Default)]
    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Relaxed);
        }
    }

    fn counting() -> (Arc<CountingWaker>, Waker) {
        let counter = Arc::new(CountingWaker::default());
        (Arc::clone(&counter), Waker::from(counter))
    }

    #[test]
    fn shutdown_wakes_the_waker_a_connection_was_last_read_with() {
        let shutdown = CancellationToken::new();
        let mut watch = TokenWatch::child_of(&shutdown);
        let (first, first_waker) = counting();
        let (second, second_waker) = counting();
        assert!(!watch.fired(&mut Context::from_waker(&first_waker)));
        assert!(!watch.fired(&mut Context::from_waker(&first_waker)));
        assert!(!watch.fired(&mut Context::from_waker(&second_waker)));

        shutdown.cancel();
        assert_eq!(second.0.load(Relaxed), 1, "the waker seen last is woken");
        assert_eq!(first.0.load(Relaxed), 0, "a waker no longer in use is not");
        assert!(watch.fired(&mut Context::from_waker(&second_waker)));
        assert!(
            watch.fired(&mut Context::from_waker(&first_waker)),
            "and stays begun"
        );
    }

    #[test]
    fn a_connection_opened_after_shutdown_sees_it_at_once() {
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let mut watch = TokenWatch::child_of(&shutdown);
        let (_, waker) = counting();
        assert!(watch.fired(&mut Context::from_waker(&waker)));
    }
}
