//! End-to-end tests: the real `pitr` binary against real PostgreSQL clusters and a real S3
//! server from the test bed. One test binary; one module per command.

mod cli;
mod info;
mod wal_fetch;
mod wal_inspect;
mod wal_push;

/// The `pitr` binary under test.
pub fn pitr() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_pitr"))
}
