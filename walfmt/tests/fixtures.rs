//! The decoder against golden WAL from every supported PostgreSQL version (13..18), made by
//! `scripts/make-wal-fixtures` and checked against what each version itself reported:
//! commit xids, times and positions, restore points, every record as pg_walinspect saw it
//! (15+), and where the server's own crash recovery found valid WAL to end.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::Value;
use walfmt::record::rmgr_name;
use walfmt::{
    summarize, Decoded, Event, Lsn, PgMajor, Record, SegmentName, WalDecoder, WalSegmentSize,
};

fn fixture_dirs() -> Vec<PathBuf> {
    // Read at run time: a test binary reused from a shared build cache may have been compiled
    // in another checkout, whose path `env!` would have baked in.
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR").expect("run by cargo or nextest");
    let root = Path::new(&manifest_dir).join("tests/fixtures");
    let dirs: Vec<PathBuf> = (13..=18).map(|v| root.join(format!("pg{v}"))).collect();
    for d in &dirs {
        assert!(
            d.join("expected.json").is_file(),
            "missing fixture {}",
            d.display()
        );
    }
    dirs
}

fn gunzip(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_end(&mut out)
        .unwrap();
    out
}

fn lsn(v: &Value) -> Lsn {
    v.as_str().unwrap().parse().unwrap()
}

/// `2026-11-23 23:11:58.55385+00` -> `2026-11-23T23:11:58.553850Z`.
fn pg_time_to_rfc3339(text: &str) -> String {
    let text = text.trim().trim_end_matches("+00");
    let (date_time, frac) = text.split_once('.').unwrap_or((text, ""));
    format!("{}.{:0<6}Z", date_time.replace(' ', "T"), frac)
}

struct Fixture {
    dir: PathBuf,
    expected: Value,
    segments: Vec<(SegmentName, Vec<u8>)>,
}

fn load(dir: &Path) -> Fixture {
    let expected: Value =
        serde_json::from_slice(&std::fs::read(dir.join("expected.json")).unwrap()).unwrap();
    let seg_size = WalSegmentSize::new(expected["segment_size"].as_u64().unwrap()).unwrap();
    let segments = expected["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let name = n.as_str().unwrap();
            (
                SegmentName::parse(name, seg_size).unwrap(),
                gunzip(&dir.join(format!("{name}.gz"))),
            )
        })
        .collect();
    Fixture {
        dir: dir.to_owned(),
        expected,
        segments,
    }
}

fn decode_stream(f: &Fixture) -> (Vec<Record>, PgMajor, u64) {
    let mut d = WalDecoder::new(f.segments[0].0.start_lsn()).unwrap();
    let mut records = Vec::new();
    for (name, bytes) in &f.segments {
        assert_eq!(
            d.position()
                .segment_start(WalSegmentSize::new(1 << 20).unwrap()),
            name.start_lsn()
        );
        d.feed(bytes);
        loop {
            match d.next() {
                Decoded::Record(r) => records.push(r),
                Decoded::NeedMore => break,
                Decoded::End(end) => panic!("{}: unexpected end of WAL: {end}", f.dir.display()),
            }
        }
    }
    (
        records,
        d.version().unwrap(),
        d.system_identifier().unwrap(),
    )
}

