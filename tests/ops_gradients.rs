//! Every backward op of the CPU backend against central finite differences of the f64
//! reference forward (tests/common/mod.rs, `naive`). Each output y is reduced to a scalar by
//! a fixed random projection L = Σ r ⊙ y, so the op's backward is fed dy = r and must return
//! dL/dinput.
//!
//! Tolerance: relative norm 1e-4. The finite differences are in f64 with step 1e-5 on inputs
//! of size ~1 (truncation error ~1e-10, rounding ~1e-11), so the error measured is that of
//! the f32 analytic gradient: ~1e-7 per operation, grown by the cancellations inside
//! LayerNorm's and softmax's backward formulas (sums of terms of size ~1 whose result is
//! ~1e-2). Observed errors are ~1e-6; 1e-4 leaves margin and still catches any wrong term
//! (a missing or doubled term moves the error to ~1e-1).
//!
//! A gradient that is a sum of terms (a dot product, a column sum) can cancel to ~0 while its
//! f32 error stays that of its terms; for a one-element output that is a spurious failure in
//! ~1 case of 700. So sums are measured against the same gradient over absolute values (for
//! the multilinear ops: the finite differences of the definition at |inputs| with |r|): the
//! size of the terms, which is ≥ ‖want‖ and equal to it when nothing cancels.
//!
//! Accumulating outputs (parameter gradients, `scatter_add_rows`, `set_rows_bwd`'s dvalue)
//! start from small random values that are subtracted afterwards: an op that overwrites fails.
//! Overwritten outputs (`dhproj`) are poisoned with NaN; outputs an op must not touch hold
//! sentinels compared bit for bit.

mod common;

use common::{
    dot64, fd_grad, naive, norm, offsets_of, rand_ids, rand_range, randv, randv_scaled, rel_err, segments, to64,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use semshare::backend::{Backend, Gemm, GruStep};
use semshare::nn::{BiGru, ParamStore};

const TOL: f64 = 1e-4;
const H: f64 = 1e-5;

type R = Result<(), TestCaseError>;

fn dev() -> semshare::backend::cpu::Cpu {
    common::cpu()
}

fn lengths_strategy(max_items: usize, max_len: usize) -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1usize..=max_len, 1..=max_items)
}

fn abs(v: &[f64]) -> Vec<f64> {
    v.iter().map(|x| x.abs()).collect()
}

fn assert_grad(what: &str, got: &[f32], want: &[f64]) -> R {
    assert_grad_floor(what, got, want, 0.0)
}

/// `‖got − want‖ / max(‖want‖, floor)`: for one small part of a larger gradient (a recurrent
/// weight that only a few steps reach), whose f32 rounding is set by the size of the whole.
fn assert_grad_floor(what: &str, got: &[f32], want: &[f64], floor: f64) -> R {
    let diff: Vec<f64> = got.iter().zip(want).map(|(a, b)| *a as f64 - b).collect();
    let e = norm(&diff) / norm(want).max(floor).max(1e-30);
    common::report(what, e);
    prop_assert!(e < TOL, "{}: rel err {:e} (‖want‖ = {:e})", what, e, norm(want));
    Ok(())
}

/// The starting value of an accumulating output: nonzero (an op that overwrites instead of
/// adding is off by it, ≳ 1e-3 relative to these gradients: ten times TOL), but small, so that rounding
/// `before + gradient` to f32 costs ~1e-9, not ~1e-7, of a gradient that may be ~1e-4.
fn prefill(seed: u64, n: usize) -> Vec<f32> {
    randv_scaled(seed, n, 1e-2)
}

/// `got − before`, in f64 (what an accumulating op added).
fn added(got: &[f32], before: &[f32]) -> Vec<f32> {
    got.iter().zip(before).map(|(a, b)| ((*a as f64) - (*b as f64)) as f32).collect()
}

// ---- linear: gemm (both backward products) + bias_bwd ---------------------------------------

