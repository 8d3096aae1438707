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

use crate::{backend::bounded::UpstreamLimits, cache::CacheSettings};

/// The address the broker listens on by default.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";

/// Flags shared by `serve` and `check`. Each overrides its environment
/// variable, which overrides the config file.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct BrokerArgs {
    /// Run on the embedded dev backend (the guide's five secrets, fake
    /// values), plaintext on loopback.
    #[arg(long)]
    pub dev: bool,
    /// Address to listen on: HOST:PORT or unix:/path [env: BROKER_LISTEN] [default: 127.0.0.1:50051]
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// TOML config file [env: BROKER_CONFIG]
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Server certificate chain, PEM [env: BROKER_TLS_CERT]
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<String>,
    /// Server private key, PEM [env: BROKER_TLS_KEY]
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<String>,
    /// CA bundle that client certificates must chain to, PEM [env: BROKER_TLS_CLIENT_CA]
    #[arg(long, value_name = "FILE")]
    pub tls_client_ca: Option<String>,
    /// Authorization policy, TOML [env: BROKER_POLICY]
    #[arg(long, value_name = "FILE")]
    pub policy: Option<String>,
    /// Address of the Prometheus endpoint [env: BROKER_METRICS_LISTEN]
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// Environment used in typed configs' default names [env: SECRET_ENVIRONMENT] [default: production]
    #[arg(long, value_name = "NAME")]
    pub environment: Option<String>,
    /// Prefix added to short secret names [env: SECRET_PREFIX] [default: insurecove]
    #[arg(long, value_name = "PREFIX")]
    pub secret_prefix: Option<String>,
    /// Cache TTL, seconds or e.g. "5m" [env: SECRET_CACHE_TTL] [default: 300]
    #[arg(long, value_name = "DURATION")]
    pub cache_ttl: Option<String>,
    /// Most entries the cache holds [env: SECRET_CACHE_MAX_ENTRIES] [default: 10000]
    #[arg(long, value_name = "COUNT")]
    pub cache_max_entries: Option<String>,
    /// How long past its TTL a value may be served while the upstream fails [env: SECRET_CACHE_MAX_STALE] [default: 3600]
    #[arg(long, value_name = "DURATION")]
    pub cache_max_stale: Option<String>,
    /// Longest a caller of an expired entry waits for its renewal before it gets the stale value [env: SECRET_UPSTREAM_WAIT] [default: 1]
    #[arg(long, value_name = "DURATION")]
    pub upstream_wait: Option<String>,
    /// Most upstream calls under way at once [env: SECRET_UPSTREAM_CONCURRENCY] [default: 32]
    #[arg(long, value_name = "COUNT")]
    pub upstream_concurrency: Option<String>,
    /// Most upstream calls waiting for a turn; more fail with RESOURCE_EXHAUSTED [env: SECRET_UPSTREAM_QUEUE] [default: 1000]
    #[arg(long, value_name = "COUNT")]
    pub upstream_queue: Option<String>,
    /// How long a NOT_FOUND answer is remembered; 0 turns it off [env: SECRET_CACHE_NEGATIVE_TTL] [default: 30]
    #[arg(long, value_name = "DURATION")]
    pub cache_negative_ttl: Option<String>,
    /// How often watched secrets are checked [env: SECRET_WATCH_INTERVAL] [default: 30]
    #[arg(long, value_name = "DURATION")]
    pub watch_interval: Option<String>,
    /// AWS region [env: AWS_DEFAULT_REGION] [default: ap-east-1]
    #[arg(long, value_name = "REGION")]
    pub region: Option<String>,
    /// Serve secrets from this JSON or TOML file instead of AWS [env: BROKER_SECRETS_FILE]
    #[arg(long, value_name = "FILE")]
    pub secrets_file: Option<String>,
    /// Log level: DEBUG, INFO, WARNING, ERROR [env: LOG_LEVEL] [default: INFO]
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Label metrics with secret names (cardinality, privacy) [env: BROKER_METRICS_SECRET_NAMES]
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub metrics_secret_names: Option<String>,
    /// Most open connections; more are closed at once [env: BROKER_MAX_CONNECTIONS] [default: 10000]
    #[arg(long, value_name = "COUNT")]
    pub max_connections: Option<String>,
    /// Most calls (streams included) in flight on one connection; more get RESOURCE_EXHAUSTED [env: BROKER_MAX_CONCURRENT_CALLS_PER_CONNECTION] [default: 1024]
    #[arg(long, value_name = "COUNT")]
    pub max_concurrent_calls_per_connection: Option<String>,
    /// Largest request accepted, bytes; larger get RESOURCE_EXHAUSTED [env: BROKER_MAX_MESSAGE_SIZE] [default: 262144]
    #[arg(long, value_name = "BYTES")]
    pub max_message_size: Option<String>,
    /// Longest a unary call may take [env: BROKER_CALL_TIMEOUT] [default: 30]
    #[arg(long, value_name = "DURATION")]
    pub call_timeout: Option<String>,
    /// HTTP/2 ping interval, so dead peers (idle watchers) are noticed [env: BROKER_KEEPALIVE_INTERVAL] [default: 30]
    #[arg(long, value_name = "DURATION")]
    pub keepalive_interval: Option<String>,
    /// On SIGTERM, how long calls in flight may take to finish [env: BROKER_SHUTDOWN_GRACE] [default: 10]
    #[arg(long, value_name = "DURATION")]
    pub shutdown_grace: Option<String>,
    /// How long a new connection may take to finish its TLS handshake and send its HTTP/2 preface before it is dropped [env: BROKER_FIRST_REQUEST_TIMEOUT] [default: 10]
    #[arg(long, value_name = "DURATION")]
    pub first_request_timeout: Option<String>,
}

