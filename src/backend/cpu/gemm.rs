//! fp32 GEMM of our own: `C = alpha·op(A)·op(B) + beta·C`, every operand given by strides (so
//! the transposes and attention's per-head blocks cost no copy), the micro-kernel of the
//! active path (microkernel.rs, dispatch.rs).
//!
//! Blocking (Goto/BLIS): for each NC-wide column panel and KC-deep slice of k, B's KC × NC block
//! is packed into NR-wide slivers (16 KiB each at KC = 256, one stays in L1 across a column of
//! tiles); for each MC-tall row block, A's MC × KC block is packed into MR-tall slivers (96 KiB,
//! kept in Zen 3's 512 KiB L2) and every MR × NR tile of C is one micro-kernel call. The model's
//! shapes are tall-skinny activations [tokens, d] × [d, d] or [d, 4d] weights (k ≤ 1024: one
//! to four KC slices) and the GRU's 32-row recurrent GEMMs (one MC block). Packing buffers are
//! per thread and reused (no allocation per call). Parallel on the rayon pool over row blocks
//! of C, or over column blocks when there are too few rows (the GRU's 32).

use std::cell::RefCell;

use rayon::prelude::*;

use super::dispatch::{CpuPath, Kernels};
use super::microkernel::{self, MR, NR, TileOut};
use crate::backend::Gemm;

const KC: usize = 256;
const MC: usize = 16 * MR;
const NC: usize = 64 * NR;

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

/// Row-major `c[m, n] = alpha·op(a)·op(b) + beta·c` (the backend's `Gemm`).
///
/// # Panics
/// If a slice is shorter than its shape (the callers check shapes first).
pub fn gemm(kernels: Kernels, g: Gemm, a: &[f32], b: &[f32], c: &mut [f32]) {
    let Gemm { m, n, k, trans_a, trans_b, alpha, beta } = g;
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n, "gemm: operand shorter than its shape");
    let sa = if trans_a { Strided::transposed(m) } else { Strided::rows(k) };
    let sb = if trans_b { Strided::transposed(k) } else { Strided::rows(n) };
    // SAFETY: the strides address exactly a[..m·k], b[..k·n], c[..m·n], checked above; c is a
    // unique borrow, so it aliases neither a nor b.
    unsafe {
        gemm_strided(kernels, m, k, n, alpha, a.as_ptr(), sa, b.as_ptr(), sb, beta, c.as_mut_ptr(), Strided::rows(n))
    }
}

/// `c = alpha·a·b + beta·c` with a [m,k], b [k,n], c [m,n] given by their strides; used for
/// the per-(item, head) products of attention, read straight out of the packed qkv rows.
///
/// # Safety
/// Every addressed element must lie inside the allocation behind its pointer, `c` must not
/// alias `a` or `b`, and no two elements of `c` may share an address.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_strided(
    kernels: Kernels,
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
    if m == 0 || n == 0 {
        return;
    }
    let threads = rayon::current_num_threads();
    // Below ~1 M multiply-adds waking a second thread costs more than it saves.
    let (row_parts, col_parts) = if m * n * k < (1 << 20) || threads == 1 {
        (1, 1)
    } else if m >= 2 * MC {
        (threads.min(m.div_ceil(MC)), 1)
    } else {
        (1, threads.min(n.div_ceil(4 * NR)))
    };
    let rows_per = m.div_ceil(row_parts).next_multiple_of(MR);
    let cols_per = n.div_ceil(col_parts).next_multiple_of(NR);
    let (a, b, c) = (a as usize, b as usize, c as usize);
    let block = |part: usize| {
        let (i0, j0) = ((part / col_parts) * rows_per, (part % col_parts) * cols_per);
        let (rows, cols) = (rows_per.min(m.saturating_sub(i0)), cols_per.min(n.saturating_sub(j0)));
        if rows == 0 || cols == 0 {
            return;
        }
        // SAFETY: block (i0.., j0..) is inside the caller's matrices; the blocks of C are
        // disjoint, so each thread writes its own elements only.
        unsafe {
            let a = (a as *const f32).offset(i0 as isize * sa.rs);
            let b = (b as *const f32).offset(j0 as isize * sb.cs);
            let c = (c as *mut f32).offset(i0 as isize * sc.rs + j0 as isize * sc.cs);
            serial(kernels, rows, k, cols, alpha, a, sa, b, sb, beta, c, sc);
        }
    };
    let parts = row_parts * col_parts;
    if parts == 1 {
        block(0);
    } else {
        (0..parts).into_par_iter().for_each(block);
    }
}