fn check_linear(rows: usize, inputs: usize, outputs: usize, seed: u64) -> R {
    let mut c = dev();
    let b: &mut dyn Backend = &mut c;
    let x = randv(seed, rows * inputs);
    let w = randv(seed ^ 1, outputs * inputs);
    let bias = randv(seed ^ 2, outputs);
    let r = randv(seed ^ 3, rows * outputs);
    let (dw0, db0) = (prefill(seed ^ 4, outputs * inputs), prefill(seed ^ 5, outputs));

    // Backward exactly as nn::Linear does it, through the backend.
    let xt = b.upload(&x, &[rows, inputs]).unwrap();
    let wt = b.upload(&w, &[outputs, inputs]).unwrap();
    let dy = b.upload(&r, &[rows, outputs]).unwrap();
    let mut dw = b.upload(&dw0, &[outputs, inputs]).unwrap();
    let mut db = b.upload(&db0, &[outputs]).unwrap();
    let mut dx = b.upload(&vec![f32::NAN; rows * inputs], &[rows, inputs]).unwrap();
    let gw = Gemm { m: outputs, n: inputs, k: rows, trans_a: true, trans_b: false, alpha: 1.0, beta: 1.0 };
    b.gemm(gw, dy.view(), xt.view(), dw.view_mut()).unwrap();
    b.bias_bwd(&dy, db.view_mut()).unwrap();
    let gx = Gemm { m: rows, n: inputs, k: outputs, trans_a: false, trans_b: false, alpha: 1.0, beta: 0.0 };
    b.gemm(gx, dy.view(), wt.view(), dx.view_mut()).unwrap();

    let (nx, nw) = (x.len(), w.len());
    let all: Vec<f64> = [to64(&x), to64(&w), to64(&bias)].concat();
    let r64 = to64(&r);
    let mut f =
        |p: &[f64]| dot64(&r64, &naive::linear(&p[..nx], &p[nx..nx + nw], Some(&p[nx + nw..]), inputs, outputs));
    let g = fd_grad(&mut f, &all, H);
    // The terms' size: the same gradient at |x|, |W|, |b| with |r| (see the header).
    let (all_abs, r_abs) = (abs(&all), abs(&r64));
    let mut fa =
        |p: &[f64]| dot64(&r_abs, &naive::linear(&p[..nx], &p[nx..nx + nw], Some(&p[nx + nw..]), inputs, outputs));
    let ga = fd_grad(&mut fa, &all_abs, H);
    let (px, pw, pb) = (0..nx, nx..nx + nw, nx + nw..all.len());
    assert_grad_floor("dx", &b.download(dx.view()).unwrap(), &g[px.clone()], norm(&ga[px]))?;
    let dw = added(&b.download(dw.view()).unwrap(), &dw0);
    assert_grad_floor("dW (accumulated)", &dw, &g[pw.clone()], norm(&ga[pw]))?;
    let db = added(&b.download(db.view()).unwrap(), &db0);
    assert_grad_floor("db (accumulated)", &db, &g[pb.clone()], norm(&ga[pb]))?;
    Ok(())
}

proptest! {
    #![proptest_config(common::config(64))]

    #[test]
    fn linear_backward_matches_fd(rows in 1usize..9, inputs in 1usize..10, outputs in 1usize..10, seed: u64) {
        check_linear(rows, inputs, outputs, seed)?;
    }
}

#[test]
fn linear_backward_fixed_shapes() {
    for &(r, i, o) in &[(1, 1, 1), (1, 17, 3), (13, 2, 9)] {
        check_linear(r, i, o, (r * 100 + i * 10 + o) as u64).unwrap();
    }
}

// ---- elementwise: gelu_bwd, dropout_bwd ------------------------------------------------------

/// FD of a separable elementwise map: every coordinate at once.
fn fd_elementwise(f: impl Fn(&[f64]) -> Vec<f64>, x: &[f64], r: &[f64]) -> Vec<f64> {
    let xp: Vec<f64> = x.iter().map(|v| v + H).collect();
    let xm: Vec<f64> = x.iter().map(|v| v - H).collect();
    let (yp, ym) = (f(&xp), f(&xm));
    (0..x.len()).map(|i| r[i] * (yp[i] - ym[i]) / (2.0 * H)).collect()
}

fn check_gelu_bwd(n: usize, scale: f64, seed: u64) -> R {
    let mut c = dev();
    let b: &mut dyn Backend = &mut c;
    let x = randv_scaled(seed, n, scale);
    let r = randv(seed ^ 1, n);
    let xt = b.upload(&x, &[n]).unwrap();
    let rt = b.upload(&r, &[n]).unwrap();
    let dx = b.gelu_bwd(&xt, &rt).unwrap();
    let want = fd_elementwise(|v| v.iter().map(|&a| naive::gelu(a)).collect(), &to64(&x), &to64(&r));
    // The kernel's tanh t is a rational approximation with absolute error below 1e-6
    // (elementwise::tanh_fast); through GELU'(x) = (1 + t)/2 + x(1 − t²)·c(1 + 3a·x²)/2 that is
    // up to |r|·1e-6·(1/2 + |x|·c(1 + 3a·x²)) per element (~1e-3 relative where GELU' ≈ 0, x ≈ −3),
    // an allowance added to TOL·‖want‖.
    let (c, a) = ((2.0 / std::f64::consts::PI).sqrt(), 0.044715);
    let allow: Vec<f64> = x
        .iter()
        .zip(&r)
        .map(|(&x, &r)| {
            let x = x as f64;
            (r as f64).abs() * 1e-6 * (0.5 + x.abs() * c * (1.0 + 3.0 * a * x * x))
        })
        .collect();
    let got = b.download(dx.view()).unwrap();
    let diff: Vec<f64> = got.iter().zip(&want).map(|(a, b)| *a as f64 - b).collect();
    let e = norm(&diff) / (norm(&want) + norm(&allow) / TOL);
    common::report("gelu dx", e);
    prop_assert!(e < TOL, "gelu dx: error {e:e} (‖want‖ = {:e}, allowance {:e})", norm(&want), norm(&allow));
    Ok(())
}

