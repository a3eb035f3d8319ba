//! Elementwise and row ops: bias, residual, GELU, dropout, row gather/scatter, masking,
//! segment pooling. Plain loops compiled for the active path (`simd::vectorised!`); rayon where
//! rows are independent and the work is large.

use rayon::prelude::*;

use crate::tensor::{DType, HostBuf};

use super::simd;

/// Below this many elements a loop is cheaper than waking the thread pool.
const PAR_MIN: usize = 1 << 15;

/// Every value of `x` as `store` keeps it (bf16: rounded to nearest, ties to even): an op's
/// output on bf16 activations, at the path's width and over the pool when large.
pub fn store_as(store: DType, x: &mut [f32]) {
    if store == DType::F32 {
        return;
    }
    let body = |x: &mut [f32]| simd::vectorised!(store.round_all(x));
    if x.len() >= PAR_MIN {
        x.par_chunks_mut(PAR_MIN).for_each(body);
    } else {
        body(x);
    }
}

/// `wide[i]` = the f32 whose high half is `bits[i]` (`tensor::widen` at the path's width),
/// on the pool when long.
pub fn widen(bits: &[u16], wide: &mut [f32]) {
    if wide.len() >= PAR_MIN {
        wide.par_chunks_mut(PAR_MIN).zip(bits.par_chunks(PAR_MIN)).for_each(|(w, b)| widen_run(b, w));
    } else {
        widen_run(bits, wide);
    }
}

/// [`widen`] on this thread (a kernel's own block, inside its parallel loop).
#[inline]
pub fn widen_run(bits: &[u16], wide: &mut [f32]) {
    simd::vectorised!(wide.iter_mut().zip(bits).for_each(|(w, &b)| *w = f32::from_bits((b as u32) << 16)))
}

/// `bits[i]` = `wide[i]` rounded to bf16 (`tensor::narrow` at the path's width), on the pool
/// when long.
pub fn narrow(wide: &[f32], bits: &mut [u16]) {
    if wide.len() >= PAR_MIN {
        bits.par_chunks_mut(PAR_MIN).zip(wide.par_chunks(PAR_MIN)).for_each(|(b, w)| narrow_run(w, b));
    } else {
        narrow_run(wide, bits);
    }
}

/// [`narrow`] on this thread (a kernel's own block, inside its parallel loop).
#[inline]
pub fn narrow_run(wide: &[f32], bits: &mut [u16]) {
    simd::vectorised!(bits.iter_mut().zip(wide).for_each(|(b, &w)| *b = crate::tensor::bf16_bits(w)))
}

pub fn add_bias(y: &mut [f32], bias: &[f32]) {
    simd::vectorised!({
        for row in y.chunks_exact_mut(bias.len()) {
            for (v, b) in row.iter_mut().zip(bias) {
                *v += b;
            }
        }
    })
}

pub fn bias_bwd(dy: &[f32], dbias: &mut [f32]) {
    simd::vectorised!({
        for row in dy.chunks_exact(dbias.len()) {
            for (d, g) in dbias.iter_mut().zip(row) {
                *d += g;
            }
        }
    })
}

pub fn add_assign(y: &mut [f32], x: &[f32]) {
    simd::vectorised!({
        for (a, b) in y.iter_mut().zip(x) {
            *a += b;
        }
    })
}

const GELU_C: f32 = 0.797_884_6; // sqrt(2/π)
const GELU_A: f32 = 0.044_715;

/// tanh as a clamped odd rational function (degree 13 / 6; the form Eigen uses), branch-free
/// (plain `*`/`+`: `mul_add` becomes a libm call on the baseline x86-64 target)
/// so loops over it vectorise: libm's tanhf made GELU the most expensive op of a CPU step.
/// Max abs error vs f64 tanh < 1e-6 (tested).
#[inline(always)]
pub fn tanh_fast(x: f32) -> f32 {
    #[allow(clippy::excessive_precision)] // Eigen's coefficients, kept digit for digit
    const A: [f32; 7] = [
        4.893_524_6e-3,
        6.372_619_3e-4,
        1.485_722_4e-5,
        5.122_297e-8,
        -8.604_671_5e-11,
        2.000_187_9e-13,
        -2.760_768_5e-16,
    ];
    const B: [f32; 4] = [4.893_525e-3, 2.268_434_6e-3, 1.185_347_1e-4, 1.198_258_4e-6];
    let x = x.clamp(-7.905_311, 7.905_311);
    let x2 = x * x;
    let p = x2 * A[6] + A[5];
    let p = x2 * p + A[4];
    let p = x2 * p + A[3];
    let p = x2 * p + A[2];
    let p = x2 * p + A[1];
    let p = (x2 * p + A[0]) * x;
    let q = x2 * B[3] + B[2];
    let q = x2 * q + B[1];
    let q = x2 * q + B[0];
    p / q
}

