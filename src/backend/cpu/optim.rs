//! AdamW over a range of the flat parameter buffer (PyTorch's update order: decay first).

use crate::backend::{AdamW, AdamWScalars};

pub fn adamw(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], hp: AdamW) {
    let AdamWScalars { step_size, inv_sqrt_bc2, decay } = hp.scalars();
    for i in 0..p.len() {
        let gi = g[i] * hp.grad_scale;
        m[i] = hp.beta1 * m[i] + (1.0 - hp.beta1) * gi;
        v[i] = hp.beta2 * v[i] + (1.0 - hp.beta2) * gi * gi;
        p[i] = p[i] * decay - step_size * m[i] / (v[i].sqrt() * inv_sqrt_bc2 + hp.eps);
    }
}

/// AdamW over the whole buffer, run by run (`hp.weight_decay` on the decayed runs, 0 on the
/// others), every gradient times the record's clip factor; a no-op when the record's status is
/// not 0 (`Backend::adamw_masked`).
pub fn adamw_masked(
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    runs: &[(usize, usize, bool)],
    hp: AdamW,
    record: &[f32],
) {
    use crate::backend::step::record::{CLIP, STATUS};
    if record[STATUS] != 0.0 {
        return;
    }
    for &(off, len, decay) in runs {
        let r = off..off + len;
        let hp = AdamW { weight_decay: if decay { hp.weight_decay } else { 0.0 }, grad_scale: record[CLIP], ..hp };
        adamw(&mut p[r.clone()], &g[r.clone()], &mut m[r.clone()], &mut v[r], hp);
    }
}

pub fn sum_squares(x: &[f32]) -> f64 {
    // Blocked so the f32 partial sums stay short; the total is f64.
    x.chunks(1024).map(|c| c.iter().map(|v| v * v).sum::<f32>() as f64).sum()
}
