//! CPU benchmarks (criterion): the training step and inference of the `small` preset at
//! DESIGN.md §2's CPU configuration (batch 32 images + 32 texts, T = 24, V = 2,000, K_obj = 100),
//! plus the ops that dominate them.
//!
//! Two input shapes: `full` — every image has R = 36 regions and every text T = 24 tokens,
//! the same work a padded implementation (the PyTorch baseline) does; `mixed` — lengths drawn
//! like the synthetic data (regions 12..=36, tokens 6..=24), where packing skips the padding.

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;

use semshare::backend::cpu::Cpu;
use semshare::backend::{Backend, Gemm, Segments};
use semshare::model::{Batch, EmbeddingKind, ImageBatch, ModelConfig, SemShare, TextBatch};
use semshare::rng::Rng;
use semshare::train::{TrainConfig, Trainer};

const BATCH: usize = 32;

fn config() -> ModelConfig {
    ModelConfig { vocab: 2000, object_classes: 100, labels: 24, ..ModelConfig::small() }
}

fn lengths(rng: &mut Rng, full: bool, lo: usize, hi: usize) -> Vec<usize> {
    (0..BATCH).map(|_| if full { hi } else { lo + rng.below(hi - lo + 1) }).collect()
}

fn batches(cfg: &ModelConfig, full: bool, seed: u64) -> (ImageBatch, TextBatch) {
    let mut rng = Rng::new(seed);
    let il = lengths(&mut rng, full, 12, cfg.max_regions);
    let tl = lengths(&mut rng, full, 6, cfg.max_tokens);
    (
        ImageBatch::random(&mut rng, &il, cfg.region_dim, cfg.object_classes, cfg.labels),
        TextBatch::random(&mut rng, &tl, cfg.vocab, cfg.labels),
    )
}

fn train_step(c: &mut Criterion) {
    let cfg = config();
    let mut g = c.benchmark_group("train_step_small_b32");
    g.sample_size(20);
    for (name, full) in [("full", true), ("mixed", false)] {
        let mut dev = Cpu::new();
        let mut trainer = Trainer::new(&mut dev, &cfg, TrainConfig::default()).unwrap();
        let (ib, tb) = batches(&cfg, full, 1);
        g.bench_function(name, |b| b.iter(|| black_box(trainer.step(&mut dev, ib.clone(), tb.clone()).unwrap())));
    }
    g.finish();
}

fn inference(c: &mut Criterion) {
    let cfg = config();
    let mut g = c.benchmark_group("embed_small_32img_32txt");
    g.sample_size(30);
    for (name, full) in [("full", true), ("mixed", false)] {
        let mut dev = Cpu::new();
        let net = SemShare::new(&cfg).unwrap();
        let w = net.store.upload(&mut dev, &net.store.init_values(0)).unwrap();
        let (ib, tb) = batches(&cfg, full, 2);
        let (ib, tb) = (Batch::Image(ib), Batch::Text(tb));
        g.bench_function(name, |b| {
            b.iter(|| {
                let i = net.embed(&mut dev, &w, &ib, EmbeddingKind::Pooled).unwrap();
                let t = net.embed(&mut dev, &w, &tb, EmbeddingKind::Pooled).unwrap();
                black_box((i, t))
            })
        });
    }
    g.finish();
}

fn ops(c: &mut Criterion) {
    let mut dev = Cpu::new();
    let mut rng = Rng::new(3);
    let mut rand = |n: usize| (0..n).map(|_| rng.normal() as f32).collect::<Vec<f32>>();
    let mut g = c.benchmark_group("cpu_ops");
    // The shared block's largest GEMM: 1152 image tokens × (256 → 768).
    let (m, k, n) = (1152, 256, 768);
    let a = dev.upload(&rand(m * k), &[m, k]).unwrap();
    let w = dev.upload(&rand(n * k), &[n, k]).unwrap();
    let mut y = dev.zeros(&[m, n]).unwrap();
    let gm = Gemm { m, n, k, trans_a: false, trans_b: true, alpha: 1.0, beta: 0.0 };
    g.bench_function("gemm_1152x256x768", |b| b.iter(|| dev.gemm(gm, a.view(), w.view(), y.view_mut()).unwrap()));
    let seg = Segments::from_lengths(&mut dev, &[36; BATCH]).unwrap();
    let qkv = dev.upload(&rand(36 * BATCH * 768), &[36 * BATCH, 768]).unwrap();
    g.bench_function("attention_fwd_32x4x36x64", |b| b.iter(|| black_box(dev.attention_fwd(&qkv, &seg, 4).unwrap())));
    let (ctx, probs) = dev.attention_fwd(&qkv, &seg, 4).unwrap();
    g.bench_function("attention_bwd_32x4x36x64", |b| {
        b.iter(|| black_box(dev.attention_bwd(&qkv, &probs, &seg, 4, &ctx).unwrap()))
    });
    g.finish();
}

criterion_group!(benches, train_step, inference, ops);
criterion_main!(benches);
