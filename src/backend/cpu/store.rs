//! How a micro-kernel writes its tile of C (`TileOut`): alpha, beta·C, the bias, the rounding
//! of a bf16 C, and a bf16 C in 2 bytes; scalar, AVX2-wide (in microkernel.rs's AVX2 kernel)
//! and AVX-512-wide, the last with `vcvtne2ps2bf16` where the CPU has AVX-512 BF16.

use crate::tensor::DType;

#[cfg(target_arch = "x86_64")]
const PREFETCH_L1: i32 = std::arch::x86_64::_MM_HINT_T0;
#[cfg(target_arch = "x86_64")]
const PREFETCH_L2: i32 = std::arch::x86_64::_MM_HINT_T1;
#[cfg(not(target_arch = "x86_64"))]
const PREFETCH_L1: i32 = 0;
#[cfg(not(target_arch = "x86_64"))]
const PREFETCH_L2: i32 = 0;

/// Where one tile of C goes: `c[i·rs + j·cs]` for i < rows ≤ MR, j < cols ≤ NR.
#[derive(Clone, Copy)]
pub struct TileOut {
    /// C's element (0, 0): an f32, or with `bf16` a bf16's 16 bits (a `u16`; strides count
    /// elements either way).
    pub c: *mut f32,
    pub rs: isize,
    pub cs: isize,
    pub rows: usize,
    pub cols: usize,
    /// `bias[j]` added to column j of every row as the tile is stored (null: none).
    pub bias: *const f32,
    /// C is stored as bf16: each value rounded once as it is written, after the bias (only
    /// with the last slice of k). Rounded in a pass over each 512-row block of C after its
    /// tiles, the values came back from memory: 15–20 % of a 1152 × 256 × 768 AMX product on
    /// the Xeon VM (session 31).
    pub round: bool,
    /// C holds bf16 values in 2 bytes: each value rounded (as `round`) and its 16 bits
    /// written, and beta·C read back from them. Always with `round` (the last slice of k).
    pub bf16: bool,
}

impl TileOut {
    /// The tile's lines of C asked for before a kernel's k loop, so that their misses (C is
    /// larger than L2 in the model's GEMMs, and a store must read its line first) overlap the
    /// products instead of stalling the stores at the end. No value changes.
    ///
    /// # Safety
    /// The tile is inside C.
    #[inline(always)]
    pub unsafe fn prefetch(&self) {
        // SAFETY: as the caller guarantees.
        unsafe { self.prefetch_rows::<{ PREFETCH_L1 }>(0, self.rows) }
    }

    /// Rows `first..first + rows` of the tile (those of them it has) asked for into L2 only,
    /// a few at a time beside a kernel's products (AMX's `pipelined`): the 32 lines of a
    /// tile asked for into L1 at once held the fill buffers its operands' tile loads wait
    /// on (session 37).
    ///
    /// # Safety
    /// The tile is inside C.
    #[inline(always)]
    pub unsafe fn prefetch_rows_to_l2(&self, first: usize, rows: usize) {
        // SAFETY: as the caller guarantees.
        unsafe { self.prefetch_rows::<{ PREFETCH_L2 }>(first, rows) }
    }

