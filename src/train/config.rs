//! What a training run is configured with (`"train"` of a config file): the budget, the
//! optimiser, validation, and the method trained.

use serde::{Deserialize, Serialize};

use crate::backend::Precision;
use crate::model::{EmbeddingKind, Variant};
use crate::{Error, Result};

/// Most image–text pairs per step.
pub const MAX_BATCH: usize = 1 << 16;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Image–text pairs per step.
    pub batch_size: usize,
    pub steps: u64,
    /// Peak learning rate, reached after `warmup` steps, then cosine decay to `lr · min_lr_ratio`.
    pub lr: f32,
    pub warmup: u64,
    pub min_lr_ratio: f32,
    pub weight_decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Global gradient-norm clip (0: off).
    pub clip_norm: f32,
    pub seed: u64,
    /// Validate (and keep the best checkpoint) every this many steps (0: only at the end).
    pub eval_every: u64,
    /// Which embedding validation ranks with: "pooled", "label", or "best" (both are scored and
    /// the better one selects the checkpoint, which records it).
    pub embedding: String,
    /// The validation score that selects the checkpoint: "ndcg" (NDCG@`eval_k`, the paper's)
    /// or "map" (mAP@all).
    pub val_metric: String,
    /// Validation NDCG cut-off.
    pub eval_k: usize,
    /// Stop after this many validations without a better validation score (0: never).
    pub patience: u64,
    /// Input normalisation: "none", or "standardize" (each feature to zero mean and unit
    /// variance with the training split's statistics, stored in the checkpoint).
    pub normalize: String,
    /// The method or Table 1 variant trained (`ours` is the paper's); its model structure must
    /// be in the model configuration (`Variant::configure`).
    pub variant: Variant,
    /// η: weight of the consistency term of `ours+con` and `imc`.
    pub eta: f32,
    /// Margin of `ours+con`'s triplet consistency loss.
    pub triplet_margin: f32,
    /// α and β of the DSCMR-style objective `J1 + α·J2 + β·J3`.
    pub dscmr_alpha: f32,
    pub dscmr_beta: f32,
    /// Which pass the context loss L2 and the label loss L1 are taken on when segments are
    /// masked. Left out of the file when it is the default, so that earlier suites' and tunes'
    /// fingerprints still match.
    #[serde(skip_serializing_if = "ContextPass::is_shared")]
    pub context_pass: ContextPass,
    /// The layers' GEMMs: "fp32" (IEEE, the default), "bf16" (CPU and CUDA) or "tf32" (CUDA);
    /// `--precision` overrides it. Left out of the file at fp32, so earlier fingerprints match.
    #[serde(skip_serializing_if = "Precision::is_fp32")]
    pub precision: Precision,
}

/// How a step trains L2 (Eq. 5) beside L1 (docs/results/EXPERIMENTS.md, "The context loss").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContextPass {
    /// One pass over the batch with its masked segments replaced, both losses on it (the
    /// authors' form; Table 1's `ours`).
    #[default]
    #[serde(rename = "shared")]
    Shared,
    /// L1 on the batch as it is, L2 on a second pass with the segments masked: the label loss
    /// never sees a `[MASK]`. Costs a second forward and backward pass of each modality.
    #[serde(rename = "separate")]
    Separate,
}

impl ContextPass {
    pub fn is_shared(&self) -> bool {
        *self == ContextPass::Shared
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            batch_size: 32,
            steps: 1000,
            lr: 5e-4,
            warmup: 100,
            min_lr_ratio: 0.05,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            clip_norm: 1.0,
            seed: 0,
            eval_every: 250,
            embedding: "pooled".into(),
            val_metric: "ndcg".into(),
            eval_k: 500,
            patience: 0,
            normalize: "none".into(),
            variant: Variant::Ours,
            eta: 1.0,
            triplet_margin: 0.2,
            dscmr_alpha: 1e-3,
            dscmr_beta: 0.1,
            context_pass: ContextPass::Shared,
            precision: Precision::F32,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        for (name, value) in [("batch_size", self.batch_size as u64), ("steps", self.steps)] {
            if value == 0 {
                return Err(Error::config(format!("train.{name} = 0: it must be positive")));
            }
        }
        if self.batch_size > MAX_BATCH {
            return Err(Error::config(format!("train.batch_size = {} is larger than {MAX_BATCH}", self.batch_size)));
        }
        // NDCG@k of a split larger than 2^24 items is beyond what validation scores.
        if self.eval_k == 0 || self.eval_k > 1 << 24 {
            return Err(Error::config(format!("train.eval_k = {} is not in 1..=16777216", self.eval_k)));
        }
        for (name, v) in [("lr", self.lr), ("eps", self.eps)] {
            if !(v > 0.0 && v.is_finite()) {
                return Err(Error::config(format!("train.{name} = {v} must be finite and > 0")));
            }
        }
        // A ratio below 0 would make the learning rate negative at the end of the schedule.
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return Err(Error::config(format!("train.min_lr_ratio = {} is not in [0, 1]", self.min_lr_ratio)));
        }
        for (name, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err(Error::config(format!("train.{name} = {v} is not in [0, 1)")));
            }
        }
        self.validation_embeddings()?;
        if !["ndcg", "map"].contains(&self.val_metric.as_str()) {
            return Err(Error::config(format!("train.val_metric = `{}` (expected ndcg or map)", self.val_metric)));
        }
        if !["none", "standardize"].contains(&self.normalize.as_str()) {
            return Err(Error::config(format!(
                "train.normalize = `{}` (expected none or standardize)",
                self.normalize
            )));
        }
        if !self.variant.spec().trained {
            return Err(Error::config(format!("variant `{}` is fitted in closed form, not trained", self.variant)));
        }
        for (name, v) in [
            ("weight_decay", self.weight_decay),
            ("clip_norm", self.clip_norm),
            ("eta", self.eta),
            ("triplet_margin", self.triplet_margin),
            ("dscmr_alpha", self.dscmr_alpha),
            ("dscmr_beta", self.dscmr_beta),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(Error::config(format!("train.{name} = {v} must be finite and ≥ 0")));
            }
        }
        Ok(())
    }

    /// The embeddings validation scores: the one `embedding` names, or both for "best" (pooled
    /// first: on equal scores it is kept).
    pub fn validation_embeddings(&self) -> Result<Vec<EmbeddingKind>> {
        match self.embedding.as_str() {
            "best" => Ok(vec![EmbeddingKind::Pooled, EmbeddingKind::Label]),
            name => name
                .parse::<EmbeddingKind>()
                .map(|k| vec![k])
                .map_err(|_| Error::config(format!("train.embedding = `{name}` (expected pooled, label or best)"))),
        }
    }

    /// The name of the validation score, e.g. `NDCG@500` or `mAP@all`.
    pub fn metric_name(&self) -> String {
        if self.val_metric == "map" { "mAP@all".into() } else { format!("NDCG@{}", self.eval_k) }
    }

    /// Linear warm-up, then cosine decay.
    pub fn lr_at(&self, step: u64) -> f32 {
        if step < self.warmup {
            return self.lr * (step + 1) as f32 / self.warmup as f32;
        }
        let span = (self.steps.saturating_sub(self.warmup)).max(1) as f32;
        let t = ((step - self.warmup) as f32 / span).min(1.0);
        let floor = self.lr * self.min_lr_ratio;
        floor + (self.lr - floor) * 0.5 * (1.0 + (std::f32::consts::PI * t).cos())
    }
}
