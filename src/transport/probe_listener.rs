//! The listener of the probes and metrics endpoint (`--metrics-listen`),
//! with the bounds the gRPC listener has: at most `MAX_CONNECTIONS` open
//! (more are closed at once), and a connection that sends nothing for
//! `IDLE_TIMEOUT` is closed. Without them, sockets opened and left idle on
//! this port used up the process's file descriptors, and then the gRPC
//! listener could accept nothing either.
//!
//! Probes and Prometheus make a request every few seconds and need one or
//! two connections each; a scrape's connection kept alive longer than the
//! idle timeout is simply opened again.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    time::{Instant, Sleep},
};

/// Connections open at once on the probe port.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a connection may send nothing before it is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// A bounded listener for `axum::serve`.
pub struct ProbeListener {
    listener: TcpListener,
    slots: Arc<Semaphore>,
    idle_timeout: Duration,
}

impl ProbeListener {
    pub fn new(listener: TcpListener) -> Self {
        Self::with_bounds(listener, MAX_CONNECTIONS, IDLE_TIMEOUT)
    }

    fn with_bounds(listener: TcpListener, connections: usize, idle_timeout: Duration) -> Self {
        Self {
            listener,
            slots: Arc::new(Semaphore::new(connections)),
            idle_timeout,
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
            let Ok(slot) = Arc::clone(&self.slots).try_acquire_owned() else {
                tracing::debug!(%remote, "probe endpoint: too many connections; closed");
                continue;
            };
            let connection = ProbeConnection {
                stream,
                _slot: slot,
                idle: Box::pin(tokio::time::sleep(self.idle_timeout)),
                idle_timeout: self.idle_timeout,
            };
            return (connection, remote);
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

/// A probe connection: its slot, and the time it may stay silent.
pub struct ProbeConnection {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
    idle: Pin<Box<Sleep>>,
    idle_timeout: Duration,
}

impl AsyncRead for ProbeConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let filled = buf.filled().len();
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Pending => {
                ready!(self.idle.as_mut().poll(cx));
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "probe connection idle",
                )))
            }
            Poll::Ready(result) => {
                if buf.filled().len() > filled {
                    let next = Instant::now() + self.idle_timeout;
                    self.idle.as_mut().reset(next);
                }
                Poll::Ready(result)
            }
        }
    }
}

impl AsyncWrite for ProbeConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
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
    async fn connections_past_the_bound_are_closed_and_idle_ones_time_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = served(ProbeListener::with_bounds(
            listener,
            2,
            Duration::from_millis(300),
        ))
        .await;
        let mut first = TcpStream::connect(addr).await.unwrap();
        let mut second = TcpStream::connect(addr).await.unwrap();
        let mut third = TcpStream::connect(addr).await.unwrap();
        assert!(
            closed(&mut third, Duration::from_millis(200)).await,
            "past the bound"
        );
        assert!(!closed(&mut first, Duration::from_millis(100)).await);
        // Silent for longer than the idle timeout: closed, and their slots
        // are free for a prober that asks.
        assert!(closed(&mut first, Duration::from_secs(2)).await);
        assert!(closed(&mut second, Duration::from_secs(2)).await);
        let mut prober = TcpStream::connect(addr).await.unwrap();
        prober
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        prober.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
}
