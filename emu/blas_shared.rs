//! What the two BLAS stand-ins (`libcublas.rs`, `libcublaslt.rs`) share: cuBLAS's status codes,
//! the data and compute types they run, and the hand-over of a GEMM to `libcuda.so`.

#![allow(dead_code)] // each stand-in uses part of it

use std::ffi::{c_char, c_int};

use crate::sgemm_abi::Sgemm;

pub type Status = c_int;
pub const SUCCESS: Status = 0;
pub const NOT_INITIALIZED: Status = 1;
pub const INVALID_VALUE: Status = 7;
pub const EXECUTION_FAILED: Status = 13;
pub const NOT_SUPPORTED: Status = 15;

// cudaDataType and cublasComputeType_t values (library_types.h, cublas_api.h).
pub const CUDA_R_32F: c_int = 0;
pub const CUDA_R_16BF: c_int = 14;
pub const COMPUTE_32F: c_int = 68;
pub const COMPUTE_32F_PEDANTIC: c_int = 69;
pub const COMPUTE_32F_FAST_16BF: c_int = 75;
pub const COMPUTE_32F_FAST_TF32: c_int = 77;
/// The compute types with f32 storage that the stand-ins run.
pub const F32_COMPUTE: [c_int; 4] = [COMPUTE_32F, COMPUTE_32F_PEDANTIC, COMPUTE_32F_FAST_16BF, COMPUTE_32F_FAST_TF32];

extern "C" {
    fn semshare_emu_sgemm(g: *const Sgemm, err: *mut c_char, err_len: usize) -> c_int;
    fn semshare_emu_fault(msg: *const c_char) -> u32;
    pub fn semshare_emu_sticky() -> u32;
}

pub fn say(msg: &str) {
    eprintln!("semshare-emu: {msg}");
}

/// Runs (or, on a capturing stream, records) `g` in `libcuda.so`; an operand out of range
/// faults the context, as on the GPU, and is EXECUTION_FAILED naming `what`.
pub unsafe fn sgemm(what: &str, g: &Sgemm) -> Status {
    let mut err = [0 as c_char; 1024];
    if semshare_emu_sgemm(g, err.as_mut_ptr(), err.len()) != 0 {
        let msg = std::ffi::CStr::from_ptr(err.as_ptr()).to_string_lossy().into_owned();
        let full = std::ffi::CString::new(format!("{what}: {msg}")).unwrap_or_default();
        semshare_emu_fault(full.as_ptr());
        return EXECUTION_FAILED;
    }
    SUCCESS
}
