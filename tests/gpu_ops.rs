//! Every CUDA op against its CPU twin (dfdx style: one body of `Backend` calls, run on both
//! devices). Fresh random inputs per shape, odd shapes included; outputs the op allocates start
//! as NaN (`poison`) and in-place outputs start from random data, so an element a kernel
//! forgets to write fails the comparison.
//!
//! Tolerances (relative L2 norm of the difference): `EXACT` 1e-5 where the GPU does the CPU's
//! arithmetic in the same order (FMA contraction and expf/sqrtf ulps only); `REDUCE` 1e-4 where
//! a sum runs in a different order (tree/blocked reductions on the GPU, sequential loops on the
//! CPU: each reordering costs ~n·eps relative on an element, 1e-5 for n ≈ 100 terms).
//! Attention and the GRU step have their own tests (tests/gpu_attention.rs, tests/gpu_gru.rs).

mod common;

use common::gpu::{gpu_or_skip, poison};
use common::{rand_ids, rand_range, randv, randv_scaled, rel_err};
use semshare::backend::{AdamW, Backend, Gemm, Segments};
use semshare::tensor::Ids;

const EXACT: f64 = 1e-5;
const REDUCE: f64 = 1e-4;

/// (rows, cols): one row, one column, odd, warp-sized, block-sized, larger than a block.
const SHAPES: [(usize, usize); 7] = [(1, 1), (1, 300), (3, 5), (7, 33), (64, 256), (130, 300), (257, 1024)];

/// Runs `body` on the CPU and the GPU with the same seed; compares every returned vector.
fn twin(test: &str, tol: f64, body: impl Fn(&mut dyn Backend, u64) -> Vec<(&'static str, Vec<f32>)>) {
    let Some(mut gpu) = gpu_or_skip(test) else { return };
    let mut cpu = common::cpu();
    for seed in 0..2u64 {
        let want = body(&mut cpu, seed);
        let got = body(gpu.as_mut(), seed);
        assert_eq!(want.len(), got.len());
        for ((name, w), (_, g)) in want.iter().zip(&got) {
            assert_eq!(w.len(), g.len(), "{test} {name}: length");
            assert!(g.iter().all(|v| v.is_finite()), "{test} {name} seed {seed}: non-finite output on the GPU");
            let w64: Vec<f64> = w.iter().map(|&v| v as f64).collect();
            let e = rel_err(g, &w64);
            common::report(&format!("{test} {name}"), e);
            assert!(e <= tol, "{test} {name} seed {seed}: relative error {e:.3e} > {tol:.0e}");
        }
    }
}

fn up(dev: &mut dyn Backend, v: &[f32], shape: &[usize]) -> semshare::tensor::Tensor {
    dev.upload(v, shape).unwrap()
}

fn down(dev: &mut dyn Backend, t: &semshare::tensor::Tensor) -> Vec<f32> {
    dev.download(t.view()).unwrap()
}

#[test]
fn upload_download_zeros_fill_copy() {
    twin("memory", 0.0, |dev, seed| {
        let mut out = vec![];
        for &(r, c) in &SHAPES {
            let x = up(dev, &randv(seed ^ (r * c) as u64, r * c), &[r, c]);
            poison(dev, &[r * c]);
            let z = dev.zeros(&[r, c]).unwrap();
            let mut f = dev.alloc(&[r, c]).unwrap();
            dev.fill(f.view_mut(), 0.25).unwrap();
            let mut y = dev.alloc(&[r, c]).unwrap();
            dev.copy(x.view(), y.view_mut()).unwrap();
            out.extend([
                ("x", down(dev, &x)),
                ("zeros", down(dev, &z)),
                ("fill", down(dev, &f)),
                ("copy", down(dev, &y)),
            ]);
        }
        out
    });
}

/// Uploads queued back to back, with no wait between them, each arrive whole: through the
/// rings' first growth (4 MiB to 64 MiB), their wrap-arounds, and an upload larger than half
/// the ring (sent in pieces). On the emulated device each copy across the bus waits on the
/// copy stream until the compute stream's wait orders it, and a region reused too early would
/// race its earlier copies (`emu/streams.rs`).
#[test]
fn uploads_queued_back_to_back_arrive_whole_through_every_turn_of_the_rings() {
    let Some(mut dev) = common::gpu::gpu_or_skip("upload rings") else { return };
    let dev = dev.as_mut();
    // Sizes in floats: small ones, ones that fill the first ring, then the large ring's half
    // and more (9 M floats = 36 MB: two pieces of 32 MiB at most).
    let sizes = [1usize, 700, 300_000, 600_000, 5, 900_000, 2_000_000, 9_000_000, 3, 4_500_000, 6_000_000, 17];
    let before = dev.counters().unwrap();
    let mut sent = Vec::new();
    for (i, &n) in sizes.iter().enumerate() {
        let v: Vec<f32> = (0..n).map(|j| (i * 1_000_003 + j) as f32).collect();
        let t = up(dev, &v, &[n]);
        sent.push((v, t));
    }
    let spent = dev.counters().unwrap().since(&before);
    for (i, (v, t)) in sent.iter().enumerate() {
        assert!(down(dev, t) == *v, "upload {i} ({} floats) did not arrive whole", v.len());
    }
    let bytes: usize = sizes.iter().sum::<usize>() * 4;
    assert_eq!(spent.upload_bytes, bytes as u64, "every byte counted once");
    let pieces: usize = sizes.iter().map(|n| (4 * n).div_ceil(32 << 20)).sum();
    assert_eq!(spent.copies, pieces as u64, "one move into place per piece");
}

#[test]
fn gemm_all_transpositions() {
    // Each output is a k-term dot product in a different order (cuBLAS tiles vs matrixmultiply).
    twin("gemm", REDUCE, |dev, seed| {
        let mut out = vec![];
        for &(m, n, k) in &[(1, 1, 1), (3, 5, 7), (33, 17, 65), (128, 96, 256), (130, 300, 257)] {
            for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
                let a = up(dev, &randv(seed ^ 1, m * k), &[m * k]);
                let b = up(dev, &randv(seed ^ 2, k * n), &[k * n]);
                let mut c = up(dev, &randv(seed ^ 3, m * n), &[m, n]);
                let g = Gemm { m, n, k, trans_a: ta, trans_b: tb, alpha: 0.75, beta: 0.5 };
                dev.gemm(g, a.view(), b.view(), c.view_mut()).unwrap();
                out.push(("c = 0.75 op(a) op(b) + 0.5 c", down(dev, &c)));
            }
        }
        out
    });
}

