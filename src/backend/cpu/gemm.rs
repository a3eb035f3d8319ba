//! GEMM of our own: `C = alpha·op(A)·op(B) + beta·C` on fp32 operands, every operand given by
//! strides (so the transposes and attention's per-head blocks cost no copy), computed in fp32
//! or, with [`Precision::Bf16`], on operands rounded to bf16 while they are packed (products
//! exact, sums in fp32); the micro-kernel of the active path (microkernel.rs, dispatch.rs).
//!
//! Blocking (Goto/BLIS): for each NC-wide column panel and KC-deep slice of k, B's KC × NC block
//! is packed into NR-wide slivers (16 KiB each for 16 fp32 columns at KC = 256, one stays in L1
//! across a column of tiles); for each MC-tall row block, A's MC × KC block is packed into
//! MR-tall slivers (96–128 KiB, kept in L2: 512 KiB on Zen 3, 1 MiB on Zen 4) and every MR × NR
//! tile of C is one micro-kernel call. The model's
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
use super::microkernel::{Bf16, Bf16Portable, F32Portable, Micro, Packed, TileOut};
#[cfg(target_arch = "x86_64")]
use super::microkernel::{Bf16Avx512, F32Avx2, F32Avx512};
use crate::backend::{Gemm, Precision};

const KC: usize = 256;

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

/// Row-major `c[m, n] = alpha·op(a)·op(b) + beta·c` (the backend's `Gemm`) at `precision`.
///
/// # Panics
/// If a slice is shorter than its shape (the callers check shapes first).
pub fn gemm(kernels: Kernels, precision: Precision, g: Gemm, a: &[f32], b: &[f32], c: &mut [f32]) {
    gemm_bias(kernels, precision, g, a, b, None, c)
}

/// [`gemm`], then `bias` (n values) added to every row of c in the same pass: the micro-kernel
/// adds it where it stores the tile (`Backend::gemm_bias`, a linear layer's forward), so c is
/// not read and written again. The same value as [`gemm`] followed by `add_bias`, bit for bit.
///
/// # Panics
/// If a slice is shorter than its shape (the callers check shapes first).
pub fn gemm_bias(
    kernels: Kernels,
    precision: Precision,
    g: Gemm,
    a: &[f32],
    b: &[f32],
    bias: Option<&[f32]>,
    c: &mut [f32],
) {
    let Gemm { m, n, k, trans_a, trans_b, alpha, beta } = g;
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n, "gemm: operand shorter than its shape");
    assert!(bias.is_none_or(|b| b.len() >= n), "gemm: bias shorter than a row");
    let sa = if trans_a { Strided::transposed(m) } else { Strided::rows(k) };
    let sb = if trans_b { Strided::transposed(k) } else { Strided::rows(n) };
    let bias = bias.map_or(std::ptr::null(), <[f32]>::as_ptr);
    let (a, b, c, sc) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr(), Strided::rows(n));
    let p = Problem { m, k, n, alpha, a, sa, b, sb, beta, c, sc, bias };
    // SAFETY: the strides address exactly a[..m·k], b[..k·n], c[..m·n] and bias[..n], checked
    // above; c is a unique borrow, so it aliases none of the others.
    unsafe { solve(kernels, precision, p) }
}

/// `c = alpha·a·b + beta·c` at `precision` with a [m,k], b [k,n], c [m,n] given by their
/// strides; used for the per-(item, head) products of attention (in fp32), read straight out
/// of the packed qkv rows. bf16: `vdpbf16ps` where the CPU has AVX-512 BF16, the same products
/// widened to fp32 on every other path.
///
/// # Safety
/// Every addressed element must lie inside the allocation behind its pointer, `c` must not
/// alias `a` or `b`, and no two elements of `c` may share an address.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_strided(
    kernels: Kernels,
    precision: Precision,
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
    let p = Problem { m, k, n, alpha, a, sa, b, sb, beta, c, sc, bias: std::ptr::null() };
    // SAFETY: as the caller guarantees.
    unsafe { solve(kernels, precision, p) }
}

