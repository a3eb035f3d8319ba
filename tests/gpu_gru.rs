//! GRU step gates on the GPU (kernels/gru.cu) against the CPU twin
//! (`semshare::backend::cpu::Cpu`), forward and backward, one timestep at a time, on fresh
//! random inputs: both directions, the first, a middle and the last step, ragged lengths (idle
//! items mid-batch), hidden sizes 1, 7, 128 and 512 (the paper preset), a single item, and an
//! output column offset inside a wider output. The step reads and writes its own rows of the
//! run's buffers (states hs, gates, dhproj): outputs are poisoned with NaN first, so the rows a
//! step writes whole must come back finite and every other row (other steps' gates and dhproj,
//! other items' output rows) must keep NaN exactly where the CPU keeps it. A step past the
//! longest sequence is a shape error on both. Tolerance: relative norm 1e-5 (the only difference
//! is expf/tanhf against Rust's exp/tanh and FMA contraction, ~1e-7).
//!
//! Without a GPU each test prints one skip line; with SEMSHARE_REQUIRE_GPU=1 it fails.

mod common;

use common::gpu::{compare_twins, gpu_or_skip};
use common::{cpu, rand_range, randv, segments};
use semshare::backend::{Backend, GruStep, Segments};
use semshare::tensor::Tensor;

const TOL: f64 = 1e-5;

/// The same host data as a tensor on both backends.
fn pair(c: &mut dyn Backend, g: &mut dyn Backend, data: &[f32], shape: &[usize]) -> (Tensor, Tensor) {
    (c.upload(data, shape).unwrap(), g.upload(data, shape).unwrap())
}

/// Saved gates as the forward pass leaves them: r, z in (0, 1), n in (−1, 1), h_n any.
fn random_gates(seed: u64, items: usize, hidden: usize) -> Vec<f32> {
    let rz = rand_range(seed, items * 2 * hidden, 0.01, 0.99);
    let n = randv(seed ^ 1, items * hidden);
    let hn = randv(seed ^ 2, items * hidden);
    let mut g = Vec::with_capacity(items * 4 * hidden);
    for b in 0..items {
        g.extend_from_slice(&rz[b * 2 * hidden..(b + 1) * 2 * hidden]);
        g.extend_from_slice(&n[b * hidden..(b + 1) * hidden]);
        g.extend_from_slice(&hn[b * hidden..(b + 1) * hidden]);
    }
    g
}

