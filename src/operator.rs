//! The operator's client commands: `get`, `watch` and `stats`, through
//! the `secrets-broker-client` crate like any other service.
//!
//! They reach the broker named by `--endpoint` or `BROKER_ENDPOINT`
//! (default 127.0.0.1:50051), over mutual TLS when `BROKER_CA_FILE`,
//! `BROKER_CERT_FILE` and `BROKER_KEY_FILE` are set.

use std::io::Write;

use futures::StreamExt;
use secrets_broker_client::{ClientConfig, Error, SecretsClient};

/// Where the operator commands connect.
#[derive(clap::Args, Debug, Clone)]
pub struct Connection {
    /// The broker: HOST:PORT or unix:/path [env: BROKER_ENDPOINT] [default:
    /// 127.0.0.1:50051]. Mutual TLS from BROKER_CA_FILE, BROKER_CERT_FILE,
    /// BROKER_KEY_FILE (and BROKER_TLS_DOMAIN when the broker's certificate
    /// names another host)
    #[arg(long, value_name = "ADDR")]
    pub endpoint: Option<String>,
}

/// `get`'s options.
#[derive(clap::Args, Debug, Clone)]
pub struct GetArgs {
    /// Short name, full name or ARN.
    pub name: String,
    /// A specific version id.
    #[arg(long)]
    pub version_id: Option<String>,
    /// A staging label (default AWSCURRENT).
    #[arg(long)]
    pub version_stage: Option<String>,
    /// Read from AWS now (refreshes the broker's cache).
    #[arg(long)]
    pub bypass_cache: bool,
    #[command(flatten)]
    /// Which broker, and how to reach it.
    pub connection: Connection,
}

async fn client(connection: &Connection) -> Result<SecretsClient, Error> {
    let mut config = ClientConfig::from_env()?;
    if let Some(endpoint) = &connection.endpoint {
        config.endpoint = endpoint.clone();
    }
    SecretsClient::connect(config).await
}

/// Prints the value on stdout (so it can be piped), its version on stderr.
pub async fn get(args: GetArgs) -> Result<(), Error> {
    let client = client(&args.connection).await?;
    let mut call = client.get_secret(args.name);
    if let Some(id) = args.version_id {
        call = call.version_id(id);
    }
    if let Some(stage) = args.version_stage {
        call = call.version_stage(stage);
    }
    if args.bypass_cache {
        call = call.bypass_cache();
    }
    let secret = call.await?;
    eprintln!(
        "{} version {} {:?} (cache hit: {}, stale: {})",
        printable(secret.name()),
        printable(secret.version_id()),
        secret.version_stages(),
        secret.cache().hit,
        secret.cache().stale
    );
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(secret.as_bytes());
    if secret.as_str().is_some() {
        let _ = stdout.write_all(b"\n");
    }
    Ok(())
}

/// Prints one line per event: what happened and the version, never the
/// value. Runs until interrupted or the watch ends. When the stream to the
/// broker breaks (a restart, a lost connection), the client reconnects on
/// its own; stderr says so, and why, and says when it is back, so that a
/// quiet watch is never taken for a quiet secret.
pub async fn watch(name: String, connection: Connection) -> Result<(), Error> {
    let client = client(&connection).await?;
    let mut events = client.watch_secret(name);
    let mut connected = events.connected();
    let mut notices = ConnectionNotices::default();
    let mut follower_gone = false;
    loop {
        tokio::select! {
            event = events.next() => {
                let Some(event) = event else { return Ok(()) };
                let event = event?;
                // The ARN tells a secret created again under the name
                // (RESTORED with another ARN) from the same one restored.
                let arn = event.secret.arn();
                let arn = if arn.is_empty() { String::new() } else { format!(" arn {}", printable(arn)) };
                println!(
                    "{:?} {} version {}{arn}",
                    event.kind,
                    printable(event.secret.name()),
                    printable(event.secret.version_id())
                );
            }
            changed = connected.changed(), if !follower_gone => {
                // The follower is gone: the events' end says why.
                follower_gone = changed.is_err();
                let now_connected = *connected.borrow_and_update();
                // A failure that is not retried (not found, access denied)
                // ends the stream, which says it: no "retrying" before it.
                let failure = events.last_failure().filter(|_| !now_connected);
                if failure.as_ref().is_some_and(ends_the_watch) {
                    continue;
                }
                if let Some(notice) = notices.on(now_connected) {
                    match failure {
                        Some(why) => eprintln!("{notice}: {why}"),
                        None => eprintln!("{notice}"),
                    }
                }
            }
        }
    }
}

/// A name, ARN or version id as the commands print it: as it is when it is
/// printable ASCII without spaces, else quoted with its escapes. AWS takes
/// version ids (client request tokens) of any characters: a line break in
/// one would forge a second event line, an escape sequence would reach the
/// terminal.
fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if text.bytes().all(|b| b.is_ascii_graphic()) {
        text.into()
    } else {
        format!("{text:?}").into()
    }
}

/// A failure the watch is not retried after: the stream's end says it.
fn ends_the_watch(failure: &secrets_broker_client::Error) -> bool {
    use secrets_broker_client::Error;
    matches!(
        failure,
        Error::NotFound { .. }
            | Error::AccessDenied { .. }
            | Error::InvalidArgument { .. }
            | Error::Unauthenticated { .. }
            | Error::MalformedSecret { .. }
    )
}

