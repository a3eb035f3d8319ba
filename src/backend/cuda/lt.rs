//! A linear layer's `y = x·Wᵀ + b` as one cuBLASLt matmul whose `BIAS` epilogue adds b as the
//! product is stored (issue 12 item 4): one launch and one write of y, where the GEMM and then
//! `add_bias_fwd_f32` wrote y, read it and wrote it again. A descriptor and three layouts are
//! made once per shape, transposes and precision and kept; the bias pointer is set per call
//! (a captured step keeps the one it was captured with, as it keeps every other pointer).

use std::collections::HashMap;
use std::ffi::c_void;

use cudarc::cublaslt::sys as lt;

use crate::backend::{Gemm, Precision};
use crate::tensor::DType;
use crate::{Error, Result};

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct Key {
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
    precision: Precision,
    /// Storage of A and B, and of C = D.
    types: (DType, DType),
}

/// What one shape's matmuls reuse.
struct Plan {
    desc: lt::cublasLtMatmulDesc_t,
    /// cuBLASLt's A, B and C = D (column-major: our B, our A, our Cᵀ).
    layouts: [lt::cublasLtMatrixLayout_t; 3],
}

/// A cuBLASLt handle and the plans made so far.
pub(crate) struct Lt {
    handle: lt::cublasLtHandle_t,
    plans: HashMap<Key, Plan>,
}

fn check(status: lt::cublasStatus_t, what: &str) -> Result<()> {
    if status == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(Error::Device { what: format!("cuBLASLt: {what}: {status:?}") })
    }
}

impl Lt {
    /// A handle, or a one-line error when `libcublasLt.so` cannot be loaded.
    pub(crate) fn new() -> Result<Lt> {
        // SAFETY: only probes for the shared library; cudarc would panic on first use without.
        if !unsafe { lt::is_culib_present() } {
            return Err(Error::Device {
                what: "libcublasLt.so (CUDA 13) could not be loaded: add it to LD_LIBRARY_PATH".into(),
            });
        }
        let mut handle = std::ptr::null_mut();
        // SAFETY: writes one handle.
        check(unsafe { lt::cublasLtCreate(&mut handle) }, "create a handle")?;
        Ok(Lt { handle, plans: HashMap::new() })
    }

    fn plan(&mut self, key: Key) -> Result<&Plan> {
        Ok(match self.plans.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(Plan::new(key)?),
        })
    }

    /// Row-major `c[m, n] = alpha·op(a)·op(b) + beta·c + bias` (bias: n values of c's type, on
    /// every row; the sum in f32, rounded once into a bf16 c) on `stream`, at `precision`'s
    /// compute type (bf16 A and B: `CUBLAS_COMPUTE_32F`), A and B stored as `types.0`, C as
    /// `types.1`, with `workspace` (pointer, bytes).
    ///
    /// # Safety
    /// a, b, c and bias are live device ranges of their types and of the shapes `g` gives
    /// (`c` row-major `[m, n]`, unaliased), and the stream and workspace belong to the
    /// handle's context.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn gemm_bias(
        &mut self,
        stream: cudarc::driver::sys::CUstream,
        workspace: (u64, usize),
        precision: Precision,
        types: (DType, DType),
        g: Gemm,
        (a, b, bias, c): (u64, u64, u64, u64),
    ) -> Result<()> {
        let key = Key { m: g.m, n: g.n, k: g.k, trans_a: g.trans_a, trans_b: g.trans_b, precision, types };
        let handle = self.handle;
        let plan = self.plan(key)?;
        let what = format!(
            "gemm + bias ({}, {} operands, {} output) m={} n={} k={}",
            precision.name(),
            types.0.name(),
            types.1.name(),
            g.m,
            g.n,
            g.k
        );
        // SAFETY: the plan's descriptor and layouts are live; the pointers are as the caller
        // guarantees; alpha and beta are host scalars read during the call.
        unsafe {
            let at = &bias as *const u64 as *const c_void;
            check(
                lt::cublasLtMatmulDescSetAttribute(
                    plan.desc,
                    lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    at,
                    8,
                ),
                &what,
            )?;
            let [la, lb, lc] = plan.layouts;
            check(
                lt::cublasLtMatmul(
                    handle,
                    plan.desc,
                    &g.alpha as *const f32 as *const c_void,
                    b as *const c_void,
                    la,
                    a as *const c_void,
                    lb,
                    &g.beta as *const f32 as *const c_void,
                    c as *const c_void,
                    lc,
                    c as *mut c_void,
                    lc,
                    std::ptr::null(),
                    workspace.0 as *mut c_void,
                    workspace.1,
                    stream as lt::cudaStream_t,
                ),
                &what,
            )
        }
    }
}

