//! Argument parsing (clap) and the mapping from outcomes to the exit codes documented in
//! README.md. Each subcommand lives in its own module and returns `Result<(), Failure>`.

mod backup;
mod bench;
mod check;
mod config;
mod copy;
mod drill;
mod expire;
mod failure;
mod info;
mod init;
mod key;
mod list;
mod pg_args;
mod repo_args;
mod restore;
mod status;
mod stream;
mod verify;
mod wal_fetch;
mod wal_inspect;
mod wal_push;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

pub use failure::{Exit, Failure};

/// PostgreSQL WAL archiving and point-in-time restore, to S3 or a local directory.
#[derive(Debug, Parser)]
#[command(name = "pitr", version, about, long_about = None, arg_required_else_help = true)]
struct Cli {
    /// The configuration file [default: PITR_CONFIG, else /etc/pitr/pitr.toml with
    /// ~/.config/pitr/pitr.toml over it]
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Take a base backup of the server into the repository
    Backup(backup::Args),
    /// Bring another repository (another region or store) in step with this one
    Copy(copy::Args),
    /// Remove one backup and what only it referenced
    Delete(expire::DeleteArgs),
    /// Rehearse a disaster recovery: restore elsewhere, start, run checks, report RTO/RPO
    Drill(drill::Args),
    /// The watchdog a drill starts to tear it down if it dies
    #[command(hide = true)]
    DrillWatchdog(drill::WatchdogArgs),
    /// Remove the backups a retention policy does not keep, and what only they referenced
    Expire(expire::Args),
    /// Measure archiving throughput against real WAL, beside other tools
    Bench(bench::Args),
    /// Check the server can be reached for replication and the repository is its own
    Check(check::Args),
    /// Show the effective settings and where each came from (flag, environment, file)
    Config(config::Args),
    /// Print a shell completion script (bash, zsh or fish)
    Completions(DocsArgs),
    /// Print the manual page (roff), or write one per command into --dir
    Man(ManArgs),
    /// Show which cluster a repository belongs to and its format
    Info(info::Args),
    /// Create a repository for one cluster in an empty location
    Init(init::Args),
    /// List, add and remove an encrypted repository's key slots
    Key(key::Args),
    /// List the backups in the repository and the WAL it holds
    List(list::Args),
    /// Restore a backup into a new data directory, set to recover to a target
    Restore(restore::Args),
    /// Show what a running pitr stream is doing (from its metrics)
    Status(status::Args),
    /// Stream WAL from a replication slot into the repository, until stopped
    Stream(stream::Args),
    /// Read every backup and the WAL each needs, check every byte, say what each restores to
    Verify(verify::Args),
    /// Restore one WAL file from the repository (restore_command = 'pitr wal-fetch %f %p')
    WalFetch(wal_fetch::Args),
    /// The background worker wal-fetch starts to fill its spool
    #[command(hide = true)]
    WalPrefetch(wal_fetch::WorkerArgs),
    /// Show what WAL files hold: timeline, LSN range, commits and their times, restore points
    WalInspect(wal_inspect::Args),
    /// Archive one WAL file into the repository (archive_command = 'pitr wal-push %p')
    WalPush(wal_push::Args),
    /// The background worker wal-push starts to store ready files ahead
    #[command(hide = true)]
    WalPushWorker(wal_push::WorkerArgs),
}

#[derive(Debug, clap::Args)]
struct DocsArgs {
    /// The shell
    #[arg(value_parser = ["bash", "zsh", "fish"])]
    shell: String,
}

#[derive(Debug, clap::Args)]
struct ManArgs {
    /// Write pitr.1 and pitr-COMMAND.1 for every command into this directory instead
    #[arg(long, value_name = "DIR")]
    dir: Option<std::path::PathBuf>,
}

/// `pitr completions SHELL`: the script, generated from the command definitions.
fn completions(args: DocsArgs) -> Result<(), Failure> {
    use clap::CommandFactory;
    use clap_complete::Shell;
    let shell = match args.shell.as_str() {
        "zsh" => Shell::Zsh,
        "fish" => Shell::Fish,
        _ => Shell::Bash,
    };
    clap_complete::generate(shell, &mut Cli::command(), "pitr", &mut std::io::stdout());
    Ok(())
}