proptest! {
    #![proptest_config(common::config(128))]

    #[test]
    fn gelu_bwd_matches_fd(n in 1usize..400, scale in 0.1f64..6.0, seed: u64) {
        check_gelu_bwd(n, scale, seed)?;
    }

    #[test]
    fn dropout_bwd_matches_fd(n in 1usize..400, p in 0.0f32..0.9, seed: u64) {
        let mut c = dev();
        let b: &mut dyn Backend = &mut c;
        let x = randv(seed, n);
        let r = randv(seed ^ 1, n);
        let mut dy = b.upload(&r, &[n]).unwrap();
        b.dropout_bwd(&mut dy, p, seed).unwrap();
        let want = fd_elementwise(|v| naive::dropout(v, p as f64, seed), &to64(&x), &to64(&r));
        assert_grad("dropout dx", &b.download(dy.view()).unwrap(), &want)?;
    }
}

#[test]
fn gelu_bwd_parallel_path() {
    check_gelu_bwd(40_000, 6.0, 11).unwrap(); // above the 32768-element threshold
}

// ---- rows: segment_mean_bwd, scatter_add_rows, set_rows_bwd ---------------------------------

fn check_segment_mean_bwd(lengths: &[usize], cols: usize, seed: u64) -> R {
    let mut c = dev();
    let b: &mut dyn Backend = &mut c;
    let seg = segments(b, lengths);
    let x = randv(seed, seg.tokens() * cols);
    let r = randv(seed ^ 1, seg.items() * cols);
    let rt = b.upload(&r, &[seg.items(), cols]).unwrap();
    let dx = b.segment_mean_bwd(&rt, &seg).unwrap();
    prop_assert_eq!(dx.shape(), &[seg.tokens(), cols][..]);
    let (r64, off) = (to64(&r), offsets_of(lengths));
    let want = fd_grad(&mut |p| dot64(&r64, &naive::segment_mean(p, cols, &off)), &to64(&x), H);
    assert_grad("segment_mean dx", &b.download(dx.view()).unwrap(), &want)
}

