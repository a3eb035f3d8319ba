//! bf16 × bf16 → fp32 on AMX tiles (Intel Sapphire Rapids and later): the `amx` path's bf16
//! GEMM kernel. Inline `asm!` on stable Rust (the AMX intrinsics are not stable); the tile
//! data permission is asked of Linux once per process (`dispatch.rs`).
//!
//! One 32 × 32 tile of C is four 16 × 16 fp32 tiles (tmm0–3) fed, per 32 steps of k, by two
//! A tiles (tmm4–5: 16 rows × 32 bf16) and two B tiles (tmm6–7: 16 pairs of k × 16 columns,
//! each pair side by side): 4 `tdpbf16ps` (16 × 16 × 32 products each) for 4 tile loads.
//! The tiles' operand layouts are the slivers':
//!
//! - A: `[k / 32][32 rows][32 k]`: a tile row is one row's 32 k, 64 bytes, rows 64 apart
//!   (`Layout { group: 32, depth: 32 }`); or A's own rows where they lie, when each starts on
//!   a 64-byte line (`column_rows`), rows a row's bytes apart;
//! - B: `[k / 2][32 columns][2 k]`, the pair layout of `vdpbf16ps` (microkernel.rs), padded
//!   to 32 k: 16 pair rows of 32 columns are two B tiles side by side, rows 128 bytes apart.
//!
//! The accumulators are stored to a 4 KiB block on the stack and written through `TileOut`
//! (alpha, beta, bias, edge tiles) by the AVX-512 store, as `Bf16Avx512` writes its registers,
//! while the next tile of the column's products run (`pipelined`).
//! Without AMX the kernel's tests run it with the instructions trapped and emulated
//! (tests/common/amx_trap.rs).

use std::arch::asm;
use std::arch::x86_64::__m512;
use std::cell::Cell;

use super::microkernel::{
    Bf16, Layout, Micro, convert_avx512_bf16, convert_runs_avx512_bf16, interleave_pairs_avx512_bf16,
};
use super::store::{TileOut, store_avx512_native};

/// The `amx` path's bf16 kernel (module header).
pub struct Bf16Amx;

/// The tile configuration (palette 1): tiles 0–7 all 16 rows of 64 bytes (16 fp32 or 32 bf16).
const CONFIG: [u8; 64] = {
    let mut c = [0u8; 64];
    c[0] = 1;
    let mut t = 0;
    while t < 8 {
        c[16 + 2 * t] = 64;
        c[48 + t] = 16;
        t += 1;
    }
    c
};

thread_local! {
    /// Whether this thread's tiles hold `CONFIG`: it survives context switches (the kernel
    /// saves the tile state with the rest), so it is loaded once per thread.
    static CONFIGURED: Cell<bool> = const { Cell::new(false) };
}

/// Loads `CONFIG` into this thread's tile registers the first time.
///
/// # Safety
/// The CPU has AMX-TILE and Linux granted this process the tile data (`dispatch.rs`).
unsafe fn configure() {
    if !CONFIGURED.get() {
        // SAFETY: CONFIG is 64 readable bytes; as the caller guarantees.
        unsafe {
            asm!("ldtilecfg [{cfg}]", cfg = in(reg) CONFIG.as_ptr(), options(nostack, readonly, preserves_flags))
        };
        CONFIGURED.set(true);
    }
}

/// Where a column's A tiles are: tile i's rows 0–15 for k-step t (32 k) at
/// `at + i·tile + t·step`, rows 16–31 `half` further, each tile row `row` bytes after the last.
#[derive(Clone, Copy)]
struct ATiles {
    at: *const Bf16,
    tile: usize,
    step: usize,
    half: usize,
    row: usize,
}

impl ATiles {
    /// Packed slivers (`Layout { group: 32, depth: 32 }`), `step` elements apart.
    fn packed(at: *const Bf16, tile: usize) -> Self {
        ATiles { at, tile, step: 1024, half: 512, row: 64 }
    }
}

/// 32 × 32 fp32, 64-byte aligned: where the four C tiles are stored.
#[repr(C, align(64))]
struct Block([f32; 32 * 32]);