/// One problem on the micro-kernel of `precision` and the path of `kernels`.
///
/// # Safety
/// As for [`gemm_strided`]; a non-null bias holds n values.
unsafe fn solve(kernels: Kernels, precision: Precision, p: Problem) {
    // SAFETY (of each call): as the caller guarantees; `Kernels` for a path exists only on a
    // CPU with that path's features, and `bf16_native` only on one with AVX-512 F and BF16.
    unsafe {
        match (precision, kernels.path()) {
            #[cfg(target_arch = "x86_64")]
            (Precision::Bf16, _) if kernels.bf16_native() => run::<Bf16Avx512>(p),
            (Precision::Bf16, _) => run::<Bf16Portable>(p),
            #[cfg(target_arch = "x86_64")]
            (Precision::F32, CpuPath::Avx512 | CpuPath::Amx) => run::<F32Avx512>(p),
            #[cfg(target_arch = "x86_64")]
            (Precision::F32, CpuPath::Avx2) => run::<F32Avx2>(p),
            (Precision::F32, _) => run::<F32Portable>(p),
        }
    }
}

/// One call's operands (the arguments of [`gemm_strided`]).
#[derive(Clone, Copy)]
struct Problem {
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
    /// Added to every row of C with the last slice of k (null: none).
    bias: *const f32,
}

// SAFETY: a `Problem` is shared between the threads of one call, which read A and B and write
// disjoint blocks of C only (the blocking below).
unsafe impl Send for Problem {}
unsafe impl Sync for Problem {}

impl Problem {
    /// The sub-problem of rows i0.. (m rows) and columns j0.. (n columns), k from p0 (kc deep).
    ///
    /// # Safety
    /// The block lies inside the problem.
    unsafe fn block(self, i0: usize, m: usize, p0: usize, k: usize, j0: usize, n: usize) -> Problem {
        let (i, p, j) = (i0 as isize, p0 as isize, j0 as isize);
        // SAFETY: inside the operands, as the caller guarantees.
        unsafe {
            Problem {
                m,
                k,
                n,
                a: self.a.offset(i * self.sa.rs + p * self.sa.cs),
                b: self.b.offset(p * self.sb.rs + j * self.sb.cs),
                c: self.c.offset(i * self.sc.rs + j * self.sc.cs),
                bias: bias_at(self.bias, j),
                ..self
            }
        }
    }
}

/// The blocking of the file header with micro-kernel `K`, split over the rayon pool.
unsafe fn run<K: Micro>(p: Problem)
where
    K::Packed: Buffers,
{
    let Problem { m, k, n, .. } = p;
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        // SAFETY: as the caller guarantees for C and the bias.
        unsafe { scale(m, n, p.beta, p.c, p.sc, p.bias) };
        return;
    }
    let mc = 16 * K::MR;
    let threads = rayon::current_num_threads();
    // Below ~1 M multiply-adds waking a second thread costs more than it saves.
    let parallel = m * n * k >= (1 << 20) && threads > 1;
    // Row blocks share one packed B panel (packed by all threads together); only A is packed
    // per thread. With too few rows for that, column blocks, each thread packing its own part
    // of B; but the GRU's 32-row recurrent GEMMs stay on one thread (latency-bound: waking a
    // second one made them 2x slower, `cargo bench --bench cpu -- gemm/.*gru`, loaded VM).
    let row_parts = if parallel && m >= 2 * mc { threads.min(m.div_ceil(mc)) } else { 1 };
    let col_parts = if parallel && row_parts == 1 && m >= 64 { threads.min(n.div_ceil(4 * K::NR)) } else { 1 };
    if col_parts == 1 {
        // SAFETY: as the caller guarantees.
        unsafe { blocked::<K>(row_parts, p) };
        return;
    }
    let cols_per = n.div_ceil(col_parts).next_multiple_of(K::NR);
    (0..col_parts).into_par_iter().for_each(|part| {
        let j0 = part * cols_per;
        let cols = cols_per.min(n.saturating_sub(j0));
        if cols > 0 {
            // SAFETY: columns j0..j0 + cols of B and C are inside them; the blocks of C are
            // disjoint, so each thread writes its own elements only.
            unsafe { blocked::<K>(1, p.block(0, m, 0, k, j0, cols)) };
        }
    });
}

