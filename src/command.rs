//! What each `secrets-broker` subcommand does once `main.rs` has parsed
//! its arguments: `serve` builds the broker from its settings and runs it
//! until a shutdown signal, `check` validates and tests the upstream, and
//! the operator commands report their errors the same way. In the library
//! so the binary stays a parser, and each step can be read (and tested)
//! on its own.

use std::{collections::HashMap, future::Future, path::PathBuf, process::ExitCode};

use crate::{
    app::{App, Listeners},
    check,
    config::{BackendChoice, BrokerArgs, ListenAddr, Settings},
    telemetry,
};

/// Said when a `.env` file was found: its variables apply silently
/// otherwise, wherever the broker happens to start.
const ENV_FILE_READ: &str =
    "a .env file was read: its variables apply where the environment does not set them";

/// The process environment as every subcommand reads it: the `.env` file
/// loaded into it, and blank endpoint variables removed. Made before clap
/// parses (the flags' environment variables come from it) and before any
/// thread starts (it changes the environment).
pub struct Environment {
    /// The `.env` file read, or why it could not be read whole.
    env_file: Result<Option<PathBuf>, String>,
}

impl Environment {
    /// Loads `.env` (values already set win) and drops blank endpoint
    /// variables. Call first thing in `main`, before any thread starts.
    pub fn prepare() -> Self {
        let env_file = load_env_file();
        // SAFETY: called before any other thread starts (see above).
        unsafe { crate::backend::aws::forget_blank_endpoint_vars() };
        Self { env_file }
    }

    /// For `serve` and `check`, which resolve the broker's settings: the
    /// `.env` file read, to say so; one that cannot be read whole stops
    /// them (the exit code, the reason said on stderr).
    pub fn for_settings(self) -> Result<Option<PathBuf>, ExitCode> {
        self.env_file.map_err(|message| fail(&message))
    }

    /// For the operator commands, which read no settings: an unreadable
    /// `.env` is only said.
    fn for_operator(self) {
        if let Err(message) = self.env_file {
            eprintln!("secrets-broker: {message}");
        }
    }
}

/// Loads the `.env` file of the working directory or the nearest parent,
/// if there is one, into the environment; its path, for `serve` and
/// `check` to say it was read. Values already in the environment win;
/// within the file, the last line that sets a name does, as Python's
/// dotenv (what the guide's class read `.env` with) and a shell's `.`
/// read it. Call it before any other thread starts: it changes the
/// environment.
///
/// A file that cannot be read whole is an error, for `serve` and `check`
/// to stop at: the lines before the one that cannot be read are set, and
/// the lines after it would silently not apply (another prefix, another
/// TTL). A line is named by its number where that can be told, never by
/// its text: it may hold a credential.
fn load_env_file() -> Result<Option<PathBuf>, String> {
    let Some(path) = env_file_path() else {
        return Ok(None);
    };
    let (values, failure) = read_env_file(&path);
    for (name, value) in values {
        if std::env::var_os(&name).is_none() {
            // SAFETY: called before any other thread starts (see above).
            unsafe { std::env::set_var(name, value) };
        }
    }
    let why = match failure {
        None => return Ok(Some(path)),
        Some(dotenvy::Error::LineParse(line, _)) => format!(
            "{} cannot be read as NAME=value (its text is not shown: it may hold a credential)",
            line_of(&path, &line)
        ),
        Some(dotenvy::Error::Io(io)) => io.to_string(),
        // Not its `Display`: a variable that is not UTF-8 is quoted.
        Some(_) => "a variable is not valid UTF-8".to_owned(),
    };
    Err(format!(
        "cannot read the env file {}: {why}; fix or remove it",
        path.display()
    ))
}

/// The names and values of an env file, the last line of each name
/// winning, up to the first line that cannot be read (and why).
fn read_env_file(path: &std::path::Path) -> (HashMap<String, String>, Option<dotenvy::Error>) {
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(error) => return (HashMap::new(), Some(dotenvy::Error::Io(error))),
    };
    // A BOM (Windows editors write one) is not part of the first name.
    let text = text.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&text);
    let mut values = HashMap::new();
    for item in dotenvy::from_read_iter(text) {
        match item {
            Ok((name, value)) => {
                values.insert(name, value);
            }
            Err(error) => return (values, Some(error)),
        }
    }
    (values, None)
}

/// Which line of the file holds `text` (what dotenvy stopped at: a line,
/// or only its value), when one line alone does.
fn line_of(path: &std::path::Path, text: &str) -> String {
    let file = std::fs::read_to_string(path).unwrap_or_default();
    let wanted = text.lines().next().unwrap_or_default().trim();
    let mut holding = file
        .lines()
        .enumerate()
        .filter(|(_, line)| !wanted.is_empty() && line.contains(wanted));
    match (holding.next(), holding.next()) {
        (Some((number, _)), None) => format!("line {}", number + 1),
        _ => "a line".to_owned(),
    }
}

/// The `.env` to read: in the working directory, else the nearest parent
/// (where `dotenvy::dotenv` looks).
fn env_file_path() -> Option<PathBuf> {
    let here = std::env::current_dir().ok()?;
    here.ancestors()
        .map(|dir| dir.join(".env"))
        .find(|candidate| candidate.is_file())
}

fn settings(args: &BrokerArgs) -> Result<Settings, String> {
    Settings::resolve(args, &|name| std::env::var(name).ok())
        .map_err(|error| format!("configuration error: {error}"))
}

/// A runtime for one subcommand, or the exit code of a failure to make it.
fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Runtime::new()
        .map_err(|error| fail(&format!("cannot start the async runtime: {error}")))
}