proptest! {
    #![proptest_config(common::config(96))]

    #[test]
    fn segment_mean_bwd_matches_fd(lengths in lengths_strategy(5, 6), cols in 1usize..6, seed: u64) {
        check_segment_mean_bwd(&lengths, cols, seed)?;
    }

    #[test]
    fn scatter_add_rows_is_the_gradient_of_gather(vocab in 1usize..12, cols in 1usize..6, n in 1usize..15, seed: u64) {
        let mut c = dev();
        let b: &mut dyn Backend = &mut c;
        let table = randv(seed, vocab * cols);
        let ids = rand_ids(seed ^ 1, n, vocab); // repeated ids must add up
        let r = randv(seed ^ 2, n * cols);
        let d0 = prefill(seed ^ 3, vocab * cols);
        let rt = b.upload(&r, &[n, cols]).unwrap();
        let it = b.upload_ids(&ids).unwrap();
        let mut dt = b.upload(&d0, &[vocab, cols]).unwrap();
        b.scatter_add_rows(&rt, &it, dt.view_mut()).unwrap();
        let got = b.download(dt.view()).unwrap();
        let r64 = to64(&r);
        let want = fd_grad(&mut |p| dot64(&r64, &naive::gather_rows(p, cols, &ids)), &to64(&table), H);
        let r_abs = abs(&r64);
        let terms = fd_grad(&mut |p| dot64(&r_abs, &naive::gather_rows(p, cols, &ids)), &to64(&table), H);
        assert_grad_floor("dtable (accumulated)", &added(&got, &d0), &want, norm(&terms))?;
        for v in 0..vocab {
            if !ids.contains(&(v as u32)) {
                prop_assert_eq!(&got[v * cols..(v + 1) * cols], &d0[v * cols..(v + 1) * cols], "row {} not in ids changed", v);
            }
        }
        let bad = b.upload_ids(&vec![vocab as u32; n]).unwrap();
        prop_assert!(b.scatter_add_rows(&rt, &bad, dt.view_mut()).is_err());
    }

    #[test]
    fn set_rows_bwd_matches_fd(rows in 1usize..10, cols in 1usize..6, n in 1usize..5, seed: u64) {
        let mut c = dev();
        let b: &mut dyn Backend = &mut c;
        let x = randv(seed, rows * cols);
        let value = randv(seed ^ 1, cols);
        let idx = rand_ids(seed ^ 2, n, rows); // duplicates: the value is set once, counted once
        let r = randv(seed ^ 3, rows * cols);
        let d0 = prefill(seed ^ 4, cols);
        let mut dx = b.upload(&r, &[rows, cols]).unwrap();
        let it = b.upload_ids(&idx).unwrap();
        let mut dv = b.upload(&d0, &[cols]).unwrap();
        b.set_rows_bwd(&mut dx, &it, dv.view_mut()).unwrap();
        let nx = x.len();
        let all: Vec<f64> = [to64(&x), to64(&value)].concat();
        let r64 = to64(&r);
        let g = fd_grad(&mut |p| dot64(&r64, &naive::set_rows(&p[..nx], &idx, &p[nx..])), &all, H);
        let r_abs = abs(&r64);
        let ga = fd_grad(&mut |p| dot64(&r_abs, &naive::set_rows(&p[..nx], &idx, &p[nx..])), &all, H);
        assert_grad("dx (masked rows zeroed)", &b.download(dx.view()).unwrap(), &g[..nx])?;
        let dv = added(&b.download(dv.view()).unwrap(), &d0);
        assert_grad_floor("dvalue (accumulated)", &dv, &g[nx..], norm(&ga[nx..]))?;
    }
}

#[test]
fn segment_mean_bwd_single_item_single_segment() {
    check_segment_mean_bwd(&[1], 3, 1).unwrap();
    check_segment_mean_bwd(&[1, 4, 1], 2, 2).unwrap();
}

// ---- layernorm_bwd ---------------------------------------------------------------------------

fn check_layernorm_bwd(rows: usize, d: usize, seed: u64) -> R {
    let mut c = dev();
    let b: &mut dyn Backend = &mut c;
    let eps = 1e-5f32;
    let x = randv_scaled(seed, rows * d, 2.0);
    let gamma = rand_range(seed ^ 1, d, 0.5, 1.5);
    let beta = randv(seed ^ 2, d);
    let r = randv(seed ^ 3, rows * d);
    let (dg0, db0) = (prefill(seed ^ 4, d), prefill(seed ^ 5, d));
    let xt = b.upload(&x, &[rows, d]).unwrap();
    let (gt, bt) = (b.upload(&gamma, &[d]).unwrap(), b.upload(&beta, &[d]).unwrap());
    let (_, stats) = b.layernorm_fwd(&xt, gt.view(), bt.view(), eps).unwrap();
    let rt = b.upload(&r, &[rows, d]).unwrap();
    let (mut dg, mut db) = (b.upload(&dg0, &[d]).unwrap(), b.upload(&db0, &[d]).unwrap());
    let dx = b.layernorm_bwd(&xt, &stats, gt.view(), &rt, dg.view_mut(), db.view_mut()).unwrap();

    let nx = x.len();
    let all: Vec<f64> = [to64(&x), to64(&gamma), to64(&beta)].concat();
    let r64 = to64(&r);
    let mut f = |p: &[f64]| dot64(&r64, &naive::layernorm(&p[..nx], &p[nx..nx + d], &p[nx + d..], eps as f64).0);
    let g = fd_grad(&mut f, &all, H);
    let gdx = b.download(dx.view()).unwrap();
    // dx = rstd·(dy⊙γ − mean(dy⊙γ) − x̂·mean(dy⊙γ⊙x̂)) is a difference of terms of size
    // rstd·|dy⊙γ| that cancel almost completely for small d (d = 2: y = ±γ + β whatever x is,
    // so dx ~ eps/var ~ 1e-5 while the terms are ~1), and f32 rounds each term to ~1e-7 of its
    // size. So the error is measured against the larger of ‖dx‖ and the terms' size; a wrong
    // or missing term would still be off by the terms' full size.
    let st = naive::layernorm(&to64(&x), &to64(&gamma), &to64(&beta), eps as f64).1;
    let terms =
        (0..rows * d).map(|i| (st[2 * (i / d) + 1] * r[i] as f64 * gamma[i % d] as f64).powi(2)).sum::<f64>().sqrt();
    let diff: Vec<f64> = gdx.iter().zip(&g[..nx]).map(|(a, b)| *a as f64 - b).collect();
    let e = norm(&diff) / norm(&g[..nx]).max(terms);
    common::report("layernorm dx (vs terms)", e);
    prop_assert!(
        e < TOL,
        "layernorm dx: error {:e} relative to max(‖dx‖ = {:e}, terms {:e}) (rows {}, d {})",
        e,
        norm(&g[..nx]),
        terms,
        rows,
        d
    );
    // dγ = Σ_rows dy ⊙ x̂ and dβ = Σ_rows dy are sums: against Σ|dy ⊙ x̂| and Σ|dy|.
    let xhat = |i: usize| (x[i] as f64 - st[2 * (i / d)]) * st[2 * (i / d) + 1];
    let (mut dg_terms, mut db_terms) = (vec![0.0; d], vec![0.0; d]);
    for i in 0..rows * d {
        dg_terms[i % d] += (r[i] as f64 * xhat(i)).abs();
        db_terms[i % d] += (r[i] as f64).abs();
    }
    if d == 1 {
        prop_assert!(added(&b.download(dg.view()).unwrap(), &dg0).iter().all(|v| v.abs() < 1e-6));
    } else {
        let dgv = added(&b.download(dg.view()).unwrap(), &dg0);
        assert_grad_floor("dgamma (accumulated)", &dgv, &g[nx..nx + d], norm(&dg_terms))?;
    }
    let dbv = added(&b.download(db.view()).unwrap(), &db0);
    assert_grad_floor("dbeta (accumulated)", &dbv, &g[nx + d..], norm(&db_terms))?;
    Ok(())
}