/// `pitr man [--dir DIR]`: manual pages generated from the command definitions (hidden
/// commands, the background workers, left out).
fn man(args: ManArgs) -> Result<(), Failure> {
    use clap::CommandFactory;
    let fail = |e: std::io::Error| {
        Failure::new(Exit::BadInput, format!("could not write the manual: {e}"))
    };
    let cmd = Cli::command();
    let Some(dir) = args.dir else {
        let mut out = std::io::stdout();
        return clap_mangen::Man::new(cmd).render(&mut out).map_err(fail);
    };
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .render(&mut page)
        .map_err(fail)?;
    std::fs::write(dir.join("pitr.1"), page).map_err(fail)?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("pitr-{}", sub.get_name());
        // (clap names are &'static str; this process ends right after.)
        let static_name: &'static str = Box::leak(name.clone().into_boxed_str());
        let sub = sub.clone().name(static_name);
        let mut page = Vec::new();
        clap_mangen::Man::new(sub).render(&mut page).map_err(fail)?;
        std::fs::write(dir.join(format!("{name}.1")), page).map_err(fail)?;
    }
    Ok(())
}

/// The async runtime of a command that talks to a repository; failing to start it exits
/// with `exit` (each command's own code for "could not reach the repository").
fn runtime(exit: Exit) -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Runtime::new()
        .map_err(|e| Failure::new(exit, format!("could not start the runtime: {e}")))
}

/// Runs `then` once SIGTERM or SIGINT arrives (on the current runtime): how a long-running
/// command (stream, copy --follow) is asked to finish what it holds and exit 0.
fn on_terminate(then: impl FnOnce() + Send + 'static) {
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        then();
    });
}

/// Bytes as people read them in progress lines and summaries: `12.3 MB`.
fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// Starts this binary again with `args` as a detached background worker (own process
/// group, no stdio: PostgreSQL's signals and pipes are not its own). A worker is a helper:
/// failing to start one is never the command's failure, so this only says if it started.
fn spawn_worker(args: &[&std::ffi::OsStr]) -> Option<std::process::Child> {
    use std::os::unix::process::CommandExt;
    use std::process::Stdio;
    let exe = std::env::current_exe().ok()?;
    std::process::Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .ok()
}

impl Command {
    /// The command's name as typed, and how it exits on an internal error: `wal-fetch`
    /// (and its worker) above 125, as for any failure PostgreSQL must not read as "not
    /// found"; the others with [`Exit::Internal`].
    fn identity(&self) -> (&'static str, Exit) {
        match self {
            Command::Backup(_) => ("backup", Exit::Internal),
            Command::Bench(_) => ("bench", Exit::Internal),
            Command::Copy(_) => ("copy", Exit::Internal),
            Command::Delete(_) => ("delete", Exit::Internal),
            Command::Drill(_) => ("drill", Exit::Internal),
            Command::DrillWatchdog(_) => ("drill-watchdog", Exit::Internal),
            Command::Expire(_) => ("expire", Exit::Internal),
            Command::Check(_) => ("check", Exit::Internal),
            Command::Config(_) => ("config", Exit::Internal),
            Command::Completions(_) => ("completions", Exit::Internal),
            Command::Man(_) => ("man", Exit::Internal),
            Command::Info(_) => ("info", Exit::Internal),
            Command::Init(_) => ("init", Exit::Internal),
            Command::Key(_) => ("key", Exit::Internal),
            Command::List(_) => ("list", Exit::Internal),
            Command::Restore(_) => ("restore", Exit::Internal),
            Command::Status(_) => ("status", Exit::Internal),
            Command::Stream(_) => ("stream", Exit::Internal),
            Command::Verify(_) => ("verify", Exit::Internal),
            Command::WalFetch(_) => ("wal-fetch", Exit::FetchFailed),
            Command::WalPrefetch(_) => ("wal-prefetch", Exit::FetchFailed),
            Command::WalInspect(_) => ("wal-inspect", Exit::Internal),
            Command::WalPush(_) => ("wal-push", Exit::Internal),
            Command::WalPushWorker(_) => ("wal-push-worker", Exit::Internal),
        }
    }
}

