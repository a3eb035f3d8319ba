//! Multi-head self-attention on packed variable-length sequences, forward and backward.
//! Layout: qkv [tokens, 3d] = (q | k | v), head h owns columns h·dh..(h+1)·dh of each part.
//! Every key of an item is valid (packing removed the padding), so no mask is needed.
//! Saved for backward: the softmax probabilities, per item then head, len × len.
//! Parallel over items (each owns disjoint rows of every output); within an item, each
//! head's four products are small GEMMs read in place from the qkv rows via strides (on the
//! avx512 path, for items up to 64 long, products of its own without the GEMM's packing and
//! the softmax in registers).

use rayon::prelude::*;

use crate::tensor::HostBuf;

use super::dispatch::{self, CpuPath};
#[cfg(target_arch = "x86_64")]
use super::elementwise::exp_fast_avx512;
use super::elementwise::{exp_shifted, store_as, sum2};
use super::gemm::{Strided, gemm_strided};
#[cfg(target_arch = "x86_64")]
use super::pack::transpose_lines_avx;
use super::simd;
#[cfg(target_arch = "x86_64")]
use super::store::round_bf16_avx512;
use crate::backend::{Precision, prob_offsets};
use crate::tensor::{DType, Tensor, View};

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

/// The probabilities P V multiplies: each row's softmax, stored as `store` stores them (bf16:
/// rounded here, before the product, so that the context is the stored probabilities times V,
/// as the backward differentiates it and as the GPU's tensor-core kernel multiplies them).
fn probabilities(p: &mut [f32], len: usize, store: DType) {
    softmax_rows(p, len);
    store_as(store, p);
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

/// dS from dP in place (`softmax_bwd_rows_inline`), stored as `store` stores it: bf16 rounds
/// it before dQ = dS K and dK = dSᵀ Q, as the GPU's tensor cores multiply it.
fn score_gradients(ds: &mut [f32], p: &[f32], len: usize, (scale, store): (f32, DType)) {
    simd::vectorised!(softmax_bwd_rows_inline(ds, p, len, scale));
    store_as(store, ds);
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

/// Context `[tokens, d]` and probabilities (per item and head, `len × len`) of values stored
/// as `store`; with bf16 the probabilities are rounded before P V (`probabilities`). A bf16
/// qkv in 2 bytes is widened an item at a time, while the item's rows are in cache.
pub fn forward(qkv: View, offsets: &[usize], heads: usize, store: DType) -> (HostBuf, HostBuf) {
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
        with_scratch(|scratch| {
            let x = scratch.item_qkv(qkv, offsets, b, d);
            item_forward(kernels, x, (offsets[b + 1] - offsets[b], d, heads), (scale, store), direct, out, p);
        });
    });
    (out, probs)
}

/// [`forward`]'s context alone, at inference, stored as `store`: no probabilities kept (the
/// backward that reads them never comes; each item's stay in a buffer in cache), and a bf16
/// context narrowed an item at a time. The same bits as `forward`'s context as stored.
pub fn infer(qkv: View, offsets: &[usize], heads: usize, store: DType) -> Tensor {
    let kernels = dispatch::current();
    let tokens = offsets[offsets.len() - 1];
    let d = qkv.len() / tokens.max(1) / 3;
    let scale = 1.0 / ((d / heads) as f32).sqrt();
    let direct = matches!(kernels.path(), CpuPath::Avx512 | CpuPath::Amx);
    let mut out = Tensor::cpu_dirty(&[tokens, d], store); // every element is written
    // Item b's context into `context` (len × d).
    let item = |b: usize, scratch: &mut Scratch, context: &mut [f32]| {
        let len = offsets[b + 1] - offsets[b];
        let mut p = std::mem::take(&mut scratch.probs);
        p.resize(heads * len * len, 0.0);
        let x = scratch.item_qkv(qkv, offsets, b, d);
        item_forward(kernels, x, (len, d, heads), (scale, store), direct, context, &mut p);
        scratch.probs = p;
    };
    if store == DType::Bf16 {
        let outs = split_by(out.cpu_bf16_mut(), offsets, d);
        outs.into_par_iter().enumerate().for_each(|(b, bits)| {
            with_scratch(|scratch| {
                let mut context = std::mem::take(&mut scratch.context);
                context.resize(bits.len(), 0.0);
                item(b, scratch, &mut context);
                super::elementwise::narrow_run(&context, bits);
                scratch.context = context;
            });
        });
    } else {
        let outs = split_by(out.cpu_mut(), offsets, d);
        outs.into_par_iter().enumerate().for_each(|(b, context)| with_scratch(|s| item(b, s, context)));
    }
    out
}

