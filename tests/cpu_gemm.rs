//! The CPU GEMM on every path this machine can run, in fp32 and in bf16, against the f64
//! definition on fresh random inputs: odd sizes, every transpose, beta 0 and 1, alpha ≠ 1,
//! strided operands. A path the machine lacks (or this version does not build) is printed as
//! not run, by name, never passed; a path without a bf16 unit (`vdpbf16ps`) says so.

#[path = "common/amx_trap.rs"]
mod amx_trap;

use semshare::backend::cpu::dispatch::{CpuPath, Kernels};
use semshare::backend::cpu::gemm::{Strided, gemm_strided};
use semshare::backend::cpu::microkernel::{Bf16, Packed};
use semshare::backend::{Gemm, Precision};
use semshare::rng::Rng;
use semshare::tensor::DType;

/// Every path this CPU runs, and the `amx` path with AMX emulated where it runs the rest of
/// that path but lacks AMX (`amx_trap`).
fn runnable_paths() -> Vec<Kernels> {
    let mut run = Vec::new();
    for p in CpuPath::ALL {
        match p.kernels() {
            Ok(k) => run.push(k),
            Err(why) => println!("not run: CPU path {}: {why}", p.name()),
        }
    }
    if !run.iter().any(|k| k.path() == CpuPath::Amx) {
        match amx_trap::kernels() {
            Ok(k) => {
                println!("CPU path amx: run with its AMX instructions emulated (tests/common/amx_trap.rs)");
                run.push(k);
            }
            Err(why) => println!("not run: CPU path amx, emulated: {why}"),
        }
    }
    assert!(run.iter().any(|k| k.path() == CpuPath::Portable));
    run
}

fn random(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.normal() as f32).collect()
}

/// Both precisions on every runnable path, saying which bf16 unit each used.
fn runnable() -> Vec<(Kernels, Precision)> {
    let mut run = Vec::new();
    for k in runnable_paths() {
        run.push((k, Precision::F32));
        run.push((k, Precision::Bf16));
    }
    run
}

fn gemm(kernels: Kernels, precision: Precision, g: Gemm, a: &[f32], b: &[f32], c: &mut [f32]) {
    semshare::backend::cpu::gemm::gemm(kernels, precision, g, a, b, c)
}

/// element (i, j) of op(x) for a row-major x that is [rows, cols] before op.
fn at(x: &[f32], trans: bool, i: usize, j: usize, rows_op: usize, cols_op: usize) -> f64 {
    (if trans { x[j * rows_op + i] } else { x[i * cols_op + j] }) as f64
}

/// What the GEMM multiplies at `precision`: x itself, or x rounded to bf16.
fn operand(x: &[f32], precision: Precision) -> Vec<f32> {
    match precision {
        Precision::Bf16 => x.iter().map(|&v| Bf16::from_f32(v).to_f32()).collect(),
        // TF32 is never a CPU run (`runs` lists fp32 and bf16): fp32, as Kernel::of maps it.
        Precision::F32 | Precision::Tf32 => x.to_vec(),
    }
}

fn check((kernels, precision): (Kernels, Precision), g: Gemm, rng: &mut Rng) {
    let Gemm { m, n, k, trans_a, trans_b, alpha, beta } = g;
    let (a, b) = (random(rng, m * k), random(rng, k * n));
    let c0 = if beta == 0.0 { vec![f32::NAN; m * n] } else { random(rng, m * n) };
    let mut c = c0.clone();
    gemm(kernels, precision, g, &a, &b, &mut c);
    // The definition on the operands as rounded: the products of bf16 values are exact in
    // fp32, so only the fp32 sums differ from f64, as in fp32.
    let (a, b) = (operand(&a, precision), operand(&b, precision));
    for i in 0..m {
        for j in 0..n {
            let (mut dot, mut mag) = (0f64, 0f64);
            for p in 0..k {
                let t = at(&a, trans_a, i, p, m, k) * at(&b, trans_b, p, j, k, n);
                dot += t;
                mag += t.abs();
            }
            let prior = if beta == 0.0 { 0.0 } else { beta as f64 * c0[i * n + j] as f64 };
            let want = alpha as f64 * dot + prior;
            let tol = 1e-5 * (alpha.abs() as f64 * mag + prior.abs()) + 1e-6;
            let got = c[i * n + j] as f64;
            assert!(
                (got - want).abs() <= tol,
                "{:?} {precision:?} {m}x{k}x{n} ta={trans_a} tb={trans_b} beta={beta}: c[{i},{j}] = {got}, want {want}",
                kernels.path()
            );
        }
    }
}

