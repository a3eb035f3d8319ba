//! The emulated device's stand-in for `libcublasLt.so`: handles, matmul descriptors, matrix
//! layouts and `cublasLtMatmul` on f32 storage or bf16 A and B (D bf16 or f32), with the epilogues the backend uses (none,
//! and `BIAS`: a vector added to every column of D), checked as cuBLASLt checks its arguments.
//! The arithmetic and the range checks run in `libcuda.so`, as for `libcublas.so`.

#![allow(non_snake_case, clippy::missing_safety_doc)]

mod blas_shared;
mod sgemm_abi;

use std::ffi::{c_int, c_void};

use blas_shared::*;
use sgemm_abi::{R_16BF, R_32F, ROUND_BF16, ROUND_NONE, ROUND_TF32, Sgemm};

// cublasLtMatmulDescAttributes_t and cublasLtEpilogue_t values (cublasLt.h).
const DESC_POINTER_MODE: c_int = 2;
const DESC_TRANSA: c_int = 3;
const DESC_TRANSB: c_int = 4;
const DESC_EPILOGUE: c_int = 7;
const DESC_BIAS_POINTER: c_int = 8;
const DESC_BIAS_DATA_TYPE: c_int = 26;
const EPILOGUE_DEFAULT: u32 = 1;
const EPILOGUE_BIAS: u32 = 4;

struct Desc {
    compute: c_int,
    transa: c_int,
    transb: c_int,
    epilogue: u32,
    bias: u64,
    /// `BIAS_DATA_TYPE`; unset (-1), the bias has D's type, as in cuBLASLt.
    bias_type: c_int,
    pointer_mode: c_int,
}

struct Layout {
    ty: c_int,
    rows: u64,
    cols: u64,
    ld: i64,
}

/// Boxes `v` into `*out`: INVALID_VALUE for a null `out`.
unsafe fn create<T>(out: *mut *mut c_void, v: T) -> Status {
    if out.is_null() {
        return INVALID_VALUE;
    }
    *out = Box::into_raw(Box::new(v)) as *mut c_void;
    SUCCESS
}