#[test]
fn every_version_decodes_with_the_servers_own_facts() {
    for dir in fixture_dirs() {
        let f = load(&dir);
        let ctx = dir.display().to_string();
        let (records, version, sysid) = decode_stream(&f);
        assert_eq!(
            version.number() as u64,
            f.expected["pg_version"].as_u64().unwrap(),
            "{ctx}"
        );
        assert_eq!(
            sysid.to_string(),
            f.expected["system_identifier"].as_str().unwrap(),
            "{ctx}"
        );
        assert!(
            records.iter().any(|r| r.header.tot_len > 8192),
            "{ctx}: no record larger than a page"
        );
        assert!(
            records.iter().any(
                |r| r.lsn.segment_number(WalSegmentSize::new(1 << 20).unwrap())
                    != Lsn(r.end.0 - 1).segment_number(WalSegmentSize::new(1 << 20).unwrap())
            ),
            "{ctx}: no record crossing a segment boundary"
        );
        assert!(
            records.last().unwrap().header.is_switch(),
            "{ctx}: does not end with a switch"
        );

        let events: Vec<(Lsn, Event)> = records
            .iter()
            .filter_map(|r| walfmt::xact::interpret(r, version).map(|e| (r.lsn, e)))
            .collect();
        for fact in f.expected["xacts"].as_array().unwrap() {
            let (kind, xid) = (
                fact["kind"].as_str().unwrap(),
                fact["xid"].as_u64().unwrap(),
            );
            let (lo, hi) = (lsn(&fact["lo"]), lsn(&fact["hi"]));
            let found = events.iter().find(|(at, e)| {
                matches!(e, Event::XactEnd { kind: k, xid: x, .. } if k.name() == kind && *x as u64 == xid)
                    && *at >= lo && *at < hi
            });
            let (_, event) =
                found.unwrap_or_else(|| panic!("{ctx}: no {kind} of xid {xid} in {lo}..{hi}"));
            if let (Some(time), Event::XactEnd { time: ours, .. }) = (fact["time"].as_str(), event)
            {
                assert_eq!(ours.to_string(), time, "{ctx}: time of {kind} {xid}");
            }
        }
        for point in f.expected["restore_points"].as_array().unwrap() {
            let name = point["name"].as_str().unwrap();
            let (lo, hi) = (lsn(&point["lo"]), lsn(&point["hi"]));
            assert!(
                events.iter().any(
                    |(at, e)| matches!(e, Event::RestorePoint { name: n, .. } if n == name)
                        && *at >= lo
                        && *at < hi
                ),
                "{ctx}: restore point {name} not in {lo}..{hi}"
            );
        }

        // Record by record against pg_walinspect (15+).
        let theirs = f.expected["records"].as_array().unwrap();
        if version.number() >= 15 {
            assert!(theirs.len() > 100, "{ctx}");
        }
        if let Some(first) = theirs.first() {
            let start = lsn(&first[0]);
            let ours: Vec<&Record> = records
                .iter()
                .filter(|r| r.lsn >= start)
                .take(theirs.len())
                .collect();
            assert_eq!(ours.len(), theirs.len(), "{ctx}: record count");
            for (o, t) in ours.iter().zip(theirs) {
                let at = o.lsn;
                assert_eq!(at, lsn(&t[0]), "{ctx}");
                assert_eq!(
                    rmgr_name(o.header.rmid),
                    t[1].as_str().unwrap(),
                    "{ctx} rmgr at {at}"
                );
                assert_eq!(
                    o.header.tot_len.to_string(),
                    t[3].as_str().unwrap(),
                    "{ctx} length at {at}"
                );
                assert_eq!(
                    o.header.xid.to_string(),
                    t[4].as_str().unwrap(),
                    "{ctx} xid at {at}"
                );
                assert_eq!(o.header.prev, lsn(&t[5]), "{ctx} prev at {at}");
                match walfmt::xact::interpret(o, version) {
                    Some(Event::XactEnd { kind, xid, time }) => {
                        assert_eq!(kind.name(), t[2].as_str().unwrap(), "{ctx} type at {at}");
                        let desc = t[6].as_str().unwrap();
                        let time_text = match desc.split_once(": ") {
                            Some((x, rest)) if x.bytes().all(|b| b.is_ascii_digit()) => {
                                assert_eq!(x, xid.to_string(), "{ctx} prepared xid at {at}");
                                rest
                            }
                            _ => desc,
                        };
                        assert_eq!(
                            time.to_string(),
                            pg_time_to_rfc3339(time_text),
                            "{ctx} time at {at}"
                        );
                    }
                    Some(Event::RestorePoint { name, .. }) => {
                        assert_eq!(t[2].as_str().unwrap(), "RESTORE_POINT", "{ctx}");
                        assert_eq!(t[6].as_str().unwrap(), name, "{ctx}");
                    }
                    _ => {}
                }
            }
        }

        // Segment summaries: complete segments, the last one switched.
        for (i, (name, bytes)) in f.segments.iter().enumerate() {
            let s = summarize(bytes).unwrap();
            assert_eq!(s.pg_version, version, "{ctx}");
            assert_eq!(
                s.end_lsn,
                name.end_lsn(),
                "{ctx} {name}: {:?}",
                s.end_reason
            );
            assert_eq!(s.switched, i + 1 == f.segments.len(), "{ctx} {name}");
        }
    }
}

#[test]
fn every_version_ends_valid_wal_where_its_crash_recovery_did() {
    for dir in fixture_dirs() {
        let f = load(&dir);
        let r = &f.expected["recycled"];
        let bytes = gunzip(&dir.join(r["file"].as_str().unwrap()));
        let s = summarize(&bytes).unwrap();
        let log = r["recovery_log"].as_str().unwrap();
        // "LOG:  invalid record length at 0/111C2A8: wanted 24, got 0" and the like.
        let at: Lsn = log
            .split(" at ")
            .nth(1)
            .and_then(|rest| rest.split([':', ' ', ',']).next())
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("{}: no position in {log:?}", dir.display()));
        assert_eq!(
            s.end_lsn,
            at,
            "{}: ours {:?}; server: {log}",
            dir.display(),
            s.end_reason
        );
        assert!(s.end_lsn >= lsn(&r["flushed"]), "{}", dir.display());
    }
}

#[test]
fn every_version_summarizes_the_same_fed_in_pieces_of_any_size() {
    for dir in fixture_dirs() {
        let f = load(&dir);
        for (name, bytes) in &f.segments {
            let whole = summarize(bytes).unwrap();
            for piece in [1000, 8192, 7919, 300_000] {
                let mut z = walfmt::Summarizer::start(bytes).unwrap();
                let mut records = 0;
                for p in bytes.chunks(piece) {
                    z.feed(p, &mut |_, _| records += 1).unwrap();
                }
                let streamed = z.finish();
                assert_eq!(streamed, whole, "{name} in {piece}-byte pieces");
                assert_eq!(records, whole.records, "{name}");
            }
            // A partial file (the first half): the same as summarizing that half.
            let half = &bytes[..bytes.len() / 2];
            let mut z = walfmt::Summarizer::start(half).unwrap();
            z.feed(half, &mut |_, _| {}).unwrap();
            assert_eq!(z.finish(), summarize(half).unwrap(), "{name} half");
        }
    }
}
