//! GEMM of our own: `C = alpha·op(A)·op(B) + beta·C` on fp32 operands, every operand given by
//! strides (so the transposes and attention's per-head blocks cost no copy), computed in fp32
//! or, with [`Precision::Bf16`], on operands rounded to bf16 while they are packed (products
//! exact, sums in fp32); the micro-kernel of the active path (microkernel.rs, dispatch.rs).
//!
//! Blocking (Goto/BLIS; KC is the kernel's `Micro::KC`: 256, AMX's 512): for each NC-wide
//! column panel and KC-deep slice of k, B's KC × NC block
//! is packed into NR-wide slivers (16 KiB each for 16 fp32 columns at KC = 256, one stays in L1
//! across a column of tiles); for each MC-tall row block, A's MC × KC block is packed into
//! MR-tall slivers (96–128 KiB, kept in L2: 512 KiB on Zen 3, 1 MiB on Zen 4) and every MR × NR
//! tile of C is one micro-kernel call. The AVX fp32 kernels read A's rows where they lie when
//! they run along k (activations as stored; `Micro::tile_rows`), packing only a last partial
//! sliver: a packed copy of the same values cost 3 % of the fp32 embedding. The model's
//! shapes are tall-skinny activations [tokens, d] × [d, d] or [d, 4d] weights (k ≤ 1024: one
//! to four KC slices) and the GRU's 32-row recurrent GEMMs (one MC block). Packing buffers are
//! per thread, 64-byte aligned and reused (no allocation per call). Parallel on the rayon pool:
//! with one slice of k the threads pack each B panel together and then take row blocks of C
//! against it (B is packed once, not once per thread); with several (weight gradients) each
//! thread takes its rows of C and packs its own B, so that a slice costs no barrier; with fewer
//! rows, column blocks (the GRU's 32-row recurrent GEMMs run on one thread: latency-bound).

use std::cell::RefCell;
use std::sync::Arc;
use std::thread::LocalKey;

use rayon::prelude::*;

use crate::tensor::DType;

#[cfg(target_arch = "x86_64")]
use super::amx::Bf16Amx;
use super::dispatch::{CpuPath, Kernels};
use super::microkernel::{Bf16, Bf16OnF32, F32Portable, Micro, Packed};
#[cfg(target_arch = "x86_64")]
use super::microkernel::{Bf16Avx512, F32Avx2, F32Avx512};
pub use super::operands::{Input, Output, Strided};
use super::pack::{Source, aligned, pack};
use super::store::TileOut;
use crate::backend::{Gemm, Precision};

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
    gemm_packed(kernels, precision, g, Input::F32(a), Input::F32(b), None, bias, Output::F32(c, DType::F32))
}

/// [`gemm_bias`] with B's slivers taken from `packed` (made by [`PackedB::new`] from this `b`,
/// for this `g` and kernel) instead of packed on every call: a frozen model's weights
/// (`Backend::freeze`). Bit for bit the same result, since the slivers are the same. A bf16 c
/// ([`Output`]) has each value rounded once, after its last slice of k and its bias, by the
/// micro-kernel's store as it writes the tile: a pass over c afterwards cost 8 % of the
/// training step's GEMM time, and one per block of c 15–20 % of an AMX product (session 31).
///
/// A 2-byte bf16 c gets the same bits as a rounded f32 one. With more than one slice of k its
/// partial sums cannot wait in it (each would be rounded): they wait in an f32 copy of a
/// block of its rows, narrowed once (`deep_bf16`).
///
/// # Panics
/// If a slice is shorter than its shape, or `packed` was made for another shape or kernel.
#[allow(clippy::too_many_arguments)]
pub fn gemm_packed(
    kernels: Kernels,
    precision: Precision,
    g: Gemm,
    a: Input,
    b: Input,
    packed: Option<&PackedB>,
    bias: Option<&[f32]>,
    c: Output,
) {
    let Gemm { m, n, k, trans_a, alpha, beta, .. } = g;
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n, "gemm: operand shorter than its shape");
    assert!(bias.is_none_or(|b| b.len() >= n), "gemm: bias shorter than a row");
    let kernel = Kernel::of(kernels, precision);
    assert!(packed.is_none_or(|pb| pb.fits(g, kernel)), "gemm: B was packed for another shape or kernel");
    let sa = if trans_a { Strided::transposed(m) } else { Strided::rows(k) };
    let sb = Strided::of_b(g);
    let (c, round, c_bf16) = match c {
        Output::F32(c, store) => (c.as_mut_ptr(), store == DType::Bf16, false),
        Output::Bf16(c) => (c.as_mut_ptr() as *mut f32, true, true),
    };
    let bias = bias.map_or(std::ptr::null(), <[f32]>::as_ptr);
    let pre = packed.map(|pb| Prepacked { base: pb.as_ptr(), cols: pb.cols, j: 0 });
    let (a, b, sc) = (a.source(), b.source(), Strided::rows(n));
    let p = Problem { m, k, n, alpha, a, sa, b, sb, beta, c, sc, bias, pre, round, c_bf16 };
    // SAFETY: the strides address exactly a[..m·k], b[..k·n], c[..m·n] and bias[..n], checked
    // above; c is a unique borrow, so it aliases none of the others; `packed` holds B's
    // slivers for `kernel`, the one `solve` runs (checked above).
    unsafe { solve(kernels, precision, p) }
}

