//! The broker's settings: command-line flags over environment variables over
//! a TOML file over defaults, validated once at start.
//!
//! Every setting is read as text from the first source that has it and then
//! parsed by one function, so an error names exactly where the bad value came
//! from (`--cache-ttl`, `SECRET_CACHE_TTL`, or `cache_ttl in broker.toml`).
//! Environment names and defaults are those of the Python class the broker
//! replaces (`SECRET_PREFIX`, `SECRET_CACHE_TTL`, `AWS_DEFAULT_REGION`...).
//! A `.env` file is loaded into the environment by `main` before this runs.

use std::{
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

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
            /// Run on the embedded dev backend (the guide's five secrets, fake
            /// values), plaintext on loopback.
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
            const $konst: Setting = Setting {
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
        const FILE_SETTINGS: &[&Setting] = &[$(&$konst),*];
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
        default "30", "How often watched secrets are checked";
    region / REGION: "region", env ["AWS_DEFAULT_REGION", "AWS_REGION"], "REGION",
        default "ap-east-1", "AWS region";
    secrets_file / SECRETS_FILE: "secrets-file", env ["BROKER_SECRETS_FILE"], "FILE",
        "Serve secrets from this JSON or TOML file instead of AWS";
    log_level / LOG_LEVEL: "log-level", env ["LOG_LEVEL"], "LEVEL", default "INFO",
        "Log level: DEBUG, INFO, WARNING, ERROR";
    metrics_secret_names / METRICS_SECRET_NAMES: "metrics-secret-names",
        env ["BROKER_METRICS_SECRET_NAMES"], "BOOL", default "false",
        "Label metrics with secret names (cardinality, privacy)",
        [, num_args = 0..=1, default_missing_value = "true"];
    max_connections / MAX_CONNECTIONS: "max-connections", env ["BROKER_MAX_CONNECTIONS"], "COUNT",
        default "10000", "Most open connections; more are closed at once";
    max_concurrent_calls_per_connection / MAX_CALLS_PER_CONNECTION:
        "max-concurrent-calls-per-connection",
        env ["BROKER_MAX_CONCURRENT_CALLS_PER_CONNECTION"], "COUNT", default "1024",
        "Most HTTP/2 streams (calls, watches, health, reflection) in flight on one connection; more get RESOURCE_EXHAUSTED";
    max_message_size / MAX_MESSAGE_SIZE: "max-message-size", env ["BROKER_MAX_MESSAGE_SIZE"],
        "BYTES", default "262144", "Largest request accepted, bytes; larger get RESOURCE_EXHAUSTED";
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

/// The cache's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheSettings {
    /// How long a value is served without asking upstream.
    pub ttl: Duration,
    /// How many entries at most.
    pub max_entries: usize,
    /// How long past its TTL a value may still be served when the upstream
    /// fails transiently.
    pub max_stale: Duration,
    /// How long a caller of an expired entry waits for its renewal before
    /// it gets the stale value.
    pub upstream_wait: Duration,
    /// How long a NOT_FOUND is remembered (zero: not at all).
    pub negative_ttl: Duration,
    /// How much of the upstream the cache may use at once.
    pub upstream: UpstreamLimits,
}

/// How much of the upstream the broker may use at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamLimits {
    /// Calls under way at once.
    pub concurrency: usize,
    /// Calls waiting for a turn.
    pub queue: usize,
}

/// What the broker accepts, so that no caller can make it fall over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Open connections at most.
    pub max_connections: usize,
    /// HTTP/2 streams in flight per connection at most.
    pub max_calls_per_connection: usize,
    /// Largest request, bytes.
    pub max_message_size: usize,
    /// Longest a call may take to answer.
    pub call_timeout: Duration,
    /// HTTP/2 ping interval.
    pub keepalive_interval: Duration,
    /// How long calls in flight may finish after SIGTERM.
    pub shutdown_grace: Duration,
    /// How long a connection may take to send its HTTP/2 preface.
    pub first_request_timeout: Duration,
}

