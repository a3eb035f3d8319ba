//! The paper's experiments (DESIGN.md §1 "Experiments"; issue 5): suites of Table 1's variants
//! and Figure 1's η sweep, the resumable suite bookkeeping, and the reports (markdown + JSON
//! table, SVG figure). The variants and their consistency losses are part of the objective
//! (`model::variant`, `model::consistency`); this module only runs studies of them.
//!
//! - `scores`: what a finished run scored (NDCG@k, mAP@all): recorded by the suite, read by the reports.
//! - `state`: the resumable bookkeeping every study shares: a plan of runs, the finished ones, one
//!   JSON file rewritten atomically after each run.
//! - `suite`: which runs a suite is made of (a plan of `state`).
//! - `tune`: `semshare tune`, successive halving over hyper-parameters (a plan of `state` too).
//! - `report`: mean ± sample std over seeds, `table1.md` / `table1.json`.
//! - `plot`: Figure 1 (NDCG@500 against η) as a self-contained SVG.
//! - `baselines`: the closed-form baselines (CCA, ridge least squares, the supervised linear map),
//!   each with its settings chosen on validation.
//! - `run`: the runner (`semshare experiment`): trains and evaluates a suite's remaining runs,
//!   fits the closed-form baselines, rewrites the reports after each run.
//!
//! What is wired where, and the equations, are in `docs/EXPERIMENTS-DESIGN.md`.

pub mod baselines;
pub mod plot;
pub mod report;
pub mod run;
pub mod scores;
pub mod state;
pub mod suite;
pub mod tune;
