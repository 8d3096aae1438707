//! Stop signals: SIGTERM (what Kubernetes and systemd send) and Ctrl-C.
//! The first asks for a graceful shutdown; one more during the drain or
//! the event queue's clean-up means stop now.
//!
//! The signals' streams are made once and kept: a stream made at each
//! wait would miss a signal that came between the two waits (the first
//! one's handling and the drain's start take a few milliseconds). Two
//! signals sent at the same instant still count as one: the kernel keeps
//! one pending signal of a kind, and the stream one notification.

use std::sync::LazyLock;

use futures::FutureExt;
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::Mutex,
};

/// The stop signals' streams, once made.
static STOPS: LazyLock<Mutex<Option<Stops>>> = LazyLock::new(Mutex::default);

struct Stops {
    term: Option<Signal>,
    interrupt: Option<Signal>,
}

impl Stops {
    fn new() -> Self {
        Self {
            term: signal(SignalKind::terminate()).ok(),
            interrupt: signal(SignalKind::interrupt()).ok(),
        }
    }
}

/// Takes the signals the broker handles over from their default actions,
/// first thing in `serve`: SIGTERM and Ctrl-C from then on ask for a
/// shutdown, and SIGHUP (which would end the process) waits for the reload
/// machinery, which takes it once the broker runs.
pub async fn install() {
    STOPS.lock().await.get_or_insert_with(Stops::new);
    // The handler stays once installed, whatever becomes of the stream.
    let _ = signal(SignalKind::hangup());
}

/// Completes on SIGTERM or Ctrl-C.
pub async fn shutdown_requested() {
    received().await;
    tracing::info!("shutdown requested; finishing calls in flight");
}

/// Completes on the next SIGTERM or Ctrl-C, counting one that came since
/// the last wait. Signals of both kinds that came with it count as it: a
/// Ctrl-C in a terminal reaches the broker and a wrapper that passes it on
/// as SIGTERM, and that is one request to stop, not two.
pub(crate) async fn received() {
    let mut stops = STOPS.lock().await;
    let stops = stops.get_or_insert_with(Stops::new);
    tokio::select! {
        () = next(&mut stops.term) => {},
        () = next(&mut stops.interrupt) => {},
    }
    for stream in [&mut stops.term, &mut stops.interrupt]
        .into_iter()
        .flatten()
    {
        let _ = stream.recv().now_or_never();
    }
}

async fn next(stream: &mut Option<Signal>) {
    match stream {
        Some(stream) => {
            stream.recv().await;
        }
        None => std::future::pending().await,
    }
}