/// The degree-6 polynomial of [`exp_fast`]: Cephes' `expf` coefficients, kept digit for digit.
#[allow(clippy::excessive_precision)]
const EXP_P: [f32; 6] = [
    1.987_569_150_0e-4,
    1.398_199_950_7e-3,
    8.333_451_907_3e-3,
    4.166_579_589_4e-2,
    1.666_666_545_9e-1,
    5.000_000_120_1e-1,
];

/// eˣ by Cody–Waite range reduction (x = n·ln 2 + r, |r| ≤ ln 2 / 2) and a degree-6 polynomial
/// for eʳ (Cephes' `expf` coefficients), 2ⁿ built in the exponent bits: branch-free, so a
/// softmax row vectorises (libm's `expf` is a call per element). Relative error < 3e-7
/// (tested against f64); x below −87.3 gives 2⁻¹²⁶·eʳ (not 0), above 88.3 it saturates there.
#[inline(always)]
pub fn exp_fast(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.3);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    // ln 2 in two parts, the first exact in a few bits, so r keeps its low bits.
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = ((((EXP_P[0] * r + EXP_P[1]) * r + EXP_P[2]) * r + EXP_P[3]) * r + EXP_P[4]) * r + EXP_P[5];
    let e = p * (r * r) + r + 1.0;
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// [`exp_fast`] on 16 lanes: the same operations in the same order (no fused multiply-add;
/// the clamp keeps a NaN, as `f32::clamp` does), so the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) fn exp_fast_avx512(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let k = _mm512_set1_ps;
    // max(lo, x) and min(hi, ·) return their second operand when one is NaN.
    let x = _mm512_min_ps(k(88.3), _mm512_max_ps(k(-87.3), x));
    let n = _mm512_add_ps(_mm512_mul_ps(x, k(std::f32::consts::LOG2_E)), k(0.5));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(n);
    let r = _mm512_sub_ps(_mm512_sub_ps(x, _mm512_mul_ps(n, k(0.693_359_4))), _mm512_mul_ps(n, k(-2.121_944_4e-4)));
    let mut p = k(EXP_P[0]);
    for c in &EXP_P[1..] {
        p = _mm512_add_ps(_mm512_mul_ps(p, r), k(*c));
    }
    let e = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(p, _mm512_mul_ps(r, r)), r), k(1.0));
    let two_n = _mm512_slli_epi32::<23>(_mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)));
    _mm512_mul_ps(e, _mm512_castsi512_ps(two_n))
}

/// A softmax row's numerator: each value replaced by e^(v − max), returning (max, Σ). The
/// maximum and the sum (`sum2`) are kept in eight partial lanes and the exponentials are
/// `exp_fast`, so
/// all three loops vectorise under `simd::vectorised!` (`f32::max`'s NaN rule and libm's
/// `expf` kept them scalar). A NaN still reaches the sum through its exponential.
#[inline(always)]
pub fn exp_shifted(row: &mut [f32]) -> (f32, f32) {
    let mut maxima = [f32::NEG_INFINITY; 8];
    let chunks = row.chunks_exact(8);
    let mut max = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    for c in chunks {
        for (m, &v) in maxima.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    for m in maxima {
        max = if m > max { m } else { max };
    }
    for v in row.iter_mut() {
        *v = exp_fast(*v - max);
    }
    (max, sum2(row, row, |v, _| v))
}

/// Σ f(a_i, b_i) with eight partial sums: a single f32 accumulator is a serial dependency
/// chain that the compiler may not reorder, so it would not vectorise.
#[inline(always)]
pub fn sum2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    const LANES: usize = 8;
    let mut acc = [0.0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += f(x[l], y[l]);
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(&x, &y)| f(x, y)).sum();
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + tanh_fast(GELU_C * (x + GELU_A * x * x * x)))
}

#[inline(always)]
pub fn gelu_grad(x: f32) -> f32 {
    let t = tanh_fast(GELU_C * (x + GELU_A * x * x * x));
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_C * (1.0 + 3.0 * GELU_A * x * x)
}

