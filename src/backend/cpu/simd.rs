//! The memory-bound and elementwise loops compiled for the active path's instruction set.
//!
//! The crate is built for baseline x86-64 (SSE2), so a plain loop is vectorised four lanes wide,
//! `floor` is a libm call and a 64-bit multiply is not vectorised at all. `vectorised!` runs
//! an expression inside a function compiled with the path's features, written out once per
//! path as a closure with that one caller, which LLVM inlines there: the same Rust is then
//! vectorised 16 lanes wide on `avx512` and 8 on `avx2`, with no intrinsics to keep in step
//! with the portable definition. Every path computes the same operations in the same order
//! (Rust never fuses a multiply and an add by itself), so the results are bitwise those of the
//! portable path (`tests/cpu_elementwise.rs` compares them).
//!
//! One closure shared by the three paths would have three callers and stay out of line,
//! compiled for the baseline: that is why this is a macro. Even so LLVM may leave a closure
//! with a long body out of line (and merge the avx2 and avx512 copies into one, compiled for
//! the baseline): attention's softmax was, in some builds and not others, 1.6× slower (with
//! 4 codegen units the closure could land in another unit than its caller). Release builds
//! now have one codegen unit (Cargo.toml), attention.rs's two long bodies are
//! `#[inline(always)]` functions that the closures call, and `tools/check_vectorised.py` (CI)
//! checks the release binary's machine code for any `simd::avx2` or `simd::avx512` that calls
//! a closure instead of holding its body.

/// `$body`, compiled for the active path (see the file header).
macro_rules! vectorised {
    ($body:expr) => {
        match $crate::backend::cpu::dispatch::current().path() {
            // SAFETY: `current` only returns a path whose features this CPU has (dispatch.rs).
            #[cfg(target_arch = "x86_64")]
            $crate::backend::cpu::dispatch::CpuPath::Avx512 | $crate::backend::cpu::dispatch::CpuPath::Amx => unsafe {
                $crate::backend::cpu::simd::avx512(|| $body)
            },
            #[cfg(target_arch = "x86_64")]
            $crate::backend::cpu::dispatch::CpuPath::Avx2 => unsafe { $crate::backend::cpu::simd::avx2(|| $body) },
            _ => $body,
        }
    };
}
pub(crate) use vectorised;

/// Calls `f` in a function compiled for the `avx512` path.
///
/// # Safety
/// The CPU has AVX-512 F/DQ/BW/VL, AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")]
pub unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// Calls `f` in a function compiled for the `avx2` path.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}