impl Micro for Bf16Amx {
    type Packed = Bf16;
    const AVX_PACK: bool = true;
    const MR: usize = 32;
    const NR: usize = 32;
    const KG: usize = 2;
    /// k = 512 in one slice (the feed-forward's second layer), its sums kept in the tiles:
    /// with two slices a bf16 C waited in an f32 copy (gemm.rs's `deep_bf16`). A's sliver is
    /// then 32 KiB, B's 32 KiB (in L1 across a column), A's block 512 KiB (in L2).
    const KC: usize = 512;
    const A: Layout = Layout { group: 32, depth: 32 };
    const B: Layout = Layout { group: 2, depth: 32 };

    unsafe fn tile(kc: usize, a: *const Bf16, b: *const Bf16, alpha: f32, beta: f32, out: TileOut) {
        // SAFETY: as the caller guarantees.
        unsafe { pipelined(kc, ATiles::packed(a, 0), b, (alpha, beta), std::iter::once(out)) }
    }

    unsafe fn column(
        kc: usize,
        a: *const Bf16,
        step: usize,
        b: *const Bf16,
        alpha: f32,
        beta: f32,
        outs: impl Iterator<Item = TileOut>,
    ) {
        // SAFETY: as the caller guarantees.
        unsafe { pipelined(kc, ATiles::packed(a, step), b, (alpha, beta), outs) }
    }

    /// A's rows read where they lie when each starts on a 64-byte line and k is whole tile
    /// rows: a tile row is then one line (a misaligned one spans two, and the tile loads took
    /// 2–3× as long, session 36). Packing A was 11 % of a 1152 × 256 × 768 product on one core
    /// (Xeon VM, session 37).
    fn reads_bf16_rows(a: *const u16, lda: usize, kc: usize) -> bool {
        (a as usize).is_multiple_of(64) && (2 * lda).is_multiple_of(64) && kc.is_multiple_of(32)
    }

    unsafe fn column_rows(
        kc: usize,
        a: *const u16,
        lda: usize,
        b: *const Bf16,
        alpha: f32,
        beta: f32,
        outs: impl Iterator<Item = TileOut>,
    ) {
        let rows = ATiles { at: a as *const Bf16, tile: 32 * lda, step: 32, half: 16 * lda, row: 2 * lda };
        // SAFETY: as the caller guarantees (kc a multiple of 32: every tile row read is A's).
        unsafe { pipelined(kc, rows, b, (alpha, beta), outs) }
    }

    /// `vcvtneps2bf16`, as `Bf16Avx512` (every AMX CPU has AVX-512 BF16: `dispatch.rs`).
    unsafe fn convert(src: &[f32], dst: &mut [Bf16]) {
        // SAFETY: the amx path needs AVX-512 F, BW, VL and BF16 (`CpuPath::missing_feature`).
        unsafe { convert_avx512_bf16(src, dst) }
    }

    unsafe fn convert_runs(src: &[f32], dst: &mut [Bf16], run: usize, stride: usize) {
        // SAFETY: as `convert`'s.
        unsafe { convert_runs_avx512_bf16(src, dst, run, stride) }
    }

    unsafe fn interleave_pairs(first: &[f32], second: &[f32], out: &mut [Bf16]) {
        // SAFETY: as `convert`'s.
        unsafe { interleave_pairs_avx512_bf16(first, second, out) }
    }
}

