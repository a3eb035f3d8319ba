//! Multi-head self-attention on packed variable-length sequences, forward and backward.
//! Layout: qkv [tokens, 3d] = (q | k | v), head h owns columns h·dh..(h+1)·dh of each part.
//! Every key of an item is valid (packing removed the padding), so no mask is needed.
//! Saved for backward: the softmax probabilities, per item then head, len × len.
//! Parallel over items (each owns disjoint rows of every output); within an item, each
//! head's four products are small GEMMs read in place from the qkv rows via strides.

use rayon::prelude::*;

use super::dispatch;
use super::elementwise::{exp_shifted, sum2};
use super::gemm::{Strided, gemm_strided};
use super::simd;
use crate::backend::{Precision, prob_offsets};

/// Split `buf` into consecutive chunks of `unit × (ends[i+1] - ends[i])` elements.
fn split_by<'a, T>(mut buf: &'a mut [T], ends: &[usize], unit: usize) -> Vec<&'a mut [T]> {
    let mut parts = Vec::with_capacity(ends.len() - 1);
    for w in ends.windows(2) {
        let (head, tail) = buf.split_at_mut((w[1] - w[0]) * unit);
        parts.push(head);
        buf = tail;
    }
    parts
}

/// Each row of `p` (length `len`) replaced by its softmax (`exp_shifted`), compiled for the
/// path.
fn softmax_rows(p: &mut [f32], len: usize) {
    simd::vectorised!(softmax_rows_inline(p, len))
}

/// [`softmax_rows`]' loop, always inlined into the function `vectorised!` compiles for the
/// path: written as the closure's body it stayed out of line, the same closure for avx2 and
/// avx512 merged into one compiled for the baseline (SSE2, a libm `floorf` per exponential:
/// half the forward's time on Zen 3, session 14).
#[inline(always)]
fn softmax_rows_inline(p: &mut [f32], len: usize) {
    for row in p.chunks_exact_mut(len) {
        let (_, sum) = exp_shifted(row);
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|v| *v *= inv);
    }
}

/// dS = P ⊙ (dP − rowsum(P ⊙ dP)) · scale, in place of dP (`ds`), each row's sum in eight
/// partial sums; always inlined, as [`softmax_rows_inline`] is and for the same reason.
#[inline(always)]
fn softmax_bwd_rows_inline(ds: &mut [f32], p: &[f32], len: usize, scale: f32) {
    for (dsr, pr) in ds.chunks_exact_mut(len).zip(p.chunks_exact(len)) {
        let dot = sum2(dsr, pr, |a, b| a * b);
        for (g, &pij) in dsr.iter_mut().zip(pr) {
            *g = pij * (*g - dot) * scale;
        }
    }
}

pub fn forward(qkv: &[f32], offsets: &[usize], heads: usize) -> (Vec<f32>, Vec<f32>) {
    let kernels = dispatch::current();
    let tokens = offsets[offsets.len() - 1];
    let d = qkv.len() / tokens.max(1) / 3;
    let dh = d / heads;
    let scale = 1.0 / (dh as f32).sqrt();
    let poff = prob_offsets(offsets, heads);
    let mut out = crate::tensor::host_pool::dirty(tokens * d); // every element is written
    let mut probs = crate::tensor::host_pool::dirty(poff[poff.len() - 1]); // every element is written
    let outs = split_by(&mut out, offsets, d);
    let ps = split_by(&mut probs, &poff, 1);
    let row3 = Strided::rows(3 * d);
    outs.into_par_iter().zip(ps).enumerate().for_each(|(b, (out, p))| {
        let (s, len) = (offsets[b], offsets[b + 1] - offsets[b]);
        let x = &qkv[s * 3 * d..(s + len) * 3 * d];
        for h in 0..heads {
            let p = &mut p[h * len * len..(h + 1) * len * len];
            let (q, k, v) = (x[h * dh..].as_ptr(), x[d + h * dh..].as_ptr(), x[2 * d + h * dh..].as_ptr());
            // SAFETY: q, k, v address rows 0..len, columns 0..dh of their part of x (row
            // stride 3d); p is len×len; out's head block is rows 0..len, columns h·dh.. (+dh).
            unsafe {
                // S = scale · Q Kᵀ
                gemm_strided(
                    kernels,
                    Precision::F32,
                    len,
                    dh,
                    len,
                    scale,
                    q,
                    row3,
                    k,
                    Strided::transposed(3 * d),
                    0.0,
                    p.as_mut_ptr(),
                    Strided::rows(len),
                );
            }
            softmax_rows(p, len);
            unsafe {
                // O = P V
                gemm_strided(
                    kernels,
                    Precision::F32,
                    len,
                    len,
                    dh,
                    1.0,
                    p.as_ptr(),
                    Strided::rows(len),
                    v,
                    row3,
                    0.0,
                    out[h * dh..].as_mut_ptr(),
                    Strided::rows(d),
                );
            }
        }
    });
    (out, probs)
}

