//! semshare: label-wise cross-modal retrieval by semantic sharing (Yang et al., IJCAI 2021).
//!
//! One transformer classification model is trained on both modalities (images as bags of
//! detected regions, texts as token sequences or segment features) and ranks texts for an image
//! query and images for a text query in the space they share. This crate is the runtime: the
//! model with manual autograd, training, evaluation, a CPU backend that runs everywhere and a
//! CUDA backend (feature `cuda`), and the inference API below. The `semshare` binary wraps it
//! (`semshare help`).
//!
//! # Load, embed, query
//!
//! A checkpoint of `semshare train` is self-contained: parameters, model configuration,
//! vocabulary, label names and the retrieval embedding it was selected with. [`Model`] embeds
//! texts (strings, token ids or segment features) and images (region features, optional boxes)
//! into unit vectors, with no dataset and no labels, and searches a gallery exactly:
//!
//! ```
//! # fn main() -> semshare::Result<()> {
//! # let checkpoint = semshare::inference::tiny_checkpoint("crate")?;
//! use semshare::{Model, inference::Regions};
//!
//! // `checkpoint`: e.g. `semshare demo`'s `best.safetensors` (in `$TMPDIR/semshare-demo` or its
//! // `--out`); "auto" is CUDA when built and present.
//! let mut model = Model::load(&checkpoint, semshare::backend::open("cpu")?)?;
//!
//! // A gallery of images, each its detector regions `[regions, Dr]` (here Dr = 4).
//! let (beach, dog) = ([0.9_f32, 0.1, 0.0, 0.3, 0.8, 0.2, 0.1, 0.4], [0.1_f32, 0.7, 0.9, 0.0]);
//! let gallery = model.embed_images(&[Regions::new(&beach), Regions::new(&dog)])?;
//!
//! // Text queries, tokenised by the stored vocabulary (unknown words are `[UNK]`).
//! let queries = model.embed_texts(&["sky clouds over the sea", "a dog"])?;
//! let hits = model.search(&queries, &gallery, 2)?;
//! for (text, hit) in ["sky clouds over the sea", "a dog"].iter().zip(&hits) {
//!     println!("{text:?}: image {} (cosine {:.3})", hit.ids[0], hit.scores[0]);
//! }
//! assert!(hits.iter().all(|h| h.scores[0] >= h.scores[1]));
//! # std::fs::remove_file(&checkpoint).ok();
//! # Ok(())
//! # }
//! ```
//!
//! A gallery too large to embed per query goes into an index file once ([`index`]; what
//! `semshare index` writes): normalised embeddings, string ids, optional labels and the model's
//! fingerprint, memory-mapped when opened, searched exactly by the same top-k:
//!
//! ```
//! # fn main() -> semshare::Result<()> {
//! # let checkpoint = semshare::inference::tiny_checkpoint("crate-index")?;
//! # let file = std::env::temp_dir().join(format!("semshare-doc-{}-gallery.index", std::process::id()));
//! use semshare::{Model, index};
//!
//! let mut model = Model::load(&checkpoint, semshare::backend::open("cpu")?)?;
//! let captions = ["sky clouds", "a dog", "the sea"].map(String::from).to_vec();
//! let ids = vec!["c1".into(), "c2".into(), "c3".into()];
//! index::build::from_texts(&mut model, &captions, ids)?.save(&file)?;
//!
//! let gallery = index::Index::open(&file)?; // mapped, checked, not copied
//! gallery.check_model(&model)?; // the model that built it, with the same embedding
//! let query = model.embed_texts(&["dog"])?;
//! let hits = index::search(model.device(), &gallery, &query, 2)?;
//! assert_eq!(gallery.id(hits[0][0].item), Some("c2"));
//! # std::fs::remove_file(&file).ok();
//! # std::fs::remove_file(&checkpoint).ok();
//! # Ok(())
//! # }
//! ```
//!
//! `examples/embed_and_query.rs` does the same on the demo's data (`cargo run --release --
//! demo`, then `cargo run --release --example embed_and_query`).
//!
//! # Where things are
//!
//! The modules are floors: each imports only from its own floor or below
//! (`docs/ARCHITECTURE.md`).
//!
//! | floor | modules |
//! |---|---|
//! | 0 | [`error`], [`rng`], [`io`] (atomic writes, output claims), [`cli`] |
//! | 1 | [`tensor`] |
//! | 2 | [`backend`]: the `Backend` trait, every op forward and backward; CPU and CUDA |
//! | 3 | [`nn`]: layers with forward + backward |
//! | 4 | [`model`]: the encoders, the shared model, the objective (Eqs. 3–6) |
//! | 5 | [`data`], [`eval`], [`checkpoint`] |
//! | 6 | [`train`], [`inference`] ([`Model`]), [`config`], [`defaults`], [`index`] |
//! | 7 | [`experiment`] |
//!
//! Errors are one [`Error`] type whose message names the file, tensor, item or option at
//! fault. From the `data` floor up no function exits or panics on bad input. The floors below
//! are building blocks that trust their caller for sizes: a `Tensor` constructor asserts that
//! its values fit its shape, and a `Backend`'s allocations (reachable through
//! [`Model::device`]) are not checked against the memory available.

pub mod backend;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod data;
pub mod defaults;
pub mod error;
pub mod eval;
pub mod experiment;
pub mod index;
pub mod inference;
pub mod io;
pub mod model;
pub mod nn;
pub mod rng;
pub mod tensor;
pub mod train;

pub use error::{Error, Result};
pub use inference::Model;