/// Test hook, not for users: `PITR_DEBUG_PANIC=COMMAND` makes COMMAND panic as it starts,
/// on its main thread; `COMMAND:thread` on a thread of its own, `COMMAND:task` in a task
/// on an async runtime. Tests use it to check what a panic looks like from outside (exit
/// code, one line on stderr) without waiting for a real one.
fn injected_panic(command: &str) {
    let Ok(spec) = std::env::var("PITR_DEBUG_PANIC") else {
        return;
    };
    let (target, place) = spec.split_once(':').unwrap_or((&spec, "main"));
    if target != command {
        return;
    }
    const MESSAGE: &str = "panic injected by PITR_DEBUG_PANIC";
    match place {
        "thread" => {
            let _ = std::thread::spawn(|| panic!("{MESSAGE}")).join();
        }
        "task" => {
            if let Ok(rt) = tokio::runtime::Runtime::new() {
                let _ = rt.block_on(async { tokio::spawn(async { panic!("{MESSAGE}") }).await });
            }
        }
        _ => panic!("{MESSAGE}"),
    }
}

/// Options that mean something only beside another: given on the command line without it,
/// they are refused as a usage error (clap's `requires` would also refuse them when they
/// come from the environment or the configuration file, where they are only ignored).
fn only_with(m: &clap::ArgMatches) -> Result<(), clap::Error> {
    const PAIRS: [(&str, &str, &str); 2] = [
        ("copy", "interval", "follow"),
        ("restore", "pg_bin", "start"),
    ];
    let Some((name, sub)) = m.subcommand() else {
        return Ok(());
    };
    for (command, option, needs) in PAIRS {
        if name == command
            && sub.value_source(option) == Some(clap::parser::ValueSource::CommandLine)
            && !sub.get_flag(needs)
        {
            return Err(Cli::command().error(
                clap::error::ErrorKind::MissingRequiredArgument,
                format!(
                    "pitr {command}: --{} applies only with --{needs}",
                    option.replace('_', "-")
                ),
            ));
        }
    }
    Ok(())
}

/// Parses the command line and runs the chosen command.
pub fn run() -> ExitCode {
    // The configuration file first: what it gives becomes the environment's defaults,
    // which clap reads. (wal-fetch exits above 125 for it, as for any failure.)
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Err(mut failure) = config::init(&argv) {
        // The subcommand: the first argument that is not `--config X` or `--config=X`.
        let mut rest = argv.iter().skip(1);
        let mut command = None;
        while let Some(a) = rest.next() {
            if a == "--config" {
                rest.next();
            } else if !a.to_string_lossy().starts_with("--config=") {
                command = Some(a);
                break;
            }
        }
        let fetch = command.is_some_and(|a| a == "wal-fetch" || a == "wal-prefetch");
        if fetch {
            failure.exit = Exit::FetchFailed;
        }
        return failure.report();
    }
    let parsed = Cli::command()
        .try_get_matches()
        .and_then(|m| only_with(&m).and_then(|()| Cli::from_arg_matches(&m)));
    let cli = match parsed {
        Ok(cli) => cli,
        Err(e) => {
            // As restore_command, a command line this pitr does not take (written by
            // another version, say) must not read as "not found" (clap's exit 2 would):
            // PostgreSQL would end recovery early. Above 125, recovery stops instead.
            let fetch = std::env::args()
                .nth(1)
                .is_some_and(|a| a == "wal-fetch" || a == "wal-prefetch");
            if fetch && e.use_stderr() {
                let _ = e.print();
                return ExitCode::from(Exit::FetchFailed as u8);
            }
            e.exit()
        }
    };
    let (name, internal) = cli.command.identity();
    failure::exit_on_panic(name, internal);
    injected_panic(name);
    let outcome = match cli.command {
        Command::Backup(args) => backup::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Copy(args) => copy::run(args),
        Command::Delete(args) => expire::run_delete(args),
        Command::Drill(args) => drill::run(args),
        Command::DrillWatchdog(args) => drill::run_watchdog(args),
        Command::Expire(args) => expire::run(args),
        Command::Check(args) => check::run(args),
        Command::Config(args) => config::run(args),
        Command::Completions(args) => completions(args),
        Command::Man(args) => man(args),
        Command::Info(args) => info::run(args),
        Command::Key(args) => key::run(args),
        Command::Init(args) => init::run(args),
        Command::List(args) => list::run(args),
        Command::Restore(args) => restore::run(args),
        Command::Status(args) => status::run(args),
        Command::Stream(args) => stream::run(args),
        Command::Verify(args) => verify::run(args),
        Command::WalFetch(args) => wal_fetch::run(args),
        Command::WalPrefetch(args) => wal_fetch::run_worker(args),
        Command::WalInspect(args) => wal_inspect::run(args),
        Command::WalPush(args) => wal_push::run(args),
        Command::WalPushWorker(args) => wal_push::run_worker(args),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => failure.report(),
    }
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
