//! Model hyper-parameters and the presets of DESIGN.md §2.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Dr: region feature width.
    pub region_dim: usize,
    /// R: most regions per image.
    pub max_regions: usize,
    /// Dw: word embedding width.
    pub word_dim: usize,
    /// H: GRU units per direction.
    pub gru_hidden: usize,
    /// d: model width.
    pub dim: usize,
    /// L: shared encoder blocks.
    pub layers: usize,
    /// h: attention heads.
    pub heads: usize,
    /// f: feed-forward width.
    pub ffn: usize,
    /// T: most tokens per text.
    pub max_tokens: usize,
    /// V: vocabulary size (ids 0 `[PAD]`, 1 `[UNK]`, 2 `[MASK]`).
    pub vocab: usize,
    /// C: labels.
    pub labels: usize,
    /// K_obj: detector object classes (the image context target).
    pub object_classes: usize,
    pub dropout: f32,
    /// Probability that a valid segment is masked for the context loss (Eq. 5).
    pub mask_prob: f32,
    /// λ of Eq. 6: L = L1 + λ·L2.
    pub lambda: f32,
    /// Dt: width of pre-extracted text segments (`text.features`); 0 when texts are tokens.
    /// With Dt > 0 the text side has no word embedding and no GRU: ψ1 reads the features.
    #[serde(default)]
    pub text_feature_dim: usize,
    /// What the segments of both modalities go through after their encoders (Table 1's `wo-t`
    /// and `wo-r` use the FC trunk).
    #[serde(default)]
    pub trunk: Trunk,
    /// Each modality its own trunk and classifier (Table 1's `st` and `imc`); parameter names
    /// of the text side's copies start with `text_`.
    #[serde(default)]
    pub separate_models: bool,
    /// One global segment per item, the mean of its encoded segments (Table 1's `wo-r`); no
    /// masking, as a lone segment has nothing to be predicted from.
    #[serde(default)]
    pub global_segments: bool,
}

/// The trunk both modalities' segments go through.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Trunk {
    /// L post-LN encoder blocks with attention (DESIGN.md §1 "Shared model").
    #[default]
    #[serde(rename = "transformer")]
    Transformer,
    /// L blocks `x = LN(x + FFN(x))`: the transformer block without its attention sublayer.
    #[serde(rename = "fc")]
    Fc,
}

pub const MASK_TOKEN: u32 = 2;

/// Upper bounds of the sizes, far above the paper's (DESIGN.md §2): they keep every product of
/// sizes far from overflowing, and a typo from reaching an allocation (the memory estimate,
/// `model::memory`, then judges what is within them).
const MAX_WIDTH: usize = 1 << 16;
const MAX_INPUT_WIDTH: usize = 1 << 20;
const MAX_FFN: usize = 1 << 18;
const MAX_LAYERS: usize = 1024;
const MAX_SEGMENTS: usize = u16::MAX as usize;
const MAX_VOCAB: usize = 1 << 24;
const MAX_LABELS: usize = 1 << 16;
const MAX_OBJECT_CLASSES: usize = 1 << 16;

impl ModelConfig {
    /// CPU, CI and the demo.
    pub fn small() -> Self {
        ModelConfig {
            region_dim: 256,
            max_regions: 36,
            word_dim: 64,
            gru_hidden: 128,
            dim: 256,
            layers: 2,
            heads: 4,
            ffn: 512,
            max_tokens: 24,
            vocab: 2000,
            labels: 24,
            object_classes: 100,
            dropout: 0.1,
            mask_prob: 0.15,
            lambda: 0.01,
            text_feature_dim: 0,
            trunk: Trunk::Transformer,
            separate_models: false,
            global_segments: false,
        }
    }

