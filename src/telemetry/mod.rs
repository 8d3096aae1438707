//! Logging: `tracing` to stderr, level from `LOG_LEVEL` (Python's level
//! names: DEBUG, INFO, WARNING, ERROR, CRITICAL), JSON lines when
//! `LOG_FORMAT=json` (both read with the other settings, in `config`).
//! `RUST_LOG`, when set (and not empty), wins, for the odd deep dive into a
//! dependency.
//!
//! The audit trail (target `audit`, one event per call) is kept at INFO
//! whatever `LOG_LEVEL` or `RUST_LOG` says: quieting the logs must not
//! silence it.
//!
//! With one audit line per call, writing must stay off the hot path: lines
//! are appended to a buffer that a writer thread writes out in batches,
//! every 20 ms or sooner when it fills (`writer`). Nothing is dropped (a
//! full buffer makes callers wait), because audit lines must not be lost.
//!
//! One event is always one line, whatever a caller put into a name, a
//! certificate or a header: every event passes `OneLine` (an audit line
//! with nothing a caller sent to escape skips it: `audit`), which escapes
//! line breaks and other control characters inside it: `\n`, `\r`, and
//! `\u001b` for the others (DEL too), which is also a valid escape inside a
//! JSON string, so JSON output stays valid JSON. The line ends beyond ASCII
//! that some readers split on (NEL, U+2028, U+2029: Python's
//! `str.splitlines`, JavaScript) become `\u0085`, `\u2028` and `\u2029`.

use std::io::{self, IsTerminal, Write};

use tracing_subscriber::{EnvFilter, fmt::MakeWriter};

pub mod audit;
mod line_budget;
mod writer;

pub(crate) use line_budget::LineBudget;

/// Keeps the writer thread alive; dropping it writes out what is pending.
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard {
    _writer: Option<writer::WriterGuard>,
}

/// Installs the global subscriber. `level` is a `tracing` level (`info`),
/// `rust_log` a filter that replaces it when valid (see `filter`); `json`
/// writes each event as a JSON object.
pub fn init(level: &str, rust_log: Option<&str>, json: bool) -> LogGuard {
    let filter = filter(level, rust_log);
    let ansi = std::io::stderr().is_terminal();
    let (writer, guard) = writer::start(std::io::stderr());
    audit::install(writer.clone(), json);
    let builder = tracing_subscriber::fmt()
        .with_timer(SecondsCachedTime)
        .with_env_filter(filter)
        .with_writer(OneLine {
            inner: writer,
            keep_ansi: ansi,
        })
        .with_ansi(ansi);
    // A second init (tests) keeps the first subscriber.
    let installed = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    if installed.is_ok() {
        log_panics();
    }
    // Left out silently, a RUST_LOG with a typo would look obeyed; said
    // as an error where LOG_LEVEL=ERROR would hide a warning.
    if let Some(Err(error)) = rust_log
        .filter(|text| !text.trim().is_empty())
        .map(EnvFilter::try_new)
    {
        let said = "RUST_LOG is not a filter tracing can read; LOG_LEVEL applies";
        if tracing::enabled!(tracing::Level::WARN) {
            tracing::warn!(%error, "{said}");
        } else {
            tracing::error!(%error, "{said}");
        }
    }
    LogGuard {
        _writer: installed.is_ok().then_some(guard),
    }
}

/// The dependencies logged at WARN at most: the HTTP/2 and TLS stacks, and
/// every crate of the AWS SDK (but `aws_config`, at ERROR).
const QUIETED: &[&str] = &[
    "h2",
    "hyper",
    "hyper_util",
    "tower",
    "rustls",
    "notify",
    "aws_runtime",
    "aws_sigv4",
    "aws_types",
    "aws_credential_types",
    "aws_sdk_secretsmanager",
    "aws_sdk_sqs",
    "aws_sdk_sns",
    "aws_sdk_sts",
    "aws_smithy_runtime",
    "aws_smithy_runtime_api",
    "aws_smithy_http",
    "aws_smithy_http_client",
    "aws_smithy_types",
    "aws_smithy_json",
    "aws_smithy_xml",
    "aws_smithy_query",
    "aws_smithy_async",
    "aws_smithy_observability",
];

