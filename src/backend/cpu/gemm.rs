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
//! per thread, 64-byte aligned and reused (no allocation per call). Parallel on the rayon pool:
//! the threads pack each B panel together and then take row blocks of C against it (B is
//! packed once, not once per thread), or, with fewer rows, column blocks (the GRU's 32-row
//! recurrent GEMMs run on one thread: latency-bound).

use std::cell::RefCell;
use std::thread::LocalKey;

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
    if k == 0 {
        // SAFETY: as the caller guarantees for C.
        unsafe { scale(m, n, beta, c, sc) };
        return;
    }
    let kernel: Micro = match kernels.path() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY (of calling it): `Kernels` for this path exists only on a CPU with AVX2 + FMA.
        CpuPath::Avx2 => microkernel::avx2,
        _ => microkernel::portable,
    };
    let threads = rayon::current_num_threads();
    // Below ~1 M multiply-adds waking a second thread costs more than it saves.
    let parallel = m * n * k >= (1 << 20) && threads > 1;
    // Row blocks share one packed B panel (packed by all threads together); only A is packed
    // per thread. With too few rows for that, column blocks, each thread packing its own part
    // of B; but the GRU's 32-row recurrent GEMMs stay on one thread (latency-bound: waking a
    // second one made them 2x slower, `cargo bench --bench cpu -- gemm/.*gru`, loaded VM).
    let row_parts = if parallel && m >= 2 * MC { threads.min(m.div_ceil(MC)) } else { 1 };
    let col_parts = if parallel && row_parts == 1 && m >= 64 { threads.min(n.div_ceil(4 * NR)) } else { 1 };
    if col_parts == 1 {
        // SAFETY: as the caller guarantees.
        unsafe { blocked(kernel, row_parts, m, k, n, alpha, a, sa, b, sb, beta, c, sc) };
        return;
    }
    let cols_per = n.div_ceil(col_parts).next_multiple_of(NR);
    let (a, b, c) = (a as usize, b as usize, c as usize);
    (0..col_parts).into_par_iter().for_each(|part| {
        let j0 = part * cols_per;
        let cols = cols_per.min(n.saturating_sub(j0));
        if cols > 0 {
            // SAFETY: columns j0..j0 + cols of B and C are inside them; the blocks of C are
            // disjoint, so each thread writes its own elements only.
            unsafe {
                let b = (b as *const f32).offset(j0 as isize * sb.cs);
                let c = (c as *mut f32).offset(j0 as isize * sc.cs);
                blocked(kernel, 1, m, k, cols, alpha, a as *const f32, sa, b, sb, beta, c, sc);
            }
        }
    });
}

type Micro = unsafe fn(usize, *const f32, *const f32, f32, f32, TileOut);

thread_local! {
    /// This thread's packed A block and B panel, grown once to their largest size.
    static PACKED_A: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static PACKED_B: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on this thread's buffer, `len` floats from a 64-byte boundary, or on a fresh one
/// when the thread's is in use (a GEMM run by this thread while it waits inside another's
/// parallel loop).
fn with_buffer<R>(key: &'static LocalKey<RefCell<Vec<f32>>>, len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => f(aligned(&mut buf, len)),
        Err(_) => f(aligned(&mut Vec::new(), len)),
    })
}

/// `c = beta·c` (k = 0); beta = 0 writes zeros without reading c.
unsafe fn scale(m: usize, n: usize, beta: f32, c: *mut f32, sc: Strided) {
    for i in 0..m as isize {
        for j in 0..n as isize {
            // SAFETY: (i, j) is inside C.
            unsafe {
                let p = c.offset(i * sc.rs + j * sc.cs);
                *p = if beta == 0.0 { 0.0 } else { beta * *p };
            }
        }
    }
}

