//! The `amx` path (src/backend/cpu/amx.rs): bf16 GEMMs on AMX tiles. On a CPU with AMX it runs
//! natively; on one with the rest of the path (AVX-512 BF16) but not AMX, with the AMX
//! instructions trapped and emulated (tests/common/amx_trap.rs), so that the kernel's machine
//! code, its packing and the model's host code run in CI. `cpu_gemm.rs` checks the kernel
//! against the f64 definition on every shape; this file checks the emulator by hand, that the
//! GEMM really runs on the tiles, and the model on the path.

#[path = "common/amx_trap.rs"]
mod amx_trap;

use std::process::Command;

use semshare::backend::cpu::dispatch::{self, CpuPath, ENV, Kernels};
use semshare::backend::cpu::gemm::{Input, Output, PackedB, gemm, gemm_packed};
use semshare::backend::cpu::{Cpu, microkernel::Bf16, microkernel::Packed};
use semshare::backend::{Backend, Gemm, Precision};
use semshare::model::{Batch, EmbeddingKind, ImageBatch, ModelConfig, SemShare, TextBatch};
use semshare::rng::Rng;
use semshare::tensor::DType;
use semshare::train::{TrainConfig, Trainer};

/// The amx path's kernels (native or emulated), or why neither runs here.
fn amx() -> Result<(Kernels, &'static str), String> {
    match CpuPath::Amx.kernels() {
        Ok(k) => Ok((k, "native")),
        Err(native) => amx_trap::kernels().map(|k| (k, "emulated")).map_err(|e| format!("{native}; {e}")),
    }
}

/// The emulator against products worked by hand, on a tile configuration of its own (shapes
/// other than the kernel's): a wrong operand order, pair order or shape rule fails here.
#[test]
fn the_emulator_multiplies_tiles_as_worked_by_hand() {
    if CpuPath::Amx.kernels().is_ok() {
        println!("not run: this CPU has AMX (the emulator is for CPUs without it)");
        return;
    }
    if let Err(why) = amx_trap::kernels() {
        println!("not run: {why}");
        return;
    }
    // tmm0: C, 2 rows × 2 fp32; tmm1: A, 2 rows × 2 pairs; tmm2: B, 2 pair rows × 2 columns.
    let mut cfg = [0u8; 64];
    cfg[0] = 1;
    for (t, (rows, colsb)) in [(2u8, 8u16), (2, 8), (2, 8)].into_iter().enumerate() {
        cfg[16 + 2 * t..18 + 2 * t].copy_from_slice(&colsb.to_le_bytes());
        cfg[48 + t] = rows;
    }
    let bf = |x: f32| Bf16::from_f32(x).0;
    // A = [[1, 2, 3, 4], [-1, 0.5, 0, 2]] (k = 4: pairs (k0, k1), (k2, k3)).
    let a: [u16; 8] = [1.0, 2.0, 3.0, 4.0, -1.0, 0.5, 0.0, 2.0].map(bf);
    // B (k × n = 4 × 2) = [[1, 0], [0, 1], [2, 1], [1, -1]], rows of pairs: row q holds, for
    // each column, (B[2q][n], B[2q + 1][n]).
    let b: [u16; 8] = [1.0, 0.0, 0.0, 1.0, 2.0, 1.0, 1.0, -1.0].map(bf);
    let mut c = [10.0f32, 20.0, 30.0, 40.0];
    // SAFETY: the handler emulates these instructions; every address is a local array, rows
    // 8 bytes apart.
    unsafe {
        std::arch::asm!(
            "ldtilecfg [{cfg}]",
            "tileloadd tmm0, [{c} + {s}*1]",
            "tileloadd tmm1, [{a} + {s}*1]",
            "tileloadd tmm2, [{b} + {s}*1]",
            "tdpbf16ps tmm0, tmm1, tmm2",
            "tilestored [{c} + {s}*1], tmm0",
            "tilerelease",
            cfg = in(reg) cfg.as_ptr(),
            a = in(reg) a.as_ptr(),
            b = in(reg) b.as_ptr(),
            c = in(reg) c.as_mut_ptr(),
            s = in(reg) 8usize,
            options(nostack)
        );
    }
    // C += A·B: row 0: [1·1 + 2·0 + 3·2 + 4·1, 1·0 + 2·1 + 3·1 + 4·(−1)] = [11, 1];
    // row 1: [−1 + 0 + 0 + 2, 0 + 0.5 + 0 − 2] = [1, −1.5].
    assert_eq!(c, [21.0, 21.0, 31.0, 38.5]);
}

