//! Evaluation: retrieval metrics (`metrics`) and the embedding files `score --embeddings` reads
//! (`embeddings`). DESIGN.md §1, "Retrieval" and "Metrics".

pub mod cca;
pub mod embeddings;
pub mod linalg;
pub mod metrics;
pub mod ridge;

pub use embeddings::EmbeddingSet;
pub use metrics::{DirectionMetrics, EvalConfig, Report, Side, evaluate};
