//! Input features that arrive as 16-bit floats (an fp16 or bf16 shard), widened to f32 and
//! standardised where they are read. The CPU twin of `kernels/inputs.cu`: the same values, bit
//! for bit, as widening on the host (`half`) and applying the input normalisation. Widening is
//! exact, so F16C's `vcvtph2ps` (the avx2 and avx512 paths) and `half`'s portable conversion
//! give the same bits; the normalisation is the same two roundings on every path.

use rayon::prelude::*;

use super::dispatch::{self, CpuPath};
use super::simd::vectorised;
use crate::backend::Half;

/// Rows per parallel task: about 64 K values.
const TASK_VALUES: usize = 1 << 16;

/// `out[i]` = the i-th half of `words` (two per word, the first in the low half) as f32, then
/// `(x − mean[c]) · inv_std[c]` for its column c when `norm` is given (`out` is `[rows, dim]`).
pub fn widen_features(words: &[f32], half: Half, dim: usize, norm: Option<(&[f32], &[f32])>, out: &mut [f32]) {
    let dim = dim.max(1);
    let halves = halves_of(words);
    let rows_per_task = (TASK_VALUES / dim).max(1);
    let task = |(t, out): (usize, &mut [f32])| {
        let at = t * rows_per_task * dim;
        widen_halves(half, &halves[at..at + out.len()], out);
        if let Some((mean, inv_std)) = norm {
            for row in out.chunks_exact_mut(dim) {
                vectorised!(row.iter_mut().zip(mean).zip(inv_std).for_each(|((x, &m), &s)| *x = (*x - m) * s));
            }
        }
    };
    if out.len() > TASK_VALUES {
        out.par_chunks_mut(rows_per_task * dim).enumerate().for_each(task);
    } else {
        task((0, out));
    }
}

/// The halves of `words` in order (little-endian: the words' own memory).
fn halves_of(words: &[f32]) -> std::borrow::Cow<'_, [u16]> {
    if cfg!(target_endian = "little") {
        std::borrow::Cow::Borrowed(bytemuck::cast_slice(words))
    } else {
        words.iter().flat_map(|w| [w.to_bits() as u16, (w.to_bits() >> 16) as u16]).collect()
    }
}

/// `dst[i]` = `src[i]` widened: the host's one widening of 16-bit features (the op above, a
/// batch's `Features::to_f32`, a shard's `FeatureDtype::widen_into`).
pub fn widen_halves(half: Half, src: &[u16], dst: &mut [f32]) {
    match half {
        Half::F16 => {
            #[cfg(target_arch = "x86_64")]
            if dispatch::current().path() != CpuPath::Portable && std::arch::is_x86_feature_detected!("f16c") {
                // SAFETY: F16C (and the AVX it implies) is checked just above.
                return unsafe { widen_f16c(src, dst) };
            }
            dst.iter_mut().zip(src).for_each(|(d, &b)| *d = half.widen(b));
        }
        Half::Bf16 => vectorised!(dst.iter_mut().zip(src).for_each(|(d, &b)| *d = f32::from_bits((b as u32) << 16))),
    }
}

/// fp16 to f32 eight at a time (`vcvtph2ps`), the tail by `half`.
///
/// # Safety
/// The CPU has F16C and AVX.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "f16c,avx")]
unsafe fn widen_f16c(src: &[u16], dst: &mut [f32]) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm256_cvtph_ps, _mm256_storeu_ps};
    let n = src.len().min(dst.len());
    let whole = n - n % 8;
    for i in (0..whole).step_by(8) {
        // SAFETY: i + 8 <= n, within both slices; unaligned loads and stores.
        unsafe {
            let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
        }
    }
    for i in whole..n {
        dst[i] = Half::F16.widen(src[i]);
    }
}