/// Where the broker listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A unix socket path.
    Unix(PathBuf),
}

impl ListenAddr {
    /// Loopback addresses and unix sockets cannot be reached from another
    /// machine, so plaintext is acceptable there.
    pub fn is_local(&self) -> bool {
        match self {
            Self::Tcp(addr) => addr.ip().is_loopback(),
            Self::Unix(_) => true,
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(addr) => write!(f, "{addr}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// The files of the server's TLS identity and of the CA client
/// certificates must chain to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server certificate chain.
    pub cert: PathBuf,
    /// The server certificate's key.
    pub key: PathBuf,
    /// The CA bundle client certificates must chain to.
    pub client_ca: PathBuf,
}

/// Where secrets come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendChoice {
    /// The built-in dev secrets (`--dev`): the guide's five, fake values.
    Dev,
    /// A JSON or TOML secrets file (`--secrets-file`).
    File {
        /// The file.
        path: PathBuf,
    },
    /// AWS Secrets Manager.
    Aws {
        /// The AWS region.
        region: String,
    },
}

/// Validated settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Run on the built-in dev secrets.
    pub dev: bool,
    /// Where to listen.
    pub listen: ListenAddr,
    /// Mutual TLS, when on.
    pub tls: Option<TlsFiles>,
    /// The policy file, if any.
    pub policy: Option<PathBuf>,
    /// Where the probes and metrics are served, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// The environment of the typed configs' default names.
    pub environment: String,
    /// The prefix of short names.
    pub secret_prefix: String,
    /// The cache's limits.
    pub cache: CacheSettings,
    /// How often the change detector and the upstream check run.
    pub watch_interval: Duration,
    /// Where secrets come from.
    pub backend: BackendChoice,
    /// A `tracing` filter directive, e.g. `info`.
    pub log_level: String,
    /// Whether metrics may be labelled with secret names.
    pub metrics_secret_names: bool,
    /// What the broker accepts.
    pub limits: Limits,
    /// The config file read, if any.
    pub config_file: Option<PathBuf>,
}

/// A setting that could not be used; says where it came from and why.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // each variant's #[error] message is its documentation
pub enum ConfigError {
    #[error("{origin}: {problem}")]
    Invalid { origin: Origin, problem: String },
    #[error("cannot read config file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    ParseFile { path: PathBuf, message: String },
    #[error("config file {path}: unknown setting `{key}` (known: {known})")]
    UnknownKey {
        path: PathBuf,
        key: String,
        known: String,
    },
    #[error("{0}")]
    Rule(String),
}

/// Where a setting's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A command-line flag (its name, without `--`).
    Flag(&'static str),
    /// An environment variable.
    Env(&'static str),
    /// A key of the config file.
    File {
        /// The key.
        key: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// The setting's default (named by its flag).
    Default(&'static str),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Flag(flag) => write!(f, "--{flag}"),
            Self::Env(var) => f.write_str(var),
            Self::File { key, path } => write!(f, "{key} in {}", path.display()),
            Self::Default(flag) => write!(f, "the default of --{flag}"),
        }
    }
}

/// One setting's names in each source, and its default.
struct Setting {
    flag: &'static str,
    env: &'static [&'static str],
    key: &'static str,
    default: Option<&'static str>,
}

/// The sources below the flags.
struct Sources<'a> {
    env: &'a dyn Fn(&str) -> Option<String>,
    file: Option<(PathBuf, toml::Table)>,
}

