//! AdamW over a range of the flat parameter buffer (PyTorch's update order: decay first).

use super::simd;
use crate::backend::{AdamW, AdamWConstants, AdamWScalars};

pub fn adamw(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], hp: AdamW) {
    adamw_with(p, g, m, v, hp.constants(), hp.scalars(), hp.grad_scale);
}

/// The update of every element, from the step's scalars (decay: this range's factor).
fn adamw_with(
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    hp: AdamWConstants,
    AdamWScalars { step_size, inv_sqrt_bc2, decay }: AdamWScalars,
    grad_scale: f32,
) {
    // Zipped rather than indexed (no bounds checks, so the loop vectorises) and compiled for the
    // path (`simd::vectorised!`): the same operations in the same order, the same bits.
    assert!(g.len() == p.len() && m.len() == p.len() && v.len() == p.len(), "adamw: lengths differ");
    simd::vectorised!({
        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            let gi = g * grad_scale;
            *m = hp.beta1 * *m + (1.0 - hp.beta1) * gi;
            *v = hp.beta2 * *v + (1.0 - hp.beta2) * gi * gi;
            *p = *p * decay - step_size * *m / (v.sqrt() * inv_sqrt_bc2 + hp.eps);
        }
    })
}

/// AdamW over the whole buffer, run by run (the record's decay factor on the decayed runs, 1
/// on the others), with the record's step scalars, every gradient times the record's clip
/// factor; a no-op when the record's status is not 0 (`Backend::adamw_masked`).
pub fn adamw_masked(
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    runs: &[(usize, usize, bool)],
    hp: AdamWConstants,
    record: &[f32],
) {
    use crate::backend::step::record::{CLIP, SCALARS, STATUS};
    if record[STATUS] != 0.0 {
        return;
    }
    let [step_size, inv_sqrt_bc2, decay] = record[SCALARS] else { unreachable!("SCALARS is three slots") };
    for &(off, len, decayed) in runs {
        let r = off..off + len;
        let scalars = AdamWScalars { step_size, inv_sqrt_bc2, decay: if decayed { decay } else { 1.0 } };
        adamw_with(&mut p[r.clone()], &g[r.clone()], &mut m[r.clone()], &mut v[r], hp, scalars, record[CLIP]);
    }
}

pub fn sum_squares(x: &[f32]) -> f64 {
    // Blocked so the f32 partial sums stay short; the total is f64. Inside a block, 32
    // independent lanes (whole SIMD registers, several in flight): one running sum would be a
    // chain of dependent adds, 4 cycles an element (1.9 ms a `small` step's gradient).
    const LANES: usize = 32;
    x.chunks(1024)
        .map(|c| {
            let mut acc = [0.0f32; LANES];
            let lanes = c.chunks_exact(LANES);
            let tail: f32 = lanes.remainder().iter().map(|v| v * v).sum();
            for b in lanes {
                for (a, v) in acc.iter_mut().zip(b) {
                    *a += v * v;
                }
            }
            (acc.iter().sum::<f32>() + tail) as f64
        })
        .sum()
}
