//! The audit line: one per call, written by hand straight into the log
//! writer's buffer.
//!
//! Every call writes one, so it skips `tracing`'s general formatting (field
//! visitors, `Debug` of every value, a writer per event): the line is built
//! in a reused per-thread buffer, in the same layout as the other events
//! (text, or JSON with `LOG_FORMAT=json`), checked to be one line, and
//! appended with one lock. Where the broker did not install its logger (a
//! library user, the tests), the record is a `tracing` event on the `audit`
//! target instead, with the same fields.

use std::{cell::RefCell, fmt, fmt::Write as _, io::Write as _, sync::OnceLock};

use super::{OneLineWriter, any_byte, write_timestamp, writer::BufferedLog};

/// One call's audit facts.
pub struct AuditRecord<'a> {
    /// Who called, as `Identity::shown` writes it (escaped).
    pub identity: &'a str,
    /// The RPC's name.
    pub rpc: &'a str,
    /// The resolved secret names, space-separated (empty when none).
    pub secrets: &'a str,
    /// The gRPC code's name.
    pub outcome: &'a str,
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
            cache_hit = record.cache_hit,
        );
        return;
    };
    LINE.with(|line| {
        let mut line = line.borrow_mut();
        line.clear();
        // Writing into a String cannot fail.
        let _ = if sink.json {
            json_line(&mut line, record)
        } else {
            text_line(&mut line, record)
        };
        // Kept on one line the way every other event is; the log writer's
        // append cannot fail.
        let mut out = OneLineWriter {
            inner: &sink.log,
            keep_ansi: false,
        };
        let _ = out.write_all(line.as_bytes());
    });
}

/// `2026-11-30T13:55:30.243765Z  INFO audit: identity="..." rpc="GetSecret"
/// secrets="..." outcome="OK" cache_hit=true`, as `tracing`'s text layout
/// writes string fields.
fn text_line(line: &mut String, record: &AuditRecord<'_>) -> fmt::Result {
    write_timestamp(line)?;
    line.push_str("  INFO audit: identity=");
    quoted(line, record.identity);
    // RPC and code names are fixed words: quoted without an escaping pass.
    line.push_str(" rpc=\"");
    line.push_str(record.rpc);
    line.push_str("\" secrets=");
    quoted(line, record.secrets);
    line.push_str(" outcome=\"");
    line.push_str(record.outcome);
    line.push('"');
    match record.cache_hit {
        Some(true) => line.push_str(" cache_hit=true"),
        Some(false) => line.push_str(" cache_hit=false"),
        None => {}
    }
    line.push('\n');
    Ok(())
}

/// `text` as `Debug` writes a string, which is how `tracing`'s text layout
/// writes a string field: in quotes, with quotes, backslashes and anything
/// unprintable escaped. A caller's text (a certificate's CN may hold spaces
/// and quotes) stays one field.
fn quoted(out: &mut String, text: &str) {
    // Names and identities are nearly always printable ASCII with nothing
    // to escape: those are copied as they are. (`str::contains` with a
    // char set would walk char by char, ~12 instructions a byte.)
    let plain = !any_byte(text.as_bytes(), |byte| {
        // Outside 0x20..0x7f, in one compare.
        let unprintable = byte.wrapping_sub(0x20) >= 0x5f;
        unprintable | (byte == b'"') | (byte == b'\\')
    });
    if plain {
        out.push('"');
        out.push_str(text);
        out.push('"');
    } else {
        // Writing into a String cannot fail.
        let _ = write!(out, "{text:?}");
    }
}

/// The JSON layout of `tracing`'s JSON events.
fn json_line(line: &mut String, record: &AuditRecord<'_>) -> fmt::Result {
    line.push_str("{\"timestamp\":\"");
    write_timestamp(line)?;
    line.push_str("\",\"level\":\"INFO\",\"fields\":{\"identity\":");
    json_string(line, record.identity);
    line.push_str(",\"rpc\":");
    json_string(line, record.rpc);
    line.push_str(",\"secrets\":");
    json_string(line, record.secrets);
    line.push_str(",\"outcome\":");
    json_string(line, record.outcome);
    if let Some(hit) = record.cache_hit {
        write!(line, ",\"cache_hit\":{hit}")?;
    }
    line.push_str("},\"target\":\"audit\"}\n");
    Ok(())
}

/// `text` as a JSON string.
fn json_string(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
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
            cache_hit,
        };
        let (mut text, mut json) = (String::new(), String::new());
        text_line(&mut text, &record).unwrap();
        json_line(&mut json, &record).unwrap();
        (text, json)
    }

    #[test]
    fn a_line_is_written_without_allocating() {
        let record = AuditRecord {
            identity: "spiffe://insurecove/auth-service",
            rpc: "GetSecret",
            secrets: "insurecove/production/db",
            outcome: "OK",
            cache_hit: Some(true),
        };
        // The per-thread buffer, once it has grown to a line's size.
        let mut line = String::with_capacity(512);
        // The timestamp's cached second grows its own buffer, once per
        // thread.
        text_line(&mut line, &record).unwrap();
        for (layout, write) in [
            (
                "text",
                text_line as fn(&mut String, &AuditRecord<'_>) -> fmt::Result,
            ),
            ("json", json_line),
        ] {
            line.clear();
            let (written, allocations) = allocations_in(|| write(&mut line, &record));
            written.unwrap();
            assert!(line.contains("spiffe://insurecove/auth-service"), "{line}");
            assert_eq!(allocations, 0, "{layout}: {line}");
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
    fn a_caller_cannot_add_fields_to_the_text_line() {
        let secrets = r#"insurecove/a "a b\"=INVALID_ARGUMENT"#;
        for identity in [
            r#"cn:x" outcome="OK" secrets="insurecove/db"#,
            "cn:caf\u{e9} x\u{a0}y\u{301}\u{7f}",
            "spiffe://insurecove/ops",
        ] {
            let mut line = String::new();
            text_line(
                &mut line,
                &AuditRecord {
                    identity,
                    rpc: "GetSecret",
                    secrets,
                    outcome: "PERMISSION_DENIED",
                    cache_hit: None,
                },
            )
            .unwrap();
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
