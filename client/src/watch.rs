//! `watch_secret`: a stream of a secret's changes that survives broker
//! restarts.
//!
//! A task of its own holds the gRPC stream and feeds a channel. When the
//! stream breaks (broker restart, connection lost, the broker's shutdown
//! UNAVAILABLE) it reconnects with backoff and tells the broker the
//! version it last saw (`since_version_id`, `since_arn`): a rotation
//! missed meanwhile comes back as ROTATED, and an unchanged secret's
//! CURRENT is not repeated.
//! Errors a retry cannot fix end the stream. Dropping the stream ends the
//! task at once, and with it the stream on the broker (which would
//! otherwise hold one of the connection's streams until the secret next
//! changed).

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use futures::Stream;
use tokio::sync::mpsc;
use tonic::{Code, transport::Channel};
use tonic_types::StatusExt;

use crate::{
    Error, SecretValue,
    proto::{self, secrets_service_client::SecretsServiceClient},
};

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What happened to a watched secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchEventKind {
    /// The state when the stream started.
    Current,
    /// The watched stage moved to another version.
    Rotated,
    /// The secret was deleted (the event carries metadata, no value); for
    /// a stage other than AWSCURRENT, also that stage's label removed.
    Deleted,
    /// Back after `Deleted`: the secret restored, a secret created again
    /// under the name (another ARN: `SecretValue::arn`), or the stage
    /// naming a version again.
    Restored,
}

/// One event of a watch stream.
#[derive(Debug, Clone)]
pub struct WatchEvent {
    /// What happened.
    pub kind: WatchEventKind,
    /// The secret's state after it.
    pub secret: SecretValue,
    /// When the broker saw it.
    pub observed_at: Option<SystemTime>,
}

/// The stream `SecretsClient::watch_secret` returns.
pub struct WatchStream {
    events: mpsc::Receiver<Result<WatchEvent, Error>>,
    connected: tokio::sync::watch::Receiver<bool>,
    failure: Arc<Mutex<Option<Error>>>,
}

impl WatchStream {
    /// Whether a stream to the broker is open now: `true` from its first
    /// message until it breaks, `false` while it reconnects (events missed
    /// meanwhile arrive once it is back). Wait for changes with
    /// `changed()`; the sender goes when the stream ends.
    pub fn connected(&self) -> tokio::sync::watch::Receiver<bool> {
        self.connected.clone()
    }

    /// Why the last attempt to open the stream, or the last open stream,
    /// failed (broker unreachable, TLS refused, the broker restarting...):
    /// the stream is retried after such failures, so they are not events.
    /// Set before `connected` turns `false`. Once the stream has ended
    /// with an error (not found, access denied), that error.
    pub fn last_failure(&self) -> Option<Error> {
        lock(&self.failure).clone()
    }
}

impl Stream for WatchStream {
    type Item = Result<WatchEvent, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.events.poll_recv(cx)
    }
}

/// Where a watch's streams go, and how its failures are told.
pub(crate) struct Origin {
    pub(crate) client: SecretsServiceClient<Channel>,
    /// As configured, for errors that name it.
    pub(crate) endpoint: Arc<str>,
    pub(crate) tls: bool,
}

/// Follows `name` at `stage` in a task of its own, until the stream
/// returned is dropped or a final error ends it.
pub(crate) fn follow(origin: Origin, name: String, stage: String) -> WatchStream {
    let (events, receiver) = mpsc::channel(16);
    let (live, connected) = tokio::sync::watch::channel(false);
    let failure = Arc::new(Mutex::new(None));
    let follower = Follower {
        origin,
        name,
        stage,
        events,
        live,
        failure: Arc::clone(&failure),
    };
    tokio::spawn(follower.run());
    WatchStream {
        events: receiver,
        connected,
        failure,
    }
}

struct Follower {
    origin: Origin,
    name: String,
    stage: String,
    events: mpsc::Sender<Result<WatchEvent, Error>>,
    live: tokio::sync::watch::Sender<bool>,
    failure: Arc<Mutex<Option<Error>>>,
}

/// Why one connection's stream ended.
enum Ended {
    /// Reconnect.
    Broken,
    /// Stop: the receiver is gone, or the error is final.
    Done,
}

impl Follower {
    /// Follows until the receiver goes or a final error: whichever comes
    /// first, even in the middle of a stream (dropping the gRPC stream
    /// cancels it on the broker).
    async fn run(self) {
        let receiver_gone = self.events.clone();
        tokio::select! {
            () = self.follow() => {}
            () = receiver_gone.closed() => {}
        }
    }

