//! The method of DESIGN.md §1: encoders, the shared model, heads and objectives.

pub mod batch;
pub mod config;
pub mod image;
pub mod memory;
pub mod semshare;
pub mod shared;
pub mod text;

pub use batch::{Batch, ImageBatch, MaskPlan, TextBatch};
pub use config::{ModelConfig, Trunk};
pub use semshare::{EmbeddingKind, LossWeights, ModalityLoss, SemShare};