#[test]
fn gemm_with_k_zero_scales_c() {
    twin("gemm k=0", EXACT, |dev, seed| {
        let a = up(dev, &[], &[0]);
        let mut c = up(dev, &randv(seed, 12), &[3, 4]);
        let g = Gemm { m: 3, n: 4, k: 0, trans_a: false, trans_b: false, alpha: 1.0, beta: 0.5 };
        dev.gemm(g, a.view(), a.view(), c.view_mut()).unwrap();
        vec![("c", down(dev, &c))]
    });
}

/// `--precision tf32|bf16`: every element within the bound of its precision against the f64
/// product of the unrounded operands, Σ_p |a_ip·b_pj| · (2u + u² + k·2⁻²⁴) with u the unit of
/// the operands' rounding (2⁻⁸ for bf16's 8-bit mantissa, 2⁻¹⁰ for TF32's 11: the bound of
/// truncation, so it holds however the tensor cores round), plus the f32 rounding of beta·c.
/// bf16 also against the CPU's bf16 GEMM (the same operands, rounded to nearest even, and
/// exact products: only the order of the f32 sums differs), and both must have rounded
/// (farther from the f64 product than an IEEE GEMM gets), whatever the rows (63 included:
/// until session 34 a GEMM of fewer than 64 rows stayed IEEE f32).
#[cfg(feature = "cuda")]
#[test]
fn gemm_at_reduced_precision_rounds_its_operands() {
    use semshare::backend::Precision;
    let Some(mut gpu) = common::gpu::cuda_or_skip("gemm tf32/bf16") else { return };
    let cases = [
        (64, 96, 256, false, true),
        (130, 300, 257, true, false),
        (200, 33, 70, true, true),
        (63, 40, 129, false, false),
    ];
    for precision in [Precision::Bf16, Precision::Tf32] {
        gpu.set_precision(precision);
        let u: f64 = if precision == Precision::Bf16 { 2f64.powi(-8) } else { 2f64.powi(-10) };
        for (i, &(m, n, k, ta, tb)) in cases.iter().enumerate() {
            let seed = 40 + i as u64;
            let (a, b, c0) = (randv(seed, m * k), randv(seed ^ 7, k * n), randv(seed ^ 9, m * n));
            let g = Gemm { m, n, k, trans_a: ta, trans_b: tb, alpha: 0.75, beta: 0.5 };
            let run = |dev: &mut dyn Backend| {
                let (ad, bd) = (up(dev, &a, &[m * k]), up(dev, &b, &[k * n]));
                let mut c = up(dev, &c0, &[m, n]);
                dev.gemm(g, ad.view(), bd.view(), c.view_mut()).unwrap();
                down(dev, &c)
            };
            let got = run(&mut gpu);
            let what = format!("gemm {} {m}x{n}x{k} ta={ta} tb={tb}", precision.name());
            // The f64 definition (tests/common's), and Σ|a·b| per element from the magnitudes.
            let (a64, b64, c64) = (common::to64(&a), common::to64(&b), common::to64(&c0));
            let exact = common::naive::gemm(&a64, &b64, &c64, m, n, k, ta, tb, 0.75, 0.5);
            let abs = |v: &[f64]| v.iter().map(|x| x.abs()).collect::<Vec<_>>();
            let mag = common::naive::matmul(&abs(&a64), &abs(&b64), m, n, k, ta, tb);
            let (mut worst, mut bound_used) = (0f64, 0f64);
            for (i, ((&got, &want), &mag)) in got.iter().zip(&exact).zip(&mag).enumerate() {
                let bound = 0.75 * mag * (2.0 * u + u * u + k as f64 * 2f64.powi(-24)) + 4e-7 * want.abs().max(1.0);
                let err = (got as f64 - want).abs();
                assert!(
                    err <= bound,
                    "{what}: element ({}, {}) is {got} against {want} (error {err:.3e} > bound {bound:.3e})",
                    i / n,
                    i % n
                );
                if err / bound > worst {
                    (worst, bound_used) = (err / bound, bound);
                }
            }
            let e = rel_err(&got, &exact);
            // Not an `ERR` line: this is the precision's own rounding, not a twin's difference.
            eprintln!(
                "{what}: {e:.3e} from the f64 product (worst element at {worst:.2} of its bound {bound_used:.1e})"
            );
            assert!(e > 1e-5, "{what}: {e:.2e} from the f64 product: the operands were not rounded");
            if precision == Precision::Bf16 {
                // FAST_16BF lets cuBLAS round f32 operands to bf16; it need not. On an H200
                // (cuBLAS 13.1, 2026-12-04) the 64x96x256 product came out 2.6e-4 from the f64
                // one, the CPU's operands-rounded-to-bf16 GEMM 1.6e-3: 2.1e-3 apart. So the
                // device is held to at most the CPU's bf16 error, not to the CPU's bits (the
                // emulated device rounds as the CPU does, and meets it with equality).
                let want = run(&mut semshare::backend::cpu::Cpu::with_precision(precision).unwrap());
                let e_cpu = rel_err(&want, &exact);
                let e_twin = rel_err(&got, &common::to64(&want));
                common::report(&format!("{what}: against the CPU's bf16 GEMM"), e_twin);
                if common::gpu::emulated() {
                    assert!(e_twin <= REDUCE, "{what}: {e_twin:.3e} from the CPU's bf16 GEMM on the emulated device");
                }
                assert!(
                    e <= e_cpu * (1.0 + 1e-3),
                    "{what}: {e:.3e} from the f64 product, farther than the CPU's bf16 GEMM ({e_cpu:.3e})"
                );
            }
        }
    }
}

