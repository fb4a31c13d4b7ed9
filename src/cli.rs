//! Argument parsing (clap) and the mapping from outcomes to the exit codes documented in
//! README.md. Subcommands are added here by the issues that deliver them.

use std::process::ExitCode;

use clap::Parser;

/// PostgreSQL WAL archiving and point-in-time restore, to S3 or a local directory.
#[derive(Debug, Parser)]
#[command(name = "pitr", version, about, long_about = None, arg_required_else_help = true)]
struct Cli {}

/// Parses the command line and runs the chosen command.
pub fn run() -> ExitCode {
    let _cli = Cli::parse();
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
