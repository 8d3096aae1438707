//! Accepting connections: TCP, plaintext or mutual TLS, within a bound.
//!
//! One accept loop feeds tonic established connections. Handshakes run
//! concurrently (one slow client cannot hold up the others) under a
//! timeout. Each connection holds a slot of `max_connections`; past the
//! bound a new connection is closed at once, so a flood of clients cannot
//! exhaust file descriptors or memory. Each connection carries its caller's
//! identity (`ConnectionInfo`), read once at the handshake.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc},
};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::{
    identity::{ConnectionInfo, Identity},
    tls::{self, TlsTerminator},
};

/// A client that does not finish its handshake in this time is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the listener counts, for the metrics.
#[derive(Debug, Default)]
pub struct ConnectionCounters {
    pub accepted: AtomicU64,
    /// Closed at once because `max_connections` were open.
    pub refused: AtomicU64,
    pub handshake_failures: AtomicU64,
}

/// The bounds the listener applies.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub max_calls_per_connection: usize,
}

/// Accepts connections on `tcp` until tonic stops reading them.
pub fn incoming(
    tcp: TcpListener,
    tls: Option<Arc<TlsTerminator>>,
    limits: ConnectionLimits,
    counters: Arc<ConnectionCounters>,
) -> ReceiverStream<io::Result<Connection>> {
    let max_connections = limits.max_connections;
    let (established, incoming) = mpsc::channel(64);
    let slots = Arc::new(Semaphore::new(max_connections));
    tokio::spawn(async move {
        while !established.is_closed() {
            let (stream, remote) = match tcp.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: wait, retry.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                counters.refused.fetch_add(1, Relaxed);
                tracing::warn!(%remote, max_connections, "connection refused: too many open");
                continue;
            };
            counters.accepted.fetch_add(1, Relaxed);
            let _ = stream.set_nodelay(true);
            let established = established.clone();
            let tls = tls.clone();
            let counters = Arc::clone(&counters);
            tokio::spawn(async move {
                let accepted = Accepted {
                    remote,
                    slot,
                    call_slots: Arc::new(Semaphore::new(limits.max_calls_per_connection)),
                };
                let connection = match tls {
                    None => Ok(Connection::plain(stream, accepted)),
                    Some(tls) => handshake(&tls, stream, accepted).await,
                };
                match connection {
                    Ok(connection) => {
                        let _ = established.send(Ok(connection)).await;
                    }
                    Err(reason) => {
                        counters.handshake_failures.fetch_add(1, Relaxed);
                        tracing::info!(%remote, %reason, "TLS handshake refused");
                    }
                }
            });
        }
    });
    ReceiverStream::new(incoming)
}

/// A TCP connection let in, before its handshake.
struct Accepted {
    remote: SocketAddr,
    slot: OwnedSemaphorePermit,
    call_slots: Arc<Semaphore>,
}

async fn handshake(
    tls: &TlsTerminator,
    stream: TcpStream,
    accepted: Accepted,
) -> Result<Connection, String> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.acceptor().accept(stream)).await {
        Ok(Ok(stream)) => {
            let identity = tls::peer_identity(&stream);
            tracing::debug!(remote = %accepted.remote, %identity, "TLS connection established");
            Ok(Connection::new(
                Transport::Tls(Box::new(stream)),
                identity,
                accepted,
            ))
        }
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

/// An accepted connection, its caller, and its slot (freed on drop).
pub struct Connection {
    stream: Transport,
    info: ConnectionInfo,
    _slot: OwnedSemaphorePermit,
}

enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Connection {
    fn new(stream: Transport, identity: Identity, accepted: Accepted) -> Self {
        Self {
            stream,
            info: ConnectionInfo {
                identity,
                call_slots: accepted.call_slots,
            },
            _slot: accepted.slot,
        }
    }

    fn plain(stream: TcpStream, accepted: Accepted) -> Self {
        Self::new(Transport::Plain(stream), Identity::Anonymous, accepted)
    }
}

impl Connected for Connection {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

/// Delegates to the plain or TLS stream.
macro_rules! by_transport {
    ($self:ident, $stream:ident => $call:expr) => {
        match &mut $self.stream {
            Transport::Plain($stream) => $call,
            Transport::Tls($stream) => $call,
        }
    };
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        by_transport!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        by_transport!(self, s => Pin::new(s).poll_write(cx, buf))
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
        by_transport!(self, s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            Transport::Plain(s) => s.is_write_vectored(),
            Transport::Tls(s) => s.is_write_vectored(),
        }
    }
}
