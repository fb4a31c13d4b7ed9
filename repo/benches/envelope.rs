//! Envelope encode (zstd levels 1 and 3, + blake3) and decode (decompress + verify) on one core, on
//! a real 16 MiB WAL segment written by the test bed's PostgreSQL; and at level 1 encrypted
//! (keyed blake3 + AES-256-GCM under a per-object subkey), beside it.
//! `cargo bench -p repo --bench envelope`.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::sync::Arc;

use repo::crypto::{DataKey, Keys};
use repo::envelope::{decode, decode_as, encode, encode_as, EncodeOptions, Protection};
use testbed::{Cluster, ClusterOptions};

fn real_segment() -> Vec<u8> {
    let (pg, archive) = Cluster::start_copy_archiving(ClusterOptions::default()).unwrap();
    let segments = pg.generate_wal_segments(3).unwrap();
    pg.wait_archived(&segments[1], Duration::from_secs(60))
        .unwrap();
    std::fs::read(archive.join(&segments[1])).unwrap()
}

fn bench(c: &mut Criterion) {
    let segment = real_segment();
    let mut group = c.benchmark_group("envelope");
    group.throughput(Throughput::Bytes(segment.len() as u64));
    group.sample_size(10);
    for level in [1, 3] {
        let options = EncodeOptions {
            zstd_level: Some(level),
        };
        let sealed = encode(&segment, options);
        eprintln!(
            "zstd level {level}: {} -> {} bytes (ratio {:.2})",
            segment.len(),
            sealed.len(),
            segment.len() as f64 / sealed.len() as f64
        );
        group.bench_function(format!("encode_zstd{level}_16MiB"), |b| {
            b.iter(|| encode(&segment, options))
        });
        group.bench_function(format!("decode_zstd{level}_16MiB"), |b| {
            b.iter(|| decode(&sealed).unwrap())
        });
    }
    let encrypted = Protection::Encrypted(Arc::new(Keys::new(&DataKey::generate())));
    let options = EncodeOptions {
        zstd_level: Some(1),
    };
    let key = "wal/0000000100000000/000000010000000000000002";
    let sealed = encode_as(&segment, options, &encrypted, key);
    group.bench_function("encode_zstd1_encrypted_16MiB", |b| {
        b.iter(|| encode_as(&segment, options, &encrypted, key))
    });
    group.bench_function("decode_zstd1_encrypted_16MiB", |b| {
        b.iter(|| decode_as(&sealed, u64::MAX, &encrypted, key).unwrap())
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