/// A thread's buffers for one item at a time ([`forward`], [`infer`]): reused, so they are
/// written to memory already in cache.
#[derive(Default)]
struct Scratch {
    /// The item's qkv rows widened from 2-byte bf16.
    qkv: Vec<f32>,
    /// Its probabilities ([`infer`]).
    probs: Vec<f32>,
    /// Its bf16 context before it is narrowed ([`infer`]).
    context: Vec<f32>,
}

impl Scratch {
    /// Item b's qkv rows (len × 3d) as f32: a bf16 qkv in 2 bytes widened into `self.qkv`
    /// while the item's rows are in cache.
    fn item_qkv<'a>(&'a mut self, qkv: View<'a>, offsets: &[usize], b: usize, d: usize) -> &'a [f32] {
        let rows = offsets[b] * 3 * d..offsets[b + 1] * 3 * d;
        match qkv {
            View::CpuBf16(bits) => {
                self.qkv.resize(rows.len(), 0.0);
                super::elementwise::widen_run(&bits[rows], &mut self.qkv);
                &self.qkv
            }
            _ => &qkv.cpu()[rows],
        }
    }
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// `f` on this thread's [`Scratch`], or on a fresh one when it is in use: a long item's
/// parallel GEMM may, while it waits, run another item on this thread.
fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => f(&mut scratch),
        Err(_) => f(&mut Scratch::default()),
    })
}

/// One item's heads of [`forward`]: its qkv rows `x` (len × 3d), its context rows `out` and
/// its probabilities `p`.
#[inline(always)]
fn item_forward(
    kernels: dispatch::Kernels,
    x: &[f32],
    (len, d, heads): (usize, usize, usize),
    (scale, store): (f32, DType),
    direct: bool,
    out: &mut [f32],
    p: &mut [f32],
) {
    let dh = d / heads;
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
                    (scale, store),
                    &mut kt,
                    p,
                    out[h * dh..].as_mut_ptr(),
                    d,
                );
            }
        }
        return;
    }
    #[cfg(not(target_arch = "x86_64"))]
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
                (scale, store),
                p,
                out[h * dh..].as_mut_ptr(),
                d,
            );
        }
    }
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
    (scale, store): (f32, DType),
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
    probabilities(p, len, store);
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
/// through the head), Q and P are broadcast from where they lie and V's rows are read in place;
/// each row of S becomes P in the registers the product leaves it in ([`softmax_row_avx512`]).
/// Each element is the GEMM micro-kernel's chain of FMAs in the same order, scaled the same
/// way, and the same softmax, so the result is the GEMM route's, bit for bit (tested).
///
/// # Safety
/// As [`head_forward_gemm`]'s, and the CPU has AVX-512 F; `direct_fits(len, dh)`; `kt` holds
/// `DIRECT_DH * DIRECT_LEN` values (scratch: the lanes past len are computed, never stored).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn head_forward_avx512(
    hd: Head,
    (scale, store): (f32, DType),
    kt: &mut [f32],
    p: &mut [f32],
    out: *mut f32,
    out_row: usize,
) {
    let Head { q, k, v, row, len, dh } = hd;
    // SAFETY (all below): as the caller guarantees.
    unsafe {
        // S = scale · Q Kᵀ
        let stride = transpose_keys(k, row, len, dh, kt);
        // and P = softmax(S) by rows, in registers (`softmax_row_avx512`): every row is one
        // group of at most 64 columns.
        let p_out = p.as_mut_ptr();
        times_avx512(Operand::rows(q, row), kt.as_ptr(), stride, len, dh, len, scale, p_out, len, Some(store));
        // O = P V
        times_avx512(Operand::rows(p.as_ptr(), len), v, row, len, len, dh, 1.0, out, out_row, None);
    }
}