    /// Each 64-byte line of rows `first..first + rows` (within the tile's) asked for with
    /// `HINT`, when C's rows are contiguous (`cs` = 1).
    #[inline(always)]
    unsafe fn prefetch_rows<const HINT: i32>(&self, first: usize, rows: usize) {
        #[cfg(target_arch = "x86_64")]
        if self.cs == 1 {
            use std::arch::x86_64::*;
            let size = if self.bf16 { 2 } else { 4 };
            for i in first..(first + rows).min(self.rows) {
                // SAFETY: a prefetch never faults; the addresses are elements of C's row i:
                // one a line's width apart and the last, so each 64-byte line the row's
                // columns touch is asked for (a row that does not start a line spans more).
                unsafe {
                    let row = (self.c as *const i8).offset(i as isize * self.rs * size);
                    for j in (0..self.cols).step_by(64 / size as usize) {
                        _mm_prefetch::<HINT>(row.add(j * size as usize));
                    }
                    _mm_prefetch::<HINT>(row.add((self.cols.max(1) - 1) * size as usize));
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (first, rows);
    }

    /// The tile's rows from `first` on, at most `rows` of them (none past its last).
    ///
    /// # Safety
    /// `first` is at most the tile's rows.
    #[inline(always)]
    pub unsafe fn rows_from(&self, first: usize, rows: usize) -> TileOut {
        let size = if self.bf16 { 2 } else { 4 };
        // SAFETY: row `first` starts inside C or one row past the tile (then `rows` is 0).
        let c = unsafe { (self.c as *mut u8).offset(first as isize * self.rs * size) as *mut f32 };
        TileOut { c, rows: rows.min(self.rows - first), ..*self }
    }

    /// Element (i, j) of a bf16 C (`bf16`).
    ///
    /// # Safety
    /// (i, j) is inside the tile, which is inside C.
    #[inline(always)]
    pub unsafe fn bf16_at(&self, i: usize, j: usize) -> *mut u16 {
        // SAFETY: as the caller guarantees.
        unsafe { (self.c as *mut u16).offset(i as isize * self.rs + j as isize * self.cs) }
    }
}

/// Writes an accumulated tile (row-major, `nr` wide) through `out`, scaled by alpha and added
/// to beta·C.
///
/// # Safety
/// Every element of `out` (rows × cols) lies inside C's allocation.
#[inline(always)]
pub(super) unsafe fn store_scalar(acc: &[f32], nr: usize, alpha: f32, beta: f32, out: TileOut) {
    for (i, row) in acc.chunks_exact(nr).enumerate().take(out.rows) {
        for (j, &v) in row.iter().enumerate().take(out.cols) {
            // SAFETY: (i, j) is inside the tile, which the caller guarantees is in bounds.
            unsafe {
                if out.bf16 {
                    let p = out.bf16_at(i, j);
                    let mut x =
                        if beta == 0.0 { alpha * v } else { alpha * v + beta * f32::from_bits((*p as u32) << 16) };
                    if !out.bias.is_null() {
                        x += *out.bias.add(j);
                    }
                    *p = crate::tensor::bf16_bits(x);
                    continue;
                }
                let p = out.c.offset(i as isize * out.rs + j as isize * out.cs);
                let mut x = if beta == 0.0 { alpha * v } else { alpha * v + beta * *p };
                if !out.bias.is_null() {
                    x += *out.bias.add(j);
                }
                *p = if out.round { DType::Bf16.round(x) } else { x };
            }
        }
    }
}

/// The R × 16·H accumulators through `out`: masked vector stores along a contiguous row of C
/// (edge tiles too), element by element otherwise.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn store_avx512<const R: usize, const H: usize>(
    acc: &[[std::arch::x86_64::__m512; H]; R],
    alpha: f32,
    beta: f32,
    out: TileOut,
) {
    use std::arch::x86_64::*;
    // SAFETY: only the rows × cols elements of the tile are read or written (masked lanes are
    // neither loaded nor stored), which the caller guarantees are inside C.
    unsafe {
        if out.cs == 1 && out.bf16 {
            store_avx512_bf16(acc, alpha, beta, out);
        } else if out.cs == 1 {
            let (va, vb) = (_mm512_set1_ps(alpha), _mm512_set1_ps(beta));
            let masks: [__mmask16; H] = std::array::from_fn(|h| {
                let n = out.cols.saturating_sub(16 * h).min(16) as u32;
                ((1u32 << n) - 1) as __mmask16
            });
            for (i, acc) in acc.iter().enumerate().take(out.rows) {
                let p = out.c.offset(i as isize * out.rs);
                for (h, (&v, &mask)) in acc.iter().zip(&masks).enumerate() {
                    let ph = p.add(16 * h);
                    let r = if beta == 0.0 {
                        _mm512_mul_ps(va, v)
                    } else {
                        _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(mask, ph), _mm512_mul_ps(va, v))
                    };
                    let r = match out.bias.is_null() {
                        true => r,
                        false => _mm512_add_ps(r, _mm512_maskz_loadu_ps(mask, out.bias.add(16 * h))),
                    };
                    _mm512_mask_storeu_ps(ph, mask, if out.round { round_bf16_avx512(r) } else { r });
                }
            }
        } else {
            let mut tile = [[0f32; 32]; R];
            for (row, acc) in tile.iter_mut().zip(acc) {
                for (h, &v) in acc.iter().enumerate() {
                    _mm512_storeu_ps(row.as_mut_ptr().add(16 * h), v);
                }
            }
            store_scalar(tile.as_flattened(), 32, alpha, beta, out);
        }
    }
}

/// [`store_avx512`] into a bf16 C (`TileOut::bf16`, rows contiguous): each lane rounded as
/// `round_bf16_avx512` rounds it and its high 16 bits kept (`vpmovdw`), 16 values in 32 bytes.
/// An integer rounding, not `vcvtneps2bf16`, which flushes subnormals: the same bits as every
/// other store.
///
/// # Safety
/// As for [`store_avx512`], with `out.cs == 1`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn store_avx512_bf16<const R: usize, const H: usize>(
    acc: &[[std::arch::x86_64::__m512; H]; R],
    alpha: f32,
    beta: f32,
    out: TileOut,
) {
    use std::arch::x86_64::*;
    let (va, vb) = (_mm512_set1_ps(alpha), _mm512_set1_ps(beta));
    let masks: [__mmask16; H] = std::array::from_fn(|h| {
        let n = out.cols.saturating_sub(16 * h).min(16) as u32;
        ((1u32 << n) - 1) as __mmask16
    });
    // SAFETY: only the rows × cols elements of the tile are read or written (masked lanes are
    // neither loaded nor stored), which the caller guarantees are inside C.
    unsafe {
        for (i, acc) in acc.iter().enumerate().take(out.rows) {
            let p = out.bf16_at(i, 0);
            for (h, (&v, &mask)) in acc.iter().zip(&masks).enumerate() {
                let ph = p.add(16 * h);
                let r = if beta == 0.0 {
                    _mm512_mul_ps(va, v)
                } else {
                    let old = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, ph as *const i16));
                    let old = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(old));
                    _mm512_fmadd_ps(vb, old, _mm512_mul_ps(va, v))
                };
                let r = match out.bias.is_null() {
                    true => r,
                    false => _mm512_add_ps(r, _mm512_maskz_loadu_ps(mask, out.bias.add(16 * h))),
                };
                let bits = _mm512_srli_epi32::<16>(_mm512_castps_si512(round_bf16_avx512(r)));
                _mm256_mask_storeu_epi16(ph as *mut i16, mask, _mm512_cvtepi32_epi16(bits));
            }
        }
    }
}

