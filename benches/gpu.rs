//! GPU benchmarks (criterion) on the benchmark configuration of DESIGN.md §2: `paper` preset,
//! 128 images (R = 36) + 128 texts (T = 32), V = 10,000, C = 24, K_obj = 1,600. One group per
//! kernel at the shapes a training step gives it, then the whole training step (forward +
//! backward of both modalities + AdamW) and inference (embedding 128 images + 128 texts).
//!
//! Timing is GPU time from CUDA events around a batch of iterations (`iter_custom`), so host
//! launch overhead shows only where it stalls the GPU. TF32 GEMMs are on (the target
//! is "f32 storage with TF32 GEMMs"); `SEMSHARE_TF32=0` turns them off.
//! Without a GPU (or without `--features cuda`) this prints one skip line and exits 0.

#[cfg(feature = "cuda")]
mod gpu {
    use criterion::{BenchmarkGroup, Criterion, measurement::WallTime};
    use std::hint::black_box;
    use std::time::Duration;

    use semshare::backend::cuda::Cuda;
    use semshare::backend::{AdamW, Backend, Gemm, GruStep, Segments};
    use semshare::model::{Batch, EmbeddingKind, ImageBatch, ModelConfig, SemShare, TextBatch};
    use semshare::rng::Rng;
    use semshare::tensor::Tensor;
    use semshare::train::{TrainConfig, Trainer};

    const B: usize = 128;
    const R: usize = 36;
    const T: usize = 32;

    fn config() -> ModelConfig {
        ModelConfig { vocab: 10_000, object_classes: 1600, labels: 24, ..ModelConfig::paper() }
    }

    fn batches(cfg: &ModelConfig, seed: u64) -> (ImageBatch, TextBatch) {
        let mut rng = Rng::new(seed);
        (
            ImageBatch::random(&mut rng, &[R; B], cfg.region_dim, cfg.object_classes, cfg.labels),
            TextBatch::random(&mut rng, &[T; B], cfg.vocab, cfg.labels),
        )
    }

    /// GPU time of `iters` runs of `f`, from events on the backend's one stream.
    fn timed(dev: &mut Cuda, iters: u64, mut f: impl FnMut(&mut Cuda)) -> Duration {
        let start = dev.event().expect("event");
        for _ in 0..iters {
            f(dev);
        }
        let end = dev.event().expect("event");
        end.synchronize().expect("synchronize");
        Duration::from_secs_f64(start.elapsed_ms(&end).expect("elapsed") as f64 * 1e-3)
    }

    fn bench(g: &mut BenchmarkGroup<WallTime>, name: &str, dev: &mut Cuda, mut f: impl FnMut(&mut Cuda)) {
        f(dev); // warm the pool and the kernel cache
        g.bench_function(name, |b| b.iter_custom(|iters| timed(dev, iters, &mut f)));
    }

    fn rand(dev: &mut Cuda, rng: &mut Rng, shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        dev.upload(&v, shape).expect("upload")
    }

