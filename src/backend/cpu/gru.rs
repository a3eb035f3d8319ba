//! GRU gates for one timestep of a packed batch, forward and backward (PyTorch equations):
//!   r = σ(x_r + h_r),  z = σ(x_z + h_z),  n = tanh(x_n + r ⊙ h_n),  h' = (1 − z) ⊙ n + z ⊙ h
//! where x_* = W_i* x_t + b_i* (precomputed for all steps by one GEMM) and h_* = W_h* h + b_h*
//! (one GEMM per step for W_h* h; the bias b_h* is added here). Idle items (shorter than the
//! step) keep h unchanged. The run's states hs [(steps + 1)·items, H] hold h_s at rows
//! s·items..: step s reads h_s and writes h_{s+1}, so no state is copied to be kept for the
//! backward pass. Saved per step at rows s·items.. of gates [steps·items, 4H]: (r, z, n, h_n).
//!
//! σ and tanh are the branch-free rational forms (`tanh_fast`), so the gate loop vectorises:
//! libm's expf/tanhf made these gates a third of the text side's non-GEMM time; the loops are
//! compiled for the active path (`simd::vectorised!`).

use super::elementwise::tanh_fast;
use super::gemm::Operand;
use super::simd;
use crate::backend::{Gemm, GruStep};

/// σ(x) = (1 + tanh(x/2)) / 2: abs error < 1e-6, no branch.
#[inline(always)]
fn sigmoid_fast(x: f32) -> f32 {
    0.5 + 0.5 * tanh_fast(0.5 * x)
}

#[allow(clippy::too_many_arguments)]
pub fn step_fwd(
    step: GruStep,
    offsets: &[usize],
    xproj: &[f32],
    hproj: &[f32],
    bias_hh: &[f32],
    hs: &mut [f32],
    out: &mut [&mut [f32]],
    gates: &mut [f32],
) {
    let (hd, items) = (step.hidden, offsets.len() - 1);
    let (before, after) = hs.split_at_mut((step.s + 1) * items * hd);
    let h_prev = &before[step.s * items * hd..];
    let h_next = &mut after[..items * hd];
    let gates = &mut gates[step.s * items * 4 * hd..(step.s + 1) * items * 4 * hd];
    simd::vectorised!({
        for b in 0..items {
            let g = &mut gates[b * 4 * hd..(b + 1) * 4 * hd];
            let hb = &h_prev[b * hd..(b + 1) * hd];
            let hn_b = &mut h_next[b * hd..(b + 1) * hd];
            let Some(row) = step.row(offsets, b) else {
                g.fill(0.0);
                hn_b.copy_from_slice(hb);
                continue;
            };
            let x = &xproj[row * 3 * hd..(row + 1) * 3 * hd];
            let hp = &hproj[b * 3 * hd..(b + 1) * 3 * hd];
            gates_fwd_row([x, hp, bias_hh], hb, hn_b, &mut out[row][..hd], g);
        }
    })
}

/// One item's gates (module header): x = [x_r | x_z | x_n], hp = [h_r | h_z | h_n] and the
/// bias [b_r | b_z | b_n] (H each), h the state; writes h' into `h_next` and `o`, and (r, z, n, h_n) into
/// g [4H]. A function of its own, inlined, so that its slices are distinct references to
/// LLVM (`noalias`): written inline, with eleven slices LLVM could separate only by run-time
/// tests, it was the scalar copy of the loop that ran (`perf annotate`; 15 µs a step at 32
/// items and H 128 on Zen 4, about half that now).
#[inline(always)]
fn gates_fwd_row([x, hp, bias]: [&[f32]; 3], h: &[f32], h_next: &mut [f32], o: &mut [f32], g: &mut [f32]) {
    let hd = h.len();
    // Equal-length slices, so the loop below has no bounds checks.
    let [[x_r, x_z, x_n], [h_r, h_z, h_n], [b_r, b_z, b_n]] = [x, hp, bias].map(|v| thirds(v, hd));
    let (h_next, o) = (&mut h_next[..hd], &mut o[..hd]);
    let (g_r, g) = g.split_at_mut(hd);
    let (g_z, g) = g.split_at_mut(hd);
    let (g_n, g_hn) = g.split_at_mut(hd);
    let g_hn = &mut g_hn[..hd];
    for i in 0..hd {
        let r = sigmoid_fast(x_r[i] + h_r[i] + b_r[i]);
        let z = sigmoid_fast(x_z[i] + h_z[i] + b_z[i]);
        let hh_n = h_n[i] + b_n[i];
        let n = tanh_fast(x_n[i] + r * hh_n);
        let hn = (1.0 - z) * n + z * h[i];
        h_next[i] = hn;
        o[i] = hn;
        g_r[i] = r;
        g_z[i] = z;
        g_n[i] = n;
        g_hn[i] = hh_n;
    }
}