/// Each lane of `x` as bf16 stores it, kept as fp32 (`DType::Bf16.round`: ties to even, a NaN
/// quietened), for the stores' `TileOut::round`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) fn round_bf16_avx512(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let bits = _mm512_castps_si512(x);
    let high = _mm512_set1_epi32(0xffff_0000u32 as i32);
    let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
    let rounded = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
    let quiet = _mm512_or_si512(bits, _mm512_set1_epi32(0x0040_0000));
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
    _mm512_castsi512_ps(_mm512_and_si512(_mm512_mask_blend_epi32(nan, rounded, quiet), high))
}

/// [`round_bf16_avx512`] on 8 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
pub(super) fn round_bf16_avx2(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let bits = _mm256_castps_si256(x);
    let high = _mm256_set1_epi32(0xffff_0000u32 as i32);
    let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(bits), _mm256_set1_epi32(1));
    let rounded = _mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb));
    let quiet = _mm256_or_si256(bits, _mm256_set1_epi32(0x0040_0000));
    let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(x, x));
    _mm256_castsi256_ps(_mm256_and_si256(_mm256_blendv_epi8(rounded, quiet, nan), high))
}

/// [`store_avx512`] on a CPU with AVX-512 BF16 (the `Bf16Avx512` and AMX kernels): into a bf16
/// C in 2 bytes, each row's 32 values rounded and packed by one `vcvtne2ps2bf16`, a quarter of
/// the integer rounding's instructions. That instruction flushes a subnormal to zero, so a
/// row holding one is stored by the integer rounding: the same bits as every other store.
///
/// # Safety
/// As for [`store_avx512`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(super) unsafe fn store_avx512_native<const R: usize>(
    acc: &[[std::arch::x86_64::__m512; 2]; R],
    alpha: f32,
    beta: f32,
    out: TileOut,
) {
    use std::arch::x86_64::*;
    // SAFETY: only the rows × cols elements of the tile are read or written (masked lanes are
    // neither loaded nor stored), which the caller guarantees are inside C.
    unsafe {
        if !(out.bf16 && out.cs == 1) {
            return store_avx512(acc, alpha, beta, out);
        }
        let (va, vb) = (_mm512_set1_ps(alpha), _mm512_set1_ps(beta));
        let mask: __mmask32 = if out.cols >= 32 { u32::MAX } else { (1u32 << out.cols) - 1 };
        let (exponent, magnitude) = (_mm512_set1_epi32(0x7f80_0000), _mm512_set1_epi32(0x7fff_ffff));
        for (i, row) in acc.iter().enumerate().take(out.rows) {
            let p = out.bf16_at(i, 0);
            let mut v = [_mm512_mul_ps(va, row[0]), _mm512_mul_ps(va, row[1])];
            if beta != 0.0 {
                let old = _mm512_maskz_loadu_epi16(mask, p as *const i16);
                let low = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(old)));
                let high = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64::<1>(old)));
                v[0] = _mm512_fmadd_ps(vb, _mm512_castsi512_ps(low), v[0]);
                v[1] = _mm512_fmadd_ps(vb, _mm512_castsi512_ps(high), v[1]);
            }
            if !out.bias.is_null() {
                v[0] = _mm512_add_ps(v[0], _mm512_maskz_loadu_ps(mask as __mmask16, out.bias));
                v[1] = _mm512_add_ps(v[1], _mm512_maskz_loadu_ps((mask >> 16) as __mmask16, out.bias.add(16)));
            }
            let subnormal = |x: __m512| {
                let bits = _mm512_castps_si512(x);
                _mm512_testn_epi32_mask(bits, exponent) & _mm512_test_epi32_mask(bits, magnitude)
            };
            let packed = if subnormal(v[0]) | subnormal(v[1]) == 0 {
                std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(v[1], v[0]))
            } else {
                let [low, high] = v
                    .map(|x| _mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(_mm512_castps_si512(round_bf16_avx512(x)))));
                _mm512_inserti64x4::<1>(_mm512_castsi256_si512(low), high)
            };
            _mm512_mask_storeu_epi16(p as *mut i16, mask, packed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stores' rounding of a register (`TileOut::round`) is `DType::Bf16.round` bit for bit:
    /// ties either way, NaNs of either sign and payload (quiet or signalling), infinities,
    /// values that round past the largest bf16, subnormals, and random values; on each width
    /// this CPU runs.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn register_rounding_is_the_scalar_rounding() {
        use std::arch::x86_64::*;
        let bits = [0x3f80_8000u32, 0x3f81_8000, 0xbf80_8000, 0x7f80_0001, 0xffc0_0001, 0x7fff_ffff, 0x7f80_0000];
        let mut values: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
        values.extend([f32::MAX, -f32::MAX, 1e-40, -1e-45, 0.0, -0.0, f32::NEG_INFINITY, 65504.0]);
        let mut rng = crate::rng::Rng::new(41);
        values.extend((0..465).map(|_| rng.normal() as f32 * 1e3));
        let want: Vec<u32> = values.iter().map(|&x| DType::Bf16.round(x).to_bits()).collect();
        let mut got = vec![0f32; values.len()];
        if is_x86_feature_detected!("avx512f") {
            for (src, dst) in values.chunks_exact(16).zip(got.chunks_exact_mut(16)) {
                // SAFETY: the CPU has AVX-512 F (checked); 16 values each side.
                unsafe { _mm512_storeu_ps(dst.as_mut_ptr(), round_bf16_avx512(_mm512_loadu_ps(src.as_ptr()))) };
            }
            assert!(got.iter().zip(&want).all(|(g, w)| g.to_bits() == *w), "avx512");
        } else {
            println!("not run: the AVX-512 rounding (no AVX-512 F)");
        }
        if is_x86_feature_detected!("avx2") {
            got.fill(0.0);
            for (src, dst) in values.chunks_exact(8).zip(got.chunks_exact_mut(8)) {
                // SAFETY: the CPU has AVX2 (checked); 8 values each side.
                unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), round_bf16_avx2(_mm256_loadu_ps(src.as_ptr()))) };
            }
            assert!(got.iter().zip(&want).all(|(g, w)| g.to_bits() == *w), "avx2");
        } else {
            println!("not run: the AVX2 rounding (no AVX2)");
        }
    }
}