/// A bf16 GEMM on the amx path does its products on the tiles: at least one `tdpbf16ps` per
/// 32 × 32 block of C per 32 steps of k (other tests may run beside it: at least), for B
/// packed per call and packed once (a frozen weight).
#[test]
fn a_bf16_gemm_runs_on_the_tiles() {
    let (kernels, how) = match amx() {
        Ok(k) => k,
        Err(why) => return println!("not run: {why}"),
    };
    let mut rng = Rng::new(17);
    let (m, k, n) = (96, 160, 64);
    let a: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
    let b: Vec<f32> = (0..n * k).map(|_| rng.normal() as f32).collect();
    let g = Gemm { m, n, k, trans_a: false, trans_b: true, alpha: 1.0, beta: 0.0 };
    let (mut c, mut c_packed) = (vec![0f32; m * n], vec![0f32; m * n]);
    let before = amx_trap::counts();
    gemm(kernels, Precision::Bf16, g, &a, &b, &mut c);
    let packed = PackedB::new(kernels, Precision::Bf16, g, Input::F32(&b)).expect("memory for a packed B");
    gemm_packed(
        kernels,
        Precision::Bf16,
        g,
        Input::F32(&a),
        Input::F32(&b),
        Some(&packed),
        None,
        Output::F32(&mut c_packed, DType::F32),
    );
    assert_eq!(c, c_packed, "packed once or per call: the same slivers, the same bits");
    // One element by hand, on the operands rounded to bf16.
    let round = |x: f32| Bf16::from_f32(x).to_f32() as f64;
    let want: f64 = (0..k).map(|p| round(a[5 * k + p]) * round(b[7 * k + p])).sum();
    assert!((c[5 * n + 7] as f64 - want).abs() <= 1e-4 * want.abs().max(1.0), "{} vs {want}", c[5 * n + 7]);
    if how == "emulated" {
        let after = amx_trap::counts();
        let blocks = (m / 32) * (n / 32) * k.div_ceil(32) as u64 as usize;
        assert!(after.tdpbf16ps - before.tdpbf16ps >= 2 * 4 * blocks as u64, "{before:?} → {after:?}");
        assert!(after.tilestored > before.tilestored);
    }
    println!("ran: amx bf16 GEMM ({how})");
}

/// A bf16 A in 2 bytes whose rows start on 64-byte lines is multiplied where it lies
/// (`Micro::column_rows`), the same A a line's half off is packed first: the same bits either
/// way, with a partial last tile of rows, beta and a bias, into an f32 and a bf16 C; k not a
/// whole number of tile rows (80) is packed even on lines. Emulated, the loads' row stride
/// shows which ran.
#[test]
fn a_bf16_a_on_lines_is_read_where_it_lies() {
    let (kernels, how) = match amx() {
        Ok(k) => k,
        Err(why) => return println!("not run: {why}"),
    };
    /// A 64-byte line of bf16s: a buffer of them starts on a line.
    #[derive(Clone, Copy)]
    #[repr(C, align(64))]
    struct Line([u16; 32]);
    let mut rng = Rng::new(23);
    let shapes: [(usize, usize, usize); 4] = [(32 * 3 + 7, 256, 96), (64, 512, 64), (40, 96, 33), (64, 80, 32)];
    for (m, k, n) in shapes {
        let bits: Vec<u16> = (0..m * k).map(|_| Bf16::from_f32(rng.normal() as f32).0).collect();
        let b: Vec<f32> = (0..n * k).map(|_| rng.normal() as f32).collect();
        let bias: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        let start: Vec<f32> = (0..m * n).map(|_| rng.normal() as f32).collect();
        // The same values on a line and 32 bytes past one.
        let mut lines = vec![Line([0; 32]); (m * k).div_ceil(32) + 1];
        // SAFETY: `lines` holds (m·k / 32 + 1)·32 u16s, of which these are the first m·k + 16.
        let flat = unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr() as *mut u16, m * k + 16) };
        flat[..m * k].copy_from_slice(&bits);
        let mut off = vec![Line([0; 32]); (m * k).div_ceil(32) + 1];
        // SAFETY: as above.
        let off_flat = unsafe { std::slice::from_raw_parts_mut(off.as_mut_ptr() as *mut u16, m * k + 16) };
        off_flat[16..].copy_from_slice(&bits);
        let (on_line, off_line) = (&flat[..m * k], &off_flat[16..]);
        let g = Gemm { m, n, k, trans_a: false, trans_b: true, alpha: 0.5, beta: 0.75 };
        let packed = PackedB::new(kernels, Precision::Bf16, g, Input::F32(&b)).expect("memory for a packed B");
        let run = |a: &[u16], c: Output| {
            gemm_packed(kernels, Precision::Bf16, g, Input::Bf16(a), Input::F32(&b), Some(&packed), Some(&bias), c)
        };
        amx_trap::take_widest_load();
        let (mut c_line, mut c_off) = (start.clone(), start.clone());
        run(on_line, Output::F32(&mut c_line, DType::F32));
        let widest = amx_trap::take_widest_load();
        run(off_line, Output::F32(&mut c_off, DType::F32));
        assert!(c_line == c_off, "{m} × {k} × {n}: A on a line and off it differ (f32 C)");
        let start16: Vec<u16> = start.iter().map(|&x| Bf16::from_f32(x).0).collect();
        let (mut c_line, mut c_off) = (start16.clone(), start16);
        run(on_line, Output::Bf16(&mut c_line));
        run(off_line, Output::Bf16(&mut c_off));
        assert!(c_line == c_off, "{m} × {k} × {n}: A on a line and off it differ (bf16 C)");
        if how == "emulated" {
            // Packed slivers' rows are 64 and 128 bytes apart; A's own rows 2k > 128 (no other
            // test in this file loads rows further apart than 128).
            let in_place = k % 32 == 0;
            assert_eq!(widest == 2 * k as u64, in_place, "{m} × {k} × {n}: widest tile load {widest} bytes");
        }
    }
    println!("ran: amx bf16 A read in place ({how})");
}