/// Rows of a bf16 C in 2 bytes made at a time through an f32 copy when k takes several slices
/// (`deep_bf16`): 256 KiB of f32 at n = 256, kept in L2.
const DEEP_ROWS: usize = 256;

/// B of a layer's GEMMs as the CPU backend multiplies by it: the path and precision they run
/// at, and B's slivers when it was packed beforehand (a frozen weight; None: packed per call).
#[derive(Clone)]
pub struct Operand<'a> {
    pub kernels: Kernels,
    pub precision: Precision,
    pub b: Input<'a>,
    pub packed: Option<Arc<PackedB>>,
}

impl Operand<'_> {
    /// `c = alpha·op(a)·op(b) + beta·c (+ bias)` ([`gemm_packed`]).
    pub fn gemm(&self, g: Gemm, a: &[f32], bias: Option<&[f32]>, c: &mut [f32]) {
        self.gemm_stored(g, a, bias, c, DType::F32);
    }

    /// [`Operand::gemm`] into a c of type `store` ([`gemm_packed`]).
    pub fn gemm_stored(&self, g: Gemm, a: &[f32], bias: Option<&[f32]>, c: &mut [f32], store: DType) {
        self.gemm_typed(g, Input::F32(a), bias, Output::F32(c, store));
    }

    /// [`Operand::gemm`] with A and C as the CPU holds them ([`gemm_packed`]).
    pub fn gemm_typed(&self, g: Gemm, a: Input, bias: Option<&[f32]>, c: Output) {
        gemm_packed(self.kernels, self.precision, g, a, self.b, self.packed.as_deref(), bias, c);
    }
}

/// The micro-kernel a call runs on: the precision's on the path (`solve`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    Bf16Amx,
    Bf16Avx512,
    /// bf16 operands on the fp32 kernel of the path (no bf16 unit: `Bf16OnF32`).
    Bf16OnAvx512,
    Bf16OnAvx2,
    Bf16OnPortable,
    F32Avx512,
    F32Avx2,
    F32Portable,
}

impl Kernel {
    /// The kernel for `precision` on this path. TF32 has no CPU unit: `Cpu` refuses it, so
    /// only a direct caller of the kernels gets here with it, and gets fp32.
    pub fn of(kernels: Kernels, precision: Precision) -> Kernel {
        let precision = if precision == Precision::Tf32 { Precision::F32 } else { precision };
        match (precision, kernels.path()) {
            #[cfg(target_arch = "x86_64")]
            (Precision::Bf16, CpuPath::Amx) => Kernel::Bf16Amx,
            #[cfg(target_arch = "x86_64")]
            (Precision::Bf16, _) if kernels.bf16_native() => Kernel::Bf16Avx512,
            #[cfg(target_arch = "x86_64")]
            (Precision::Bf16, CpuPath::Avx512) => Kernel::Bf16OnAvx512,
            #[cfg(target_arch = "x86_64")]
            (Precision::Bf16, CpuPath::Avx2) => Kernel::Bf16OnAvx2,
            (Precision::Bf16, _) => Kernel::Bf16OnPortable,
            #[cfg(target_arch = "x86_64")]
            (Precision::F32, CpuPath::Avx512 | CpuPath::Amx) => Kernel::F32Avx512,
            #[cfg(target_arch = "x86_64")]
            (Precision::F32, CpuPath::Avx2) => Kernel::F32Avx2,
            (_, _) => Kernel::F32Portable,
        }
    }
}

/// B of `C = op(A)·op(B)` packed once for one kernel: for each slice of k, the slivers of
/// all its columns, each panel of them laid out as `blocked` packs it on every call.
/// A frozen model's weights (`Backend::freeze`) keep theirs across calls: in fp32 the pack
/// is a transpose of Wᵀ, in bf16 also the conversion, both once per weight instead of once
/// per GEMM.
pub struct PackedB {
    kernel: Kernel,
    k: usize,
    n: usize,
    trans_b: bool,
    /// Columns of a slice, padded to whole slivers.
    cols: usize,
    data: PackedData,
    /// Elements before the first (64-byte aligned) one.
    skip: usize,
}

/// The slivers of a [`PackedB`], of the kernel's element type.
enum PackedData {
    F32(Vec<f32>),
    Bf16(Vec<Bf16>),
}

impl std::fmt::Debug for PackedB {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedB({:?}, k {}, n {}, trans_b {})", self.kernel, self.k, self.n, self.trans_b)
    }
}

