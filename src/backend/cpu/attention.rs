//! Multi-head self-attention on packed variable-length sequences, forward and backward.
//! Layout: qkv [tokens, 3d] = (q | k | v), head h owns columns h·dh..(h+1)·dh of each part.
//! Every key of an item is valid (packing removed the padding), so no mask is needed.
//! Saved for backward: the softmax probabilities, per item then head, len × len.
//! Parallel over items (each owns disjoint rows of every output); within an item, each
//! head's four products are small GEMMs read in place from the qkv rows via strides.

use rayon::prelude::*;

use super::dispatch::{self, CpuPath};
use super::elementwise::{exp_shifted, sum2};
use super::gemm::{Strided, gemm_strided};
#[cfg(target_arch = "x86_64")]
use super::pack::transpose_lines_avx;
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
    // The avx512 path's heads are small enough (`direct_fits`) for `head_forward_avx512`; the
    // amx path's fp32 is avx512's.
    let direct = matches!(kernels.path(), CpuPath::Avx512 | CpuPath::Amx);
    outs.into_par_iter().zip(ps).enumerate().for_each(|(b, (out, p))| {
        let (s, len) = (offsets[b], offsets[b + 1] - offsets[b]);
        let x = &qkv[s * 3 * d..(s + len) * 3 * d];
        #[cfg(target_arch = "x86_64")]
        if direct && direct_fits(len, dh) {
            let mut kt = [0f32; DIRECT_DH * DIRECT_LEN];
            for h in 0..heads {
                let p = &mut p[h * len * len..(h + 1) * len * len];
                // SAFETY: the path has AVX-512 F (`direct`); the head's q, k and v columns of
                // rows 0..len lie in x (row stride 3d); out's head block is rows 0..len,
                // columns h·dh.. (+dh) of its d-wide rows.
                unsafe {
                    let (q, k, v) = (x[h * dh..].as_ptr(), x[d + h * dh..].as_ptr(), x[2 * d + h * dh..].as_ptr());
                    head_forward_avx512(
                        Head { q, k, v, row: 3 * d, len, dh },
                        scale,
                        &mut kt,
                        p,
                        out[h * dh..].as_mut_ptr(),
                        d,
                    );
                }
            }
            return;
        }
        let _ = direct;
        for h in 0..heads {
            let p = &mut p[h * len * len..(h + 1) * len * len];
            // SAFETY: q, k, v address rows 0..len, columns 0..dh of their part of x (row
            // stride 3d); p is len×len; out's head block is rows 0..len, columns h·dh.. (+dh).
            unsafe {
                let (q, k, v) = (x[h * dh..].as_ptr(), x[d + h * dh..].as_ptr(), x[2 * d + h * dh..].as_ptr());
                head_forward_gemm(
                    kernels,
                    Head { q, k, v, row: 3 * d, len, dh },
                    scale,
                    p,
                    out[h * dh..].as_mut_ptr(),
                    d,
                );
            }
        }
    });
    (out, probs)
}

/// One head of one item: its q, k and v columns (`dh` wide) of `len` rows, `row` apart.
#[derive(Clone, Copy)]
struct Head {
    q: *const f32,
    k: *const f32,
    v: *const f32,
    row: usize,
    len: usize,
    dh: usize,
}

/// One head's forward as two GEMMs: S = scale · Q Kᵀ into `p` (len × len), its softmax in
/// place, O = P V into `out` (rows `out_row` apart).
///
/// # Safety
/// `hd`'s pointers address its len × dh blocks; `out` holds len rows of dh.
unsafe fn head_forward_gemm(
    kernels: dispatch::Kernels,
    hd: Head,
    scale: f32,
    p: &mut [f32],
    out: *mut f32,
    out_row: usize,
) {
    let Head { q, k, v, row, len, dh } = hd;
    // SAFETY: as the caller guarantees.
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
            Strided::rows(row),
            k,
            Strided::transposed(row),
            0.0,
            p.as_mut_ptr(),
            Strided::rows(len),
        );
    }
    softmax_rows(p, len);
    // SAFETY: as the caller guarantees.
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
            Strided::rows(row),
            0.0,
            out,
            Strided::rows(out_row),
        );
    }
}

/// The longest item and widest head [`head_forward_avx512`] takes (`small`: 36 and 64;
/// `paper`: up to 64 and 128).
#[cfg(target_arch = "x86_64")]
const DIRECT_LEN: usize = 64;
#[cfg(target_arch = "x86_64")]
const DIRECT_DH: usize = 128;

#[cfg(target_arch = "x86_64")]
fn direct_fits(len: usize, dh: usize) -> bool {
    len <= DIRECT_LEN && dh <= DIRECT_DH
}