/// [`head_backward_gemm`] as [`head_forward_avx512`] does the forward: V transposed once for
/// dP = dO Vᵀ; dV = Pᵀ dO, dQ = dS K and dK = dSᵀ Q with P and dS broadcast (read down their
/// columns where transposed) and dO, K and Q read in place. Bit for bit the GEMM route (tested).
///
/// # Safety
/// As [`head_backward_gemm`]'s and [`head_forward_avx512`]'s.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn head_backward_avx512(
    hd: Head,
    (scale, store): (f32, DType),
    p: &[f32],
    d_o: *const f32,
    d_row: usize,
    kt: &mut [f32],
    ds: &mut [f32],
    dx: *mut f32,
    dx_row: usize,
    at: [usize; 3],
) {
    let Head { q, k, v, row, len, dh } = hd;
    let [dq, dk, dv] = at;
    // SAFETY (all below): as the caller guarantees.
    unsafe {
        // dV = Pᵀ dO
        let p_t = Operand { at: p.as_ptr(), rs: 1, cs: len };
        times_avx512(p_t, d_o, d_row, len, len, dh, 1.0, dx.add(dv), dx_row, None);
        // dP = dO Vᵀ
        let stride = transpose_keys(v, row, len, dh, kt);
        times_avx512(Operand::rows(d_o, d_row), kt.as_ptr(), stride, len, dh, len, 1.0, ds.as_mut_ptr(), len, None);
    }
    score_gradients(ds, p, len, (scale, store));
    // SAFETY: as the caller guarantees.
    unsafe {
        // dQ = dS K ; dK = dSᵀ Q
        times_avx512(Operand::rows(ds.as_ptr(), len), k, row, len, len, dh, 1.0, dx.add(dq), dx_row, None);
        let ds_t = Operand { at: ds.as_ptr(), rs: 1, cs: len };
        times_avx512(ds_t, q, row, len, len, dh, 1.0, dx.add(dk), dx_row, None);
    }
}

/// Rows 0..len (columns 0..dh, `row` apart) of `keys` transposed into `kt`: element e of key
/// j at `e · stride + j`, stride = 16·len.div_ceil(16) (returned). Whole groups of 8 keys by 8 × 8 AVX transposes, the rest
/// one by one (element by element, the transpose was a quarter of the forward's time).
///
/// # Safety
/// The CPU has AVX; the len × dh block is inside the allocation behind `keys`; len ≤ 64 and
/// kt holds dh rows of 16·len.div_ceil(16).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn transpose_keys(keys: *const f32, row: usize, len: usize, dh: usize, kt: &mut [f32]) -> usize {
    let stride = 16 * len.div_ceil(16);
    let len8 = len / 8 * 8;
    assert!(kt.len() >= dh * stride);
    // SAFETY: keys 0..len8, columns 0..dh are the caller's block; kt holds dh rows of stride.
    unsafe { transpose_lines_avx(kt.as_mut_ptr(), stride, keys, row as isize, dh, len8) };
    for j in len8..len {
        // SAFETY: row j, columns 0..dh (the caller's block).
        let key = unsafe { std::slice::from_raw_parts(keys.add(j * row), dh) };
        for (e, &x) in key.iter().enumerate() {
            kt[e * stride + j] = x;
        }
    }
    stride
}

/// A matrix operand of [`times_avx512`]: element (i, j) at `at + i·rs + j·cs` (a matrix as
/// stored, or transposed).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Operand {
    at: *const f32,
    rs: usize,
    cs: usize,
}

#[cfg(target_arch = "x86_64")]
impl Operand {
    /// A matrix as stored, rows `rs` apart.
    fn rows(at: *const f32, rs: usize) -> Self {
        Operand { at, rs, cs: 1 }
    }
}