/// Set in a child: which path it runs the model on (`amx` or `avx512`), printing its outputs.
const CHILD: &str = "SEMSHARE_CPU_AMX_CHILD";

/// The model's outputs at `precision` on the active path: pooled and label embeddings of
/// images and texts of mixed lengths (frozen weights: B packed once), and one training step's
/// loss and gradient norm.
fn model_outputs(precision: Precision) -> Vec<(String, Vec<f32>)> {
    let cfg = ModelConfig { vocab: 500, object_classes: 40, labels: 12, ..ModelConfig::small() };
    let mut rng = Rng::new(23);
    let lengths = [36, 9, 20, 1, 36, 14];
    let ib = ImageBatch::random(&mut rng, &lengths, cfg.region_dim, cfg.object_classes, cfg.labels);
    let tb = TextBatch::random(&mut rng, &[24, 3, 17, 24, 8, 1], cfg.vocab, cfg.labels);
    let mut dev = Cpu::with_precision(precision).unwrap();
    let net = SemShare::new(&cfg).unwrap();
    let w = net.store.upload(&mut dev, &net.store.init_values(5)).unwrap();
    let w = dev.freeze(w).unwrap();
    let mut out = vec![];
    for (name, batch) in [("image", Batch::Image(ib.clone())), ("text", Batch::Text(tb.clone()))] {
        for kind in [EmbeddingKind::Pooled, EmbeddingKind::Label] {
            let e = net.embed(&mut dev, &w, &batch, kind).unwrap();
            out.push((format!("{name} {kind:?}"), dev.download(e.view()).unwrap()));
        }
    }
    let mut trainer = Trainer::new(&mut dev, &cfg, TrainConfig::default()).unwrap();
    let s = trainer.step(&mut dev, ib, tb).unwrap();
    out.push(("train step loss, grad norm".into(), vec![s.loss, s.grad_norm]));
    out
}

fn child(path: &str) {
    if path == "amx" {
        let (kernels, how) = match amx() {
            Ok(k) => k,
            Err(why) => return println!("SKIP {why}"),
        };
        assert!(dispatch::set_active(kernels), "the path was chosen before the test set it");
        println!("HOW {how}");
    }
    let before = amx_trap::counts();
    let precisions = if path == "amx" { &[Precision::Bf16][..] } else { &[Precision::Bf16, Precision::F32] };
    for &p in precisions {
        for (name, values) in model_outputs(p) {
            let bits: Vec<String> = values.iter().map(|v| format!("{:08x}", v.to_bits())).collect();
            println!("OUT {} {name}|{}", p.name(), bits.join(","));
        }
    }
    println!("TILE_PRODUCTS {}", amx_trap::counts().tdpbf16ps - before.tdpbf16ps);
}

