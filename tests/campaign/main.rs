//! The fault and scale campaign: real PostgreSQL, the bed's real S3 server injecting
//! storage faults into its own responses, and pitr's processes killed at random moments;
//! afterwards, whatever was acknowledged is checked to be in the repository, byte for byte,
//! and what is restored is checked against what was there. Not part of the default test
//! command: `scripts/campaign [--smoke] [SCENARIO]...` (a short `--smoke` run is in
//! `scripts/test`). Prints the README "Reliability" table; exits 1 when anything
//! acknowledged was lost or a restore came back wrong.

mod archive;
mod backup;
mod common;
mod copy;
mod disk;
mod drill;
mod expire;
mod report;
mod stream;

use std::time::Duration;

use report::Row;

/// How big a run is.
#[derive(Debug, Clone, Copy)]
pub struct Scale {
    /// SIGKILLs of wal-push and of its worker, each.
    pub push_kills: u64,
    /// How long each storage-fault phase lasts.
    pub fault_phase: Duration,
    /// How long the server is down.
    pub outage: Duration,
    /// Restores (and backups) under storage faults.
    pub restores: u64,
    /// SIGKILLs of backups.
    pub backup_kills: u64,
    /// Kills of the stream and of the server, together.
    pub stream_kills: u64,
    /// SIGKILLs of expire.
    pub expire_kills: u64,
    /// SIGKILLs of copy.
    pub copy_kills: u64,
    /// SIGKILLs of drill.
    pub drill_kills: u64,
    /// Whether this is the short run in the test command.
    pub smoke: bool,
}

/// A scenario: it runs at a scale and reports its rows.
type Scenario = fn(Scale) -> Vec<Row>;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let smoke = args.iter().any(|a| a == "--smoke");
    let json_out = args
        .iter()
        .position(|a| a == "--json")
        .and_then(|i| args.get(i + 1).cloned());
    let wanted: Vec<&str> = args
        .iter()
        .filter(|a| !a.starts_with("--") && Some(*a) != json_out.as_ref())
        .map(String::as_str)
        .collect();
    let scale = if smoke {
        Scale {
            push_kills: 5,
            fault_phase: Duration::from_secs(6),
            outage: Duration::from_secs(3),
            restores: 1,
            backup_kills: 3,
            stream_kills: 4,
            expire_kills: 2,
            copy_kills: 2,
            drill_kills: 2,
            smoke,
        }
    } else {
        Scale {
            push_kills: 50,
            fault_phase: Duration::from_secs(40),
            outage: Duration::from_secs(30),
            restores: 4,
            backup_kills: 50,
            stream_kills: 50,
            expire_kills: 20,
            copy_kills: 20,
            drill_kills: 20,
            smoke,
        }
    };
    let known = [
        "archive", "backup", "stream", "expire", "copy", "drill", "disk",
    ];
    if let Some(bad) = wanted.iter().find(|w| !known.contains(w)) {
        eprintln!(
            "campaign: no scenario {bad:?} (there are {})",
            known.join(", ")
        );
        std::process::exit(2);
    }
    let runs = |name: &str| wanted.is_empty() || wanted.contains(&name);
    let mut rows: Vec<Row> = Vec::new();
    let scenarios: [(&str, Scenario); 7] = [
        ("archive", archive::run),
        ("backup", backup::run),
        ("stream", stream::run),
        ("expire", expire::run),
        ("copy", copy::run),
        ("drill", drill::run),
        ("disk", disk::run),
    ];
    for (name, run) in scenarios {
        if runs(name) {
            let mut done = run(scale);
            for r in &mut done {
                r.scenario_key = name;
            }
            // As each scenario ends, so that a long run interrupted keeps what it found.
            for r in &done {
                eprintln!("campaign: {name}: {r:?}");
            }
            rows.extend(done);
        }
    }
    report::print(&rows);
    if let Some(path) = json_out {
        report::write_json(&rows, std::path::Path::new(&path));
    }
    let bad: u64 = rows.iter().map(|r| r.lost + r.wrong).sum();
    if bad > 0 {
        eprintln!("campaign: {bad} item(s) lost or restored wrong");
        std::process::exit(1);
    }
    let vacuous: Vec<&str> = rows
        .iter()
        .filter(|r| !r.skipped && (r.injected == 0 || r.compared == 0))
        .map(|r| r.scenario.as_str())
        .collect();
    if !vacuous.is_empty() {
        eprintln!("campaign: nothing injected or nothing checked in: {vacuous:?}");
        std::process::exit(1);
    }
}