/// `gemm_bias` on CUDA is one cuBLASLt matmul whose epilogue adds the bias (one library call,
/// no kernel of ours): at each precision it gives what `gemm` then `add_bias` give on the
/// same device (the emulated device: bit for bit; a GPU's epilogue runs another kernel,
/// hence the tolerance on Σ|a·b|), and in fp32 what the CPU's `gemm_bias` gives. Every
/// transpose, beta 0 and beta ≠ 0 (C read in place), 7 rows.
#[cfg(feature = "cuda")]
#[test]
fn gemm_bias_in_the_epilogue_matches_gemm_then_bias() {
    use semshare::backend::Precision;
    let Some(mut gpu) = common::gpu::cuda_or_skip("gemm + bias epilogue") else { return };
    let cases = [
        (64, 96, 256, false, true, 1.0, 0.0),
        (130, 300, 257, true, false, 0.75, 0.5),
        (7, 33, 70, true, true, 1.0, 1.0),
        (200, 1, 5, false, false, -0.5, 0.0),
    ];
    for precision in [Precision::F32, Precision::Tf32, Precision::Bf16] {
        gpu.set_precision(precision);
        for (i, &(m, n, k, ta, tb, alpha, beta)) in cases.iter().enumerate() {
            let seed = 60 + i as u64;
            let (a, b, c0, bias) =
                (randv(seed, m * k), randv(seed ^ 7, k * n), randv(seed ^ 9, m * n), randv(seed ^ 3, n));
            let g = Gemm { m, n, k, trans_a: ta, trans_b: tb, alpha, beta };
            let what = format!("gemm_bias {} {m}x{n}x{k} ta={ta} tb={tb} beta={beta}", precision.name());
            let fused = |dev: &mut dyn Backend| {
                let (ad, bd, biasd) = (up(dev, &a, &[m * k]), up(dev, &b, &[k * n]), up(dev, &bias, &[n]));
                let mut c = up(dev, &c0, &[m, n]);
                let before = dev.counters();
                dev.gemm_bias(g, ad.view(), bd.view(), biasd.view(), &mut c).unwrap();
                let spent = dev.counters().zip(before).map(|(after, before)| after.since(&before));
                (down(dev, &c), spent)
            };
            let (got, spent) = fused(&mut gpu);
            let spent = spent.expect("the CUDA backend counts");
            assert_eq!((spent.kernels, spent.blas_calls), (0, 1), "{what}: {spent:?}");
            let (ad, bd, biasd) = (up(&mut gpu, &a, &[m * k]), up(&mut gpu, &b, &[k * n]), up(&mut gpu, &bias, &[n]));
            let mut c = up(&mut gpu, &c0, &[m, n]);
            gpu.gemm(g, ad.view(), bd.view(), c.view_mut()).unwrap();
            gpu.add_bias(&mut c, biasd.view()).unwrap();
            let want = down(&mut gpu, &c);
            let abs = |v: &[f32]| v.iter().map(|x| x.abs() as f64).collect::<Vec<_>>();
            let mag = common::naive::matmul(&abs(&a), &abs(&b), m, n, k, ta, tb);
            for (j, ((&x, &y), &mag)) in got.iter().zip(&want).zip(&mag).enumerate() {
                let scale = alpha.abs() as f64 * mag + (beta * c0[j]).abs() as f64 + bias[j % n].abs() as f64;
                let err = (x as f64 - y as f64).abs();
                assert!(err <= 1e-5 * scale + 1e-6, "{what}: element {j}: {x} fused against {y} unfused");
            }
            common::report(&format!("{what}: against gemm + add_bias"), rel_err(&got, &common::to64(&want)));
            if precision == Precision::F32 {
                let (cpu_got, _) = fused(&mut semshare::backend::cpu::Cpu::new());
                let e = rel_err(&got, &common::to64(&cpu_got));
                common::report(&format!("{what}: against the CPU"), e);
                assert!(e <= EXACT, "{what}: {e:.3e} from the CPU's gemm_bias");
            }
        }
    }
}

