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
//!
//! One event is always one line, whatever a caller put into a name, a
//! certificate or a header: every event passes `OneLine`, which escapes
//! line breaks and other control characters inside it (JSON output is
//! already escaped, so it stays valid JSON).

use std::io::{self, BufWriter, IsTerminal, Write};

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::{EnvFilter, fmt::MakeWriter};

/// Keeps the writer thread alive; dropping it flushes what is queued.
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard {
    _writer: Option<WorkerGuard>,
}

/// Installs the global subscriber. `level` is a `tracing` level (`info`).
pub fn init(level: &str) -> LogGuard {
    // The HTTP/2 and AWS stacks are chatty at debug; their warnings matter,
    // except aws_config's: it warns on every credential lookup (every cache
    // miss), and the broker says the same once per change of state, in its
    // own words (backend::aws_error).
    let directives = format!(
        "{level},audit=info,h2=warn,hyper=warn,hyper_util=warn,tower=warn,rustls=warn,\
         aws_smithy_runtime=warn,aws_config=error"
    );
    let filter = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new(directives));
    let ansi = std::io::stderr().is_terminal();
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("log-writer")
        .finish(BufWriter::new(std::io::stderr()));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(OneLine {
            inner: writer,
            keep_ansi: ansi,
        })
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

/// Makes writers that keep each event on one line (see the module doc).
struct OneLine<M> {
    inner: M,
    /// Colours on a terminal use ESC; anywhere else ESC is escaped too.
    keep_ansi: bool,
}

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for OneLine<M> {
    type Writer = OneLineWriter<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        OneLineWriter {
            inner: self.inner.make_writer(),
            keep_ansi: self.keep_ansi,
        }
    }
}

/// Writes one formatted event (tracing writes each with one `write_all`).
struct OneLineWriter<W> {
    inner: W,
    keep_ansi: bool,
}

impl<W: Write> Write for OneLineWriter<W> {
    fn write(&mut self, event: &[u8]) -> io::Result<usize> {
        let (body, end) = match event.split_last() {
            Some((b'\n', body)) => (body, &b"\n"[..]),
            _ => (event, &b""[..]),
        };
        if body.iter().all(|&b| !needs_escape(b, self.keep_ansi)) {
            self.inner.write_all(event)?;
        } else {
            let mut line = escape_controls(body, self.keep_ansi);
            line.extend_from_slice(end);
            self.inner.write_all(&line)?;
        }
        Ok(event.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn needs_escape(byte: u8, keep_ansi: bool) -> bool {
    (byte < 0x20 && byte != b'\t' && !(keep_ansi && byte == 0x1b)) || byte == 0x7f
}

/// `\n`, `\r` and the other control bytes as visible escapes.
fn escape_controls(text: &[u8], keep_ansi: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + 16);
    for &byte in text {
        match byte {
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            _ if needs_escape(byte, keep_ansi) => {
                out.extend_from_slice(format!("\\x{byte:02x}").as_bytes())
            }
            _ => out.push(byte),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(event: &[u8], keep_ansi: bool) -> Vec<u8> {
        let mut writer = OneLineWriter {
            inner: Vec::new(),
            keep_ansi,
        };
        writer.write_all(event).unwrap();
        writer.inner
    }

    #[test]
    fn an_event_is_one_line_whatever_it_holds() {
        let forged =
            b"audit: identity=cn:x\n2026 INFO audit: identity=spiffe://insurecove/ops\r\x0b\n";
        let line = written(forged, false);
        assert_eq!(
            line,
            b"audit: identity=cn:x\\n2026 INFO audit: identity=spiffe://insurecove/ops\\r\\x0b\n"
        );
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
    }

    #[test]
    fn plain_events_and_colours_pass_unchanged() {
        assert_eq!(written(b"a\tb\n", false), b"a\tb\n");
        assert_eq!(
            written(b"\x1b[32mINFO\x1b[0m\n", true),
            b"\x1b[32mINFO\x1b[0m\n"
        );
        assert_eq!(written(b"\x1b[32m\n", false), b"\\x1b[32m\n");
    }
}
