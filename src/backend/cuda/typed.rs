//! The ops whose operands may be stored as bf16 (issue 12 item 6): memory (download, fill,
//! copy, write, scale), conversion between f32 and bf16, and the GEMMs. Every other op takes
//! f32 only, which `Cuda::launch` enforces: a bf16 tensor handed to an `_f32` kernel is an
//! error naming the kernel (`Arg::Bf16`).

use super::{Arg, Cuda, dev_err, tensor_ptr, view_mut_ptr, view_ptr};
use crate::Result;
use crate::backend::{Backend, Gemm, check_gemm, check_gemm_bias, check_gemm_types, expect_dtype, expect_len};
use crate::tensor::{DType, Tensor, View, ViewMut, bf16_bits};
use cudarc::driver::result;

/// The entry of an elementwise kernel for `dtype` (`<op>_fwd_f32` or `<op>_fwd_bf16`).
pub(super) fn entry(dtype: DType, f32_name: &'static str, bf16_name: &'static str) -> &'static str {
    match dtype {
        DType::F32 => f32_name,
        DType::Bf16 => bf16_name,
    }
}

impl Cuda {
    /// Zeroes `bytes` bytes at `ptr` (a live pool block or a view into one).
    pub(super) fn memset0(&mut self, ptr: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        self.counts.copies += 1;
        // SAFETY: ptr..ptr + bytes is a live pool block or a view into one (the caller's).
        unsafe { result::memset_d8_async(ptr, 0, bytes, self.stream.cu_stream()) }.map_err(dev_err("memset"))
    }

    pub(super) fn download_values(&mut self, x: View) -> Result<Vec<f32>> {
        Ok(match x.dtype() {
            DType::F32 => self.download_as::<f32>(x)?,
            DType::Bf16 => self.download_as::<u16>(x)?.into_iter().map(|w| f32::from_bits((w as u32) << 16)).collect(),
        })
    }

    /// The `x.len()` stored elements of `x`, as `T` (its storage type's size), after the
    /// stream has run up to here.
    fn download_as<T: cudarc::driver::DeviceRepr + Default + Clone>(&mut self, x: View) -> Result<Vec<T>> {
        let mut out = vec![T::default(); x.len()];
        self.bind()?;
        if !out.is_empty() {
            let bytes = std::mem::size_of_val(&out[..]);
            // SAFETY: x is a live device range of x.len() elements of T's size (the caller
            // matches T to x's type); we synchronise before reading.
            unsafe { result::memcpy_dtoh_async(&mut out, view_ptr(x)?, self.stream.cu_stream()) }
                .map_err(dev_err(format!("download {bytes} bytes")))?;
        }
        self.synchronize()?;
        Ok(out)
    }

    pub(super) fn fill_values(&mut self, x: ViewMut, value: f32) -> Result<()> {
        let n = x.len();
        if value == 0.0 && value.is_sign_positive() {
            let p = if n == 0 { 0 } else { view_mut_ptr(&x)? };
            return self.memset0(p, n * x.dtype().bytes());
        }
        let name = entry(x.dtype(), "fill_fwd_f32", "fill_fwd_bf16");
        self.flat(name, n, &[Arg::view_mut(&x)?, Arg::F32(value), Arg::U64(n as u64)])
    }

    pub(super) fn copy_values(&mut self, src: View, dst: ViewMut) -> Result<()> {
        expect_len("copy", "destination", dst.len(), src.len())?;
        expect_dtype("copy", "the destination", dst.dtype(), src.dtype())?;
        if src.is_empty() {
            return Ok(());
        }
        let (s, d) = (view_ptr(src)?, view_mut_ptr(&dst)?);
        let bytes = src.len() * src.dtype().bytes();
        self.bind()?;
        self.counts.copies += 1;
        // SAFETY: both are live device ranges of `bytes` bytes (a view and a disjoint mutable view).
        unsafe { result::memcpy_dtod_async(d, s, bytes, self.stream.cu_stream()) }
            .map_err(dev_err("copy device to device"))
    }

    pub(super) fn write_values(&mut self, dst: ViewMut, data: &[f32]) -> Result<()> {
        expect_len("write", "data", data.len(), dst.len())?;
        match dst.dtype() {
            DType::F32 => self.htod(view_mut_ptr(&dst)?, data, "values"),
            DType::Bf16 => {
                let words: Vec<u16> = data.iter().map(|&x| bf16_bits(x)).collect();
                self.htod(view_mut_ptr(&dst)?, &words, "bf16 values")
            }
        }
    }

    pub(super) fn scale_values(&mut self, x: ViewMut, s: f32) -> Result<()> {
        let n = x.len();
        let name = entry(x.dtype(), "scale_fwd_f32", "scale_fwd_bf16");
        self.flat(name, n, &[Arg::view_mut(&x)?, Arg::F32(s), Arg::U64(n as u64)])
    }

    pub(super) fn convert_values(&mut self, x: View, dtype: DType) -> Result<Tensor> {
        let mut y = self.alloc_typed(&[x.len()], dtype)?;
        self.convert_into(x, y.view_mut())?;
        Ok(y)
    }

    /// `y = x` in `y`'s type (rounded to nearest even into bf16; exact into f32).
    fn convert_into(&mut self, x: View, y: ViewMut) -> Result<()> {
        expect_len("convert", "destination", y.len(), x.len())?;
        let n = x.len();
        let name = match (x.dtype(), y.dtype()) {
            (DType::F32, DType::Bf16) => "convert_from_f32_bf16",
            (DType::Bf16, DType::F32) => "convert_to_f32_bf16",
            _ => return self.copy_values(x, y),
        };
        self.flat(name, n, &[Arg::view(x)?, Arg::view_mut(&y)?, Arg::U64(n as u64)])
    }

    pub(super) fn gemm_typed(&mut self, g: Gemm, a: View, b: View, c: ViewMut) -> Result<()> {
        check_gemm(&g, a.len(), b.len(), c.len())?;
        check_gemm_types("gemm", a.dtype(), b.dtype())?;
        if g.k == 0 {
            // Nothing to multiply: the definition is C = beta·C (and exactly 0 for beta = 0,
            // as cuBLAS would write, even over NaN).
            return if g.beta == 0.0 { self.fill_values(c, 0.0) } else { self.scale_values(c, g.beta) };
        }
        let (pa, pb, pc) = (view_ptr(a)?, view_ptr(b)?, view_mut_ptr(&c)?);
        let lda = if g.trans_a { g.m } else { g.k };
        let ldb = if g.trans_b { g.k } else { g.n };
        self.gemm_strided_batched(
            self.precision(),
            (a.dtype(), c.dtype()),
            (g.m, g.n, g.k),
            (g.trans_a, g.trans_b),
            g.alpha,
            (pa, lda, 0),
            (pb, ldb, 0),
            g.beta,
            (pc, g.n, 0),
            1,
        )
    }

    /// One cuBLASLt matmul with the bias in its epilogue (`lt.rs`).
    pub(super) fn gemm_bias_typed(&mut self, g: Gemm, a: View, b: View, bias: View, c: &mut Tensor) -> Result<()> {
        check_gemm_bias(&g, &a, &b, &bias, c)?;
        if g.k == 0 {
            // f32 only (`check_gemm_bias`): beta·c, then the bias.
            self.gemm_typed(g, a, b, c.view_mut())?;
            return self.add_bias(c, bias);
        }
        let precision = self.precision();
        let ptrs = (view_ptr(a)?, view_ptr(b)?, view_ptr(bias)?, tensor_ptr(c)?);
        self.gemm_bias_lt(precision, (a.dtype(), c.dtype()), g, ptrs)
    }
}