proptest! {
    #![proptest_config(common::config(96))]

    #[test]
    fn layernorm_bwd_matches_fd(rows in 1usize..8, d in 1usize..24, seed: u64) {
        check_layernorm_bwd(rows, d, seed)?;
    }
}

#[test]
fn layernorm_bwd_fixed_shapes() {
    // d = 1, d = 2 (the most cancellation), and ≥ 64 rows (the parallel path).
    for &(rows, d) in &[(1, 1), (2, 1), (3, 2), (1, 33), (70, 3)] {
        check_layernorm_bwd(rows, d, (rows * 100 + d) as u64).unwrap();
    }
}

// ---- attention_bwd ---------------------------------------------------------------------------

fn check_attention_bwd(lengths: &[usize], heads: usize, dh: usize, seed: u64) -> R {
    let mut c = dev();
    let b: &mut dyn Backend = &mut c;
    let d = heads * dh;
    let seg = segments(b, lengths);
    let qkv = randv_scaled(seed, seg.tokens() * 3 * d, 1.5);
    let r = randv(seed ^ 1, seg.tokens() * d);
    let qt = b.upload(&qkv, &[seg.tokens(), 3 * d]).unwrap();
    let (_, probs) = b.attention_fwd(&qt, &seg, heads).unwrap();
    let rt = b.upload(&r, &[seg.tokens(), d]).unwrap();
    let dqkv = b.attention_bwd(&qt, &probs, &seg, heads, &rt, None).unwrap();
    prop_assert_eq!(dqkv.shape(), qt.shape());
    let (r64, off) = (to64(&r), seg.offsets.clone());
    let want = fd_grad(&mut |p| dot64(&r64, &naive::attention(p, &off, heads).0), &to64(&qkv), H);
    assert_grad("dqkv", &b.download(dqkv.view()).unwrap(), &want)
}

proptest! {
    #![proptest_config(common::config(64))]

    #[test]
    fn attention_bwd_matches_fd(lengths in lengths_strategy(4, 6), heads in 1usize..4, dh in 1usize..4, seed: u64) {
        check_attention_bwd(&lengths, heads, dh, seed)?;
    }
}

#[test]
fn attention_bwd_edge_batches() {
    check_attention_bwd(&[1], 1, 1, 1).unwrap(); // softmax over one key: dq = dk = 0, dv = dout
    check_attention_bwd(&[1], 2, 3, 2).unwrap();
    check_attention_bwd(&[5, 1, 2], 2, 2, 3).unwrap();
}

// ---- gru_step_bwd: one step ------------------------------------------------------------------

