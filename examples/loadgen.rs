//! A load generator for `scripts/bench.sh`: cached GetSecret or
//! Health/Check calls over C connections × S concurrent streams, plaintext
//! or mutual TLS, on warm connections. h2load cannot present a client
//! certificate; this does, so plaintext and mTLS are measured by the same
//! client and compare.
//!
//! ```sh
//! cargo run --release --example loadgen -- make-pki DIR
//! cargo run --release --example loadgen -- run --addr 127.0.0.1:50151 --rpc get \
//!     --connections 8 --streams 8 --requests 40000 [--tls DIR]
//! ```
//!
//! `run` prints one line: `rate CALLS_PER_SECOND`, and with `--server-pid
//! PID` also `cpu_us MICROSECONDS`, the server's CPU time per call over
//! the same window (after the warm-up, so that TLS handshakes are not
//! counted as per-call work). With `--tls DIR` it presents `DIR/bench.pem`
//! and trusts `DIR/ca.pem` (as `make-pki` writes them, with the server's
//! certificate and a policy for the broker). `--before-calls COMMAND` runs
//! a shell command after the warm-up and before the calls (the benchmark
//! zeroes a callgrind broker's counters with it).

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Instant,
};

use clap::{Parser, Subcommand, ValueEnum};
use secrets_broker::proto::{GetSecretRequest, secrets_service_client::SecretsServiceClient};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
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
    match (load.server_pid, cpu_before) {
        (Some(pid), Some(before)) => {
            let spent = cpu_time(pid)?.saturating_sub(before);
            let per_call_us = spent.as_secs_f64() * 1e6 / load.requests.max(1) as f64;
            println!("rate {rate:.0} cpu_us {per_call_us:.1}");
        }
        _ => println!("rate {rate:.0}"),
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

/// One HTTP/2 connection per channel (tonic multiplexes its streams).
async fn connect(load: &Load) -> Result<Vec<Channel>, Box<dyn std::error::Error>> {
    let scheme = if load.tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{}", load.addr))?;
    if let Some(dir) = &load.tls {
        let tls = ClientTlsConfig::new()
            .domain_name("localhost")
            .ca_certificate(Certificate::from_pem(std::fs::read(dir.join("ca.pem"))?))
            .identity(Identity::from_pem(
                std::fs::read(dir.join("bench.pem"))?,
                std::fs::read(dir.join("bench-key.pem"))?,
            ));
        endpoint = endpoint.tls_config(tls)?;
    }
    let mut channels = Vec::with_capacity(load.connections);
    for _ in 0..load.connections {
        channels.push(endpoint.connect().await?);
    }
    Ok(channels)
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