    async fn follow(mut self) {
        // The (version id, ARN) last delivered.
        let mut last_version: Option<(String, String)> = None;
        let mut last_kind: Option<WatchEventKind> = None;
        let mut backoff = FIRST_BACKOFF;
        loop {
            let ended = self
                .stream_once(&mut last_version, &mut last_kind, &mut backoff)
                .await;
            self.live.send_replace(false);
            match ended {
                Ended::Done => return,
                Ended::Broken => {}
            }
            if self.events.is_closed() {
                return;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// One connection: subscribe, forward events until the stream ends.
    async fn stream_once(
        &mut self,
        last_version: &mut Option<(String, String)>,
        last_kind: &mut Option<WatchEventKind>,
        backoff: &mut Duration,
    ) -> Ended {
        let reconnecting = last_version.is_some();
        let (since_version_id, since_arn) = last_version.clone().unwrap_or_default();
        let request = proto::WatchSecretRequest {
            name: self.name.clone(),
            version_stage: self.stage.clone(),
            since_version_id,
            since_arn,
        };
        let mut stream = match self.origin.client.watch_secret(request).await {
            Ok(response) => response.into_inner(),
            Err(status) => return self.fail(status).await,
        };
        let mut first = true;
        loop {
            match stream.message().await {
                Ok(Some(message)) => {
                    *backoff = FIRST_BACKOFF;
                    lock(&self.failure).take();
                    self.live.send_replace(true);
                    let mut event = event(message);
                    let repeat = first && reconnecting && resumed(&mut event, *last_kind);
                    first = false;
                    // A repeat is not taken: the version held stays the one
                    // to resume from.
                    if repeat {
                        continue;
                    }
                    *last_version = Some((
                        event.secret.version_id().to_owned(),
                        event.secret.arn().to_owned(),
                    ));
                    *last_kind = Some(event.kind);
                    if self.events.send(Ok(event)).await.is_err() {
                        return Ended::Done;
                    }
                }
                Ok(None) => {
                    *lock(&self.failure) = Some(Error::Unavailable {
                        reason: String::new(),
                        message: "the broker ended the stream".into(),
                    });
                    return Ended::Broken;
                }
                Err(status) => return self.fail(status).await,
            }
        }
    }

    /// Retried failures come back as `Broken` (and are kept for
    /// `last_failure`); the others end the stream.
    async fn fail(&self, status: tonic::Status) -> Ended {
        let retry = retried(&status);
        let error = Error::from_call(status, &self.origin.endpoint, self.origin.tls);
        // Kept either way: after a final error, an earlier retried one
        // would be the wrong answer to "why".
        *lock(&self.failure) = Some(error.clone());
        if retry {
            return Ended::Broken;
        }
        let _ = self.events.send(Err(error)).await;
        Ended::Done
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The first event after a reconnect, against the last one delivered:
/// whether it repeats what the receiver knows (CURRENT: nothing missed; a
/// DELETED again). A secret last known deleted and there now was restored
/// or created again meanwhile (the broker says ROTATED when the version
/// is not the one the deletion was told with): it is told as RESTORED,
/// as on a live stream.
fn resumed(event: &mut WatchEvent, last_kind: Option<WatchEventKind>) -> bool {
    let was_deleted = last_kind == Some(WatchEventKind::Deleted);
    match event.kind {
        WatchEventKind::Current | WatchEventKind::Rotated if was_deleted => {
            event.kind = WatchEventKind::Restored;
            false
        }
        WatchEventKind::Current => true,
        WatchEventKind::Deleted => was_deleted,
        WatchEventKind::Rotated | WatchEventKind::Restored => false,
    }
}

/// Connection-level failures are retried, and so is a broker that has as
/// many calls or watches as it allows (`TOO_MANY_CALLS`: calls end, places
/// come back); anything else would fail again the same way.
fn retried(status: &tonic::Status) -> bool {
    match status.code() {
        Code::Unavailable
        | Code::Unknown
        | Code::Internal
        | Code::Cancelled
        | Code::DeadlineExceeded => true,
        Code::ResourceExhausted => status
            .get_details_error_info()
            .is_some_and(|info| info.reason == "TOO_MANY_CALLS"),
        _ => false,
    }
}

fn event(message: proto::WatchSecretResponse) -> WatchEvent {
    let kind = match proto::WatchEventType::try_from(message.r#type) {
        Ok(proto::WatchEventType::Rotated) => WatchEventKind::Rotated,
        Ok(proto::WatchEventType::Deleted) => WatchEventKind::Deleted,
        Ok(proto::WatchEventType::Restored) => WatchEventKind::Restored,
        _ => WatchEventKind::Current,
    };
    WatchEvent {
        kind,
        secret: SecretValue::from_proto(message.secret.unwrap_or_default()),
        observed_at: message
            .observed_at
            .and_then(|t| SystemTime::try_from(t).ok()),
    }
}

#[cfg(test)]
mod tests {
    use tonic_types::{ErrorDetails, StatusExt};

    use super::*;

    fn refused(reason: &str) -> tonic::Status {
        let details = ErrorDetails::with_error_info(reason, "secretsbroker", []);
        tonic::Status::with_error_details(Code::ResourceExhausted, "refused", details)
    }

    fn event_of(kind: WatchEventKind) -> WatchEvent {
        WatchEvent {
            kind,
            secret: SecretValue::from_proto(proto::Secret::default()),
            observed_at: None,
        }
    }

    #[test]
    fn after_a_reconnect_only_news_is_told_and_a_restore_as_restored() {
        use WatchEventKind::*;
        for (last, first, told) in [
            (Some(Current), Current, None),
            (Some(Rotated), Current, None),
            (Some(Current), Rotated, Some(Rotated)),
            (Some(Deleted), Current, Some(Restored)),
            (Some(Deleted), Deleted, None),
            (Some(Current), Deleted, Some(Deleted)),
            (Some(Deleted), Rotated, Some(Restored)),
            (Some(Deleted), Restored, Some(Restored)),
        ] {
            let mut event = event_of(first);
            let repeat = resumed(&mut event, last);
            assert_eq!(
                (!repeat).then_some(event.kind),
                told,
                "{last:?} then {first:?}"
            );
        }
    }

    #[test]
    fn a_full_broker_is_retried_and_a_request_too_large_is_not() {
        assert!(retried(&refused("TOO_MANY_CALLS")));
        assert!(!retried(&refused("MESSAGE_TOO_LARGE")));
        assert!(!retried(&tonic::Status::resource_exhausted("no details")));
        assert!(retried(&tonic::Status::unavailable("restarting")));
        assert!(!retried(&tonic::Status::permission_denied("no grant")));
    }
}
