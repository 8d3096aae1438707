//! Accepting connections: TCP (plaintext or mutual TLS) or a unix socket,
//! within bounds, until shutdown.
//!
//! One accept loop feeds tonic established connections. A connection is
//! handed over only once it has finished its TLS handshake (when TLS is on)
//! and sent the HTTP/2 client preface, both within `first_request_timeout`
//! of its accept: a peer that connects and says nothing is dropped instead
//! of holding a connection slot forever. Connections are established
//! concurrently, so one slow client cannot hold up the others.
//!
//! Each connection holds a slot of `max_connections`, taken at accept. When
//! none is free, a new connection takes the slot of the connection that has
//! been opening (handshake, preface) longest, which is closed
//! (`opening_slots`): peers that never finish a handshake cannot lock
//! callers out. Past the bound with every slot held by an established
//! connection, a new connection is closed at once. Each carries its
//! caller's identity and its call slots (`ConnectionInfo`), read once at the
//! handshake.
//!
//! At shutdown the accept loop ends and drops its socket at once (the port
//! can be bound again), connections still in their handshake or preface are
//! dropped, and an established connection with no call in flight and no
//! bytes read or written for `QUIET` reads as closed: hyper's graceful
//! HTTP/2 shutdown would otherwise wait for the answer to a PING that a
//! silent peer never sends. (A peer that sent something just now may have a
//! request on the wire, and an answer just written must reach its peer
//! first: those get the graceful path.)

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream, UnixListener, UnixStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc},
    time::{Instant, Sleep},
};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;

use super::{
    opening_slots::{OpeningClaim, OpeningSlots},
    peer_trust::PeerTrust,
    tls::{self, TlsTerminator},
    token_watch::TokenWatch,
    untaken_answers::PeriodTurns,
};
use crate::{config::Limits, identity::Identity, transport::connection_info::ConnectionInfo};

/// Delegates to the plain, TLS or unix stream.
macro_rules! by_transport {
    ($self:ident, $stream:ident => $call:expr) => {
        match &mut $self.stream {
            Transport::Plain($stream) => $call,
            Transport::Tls($stream) => $call,
            Transport::Unix($stream) => $call,
        }
    };
}

/// The HTTP/2 client preface every gRPC client sends first.
const PREFACE_LEN: usize = 24;

/// At shutdown, how long an idle connection must have been silent both ways
/// before it is closed without waiting for its peer.
const QUIET: Duration = Duration::from_millis(200);

/// What the listener counts, for the metrics.
#[derive(Debug, Default)]
pub struct ConnectionCounters {
    pub accepted: AtomicU64,
    /// Closed at once because `max_connections` were open.
    pub refused: AtomicU64,
    /// Closed while still opening, their slot taken by a newer connection
    /// because `max_connections` were open.
    pub displaced: AtomicU64,
    pub handshake_failures: AtomicU64,
    /// Dropped because their handshake and preface took longer than the
    /// first-request timeout.
    pub silent: AtomicU64,
}

