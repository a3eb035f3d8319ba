//! GPU benchmarks (criterion) on the benchmark configuration of DESIGN.md §2: `paper` preset,
//! 128 images (R = 36) + 128 texts (T = 32), V = 10,000, C = 24, K_obj = 1,600. One group per
//! kernel at the shapes a training step gives it, the Bi-GRU layer at the text encoder's shape
//! (against cuDNN), a device-to-device copy (the card's bandwidth, for "% of copy bandwidth"),
//! then the whole training step (forward + backward of both modalities + AdamW; the layers'
//! GEMMs in TF32, bf16 and IEEE f32) and inference (embedding 128 images + 128 texts, TF32 and
//! bf16).
//!
//! Timing is GPU time from CUDA events around a batch of iterations (`iter_custom`), so host
//! launch overhead shows only where it stalls the GPU. Only the work is timed: inputs an
//! iteration consumes (the training step's host batches, the Bi-GRU's input) are built before
//! the first event, reductions are timed without their download (which synchronises), and
//! the optimiser is the trainer's own update (one AdamW launch per parameter run).
//! The kernel groups' GEMMs are TF32 (the target is "f32 storage with TF32 GEMMs");
//! `SEMSHARE_PRECISION=fp32|tf32|bf16` chooses another precision for them. The end-to-end
//! rows name their own.
//! Without a GPU (or without `--features cuda`) this prints one skip line and exits 0 (1 with
//! `SEMSHARE_REQUIRE_GPU=1`, as tools/gpu-run.sh sets it).

#[cfg(feature = "cuda")]
mod gpu {
    use criterion::{BenchmarkGroup, Criterion, measurement::WallTime};
    use std::hint::black_box;
    use std::time::Duration;

    use semshare::backend::cuda::Cuda;
    use semshare::backend::cuda::GruPath;
    use semshare::backend::{
        AdamW, Backend, Gemm, GruRunBwd, GruRunFwd, GruStep, Half, Precision, Segments, gru_bwd_by_steps,
        gru_fwd_by_steps,
    };
    use semshare::model::{Batch, EmbeddingKind, ImageBatch, ModelConfig, SemShare, TextBatch};
    use semshare::nn::{BiGru, ParamStore, Weights};
    use semshare::rng::Rng;
    use semshare::tensor::{DType, Tensor};
    use semshare::train::{StepMode, TrainConfig, Trainer};

    const B: usize = 128;
    const R: usize = 36;
    const T: usize = 32;

    fn config() -> ModelConfig {
        ModelConfig { vocab: 10_000, object_classes: 1600, labels: 24, ..ModelConfig::paper() }
    }

    /// The region features as an fp16 shard delivers them (uploaded as they are, widened on
    /// the device: 9.4 MB of a step's upload instead of 18.9 MB).
    fn batches(cfg: &ModelConfig, seed: u64) -> (ImageBatch, TextBatch) {
        let mut rng = Rng::new(seed);
        let mut images = ImageBatch::random(&mut rng, &[R; B], cfg.region_dim, cfg.object_classes, cfg.labels);
        images.features = images.features.to_half(Half::F16);
        (images, TextBatch::random(&mut rng, &[T; B], cfg.vocab, cfg.labels))
    }

    /// GPU time of `f` over each input, from events on the backend's one stream.
    fn timed<I>(dev: &mut Cuda, inputs: impl Iterator<Item = I>, mut f: impl FnMut(&mut Cuda, I)) -> Duration {
        let start = dev.event().expect("event");
        for input in inputs {
            f(dev, input);
        }
        let end = dev.event().expect("event");
        end.synchronize().expect("synchronize");
        Duration::from_secs_f64(start.elapsed_ms(&end).expect("elapsed") as f64 * 1e-3)
    }

    fn bench(g: &mut BenchmarkGroup<WallTime>, name: &str, dev: &mut Cuda, mut f: impl FnMut(&mut Cuda)) {
        f(dev); // warm the pool and the kernel cache
        g.bench_function(name, |b| b.iter_custom(|iters| timed(dev, 0..iters, |dev, _| f(dev))));
    }

