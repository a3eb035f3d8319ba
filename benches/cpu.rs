//! CPU benchmarks (criterion): the training step and inference of the `small` preset at
//! DESIGN.md §2's CPU configuration (batch 32 images + 32 texts, T = 24, V = 2,000, K_obj = 100),
//! plus the ops that dominate them.
//!
//! Two input shapes: `full` — every image has R = 36 regions and every text T = 24 tokens,
//! the same work a padded implementation (the PyTorch baseline) does; `mixed` — lengths drawn
//! like the synthetic data (regions 12..=36, tokens 6..=24), where packing skips the padding.

use criterion::{Criterion, criterion_group, criterion_main};
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use std::hint::black_box;

use semshare::backend::cpu::Cpu;
use semshare::backend::cpu::{dispatch, gemm as cpu_gemm};
use semshare::backend::{Backend, Gemm, Half, Precision, Segments};
use semshare::model::{Batch, EmbeddingKind, FeatureNorm, ImageBatch, ModelConfig, SemShare, TextBatch};
use semshare::rng::Rng;
use semshare::tensor::DType;
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

/// (name, full lengths, precision of the layers' GEMMs).
const CASES: [(&str, bool, Precision); 4] = [
    ("full", true, Precision::F32),
    ("mixed", false, Precision::F32),
    ("full_bf16", true, Precision::Bf16),
    ("mixed_bf16", false, Precision::Bf16),
];

fn train_step(c: &mut Criterion) {
    // tools/bench_cpu_report.py reads this line.
    eprintln!("semshare CPU path: {}", dispatch::active().expect("SEMSHARE_CPU").describe());
    let cfg = config();
    let mut g = c.benchmark_group("train_step_small_b32");
    g.sample_size(20);
    for (name, full, precision) in CASES {
        let mut dev = Cpu::with_precision(precision).unwrap();
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
    // Inference freezes the loaded weights (`inference::upload_model`), so the GEMMs take their
    // packed slivers from the first call on; `*_packed_per_call` times the same embedding with
    // the weights packed on every GEMM, as training's are.
    let unfrozen =
        [("full_packed_per_call", true, Precision::F32), ("full_bf16_packed_per_call", true, Precision::Bf16)];
    for (i, (name, full, precision)) in CASES.into_iter().chain(unfrozen).enumerate() {
        let mut dev = Cpu::with_precision(precision).unwrap();
        let net = SemShare::new(&cfg).unwrap();
        let w = net.store.upload(&mut dev, &net.store.init_values(0)).unwrap();
        let w = if i < CASES.len() { dev.freeze(w).unwrap() } else { w };
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
        b.iter(|| black_box(dev.attention_bwd(&qkv, &probs, &seg, 4, &ctx, None).unwrap()))
    });
    // A `paper` batch's region features from an fp16 shard (128 × 36 × 1024), widened and
    // standardised: the op (F16C, rayon) against what the host did before session 10 (`half`'s
    // slice conversion in the loader, then `FeatureNorm::apply`), same bits.
    let (rows, dim) = (128 * 36, 1024);
    let halves: Vec<u16> = rand(rows * dim).iter().map(|&x| Half::F16.narrow(x)).collect();
    let words = dev.upload(bytemuck::cast_slice(&halves), &[rows * dim / 2]).unwrap();
    let norm = FeatureNorm { mean: rand(dim), inv_std: rand(dim).iter().map(|x| 1.0 + x.abs()).collect() };
    let n = Some((&norm.mean[..], &norm.inv_std[..]));
    g.bench_function("widen_features_f16_norm_4608x1024", |b| {
        b.iter(|| black_box(dev.widen_features(words.view(), Half::F16, rows, dim, n).unwrap()))
    });
    g.bench_function("host_widen_then_apply_4608x1024", |b| {
        b.iter(|| {
            let mut wide = vec![0.0f32; rows * dim];
            halves.reinterpret_cast::<half::f16>().convert_to_f32_slice(&mut wide);
            black_box(norm.apply(&wide))
        })
    });
    g.finish();
}

/// The fp32 GEMM before issue 17: matrixmultiply's packed AVX2 kernels, split over row blocks
/// of C on the rayon pool exactly as backend/cpu/gemm.rs did, kept here to compare versions.
fn matrixmultiply_rows(g: Gemm, a: &[f32], b: &[f32], c: &mut [f32]) {
    use rayon::prelude::*;
    let Gemm { m, n, k, trans_a, trans_b, alpha, beta } = g;
    let (rsa, csa) = if trans_a { (1, m as isize) } else { (k as isize, 1) };
    let (rsb, csb) = if trans_b { (1, k as isize) } else { (n as isize, 1) };
    let parts = if m * n * k < (1 << 20) || m < 64 { 1 } else { rayon::current_num_threads().min(m / 8).max(1) };
    let rows_per = m.div_ceil(parts).next_multiple_of(8);
    let (a_addr, b_addr) = (a.as_ptr() as usize, b.as_ptr() as usize);
    c[..m * n].par_chunks_mut(rows_per * n).enumerate().for_each(|(i, c)| {
        let rows = c.len() / n;
        // SAFETY: as in the old gemm.rs: row block i of op(a), all of b, this block of c.
        unsafe {
            let a = (a_addr as *const f32).offset((i * rows_per) as isize * rsa);
            matrixmultiply::sgemm(
                rows,
                k,
                n,
                alpha,
                a,
                rsa,
                csa,
                b_addr as *const f32,
                rsb,
                csb,
                beta,
                c.as_mut_ptr(),
                n as isize,
                1,
            );
        }
    });
}