#[allow(clippy::too_many_arguments)]
fn check_step(
    c: &mut dyn Backend,
    g: &mut dyn Backend,
    cseg: &Segments,
    gseg: &Segments,
    step: GruStep,
    out_cols: usize,
    seed: u64,
    what: &str,
) {
    let (items, tokens, hd) = (cseg.items(), cseg.tokens(), step.hidden);
    let nan = |n: usize| vec![f32::NAN; n];

    let steps = cseg.max_len;

    // ---- forward
    let (cx, gx) = pair(c, g, &randv(seed, tokens * 3 * hd), &[tokens, 3 * hd]);
    let (chp, ghp) = pair(c, g, &randv(seed ^ 0x11, items * 3 * hd), &[items, 3 * hd]);
    let (cb, gb) = pair(c, g, &randv(seed ^ 0x12, 3 * hd), &[3 * hd]);
    let (mut chs, mut ghs) = pair(c, g, &randv(seed ^ 0x22, (steps + 1) * items * hd), &[(steps + 1) * items, hd]);
    let (mut cout, mut gout) = pair(c, g, &nan(tokens * out_cols), &[tokens, out_cols]);
    let (mut cgates, mut ggates) = pair(c, g, &nan(steps * items * 4 * hd), &[steps * items, 4 * hd]);
    c.gru_step_fwd(step, cseg, &cx, &chp, cb.view(), &mut chs, &mut cout, &mut cgates).unwrap();
    g.gru_step_fwd(step, gseg, &gx, &ghp, gb.view(), &mut ghs, &mut gout, &mut ggates).unwrap();
    compare_twins(&format!("gru_step_fwd hs, {what}"), &g.download(ghs.view()).unwrap(), chs.cpu(), TOL);
    compare_twins(&format!("gru_step_fwd out, {what}"), &g.download(gout.view()).unwrap(), cout.cpu(), TOL);
    compare_twins(&format!("gru_step_fwd gates, {what}"), &g.download(ggates.view()).unwrap(), cgates.cpu(), TOL);
    let written = &cgates.cpu()[step.s * items * 4 * hd..(step.s + 1) * items * 4 * hd];
    assert!(written.iter().all(|v| v.is_finite()), "gru_step_fwd left this step's gates unwritten, {what}");
    // A step past the longest sequence has no rows in the run's buffers: refused on both.
    let past = GruStep { s: steps, ..step };
    let e = c.gru_step_fwd(past, cseg, &cx, &chp, cb.view(), &mut chs, &mut cout, &mut cgates).unwrap_err();
    assert!(e.to_string().contains("longest sequence"), "{e}");
    let e = g.gru_step_fwd(past, gseg, &gx, &ghp, gb.view(), &mut ghs, &mut gout, &mut ggates).unwrap_err();
    assert!(e.to_string().contains("longest sequence"), "{e}");

    // ---- backward
    let (cg, gg) = pair(c, g, &random_gates(seed ^ 0x33, steps * items, hd), &[steps * items, 4 * hd]);
    let (chs, ghs) = pair(c, g, &randv(seed ^ 0x44, (steps + 1) * items * hd), &[(steps + 1) * items, hd]);
    let (cdo, gdo) = pair(c, g, &randv(seed ^ 0x55, tokens * out_cols), &[tokens, out_cols]);
    let (mut cdh, mut gdh) = pair(c, g, &randv(seed ^ 0x66, items * hd), &[items, hd]);
    let (mut cdx, mut gdx) = pair(c, g, &nan(tokens * 3 * hd), &[tokens, 3 * hd]);
    let (mut cdhp, mut gdhp) = pair(c, g, &nan(steps * items * 3 * hd), &[steps * items, 3 * hd]);
    c.gru_step_bwd(step, cseg, &cg, &chs, &cdo, &mut cdh, &mut cdx, &mut cdhp).unwrap();
    g.gru_step_bwd(step, gseg, &gg, &ghs, &gdo, &mut gdh, &mut gdx, &mut gdhp).unwrap();
    compare_twins(&format!("gru_step_bwd dh, {what}"), &g.download(gdh.view()).unwrap(), cdh.cpu(), TOL);
    compare_twins(&format!("gru_step_bwd dxproj, {what}"), &g.download(gdx.view()).unwrap(), cdx.cpu(), TOL);
    compare_twins(&format!("gru_step_bwd dhproj, {what}"), &g.download(gdhp.view()).unwrap(), cdhp.cpu(), TOL);
    let written = &cdhp.cpu()[step.s * items * 3 * hd..(step.s + 1) * items * 3 * hd];
    assert!(written.iter().all(|v| v.is_finite()), "gru_step_bwd left this step's dhproj unwritten, {what}");
}

fn check(g: &mut dyn Backend, lengths: &[usize], hidden: usize, extra_cols: usize, seed: u64) {
    let mut c = cpu();
    let cseg = segments(&mut c, lengths);
    let gseg = segments(g, lengths);
    let max = cseg.max_len;
    let mut steps = vec![0, 1.min(max - 1), max / 2, max - 1];
    steps.sort_unstable();
    steps.dedup();
    for reverse in [false, true] {
        for &s in &steps {
            // Bi-GRU layout [h→ ; h←] inside rows `extra_cols` wider than 2H.
            let step = GruStep { s, reverse, hidden, out_col: if reverse { hidden } else { 0 } };
            let what = format!("lengths {lengths:?} H {hidden} step {s} reverse {reverse} cols +{extra_cols}");
            let seed = seed.wrapping_mul(1000).wrapping_add(s as u64 * 2 + reverse as u64);
            check_step(&mut c, g, &cseg, &gseg, step, 2 * hidden + extra_cols, seed, &what);
        }
    }
}

