//! LayerNorm over the last dimension, forward and backward.
//! Saved for backward: (mean, rstd) per row, so x is normalised once and never re-reduced.

use rayon::prelude::*;

const PAR_ROWS: usize = 64;

pub fn forward(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let d = gamma.len();
    let rows = x.len() / d;
    let mut y = vec![0.0; x.len()];
    let mut stats = vec![0.0; rows * 2];
    let row = |(y, (st, x)): (&mut [f32], (&mut [f32], &[f32]))| {
        let mean = x.iter().sum::<f32>() / d as f32;
        let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
        let rstd = 1.0 / (var + eps).sqrt();
        for i in 0..d {
            y[i] = (x[i] - mean) * rstd * gamma[i] + beta[i];
        }
        st[0] = mean;
        st[1] = rstd;
    };
    if rows >= PAR_ROWS {
        y.par_chunks_mut(d)
            .zip(stats.par_chunks_mut(2).zip(x.par_chunks(d)))
            .for_each(row);
    } else {
        y.chunks_mut(d)
            .zip(stats.chunks_mut(2).zip(x.chunks(d)))
            .for_each(row);
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
    let mut dx = vec![0.0; x.len()];
    let row = |(dx, (st, (x, dy))): (&mut [f32], (&[f32], (&[f32], &[f32])))| {
        let (mean, rstd) = (st[0], st[1]);
        let (mut sum_g, mut sum_gx) = (0.0f32, 0.0f32);
        for i in 0..d {
            let g = dy[i] * gamma[i];
            sum_g += g;
            sum_gx += g * (x[i] - mean) * rstd;
        }
        let (mg, mgx) = (sum_g / d as f32, sum_gx / d as f32);
        for i in 0..d {
            let xhat = (x[i] - mean) * rstd;
            dx[i] = rstd * (dy[i] * gamma[i] - mg - xhat * mgx);
        }
    };
    if rows >= PAR_ROWS {
        dx.par_chunks_mut(d)
            .zip(
                stats
                    .par_chunks(2)
                    .zip(x.par_chunks(d).zip(dy.par_chunks(d))),
            )
            .for_each(row);
    } else {
        dx.chunks_mut(d)
            .zip(stats.chunks(2).zip(x.chunks(d).zip(dy.chunks(d))))
            .for_each(row);
    }
    for r in 0..rows {
        let (mean, rstd) = (stats[2 * r], stats[2 * r + 1]);
        let (x, dy) = (&x[r * d..(r + 1) * d], &dy[r * d..(r + 1) * d]);
        for i in 0..d {
            dgamma[i] += dy[i] * (x[i] - mean) * rstd;
            dbeta[i] += dy[i];
        }
    }
    dx
}
