//! LayerNorm over the last dimension, forward and backward.
//! Saved for backward: (mean, rstd) per row, so x is normalised once and never re-reduced.
//! Row reductions use eight independent accumulators: a single f32 accumulator is a serial
//! dependency chain that the compiler may not reorder, so it would not vectorise.

use rayon::prelude::*;

use super::simd;

const PAR_ROWS: usize = 64;
const LANES: usize = 8;

/// Σ f(a_i, b_i) with eight partial sums.
#[inline(always)]
fn sum2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += f(x[l], y[l]);
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(&x, &y)| f(x, y)).sum();
    acc.iter().sum::<f32>() + tail
}

pub fn forward(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let d = gamma.len();
    let rows = x.len() / d;
    let mut y = crate::tensor::host_pool::dirty(x.len()); // every element is written
    let mut stats = crate::tensor::host_pool::dirty(rows * 2); // every element is written
    let row = |(y, (st, x)): (&mut [f32], (&mut [f32], &[f32]))| {
        simd::vectorised!({
            let mean = sum2(x, x, |a, _| a) / d as f32;
            let var = sum2(x, x, |a, _| (a - mean) * (a - mean)) / d as f32;
            let rstd = 1.0 / (var + eps).sqrt();
            for i in 0..d {
                y[i] = (x[i] - mean) * rstd * gamma[i] + beta[i];
            }
            st[0] = mean;
            st[1] = rstd;
        })
    };
    if rows >= PAR_ROWS {
        y.par_chunks_mut(d).zip(stats.par_chunks_mut(2).zip(x.par_chunks(d))).for_each(row);
    } else {
        y.chunks_mut(d).zip(stats.chunks_mut(2).zip(x.chunks(d))).for_each(row);
    }
    (y, stats)
}

pub fn backward(
    x: &[f32],
    stats: &[f32],
    gamma: &[f32],
    dy: &[f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) -> Vec<f32> {
    let d = gamma.len();
    let rows = x.len() / d;
    let mut dx = crate::tensor::host_pool::dirty(x.len()); // every element is written
    type Row<'a> = (&'a mut [f32], (&'a [f32], (&'a [f32], &'a [f32])));
    let row = |(dx, (st, (x, dy))): Row| {
        simd::vectorised!({
            let (mean, rstd) = (st[0], st[1]);
            // g = dy ⊙ γ; dx = rstd · (g − mean(g) − x̂ · mean(g ⊙ x̂))
            for i in 0..d {
                dx[i] = dy[i] * gamma[i];
            }
            let mg = sum2(dx, dx, |g, _| g) / d as f32;
            let mgx = sum2(dx, x, |g, v| g * (v - mean)) * rstd / d as f32;
            for i in 0..d {
                let xhat = (x[i] - mean) * rstd;
                dx[i] = rstd * (dx[i] - mg - xhat * mgx);
            }
        })
    };
    if rows >= PAR_ROWS {
        dx.par_chunks_mut(d).zip(stats.par_chunks(2).zip(x.par_chunks(d).zip(dy.par_chunks(d)))).for_each(row);
    } else {
        dx.chunks_mut(d).zip(stats.chunks(2).zip(x.chunks(d).zip(dy.chunks(d)))).for_each(row);
    }
    simd::vectorised!({
        for r in 0..rows {
            let (mean, rstd) = (stats[2 * r], stats[2 * r + 1]);
            let (x, dy) = (&x[r * d..(r + 1) * d], &dy[r * d..(r + 1) * d]);
            for i in 0..d {
                dgamma[i] += dy[i] * (x[i] - mean) * rstd;
                dbeta[i] += dy[i];
            }
        }
    });
    dx
}
