//! Summary extraction throughput on a real 16 MiB segment, written by a real server (the
//! test bed's PostgreSQL): decoding, CRC-checking and interpreting every record.
//! `cargo bench -p walfmt --bench summary`.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use testbed::{Cluster, ClusterOptions};
use walfmt::{summarize, Decoded, Lsn, WalDecoder};

fn real_segment() -> Vec<u8> {
    let (pg, archive) = Cluster::start_copy_archiving(ClusterOptions::default()).unwrap();
    // Table rows and commits, like an OLTP load; the second segment is full of them.
    pg.sql("CREATE TABLE t (id bigint, v text)").unwrap();
    let segments = pg.generate_wal_segments(3).unwrap();
    let name = &segments[1];
    pg.wait_archived(name, Duration::from_secs(60)).unwrap();
    std::fs::read(archive.join(name)).unwrap()
}

fn bench(c: &mut Criterion) {
    let segment = real_segment();
    let mut group = c.benchmark_group("segment");
    group.throughput(Throughput::Bytes(segment.len() as u64));
    group.sample_size(20);
    group.bench_function("summarize_16MiB", |b| {
        b.iter(|| summarize(&segment).unwrap());
    });
    group.bench_function("decode_in_64KiB_pieces", |b| {
        b.iter(|| {
            let start = Lsn(u64::from_le_bytes(segment[8..16].try_into().unwrap()));
            let mut d = WalDecoder::new(start).unwrap();
            let mut n = 0u64;
            for piece in segment.chunks(64 << 10) {
                d.feed(piece);
                while let Decoded::Record(_) = d.next() {
                    n += 1;
                }
            }
            n
        });
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