    pub fn kernels(c: &mut Criterion, dev: &mut Cuda) {
        let cfg = config();
        let mut rng = Rng::new(7);
        let (d, f) = (cfg.dim, cfg.ffn);
        let rows = B * R;
        let x = rand(dev, &mut rng, &[rows, d]);
        let gamma = rand(dev, &mut rng, &[d]);
        let beta = rand(dev, &mut rng, &[d]);

        let mut g = c.benchmark_group("gemm");
        let w = rand(dev, &mut rng, &[3 * d, d]);
        let mut y = dev.zeros(&[rows, 3 * d]).expect("zeros");
        let gm = Gemm { m: rows, n: 3 * d, k: d, trans_a: false, trans_b: true, alpha: 1.0, beta: 0.0 };
        bench(&mut g, "qkv_4608x1024x3072", dev, |dev| dev.gemm(gm, x.view(), w.view(), y.view_mut()).expect("gemm"));
        g.finish();

        let mut g = c.benchmark_group("layernorm_4608x1024");
        let (ly, stats) = dev.layernorm_fwd(&x, gamma.view(), beta.view(), 1e-5).expect("ln");
        let mut dg = dev.zeros(&[d]).expect("zeros");
        let mut db = dev.zeros(&[d]).expect("zeros");
        bench(&mut g, "fwd", dev, |dev| drop(black_box(dev.layernorm_fwd(&x, gamma.view(), beta.view(), 1e-5))));
        bench(&mut g, "fwd_bwd", dev, |dev| {
            let (y, s) = dev.layernorm_fwd(&x, gamma.view(), beta.view(), 1e-5).expect("ln");
            drop(black_box(dev.layernorm_bwd(&x, &s, gamma.view(), &y, dg.view_mut(), db.view_mut())));
        });
        drop((ly, stats));
        g.finish();

        let mut g = c.benchmark_group("gelu_4608x2048");
        let h = rand(dev, &mut rng, &[rows, f]);
        bench(&mut g, "fwd", dev, |dev| drop(black_box(dev.gelu_fwd(&h))));
        bench(&mut g, "bwd", dev, |dev| drop(black_box(dev.gelu_bwd(&h, &h))));
        g.finish();

        let mut g = c.benchmark_group("elementwise_4608x1024");
        let mut z = rand(dev, &mut rng, &[rows, d]);
        bench(&mut g, "add_bias", dev, |dev| dev.add_bias(&mut z, gamma.view()).expect("bias"));
        bench(&mut g, "bias_bwd", dev, |dev| dev.bias_bwd(&x, dg.view_mut()).expect("bias_bwd"));
        bench(&mut g, "residual_add", dev, |dev| dev.add_assign(&mut z, &x).expect("add"));
        bench(&mut g, "dropout", dev, |dev| dev.dropout_fwd(&mut z, 0.1, 5).expect("dropout"));
        g.finish();

        let mut g = c.benchmark_group("attention_128x8x36x128");
        let seg = Segments::from_lengths(dev, &[R; B]).expect("segments");
        let qkv = rand(dev, &mut rng, &[rows, 3 * d]);
        bench(&mut g, "fwd", dev, |dev| drop(black_box(dev.attention_fwd(&qkv, &seg, cfg.heads))));
        bench(&mut g, "fwd_bwd", dev, |dev| {
            let (o, p) = dev.attention_fwd(&qkv, &seg, cfg.heads).expect("attention");
            drop(black_box(dev.attention_bwd(&qkv, &p, &seg, cfg.heads, &o)));
        });
        g.finish();

        let mut g = c.benchmark_group("gru_step_b128_h512");
        let hd = cfg.gru_hidden;
        let tseg = Segments::from_lengths(dev, &[T; B]).expect("segments");
        let xproj = rand(dev, &mut rng, &[B * T, 3 * hd]);
        let hproj = rand(dev, &mut rng, &[B, 3 * hd]);
        let mut hs = rand(dev, &mut rng, &[B, hd]);
        let mut out = dev.zeros(&[B * T, 2 * hd]).expect("zeros");
        let mut gates = dev.zeros(&[B, 4 * hd]).expect("zeros");
        let step = GruStep { s: 3, reverse: false, hidden: hd, out_col: 0 };
        bench(&mut g, "gates_fwd", dev, |dev| {
            dev.gru_step_fwd(step, &tseg, &xproj, &hproj, &mut hs, &mut out, &mut gates).expect("gru")
        });
        g.finish();

        let mut g = c.benchmark_group("losses");
        let logits = rand(dev, &mut rng, &[B, cfg.labels]);
        let targets = rand(dev, &mut rng, &[B, cfg.labels]);
        bench(&mut g, "bce_fwd_bwd_128x24", dev, |dev| {
            let mut l = logits.clone();
            black_box(dev.bce_with_logits(&mut l, &targets, 1.0).expect("bce"));
        });
        let masked = (B * T * 15) / 100; // 614 masked tokens
        let ce = rand(dev, &mut rng, &[masked, cfg.vocab]);
        let ids: Vec<u32> = (0..masked).map(|i| (i * 7919 % cfg.vocab) as u32).collect();
        let ids = dev.upload_ids(&ids).expect("ids");
        bench(&mut g, "ce_fwd_bwd_614x10000", dev, |dev| {
            let mut l = ce.clone();
            black_box(dev.cross_entropy(&mut l, &ids, 1.0).expect("ce"));
        });
        g.finish();

        let mut g = c.benchmark_group("rows");
        let table = rand(dev, &mut rng, &[cfg.vocab, cfg.word_dim]);
        let tok: Vec<u32> = (0..B * T).map(|i| (i * 31 % cfg.vocab) as u32).collect();
        let tok = dev.upload_ids(&tok).expect("ids");
        let emb = dev.gather_rows(table.view(), cfg.word_dim, &tok).expect("gather");
        let mut dtable = dev.zeros(&[cfg.vocab, cfg.word_dim]).expect("zeros");
        bench(&mut g, "gather_4096x300", dev, |dev| drop(black_box(dev.gather_rows(table.view(), cfg.word_dim, &tok))));
        bench(&mut g, "scatter_add_4096x300", dev, |dev| {
            dev.scatter_add_rows(&emb, &tok, dtable.view_mut()).expect("scatter")
        });
        bench(&mut g, "segment_mean_fwd_4608x1024", dev, |dev| drop(black_box(dev.segment_mean_fwd(&x, &seg))));
        g.finish();

        let mut g = c.benchmark_group("optimizer_71M");
        let n = SemShare::new(&cfg).expect("model").store.total;
        let mut p = dev.zeros(&[n]).expect("zeros");
        let grads = dev.zeros(&[n]).expect("zeros");
        let mut m = dev.zeros(&[n]).expect("zeros");
        let mut v = dev.zeros(&[n]).expect("zeros");
        let hp = AdamW { lr: 1e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, step: 1, grad_scale: 1.0 };
        bench(&mut g, "adamw", dev, |dev| {
            dev.adamw(p.view_mut(), grads.view(), m.view_mut(), v.view_mut(), hp).expect("adamw")
        });
        bench(&mut g, "sum_squares", dev, |dev| drop(black_box(dev.sum_squares(grads.view()))));
        g.finish();
    }