/// A bound listening socket.
pub enum Bound {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// A freshly accepted socket.
enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Bound {
    async fn accept(&self) -> io::Result<(Socket, String)> {
        match self {
            Self::Tcp(listener) => {
                let (stream, remote) = listener.accept().await?;
                let _ = stream.set_nodelay(true);
                Ok((Socket::Tcp(stream), remote.to_string()))
            }
            Self::Unix(listener) => {
                let (stream, _) = listener.accept().await?;
                Ok((Socket::Unix(stream), "unix socket".to_owned()))
            }
        }
    }
}

/// The established connections, and the accept loop that makes them (to
/// be run by the caller; it ends when `shutdown` is cancelled, dropping the
/// listening socket).
pub fn incoming(
    listener: Bound,
    tls: Option<Arc<TlsTerminator>>,
    limits: Limits,
    counters: Arc<ConnectionCounters>,
    shutdown: CancellationToken,
) -> (
    ReceiverStream<io::Result<Connection>>,
    impl Future<Output = ()> + Send + 'static,
) {
    let (established, incoming) = mpsc::channel(64);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let opening_slots = OpeningSlots::default();
    let accept_loop = async move {
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => break,
                () = established.closed() => break,
                accepted = listener.accept() => accepted,
            };
            let (socket, remote) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: wait, retry.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let slot = match Arc::clone(&slots).try_acquire_owned() {
                Ok(slot) => slot,
                Err(_) => match opening_slots.displace_oldest() {
                    Some(slot) => slot,
                    None => {
                        counters.refused.fetch_add(1, Relaxed);
                        tracing::warn!(%remote, max_connections = limits.max_connections, "connection refused: too many open");
                        continue;
                    }
                },
            };
            counters.accepted.fetch_add(1, Relaxed);
            let claim = opening_slots.hold(slot);
            let displaced = claim.on_displaced();
            let opening = Opening {
                remote,
                claim,
                limits,
                tls: tls.clone(),
                counters: Arc::clone(&counters),
                shutdown: shutdown.clone(),
            };
            let established = established.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let remote = opening.remote.clone();
                let counters = Arc::clone(&opening.counters);
                let connection = tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = displaced => {
                        counters.displaced.fetch_add(1, Relaxed);
                        tracing::warn!(%remote, max_connections = limits.max_connections, "connection dropped while opening: every slot was taken, and it had been opening longest");
                        return;
                    }
                    connection = opening.establish_in_time(socket) => connection,
                };
                if let Some(connection) = connection {
                    let _ = established.send(Ok(connection)).await;
                }
            });
        }
        // The listening socket is dropped here, before any drain.
    };
    (ReceiverStream::new(incoming), accept_loop)
}

/// A connection let in, on its way to being handed over.
struct Opening {
    remote: String,
    claim: OpeningClaim,
    limits: Limits,
    tls: Option<Arc<TlsTerminator>>,
    counters: Arc<ConnectionCounters>,
    shutdown: CancellationToken,
}

impl Opening {
    /// `establish` within the first-request timeout.
    async fn establish_in_time(self, socket: Socket) -> Option<Connection> {
        let timeout = self.limits.first_request_timeout;
        let counters = Arc::clone(&self.counters);
        let remote = self.remote.clone();
        match tokio::time::timeout(timeout, self.establish(socket)).await {
            Ok(connection) => connection,
            Err(_) => {
                counters.silent.fetch_add(1, Relaxed);
                tracing::info!(%remote, ?timeout, "connection dropped: no TLS handshake and HTTP/2 preface in time");
                None
            }
        }
    }

    /// The TLS handshake (when on), then the preface. `None`: dropped, and
    /// why is logged.
    async fn establish(self, socket: Socket) -> Option<Connection> {
        let (stream, identity, trust) = match (socket, &self.tls) {
            (Socket::Tcp(stream), Some(tls)) => match self.handshake(tls, stream).await {
                Ok(established) => established,
                Err(reason) => {
                    self.counters.handshake_failures.fetch_add(1, Relaxed);
                    tracing::info!(remote = %self.remote, %reason, "TLS handshake refused");
                    return None;
                }
            },
            (Socket::Tcp(stream), None) => (Transport::Plain(stream), Identity::Anonymous, None),
            (Socket::Unix(stream), _) => (Transport::Unix(stream), Identity::Anonymous, None),
        };
        let (stream, replay) = match read_preface(stream).await {
            Ok(read) => read,
            Err(error) => {
                tracing::debug!(remote = %self.remote, %error, "connection closed before its first request");
                return None;
            }
        };
        // `None`: displaced just now, its slot already given to a newer one.
        let slot = self.claim.establish()?;
        let info = ConnectionInfo::new(identity, self.limits.max_calls_per_connection);
        let answers = PeriodTurns::new(Arc::clone(&info.untaken_answers), self.limits.call_timeout);
        Some(Connection {
            stream,
            replay,
            info,
            answers,
            max_calls: self.limits.max_calls_per_connection,
            shutdown: TokenWatch::child_of(&self.shutdown),
            trust,
            traffic: false,
            last_traffic: Instant::now(),
            idle_since: None,
            quiet: None,
            _slot: slot,
        })
    }

