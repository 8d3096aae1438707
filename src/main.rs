//! The `secrets-broker` command: parses the command line and hands each
//! subcommand to the library (`command`), on a runtime made here.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use secrets_broker::{
    command::{check, fail, load_env_file, operate, serve},
    config::BrokerArgs,
    operator,
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

impl Command {
    /// Whether it resolves the broker's settings (which a .env feeds).
    fn reads_settings(&self) -> bool {
        matches!(self, Self::Serve(_) | Self::Check(_))
    }
}

fn main() -> ExitCode {
    // Values already in the environment win over the .env file.
    let env_file = load_env_file();
    // SAFETY: no other thread has started yet.
    unsafe { secrets_broker::backend::aws::forget_blank_endpoint_vars() };
    let cli = Cli::parse();
    // An env file that cannot be read whole stops the broker's start; the
    // operator commands only say it.
    let env_file = match (env_file, cli.command.reads_settings()) {
        (Ok(path), _) => path,
        (Err(message), true) => return fail(&message),
        (Err(message), false) => {
            eprintln!("secrets-broker: {message}");
            None
        }
    };
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