/// A function of every bf16, by the value's 16 bits: `f` of the f32 that bf16 is.
type Bf16Table = [f32; 1 << 16];

/// GELU and its derivative tabulated over the bf16 values. A bf16 activation's GELU is then a
/// load instead of the rational tanh, whose division made GELU 0.6–0.7 ns a value on the Xeon
/// VM (session 33), and the same bits: the table holds what `gelu` computes on that value.
struct GeluTables {
    value: Box<Bf16Table>,
    grad: Box<Bf16Table>,
    /// `value` rounded to bf16, as its 16 bits: GELU from a bf16 in 2 bytes to another.
    value_bits: Box<[u16; 1 << 16]>,
}

/// The tables, made on first use (a quarter of a millisecond; 512 KiB, only where a model
/// runs in bf16).
fn gelu_tables() -> &'static GeluTables {
    static TABLES: std::sync::OnceLock<GeluTables> = std::sync::OnceLock::new();
    TABLES.get_or_init(|| {
        let of = |f: fn(f32) -> f32| -> Box<Bf16Table> {
            let v: Vec<f32> = (0..=u16::MAX).map(|bits| f(f32::from_bits((bits as u32) << 16))).collect();
            v.into_boxed_slice().try_into().expect("one value per bf16")
        };
        let value = of(gelu);
        let bits: Vec<u16> = value.iter().map(|&v| crate::tensor::bf16_bits(v)).collect();
        let value_bits = bits.into_boxed_slice().try_into().expect("one value per bf16");
        GeluTables { value, grad: of(gelu_grad), value_bits }
    })
}

/// Whether every value of `x` is a bf16 (the low 16 bits of each zero), so that a table of
/// [`GeluTables`] gives its function's value.
#[inline(always)]
fn all_bf16(x: &[f32]) -> bool {
    x.iter().fold(0u32, |bits, v| bits | v.to_bits()) & 0xffff == 0
}

/// `table` at each value's 16 bits (every value a bf16: [`all_bf16`]).
#[inline(always)]
fn table_at(table: &Bf16Table, v: f32) -> f32 {
    table[(v.to_bits() >> 16) as usize]
}

pub fn gelu_fwd(x: &[f32]) -> HostBuf {
    let mut y = crate::tensor::host_pool::dirty(x.len()); // every element is written
    let body = |y: &mut [f32], x: &[f32]| {
        simd::vectorised!({
            for (o, &v) in y.iter_mut().zip(x) {
                *o = gelu(v);
            }
        })
    };
    if x.len() >= PAR_MIN {
        y.par_chunks_mut(4096).zip(x.par_chunks(4096)).for_each(|(y, x)| body(y, x));
    } else {
        body(&mut y, x);
    }
    y
}

/// The feed-forward's activation in one pass (`Backend::bias_gelu_dropout_fwd`): `u += bias`
/// by rows of `bias.len()` when given, then `h = dropout(GELU(u))`. In f32 bit for bit
/// `add_bias`, `gelu_fwd`, `dropout`: the same expressions per element, and the dropout rule
/// applied at each element's index in the tensor. With `store` bf16, u (when the bias changes
/// it) and h are rounded as they are stored, and GELU reads u as stored. Blocks are whole rows,
/// so a row's bias starts each one.
pub fn bias_gelu_dropout(
    u: &mut [f32],
    bias: Option<&[f32]>,
    cols: usize,
    rule: Option<DropoutRule>,
    store: DType,
) -> HostBuf {
    let mut h = crate::tensor::host_pool::dirty(u.len()); // every element is written
    if u.is_empty() {
        return h;
    }
    let block = (4096 / cols).max(1) * cols;
    let tables = (store == DType::Bf16).then(gelu_tables);
    let body = |(b, (h, u)): (usize, (&mut [f32], &mut [f32]))| {
        simd::vectorised!({
            if let Some(bias) = bias {
                for row in u.chunks_exact_mut(cols) {
                    for (v, b) in row.iter_mut().zip(bias) {
                        *v += b;
                    }
                }
                store.round_all(u);
            }
            match tables {
                Some(t) if all_bf16(u) => h.iter_mut().zip(u.iter()).for_each(|(o, &v)| *o = table_at(&t.value, v)),
                _ => h.iter_mut().zip(u.iter()).for_each(|(o, &v)| *o = gelu(v)),
            }
            if let Some(rule) = rule {
                rule.apply(h, (b * block) as u64);
            }
            store.round_all(h);
        })
    };
    if u.len() >= PAR_MIN {
        h.par_chunks_mut(block).zip(u.par_chunks_mut(block)).enumerate().for_each(body);
    } else {
        h.chunks_mut(block).zip(u.chunks_mut(block)).enumerate().for_each(body);
    }
    h
}

