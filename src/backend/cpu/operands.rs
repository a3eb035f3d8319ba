//! A GEMM's operands as the CPU holds them (gemm.rs): by strides inside a buffer, f32 or bf16
//! in 2 bytes.

use super::pack::Source;
use crate::backend::Gemm;
use crate::tensor::DType;

/// A matrix inside a larger buffer: element (i, j) is at `ptr[i·rs + j·cs]`.
#[derive(Clone, Copy)]
pub struct Strided {
    pub rs: isize,
    pub cs: isize,
}

impl Strided {
    pub const fn rows(rs: usize) -> Self {
        Strided { rs: rs as isize, cs: 1 }
    }
    /// The transpose of a row-major matrix with row stride `rs`.
    pub const fn transposed(rs: usize) -> Self {
        Strided { rs: 1, cs: rs as isize }
    }
    /// op(B) of `g` (k × n), B row-major as stored.
    pub(super) const fn of_b(g: Gemm) -> Self {
        if g.trans_b { Strided::transposed(g.k) } else { Strided::rows(g.n) }
    }
}

/// A GEMM operand as the CPU holds it: f32 values, or bf16 values in 2 bytes.
#[derive(Clone, Copy, Debug)]
pub enum Input<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
}

impl Input<'_> {
    /// The bytes the operand spans: (first, one past the last).
    pub fn address_range(&self) -> (usize, usize) {
        match self {
            Input::F32(a) => (a.as_ptr() as usize, a.as_ptr() as usize + size_of_val(*a)),
            Input::Bf16(a) => (a.as_ptr() as usize, a.as_ptr() as usize + size_of_val(*a)),
        }
    }

    pub(super) fn len(&self) -> usize {
        match self {
            Input::F32(a) => a.len(),
            Input::Bf16(a) => a.len(),
        }
    }

    pub(super) fn source(&self) -> Source {
        match self {
            Input::F32(a) => Source::F32(a.as_ptr()),
            Input::Bf16(a) => Source::Bf16(a.as_ptr()),
        }
    }
}

/// C as the CPU holds it.
#[derive(Debug)]
pub enum Output<'a> {
    /// f32 values; of type bf16, each value rounded to bf16 once, after its last slice of k
    /// and its bias, by the micro-kernel's store as it writes the tile (`TileOut::round`).
    F32(&'a mut [f32], DType),
    /// bf16 values in 2 bytes (`TileOut::bf16`): half the bytes of the rounded f32s.
    Bf16(&'a mut [u16]),
}

impl Output<'_> {
    pub(super) fn len(&self) -> usize {
        match self {
            Output::F32(c, _) => c.len(),
            Output::Bf16(c) => c.len(),
        }
    }
}
