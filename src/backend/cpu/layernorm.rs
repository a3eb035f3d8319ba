//! LayerNorm over the last dimension, forward and backward.
//! Saved for backward: (mean, rstd) per row, so x is normalised once and never re-reduced.
//! Row reductions use eight independent accumulators (`elementwise::sum2`).

use rayon::prelude::*;

use super::elementwise::{DropoutRule, sum2};
use super::simd;
use crate::tensor::{DType, HostBuf};

const PAR_ROWS: usize = 64;
/// y = LN(x) stored as `store` (bf16: each value rounded once), and (mean, rstd) per row.
pub fn forward(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32, store: DType) -> (HostBuf, HostBuf) {
    let d = gamma.len();
    let rows = x.len() / d;
    let mut y = crate::tensor::host_pool::dirty(x.len()); // every element is written
    let mut stats = crate::tensor::host_pool::dirty(rows * 2); // every element is written
    let row = |(y, (st, x)): (&mut [f32], (&mut [f32], &[f32]))| {
        simd::vectorised!({
            normalize_row(y, st, x, gamma, beta, eps);
            store.round_all(y);
        })
    };
    if rows >= PAR_ROWS {
        y.par_chunks_mut(d).zip(stats.par_chunks_mut(2).zip(x.par_chunks(d))).for_each(row);
    } else {
        y.chunks_mut(d).zip(stats.chunks_mut(2).zip(x.chunks(d))).for_each(row);
    }
    (y, stats)
}

/// One row of LayerNorm: y, and (mean, rstd) into `st`.
#[inline(always)]
fn normalize_row(y: &mut [f32], st: &mut [f32], x: &[f32], gamma: &[f32], beta: &[f32], eps: f32) {
    let d = gamma.len();
    // Every slice cut to d, so the loop has no bounds checks (with them it ran scalar).
    let (y, x, beta) = (&mut y[..d], &x[..d], &beta[..d]);
    let (mean, rstd) = row_stats(x, eps);
    for i in 0..d {
        y[i] = (x[i] - mean) * rstd * gamma[i] + beta[i];
    }
    st[0] = mean;
    st[1] = rstd;
}

/// [`normalize_row`] in x's memory, without the stats: the same values.
#[inline(always)]
fn normalize_row_in_place(x: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
    let d = gamma.len();
    let (x, beta) = (&mut x[..d], &beta[..d]);
    let (mean, rstd) = row_stats(x, eps);
    for i in 0..d {
        x[i] = (x[i] - mean) * rstd * gamma[i] + beta[i];
    }
}

/// A row's (mean, 1/√(variance + eps)), each sum over eight accumulators.
#[inline(always)]
fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let d = x.len();
    let mean = sum2(x, x, |a, _| a) / d as f32;
    let var = sum2(x, x, |a, _| (a - mean) * (a - mean)) / d as f32;
    (mean, 1.0 / (var + eps).sqrt())
}

