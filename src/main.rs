//! The `secrets-broker` command: parses the command line and hands each
//! subcommand to the library (`command`).

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use secrets_broker::{
    command::{self, Environment},
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

fn main() -> ExitCode {
    // Before clap reads the environment: the .env file feeds the flags'
    // environment variables.
    let environment = Environment::prepare();
    match Cli::parse().command {
        Command::Serve(args) => match environment.for_settings() {
            Ok(env_file) => command::serve(args, env_file),
            Err(code) => code,
        },
        Command::Check(args) => match environment.for_settings() {
            Ok(env_file) => command::check(args, env_file),
            Err(code) => code,
        },
        Command::Get(args) => command::operate(environment, operator::get(args)),
        Command::Watch { name, connection } => {
            command::operate(environment, operator::watch(name, connection))
        }
        Command::Stats(connection) => command::operate(environment, operator::stats(connection)),
    }
}