#[test]
fn bias_residual_scale() {
    twin("bias/residual/scale", EXACT, |dev, seed| {
        let mut out = vec![];
        for &(r, c) in &SHAPES {
            let s = seed ^ (r * 1000 + c) as u64;
            let mut y = up(dev, &randv(s, r * c), &[r, c]);
            let b = up(dev, &randv(s ^ 1, c), &[c]);
            dev.add_bias(&mut y, b.view()).unwrap();
            let x = up(dev, &randv(s ^ 2, r * c), &[r, c]);
            dev.add_assign(&mut y, &x).unwrap();
            dev.scale(y.view_mut(), -1.5).unwrap();
            out.push(("y", down(dev, &y)));
        }
        out
    });
}

#[test]
fn bias_grad() {
    // Column sums: 64-row blocks then a sum of block partials on the GPU, one sequential loop
    // on the CPU.
    twin("bias_bwd", REDUCE, |dev, seed| {
        let mut out = vec![];
        for &(r, c) in &SHAPES {
            let s = seed ^ (r * 1000 + c) as u64;
            let dy = up(dev, &randv(s, r * c), &[r, c]);
            let mut db = up(dev, &randv(s ^ 1, c), &[c]);
            dev.bias_bwd(&dy, db.view_mut()).unwrap();
            out.push(("dbias", down(dev, &db)));
        }
        out
    });
}

#[test]
fn gelu() {
    twin("gelu", EXACT, |dev, seed| {
        let mut out = vec![];
        for &(r, c) in &SHAPES {
            let s = seed ^ (r * 1000 + c) as u64;
            let x = up(dev, &randv_scaled(s, r * c, 6.0), &[r, c]);
            let dy = up(dev, &randv(s ^ 1, r * c), &[r, c]);
            poison(dev, &[r * c]);
            let y = dev.gelu_fwd(&x).unwrap();
            let dx = dev.gelu_bwd(&x, &dy).unwrap();
            out.extend([("gelu", down(dev, &y)), ("gelu_bwd", down(dev, &dx))]);
        }
        out
    });
}

/// The label coordinates √softplus(g), element by element against the CPU's f64 definition:
/// logits up to ±90 (a trained model's are within ±30) and the edges of the kernel's branches, down to −150 (e^g subnormal in f32).
/// A coordinate far below the top one must keep its digits (it separates near-duplicates), so
/// the bound is relative: 2⁻²⁰, a few f32 roundings of `expf`, `log1pf` and `sqrtf`.
#[test]
fn label_coordinates_match_the_f64_definition_element_by_element() {
    let Some(mut gpu) = gpu_or_skip("label coordinates") else { return };
    let mut cpu = common::cpu();
    let mut g = randv_scaled(7, 5000, 30.0);
    g.extend([
        0.0, 1e-30, -1e-30, 1e-7, -1e-7, 17.0, 18.0, 88.0, 90.0, -19.99, -20.0, -20.01, -60.0, -88.0, -90.0, -100.0,
        -150.0,
    ]);
    let mut worst = (0.0f64, 0.0f32);
    for dev in [gpu.as_mut(), &mut cpu as &mut dyn Backend] {
        let mut t = dev.upload(&g, &[g.len()]).unwrap();
        dev.label_coordinates(&mut t).unwrap();
        let got = down(dev, &t);
        for (&x, &y) in g.iter().zip(&got) {
            let e = f64::from(x).exp();
            let want = if x > 0.0 { f64::from(x) + (-f64::from(x)).exp().ln_1p() } else { e.ln_1p() }.sqrt();
            let err = (f64::from(y) - want).abs() / want;
            assert!(err <= 2f64.powi(-20), "g = {x}: {y} against {want} ({err:.2e} relative)");
            if err > worst.0 {
                worst = (err, x);
            }
        }
    }
    common::report("label_coordinates", worst.0);
}

#[test]
fn dropout_mask_is_bit_identical() {
    // The mask is an integer hash: the zero pattern must match exactly, not just in norm.
    let Some(mut gpu) = gpu_or_skip("dropout") else { return };
    let mut cpu = common::cpu();
    for &(r, c) in &SHAPES {
        for (p, seed) in [(0.1f32, 7u64), (0.5, u64::MAX - 3)] {
            let x = randv(seed ^ (r * c) as u64, r * c);
            let run = |dev: &mut dyn Backend| {
                let mut t = dev.upload(&x, &[r, c]).unwrap();
                dev.dropout_fwd(&mut t, p, seed).unwrap();
                let fwd = dev.download(t.view()).unwrap();
                dev.dropout_bwd(&mut t, p, seed).unwrap();
                (fwd, dev.download(t.view()).unwrap())
            };
            let (wf, wb) = run(&mut cpu);
            let (gf, gb) = run(gpu.as_mut());
            for (w, g) in [(&wf, &gf), (&wb, &gb)] {
                let zw: Vec<bool> = w.iter().map(|v| *v == 0.0).collect();
                let zg: Vec<bool> = g.iter().map(|v| *v == 0.0).collect();
                assert_eq!(zw, zg, "dropout mask differs at shape {r}x{c} p {p}");
                assert_eq!(w, g, "kept values are x·(1/(1-p)) on both devices");
            }
        }
    }
}

#[test]
fn l2_normalize_rows() {
    twin("l2_normalize_rows", REDUCE, |dev, seed| {
        let mut out = vec![];
        for &(r, c) in &SHAPES {
            let mut v = randv(seed ^ (r * c) as u64, r * c);
            v[..c].iter_mut().for_each(|x| *x = 0.0); // a zero row stays zero
            let mut x = up(dev, &v, &[r, c]);
            dev.l2_normalize_rows(&mut x).unwrap();
            out.push(("x / |x|", down(dev, &x)));
        }
        out
    });
}