/// Where a packed element type keeps each thread's buffers.
trait Buffers: Packed {
    /// This thread's packed A block and B panel, grown once to their largest size.
    fn buffers() -> [&'static LocalKey<RefCell<Vec<Self>>>; 2];
}

macro_rules! buffers {
    ($t:ty, $a:ident, $b:ident) => {
        thread_local! {
            static $a: RefCell<Vec<$t>> = const { RefCell::new(Vec::new()) };
            static $b: RefCell<Vec<$t>> = const { RefCell::new(Vec::new()) };
        }
        impl Buffers for $t {
            fn buffers() -> [&'static LocalKey<RefCell<Vec<Self>>>; 2] {
                [&$a, &$b]
            }
        }
    };
}
buffers!(f32, F32_A, F32_B);
buffers!(Bf16, BF16_A, BF16_B);

/// Runs `f` on this thread's buffer `which` (0: A, 1: B), `len` elements from a 64-byte
/// boundary, or on a fresh one when the thread's is in use (a GEMM run by this thread while it
/// waits inside another's parallel loop).
fn with_buffer<T: Buffers, R>(which: usize, len: usize, f: impl FnOnce(&mut [T]) -> R) -> R {
    T::buffers()[which].with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => f(aligned(&mut buf, len)),
        Err(_) => f(aligned(&mut Vec::new(), len)),
    })
}

/// The bias of column j onwards (null stays null: no bias).
///
/// # Safety
/// A non-null bias holds column j.
unsafe fn bias_at(bias: *const f32, j: isize) -> *const f32 {
    // SAFETY: as the caller guarantees.
    if bias.is_null() { bias } else { unsafe { bias.offset(j) } }
}

/// `c = beta·c (+ bias)` (k = 0); beta = 0 writes zeros without reading c.
unsafe fn scale(m: usize, n: usize, beta: f32, c: *mut f32, sc: Strided, bias: *const f32) {
    for i in 0..m as isize {
        for j in 0..n as isize {
            // SAFETY: (i, j) is inside C, j inside a non-null bias.
            unsafe {
                let p = c.offset(i * sc.rs + j * sc.cs);
                *p = if beta == 0.0 { 0.0 } else { beta * *p };
                if !bias.is_null() {
                    *p += *bias.offset(j);
                }
            }
        }
    }
}

