//! A load generator for `scripts/bench.sh`: cached GetSecret or
//! Health/Check calls over C connections × S concurrent streams, plaintext
//! or mutual TLS, on warm connections. h2load cannot present a client
//! certificate; this does, so plaintext and mTLS are measured by the same
//! client and compare.
//!
//! ```sh
//! cargo run --release --example loadgen -- make-pki DIR
//! cargo run --release --example loadgen -- run --addr 127.0.0.1:50151 --rpc get \
//!     --connections 8 --streams 8 --requests 40000 [--tls DIR] [--split-writes]
//! ```
//!
//! `run` prints one line: `rate CALLS_PER_SECOND`, with `--server-pid PID`
//! `cpu_us MICROSECONDS`, the server's CPU time per call over the same
//! window (after the warm-up, so that TLS handshakes are not counted as
//! per-call work), and `writes_per_call`, the writes the client made per
//! call (see `OneWritePerCall`; below 1 when calls share writes). With `--tls DIR` it presents `DIR/bench.pem`
//! and trusts `DIR/ca.pem` (as `make-pki` writes them, with the server's
//! certificate and a policy for the broker). `--before-calls COMMAND` runs
//! a shell command after the warm-up and before the calls (the benchmark
//! zeroes a callgrind broker's counters with it).

use std::{
    path::{Path, PathBuf},
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll, ready},
    time::Instant,
};

use clap::{Parser, Subcommand, ValueEnum};
use hyper_util::rt::TokioIo;
use secrets_broker::proto::{GetSecretRequest, secrets_service_client::SecretsServiceClient};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

#[path = "../tests/support/pki.rs"]
mod pki;

/// The identity the benchmark's client certificate carries.
const BENCH_IDENTITY: &str = "spiffe://insurecove/bench";

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Writes a CA, the broker's certificate and key, a client certificate
    /// and a policy granting it `insurecove/**` into DIR.
    MakePki { dir: PathBuf },
    /// Runs the load and prints the rate.
    Run(Load),
}

#[derive(clap::Args)]
struct Load {
    #[arg(long)]
    addr: String,
    #[arg(long, value_enum)]
    rpc: Rpc,
    #[arg(long, default_value_t = 1)]
    connections: usize,
    #[arg(long, default_value_t = 1)]
    streams: usize,
    #[arg(long, default_value_t = 40_000)]
    requests: usize,
    /// The secret GetSecret asks for.
    #[arg(long, default_value = "mistral-api-key")]
    name: String,
    /// Mutual TLS with the files `make-pki` wrote here.
    #[arg(long)]
    tls: Option<PathBuf>,
    /// The server's process, whose CPU time per call is printed too.
    #[arg(long)]
    server_pid: Option<u32>,
    /// A shell command run after the warm-up, before the calls.
    #[arg(long)]
    before_calls: Option<String>,
    /// Write each HTTP/2 frame as tonic's client does (a unary call's
    /// HEADERS and DATA in two writes), not a call in one write as grpcio.
    #[arg(long)]
    split_writes: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Rpc {
    Get,
    Health,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    match Args::parse().command {
        Command::MakePki { dir } => make_pki(&dir),
        Command::Run(load) => run(load).await,
    }
}

fn make_pki(dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir)?;
    let pki = pki::Pki::new();
    let server = pki.server();
    let client = pki.client("bench", BENCH_IDENTITY);
    let policy = pki.write_policy(&format!(
        "[[grant]]\nidentity = \"{BENCH_IDENTITY}\"\nsecrets = [\"insurecove/**\"]\n"
    ));
    for (from, to) in [
        (pki.ca(), "ca.pem"),
        (server.cert, "server.pem"),
        (server.key, "server-key.pem"),
        (client.cert, "bench.pem"),
        (client.key, "bench-key.pem"),
        (policy, "policy.toml"),
    ] {
        std::fs::copy(from, dir.join(to))?;
    }
    Ok(())
}