#[test]
fn gather_and_set_rows() {
    twin("gather/set_rows", EXACT, |dev, seed| {
        let mut out = vec![];
        for &(r, c) in &SHAPES {
            let s = seed ^ (r * 1000 + c) as u64;
            let table = up(dev, &randv(s, r * c), &[r, c]);
            let ids = dev.upload_ids(&rand_ids(s ^ 1, 2 * r + 1, r)).unwrap();
            poison(dev, &[(2 * r + 1) * c]);
            let g = dev.gather_rows(table.view(), c, &ids).unwrap();
            let mut x = up(dev, &randv(s ^ 2, r * c), &[r, c]);
            let value = up(dev, &randv(s ^ 3, c), &[c]);
            let rows = dev.upload_ids(&rand_ids(s ^ 4, r.div_ceil(3), r)).unwrap();
            dev.set_rows(&mut x, &rows, value.view()).unwrap();
            out.extend([("gather", down(dev, &g)), ("set_rows", down(dev, &x))]);
        }
        out
    });
}

/// Repeated ids (most rows share a few) add up in row order on both devices: the GPU's sums
/// are the CPU's bit for bit, and the same bits run to run (a replayed step depends on it).
#[test]
fn scatter_add_adds_repeated_ids_in_row_order() {
    let Some(mut gpu) = gpu_or_skip("scatter_add order") else { return };
    let mut cpu = common::cpu();
    // Tables past the kernel's 64 id residues too, with every residue holding repeated ids.
    for (n, cols, table) in [(1, 1, 1), (700, 33, 3), (40, 300, 7), (5, 1030, 2), (3000, 40, 1600), (2000, 130, 100)] {
        let run = |dev: &mut dyn Backend| {
            let dy = up(dev, &randv(n as u64, n * cols), &[n, cols]);
            let ids = dev.upload_ids(&rand_ids(n as u64 ^ 1, n, table)).unwrap();
            let mut dtable = up(dev, &randv(n as u64 ^ 2, table * cols), &[table, cols]);
            dev.scatter_add_rows(&dy, &ids, dtable.view_mut()).unwrap();
            down(dev, &dtable).iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        };
        let want = run(&mut cpu);
        assert_eq!(run(gpu.as_mut()), want, "{n} rows of {cols} into {table}: against the CPU");
        assert_eq!(run(gpu.as_mut()), want, "{n} rows of {cols} into {table}: a second run");
    }
    // A masked batch: one id (the [MASK] token) in every third row, another of its residue mod
    // 64 in every seventh, the rest spread over a 10,000-word table; past the kernel's tiles
    // of 1,024 ids and its batches of 16 queued rows.
    let (n, cols, table) = (4100, 300, 10_000);
    let mut ids = rand_ids(11, n, table);
    for (i, id) in ids.iter_mut().enumerate() {
        if i % 3 == 0 {
            *id = 4;
        } else if i % 7 == 0 {
            *id = 4 + 64;
        }
    }
    let run = |dev: &mut dyn Backend| {
        let dy = up(dev, &randv(12, n * cols), &[n, cols]);
        let ids = dev.upload_ids(&ids).unwrap();
        let mut dtable = up(dev, &randv(13, table * cols), &[table, cols]);
        dev.scatter_add_rows(&dy, &ids, dtable.view_mut()).unwrap();
        down(dev, &dtable)
    };
    let want = run(&mut cpu);
    common::same_values("a masked batch against the CPU", &run(gpu.as_mut()), &want);
}

#[test]
fn scatter_add_and_set_rows_bwd() {
    // set_rows_bwd sums the masked rows in list order on both devices but the values are
    // compared after the scatter too, so both use the reduction tolerance (the scatter itself
    // is bit for bit: the test above).
    twin("scatter_add/set_rows_bwd", REDUCE, |dev, seed| {
        let mut out = vec![];
        for &(r, c) in &SHAPES {
            let s = seed ^ (r * 1000 + c) as u64;
            let n = 3 * r + 2;
            let dy = up(dev, &randv(s, n * c), &[n, c]);
            let ids = dev.upload_ids(&rand_ids(s ^ 1, n, r)).unwrap();
            let mut dtable = up(dev, &randv(s ^ 2, r * c), &[r, c]);
            dev.scatter_add_rows(&dy, &ids, dtable.view_mut()).unwrap();
            let mut dx = up(dev, &randv(s ^ 3, r * c), &[r, c]);
            let rows = dev.upload_ids(&rand_ids(s ^ 4, r.div_ceil(2), r)).unwrap(); // repeats likely
            let mut dvalue = up(dev, &randv(s ^ 5, c), &[c]);
            dev.set_rows_bwd(&mut dx, &rows, dvalue.view_mut()).unwrap();
            out.extend([("scatter_add", down(dev, &dtable)), ("dx", down(dev, &dx)), ("dvalue", down(dev, &dvalue))]);
        }
        // Repeats inside one batch of the kernel's 8 rows and across batches: each row once.
        let mut dx = up(dev, &randv(seed ^ 7, 3 * 40), &[3, 40]);
        let rows = dev.upload_ids(&[2, 2, 0, 2, 1, 0, 0, 2, 2, 1, 0, 2]).unwrap();
        let mut dvalue = up(dev, &randv(seed ^ 8, 40), &[40]);
        dev.set_rows_bwd(&mut dx, &rows, dvalue.view_mut()).unwrap();
        out.extend([("dx, repeated rows", down(dev, &dx)), ("dvalue, repeated rows", down(dev, &dvalue))]);
        out
    });
}

