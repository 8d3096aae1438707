//! The audit line: one per call, written by hand straight into the log
//! writer's buffer.
//!
//! Every call writes one, so it skips `tracing`'s general formatting (field
//! visitors, `Debug` of every value, a writer per event): the line is built
//! in a reused per-thread buffer, in the same layout as the other events
//! (text, or JSON with `LOG_FORMAT=json`), and appended with one lock. A
//! line whose caller-supplied fields (identity, secret names, an unknown
//! method's path) are all printable ASCII without quotes or backslashes has
//! nothing to escape and goes out as built; any other is checked to be one
//! line like every other event. Where the broker did not install its logger (a
//! library user, the tests), the record is a `tracing` event on the `audit`
//! target instead, with the same fields.

use std::{cell::RefCell, fmt, fmt::Write as _, io::Write as _, sync::OnceLock};

use super::{OneLineWriter, any_byte, write_timestamp, writer::BufferedLog};

/// One call's audit facts.
pub struct AuditRecord<'a> {
    /// Who called, as `Identity::shown` writes it (escaped).
    pub identity: &'a str,
    /// The RPC's name; for an unknown method, the path the caller sent
    /// (caller-controlled, like `identity` and `secrets`).
    pub rpc: &'a str,
    /// The resolved secret names, space-separated (empty when none).
    pub secrets: &'a str,
    /// The gRPC code's name.
    pub outcome: &'a str,
    /// A refusal's `ErrorInfo` reason, when the broker gave one: it tells
    /// apart what one code covers (PERMISSION_DENIED: the broker's policy
    /// or AWS's IAM; UNAVAILABLE: AWS down or the broker full). Always one
    /// of the broker's fixed words.
    pub reason: Option<&'a str>,
    /// Whether the cache answered, for reads.
    pub cache_hit: Option<bool>,
}

/// Where audit lines go when the broker installed its logger.
struct Sink {
    log: BufferedLog,
    json: bool,
}

static SINK: OnceLock<Sink> = OnceLock::new();