/// `out` (m × cols, rows `out_row` apart) = alpha · A B: A m × k as `a` says, B's k rows of
/// `cols` columns `b_row` apart (read in place, or Kᵀ as [`transpose_keys`] left it), 64
/// columns at a time. With `softmax` (cols ≤ 64), each row of the product replaced by its
/// softmax before it is stored, stored as the type says ([`softmax_row_avx512`]).
///
/// # Safety
/// The CPU has AVX-512 F; A's m × k elements, B's k × cols block and out's m × cols block are
/// inside their allocations; cols ≤ 64 with `softmax`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn times_avx512(
    a: Operand,
    b: *const f32,
    b_row: usize,
    m: usize,
    k: usize,
    cols: usize,
    alpha: f32,
    out: *mut f32,
    out_row: usize,
    softmax: Option<DType>,
) {
    debug_assert!(softmax.is_none() || cols <= 64);
    for c0 in (0..cols).step_by(64) {
        let n = (cols - c0).min(64);
        // SAFETY: columns c0.. (+ n) of b's rows and of out's rows, inside the caller's blocks.
        unsafe {
            let (b, out) = (b.add(c0), out.add(c0));
            let to = (out, out_row, softmax);
            match n.div_ceil(16) {
                1 => times::<1>(a, b, b_row, m, k, n, alpha, to),
                2 => times::<2>(a, b, b_row, m, k, n, alpha, to),
                3 => times::<3>(a, b, b_row, m, k, n, alpha, to),
                _ => times::<4>(a, b, b_row, m, k, n, alpha, to),
            }
        }
    }
}

/// One row of `len` ≤ 16·V scores (`x`, lanes past len unused) replaced by its softmax, as
/// [`probabilities`] computes it: the same operations in the same order as `exp_shifted` (its
/// maximum passes over a NaN), `sum2` (eight partial sums over whole chunks of 8, folded left
/// to right, then the remainder's values one by one) and `store_as`, so the same bits
/// (tested). Done in registers as the product leaves them: as a pass over the stored rows it
/// was more of the forward's time than the products (the vectorised loops' 8-lane chunks,
/// scalar remainder and folds, and the reloads of rows just stored under a mask: 37 % of
/// the samples against 29 %, `perf`, one thread, session 32).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn softmax_row_avx512<const V: usize>(x: &mut [std::arch::x86_64::__m512; V], len: usize, store: DType) {
    use std::arch::x86_64::*;
    let none = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut max = none;
    for (c, x) in x.iter().enumerate() {
        // (x > max) ? x : max, lanes past len as −∞.
        max = _mm512_max_ps(_mm512_mask_blend_ps(lanes(len.saturating_sub(16 * c)), none, *x), max);
    }
    let max = _mm512_set1_ps(_mm512_reduce_max_ps(max));
    for x in x.iter_mut() {
        *x = exp_fast_avx512(_mm512_sub_ps(*x, max));
    }
    let half = |chunk: usize| -> __m256 {
        let v = x[chunk / 2];
        if chunk.is_multiple_of(2) {
            _mm512_castps512_ps256(v)
        } else {
            _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)))
        }
    };
    let (chunks, rest) = (len / 8, len % 8);
    let mut partial = _mm256_setzero_ps();
    for chunk in 0..chunks {
        partial = _mm256_add_ps(partial, half(chunk));
    }
    let mut lanes8 = [0f32; 8];
    // SAFETY: lanes8 holds 8 values.
    unsafe { _mm256_storeu_ps(lanes8.as_mut_ptr(), partial) };
    let whole = lanes8.iter().fold(-0.0f32, |s, &v| s + v);
    let mut tail = -0.0f32;
    if rest > 0 {
        // SAFETY: as above.
        unsafe { _mm256_storeu_ps(lanes8.as_mut_ptr(), half(chunks)) };
        tail = lanes8[..rest].iter().fold(tail, |s, &v| s + v);
    }
    let inv = _mm512_set1_ps(1.0 / (whole + tail));
    for x in x.iter_mut() {
        let v = _mm512_mul_ps(*x, inv);
        *x = if store == DType::Bf16 { round_bf16_avx512(v) } else { v };
    }
}