#[test]
fn segment_mean_fwd_bwd() {
    twin("segment_mean", EXACT, |dev, seed| {
        let mut out = vec![];
        // 70,000 items: more than grid y's 65,535 (the kernel strides over the capped grid).
        for lengths in [vec![1], vec![36, 1, 17], vec![5; 33], (1..=40).collect::<Vec<usize>>(), vec![1; 70_000]] {
            for c in [1, 7, 256, 300] {
                if lengths.len() > 1000 && c > 1 {
                    continue;
                }
                let seg = Segments::from_lengths(dev, &lengths).unwrap();
                let (t, b) = (seg.tokens(), seg.items());
                let x = up(dev, &randv(seed ^ (t * c) as u64, t * c), &[t, c]);
                let dy = up(dev, &randv(seed ^ 9, b * c), &[b, c]);
                poison(dev, &[b * c, t * c]);
                let y = dev.segment_mean_fwd(&x, &seg).unwrap();
                let dx = dev.segment_mean_bwd(&dy, &seg).unwrap();
                out.extend([("mean", down(dev, &y)), ("dx", down(dev, &dx))]);
            }
        }
        out
    });
}

#[test]
fn layernorm_fwd_bwd() {
    // Row statistics: a warp's butterfly sum on the GPU, eight-lane blocked sums on the CPU;
    // dgamma/dbeta: blocked column sums vs one sequential loop.
    twin("layernorm", REDUCE, |dev, seed| {
        let mut out = vec![];
        // And rows wider than the forward keeps in registers (kernels/layernorm.cu: 1024).
        for &(r, c) in SHAPES.iter().chain(&[(5, 1025), (3, 1500)]) {
            let s = seed ^ (r * 1000 + c) as u64;
            let mut xv = randv_scaled(s, r * c, 3.0);
            xv.iter_mut().for_each(|v| *v += 2.0); // a non-zero mean
            let x = up(dev, &xv, &[r, c]);
            let gamma = up(dev, &rand_range(s ^ 1, c, 0.5, 1.5), &[c]);
            let beta = up(dev, &randv(s ^ 2, c), &[c]);
            let dy = up(dev, &randv(s ^ 3, r * c), &[r, c]);
            poison(dev, &[r * c, 2 * r]);
            let (y, stats) = dev.layernorm_fwd(&x, gamma.view(), beta.view(), 1e-5).unwrap();
            let mut dgamma = up(dev, &randv(s ^ 4, c), &[c]);
            let mut dbeta = up(dev, &randv(s ^ 5, c), &[c]);
            poison(dev, &[r * c]);
            let dx = dev.layernorm_bwd(&x, &stats, gamma.view(), &dy, dgamma.view_mut(), dbeta.view_mut()).unwrap();
            out.extend([
                ("y", down(dev, &y)),
                ("stats", down(dev, &stats)),
                ("dx", down(dev, &dx)),
                ("dgamma", down(dev, &dgamma)),
                ("dbeta", down(dev, &dbeta)),
            ]);
        }
        out
    });
}

#[test]
fn fused_losses() {
    // Loss totals are reductions (block partials + f64 on the host vs one f64 loop); the
    // gradients are elementwise except the softmax denominator (a block sum).
    twin("losses", REDUCE, |dev, seed| {
        let mut out = vec![];
        for &(r, c) in &[(1, 1), (3, 24), (128, 24), (61, 1000), (7, 10_000)] {
            let s = seed ^ (r * 100_000 + c) as u64;
            let mut logits = up(dev, &randv_scaled(s, r * c, 8.0), &[r, c]);
            let targets: Vec<f32> = rand_ids(s ^ 1, r * c, 2).iter().map(|&v| v as f32).collect();
            let targets = up(dev, &targets, &[r, c]);
            let bce = dev.bce_with_logits(&mut logits, &targets, 0.7).unwrap();
            let mut ce_logits = up(dev, &randv_scaled(s ^ 2, r * c, 8.0), &[r, c]);
            let cls: Ids = dev.upload_ids(&rand_ids(s ^ 3, r, c)).unwrap();
            let ce = dev.cross_entropy(&mut ce_logits, &cls, 1.3).unwrap();
            out.extend([
                ("bce loss", vec![bce]),
                ("bce grad", down(dev, &logits)),
                ("ce loss", vec![ce]),
                ("ce grad", down(dev, &ce_logits)),
            ]);
        }
        out
    });
}

#[test]
fn sum_squares_and_adamw() {
    twin("sum_squares/adamw", REDUCE, |dev, seed| {
        let mut out = vec![];
        for n in [1, 255, 4097, 300_001] {
            let s = seed ^ n as u64;
            let mut p = up(dev, &randv(s, n), &[n]);
            let g = up(dev, &randv(s ^ 1, n), &[n]);
            let mut m = dev.zeros(&[n]).unwrap();
            let mut v = dev.zeros(&[n]).unwrap();
            let ss = dev.sum_squares(g.view()).unwrap() as f32;
            for step in 1..=3 {
                let hp =
                    AdamW { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, step, grad_scale: 0.5 };
                dev.adamw(p.view_mut(), g.view(), m.view_mut(), v.view_mut(), hp).unwrap();
            }
            out.extend([("sum_squares", vec![ss]), ("p", down(dev, &p)), ("m", down(dev, &m)), ("v", down(dev, &v))]);
        }
        out
    });
}