fn check_gru_step_bwd(lengths: &[usize], hd: usize, s: usize, reverse: bool, seed: u64) -> R {
    let mut c = dev();
    let b: &mut dyn Backend = &mut c;
    let seg = segments(b, lengths);
    let (items, tokens, oc) = (seg.items(), seg.tokens(), 2 * hd);
    let out_col = if reverse { hd } else { 0 };
    let step = GruStep { s, reverse, hidden: hd, out_col };
    let xproj = randv(seed, tokens * 3 * hd);
    let hproj = randv(seed ^ 1, items * 3 * hd);
    let h0 = randv(seed ^ 2, items * hd);
    let r_out = randv(seed ^ 3, tokens * oc);
    let r_h = randv(seed ^ 4, items * hd);
    let sentinel = randv(seed ^ 5, tokens * 3 * hd);

    // The run's buffers: h_s = h0 at rows s·items.. of hs; b_hh = 0, so hproj is W_hh h + b_hh.
    let steps = seg.max_len;
    let xt = b.upload(&xproj, &[tokens, 3 * hd]).unwrap();
    let ht = b.upload(&hproj, &[items, 3 * hd]).unwrap();
    let bias = b.zeros(&[3 * hd]).unwrap();
    let mut hs = b.zeros(&[(steps + 1) * items, hd]).unwrap();
    let h0t = b.upload(&h0, &[items, hd]).unwrap();
    b.copy(h0t.view(), hs.sub_mut(s * items * hd, items * hd)).unwrap();
    let mut out = b.zeros(&[tokens, oc]).unwrap();
    let mut gates = b.zeros(&[steps * items, 4 * hd]).unwrap();
    b.gru_step_fwd(step, &seg, &xt, &ht, bias.view(), &mut hs, &mut out, &mut gates).unwrap();
    let dout = b.upload(&r_out, &[tokens, oc]).unwrap();
    let mut dh = b.upload(&r_h, &[items, hd]).unwrap();
    let mut dxproj = b.upload(&sentinel, &[tokens, 3 * hd]).unwrap();
    let mut dhproj = b.upload(&vec![f32::NAN; steps * items * 3 * hd], &[steps * items, 3 * hd]).unwrap();
    b.gru_step_bwd(step, &seg, &gates, &hs, &dout, &mut dh, &mut dxproj, &mut dhproj).unwrap();

    // L(xproj, hproj, h_prev) = Σ r_out ⊙ out + Σ r_h ⊙ h_new, from the f64 cell.
    let (nx, nh) = (xproj.len(), hproj.len());
    let all: Vec<f64> = [to64(&xproj), to64(&hproj), to64(&h0)].concat();
    let (ro, rh) = (to64(&r_out), to64(&r_h));
    let lens = lengths.to_vec();
    let off = seg.offsets.clone();
    let mut f = |p: &[f64]| {
        let (xp, hp, hv) = (&p[..nx], &p[nx..nx + nh], &p[nx + nh..]);
        let mut loss = 0.0;
        for it in 0..lens.len() {
            let hb = &hv[it * hd..(it + 1) * hd];
            let rhb = &rh[it * hd..(it + 1) * hd];
            if s >= lens[it] {
                loss += dot64(rhb, hb); // idle: h passes through
                continue;
            }
            let row = off[it] + if reverse { lens[it] - 1 - s } else { s };
            let hn = naive::gru_cell(&xp[row * 3 * hd..(row + 1) * 3 * hd], &hp[it * 3 * hd..(it + 1) * 3 * hd], hb).0;
            loss += dot64(rhb, &hn) + dot64(&ro[row * oc + out_col..row * oc + out_col + hd], &hn);
        }
        loss
    };
    let g = fd_grad(&mut f, &all, H);
    // The same gradient with |r_out| and |r_h|: each active item's dL/dh' is the sum
    // r_h + r_out, which may cancel (see the header).
    let (ro, rh) = (abs(&ro), abs(&rh));
    let mut fa = |p: &[f64]| {
        let (xp, hp, hv) = (&p[..nx], &p[nx..nx + nh], &p[nx + nh..]);
        let mut loss = 0.0;
        for it in 0..lens.len() {
            let hb = &hv[it * hd..(it + 1) * hd];
            let rhb = &rh[it * hd..(it + 1) * hd];
            if s >= lens[it] {
                loss += dot64(rhb, hb);
                continue;
            }
            let row = off[it] + if reverse { lens[it] - 1 - s } else { s };
            let hn = naive::gru_cell(&xp[row * 3 * hd..(row + 1) * 3 * hd], &hp[it * 3 * hd..(it + 1) * 3 * hd], hb).0;
            loss += dot64(rhb, &hn) + dot64(&ro[row * oc + out_col..row * oc + out_col + hd], &hn);
        }
        loss
    };
    let ga = abs(&fd_grad(&mut fa, &all, H));
    let gx = b.download(dxproj.view()).unwrap();
    // dxproj: the rows visited at this step are written; every other row keeps its sentinel
    // (and L does not depend on it).
    let visited: Vec<usize> = (0..items)
        .filter(|&it| s < lengths[it])
        .map(|it| seg.offsets[it] + if reverse { lengths[it] - 1 - s } else { s })
        .collect();
    let (mut got_x, mut want_x, mut terms_x) = (vec![], vec![], vec![]);
    for row in 0..tokens {
        for j in row * 3 * hd..(row + 1) * 3 * hd {
            if visited.contains(&row) {
                got_x.push(gx[j]);
                want_x.push(g[j]);
                terms_x.push(ga[j]);
            } else {
                prop_assert_eq!(
                    gx[j].to_bits(),
                    sentinel[j].to_bits(),
                    "dxproj[{}] of a row not visited was written",
                    j
                );
                prop_assert_eq!(g[j], 0.0);
            }
        }
    }
    assert_grad_floor("dxproj (visited rows)", &got_x, &want_x, norm(&terms_x))?;
    let dhp_all = b.download(dhproj.view()).unwrap();
    let dhp = &dhp_all[s * items * 3 * hd..(s + 1) * items * 3 * hd];
    assert_grad_floor("dhproj", dhp, &g[nx..nx + nh], norm(&ga[nx..nx + nh]))?;
    // Other steps' rows of dhproj are not this step's to write.
    let others = dhp_all.iter().enumerate().filter(|(i, _)| i / (items * 3 * hd) != s);
    prop_assert!(others.clone().all(|(_, v)| v.is_nan()), "dhproj rows of another step were written");
    let dhv = b.download(dh.view()).unwrap();
    assert_grad_floor("dh_prev (the part bypassing W_hh)", &dhv, &g[nx + nh..], norm(&ga[nx + nh..]))?;
    Ok(())
}

