//! Input features that arrive as 16-bit floats (an fp16 or bf16 shard), widened to f32 and
//! standardised where they are read. The CPU twin of `kernels/inputs.cu`: the same values, bit
//! for bit, as widening on the host (`half`) and applying the input normalisation.

use crate::backend::Half;

/// `out[i]` = the i-th half of `words` (two per word, the first in the low half) as f32, then
/// `(x − mean[c]) · inv_std[c]` for its column c when `norm` is given (`out` is `[rows, dim]`).
pub fn widen_features(words: &[f32], half: Half, dim: usize, norm: Option<(&[f32], &[f32])>, out: &mut [f32]) {
    let halves = words.iter().flat_map(|w| {
        let b = w.to_bits();
        [b as u16, (b >> 16) as u16]
    });
    for (x, bits) in out.iter_mut().zip(halves) {
        *x = half.widen(bits);
    }
    if let Some((mean, inv_std)) = norm {
        for row in out.chunks_exact_mut(dim.max(1)) {
            for ((x, &m), &s) in row.iter_mut().zip(mean).zip(inv_std) {
                *x = (*x - m) * s;
            }
        }
    }
}
