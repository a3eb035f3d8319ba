//! The GEMM micro-kernels: one MR × NR tile of C from a packed A sliver (kc × MR, column after
//! column) and a packed B sliver (kc × NR, row after row), `C = alpha·A·B + beta·C`.
//! `beta == 0` never reads C (it may hold garbage or NaN). Blocking and packing: gemm.rs.
//!
//! 6 × 16 on AVX2 + FMA: 12 accumulators of 8 floats, 2 registers of B and one broadcast of A
//! make 15 of the 16 ymm registers; each step of k is 12 FMAs for 3 loads.

pub const MR: usize = 6;
pub const NR: usize = 16;

/// Where one tile of C goes: `c[i·rs + j·cs]` for i < rows ≤ MR, j < cols ≤ NR.
#[derive(Clone, Copy)]
pub struct TileOut {
    pub c: *mut f32,
    pub rs: isize,
    pub cs: isize,
    pub rows: usize,
    pub cols: usize,
}

/// Writes an accumulated tile through `out`, scaled by alpha and added to beta·C.
///
/// # Safety
/// Every element of `out` (rows × cols) lies inside C's allocation.
#[inline(always)]
unsafe fn store_scalar(acc: &[[f32; NR]; MR], alpha: f32, beta: f32, out: TileOut) {
    for (i, row) in acc.iter().enumerate().take(out.rows) {
        for (j, &v) in row.iter().enumerate().take(out.cols) {
            // SAFETY: (i, j) is inside the tile, which the caller guarantees is in bounds.
            unsafe {
                let p = out.c.offset(i as isize * out.rs + j as isize * out.cs);
                *p = if beta == 0.0 { alpha * v } else { alpha * v + beta * *p };
            }
        }
    }
}

/// Plain Rust: the compiler vectorises the 16-wide rows for whatever the target guarantees.
///
/// # Safety
/// `a` holds kc·MR floats, `b` kc·NR, and `out` is in bounds.
pub unsafe fn portable(kc: usize, a: *const f32, b: *const f32, alpha: f32, beta: f32, out: TileOut) {
    // SAFETY: the caller guarantees the packed slivers' lengths.
    let (a, b) = unsafe { (std::slice::from_raw_parts(a, kc * MR), std::slice::from_raw_parts(b, kc * NR)) };
    let mut acc = [[0f32; NR]; MR];
    for (ap, bp) in a.chunks_exact(MR).zip(b.chunks_exact(NR)) {
        for (row, &ai) in acc.iter_mut().zip(ap) {
            for (c, &bj) in row.iter_mut().zip(bp) {
                *c += ai * bj;
            }
        }
    }
    unsafe { store_scalar(&acc, alpha, beta, out) }
}

/// AVX2 + FMA.
///
/// # Safety
/// As [`portable`], and the CPU has AVX2 and FMA (the caller holds `Kernels` for that path).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn avx2(kc: usize, a: *const f32, b: *const f32, alpha: f32, beta: f32, out: TileOut) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); 2]; MR];
    // SAFETY: step p reads a[p·MR .. +MR] and b[p·NR .. +NR], inside the slivers.
    unsafe {
        for p in 0..kc {
            let bp = b.add(p * NR);
            let (b0, b1) = (_mm256_loadu_ps(bp), _mm256_loadu_ps(bp.add(8)));
            let ap = a.add(p * MR);
            for (i, acc) in acc.iter_mut().enumerate() {
                let ai = _mm256_broadcast_ss(&*ap.add(i));
                acc[0] = _mm256_fmadd_ps(ai, b0, acc[0]);
                acc[1] = _mm256_fmadd_ps(ai, b1, acc[1]);
            }
        }
        if out.rows == MR && out.cols == NR && out.cs == 1 {
            let (va, vb) = (_mm256_set1_ps(alpha), _mm256_set1_ps(beta));
            for (i, acc) in acc.iter().enumerate() {
                let p = out.c.offset(i as isize * out.rs);
                for (h, &v) in acc.iter().enumerate() {
                    let ph = p.add(8 * h);
                    let r = if beta == 0.0 {
                        _mm256_mul_ps(va, v)
                    } else {
                        _mm256_fmadd_ps(vb, _mm256_loadu_ps(ph), _mm256_mul_ps(va, v))
                    };
                    _mm256_storeu_ps(ph, r);
                }
            }
        } else {
            let mut tile = [[0f32; NR]; MR];
            for (row, acc) in tile.iter_mut().zip(&acc) {
                _mm256_storeu_ps(row.as_mut_ptr(), acc[0]);
                _mm256_storeu_ps(row.as_mut_ptr().add(8), acc[1]);
            }
            store_scalar(&tile, alpha, beta, out);
        }
    }
}
