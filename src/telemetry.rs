//! Logging: `tracing` to stderr, level from `LOG_LEVEL` (the guide's
//! names), JSON lines when `LOG_FORMAT=json`. `RUST_LOG`, when set, wins,
//! for the odd deep dive into a dependency.
//!
//! The audit trail (target `audit`, one event per call) is kept at INFO
//! whatever `LOG_LEVEL` says: quieting the logs must not silence it.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `level` is a `tracing` level (`info`).
pub fn init(level: &str) {
    // The HTTP/2 and AWS stacks are chatty at debug; their warnings matter.
    let directives = format!(
        "{level},audit=info,h2=warn,hyper=warn,hyper_util=warn,tower=warn,rustls=warn,\
         aws_smithy_runtime=warn,aws_config=warn"
    );
    let filter = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new(directives));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let json = std::env::var("LOG_FORMAT").is_ok_and(|format| format.eq_ignore_ascii_case("json"));
    // A second init (tests) keeps the first subscriber.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
