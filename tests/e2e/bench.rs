//! `pitr bench wal-push` over real WAL from the bed, with a peer command beside pitr: the
//! figures a user reads in --json, every segment handed to each archiver once, and nothing
//! left in the repository afterwards.

use std::time::Duration;

use testbed::{Cluster, ClusterOptions};

use crate::{pitr, succeeds};

#[test]
fn bench_reports_each_run_and_the_ratio_and_cleans_up() {
    let (pg, archive) =
        Cluster::start_copy_archiving(ClusterOptions::default().wal_segment_size_mb(1)).unwrap();
    let segments = pg.generate_wal_segments(4).unwrap();
    for seg in &segments {
        pg.wait_archived(seg, Duration::from_secs(60)).unwrap();
    }
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    let copies = work.path().join("copies");
    std::fs::create_dir(&copies).unwrap();
    let out = succeeds(
        pitr()
            .args([
                "bench",
                "wal-push",
                "--json",
                "--segments",
                "4",
                "--ahead",
                "0,2",
            ])
            .arg("--repo")
            .arg(format!("file://{}", repo.display()))
            .arg("--from")
            .arg(&archive)
            .arg("--data-dir")
            .arg(work.path().join("stage"))
            .arg("--peer")
            .arg(format!("cp=cp %p '{}/%f'", copies.display())),
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["segments"], 4);
    let runs = v["runs"].as_array().unwrap();
    let names: Vec<&str> = runs.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["pitr ahead=0", "pitr ahead=2", "cp"]);
    for r in runs {
        assert!(r["segments_per_second"].as_f64().unwrap() > 0.0, "{r}");
    }
    assert!(runs[0]["compression_ratio"].as_f64().unwrap() > 1.0);
    assert!(v["ratios"].as_array().is_some_and(|r| !r.is_empty()));
    // The peer saw each of the first four segments (in name order), as PostgreSQL's
    // archiver would have handed them over.
    let mut names: Vec<String> = std::fs::read_dir(&archive)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.len() == 24)
        .collect();
    names.sort();
    assert!(names.len() >= 4);
    assert_eq!(std::fs::read_dir(&copies).unwrap().count(), 4);
    for seg in &names[..4] {
        assert_eq!(
            std::fs::read(copies.join(seg)).unwrap(),
            std::fs::read(archive.join(seg)).unwrap()
        );
    }
    // What the pitr runs stored is gone.
    let left = std::fs::read_dir(&repo).map_or(0, |d| d.count());
    assert_eq!(left, 0);
}
