//! AdamW over a range of the flat parameter buffer (PyTorch's update order: decay first).

use rayon::prelude::*;

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
    // The runs tile the buffer from 0 (`DecayMask::new`): cut into pieces of at most CHUNK
    // elements, updated on the rayon pool. Each element's update is unchanged, so are the bits.
    let (mut p, mut g, mut m, mut v) = (p, g, m, v);
    let mut pieces = Vec::with_capacity(runs.len() + p.len() / CHUNK);
    for &(_, len, decayed) in runs {
        let (rp, rg, rm, rv);
        (rp, p) = std::mem::take(&mut p).split_at_mut(len);
        (rg, g) = g.split_at(len);
        (rm, m) = std::mem::take(&mut m).split_at_mut(len);
        (rv, v) = std::mem::take(&mut v).split_at_mut(len);
        let chunks = rp.chunks_mut(CHUNK).zip(rg.chunks(CHUNK)).zip(rm.chunks_mut(CHUNK)).zip(rv.chunks_mut(CHUNK));
        pieces.extend(chunks.map(|(((p, g), m), v)| (p, g, m, v, decayed)));
    }
    pieces.into_par_iter().for_each(|(p, g, m, v, decayed)| {
        let scalars = AdamWScalars { step_size, inv_sqrt_bc2, decay: if decayed { decay } else { 1.0 } };
        adamw_with(p, g, m, v, hp, scalars, record[CLIP]);
    });
}

/// Elements per parallel piece of the update: a piece outweighs its scheduling, and a `small`
/// model's parameters still make dozens of them.
const CHUNK: usize = 1 << 15;

pub fn sum_squares(x: &[f32]) -> f64 {
    // Blocked so the f32 partial sums stay short; the total is f64. Inside a block, 32
    // independent lanes (whole SIMD registers, several in flight): one running sum would be a
    // chain of dependent adds, 4 cycles an element (1.9 ms a `small` step's gradient).
    const LANES: usize = 32;
    let block = |c: &[f32]| {
        let mut acc = [0.0f32; LANES];
        let lanes = c.chunks_exact(LANES);
        let tail: f32 = lanes.remainder().iter().map(|v| v * v).sum();
        for b in lanes {
            for (a, v) in acc.iter_mut().zip(b) {
                *a += v * v;
            }
        }
        (acc.iter().sum::<f32>() + tail) as f64
    };
    x.chunks(1024).map(block).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::step::record;

    /// The pieces on the rayon pool give bit for bit the update run by run, one thread, with
    /// runs shorter than a piece, one across several, and a one-element run.
    #[test]
    fn the_parallel_update_is_the_update_run_by_run() {
        let cuts = [0, 1, 300, 301, 3 * CHUNK + 17, 3 * CHUNK + 18, 5 * CHUNK + 3];
        let runs: Vec<(usize, usize, bool)> =
            cuts.windows(2).enumerate().map(|(i, w)| (w[0], w[1] - w[0], i % 2 == 0)).collect();
        let n = *cuts.last().unwrap();
        let mut rng = crate::rng::Rng::new(17);
        let mut draw = |n: usize| (0..n).map(|_| rng.normal() as f32).collect::<Vec<f32>>();
        let (p0, g, m0) = (draw(n), draw(n), draw(n));
        let v0: Vec<f32> = draw(n).iter().map(|x| x.abs()).collect();
        let hp = AdamW { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1, step: 3, grad_scale: 0.37 };
        let mut rec = vec![0.0; record::LEN];
        rec[record::CLIP] = hp.grad_scale;
        rec[record::SCALARS].copy_from_slice(&hp.scalars().slots());
        let (mut p, mut m, mut v) = (p0.clone(), m0.clone(), v0.clone());
        adamw_masked(&mut p, &g, &mut m, &mut v, &runs, hp.constants(), &rec);
        let (mut pw, mut mw, mut vw) = (p0, m0, v0);
        for &(off, len, decayed) in &runs {
            let r = off..off + len;
            let hp = AdamW { weight_decay: if decayed { hp.weight_decay } else { 0.0 }, ..hp };
            adamw(&mut pw[r.clone()], &g[r.clone()], &mut mw[r.clone()], &mut vw[r], hp);
        }
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
        assert_eq!(bits(&p), bits(&pw), "parameters");
        assert_eq!((bits(&m), bits(&v)), (bits(&mw), bits(&vw)), "moments");
    }
}
