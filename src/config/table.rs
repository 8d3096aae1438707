//! The settings table: every setting named once (see `settings!`).

use std::path::PathBuf;

/// Every setting, named once: its field (and file key), flag, environment
/// variables, value name, default and help. `settings!` makes of it the
/// command-line flags (`BrokerArgs`, with the help text clap prints), the
/// `Setting` each value is looked up with, and the keys a config file may
/// hold.
macro_rules! settings {
    ($(
        $field:ident / $konst:ident: $flag:literal, env [$env0:literal $(, $envs:literal)*],
        $value_name:literal $(, default $default:literal)?, $help:literal $(, [$($extra:tt)*])?;
    )*) => {
        /// Flags shared by `serve` and `check`. Each overrides its environment
        /// variable, which overrides the config file.
        #[derive(clap::Args, Debug, Default, Clone)]
        pub struct BrokerArgs {
            /// Run on the embedded dev backend (five typical secrets with fake
            /// values); --secrets-file wins over it, and TLS flags still apply.
            #[arg(long)]
            pub dev: bool,
            /// TOML config file [env: BROKER_CONFIG]
            #[arg(long, value_name = "FILE")]
            pub config: Option<PathBuf>,
            $(
                #[doc = $help]
                #[arg(
                    long = $flag,
                    value_name = $value_name,
                    help = concat!($help, " [env: ", $env0, "]" $(, " [default: ", $default, "]")?)
                    $($($extra)*)?
                )]
                pub $field: Option<String>,
            )*
        }

        $(
            pub(super) const $konst: Setting = Setting {
                flag: $flag,
                env: &[$env0 $(, $envs)*],
                key: stringify!($field),
                default: {
                    #[allow(unused_mut, unused_assignments)]
                    let mut default: Option<&str> = None;
                    $(default = Some($default);)?
                    default
                },
            };
        )*

        /// Every setting a config file may hold.
        pub(super) const FILE_SETTINGS: &[&Setting] = &[$(&$konst),*];
    };
}