#[test]
fn bad_input_is_an_error_not_a_crash() {
    let Some(mut gpu) = gpu_or_skip("bad input") else { return };
    let dev = gpu.as_mut();
    // A column sum over more rows than grid y can hold (65,535 blocks of 64 rows) is refused.
    let tall = dev.zeros(&[65_535 * 64 + 1, 1]).unwrap();
    let mut db = dev.zeros(&[1]).unwrap();
    let err = dev.bias_bwd(&tall, db.view_mut()).unwrap_err();
    assert!(err.to_string().contains("65535"), "{err}");
    let table = dev.upload(&randv(1, 12), &[4, 3]).unwrap();
    let ids = dev.upload_ids(&[0, 4]).unwrap();
    let err = dev.gather_rows(table.view(), 3, &ids).unwrap_err();
    assert!(err.to_string().contains("out of range"), "{err}");
    let mut logits = dev.upload(&randv(2, 6), &[2, 3]).unwrap();
    let cls = dev.upload_ids(&[1, 3]).unwrap();
    assert!(dev.cross_entropy(&mut logits, &cls, 1.0).is_err());
    let x = dev.upload(&randv(3, 6), &[2, 3]).unwrap();
    let y = dev.upload(&randv(4, 6), &[3, 2]).unwrap();
    assert!(dev.gelu_bwd(&x, &y).is_err());
}

#[test]
fn out_of_memory_says_how_much() {
    let Some(mut gpu) = gpu_or_skip("out of memory") else { return };
    // 2^40 floats = 4 TiB: more than any GPU has.
    let err = gpu.alloc(&[1 << 40]).unwrap_err().to_string();
    assert!(err.contains("out of memory") && err.contains("asked for") && err.contains("free"), "{err}");
    // The device still works afterwards.
    let t = gpu.upload(&[1.0, 2.0], &[2]).unwrap();
    assert_eq!(gpu.download(t.view()).unwrap(), vec![1.0, 2.0]);
}

/// Zero rows, zero items, zero ids: every op returns an empty result (or leaves its output as
/// it was) on both devices, launching nothing it could not size.
#[test]
fn empty_inputs() {
    let Some(mut gpu) = gpu_or_skip("empty inputs") else { return };
    let mut cpu = common::cpu();
    for dev in [&mut cpu as &mut dyn Backend, gpu.as_mut()] {
        let name = dev.name();
        let x = dev.zeros(&[0, 8]).unwrap();
        let gamma = dev.upload(&[1.0; 8], &[8]).unwrap();
        let beta = dev.zeros(&[8]).unwrap();
        let (y, _stats) = dev.layernorm_fwd(&x, gamma.view(), beta.view(), 1e-5).unwrap();
        assert_eq!(y.shape(), &[0, 8], "{name} layernorm");
        assert_eq!(dev.gelu_fwd(&x).unwrap().shape(), &[0, 8], "{name} gelu");
        let mut db = dev.upload(&[2.0; 8], &[8]).unwrap();
        dev.bias_bwd(&x, db.view_mut()).unwrap();
        assert_eq!(dev.download(db.view()).unwrap(), vec![2.0; 8], "{name} bias_bwd of no rows adds nothing");
        assert_eq!(dev.sum_squares(x.view()).unwrap(), 0.0, "{name} sum_squares");
        let table = dev.upload(&randv(1, 24), &[3, 8]).unwrap();
        let none = dev.upload_ids(&[]).unwrap();
        assert_eq!(dev.gather_rows(table.view(), 8, &none).unwrap().shape(), &[0, 8], "{name} gather");
        let seg = Segments::from_lengths(dev, &[]).unwrap();
        assert_eq!(dev.segment_mean_fwd(&x, &seg).unwrap().shape(), &[0, 8], "{name} segment_mean");
    }
}

/// The feed-forward's fused activation (`bias_gelu_dropout_fwd`, `gelu_dropout_bwd`,
/// `gelu_dropout_bias_bwd`): against
/// the CPU twin, and bit for bit against the same device's unfused ops (`add_bias`,
/// `gelu_fwd`, `dropout_fwd`; `dropout_bwd`, `gelu_bwd`), with and without bias and dropout.
#[test]
fn bias_gelu_dropout_matches_the_cpu_and_the_unfused_ops() {
    let Some(mut gpu) = gpu_or_skip("fused bias + GELU + dropout") else { return };
    let mut cpu = common::cpu();
    let bits = |t: &[f32]| t.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    for (k, &shape) in SHAPES.iter().enumerate() {
        for (p, with_bias) in [(0.0, true), (0.3, true), (0.3, false)] {
            let seed = 900 + k as u64;
            poison(gpu.as_mut(), &[shape.0 * shape.1]);
            let got = common::ffn_activation_both_ways(gpu.as_mut(), shape, p, with_bias, seed);
            let want = common::ffn_activation_both_ways(&mut cpu, shape, p, with_bias, seed);
            let what = format!("{shape:?} p {p} bias {with_bias}");
            for ((name, fused, ops), (_, cpu_fused, _)) in got.iter().zip(&want) {
                assert_eq!(bits(fused), bits(ops), "{name}: fused and unfused differ on the device, {what}");
                let w64: Vec<f64> = cpu_fused.iter().map(|&v| v as f64).collect();
                let e = rel_err(fused, &w64);
                common::report(&format!("bias_gelu_dropout {name}"), e);
                // The bias gradient is a column sum, in another order than the CPU's.
                let tol = if *name == "dbias" { REDUCE } else { EXACT };
                assert!(e <= tol, "{name}: relative error {e:.3e} against the CPU, {what}");
            }
        }
    }
}