/// The mask of the first `n` (≤ 16) lanes.
#[cfg(target_arch = "x86_64")]
fn lanes(n: usize) -> u16 {
    ((1u32 << n.min(16)) - 1) as u16
}

/// [`times_avx512`] for one group of `cols` ≤ 16·V columns, as the GEMM's micro-kernel: 4 rows
/// at a time, for each step j of k B's row j (V masked loads) times each row's a(i, j) (a
/// broadcast), then alpha times the sum (and with `softmax`, each row's softmax).
///
/// # Safety
/// As [`times_avx512`]'s.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn times<const V: usize>(
    a: Operand,
    b: *const f32,
    b_row: usize,
    m: usize,
    k: usize,
    cols: usize,
    alpha: f32,
    (out, out_row, softmax): (*mut f32, usize, Option<DType>),
) {
    use std::arch::x86_64::*;
    let masks: [u16; V] = std::array::from_fn(|c| lanes(cols.saturating_sub(16 * c)));
    for i0 in (0..m).step_by(4) {
        let rows = (m - i0).min(4);
        // Past the last row, the last row again (computed, not stored): no branch inside.
        let ar: [*const f32; 4] = std::array::from_fn(|r| unsafe { a.at.add((i0 + r.min(rows - 1)) * a.rs) });
        // SAFETY (all below): A's (i, j) for i < m, j < k, B's rows j < k with columns < cols
        // (the masks keep the loads and stores to those), out's rows i0 + r < m.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); V]; 4];
            for j in 0..k {
                let from = b.add(j * b_row);
                let bv: [__m512; V] = std::array::from_fn(|c| _mm512_maskz_loadu_ps(masks[c], from.add(16 * c)));
                for (acc, &ar) in acc.iter_mut().zip(&ar) {
                    let x = _mm512_set1_ps(*ar.add(j * a.cs));
                    for (acc, &bv) in acc.iter_mut().zip(&bv) {
                        *acc = _mm512_fmadd_ps(x, bv, *acc);
                    }
                }
            }
            let va = _mm512_set1_ps(alpha);
            for (r, acc) in acc.iter_mut().enumerate().take(rows) {
                // alpha times the sum, as the GEMM's store applies it.
                acc.iter_mut().for_each(|v| *v = _mm512_mul_ps(va, *v));
                if let Some(store) = softmax {
                    softmax_row_avx512(acc, cols, store);
                }
                let to = out.add((i0 + r) * out_row);
                for (c, (&acc, &mask)) in acc.iter().zip(&masks).enumerate() {
                    _mm512_mask_storeu_ps(to.add(16 * c), mask, acc);
                }
            }
        }
    }
}

/// dqkv `[tokens, 3d]` of values stored as `store`; with bf16, dS is rounded before dQ and dK
/// (`score_gradients`).
pub fn backward(qkv: &[f32], probs: &[f32], offsets: &[usize], heads: usize, dout: &[f32], store: DType) -> HostBuf {
    let kernels = dispatch::current();
    let tokens = offsets[offsets.len() - 1];
    let d = qkv.len() / tokens.max(1) / 3;
    let dh = d / heads;
    let scale = 1.0 / (dh as f32).sqrt();
    let poff = prob_offsets(offsets, heads);
    let mut dqkv = crate::tensor::host_pool::dirty(qkv.len()); // every element is written
    let parts = split_by(&mut dqkv, offsets, 3 * d);
    // As in forward: the avx512 (and amx) path's small heads go without the GEMM's packing.
    let direct = matches!(kernels.path(), CpuPath::Avx512 | CpuPath::Amx);
    parts.into_par_iter().enumerate().for_each(|(b, dx)| {
        let (s, len) = (offsets[b], offsets[b + 1] - offsets[b]);
        let x = &qkv[s * 3 * d..(s + len) * 3 * d];
        let dout = &dout[s * d..(s + len) * d];
        let mut ds = crate::tensor::host_pool::zeroed(len * len);
        #[cfg(target_arch = "x86_64")]
        let mut kt = if direct && direct_fits(len, dh) { Some([0f32; DIRECT_DH * DIRECT_LEN]) } else { None };
        #[cfg(not(target_arch = "x86_64"))]
        let _ = direct;
        for h in 0..heads {
            let p = &probs[poff[b] + h * len * len..poff[b] + (h + 1) * len * len];
            let (q, k, v) = (x[h * dh..].as_ptr(), x[d + h * dh..].as_ptr(), x[2 * d + h * dh..].as_ptr());
            let hd = Head { q, k, v, row: 3 * d, len, dh };
            let d_o = dout[h * dh..].as_ptr();
            let at = [h * dh, d + h * dh, 2 * d + h * dh];
            #[cfg(target_arch = "x86_64")]
            if let Some(kt) = kt.as_mut() {
                // SAFETY: the path has AVX-512 F (`direct`) and the head fits; as below.
                unsafe { head_backward_avx512(hd, (scale, store), p, d_o, d, kt, &mut ds, dx.as_mut_ptr(), 3 * d, at) };
                continue;
            }
            // SAFETY: hd's blocks and dO's len × dh block lie in x and dout; dq/dk/dv address
            // disjoint column blocks of dx's len rows of 3d.
            unsafe { head_backward_gemm(kernels, hd, (scale, store), p, d_o, d, &mut ds, dx.as_mut_ptr(), 3 * d, at) };
        }
    });
    dqkv
}

