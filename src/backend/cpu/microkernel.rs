//! The GEMM micro-kernels: one MR × NR tile of C from a packed A sliver and a packed B sliver,
//! `C = alpha·A·B + beta·C (+ bias on every row)`. `beta == 0` never reads C (it may hold
//! garbage or NaN). Blocking and packing: gemm.rs.
//!
//! A sliver holds, for each group of `KG` consecutive k, its `MR` (or `NR`) lines side by side,
//! the group's `KG` values of a line together: `[k / KG][line][k % KG]`. fp32 kernels take one
//! k per group; the kernels of a bf16 unit two (the pair that one `vdpbf16ps` lane multiplies
//! and adds). The AVX fp32 kernels also take A's rows where they lie (`tile_rows`), when
//! they run along k: a packed sliver would hold the same values.
//!
//! | kernel | tile | registers | per group of k |
//! |---|---|---|---|
//! | `F32Avx2` | 6 × 16 | 12 of 16 ymm accumulate, 2 hold B, 1 A | 12 FMAs, 3 loads |
//! | `F32Avx512` | 8 × 32 | 16 of 32 zmm accumulate, 2 hold B; A broadcast from memory | 16 FMAs, 10 loads |
//! | `Bf16Avx512` | 8 × 32 | as `F32Avx512`, each lane a pair of k | 16 `vdpbf16ps` (2× the work), 10 loads |
//! | `F32Portable` | 6 × 16 | whatever the target's baseline vectorises | |
//! | `Bf16OnF32<K>` | K's | K's, on operands rounded to bf16 as they are packed (a path without a bf16 unit) | K's |
//!
//! 8 × 32 because the model's row counts (1152, 768, the GRU's 32) and widths (256 … 768) are
//! multiples of it: no partial tile in the model's GEMMs. 16 accumulators cover the FMA
//! latency (4 cycles) at two issues per cycle.

use super::store::{TileOut, store_scalar};
#[cfg(target_arch = "x86_64")]
use super::store::{round_bf16_avx2, store_avx512, store_avx512_native};

/// A packed operand element: fp32 as it is, or bf16.
pub trait Packed: Copy + Default + Send + Sync + 'static {
    /// Packing copies this type as it is (fp32), with no conversion pass.
    const IS_F32: bool = false;

    fn from_f32(x: f32) -> Self;

    /// `dst[i] = from_f32(src[i])` over a run (the packing's inner loop).
    fn convert(src: &[f32], dst: &mut [Self]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = Self::from_f32(s);
        }
    }
}

impl Packed for f32 {
    const IS_F32: bool = true;

    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}

/// A bfloat16: the high half of an fp32, rounded to nearest even.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
#[repr(transparent)]
pub struct Bf16(pub u16);

impl Bf16 {
    pub fn to_f32(self) -> f32 {
        f32::from_bits((self.0 as u32) << 16)
    }
}

impl Packed for Bf16 {
    /// Round to nearest even, as every bf16 in the crate is (`tensor::bf16_bits`).
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        Bf16(crate::tensor::bf16_bits(x))
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[inline]
pub(super) unsafe fn convert_avx512_bf16(src: &[f32], dst: &mut [Bf16]) {
    use std::arch::x86_64::*;
    let n = src.len().min(dst.len());
    let mut i = 0;
    // SAFETY: each step reads src[i .. i + 16] and writes dst[i .. i + 16], both < n.
    unsafe {
        while i < n {
            // The last run of fewer than 16 is masked (the packing's runs are often 8 long).
            let mask = if n - i >= 16 { 0xffff } else { ((1u32 << (n - i)) - 1) as __mmask16 };
            let v = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, src.as_ptr().add(i)));
            let v = std::mem::transmute::<__m256bh, __m256i>(v);
            _mm256_mask_storeu_epi16(dst.as_mut_ptr().add(i) as *mut i16, mask, v);
            i += 16;
        }
    }
}

/// [`convert_avx512_bf16`] over runs of `run` values of `src`, run q written at
/// `dst[q · stride ..]`: a line of AMX's A into its groups in one call (a call per 32-value
/// group was 14 % of a 1152 × 256 × 256 product's samples, session 32).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(super) unsafe fn convert_runs_avx512_bf16(src: &[f32], dst: &mut [Bf16], run: usize, stride: usize) {
    for (q, from) in src.chunks(run).enumerate() {
        // SAFETY: the CPU has the features (the caller's contract).
        unsafe { convert_avx512_bf16(from, &mut dst[q * stride..][..from.len()]) };
    }
}

