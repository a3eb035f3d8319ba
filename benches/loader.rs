//! Loader throughput (docs/results/loader.md): GB/s of fp16 region features (36 × 1024 per
//! image) delivered as shuffled batches of 128, from the page cache, by the prefetch thread.
//! The dataset (2,048 images, 151 MB) is generated once under the temp dir and kept.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use semshare::data::loader::Loader;
use semshare::data::reader::DatasetReader;

#[path = "support/gen.rs"]
mod generator;

const BATCH: usize = 128;

fn loader(c: &mut Criterion) {
    let dir = std::env::temp_dir().join("semshare-bench-loader");
    generator::ensure(&dir, 2048);
    let data = Arc::new(DatasetReader::open(&dir).unwrap());
    let mut loader = Loader::new(data, "train", BATCH, 0, 0..u64::MAX, 4).unwrap();
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
}

criterion_group!(benches, loader);
criterion_main!(benches);
