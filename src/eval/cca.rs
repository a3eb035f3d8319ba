//! Canonical correlation analysis, closed form and regularised: the classical cross-modal
//! baseline of the paper's Table 1 (DESIGN.md §1, "Experiments"), fit on pooled input
//! features of paired training items.
//!
//! With centred X `[n, p]`, Y `[n, q]`, covariances `C_xx + r_x·I`, `C_yy + r_y·I` (ridge
//! `r = reg · trace(C)/dim`, so `reg` does not depend on the features' scale) and `C_xy`:
//! whiten by the Cholesky factors, `M = L_x⁻¹ C_xy L_y⁻ᵀ`, take M's singular vectors
//! `M = U S Vᵀ`; then `W_x = L_x⁻ᵀ U_k`, `W_y = L_y⁻ᵀ V_k` and the canonical correlations are
//! the singular values S. Items are compared by cosine in the k-dimensional canonical space.

use super::linalg::{cholesky, gemm_into, solve_lower, solve_lower_transposed, symmetric_eigen, transpose};
use crate::{Error, Result};

#[derive(Clone, Copy, Debug)]
pub struct CcaConfig {
    /// k: canonical dimensions kept (at most min(p, q)).
    pub dims: usize,
    /// Ridge as a fraction of each covariance's mean variance.
    pub reg: f64,
}

impl Default for CcaConfig {
    fn default() -> Self {
        CcaConfig { dims: 64, reg: 1e-3 }
    }
}

#[derive(Clone, Debug)]
pub struct Cca {
    mean_x: Vec<f64>,
    mean_y: Vec<f64>,
    /// `[p, k]`
    w_x: Vec<f64>,
    /// `[q, k]`
    w_y: Vec<f64>,
    /// The canonical correlations, descending.
    pub correlations: Vec<f64>,
}

/// Column means and the centred copy of `[n, cols]` f32 data, in f64.
fn centre(x: &[f32], n: usize, cols: usize) -> (Vec<f64>, Vec<f64>) {
    let mut mean = vec![0.0; cols];
    for row in x.chunks_exact(cols) {
        for (m, &v) in mean.iter_mut().zip(row) {
            *m += v as f64;
        }
    }
    mean.iter_mut().for_each(|m| *m /= n as f64);
    let mut c = Vec::with_capacity(n * cols);
    for row in x.chunks_exact(cols) {
        c.extend(row.iter().zip(&mean).map(|(&v, m)| v as f64 - m));
    }
    (mean, c)
}

/// `Aᵀ·B / (n − 1)` of centred `[n, a]`, `[n, b]` data.
fn covariance(a: &[f64], b: &[f64], n: usize, ca: usize, cb: usize) -> Vec<f64> {
    let mut c = vec![0.0; ca * cb];
    gemm_into(a, true, b, false, ca, n, cb, &mut c);
    let s = 1.0 / (n as f64 - 1.0);
    c.iter_mut().for_each(|v| *v *= s);
    c
}

/// The Cholesky factor of `C + reg·(trace(C)/dim)·I`.
fn regularised_factor(mut c: Vec<f64>, dim: usize, reg: f64, what: &str) -> Result<Vec<f64>> {
    let ridge = reg * (0..dim).map(|i| c[i * dim + i]).sum::<f64>() / dim as f64;
    for i in 0..dim {
        c[i * dim + i] += ridge;
    }
    cholesky(&mut c, dim, what)?;
    Ok(c)
}