/// How a sliver lays k out: `group` consecutive values of a line together
/// (`[k / group][line][k % group]`), zeros past the last k up to a multiple of `depth` (one
/// step of the kernel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub group: usize,
    pub depth: usize,
}

impl Layout {
    /// Groups of `g`, padded to a whole group.
    pub const fn groups_of(g: usize) -> Layout {
        Layout { group: g, depth: g }
    }

    /// How many k a sliver holds per line for a slice `kc` deep.
    pub const fn padded(self, kc: usize) -> usize {
        kc.next_multiple_of(self.depth)
    }
}

/// The deepest slice of k one sliver holds unless its kernel says otherwise (`Micro::KC`;
/// gemm.rs's blocking): 16 KiB per 16 fp32 lines.
pub const KC: usize = 256;
/// The deepest `Micro::KC` of any kernel: the packing's buffers on the stack hold it.
pub const KC_MAX: usize = 512;

/// One micro-kernel and the shape of the slivers it reads.
pub trait Micro {
    type Packed: Packed;
    const MR: usize;
    const NR: usize;
    /// k values per group (module header).
    const KG: usize;
    /// The deepest slice of k a tile takes (at most [`KC_MAX`]): gemm.rs's blocking.
    const KC: usize = KC;
    /// A's and B's slivers: groups of `KG`, unless the kernel's unit wants another layout
    /// (AMX's tiles: amx.rs).
    const A: Layout = Layout::groups_of(Self::KG);
    const B: Layout = Layout::groups_of(Self::KG);
    /// The packing may use AVX (8 × 8 transposes of 32-bit elements: fp32 values or bf16
    /// pairs): the kernel's path has it.
    const AVX_PACK: bool = false;
    /// One tile over `kc` steps of k (slivers padded with zeros to a whole group).
    ///
    /// # Safety
    /// `a` holds `A.padded(kc)·MR` elements, `b` `B.padded(kc)·NR`, `out` is in
    /// bounds, and the CPU has the kernel's features (the caller holds `Kernels` for its path).
    unsafe fn tile(kc: usize, a: *const Self::Packed, b: *const Self::Packed, alpha: f32, beta: f32, out: TileOut);

    /// The tiles of one column of C, all against the B sliver `b`: tile i multiplies A's
    /// sliver at `a + i·step` and is written through the iterator's item i. Each tile's
    /// lines of C are asked for before its products; AMX overrides this to store one tile
    /// while the next one's products run (amx.rs).
    ///
    /// # Safety
    /// As for [`Micro::tile`], for every tile.
    unsafe fn column(
        kc: usize,
        a: *const Self::Packed,
        step: usize,
        b: *const Self::Packed,
        alpha: f32,
        beta: f32,
        outs: impl Iterator<Item = TileOut>,
    ) {
        for (i, out) in outs.enumerate() {
            // SAFETY: as the caller guarantees.
            unsafe {
                out.prefetch();
                Self::tile(kc, a.add(i * step), b, alpha, beta, out);
            }
        }
    }

    /// A run converted for the slivers (the packing's inner loop): `Packed::convert` unless
    /// the kernel's path has an instruction for it, so a forced path never runs another's.
    ///
    /// # Safety
    /// The CPU has the kernel's features, as for [`Micro::tile`].
    unsafe fn convert(src: &[f32], dst: &mut [Self::Packed]) {
        Self::Packed::convert(src, dst)
    }

    /// [`Micro::convert`] over runs of `run` values of `src`, run q written at
    /// `dst[q · stride ..]` (a line of a sliver laid out in long groups).
    ///
    /// # Safety
    /// As for [`Micro::convert`].
    unsafe fn convert_runs(src: &[f32], dst: &mut [Self::Packed], run: usize, stride: usize) {
        for (q, from) in src.chunks(run).enumerate() {
            // SAFETY: as the caller guarantees.
            unsafe { Self::convert(from, &mut dst[q * stride..][..from.len()]) };
        }
    }