/// `serve`: runs the broker until a shutdown signal; its exit code.
pub fn serve(args: BrokerArgs, env_file: Option<PathBuf>) -> ExitCode {
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let (code, logs) = runtime.block_on(run_broker(args, env_file));
    // Calls cut by the shutdown grace end with the runtime: their audit
    // lines are written before the log writer stops (dropping its guard
    // flushes the last lines).
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    drop(logs);
    code
}

/// `serve` on its runtime: the exit code, and the log writer's guard.
async fn run_broker(
    args: BrokerArgs,
    env_file: Option<PathBuf>,
) -> (ExitCode, Option<telemetry::LogGuard>) {
    crate::signals::install().await;
    let settings = match settings(&args) {
        Ok(settings) => settings,
        Err(message) => return (fail(&message), None),
    };
    let logs = telemetry::init(
        &settings.log_level,
        settings.log_filter.as_deref(),
        settings.log_json,
    );
    if let Some(path) = env_file {
        tracing::info!(path = %path.display(), "{ENV_FILE_READ}");
    }
    let listeners = match Listeners::bind(&settings).await {
        Ok(listeners) => listeners,
        Err(error) => return (fail_logged(&settings, &error), Some(logs)),
    };
    let bound = listeners.grpc_addr();
    let app = match App::build(&settings, listeners) {
        Ok(app) => app,
        Err(error) => return (fail_logged(&settings, &error), Some(logs)),
    };
    // A log collector often reads stdout and stderr as one stream: under
    // JSON logs, a line of plain text would break it.
    if settings.dev && !settings.log_json {
        print_dev_hint(&settings, bound);
    }
    let code = match app.run(crate::signals::shutdown_requested()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fail_logged(&settings, &error),
    };
    (code, Some(logs))
}

/// `check`: validates the settings and tests the upstream; the report goes
/// to stdout.
pub fn check(args: BrokerArgs, env_file: Option<PathBuf>) -> ExitCode {
    match runtime() {
        Ok(runtime) => runtime.block_on(run_check(args, env_file)),
        Err(code) => code,
    }
}

async fn run_check(args: BrokerArgs, env_file: Option<PathBuf>) -> ExitCode {
    let settings = match settings(&args) {
        Ok(settings) => settings,
        Err(message) => return fail(&message),
    };
    if let Some(path) = env_file {
        println!("env file: {} ({ENV_FILE_READ})", path.display());
    }
    match check::run(&settings).await {
        Ok(report) => {
            for line in report {
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
        Err(error) => fail(&format!("check failed: {error}")),
    }
}

/// The operator commands (`get`, `watch`, `stats`): their error on stderr.
pub fn operate(
    environment: Environment,
    command: impl Future<Output = Result<(), secrets_broker_client::Error>>,
) -> ExitCode {
    environment.for_operator();
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    match runtime.block_on(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fail(&error.to_string()),
    }
}

/// In dev mode, how to call the broker just started, at the address it
/// bound (`bound`: with port 0 the system chose the port).
fn print_dev_hint(settings: &Settings, bound: Option<std::net::SocketAddr>) {
    let secrets = match &settings.backend {
        BackendChoice::File { path } => format!("secrets from {}", path.display()),
        _ => "built-in fake secrets".to_owned(),
    };
    let listen = &match (bound, &settings.listen) {
        (Some(addr), ListenAddr::Tcp(_)) => ListenAddr::Tcp(addr),
        (_, listen) => listen.clone(),
    };
    // A secrets file's names are its own: the hint names none of them.
    let call = match &settings.backend {
        BackendChoice::File { .. } => "-d '{\"name\":\"NAME\"}'",
        _ => "-d '{\"name\":\"mistral-api-key\"}'",
    };
    let method = "secretsbroker.v1.SecretsService/GetSecret";
    match (&settings.tls, listen) {
        (Some(tls), ListenAddr::Tcp(addr)) => {
            println!("secrets-broker dev mode: {secrets}, mutual TLS on {listen}");
            println!(
                "try: grpcurl -cacert CA.pem -cert CLIENT.pem -key CLIENT-KEY.pem {call} {addr} {method}  \
                 (a client certificate signed by {})",
                tls.client_ca.display()
            );
        }
        (Some(_), _) => println!("secrets-broker dev mode: {secrets}, mutual TLS on {listen}"),
        (None, ListenAddr::Tcp(addr)) => {
            println!("secrets-broker dev mode: {secrets}, plaintext on {listen}");
            println!("try: grpcurl -plaintext {call} {addr} {method}");
        }
        (None, ListenAddr::Unix(path)) => {
            println!("secrets-broker dev mode: {secrets}, plaintext on {listen}");
            // h2 refuses a socket path as :authority; grpcurl sends it
            // unless told otherwise.
            println!(
                "try: grpcurl -plaintext -unix -authority localhost {call} {} {method}",
                path.display()
            );
        }
    }
}

/// `fail`, once the logs have started: under JSON logs the reason is a
/// JSON event of its own (a collector that reads stderr as JSON lines
/// would drop a line of plain text, the one that says why the broker
/// stopped).
fn fail_logged(settings: &Settings, error: &dyn std::fmt::Display) -> ExitCode {
    // A RUST_LOG that names only a dependency turns this module's events
    // off: then the plain line, rather than nothing.
    if settings.log_json && tracing::enabled!(tracing::Level::ERROR) {
        tracing::error!("{error}; the broker stops");
        ExitCode::FAILURE
    } else {
        fail(&error.to_string())
    }
}

/// Says why on stderr, as every command does, and fails.
fn fail(message: &str) -> ExitCode {
    eprintln!("secrets-broker: {message}");
    ExitCode::FAILURE
}
