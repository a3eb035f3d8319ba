//! Row-major SGEMM through `matrixmultiply` (packed AVX2/FMA micro-kernels), parallel over
//! row blocks of C on the rayon pool. Transposes are expressed as strides, so no operand is
//! ever copied. One thread pool for everything: matrixmultiply's own threading competed with
//! rayon for the same two cores (≈10% of a step went to sched_yield).

use rayon::prelude::*;

use crate::backend::Gemm;

pub fn gemm(g: Gemm, a: &[f32], b: &[f32], c: &mut [f32]) {
    let Gemm { m, n, k, trans_a, trans_b, alpha, beta } = g;
    debug_assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    // Strides (row, col) of op(a) [m, k] and op(b) [k, n].
    let (rsa, csa) = if trans_a { (1, m as isize) } else { (k as isize, 1) };
    let (rsb, csb) = if trans_b { (1, k as isize) } else { (n as isize, 1) };
    // Below ~1 M multiply-adds, or for the 32-row recurrent GEMMs of the GRU, waking the
    // second thread costs more than it saves.
    let parts = if m * n * k < (1 << 20) || m < 64 { 1 } else { rayon::current_num_threads().min(m / 8).max(1) };
    let rows_per = m.div_ceil(parts).next_multiple_of(8);
    let (a_addr, b_addr) = (a.as_ptr() as usize, b.as_ptr() as usize);
    let block = |(i, c): (usize, &mut [f32])| {
        let rows = c.len() / n;
        // SAFETY: a, b, c hold at least m·k, k·n, m·n elements (the callers check shapes; see
        // the debug assertion); row block i·rows_per.. of op(a) starts at that row times rsa
        // and every element it addresses stays inside a; c is exactly this block's rows.
        unsafe {
            let a = (a_addr as *const f32).offset((i * rows_per) as isize * rsa);
            let b = b_addr as *const f32;
            matrixmultiply::sgemm(rows, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c.as_mut_ptr(), n as isize, 1);
        }
    };
    if parts == 1 {
        block((0, &mut c[..m * n]));
    } else {
        c[..m * n].par_chunks_mut(rows_per * n).enumerate().for_each(block);
    }
}

/// A matrix inside a larger buffer: element (i, j) is at `ptr[i·rs + j·cs]`.
#[derive(Clone, Copy)]
pub struct Strided {
    pub rs: isize,
    pub cs: isize,
}

impl Strided {
    pub const fn rows(rs: usize) -> Self {
        Strided { rs: rs as isize, cs: 1 }
    }
    /// The transpose of a row-major matrix with row stride `rs`.
    pub const fn transposed(rs: usize) -> Self {
        Strided { rs: 1, cs: rs as isize }
    }
}

/// `c = alpha·a·b + beta·c` with a [m,k], b [k,n], c [m,n] given by their strides; used for
/// the per-(item, head) products of attention, read straight out of the packed qkv rows.
///
/// # Safety
/// Every addressed element must lie inside the allocation behind its pointer, and `c` must
/// not alias `a` or `b`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_strided(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: *const f32,
    sa: Strided,
    b: *const f32,
    sb: Strided,
    beta: f32,
    c: *mut f32,
    sc: Strided,
) {
    unsafe { matrixmultiply::sgemm(m, k, n, alpha, a, sa.rs, sa.cs, b, sb.rs, sb.cs, beta, c, sc.rs, sc.cs) }
}