/// The blocking of the file header; each packed B panel's rows of C split over `row_parts`
/// threads (1: this thread alone).
unsafe fn blocked<K: Micro>(row_parts: usize, p: Problem)
where
    K::Packed: Buffers,
{
    let Problem { m, k, n, .. } = p;
    let (nr, nc_max) = (K::NR, 64 * K::NR);
    let rows_per = m.div_ceil(row_parts).next_multiple_of(K::MR);
    let panel = |nc: usize, kc: usize| nc.next_multiple_of(nr) * kc.next_multiple_of(K::KG);
    with_buffer::<K::Packed, _>(1, panel(n.min(nc_max), k.min(KC)), |pb| {
        for jc in (0..n).step_by(nc_max) {
            let nc = nc_max.min(n - jc);
            for pc in (0..k).step_by(KC) {
                let kc = KC.min(k - pc);
                // SAFETY: the kc × nc block at (pc, jc) is inside the problem.
                let slice = unsafe { p.block(0, m, pc, kc, jc, nc) };
                // The first slice of k applies beta, the later ones add to what it wrote, and
                // the last adds the bias (as `add_bias` after the product would).
                let beta = if pc == 0 { p.beta } else { 1.0 };
                let bias = if pc + kc == k { slice.bias } else { std::ptr::null() };
                let slice = Problem { beta, bias, ..slice };
                let pb = &mut pb[..panel(nc, kc)];
                let (line, along) = (slice.sb.cs, slice.sb.rs);
                if row_parts == 1 {
                    unsafe { pack::<K>(pb, slice.b, line, along, nc, kc, nr) };
                } else {
                    let per = nc.div_ceil(nr).div_ceil(row_parts) * nr;
                    pb.par_chunks_mut(panel(per, kc)).enumerate().for_each(|(i, dst)| {
                        let first = i * per;
                        // SAFETY: columns first.. (< nc) of the block.
                        unsafe {
                            let part = slice.block(0, 0, 0, kc, first, per.min(nc - first));
                            pack::<K>(dst, part.b, line, along, part.n, kc, nr);
                        }
                    });
                }
                let pb: &[K::Packed] = pb;
                let run = |part: usize| {
                    let i0 = part * rows_per;
                    let rows = rows_per.min(m.saturating_sub(i0));
                    if rows > 0 {
                        // SAFETY: rows i0.. of the slice are inside it; the parts write
                        // disjoint rows of C.
                        unsafe { rows_times_panel::<K>(slice.block(i0, rows, 0, kc, 0, nc), pb) };
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
unsafe fn rows_times_panel<K: Micro>(p: Problem, pb: &[K::Packed])
where
    K::Packed: Buffers,
{
    let Problem { m, k: kc, n: nc, sa, sc, .. } = p;
    let (mr, nr, mc_max) = (K::MR, K::NR, 16 * K::MR);
    let kp = kc.next_multiple_of(K::KG);
    with_buffer::<K::Packed, _>(0, m.min(mc_max).next_multiple_of(mr) * kp, |pa| {
        for ic in (0..m).step_by(mc_max) {
            let mc = mc_max.min(m - ic);
            // SAFETY (all below): the packed blocks are read inside what was packed, and
            // every tile of C written is inside the m × nc block.
            unsafe {
                pack::<K>(pa, p.a.offset(ic as isize * sa.rs), sa.rs, sa.cs, mc, kc, mr);
                for jr in (0..nc).step_by(nr) {
                    let bs = pb.as_ptr().add(jr * kp);
                    for ir in (0..mc).step_by(mr) {
                        let (i, j) = ((ic + ir) as isize, jr as isize);
                        let out = TileOut {
                            c: p.c.offset(i * sc.rs + j * sc.cs),
                            rs: sc.rs,
                            cs: sc.cs,
                            rows: mr.min(mc - ir),
                            cols: nr.min(nc - jr),
                            bias: bias_at(p.bias, jr as isize),
                        };
                        K::tile(kc, pa.as_ptr().add(ir * kp), bs, p.alpha, p.beta, out);
                    }
                }
            }
        }
    });
}

/// Packs `len` lines (rows of A or columns of B; `line` steps from one to the next, `along`
/// along one) of `kc` elements into slivers of `w` lines in `K`'s layout (microkernel.rs):
/// sliver s holds, for each group g of `K::KG` steps of k, lines s·w .. s·w + w, each line's
/// group together; zero past the last line and past kc.
///
/// # Safety
/// Every element of the `len` × `kc` block lies inside the allocation behind `src`, and the
/// CPU has the features of K's path (as for [`Micro::tile`]).
unsafe fn pack<K: Micro>(
    dst: &mut [K::Packed],
    src: *const f32,
    line: isize,
    along: isize,
    len: usize,
    kc: usize,
    w: usize,
) {
    let g = K::KG;
    let kp = kc.next_multiple_of(g);
    let zero = K::Packed::from_f32(0.0);
    // One run converted at a time (vectorised: `Micro::convert`), then placed.
    let mut run = [zero; if KC > 64 { KC } else { 64 }];
    // bf16 slivers' lines, converted whole before their transpose (below); unused, and
    // optimised away, for every other kernel.
    #[cfg(target_arch = "x86_64")]
    let mut words = [zero; 32 * KC];
    if line == 1 && along != 1 {
        // The lines side by side (B as stored, Aᵀ): step k in the outer loop, so that each
        // row of the source is read once, front to back, for every sliver. Sliver by sliver,
        // a transposed A (rows 3 KiB apart) fell into a few cache sets and missed L1 at every
        // step (the weight-gradient GEMM ran 1.7x torch.mm's time).
        let dst = &mut dst[..len.next_multiple_of(w) * kp];
        if !len.is_multiple_of(w) || kp > kc {
            dst.fill(zero);
        }
        #[cfg(target_arch = "x86_64")]
        if K::AVX_PACK && K::Packed::IS_F32 {
            // SAFETY: the path has AVX (`AVX_PACK`); an fp32 sliver is f32 (`IS_F32`, g = 1);
            // the block is inside `src` (pack's contract) and dst holds its slivers.
            unsafe { pack_side_by_side_avx(dst.as_mut_ptr() as *mut f32, src, along, len, kc, w) };
            return;
        }
        if g == 2 {
            // bf16: two steps of k at a time, each sliver's group row made by the kernel's
            // `interleave_pairs` (zeros for the second step past an odd kc).
            let zeros = [0.0f32; 32];
            // SAFETY: step q < kc of lines 0..len is inside the block.
            let step = |q: usize| unsafe { std::slice::from_raw_parts(src.offset(q as isize * along), len) };
            for p in (0..kc).step_by(2) {
                let (first, second) = (step(p), (p + 1 < kc).then(|| step(p + 1)));
                for s0 in (0..len).step_by(w) {
                    let lines = w.min(len - s0);
                    let out = &mut dst[s0 * kp + p * w..][..2 * lines];
                    let b = second.map_or(&zeros[..lines], |r| &r[s0..s0 + lines]);
                    // SAFETY: the CPU has K's features (pack's contract); out holds 2 · lines.
                    unsafe { K::interleave_pairs(&first[s0..s0 + lines], b, out) };
                }
            }
            return;
        }
        // fp32 on the portable path (g = 1): each step's lines copied into their slivers.
        for p in 0..kc {
            // SAFETY: step p of lines 0..len is inside the block.
            let row = unsafe { std::slice::from_raw_parts(src.offset(p as isize * along), len) };
            for s0 in (0..len).step_by(w) {
                place(&mut dst[s0 * kp + p * w..], &row[s0..w.min(len - s0) + s0]);
            }
        }
        return;
    }
    for (s, sliver) in dst[..len.next_multiple_of(w) * kp].chunks_exact_mut(w * kp).enumerate() {
        let first = s * w;
        let lines = w.min(len - first);
        // SAFETY (all reads): line first + l < len and p < kc are inside the block.
        let base = unsafe { src.offset(first as isize * line) };
        if lines < w || kp > kc {
            sliver.fill(zero);
        }
        if along == 1 {
            // Each line contiguous (A as stored, Bᵀ as the weights are): read along it.
            #[cfg(target_arch = "x86_64")]
            if K::AVX_PACK && K::Packed::IS_F32 && lines == w && w.is_multiple_of(8) {
                // SAFETY: the path has AVX (`AVX_PACK`); an fp32 sliver is f32 (`IS_F32`);
                // lines < len and p < kc are inside the block.
                unsafe {
                    let sliver = std::slice::from_raw_parts_mut(sliver.as_mut_ptr() as *mut f32, sliver.len());
                    pack_lines_avx(sliver, base, line, kc, w);
                }
                continue;
            }
            #[cfg(target_arch = "x86_64")]
            if K::AVX_PACK && g == 2 && size_of::<K::Packed>() == 2 && lines == w && w.is_multiple_of(8) && w <= 32 {
                // bf16: each line converted whole into `words` (a pair of k is one 32-bit word,
                // the unit a `vdpbf16ps` lane takes), then the words transposed 8 × 8 as fp32
                // lines are: moves of 32-bit patterns, never arithmetic on them.
                for l in 0..w {
                    let from = unsafe { std::slice::from_raw_parts(base.offset(l as isize * line), kc) };
                    // SAFETY: the CPU has K's features (pack's contract).
                    unsafe { K::convert(from, &mut words[l * kp..l * kp + kc]) };
                    if kp > kc {
                        words[l * kp + kc] = zero;
                    }
                }
                // SAFETY: the path has AVX (`AVX_PACK`); `words` holds w lines of kp / 2 words
                // and the sliver kp / 2 · w words (2-byte elements, g = 2).
                unsafe {
                    let out = std::slice::from_raw_parts_mut(sliver.as_mut_ptr() as *mut f32, sliver.len() / 2);
                    pack_lines_avx(out, words.as_ptr() as *const f32, (kp / 2) as isize, kp / 2, w);
                }
                continue;
            }
            for l in 0..lines {
                let from = unsafe { std::slice::from_raw_parts(base.offset(l as isize * line), kc) };
                if K::Packed::IS_F32 {
                    for (p, &v) in from.iter().enumerate() {
                        sliver[p * w + l] = K::Packed::from_f32(v);
                    }
                    continue;
                }
                let per = run.len();
                for (p0, chunk) in from.chunks(per).enumerate().map(|(c, ch)| (c * per, ch)) {
                    // SAFETY: the CPU has K's features (pack's contract).
                    unsafe { K::convert(chunk, &mut run[..chunk.len()]) };
                    for (i, &v) in run[..chunk.len()].iter().enumerate() {
                        let p = p0 + i;
                        sliver[(p / g * w + l) * g + p % g] = v;
                    }
                }
            }
        } else {
            for p in 0..kc {
                let out = &mut sliver[p / g * w * g + p % g..];
                for l in 0..lines {
                    out[l * g] = K::Packed::from_f32(unsafe { *base.offset(l as isize * line + p as isize * along) });
                }
            }
        }
    }
}

/// `out[i] = lines[i]`, with the slivers' usual widths as fixed sizes (moved in registers;
/// a length known only at run time became a `memmove` call per 8 floats).
#[inline(always)]
fn place<T: Packed>(out: &mut [T], lines: &[f32]) {
    fn fixed<T: Packed, const N: usize>(out: &mut [T], lines: &[f32; N]) {
        for (o, &v) in out[..N].iter_mut().zip(lines) {
            *o = T::from_f32(v);
        }
    }
    if let Ok(l) = <&[f32; 8]>::try_from(lines) {
        fixed(out, l)
    } else if let Ok(l) = <&[f32; 32]>::try_from(lines) {
        fixed(out, l)
    } else if let Ok(l) = <&[f32; 16]>::try_from(lines) {
        fixed(out, l)
    } else {
        for (o, &v) in out.iter_mut().zip(lines) {
            *o = T::from_f32(v);
        }
    }
}

/// fp32 lines side by side (B as stored, Aᵀ): step p of all `len` lines is one contiguous run
/// of the source, moved into row p of each `w`-wide sliver 8 floats to a register. Copied in
/// Rust, each sliver row became a libc `memcpy` call: 11 % of attention's time, whose
/// per-head products are 36 × 64 × 36 (`place`, the portable paths' version).
///
/// # Safety
/// The CPU has AVX; steps 0..kc of lines 0..len are inside `src`; `dst` holds
/// ⌈len / w⌉ slivers of kc · w floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn pack_side_by_side_avx(dst: *mut f32, src: *const f32, along: isize, len: usize, kc: usize, w: usize) {
    use std::arch::x86_64::*;
    // SAFETY: as the caller guarantees: reads run p, elements < len; writes row p < kc,
    // columns < w, of sliver s0 / w.
    unsafe {
        for p in 0..kc {
            let run = src.offset(p as isize * along);
            for s0 in (0..len).step_by(w) {
                let (out, from, lines) = (dst.add(s0 * kc + p * w), run.add(s0), w.min(len - s0));
                let mut l = 0;
                while l + 8 <= lines {
                    _mm256_storeu_ps(out.add(l), _mm256_loadu_ps(from.add(l)));
                    l += 8;
                }
                for l in l..lines {
                    *out.add(l) = *from.add(l);
                }
            }
        }
    }
}

/// A full fp32 sliver of `w` (a multiple of 8) contiguous lines, `line` apart: 8 × 8 blocks
/// (8 lines × 8 steps of k) loaded as rows and stored transposed, the k steps past the last
/// whole block one by one. Packing this way (the activations, and the weights used
/// transposed, are read along k) took a sixth of `query`'s time element by element.
///
/// # Safety
/// The CPU has AVX; lines < w and k < kc are inside the allocation behind `base`, and
/// `sliver` holds kc · w floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn pack_lines_avx(sliver: &mut [f32], base: *const f32, line: isize, kc: usize, w: usize) {
    use std::arch::x86_64::*;
    assert!(sliver.len() >= kc * w);
    let k8 = kc / 8 * 8;
    let out = sliver.as_mut_ptr();
    // SAFETY: as the caller guarantees; stores go to rows p < kc, columns l < w of the sliver.
    unsafe {
        for l0 in (0..w).step_by(8) {
            let row = |i: usize| base.offset((l0 + i) as isize * line);
            for p0 in (0..k8).step_by(8) {
                let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(row(i).add(p0)));
                let t0 = _mm256_unpacklo_ps(r[0], r[1]);
                let t1 = _mm256_unpackhi_ps(r[0], r[1]);
                let t2 = _mm256_unpacklo_ps(r[2], r[3]);
                let t3 = _mm256_unpackhi_ps(r[2], r[3]);
                let t4 = _mm256_unpacklo_ps(r[4], r[5]);
                let t5 = _mm256_unpackhi_ps(r[4], r[5]);
                let t6 = _mm256_unpacklo_ps(r[6], r[7]);
                let t7 = _mm256_unpackhi_ps(r[6], r[7]);
                // s_j: k steps j and j + 4 of lines 0..4 (s0..s3) or 4..8 (s4..s7).
                let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
                let s1 = _mm256_shuffle_ps::<0xee>(t0, t2);
                let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
                let s3 = _mm256_shuffle_ps::<0xee>(t1, t3);
                let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
                let s5 = _mm256_shuffle_ps::<0xee>(t4, t6);
                let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
                let s7 = _mm256_shuffle_ps::<0xee>(t5, t7);
                let cols = [
                    _mm256_permute2f128_ps::<0x20>(s0, s4),
                    _mm256_permute2f128_ps::<0x20>(s1, s5),
                    _mm256_permute2f128_ps::<0x20>(s2, s6),
                    _mm256_permute2f128_ps::<0x20>(s3, s7),
                    _mm256_permute2f128_ps::<0x31>(s0, s4),
                    _mm256_permute2f128_ps::<0x31>(s1, s5),
                    _mm256_permute2f128_ps::<0x31>(s2, s6),
                    _mm256_permute2f128_ps::<0x31>(s3, s7),
                ];
                for (i, c) in cols.into_iter().enumerate() {
                    _mm256_storeu_ps(out.add((p0 + i) * w + l0), c);
                }
            }
            for p in k8..kc {
                for i in 0..8 {
                    *out.add(p * w + l0 + i) = *row(i).add(p);
                }
            }
        }
    }
}

/// `buf` grown to hold `len` elements from a 64-byte boundary (a packed B row of one sliver is
/// a whole number of cache lines, so no load of the micro-kernel splits two), and that part.
fn aligned<T: Packed>(buf: &mut Vec<T>, len: usize) -> &mut [T] {
    let per_line = 64 / size_of::<T>();
    if buf.len() < len + per_line {
        buf.resize(len + per_line, T::default());
    }
    let skip = buf.as_ptr().align_offset(64).min(per_line - 1);
    &mut buf[skip..skip + len]
}
