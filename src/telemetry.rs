//! Logging: `tracing` to stderr, level from `LOG_LEVEL` (the guide's
//! names), JSON lines when `LOG_FORMAT=json`. `RUST_LOG`, when set, wins,
//! for the odd deep dive into a dependency.
//!
//! The audit trail (target `audit`, one event per call) is kept at INFO
//! whatever `LOG_LEVEL` says: quieting the logs must not silence it.
//!
//! With one audit line per call, writing must stay off the hot path: lines
//! go through a queue to a writer thread, which writes them into a buffer
//! and flushes it whenever the queue runs dry. Under load, many lines share
//! one write; when idle, each line is out at once. The queue never drops a
//! line (a full queue makes callers wait), because audit lines must not be
//! lost.

use std::io::{BufWriter, IsTerminal};

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

/// Keeps the writer thread alive; dropping it flushes what is queued.
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard {
    _writer: Option<WorkerGuard>,
}

/// Installs the global subscriber. `level` is a `tracing` level (`info`).
pub fn init(level: &str) -> LogGuard {
    // The HTTP/2 and AWS stacks are chatty at debug; their warnings matter.
    let directives = format!(
        "{level},audit=info,h2=warn,hyper=warn,hyper_util=warn,tower=warn,rustls=warn,\
         aws_smithy_runtime=warn,aws_config=warn"
    );
    let filter = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new(directives));
    let ansi = std::io::stderr().is_terminal();
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("log-writer")
        .finish(BufWriter::new(std::io::stderr()));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    let json = std::env::var("LOG_FORMAT").is_ok_and(|format| format.eq_ignore_ascii_case("json"));
    // A second init (tests) keeps the first subscriber.
    let installed = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    LogGuard {
        _writer: installed.is_ok().then_some(guard),
    }
}
