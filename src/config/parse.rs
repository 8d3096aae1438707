//! Turning a setting's text into its value, with an error that says what
//! was wrong and what is expected.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use super::ListenAddr;

pub(super) fn parse_listen(value: &str) -> Result<ListenAddr, String> {
    match value.strip_prefix("unix:") {
        Some("") => Err("a unix socket needs a path, e.g. unix:/run/secrets-broker.sock".into()),
        // Said here, so that `check` says it too.
        Some(path) if path.len() > crate::transport::bind::MAX_SOCKET_PATH => Err(format!(
            "the socket path is {} bytes; the kernel takes at most {}",
            path.len(),
            crate::transport::bind::MAX_SOCKET_PATH
        )),
        Some(path) => Ok(ListenAddr::Unix(PathBuf::from(path))),
        None => parse_socket_addr(value).map(ListenAddr::Tcp),
    }
}

pub(super) fn parse_socket_addr(value: &str) -> Result<SocketAddr, String> {
    // `localhost` is the one name taken: it means loopback everywhere, and
    // resolving others would make the address depend on DNS at start.
    let loopback = value
        .strip_prefix("localhost:")
        .map(|port| format!("127.0.0.1:{port}"));
    loopback.as_deref().unwrap_or(value).parse().map_err(|_| {
        format!(
            "{value:?} is not an address of the form IP:PORT, e.g. 127.0.0.1:50051 \
             (localhost:PORT, or 0.0.0.0:PORT for every interface)"
        )
    })
}

pub(super) fn parse_path(value: &str) -> Result<PathBuf, String> {
    Ok(PathBuf::from(value))
}

pub(super) fn parse_word(given: &str) -> Result<String, String> {
    let value = given.trim();
    if value.is_empty() || value.contains(char::is_whitespace) {
        // What was given, not what is left of it: `" "` shown as `""`
        // would not say which setting's text was wrong.
        return Err(format!("{given:?} must be one word"));
    }
    Ok(value.to_owned())
}

/// A prefix or environment: part of a secret name.
pub(super) fn parse_name_part(given: &str) -> Result<String, String> {
    let value = given.trim().trim_matches('/');
    let valid = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/_+=.@-".contains(c));
    if valid {
        Ok(value.to_owned())
    } else {
        Err(format!(
            "{given:?} must be letters, digits and /_+=.@- (it becomes part of secret names), \
             and not only slashes"
        ))
    }
}

/// Durations beyond a year are mistakes, and sums of them (TTL + stale
/// bound) must not overflow.
const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

/// The units a duration may be given in. humantime also reads weeks,
/// months (`M`) and years: `5M` for five minutes would be five months of
/// cache or of staleness, so those are refused.
const DURATION_UNITS: &[&str] = &[
    "ms", "msec", "s", "sec", "secs", "second", "seconds", "m", "min", "mins", "minute", "minutes",
    "h", "hr", "hrs", "hour", "hours", "d", "day", "days",
];

/// Whole seconds ("300", as `SECRET_CACHE_TTL` has always been written),
/// or with units: "5m", "90s", "1h 30m", "500ms".
pub(super) fn parse_duration(value: &str) -> Result<Duration, String> {
    let value = value.trim();
    let not_a_duration =
        || format!("{value:?} is not a duration: give seconds (e.g. 300) or e.g. 5m");
    let duration = match value.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        // No number at all ("abc"): not a unit problem.
        Err(_) if !value.bytes().any(|b| b.is_ascii_digit()) => return Err(not_a_duration()),
        Err(_) => {
            // Units are what lies between the numbers: `µs` whole, not `s`.
            let unknown = value
                .split(|c: char| c.is_ascii_digit() || c.is_whitespace() || c == '.')
                .find(|unit| !unit.is_empty() && !DURATION_UNITS.contains(unit));
            if let Some(unit) = unknown {
                return Err(format!(
                    "{value:?} is not a duration: its unit {unit:?} is not one of ms, s, \
                     m (minutes), h and d"
                ));
            }
            humantime::parse_duration(value).map_err(|_| not_a_duration())?
        }
    };
    if duration > MAX_DURATION {
        return Err(format!("{value:?} is longer than a year"));
    }
    Ok(duration)
}

pub(super) fn parse_positive_duration(value: &str) -> Result<Duration, String> {
    match parse_duration(value)? {
        Duration::ZERO => Err(format!("{value:?} must be longer than 0")),
        duration => Ok(duration),
    }
}

