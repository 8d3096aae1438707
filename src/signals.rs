//! Stop signals: SIGTERM (what Kubernetes and systemd send) and Ctrl-C.
//! The first asks for a graceful shutdown; one more during the drain or
//! the event queue's clean-up means stop now.

/// Completes on SIGTERM or Ctrl-C.
pub async fn shutdown_requested() {
    received().await;
    tracing::info!("shutdown requested; finishing calls in flight");
}

/// Completes on the next SIGTERM or Ctrl-C.
pub(crate) async fn received() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