pub fn backward(qkv: &[f32], probs: &[f32], offsets: &[usize], heads: usize, dout: &[f32]) -> Vec<f32> {
    let kernels = dispatch::current();
    let tokens = offsets[offsets.len() - 1];
    let d = qkv.len() / tokens.max(1) / 3;
    let dh = d / heads;
    let scale = 1.0 / (dh as f32).sqrt();
    let poff = prob_offsets(offsets, heads);
    let mut dqkv = crate::tensor::host_pool::dirty(qkv.len()); // every element is written
    let parts = split_by(&mut dqkv, offsets, 3 * d);
    let row3 = Strided::rows(3 * d);
    parts.into_par_iter().enumerate().for_each(|(b, dx)| {
        let (s, len) = (offsets[b], offsets[b + 1] - offsets[b]);
        let x = &qkv[s * 3 * d..(s + len) * 3 * d];
        let dout = &dout[s * d..(s + len) * d];
        let mut ds = crate::tensor::host_pool::zeroed(len * len);
        for h in 0..heads {
            let p = &probs[poff[b] + h * len * len..poff[b] + (h + 1) * len * len];
            let (q, k, v) = (x[h * dh..].as_ptr(), x[d + h * dh..].as_ptr(), x[2 * d + h * dh..].as_ptr());
            let d_o = dout[h * dh..].as_ptr();
            let (dq, dk, dv) = (h * dh, d + h * dh, 2 * d + h * dh);
            // SAFETY: as in forward; dq/dk/dv address disjoint column blocks of dx.
            unsafe {
                // dV = Pᵀ dO
                gemm_strided(
                    kernels,
                    Precision::F32,
                    len,
                    len,
                    dh,
                    1.0,
                    p.as_ptr(),
                    Strided::transposed(len),
                    d_o,
                    Strided::rows(d),
                    0.0,
                    dx[dv..].as_mut_ptr(),
                    row3,
                );
                // dP = dO Vᵀ
                gemm_strided(
                    kernels,
                    Precision::F32,
                    len,
                    dh,
                    len,
                    1.0,
                    d_o,
                    Strided::rows(d),
                    v,
                    Strided::transposed(3 * d),
                    0.0,
                    ds.as_mut_ptr(),
                    Strided::rows(len),
                );
            }
            simd::vectorised!(softmax_bwd_rows_inline(&mut ds, p, len, scale));
            unsafe {
                // dQ = dS K ; dK = dSᵀ Q
                gemm_strided(
                    kernels,
                    Precision::F32,
                    len,
                    len,
                    dh,
                    1.0,
                    ds.as_ptr(),
                    Strided::rows(len),
                    k,
                    row3,
                    0.0,
                    dx[dq..].as_mut_ptr(),
                    row3,
                );
                gemm_strided(
                    kernels,
                    Precision::F32,
                    len,
                    len,
                    dh,
                    1.0,
                    ds.as_ptr(),
                    Strided::transposed(len),
                    q,
                    row3,
                    0.0,
                    dx[dk..].as_mut_ptr(),
                    row3,
                );
            }
        }
    });
    dqkv
}
