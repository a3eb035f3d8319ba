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
//!   (`Layout { group: 32, depth: 32 }`);
//! - B: `[k / 2][32 columns][2 k]`, the pair layout of `vdpbf16ps` (microkernel.rs), padded
//!   to 32 k: 16 pair rows of 32 columns are two B tiles side by side, rows 128 bytes apart.
//!
//! The accumulators are stored to a 4 KiB block on the stack and written through `TileOut`
//! (alpha, beta, bias, edge tiles) by the AVX-512 store, as `Bf16Avx512` writes its registers.
//! Without AMX the kernel's tests run it with the instructions trapped and emulated
//! (tests/common/amx_trap.rs).

use std::arch::asm;
use std::arch::x86_64::{_mm512_loadu_ps, _mm512_setzero_ps};
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

/// 32 × 32 fp32, 64-byte aligned: where the four C tiles are stored.
#[repr(C, align(64))]
struct Block([f32; 32 * 32]);

impl Micro for Bf16Amx {
    type Packed = Bf16;
    const AVX_PACK: bool = true;
    const MR: usize = 32;
    const NR: usize = 32;
    const KG: usize = 2;
    const A: Layout = Layout { group: 32, depth: 32 };
    const B: Layout = Layout { group: 2, depth: 32 };

    unsafe fn tile(kc: usize, a: *const Bf16, b: *const Bf16, alpha: f32, beta: f32, out: TileOut) {
        // Written whole by the four tile stores below before it is read.
        let mut block = std::mem::MaybeUninit::<Block>::uninit();
        // SAFETY: the CPU has AMX-TILE and AMX-BF16 and the permission (the trait's contract:
        // `Kernels` for the amx path exists only then); step t reads A at a + t·1024 (two
        // 16 × 64-byte tiles, 1 KiB apart) and B at b + t·1024 (16 rows of 128 bytes, the
        // second tile 64 bytes in), inside the slivers padded to 32 k; the stores write the
        // 4 KiB block.
        unsafe {
            configure();
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem, preserves_flags)
            );
            for t in 0..kc.div_ceil(32) {
                let (at, bt) = (a.add(t * 1024), b.add(t * 1024));
                asm!(
                    "tileloadd tmm4, [{a0} + {row_a}*1]",
                    "tileloadd tmm5, [{a1} + {row_a}*1]",
                    "tileloadd tmm6, [{b0} + {row_b}*1]",
                    "tileloadd tmm7, [{b1} + {row_b}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    a0 = in(reg) at,
                    a1 = in(reg) at.add(512),
                    b0 = in(reg) bt,
                    b1 = in(reg) bt.add(32),
                    row_a = in(reg) 64usize,
                    row_b = in(reg) 128usize,
                    options(nostack, readonly, preserves_flags)
                );
            }
            let c = block.as_mut_ptr() as *mut f32;
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
            store(block.assume_init_ref(), alpha, beta, out);
        }
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

/// The stored block through `out` (alpha, beta, bias, edges) by the AVX-512 store.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn store(block: &Block, alpha: f32, beta: f32, out: TileOut) {
    // SAFETY: row i's two halves are inside the block; `out` as the caller guarantees.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 2]; 32];
        for (i, row) in acc.iter_mut().enumerate() {
            for (h, v) in row.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(block.0.as_ptr().add(32 * i + 16 * h));
            }
        }
        store_avx512_native(&acc, alpha, beta, out);
    }
}