impl Plan {
    /// Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ: cuBLASLt's A is our B,
    /// its B our A, its D (= C) our C as stored; the bias runs along D's rows, our columns.
    fn new(key: Key) -> Result<Plan> {
        let Key { m, n, k, trans_a, trans_b, precision, types: (ab, c_type) } = key;
        use lt::cublasComputeType_t as Compute;
        let compute = match (ab, precision) {
            (DType::Bf16, _) | (_, Precision::F32) => Compute::CUBLAS_COMPUTE_32F,
            (_, Precision::Tf32) => Compute::CUBLAS_COMPUTE_32F_FAST_TF32,
            (_, Precision::Bf16) => Compute::CUBLAS_COMPUTE_32F_FAST_16BF,
        };
        let ty = |d: DType| match d {
            DType::F32 => lt::cudaDataType_t::CUDA_R_32F,
            DType::Bf16 => lt::cudaDataType_t::CUDA_R_16BF,
        };
        let f32_ty = lt::cudaDataType_t::CUDA_R_32F;
        // cublasOperation_t (cublas_api.h): N 0, T 1.
        let op = |t: bool| t as u32;
        // (rows, cols, ld) of each operand as stored, column-major.
        let ours_b = if trans_b { (k, n, k) } else { (n, k, n) };
        let ours_a = if trans_a { (m, k, m) } else { (k, m, k) };
        let mut plan = Plan { desc: std::ptr::null_mut(), layouts: [std::ptr::null_mut(); 3] };
        let what = format!("plan m={m} n={n} k={k}");
        // SAFETY: each call writes one descriptor or layout, or reads a 4-byte attribute; a plan
        // dropped half-made destroys only what was made (non-null).
        unsafe {
            check(lt::cublasLtMatmulDescCreate(&mut plan.desc, compute, f32_ty), &what)?;
            for (attr, value) in [
                (lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, op(trans_b)),
                (lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, op(trans_a)),
                (
                    lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
                    lt::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS as u32,
                ),
            ] {
                check(
                    lt::cublasLtMatmulDescSetAttribute(plan.desc, attr, &value as *const u32 as *const c_void, 4),
                    &what,
                )?;
            }
            let layouts = [(ours_b, ab), (ours_a, ab), ((n, m, n), c_type)];
            for (slot, ((rows, cols, ld), d)) in plan.layouts.iter_mut().zip(layouts) {
                check(lt::cublasLtMatrixLayoutCreate(slot, ty(d), rows as u64, cols as u64, ld as i64), &what)?;
            }
        }
        Ok(plan)
    }
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each was made by its create call and is destroyed once.
        unsafe {
            for l in self.layouts {
                if !l.is_null() {
                    lt::cublasLtMatrixLayoutDestroy(l);
                }
            }
            if !self.desc.is_null() {
                lt::cublasLtMatmulDescDestroy(self.desc);
            }
        }
    }
}

impl Drop for Lt {
    fn drop(&mut self) {
        self.plans.clear();
        // SAFETY: made by cublasLtCreate, destroyed once, after its plans.
        unsafe { lt::cublasLtDestroy(self.handle) };
    }
}