#[test]
fn gru_step_matches_cpu() {
    let Some(mut g) = gpu_or_skip("gpu_gru::gru_step_matches_cpu") else { return };
    let g = g.as_mut();
    // Benchmark configuration: 128 texts of up to 32 tokens, H 512.
    let lengths: Vec<usize> = (0..128).map(|i| 1 + (i * 37 + 11) % 32).collect();
    check(g, &lengths, 512, 0, 1);
    // Small preset H 128, ragged with idle items in the middle of the batch.
    check(g, &[24, 1, 7, 24, 3], 128, 0, 2);
    // A single item; odd hidden sizes; output rows wider than 2H.
    check(g, &[5], 7, 3, 3);
    check(g, &[1], 1, 0, 4);
    check(g, &[64, 2, 35, 36], 7, 1, 5);
}

/// A Bi-GRU's host inputs: per direction xproj, W_hh, b_hh; the output gradient.
struct RecurrenceInputs {
    dirs: Vec<[Vec<f32>; 3]>,
    dout: Vec<f32>,
    out_cols: usize,
}

/// Runs both directions' recurrences forward and backward on `be` from `inp`, every output
/// poisoned with NaN first where the recurrence writes it whole; returns each output by name.
fn run_recurrence(be: &mut dyn Backend, seg: &Segments, hd: usize, inp: &RecurrenceInputs) -> Vec<(String, Vec<f32>)> {
    use semshare::backend::{GruRunBwd, GruRunFwd};
    let (items, tokens, steps) = (seg.items(), seg.tokens(), seg.max_len);
    let nan = |n: usize| vec![f32::NAN; n];
    let mut h0 = nan((steps + 1) * items * hd);
    h0[..items * hd].fill(0.0);
    let mut up = |data: &[f32], shape: &[usize]| be.upload(data, shape).unwrap();
    let (mut x, mut w, mut b, mut hs, mut gates) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for [xp, wh, bh] in &inp.dirs {
        x.push(up(xp, &[tokens, 3 * hd]));
        w.push(up(wh, &[3 * hd, hd]));
        b.push(up(bh, &[3 * hd]));
        hs.push(up(&h0, &[(steps + 1) * items, hd]));
        gates.push(up(&nan(steps * items * 4 * hd), &[steps * items, 4 * hd]));
    }
    let mut out = up(&nan(tokens * inp.out_cols), &[tokens, inp.out_cols]);
    let dout = up(&inp.dout, &[tokens, inp.out_cols]);
    let mut dh: Vec<_> = (0..2).map(|_| up(&vec![0.0; items * hd], &[items, hd])).collect();
    let mut dx: Vec<_> = (0..2).map(|_| up(&vec![0.0; tokens * 3 * hd], &[tokens, 3 * hd])).collect();
    let mut dp: Vec<_> = (0..2).map(|_| up(&nan(steps * items * 3 * hd), &[steps * items, 3 * hd])).collect();
    {
        let ([hs0, hs1], [g0, g1]) = (&mut hs[..], &mut gates[..]) else { unreachable!() };
        let runs = [
            GruRunFwd { reverse: false, xproj: &x[0], w_hh: w[0].view(), bias_hh: b[0].view(), hs: hs0, gates: g0 },
            GruRunFwd { reverse: true, xproj: &x[1], w_hh: w[1].view(), bias_hh: b[1].view(), hs: hs1, gates: g1 },
        ];
        be.gru_fwd(seg, hd, runs, &mut out).unwrap();
    }
    {
        let ([dh0, dh1], [dx0, dx1], [dp0, dp1]) = (&mut dh[..], &mut dx[..], &mut dp[..]) else { unreachable!() };
        let runs = [
            GruRunBwd {
                reverse: false,
                w_hh: w[0].view(),
                gates: &gates[0],
                hs: &hs[0],
                dh: dh0,
                dxproj: dx0,
                dhproj: dp0,
            },
            GruRunBwd {
                reverse: true,
                w_hh: w[1].view(),
                gates: &gates[1],
                hs: &hs[1],
                dh: dh1,
                dxproj: dx1,
                dhproj: dp1,
            },
        ];
        be.gru_bwd(seg, hd, runs, &dout).unwrap();
    }
    let mut named = vec![("out".to_owned(), be.download(out.view()).unwrap())];
    for d in 0..2 {
        let dir = ["forward", "reverse"][d];
        for (name, t) in [("hs", &hs[d]), ("gates", &gates[d]), ("dh", &dh[d]), ("dxproj", &dx[d]), ("dhproj", &dp[d])]
        {
            named.push((format!("{dir} {name}"), be.download(t.view()).unwrap()));
        }
    }
    named
}