/// Runs this test in a child on `path`; its printed lines.
fn run_child(path: &str) -> Vec<String> {
    let me = std::env::current_exe().unwrap();
    let mut cmd = Command::new(me);
    cmd.args(["the_model_in_bf16_on_amx_matches_avx512", "--exact", "--nocapture", "--test-threads=1"]);
    cmd.env(CHILD, path).env_remove(ENV);
    if path == "avx512" {
        cmd.env(ENV, "avx512");
    }
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "child on {path}: {}\n{text}", String::from_utf8_lossy(&out.stderr));
    text.lines().map(str::to_string).collect()
}

/// What follows `tag` on each line that has it (libtest's `test … ` may precede the first).
fn after<'a>(lines: &'a [String], tag: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    lines.iter().filter_map(move |l| l.find(tag).map(|i| &l[i + tag.len()..]))
}

/// The outputs a child printed at `precision`.
fn outputs_of(lines: &[String], precision: Precision) -> Vec<(String, Vec<f32>)> {
    let parse = |s: &str| s.split(',').map(|h| f32::from_bits(u32::from_str_radix(h, 16).unwrap())).collect();
    let tag = format!("OUT {} ", precision.name());
    after(lines, &tag).map(|l| l.split_once('|').unwrap()).map(|(name, v)| (name.to_string(), parse(v))).collect()
}

/// ‖x − y‖ / ‖y‖.
fn rel(x: &[f32], y: &[f32]) -> f64 {
    let d: f64 = x.iter().zip(y).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).sum();
    let n: f64 = y.iter().map(|b| (*b as f64).powi(2)).sum();
    (d / n.max(1e-30)).sqrt()
}

/// The model in bf16 on the amx path gives the outputs of the avx512 path's bf16 kernel
/// (`vdpbf16ps`) to within what the order of the fp32 sums moves (the same bf16 products; the
/// tiles add a pair's two products in another order): at least four times closer than bf16 is
/// to fp32. A sum that moves by an ulp can round a stored activation (the trunk stores bf16)
/// to the neighbouring bf16, so the difference grows through the layers: up to 9.4e-4 here
/// (1.1e-4 while the activations were f32), against 4.6e-3 from fp32. A kernel that drops or
/// misplaces a tile is as far from avx512 as from fp32 or farther. The GEMMs ran on the tiles.
#[test]
fn the_model_in_bf16_on_amx_matches_avx512() {
    if let Ok(path) = std::env::var(CHILD) {
        return child(&path);
    }
    if !CpuPath::Avx512.kernels().is_ok_and(|k| k.bf16_native()) {
        return println!("not run: the avx512 path with AVX-512 BF16 is the reference, and this CPU lacks it");
    }
    let amx_lines = run_child("amx");
    if let Some(why) = after(&amx_lines, "SKIP ").next() {
        return println!("not run: {why}");
    }
    let how = after(&amx_lines, "HOW ").next().unwrap().to_string();
    let avx512_lines = run_child("avx512");
    let on_amx = outputs_of(&amx_lines, Precision::Bf16);
    let (on_avx512, in_fp32) = (outputs_of(&avx512_lines, Precision::Bf16), outputs_of(&avx512_lines, Precision::F32));
    assert_eq!((on_amx.len(), on_avx512.len(), in_fp32.len()), (5, 5, 5));
    for (((name, x), (_, y)), (_, f)) in on_amx.iter().zip(&on_avx512).zip(&in_fp32) {
        let (err, bf16_err) = (rel(x, y), rel(y, f));
        println!("{name}: amx vs avx512, both bf16: {err:.2e}; avx512 bf16 vs fp32: {bf16_err:.2e}");
        assert!(x.iter().all(|v| v.is_finite()), "{name}");
        assert!(err <= 2e-3 && err <= 0.25 * bf16_err, "{name}: amx bf16 differs from avx512 bf16 by {err:.2e}");
        assert!(x != y, "{name}: bitwise equal: did the amx child run the tiles?");
    }
    if how == "emulated" {
        let products: u64 = after(&amx_lines, "TILE_PRODUCTS ").next().unwrap().parse().unwrap();
        assert!(products > 1000, "the model's GEMMs ran {products} tile products");
        println!("ran: the model on amx ({how}): {products} tdpbf16ps");
    }
}