pub(super) fn parse_bool(value: &str) -> Result<bool, String> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(format!("{value:?} is not true or false")),
    }
}

/// The HTTP/2 ping interval: shorter than a second, pings would cost a
/// connection more than its calls.
pub(super) fn parse_keepalive_interval(value: &str) -> Result<Duration, String> {
    parse_interval(value, "keepalive")
}

pub(super) fn parse_watch_interval(value: &str) -> Result<Duration, String> {
    parse_interval(value, "watch")
}

/// A duration of at least a second: the `what` interval.
fn parse_interval(value: &str, what: &str) -> Result<Duration, String> {
    let interval = parse_duration(value)?;
    if interval < Duration::from_secs(1) {
        return Err(format!(
            "{value:?} is too short: the {what} interval is at least 1 second"
        ));
    }
    Ok(interval)
}

/// Counts (entries, connections, calls, bytes) beyond this are mistakes,
/// and some would overflow what they size (a semaphore's permits).
const MAX_COUNT: usize = 100_000_000;

pub(super) fn parse_count(value: &str) -> Result<usize, String> {
    match value.trim().parse::<usize>() {
        Ok(n) if n <= MAX_COUNT => Ok(n),
        Ok(_) => Err(format!("{value:?} is more than {MAX_COUNT}")),
        _ => Err(format!("{value:?} is not a whole number")),
    }
}

pub(super) fn parse_positive_count(value: &str) -> Result<usize, String> {
    match value.trim().parse::<usize>() {
        Ok(n) if n > 0 && n <= MAX_COUNT => Ok(n),
        Ok(n) if n > MAX_COUNT => Err(format!("{value:?} is more than {MAX_COUNT}")),
        _ => Err(format!("{value:?} is not a whole number greater than 0")),
    }
}

/// `text` or `json` (any case): whether log lines are JSON.
pub(super) fn parse_log_format(value: &str) -> Result<bool, String> {
    match value.trim().to_ascii_lowercase().as_str() {
        "text" => Ok(false),
        "json" => Ok(true),
        _ => Err(format!("{value:?} is not a log format: use text or json")),
    }
}

/// Python's level names (DEBUG, INFO, WARNING, ERROR, CRITICAL) as
/// `tracing` levels.
pub(super) fn parse_log_level(value: &str) -> Result<String, String> {
    let level = match value.trim().to_ascii_uppercase().as_str() {
        "TRACE" => "trace",
        "DEBUG" => "debug",
        "INFO" => "info",
        "WARN" | "WARNING" => "warn",
        "ERROR" | "CRITICAL" => "error",
        _ => {
            return Err(format!(
                "{value:?} is not a log level: use DEBUG, INFO, WARNING or ERROR"
            ));
        }
    };
    Ok(level.to_owned())
}

/// An SQS queue URL: `https://sqs.REGION.amazonaws.com/ACCOUNT/NAME`, or
/// http(s) to any host for a local endpoint.
pub(super) fn parse_queue_url(value: &str) -> Result<String, String> {
    let value = value.trim();
    let parsed = url::Url::parse(value).map_err(|_| {
        format!("{value:?} is not a URL, e.g. https://sqs.ap-east-1.amazonaws.com/123456789012/secret-events")
    })?;
    let has_queue = parsed
        .path_segments()
        .is_some_and(|mut segments| segments.any(|s| !s.is_empty()));
    if !matches!(parsed.scheme(), "http" | "https") || !has_queue {
        return Err(format!(
            "{value:?} is not an SQS queue URL, e.g. https://sqs.ap-east-1.amazonaws.com/123456789012/secret-events"
        ));
    }
    Ok(value.to_owned())
}

/// An SNS topic ARN: `arn:PARTITION:sns:REGION:ACCOUNT:NAME`.
pub(super) fn parse_topic_arn(value: &str) -> Result<String, String> {
    let value = value.trim();
    let fields: Vec<&str> = value.split(':').collect();
    let valid = fields.len() == 6
        && fields[0] == "arn"
        && fields[1].starts_with("aws")
        && fields[2] == "sns"
        && !fields[3].is_empty()
        && fields[4].len() == 12
        && fields[4].bytes().all(|b| b.is_ascii_digit())
        && !fields[5].is_empty()
        && fields[5]
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if valid {
        Ok(value.to_owned())
    } else {
        Err(format!(
            "{value:?} is not an SNS topic ARN, e.g. arn:aws:sns:ap-east-1:123456789012:secret-events"
        ))
    }
}