impl Cca {
    /// Fits on n paired rows: x `[n, p]`, y `[n, q]`.
    pub fn fit(x: &[f32], y: &[f32], n: usize, p: usize, q: usize, cfg: CcaConfig) -> Result<Cca> {
        if n < 2 || p == 0 || q == 0 || x.len() != n * p || y.len() != n * q {
            return Err(Error::shape(
                "cca_fit",
                format!(
                    "x has {} values and y {} for {n} pairs of {p} and {q} features (need n ≥ 2)",
                    x.len(),
                    y.len()
                ),
            ));
        }
        if let Some(i) = x.iter().chain(y).position(|v| !v.is_finite()) {
            let (side, i) = if i < x.len() { ("image", i) } else { ("text", i - x.len()) };
            let cols = if side == "image" { p } else { q };
            return Err(Error::data(format!("CCA input: {side} item {} has a non-finite feature", i / cols)));
        }
        if cfg.reg.is_nan() || cfg.reg < 0.0 || cfg.dims == 0 {
            return Err(Error::config(format!("CCA needs dims ≥ 1 and reg ≥ 0 (got {} and {})", cfg.dims, cfg.reg)));
        }
        let (mean_x, xc) = centre(x, n, p);
        let (mean_y, yc) = centre(y, n, q);
        let lx = regularised_factor(covariance(&xc, &xc, n, p, p), p, cfg.reg, "the image covariance C_xx")?;
        let ly = regularised_factor(covariance(&yc, &yc, n, q, q), q, cfg.reg, "the text covariance C_yy")?;

        // M = L_x⁻¹ C_xy L_y⁻ᵀ, as Mᵀ = L_y⁻¹ (L_x⁻¹ C_xy)ᵀ.
        let mut a = covariance(&xc, &yc, n, p, q);
        solve_lower(&lx, p, &mut a, q);
        let mut mt = transpose(&a, p, q);
        solve_lower(&ly, q, &mut mt, p);
        let m = transpose(&mt, q, p);

        // Singular vectors through the eigenvectors of the smaller Gram matrix.
        let (small, big, rows_small) = if p <= q { (&m, &mt, p) } else { (&mt, &m, q) };
        let cols_small = if p <= q { q } else { p };
        let mut gram = vec![0.0; rows_small * rows_small];
        gemm_into(small, false, small, true, rows_small, cols_small, rows_small, &mut gram);
        let (values, vectors) = symmetric_eigen(&gram, rows_small);
        let keep = cfg.dims.min(rows_small);
        let mut correlations = Vec::with_capacity(keep);
        let mut u_small = Vec::new(); // [rows_small, k]
        let mut u_big = Vec::new(); // [cols_small, k], = smallᵀ u / s
        for j in 0..keep {
            let s = values[j].max(0.0).sqrt();
            if s <= 1e-12 {
                break; // no correlation left: the remaining directions are arbitrary
            }
            correlations.push(s.min(1.0));
            u_small.push((0..rows_small).map(|i| vectors[i * rows_small + j]).collect::<Vec<_>>());
            u_big.push(
                (0..cols_small)
                    .map(|c| {
                        (0..rows_small).map(|i| big[c * rows_small + i] * vectors[i * rows_small + j]).sum::<f64>() / s
                    })
                    .collect::<Vec<_>>(),
            );
        }
        let k = correlations.len();
        if k == 0 {
            return Err(Error::data("CCA: the image and text features are uncorrelated on the training pairs"));
        }
        let (ux, uy) = if p <= q { (u_small, u_big) } else { (u_big, u_small) };
        let to_matrix = |cols: &[Vec<f64>], rows: usize| {
            let mut w = vec![0.0; rows * k];
            for (j, col) in cols.iter().enumerate() {
                for i in 0..rows {
                    w[i * k + j] = col[i];
                }
            }
            w
        };
        let mut w_x = to_matrix(&ux, p);
        solve_lower_transposed(&lx, p, &mut w_x, k);
        let mut w_y = to_matrix(&uy, q);
        solve_lower_transposed(&ly, q, &mut w_y, k);
        Ok(Cca { mean_x, mean_y, w_x, w_y, correlations })
    }

    /// Canonical dimensions kept.
    pub fn dims(&self) -> usize {
        self.correlations.len()
    }

    /// Image-side rows `[rows, p]` → `[rows, k]`.
    pub fn project_x(&self, x: &[f32]) -> Result<Vec<f32>> {
        project(x, &self.mean_x, &self.w_x, self.dims(), "cca_project_x")
    }

    /// Text-side rows `[rows, q]` → `[rows, k]`.
    pub fn project_y(&self, y: &[f32]) -> Result<Vec<f32>> {
        project(y, &self.mean_y, &self.w_y, self.dims(), "cca_project_y")
    }
}

fn project(x: &[f32], mean: &[f64], w: &[f64], k: usize, op: &'static str) -> Result<Vec<f32>> {
    let cols = mean.len();
    if !x.len().is_multiple_of(cols) {
        return Err(Error::shape(op, format!("{} values are not rows of {cols} features", x.len())));
    }
    let rows = x.len() / cols;
    let xc: Vec<f64> = x.chunks_exact(cols).flat_map(|r| r.iter().zip(mean).map(|(&v, m)| v as f64 - m)).collect();
    let mut out = vec![0.0; rows * k];
    gemm_into(&xc, false, w, false, rows, cols, k, &mut out);
    Ok(out.into_iter().map(|v| v as f32).collect())
}

#[cfg(test)]
mod tests {
    use super::super::linalg::{matmul, transpose};
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn one_dimension_is_the_pearson_correlation() {
        // x = 1, 2, 3, 4; y = 2, 4, 5, 4. By hand: Σdx·dy = 3.5, Σdx² = 5, Σdy² = 4.75,
        // r = 3.5 / √23.75 = 0.718184.
        let cca =
            Cca::fit(&[1.0, 2.0, 3.0, 4.0], &[2.0, 4.0, 5.0, 4.0], 4, 1, 1, CcaConfig { dims: 5, reg: 0.0 }).unwrap();
        assert_eq!(cca.dims(), 1);
        assert!((cca.correlations[0] - 3.5 / 23.75f64.sqrt()).abs() < 1e-12, "{:?}", cca.correlations);
    }

