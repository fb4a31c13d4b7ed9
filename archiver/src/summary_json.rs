//! A segment summary as JSON: the `.summary` objects beside archived segments and
//! `pitr wal-inspect --json` share this shape (docs/FORMAT.md, "Segment summaries").

use serde_json::{json, Value};
use walfmt::{Lsn, PgTimestamp, SegmentSummary};

fn time(t: Option<PgTimestamp>) -> Value {
    t.map_or(Value::Null, |t| Value::String(t.to_string()))
}

fn lsn(l: Option<Lsn>) -> Value {
    l.map_or(Value::Null, |l| Value::String(l.to_string()))
}

/// The summary of the segment in file `file`.
pub fn summary_json(file: &str, s: &SegmentSummary) -> Value {
    json!({
        "file": file,
        "kind": "segment",
        "timeline": s.timeline.0,
        "system_identifier": s.system_identifier.to_string(),
        "pg_version": s.pg_version.number(),
        "segment_size": s.segment_size.bytes(),
        "start_lsn": s.start_lsn.to_string(),
        "first_lsn": lsn(s.first_record_lsn),
        "last_lsn": lsn(s.last_record_lsn),
        "end_lsn": s.end_lsn.to_string(),
        "end_reason": s.end_reason.as_ref().map(|e| e.reason.to_string()),
        "continued_record_lsn": lsn(s.continued_record_lsn),
        "switched": s.switched,
        "record_count": s.records,
        "commits": s.commits,
        "aborts": s.aborts,
        "first_commit_time": time(s.first_commit_time),
        "last_commit_time": time(s.last_commit_time),
        "first_xact_time": time(s.first_xact_time),
        "last_xact_time": time(s.last_xact_time),
        "restore_points": s.restore_points.iter().map(|rp| json!({
            "name": rp.name,
            "time": rp.time.to_string(),
            "lsn": rp.lsn.to_string(),
        })).collect::<Vec<_>>(),
    })
}
