//! A CPU tensor's values whichever its type. bf16 tensors hold each value in 2 bytes
//! (`tensor::Storage`); the GEMM reads and writes them as they are (`gemm::Input`,
//! `gemm::Output`), layer norm's residual join and GELU at inference too. The other kernels
//! compute on f32 slices: they get a bf16 tensor widened (exactly: a bf16 is the high half of
//! an f32) and their output narrowed, which gives the same bits, since they round what they
//! store to the output's type.

use std::ops::Deref;

use super::elementwise::{narrow, widen};
use super::gemm::{Input, Output};
use crate::tensor::{DType, HostBuf, Tensor, View, ViewMut, host_pool};

/// A view's values as f32: an f32 view's own, a bf16 one's widened into a pooled buffer.
pub enum Wide<'a> {
    Borrowed(&'a [f32]),
    Owned(HostBuf),
}

impl Deref for Wide<'_> {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        match self {
            Wide::Borrowed(s) => s,
            Wide::Owned(v) => v,
        }
    }
}

impl Drop for Wide<'_> {
    fn drop(&mut self) {
        if let Wide::Owned(v) = self {
            host_pool::give(std::mem::take(v));
        }
    }
}

/// `v`'s values as f32.
pub fn wide(v: View<'_>) -> Wide<'_> {
    match v {
        View::CpuBf16(bits) => {
            let mut out = host_pool::dirty(bits.len());
            widen(bits, &mut out);
            Wide::Owned(out)
        }
        v => Wide::Borrowed(v.cpu()),
    }
}

/// `v` as a GEMM operand.
pub fn input(v: View<'_>) -> Input<'_> {
    match v {
        View::CpuBf16(bits) => Input::Bf16(bits),
        v => Input::F32(v.cpu()),
    }
}

/// `v` as a GEMM's C.
pub fn output(v: ViewMut<'_>) -> Output<'_> {
    match v {
        ViewMut::CpuBf16(bits) => Output::Bf16(bits),
        v => Output::F32(v.cpu(), DType::F32),
    }
}

/// `f` on `v`'s values as f32, written back to it: a bf16 view's widened, then each value
/// rounded back (`f` computes values of `v`'s type, so the rounding is exact).
pub fn in_f32<R>(v: ViewMut<'_>, f: impl FnOnce(&mut [f32]) -> R) -> R {
    match v {
        ViewMut::CpuBf16(bits) => {
            let mut values = host_pool::dirty(bits.len());
            widen(bits, &mut values);
            let r = f(&mut values);
            narrow(&values, bits);
            host_pool::give(values);
            r
        }
        v => f(v.cpu()),
    }
}

/// [`in_f32`] on a whole tensor.
pub fn tensor_in_f32<R>(t: &mut Tensor, f: impl FnOnce(&mut [f32]) -> R) -> R {
    in_f32(t.view_mut(), f)
}

/// A backend op's output: `values` (already rounded to `dtype`) as a tensor of `dtype`; bf16
/// narrowed into a buffer of its own, `values` going back to the pool.
pub fn stored(values: impl Into<HostBuf>, shape: &[usize], dtype: DType) -> Tensor {
    let t = Tensor::from_cpu(values, shape);
    retyped(t, dtype)
}

/// A CPU tensor as `dtype` stores it (bf16 ↔ f32; the same type is the tensor itself).
pub fn retyped(t: Tensor, dtype: DType) -> Tensor {
    match (t.dtype(), dtype) {
        (DType::F32, DType::Bf16) => {
            let mut out = Tensor::cpu_dirty(t.shape(), dtype);
            narrow(t.cpu(), out.cpu_bf16_mut());
            out
        }
        (DType::Bf16, DType::F32) => {
            let mut out = Tensor::cpu_dirty(t.shape(), dtype);
            widen(t.cpu_bf16(), out.cpu_mut());
            out
        }
        _ => t,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// bf16 is kept in 2 bytes and comes back exactly; the helpers give the f32 kernels its
    /// values and write theirs back rounded.
    #[test]
    fn bf16_tensors_hold_two_bytes_a_value_and_widen_exactly() {
        let values: Vec<f32> = (0..5000).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let rounded: Vec<f32> = values.iter().map(|&x| DType::Bf16.round(x)).collect();
        let t = retyped(Tensor::from_cpu(values.clone(), &[50, 100]), DType::Bf16);
        assert_eq!((t.dtype(), t.shape()), (DType::Bf16, &[50, 100][..]));
        assert!(matches!(t.view(), View::CpuBf16(bits) if bits.len() == 5000));
        assert_eq!(&*wide(t.view()), &rounded[..]);
        let mut t = t;
        tensor_in_f32(&mut t, |x| x.iter_mut().for_each(|v| *v *= 2.0));
        let back = retyped(t, DType::F32);
        let doubled: Vec<f32> = rounded.iter().map(|v| v * 2.0).collect();
        assert_eq!(back.cpu(), &doubled[..], "doubling a bf16 is exact");
        assert_eq!(stored(values, &[5000], DType::Bf16).to_f32s(), rounded);
    }
}