    /// Two hidden signals seen by both sides through different mixings, plus noise of known
    /// size: the canonical correlations are var(s)/(var(s)+var(noise)) per signal.
    #[test]
    fn recovers_known_correlations_and_whitens_both_sides() {
        let (n, p, q) = (20_000, 3, 4);
        let mut rng = Rng::new(11);
        let (mut x, mut y) = (Vec::with_capacity(n * p), Vec::with_capacity(n * q));
        for _ in 0..n {
            let (s1, s2) = (rng.normal(), rng.normal());
            let own = rng.normal() * 2.0; // private to x
            let ex: Vec<f64> = (0..p).map(|_| rng.normal()).collect();
            let ey: Vec<f64> = (0..3).map(|_| rng.normal()).collect();
            // x: s1 with noise var 0.25 (ρ1 = 0.8), s2 with noise var 1 (ρ2 = 0.5) after y's.
            x.extend([s1 + 0.5 * ex[0], s2 + ex[1] + 0.3 * s1, own + ex[2]].map(|v| v as f32));
            y.extend([s1, s2, 5.0 * ey[0], ey[1] + 0.1 * ey[2]].map(|v| v as f32));
        }
        let cca = Cca::fit(&x, &y, n, p, q, CcaConfig { dims: 3, reg: 0.0 }).unwrap();
        // corr(s1 + 0.5e, s1) = 1/√1.25 = 0.894; the second pair is s2 against s2 + e (+ a part
        // of s1 the first pair already explains): 1/√2 = 0.707.
        let want = [1.0 / 1.25f64.sqrt(), 0.5f64.sqrt()];
        for (got, want) in cca.correlations.iter().zip(want) {
            assert!((got - want).abs() < 0.02, "correlations {:?} vs {want}", cca.correlations);
        }
        assert!(cca.correlations[2] < 0.05, "no third shared signal: {:?}", cca.correlations);

        // In the canonical space each side has identity covariance and the cross-covariance
        // is diag(ρ).
        let k = cca.dims();
        let (zx, zy) = (cca.project_x(&x).unwrap(), cca.project_y(&y).unwrap());
        let (zx, zy): (Vec<f64>, Vec<f64>) =
            (zx.iter().map(|&v| v as f64).collect(), zy.iter().map(|&v| v as f64).collect());
        let s = 1.0 / (n as f64 - 1.0);
        let cxx = matmul(&transpose(&zx, n, k), &zx, k, n, k);
        let cyy = matmul(&transpose(&zy, n, k), &zy, k, n, k);
        let cxy = matmul(&transpose(&zx, n, k), &zy, k, n, k);
        for i in 0..k {
            for j in 0..k {
                let eye = if i == j { 1.0 } else { 0.0 };
                assert!((cxx[i * k + j] * s - eye).abs() < 1e-3, "C_xx[{i}][{j}] = {}", cxx[i * k + j] * s);
                assert!((cyy[i * k + j] * s - eye).abs() < 1e-3, "C_yy[{i}][{j}] = {}", cyy[i * k + j] * s);
                let rho = if i == j { cca.correlations[i] } else { 0.0 };
                assert!((cxy[i * k + j] * s - rho).abs() < 1e-3, "C_xy[{i}][{j}] = {}", cxy[i * k + j] * s);
            }
        }
    }

    #[test]
    fn more_text_than_image_features_and_ridge_on_collinear_columns() {
        // q > p exercises the other branch; y's columns 2 and 3 are identical, so C_yy is
        // singular: without ridge Cholesky must refuse, with ridge CCA works.
        let (n, p, q) = (500, 2, 4);
        let mut rng = Rng::new(3);
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for _ in 0..n {
            let s = rng.normal();
            let c = rng.normal();
            x.extend([s as f32, rng.normal() as f32]);
            y.extend([(s + 0.1 * rng.normal()) as f32, rng.normal() as f32, c as f32, c as f32]);
        }
        let err = Cca::fit(&x, &y, n, p, q, CcaConfig { dims: 2, reg: 0.0 }).unwrap_err().to_string();
        assert!(err.contains("text covariance"), "{err}");
        let cca = Cca::fit(&x, &y, n, p, q, CcaConfig { dims: 2, reg: 1e-3 }).unwrap();
        assert!(cca.correlations[0] > 0.98, "{:?}", cca.correlations);
        // The paired item is the nearest in the canonical space's first dimension.
        let (zx, zy) = (cca.project_x(&x).unwrap(), cca.project_y(&y).unwrap());
        let agree = (0..n).filter(|&i| (zx[i * 2] - zy[i * 2]).abs() < 0.5).count();
        assert!(agree > n * 9 / 10, "{agree} of {n}");
    }

    #[test]
    fn bad_inputs_are_named() {
        let e = Cca::fit(&[1.0, f32::NAN, 3.0], &[1.0, 2.0, 3.0], 3, 1, 1, CcaConfig::default()).unwrap_err();
        assert!(e.to_string().contains("image item 1"), "{e}");
        assert!(Cca::fit(&[1.0], &[1.0], 1, 1, 1, CcaConfig::default()).is_err(), "one pair");
        assert!(Cca::fit(&[1.0, 2.0], &[1.0, 2.0, 3.0], 2, 1, 1, CcaConfig::default()).is_err(), "shapes");
        let cca = Cca::fit(&[1.0, 2.0, 4.0], &[1.0, 3.0, 2.0], 3, 1, 1, CcaConfig::default()).unwrap();
        assert!(cca.project_x(&[1.0, 2.0]).is_ok() && cca.project_y(&[]).unwrap().is_empty());
    }
}
