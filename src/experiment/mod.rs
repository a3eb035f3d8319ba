//! The paper's experiments (DESIGN.md §1 "Experiments"; issue 5): the variants of Table 1, the
//! η sweep of Figure 1, the consistency losses those variants add, the resumable suite
//! bookkeeping, and the reports (markdown + JSON table, SVG figure).
//!
//! - `consistency`: the losses of `ours+con`, `imc` and the DSCMR-style baseline, on host arrays.
//! - `suite`: which runs a suite is made of, and the state file that lets a killed suite resume.
//! - `report`: per-run scores, mean ± sample std over seeds, `table1.md` / `table1.json`.
//! - `plot`: Figure 1 (NDCG@500 against η) as a self-contained SVG.
//! - `run`: the runner (`semshare experiment`): trains and evaluates a suite's remaining runs,
//!   fits the CCA baseline, rewrites the reports after each run.
//!
//! What is wired where, and the equations, are in `docs/EXPERIMENTS-DESIGN.md`.

pub mod consistency;
pub mod plot;
pub mod report;
pub mod run;
pub mod suite;
