//! The decoder against WAL from a real server, record by record against the server's own
//! pg_waldump: LSNs, resource managers, lengths, xids, prev-links, commit times, prepared
//! xids, restore points, and where valid WAL ends in a partly written segment.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use testbed::{Cluster, ClusterOptions, PgBin};
use walfmt::record::rmgr_name;
use walfmt::{summarize, Decoded, Event, Lsn, SegmentName, WalDecoder, WalSegmentSize};

/// One pg_waldump line, the fields we compare.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Dumped {
    rmgr: String,
    tot_len: u32,
    xid: u32,
    lsn: Lsn,
    prev: Lsn,
    desc: String,
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let start = line.find(key).unwrap_or_else(|| panic!("{key} in {line}")) + key.len();
    let rest = line[start..].trim_start();
    let end = rest.find([',', ' ']).unwrap_or(rest.len());
    &rest[..end]
}

fn parse_dump(text: &str) -> Vec<Dumped> {
    text.lines()
        .filter(|l| l.starts_with("rmgr: "))
        .map(|l| Dumped {
            rmgr: l["rmgr: ".len()..]
                .split_whitespace()
                .next()
                .unwrap()
                .to_owned(),
            tot_len: {
                let start = l.find("len (rec/tot):").unwrap() + "len (rec/tot):".len();
                let lens = &l[start..start + l[start..].find(',').unwrap()];
                lens.split('/').nth(1).unwrap().trim().parse().unwrap()
            },
            xid: field(l, "tx:").parse().unwrap(),
            lsn: field(l, "lsn:").parse().unwrap(),
            prev: field(l, "prev").parse().unwrap(),
            desc: l[l.find("desc: ").unwrap() + 6..].to_owned(),
        })
        .collect()
}

/// `2026-11-23 23:01:23.145235 UTC` -> `2026-11-23T23:01:23.145235Z` (pg_waldump drops
/// trailing zeros of the fraction, and the whole fraction when it is zero).
fn waldump_time_to_rfc3339(text: &str) -> String {
    let text = text.trim_end_matches(" UTC");
    let (date_time, frac) = text.split_once('.').unwrap_or((text, ""));
    format!("{}.{:0<6}Z", date_time.replace(' ', "T"), frac)
}