    async fn handshake(
        &self,
        tls: &Arc<TlsTerminator>,
        stream: TcpStream,
    ) -> Result<(Transport, Identity, Option<PeerTrust>), String> {
        let (acceptor, generation) = tls.acceptor();
        match acceptor.accept(stream).await {
            Ok(stream) => {
                let identity = tls::peer_identity(&stream);
                let trust = PeerTrust::new(tls, &stream, &generation);
                tracing::debug!(remote = %self.remote, identity = identity.shown(), "TLS connection established");
                Ok((Transport::Tls(Box::new(stream)), identity, trust))
            }
            Err(error) => Err(handshake_refusal(&error)),
        }
    }
}

/// Why a handshake failed, in words: rustls shows a certificate error of
/// the broker's own checks (`client_cas::ClientCheck`) as Rust debug text.
fn handshake_refusal(error: &io::Error) -> String {
    match error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other))) => {
            format!("invalid peer certificate: {}", other.0)
        }
        _ => error.to_string(),
    }
}

/// An established connection, its caller, and its slot (freed on drop).
pub struct Connection {
    stream: Transport,
    /// What was read to see the preface, given to hyper first.
    replay: Vec<u8>,
    info: ConnectionInfo,
    /// Closes it when its peer leaves answers untaken (`untaken_answers`).
    answers: PeriodTurns,
    max_calls: usize,
    shutdown: TokenWatch,
    /// A TLS client's certificate, checked again as it expires and at TLS
    /// reloads (`peer_trust`).
    trust: Option<PeerTrust>,
    /// Bytes went either way since `last_traffic` was set. Every read and
    /// write notes it; the clock is read only once shutdown has begun.
    traffic: bool,
    /// When traffic was last seen (no earlier than it happened).
    last_traffic: Instant,
    /// Since when the connection has had no call, once stopped.
    idle_since: Option<Instant>,
    /// Wakes the connection when its peer has been quiet long enough.
    quiet: Option<Pin<Box<Sleep>>>,
    _slot: OwnedSemaphorePermit,
}

enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    Unix(UnixStream),
}

/// Reads what should be the HTTP/2 preface, to be given to hyper first
/// (hyper checks it).
async fn read_preface(mut stream: Transport) -> io::Result<(Transport, Vec<u8>)> {
    let mut preface = [0u8; PREFACE_LEN];
    let mut read = 0;
    while read < PREFACE_LEN {
        let n = match &mut stream {
            Transport::Plain(s) => s.read(&mut preface[read..]).await,
            Transport::Tls(s) => s.read(&mut preface[read..]).await,
            Transport::Unix(s) => s.read(&mut preface[read..]).await,
        }?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        read += n;
    }
    Ok((stream, preface.to_vec()))
}

impl Connection {
    fn note_written(&mut self, written: &Poll<io::Result<usize>>) {
        if let Poll::Ready(Ok(n)) = written
            && *n > 0
        {
            self.traffic = true;
        }
    }

