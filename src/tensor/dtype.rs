//! The element types a tensor stores ([`DType`]) and the rounding to bf16 both devices share.

/// How a tensor stores each element. Both devices store bf16 in 2 bytes. The CPU's kernels
/// that compute in f32 read a bf16 value widened exactly and round what they store
/// ([`DType::round`]), so the CPU computes what a device computes on its stored values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DType {
    #[default]
    F32,
    Bf16,
}

impl DType {
    /// Bytes a device stores per element.
    pub fn bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::Bf16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
        }
    }

    /// `x` as this type stores it: bf16 rounds to nearest, ties to even (as `cvt.rn.bf16.f32`
    /// does), keeping a NaN a NaN and infinities infinite.
    #[inline(always)]
    pub fn round(self, x: f32) -> f32 {
        match self {
            DType::F32 => x,
            DType::Bf16 => f32::from_bits((bf16_bits(x) as u32) << 16),
        }
    }

    /// Every value of `x` as this type stores it (a CPU tensor's values after an op).
    #[inline]
    pub fn round_all(self, x: &mut [f32]) {
        if self == DType::Bf16 {
            x.iter_mut().for_each(|v| *v = self.round(*v));
        }
    }
}

/// The bf16 nearest to `x` (ties to even) as its 16 bits: the high half of an f32. A NaN stays
/// a NaN (quietened), which a plain rounding could carry into infinity. Without a branch, so
/// that loops of it vectorise (the CPU's GEMM packing rounds its operands with it).
#[inline(always)]
pub fn bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
    let quiet = (bits >> 16) as u16 | 0x40;
    if x.is_nan() { quiet } else { rounded }
}
