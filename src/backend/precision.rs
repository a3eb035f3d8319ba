//! The number formats the backends agree on: the arithmetic of the layers' GEMMs
//! ([`Precision`]) and the 16-bit floats input features may arrive in ([`Half`]).

use crate::Result;

/// The arithmetic of the GEMMs of the model's layers (config key `precision`, one meaning on
/// every backend): `F32`, the default (IEEE); `Bf16`: operands rounded to bfloat16 (to nearest,
/// ties to even), products summed in fp32; `Tf32`: operands rounded to TF32 (10-bit mantissa),
/// summed in fp32, on CUDA's tensor cores only (the CPU has no TF32 unit and refuses it).
/// Attention's per-head products and softmax, the norms, the losses, the optimiser and top-k
/// stay fp32 on every device. A layer GEMM has the precision whatever its rows, so that an
/// item's embedding does not depend on the size of its batch; the GRU's recurrence follows it
/// but for TF32 ([`Precision::of_recurrence`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Precision {
    #[default]
    #[serde(rename = "fp32", alias = "f32")]
    F32,
    #[serde(rename = "tf32")]
    Tf32,
    #[serde(rename = "bf16")]
    Bf16,
}

impl Precision {
    pub fn is_fp32(&self) -> bool {
        *self == Precision::F32
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "fp32",
            Precision::Tf32 => "tf32",
            Precision::Bf16 => "bf16",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "fp32" | "f32" => Ok(Precision::F32),
            "tf32" => Ok(Precision::Tf32),
            "bf16" => Ok(Precision::Bf16),
            _ => Err(crate::Error::config(format!("precision = `{s}`: expected fp32, tf32 or bf16"))),
        }
    }

    /// The arithmetic of the GRU's recurrent products h·W_hhᵀ: the layers' for bf16 (operands
    /// rounded, f32 sums, on every device); IEEE f32 for TF32, since CUDA's persistent Bi-GRU
    /// kernel multiplies on CUDA cores, not tensor cores, and its step-by-step path must agree.
    pub fn of_recurrence(self) -> Precision {
        if self == Precision::Tf32 { Precision::F32 } else { self }
    }
}

/// A 16-bit float format input features may arrive in (an fp16 or bf16 shard): uploaded as
/// they are, two to a 4-byte word, and widened to f32 on the device ([`Backend::widen_features`](super::Backend::widen_features)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Half {
    /// IEEE binary16.
    F16,
    /// bfloat16: f32's upper half.
    Bf16,
}

impl Half {
    /// The f32 of one value's bits (exact: f32 holds every f16 and bf16).
    pub fn widen(self, bits: u16) -> f32 {
        match self {
            Half::F16 => half::f16::from_bits(bits).to_f32(),
            Half::Bf16 => f32::from_bits((bits as u32) << 16),
        }
    }

    /// The bits of x rounded to this format (to nearest, ties to even).
    pub fn narrow(self, x: f32) -> u16 {
        match self {
            Half::F16 => half::f16::from_f32(x).to_bits(),
            Half::Bf16 => half::bf16::from_f32(x).to_bits(),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Half::F16 => "f16",
            Half::Bf16 => "bf16",
        }
    }
}
