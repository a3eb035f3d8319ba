//! What a training run reports as it goes ([`Progress`]), and the callback that receives it.

use std::sync::Arc;

use crate::model::EmbeddingKind;

/// What a training run reports as it goes, to [`RunOptions::progress`](crate::train::RunOptions::progress); the library prints
/// nothing, the caller decides what to show (the CLI: a redrawn line on a terminal, a plain
/// line now and then when piped).
#[derive(Clone, Debug)]
pub enum Progress {
    /// After every step: `step` steps done of at most `total`.
    Step { step: u64, total: u64, loss: f32, steps_per_sec: f64 },
    /// After a validation: the score of each embedding validated, and the best so far.
    Validation {
        step: u64,
        total: u64,
        loss: f32,
        /// e.g. `NDCG@500`, `mAP@all`.
        metric: String,
        scores: Vec<(EmbeddingKind, f64)>,
        best: f64,
        best_step: u64,
        best_embedding: Option<EmbeddingKind>,
    },
    /// The run stops early: `stale` validations without a better score.
    EarlyStop { stale: u64, metric: String },
    /// A line of news from a longer task (the experiment runner: a run starts or ends).
    Note(String),
}

/// A receiver of [`Progress`] reports, shared by the runs of a longer task.
#[derive(Clone)]
pub struct ProgressFn(pub Arc<dyn Fn(&Progress) + Send + Sync>);

impl ProgressFn {
    pub fn new(f: impl Fn(&Progress) + Send + Sync + 'static) -> Self {
        ProgressFn(Arc::new(f))
    }
    pub fn report(&self, p: Progress) {
        (self.0)(&p)
    }
}

impl std::fmt::Debug for ProgressFn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProgressFn")
    }
}