/// Our GEMM (the active path) against matrixmultiply on the `small` preset's shapes, side by
/// side: `cargo bench --bench cpu -- gemm`.
fn gemm_versions(c: &mut Criterion) {
    let kernels = dispatch::active().expect("SEMSHARE_CPU");
    let mut rng = Rng::new(4);
    let mut g = c.benchmark_group("gemm");
    // (name, m, k, n, trans_a, trans_b): activations × weights used transposed ([n, k] stored),
    // a weight gradient (dW = dYᵀ·X), and the GRU's 32-row recurrent product.
    let shapes = [
        ("image_qkv_1152x256x768", 1152, 256, 768, false, true),
        ("image_ffn_up_1152x256x512", 1152, 256, 512, false, true),
        ("image_ffn_down_1152x512x256", 1152, 512, 256, false, true),
        ("text_qkv_768x256x768", 768, 256, 768, false, true),
        ("image_qkv_dw_768x1152x256", 768, 1152, 256, true, false),
        ("gru_recurrent_32x128x384", 32, 128, 384, false, true),
    ];
    for (name, m, k, n, trans_a, trans_b) in shapes {
        let a: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
        let b: Vec<f32> = (0..k * n).map(|_| rng.normal() as f32).collect();
        let mut y = vec![0f32; m * n];
        let gm = Gemm { m, n, k, trans_a, trans_b, alpha: 1.0, beta: 0.0 };
        let ours = format!("semshare_{}/{name}", kernels.path().name());
        g.bench_function(ours, |bn| bn.iter(|| cpu_gemm::gemm(kernels, Precision::F32, gm, &a, &b, &mut y)));
        let bf16 = format!("semshare_{}_bf16/{name}", kernels.path().name());
        g.bench_function(bf16, |bn| bn.iter(|| cpu_gemm::gemm(kernels, Precision::Bf16, gm, &a, &b, &mut y)));
        // B packed (and converted) once, as a frozen model's weights are (embedding, eval,
        // index, query) and the GRU's W_hh is for a whole recurrence: the product alone, as
        // `torch.mm` measures it on tensors of its type.
        for (precision, suffix) in [(Precision::F32, "packed"), (Precision::Bf16, "bf16_packed")] {
            if let Some(packed) = cpu_gemm::PackedB::new(kernels, precision, gm, cpu_gemm::Input::F32(&b)) {
                // bf16 also into a C stored as bf16, as the trunk's GEMMs at `--precision bf16` are.
                // bf16 also into a C stored as bf16, and with A and C in 2 bytes (what
                // `torch.mm` in bf16 is given and writes).
                let stores: &[(DType, bool, &str)] = match precision {
                    Precision::Bf16 => {
                        &[(DType::F32, false, ""), (DType::Bf16, false, "_to_bf16"), (DType::Bf16, true, "_2byte")]
                    }
                    _ => &[(DType::F32, false, "")],
                };
                let a16: Vec<u16> = a.iter().map(|&x| semshare::tensor::bf16_bits(x)).collect();
                let mut y16 = vec![0u16; y.len()];
                for &(store, two_bytes, to) in stores {
                    let id = format!("semshare_{}_{suffix}{to}/{name}", kernels.path().name());
                    g.bench_function(id, |bn| {
                        bn.iter(|| {
                            let (input, output) = match two_bytes {
                                true => (cpu_gemm::Input::Bf16(&a16), cpu_gemm::Output::Bf16(&mut y16)),
                                false => (cpu_gemm::Input::F32(&a), cpu_gemm::Output::F32(&mut y, store)),
                            };
                            cpu_gemm::gemm_packed(
                                kernels,
                                precision,
                                gm,
                                input,
                                cpu_gemm::Input::F32(&b),
                                Some(&packed),
                                None,
                                output,
                            )
                        })
                    });
                }
            }
        }
        g.bench_function(format!("matrixmultiply/{name}"), |bn| bn.iter(|| matrixmultiply_rows(gm, &a, &b, &mut y)));
    }
    g.finish();
}

/// This machine's copy bandwidth on the rayon pool (2 threads in tools/bench_cpu_report.py):
/// the ceiling of a product whose operands and result pass through memory once. At 8 MiB a
/// copy is the size of the `gemm` group's operands and result together (served from L3 where
/// it holds them); at 256 MiB it is memory's. Criterion prints bytes read + written per second.
fn memory(c: &mut Criterion) {
    use criterion::Throughput;
    use rayon::prelude::*;
    let mut g = c.benchmark_group("memory");
    for mib in [8usize, 256] {
        let len = mib << 18; // f32s in `mib` MiB
        let src: Vec<f32> = (0..len).map(|i| i as f32).collect();
        let mut dst = vec![0f32; len];
        let chunk = len.div_ceil(rayon::current_num_threads()).next_multiple_of(16);
        g.throughput(Throughput::Bytes(2 * 4 * len as u64));
        g.bench_function(format!("copy_{mib}MiB"), |b| {
            b.iter(|| dst.par_chunks_mut(chunk).zip(src.par_chunks(chunk)).for_each(|(d, s)| d.copy_from_slice(s)))
        });
        black_box(&dst);
    }
    g.finish();
}

criterion_group!(benches, train_step, inference, ops, gemm_versions, memory);
criterion_main!(benches);