impl Sources<'_> {
    /// The first value found: flag, then environment, then file.
    fn find(&self, flag: Option<&str>, setting: &Setting) -> Option<(String, Origin)> {
        if let Some(value) = flag {
            return Some((value.to_owned(), Origin::Flag(setting.flag)));
        }
        for var in setting.env {
            if let Some(value) = (self.env)(var).filter(|v| !v.is_empty()) {
                return Some((value, Origin::Env(var)));
            }
        }
        let (path, table) = self.file.as_ref()?;
        let value = match table.get(setting.key)? {
            toml::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        Some((
            value,
            Origin::File {
                key: setting.key,
                path: path.clone(),
            },
        ))
    }

    /// The setting parsed, or its default.
    fn get<T>(
        &self,
        flag: Option<&str>,
        setting: &Setting,
        parse: fn(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        let (value, origin) = self.find(flag, setting).unwrap_or_else(|| {
            let default = setting.default.unwrap_or_default();
            (default.to_owned(), Origin::Default(setting.flag))
        });
        parse(&value).map_err(|problem| ConfigError::Invalid { origin, problem })
    }

    /// The setting parsed, if any source has it.
    fn optional<T>(
        &self,
        flag: Option<&str>,
        setting: &Setting,
        parse: fn(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        self.find(flag, setting)
            .map(|(value, origin)| {
                parse(&value).map_err(|problem| ConfigError::Invalid { origin, problem })
            })
            .transpose()
    }
}

impl Settings {
    /// Resolves and validates the settings from the flags, an environment
    /// lookup (`std::env::var` in the binary) and the config file it names.
    pub fn resolve(
        args: &BrokerArgs,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let config_file = args.config.clone().or_else(|| {
            env("BROKER_CONFIG")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        });
        let file = config_file
            .as_deref()
            .map(|path| read_config_file(path).map(|table| (path.to_owned(), table)))
            .transpose()?;
        let sources = Sources { env, file };

        let listen = sources.get(args.listen.as_deref(), &LISTEN, parse_listen)?;
        let tls = resolve_tls(args, &sources)?;
        let secrets_file =
            sources.optional(args.secrets_file.as_deref(), &SECRETS_FILE, parse_path)?;
        let backend = if let Some(path) = secrets_file {
            BackendChoice::File { path }
        } else if args.dev {
            BackendChoice::Dev
        } else {
            BackendChoice::Aws {
                region: sources.get(args.region.as_deref(), &REGION, parse_word)?,
            }
        };
        let settings = Settings {
            dev: args.dev,
            listen,
            tls,
            policy: sources.optional(args.policy.as_deref(), &POLICY, parse_path)?,
            metrics_listen: sources.optional(
                args.metrics_listen.as_deref(),
                &METRICS_LISTEN,
                parse_socket_addr,
            )?,
            environment: sources.get(args.environment.as_deref(), &ENVIRONMENT, parse_name_part)?,
            secret_prefix: sources.get(
                args.secret_prefix.as_deref(),
                &SECRET_PREFIX,
                parse_name_part,
            )?,
            cache: resolve_cache(args, &sources)?,
            watch_interval: sources.get(
                args.watch_interval.as_deref(),
                &WATCH_INTERVAL,
                parse_watch_interval,
            )?,
            backend,
            log_level: sources.get(args.log_level.as_deref(), &LOG_LEVEL, parse_log_level)?,
            metrics_secret_names: sources.get(
                args.metrics_secret_names.as_deref(),
                &METRICS_SECRET_NAMES,
                parse_bool,
            )?,
            limits: resolve_limits(args, &sources)?,
            config_file,
        };
        settings.check_rules()?;
        Ok(settings)
    }

    /// Rules that involve more than one setting.
    fn check_rules(&self) -> Result<(), ConfigError> {
        if let (Some(_), ListenAddr::Unix(_)) = (&self.tls, &self.listen) {
            return Err(ConfigError::Rule(format!(
                "mutual TLS is served on TCP addresses only, not on {}",
                self.listen
            )));
        }
        if self.tls.is_none() && !self.listen.is_local() {
            return Err(ConfigError::Rule(format!(
                "refusing to listen on {} without TLS: plaintext is only allowed on a loopback \
                 address or a unix socket; give --tls-cert, --tls-key and --tls-client-ca \
                 (mutual TLS) to listen there",
                self.listen
            )));
        }
        Ok(())
    }
}

fn resolve_cache(args: &BrokerArgs, sources: &Sources<'_>) -> Result<CacheSettings, ConfigError> {
    Ok(CacheSettings {
        ttl: sources.get(args.cache_ttl.as_deref(), &CACHE_TTL, parse_duration)?,
        max_entries: sources.get(
            args.cache_max_entries.as_deref(),
            &CACHE_MAX_ENTRIES,
            parse_positive_count,
        )?,
        max_stale: sources.get(
            args.cache_max_stale.as_deref(),
            &CACHE_MAX_STALE,
            parse_duration,
        )?,
        upstream_wait: sources.get(
            args.upstream_wait.as_deref(),
            &UPSTREAM_WAIT,
            parse_duration,
        )?,
        negative_ttl: sources.get(
            args.cache_negative_ttl.as_deref(),
            &CACHE_NEGATIVE_TTL,
            parse_duration,
        )?,
        upstream: UpstreamLimits {
            concurrency: sources.get(
                args.upstream_concurrency.as_deref(),
                &UPSTREAM_CONCURRENCY,
                parse_positive_count,
            )?,
            queue: sources.get(args.upstream_queue.as_deref(), &UPSTREAM_QUEUE, parse_count)?,
        },
    })
}

fn resolve_limits(args: &BrokerArgs, sources: &Sources<'_>) -> Result<Limits, ConfigError> {
    Ok(Limits {
        max_connections: sources.get(
            args.max_connections.as_deref(),
            &MAX_CONNECTIONS,
            parse_positive_count,
        )?,
        max_calls_per_connection: sources.get(
            args.max_concurrent_calls_per_connection.as_deref(),
            &MAX_CALLS_PER_CONNECTION,
            parse_positive_count,
        )?,
        max_message_size: sources.get(
            args.max_message_size.as_deref(),
            &MAX_MESSAGE_SIZE,
            parse_positive_count,
        )?,
        call_timeout: sources.get(
            args.call_timeout.as_deref(),
            &CALL_TIMEOUT,
            parse_positive_duration,
        )?,
        keepalive_interval: sources.get(
            args.keepalive_interval.as_deref(),
            &KEEPALIVE_INTERVAL,
            parse_positive_duration,
        )?,
        shutdown_grace: sources.get(
            args.shutdown_grace.as_deref(),
            &SHUTDOWN_GRACE,
            parse_duration,
        )?,
        first_request_timeout: sources.get(
            args.first_request_timeout.as_deref(),
            &FIRST_REQUEST_TIMEOUT,
            parse_positive_duration,
        )?,
    })
}

fn resolve_tls(args: &BrokerArgs, sources: &Sources<'_>) -> Result<Option<TlsFiles>, ConfigError> {
    let cert = sources.optional(args.tls_cert.as_deref(), &TLS_CERT, parse_path)?;
    let key = sources.optional(args.tls_key.as_deref(), &TLS_KEY, parse_path)?;
    let client_ca = sources.optional(args.tls_client_ca.as_deref(), &TLS_CLIENT_CA, parse_path)?;
    match (cert, key, client_ca) {
        (None, None, None) => Ok(None),
        (Some(cert), Some(key), Some(client_ca)) => Ok(Some(TlsFiles {
            cert,
            key,
            client_ca,
        })),
        (cert, key, client_ca) => {
            let missing: Vec<&str> = [
                (cert.is_none(), "--tls-cert (BROKER_TLS_CERT)"),
                (key.is_none(), "--tls-key (BROKER_TLS_KEY)"),
                (
                    client_ca.is_none(),
                    "--tls-client-ca (BROKER_TLS_CLIENT_CA)",
                ),
            ]
            .into_iter()
            .filter_map(|(absent, name)| absent.then_some(name))
            .collect();
            Err(ConfigError::Rule(format!(
                "mutual TLS needs a certificate, its key and a client CA; missing: {}",
                missing.join(", ")
            )))
        }
    }
}

fn read_config_file(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: path.to_owned(),
        source,
    })?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::ParseFile {
        path: path.to_owned(),
        message: e.message().to_owned(),
    })?;
    let known: Vec<&str> = FILE_SETTINGS.iter().map(|s| s.key).collect();
    if let Some(key) = table.keys().find(|key| !known.contains(&key.as_str())) {
        return Err(ConfigError::UnknownKey {
            path: path.to_owned(),
            key: key.clone(),
            known: known.join(", "),
        });
    }
    Ok(table)
}