#[test]
fn gemm_matches_f64_on_every_runnable_path() {
    let mut rng = Rng::new(0x6e3);
    let sizes = [(1, 1, 1), (7, 7, 7), (33, 33, 33), (1, 300, 17), (32, 128, 384), (97, 513, 50), (200, 5, 70)];
    for run in runnable() {
        for &(m, k, n) in &sizes {
            for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
                for (alpha, beta) in [(1.0, 0.0), (1.0, 1.0), (-0.5, 0.75)] {
                    check(run, Gemm { m, n, k, trans_a: ta, trans_b: tb, alpha, beta }, &mut rng);
                }
            }
        }
        let (kernels, precision) = run;
        let unit = match precision {
            Precision::Bf16 if kernels.path() == CpuPath::Amx => " (AMX tiles)",
            Precision::Bf16 if kernels.bf16_native() => " (vdpbf16ps)",
            Precision::Bf16 => " (the fp32 kernel on operands rounded to bf16: this path has no AVX-512 BF16)",
            Precision::F32 | Precision::Tf32 => "",
        };
        println!("ran: CPU path {} {}{unit}", kernels.path().name(), precision.name());
    }
}

/// The shared block's largest GEMM, as the model calls it (weights [n, k] used transposed),
/// large enough to cross every block size and to run on both threads.
#[test]
fn gemm_matches_f64_at_model_shape() {
    let mut rng = Rng::new(0x1152);
    for run in runnable() {
        for beta in [0.0, 1.0] {
            let g = Gemm { m: 1152, n: 768, k: 256, trans_a: false, trans_b: true, alpha: 1.0, beta };
            check(run, g, &mut rng);
        }
        // k beyond one KC slice (and odd: a half-filled bf16 pair), n beyond one NC panel
        // (1024 fp32 or 2048 columns at 32 wide), m not a multiple of MR.
        check(run, Gemm { m: 131, n: 2100, k: 601, trans_a: true, trans_b: false, alpha: 1.0, beta: 1.0 }, &mut rng);
        // A weight gradient dW += dYᵀ·X: rows split over the threads, five slices of k.
        check(run, Gemm { m: 768, n: 256, k: 1152, trans_a: true, trans_b: false, alpha: 1.0, beta: 1.0 }, &mut rng);
    }
}

#[test]
fn zero_k_scales_c_by_beta() {
    for (kernels, precision) in runnable() {
        let mut c = vec![2.0f32; 6];
        gemm(
            kernels,
            precision,
            Gemm { m: 2, n: 3, k: 0, trans_a: false, trans_b: false, alpha: 1.0, beta: 0.5 },
            &[],
            &[],
            &mut c,
        );
        assert_eq!(c, vec![1.0; 6]);
        let mut c = vec![f32::NAN; 6];
        gemm(
            kernels,
            precision,
            Gemm { m: 2, n: 3, k: 0, trans_a: false, trans_b: false, alpha: 1.0, beta: 0.0 },
            &[],
            &[],
            &mut c,
        );
        assert_eq!(c, vec![0.0; 6]);
    }
}

/// Operands inside larger buffers (attention's per-head blocks of the packed qkv rows), C
/// with a column stride too; elements of C outside the block stay untouched.
#[test]
fn strided_operands() {
    let mut rng = Rng::new(0x57);
    let (m, k, n) = (37, 19, 23);
    let (lda, ldb, ldc) = (3 * k + 5, n + 9, 2 * m + 3);
    let a = random(&mut rng, m * lda);
    let b = random(&mut rng, k * ldb);
    for (kernels, precision) in runnable() {
        // C stored transposed: element (i, j) at c[j·ldc + i].
        let c0 = random(&mut rng, n * ldc);
        let mut c = c0.clone();
        // SAFETY: every addressed element is inside a, b and c.
        unsafe {
            gemm_strided(
                kernels,
                precision,
                m,
                k,
                n,
                1.0,
                a[2..].as_ptr(),
                Strided::rows(lda),
                b[1..].as_ptr(),
                Strided::rows(ldb),
                1.0,
                c.as_mut_ptr(),
                Strided::transposed(ldc),
            );
        }
        let (ar, br) = (operand(&a, precision), operand(&b, precision));
        for j in 0..n {
            for i in 0..ldc {
                let got = c[j * ldc + i] as f64;
                if i >= m {
                    assert_eq!(got, c0[j * ldc + i] as f64, "outside the block");
                    continue;
                }
                let dot: f64 = (0..k).map(|p| ar[2 + i * lda + p] as f64 * br[1 + p * ldb + j] as f64).sum();
                let want = dot + c0[j * ldc + i] as f64;
                assert!(
                    (got - want).abs() < 1e-4,
                    "{:?} {precision:?} c[{i},{j}] = {got}, want {want}",
                    kernels.path()
                );
            }
        }
    }
}