/// Frees what `create` boxed: NOT_INITIALIZED for a null one.
unsafe fn destroy<T>(p: *mut c_void) -> Status {
    if p.is_null() {
        return NOT_INITIALIZED;
    }
    drop(Box::from_raw(p as *mut T));
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtCreate(h: *mut *mut c_void) -> Status {
    create(h, 0u8)
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtDestroy(h: *mut c_void) -> Status {
    destroy::<u8>(h)
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulDescCreate(d: *mut *mut c_void, compute: c_int, scale: c_int) -> Status {
    if !F32_COMPUTE.contains(&compute) || scale != CUDA_R_32F
    {
        say(&format!("cublasLtMatmulDescCreate: CUBLAS_STATUS_NOT_SUPPORTED: compute type {compute}, scale type {scale} (the emulated device runs f32 only)"));
        return NOT_SUPPORTED;
    }
    create(d, Desc { compute, transa: 0, transb: 0, epilogue: EPILOGUE_DEFAULT, bias: 0, bias_type: -1, pointer_mode: 0 })
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulDescDestroy(d: *mut c_void) -> Status {
    destroy::<Desc>(d)
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmulDescSetAttribute(
    d: *mut c_void,
    attr: c_int,
    buf: *const c_void,
    size: usize,
) -> Status {
    let Some(d) = (d as *mut Desc).as_mut() else { return NOT_INITIALIZED };
    if buf.is_null() {
        return INVALID_VALUE;
    }
    let int = |want: usize| if size == want { Ok(()) } else { Err(INVALID_VALUE) };
    let set = match attr {
        DESC_POINTER_MODE => int(4).map(|_| d.pointer_mode = *(buf as *const c_int)),
        DESC_TRANSA => int(4).map(|_| d.transa = *(buf as *const c_int)),
        DESC_TRANSB => int(4).map(|_| d.transb = *(buf as *const c_int)),
        DESC_EPILOGUE => int(4).map(|_| d.epilogue = *(buf as *const u32)),
        DESC_BIAS_POINTER => int(8).map(|_| d.bias = *(buf as *const u64)),
        DESC_BIAS_DATA_TYPE => int(4).map(|_| d.bias_type = *(buf as *const c_int)),
        _ => {
            say(&format!("cublasLtMatmulDescSetAttribute: CUBLAS_STATUS_NOT_SUPPORTED: attribute {attr} (the stand-in knows pointer mode, transa/b, epilogue, bias pointer and type)"));
            Err(NOT_SUPPORTED)
        }
    };
    set.err().unwrap_or(SUCCESS)
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtMatrixLayoutCreate(
    l: *mut *mut c_void,
    ty: c_int,
    rows: u64,
    cols: u64,
    ld: i64,
) -> Status {
    create(l, Layout { ty, rows, cols, ld })
}

#[no_mangle]
pub unsafe extern "C" fn cublasLtMatrixLayoutDestroy(l: *mut c_void) -> Status {
    destroy::<Layout>(l)
}

/// D = alpha · op(A) · op(B) + beta · C (+ bias on every column), column-major as in cuBLAS.
/// The stand-in runs one matrix (no batch attribute) with D in C's place, or C unread
/// (beta 0); `algo` and the workspace are accepted and unused.
#[no_mangle]
pub unsafe extern "C" fn cublasLtMatmul(
    h: *mut c_void,
    desc: *mut c_void,
    alpha: *const c_void,
    a: *const c_void,
    a_desc: *mut c_void,
    b: *const c_void,
    b_desc: *mut c_void,
    beta: *const c_void,
    c: *const c_void,
    c_desc: *mut c_void,
    d: *mut c_void,
    d_desc: *mut c_void,
    _algo: *const c_void,
    _workspace: *mut c_void,
    _workspace_bytes: usize,
    stream: *mut c_void,
) -> Status {
    const WHAT: &str = "cublasLtMatmul";
    if h.is_null() {
        return NOT_INITIALIZED;
    }
    let (Some(desc), Some(la), Some(lb), Some(lc), Some(ld)) = (
        (desc as *const Desc).as_ref(),
        (a_desc as *const Layout).as_ref(),
        (b_desc as *const Layout).as_ref(),
        (c_desc as *const Layout).as_ref(),
        (d_desc as *const Layout).as_ref(),
    ) else {
        say(&format!("{WHAT}: CUBLAS_STATUS_INVALID_VALUE: a null descriptor or layout"));
        return INVALID_VALUE;
    };
    if semshare_emu_sticky() != 0 {
        return EXECUTION_FAILED;
    }
    let (alpha, beta) = (alpha as *const f32, beta as *const f32);
    // op(X) of a layout: rows × cols, transposed when t is set.
    let op = |l: &Layout, t: c_int| if t == 0 { (l.rows, l.cols) } else { (l.cols, l.rows) };
    let ((m, k), (kb, n)) = (op(la, desc.transa), op(lb, desc.transb));
    let bias_type = if desc.bias_type == -1 { ld.ty } else { desc.bias_type };
    let f32_only = [la.ty, lb.ty, lc.ty, ld.ty].iter().all(|&t| t == CUDA_R_32F);
    let bf16_ab = la.ty == CUDA_R_16BF
        && lb.ty == CUDA_R_16BF
        && lc.ty == ld.ty
        && [CUDA_R_16BF, CUDA_R_32F].contains(&ld.ty)
        && [COMPUTE_32F, COMPUTE_32F_PEDANTIC].contains(&desc.compute);
    let bad = if !f32_only && !bf16_ab {
        let types = [la.ty, lb.ty, lc.ty, ld.ty];
        Some((NOT_SUPPORTED, format!("layout types {types:?} with compute type {} (the stand-in runs f32, and bf16 A and B with CUBLAS_COMPUTE_32F)", desc.compute)))
    } else if desc.epilogue == EPILOGUE_BIAS && ![CUDA_R_16BF, CUDA_R_32F].contains(&bias_type) {
        Some((NOT_SUPPORTED, format!("bias type {bias_type}")))
    } else if desc.epilogue == EPILOGUE_BIAS && ld.ty == CUDA_R_16BF && bias_type == CUDA_R_32F {
        // As cuBLASLt 13.1 answered on an H200 (2026-12-04), for every shape tried.
        Some((INVALID_VALUE, "an f32 bias on a bf16 D".into()))
    } else if !(0..=1).contains(&desc.transa) || !(0..=1).contains(&desc.transb) {
        Some((INVALID_VALUE, "transa/transb must be N or T".into()))
    } else if desc.epilogue != EPILOGUE_DEFAULT && desc.epilogue != EPILOGUE_BIAS {
        Some((NOT_SUPPORTED, format!("epilogue {} (the stand-in runs DEFAULT and BIAS)", desc.epilogue)))
    } else if desc.epilogue == EPILOGUE_BIAS && desc.bias == 0 {
        Some((INVALID_VALUE, "the BIAS epilogue without a bias pointer".into()))
    } else if desc.pointer_mode != 0 || alpha.is_null() || beta.is_null() {
        Some((NOT_SUPPORTED, "alpha and beta must be host scalars".into()))
    } else if k != kb || (m, n) != (ld.rows, ld.cols) || (lc.rows, lc.cols) != (ld.rows, ld.cols) {
        Some((
            INVALID_VALUE,
            format!("shapes do not multiply: op(A) {m}x{k}, op(B) {kb}x{n}, C {}x{}, D {}x{}", lc.rows, lc.cols, ld.rows, ld.cols),
        ))
    } else if [la, lb, lc, ld].iter().any(|l| l.ld < (l.rows as i64).max(1)) {
        Some((INVALID_VALUE, "a leading dimension below its rows".into()))
    } else if *beta != 0.0 && (c != d as *const c_void || lc.ld != ld.ld) {
        Some((NOT_SUPPORTED, "beta != 0 with C and D apart (the stand-in computes in place)".into()))
    } else if [m, n, k].iter().any(|&v| v > i32::MAX as u64) {
        Some((NOT_SUPPORTED, "a dimension past 2^31".into()))
    } else {
        None
    };
    if let Some((status, why)) = bad {
        say(&format!("{WHAT}: {}: {why}", if status == NOT_SUPPORTED { "CUBLAS_STATUS_NOT_SUPPORTED" } else { "CUBLAS_STATUS_INVALID_VALUE" }));
        return status;
    }
    let g = Sgemm {
        trans_a: desc.transa,
        trans_b: desc.transb,
        m: m as i32,
        n: n as i32,
        k: k as i32,
        alpha: *alpha,
        a: a as u64,
        lda: la.ld as i32,
        stride_a: 0,
        b: b as u64,
        ldb: lb.ld as i32,
        stride_b: 0,
        beta: *beta,
        c: d as u64,
        ldc: ld.ld as i32,
        stride_c: 0,
        batch: 1,
        round: match desc.compute {
            COMPUTE_32F_FAST_16BF => ROUND_BF16,
            COMPUTE_32F_FAST_TF32 => ROUND_TF32,
            _ => ROUND_NONE,
        },
        stream: stream as u64,
        bias: if desc.epilogue == EPILOGUE_BIAS { desc.bias } else { 0 },
        ab_type: if la.ty == CUDA_R_16BF { R_16BF } else { R_32F },
        c_type: if ld.ty == CUDA_R_16BF { R_16BF } else { R_32F },
        bias_type: if bias_type == CUDA_R_16BF { R_16BF } else { R_32F },
    };
    blas_shared::sgemm(WHAT, &g)
}
