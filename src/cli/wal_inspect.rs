//! `pitr wal-inspect FILE...`: what WAL segments (and `.history` / `.backup` files) hold,
//! for a person or, with `--json`, for scripts (one object per file per line).

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use walfmt::{
    summarize_with, ArchiveFileKind, BackupLabel, Event, Lsn, Record, SegmentSummary,
    TimelineHistory,
};

use super::{Exit, Failure};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// WAL segment, .partial, .history or .backup files
    #[arg(required = true, value_name = "FILE")]
    files: Vec<PathBuf>,
    /// One JSON object per file per line
    #[arg(long)]
    json: bool,
    /// Also list every record (LSN, resource manager, length, xid, prev-link, meaning)
    #[arg(long)]
    records: bool,
}

pub fn run(args: Args) -> Result<(), Failure> {
    if let [only] = args.files.as_slice() {
        return inspect(only, &args);
    }
    // Several files: report each bad one and go on; fail at the end.
    let mut failures = 0;
    for path in &args.files {
        if let Err(failure) = inspect(path, &args) {
            eprintln!("{failure}");
            failures += 1;
        }
    }
    if failures == 0 {
        return Ok(());
    }
    Err(Failure::new(
        Exit::BadInput,
        format!(
            "{failures} of {} files could not be inspected",
            args.files.len()
        ),
    ))
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

fn inspect(path: &Path, args: &Args) -> Result<(), Failure> {
    let bytes = std::fs::read(path).map_err(|e| {
        Failure::new(
            Exit::BadInput,
            format!("could not read file \"{}\": {e}", path.display()),
        )
    })?;
    let name = file_name(path);
    match ArchiveFileKind::of(&name) {
        ArchiveFileKind::History(tli) => {
            let history = TimelineHistory::parse(tli, &bytes).map_err(|e| {
                Failure::new(Exit::BadInput, format!("file \"{}\": {e}", path.display()))
            })?;
            print_history(&name, &history, args.json);
        }
        ArchiveFileKind::BackupHistory => {
            let label = BackupLabel::parse(&bytes).map_err(|e| {
                Failure::new(Exit::BadInput, format!("file \"{}\": {e}", path.display()))
            })?;
            print_backup(&name, &label, args.json);
        }
        _ => {
            let mut records = Vec::new();
            let summary = summarize_with(&bytes, |record, event| {
                if args.records {
                    records.push(record_json(record, event));
                }
            })
            .map_err(|e| {
                Failure::new(
                    Exit::BadInput,
                    format!("file \"{}\" is not valid WAL: {e}", path.display()),
                )
                .hint(
                    "wal-inspect reads WAL segment files as PostgreSQL writes them (uncompressed)",
                )
            })?;
            print_segment(&name, &summary, records, args.json);
        }
    }
    Ok(())
}

fn lsn(l: Option<Lsn>) -> Value {
    l.map_or(Value::Null, |l| Value::String(l.to_string()))
}

fn record_json(r: &Record, event: Option<&Event>) -> Value {
    let mut v = json!({
        "lsn": r.lsn.to_string(),
        "rmgr": walfmt::record::rmgr_name(r.header.rmid),
        "len": r.header.tot_len,
        "xid": r.header.xid,
        "prev": r.header.prev.to_string(),
    });
    match event {
        Some(Event::XactEnd { kind, xid, time }) => {
            v["event"] = json!(kind.name());
            v["xact_xid"] = json!(xid);
            v["time"] = json!(time.to_string());
        }
        Some(Event::RestorePoint { name, time }) => {
            v["event"] = json!("RESTORE_POINT");
            v["name"] = json!(name);
            v["time"] = json!(time.to_string());
        }
        Some(Event::Switch) => v["event"] = json!("SWITCH"),
        Some(Event::OverwriteContrecord { aborted }) => {
            v["event"] = json!("OVERWRITE_CONTRECORD");
            v["aborted_lsn"] = json!(aborted.to_string());
        }
        None => {}
    }
    v
}

fn print_segment(file: &str, s: &SegmentSummary, records: Vec<Value>, as_json: bool) {
    if as_json {
        let mut v = archiver::summary_json::summary_json(file, s);
        if !records.is_empty() {
            v["records"] = Value::Array(records);
        }
        println!("{v}");
        return;
    }
    println!(
        "{file}: WAL segment of PostgreSQL {}, timeline {}, system {}, segment size {} MiB",
        s.pg_version,
        s.timeline,
        s.system_identifier,
        s.segment_size.bytes() >> 20
    );
    let end = match &s.end_reason {
        Some(e) => format!(" (valid WAL ends: {})", e.reason),
        None if s.switched => " (ends with a WAL switch)".to_owned(),
        None => String::new(),
    };
    println!("  WAL         {} .. {}{end}", s.start_lsn, s.end_lsn);
    match (s.first_record_lsn, s.last_record_lsn) {
        (Some(first), Some(last)) => {
            println!("  records     {} (first {first}, last {last})", s.records)
        }
        _ => println!("  records     0"),
    }
    if let Some(l) = s.continued_record_lsn {
        println!("  continued   a record at {l} continues in the next segment");
    }
    match (s.first_commit_time, s.last_commit_time) {
        (Some(a), Some(b)) => println!("  commits     {} ({a} .. {b})", s.commits),
        _ => println!("  commits     0"),
    }
    println!("  aborts      {}", s.aborts);
    for rp in &s.restore_points {
        println!(
            "  restore point \"{}\" at {} ({})",
            rp.name, rp.time, rp.lsn
        );
    }
    for r in &records {
        let event = r.get("event").and_then(Value::as_str).unwrap_or("");
        let detail = r
            .get("name")
            .or(r.get("time"))
            .and_then(Value::as_str)
            .unwrap_or("");
        println!(
            "  {:>12}  {:<17} len {:>6}  tx {:>10}  prev {:>12}  {event} {detail}",
            r["lsn"].as_str().unwrap_or(""),
            r["rmgr"].as_str().unwrap_or(""),
            r["len"],
            r["xid"],
            r["prev"].as_str().unwrap_or(""),
        );
    }
}

fn print_history(file: &str, h: &TimelineHistory, as_json: bool) {
    if as_json {
        let v = json!({
            "file": file,
            "kind": "history",
            "timeline": h.timeline.0,
            "ancestors": h.ancestors.iter().map(|a| json!({
                "timeline": a.timeline.0,
                "switch_lsn": a.switch_lsn.to_string(),
                "reason": a.reason,
            })).collect::<Vec<_>>(),
        });
        println!("{v}");
        return;
    }
    println!("{file}: history of timeline {}", h.timeline);
    for a in &h.ancestors {
        println!(
            "  timeline {} until {}  {}",
            a.timeline, a.switch_lsn, a.reason
        );
    }
}

fn print_backup(file: &str, l: &BackupLabel, as_json: bool) {
    if as_json {
        let v = json!({
            "file": file,
            "kind": "backup",
            "label": l.label,
            "start_lsn": l.start_lsn.to_string(),
            "stop_lsn": lsn(l.stop_lsn),
            "checkpoint_lsn": l.checkpoint_lsn.to_string(),
            "start_timeline": l.start_timeline.map(|t| t.0),
            "stop_timeline": l.stop_timeline.map(|t| t.0),
            "start_time": l.start_time,
            "stop_time": l.stop_time,
        });
        println!("{v}");
        return;
    }
    println!("{file}: base backup {:?}", l.label.as_deref().unwrap_or(""));
    println!(
        "  start       {} at {}",
        l.start_lsn,
        l.start_time.as_deref().unwrap_or("?")
    );
    if let Some(stop) = l.stop_lsn {
        println!(
            "  stop        {stop} at {}",
            l.stop_time.as_deref().unwrap_or("?")
        );
    }
    println!("  checkpoint  {}", l.checkpoint_lsn);
}