/// The post-LN join `a ← x + dropout(a)`, then LayerNorm of a (`Backend::residual_layernorm_fwd`)
/// in one visit of each row: in f32 bit for bit `dropout`, `add_assign` and `forward` in turn,
/// without their two extra passes over the tensor. With `store` bf16, a and y are rounded as
/// they are stored, and the norm is of a as stored (the device's kernel reads it back).
pub fn residual_forward(
    a: &mut [f32],
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    dropout: Option<DropoutRule>,
    store: DType,
) -> (HostBuf, HostBuf) {
    let d = gamma.len();
    let rows = a.len() / d;
    let mut y = crate::tensor::host_pool::dirty(a.len()); // every element is written
    let mut stats = crate::tensor::host_pool::dirty(rows * 2); // every element is written
    type Row<'a> = (usize, (&'a mut [f32], (&'a mut [f32], (&'a mut [f32], &'a [f32]))));
    let row = |(r, (y, (st, (a, x)))): Row| {
        simd::vectorised!({
            if let Some(rule) = dropout {
                rule.apply(a, (r * d) as u64);
            }
            for (a, x) in a.iter_mut().zip(x) {
                *a += x;
            }
            store.round_all(a);
            normalize_row(y, st, a, gamma, beta, eps);
            store.round_all(y);
        })
    };
    if rows >= PAR_ROWS {
        let parts = stats.par_chunks_mut(2).zip(a.par_chunks_mut(d).zip(x.par_chunks(d)));
        y.par_chunks_mut(d).zip(parts).enumerate().for_each(row);
    } else {
        y.chunks_mut(d).zip(stats.chunks_mut(2).zip(a.chunks_mut(d).zip(x.chunks(d)))).enumerate().for_each(row);
    }
    (y, stats)
}

/// [`residual_forward`] at inference, in a's memory: `a ← LN(x + a)`, no dropout, no stats
/// and no second tensor (the backward that reads them never comes). The values of
/// `residual_forward`'s y, bit for bit.
pub fn residual_in_place(a: &mut [f32], x: &[f32], gamma: &[f32], beta: &[f32], eps: f32, store: DType) {
    let d = gamma.len();
    let row = |(a, x): (&mut [f32], &[f32])| {
        simd::vectorised!({
            for (a, x) in a.iter_mut().zip(x) {
                *a += x;
            }
            store.round_all(a);
            normalize_row_in_place(a, gamma, beta, eps);
            store.round_all(a);
        })
    };
    if a.len() / d >= PAR_ROWS {
        a.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(row);
    } else {
        a.chunks_mut(d).zip(x.chunks(d)).for_each(row);
    }
}

/// [`residual_in_place`] on bf16 tensors in 2 bytes: each row widened into a buffer on the
/// stack (d ≤ 1024; a wider row through a heap buffer), joined and normalised as there, and
/// narrowed back into a. The same bits as `residual_in_place` on the widened values at bf16.
pub fn residual_in_place_bf16(a: &mut [u16], x: &[u16], gamma: &[f32], beta: &[f32], eps: f32) {
    let d = gamma.len();
    let row = |(a, x): (&mut [u16], &[u16])| {
        let mut stack = [0f32; 1024];
        let mut heap = Vec::new();
        let wide = if d <= stack.len() {
            &mut stack[..d]
        } else {
            heap.resize(d, 0.0);
            &mut heap[..]
        };
        simd::vectorised!({
            for ((w, &a), &x) in wide.iter_mut().zip(a.iter()).zip(x) {
                *w = f32::from_bits((a as u32) << 16) + f32::from_bits((x as u32) << 16);
            }
            DType::Bf16.round_all(wide);
            normalize_row_in_place(wide, gamma, beta, eps);
            for (a, &w) in a.iter_mut().zip(wide.iter()) {
                *a = crate::tensor::bf16_bits(w);
            }
        })
    };
    if a.len() / d >= PAR_ROWS {
        a.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(row);
    } else {
        a.chunks_mut(d).zip(x.chunks(d)).for_each(row);
    }
}

/// Backward of [`residual_forward`] from its saved sum s: (dx, da), LayerNorm's gradient and
/// that gradient through the dropout mask, in one visit of each row; dgamma and dbeta
/// accumulated as in [`backward`].
#[allow(clippy::too_many_arguments)]
pub fn residual_backward(
    s: &[f32],
    stats: &[f32],
    gamma: &[f32],
    dy: &[f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
    dropout: Option<DropoutRule>,
    store: DType,
) -> (HostBuf, HostBuf) {
    let d = gamma.len();
    let rows = s.len() / d;
    let mut dx = crate::tensor::host_pool::dirty(s.len()); // every element is written
    let mut da = crate::tensor::host_pool::dirty(s.len()); // every element is written
    type Row<'a> = (usize, (&'a mut [f32], (&'a mut [f32], (&'a [f32], (&'a [f32], &'a [f32])))));
    let row = |(r, (dx, (da, (st, (x, dy))))): Row| {
        simd::vectorised!({
            grad_row(dx, st, x, dy, gamma);
            store.round_all(dx);
            da.copy_from_slice(dx);
            if let Some(rule) = dropout {
                rule.apply(da, (r * d) as u64);
            }
            store.round_all(da);
        })
    };
    if rows >= PAR_ROWS {
        let inputs = stats.par_chunks(2).zip(s.par_chunks(d).zip(dy.par_chunks(d)));
        dx.par_chunks_mut(d).zip(da.par_chunks_mut(d).zip(inputs)).enumerate().for_each(row);
    } else {
        let inputs = stats.chunks(2).zip(s.chunks(d).zip(dy.chunks(d)));
        dx.chunks_mut(d).zip(da.chunks_mut(d).zip(inputs)).enumerate().for_each(row);
    }
    accumulate_affine(s, stats, dy, dgamma, dbeta);
    (dx, da)
}