/// `x ← GELU(x)` stored as `store`: [`bias_gelu_dropout`]'s h without a bias or a dropout, in
/// x's memory (`Backend::gemm_bias_gelu`: at inference no backward reads the pre-activation).
pub fn gelu_in_place(x: &mut [f32], store: DType) {
    let tables = (store == DType::Bf16).then(gelu_tables);
    let body = |x: &mut [f32]| {
        simd::vectorised!({
            match tables {
                Some(t) if all_bf16(x) => x.iter_mut().for_each(|v| *v = table_at(&t.value, *v)),
                _ => x.iter_mut().for_each(|v| *v = gelu(*v)),
            }
            store.round_all(x);
        })
    };
    if x.len() >= PAR_MIN {
        x.par_chunks_mut(4096).for_each(body);
    } else {
        body(x);
    }
}

/// [`gelu_in_place`] on bf16 values in 2 bytes: each value's GELU, rounded to bf16, by one
/// table load (the same bits as `gelu_in_place` at bf16 on the widened values).
pub fn gelu_bf16_in_place(x: &mut [u16]) {
    let table = &gelu_tables().value_bits;
    let body = |x: &mut [u16]| x.iter_mut().for_each(|v| *v = table[*v as usize]);
    if x.len() >= PAR_MIN {
        x.par_chunks_mut(8192).for_each(body);
    } else {
        body(x);
    }
}

/// Its backward in dh's memory (`Backend::gelu_dropout_bwd`): `dh = GELU'(u) ⊙ dropout(dh)`,
/// in f32 bit for bit `dropout` then `gelu_bwd`; stored as `store` (bf16: rounded once).
pub fn dropout_gelu_bwd(u: &[f32], dh: &mut [f32], rule: Option<DropoutRule>, store: DType) {
    const BLOCK: usize = 4096;
    let tables = (store == DType::Bf16).then(gelu_tables);
    let body = |(b, (dh, u)): (usize, (&mut [f32], &[f32]))| {
        simd::vectorised!({
            if let Some(rule) = rule {
                rule.apply(dh, (b * BLOCK) as u64);
            }
            match tables {
                Some(t) if all_bf16(u) => dh.iter_mut().zip(u).for_each(|(d, &v)| *d *= table_at(&t.grad, v)),
                _ => dh.iter_mut().zip(u).for_each(|(d, &v)| *d *= gelu_grad(v)),
            }
            store.round_all(dh);
        })
    };
    if u.len() >= PAR_MIN {
        dh.par_chunks_mut(BLOCK).zip(u.par_chunks(BLOCK)).enumerate().for_each(body);
    } else {
        dh.chunks_mut(BLOCK).zip(u.chunks(BLOCK)).enumerate().for_each(body);
    }
}

pub fn gelu_bwd(x: &[f32], dy: &[f32]) -> HostBuf {
    let mut dx = crate::tensor::host_pool::dirty(x.len()); // every element is written
    let body = |dx: &mut [f32], x: &[f32], dy: &[f32]| {
        simd::vectorised!({
            for ((o, &v), &g) in dx.iter_mut().zip(x).zip(dy) {
                *o = g * gelu_grad(v);
            }
        })
    };
    if x.len() >= PAR_MIN {
        dx.par_chunks_mut(4096)
            .zip(x.par_chunks(4096).zip(dy.par_chunks(4096)))
            .for_each(|(dx, (x, dy))| body(dx, x, dy));
    } else {
        body(&mut dx, x, dy);
    }
    dx
}

/// The 64-bit counter hash (murmur3's finaliser) behind elements `4·group .. 4·group + 4`.
#[inline(always)]
fn dropout_hash(seed: u64, group: u64) -> u64 {
    let mut h = seed ^ group.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    h ^= h >> 33;
    h = h.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    h ^= h >> 33;
    h = h.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    h ^= h >> 33;
    h
}

