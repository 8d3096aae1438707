//! An open TLS connection's client stays trusted only while its
//! certificate would still pass a handshake: the connection is closed when
//! the certificate expires, or when a TLS reload (a CA taken out of the
//! client CA bundle) makes the check fail. Without this, a connection
//! opened before either could go on reading secrets, and its watches
//! receiving rotated values, for as long as keepalives hold it open.
//!
//! The connection asks on every read (`Connection::poll_read`): a flag,
//! the expiry timer's state, and the reload token (`TokenWatch`); the timer
//! and the token are polled, to be woken, only when the task's waker
//! changes.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Waker},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rustls::pki_types::CertificateDer;
use tokio::{net::TcpStream, time::Sleep};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use x509_parser::prelude::FromDer;

use super::{tls::TlsTerminator, token_watch::TokenWatch};
use crate::identity::Identity;

/// The longest single sleep: the timer is set again when it ends before
/// the certificate does (tokio's timer does not reach years ahead).
const LONGEST_SLEEP: Duration = Duration::from_secs(30 * 24 * 3600);

/// Why a connection's client is no longer trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Untrusted {
    Expired,
    NotVerifiedAfterReload,
}

impl Untrusted {
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Self::Expired => "the client certificate has expired",
            Self::NotVerifiedAfterReload => {
                "the client certificate no longer passes the TLS config reloaded since the handshake"
            }
        }
    }
}

/// See the module doc.
pub(crate) struct PeerTrust {
    tls: Arc<TlsTerminator>,
    chain: Vec<CertificateDer<'static>>,
    /// The earliest end of validity in the chain, Unix seconds.
    not_after: i64,
    expires: Pin<Box<Sleep>>,
    /// The waker `expires` holds.
    registered: Option<Waker>,
    reloads: TokenWatch,
    lost: Option<Untrusted>,
}

impl PeerTrust {
    /// The trust of a connection just accepted under the config whose
    /// reloads cancel `generation`.
    pub(crate) fn new(
        tls: &Arc<TlsTerminator>,
        stream: &TlsStream<TcpStream>,
        generation: &CancellationToken,
    ) -> Option<Self> {
        let chain: Vec<CertificateDer<'static>> = stream
            .get_ref()
            .1
            .peer_certificates()?
            .iter()
            .map(|der| der.clone().into_owned())
            .collect();
        let not_after = chain
            .iter()
            .filter_map(|der| {
                x509_parser::certificate::X509Certificate::from_der(der)
                    .ok()
                    .map(|(_, cert)| cert.validity().not_after.timestamp())
            })
            .min()
            // A chain rustls verified but x509-parser cannot read: no
            // expiry to follow, the reload checks still apply.
            .unwrap_or(i64::MAX);
        Some(Self {
            tls: Arc::clone(tls),
            chain,
            not_after,
            expires: Box::pin(tokio::time::sleep(until(not_after))),
            registered: None,
            reloads: TokenWatch::child_of(generation),
            lost: None,
        })
    }

    /// Why the client is no longer trusted, if it is not; the first time,
    /// the audit says so. Otherwise the task of `cx` is woken when that
    /// may change.
    pub(crate) fn lost(&mut self, cx: &mut Context<'_>, identity: &Identity) -> Option<Untrusted> {
        if self.lost.is_some() {
            return self.lost;
        }
        let lost = self.expired(cx).or_else(|| self.reloaded(cx));
        if let Some(why) = lost {
            tracing::info!(
                target: "audit",
                identity = identity.shown(),
                outcome = "UNAUTHENTICATED",
                reason = why.reason(),
                "connection closed"
            );
            self.lost = lost;
        }
        lost
    }

    fn expired(&mut self, cx: &mut Context<'_>) -> Option<Untrusted> {
        // The first read: a timer already due can still be pending on its
        // first poll, and the first call would be served.
        if self.registered.is_none() && unix_now() > self.not_after {
            return Some(Untrusted::Expired);
        }
        let registered = self
            .registered
            .as_ref()
            .is_some_and(|waker| waker.will_wake(cx.waker()));
        if !self.expires.is_elapsed() && registered {
            return None;
        }
        if self.expires.as_mut().poll(cx).is_pending() {
            self.registered = Some(cx.waker().clone());
            return None;
        }
        if unix_now() > self.not_after {
            return Some(Untrusted::Expired);
        }
        // A long sleep ended before the certificate: set it again.
        let deadline = tokio::time::Instant::now() + until(self.not_after);
        self.expires.as_mut().reset(deadline);
        let _ = self.expires.as_mut().poll(cx);
        self.registered = Some(cx.waker().clone());
        None
    }

    fn reloaded(&mut self, cx: &mut Context<'_>) -> Option<Untrusted> {
        // One reload at a time: the token in force is fresh once a reload
        // has cancelled the one before it.
        while self.reloads.fired(cx) {
            match self.tls.verify_client(&self.chain) {
                Ok(generation) => self.reloads = TokenWatch::child_of(&generation),
                Err(_) => return Some(Untrusted::NotVerifiedAfterReload),
            }
        }
        None
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs() as i64)
}

/// How long until just after `not_after` (its last valid second), at most
/// `LONGEST_SLEEP`.
fn until(not_after: i64) -> Duration {
    let seconds = not_after
        .saturating_sub(unix_now())
        .saturating_add(1)
        .max(0) as u64;
    Duration::from_secs(seconds).min(LONGEST_SLEEP)
}