thread_local! {
    /// This thread's packed A block and B panel, grown once to their largest size.
    static PACKED: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// One thread's GEMM: the blocking of the file header.
#[allow(clippy::too_many_arguments)]
unsafe fn serial(
    kernels: Kernels,
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
    if k == 0 {
        for i in 0..m as isize {
            for j in 0..n as isize {
                // SAFETY: (i, j) is inside C.
                unsafe {
                    let p = c.offset(i * sc.rs + j * sc.cs);
                    *p = if beta == 0.0 { 0.0 } else { beta * *p };
                }
            }
        }
        return;
    }
    let kernel: unsafe fn(usize, *const f32, *const f32, f32, f32, TileOut) = match kernels.path() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY (of calling it): `Kernels` for this path exists only on a CPU with AVX2 + FMA.
        CpuPath::Avx2 => microkernel::avx2,
        _ => microkernel::portable,
    };
    PACKED.with_borrow_mut(|(pa, pb)| {
        let kc_max = k.min(KC);
        pa.resize(pa.len().max(m.min(MC).next_multiple_of(MR) * kc_max), 0.0);
        pb.resize(pb.len().max(n.min(NC).next_multiple_of(NR) * kc_max), 0.0);
        for jc in (0..n).step_by(NC) {
            let nc = NC.min(n - jc);
            for pc in (0..k).step_by(KC) {
                let kc = KC.min(k - pc);
                // The first slice of k applies beta; the later ones add to what it wrote.
                let beta = if pc == 0 { beta } else { 1.0 };
                // SAFETY (all below): the packed blocks are read inside what was packed, and
                // every tile of C written is inside the m × n block.
                unsafe {
                    pack(pb, b.offset(pc as isize * sb.rs + jc as isize * sb.cs), sb.cs, sb.rs, nc, kc, NR);
                    for ic in (0..m).step_by(MC) {
                        let mc = MC.min(m - ic);
                        pack(pa, a.offset(ic as isize * sa.rs + pc as isize * sa.cs), sa.rs, sa.cs, mc, kc, MR);
                        for jr in (0..nc).step_by(NR) {
                            let bs = pb.as_ptr().add(jr * kc);
                            for ir in (0..mc).step_by(MR) {
                                let (i, j) = ((ic + ir) as isize, (jc + jr) as isize);
                                let out = TileOut {
                                    c: c.offset(i * sc.rs + j * sc.cs),
                                    rs: sc.rs,
                                    cs: sc.cs,
                                    rows: MR.min(mc - ir),
                                    cols: NR.min(nc - jr),
                                };
                                kernel(kc, pa.as_ptr().add(ir * kc), bs, alpha, beta, out);
                            }
                        }
                    }
                }
            }
        }
    });
}

/// Packs `len` lines (rows of A or columns of B; `line` steps from one to the next, `along`
/// along one) of `kc` elements into slivers of `w` lines: sliver s holds, for each p < kc,
/// lines s·w .. s·w + w at p, zero past the last line.
///
/// # Safety
/// Every element of the `len` × `kc` block lies inside the allocation behind `src`.
unsafe fn pack(dst: &mut [f32], src: *const f32, line: isize, along: isize, len: usize, kc: usize, w: usize) {
    for (s, sliver) in dst[..len.next_multiple_of(w) * kc].chunks_exact_mut(w * kc).enumerate() {
        let first = s * w;
        let lines = w.min(len - first);
        for (p, out) in sliver.chunks_exact_mut(w).enumerate() {
            // SAFETY: line first + l < len and p < kc are inside the block.
            let at = unsafe { src.offset(first as isize * line + p as isize * along) };
            for (l, o) in out.iter_mut().enumerate() {
                *o = if l < lines { unsafe { *at.offset(l as isize * line) } } else { 0.0 };
            }
        }
    }
}