proptest! {
    #![proptest_config(common::config(96))]

    #[test]
    fn gru_step_bwd_matches_fd(lengths in lengths_strategy(4, 5), hd in 1usize..5, s_frac in 0.0f64..1.0, reverse: bool, seed: u64) {
        let max = *lengths.iter().max().unwrap();
        let s = ((s_frac * max as f64) as usize).min(max - 1);
        check_gru_step_bwd(&lengths, hd, s, reverse, seed)?;
    }
}

#[test]
fn gru_step_bwd_edge_batches() {
    for reverse in [false, true] {
        check_gru_step_bwd(&[1], 1, 0, reverse, 1).unwrap();
        check_gru_step_bwd(&[1], 3, 0, reverse, 2).unwrap();
        for s in 0..3 {
            check_gru_step_bwd(&[3, 1, 2], 2, s, reverse, 10 + s as u64).unwrap();
        }
    }
}

// ---- a whole BiGru (nn::BiGru: steps, recurrent GEMMs, weight-gradient GEMM) -----------------

fn gru_params(store: &ParamStore, w: &[f64], name: &str) -> [naive::GruParams; 2] {
    let get = |n: String| {
        let p = store.find(&n).unwrap_or_else(|| panic!("no parameter {n}")).param;
        w[p.offset..p.offset + p.len].to_vec()
    };
    let dir = |sfx: &str| naive::GruParams {
        w_ih: get(format!("{name}.weight_ih_l0{sfx}")),
        b_ih: get(format!("{name}.bias_ih_l0{sfx}")),
        w_hh: get(format!("{name}.weight_hh_l0{sfx}")),
        b_hh: get(format!("{name}.bias_hh_l0{sfx}")),
    };
    [dir(""), dir("_reverse")]
}