impl PackedB {
    /// `b` (k × n for `g`, transposed as `g.trans_b` says) packed for the kernel `gemm` runs
    /// at `precision`; None when the memory for it cannot be had (the caller packs per call).
    ///
    /// # Panics
    /// If `b` is shorter than its shape.
    pub fn new(kernels: Kernels, precision: Precision, g: Gemm, b: Input) -> Option<PackedB> {
        assert!(b.len() >= g.k * g.n, "gemm: operand shorter than its shape");
        let kernel = Kernel::of(kernels, precision);
        // SAFETY (each): `Kernels` proves the CPU has the kernel's features; b holds k · n.
        unsafe {
            match kernel {
                #[cfg(target_arch = "x86_64")]
                Kernel::Bf16Amx => PackedB::pack_as::<Bf16Amx>(kernel, g, b),
                #[cfg(target_arch = "x86_64")]
                Kernel::Bf16Avx512 => PackedB::pack_as::<Bf16Avx512>(kernel, g, b),
                #[cfg(target_arch = "x86_64")]
                Kernel::Bf16OnAvx512 => PackedB::pack_as::<Bf16OnF32<F32Avx512>>(kernel, g, b),
                #[cfg(target_arch = "x86_64")]
                Kernel::Bf16OnAvx2 => PackedB::pack_as::<Bf16OnF32<F32Avx2>>(kernel, g, b),
                Kernel::Bf16OnPortable => PackedB::pack_as::<Bf16OnF32<F32Portable>>(kernel, g, b),
                #[cfg(target_arch = "x86_64")]
                Kernel::F32Avx512 => PackedB::pack_as::<F32Avx512>(kernel, g, b),
                #[cfg(target_arch = "x86_64")]
                Kernel::F32Avx2 => PackedB::pack_as::<F32Avx2>(kernel, g, b),
                Kernel::F32Portable => PackedB::pack_as::<F32Portable>(kernel, g, b),
                #[cfg(not(target_arch = "x86_64"))]
                _ => unreachable!("x86 kernels exist only on x86"),
            }
        }
    }

    /// # Safety
    /// The CPU has K's features; b holds k · n.
    unsafe fn pack_as<K: Micro>(kernel: Kernel, g: Gemm, b: Input) -> Option<PackedB>
    where
        K::Packed: Buffers,
    {
        let Gemm { k, n, trans_b, .. } = g;
        let sb = Strided::of_b(g);
        let cols = n.next_multiple_of(K::NR);
        let len = (0..k).step_by(K::KC).map(|pc| cols * K::B.padded(K::KC.min(k - pc))).sum::<usize>();
        let per_line = 64 / size_of::<K::Packed>();
        let mut buf = Vec::new();
        buf.try_reserve_exact(len + per_line).ok()?;
        let slivers = aligned::<K::Packed>(&mut buf, len);
        for pc in (0..k).step_by(K::KC) {
            let kc = K::KC.min(k - pc);
            // SAFETY: the kc × n block at row pc is inside b; the CPU has K's features.
            unsafe {
                let src = b.source().offset(pc as isize * sb.rs);
                pack::<K>(&mut slivers[pc / K::KC * cols * K::KC..], src, sb.cs, sb.rs, n, kc, K::NR, K::B);
            }
        }
        // Where `aligned` put the first element (the buffer was not moved since).
        let skip = buf.as_ptr().align_offset(64).min(per_line - 1);
        Some(PackedB { kernel, k, n, trans_b, cols, data: K::Packed::wrap(buf), skip })
    }

    /// Whether this is B of `g` for `kernel`.
    pub fn fits(&self, g: Gemm, kernel: Kernel) -> bool {
        (self.kernel, self.k, self.n, self.trans_b) == (kernel, g.k, g.n, g.trans_b)
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match &self.data {
            PackedData::F32(v) => v.len() * 4,
            PackedData::Bf16(v) => v.len() * 2,
        }
    }

    fn as_ptr(&self) -> *const () {
        match &self.data {
            PackedData::F32(v) => v[self.skip..].as_ptr() as *const (),
            PackedData::Bf16(v) => v[self.skip..].as_ptr() as *const (),
        }
    }
}

/// B's slivers packed beforehand ([`PackedB`]): slice `pc` (a multiple of the kernel's KC)
/// starts at `pc / KC · cols · KC` elements, column j of a slice kc deep at `j · kc` (rounded to the
/// kernel's group) from there; this problem's first column is the packed B's column `j`.
#[derive(Clone, Copy)]
struct Prepacked {
    base: *const (),
    cols: usize,
    j: usize,
}

/// `c = alpha·a·b + beta·c` at `precision` with a `[m, k]`, b `[k, n]`, c `[m, n]` given by their
/// strides; used for the per-(item, head) products of attention (in fp32), read straight out
/// of the packed qkv rows. bf16: `vdpbf16ps` where the CPU has AVX-512 BF16, the same products
/// on the path's fp32 kernel everywhere else.
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
    let (a, b) = (Source::F32(a), Source::F32(b));
    let (bias, pre, round, c_bf16) = (std::ptr::null(), None, false, false);
    let p = Problem { m, k, n, alpha, a, sa, b, sb, beta, c, sc, bias, pre, round, c_bf16 };
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
        match Kernel::of(kernels, precision) {
            #[cfg(target_arch = "x86_64")]
            Kernel::Bf16Amx => run::<Bf16Amx>(p),
            #[cfg(target_arch = "x86_64")]
            Kernel::Bf16Avx512 => run::<Bf16Avx512>(p),
            #[cfg(target_arch = "x86_64")]
            Kernel::Bf16OnAvx512 => run::<Bf16OnF32<F32Avx512>>(p),
            #[cfg(target_arch = "x86_64")]
            Kernel::Bf16OnAvx2 => run::<Bf16OnF32<F32Avx2>>(p),
            Kernel::Bf16OnPortable => run::<Bf16OnF32<F32Portable>>(p),
            #[cfg(target_arch = "x86_64")]
            Kernel::F32Avx512 => run::<F32Avx512>(p),
            #[cfg(target_arch = "x86_64")]
            Kernel::F32Avx2 => run::<F32Avx2>(p),
            Kernel::F32Portable => run::<F32Portable>(p),
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("x86 kernels exist only on x86"),
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
    a: Source,
    sa: Strided,
    b: Source,
    sb: Strided,
    beta: f32,
    /// C's first element: an f32, or with `c_bf16` a u16.
    c: *mut f32,
    sc: Strided,
    /// Added to every row of C with the last slice of k (null: none).
    bias: *const f32,
    /// B's slivers, if packed beforehand (then `b` is not read).
    pre: Option<Prepacked>,
    /// C is stored as bf16: each value rounded once, after the last slice of k (and the bias).
    round: bool,
    /// C holds bf16 values in 2 bytes (`TileOut::bf16`; several slices of k: `deep_bf16`).
    c_bf16: bool,
}

