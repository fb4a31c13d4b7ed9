//! The campaign's table: one row per scenario and fault.

/// One row of the table.
#[derive(Debug, Clone, Default)]
pub struct Row {
    /// What was done (`wal-push under pgbench: SIGKILL of wal-push`).
    pub scenario: String,
    /// Runs: kills, restores, phases.
    pub runs: u64,
    /// Faults injected (kills, storage faults, seconds down).
    pub faults: String,
    /// Items checked afterwards (segments, rows).
    pub checked: String,
    /// Acknowledged items lost.
    pub lost: u64,
    /// Restores that came back wrong (recovered, but not to what was there).
    pub wrong: u64,
    /// Commands that failed loudly (an exit code, a message), as allowed.
    pub failed_loudly: u64,
    /// Wall time of the scenario, seconds.
    pub secs: f64,
    /// How many faults (kills, storage faults, seconds down) were injected: 0 means the
    /// row proved nothing, and the run fails.
    pub injected: u64,
    /// How many items were checked afterwards: likewise.
    pub compared: u64,
    /// Not run on this machine (said in the scenario), so not held to the above.
    pub skipped: bool,
    /// The scenario's name (`scripts/campaign NAME` runs it alone).
    pub scenario_key: &'static str,
}

pub fn print(rows: &[Row]) {
    println!("| scenario | runs | faults injected | checked afterwards | acknowledged lost | restored wrong | failed loudly | time | reproduce |");
    println!("| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | --- |");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.0} s | `scripts/campaign {}` |",
            r.scenario,
            r.runs,
            r.faults,
            r.checked,
            r.lost,
            r.wrong,
            r.failed_loudly,
            r.secs,
            r.scenario_key
        );
    }
}

pub fn write_json(rows: &[Row], path: &std::path::Path) {
    let v: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "scenario": r.scenario, "runs": r.runs, "faults": r.faults,
                "checked": r.checked, "lost": r.lost, "wrong": r.wrong,
                "failed_loudly": r.failed_loudly, "secs": r.secs,
            })
        })
        .collect();
    if let Err(e) = std::fs::write(path, serde_json::to_string_pretty(&v).unwrap_or_default()) {
        eprintln!("campaign: could not write {}: {e}", path.display());
    }
}