/// The tiles of a column (`Micro::column`), each tile's store run during the next one's
/// products: the four accumulators are stored to one of two blocks, and while the next tile's
/// products run, the other block's rows are written through the previous tile's `out`, four
/// rows a step of k. The AMX unit runs the products while the AVX-512 units convert and store.
/// A 32 × 32 tile at k = 256 (256 KiB of A slivers in L2, B's in L1; Xeon VM, session 36)
/// took 270–280 ns for its products and 445–470 ns with its store after them; 385–430 ns with
/// the previous tile's store interleaved. The tile's own rows of C are asked for into L2 a few
/// a step: all 32 lines into L1 before the products (session 36) held the fill buffers the
/// tile loads wait on, and cost as much as the stores (1152 × 256 × 768 on one core, C on
/// lines: 410–440 µs against 350–375; session 37).
///
/// # Safety
/// As `Micro::tile`'s, for every tile: the CPU has AMX-TILE and AMX-BF16, the permission,
/// and AVX-512 F, BW, VL and BF16 (`Kernels` for the amx path exists only then).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn pipelined(
    kc: usize,
    a: ATiles,
    b: *const Bf16,
    (alpha, beta): (f32, f32),
    outs: impl Iterator<Item = TileOut>,
) {
    let mut blocks = [std::mem::MaybeUninit::<Block>::uninit(), std::mem::MaybeUninit::uninit()];
    let blocks = [blocks[0].as_mut_ptr(), blocks[1].as_mut_ptr()];
    // The tile whose block waits to be written, and that block.
    let mut pending: Option<(TileOut, *const Block)> = None;
    // SAFETY: tile i's step t reads A's two 16-row tiles as `a` places them and B at
    // b + t·1024 (16 rows of 128 bytes, the second tile 64 bytes in), inside the slivers
    // padded to 32 k; the stores write a 4 KiB block, read back only once written; the rest
    // as the caller guarantees.
    unsafe {
        configure();
        for (i, out) in outs.enumerate() {
            let (at, block) = (a.at.add(i * a.tile), blocks[i % 2]);
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem, preserves_flags)
            );
            let steps = kc.div_ceil(32);
            // This tile's rows of C, stored during the next tile's products, asked for into
            // L2 a few rows a step.
            let rows_a_step = 32usize.div_ceil(steps);
            for t in 0..steps {
                let (at, bt) = (at.add(t * a.step), b.add(t * 1024));
                // Each product issued as soon as its two tiles are loaded.
                asm!(
                    "tileloadd tmm4, [{a0} + {row_a}*1]",
                    "tileloadd tmm6, [{b0} + {row_b}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tileloadd tmm7, [{b1} + {row_b}*1]",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tileloadd tmm5, [{a1} + {row_a}*1]",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    a0 = in(reg) at,
                    a1 = in(reg) at.add(a.half),
                    b0 = in(reg) bt,
                    b1 = in(reg) bt.add(32),
                    row_a = in(reg) a.row,
                    row_b = in(reg) 128usize,
                    options(nostack, readonly, preserves_flags)
                );
                out.prefetch_rows_to_l2(t * rows_a_step, rows_a_step);
                if let Some((out, stored)) = pending {
                    store_rows(stored, 4 * t, 4 * t + 4, alpha, beta, out);
                }
            }
            if let Some((out, stored)) = pending {
                // The rows left when k had fewer than 8 steps.
                store_rows(stored, 4 * steps, 32, alpha, beta, out);
            }
            let c = block as *mut f32;
            asm!(
                "tilestored [{c0} + {row}*1], tmm0",
                "tilestored [{c1} + {row}*1], tmm1",
                "tilestored [{c2} + {row}*1], tmm2",
                "tilestored [{c3} + {row}*1], tmm3",
                c0 = in(reg) c,
                c1 = in(reg) c.add(16),
                c2 = in(reg) c.add(16 * 32),
                c3 = in(reg) c.add(16 * 32 + 16),
                row = in(reg) 128usize,
                options(nostack, preserves_flags)
            );
            pending = Some((out, block));
        }
        if let Some((out, stored)) = pending {
            store_rows(stored, 0, 32, alpha, beta, out);
        }
    }
}

/// Rows `from..to` of a stored block (those of the tile's rows) written through `out` (alpha,
/// beta, bias, edges) by the AVX-512 store, four at a time.
///
/// # Safety
/// The block was stored whole; `out` as `Micro::tile`'s; the CPU has AVX-512 F, BW, VL and
/// BF16.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn store_rows(block: *const Block, from: usize, to: usize, alpha: f32, beta: f32, out: TileOut) {
    for first in (from..to.min(out.rows)).step_by(4) {
        // SAFETY: rows first..first + 4 lie in the block (first < 32, a multiple of 4; a row
        // is two registers' 32 values); the rows written are the tile's.
        unsafe {
            let rows = &*((*block).0.as_ptr().add(32 * first) as *const [[__m512; 2]; 4]);
            store_avx512_native(rows, alpha, beta, out.rows_from(first, 4));
        }
    }
}
