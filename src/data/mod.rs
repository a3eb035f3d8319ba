//! Data (DESIGN.md §6): the in-memory dataset with its on-disk form, and the synthetic generator.

pub mod dataset;
pub mod shards;
pub mod synth;

pub use dataset::{Dataset, Meta, Split};
pub use synth::{SynthConfig, SynthPreset, generate};
pub mod batches;
pub mod loader;
pub mod pack;
