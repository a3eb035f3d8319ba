//! The method of DESIGN.md §1: encoders, the shared model, heads and the objective (the label
//! and context losses, the consistency losses and the ablation variants that choose among them).

pub mod batch;
pub mod config;
pub mod consistency;
pub mod image;
pub mod input_norm;
pub mod memory;
pub mod semshare;
pub mod shared;
pub mod staged;
pub mod text;
pub mod variant;

pub use batch::{Batch, Features, ImageBatch, MaskPlan, TextBatch};
pub use config::{ModelConfig, Trunk};
pub use input_norm::{FeatureNorm, InputNorm};
pub use semshare::{EmbeddingKind, LossWeights, ModalityLoss, SemShare};
pub use staged::{HostInputs, Staged};
pub use variant::{Consistency, Variant, VariantSpec};
