//! The listener of the probes and metrics endpoint (`--metrics-listen`),
//! with bounds of its own: at most `MAX_CONNECTIONS` open, and none open
//! longer than `LIFETIME`, whatever it does. Without them, sockets opened
//! and left idle on this port would use up the process's file descriptors
//! (and then the gRPC listener could accept nothing either), and 64 sockets
//! trickling a byte every few seconds, or never reading their answers,
//! would hold the port so that every probe failed and the kubelet
//! restarted a healthy pod.
//!
//! When every slot is taken, a new connection takes the slot of the oldest
//! (which is closed): a probe connects, asks and is answered within
//! milliseconds, so to keep it out a peer would have to open 64 connections
//! in that time. Prometheus and the kubelet open a connection again when
//! theirs was closed.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
    time::Sleep,
};
use tokio_util::sync::WaitForCancellationFutureOwned;

use super::opening_slots::{OpeningClaim, OpeningSlots};

/// Connections open at once on the probe port.
pub const MAX_CONNECTIONS: usize = 64;
/// The longest a probe connection stays open.
pub const LIFETIME: Duration = Duration::from_secs(10);

/// A bounded listener for `axum::serve`.
pub struct ProbeListener {
    listener: TcpListener,
    free: Arc<Semaphore>,
    /// Every open connection, oldest first: none is ever 'established'.
    open: OpeningSlots,
    lifetime: Duration,
}

impl ProbeListener {
    pub fn new(listener: TcpListener) -> Self {
        Self::with_bounds(listener, MAX_CONNECTIONS, LIFETIME)
    }

    fn with_bounds(listener: TcpListener, connections: usize, lifetime: Duration) -> Self {
        Self {
            listener,
            free: Arc::new(Semaphore::new(connections)),
            open: OpeningSlots::default(),
            lifetime,
        }
    }
}

impl axum::serve::Listener for ProbeListener {
    type Io = ProbeConnection;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (stream, remote) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of descriptors, say: wait rather than spin.
                    tracing::debug!(%error, "probe endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let slot = match Arc::clone(&self.free).try_acquire_owned() {
                Ok(slot) => slot,
                Err(_) => match self.open.displace_oldest() {
                    Some(slot) => slot,
                    None => continue,
                },
            };
            let claim = self.open.hold(slot);
            let displaced = Box::pin(claim.on_displaced());
            let connection = ProbeConnection {
                stream,
                _claim: claim,
                displaced,
                ends: Box::pin(tokio::time::sleep(self.lifetime)),
            };
            return (connection, remote);
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

/// A probe connection: its slot, and when it must close.
pub struct ProbeConnection {
    stream: TcpStream,
    _claim: OpeningClaim,
    displaced: Pin<Box<WaitForCancellationFutureOwned>>,
    ends: Pin<Box<Sleep>>,
}

impl ProbeConnection {
    /// An error once the connection has lived its time or lost its slot;
    /// until then the task of `cx` is woken when either happens, so that a
    /// read or a write that waits forever is ended too.
    fn over(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        if self.ends.as_mut().poll(cx).is_ready() {
            return Some(io::Error::new(
                io::ErrorKind::TimedOut,
                "probe connection lifetime",
            ));
        }
        if self.displaced.as_mut().poll(cx).is_ready() {
            return Some(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "probe connection displaced by a newer one",
            ));
        }
        None
    }
}

impl AsyncRead for ProbeConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(error) = self.over(cx) {
            return Poll::Ready(Err(error));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for ProbeConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if let Some(error) = self.over(cx) {
            return Poll::Ready(Err(error));
        }
        Pin::new(&mut self.stream).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(error) = self.over(cx) {
            return Poll::Ready(Err(error));
        }
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn served(listener: ProbeListener) -> SocketAddr {
        let addr = listener.listener.local_addr().unwrap();
        let app = axum::Router::new().route("/healthz", axum::routing::get(|| async { "ok\n" }));
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    /// Whether the peer closed `socket` within `within`.
    async fn closed(socket: &mut TcpStream, within: Duration) -> bool {
        let mut byte = [0u8; 1];
        matches!(
            tokio::time::timeout(within, socket.read(&mut byte)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test]
    async fn the_oldest_connection_gives_way_and_none_outlives_its_lifetime() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = served(ProbeListener::with_bounds(
            listener,
            2,
            Duration::from_millis(500),
        ))
        .await;
        let mut first = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut second = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        // A third takes the oldest's slot, and is served.
        let mut prober = TcpStream::connect(addr).await.unwrap();
        assert!(
            closed(&mut first, Duration::from_millis(300)).await,
            "the oldest gave way"
        );
        prober
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        prober.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        // One that keeps sending a byte now and then is closed all the same.
        for _ in 0..3 {
            let _ = second.write_all(b"G").await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(closed(&mut second, Duration::from_secs(2)).await);
    }
}
