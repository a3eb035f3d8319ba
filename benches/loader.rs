//! Loader throughput (docs/results/loader.md): GB/s of fp16 region features (36 × 1024 per
//! image) delivered as shuffled batches of 128, from the page cache, by the prefetch thread.
//! The dataset (2,048 images, 151 MB) is generated once under the temp dir and kept. Also the
//! speed of the shard checksum pass that precedes a shard's first read.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use semshare::data::checksum::checksum_file;
use semshare::data::loader::Loader;
use semshare::data::reader::DatasetReader;

#[path = "support/gen.rs"]
mod generator;

const BATCH: usize = 128;

fn loader(c: &mut Criterion) {
    let dir = std::env::temp_dir().join("semshare-bench-loader");
    generator::ensure(&dir, 2048);
    let data = Arc::new(DatasetReader::open(&dir).unwrap());
    let mut loader = Loader::new(Arc::clone(&data), "train", BATCH, 0, 0..u64::MAX, 4).unwrap();
    // One epoch first: the shards are in the page cache before timing.
    for _ in 0..2048 / BATCH {
        drop(loader.next_batch());
    }
    let mut g = c.benchmark_group("loader");
    g.throughput(Throughput::Bytes((BATCH * generator::IMAGE_BYTES) as u64));
    g.bench_function("f16_36x1024_shuffled_batch128", |b| {
        b.iter(|| {
            let batch = loader.next_batch().unwrap().unwrap();
            black_box(batch.images.feature_bytes())
        })
    });
    g.finish();
    // The one-time cost of the checksum comparison every shard gets before its first item is
    // read (`Shard::verify_checksum`): one pread pass over the whole file.
    let shard = &data.split("train").unwrap().shards[0];
    let (file, len) = (std::fs::File::open(&shard.path).unwrap(), shard.file_bytes().len() as u64);
    let mut g = c.benchmark_group("shard_checksum");
    g.throughput(Throughput::Bytes(len));
    g.sample_size(20);
    g.bench_function("pread_whole_shard", |b| b.iter(|| black_box(checksum_file(&file, len).unwrap())));
    g.finish();
}

criterion_group!(benches, loader);
criterion_main!(benches);