/// The filter: `RUST_LOG` when it is set, not empty and valid, else
/// `level` with the dependencies quieted; `audit=info` either way (a
/// `RUST_LOG` naming `audit` at another level is overruled).
fn filter(level: &str, rust_log: Option<&str>) -> EnvFilter {
    // The HTTP/2 and AWS stacks are chatty at debug; their warnings matter,
    // except aws_config's: it warns on every credential lookup (every cache
    // miss), and the broker says the same once per change of state, in its
    // own words (backend::aws_error). notify says at INFO that it could not
    // remove the watch of a file swapped away, at every ConfigMap update.
    // The AWS SDK's crates log at TRACE what they read and send: the
    // endpoint variables as set (a user and password in AWS_ENDPOINT_URL),
    // requests as signed. Only RUST_LOG turns them on.
    let quieted = || {
        // Never louder than the level asked for.
        let quiet = if level == "error" { "error" } else { "warn" };
        let quieted: Vec<String> = QUIETED
            .iter()
            .map(|target| format!("{target}={quiet}"))
            .collect();
        EnvFilter::new(format!("{level},{},aws_config=error", quieted.join(",")))
    };
    let chosen = rust_log
        .filter(|text| !text.trim().is_empty())
        .and_then(|text| EnvFilter::try_new(text).ok())
        .unwrap_or_else(quieted);
    chosen.add_directive("audit=info".parse().expect("a valid directive"))
}

/// A panic is logged as one event, like everything else: the default hook
/// writes several lines to stderr (and a backtrace when asked), which log
/// collectors split into unrelated lines. Where it happened and what it
/// says are enough to find it; the broker's own types never print secret
/// values, so a panic's message cannot carry one from the broker's code.
fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| info.payload().downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        let location = info
            .location()
            .map(|at| format!("{}:{}", at.file(), at.line()))
            .unwrap_or_default();
        let thread = std::thread::current();
        tracing::error!(
            thread = thread.name().unwrap_or("unnamed"),
            %location,
            // Not `message`, the event's own field (twice in a JSON line).
            panic_message = message,
            "panic: a fault of the broker or of a library it uses"
        );
    }));
}

/// RFC 3339 UTC with microseconds (`2026-11-30T13:55:30.243765Z`), the
/// default's format, made cheaper: every event (one audit line per call)
/// needs a timestamp, and its date and time of day change once a second,
/// so each thread formats those once a second and only the microseconds
/// per event.
struct SecondsCachedTime;

thread_local! {
    /// The second last formatted on this thread, and its text without `Z`.
    static SECOND: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((u64::MAX, String::new())) };
}

impl tracing_subscriber::fmt::time::FormatTime for SecondsCachedTime {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        write_timestamp(w)
    }
}