    /// Two steps of k of `first.len()` lines side by side, converted and interleaved into a
    /// bf16 group row: `out[2l] = first[l]`, `out[2l + 1] = second[l]` (KG = 2 only; the
    /// packing of operands whose lines lie side by side: B as stored, Aᵀ).
    ///
    /// # Safety
    /// The CPU has the kernel's features, as for [`Micro::tile`]; `second` is as long as
    /// `first` and `out` twice that.
    unsafe fn interleave_pairs(first: &[f32], second: &[f32], out: &mut [Self::Packed]) {
        for ((o, &a), &b) in out.chunks_exact_mut(2).zip(first).zip(second) {
            o[0] = Self::Packed::from_f32(a);
            o[1] = Self::Packed::from_f32(b);
        }
    }

    /// The kernel multiplies A's rows where they lie ([`Micro::tile_rows`]), with no packed
    /// copy of them: an fp32 kernel reading A as stored (rows contiguous along k).
    const ROWS_A: bool = false;

    /// [`Micro::tile`] on A's `MR` rows where they lie, row i's `kc` values contiguous from
    /// `a + i·lda`, instead of a packed sliver: the same products in the same order, so the
    /// same bits. Packing A cost 3 % of the fp32 embedding (`perf`, Zen 4 VM, session 30).
    ///
    /// # Safety
    /// As for [`Micro::tile`], with `MR` whole rows at `a` (`out.rows == MR`), and only on a
    /// kernel with `ROWS_A`.
    unsafe fn tile_rows(
        _kc: usize,
        _a: *const f32,
        _lda: usize,
        _b: *const Self::Packed,
        _alpha: f32,
        _beta: f32,
        _out: TileOut,
    ) {
        unreachable!("tile_rows on a kernel that multiplies packed A only")
    }

    /// Whether the kernel multiplies a bf16 A's rows where they lie ([`Micro::column_rows`]),
    /// rows `lda` elements apart from `a`, over `kc` steps of k: AMX, whose A tile rows are 32
    /// consecutive k of one row as a row-major A holds them, when its rows start on lines.
    fn reads_bf16_rows(_a: *const u16, _lda: usize, _kc: usize) -> bool {
        false
    }

    /// [`Micro::column`] on bf16 A's rows where they lie: tile i's `MR` rows from
    /// `a + i·MR·lda`, row r's `kc` values contiguous from `a + r·lda`. The same products in
    /// the same order as on the packed slivers, so the same bits.
    ///
    /// # Safety
    /// As for [`Micro::column`], with each tile's `MR` whole rows at `a` (`out.rows == MR`), and
    /// only where [`Micro::reads_bf16_rows`] holds for `a`, `lda` and `kc`.
    unsafe fn column_rows(
        _kc: usize,
        _a: *const u16,
        _lda: usize,
        _b: *const Self::Packed,
        _alpha: f32,
        _beta: f32,
        _outs: impl Iterator<Item = TileOut>,
    ) {
        unreachable!("column_rows on a kernel that multiplies packed A only")
    }

    /// Called on a block's slivers once they are packed (`pack`): `Bf16OnF32` rounds them.
    ///
    /// # Safety
    /// The CPU has the kernel's features, as for [`Micro::tile`].
    unsafe fn finish_pack(_slivers: &mut [Self::Packed]) {}
}

/// Plain Rust: the compiler vectorises the 16-wide rows for whatever the target guarantees.
pub struct F32Portable;

impl Micro for F32Portable {
    type Packed = f32;
    const MR: usize = 6;
    const NR: usize = 16;
    const KG: usize = 1;

    unsafe fn tile(kc: usize, a: *const f32, b: *const f32, alpha: f32, beta: f32, out: TileOut) {
        // SAFETY: the caller guarantees the packed slivers' lengths.
        let (a, b) = unsafe { (std::slice::from_raw_parts(a, kc * 6), std::slice::from_raw_parts(b, kc * 16)) };
        let mut acc = [[0f32; 16]; 6];
        for (ap, bp) in a.chunks_exact(6).zip(b.chunks_exact(16)) {
            for (row, &ai) in acc.iter_mut().zip(ap) {
                for (c, &bj) in row.iter_mut().zip(bp) {
                    *c += ai * bj;
                }
            }
        }
        unsafe { store_scalar(acc.as_flattened(), 16, alpha, beta, out) }
    }
}

/// An fp32 kernel: its path also rounds runs of fp32 to bf16 in place, at its width.
pub trait F32Unit: Micro<Packed = f32> {
    /// `v[i]` rounded to the nearest bf16 (ties to even), kept as fp32.
    ///
    /// # Safety
    /// The CPU has the kernel's features, as for [`Micro::tile`].
    unsafe fn round_to_bf16(v: &mut [f32]) {
        round_to_bf16(v)
    }
}