/// The element-wise kernels past one pass of their grid: `flat` launches at most 4,096
/// blocks of 256 threads, so over 1,048,576 elements a thread takes several, all of a batch
/// loaded before the first is stored (`each_element`, kernels/elementwise.cu). 2.6 passes'
/// worth here: whole batches, a partial one and idle slots. The fused activation both ways,
/// bias, residual and scale, and the bf16 conversions, against the CPU as at every other size.
#[test]
fn elementwise_ops_past_one_pass_of_the_grid_match_the_cpu() {
    let Some(mut gpu) = gpu_or_skip("element-wise ops past one grid pass") else { return };
    let mut cpu = common::cpu();
    let shape = (2700, 1021);
    let n = shape.0 * shape.1;
    assert!(n > 2 * 4096 * 256 && n < 3 * 4096 * 256);
    let got = common::ffn_activation_both_ways(gpu.as_mut(), shape, 0.3, true, 77);
    let want = common::ffn_activation_both_ways(&mut cpu, shape, 0.3, true, 77);
    for ((name, fused, ops), (_, cpu_fused, _)) in got.iter().zip(&want) {
        common::same_values(&format!("{name}: fused against unfused on the device"), fused, ops);
        let e = rel_err(fused, &cpu_fused.iter().map(|&v| v as f64).collect::<Vec<_>>());
        let tol = if *name == "dbias" { REDUCE } else { EXACT };
        assert!(e <= tol, "{name}: relative error {e:.3e} against the CPU");
    }
    let run = |dev: &mut dyn Backend| {
        let mut y = up(dev, &randv(5, n), &[shape.0, shape.1]);
        let b = up(dev, &randv(6, shape.1), &[shape.1]);
        dev.add_bias(&mut y, b.view()).unwrap();
        let x = up(dev, &randv(7, n), &[shape.0, shape.1]);
        dev.add_assign(&mut y, &x).unwrap();
        dev.scale(y.view_mut(), -1.5).unwrap();
        let h = dev.convert(y.view(), semshare::tensor::DType::Bf16).unwrap();
        let back = dev.convert(h.view(), semshare::tensor::DType::F32).unwrap();
        (down(dev, &y), down(dev, &back))
    };
    let ((y, back), (want_y, want_back)) = (run(gpu.as_mut()), run(&mut cpu));
    common::same_values("bf16 round trip against the CPU", &back, &want_back);
    let e = rel_err(&y, &want_y.iter().map(|&v| v as f64).collect::<Vec<_>>());
    assert!(e <= EXACT, "bias, residual, scale: relative error {e:.3e} against the CPU");
}

/// fp16/bf16 features widened and normalised on the device (`kernels/inputs.cu`): bit for bit
/// the CPU's (which is the host's widening and input normalisation), every shape, odd counts
/// (the last word half used), with and without a normalisation; a normalisation is uploaded
/// once and reused.
#[test]
fn widen_features_is_bit_for_bit_the_cpu() {
    use semshare::backend::Half;
    let Some(mut gpu) = gpu_or_skip("widen_features") else { return };
    let mut cpu = common::cpu();
    let run = |dev: &mut dyn Backend, words: &[f32], half, rows, dim, norm: Option<(&[f32], &[f32])>| {
        let w = dev.upload(words, &[words.len()]).unwrap();
        poison(dev, &[rows * dim]);
        let y = dev.widen_features(w.view(), half, rows, dim, norm).unwrap();
        assert_eq!(y.shape(), [rows, dim]);
        dev.download(y.view()).unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    };
    for half in [Half::F16, Half::Bf16] {
        for (seed, &(rows, dim)) in SHAPES.iter().enumerate() {
            let seed = seed as u64 ^ 0x5eed;
            let (words, _) = common::halves(seed, rows * dim, half);
            let (mean, inv_std) = (randv(seed ^ 1, dim), rand_range(seed ^ 2, dim, 0.1, 30.0));
            for norm in [None, Some((&mean[..], &inv_std[..]))] {
                let want = run(&mut cpu, &words, half, rows, dim, norm);
                let got = run(gpu.as_mut(), &words, half, rows, dim, norm);
                assert_eq!(got, want, "{half:?} {rows}x{dim} normalised {}", norm.is_some());
            }
        }
    }
    // One normalisation, many batches: uploaded the first time only.
    let (words, _) = common::halves(9, 64 * 33, Half::F16);
    let (mean, inv_std) = (randv(3, 33), rand_range(4, 33, 0.5, 2.0));
    let w = gpu.upload(&words, &[words.len()]).unwrap();
    gpu.widen_features(w.view(), Half::F16, 64, 33, Some((&mean, &inv_std))).unwrap();
    let before = gpu.counters().unwrap();
    gpu.widen_features(w.view(), Half::F16, 64, 33, Some((&mean, &inv_std))).unwrap();
    let after = gpu.counters().unwrap();
    assert_eq!(after.upload_bytes, before.upload_bytes, "the normalisation is kept on the device");
    assert_eq!(after.launches() - before.launches(), 1, "one launch");
}