/// What `watch` says on stderr as the stream's connection comes and goes:
/// nothing when the first connection works at once; one line when the
/// broker cannot be reached yet or an open stream breaks, one when the
/// stream is (back) up.
#[derive(Default)]
struct ConnectionNotices {
    was_connected: bool,
    lost: bool,
}

impl ConnectionNotices {
    fn on(&mut self, connected: bool) -> Option<&'static str> {
        match (connected, self.lost) {
            (false, false) => {
                self.lost = true;
                Some(if self.was_connected {
                    "the stream to the broker broke; reconnecting (a change made meanwhile \
                     comes as Rotated once it is back)"
                } else {
                    "the broker cannot be reached yet; retrying"
                })
            }
            (true, true) => {
                self.lost = false;
                let again = std::mem::replace(&mut self.was_connected, true);
                Some(if again {
                    "the stream to the broker is back"
                } else {
                    "the stream to the broker is open"
                })
            }
            (true, false) => {
                self.was_connected = true;
                None
            }
            (false, true) => None,
        }
    }
}

/// Prints the cache counters, one per line.
pub async fn stats(connection: Connection) -> Result<(), Error> {
    let stats = client(&connection).await?.get_cache_stats().await?;
    for (name, value) in stats_lines(&stats) {
        println!("{name} {value}");
    }
    Ok(())
}

/// Every field of GetCacheStatsResponse, in the contract's order, as `stats`
/// prints them (a test checks none is left out).
fn stats_lines(
    stats: &secrets_broker_client::proto::GetCacheStatsResponse,
) -> Vec<(&'static str, String)> {
    let count = |name: &'static str, value: u64| (name, value.to_string());
    vec![
        count("total_entries", stats.total_entries),
        count("valid_entries", stats.valid_entries),
        count("expired_entries", stats.expired_entries),
        count("hits", stats.hits),
        count("misses", stats.misses),
        count("coalesced", stats.coalesced),
        count("stale_served", stats.stale_served),
        count("upstream_calls", stats.upstream_calls),
        count("upstream_errors", stats.upstream_errors),
        count("evictions", stats.evictions),
        count("watchers", stats.watchers),
        ("hit_ratio", format!("{:.4}", stats.hit_ratio)),
        count("watched_secrets", stats.watched_secrets),
        count("watch_rounds", stats.watch_rounds),
        count("watch_upstream_calls", stats.watch_upstream_calls),
        count("negative_entries", stats.negative_entries),
        count("negative_hits", stats.negative_hits),
        ("upstream_backoff", stats.upstream_backoff.to_string()),
        count("upstream_backoffs", stats.upstream_backoffs),
        count("upstream_in_flight", stats.upstream_in_flight),
        count("upstream_waiting", stats.upstream_waiting),
        count("upstream_queue_refused", stats.upstream_queue_refused),
        count("sweep_changes", stats.sweep_changes),
        count("events_received", stats.events_received),
        count("events_applied", stats.events_applied),
        count("events_ignored", stats.events_ignored),
        count("events_failed", stats.events_failed),
    ]
}

#[cfg(test)]
mod tests {
    #[test]
    fn watch_says_when_its_stream_breaks_and_when_it_is_back() {
        let mut late = super::ConnectionNotices::default();
        assert_eq!(
            late.on(false),
            Some("the broker cannot be reached yet; retrying")
        );
        assert_eq!(late.on(false), None, "said once");
        assert_eq!(late.on(true), Some("the stream to the broker is open"));

        let mut notices = super::ConnectionNotices::default();
        assert_eq!(notices.on(true), None, "the first connection is not news");
        let broke = notices.on(false).expect("a break is said");
        assert!(
            broke.contains("broke") && broke.contains("reconnecting"),
            "{broke}"
        );
        assert_eq!(notices.on(false), None, "said once per break");
        assert_eq!(notices.on(true), Some("the stream to the broker is back"));
        assert_eq!(notices.on(true), None);
        assert!(notices.on(false).is_some(), "a second break is said too");
    }

    use prost::Message;

    use super::*;

    #[test]
    fn odd_text_from_upstream_prints_quoted_on_one_line() {
        assert_eq!(printable("0123456789abcdef-v2"), "0123456789abcdef-v2");
        let forged = printable("v1\r\nRotated insurecove/other version X\u{1b}[2J");
        assert_eq!(
            forged,
            r#""v1\r\nRotated insurecove/other version X\u{1b}[2J""#
        );
    }

    #[test]
    fn stats_prints_every_field_of_the_contract_in_its_order() {
        let set = prost_types::FileDescriptorSet::decode(
            secrets_broker_client::proto::FILE_DESCRIPTOR_SET,
        )
        .unwrap();
        let message = set
            .file
            .iter()
            .flat_map(|file| &file.message_type)
            .find(|message| message.name() == "GetCacheStatsResponse")
            .unwrap();
        let mut fields: Vec<_> = message.field.iter().collect();
        fields.sort_by_key(|field| field.number());
        let contract: Vec<&str> = fields.iter().map(|field| field.name()).collect();
        let stats = secrets_broker_client::proto::GetCacheStatsResponse::default();
        let printed: Vec<&str> = stats_lines(&stats).iter().map(|(name, _)| *name).collect();
        assert_eq!(printed, contract);
    }
}