/// Writes the time now, as `SecondsCachedTime` does.
fn write_timestamp(w: &mut impl std::fmt::Write) -> std::fmt::Result {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let seconds = since_epoch.as_secs();
    SECOND.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != seconds {
            let whole = std::time::UNIX_EPOCH + std::time::Duration::from_secs(seconds);
            cached.1.clear();
            use std::fmt::Write as _;
            write!(cached.1, "{}", humantime::format_rfc3339_seconds(whole))?;
            cached.1.pop(); // the `Z`
            cached.0 = seconds;
        }
        w.write_str(&cached.1)?;
        let mut micros = *b".000000Z";
        let mut rest = since_epoch.subsec_micros();
        for digit in micros[1..7].iter_mut().rev() {
            *digit = b'0' + (rest % 10) as u8;
            rest /= 10;
        }
        // Digits and punctuation: always UTF-8.
        w.write_str(std::str::from_utf8(&micros).unwrap_or(".000000Z"))
    })
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
        if !has_control(body, self.keep_ansi) {
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

/// A control byte other than tab (and ESC when colours are kept). Bitwise,
/// not `||`: branch-free, so that `has_control` vectorizes.
fn needs_escape(byte: u8, keep_ansi: bool) -> bool {
    let allowed = if keep_ansi { 0x1b } else { b'\t' };
    ((byte < 0x20) & (byte != b'\t') & (byte != allowed)) | (byte == 0x7f)
}

/// The first byte of NEL (`C2 85`) and of U+2028/U+2029 (`E2 80 A8/A9`) in
/// UTF-8: a line that has one is looked at closely.
fn may_start_line_end(byte: u8) -> bool {
    (byte == 0xc2) | (byte == 0xe2)
}

/// The Unicode line end `text` starts with, as its escape, and its length.
fn unicode_line_end(text: &[u8]) -> Option<(&'static [u8], usize)> {
    match text {
        [0xc2, 0x85, ..] => Some((b"\\u0085", 2)),
        [0xe2, 0x80, 0xa8, ..] => Some((b"\\u2028", 3)),
        [0xe2, 0x80, 0xa9, ..] => Some((b"\\u2029", 3)),
        _ => None,
    }
}

/// Whether any byte of `text` needs escaping (or a closer look). Every
/// event is checked, except plain audit lines (`audit::is_plain`).
fn has_control(text: &[u8], keep_ansi: bool) -> bool {
    any_byte(text, |byte| {
        needs_escape(byte, keep_ansi) | may_start_line_end(byte)
    })
}

/// Whether `is` holds for any byte of `text`. The bytes are folded 32 at a
/// time without stopping early inside a block, which the compiler turns
/// into vector compares: a byte-by-byte `any` took about 1 ns a byte, most
/// of an audit line's cost. `is` must be branch-free for that.
///
/// The last, shorter block is copied into a full one padded with its own
/// first byte (which cannot change the answer): a short remainder folded
/// as is runs byte by byte, about 12 instructions each.
fn any_byte(text: &[u8], is: impl Fn(u8) -> bool) -> bool {
    const BLOCK: usize = 32;
    let in_block = |block: &[u8; BLOCK]| block.iter().fold(false, |found, &byte| found | is(byte));
    let (blocks, rest) = text.as_chunks::<BLOCK>();
    if blocks.iter().any(in_block) {
        return true;
    }
    let Some(&first) = rest.first() else {
        return false;
    };
    let mut last = [first; BLOCK];
    last[..rest.len()].copy_from_slice(rest);
    in_block(&last)
}

/// `\n`, `\r`, the other control bytes and the Unicode line ends as
/// visible escapes, each valid inside a JSON string as well (`serde_json`
/// escapes control characters itself, except DEL).
fn escape_controls(text: &[u8], keep_ansi: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + 16);
    let mut at = 0;
    while let Some(&byte) = text.get(at) {
        at += 1;
        match byte {
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            _ if needs_escape(byte, keep_ansi) => {
                out.extend_from_slice(format!("\\u{byte:04x}").as_bytes())
            }
            _ => match unicode_line_end(&text[at - 1..]) {
                Some((escape, len)) => {
                    out.extend_from_slice(escape);
                    at += len - 1;
                }
                None => out.push(byte),
            },
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether an event of `target` at `level` passes `filter`.
    fn passes(filter: EnvFilter, target: &str, level: tracing::Level) -> bool {
        use tracing_subscriber::layer::SubscriberExt;
        let seen = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let subscriber = tracing_subscriber::registry()
            .with(filter)
            .with(Seen(seen.clone()));
        tracing::subscriber::with_default(subscriber, || match (target, level) {
            ("audit", tracing::Level::INFO) => tracing::info!(target: "audit", "x"),
            ("h2", tracing::Level::DEBUG) => tracing::debug!(target: "h2", "x"),
            ("h2", tracing::Level::WARN) => tracing::warn!(target: "h2", "x"),
            ("secrets_broker", tracing::Level::DEBUG) => tracing::debug!("x"),
            ("aws_runtime::env_config", tracing::Level::TRACE) => {
                tracing::trace!(target: "aws_runtime::env_config", "x")
            }
            ("aws_sigv4::http_request", tracing::Level::TRACE) => {
                tracing::trace!(target: "aws_sigv4::http_request", "x")
            }
            other => panic!("not a case of this test: {other:?}"),
        });
        seen.load(std::sync::atomic::Ordering::Relaxed)
    }

    struct Seen(std::sync::Arc<std::sync::atomic::AtomicBool>);

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Seen {
        fn on_event(&self, _: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    #[test]
    fn rust_log_wins_but_never_silences_the_audit_trail() {
        use tracing::Level;
        let audit = |rust_log| passes(filter("error", rust_log), "audit", Level::INFO);
        assert!(audit(None));
        assert!(audit(Some("warn")));
        assert!(audit(Some("warn,audit=off")));
        assert!(audit(Some("not a filter ===")));
        // An invalid RUST_LOG is ignored: the level given stands.
        assert!(!passes(
            filter("error", Some("not a filter ===")),
            "secrets_broker",
            Level::DEBUG
        ));
        assert!(passes(
            filter("debug", Some("not a filter ===")),
            "secrets_broker",
            Level::DEBUG
        ));
        // RUST_LOG replaces the level and the quieting...
        assert!(passes(
            filter("error", Some("h2=debug")),
            "h2",
            Level::DEBUG
        ));
        assert!(!passes(filter("debug", None), "h2", Level::DEBUG));
        // ...unless it is empty, which is no filter at all.
        assert!(passes(
            filter("debug", Some(" ")),
            "secrets_broker",
            Level::DEBUG
        ));
        assert!(!passes(
            filter("error", Some("")),
            "secrets_broker",
            Level::DEBUG
        ));
    }

    #[test]
    fn a_dependency_is_never_louder_than_the_level_asked_for() {
        assert!(passes(filter("info", None), "h2", tracing::Level::WARN));
        assert!(!passes(filter("error", None), "h2", tracing::Level::WARN));
    }

    #[test]
    fn the_aws_sdk_traces_nothing_at_log_level_trace() {
        // What they trace holds AWS_ENDPOINT_URL as set, user and password
        // included, and the requests as signed.
        for target in ["aws_runtime::env_config", "aws_sigv4::http_request"] {
            assert!(!passes(
                filter("trace", None),
                target,
                tracing::Level::TRACE
            ));
            assert!(passes(
                filter("error", Some("aws_runtime=trace,aws_sigv4=trace")),
                target,
                tracing::Level::TRACE
            ));
        }
    }

    #[test]
    fn a_control_byte_is_found_wherever_it_sits() {
        for len in [0, 1, 31, 32, 33, 64, 155, 200] {
            let clean = vec![b'a'; len];
            assert!(!has_control(&clean, false), "{len} clean bytes");
            for at in 0..len {
                for byte in [b'\n', b'\r', 0x00, 0x1b, 0x7f] {
                    let mut text = clean.clone();
                    text[at] = byte;
                    assert!(has_control(&text, false), "{byte:#x} at {at} of {len}");
                }
                let mut tab = clean.clone();
                tab[at] = b'\t';
                assert!(!has_control(&tab, false), "a tab at {at} of {len}");
                let mut ansi = clean.clone();
                ansi[at] = 0x1b;
                assert!(!has_control(&ansi, true), "ESC kept for colours");
            }
        }
    }

    fn written(event: &[u8], keep_ansi: bool) -> Vec<u8> {
        let mut writer = OneLineWriter {
            inner: Vec::new(),
            keep_ansi,
        };
        writer.write_all(event).unwrap();
        writer.inner
    }

    #[test]
    fn timestamps_are_rfc3339_with_microseconds() {
        use tracing_subscriber::fmt::{format::Writer, time::FormatTime};
        let mut text = String::new();
        SecondsCachedTime
            .format_time(&mut Writer::new(&mut text))
            .unwrap();
        let before = humantime::parse_rfc3339(&text).expect("RFC 3339");
        let mut again = String::new();
        SecondsCachedTime
            .format_time(&mut Writer::new(&mut again))
            .unwrap();
        assert_eq!(text.len(), "2026-11-30T13:55:30.243765Z".len(), "{text}");
        assert!(
            humantime::parse_rfc3339(&again).unwrap() >= before,
            "{again}"
        );
        let elapsed = std::time::SystemTime::now().duration_since(before).unwrap();
        assert!(elapsed < std::time::Duration::from_secs(5), "{text} is now");
    }

    #[test]
    fn an_event_is_one_line_whatever_it_holds() {
        let forged =
            b"audit: identity=cn:x\n2026 INFO audit: identity=spiffe://insurecove/ops\r\x0b\n";
        let line = written(forged, false);
        assert_eq!(
            line,
            b"audit: identity=cn:x\\n2026 INFO audit: identity=spiffe://insurecove/ops\\r\\u000b\n"
        );
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
    }

    #[test]
    fn unicode_line_ends_are_escaped_and_other_text_kept() {
        // Other characters whose UTF-8 starts with C2 or E2 stay as they
        // are: U+2030 (E2 80 B0), U+20AC (E2 82 AC), U+00A9 (C2 A9).
        let event = "cn:x\u{85}a\u{2028}b\u{2029}c \u{2030}\u{20ac}\u{a9} ok\n";
        let line = written(event.as_bytes(), false);
        let line = String::from_utf8(line).unwrap();
        assert_eq!(
            line,
            "cn:x\\u0085a\\u2028b\\u2029c \u{2030}\u{20ac}\u{a9} ok\n"
        );
        // None of the ends Python's str.splitlines splits on is left.
        let python_line_ends = [
            '\n', '\r', '\u{b}', '\u{c}', '\u{1c}', '\u{1d}', '\u{1e}', '\u{85}', '\u{2028}',
            '\u{2029}',
        ];
        let body = line.strip_suffix('\n').unwrap();
        assert!(!body.contains(python_line_ends), "{line}");
        // Cut or broken sequences pass as bytes; one right before a line
        // end does not hide it.
        assert_eq!(written(b"a\xe2\x80\n", false), b"a\xe2\x80\n");
        assert_eq!(written(b"\xc2\n", false), b"\xc2\n");
        assert_eq!(
            written(b"\xe2\xe2\x80\xa8\xc2\xc2\x85\n", false),
            b"\xe2\\u2028\xc2\\u0085\n"
        );
        // Inside a JSON string the escapes read back as the characters,
        // DEL's too (serde_json writes DEL raw).
        let json = "{\"identity\":\"a\u{2028}b\u{85}c\u{7f}\"}\n";
        let line = written(json.as_bytes(), false);
        let event: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(event["identity"], "a\u{2028}b\u{85}c\u{7f}");
        // Found wherever it sits in a block of the quick check.
        for at in 0..70 {
            let mut text = "a".repeat(70);
            text.insert(at, '\u{2028}');
            assert!(has_control(text.as_bytes(), false), "at {at}");
        }
    }

    #[test]
    fn plain_events_and_colours_pass_unchanged() {
        assert_eq!(written(b"a\tb\n", false), b"a\tb\n");
        assert_eq!(
            written(b"\x1b[32mINFO\x1b[0m\n", true),
            b"\x1b[32mINFO\x1b[0m\n"
        );
        assert_eq!(written(b"\x1b[32m\n", false), b"\\u001b[32m\n");
    }
}