/// The dropout keep decision of element `i` as a uniform in [0, 1) with 16-bit resolution:
/// one hash serves four consecutive elements, so every device draws the same mask cheaply.
#[inline(always)]
pub fn dropout_uniform(seed: u64, i: u64) -> f32 {
    ((dropout_hash(seed, i / 4) >> (16 * (i % 4))) & 0xFFFF) as f32 * (1.0 / 65536.0)
}

/// Inverted dropout in place: kept elements scaled by 1/(1-p). Used for both directions.
/// Splits the tensor over the pool in blocks whose start is a multiple of four, so every block
/// sees the same masks `dropout_uniform` defines.
pub fn dropout(x: &mut [f32], p: f32, seed: u64) {
    let Some(rule) = DropoutRule::new(p, seed) else {
        return;
    };
    const BLOCK: usize = 4096;
    let body = |(b, x): (usize, &mut [f32])| simd::vectorised!(rule.apply(x, (b * BLOCK) as u64));
    if x.len() >= PAR_MIN {
        x.par_chunks_mut(BLOCK).enumerate().for_each(body);
    } else {
        x.chunks_mut(BLOCK).enumerate().for_each(body);
    }
}

/// One dropout call's rule: keep element i iff its 16-bit draw u (`dropout_uniform`) satisfies
/// u / 65536 ≥ p, i.e. u ≥ ⌈p · 65536⌉, and scale what is kept by 1/(1-p).
#[derive(Clone, Copy, Debug)]
pub struct DropoutRule {
    seed: u64,
    threshold: u32,
    scale: f32,
}

impl DropoutRule {
    /// None for p ≤ 0: nothing is dropped or scaled.
    pub fn new(p: f32, seed: u64) -> Option<Self> {
        (p > 0.0).then(|| DropoutRule { seed, threshold: (p as f64 * 65536.0).ceil() as u32, scale: 1.0 / (1.0 - p) })
    }

    /// Dropout of `x`, whose first element is element `first` of the tensor (any offset: a
    /// row of a fused op starts wherever the row does).
    #[inline(always)]
    pub fn apply(self, x: &mut [f32], first: u64) {
        let lead = (((4 - first % 4) % 4) as usize).min(x.len());
        let (head, rest) = x.split_at_mut(lead);
        for (i, v) in head.iter_mut().enumerate() {
            let e = first + i as u64;
            let u = (dropout_hash(self.seed, e / 4) >> (16 * (e % 4))) as u16 as u32;
            *v = if u >= self.threshold { *v * self.scale } else { 0.0 };
        }
        dropout_block(rest, (first + lead as u64) / 4, self.seed, self.threshold, self.scale);
    }
}

/// Dropout of `x`, whose first element is the first of hash group `first_group`. Sixteen
/// hashes at a time into an array, then the 64 draws they hold: two loops the compiler
/// vectorises (the 64-bit multiplies on AVX-512 DQ), where one hash per four elements
/// interleaved with the four decisions ran scalar (0.4 ms per call, 9 % of a CPU step).
#[inline(always)]
fn dropout_block(x: &mut [f32], first_group: u64, seed: u64, threshold: u32, scale: f32) {
    const GROUPS: usize = 16;
    for (c, x) in x.chunks_mut(4 * GROUPS).enumerate() {
        let first = first_group + (c * GROUPS) as u64;
        let mut hashes = [0u64; GROUPS];
        for (g, h) in hashes.iter_mut().enumerate() {
            *h = dropout_hash(seed, first + g as u64);
        }
        let draws = draws_of(hashes);
        for (v, &u) in x.iter_mut().zip(&draws) {
            *v = if u as u32 >= threshold { *v * scale } else { 0.0 };
        }
    }
}

/// The four 16-bit draws of each hash, lowest bits first (`dropout_uniform`'s order).
#[inline(always)]
fn draws_of(hashes: [u64; 16]) -> [u16; 64] {
    let mut draws = [0u16; 64];
    for (quad, h) in draws.chunks_exact_mut(4).zip(hashes) {
        for (lane, d) in quad.iter_mut().enumerate() {
            *d = (h >> (16 * lane)) as u16;
        }
    }
    draws
}

pub fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// `Backend::label_coordinates`: √softplus(g) of each label logit, in place, in f64 rounded
/// once (the definition the device's f32 kernel is tested against).
pub fn label_coordinates(logits: &mut [f32]) {
    for x in logits {
        let g = f64::from(*x);
        // softplus without overflow: g + log(1 + e^{−g}) for g > 0.
        let softplus = if g > 0.0 { g + (-g).exp().ln_1p() } else { g.exp().ln_1p() };
        *x = softplus.sqrt() as f32;
    }
}