impl F32Unit for F32Portable {}

/// The rounding of [`Bf16::from_f32`], kept as fp32 (the low half zero): branch-free, so it
/// vectorises at the width of the function it is inlined into.
#[inline(always)]
fn round_to_bf16(v: &mut [f32]) {
    for x in v {
        *x = Bf16::from_f32(*x).to_f32();
    }
}

/// bf16 on a path without a bf16 unit: the operands rounded to bf16 as they are packed and
/// kept as fp32 (a bf16 is the high half of an fp32: nothing is lost), then multiplied by the
/// path's fp32 kernel `K`. The product of two bf16 is exact in fp32 and the sums are fp32, so
/// these are the numbers bf16 precision defines (`vdpbf16ps`'s up to the order of each pair's
/// two adds), at the fp32 kernel's speed: a kernel that widened bf16 pairs as it multiplied
/// ran at a fifth of it on Zen 3 (`avx2`) and two thirds on the portable path.
pub struct Bf16OnF32<K>(std::marker::PhantomData<K>);

impl<K: F32Unit> Micro for Bf16OnF32<K> {
    type Packed = f32;
    const AVX_PACK: bool = K::AVX_PACK;
    const MR: usize = K::MR;
    const NR: usize = K::NR;
    const KG: usize = 1;

    unsafe fn tile(kc: usize, a: *const f32, b: *const f32, alpha: f32, beta: f32, out: TileOut) {
        // SAFETY: as the trait's contract, which K's shares.
        unsafe { K::tile(kc, a, b, alpha, beta, out) }
    }

    unsafe fn finish_pack(slivers: &mut [f32]) {
        // SAFETY: as the trait's contract: the CPU has K's features.
        unsafe { K::round_to_bf16(slivers) }
    }
}

/// AVX2 + FMA.
#[cfg(target_arch = "x86_64")]
pub struct F32Avx2;

#[cfg(target_arch = "x86_64")]
impl Micro for F32Avx2 {
    type Packed = f32;
    const AVX_PACK: bool = true;
    const MR: usize = 6;
    const NR: usize = 16;
    const KG: usize = 1;

    unsafe fn tile(kc: usize, a: *const f32, b: *const f32, alpha: f32, beta: f32, out: TileOut) {
        // SAFETY: as the trait's contract: the CPU has AVX2 + FMA.
        unsafe { avx2_f32::<false>(kc, a, 0, b, alpha, beta, out) }
    }

    const ROWS_A: bool = true;

    unsafe fn tile_rows(kc: usize, a: *const f32, lda: usize, b: *const f32, alpha: f32, beta: f32, out: TileOut) {
        // SAFETY: as the trait's contract: 6 whole rows at a, the CPU has AVX2 + FMA.
        unsafe { avx2_f32::<true>(kc, a, lda, b, alpha, beta, out) }
    }
}

#[cfg(target_arch = "x86_64")]
impl F32Unit for F32Avx2 {
    unsafe fn round_to_bf16(v: &mut [f32]) {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(v: &mut [f32]) {
            round_to_bf16(v)
        }
        // SAFETY: as the trait's contract: the CPU has AVX2 + FMA.
        unsafe { avx2(v) }
    }
}

/// A 6 × 16 tile; A a packed sliver (element (i, p) at `a[p·6 + i]`) or, with `ROWS`, rows
/// where they lie (at `a[i·lda + p]`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2_f32<const ROWS: bool>(
    kc: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    alpha: f32,
    beta: f32,
    out: TileOut,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); 2]; 6];
    // SAFETY: step p reads A's (i, p) for i < 6 and b[p·16 .. +16], inside the operands.
    unsafe {
        for p in 0..kc {
            let bp = b.add(p * 16);
            let (b0, b1) = (_mm256_loadu_ps(bp), _mm256_loadu_ps(bp.add(8)));
            for (i, acc) in acc.iter_mut().enumerate() {
                let ai = _mm256_broadcast_ss(&*if ROWS { a.add(i * lda + p) } else { a.add(p * 6 + i) });
                acc[0] = _mm256_fmadd_ps(ai, b0, acc[0]);
                acc[1] = _mm256_fmadd_ps(ai, b1, acc[1]);
            }
        }
        if out.rows == 6 && out.cols == 16 && out.cs == 1 && !out.bf16 {
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
                    let r = if out.bias.is_null() { r } else { _mm256_add_ps(r, _mm256_loadu_ps(out.bias.add(8 * h))) };
                    _mm256_storeu_ps(ph, if out.round { round_bf16_avx2(r) } else { r });
                }
            }
        } else {
            let mut tile = [[0f32; 16]; 6];
            for (row, acc) in tile.iter_mut().zip(&acc) {
                _mm256_storeu_ps(row.as_mut_ptr(), acc[0]);
                _mm256_storeu_ps(row.as_mut_ptr().add(8), acc[1]);
            }
            store_scalar(tile.as_flattened(), 16, alpha, beta, out);
        }
    }
}