/// `gemm_bias` (the bias added where the micro-kernel stores a tile) is bit for bit `gemm`
/// followed by adding the bias to every row, on every path and precision: edge tiles, several
/// slices of k (the bias is added once), the row- and column-parallel splits, k = 0, beta ≠ 0.
#[test]
fn gemm_bias_is_gemm_then_bias_bitwise() {
    let mut rng = Rng::new(17);
    for run in runnable() {
        for (m, k, n) in [
            (1, 1, 1),
            (7, 33, 5),
            (37, 300, 19),
            (97, 513, 50),
            (1152, 256, 768),
            (100, 300, 600),
            (300, 600, 40),
            (9, 0, 13),
        ] {
            for (trans_b, beta) in [(true, 0.0), (false, 0.0), (true, 0.75)] {
                let g = Gemm { m, n, k, trans_a: false, trans_b, alpha: 1.0, beta };
                let (a, b, bias) = (random(&mut rng, m * k), random(&mut rng, k * n), random(&mut rng, n));
                let c0 = random(&mut rng, m * n);
                let mut want = c0.clone();
                gemm(run.0, run.1, g, &a, &b, &mut want);
                for row in want.chunks_exact_mut(n) {
                    for (v, b) in row.iter_mut().zip(&bias) {
                        *v += b;
                    }
                }
                let mut got = c0.clone();
                semshare::backend::cpu::gemm::gemm_bias(run.0, run.1, g, &a, &b, Some(&bias), &mut got);
                let same = got.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "{} {:?} {m}×{k}×{n} trans_b {trans_b} beta {beta}", run.0.describe(), run.1);
            }
        }
    }
}

/// B packed once (`PackedB`, a frozen model's weights) gives bit for bit what packing it on
/// every call gives, on every path and precision: several slices of k (601: a half-filled bf16
/// pair in the last), several column panels (2100), the row- and column-parallel splits, the
/// 32-row recurrence, both layouts of B, with and without a bias, beta ≠ 0; and a `PackedB`
/// made for another shape or kernel is refused.
#[test]
fn packed_weights_are_bitwise_packed_per_call() {
    use semshare::backend::cpu::gemm::{Input, Kernel, Output, PackedB, gemm_packed};
    let mut rng = Rng::new(23);
    for run in runnable() {
        for (m, k, n) in
            [(1, 1, 1), (32, 128, 384), (37, 601, 19), (1152, 256, 768), (100, 300, 2100), (300, 700, 90), (9, 0, 13)]
        {
            for (trans_b, beta, with_bias) in [(true, 0.0, true), (false, 0.0, false), (true, 0.75, false)] {
                let g = Gemm { m, n, k, trans_a: false, trans_b, alpha: 1.0, beta };
                let (a, b, bias) = (random(&mut rng, m * k), random(&mut rng, k * n), random(&mut rng, n));
                let bias = with_bias.then_some(&bias[..]);
                let c0 = random(&mut rng, m * n);
                let mut want = c0.clone();
                semshare::backend::cpu::gemm::gemm_bias(run.0, run.1, g, &a, &b, bias, &mut want);
                let packed = PackedB::new(run.0, run.1, g, Input::F32(&b)).expect("memory for the packed operand");
                assert!(packed.fits(g, Kernel::of(run.0, run.1)));
                assert!(!packed.fits(Gemm { n: n + 1, ..g }, Kernel::of(run.0, run.1)));
                assert!(!packed.fits(Gemm { trans_b: !trans_b, ..g }, Kernel::of(run.0, run.1)));
                let other = if run.1 == Precision::Bf16 { Precision::F32 } else { Precision::Bf16 };
                assert!(!packed.fits(g, Kernel::of(run.0, other)));
                for _ in 0..2 {
                    let mut got = c0.clone();
                    gemm_packed(
                        run.0,
                        run.1,
                        g,
                        Input::F32(&a),
                        Input::F32(&b),
                        Some(&packed),
                        bias,
                        Output::F32(&mut got, DType::F32),
                    );
                    let same = got.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(same, "{} {:?} {m}×{k}×{n} trans_b {trans_b} beta {beta}", run.0.describe(), run.1);
                }
            }
        }
    }
}
