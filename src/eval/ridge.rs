//! Ridge regression in closed form: the linear baselines of the real-data results (issue 15,
//! item 4). Mapping one modality's features onto the other's ("ridge least squares", one map
//! per retrieval direction) or each modality onto the one-hot labels (the "supervised linear
//! map") and ranking by cosine is what a learned model must beat by a margin.
//!
//! With centred X `[n, p]` and Y `[n, q]`: `W = (XᵀX + r·I)⁻¹ XᵀY`, `r = reg · trace(XᵀX)/p`
//! (so `reg` does not depend on the features' scale), solved by Cholesky; a prediction is
//! `(x − μx)·W + μy`.

use super::linalg::{cholesky, gemm_into, solve_lower, solve_lower_transposed};
use crate::{Error, Result};

#[derive(Clone, Debug)]
pub struct Ridge {
    mean_x: Vec<f64>,
    mean_y: Vec<f64>,
    /// `[p, q]`
    w: Vec<f64>,
    p: usize,
    q: usize,
}

fn column_means(x: &[f32], n: usize, cols: usize) -> Vec<f64> {
    let mut mean = vec![0.0; cols];
    for row in x.chunks_exact(cols) {
        for (m, &v) in mean.iter_mut().zip(row) {
            *m += v as f64;
        }
    }
    mean.iter_mut().for_each(|m| *m /= n as f64);
    mean
}

fn centred(x: &[f32], mean: &[f64]) -> Vec<f64> {
    x.chunks_exact(mean.len()).flat_map(|row| row.iter().zip(mean).map(|(&v, m)| v as f64 - m)).collect()
}

impl Ridge {
    /// Fits `y ≈ f(x)` on n paired rows: x `[n, p]`, y `[n, q]`, ridge `reg` > 0.
    pub fn fit(x: &[f32], y: &[f32], n: usize, p: usize, q: usize, reg: f64) -> Result<Ridge> {
        if n < 2 || p == 0 || q == 0 || x.len() != n * p || y.len() != n * q {
            return Err(Error::data(format!(
                "ridge: needs n ≥ 2 paired rows, x [n, p] and y [n, q] (got n {n}, p {p}, q {q}, {} and {} values)",
                x.len(),
                y.len()
            )));
        }
        if !(reg.is_finite() && reg > 0.0) {
            return Err(Error::config(format!("ridge: regularisation {reg} must be positive")));
        }
        if !x.iter().chain(y).all(|v| v.is_finite()) {
            return Err(Error::data("ridge: a non-finite feature value"));
        }
        let (mean_x, mean_y) = (column_means(x, n, p), column_means(y, n, q));
        let (xc, yc) = (centred(x, &mean_x), centred(y, &mean_y));
        let mut gram = vec![0.0; p * p];
        gemm_into(&xc, true, &xc, false, p, n, p, &mut gram);
        let trace: f64 = (0..p).map(|i| gram[i * p + i]).sum();
        // All-constant features: any positive ridge makes the system solvable (W = 0).
        let ridge = reg * (trace / p as f64).max(f64::MIN_POSITIVE);
        for i in 0..p {
            gram[i * p + i] += ridge;
        }
        cholesky(&mut gram, p, "ridge: XᵀX + r·I")?;
        let mut w = vec![0.0; p * q];
        gemm_into(&xc, true, &yc, false, p, n, q, &mut w);
        solve_lower(&gram, p, &mut w, q);
        solve_lower_transposed(&gram, p, &mut w, q);
        Ok(Ridge { mean_x, mean_y, w, p, q })
    }

    /// Predictions `[m, q]` of rows x `[m, p]`.
    pub fn predict(&self, x: &[f32]) -> Result<Vec<f32>> {
        if !x.len().is_multiple_of(self.p) {
            return Err(Error::data(format!("ridge: {} values are not rows of width {}", x.len(), self.p)));
        }
        let m = x.len() / self.p;
        let xc = centred(x, &self.mean_x);
        let mut out = vec![0.0; m * self.q];
        gemm_into(&xc, false, &self.w, false, m, self.p, self.q, &mut out);
        Ok(out.chunks_exact(self.q).flat_map(|row| row.iter().zip(&self.mean_y).map(|(v, b)| (v + b) as f32)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn recovers_a_linear_map_and_shrinks_with_the_ridge() {
        // y = x·A + b exactly: a small ridge recovers it, a huge one predicts the mean.
        let (n, p, q) = (50, 4, 3);
        let mut rng = Rng::new(5);
        let a: Vec<f64> = (0..p * q).map(|_| rng.normal()).collect();
        let b = [1.0, -2.0, 0.5];
        let x: Vec<f32> = (0..n * p).map(|_| rng.normal() as f32).collect();
        let y: Vec<f32> = x
            .chunks_exact(p)
            .flat_map(|r| (0..q).map(|j| ((0..p).map(|i| r[i] as f64 * a[i * q + j]).sum::<f64>() + b[j]) as f32))
            .collect();
        let fit = Ridge::fit(&x, &y, n, p, q, 1e-9).unwrap();
        for (got, want) in fit.predict(&x).unwrap().iter().zip(&y) {
            assert!((got - want).abs() < 1e-4, "{got} vs {want}");
        }
        let flat = Ridge::fit(&x, &y, n, p, q, 1e9).unwrap().predict(&x[..p]).unwrap();
        let mean_y = column_means(&y, n, q);
        for (got, want) in flat.iter().zip(&mean_y) {
            assert!((*got as f64 - want).abs() < 1e-3, "{got} vs {want}");
        }
    }

    #[test]
    fn refuses_bad_input() {
        assert!(Ridge::fit(&[1.0; 4], &[1.0; 2], 2, 2, 1, 0.0).is_err());
        assert!(Ridge::fit(&[1.0; 4], &[1.0; 3], 2, 2, 1, 1.0).is_err());
        assert!(Ridge::fit(&[1.0, f32::NAN, 0.0, 1.0], &[1.0; 2], 2, 2, 1, 1.0).is_err());
        let fit = Ridge::fit(&[1.0; 4], &[1.0; 2], 2, 2, 1, 1.0).unwrap(); // constant: W = 0
        assert_eq!(fit.predict(&[3.0, 4.0]).unwrap(), [1.0]);
        assert!(fit.predict(&[3.0]).is_err());
    }
}