    /// The paper's sizes (GPU).
    pub fn paper() -> Self {
        ModelConfig {
            region_dim: 1024,
            max_regions: 36,
            word_dim: 300,
            gru_hidden: 512,
            dim: 1024,
            layers: 6,
            heads: 8,
            ffn: 2048,
            max_tokens: 64,
            vocab: 10_000,
            labels: 24,
            object_classes: 1600,
            dropout: 0.1,
            mask_prob: 0.15,
            lambda: 0.01,
            text_feature_dim: 0,
            trunk: Trunk::Transformer,
            separate_models: false,
            global_segments: false,
        }
    }

    /// Texts arrive as segment features (the text side then starts at ψ1).
    pub fn text_features(&self) -> bool {
        self.text_feature_dim > 0
    }

    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "small" => Ok(Self::small()),
            "paper" => Ok(Self::paper()),
            _ => Err(Error::config(format!("unknown model preset `{name}` (expected small or paper)"))),
        }
    }

    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("region_dim", self.region_dim),
            ("max_regions", self.max_regions),
            ("word_dim", self.word_dim),
            ("gru_hidden", self.gru_hidden),
            ("dim", self.dim),
            ("layers", self.layers),
            ("heads", self.heads),
            ("ffn", self.ffn),
            ("max_tokens", self.max_tokens),
            ("labels", self.labels),
            ("object_classes", self.object_classes),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(Error::config(format!("model.{name} must be positive")));
            }
        }
        let bounded = [
            ("region_dim", self.region_dim, MAX_INPUT_WIDTH),
            ("text_feature_dim", self.text_feature_dim, MAX_INPUT_WIDTH),
            ("word_dim", self.word_dim, MAX_WIDTH),
            ("gru_hidden", self.gru_hidden, MAX_WIDTH),
            ("dim", self.dim, MAX_WIDTH),
            ("ffn", self.ffn, MAX_FFN),
            ("layers", self.layers, MAX_LAYERS),
            ("max_regions", self.max_regions, MAX_SEGMENTS),
            ("max_tokens", self.max_tokens, MAX_SEGMENTS),
            ("vocab", self.vocab, MAX_VOCAB),
            ("labels", self.labels, MAX_LABELS),
            ("object_classes", self.object_classes, MAX_OBJECT_CLASSES),
        ];
        for (name, v, max) in bounded {
            if v > max {
                return Err(Error::config(format!("model.{name} = {v} is larger than the {max} this build allows")));
            }
        }
        if self.vocab <= MASK_TOKEN as usize {
            return Err(Error::config(format!(
                "model.vocab = {} leaves no room for words after [PAD] [UNK] [MASK]",
                self.vocab
            )));
        }
        if !self.dim.is_multiple_of(self.heads) {
            return Err(Error::config(format!(
                "model.dim = {} is not divisible by model.heads = {}",
                self.dim, self.heads
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::config(format!("model.dropout = {} is not in [0, 1)", self.dropout)));
        }
        if !(0.0..=1.0).contains(&self.mask_prob) {
            return Err(Error::config(format!("model.mask_prob = {} is not in [0, 1]", self.mask_prob)));
        }
        if !(self.lambda >= 0.0 && self.lambda.is_finite()) {
            return Err(Error::config(format!("model.lambda = {} must be finite and ≥ 0", self.lambda)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_past_the_bounds_are_errors_naming_the_field() {
        let too_big = [
            ModelConfig { dim: 4_000_000_000, heads: 1, ..ModelConfig::small() },
            ModelConfig { vocab: usize::MAX, ..ModelConfig::small() },
            ModelConfig { layers: 100_000_000, ..ModelConfig::small() },
        ];
        for (cfg, field) in too_big.iter().zip(["model.dim", "model.vocab", "model.layers"]) {
            let e = cfg.validate().unwrap_err().to_string();
            assert!(e.contains(field) && e.contains("larger than"), "{e}");
        }
        ModelConfig { dim: MAX_WIDTH, heads: 1, layers: MAX_LAYERS, ..ModelConfig::small() }.validate().unwrap();
    }
}