/// The blocking of the file header; each packed B panel's rows of C split over `row_parts`
/// threads (1: this thread alone).
#[allow(clippy::too_many_arguments)]
unsafe fn blocked(
    kernel: Micro,
    row_parts: usize,
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
    let rows_per = m.div_ceil(row_parts).next_multiple_of(MR);
    let (a, c) = (a as usize, c as usize);
    with_buffer(&PACKED_B, n.min(NC).next_multiple_of(NR) * k.min(KC), |pb| {
        for jc in (0..n).step_by(NC) {
            let nc = NC.min(n - jc);
            for pc in (0..k).step_by(KC) {
                let kc = KC.min(k - pc);
                // The first slice of k applies beta; the later ones add to what it wrote.
                let beta = if pc == 0 { beta } else { 1.0 };
                let pb = &mut pb[..nc.next_multiple_of(NR) * kc];
                // SAFETY: the KC × NC block of B at (pc, jc) is inside B.
                let src = unsafe { b.offset(pc as isize * sb.rs + jc as isize * sb.cs) } as usize;
                if row_parts == 1 {
                    unsafe { pack(pb, src as *const f32, sb.cs, sb.rs, nc, kc, NR) };
                } else {
                    let per = nc.div_ceil(NR).div_ceil(row_parts) * NR;
                    pb.par_chunks_mut(per * kc).enumerate().for_each(|(i, dst)| {
                        let first = i * per;
                        // SAFETY: columns first.. (< nc) of the block.
                        unsafe {
                            let src = (src as *const f32).offset(first as isize * sb.cs);
                            pack(dst, src, sb.cs, sb.rs, per.min(nc - first), kc, NR);
                        }
                    });
                }
                let pb: &[f32] = pb;
                let run = |part: usize| {
                    let i0 = part * rows_per;
                    let rows = rows_per.min(m.saturating_sub(i0));
                    if rows == 0 {
                        return;
                    }
                    // SAFETY: rows i0.. of A's slice pc.. and of C's panel jc.. are inside
                    // them; the parts write disjoint rows of C.
                    unsafe {
                        let a = (a as *const f32).offset(i0 as isize * sa.rs + pc as isize * sa.cs);
                        let c = (c as *mut f32).offset(i0 as isize * sc.rs + jc as isize * sc.cs);
                        rows_times_panel(kernel, rows, kc, nc, alpha, a, sa, pb, beta, c, sc);
                    }
                };
                if row_parts == 1 {
                    run(0);
                } else {
                    (0..row_parts).into_par_iter().for_each(run);
                }
            }
        }
    });
}

/// C[m, nc] = alpha·A[m, kc]·B + beta·C for one packed B panel, A packed MC rows at a time;
/// every MR × NR tile of C one micro-kernel call.
#[allow(clippy::too_many_arguments)]
unsafe fn rows_times_panel(
    kernel: Micro,
    m: usize,
    kc: usize,
    nc: usize,
    alpha: f32,
    a: *const f32,
    sa: Strided,
    pb: &[f32],
    beta: f32,
    c: *mut f32,
    sc: Strided,
) {
    with_buffer(&PACKED_A, m.min(MC).next_multiple_of(MR) * kc, |pa| {
        for ic in (0..m).step_by(MC) {
            let mc = MC.min(m - ic);
            // SAFETY (all below): the packed blocks are read inside what was packed, and
            // every tile of C written is inside the m × nc block.
            unsafe {
                pack(pa, a.offset(ic as isize * sa.rs), sa.rs, sa.cs, mc, kc, MR);
                for jr in (0..nc).step_by(NR) {
                    let bs = pb.as_ptr().add(jr * kc);
                    for ir in (0..mc).step_by(MR) {
                        let (i, j) = ((ic + ir) as isize, jr as isize);
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
        // SAFETY (all reads): line first + l < len and p < kc are inside the block.
        let base = unsafe { src.offset(first as isize * line) };
        if lines < w {
            sliver.fill(0.0);
        }
        if along == 1 {
            // Each line contiguous (A as stored, Bᵀ as the weights are): read along it.
            for l in 0..lines {
                let from = unsafe { std::slice::from_raw_parts(base.offset(l as isize * line), kc) };
                for (p, &v) in from.iter().enumerate() {
                    sliver[p * w + l] = v;
                }
            }
        } else if line == 1 {
            // The lines side by side (B as stored, Aᵀ): copy a run of `lines` per p.
            for (p, out) in sliver.chunks_exact_mut(w).enumerate() {
                let from = unsafe { std::slice::from_raw_parts(base.offset(p as isize * along), lines) };
                out[..lines].copy_from_slice(from);
            }
        } else {
            for (p, out) in sliver.chunks_exact_mut(w).enumerate() {
                for (l, o) in out[..lines].iter_mut().enumerate() {
                    *o = unsafe { *base.offset(l as isize * line + p as isize * along) };
                }
            }
        }
    }
}

/// `buf` grown to hold `len` floats from a 64-byte boundary (a packed B row of 16 floats is
/// one cache line, so no load of the micro-kernel splits two), and that aligned part.
fn aligned(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buf.len() < len + 16 {
        buf.resize(len + 16, 0.0);
    }
    let skip = buf.as_ptr().align_offset(64).min(15);
    &mut buf[skip..skip + len]
}