fn parse_listen(value: &str) -> Result<ListenAddr, String> {
    match value.strip_prefix("unix:") {
        Some("") => Err("a unix socket needs a path, e.g. unix:/run/secrets-broker.sock".into()),
        Some(path) => Ok(ListenAddr::Unix(PathBuf::from(path))),
        None => parse_socket_addr(value).map(ListenAddr::Tcp),
    }
}

fn parse_socket_addr(value: &str) -> Result<SocketAddr, String> {
    value.parse().map_err(|_| {
        format!("{value:?} is not an address of the form HOST:PORT, e.g. 127.0.0.1:50051")
    })
}

fn parse_path(value: &str) -> Result<PathBuf, String> {
    Ok(PathBuf::from(value))
}

fn parse_word(value: &str) -> Result<String, String> {
    let value = value.trim();
    if value.is_empty() || value.contains(char::is_whitespace) {
        return Err(format!("{value:?} must be one word"));
    }
    Ok(value.to_owned())
}

/// A prefix or environment: part of a secret name.
fn parse_name_part(value: &str) -> Result<String, String> {
    let value = value.trim().trim_matches('/');
    let valid = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/_+=.@-".contains(c));
    if valid {
        Ok(value.to_owned())
    } else {
        Err(format!(
            "{value:?} must be letters, digits and /_+=.@- (it becomes part of secret names)"
        ))
    }
}