thread_local! {
    static LINE: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Sends audit lines straight to `log` from now on.
pub(super) fn install(log: BufferedLog, json: bool) {
    let _ = SINK.set(Sink { log, json });
}

/// Writes one call's audit line.
pub fn record(record: &AuditRecord<'_>) {
    let Some(sink) = SINK.get() else {
        tracing::info!(
            target: "audit",
            identity = record.identity,
            rpc = record.rpc,
            secrets = record.secrets,
            outcome = record.outcome,
            reason = record.reason,
            cache_hit = record.cache_hit,
        );
        return;
    };
    LINE.with(|line| {
        let mut line = line.borrow_mut();
        line.clear();
        let plain = write_line(&mut line, record, sink.json);
        // The log writer's append cannot fail.
        if plain {
            // Printable ASCII and our own fixed words: one line as it is.
            let _ = (&sink.log).write_all(line.as_bytes());
        } else {
            // Kept on one line the way every other event is.
            let mut out = OneLineWriter {
                inner: &sink.log,
                keep_ansi: false,
            };
            let _ = out.write_all(line.as_bytes());
        }
    });
}

/// Writes `record`'s line in the text or JSON layout. Returns whether the
/// caller's fields were all `is_plain` (nearly always): then nothing was
/// escaped, and the line needs no second look for line ends.
fn write_line(line: &mut String, record: &AuditRecord<'_>, json: bool) -> bool {
    let plain = is_plain(record.identity) && is_plain(record.secrets) && is_plain(record.rpc);
    // Writing into a String cannot fail.
    let _ = if json {
        json_line(line, record, plain)
    } else {
        text_line(line, record, plain)
    };
    plain
}

/// `2026-11-30T13:55:30.243765Z  INFO audit: identity="..." rpc="GetSecret"
/// secrets="..." outcome="OK" cache_hit=true`, as `tracing`'s text layout
/// writes string fields.
fn text_line(line: &mut String, record: &AuditRecord<'_>, plain: bool) -> fmt::Result {
    write_timestamp(line)?;
    line.push_str("  INFO audit: identity=");
    quoted(line, record.identity, plain);
    line.push_str(" rpc=");
    quoted(line, record.rpc, plain);
    line.push_str(" secrets=");
    quoted(line, record.secrets, plain);
    // Code names are fixed words: quoted without an escaping pass.
    line.push_str(" outcome=\"");
    line.push_str(record.outcome);
    line.push('"');
    if let Some(reason) = record.reason {
        line.push_str(" reason=\"");
        line.push_str(reason);
        line.push('"');
    }
    match record.cache_hit {
        Some(true) => line.push_str(" cache_hit=true"),
        Some(false) => line.push_str(" cache_hit=false"),
        None => {}
    }
    line.push('\n');
    Ok(())
}

/// Whether `text` is printable ASCII without quotes or backslashes: what
/// both layouts write as it is, between quotes. Names and identities
/// nearly always are. (`str::contains` with a char set would walk char by
/// char, ~12 instructions a byte.)
fn is_plain(text: &str) -> bool {
    !any_byte(text.as_bytes(), |byte| {
        // Outside 0x20..0x7f, in one compare.
        let unprintable = byte.wrapping_sub(0x20) >= 0x5f;
        unprintable | (byte == b'"') | (byte == b'\\')
    })
}

/// `text` as `Debug` writes a string, which is how `tracing`'s text layout
/// writes a string field: in quotes, with quotes, backslashes and anything
/// unprintable escaped. A caller's text (a certificate's CN may hold spaces
/// and quotes) stays one field. `plain` when the record's fields were all
/// found `is_plain`; otherwise this text is looked at again.
fn quoted(out: &mut String, text: &str, plain: bool) {
    if plain || is_plain(text) {
        out.push('"');
        out.push_str(text);
        out.push('"');
    } else {
        // Writing into a String cannot fail.
        let _ = write!(out, "{text:?}");
    }
}

/// The JSON layout of `tracing`'s JSON events.
fn json_line(line: &mut String, record: &AuditRecord<'_>, plain: bool) -> fmt::Result {
    line.push_str("{\"timestamp\":\"");
    write_timestamp(line)?;
    line.push_str("\",\"level\":\"INFO\",\"fields\":{\"identity\":");
    json_string(line, record.identity, plain);
    line.push_str(",\"rpc\":");
    json_string(line, record.rpc, plain);
    line.push_str(",\"secrets\":");
    json_string(line, record.secrets, plain);
    line.push_str(",\"outcome\":");
    json_string(line, record.outcome, true);
    if let Some(reason) = record.reason {
        line.push_str(",\"reason\":");
        json_string(line, reason, true);
    }
    if let Some(hit) = record.cache_hit {
        write!(line, ",\"cache_hit\":{hit}")?;
    }
    line.push_str("},\"target\":\"audit\"}\n");
    Ok(())
}

/// `text` as a JSON string; `plain` (see `is_plain`) needs no escaping.
/// What the text layout's `Debug` escapes is escaped here too (`\uXXXX`):
/// controls, and characters that change how a line reads without being
/// seen (bidirectional overrides such as U+202E, zero-width ones).
fn json_string(out: &mut String, text: &str, plain: bool) {
    out.push('"');
    if plain {
        out.push_str(text);
        out.push('"');
        return;
    }
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\'' => out.push(c),
            c if c.escape_debug().next() == Some('\\') => {
                for unit in c.encode_utf16(&mut [0; 2]) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alloc_count::allocations_in;

    fn record(identity: &str, cache_hit: Option<bool>) -> (String, String) {
        let record = AuditRecord {
            identity,
            rpc: "GetSecret",
            secrets: "insurecove/db",
            outcome: "OK",
            reason: None,
            cache_hit,
        };
        let (mut text, mut json) = (String::new(), String::new());
        write_line(&mut text, &record, false);
        write_line(&mut json, &record, true);
        (text, json)
    }

    #[test]
    fn a_line_is_written_without_allocating() {
        let record = AuditRecord {
            identity: "spiffe://insurecove/auth-service",
            rpc: "GetSecret",
            secrets: "insurecove/production/db",
            outcome: "OK",
            reason: None,
            cache_hit: Some(true),
        };
        // The per-thread buffer, once it has grown to a line's size.
        let mut line = String::with_capacity(512);
        // The timestamp's cached second grows its own buffer, once per
        // thread.
        write_line(&mut line, &record, false);
        for (layout, json) in [("text", false), ("json", true)] {
            line.clear();
            let (plain, allocations) = allocations_in(|| write_line(&mut line, &record, json));
            assert!(plain, "{layout}: {line}");
            assert!(line.contains("spiffe://insurecove/auth-service"), "{line}");
            assert_eq!(allocations, 0, "{layout}: {line}");
        }
    }

    /// A plain line skips the one-line check: `is_plain` must refuse
    /// every byte that could end a line or a quoted field.
    #[test]
    fn only_printable_ascii_without_quotes_is_plain() {
        let printable: String = (0x20u8..0x7f)
            .map(char::from)
            .filter(|c| !matches!(c, '"' | '\\'))
            .collect();
        assert!(is_plain(&printable));
        assert!(is_plain(""));
        for odd in [
            "\n", "\r", "\t", "\u{0}", "\u{1b}", "\u{7f}", "\"", "\\", "\u{85}", "\u{2028}",
            "\u{2029}", "\u{e9}",
        ] {
            // Anywhere in a name longer than one block of the scan.
            for at in [0, 31, 32, 40] {
                let mut text = "a".repeat(40);
                text.insert_str(at, odd);
                assert!(!is_plain(&text), "{odd:?} at {at}");
            }
        }
    }

    #[test]
    fn what_the_text_layout_escapes_the_json_layout_escapes_too() {
        for (odd, escaped) in [
            ("\u{202e}", "\\u202e"),
            ("\u{200b}", "\\u200b"),
            ("\u{1b}", "\\u001b"),
            ("\u{e0001}", "\\udb40\\udc01"),
        ] {
            let path = format!("/secretsbroker.v1.SecretsService/a{odd}b");
            let record = AuditRecord {
                identity: "anonymous",
                rpc: &path,
                secrets: "",
                outcome: "UNIMPLEMENTED",
                reason: None,
                cache_hit: None,
            };
            let (mut text, mut json) = (String::new(), String::new());
            write_line(&mut text, &record, false);
            write_line(&mut json, &record, true);
            assert!(!text.contains(odd), "{text}");
            assert!(!json.contains(odd), "{json}");
            assert!(json.contains(escaped), "{json}");
            let event: serde_json::Value = serde_json::from_str(&json).unwrap();
            assert_eq!(event["fields"]["rpc"], path);
        }
        // Printable text beyond ASCII stays as it is.
        let mut json = String::new();
        json_string(&mut json, "caf\u{e9} \u{4e2d}'", false);
        assert_eq!(json, "\"caf\u{e9} \u{4e2d}'\"");
    }

    /// An unknown method's path is the caller's: it must not pass for
    /// plain, break the line or add a field, in either layout.
    #[test]
    fn a_forged_method_path_stays_one_field_of_one_line() {
        for path in [
            "/secretsbroker.v1.SecretsService/x\",\"identity\":\"spiffe://insurecove/ops",
            "/secretsbroker.v1.SecretsService/x\" outcome=\"OK",
            "/secretsbroker.v1.SecretsService/x\u{2028}2026 INFO audit: forged",
            "/secretsbroker.v1.SecretsService/x\u{85}y\\",
        ] {
            let record = AuditRecord {
                identity: "anonymous",
                rpc: path,
                secrets: "",
                outcome: "UNIMPLEMENTED",
                reason: None,
                cache_hit: None,
            };
            for json in [false, true] {
                let mut line = String::new();
                assert!(
                    !write_line(&mut line, &record, json),
                    "{path:?} is not plain"
                );
                // What `record` does with a line that is not plain.
                let mut out = OneLineWriter {
                    inner: Vec::new(),
                    keep_ansi: false,
                };
                out.write_all(line.as_bytes()).unwrap();
                let written = String::from_utf8(out.inner).unwrap();
                assert_eq!(written.lines().count(), 1, "{written}");
                assert!(!written.contains(['\u{2028}', '\u{85}']), "{written}");
                if json {
                    let event: serde_json::Value = serde_json::from_str(&written).unwrap();
                    assert_eq!(event["fields"]["rpc"], path);
                    assert_eq!(event["fields"]["identity"], "anonymous");
                } else {
                    let (_, fields) = written.split_once(": ").unwrap();
                    assert_eq!(
                        keys_outside_quotes(fields),
                        ["identity", "rpc", "secrets", "outcome"],
                        "{written}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_text_line_has_the_usual_layout() {
        let (text, _) = record("anonymous", Some(true));
        let (_, rest) = text.split_once("  ").unwrap();
        assert_eq!(
            rest,
            "INFO audit: identity=\"anonymous\" rpc=\"GetSecret\" secrets=\"insurecove/db\" outcome=\"OK\" cache_hit=true\n"
        );
        let (text, _) = record("anonymous", None);
        assert!(text.ends_with("outcome=\"OK\"\n"), "{text}");
    }

    #[test]
    fn a_refusal_carries_its_reason_in_both_layouts() {
        let refused = AuditRecord {
            identity: "spiffe://insurecove/billing",
            rpc: "GetSecret",
            secrets: "insurecove/db",
            outcome: "PERMISSION_DENIED",
            reason: Some("POLICY_DENIED"),
            cache_hit: None,
        };
        let (mut text, mut json) = (String::new(), String::new());
        assert!(write_line(&mut text, &refused, false));
        write_line(&mut json, &refused, true);
        assert!(
            text.ends_with(" outcome=\"PERMISSION_DENIED\" reason=\"POLICY_DENIED\"\n"),
            "{text}"
        );
        let event: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(event["fields"]["reason"], "POLICY_DENIED", "{json}");
        assert_eq!(event["fields"]["outcome"], "PERMISSION_DENIED", "{json}");
        // An answered call has none.
        let (text, json) = record("anonymous", Some(true));
        assert!(
            !text.contains("reason") && !json.contains("reason"),
            "{text}{json}"
        );
    }

    #[test]
    fn a_caller_cannot_add_fields_to_the_text_line() {
        let secrets = r#"insurecove/a "a b\"=INVALID_ARGUMENT"#;
        for identity in [
            r#"cn:x" outcome="OK" secrets="insurecove/db"#,
            "cn:caf\u{e9} x\u{a0}y\u{301}\u{7f}",
            "spiffe://insurecove/ops",
        ] {
            let mut line = String::new();
            let plain = write_line(
                &mut line,
                &AuditRecord {
                    identity,
                    rpc: "GetSecret",
                    secrets,
                    outcome: "PERMISSION_DENIED",
                    reason: None,
                    cache_hit: None,
                },
                false,
            );
            assert!(!plain, "the secrets field has quotes: {line}");
            // Quoted as `tracing` quotes a string field (`Debug`).
            let expected = format!(
                "INFO audit: identity={identity:?} rpc=\"GetSecret\" secrets={secrets:?} outcome=\"PERMISSION_DENIED\"\n"
            );
            assert_eq!(line.split_once("  ").unwrap().1, expected);
            let (_, fields) = line.split_once(": ").unwrap();
            assert_eq!(
                keys_outside_quotes(fields),
                ["identity", "rpc", "secrets", "outcome"],
                "{line}"
            );
        }
    }

    /// The `key=` names of a text event's fields, skipping quoted values.
    fn keys_outside_quotes(fields: &str) -> Vec<String> {
        let (mut keys, mut word) = (Vec::new(), String::new());
        let (mut in_quotes, mut escaped) = (false, false);
        for c in fields.chars() {
            match (in_quotes, escaped, c) {
                (true, true, _) => escaped = false,
                (true, false, '\\') => escaped = true,
                (true, false, '"') => in_quotes = false,
                (true, false, _) => {}
                (false, _, '"') => in_quotes = true,
                (false, _, '=') => keys.push(std::mem::take(&mut word)),
                (false, _, ' ' | '\n') => word.clear(),
                (false, _, c) => word.push(c),
            }
        }
        keys
    }

    #[test]
    fn the_json_line_parses_with_the_usual_fields() {
        let (_, json) = record("cn:x\"\n\u{1b}", Some(false));
        assert_eq!(json.matches('\n').count(), 1, "one line: {json}");
        let event: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(event["target"], "audit");
        assert_eq!(event["level"], "INFO");
        assert_eq!(event["fields"]["identity"], "cn:x\"\n\u{1b}");
        assert_eq!(event["fields"]["rpc"], "GetSecret");
        assert_eq!(event["fields"]["secrets"], "insurecove/db");
        assert_eq!(event["fields"]["outcome"], "OK");
        assert_eq!(event["fields"]["cache_hit"], false);
        assert!(humantime::parse_rfc3339(event["timestamp"].as_str().unwrap()).is_ok());
    }
}