#[allow(clippy::too_many_arguments)]
pub fn step_bwd(
    step: GruStep,
    offsets: &[usize],
    gates: &[f32],
    hs: &[f32],
    dout: &[f32],
    out_cols: usize,
    dh: &mut [f32],
    dxproj: &mut [f32],
    dhproj: &mut [f32],
) {
    let (hd, items, s) = (step.hidden, offsets.len() - 1, step.s);
    let gates = &gates[s * items * 4 * hd..(s + 1) * items * 4 * hd];
    let h_prev = &hs[s * items * hd..(s + 1) * items * hd];
    let dhproj = &mut dhproj[s * items * 3 * hd..(s + 1) * items * 3 * hd];
    simd::vectorised!({
        for b in 0..items {
            let dhp = &mut dhproj[b * 3 * hd..(b + 1) * 3 * hd];
            let Some(row) = step.row(offsets, b) else {
                dhp.fill(0.0); // idle: dh passes through to the previous step untouched
                continue;
            };
            let g = &gates[b * 4 * hd..(b + 1) * 4 * hd];
            let hp = &h_prev[b * hd..(b + 1) * hd];
            let dob = &dout[row * out_cols + step.out_col..row * out_cols + step.out_col + hd];
            let dx = &mut dxproj[row * 3 * hd..(row + 1) * 3 * hd];
            gates_bwd_row(g, hp, dob, &mut dh[b * hd..(b + 1) * hd], dx, dhp);
        }
    })
}

/// `v`'s first three runs of `hd`.
#[inline(always)]
fn thirds(v: &[f32], hd: usize) -> [&[f32]; 3] {
    [&v[..hd], &v[hd..2 * hd], &v[2 * hd..3 * hd]]
}

/// One item's gate gradients: from its saved gates g = [r | z | n | h_n], h the state it
/// started from and dob its output's gradient, with dh (dL/dh', in: from the step after) →
/// d·z (out: the part that bypasses the gates); the pre-activation gradients into dx
/// (x's three, [3H]) and dhp (W_hh·h's, r ⊙ da_n for the third). A function of its own for
/// the reason `gates_fwd_row` is.
#[inline(always)]
fn gates_bwd_row(g: &[f32], h: &[f32], dob: &[f32], dh: &mut [f32], dx: &mut [f32], dhp: &mut [f32]) {
    let hd = h.len();
    let (g_r, g) = g.split_at(hd);
    let (g_z, g) = g.split_at(hd);
    let (g_n, g_hn) = g.split_at(hd);
    let (g_hn, dob, dh) = (&g_hn[..hd], &dob[..hd], &mut dh[..hd]);
    let (dx_r, dx) = dx.split_at_mut(hd);
    let (dx_z, dx_n) = dx.split_at_mut(hd);
    let (dp_r, dp) = dhp.split_at_mut(hd);
    let (dp_z, dp_n) = dp.split_at_mut(hd);
    let (dx_n, dp_n) = (&mut dx_n[..hd], &mut dp_n[..hd]);
    for i in 0..hd {
        let (r, z, n, h_n) = (g_r[i], g_z[i], g_n[i], g_hn[i]);
        let d = dh[i] + dob[i];
        let dn = d * (1.0 - z);
        let dz = d * (h[i] - n);
        let da_n = dn * (1.0 - n * n);
        let dr = da_n * h_n;
        let da_r = dr * r * (1.0 - r);
        let da_z = dz * z * (1.0 - z);
        dx_r[i] = da_r;
        dx_z[i] = da_z;
        dx_n[i] = da_n;
        dp_r[i] = da_r;
        dp_z[i] = da_z;
        dp_n[i] = da_n * r;
        dh[i] = d * z;
    }
}