fn check_bigru(lengths: &[usize], inputs: usize, hidden: usize, seed: u64) -> R {
    let mut c = dev();
    let b: &mut dyn Backend = &mut c;
    let mut store = ParamStore::new();
    let gru = BiGru::new(&mut store, "gru", inputs, hidden);
    let wv = randv_scaled(seed, store.total, 0.8);
    let g0 = prefill(seed ^ 1, store.total);
    let seg = segments(b, lengths);
    let x = randv(seed ^ 2, seg.tokens() * inputs);
    let r = randv(seed ^ 3, seg.tokens() * 2 * hidden);
    let w = b.upload(&wv, &[store.total]).unwrap();
    let mut g = b.upload(&g0, &[store.total]).unwrap();
    let xt = b.upload(&x, &[seg.tokens(), inputs]).unwrap();
    let (out, cache) = gru.forward(b, &w, xt, &seg).unwrap();
    prop_assert_eq!(out.shape(), &[seg.tokens(), 2 * hidden][..]);
    // The forward itself against the reference.
    let want_out = naive::bigru(&to64(&x), inputs, hidden, &seg.offsets, &gru_params(&store, &to64(&wv), "gru"));
    let e = rel_err(&b.download(out.view()).unwrap(), &want_out);
    prop_assert!(e < 1e-5, "bigru forward rel err {e}");
    let rt = b.upload(&r, &[seg.tokens(), 2 * hidden]).unwrap();
    let dx = gru.backward(b, &w, &mut g, &seg, cache, &rt).unwrap();

    let nx = x.len();
    let all: Vec<f64> = [to64(&x), to64(&wv)].concat();
    let (r64, off) = (to64(&r), seg.offsets.clone());
    let mut f = |p: &[f64]| {
        let params = gru_params(&store, &p[nx..], "gru");
        dot64(&r64, &naive::bigru(&p[..nx], inputs, hidden, &off, &params))
    };
    let fd = fd_grad(&mut f, &all, H);
    assert_grad("bigru dx", &b.download(dx.view()).unwrap(), &fd[..nx])?;
    let gp = added(&b.download(g.view()).unwrap(), &g0);
    // A parameter's gradient can be tiny next to the rest (weight_hh of a length-2 sequence:
    // one step sees a nonzero h_prev), while its f32 rounding follows the size of the terms
    // summed into it; so each is measured against at least 1e-3 of the whole gradient's norm.
    let floor = 1e-3 * norm(&fd[nx..]);
    for info in &store.infos {
        let p = info.param;
        assert_grad_floor(
            &info.name,
            &gp[p.offset..p.offset + p.len],
            &fd[nx + p.offset..nx + p.offset + p.len],
            floor,
        )?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(common::config(32))]

    #[test]
    fn bigru_backward_matches_fd(lengths in lengths_strategy(4, 5), inputs in 1usize..4, hidden in 1usize..4, seed: u64) {
        check_bigru(&lengths, inputs, hidden, seed)?;
    }
}

#[test]
fn bigru_backward_edge_batches() {
    check_bigru(&[1], 2, 3, 1).unwrap();
    check_bigru(&[4, 1, 2], 3, 2, 2).unwrap();
    check_bigru(&[1, 1, 1], 1, 1, 3).unwrap();
}

// ---- losses: the gradients the fused kernels write over the logits ---------------------------

proptest! {
    #![proptest_config(common::config(96))]

    #[test]
    fn bce_with_logits_gradient_matches_fd(n in 1usize..6, classes in 1usize..9, scale in 0.1f64..8.0, w in 0.1f32..3.0, seed: u64) {
        let mut c = dev();
        let b: &mut dyn Backend = &mut c;
        let x = randv_scaled(seed, n * classes, scale);
        let y: Vec<f32> = rand_ids(seed ^ 1, n * classes, 2).iter().map(|&v| v as f32).collect();
        let mut xt = b.upload(&x, &[n, classes]).unwrap();
        let yt = b.upload(&y, &[n, classes]).unwrap();
        b.bce_with_logits(&mut xt, &yt, w).unwrap();
        let y64 = to64(&y);
        let want = fd_grad(&mut |p| w as f64 * naive::bce_mean(p, &y64), &to64(&x), H);
        // Floor w/m: the size of each term of σ(x) − y (see ops_forward.rs).
        let m = (n * classes) as f64;
        assert_grad_floor("bce dlogits", &b.download(xt.view()).unwrap(), &want, w as f64 / m)?;
    }

    #[test]
    fn cross_entropy_gradient_matches_fd(n in 1usize..6, classes in 2usize..12, scale in 0.1f64..8.0, w in 0.1f32..3.0, seed: u64) {
        let mut c = dev();
        let b: &mut dyn Backend = &mut c;
        let x = randv_scaled(seed, n * classes, scale);
        let t = rand_ids(seed ^ 1, n, classes);
        let mut xt = b.upload(&x, &[n, classes]).unwrap();
        let tt = b.upload_ids(&t).unwrap();
        b.cross_entropy(&mut xt, &tt, w).unwrap();
        let want = fd_grad(&mut |p| w as f64 * naive::ce_mean(p, classes, &t), &to64(&x), H);
        // Floor w/n: the size of the terms of softmax − onehot (see ops_forward.rs).
        assert_grad_floor("ce dlogits", &b.download(xt.view()).unwrap(), &want, w as f64 / n as f64)?;
    }
}