/// [`head_forward_gemm`] without the GEMM's packing, on AVX-512. For a 36 × 64 head the
/// GEMM packed Q, Kᵀ, P and V into slivers for products of 36 × 36 × 64, and padded Kᵀ's 36
/// columns to 64. Here K is transposed once into `kt` (16-wide column vectors, held in L1
/// through the head), Q and P are broadcast from where they lie and
/// V's rows are read in place. Each element is the GEMM micro-kernel's chain of FMAs in the same
/// order, scaled the same way, so the result is the GEMM route's, bit for bit (tested).
///
/// # Safety
/// As [`head_forward_gemm`]'s, and the CPU has AVX-512 F; `direct_fits(len, dh)`; `kt` holds
/// `DIRECT_DH * DIRECT_LEN` values (scratch: the lanes past len are computed, never stored).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn head_forward_avx512(hd: Head, scale: f32, kt: &mut [f32], p: &mut [f32], out: *mut f32, out_row: usize) {
    let Head { k, row, len, dh, .. } = hd;
    let vectors = len.div_ceil(16);
    let stride = 16 * vectors;
    // Kᵀ: whole groups of 8 keys by 8 × 8 AVX transposes, the rest one by one (element by
    // element, the transpose was a quarter of this function's time).
    let len8 = len / 8 * 8;
    assert!(kt.len() >= dh * stride);
    // SAFETY: keys 0..len8, columns 0..dh of k are the caller's block; kt holds dh rows of
    // stride ≥ len8.
    unsafe { transpose_lines_avx(kt.as_mut_ptr(), stride, k, row as isize, dh, len8) };
    for j in len8..len {
        // SAFETY: row j, columns 0..dh of k (the caller's block).
        let key = unsafe { std::slice::from_raw_parts(k.add(j * row), dh) };
        for (e, &x) in key.iter().enumerate() {
            kt[e * stride + j] = x;
        }
    }
    // SAFETY: as the caller guarantees; `vectors` ≤ 4 (len ≤ 64).
    unsafe {
        match vectors {
            1 => scores_avx512::<1>(hd, scale, kt, p),
            2 => scores_avx512::<2>(hd, scale, kt, p),
            3 => scores_avx512::<3>(hd, scale, kt, p),
            _ => scores_avx512::<4>(hd, scale, kt, p),
        }
    }
    softmax_rows(p, len);
    // Output columns 64 at a time (4 row-blocks × 4 vectors: 16 accumulators).
    for c0 in (0..dh).step_by(64) {
        let cols = (dh - c0).min(64);
        // SAFETY: columns c0.. (+ cols) of v's rows and of out's rows, inside the caller's blocks.
        unsafe {
            match cols.div_ceil(16) {
                1 => context_avx512::<1>(hd, p, c0, cols, out, out_row),
                2 => context_avx512::<2>(hd, p, c0, cols, out, out_row),
                3 => context_avx512::<3>(hd, p, c0, cols, out, out_row),
                _ => context_avx512::<4>(hd, p, c0, cols, out, out_row),
            }
        }
    }
}

/// The mask of the first `n` (≤ 16) lanes.
#[cfg(target_arch = "x86_64")]
fn lanes(n: usize) -> u16 {
    ((1u32 << n.min(16)) - 1) as u16
}

/// S = scale · Q Kᵀ, 4 rows at a time, each row `V` vectors of 16 scores: for each step e of
/// dh, Kᵀ's row e (V loads) times each row's q[e] (a broadcast), as the GEMM's micro-kernel.
///
/// # Safety
/// As [`head_forward_avx512`]'s, with `V` = len.div_ceil(16) and `kt` holding Kᵀ at stride 16·V.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn scores_avx512<const V: usize>(hd: Head, scale: f32, kt: &[f32], p: &mut [f32]) {
    use std::arch::x86_64::*;
    let Head { q, row, len, dh, .. } = hd;
    let masks: [u16; V] = std::array::from_fn(|c| lanes(len.saturating_sub(16 * c)));
    for i0 in (0..len).step_by(4) {
        let rows = (len - i0).min(4);
        // Past the item's last row, its last row again (computed, not stored): no branch inside.
        let qr: [*const f32; 4] = std::array::from_fn(|r| unsafe { q.add((i0 + r.min(rows - 1)) * row) });
        // SAFETY (all below): kt's rows e < dh hold 16·V values; q's rows < len hold dh;
        // p's rows i0 + r < len hold len values, and the masks keep the stores inside them.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); V]; 4];
            for e in 0..dh {
                let b: [__m512; V] = std::array::from_fn(|c| _mm512_loadu_ps(kt.as_ptr().add(e * 16 * V + 16 * c)));
                for (acc, &qr) in acc.iter_mut().zip(&qr) {
                    let a = _mm512_set1_ps(*qr.add(e));
                    for (acc, &b) in acc.iter_mut().zip(&b) {
                        *acc = _mm512_fmadd_ps(a, b, *acc);
                    }
                }
            }
            let va = _mm512_set1_ps(scale);
            for (r, acc) in acc.iter().enumerate().take(rows) {
                let to = p.as_mut_ptr().add((i0 + r) * len);
                for (c, (&acc, &mask)) in acc.iter().zip(&masks).enumerate() {
                    _mm512_mask_storeu_ps(to.add(16 * c), mask, _mm512_mul_ps(va, acc));
                }
            }
        }
    }
}