/// The columns `from..from + width` of every `cols`-wide row of `out`: the part of the output
/// rows one GRU direction writes (`step_fwd`).
pub fn column_rows(out: &mut [f32], cols: usize, from: usize, width: usize) -> Vec<&mut [f32]> {
    out.chunks_exact_mut(cols).map(|row| &mut row[from..from + width]).collect()
}

/// Both directions' parts of the output rows, [0, H) and [H, 2H) of each, borrowed apart so
/// that the two recurrences write them at once.
pub fn halves(out: &mut [f32], cols: usize, hd: usize) -> (Vec<&mut [f32]>, Vec<&mut [f32]>) {
    out.chunks_exact_mut(cols)
        .map(|row| {
            let (forward, rest) = row.split_at_mut(hd);
            (forward, &mut rest[..hd])
        })
        .unzip()
}

/// One direction's forward recurrence on this thread, `steps` long: per step
/// hproj = h_s·W_hhᵀ (`w_hh`), then the gates ([`step_fwd`]); `hproj` is scratch of
/// [items, 3H].
#[allow(clippy::too_many_arguments)]
pub fn recurrence_fwd(
    w_hh: &Operand<'_>,
    reverse: bool,
    offsets: &[usize],
    steps: usize,
    xproj: &[f32],
    bias_hh: &[f32],
    hs: &mut [f32],
    out: &mut [&mut [f32]],
    gates: &mut [f32],
    hproj: &mut [f32],
) {
    let (hd, items) = (bias_hh.len() / 3, offsets.len() - 1);
    let g = Gemm { m: items, n: 3 * hd, k: hd, trans_a: false, trans_b: true, alpha: 1.0, beta: 0.0 };
    for s in 0..steps {
        w_hh.gemm(g, &hs[s * items * hd..(s + 1) * items * hd], None, hproj);
        step_fwd(GruStep::of(s, reverse, hd), offsets, xproj, hproj, bias_hh, hs, out, gates);
    }
}

/// One direction's backward recurrence on this thread: per step, last first, the gates'
/// backward ([`step_bwd`]), then dh += dhproj_s·W_hh (`w_hh`).
#[allow(clippy::too_many_arguments)]
pub fn recurrence_bwd(
    w_hh: &Operand<'_>,
    reverse: bool,
    offsets: &[usize],
    steps: usize,
    gates: &[f32],
    hs: &[f32],
    dout: &[f32],
    out_cols: usize,
    hd: usize,
    dh: &mut [f32],
    dxproj: &mut [f32],
    dhproj: &mut [f32],
) {
    let items = offsets.len() - 1;
    let g = Gemm { m: items, n: hd, k: 3 * hd, trans_a: false, trans_b: false, alpha: 1.0, beta: 1.0 };
    for s in (0..steps).rev() {
        step_bwd(GruStep::of(s, reverse, hd), offsets, gates, hs, dout, out_cols, dh, dxproj, dhproj);
        w_hh.gemm(g, &dhproj[s * items * 3 * hd..(s + 1) * items * 3 * hd], None, dh);
    }
}

#[cfg(test)]
mod tests {
    use super::sigmoid_fast;

    #[test]
    fn sigmoid_fast_matches_f64_sigmoid() {
        for i in -40_000..=40_000 {
            let x = i as f32 * 1e-3;
            let want = 1.0 / (1.0 + (-(x as f64)).exp());
            let err = (sigmoid_fast(x) as f64 - want).abs();
            assert!(err < 1e-6, "x = {x}: error {err}");
        }
        assert!((0.0..=1.0).contains(&sigmoid_fast(1e30)) && (0.0..=1.0).contains(&sigmoid_fast(-1e30)));
    }
}
