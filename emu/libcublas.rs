//! The emulated device's stand-in for `libcublas.so`: handles, streams, math modes, and the
//! GEMMs the backend runs (SGEMM, and `cublasGemmEx` on f32 or bf16 storage, plain and
//! strided-batched) with cuBLAS's argument validation. The arithmetic and the range checks run in `libcuda.so` (this library's one
//! dependency), which owns the allocation table. TF32 math mode and the `_FAST_TF32` /
//! `_FAST_16BF` compute types round the inputs to TF32 or bf16 as tensor cores read them.

#![allow(non_snake_case, clippy::missing_safety_doc)]

mod blas_shared;
mod sgemm_abi;

use std::ffi::{c_int, c_void};

use blas_shared::*;
use sgemm_abi::{R_16BF, R_32F, ROUND_BF16, ROUND_NONE, ROUND_TF32, Sgemm};

extern "C" {
    fn cuStreamIsCapturing(s: *mut c_void, status: *mut c_int) -> u32;
}

struct Handle {
    math_mode: c_int,
    pointer_mode: c_int,
    stream: *mut c_void,
    /// `cublasSetWorkspace`'s buffer (0: none set).
    workspace: u64,
}

#[no_mangle]
pub unsafe extern "C" fn cublasCreate_v2(h: *mut *mut c_void) -> Status {
    if h.is_null() {
        return INVALID_VALUE;
    }
    *h = Box::into_raw(Box::new(Handle { math_mode: 0, pointer_mode: 0, stream: std::ptr::null_mut(), workspace: 0 }))
        as *mut c_void;
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cublasDestroy_v2(h: *mut c_void) -> Status {
    if h.is_null() {
        return NOT_INITIALIZED;
    }
    drop(Box::from_raw(h as *mut Handle));
    SUCCESS
}

unsafe fn handle<'a>(h: *mut c_void) -> Option<&'a mut Handle> {
    (h as *mut Handle).as_mut()
}

/// Runs `f` on a live handle: NOT_INITIALIZED for a null one.
unsafe fn with_handle(h: *mut c_void, f: impl FnOnce(&mut Handle) -> Status) -> Status {
    match handle(h) {
        Some(h) => f(h),
        None => NOT_INITIALIZED,
    }
}

/// Writes a handle's field to `out`: NOT_INITIALIZED, INVALID_VALUE for a null `out`.
unsafe fn get<T: Copy>(h: *mut c_void, out: *mut T, field: impl FnOnce(&Handle) -> T) -> Status {
    if out.is_null() {
        return INVALID_VALUE;
    }
    with_handle(h, |h| {
        *out = field(h);
        SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn cublasSetStream_v2(h: *mut c_void, s: *mut c_void) -> Status {
    with_handle(h, |h| {
        h.stream = s;
        SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn cublasGetStream_v2(h: *mut c_void, s: *mut *mut c_void) -> Status {
    get(h, s, |h| h.stream)
}

#[no_mangle]
pub unsafe extern "C" fn cublasSetMathMode(h: *mut c_void, mode: c_int) -> Status {
    with_handle(h, |h| {
        h.math_mode = mode;
        SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn cublasGetMathMode(h: *mut c_void, mode: *mut c_int) -> Status {
    get(h, mode, |h| h.math_mode)
}

#[no_mangle]
pub unsafe extern "C" fn cublasSetPointerMode_v2(h: *mut c_void, mode: c_int) -> Status {
    with_handle(h, |h| {
        h.pointer_mode = mode;
        SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn cublasGetPointerMode_v2(h: *mut c_void, mode: *mut c_int) -> Status {
    get(h, mode, |h| h.pointer_mode)
}

#[no_mangle]
pub unsafe extern "C" fn cublasSetWorkspace_v2(h: *mut c_void, ws: *mut c_void, bytes: usize) -> Status {
    with_handle(h, |h| {
        h.workspace = if bytes == 0 { 0 } else { ws as u64 };
        SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn cublasGetVersion_v2(_h: *mut c_void, v: *mut c_int) -> Status {
    if v.is_null() {
        return INVALID_VALUE;
    }
    *v = 130000;
    SUCCESS
}

#[allow(clippy::too_many_arguments)]
unsafe fn sgemm(
    what: &str,
    h: *mut c_void,
    compute: Option<c_int>,
    (ab_type, c_type): (c_int, c_int),
    ta: c_int,
    tb: c_int,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: *const f32,
    a: *const f32,
    lda: c_int,
    sa: i64,
    b: *const f32,
    ldb: c_int,
    sb: i64,
    beta: *const f32,
    c: *mut f32,
    ldc: c_int,
    sc: i64,
    batch: c_int,
) -> Status {
    let Some(hd) = handle(h) else { return NOT_INITIALIZED };
    if semshare_emu_sticky() != 0 {
        return EXECUTION_FAILED;
    }
    // cuBLAS's own argument checks (CUBLAS_STATUS_INVALID_VALUE).
    let rows = |t: c_int, r: c_int, cc: c_int| if t == 0 { r } else { cc };
    let bad = if !(0..=2).contains(&ta) || !(0..=2).contains(&tb) {
        Some("transa/transb must be N, T or C".to_string())
    } else if m < 0 || n < 0 || k < 0 || batch < 0 {
        Some(format!("negative size m={m} n={n} k={k} batch={batch}"))
    } else if lda < rows(ta, m, k).max(1) {
        Some(format!("lda {lda} < {} (rows of A as stored)", rows(ta, m, k).max(1)))
    } else if ldb < rows(tb, k, n).max(1) {
        Some(format!("ldb {ldb} < {} (rows of B as stored)", rows(tb, k, n).max(1)))
    } else if ldc < m.max(1) {
        Some(format!("ldc {ldc} < m = {}", m.max(1)))
    } else if alpha.is_null() || beta.is_null() {
        Some("alpha or beta is a null pointer".to_string())
    } else {
        None
    };
    if let Some(why) = bad {
        say(&format!("{what}: CUBLAS_STATUS_INVALID_VALUE: {why}"));
        return INVALID_VALUE;
    }
    let g = Sgemm {
        trans_a: (ta != 0) as i32,
        trans_b: (tb != 0) as i32,
        m,
        n,
        k,
        alpha: *alpha,
        a: a as u64,
        lda,
        stride_a: sa,
        b: b as u64,
        ldb,
        stride_b: sb,
        beta: *beta,
        c: c as u64,
        ldc,
        stride_c: sc,
        batch,
        round: match compute {
            Some(COMPUTE_32F_FAST_16BF) => ROUND_BF16,
            Some(COMPUTE_32F_FAST_TF32) => ROUND_TF32,
            Some(COMPUTE_32F_PEDANTIC) => ROUND_NONE,
            // CUBLAS_TF32_TENSOR_OP_MATH = 3 (the low bits; 16 is a flag) lets a plain f32
            // GEMM (SGEMM, or compute type 32F) use TF32 tensor cores.
            _ if (hd.math_mode & 0xf) == 3 => ROUND_TF32,
            _ => ROUND_NONE,
        },
        stream: hd.stream as u64,
        bias: 0,
        ab_type,
        c_type,
        bias_type: R_32F,
    };
    // Real cuBLAS allocates its workspace on first use unless one is set, which a capture
    // forbids: capturing a GEMM needs `cublasSetWorkspace` first.
    let mut capturing = 0;
    if cuStreamIsCapturing(hd.stream, &mut capturing) == 0 && capturing != 0 && hd.workspace == 0 {
        say(&format!("{what}: CUBLAS_STATUS_NOT_SUPPORTED: captured without a workspace (cublasSetWorkspace)"));
        return NOT_SUPPORTED;
    }
    blas_shared::sgemm(what, &g)
}

#[no_mangle]
pub unsafe extern "C" fn cublasSgemm_v2(
    h: *mut c_void,
    ta: c_int,
    tb: c_int,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: *const f32,
    a: *const f32,
    lda: c_int,
    b: *const f32,
    ldb: c_int,
    beta: *const f32,
    c: *mut f32,
    ldc: c_int,
) -> Status {
    sgemm("cublasSgemm", h, None, (R_32F, R_32F), ta, tb, m, n, k, alpha, a, lda, 0, b, ldb, 0, beta, c, ldc, 0, 1)
}

#[no_mangle]
pub unsafe extern "C" fn cublasSgemmStridedBatched(
    h: *mut c_void,
    ta: c_int,
    tb: c_int,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: *const f32,
    a: *const f32,
    lda: c_int,
    sa: i64,
    b: *const f32,
    ldb: c_int,
    sb: i64,
    beta: *const f32,
    c: *mut f32,
    ldc: c_int,
    sc: i64,
    batch: c_int,
) -> Status {
    sgemm("cublasSgemmStridedBatched", h, None, (R_32F, R_32F), ta, tb, m, n, k, alpha, a, lda, sa, b, ldb, sb, beta, c, ldc, sc, batch)
}

/// Whether a `cublasGemmEx` call's storage and compute types are a combination cuBLAS runs and
/// the stand-in does: all f32 with an f32 compute type; or bf16 A and B, bf16 or f32 C, with
/// `CUBLAS_COMPUTE_32F` (cuBLAS's table has no `_FAST_*` compute type for 16-bit storage).
fn supported(what: &str, [a, b, c]: [c_int; 3], compute: c_int) -> Result<(), Status> {
    let ok = if a == R_32F && b == R_32F && c == R_32F {
        F32_COMPUTE.contains(&compute)
    } else {
        a == R_16BF && b == R_16BF && (c == R_16BF || c == R_32F) && [COMPUTE_32F, COMPUTE_32F_PEDANTIC].contains(&compute)
    };
    if !ok {
        say(&format!("{what}: CUBLAS_STATUS_NOT_SUPPORTED: data types A {a}, B {b}, C {c} with compute type {compute} (the emulated device runs f32 storage, and bf16 A and B with CUBLAS_COMPUTE_32F)"));
        return Err(NOT_SUPPORTED);
    }
    Ok(())
}

#[no_mangle]
pub unsafe extern "C" fn cublasGemmEx(
    h: *mut c_void,
    ta: c_int,
    tb: c_int,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: *const c_void,
    a: *const c_void,
    a_type: c_int,
    lda: c_int,
    b: *const c_void,
    b_type: c_int,
    ldb: c_int,
    beta: *const c_void,
    c: *mut c_void,
    c_type: c_int,
    ldc: c_int,
    compute: c_int,
    algo: c_int,
) -> Status {
    // One product: the strided-batched call with a batch of one (its messages name that call).
    cublasGemmStridedBatchedEx(
        h, ta, tb, m, n, k, alpha, a, a_type, lda, 0, b, b_type, ldb, 0, beta, c, c_type, ldc, 0, 1, compute, algo,
    )
}

#[no_mangle]
pub unsafe extern "C" fn cublasGemmStridedBatchedEx(
    h: *mut c_void,
    ta: c_int,
    tb: c_int,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: *const c_void,
    a: *const c_void,
    a_type: c_int,
    lda: c_int,
    sa: i64,
    b: *const c_void,
    b_type: c_int,
    ldb: c_int,
    sb: i64,
    beta: *const c_void,
    c: *mut c_void,
    c_type: c_int,
    ldc: c_int,
    sc: i64,
    batch: c_int,
    compute: c_int,
    _algo: c_int,
) -> Status {
    const WHAT: &str = "cublasGemmStridedBatchedEx";
    if let Err(s) = supported(WHAT, [a_type, b_type, c_type], compute) {
        return s;
    }
    let (alpha, beta) = (alpha as *const f32, beta as *const f32);
    let (a, b, c) = (a as *const f32, b as *const f32, c as *mut f32);
    sgemm(WHAT, h, Some(compute), (a_type, c_type), ta, tb, m, n, k, alpha, a, lda, sa, b, ldb, sb, beta, c, ldc, sc, batch)
}
