//! The one call between the stand-ins: `libcublas.so` and `libcublasLt.so` hand a GEMM to
//! `libcuda.so`, which owns the allocation table the operands are checked against.

/// Column-major `C_i = alpha · op(A_i) · op(B_i) + beta · C_i`, cuBLAS's argument meaning.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Sgemm {
    pub trans_a: i32,
    pub trans_b: i32,
    pub m: i32,
    pub n: i32,
    pub k: i32,
    pub alpha: f32,
    pub a: u64,
    pub lda: i32,
    pub stride_a: i64,
    pub b: u64,
    pub ldb: i32,
    pub stride_b: i64,
    pub beta: f32,
    pub c: u64,
    pub ldc: i32,
    pub stride_c: i64,
    pub batch: i32,
    /// How A and B are rounded as they are read: [`ROUND_NONE`], [`ROUND_TF32`] (10-bit
    /// mantissa, as TF32 tensor cores do) or [`ROUND_BF16`] (to nearest even, 7 bits).
    pub round: i32,
    /// The handle's stream: a capturing one records the GEMM instead of running it.
    pub stream: u64,
    /// cuBLASLt's `BIAS` epilogue: `m` values added to every column of each C_i after the
    /// product (0: none).
    pub bias: u64,
    /// Storage types (cudaDataType: [`R_32F`] or [`R_16BF`]) of A and B (one type), of C, and
    /// of the bias.
    pub ab_type: i32,
    pub c_type: i32,
    pub bias_type: i32,
}

pub const R_32F: i32 = 0;
pub const R_16BF: i32 = 14;

pub const ROUND_NONE: i32 = 0;
pub const ROUND_TF32: i32 = 1;
pub const ROUND_BF16: i32 = 2;