    /// `bench` for work that consumes its input: one input per iteration is built by `setup`
    /// before the first event (and the device drained), so only `f` is timed.
    fn bench_batched<I>(
        g: &mut BenchmarkGroup<WallTime>,
        name: &str,
        dev: &mut Cuda,
        mut setup: impl FnMut(&mut Cuda) -> I,
        mut f: impl FnMut(&mut Cuda, I),
    ) {
        let warm = setup(dev);
        f(dev, warm);
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let inputs: Vec<I> = (0..iters).map(|_| setup(dev)).collect();
                dev.synchronize().expect("synchronize");
                timed(dev, inputs.into_iter(), &mut f)
            })
        });
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

        // The card's bandwidth: 1 GiB copied device to device (2 GiB read + written), the
        // PyTorch baseline's `copy_bandwidth` measure; the summary divides bytes by this.
        let mut g = c.benchmark_group("copy");
        let n = 1 << 28;
        let mut src = dev.alloc(&[n]).expect("alloc");
        dev.fill(src.view_mut(), 1.5).expect("fill"); // any non-zero: a copy does not look
        let mut dst = dev.zeros(&[n]).expect("zeros");
        bench(&mut g, "dtod_1GiB", dev, |dev| dev.copy(src.view(), dst.view_mut()).expect("copy"));
        drop((src, dst));
        dev.pool().release_cached().expect("release");
        g.finish();

        let mut g = c.benchmark_group("gemm");
        let w = rand(dev, &mut rng, &[3 * d, d]);
        let mut y = dev.zeros(&[rows, 3 * d]).expect("zeros");
        let gm = Gemm { m: rows, n: 3 * d, k: d, trans_a: false, trans_b: true, alpha: 1.0, beta: 0.0 };
        bench(&mut g, "qkv_4608x1024x3072", dev, |dev| dev.gemm(gm, x.view(), w.view(), y.view_mut()).expect("gemm"));
        g.finish();

        // Inputs rotate over 4 copies (75 MB), as in the PyTorch baseline: one 19 MB input
        // would be served from the 50-60 MB L2 and beat the copy bandwidth.
        let mut g = c.benchmark_group("layernorm_4608x1024");
        let xs: Vec<Tensor> = (0..4).map(|_| rand(dev, &mut rng, &[rows, d])).collect();
        let dys: Vec<Tensor> = (0..4).map(|_| rand(dev, &mut rng, &[rows, d])).collect();
        let mut dg = dev.zeros(&[d]).expect("zeros");
        let mut db = dev.zeros(&[d]).expect("zeros");
        let mut i = 0;
        bench(&mut g, "fwd", dev, |dev| {
            i += 1;
            drop(black_box(dev.layernorm_fwd(&xs[i % 4], gamma.view(), beta.view(), 1e-5)))
        });
        bench(&mut g, "fwd_bwd", dev, |dev| {
            i += 1;
            let x = &xs[i % 4];
            let (y, s) = dev.layernorm_fwd(x, gamma.view(), beta.view(), 1e-5).expect("ln");
            drop(y);
            let dy = &dys[i % 4];
            drop(black_box(dev.layernorm_bwd(x, &s, gamma.view(), dy, dg.view_mut(), db.view_mut())));
        });
        // The post-LN join (kernels/residual_norm.cu), f32 and bf16 storage. Backward as a block
        // runs it: dx, da through dropout 0.1, and the column sums dgamma, dbeta and the
        // sublayer's bias gradient. Forward: s = x + dropout 0.1 (a) in place of a, then
        // y = LN(s); a new seed a call, since the same mask every call would grow the kept
        // elements of a without bound (× 1/(1 − p) each time).
        let mut dbias = dev.zeros(&[d]).expect("zeros");
        let stats: Vec<Tensor> =
            xs.iter().map(|x| dev.layernorm_fwd(x, gamma.view(), beta.view(), 1e-5).expect("ln").1).collect();
        let sublayer: Vec<Tensor> = (0..4).map(|_| rand(dev, &mut rng, &[rows, d])).collect();
        let typed = |dev: &mut Cuda, ts: &[Tensor], dtype| -> Vec<Tensor> {
            ts.iter().map(|t| dev.convert(t.view(), dtype).expect("convert").reshape(t.shape())).collect()
        };
        for (suffix, dtype) in [("", DType::F32), ("_bf16", DType::Bf16)] {
            let (xs, dys, mut sublayer) =
                (typed(dev, &xs, dtype), typed(dev, &dys, dtype), typed(dev, &sublayer, dtype));
            bench(&mut g, &format!("join_bwd{suffix}"), dev, |dev| {
                i += 1;
                let (x, s, dy) = (&xs[i % 4], &stats[i % 4], &dys[i % 4]);
                let (dgamma, dbeta, dbias) = (dg.view_mut(), db.view_mut(), Some(dbias.view_mut()));
                drop(black_box(dev.residual_layernorm_bwd(x, s, gamma.view(), dy, dgamma, dbeta, dbias, 0.1, 5)));
            });
            bench(&mut g, &format!("join_fwd{suffix}"), dev, |dev| {
                i += 1;
                let (a, x) = (&mut sublayer[i % 4], &xs[i % 4]);
                drop(black_box(dev.residual_layernorm_fwd(a, x, gamma.view(), beta.view(), 1e-5, 0.1, i as u64)));
            });
        }
        drop((xs, dys, stats, dbias, sublayer));
        g.finish();

        let mut g = c.benchmark_group("gelu_4608x2048");
        let h = rand(dev, &mut rng, &[rows, f]);
        bench(&mut g, "fwd", dev, |dev| drop(black_box(dev.gelu_fwd(&h))));
        bench(&mut g, "bwd", dev, |dev| drop(black_box(dev.gelu_bwd(&h, &h))));
        // The FFN's activation as a block runs it (kernels/elementwise.cu), f32 and bf16
        // storage: h = dropout 0.1 (GELU(u)), and backward in dh's memory with fc1's bias
        // gradient (dh shrinks call by call; the kernel's time does not depend on its values).
        let mut dbias = dev.zeros(&[f]).expect("zeros");
        for (suffix, dtype) in [("", DType::F32), ("_bf16", DType::Bf16)] {
            let mut u = dev.convert(h.view(), dtype).expect("convert").reshape(h.shape());
            let mut dh = Some(dev.convert(h.view(), dtype).expect("convert").reshape(h.shape()));
            bench(&mut g, &format!("ffn_fwd{suffix}"), dev, |dev| {
                drop(black_box(dev.bias_gelu_dropout_fwd(&mut u, None, 0.1, 3)))
            });
            bench(&mut g, &format!("ffn_bwd{suffix}"), dev, |dev| {
                let t = dh.take().expect("dh");
                dh = Some(dev.gelu_dropout_bias_bwd(&u, t, 0.1, 3, dbias.view_mut()).expect("ffn bwd"));
            });
        }
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
            drop(black_box(dev.attention_bwd(&qkv, &p, &seg, cfg.heads, &o, None)));
        });
        // The qkv bias's gradient summed by the backward's blocks, against a column sum after it.
        let mut dbias = dev.zeros(&[3 * d]).expect("dbias");
        bench(&mut g, "fwd_bwd_bias", dev, |dev| {
            let (o, p) = dev.attention_fwd(&qkv, &seg, cfg.heads).expect("attention");
            drop(black_box(dev.attention_bwd(&qkv, &p, &seg, cfg.heads, &o, Some(dbias.view_mut()))));
        });
        bench(&mut g, "fwd_bwd_then_bias_bwd", dev, |dev| {
            let (o, p) = dev.attention_fwd(&qkv, &seg, cfg.heads).expect("attention");
            let dqkv = dev.attention_bwd(&qkv, &p, &seg, cfg.heads, &o, None).expect("attention");
            black_box(dev.bias_bwd(&dqkv, dbias.view_mut())).expect("bias_bwd");
        });
        // bf16 storage: forward and backward on the tensor cores (kernels/attention.cu, version 2).
        let qkv16 = dev.convert(qkv.view(), DType::Bf16).expect("bf16 qkv").reshape(qkv.shape());
        bench(&mut g, "fwd_bf16", dev, |dev| drop(black_box(dev.attention_fwd(&qkv16, &seg, cfg.heads))));
        bench(&mut g, "fwd_bwd_bf16", dev, |dev| {
            let (o, p) = dev.attention_fwd(&qkv16, &seg, cfg.heads).expect("attention");
            drop(black_box(dev.attention_bwd(&qkv16, &p, &seg, cfg.heads, &o, None)));
        });
        g.finish();

        let mut g = c.benchmark_group("gru_step_b128_h512");
        let hd = cfg.gru_hidden;
        let tseg = Segments::from_lengths(dev, &[T; B]).expect("segments");
        let xproj = rand(dev, &mut rng, &[B * T, 3 * hd]);
        let hproj = rand(dev, &mut rng, &[B, 3 * hd]);
        let bias_hh = rand(dev, &mut rng, &[3 * hd]);
        let mut hs = rand(dev, &mut rng, &[(T + 1) * B, hd]);
        let mut out = dev.zeros(&[B * T, 2 * hd]).expect("zeros");
        let mut gates = dev.zeros(&[T * B, 4 * hd]).expect("zeros");
        let step = GruStep { s: 3, reverse: false, hidden: hd, out_col: 0 };
        bench(&mut g, "gates_fwd", dev, |dev| {
            dev.gru_step_fwd(step, &tseg, &xproj, &hproj, bias_hh.view(), &mut hs, &mut out, &mut gates).expect("gru")
        });
        g.finish();

        // The whole Bi-GRU layer of the text encoder (word_dim 300 -> 2 x 512, 32 steps per
        // direction) against PyTorch's `bigru_*` (cuDNN, fp32 with TF32 off) at the same
        // shape, so with IEEE GEMMs here too. The layer consumes its input: each iteration gets
        // a device copy made before the clock starts.
        let precision = dev.precision();
        dev.set_precision(Precision::F32);
        let mut g = c.benchmark_group("bigru_b128_t32_300x512_ieee");
        let mut store = ParamStore::new();
        let gru = BiGru::new(&mut store, "gru", cfg.word_dim, hd);
        let gw = store.upload(dev, &store.init_values(3)).expect("weights");
        let mut gg = dev.zeros(&[store.total]).expect("zeros");
        let gx = rand(dev, &mut rng, &[B * T, cfg.word_dim]);
        let gdout = rand(dev, &mut rng, &[B * T, 2 * hd]);
        bench_batched(&mut g, "fwd", dev, |_| gx.clone(), |dev, x| drop(black_box(gru.forward(dev, &gw, x, &tseg))));
        bench_batched(
            &mut g,
            "fwd_bwd",
            dev,
            |_| gx.clone(),
            |dev, x| {
                let (o, cache) = gru.forward(dev, &gw, x, &tseg).expect("gru fwd");
                drop(o);
                drop(black_box(gru.backward(dev, &gw, &mut gg, &tseg, cache, &gdout)));
            },
        );
        g.finish();

        // The recurrence alone, both directions: the persistent kernel (`Backend::gru_fwd` /
        // `gru_bwd`, kernels/gru_persistent.cu) against the step-by-step path it replaced (a
        // cuBLAS GEMM and the gate kernel per step and direction), same inputs, same call: the
        // A/B that says whether the persistent kernel pays on this card. The backward zeroes
        // dh first (it enters as zero in training), both ways alike.
        // At 128 items (four chunks of the persistent kernel each way: `GruPath::Auto` takes
        // the steps) and 32 (forward one chunk, which Auto takes persistent; backward two at
        // H 512, 29 + 3, for shared memory: Auto takes the steps).
        for b in [B, 32] {
            let rseg = Segments::from_lengths(dev, &vec![T; b]).expect("segments");
            let mut g = c.benchmark_group(format!("bigru_recurrence_b{b}_t32_h512_ieee"));
            let rx = [rand(dev, &mut rng, &[b * T, 3 * hd]), rand(dev, &mut rng, &[b * T, 3 * hd])];
            let rw = [rand(dev, &mut rng, &[3 * hd, hd]), rand(dev, &mut rng, &[3 * hd, hd])];
            let rb = [rand(dev, &mut rng, &[3 * hd]), rand(dev, &mut rng, &[3 * hd])];
            let zeros =
                |dev: &mut Cuda, shape: &[usize]| [dev.zeros(shape).expect("zeros"), dev.zeros(shape).expect("zeros")];
            let ([mut hs0, mut hs1], [mut g0, mut g1]) = (zeros(dev, &[(T + 1) * b, hd]), zeros(dev, &[T * b, 4 * hd]));
            let ([mut dh0, mut dh1], [mut dx0, mut dx1]) = (zeros(dev, &[b, hd]), zeros(dev, &[b * T, 3 * hd]));
            let [mut dp0, mut dp1] = zeros(dev, &[T * b, 3 * hd]);
            let mut out = dev.zeros(&[b * T, 2 * hd]).expect("zeros");
            let dout = rand(dev, &mut rng, &[b * T, 2 * hd]);
            // Three ways: the persistent kernel; the steps with both directions' GEMMs in one
            // batched call per step (`GruPath::BySteps`, what Auto takes here); and the steps
            // one direction after the other (`gru_fwd_by_steps`, before session 27).
            for (way, path) in [
                ("persistent", Some(GruPath::Persistent)),
                ("by_steps_batched", Some(GruPath::BySteps)),
                ("by_steps", None),
            ] {
                // The first two through `Backend::gru_fwd` / `gru_bwd` on the path set.
                let through_backend = path.is_some();
                if let Some(path) = path {
                    dev.set_gru_path(path);
                }
                bench(&mut g, &format!("{way}_fwd"), dev, |dev| {
                    let runs = [
                        GruRunFwd {
                            reverse: false,
                            xproj: &rx[0],
                            w_hh: rw[0].view(),
                            bias_hh: rb[0].view(),
                            hs: &mut hs0,
                            gates: &mut g0,
                        },
                        GruRunFwd {
                            reverse: true,
                            xproj: &rx[1],
                            w_hh: rw[1].view(),
                            bias_hh: rb[1].view(),
                            hs: &mut hs1,
                            gates: &mut g1,
                        },
                    ];
                    let r = if through_backend {
                        dev.gru_fwd(&rseg, hd, runs, &mut out)
                    } else {
                        gru_fwd_by_steps(dev, &rseg, hd, runs, &mut out)
                    };
                    r.expect("gru fwd");
                });
                bench(&mut g, &format!("{way}_bwd"), dev, |dev| {
                    dev.fill(dh0.view_mut(), 0.0).expect("fill");
                    dev.fill(dh1.view_mut(), 0.0).expect("fill");
                    let runs = [
                        GruRunBwd {
                            reverse: false,
                            w_hh: rw[0].view(),
                            gates: &g0,
                            hs: &hs0,
                            dh: &mut dh0,
                            dxproj: &mut dx0,
                            dhproj: &mut dp0,
                        },
                        GruRunBwd {
                            reverse: true,
                            w_hh: rw[1].view(),
                            gates: &g1,
                            hs: &hs1,
                            dh: &mut dh1,
                            dxproj: &mut dx1,
                            dhproj: &mut dp1,
                        },
                    ];
                    let r = if through_backend {
                        dev.gru_bwd(&rseg, hd, runs, &dout)
                    } else {
                        gru_bwd_by_steps(dev, &rseg, hd, runs, &dout)
                    };
                    r.expect("gru bwd");
                });
            }
            g.finish();
        }
        dev.set_gru_path(GruPath::Auto);
        dev.set_precision(precision);

        // The loss kernels alone: no clone, no download of the partial sums (the trainer's
        // download synchronises; it is in the training step). The gradient overwrites the
        // logits in place, so later iterations run on bounded gradients: same work.
        let mut g = c.benchmark_group("losses");
        let mut logits = rand(dev, &mut rng, &[B, cfg.labels]);
        let targets = rand(dev, &mut rng, &[B, cfg.labels]);
        bench(&mut g, "bce_fwd_bwd_128x24", dev, |dev| {
            drop(black_box(dev.bce_with_logits_partials(&mut logits, &targets, 1.0).expect("bce")));
        });
        let masked = (B * T * 15) / 100; // 614 masked tokens
        let mut ce = rand(dev, &mut rng, &[masked, cfg.vocab]);
        let ids: Vec<u32> = (0..masked).map(|i| (i * 7919 % cfg.vocab) as u32).collect();
        let ids = dev.upload_ids(&ids).expect("ids");
        bench(&mut g, "ce_fwd_bwd_614x10000", dev, |dev| {
            drop(black_box(dev.cross_entropy_rows(&mut ce, &ids, 1.0).expect("ce")));
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
        // As the masked-word step has it: 15 % of the rows the one [MASK] id (token 3 here).
        let masked: Vec<u32> = (0..B * T).map(|i| if i % 20 < 3 { 3 } else { (i * 31 % cfg.vocab) as u32 }).collect();
        let masked = dev.upload_ids(&masked).expect("ids");
        bench(&mut g, "scatter_add_4096x300_masked", dev, |dev| {
            dev.scatter_add_rows(&emb, &masked, dtable.view_mut()).expect("scatter")
        });
        bench(&mut g, "segment_mean_fwd_4608x1024", dev, |dev| drop(black_box(dev.segment_mean_fwd(&x, &seg))));
        g.finish();

        // The optimiser step as the trainer runs it: one AdamW launch over the paper model's
        // real parameter set (random gradients) with the per-parameter decay mask and the clip
        // factor read on the device, then the gradient norm's reduction (kernel only).
        // `adamw_one_launch` is the plain update without the mask: their ratio is the cost of
        // the mask's run search.
        let mut g = c.benchmark_group("optimizer_71M");
        let mut trainer = Trainer::new(dev, &cfg, TrainConfig::default()).expect("trainer");
        let n = trainer.params.len();
        let r = rand(dev, &mut rng, &[n]);
        dev.copy(r.view(), trainer.grads.view_mut()).expect("copy");
        drop(r);
        eprintln!(
            "benches/gpu: optimizer_71M/adamw_step is {} AdamW launches over {n} parameters",
            trainer.optimizer_launches()
        );
        bench(&mut g, "adamw_step", dev, |dev| {
            trainer.optimizer_update(dev, 1e-4, 1.0).expect("adamw");
        });
        let mut p = dev.zeros(&[n]).expect("zeros");
        let mut m = dev.zeros(&[n]).expect("zeros");
        let mut v = dev.zeros(&[n]).expect("zeros");
        let hp = AdamW { lr: 1e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, step: 1, grad_scale: 1.0 };
        let grads = &trainer.grads;
        bench(&mut g, "adamw_one_launch", dev, |dev| {
            dev.adamw(p.view_mut(), grads.view(), m.view_mut(), v.view_mut(), hp).expect("adamw")
        });
        bench(&mut g, "sum_squares", dev, |dev| drop(black_box(dev.sum_squares_partials(grads.view()))));
        g.finish();
    }

    /// Exact top-100 of 5,000 queries against 5,000 gallery items (d = 256, one tile): GEMM +
    /// kernels/topk.cu, keys left on the device (issue 13's "5,000 × 5,000 rank + top-100").
    pub fn retrieval(c: &mut Criterion, dev: &mut Cuda) {
        let mut rng = Rng::new(13);
        let (n, d, k) = (5000, 256, 100);
        let q = rand(dev, &mut rng, &[n, d]);
        let g_ = rand(dev, &mut rng, &[n, d]);
        let mut g = c.benchmark_group("retrieval");
        bench(&mut g, "top100_5000x5000_d256", dev, |dev| {
            drop(black_box(dev.top_k_keys(q.view(), g_.view(), d, k, n).expect("top_k")));
        });
        g.finish();
    }

    pub fn end_to_end(c: &mut Criterion, dev: &mut Cuda) {
        let cfg = config();
        let mut g = c.benchmark_group("paper_b128_t32");
        g.sample_size(10);
        let (ib, tb) = batches(&cfg, 1);
        // The step takes its host batches by value: their clones are made before the clock.
        // Eager steps, and the step as the trainer takes it by default: captured once per
        // shape (masked-row bucket) and replayed; criterion's warm-up sees each bucket twice.
        // One trainer per row: a graph keeps the precision it was captured in.
        let precision = dev.precision();
        let rows = [
            ("train_step_tf32", Precision::Tf32, StepMode::Eager),
            ("train_step_ieee", Precision::F32, StepMode::Eager),
            ("train_step_graph_tf32", Precision::Tf32, StepMode::Captured),
            ("train_step_bf16", Precision::Bf16, StepMode::Eager),
            ("train_step_graph_bf16", Precision::Bf16, StepMode::Captured),
        ];
        for (name, at, mode) in rows {
            dev.set_precision(at);
            let mut trainer = Trainer::new(dev, &cfg, TrainConfig::default()).expect("trainer");
            trainer.set_step_mode(mode, dev);
            bench_batched(
                &mut g,
                name,
                dev,
                |_| (ib.clone(), tb.clone()),
                |dev, (i, t)| {
                    black_box(trainer.step(dev, i, t).expect("step"));
                },
            );
        }
        let net = SemShare::new(&cfg).expect("model");
        let w = net.store.upload(dev, &net.store.init_values(0)).expect("weights");
        let (ib, tb) = (Batch::Image(ib), Batch::Text(tb));
        for (name, at) in [("embed_128img_128txt", Precision::Tf32), ("embed_128img_128txt_bf16", Precision::Bf16)] {
            dev.set_precision(at);
            // As a loaded `Model` embeds: the trunk's bf16 copy made once (at load), not by
            // every pass (50 M weights converted twice per measure at `paper`'s sizes).
            let copy = net.bf16_weights(dev, &w).expect("bf16 copy");
            let weights = Weights { values: &w, bf16: copy.as_ref() };
            bench(&mut g, name, dev, |dev| {
                let i = net.embed(dev, weights, &ib, EmbeddingKind::Pooled).expect("embed");
                let t = net.embed(dev, weights, &tb, EmbeddingKind::Pooled).expect("embed");
                black_box((i, t));
            });
        }
        dev.set_precision(precision);
        g.finish();
    }
}