    /// After shutdown, a connection with no call in flight and no traffic
    /// for `QUIET` is done.
    fn closing(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.shutdown.fired(cx) || self.info.call_slots.available_permits() != self.max_calls {
            self.idle_since = None;
            return false;
        }
        // Traffic is timed when it is first seen here, at or after it
        // happened: the wait can only come out longer, never shorter.
        let now = Instant::now();
        if std::mem::take(&mut self.traffic) {
            self.last_traffic = now;
        }
        // The last call's answer may still sit in hyper's buffers: it gets
        // written (and counts as traffic) before the connection is closed.
        let idle_since = *self.idle_since.get_or_insert(now);
        let quiet_at = self.last_traffic.max(idle_since) + QUIET;
        if now >= quiet_at {
            return true;
        }
        let timer = self
            .quiet
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(quiet_at)));
        timer.as_mut().reset(quiet_at);
        // Registers the wake-up; closing is decided when it comes.
        let _ = timer.as_mut().poll(cx);
        false
    }
}

impl Connected for Connection {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.closing(cx) {
            tracing::debug!("idle connection closed at shutdown");
            // End of stream: hyper closes the connection.
            return Poll::Ready(Ok(()));
        }
        let Self {
            trust,
            info,
            answers,
            ..
        } = &mut *self;
        if answers.stalled(cx) {
            tracing::warn!(
                identity = info.identity.shown(),
                call_timeout = ?answers.period(),
                "connection closed: its peer left answers untaken past the call timeout (a stream window it never opens)"
            );
            let error = io::Error::new(io::ErrorKind::TimedOut, "answers left untaken");
            return Poll::Ready(Err(error));
        }
        if let Some(untrusted) = trust
            .as_mut()
            .and_then(|trust| trust.lost(cx, &info.identity))
        {
            // An error: hyper drops the connection and every stream on it.
            let error = io::Error::new(io::ErrorKind::PermissionDenied, untrusted.reason());
            return Poll::Ready(Err(error));
        }
        if !self.replay.is_empty() {
            let n = buf.remaining().min(self.replay.len());
            buf.put_slice(&self.replay[..n]);
            self.replay.drain(..n);
            return Poll::Ready(Ok(()));
        }
        let filled = buf.filled().len();
        let read = by_transport!(self, s => Pin::new(s).poll_read(cx, buf));
        if buf.filled().len() > filled {
            self.traffic = true;
        }
        read
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = by_transport!(self, s => Pin::new(s).poll_write(cx, buf));
        self.note_written(&written);
        written
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        by_transport!(self, s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        by_transport!(self, s => Pin::new(s).poll_shutdown(cx))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = by_transport!(self, s => Pin::new(s).poll_write_vectored(cx, bufs));
        self.note_written(&written);
        written
    }

    /// Reported as not vectored, on purpose: h2 then copies DATA frames of
    /// up to 1 KiB into its write buffer (256 bytes when vectored) instead
    /// of chaining them, and it chains one frame at a time. A secret's
    /// answer is usually a few hundred bytes: chained, its trailers wait
    /// for a second write, one more syscall per call; copied, headers, data
    /// and trailers leave in one write. (Measured with scripts/bench.sh.)
    fn is_write_vectored(&self) -> bool {
        false
    }
}

impl ConnectionCounters {
    /// Registers the listener's metrics.
    pub fn register_metrics(self: &Arc<Self>, metrics: &crate::metrics::Metrics) {
        use crate::metrics::counter;
        let connections = Arc::clone(self);
        metrics.register_state(move |e| {
            counter(
                e,
                "connections_accepted",
                "Connections accepted",
                connections.accepted.load(Relaxed),
            )?;
            counter(
                e,
                "connections_refused",
                "Connections closed at once: too many open",
                connections.refused.load(Relaxed),
            )?;
            counter(
                e,
                "connections_displaced",
                "Connections closed while still opening: every slot was taken, and a newer connection took theirs",
                connections.displaced.load(Relaxed),
            )?;
            counter(
                e,
                "tls_handshake_failures",
                "TLS handshakes refused or timed out",
                connections.handshake_failures.load(Relaxed),
            )?;
            counter(
                e,
                "connections_silent",
                "Connections dropped: no HTTP/2 preface within the first-request timeout",
                connections.silent.load(Relaxed),
            )?;
            Ok(())
        });
    }
}