async fn run(load: Load) -> Result<(), Box<dyn std::error::Error>> {
    let channels = connect(&load).await?;
    let load = Arc::new(load);
    // Warm: every connection made, and one call answered on each.
    for channel in &channels {
        call(&load, channel.clone()).await?;
    }
    if let Some(command) = &load.before_calls {
        let status = std::process::Command::new("sh")
            .args(["-c", command])
            .status()?;
        if !status.success() {
            return Err(format!("--before-calls {command:?}: {status}").into());
        }
    }
    let remaining = Arc::new(AtomicUsize::new(load.requests));
    let cpu_before = load.server_pid.map(cpu_time).transpose()?;
    let writes_before = WRITES.load(Ordering::Relaxed);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for channel in &channels {
        for _ in 0..load.streams {
            let (load, channel, remaining) =
                (Arc::clone(&load), channel.clone(), Arc::clone(&remaining));
            tasks.spawn(async move {
                while take_one(&remaining) {
                    call(&load, channel.clone()).await?;
                }
                Ok::<_, tonic::Status>(())
            });
        }
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let rate = load.requests as f64 / started.elapsed().as_secs_f64();
    let calls = load.requests.max(1) as f64;
    let writes = (WRITES.load(Ordering::Relaxed) - writes_before) as f64 / calls;
    match (load.server_pid, cpu_before) {
        (Some(pid), Some(before)) => {
            let spent = cpu_time(pid)?.saturating_sub(before);
            let per_call_us = spent.as_secs_f64() * 1e6 / calls;
            println!("rate {rate:.0} cpu_us {per_call_us:.1} writes_per_call {writes:.2}");
        }
        _ => println!("rate {rate:.0} writes_per_call {writes:.2}"),
    }
    Ok(())
}

/// The time on CPU of every thread of process `pid` so far (Linux's
/// schedstat, in nanoseconds: exact, where `/proc/PID/stat` counts 10 ms
/// ticks). A thread that ends between two readings takes its time with it;
/// the broker's threads live as long as it does.
fn cpu_time(pid: u32) -> std::io::Result<std::time::Duration> {
    let mut nanos = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let Ok(stat) = std::fs::read_to_string(task?.path().join("schedstat")) else {
            continue; // ended since the listing
        };
        nanos += stat
            .split_whitespace()
            .next()
            .and_then(|field| field.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(std::time::Duration::from_nanos(nanos))
}

fn take_one(remaining: &AtomicUsize) -> bool {
    remaining
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        .is_ok()
}

/// One HTTP/2 connection per channel (tonic multiplexes its streams),
/// through [`OneWritePerCall`] unless `--split-writes`. TLS is made here
/// rather than by tonic so that the wrapper sits above it and a call's
/// frames go into one TLS record.
async fn connect(load: &Load) -> Result<Vec<Channel>, Box<dyn std::error::Error>> {
    let tls = load.tls.as_deref().map(tls_connector);
    let endpoint = Endpoint::from_shared(format!("http://{}", load.addr))?;
    let (addr, split_writes) = (load.addr.clone(), load.split_writes);
    let mut channels = Vec::with_capacity(load.connections);
    for _ in 0..load.connections {
        let (addr, tls) = (addr.clone(), tls.clone());
        let connector = tower::service_fn(move |_: http::Uri| {
            let (addr, tls) = (addr.clone(), tls.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(&addr).await?;
                tcp.set_nodelay(true)?;
                let io: Box<dyn Io> = match tls {
                    Some(tls) => {
                        let name = rustls::pki_types::ServerName::try_from("localhost")
                            .expect("a valid DNS name");
                        Box::new(tls.connect(name, tcp).await?)
                    }
                    None => Box::new(tcp),
                };
                Ok::<_, std::io::Error>(TokioIo::new(OneWritePerCall::new(io, split_writes)))
            }
        });
        channels.push(endpoint.connect_with_connector(connector).await?);
    }
    Ok(channels)
}

/// A byte stream h2 can run over: TCP, or TLS over TCP.
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// Presents `DIR/bench.pem` and trusts `DIR/ca.pem`, offering h2 by ALPN
/// as tonic's own TLS would.
fn tls_connector(dir: &Path) -> tokio_rustls::TlsConnector {
    let bench = pki::Issued {
        cert: dir.join("bench.pem"),
        key: dir.join("bench-key.pem"),
    };
    tokio_rustls::TlsConnector::from(Arc::new(bench.rustls_client(&dir.join("ca.pem"))))
}

/// Writes what h2 has for the socket once per turn of the runtime, as
/// grpcio's client writes a unary call (HEADERS, DATA and END_STREAM in
/// one `sendmsg`). tonic's client on its own writes a call twice: h2 gives
/// a new stream flow-control capacity only once its HEADERS are out, so
/// HEADERS are flushed before the DATA is even queued. Under TLS that is
/// two records to encrypt here and two to decrypt in the broker per call,
/// where grpcio sends one; the broker would be measured against a client
/// our users do not run.
///
/// So a flush is put off once: the connection's task yields, the call's
/// body task queues its DATA, and the next flush writes both in one
/// write. Reads pass through.
struct OneWritePerCall<IO> {
    io: IO,
    /// Written by h2 and not yet handed to `io`.
    pending: Vec<u8>,
    /// This flush has already been put off once.
    yielded: bool,
    /// `--split-writes`: hand every write to `io` at once, as tonic does.
    split_writes: bool,
}

/// Past this many bytes held, writes go through without waiting for a
/// flush (a large message needs no help to fill its records).
const MAX_PENDING: usize = 64 * 1024;

/// Writes handed to the sockets (or their TLS streams) by every
/// connection, so that the run can say how many a call took.
static WRITES: AtomicUsize = AtomicUsize::new(0);

impl<IO: AsyncWrite + Unpin> OneWritePerCall<IO> {
    fn new(io: IO, split_writes: bool) -> Self {
        Self {
            io,
            pending: Vec::new(),
            yielded: false,
            split_writes,
        }
    }

    /// Hands everything pending to `io`.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while !self.pending.is_empty() {
            let written = ready!(Pin::new(&mut self.io).poll_write(cx, &self.pending))?;
            WRITES.fetch_add(1, Ordering::Relaxed);
            if written == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.pending.drain(..written);
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for OneWritePerCall<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for OneWritePerCall<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.split_writes {
            let written = ready!(Pin::new(&mut self.io).poll_write(cx, buf))?;
            WRITES.fetch_add(1, Ordering::Relaxed);
            return Poll::Ready(Ok(written));
        }
        if self.pending.len() >= MAX_PENDING {
            ready!(self.poll_drain(cx))?;
        }
        self.pending.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if !self.pending.is_empty() && !self.yielded {
            // Woken now, run after the tasks already woken: the call's
            // body task among them.
            self.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        ready!(self.poll_drain(cx))?;
        self.yielded = false;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

async fn call(load: &Load, channel: Channel) -> Result<(), tonic::Status> {
    match load.rpc {
        Rpc::Get => {
            let request = GetSecretRequest {
                name: load.name.clone(),
                ..GetSecretRequest::default()
            };
            SecretsServiceClient::new(channel)
                .get_secret(request)
                .await?;
        }
        Rpc::Health => {
            HealthClient::new(channel)
                .check(HealthCheckRequest::default())
                .await?;
        }
    }
    Ok(())
}