/// What the broker accepts, so that no caller can make it fall over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    pub max_calls_per_connection: usize,
    pub max_message_size: usize,
    pub call_timeout: Duration,
    pub keepalive_interval: Duration,
    pub shutdown_grace: Duration,
    pub first_request_timeout: Duration,
}

/// Where the broker listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
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
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

/// Where secrets come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendChoice {
    /// The embedded file backend: the dev seed, or a file.
    File { path: Option<PathBuf> },
    /// AWS Secrets Manager.
    Aws { region: String },
}

/// Validated settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub dev: bool,
    pub listen: ListenAddr,
    pub tls: Option<TlsFiles>,
    pub policy: Option<PathBuf>,
    pub metrics_listen: Option<SocketAddr>,
    pub environment: String,
    pub secret_prefix: String,
    pub cache: CacheSettings,
    pub watch_interval: Duration,
    pub backend: BackendChoice,
    /// A `tracing` filter directive, e.g. `info`.
    pub log_level: String,
    pub metrics_secret_names: bool,
    pub limits: Limits,
    /// The config file read, if any.
    pub config_file: Option<PathBuf>,
}

/// A setting that could not be used; says where it came from and why.
#[derive(Debug, thiserror::Error)]
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
    Flag(&'static str),
    Env(&'static str),
    File { key: &'static str, path: PathBuf },
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

/// One setting's names in each source (the file's key is the flag's name
/// with underscores).
struct Setting {
    flag: &'static str,
    env: &'static [&'static str],
    key: &'static str,
}

const LISTEN: Setting = setting("listen", "listen", &["BROKER_LISTEN"]);
const TLS_CERT: Setting = setting("tls-cert", "tls_cert", &["BROKER_TLS_CERT"]);
const TLS_KEY: Setting = setting("tls-key", "tls_key", &["BROKER_TLS_KEY"]);
const TLS_CLIENT_CA: Setting = setting("tls-client-ca", "tls_client_ca", &["BROKER_TLS_CLIENT_CA"]);
const POLICY: Setting = setting("policy", "policy", &["BROKER_POLICY"]);
const METRICS_LISTEN: Setting = setting(
    "metrics-listen",
    "metrics_listen",
    &["BROKER_METRICS_LISTEN"],
);
const ENVIRONMENT: Setting = setting("environment", "environment", &["SECRET_ENVIRONMENT"]);
const SECRET_PREFIX: Setting = setting("secret-prefix", "secret_prefix", &["SECRET_PREFIX"]);
const CACHE_TTL: Setting = setting("cache-ttl", "cache_ttl", &["SECRET_CACHE_TTL"]);
const CACHE_MAX_ENTRIES: Setting = setting(
    "cache-max-entries",
    "cache_max_entries",
    &["SECRET_CACHE_MAX_ENTRIES"],
);
const CACHE_MAX_STALE: Setting = setting(
    "cache-max-stale",
    "cache_max_stale",
    &["SECRET_CACHE_MAX_STALE"],
);
const UPSTREAM_WAIT: Setting = setting("upstream-wait", "upstream_wait", &["SECRET_UPSTREAM_WAIT"]);
const UPSTREAM_CONCURRENCY: Setting = setting(
    "upstream-concurrency",
    "upstream_concurrency",
    &["SECRET_UPSTREAM_CONCURRENCY"],
);
const UPSTREAM_QUEUE: Setting = setting(
    "upstream-queue",
    "upstream_queue",
    &["SECRET_UPSTREAM_QUEUE"],
);
const CACHE_NEGATIVE_TTL: Setting = setting(
    "cache-negative-ttl",
    "cache_negative_ttl",
    &["SECRET_CACHE_NEGATIVE_TTL"],
);
const WATCH_INTERVAL: Setting = setting(
    "watch-interval",
    "watch_interval",
    &["SECRET_WATCH_INTERVAL"],
);
const REGION: Setting = setting("region", "region", &["AWS_DEFAULT_REGION", "AWS_REGION"]);
const SECRETS_FILE: Setting = setting("secrets-file", "secrets_file", &["BROKER_SECRETS_FILE"]);
const LOG_LEVEL: Setting = setting("log-level", "log_level", &["LOG_LEVEL"]);
const METRICS_SECRET_NAMES: Setting = setting(
    "metrics-secret-names",
    "metrics_secret_names",
    &["BROKER_METRICS_SECRET_NAMES"],
);
const MAX_CONNECTIONS: Setting = setting(
    "max-connections",
    "max_connections",
    &["BROKER_MAX_CONNECTIONS"],
);
const MAX_CALLS_PER_CONNECTION: Setting = setting(
    "max-concurrent-calls-per-connection",
    "max_concurrent_calls_per_connection",
    &["BROKER_MAX_CONCURRENT_CALLS_PER_CONNECTION"],
);
const MAX_MESSAGE_SIZE: Setting = setting(
    "max-message-size",
    "max_message_size",
    &["BROKER_MAX_MESSAGE_SIZE"],
);
const CALL_TIMEOUT: Setting = setting("call-timeout", "call_timeout", &["BROKER_CALL_TIMEOUT"]);
const KEEPALIVE_INTERVAL: Setting = setting(
    "keepalive-interval",
    "keepalive_interval",
    &["BROKER_KEEPALIVE_INTERVAL"],
);
const SHUTDOWN_GRACE: Setting = setting(
    "shutdown-grace",
    "shutdown_grace",
    &["BROKER_SHUTDOWN_GRACE"],
);
const FIRST_REQUEST_TIMEOUT: Setting = setting(
    "first-request-timeout",
    "first_request_timeout",
    &["BROKER_FIRST_REQUEST_TIMEOUT"],
);

/// Every setting a config file may hold.
const FILE_SETTINGS: &[&Setting] = &[
    &LISTEN,
    &TLS_CERT,
    &TLS_KEY,
    &TLS_CLIENT_CA,
    &POLICY,
    &METRICS_LISTEN,
    &ENVIRONMENT,
    &SECRET_PREFIX,
    &CACHE_TTL,
    &CACHE_MAX_ENTRIES,
    &CACHE_MAX_STALE,
    &UPSTREAM_WAIT,
    &UPSTREAM_CONCURRENCY,
    &UPSTREAM_QUEUE,
    &CACHE_NEGATIVE_TTL,
    &WATCH_INTERVAL,
    &REGION,
    &SECRETS_FILE,
    &LOG_LEVEL,
    &METRICS_SECRET_NAMES,
    &MAX_CONNECTIONS,
    &MAX_CALLS_PER_CONNECTION,
    &MAX_MESSAGE_SIZE,
    &CALL_TIMEOUT,
    &KEEPALIVE_INTERVAL,
    &SHUTDOWN_GRACE,
    &FIRST_REQUEST_TIMEOUT,
];

const fn setting(flag: &'static str, key: &'static str, env: &'static [&'static str]) -> Setting {
    Setting { flag, env, key }
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
        default: &str,
        parse: fn(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        let (value, origin) = self
            .find(flag, setting)
            .unwrap_or_else(|| (default.to_owned(), Origin::Default(setting.flag)));
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

        let listen = sources.get(
            args.listen.as_deref(),
            &LISTEN,
            DEFAULT_LISTEN,
            parse_listen,
        )?;
        let tls = resolve_tls(args, &sources)?;
        let secrets_file =
            sources.optional(args.secrets_file.as_deref(), &SECRETS_FILE, parse_path)?;
        let backend = if args.dev || secrets_file.is_some() {
            BackendChoice::File { path: secrets_file }
        } else {
            BackendChoice::Aws {
                region: sources.get(args.region.as_deref(), &REGION, "ap-east-1", parse_word)?,
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
            environment: sources.get(
                args.environment.as_deref(),
                &ENVIRONMENT,
                "production",
                parse_name_part,
            )?,
            secret_prefix: sources.get(
                args.secret_prefix.as_deref(),
                &SECRET_PREFIX,
                "insurecove",
                parse_name_part,
            )?,
            cache: resolve_cache(args, &sources)?,
            watch_interval: sources.get(
                args.watch_interval.as_deref(),
                &WATCH_INTERVAL,
                "30",
                parse_watch_interval,
            )?,
            backend,
            log_level: sources.get(
                args.log_level.as_deref(),
                &LOG_LEVEL,
                "INFO",
                parse_log_level,
            )?,
            metrics_secret_names: sources.get(
                args.metrics_secret_names.as_deref(),
                &METRICS_SECRET_NAMES,
                "false",
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
        ttl: sources.get(args.cache_ttl.as_deref(), &CACHE_TTL, "300", parse_duration)?,
        max_entries: sources.get(
            args.cache_max_entries.as_deref(),
            &CACHE_MAX_ENTRIES,
            "10000",
            parse_positive_count,
        )?,
        max_stale: sources.get(
            args.cache_max_stale.as_deref(),
            &CACHE_MAX_STALE,
            "3600",
            parse_duration,
        )?,
        upstream_wait: sources.get(
            args.upstream_wait.as_deref(),
            &UPSTREAM_WAIT,
            "1",
            parse_duration,
        )?,
        negative_ttl: sources.get(
            args.cache_negative_ttl.as_deref(),
            &CACHE_NEGATIVE_TTL,
            "30",
            parse_duration,
        )?,
        upstream: UpstreamLimits {
            concurrency: sources.get(
                args.upstream_concurrency.as_deref(),
                &UPSTREAM_CONCURRENCY,
                "32",
                parse_positive_count,
            )?,
            queue: sources.get(
                args.upstream_queue.as_deref(),
                &UPSTREAM_QUEUE,
                "1000",
                parse_count,
            )?,
        },
    })
}

fn resolve_limits(args: &BrokerArgs, sources: &Sources<'_>) -> Result<Limits, ConfigError> {
    Ok(Limits {
        max_connections: sources.get(
            args.max_connections.as_deref(),
            &MAX_CONNECTIONS,
            "10000",
            parse_positive_count,
        )?,
        max_calls_per_connection: sources.get(
            args.max_concurrent_calls_per_connection.as_deref(),
            &MAX_CALLS_PER_CONNECTION,
            "1024",
            parse_positive_count,
        )?,
        max_message_size: sources.get(
            args.max_message_size.as_deref(),
            &MAX_MESSAGE_SIZE,
            "262144",
            parse_positive_count,
        )?,
        call_timeout: sources.get(
            args.call_timeout.as_deref(),
            &CALL_TIMEOUT,
            "30",
            parse_positive_duration,
        )?,
        keepalive_interval: sources.get(
            args.keepalive_interval.as_deref(),
            &KEEPALIVE_INTERVAL,
            "30",
            parse_positive_duration,
        )?,
        shutdown_grace: sources.get(
            args.shutdown_grace.as_deref(),
            &SHUTDOWN_GRACE,
            "10",
            parse_duration,
        )?,
        first_request_timeout: sources.get(
            args.first_request_timeout.as_deref(),
            &FIRST_REQUEST_TIMEOUT,
            "10",
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