/// Both directions' whole recurrences (`Backend::gru_fwd` / `gru_bwd`: on a GPU the
/// persistent kernels where one chunk holds every item, `GruPath::Auto`, else step by step;
/// kernels/gru_persistent.cu) against the CPU twin from the same inputs:
/// every step's states, the saved gates, the output, then dh (dL/dh_0), dxproj and every step's
/// dhproj. Tolerance 1e-5 of the norm: each dot product is summed in another order than the
/// CPU's GEMM, over up to T steps.
fn check_recurrence(g: &mut dyn Backend, lengths: &[usize], hd: usize, extra_cols: usize, seed: u64) {
    check_recurrence_against(g, &mut cpu(), lengths, hd, extra_cols, seed, Some(TOL));
}

/// `check_recurrence` against the CPU twin `c` (a precision of its own) within `tol`; the
/// worst relative error of any output. `tol` None only measures that (a distance from another
/// precision, not a twin's error: nothing is checked or reported).
fn check_recurrence_against(
    g: &mut dyn Backend,
    c: &mut dyn Backend,
    lengths: &[usize],
    hd: usize,
    extra_cols: usize,
    seed: u64,
    tol: Option<f64>,
) -> f64 {
    let (cseg, gseg) = (segments(c, lengths), segments(g, lengths));
    let tokens = cseg.tokens();
    let out_cols = 2 * hd + extra_cols;
    // Weights at torch.nn.GRU's scale, U(±1/√H), so that the states stay in tanh's range.
    let a = 1.0 / (hd as f64).sqrt();
    let dirs = (0..2u64)
        .map(|r| {
            let s = seed * 16 + r;
            [randv(s, tokens * 3 * hd), rand_range(s ^ 1, 3 * hd * hd, -a, a), rand_range(s ^ 2, 3 * hd, -a, a)]
        })
        .collect();
    let inp = RecurrenceInputs { dirs, dout: randv(seed ^ 0x77, tokens * out_cols), out_cols };
    let want = run_recurrence(c, &cseg, hd, &inp);
    let got = run_recurrence(g, &gseg, hd, &inp);
    let what = format!("{} items H {hd} cols +{extra_cols}, {}", lengths.len(), c.name());
    let mut worst = 0f64;
    for ((name, cv), (_, gv)) in want.iter().zip(&got) {
        if let Some(tol) = tol {
            compare_twins(&format!("gru recurrence {name}, {what}"), gv, cv, tol);
        }
        let finite: Vec<(f32, f64)> =
            gv.iter().zip(cv).filter(|(_, w)| !w.is_nan()).map(|(&g, &w)| (g, w as f64)).collect();
        let (gf, wf): (Vec<f32>, Vec<f64>) = finite.into_iter().unzip();
        worst = worst.max(common::rel_err(&gf, &wf));
    }
    worst
}

#[test]
fn gru_recurrence_matches_cpu() {
    let Some(mut g) = gpu_or_skip("gpu_gru::gru_recurrence_matches_cpu") else { return };
    let g = g.as_mut();
    check_small_recurrences(g);
    // The paper's H 512 (8 units per block): 33 items, more than one chunk of 32, so
    // `GruPath::Auto` runs it step by step (the persistent kernel over chunks: below).
    let lengths: Vec<usize> = (0..33).map(|i| 1 + (i * 7) % 3).collect();
    check_recurrence(g, &lengths, 512, 0, 3);
}