/// Durations beyond a year are mistakes, and sums of them (TTL + stale
/// bound) must not overflow.
const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

/// Whole seconds (the guide's form: "300"), or a unit: "5m", "90s", "1h".
fn parse_duration(value: &str) -> Result<Duration, String> {
    let value = value.trim();
    let duration = match value.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => humantime::parse_duration(value).map_err(|_| {
            format!("{value:?} is not a duration: give seconds (e.g. 300) or e.g. 5m")
        })?,
    };
    if duration > MAX_DURATION {
        return Err(format!("{value:?} is longer than a year"));
    }
    Ok(duration)
}

fn parse_positive_duration(value: &str) -> Result<Duration, String> {
    match parse_duration(value)? {
        Duration::ZERO => Err(format!("{value:?} must be longer than 0")),
        duration => Ok(duration),
    }
}

fn parse_bool(value: &str) -> Result<bool, String> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(format!("{value:?} is not true or false")),
    }
}

fn parse_watch_interval(value: &str) -> Result<Duration, String> {
    let interval = parse_duration(value)?;
    if interval < Duration::from_secs(1) {
        return Err(format!(
            "{value:?} is too short: the watch interval is at least 1 second"
        ));
    }
    Ok(interval)
}

/// Counts (entries, connections, calls, bytes) beyond this are mistakes,
/// and some would overflow what they size (a semaphore's permits).
const MAX_COUNT: usize = 100_000_000;

fn parse_count(value: &str) -> Result<usize, String> {
    match value.trim().parse::<usize>() {
        Ok(n) if n <= MAX_COUNT => Ok(n),
        Ok(_) => Err(format!("{value:?} is more than {MAX_COUNT}")),
        _ => Err(format!("{value:?} is not a whole number")),
    }
}

fn parse_positive_count(value: &str) -> Result<usize, String> {
    match value.trim().parse::<usize>() {
        Ok(n) if n > 0 && n <= MAX_COUNT => Ok(n),
        Ok(n) if n > MAX_COUNT => Err(format!("{value:?} is more than {MAX_COUNT}")),
        _ => Err(format!("{value:?} is not a whole number greater than 0")),
    }
}

/// The guide's level names (Python's) as `tracing` levels.
fn parse_log_level(value: &str) -> Result<String, String> {
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

#[cfg(test)]
mod tests;
