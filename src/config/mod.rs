//! The broker's settings: command-line flags over environment variables over
//! a TOML file over defaults, validated once at start.
//!
//! Every setting is read as text from the first source that has it and then
//! parsed by one function, so an error names exactly where the bad value came
//! from (`--cache-ttl`, `SECRET_CACHE_TTL`, or `cache_ttl in broker.toml`).
//! Environment names and defaults are the ones services already set for
//! their in-process Secrets Manager client (`SECRET_PREFIX`,
//! `SECRET_CACHE_TTL`, `AWS_DEFAULT_REGION`...), so a deployment's
//! environment carries over unchanged.
//! A `.env` file is loaded into the environment by `main` before this runs.

use std::{fmt, net::SocketAddr, path::PathBuf, time::Duration};

mod parse;
mod sources;
mod table;

use parse::*;
use sources::{Sources, read_config_file};
pub use table::BrokerArgs;
use table::*;

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
    /// HTTP/2 streams in flight over every connection at most.
    pub max_calls: usize,
    /// Largest request, bytes.
    pub max_message_size: usize,
    /// Bytes of unfinished request messages held at once, over all calls.
    pub max_request_memory: usize,
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
            Self::Tcp(addr) => addr.ip().to_canonical().is_loopback(),
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
    /// The built-in dev secrets (`--dev`): the five secrets services read
    /// (Mistral key, database, JWT, AWS services, security), fake values.
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

impl BackendChoice {
    /// The AWS region, for the AWS backend.
    pub fn region(&self) -> Option<&str> {
        match self {
            Self::Aws { region } => Some(region),
            Self::Dev | Self::File { .. } => None,
        }
    }
}

/// Where Secrets Manager's change events reach the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventSource {
    /// An existing SQS queue (its URL), read as is.
    Queue(String),
    /// An SNS topic (its ARN): the broker subscribes a queue of its own.
    Topic(String),
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
    /// Where change events come from, if anywhere.
    pub events: Option<EventSource>,
    /// The log level, e.g. `info`.
    pub log_level: String,
    /// `RUST_LOG`, when set and not blank: a `tracing` filter that, when
    /// valid, replaces the level and the quieting of the dependencies.
    pub log_filter: Option<String>,
    /// Log lines as JSON objects (else text).
    pub log_json: bool,
    /// `HOSTNAME` (a pod's name), or empty: part of the name of the queue
    /// the broker makes in topic mode.
    pub host_name: String,
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

