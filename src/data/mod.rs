//! Data (DESIGN.md §6): the in-memory dataset with its on-disk form, the synthetic generator, and
//! its `flickr-tags` variant (real MIRFlickr-25K labels and tags).

pub mod dataset;
pub mod flickr_tags;
pub mod shard;
pub mod synth;

pub use dataset::{Dataset, Meta, Split};
pub use synth::{SynthConfig, SynthPreset, generate};
pub mod batches;
pub mod loader;
pub mod pack;
