//! Stop signals: SIGTERM (what Kubernetes and systemd send) and Ctrl-C.
//! The first asks for a graceful shutdown; one more during the drain or
//! the event queue's clean-up means stop now.
//!
//! The signals' streams are made once and kept: a stream made at each
//! wait would miss a signal that came between the two waits (the first
//! one's handling and the drain's start take a few milliseconds). Signals
//! within half a second of the first are the same request (`ONE_REQUEST`).

use std::{
    sync::LazyLock,
    time::{Duration, Instant},
};

use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::Mutex,
};

/// Signals this soon after the first are the same request to stop: a
/// terminal's Ctrl-C reaches the broker and a wrapper (a shell entry
/// point, make, npm) that passes it on as SIGTERM a moment later.
const ONE_REQUEST: Duration = Duration::from_millis(500);

/// The stop signals' streams, once made.
static STOPS: LazyLock<Mutex<Option<Stops>>> = LazyLock::new(Mutex::default);

struct Stops {
    term: Option<Signal>,
    interrupt: Option<Signal>,
    /// When the first stop signal came.
    first: Option<Instant>,
}

impl Stops {
    fn new() -> Self {
        Self {
            term: signal(SignalKind::terminate()).ok(),
            interrupt: signal(SignalKind::interrupt()).ok(),
            first: None,
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
/// the last wait, but not one within `ONE_REQUEST` of the first.
pub(crate) async fn received() {
    let mut stops = STOPS.lock().await;
    let stops = stops.get_or_insert_with(Stops::new);
    loop {
        tokio::select! {
            () = next(&mut stops.term) => {},
            () = next(&mut stops.interrupt) => {},
        }
        match stops.first {
            None => {
                stops.first = Some(Instant::now());
                return;
            }
            Some(first) if first.elapsed() >= ONE_REQUEST => return,
            Some(_) => {}
        }
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