/// One row of LayerNorm's input gradient from the saved (mean, rstd).
#[inline(always)]
fn grad_row(dx: &mut [f32], st: &[f32], x: &[f32], dy: &[f32], gamma: &[f32]) {
    let d = gamma.len();
    // Every slice cut to d, so the loops have no bounds checks (with them they ran scalar).
    let (dx, x, dy) = (&mut dx[..d], &x[..d], &dy[..d]);
    let (mean, rstd) = (st[0], st[1]);
    // g = dy ⊙ γ; dx = rstd · (g − mean(g) − x̂ · mean(g ⊙ x̂))
    for i in 0..d {
        dx[i] = dy[i] * gamma[i];
    }
    let mg = sum2(dx, dx, |g, _| g) / d as f32;
    let mgx = sum2(dx, x, |g, v| g * (v - mean)) * rstd / d as f32;
    for i in 0..d {
        let xhat = (x[i] - mean) * rstd;
        dx[i] = rstd * (dx[i] - mg - xhat * mgx);
    }
}

/// dgamma += Σ_r dy ⊙ x̂, dbeta += Σ_r dy, row after row (one order on every path).
fn accumulate_affine(x: &[f32], stats: &[f32], dy: &[f32], dgamma: &mut [f32], dbeta: &mut [f32]) {
    let d = dgamma.len();
    simd::vectorised!({
        for r in 0..x.len() / d {
            let (mean, rstd) = (stats[2 * r], stats[2 * r + 1]);
            affine_row(dgamma, dbeta, &x[r * d..(r + 1) * d], &dy[r * d..(r + 1) * d], mean, rstd);
        }
    });
}

/// One row's terms of [`accumulate_affine`]. A function of its own (inlined) so that its
/// slices are distinct references to LLVM (`noalias`), as `gru::gates_fwd_row`'s are: the
/// join's backward took 4–5 % less time (`cpu_profile`, Zen 4, binaries alternated).
#[inline(always)]
fn affine_row(dgamma: &mut [f32], dbeta: &mut [f32], x: &[f32], dy: &[f32], mean: f32, rstd: f32) {
    let (dbeta, x, dy) = (&mut dbeta[..dgamma.len()], &x[..dgamma.len()], &dy[..dgamma.len()]);
    for i in 0..dgamma.len() {
        dgamma[i] += dy[i] * (x[i] - mean) * rstd;
        dbeta[i] += dy[i];
    }
}

/// dx stored as `store`; dgamma += Σ dy·x̂, dbeta += Σ dy.
pub fn backward(
    x: &[f32],
    stats: &[f32],
    gamma: &[f32],
    dy: &[f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
    store: DType,
) -> HostBuf {
    let d = gamma.len();
    let rows = x.len() / d;
    let mut dx = crate::tensor::host_pool::dirty(x.len()); // every element is written
    type Row<'a> = (&'a mut [f32], (&'a [f32], (&'a [f32], &'a [f32])));
    let row = |(dx, (st, (x, dy))): Row| {
        simd::vectorised!({
            grad_row(dx, st, x, dy, gamma);
            store.round_all(dx);
        })
    };
    if rows >= PAR_ROWS {
        dx.par_chunks_mut(d).zip(stats.par_chunks(2).zip(x.par_chunks(d).zip(dy.par_chunks(d)))).for_each(row);
    } else {
        dx.chunks_mut(d).zip(stats.chunks(2).zip(x.chunks(d).zip(dy.chunks(d)))).for_each(row);
    }
    accumulate_affine(x, stats, dy, dgamma, dbeta);
    dx
}