settings! {
    listen / LISTEN: "listen", env ["BROKER_LISTEN"], "ADDR", default "127.0.0.1:50051",
        "Address to listen on: HOST:PORT or unix:/path";
    tls_cert / TLS_CERT: "tls-cert", env ["BROKER_TLS_CERT"], "FILE",
        "Server certificate chain, PEM";
    tls_key / TLS_KEY: "tls-key", env ["BROKER_TLS_KEY"], "FILE", "Server private key, PEM";
    tls_client_ca / TLS_CLIENT_CA: "tls-client-ca", env ["BROKER_TLS_CLIENT_CA"], "FILE",
        "CA bundle that client certificates must chain to, PEM";
    policy / POLICY: "policy", env ["BROKER_POLICY"], "FILE", "Authorization policy, TOML";
    metrics_listen / METRICS_LISTEN: "metrics-listen", env ["BROKER_METRICS_LISTEN"], "ADDR",
        "Address of the Prometheus endpoint and probes";
    environment / ENVIRONMENT: "environment", env ["SECRET_ENVIRONMENT"], "NAME",
        default "production", "Environment used in typed configs' default names";
    secret_prefix / SECRET_PREFIX: "secret-prefix", env ["SECRET_PREFIX"], "PREFIX",
        default "insurecove", "Prefix added to short secret names";
    cache_ttl / CACHE_TTL: "cache-ttl", env ["SECRET_CACHE_TTL"], "DURATION", default "300",
        "Cache TTL, seconds or e.g. \"5m\"";
    cache_max_entries / CACHE_MAX_ENTRIES: "cache-max-entries", env ["SECRET_CACHE_MAX_ENTRIES"],
        "COUNT", default "10000", "Most entries the cache holds";
    cache_max_stale / CACHE_MAX_STALE: "cache-max-stale", env ["SECRET_CACHE_MAX_STALE"],
        "DURATION", default "3600",
        "How long past its TTL a value may be served while the upstream fails";
    upstream_wait / UPSTREAM_WAIT: "upstream-wait", env ["SECRET_UPSTREAM_WAIT"], "DURATION",
        default "1",
        "Longest a caller of an expired entry waits for its renewal before it gets the stale value";
    upstream_concurrency / UPSTREAM_CONCURRENCY: "upstream-concurrency",
        env ["SECRET_UPSTREAM_CONCURRENCY"], "COUNT", default "32",
        "Most upstream calls under way at once";
    upstream_queue / UPSTREAM_QUEUE: "upstream-queue", env ["SECRET_UPSTREAM_QUEUE"], "COUNT",
        default "1000", "Most upstream calls waiting for a turn; more fail with RESOURCE_EXHAUSTED";
    cache_negative_ttl / CACHE_NEGATIVE_TTL: "cache-negative-ttl",
        env ["SECRET_CACHE_NEGATIVE_TTL"], "DURATION", default "30",
        "How long a NOT_FOUND answer is remembered; 0 turns it off";
    watch_interval / WATCH_INTERVAL: "watch-interval", env ["SECRET_WATCH_INTERVAL"], "DURATION",
        default "30", "How often the metadata sweep checks every cached or watched secret, and the upstream health check runs (at least 1 s)";
    events_queue_url / EVENTS_QUEUE_URL: "events-queue-url", env ["SECRET_EVENTS_QUEUE_URL"],
        "URL", "SQS queue of Secrets Manager events (EventBridge or SNS-wrapped) to long-poll; an event makes the broker re-read the secret";
    events_topic_arn / EVENTS_TOPIC_ARN: "events-topic-arn", env ["SECRET_EVENTS_TOPIC_ARN"],
        "ARN",
        "SNS topic of Secrets Manager events: the broker subscribes a queue of its own (fan-out to replicas)";
    region / REGION: "region", env ["AWS_DEFAULT_REGION", "AWS_REGION"], "REGION",
        default "ap-east-1", "AWS region (AWS_REGION is read too, after AWS_DEFAULT_REGION)";
    secrets_file / SECRETS_FILE: "secrets-file", env ["BROKER_SECRETS_FILE"], "FILE",
        "Serve secrets from this JSON or TOML file instead of AWS";
    log_level / LOG_LEVEL: "log-level", env ["LOG_LEVEL"], "LEVEL", default "INFO",
        "Log level: DEBUG, INFO, WARNING, ERROR (TRACE, and WARN and CRITICAL as WARNING and ERROR, are taken too)";
    log_format / LOG_FORMAT: "log-format", env ["LOG_FORMAT"], "FORMAT", default "text",
        "Log lines as text, or json (one JSON object per line)";
    metrics_secret_names / METRICS_SECRET_NAMES: "metrics-secret-names",
        env ["BROKER_METRICS_SECRET_NAMES"], "BOOL", default "false",
        "Label metrics with secret names (cardinality, privacy)",
        [, num_args = 0..=1, default_missing_value = "true"];
    max_connections / MAX_CONNECTIONS: "max-connections", env ["BROKER_MAX_CONNECTIONS"], "COUNT",
        default "10000", "Most open connections; when full, the connection longest in its handshake gives its slot up, and with every slot held by an established connection more are closed at once";
    max_concurrent_calls_per_connection / MAX_CALLS_PER_CONNECTION:
        "max-concurrent-calls-per-connection",
        env ["BROKER_MAX_CONCURRENT_CALLS_PER_CONNECTION"], "COUNT", default "1024",
        "Most HTTP/2 streams (calls, watches, health, reflection) in flight on one connection; more get RESOURCE_EXHAUSTED";
    max_concurrent_calls / MAX_CALLS: "max-concurrent-calls",
        env ["BROKER_MAX_CONCURRENT_CALLS"], "COUNT", default "8192",
        "Most HTTP/2 streams in flight over every connection (WatchSecret streams: half of them at most, health watches an eighth, reflection streams a sixteenth); past it a new stream takes the slot of the oldest one still waiting for its request, or gets RESOURCE_EXHAUSTED";
    max_message_size / MAX_MESSAGE_SIZE: "max-message-size", env ["BROKER_MAX_MESSAGE_SIZE"],
        "BYTES", default "262144", "Largest request accepted, bytes; larger get RESOURCE_EXHAUSTED";
    max_request_memory / MAX_REQUEST_MEMORY: "max-request-memory",
        env ["BROKER_MAX_REQUEST_MEMORY"], "BYTES", default "67108864",
        "Most bytes of unfinished request messages held at once, over all calls; past it calls get RESOURCE_EXHAUSTED";
    call_timeout / CALL_TIMEOUT: "call-timeout", env ["BROKER_CALL_TIMEOUT"], "DURATION",
        default "30", "Longest a call may take to answer (DEADLINE_EXCEEDED past it)";
    keepalive_interval / KEEPALIVE_INTERVAL: "keepalive-interval",
        env ["BROKER_KEEPALIVE_INTERVAL"], "DURATION", default "30",
        "HTTP/2 ping interval, so dead peers (idle watchers) are noticed";
    shutdown_grace / SHUTDOWN_GRACE: "shutdown-grace", env ["BROKER_SHUTDOWN_GRACE"], "DURATION",
        default "10", "On SIGTERM, how long calls in flight may take to finish";
    first_request_timeout / FIRST_REQUEST_TIMEOUT: "first-request-timeout",
        env ["BROKER_FIRST_REQUEST_TIMEOUT"], "DURATION", default "10",
        "How long a new connection may take to finish its TLS handshake and send its HTTP/2 preface before it is dropped";
}

/// One setting's names in each source, and its default.
pub(super) struct Setting {
    pub(super) flag: &'static str,
    pub(super) env: &'static [&'static str],
    pub(super) key: &'static str,
    pub(super) default: Option<&'static str>,
}

/// How a message names a setting that may have come from any source:
/// `--flag (ENV)`, and with `{:#}` its config file key too,
/// `--flag (ENV, key)`.
impl std::fmt::Display for Setting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "--{} ({}", self.flag, self.env[0])?;
        if f.alternate() {
            write!(f, ", {}", self.key)?;
        }
        f.write_str(")")
    }
}