/// Recurrences one chunk of the persistent kernel holds (so `GruPath::Auto` takes it).
fn check_small_recurrences(g: &mut dyn Backend) {
    // Small preset H 128 (2 units per block), ragged with idle items mid-batch.
    check_recurrence(g, &[24, 1, 7, 24, 3], 128, 0, 1);
    // H 133: 3 units per block, the last block owning one; rows wider than 2H.
    check_recurrence(g, &[5, 2, 6], 133, 2, 2);
    // Tiny widths: one unit per block, fewer blocks than multiprocessors; a single item.
    check_recurrence(g, &[64, 2, 35, 36], 7, 1, 4);
    check_recurrence(g, &[1], 1, 0, 5);
}

/// The persistent kernel where its items take several chunks (`GruPath::Persistent`; the
/// model takes it only where one chunk holds them all).
#[cfg(feature = "cuda")]
#[test]
fn gru_recurrence_over_several_chunks_matches_cpu() {
    let Some(mut g) = common::gpu::cuda_or_skip("gpu_gru::gru_recurrence_over_several_chunks") else { return };
    g.set_gru_path(semshare::backend::cuda::GruPath::Persistent);
    let lengths: Vec<usize> = (0..33).map(|i| 1 + (i * 7) % 3).collect();
    check_recurrence(&mut g, &lengths, 512, 0, 3);
    // H 133: 3 units a block, chunks of 85 items: 90 items take two.
    let lengths: Vec<usize> = (0..90).map(|i| 1 + (i * 5) % 4).collect();
    check_recurrence(&mut g, &lengths, 133, 2, 8);
}

/// The step-by-step path (`GruPath::BySteps`: per step one batched GEMM for both directions'
/// W_hh·h, then each direction's gate kernel) on the shapes `Auto` gives the persistent kernel.
#[cfg(feature = "cuda")]
#[test]
fn gru_recurrence_step_by_step_matches_cpu() {
    let Some(mut g) = common::gpu::cuda_or_skip("gpu_gru::gru_recurrence_step_by_step") else { return };
    g.set_gru_path(semshare::backend::cuda::GruPath::BySteps);
    check_small_recurrences(&mut g);
}

/// `--precision bf16`: the recurrence's products are a bf16 GEMM's on both devices whatever the
/// batch (operands rounded to nearest even, f32 sums), on the persistent kernel and step by
/// step, so each matches the CPU's bf16 recurrence, not its fp32 one: for 70 items and for 9.
/// (Until session 34 fewer than 64 items stayed fp32, so an item's embedding depended on the
/// size of its batch.) Tolerance 1e-4: an h that differs in its last f32 bit between the
/// devices can round to the neighbouring bf16 value (2⁻⁹ relative) on one of them.
#[cfg(feature = "cuda")]
#[test]
fn gru_recurrence_in_bf16_matches_the_cpus_bf16() {
    use semshare::backend::Precision;
    use semshare::backend::cpu::Cpu;
    use semshare::backend::cuda::GruPath;
    let Some(mut g) = common::gpu::cuda_or_skip("gpu_gru::gru_recurrence_in_bf16") else { return };
    g.set_precision(Precision::Bf16);
    let bf16 = || Cpu::with_precision(Precision::Bf16).unwrap();
    let many: Vec<usize> = (0..70).map(|i| 1 + (i * 5) % 7).collect();
    for path in [GruPath::Auto, GruPath::BySteps] {
        g.set_gru_path(path);
        for (items, seed) in [(70, 6), (9, 7)] {
            let lengths = &many[..items];
            check_recurrence_against(&mut g, &mut bf16(), lengths, 33, 1, seed, Some(1e-4));
            // The same inputs against the fp32 CPU: farther off, so the kernel did round.
            let from_fp32 = check_recurrence_against(&mut g, &mut cpu(), lengths, 33, 1, seed, None);
            assert!(
                from_fp32 > 1e-4,
                "{path:?}, {items} items: bf16 recurrence within {from_fp32:.2e} of the fp32 one: its operands were not rounded"
            );
        }
    }
}
