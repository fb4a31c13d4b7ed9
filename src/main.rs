//! `pitr`: the command-line front end. It only orchestrates: parsing arguments, reading
//! settings and turning outcomes into exit codes. The work lives in the library crates.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    cli::run()
}