fn main() {
    #[cfg(feature = "cuda")]
    {
        if !semshare::backend::cuda::available() {
            // As in the GPU tests: SEMSHARE_REQUIRE_GPU=1 (tools/gpu-run.sh) turns the skip into a failure.
            let required = std::env::var("SEMSHARE_REQUIRE_GPU").is_ok_and(|v| v == "1");
            eprintln!(
                "{} benches/gpu: no CUDA GPU (libcuda missing or no device)",
                if required { "error: SEMSHARE_REQUIRE_GPU=1 but" } else { "SKIP" }
            );
            std::process::exit(if required { 1 } else { 0 });
        }
        let mut dev = match semshare::backend::cuda::Cuda::new(0) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("benches/gpu: {e}");
                std::process::exit(1);
            }
        };
        let precision = std::env::var("SEMSHARE_PRECISION").unwrap_or_else(|_| "tf32".into());
        match semshare::backend::Precision::parse(&precision) {
            Ok(p) => dev.set_precision(p),
            Err(e) => {
                eprintln!("benches/gpu: SEMSHARE_PRECISION: {e}");
                std::process::exit(1);
            }
        }
        eprintln!("benches/gpu on {} (kernel groups' GEMMs: {})", dev.device_name(), dev.precision().name());
        // Which driver and cuBLAS the loader picked (run.sh records it next to its own choice).
        if let Ok(maps) = std::fs::read_to_string("/proc/self/maps") {
            let mut libs: Vec<&str> = maps
                .lines()
                .filter_map(|l| l.split_whitespace().nth(5))
                .filter(|p| p.contains("libcuda.so") || p.contains("libcublas"))
                .collect();
            libs.sort_unstable();
            libs.dedup();
            for l in libs {
                eprintln!("benches/gpu: loaded {l}");
            }
        }
        let mut c = criterion::Criterion::default()
            .warm_up_time(std::time::Duration::from_millis(500))
            .measurement_time(std::time::Duration::from_secs(2))
            .sample_size(20)
            .configure_from_args();
        gpu::kernels(&mut c, &mut dev);
        gpu::retrieval(&mut c, &mut dev);
        gpu::end_to_end(&mut c, &mut dev);
        c.final_summary();
    }
    #[cfg(not(feature = "cuda"))]
    eprintln!("SKIP benches/gpu: this build has no CUDA support (--features cuda)");
}