// SAFETY: a `Problem` is shared between the threads of one call, which read A and B and write
// disjoint blocks of C only (the blocking below).
unsafe impl Send for Problem {}
unsafe impl Sync for Problem {}

impl Problem {
    /// The sub-problem of rows i0.. (m rows) and columns j0.. (n columns), k from p0 (kc deep).
    ///
    /// # Safety
    /// The block lies inside the problem; with B packed beforehand, it starts at k = 0 or is
    /// only a slice `blocked` multiplies (whose B it takes from the whole problem's).
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
                c: self.c_at(i * self.sc.rs + j * self.sc.cs),
                bias: bias_at(self.bias, j),
                pre: self.pre.map(|pre| Prepacked { j: pre.j + j0, ..pre }),
                ..self
            }
        }
    }
}

impl Problem {
    /// C's element `elements` on from the first, whichever its type.
    ///
    /// # Safety
    /// That element lies inside C.
    unsafe fn c_at(&self, elements: isize) -> *mut f32 {
        // SAFETY: as the caller guarantees.
        unsafe {
            match self.c_bf16 {
                true => (self.c as *mut u16).offset(elements) as *mut f32,
                false => self.c.offset(elements),
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
        unsafe {
            if p.c_bf16 {
                scale_bf16(m, n, p.beta, p.c as *mut u16, p.sc, p.bias);
                return;
            }
            scale(m, n, p.beta, p.c, p.sc, p.bias);
            if p.round {
                round_rows(p.c, p.sc, m, n);
            }
        }
        return;
    }
    let mc = 16 * K::MR;
    let threads = rayon::current_num_threads();
    // Below ~1 M multiply-adds waking a second thread costs more than it saves.
    let parallel = m * n * k >= (1 << 20) && threads > 1;
    if p.c_bf16 && k > K::KC {
        // C's partial sums cannot wait in 2 bytes (each slice's would be rounded): each
        // thread takes its rows and makes them through an f32 copy, DEEP_ROWS at a time with
        // B packed beforehand (the copy stays in L2), all at once otherwise (B is packed per
        // block). The same products in the same order: the same bits.
        let parts = if parallel { threads.min(m.div_ceil(K::MR)) } else { 1 };
        // SAFETY: rows i0.. of the problem are inside it; the parts write disjoint rows of C.
        for_parts(m, parts, K::MR, |i0, rows| unsafe { deep_bf16::<K>(p.block(i0, rows, 0, k, 0, n)) });
        return;
    }
    // Row blocks share one packed B panel (packed by all threads together); only A is packed
    // per thread. With too few rows for that, column blocks, each thread packing its own part
    // of B; but the GRU's 32-row recurrent GEMMs stay on one thread (latency-bound: waking a
    // second one made them 2x slower, `cargo bench --bench cpu -- gemm/.*gru`, loaded VM).
    // Rows are split from 2 × 256 on, even where MC is taller (AMX: 512): split by columns,
    // each thread packed all of A, and a 768-row bf16 product took 1.35–1.75× `torch.mm`'s
    // time on two threads, against 1.0–1.1× by rows (Xeon VM, session 36).
    let row_parts = if parallel && m >= 2 * mc.min(256) { threads.min(m.div_ceil(mc)) } else { 1 };
    let col_parts = if parallel && row_parts == 1 && m >= 64 { threads.min(n.div_ceil(4 * K::NR)) } else { 1 };
    if row_parts > 1 && k > K::KC {
        // More than one slice of k (weight gradients: k = tokens): one parallel region, each
        // thread its own rows and its own packed B. Sharing B cost two barriers per slice,
        // each a wait for the slower core, and half of every panel came from the other core's
        // cache; packing B twice costs 2/m of the work (`cpu_profile`, Zen 4 VM, session 17).
        // SAFETY: rows i0.. of the problem are inside it; the parts write disjoint rows of C.
        for_parts(m, row_parts, K::MR, |i0, rows| unsafe { blocked::<K>(1, p.block(i0, rows, 0, k, 0, n)) });
        return;
    }
    if col_parts == 1 {
        // SAFETY: as the caller guarantees.
        unsafe { blocked::<K>(row_parts, p) };
        return;
    }
    // SAFETY: columns j0..j0 + cols of B and C are inside them; the blocks of C are disjoint,
    // so each thread writes its own elements only.
    for_parts(n, col_parts, K::NR, |j0, cols| unsafe { blocked::<K>(1, p.block(0, m, 0, k, j0, cols)) });
}

/// A bf16 C in 2 bytes with several slices of k, on this thread (`run`).
///
/// # Safety
/// As for [`run`]'s problem, whose C holds bf16 (`c_bf16`).
unsafe fn deep_bf16<K: Micro>(p: Problem)
where
    K::Packed: Buffers,
{
    let Problem { m, n, .. } = p;
    let block = if p.pre.is_some() { DEEP_ROWS.min(m) } else { m };
    let mut wide = crate::tensor::host_pool::dirty(block * n);
    for i0 in (0..m).step_by(block) {
        let rows = block.min(m - i0);
        // SAFETY: rows i0.. (rows of them) are inside the problem.
        let part = unsafe { p.block(i0, rows, 0, p.k, 0, n) };
        let c = part.c as *mut u16;
        // SAFETY (each use): (i, j) is inside the part's rows × n block of C.
        let at = |i: usize, j: usize| unsafe { c.offset(i as isize * p.sc.rs + j as isize * p.sc.cs) };
        if p.beta != 0.0 {
            for i in 0..rows {
                for j in 0..n {
                    // SAFETY: as `at`'s.
                    wide[i * n + j] = f32::from_bits((unsafe { *at(i, j) } as u32) << 16);
                }
            }
        }
        let sc = Strided::rows(n);
        // SAFETY: `wide` holds the part's rows × n, as C with row stride n.
        unsafe { blocked::<K>(1, Problem { c: wide.as_mut_ptr(), sc, round: true, c_bf16: false, ..part }) };
        for (i, row) in wide.chunks_exact(n).take(rows).enumerate() {
            if p.sc.cs == 1 {
                // SAFETY: row i's n elements of C are contiguous.
                let out = unsafe { std::slice::from_raw_parts_mut(at(i, 0), n) };
                super::simd::vectorised!(out.iter_mut().zip(row).for_each(|(v, &w)| *v = (w.to_bits() >> 16) as u16));
            } else {
                // SAFETY: as `at`'s.
                row.iter().enumerate().for_each(|(j, &w)| unsafe { *at(i, j) = (w.to_bits() >> 16) as u16 });
            }
        }
    }
    crate::tensor::host_pool::give(wide);
}

/// `f(start, len)` on each of `parts` consecutive pieces of `0..total`, each piece but the
/// last a multiple of `unit` long (an empty one skipped), on the rayon pool when there are
/// several.
fn for_parts(total: usize, parts: usize, unit: usize, f: impl Fn(usize, usize) + Sync) {
    let per = total.div_ceil(parts).next_multiple_of(unit);
    let piece = |part: usize| {
        let start = part * per;
        let len = per.min(total.saturating_sub(start));
        if len > 0 {
            f(start, len);
        }
    };
    if parts == 1 { piece(0) } else { (0..parts).into_par_iter().for_each(piece) }
}

/// Where a packed element type keeps each thread's buffers.
trait Buffers: Packed {
    /// This thread's packed A block and B panel, grown once to their largest size.
    fn buffers() -> [&'static LocalKey<RefCell<Vec<Self>>>; 2];
    /// Slivers of this type as a [`PackedB`] keeps them.
    fn wrap(slivers: Vec<Self>) -> PackedData;
}

macro_rules! buffers {
    ($t:ty, $a:ident, $b:ident, $variant:ident) => {
        thread_local! {
            static $a: RefCell<Vec<$t>> = const { RefCell::new(Vec::new()) };
            static $b: RefCell<Vec<$t>> = const { RefCell::new(Vec::new()) };
        }
        impl Buffers for $t {
            fn buffers() -> [&'static LocalKey<RefCell<Vec<Self>>>; 2] {
                [&$a, &$b]
            }
            fn wrap(slivers: Vec<Self>) -> PackedData {
                PackedData::$variant(slivers)
            }
        }
    };
}
buffers!(f32, F32_A, F32_B, F32);
buffers!(Bf16, BF16_A, BF16_B, Bf16);

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

/// [`scale`] into a bf16 C in 2 bytes, each value rounded once.
unsafe fn scale_bf16(m: usize, n: usize, beta: f32, c: *mut u16, sc: Strided, bias: *const f32) {
    for i in 0..m as isize {
        for j in 0..n as isize {
            // SAFETY: (i, j) is inside C, j inside a non-null bias.
            unsafe {
                let p = c.offset(i * sc.rs + j * sc.cs);
                let mut x = if beta == 0.0 { 0.0 } else { beta * f32::from_bits((*p as u32) << 16) };
                if !bias.is_null() {
                    x += *bias.offset(j);
                }
                *p = crate::tensor::bf16_bits(x);
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
    let panel = |nc: usize, kc: usize| nc.next_multiple_of(nr) * K::B.padded(kc);
    let own = if p.pre.is_some() { 0 } else { panel(n.min(nc_max), k.min(K::KC)) };
    with_buffer::<K::Packed, _>(1, own, |pb| {
        for jc in (0..n).step_by(nc_max) {
            let nc = nc_max.min(n - jc);
            for pc in (0..k).step_by(K::KC) {
                let kc = K::KC.min(k - pc);
                // SAFETY: the kc × nc block at (pc, jc) is inside the problem.
                let slice = unsafe { p.block(0, m, pc, kc, jc, nc) };
                // The first slice of k applies beta, the later ones add to what it wrote, and
                // the last adds the bias (as `add_bias` after the product would).
                let beta = if pc == 0 { p.beta } else { 1.0 };
                let last = pc + kc == k;
                let bias = if last { slice.bias } else { std::ptr::null() };
                let slice = Problem { beta, bias, round: p.round && last, ..slice };
                let pb: &[K::Packed] = match p.pre {
                    // SAFETY: `pre` holds every panel of B packed for K (`gemm_packed`);
                    // columns pre.j + jc .. + nc of slice pc are inside it.
                    Some(pre) => unsafe {
                        let at = pc / K::KC * pre.cols * K::KC + (pre.j + jc) * K::B.padded(kc);
                        std::slice::from_raw_parts((pre.base as *const K::Packed).add(at), panel(nc, kc))
                    },
                    None => {
                        let pb = &mut pb[..panel(nc, kc)];
                        let (line, along) = (slice.sb.cs, slice.sb.rs);
                        if row_parts == 1 {
                            unsafe { pack::<K>(pb, slice.b, line, along, nc, kc, nr, K::B) };
                        } else {
                            let per = nc.div_ceil(nr).div_ceil(row_parts) * nr;
                            pb.par_chunks_mut(panel(per, kc)).enumerate().for_each(|(i, dst)| {
                                let first = i * per;
                                // SAFETY: columns first.. (< nc) of the block.
                                unsafe {
                                    let part = slice.block(0, 0, 0, kc, first, per.min(nc - first));
                                    pack::<K>(dst, part.b, line, along, part.n, kc, nr, K::B);
                                }
                            });
                        }
                        pb
                    }
                };
                // SAFETY: rows i0.. of the slice are inside it; the parts write disjoint rows
                // of C.
                for_parts(m, row_parts, K::MR, |i0, rows| unsafe {
                    rows_times_panel::<K>(slice.block(i0, rows, 0, kc, 0, nc), pb)
                });
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
    let (kpa, kpb) = (K::A.padded(kc), K::B.padded(kc));
    // A's rows read where they lie when they run along k: only a last, partial sliver is
    // packed (the kernel reads MR whole rows).
    let rows_a = K::ROWS_A && sa.cs == 1 && matches!(p.a, Source::F32(_));
    // A bf16 A's rows too, where the kernel can (AMX, rows on lines: `Micro::column_rows`).
    let rows_bf16 = sa.cs == 1 && matches!(p.a, Source::Bf16(a) if K::reads_bf16_rows(a, sa.rs as usize, kc));
    with_buffer::<K::Packed, _>(0, m.min(mc_max).next_multiple_of(mr) * kpa, |pa| {
        for ic in (0..m).step_by(mc_max) {
            let mc = mc_max.min(m - ic);
            let whole = if rows_a || rows_bf16 { mc - mc % mr } else { 0 };
            // SAFETY (all below): the packed blocks are read inside what was packed, A's
            // whole slivers inside A, and every tile of C written is inside the m × nc block.
            unsafe {
                let rest = p.a.offset((ic + whole) as isize * sa.rs);
                if whole < mc {
                    pack::<K>(pa, rest, sa.rs, sa.cs, mc - whole, kc, mr, K::A);
                }
                for jr in (0..nc).step_by(nr) {
                    let bs = pb.as_ptr().add(jr * kpb);
                    let out_at = |ir: usize| {
                        let (i, j) = ((ic + ir) as isize, jr as isize);
                        TileOut {
                            c: p.c_at(i * sc.rs + j * sc.cs),
                            rs: sc.rs,
                            cs: sc.cs,
                            rows: mr.min(mc - ir),
                            cols: nr.min(nc - jr),
                            bias: bias_at(p.bias, j),
                            round: p.round,
                            bf16: p.c_bf16,
                        }
                    };
                    match p.a {
                        Source::F32(a) => {
                            for ir in (0..whole).step_by(mr) {
                                let out = out_at(ir);
                                out.prefetch();
                                K::tile_rows(
                                    kc,
                                    a.offset((ic + ir) as isize * sa.rs),
                                    sa.rs as usize,
                                    bs,
                                    p.alpha,
                                    p.beta,
                                    out,
                                );
                            }
                        }
                        Source::Bf16(a) if whole > 0 => {
                            let rows = (0..whole).step_by(mr).map(out_at);
                            let a = a.offset(ic as isize * sa.rs);
                            K::column_rows(kc, a, sa.rs as usize, bs, p.alpha, p.beta, rows);
                        }
                        Source::Bf16(_) => {}
                    }
                    let packed = (whole..mc).step_by(mr).map(out_at);
                    K::column(kc, pa.as_ptr(), mr * kpa, bs, p.alpha, p.beta, packed);
                }
            }
        }
    });
}

/// Rows × cols of C from `c` (strides `sc`) rounded to bf16 in place.
///
/// # Safety
/// Every element addressed lies in C, which no other thread reads or writes meanwhile.
unsafe fn round_rows(c: *mut f32, sc: Strided, rows: usize, cols: usize) {
    for i in 0..rows as isize {
        // SAFETY: as the caller guarantees.
        let row = unsafe { c.offset(i * sc.rs) };
        if sc.cs == 1 {
            // SAFETY: the row's `cols` elements are contiguous in C.
            let row = unsafe { std::slice::from_raw_parts_mut(row, cols) };
            super::simd::vectorised!(DType::Bf16.round_all(row));
        } else {
            for j in 0..cols as isize {
                // SAFETY: as the caller guarantees.
                unsafe {
                    let x = row.offset(j * sc.cs);
                    *x = DType::Bf16.round(*x);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::microkernel::F32Unit;
    use super::*;

    /// bf16 on a path's fp32 kernel is that kernel on the operands rounded to bf16, bit for
    /// bit (the rounding is all `Bf16OnF32` adds), on every fp32 kernel this CPU runs, whether
    /// or not dispatch picks it (`Bf16OnF32<F32Avx512>` serves only a CPU with AVX-512 but no
    /// AVX-512 BF16); operands transposed or not, B packed per call or beforehand, with a bias.
    #[test]
    fn bf16_on_an_fp32_kernel_is_that_kernel_on_rounded_operands() {
        unsafe fn both<K: F32Unit>(name: &str, kernel: Kernel)
        where
            f32: Buffers,
        {
            let mut rng = crate::rng::Rng::new(23);
            let round = |x: &[f32]| x.iter().map(|&v| Bf16::from_f32(v).to_f32()).collect::<Vec<_>>();
            for (m, k, n) in [(1, 1, 1), (7, 300, 17), (70, 513, 50), (130, 33, 1030)] {
                for (trans_a, trans_b) in [(false, false), (false, true), (true, false), (true, true)] {
                    let a: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
                    let b: Vec<f32> = (0..k * n).map(|_| rng.normal() as f32).collect();
                    let bias: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
                    let g = Gemm { m, n, k, trans_a, trans_b, alpha: 0.5, beta: 0.0 };
                    let problem = |a: &[f32], b: &[f32], c: &mut [f32], pre: Option<&PackedB>| Problem {
                        m,
                        k,
                        n,
                        alpha: g.alpha,
                        a: Source::F32(a.as_ptr()),
                        sa: if trans_a { Strided::transposed(m) } else { Strided::rows(k) },
                        b: Source::F32(b.as_ptr()),
                        sb: Strided::of_b(g),
                        beta: 0.0,
                        c: c.as_mut_ptr(),
                        sc: Strided::rows(n),
                        bias: bias.as_ptr(),
                        pre: pre.map(|pb| Prepacked { base: pb.as_ptr(), cols: pb.cols, j: 0 }),
                        round: false,
                        c_bf16: false,
                    };
                    let (mut want, mut got) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
                    let (ra, rb) = (round(&a), round(&b));
                    // SAFETY (each): the operands hold their shapes; the CPU has K's features
                    // (the caller checked); the packed B was made from b for this kernel.
                    unsafe {
                        run::<K>(problem(&ra, &rb, &mut want, None));
                        run::<Bf16OnF32<K>>(problem(&a, &b, &mut got, None));
                        assert_eq!(got, want, "{name}: {m}×{k}×{n} trans {trans_a} {trans_b}");
                        let packed = PackedB::pack_as::<Bf16OnF32<K>>(kernel, g, Input::F32(&b)).unwrap();
                        got.fill(f32::NAN);
                        run::<Bf16OnF32<K>>(problem(&a, &b, &mut got, Some(&packed)));
                        assert_eq!(got, want, "{name} packed beforehand: {m}×{k}×{n} trans {trans_a} {trans_b}");
                    }
                }
            }
            println!("ran: Bf16OnF32<{name}>");
        }
        // SAFETY (each): the CPU has the kernel's features (checked).
        unsafe { both::<F32Portable>("F32Portable", Kernel::Bf16OnPortable) };
        #[cfg(target_arch = "x86_64")]
        {
            match CpuPath::Avx2.kernels() {
                Ok(_) => unsafe { both::<F32Avx2>("F32Avx2", Kernel::Bf16OnAvx2) },
                Err(why) => println!("not run: Bf16OnF32<F32Avx2> ({why})"),
            }
            match CpuPath::Avx512.kernels() {
                Ok(_) => unsafe { both::<F32Avx512>("F32Avx512", Kernel::Bf16OnAvx512) },
                Err(why) => println!("not run: Bf16OnF32<F32Avx512> ({why})"),
            }
        }
    }

    /// A bf16 output is the f32 output rounded once, bit for bit: the rounding comes after the
    /// last slice of k and the bias, on every block, whichever split the call takes (rows,
    /// columns, one thread, several KC slices and NC panels, k = 0), at each precision.
    #[test]
    fn a_bf16_output_is_the_f32_output_rounded_once() {
        let kernels = crate::backend::cpu::dispatch::active().unwrap();
        let mut rng = crate::rng::Rng::new(29);
        let shapes = [(1, 1, 1), (130, 513, 1030), (300, 70, 257), (40, 2100, 33), (200, 5, 0), (7, 3, 600)];
        for precision in [Precision::F32, Precision::Bf16] {
            for (m, n, k) in shapes {
                for (trans_a, trans_b) in [(false, true), (true, false)] {
                    let v = |len: usize, rng: &mut crate::rng::Rng| (0..len).map(|_| rng.normal() as f32).collect();
                    let (a, b, bias, c0): (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) =
                        (v(m * k, &mut rng), v(k * n, &mut rng), v(n, &mut rng), v(m * n, &mut rng));
                    let c0: Vec<f32> = c0.iter().map(|&x| DType::Bf16.round(x)).collect();
                    let g = Gemm { m, n, k, trans_a, trans_b, alpha: 0.75, beta: 0.5 };
                    let op = Operand { kernels, precision, b: Input::F32(&b), packed: None };
                    for bias in [None, Some(&bias[..])] {
                        let (mut want, mut got) = (c0.clone(), c0.clone());
                        op.gemm(g, &a, bias, &mut want);
                        want.iter_mut().for_each(|x| *x = DType::Bf16.round(*x));
                        op.gemm_stored(g, &a, bias, &mut got, DType::Bf16);
                        let what = format!(
                            "{} {m}×{k}×{n} trans {trans_a} {trans_b} bias {}",
                            precision.name(),
                            bias.is_some()
                        );
                        assert!(got.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()), "{what}");
                    }
                }
            }
        }
    }

    /// A, B and C in 2 bytes give the bits of the f32 form of the same bf16 values (operands
    /// holding rounded f32s, C rounded once): on every path this CPU runs, at each precision,
    /// A as stored or transposed, B f32 or 2 bytes and packed per call or beforehand, with and
    /// without a bias, beta 0 or not, one slice of k or several (C's partial sums in f32),
    /// k = 0, edge tiles, subnormal results.
    #[test]
    fn two_byte_bf16_operands_give_the_bits_of_rounded_f32s() {
        use crate::backend::cpu::dispatch::CpuPath;
        let bits = |x: &[f32]| x.iter().map(|v| (v.to_bits() >> 16) as u16).collect::<Vec<u16>>();
        let mut rng = crate::rng::Rng::new(31);
        let shapes =
            [(1, 1, 1), (64, 96, 256), (130, 257, 300), (97, 40, 513), (600, 33, 520), (33, 70, 0), (1152, 64, 32)];
        for path in [CpuPath::Portable, CpuPath::Avx2, CpuPath::Avx512, CpuPath::Amx] {
            let kernels = match path.kernels() {
                Ok(kernels) => kernels,
                Err(why) => {
                    println!("not run: CPU path {} ({why})", path.name());
                    continue;
                }
            };
            for precision in [Precision::F32, Precision::Bf16] {
                for (m, n, k) in shapes {
                    // alpha 1e-39: subnormal values of C, which `vcvtne2ps2bf16` would flush.
                    let cases = [
                        (false, true, 0.0, 0.75),
                        (true, false, 0.5, 0.75),
                        (false, false, -1.25, 0.75),
                        (false, true, 0.0, 1e-39),
                    ];
                    for (trans_a, trans_b, beta, alpha) in cases {
                        let mut v = |len: usize| -> Vec<f32> {
                            (0..len).map(|_| DType::Bf16.round(rng.normal() as f32)).collect()
                        };
                        let (a, b, bias, c0) = (v(m * k), v(k * n), v(n), v(m * n));
                        let g = Gemm { m, n, k, trans_a, trans_b, alpha, beta };
                        let b16 = bits(&b);
                        let packed = PackedB::new(kernels, precision, g, Input::F32(&b)).map(Arc::new);
                        let packed16 = PackedB::new(kernels, precision, g, Input::Bf16(&b16)).map(Arc::new);
                        let (b32, b16) = (Input::F32(&b), Input::Bf16(&b16));
                        let runs = [
                            (None, b32, None),
                            (Some(&bias[..]), b32, packed),
                            (None, b16, None),
                            (Some(&bias[..]), b16, packed16),
                        ];
                        for (bias, b, packed) in runs {
                            let op = Operand { kernels, precision, b, packed };
                            let mut want = c0.clone();
                            let f32_op = Operand { b: b32, packed: None, ..op.clone() };
                            f32_op.gemm_typed(g, Input::F32(&a), bias, Output::F32(&mut want, DType::Bf16));
                            let (a16, mut got) = (bits(&a), bits(&c0));
                            op.gemm_typed(g, Input::Bf16(&a16), bias, Output::Bf16(&mut got));
                            let what = format!(
                                "{} {} {m}×{k}×{n} trans {trans_a} {trans_b} alpha {alpha} beta {beta} bias {} B {:?}",
                                path.name(),
                                precision.name(),
                                bias.is_some(),
                                matches!(b, Input::Bf16(_)).then_some("2 bytes"),
                            );
                            assert_eq!(got, bits(&want), "A and C in 2 bytes, {what}");
                            let mut got = c0.clone();
                            op.gemm_typed(g, Input::Bf16(&a16), bias, Output::F32(&mut got, DType::Bf16));
                            let same = got.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits());
                            assert!(same, "A in 2 bytes, {what}");
                        }
                    }
                }
            }
            println!("ran: CPU path {}", path.name());
        }
    }
}