/// O[:, c0 .. c0 + cols] = P V[:, c0 ..], 4 rows at a time, `V` vectors of 16 columns: for each
/// key j, V's row j (V masked loads, read in place) times each row's p[j] (a broadcast).
///
/// # Safety
/// As [`head_forward_avx512`]'s, with cols ≤ 16·V and c0 + cols ≤ dh.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn context_avx512<const V: usize>(hd: Head, p: &[f32], c0: usize, cols: usize, out: *mut f32, out_row: usize) {
    use std::arch::x86_64::*;
    let Head { v, row, len, .. } = hd;
    let masks: [u16; V] = std::array::from_fn(|c| lanes(cols.saturating_sub(16 * c)));
    for i0 in (0..len).step_by(4) {
        let rows = (len - i0).min(4);
        let pr: [&[f32]; 4] = std::array::from_fn(|r| &p[(i0 + r.min(rows - 1)) * len..][..len]);
        // SAFETY (all below): v's rows j < len hold columns c0 .. c0 + cols, the masks keep the
        // loads and stores to those; out's rows i0 + r < len.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); V]; 4];
            for j in 0..len {
                let from = v.add(j * row + c0);
                let b: [__m512; V] = std::array::from_fn(|c| _mm512_maskz_loadu_ps(masks[c], from.add(16 * c)));
                for (acc, pr) in acc.iter_mut().zip(&pr) {
                    let a = _mm512_set1_ps(pr[j]);
                    for (acc, &b) in acc.iter_mut().zip(&b) {
                        *acc = _mm512_fmadd_ps(a, b, *acc);
                    }
                }
            }
            let one = _mm512_set1_ps(1.0);
            for (r, acc) in acc.iter().enumerate().take(rows) {
                let to = out.add((i0 + r) * out_row + c0);
                for (c, (&acc, &mask)) in acc.iter().zip(&masks).enumerate() {
                    // alpha = 1 as the GEMM applies it (exact).
                    _mm512_mask_storeu_ps(to.add(16 * c), mask, _mm512_mul_ps(one, acc));
                }
            }
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The avx512 head forward is the GEMM route's, bit for bit (probabilities and context),
    /// for lengths 1 to 64 and head widths 1 to 128 (multiples of 16 and not), its head's
    /// columns in the middle of rows wider than the head, on values that make every lane
    /// differ; the columns of `out` beside the head are left as they were.
    #[test]
    fn direct_head_forward_is_the_gemm_route_bitwise() {
        #[cfg(target_arch = "x86_64")]
        {
            let Ok(kernels) = CpuPath::Avx512.kernels() else {
                eprintln!("not run: head_forward_avx512 (this CPU lacks the avx512 path)");
                return;
            };
            let mut rng = crate::rng::Rng::new(91);
            let mut kt = [0f32; DIRECT_DH * DIRECT_LEN];
            let mut shapes =
                vec![(1, 1), (36, 64), (64, 128), (24, 64), (17, 16), (33, 100), (5, 128), (64, 1), (48, 63)];
            shapes.extend((0..20).map(|_| (1 + rng.below(64), 1 + rng.below(128))));
            for (len, dh) in shapes {
                // Rows of 3 heads' width (q | k | v of this head among others), out rows wider too.
                let row = 3 * dh + 5;
                let x: Vec<f32> = (0..len * row).map(|_| rng.normal() as f32).collect();
                let out_row = dh + 3;
                let (q, k, v) = (x[1..].as_ptr(), x[1 + dh..].as_ptr(), x[1 + 2 * dh..].as_ptr());
                let hd = Head { q, k, v, row, len, dh };
                let scale = 1.0 / (dh as f32).sqrt();
                let (mut p_gemm, mut p_direct) = (vec![f32::NAN; len * len], vec![f32::NAN; len * len]);
                let (mut o_gemm, mut o_direct) = (vec![-7.0f32; len * out_row], vec![-7.0f32; len * out_row]);
                // Whatever lies past the keys in the transposed block is never stored.
                kt.fill(f32::NAN);
                // SAFETY: hd's blocks lie in x, the outputs hold len rows of out_row ≥ dh + 2; the
                // CPU has AVX-512 F (the path's kernels exist).
                unsafe {
                    head_forward_gemm(kernels, hd, scale, &mut p_gemm, o_gemm[2..].as_mut_ptr(), out_row);
                    head_forward_avx512(hd, scale, &mut kt, &mut p_direct, o_direct[2..].as_mut_ptr(), out_row);
                }
                let differs = |a: &[f32], b: &[f32]| a.iter().zip(b).position(|(x, y)| x.to_bits() != y.to_bits());
                assert_eq!(differs(&p_gemm, &p_direct), None, "probabilities, len {len}, dh {dh}");
                assert_eq!(differs(&o_gemm, &o_direct), None, "context, len {len}, dh {dh}");
                assert!(
                    o_direct.chunks(out_row).all(|r| r[..2] == [-7.0; 2] && r[dh + 2..] == [-7.0]),
                    "len {len}, dh {dh}"
                );
            }
        }
    }
}