/// AVX-512 F.
#[cfg(target_arch = "x86_64")]
pub struct F32Avx512;

#[cfg(target_arch = "x86_64")]
impl Micro for F32Avx512 {
    type Packed = f32;
    const AVX_PACK: bool = true;
    const MR: usize = 8;
    const NR: usize = 32;
    const KG: usize = 1;

    unsafe fn tile(kc: usize, a: *const f32, b: *const f32, alpha: f32, beta: f32, out: TileOut) {
        // SAFETY: as the trait's contract: the CPU has AVX-512 F. An edge tile of at most 4
        // rows or 16 columns multiplies only those (attention's 36 × 36 per-head products
        // computed 64 columns for 36 and 40 rows for 36); each element of C gets the same
        // products in the same order whichever variant computes it.
        unsafe {
            match (out.rows <= 4, out.cols <= 16) {
                (false, false) => avx512_f32::<8, 2, false>(kc, a, 0, b, alpha, beta, out),
                (false, true) => avx512_f32::<8, 1, false>(kc, a, 0, b, alpha, beta, out),
                (true, false) => avx512_f32::<4, 2, false>(kc, a, 0, b, alpha, beta, out),
                (true, true) => avx512_f32::<4, 1, false>(kc, a, 0, b, alpha, beta, out),
            }
        }
    }

    const ROWS_A: bool = true;

    unsafe fn tile_rows(kc: usize, a: *const f32, lda: usize, b: *const f32, alpha: f32, beta: f32, out: TileOut) {
        // SAFETY: as the trait's contract: 8 whole rows at a, the CPU has AVX-512 F.
        unsafe {
            match out.cols <= 16 {
                false => avx512_f32::<8, 2, true>(kc, a, lda, b, alpha, beta, out),
                true => avx512_f32::<8, 1, true>(kc, a, lda, b, alpha, beta, out),
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
impl F32Unit for F32Avx512 {
    unsafe fn round_to_bf16(v: &mut [f32]) {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        unsafe fn avx512(v: &mut [f32]) {
            round_to_bf16(v)
        }
        // SAFETY: as the trait's contract: the path has AVX-512 F, BW and VL.
        unsafe { avx512(v) }
    }
}

/// The first R rows and 16·H columns of an 8 × 32 tile; A a packed sliver (element (i, p) at
/// `a[p·8 + i]`) or, with `ROWS`, rows where they lie (at `a[i·lda + p]`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn avx512_f32<const R: usize, const H: usize, const ROWS: bool>(
    kc: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    alpha: f32,
    beta: f32,
    out: TileOut,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); H]; R];
    // SAFETY: step p reads A's (i, p) for i < R and b[p·32 .. +16·H], inside the operands.
    unsafe {
        for p in 0..kc {
            let bp = b.add(p * 32);
            let bv: [__m512; H] = std::array::from_fn(|h| _mm512_loadu_ps(bp.add(16 * h)));
            for (i, acc) in acc.iter_mut().enumerate() {
                let ai = _mm512_set1_ps(if ROWS { *a.add(i * lda + p) } else { *a.add(p * 8 + i) });
                for (acc, &bh) in acc.iter_mut().zip(&bv) {
                    *acc = _mm512_fmadd_ps(ai, bh, *acc);
                }
            }
        }
        store_avx512(&acc, alpha, beta, out);
    }
}

/// AVX-512 BF16: `vdpbf16ps` multiplies a pair of bf16 per fp32 lane and adds both products
/// to the lane, so one instruction does the work of two FMAs.
#[cfg(target_arch = "x86_64")]
pub struct Bf16Avx512;