fn pg_waldump(pg: &Cluster, dir: &Path, first: &str, last: Option<&str>) -> (String, String) {
    let mut cmd = Command::new(pg.bin().tool("pg_waldump"));
    cmd.env("TZ", "UTC").arg("-p").arg(dir).arg(first);
    if let Some(last) = last {
        cmd.arg(last);
    }
    let out = cmd.output().expect("run pg_waldump");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn make_edge_case_wal(pg: &Cluster) {
    let sql = |q: &str| pg.sql(q).unwrap_or_else(|e| panic!("{q}: {e:#}"));
    sql("CREATE TABLE t (id int PRIMARY KEY, pad text)");
    sql("INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 200) g");
    // An abort with an xid, a restore point, a prepared transaction committed and one
    // rolled back.
    sql("BEGIN; INSERT INTO t VALUES (1000, 'x'); SELECT txid_current(); ROLLBACK");
    sql("SELECT pg_create_restore_point('pitr-golden-point')");
    sql("BEGIN; INSERT INTO t VALUES (1001, 'p1'); PREPARE TRANSACTION 'p1'");
    sql("COMMIT PREPARED 'p1'");
    sql("BEGIN; INSERT INTO t VALUES (1002, 'p2'); PREPARE TRANSACTION 'p2'");
    sql("ROLLBACK PREPARED 'p2'");
    // Records larger than a page, enough of them that some cross a segment boundary.
    for i in 0..50 {
        sql(&format!(
            "SELECT pg_logical_emit_message(true, 'pitr', repeat(md5('{i}'), 900))"
        ));
    }
    // Full-page images after a checkpoint.
    sql("CHECKPOINT");
    sql("UPDATE t SET pad = pad || 'x'");
}

/// Server binaries that ship pg_waldump: the ones the bed would use, else a Debian install
/// (npm builds of other versions have none; the fixtures cover those versions).
fn bin_with_pg_waldump() -> PgBin {
    let bin = PgBin::locate().unwrap();
    if bin.tool("pg_waldump").is_file() {
        return bin;
    }
    let debian = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .find(|d| d.join("pg_waldump").is_file())
        .unwrap_or_else(|| {
            panic!("no pg_waldump anywhere: this oracle needs Debian's server package")
        });
    PgBin::at(&debian).unwrap()
}

#[test]
fn decoder_matches_pg_waldump_on_real_wal() {
    let (pg, archive) = Cluster::start_copy_archiving(
        ClusterOptions::default()
            .bin(bin_with_pg_waldump())
            .wal_segment_size_mb(1)
            .setting("max_prepared_transactions", "5"),
    )
    .unwrap();
    if !pg.bin().tool("pg_waldump").is_file() {
        panic!(
            "no pg_waldump in {}: this oracle needs the Debian server package",
            pg.bin().dir().display()
        );
    }
    let seg_size = WalSegmentSize::new(1 << 20).unwrap();
    let first = pg.switch_wal().unwrap();
    let first = SegmentName::parse(&first, seg_size).unwrap().next();
    make_edge_case_wal(&pg);
    let last = pg.switch_wal().unwrap();
    pg.wait_archived(&last, Duration::from_secs(30)).unwrap();
    let last = SegmentName::parse(&last, seg_size).unwrap();

    // The whole range, one stream, fed in odd-sized pieces.
    let mut decoder = WalDecoder::new(first.start_lsn()).unwrap();
    let mut ours = Vec::new();
    let mut name = first;
    loop {
        let bytes = std::fs::read(archive.join(name.to_string())).unwrap();
        for piece in bytes.chunks(7919) {
            decoder.feed(piece);
            loop {
                match decoder.next() {
                    Decoded::Record(r) => ours.push(r),
                    Decoded::NeedMore => break,
                    Decoded::End(end) => {
                        panic!("unexpected end of WAL in archived segments: {end}")
                    }
                }
            }
        }
        if name == last {
            break;
        }
        name = name.next();
    }
    let version = decoder.version().unwrap();

    let (dump, _) = pg_waldump(&pg, &archive, &first.to_string(), Some(&last.to_string()));
    let theirs = parse_dump(&dump);
    assert!(
        theirs.len() > 100,
        "pg_waldump printed {} records",
        theirs.len()
    );
    assert_eq!(ours.len(), theirs.len(), "record count");
    let mut seen = (0, 0, 0, 0, 0, 0);
    for (o, t) in ours.iter().zip(&theirs) {
        assert_eq!(o.lsn, t.lsn);
        assert_eq!(rmgr_name(o.header.rmid), t.rmgr, "rmgr at {}", o.lsn);
        assert_eq!(o.header.tot_len, t.tot_len, "length at {}", o.lsn);
        assert_eq!(o.header.xid, t.xid, "xid at {}", o.lsn);
        assert_eq!(o.header.prev, t.prev, "prev at {}", o.lsn);
        if o.header.tot_len > 8192 {
            seen.0 += 1;
        }
        if o.lsn.segment_number(seg_size) != Lsn(o.end.0 - 1).segment_number(seg_size) {
            seen.1 += 1;
        }
        match walfmt::xact::interpret(o, version) {
            Some(Event::XactEnd { kind, xid, time }) => {
                let desc = t
                    .desc
                    .strip_prefix(kind.name())
                    .expect(&t.desc)
                    .trim_start();
                let desc = desc.split(';').next().unwrap();
                let time_text = match kind {
                    walfmt::XactKind::CommitPrepared | walfmt::XactKind::AbortPrepared => {
                        let (x, time) = desc.split_once(": ").unwrap();
                        assert_eq!(x.parse::<u32>().unwrap(), xid, "prepared xid at {}", o.lsn);
                        if kind.is_commit() {
                            seen.3 += 1;
                        } else {
                            seen.4 += 1;
                        }
                        time
                    }
                    _ => {
                        assert_eq!(xid, t.xid);
                        seen.2 += 1;
                        desc
                    }
                };
                assert_eq!(
                    time.to_string(),
                    waldump_time_to_rfc3339(time_text),
                    "time at {}",
                    o.lsn
                );
            }
            Some(Event::RestorePoint { name, .. }) => {
                assert_eq!(t.desc, format!("RESTORE_POINT {name}"));
                seen.5 += 1;
            }
            _ => {}
        }
    }
    let (big, crossing, xact_ends, commit_prepared, abort_prepared, restore_points) = seen;
    assert!(big > 0, "no record larger than a page");
    assert!(crossing > 0, "no record crossing a segment boundary");
    assert!(xact_ends > 5);
    assert_eq!((commit_prepared, abort_prepared, restore_points), (1, 1, 1));

    // Per-segment summaries agree with the stream.
    let mut name = first;
    let mut commits = 0;
    let mut missed_commits = 0;
    let mut found_point = false;
    loop {
        let bytes = std::fs::read(archive.join(name.to_string())).unwrap();
        let s = summarize(&bytes).unwrap();
        assert_eq!(s.start_lsn, name.start_lsn());
        assert_eq!(s.segment_size, seg_size);
        assert_eq!(s.pg_version, version);
        assert!(s.end_reason.is_none(), "{name}: {:?}", s.end_reason);
        assert_eq!(s.end_lsn, name.end_lsn());
        commits += s.commits;
        if let Some(rp) = s.restore_points.first() {
            assert_eq!(rp.name, "pitr-golden-point");
            found_point = true;
        }
        let in_segment = |lsn: Lsn| lsn >= name.start_lsn() && lsn < name.end_lsn();
        let whole_here = ours
            .iter()
            .filter(|r| in_segment(r.lsn) && r.end <= name.end_lsn())
            .count() as u64;
        assert_eq!(s.records, whole_here, "{name}");
        let continued = ours
            .iter()
            .find(|r| in_segment(r.lsn) && r.end > name.end_lsn() && !r.header.is_switch());
        assert_eq!(s.continued_record_lsn, continued.map(|r| r.lsn), "{name}");
        missed_commits += continued
            .filter(|r| matches!(walfmt::xact::interpret(r, version), Some(Event::XactEnd { kind, .. }) if kind.is_commit()))
            .map_or(0, |_| 1);
        if name == last {
            assert!(s.switched);
            break;
        }
        name = name.next();
    }
    assert!(found_point);
    let dumped_commits = theirs
        .iter()
        .filter(|t| t.desc.starts_with("COMMIT ") || t.desc.starts_with("COMMIT_PREPARED"))
        .count() as u64;
    assert_eq!(commits + missed_commits, dumped_commits);
}

#[test]
fn end_of_valid_wal_matches_pg_waldump_in_a_partly_written_segment() {
    // Small segments, no WAL kept: after some checkpoints the segment being written is a
    // recycled one whose tail is an older segment's WAL.
    let pg = Cluster::start_new(
        ClusterOptions::default()
            .bin(bin_with_pg_waldump())
            .wal_segment_size_mb(1)
            .setting("max_wal_size", "2MB")
            .setting("min_wal_size", "2MB")
            .setting("archive_mode", "off"),
    )
    .unwrap();
    for _ in 0..3 {
        pg.generate_wal_segments(2).unwrap();
        pg.sql("CHECKPOINT").unwrap();
    }
    pg.sql("CREATE TABLE tail_marker AS SELECT 1 AS x").unwrap();
    let current = pg
        .sql("SELECT pg_walfile_name(pg_current_wal_lsn())")
        .unwrap();
    let copy = tempfile::tempdir().unwrap();
    std::fs::copy(
        pg.data_dir().join("pg_wal").join(&current),
        copy.path().join(&current),
    )
    .unwrap();

    let bytes = std::fs::read(copy.path().join(&current)).unwrap();
    let s = summarize(&bytes).unwrap();
    let reason = s
        .end_reason
        .as_ref()
        .expect("a partly written segment has an end");

    let (_, err) = pg_waldump(&pg, copy.path(), &current, None);
    // "... invalid record length at 0/61BB10: wanted 24, got 0" and the like.
    let at = err
        .rsplit_once(" at ")
        .map(|(_, rest)| rest.split([':', ' ', ',']).next().unwrap().parse::<Lsn>())
        .unwrap_or_else(|| panic!("no end position in pg_waldump's message: {err}"))
        .unwrap();
    assert_eq!(s.end_lsn, at, "ours: {reason}; pg_waldump: {err}");
    assert!(s.end_lsn < s.start_lsn + (1 << 20));
}
