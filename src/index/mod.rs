//! Galleries for retrieval: the index file of `semshare index` (`file.rs`: normalised
//! embeddings, ids, labels, the model's fingerprint; memory-mapped on load), how galleries are
//! built from a split, texts, features or raw vectors (`build.rs`), exact top-k against one
//! (`search.rs`), and float32 `.npy` files for FAISS and friends (`npy.rs`).

pub mod build;
pub mod file;
pub mod npy;
pub mod search;

pub use file::{Gallery, Index, Labels, Modality, Origin};
pub use npy::export_ids_path;
pub use search::{Hit, search};