    pub fn end_to_end(c: &mut Criterion, dev: &mut Cuda) {
        let cfg = config();
        let mut g = c.benchmark_group("paper_b128_t32");
        g.sample_size(10);
        let mut trainer = Trainer::new(dev, &cfg, TrainConfig::default()).expect("trainer");
        let (ib, tb) = batches(&cfg, 1);
        bench(&mut g, "train_step", dev, |dev| {
            black_box(trainer.step(dev, ib.clone(), tb.clone()).expect("step"));
        });
        let net = SemShare::new(&cfg).expect("model");
        let w = net.store.upload(dev, &net.store.init_values(0)).expect("weights");
        let (ib, tb) = (Batch::Image(ib), Batch::Text(tb));
        bench(&mut g, "embed_128img_128txt", dev, |dev| {
            let i = net.embed(dev, &w, &ib, EmbeddingKind::Pooled).expect("embed");
            let t = net.embed(dev, &w, &tb, EmbeddingKind::Pooled).expect("embed");
            black_box((i, t));
        });
        g.finish();
    }
}

fn main() {
    #[cfg(feature = "cuda")]
    {
        if !semshare::backend::cuda::available() {
            eprintln!("SKIP benches/gpu: no CUDA GPU (libcuda missing or no device)");
            return;
        }
        let mut dev = match semshare::backend::cuda::Cuda::new(0) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("benches/gpu: {e}");
                std::process::exit(1);
            }
        };
        let tf32 = std::env::var("SEMSHARE_TF32").map_or(true, |v| v != "0");
        if let Err(e) = dev.set_tf32(tf32) {
            eprintln!("benches/gpu: {e}");
            std::process::exit(1);
        }
        eprintln!("benches/gpu on {} (TF32 GEMMs {})", dev.device_name(), if tf32 { "on" } else { "off" });
        let mut c = criterion::Criterion::default()
            .warm_up_time(std::time::Duration::from_millis(500))
            .measurement_time(std::time::Duration::from_secs(2))
            .sample_size(20)
            .configure_from_args();
        gpu::kernels(&mut c, &mut dev);
        gpu::end_to_end(&mut c, &mut dev);
        c.final_summary();
    }
    #[cfg(not(feature = "cuda"))]
    eprintln!("SKIP benches/gpu: this build has no CUDA support (--features cuda)");
}