#[cfg(target_arch = "x86_64")]
impl Micro for Bf16Avx512 {
    type Packed = Bf16;
    const AVX_PACK: bool = true;
    const MR: usize = 8;
    const NR: usize = 32;
    const KG: usize = 2;

    unsafe fn tile(kc: usize, a: *const Bf16, b: *const Bf16, alpha: f32, beta: f32, out: TileOut) {
        // SAFETY: as the trait's contract: the CPU has AVX-512 F and BF16.
        unsafe { avx512_bf16(kc, a, b, alpha, beta, out) }
    }

    /// `vcvtneps2bf16`: the same rounding (it also flushes subnormal inputs to zero, below
    /// bf16's own resolution of the model's values).
    unsafe fn convert(src: &[f32], dst: &mut [Bf16]) {
        // SAFETY: as the trait's contract: the path (avx512) has AVX-512 F, BW and VL, and
        // this kernel is chosen only where the CPU has AVX-512 BF16 (`Kernels::bf16_native`).
        unsafe { convert_avx512_bf16(src, dst) }
    }

    /// 16 lines at a time: both steps converted by one `vcvtne2ps2bf16` and interleaved into
    /// `vdpbf16ps` words by one `vpermw`, one 64-byte store. Converting a run and then placing
    /// each value at a stride of two made conversion and packing 14 % of a bf16 training
    /// step's samples (the weight gradient's operands both lie side by side); now 11 %, most
    /// of it waiting on the two source rows.
    unsafe fn interleave_pairs(first: &[f32], second: &[f32], out: &mut [Bf16]) {
        // SAFETY: as `convert`'s; the lengths as the trait's contract says.
        unsafe { interleave_pairs_avx512_bf16(first, second, out) }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(super) unsafe fn interleave_pairs_avx512_bf16(first: &[f32], second: &[f32], out: &mut [Bf16]) {
    use std::arch::x86_64::*;
    let n = first.len().min(second.len()).min(out.len() / 2);
    // vcvtne2ps2bf16(b, a) puts a's 16 values in the low half and b's in the high half;
    // lane 2l of the result takes first[l] (lane l), lane 2l + 1 second[l] (lane 16 + l).
    const ORDER: [i16; 32] = {
        let mut order = [0i16; 32];
        let mut lane = 0;
        while lane < 32 {
            order[lane] = ((lane % 2) * 16 + lane / 2) as i16;
            lane += 1;
        }
        order
    };
    // SAFETY: each step reads first/second[i .. i + 16] and writes out[2i .. 2i + 32], masked
    // to n lines (out holds 2n).
    unsafe {
        let index = _mm512_loadu_si512(ORDER.as_ptr() as *const __m512i);
        let mut i = 0;
        while i < n {
            let lines = (n - i).min(16);
            let mask = ((1u32 << lines) - 1) as __mmask16;
            let a = _mm512_maskz_loadu_ps(mask, first.as_ptr().add(i));
            let b = _mm512_maskz_loadu_ps(mask, second.as_ptr().add(i));
            let pair = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(b, a));
            let words = _mm512_permutexvar_epi16(index, pair);
            let out_mask = if lines == 16 { u32::MAX } else { (1u32 << (2 * lines)) - 1 };
            _mm512_mask_storeu_epi16(out.as_mut_ptr().add(2 * i) as *mut i16, out_mask, words);
            i += 16;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn avx512_bf16(kc: usize, a: *const Bf16, b: *const Bf16, alpha: f32, beta: f32, out: TileOut) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; 8];
    // SAFETY: group q reads a[q·16 .. +16] and b[q·64 .. +64], inside the slivers; the A pair
    // of a row is one 32-bit word (read unaligned: the sliver is only 2-byte aligned in type).
    unsafe {
        for q in 0..kc.div_ceil(2) {
            let bp = b.add(q * 64) as *const __m512i;
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(1)));
            let ap = a.add(q * 16) as *const i32;
            for (i, acc) in acc.iter_mut().enumerate() {
                let ai: __m512bh = std::mem::transmute(_mm512_set1_epi32(ap.add(i).read_unaligned()));
                acc[0] = _mm512_dpbf16_ps(acc[0], ai, b0);
                acc[1] = _mm512_dpbf16_ps(acc[1], ai, b1);
            }
        }
        store_avx512_native(&acc, alpha, beta, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_to_nearest_even_and_keeps_specials() {
        let round = |x: f32| Bf16::from_f32(x).to_f32();
        assert_eq!(round(1.0), 1.0);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1.0).
        assert_eq!(round(1.0 + 2f32.powi(-8)), 1.0);
        assert_eq!(round(1.0 + 3.0 * 2f32.powi(-8)), 1.0 + 2.0 * 2f32.powi(-7));
        assert_eq!(round(-2.5), -2.5);
        assert!(round(f32::NAN).is_nan());
        assert_eq!(round(f32::INFINITY), f32::INFINITY);
        assert_eq!(round(f32::MAX), f32::INFINITY, "rounds past the largest bf16");
        for x in [0.1f32, -3.7, 1e-20, 6.5e4] {
            assert!((round(x) - x).abs() <= x.abs() * 2f32.powi(-9), "{x}");
        }
    }

    /// Each bf16 run conversion (vcvtneps2bf16 for `Bf16Avx512`, where the CPU has it; the
    /// portable one otherwise) equals the scalar rounding on every length up to two vectors
    /// and a half, specials included; so does each fp32 kernel's rounding in place, which
    /// `Bf16OnF32` packs with.
    #[test]
    fn bf16_runs_convert_as_the_scalar_rounding() {
        let specials = [0.0, -0.0, 1.0 + 2f32.powi(-8), f32::INFINITY, f32::NEG_INFINITY, 3.0e38, -1e-3, f32::NAN];
        let runs = |seed| {
            let mut rng = crate::rng::Rng::new(seed);
            (0..=40).map(move |n| {
                (0..n)
                    .map(|i| if i % 5 == 4 { specials[i % specials.len()] } else { rng.normal() as f32 * 7.0 })
                    .collect::<Vec<f32>>()
            })
        };
        let same = |a: Bf16, b: Bf16| a == b || (a.to_f32().is_nan() && b.to_f32().is_nan());
        let check = |name: &str, convert: &dyn Fn(&[f32], &mut [Bf16])| {
            for src in runs(16) {
                let n = src.len();
                let mut got = vec![Bf16(0xdead); n + 3];
                convert(&src, &mut got[..n]);
                let want = src.iter().map(|&x| Bf16::from_f32(x));
                assert!(got.iter().zip(want).all(|(&g, w)| same(g, w)), "{name}, n = {n}");
                assert!(got[n..].iter().all(|&b| b == Bf16(0xdead)), "{name} wrote past the run (n = {n})");
            }
        };
        let in_place = |name: &str, round: &dyn Fn(&mut [f32])| {
            for src in runs(17) {
                let n = src.len();
                let mut got = src.clone();
                got.extend([1.1f32; 3]);
                round(&mut got[..n]);
                let want = src.iter().map(|&x| Bf16::from_f32(x));
                assert!(got.iter().zip(want).all(|(&g, w)| same(Bf16((g.to_bits() >> 16) as u16), w)), "{name}");
                assert!(got[..n].iter().all(|g| g.to_bits() & 0xffff == 0 || g.is_nan()), "{name}: low half kept");
                assert!(got[n..].iter().all(|&x| x == 1.1), "{name} wrote past the run (n = {n})");
            }
        };
        check("portable", &|s, d| Bf16::convert(s, d));
        // SAFETY (each below): the CPU has the kernel's features, checked first.
        in_place("F32Portable", &|v| unsafe { F32Portable::round_to_bf16(v) });
        #[cfg(target_arch = "x86_64")]
        {
            use crate::backend::cpu::dispatch::CpuPath;
            match CpuPath::Avx512.kernels() {
                Ok(k) if k.bf16_native() => check("Bf16Avx512", &|s, d| unsafe { Bf16Avx512::convert(s, d) }),
                _ => println!("not run: Bf16Avx512::convert (this CPU lacks AVX-512 BF16)"),
            }
            match CpuPath::Avx512.kernels() {
                Ok(_) => in_place("F32Avx512", &|v| unsafe { F32Avx512::round_to_bf16(v) }),
                Err(why) => println!("not run: F32Avx512::round_to_bf16 ({why})"),
            }
            match CpuPath::Avx2.kernels() {
                Ok(_) => in_place("F32Avx2", &|v| unsafe { F32Avx2::round_to_bf16(v) }),
                Err(why) => println!("not run: F32Avx2::round_to_bf16 ({why})"),
            }
        }
    }
}