impl Settings {
    /// Resolves and validates the settings from the flags, an environment
    /// lookup (`std::env::var` in the binary) and the config file it names.
    pub fn resolve(
        args: &BrokerArgs,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        refuse_sensitive_bodies(env)?;
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
        let settings = Settings {
            dev: args.dev,
            listen: sources.get(args.listen.as_deref(), &LISTEN, parse_listen)?,
            tls: resolve_tls(args, &sources)?,
            backend: resolve_backend(args, &sources)?,
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
            events: resolve_events(args, &sources)?,
            log_level: sources.get(args.log_level.as_deref(), &LOG_LEVEL, parse_log_level)?,
            log_filter: env("RUST_LOG").filter(|text| !text.trim().is_empty()),
            log_json: sources.get(args.log_format.as_deref(), &LOG_FORMAT, parse_log_format)?,
            host_name: env("HOSTNAME").unwrap_or_default(),
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
        // The longest name the broker makes itself: a typed config's
        // default, `<prefix>/<environment>/aws-services`.
        let longest = self.secret_prefix.len() + 1 + self.environment.len() + "/aws-services".len();
        if longest > crate::names::MAX_NAME_LEN {
            return Err(ConfigError::Rule(format!(
                "{SECRET_PREFIX} is {} characters and {ENVIRONMENT} {}: the typed configs' \
                 names (<prefix>/<environment>/aws-services) would be {longest} characters \
                 long, and AWS allows {}",
                self.secret_prefix.len(),
                self.environment.len(),
                crate::names::MAX_NAME_LEN
            )));
        }
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
        if let (ListenAddr::Tcp(grpc), Some(probes)) = (&self.listen, &self.metrics_listen)
            && grpc.port() == probes.port()
            // Port 0: each gets a port of its own from the system.
            && grpc.port() != 0
            // `[::ffff:127.0.0.1]` is 127.0.0.1.
            && (grpc.ip().to_canonical() == probes.ip().to_canonical()
                || grpc.ip().is_unspecified()
                || probes.ip().is_unspecified())
        {
            return Err(ConfigError::Rule(format!(
                "--listen ({grpc}) and --metrics-listen ({probes}) take the same port: give \
                 them different ones"
            )));
        }
        if let (Some(events), BackendChoice::Dev | BackendChoice::File { .. }) =
            (&self.events, &self.backend)
        {
            // Named both ways: it may have come from the environment.
            let flag = match events {
                EventSource::Queue(_) => &EVENTS_QUEUE_URL,
                EventSource::Topic(_) => &EVENTS_TOPIC_ARN,
            };
            return Err(ConfigError::Rule(format!(
                "{flag} needs the AWS backend (events come from AWS); it cannot be used with \
                 --dev or --secrets-file"
            )));
        }
        Ok(())
    }
}

/// The AWS SDK logs the bodies AWS answers, at TRACE, when
/// `LOG_SENSITIVE_BODIES=true` (as it reads it): GetSecretValue's body is
/// the secret. `RUST_LOG` can turn TRACE on for the SDK, so the broker
/// does not start with that variable set.
fn refuse_sensitive_bodies(env: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
    if env("LOG_SENSITIVE_BODIES").is_some_and(|value| value.eq_ignore_ascii_case("true")) {
        return Err(ConfigError::Invalid {
            origin: Origin::Env("LOG_SENSITIVE_BODIES"),
            problem: "makes the AWS SDK log what AWS answers, secret values included; the \
                      broker does not start with it: unset it"
                .to_owned(),
        });
    }
    Ok(())
}

/// A secrets file wins over `--dev`; otherwise AWS, in its region.
fn resolve_backend(args: &BrokerArgs, sources: &Sources<'_>) -> Result<BackendChoice, ConfigError> {
    let secrets_file = sources.optional(args.secrets_file.as_deref(), &SECRETS_FILE, parse_path)?;
    Ok(if let Some(path) = secrets_file {
        BackendChoice::File { path }
    } else if args.dev {
        BackendChoice::Dev
    } else {
        BackendChoice::Aws {
            region: sources.get(args.region.as_deref(), &REGION, parse_word)?,
        }
    })
}

fn resolve_events(
    args: &BrokerArgs,
    sources: &Sources<'_>,
) -> Result<Option<EventSource>, ConfigError> {
    let queue = sources.optional(
        args.events_queue_url.as_deref(),
        &EVENTS_QUEUE_URL,
        parse_queue_url,
    )?;
    let topic = sources.optional(
        args.events_topic_arn.as_deref(),
        &EVENTS_TOPIC_ARN,
        parse_topic_arn,
    )?;
    match (queue, topic) {
        (Some(_), Some(_)) => Err(ConfigError::Rule(format!(
            "give {EVENTS_QUEUE_URL} or {EVENTS_TOPIC_ARN}, not both: a topic gets a queue of \
             the broker's own"
        ))),
        (Some(url), None) => Ok(Some(EventSource::Queue(url))),
        (None, Some(arn)) => Ok(Some(EventSource::Topic(arn))),
        (None, None) => Ok(None),
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
    let limits = Limits {
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
        max_calls: sources.get(
            args.max_concurrent_calls.as_deref(),
            &MAX_CALLS,
            parse_positive_count,
        )?,
        max_message_size: sources.get(
            args.max_message_size.as_deref(),
            &MAX_MESSAGE_SIZE,
            parse_positive_count,
        )?,
        max_request_memory: sources.get(
            args.max_request_memory.as_deref(),
            &MAX_REQUEST_MEMORY,
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
            parse_keepalive_interval,
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
    };
    // A request of the largest size, with its 5-byte gRPC header, must fit.
    if limits.max_request_memory < limits.max_message_size.saturating_add(5) {
        return Err(ConfigError::Rule(format!(
            "{MAX_REQUEST_MEMORY:#} of {} bytes must hold at least one request of \
             {MAX_MESSAGE_SIZE:#}, {} bytes, and its 5-byte header",
            limits.max_request_memory, limits.max_message_size
        )));
    }
    Ok(limits)
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
            let missing: Vec<String> = [
                (cert.is_none(), &TLS_CERT),
                (key.is_none(), &TLS_KEY),
                (client_ca.is_none(), &TLS_CLIENT_CA),
            ]
            .into_iter()
            .filter(|(absent, _)| *absent)
            .map(|(_, setting)| setting.to_string())
            .collect();
            Err(ConfigError::Rule(format!(
                "mutual TLS needs a certificate, its key and a client CA; missing: {}",
                missing.join(", ")
            )))
        }
    }
}

/// A TOML file's parse error, with where it is (line and column), never
/// the file's text: an operator's 50-grant policy or config file is found
/// at once, and nothing it holds is repeated into a log.
pub fn toml_problem(error: &toml::de::Error, text: &str) -> String {
    let Some(at) = error.span().map(|span| span.start.min(text.len())) else {
        return error.message().to_owned();
    };
    let before = &text[..text.floor_char_boundary(at)];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit('\n')
        .next()
        .unwrap_or_default()
        .chars()
        .count()
        + 1;
    format!("{} (line {line}, column {column})", error.message())
}

#[cfg(test)]
mod tests;
