//! The `secrets-broker` command: parses the command line and wires the
//! library's pieces together. Everything else lives in the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use secrets_broker::{
    app::{self, App, Listeners},
    check,
    config::{BackendChoice, BrokerArgs, ListenAddr, Settings},
    operator, telemetry,
};

#[derive(Parser)]
#[command(name = "secrets-broker", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker.
    Serve(BrokerArgs),
    /// Validate the configuration and test the upstream; exit 0 or 1.
    Check(BrokerArgs),
    /// Read a secret from a running broker; the value goes to stdout.
    Get(operator::GetArgs),
    /// Follow a secret's rotations on a running broker.
    Watch {
        /// Short name, full name or ARN.
        name: String,
        #[command(flatten)]
        connection: operator::Connection,
    },
    /// Print a running broker's cache counters (needs an admin identity).
    Stats(operator::Connection),
}

fn main() -> ExitCode {
    // Values already in the environment win over the .env file.
    let env_file = dotenvy::dotenv().ok();
    // SAFETY: no other thread has started yet.
    unsafe { secrets_broker::backend::aws::forget_blank_endpoint_vars() };
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => return fail(&format!("cannot start the async runtime: {error}")),
    };
    match cli.command {
        Command::Serve(args) => {
            let (code, logs) = runtime.block_on(serve(args, env_file));
            // Calls cut by the shutdown grace end with the runtime: their
            // audit lines are written before the log writer stops.
            runtime.shutdown_timeout(std::time::Duration::from_secs(1));
            drop(logs);
            code
        }
        Command::Check(args) => runtime.block_on(check(args, env_file)),
        Command::Get(args) => runtime.block_on(operate(operator::get(args))),
        Command::Watch { name, connection } => {
            runtime.block_on(operate(operator::watch(name, connection)))
        }
        Command::Stats(connection) => runtime.block_on(operate(operator::stats(connection))),
    }
}

/// Said when a `.env` file was found: its variables apply silently
/// otherwise, wherever the broker happens to start.
const ENV_FILE_READ: &str =
    "a .env file was read: its variables apply where the environment does not set them";

fn settings(args: &BrokerArgs) -> Result<Settings, String> {
    Settings::resolve(args, &|name| std::env::var(name).ok())
        .map_err(|error| format!("configuration error: {error}"))
}

/// Runs the broker; the exit code, and the log writer's guard (dropping it
/// flushes the last log lines).
async fn serve(
    args: BrokerArgs,
    env_file: Option<std::path::PathBuf>,
) -> (ExitCode, Option<telemetry::LogGuard>) {
    let settings = match settings(&args) {
        Ok(settings) => settings,
        Err(message) => return (fail(&message), None),
    };
    let logs = telemetry::init(&settings.log_level, settings.log_json);
    if let Some(path) = env_file {
        tracing::info!(path = %path.display(), "{ENV_FILE_READ}");
    }
    let app = match Listeners::bind(&settings).await {
        Ok(listeners) => App::build(&settings, listeners),
        Err(error) => Err(error),
    };
    let app = match app {
        Ok(app) => app,
        Err(error) => return (fail(&error.to_string()), Some(logs)),
    };
    if settings.dev {
        print_dev_hint(&settings);
    }
    let code = match app.run(app::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fail(&error.to_string()),
    };
    (code, Some(logs))
}

async fn check(args: BrokerArgs, env_file: Option<std::path::PathBuf>) -> ExitCode {
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

async fn operate(
    command: impl std::future::Future<Output = Result<(), secrets_broker_client::Error>>,
) -> ExitCode {
    match command.await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fail(&error.to_string()),
    }
}

fn print_dev_hint(settings: &Settings) {
    let secrets = match &settings.backend {
        BackendChoice::File { path } => format!("secrets from {}", path.display()),
        _ => "built-in fake secrets".to_owned(),
    };
    let listen = &settings.listen;
    let call = "-d '{\"name\":\"mistral-api-key\"}'";
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

fn fail(message: &str) -> ExitCode {
    eprintln!("secrets-broker: {message}");
    ExitCode::FAILURE
}