pub fn l2_normalize_rows(x: &mut [f32], cols: usize) {
    for row in x.chunks_exact_mut(cols) {
        // f64: a long row of small values would lose digits in an f32 sum of squares.
        let n = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
        if n > 0.0 {
            row.iter_mut().for_each(|v| *v = (*v as f64 / n) as f32);
        }
    }
}

pub fn gather_rows(table: &[f32], cols: usize, ids: &[u32]) -> HostBuf {
    let mut out = crate::tensor::host_pool::dirty(ids.len() * cols); // every element is written
    for (row, &id) in out.chunks_exact_mut(cols).zip(ids) {
        let id = id as usize;
        row.copy_from_slice(&table[id * cols..(id + 1) * cols]);
    }
    out
}

pub fn scatter_add_rows(dy: &[f32], cols: usize, ids: &[u32], dtable: &mut [f32]) {
    for (row, &id) in dy.chunks_exact(cols).zip(ids) {
        let id = id as usize;
        add_assign(&mut dtable[id * cols..(id + 1) * cols], row);
    }
}

pub fn set_rows(x: &mut [f32], rows: &[u32], value: &[f32]) {
    let cols = value.len();
    for &r in rows {
        let r = r as usize;
        x[r * cols..(r + 1) * cols].copy_from_slice(value);
    }
}

pub fn set_rows_bwd(dx: &mut [f32], rows: &[u32], dvalue: &mut [f32]) {
    let cols = dvalue.len();
    for &r in rows {
        let row = &mut dx[r as usize * cols..(r as usize + 1) * cols];
        add_assign(dvalue, row);
        row.fill(0.0);
    }
}

pub fn segment_mean_fwd(x: &[f32], cols: usize, offsets: &[usize]) -> HostBuf {
    let items = offsets.len() - 1;
    let mut y = crate::tensor::host_pool::zeroed(items * cols);
    for (b, out) in y.chunks_exact_mut(cols).enumerate() {
        let (s, e) = (offsets[b], offsets[b + 1]);
        for row in x[s * cols..e * cols].chunks_exact(cols) {
            add_assign(out, row);
        }
        let inv = 1.0 / (e - s) as f32;
        out.iter_mut().for_each(|v| *v *= inv);
    }
    y
}

