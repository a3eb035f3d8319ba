//! Input normalisation: each input feature standardised with the training split's statistics,
//! `x̂ = (x − mean) · inv_std`, before ψ1 (Eq. 3) reads it. Real features come at any scale
//! (histograms whose rows sum to 1, pooled CNN activations, doc2vec coordinates); the
//! statistics are computed once from the training split, stored in the checkpoint, and applied
//! in the one place every embedding passes, `SemShare::encode`: training batches, validation,
//! `eval`, `embed` and the library's `Model` all see the same inputs.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A feature whose standard deviation is below this is only centred: dividing by (nearly) zero
/// would blow rounding noise up into signal.
pub const MIN_STD: f64 = 1e-6;

/// Per-feature affine map of one modality's input features.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureNorm {
    pub mean: Vec<f32>,
    /// 1 / std (1 for a constant feature).
    pub inv_std: Vec<f32>,
}

impl FeatureNorm {
    /// The map of per-feature sums `s1 = Σx`, `s2 = Σx²` over `count` rows.
    pub fn from_moments(s1: &[f64], s2: &[f64], count: usize) -> FeatureNorm {
        let n = count.max(1) as f64;
        let (mut mean, mut inv_std) = (Vec::with_capacity(s1.len()), Vec::with_capacity(s1.len()));
        for (&a, &b) in s1.iter().zip(s2) {
            let m = a / n;
            let std = (b / n - m * m).max(0.0).sqrt();
            mean.push(m as f32);
            inv_std.push(if std > MIN_STD { (1.0 / std) as f32 } else { 1.0 });
        }
        FeatureNorm { mean, inv_std }
    }

    pub fn dim(&self) -> usize {
        self.mean.len()
    }

    /// `rows` (`[n, dim]` row-major) normalised.
    pub fn apply(&self, rows: &[f32]) -> Vec<f32> {
        let d = self.dim().max(1);
        let mut out = Vec::with_capacity(rows.len());
        for row in rows.chunks_exact(d) {
            out.extend(row.iter().zip(&self.mean).zip(&self.inv_std).map(|((&x, &m), &s)| (x - m) * s));
        }
        out
    }

    fn check(&self, what: &str, dim: usize) -> Result<()> {
        if self.mean.len() != dim || self.inv_std.len() != dim {
            return Err(Error::config(format!(
                "{what} normalisation has {} means and {} scales, the model reads {dim} features",
                self.mean.len(),
                self.inv_std.len()
            )));
        }
        if !self.mean.iter().chain(&self.inv_std).all(|x| x.is_finite()) {
            return Err(Error::config(format!("{what} normalisation holds a non-finite value")));
        }
        Ok(())
    }
}

/// The normalisation of both modalities' input features; `text` is None when texts are tokens
/// (an embedding table has no scale to fix).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputNorm {
    pub image: FeatureNorm,
    pub text: Option<FeatureNorm>,
}

impl InputNorm {
    /// The widths agree with a model reading `region_dim` and `text_feature_dim` (0: tokens).
    pub fn check(&self, region_dim: usize, text_feature_dim: usize) -> Result<()> {
        self.image.check("image feature", region_dim)?;
        match (&self.text, text_feature_dim) {
            (None, 0) => Ok(()),
            (Some(t), d) if d > 0 => t.check("text feature", d),
            _ => Err(Error::config(format!(
                "text normalisation is {}, the model reads texts as {}",
                if self.text.is_some() { "given" } else { "absent" },
                if text_feature_dim > 0 { "features" } else { "tokens" }
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moments_give_zero_mean_unit_variance_and_constant_features_are_only_centred() {
        // Rows of width 3: feature 0 varies, feature 1 is constant, feature 2 varies at 1e-3.
        let rows = [1.0f32, 5.0, 0.001, 3.0, 5.0, 0.003, 8.0, 5.0, 0.002, -2.0, 5.0, 0.004];
        let mut s1 = [0f64; 3];
        let mut s2 = [0f64; 3];
        for r in rows.chunks(3) {
            for j in 0..3 {
                s1[j] += r[j] as f64;
                s2[j] += (r[j] as f64).powi(2);
            }
        }
        let norm = FeatureNorm::from_moments(&s1, &s2, 4);
        assert_eq!(norm.inv_std[1], 1.0);
        let out = norm.apply(&rows);
        for j in [0, 2] {
            let col: Vec<f64> = out.iter().skip(j).step_by(3).map(|&x| x as f64).collect();
            let mean = col.iter().sum::<f64>() / 4.0;
            let var = col.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 4.0;
            assert!(mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-4, "feature {j}: mean {mean}, var {var}");
        }
        assert!(out.iter().skip(1).step_by(3).all(|&x| x == 0.0));
        let spec = InputNorm { image: norm, text: None };
        assert!(spec.check(3, 0).is_ok());
        assert!(spec.check(4, 0).is_err());
        assert!(spec.check(3, 2).is_err());
    }
}
