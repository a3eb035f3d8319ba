//! Data (DESIGN.md §6). The on-disk format, one file per concern: `format` (names, manifest,
//! layout, dtypes), `checksum`, `shard` (one file, read row by row), `reader` (a directory and
//! its splits), `writer`. On top: `batches` turns shard rows into model batches, `loader`
//! prefetches them, `pack` builds a dataset from a source directory; the in-memory `dataset`,
//! the synthetic generator and its `flickr-tags` variant (real MIRFlickr-25K labels and tags).

pub mod checksum;
pub mod dataset;
pub mod flickr_tags;
pub mod format;
pub mod reader;
pub mod shard;
pub mod stats;
pub mod synth;
pub mod writer;

pub use dataset::{Dataset, Split};
pub use format::Meta;
pub use synth::{SynthConfig, SynthPreset, generate};
pub mod batches;
pub mod loader;
pub mod pack;
