//! The tiny model the documentation's examples load, so that each example shows only the call
//! it documents. Hidden from the docs: not part of the API.

use std::path::PathBuf;

use crate::Result;
use crate::checkpoint::{Checkpoint, InferenceSpec};
use crate::model::{ModelConfig, SemShare};

/// Writes an untrained model as `semshare train` saves one (with a 7-word vocabulary and three
/// label names) to a fresh file in the temporary directory and returns its path. Region width 4,
/// at most 3 regions, embeddings of width 8 (`pooled`) or 3 (`label`), texts of up to 6 tokens.
#[doc(hidden)]
pub fn tiny_checkpoint(name: &str) -> Result<PathBuf> {
    let cfg = ModelConfig {
        region_dim: 4,
        max_regions: 3,
        word_dim: 4,
        gru_hidden: 4,
        dim: 8,
        layers: 1,
        heads: 2,
        ffn: 16,
        max_tokens: 6,
        vocab: 7,
        labels: 3,
        object_classes: 2,
        ..ModelConfig::small()
    };
    let vocab = ["[PAD]", "[UNK]", "[MASK]", "sky", "clouds", "sea", "dog"].map(String::from).to_vec();
    let label_names = ["sky", "water", "animal"].map(String::from).to_vec();
    let spec = InferenceSpec { vocab: Some(vocab), label_names: Some(label_names), ..InferenceSpec::default() };
    let params = SemShare::new(&cfg)?.store.init_values(1);
    let path = std::env::temp_dir().join(format!("semshare-doc-{}-{name}.safetensors", std::process::id()));
    Checkpoint { model: cfg, params, optimizer: None, step: 0, state: String::new(), spec }.save(&path)?;
    Ok(path)
}