/// One head's backward as four GEMMs: dV = Pᵀ dO, dP = dO Vᵀ (into `ds`), dS = the softmax's
/// backward of dP (scaled), dQ = dS K, dK = dSᵀ Q, written into dx's columns `at` = [dq, dk,
/// dv] of its rows (`dx_row` apart); dO's rows are `d_row` apart.
///
/// # Safety
/// `hd`'s pointers address its len × dh blocks, `d_o` a len × dh block; dx holds len rows of
/// `dx_row` with the three dh-wide blocks at `at`; p and ds hold len × len.
#[allow(clippy::too_many_arguments)]
unsafe fn head_backward_gemm(
    kernels: dispatch::Kernels,
    hd: Head,
    (scale, store): (f32, DType),
    p: &[f32],
    d_o: *const f32,
    d_row: usize,
    ds: &mut [f32],
    dx: *mut f32,
    dx_row: usize,
    at: [usize; 3],
) {
    let Head { q, k, v, row, len, dh } = hd;
    let [dq, dk, dv] = at;
    let (rows_of, dx_rows) = (Strided::rows(row), Strided::rows(dx_row));
    // SAFETY: as the caller guarantees.
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
            Strided::rows(d_row),
            0.0,
            dx.add(dv),
            dx_rows,
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
            Strided::rows(d_row),
            v,
            Strided::transposed(row),
            0.0,
            ds.as_mut_ptr(),
            Strided::rows(len),
        );
    }
    score_gradients(ds, p, len, (scale, store));
    // SAFETY: as the caller guarantees.
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
            rows_of,
            0.0,
            dx.add(dq),
            dx_rows,
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
            rows_of,
            0.0,
            dx.add(dk),
            dx_rows,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `infer`'s context is `forward`'s as stored, bit for bit, f32 and bf16 (qkv in 2 bytes),
    /// on the path this CPU runs: items short enough for the direct kernels and longer ones
    /// (the GEMM route; at 200 × 64 × 200 its GEMMs run on the pool), heads of 16 and 64.
    #[test]
    fn infer_is_the_stored_context_of_forward() {
        let mut rng = crate::rng::Rng::new(17);
        let shapes = [(vec![36, 1, 20, 64], 4, 256), (vec![70, 3, 129], 2, 32), (vec![200, 150, 36, 200], 1, 64)];
        for (lens, heads, d) in shapes {
            let mut offsets = vec![0];
            lens.iter().for_each(|l| offsets.push(offsets.last().unwrap() + l));
            let tokens = offsets[lens.len()];
            let qkv: Vec<f32> = (0..tokens * 3 * d).map(|_| rng.normal() as f32).collect();
            for store in [DType::F32, DType::Bf16] {
                let qkv = crate::backend::cpu::typed::stored(qkv.clone(), &[tokens, 3 * d], store);
                let (context, _) = forward(qkv.view(), &offsets, heads, store);
                let want = crate::backend::cpu::typed::stored(context, &[tokens, d], store).to_f32s();
                let got = infer(qkv.view(), &offsets, heads, store).to_f32s();
                let differs = want.iter().zip(&got).position(|(a, b)| a.to_bits() != b.to_bits());
                assert_eq!(differs, None, "lengths {lens:?}, {store:?}");
                assert_eq!(want.len(), got.len());
            }
        }
    }

    /// (len, dh): edges of the direct kernels (one lane, whole and partial vectors, the
    /// largest head) and 20 drawn at random.
    #[cfg(target_arch = "x86_64")]
    fn shapes(rng: &mut crate::rng::Rng) -> Vec<(usize, usize)> {
        let mut shapes = vec![(1, 1), (36, 64), (64, 128), (24, 64), (17, 16), (33, 100), (5, 128), (64, 1), (48, 63)];
        shapes.extend((0..20).map(|_| (1 + rng.below(64), 1 + rng.below(128))));
        shapes
    }

    /// The register softmax is `probabilities`' bit for bit, stored as f32 and as bf16, for
    /// every length 1 to 64, in as many vectors as the product uses and in four (the lanes
    /// past the row NaN): scores spread wide enough to reach the exponential's clamp, and
    /// rows holding an infinity of either sign or a NaN (all NaN on both routes).
    #[test]
    fn register_softmax_is_probabilities() {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::*;
            if CpuPath::Avx512.kernels().is_err() {
                eprintln!("not run: softmax_row_avx512 (this CPU lacks the avx512 path)");
                return;
            }
            /// The row through `softmax_row_avx512` in V vectors.
            fn through<const V: usize>(row: &[f32], store: DType) -> Vec<f32> {
                let mut lanes = [f32::NAN; 64];
                lanes[..row.len()].copy_from_slice(row);
                // SAFETY: the CPU has AVX-512 F (its path exists); lanes holds 16·V ≤ 64
                // values and the row ≤ 16·V.
                unsafe {
                    let mut x: [__m512; V] = std::array::from_fn(|c| _mm512_loadu_ps(lanes[16 * c..].as_ptr()));
                    softmax_row_avx512(&mut x, row.len(), store);
                    x.iter().enumerate().for_each(|(c, &v)| _mm512_storeu_ps(lanes[16 * c..].as_mut_ptr(), v));
                }
                lanes[..row.len()].to_vec()
            }
            let mut rng = crate::rng::Rng::new(92);
            let specials = [None, Some(f32::INFINITY), Some(f32::NEG_INFINITY), Some(f32::NAN)];
            for len in 1..=64 {
                for (spread, special) in
                    [(1.0, None), (60.0, None)].into_iter().chain(specials[1..].iter().map(|&v| (1.0, v)))
                {
                    let mut row: Vec<f32> = (0..len).map(|_| spread * rng.normal() as f32).collect();
                    if let Some(v) = special {
                        row[rng.below(len)] = v;
                    }
                    for store in [DType::F32, DType::Bf16] {
                        let mut want = row.clone();
                        probabilities(&mut want, len, store);
                        let exact = match len.div_ceil(16) {
                            1 => through::<1>(&row, store),
                            2 => through::<2>(&row, store),
                            3 => through::<3>(&row, store),
                            _ => through::<4>(&row, store),
                        };
                        for got in [exact, through::<4>(&row, store)] {
                            for (i, (w, g)) in want.iter().zip(&got).enumerate() {
                                let same = w.to_bits() == g.to_bits() || (w.is_nan() && g.is_nan());
                                assert!(
                                    same,
                                    "len {len}, spread {spread}, {special:?}, {store:?}, value {i}: {g:e}, want {w:e}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// The avx512 head forward and backward are the GEMM route's, bit for bit (probabilities,
    /// context; dQ, dK, dV), for lengths 1 to 64 and head widths 1 to 128 (multiples of 16 and
    /// not), the head's columns in the middle of rows wider than the head, the transposed block
    /// full of NaN beforehand (its lanes past the keys are computed, never stored); the columns
    /// of the outputs beside the head are left as they were.
    #[test]
    fn direct_head_forward_and_backward_are_the_gemm_route_bitwise() {
        #[cfg(target_arch = "x86_64")]
        {
            let Ok(kernels) = CpuPath::Avx512.kernels() else {
                eprintln!("not run: head_forward_avx512, head_backward_avx512 (this CPU lacks the avx512 path)");
                return;
            };
            let mut rng = crate::rng::Rng::new(91);
            let mut kt = [0f32; DIRECT_DH * DIRECT_LEN];
            let differs = |a: &[f32], b: &[f32]| a.iter().zip(b).position(|(x, y)| x.to_bits() != y.to_bits());
            for (len, dh) in shapes(&mut rng) {
                // Rows of 3 heads' width and a little more (q | k | v of this head among
                // others); dO, the context and dx in rows wider than they need too.
                let row = 3 * dh + 5;
                let x: Vec<f32> = (0..len * row).map(|_| rng.normal() as f32).collect();
                let (d_row, out_row, dx_row) = (dh + 4, dh + 3, 3 * dh + 7);
                let dout: Vec<f32> = (0..len * d_row).map(|_| rng.normal() as f32).collect();
                let (q, k, v) = (x[1..].as_ptr(), x[1 + dh..].as_ptr(), x[1 + 2 * dh..].as_ptr());
                let hd = Head { q, k, v, row, len, dh };
                let scale = 1.0 / (dh as f32).sqrt();
                let at = [1, 1 + dh, 1 + 2 * dh];
                let (mut p_gemm, mut p_direct) = (vec![f32::NAN; len * len], vec![f32::NAN; len * len]);
                let (mut o_gemm, mut o_direct) = (vec![-7.0f32; len * out_row], vec![-7.0f32; len * out_row]);
                let (mut ds_gemm, mut ds_direct) = (vec![f32::NAN; len * len], vec![f32::NAN; len * len]);
                let (mut dx_gemm, mut dx_direct) = (vec![-7.0f32; len * dx_row], vec![-7.0f32; len * dx_row]);
                // SAFETY: hd's blocks lie in x, dO's in dout; the outputs hold len rows of their
                // widths, which leave room beside the head; the CPU has AVX-512 F (the path's
                // kernels exist).
                unsafe {
                    kt.fill(f32::NAN);
                    // bf16 storage on every other shape (its probabilities rounded before P V).
                    let how = (scale, if len % 2 == 0 { DType::Bf16 } else { DType::F32 });
                    head_forward_gemm(kernels, hd, how, &mut p_gemm, o_gemm[2..].as_mut_ptr(), out_row);
                    head_forward_avx512(hd, how, &mut kt, &mut p_direct, o_direct[2..].as_mut_ptr(), out_row);
                    let d_o = dout[2..].as_ptr();
                    kt.fill(f32::NAN);
                    let (ds, dx) = (&mut ds_gemm, dx_gemm.as_mut_ptr());
                    head_backward_gemm(kernels, hd, how, &p_gemm, d_o, d_row, ds, dx, dx_row, at);
                    let (ds, dx) = (&mut ds_direct, dx_direct.as_mut_ptr());
                    head_backward_avx512(hd, how, &p_gemm, d_o, d_row, &mut kt, ds, dx, dx_row, at);
                }
                assert_eq!(differs(&p_gemm, &p_direct), None, "probabilities, len {len}, dh {dh}");
                assert_eq!(differs(&o_gemm, &o_direct), None, "context, len {len}, dh {dh}");
                assert_eq!(differs(&dx_gemm, &dx_direct), None, "dqkv, len {len}, dh {dh}");
                assert!(
                    o_direct.chunks(out_row).all(|r| r[..2] == [-7.0; 2] && r[dh + 2..] == [-7.0]),
                    "len {len}, dh {dh}"
                );
                assert!(
                    dx_direct.chunks(dx_row).all(|r| r[0] == -7.0 && r[1 + 3 * dh..] == [-7.0; 6]),
                    "len {len}, dh {dh}"
                );
            }
        }
    }
}