pub fn segment_mean_bwd(dy: &[f32], cols: usize, offsets: &[usize]) -> HostBuf {
    let mut dx = crate::tensor::host_pool::dirty(offsets[offsets.len() - 1] * cols); // every element is written
    for (b, g) in dy.chunks_exact(cols).enumerate() {
        let (s, e) = (offsets[b], offsets[b + 1]);
        let inv = 1.0 / (e - s) as f32;
        for row in dx[s * cols..e * cols].chunks_exact_mut(cols) {
            for (o, v) in row.iter_mut().zip(g) {
                *o = v * inv;
            }
        }
    }
    dx
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every bf16 (NaNs, infinities and subnormals included) through the three GELU loops that
    /// look their values up at bf16: the bits of `gelu` / `gelu_grad` computed, then stored.
    /// A chunk holding one value that is not a bf16 is computed, and matches too.
    #[test]
    fn the_bf16_gelu_tables_give_the_computed_bits() {
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let rounded = |f: fn(f32) -> f32, x: &[f32]| -> Vec<u32> {
            x.iter().map(|&v| DType::Bf16.round(f(v)).to_bits()).collect()
        };
        let every: Vec<f32> = (0..=u16::MAX).map(|b| f32::from_bits((b as u32) << 16)).collect();
        let mut mixed = every.clone();
        mixed[4096 * 3 + 17] = 1.000_000_1; // not a bf16: its chunk of 4096 is computed
        for u in [&every, &mixed] {
            let mut x = u.clone();
            gelu_in_place(&mut x, DType::Bf16);
            assert_eq!(bits(&x), rounded(gelu, u), "gelu_in_place");
            let h = bias_gelu_dropout(&mut u.clone(), None, 256, None, DType::Bf16);
            assert_eq!(bits(&h), rounded(gelu, u), "bias_gelu_dropout");
            let mut dh = vec![1.0f32; u.len()];
            dropout_gelu_bwd(u, &mut dh, None, DType::Bf16);
            assert_eq!(bits(&dh), rounded(gelu_grad, u), "dropout_gelu_bwd");
        }
    }

    #[test]
    fn tanh_fast_matches_f64_tanh() {
        let mut worst = 0.0f64;
        for i in -200_000..=200_000 {
            let x = i as f32 * 1e-4; // [-20, 20]
            let err = (tanh_fast(x) as f64 - (x as f64).tanh()).abs();
            worst = worst.max(err);
        }
        assert!(worst < 1e-6, "max abs error {worst}");
        assert_eq!(tanh_fast(0.0), 0.0);
        assert!(tanh_fast(100.0) <= 1.0 && tanh_fast(-100.0) >= -1.0);
    }

    #[test]
    fn exp_fast_matches_f64_exp() {
        let mut worst = 0.0f64;
        for i in -873_000..=883_000 {
            let x = i as f32 * 1e-4; // [-87.3, 88.3]: every normal result
            let want = (x as f64).exp();
            worst = worst.max((exp_fast(x) as f64 - want).abs() / want);
        }
        assert!(worst < 3e-7, "max relative error {worst}");
        assert_eq!(exp_fast(0.0), 1.0);
        assert!(exp_fast(f32::NAN).is_nan());
        assert!(exp_fast(-1e4) > 0.0 && exp_fast(-1e4) < 1e-37, "{}", exp_fast(-1e4));
        assert!(exp_fast(1e4).is_finite());
    }

    /// The 16-lane exponential is the scalar one bit for bit: every 977th f32 of the clamp's
    /// range and beyond it, the specials, and NaNs of both signs.
    #[test]
    fn exp_fast_avx512_is_exp_fast() {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::*;
            if !std::arch::is_x86_feature_detected!("avx512f") {
                eprintln!("not run: exp_fast_avx512 (this CPU lacks AVX-512 F)");
                return;
            }
            let specials = [0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, -f32::NAN, -87.3, 88.3, 1e-45];
            let xs: Vec<f32> = (0..u32::MAX / 977)
                .map(|i| f32::from_bits(i * 977))
                .filter(|x| x.abs() < 200.0 || x.is_nan())
                .chain(specials)
                .collect();
            for chunk in xs.chunks(16) {
                let mut x = [0f32; 16];
                x[..chunk.len()].copy_from_slice(chunk);
                let mut y = [0f32; 16];
                // SAFETY: the CPU has AVX-512 F (checked); x and y hold 16 lanes.
                unsafe { _mm512_storeu_ps(y.as_mut_ptr(), exp_fast_avx512(_mm512_loadu_ps(x.as_ptr()))) };
                for (&x, &y) in x.iter().zip(&y) {
                    let want = exp_fast(x);
                    assert!(
                        y.to_bits() == want.to_bits() || (x.is_nan() && y.is_nan()),
                        "exp({x:e}): {y:e}, want {want:e}"
                    );
                }
            }
        }
    }

    #[test]
    fn dropout_keeps_about_one_minus_p() {
        let mut x = vec![1.0f32; 100_000];
        dropout(&mut x, 0.25, 9);
        let kept = x.iter().filter(|&&v| v != 0.0).count() as f64 / x.len() as f64;
        assert!((kept - 0.75).abs() < 0.01, "{kept}");
        assert!(x.iter().all(|&v| v == 0.0 || (v - 4.0 / 3.0).abs() < 1e-6));
    }

    #[test]
    fn blocked_parallel_dropout_draws_the_per_element_definition() {
        // Odd lengths on both paths (serial and split over the pool), p at and between the
        // 16-bit grid points: every element must follow dropout_uniform exactly.
        for (len, p, seed) in [(13, 0.1f32, 1u64), (4097, 0.5, 2), (PAR_MIN + 4095, 0.25, 3), (70_001, 0.15, 4)] {
            let x: Vec<f32> = (0..len).map(|i| 1.0 + i as f32 * 1e-3).collect();
            let mut y = x.clone();
            dropout(&mut y, p, seed);
            for (i, (&a, &b)) in x.iter().zip(&y).enumerate() {
                let want = if dropout_uniform(seed, i as u64) < p { 0.0 } else { a * (1.0 / (1.0 - p)) };
                assert_eq!(b.to_bits(), want.to_bits(), "len {len}, p {p}, element {i}");
            }
        }
    }
}
