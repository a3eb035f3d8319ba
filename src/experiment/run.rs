//! The experiment runner (docs/EXPERIMENTS-DESIGN.md §3, §4 items 8 and 10): runs a suite's
//! remaining runs one after the other (train, test-evaluate the best checkpoint, record), rewrites
//! the reports after each, and fits the CCA baseline in closed form.
//!
//! A suite stopped (SIGINT, SIGTERM: [`ExperimentConfig::stop`]) or killed at any point resumes
//! from `<out>/<suite>-state.json`: finished runs are kept, and the run in progress goes on from
//! its last checkpoint (the step it was stopped at, or its last validation when killed), to the
//! result it would have had without the interruption.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use super::baselines::closed_form_run;
use super::plot::{eta_curves, write_figure1};
use super::report::{Tables, write_table};
pub use super::scores::NDCG_K;
use super::scores::Scores;
use super::state::{claim_runs_dir, refuse_foreign_reports};
use super::suite::{RunKey, RunRecord, Suite, SuiteKind, SuiteState};
use crate::backend::Backend;
use crate::checkpoint::Checkpoint;
use crate::data::checksum::{checksum, format_checksum};
use crate::data::reader::DatasetReader;
use crate::eval::metrics::{EvalConfig, Report};
use crate::inference::{evaluate_split, load_model};
use crate::model::{EmbeddingKind, ModelConfig, SemShare, Variant};
use crate::tensor::Tensor;
use crate::train::{LAST_CHECKPOINT, Progress, ProgressFn, RunOptions, TrainConfig, remove_run_dir, train};
use crate::{Error, Result};

/// What `semshare experiment` runs.
#[derive(Clone, Debug)]
pub struct ExperimentConfig {
    pub suite: SuiteKind,
    /// Seeds 0..seeds.
    pub seeds: u64,
    /// Run this seed alone instead: the suite is the seeds its state file records plus this one,
    /// and only this seed's runs are done (`seeds` is then unused).
    pub only_seed: Option<u64>,
    /// Only these variants of the suite (in the suite's order); None: all of them.
    pub variants: Option<Vec<Variant>>,
    /// The base model (the `ours` structure; each variant changes it by `Variant::configure`).
    pub model: ModelConfig,
    /// The budget of every trained run; variant, seed and η are set per run.
    pub train: TrainConfig,
    /// Results: `<suite>-state.json`, `table1.md/json` or `figure1.svg` + `eta.md/json`.
    pub out: PathBuf,
    /// Run directories (checkpoints): `<runs_dir>/<suite>/<variant>-s<seed>[-eta<η>]`.
    pub runs_dir: PathBuf,
    /// Receives the suite's and each training run's progress (None: nothing is reported).
    pub progress: Option<ProgressFn>,
    /// Checked before each run and each training step: once true, the suite stops, the run in
    /// progress writing a checkpoint that the next start continues (`RunOptions::stop`).
    pub stop: Option<Arc<AtomicBool>>,
}

/// The per-run budget of docs/EXPERIMENTS-DESIGN.md §5: batch 32, 600 steps, warm-up 60,
/// lr 5e-4 (cosine), validation every 100 steps, patience 3.
pub fn default_budget() -> TrainConfig {
    TrainConfig {
        batch_size: 32,
        steps: 600,
        warmup: 60,
        lr: 5e-4,
        eval_every: 100,
        patience: 3,
        eval_k: NDCG_K,
        ..TrainConfig::default()
    }
}

/// The suite's name in file names (`table1`, `eta`).
pub fn suite_name(kind: SuiteKind) -> &'static str {
    match kind {
        SuiteKind::Table1 => "table1",
        SuiteKind::Eta => "eta",
    }
}

/// The budget without the fields each run sets (variant, seed, η).
fn budget_only(train: &TrainConfig) -> TrainConfig {
    let d = TrainConfig::default();
    TrainConfig { variant: d.variant, seed: d.seed, eta: d.eta, ..train.clone() }
}

/// What must not change between a suite and its resumption: the dataset (name and every
/// shard's checksum from the manifest), the base model configuration and the budget.
/// `<dataset name>:<fnv1a64x4 of all of it, hex>`.
pub fn fingerprint(data: &DatasetReader, model: &ModelConfig, train: &TrainConfig) -> Result<String> {
    let sums: Vec<&str> = data.shard_entries().values().flatten().map(|e| e.checksum.as_str()).collect();
    Ok(fingerprint_with(data, &model_json(model)?, &budget_json(train)?, &sums))
}

fn model_json(model: &ModelConfig) -> Result<String> {
    serde_json::to_string(model).map_err(|e| Error::data(format!("fingerprint: {e}")))
}

/// The budget as the fingerprint hashes it: the struct's own field order (a JSON map would sort
/// the keys).
fn budget_json(train: &TrainConfig) -> Result<String> {
    serde_json::to_string(&budget_only(train)).map_err(|e| Error::data(format!("fingerprint: {e}")))
}

/// What one run of a study is, for `RunOptions::identity`: the dataset as [`fingerprint`] sees
/// it, the run's model and its whole training configuration (seed, η, steps included), the
/// device that trains it (its name: path and precision) and this version of semshare. A run
/// continues only a checkpoint of the same identity.
pub fn run_identity(device: &str, data: &DatasetReader, model: &ModelConfig, train: &TrainConfig) -> Result<String> {
    let sums: Vec<&str> = data.shard_entries().values().flatten().map(|e| e.checksum.as_str()).collect();
    let train = serde_json::to_string(train).map_err(|e| Error::data(format!("run identity: {e}")))?;
    let run = fingerprint_with(data, &model_json(model)?, &train, &sums);
    Ok(format!("{run} on {device} by semshare {}", env!("CARGO_PKG_VERSION")))
}

/// [`fingerprint`] of the model's and the budget's JSON, with the shards' checksums given (in
/// the manifest's order).
fn fingerprint_with(data: &DatasetReader, model_json: &str, budget_json: &str, sums: &[&str]) -> String {
    let mut text = format!("dataset {}\n", data.meta().name);
    let shards = data.shard_entries().iter().flat_map(|(split, entries)| entries.iter().map(move |e| (split, e)));
    for ((split, e), sum) in shards.zip(sums) {
        text += &format!("shard {split} {} {sum}\n", e.file);
    }
    text += &format!("model {model_json}\n");
    text += &format!("train {budget_json}\n");
    format!("{}:{:016x}", data.meta().name, checksum(text.as_bytes()))
}

/// The `train` keys added since the first committed suites (2026-11-27), with the values those
/// suites ran with: a suite recorded before a key existed has none of them in its fingerprint.
const ADDED_TRAIN_KEYS: [(&str, &str); 2] = [("val_metric", "ndcg"), ("normalize", "none")];

/// `budget_json` as it was before [`ADDED_TRAIN_KEYS`] existed: each cut from the text as
/// `,"key":"value"` (none is the first field); None when the budget has another value of one,
/// a budget no suite of then could have had.
fn legacy_budget_json(budget_json: &str) -> Option<String> {
    let mut budget = budget_json.to_string();
    for (key, value) in ADDED_TRAIN_KEYS {
        let field = format!(",\"{key}\":\"{value}\"");
        if !budget.contains(&field) {
            return None;
        }
        budget = budget.replacen(&field, "", 1);
    }
    Some(budget)
}

/// Whether `recorded` is this suite's fingerprint as an earlier version made it: before shard
/// headers were written in one order (the shards' `__metadata__` in another order), and before
/// the budget had the keys of `ADDED_TRAIN_KEYS` (when this budget has their old values).
/// Then a dataset rebuilt with the documented commands resumes a committed suite.
pub fn is_legacy_fingerprint(
    data: &DatasetReader,
    model: &ModelConfig,
    train: &TrainConfig,
    recorded: &str,
) -> Result<bool> {
    if !recorded.starts_with(&format!("{}:", data.meta().name)) {
        return Ok(false);
    }
    let (model, budget) = (model_json(model)?, budget_json(train)?);
    let legacy = legacy_budget_json(&budget);
    // In the manifest's order, as `fingerprint` lists the shards.
    let mut candidates: Vec<Vec<String>> = Vec::new();
    for split in data.shard_entries().keys() {
        for shard in &data.split(split)?.shards {
            candidates.push(shard.metadata_order_checksums()?.into_iter().map(format_checksum).collect());
        }
    }
    // Every combination of the shards' candidates (6 per shard with 3 metadata entries).
    let total: usize = candidates.iter().map(Vec::len).try_fold(1usize, |a, n| a.checked_mul(n)).unwrap_or(usize::MAX);
    if total > 1 << 20 {
        return Ok(false);
    }
    for mut k in 0..total {
        let sums: Vec<&str> = candidates
            .iter()
            .map(|c| {
                let pick = &c[k % c.len()];
                k /= c.len();
                pick.as_str()
            })
            .collect();
        if std::iter::once(&budget).chain(&legacy).any(|b| fingerprint_with(data, &model, b, &sums) == recorded) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The suite `cfg` describes on `data` (restricted to `cfg.variants`).
pub fn build_suite(data: &DatasetReader, cfg: &ExperimentConfig) -> Result<Suite> {
    let fp = fingerprint(data, &cfg.model, &cfg.train)?;
    let mut suite = match cfg.suite {
        SuiteKind::Table1 => Suite::table1(cfg.seeds, fp)?,
        SuiteKind::Eta => Suite::eta_sweep(cfg.seeds, fp)?,
    };
    let recorded = recorded_suite(&state_path(&cfg.out, cfg.suite));
    if let Some(old) = &recorded
        && old.fingerprint != suite.fingerprint
        && is_legacy_fingerprint(data, &cfg.model, &cfg.train, &old.fingerprint)?
    {
        suite.fingerprint = old.fingerprint.clone();
    }
    if let Some(seed) = cfg.only_seed {
        suite.seeds = recorded.map(|s| s.seeds).unwrap_or_default();
        if !suite.seeds.contains(&seed) {
            suite.seeds.push(seed);
        }
    }
    if let Some(only) = &cfg.variants {
        if let Some(v) = only.iter().find(|v| !suite.variants.contains(v)) {
            let names: Vec<&str> = suite.variants.iter().map(|v| v.name()).collect();
            return Err(Error::config(format!(
                "the {} suite has no variant `{v}` (it runs {})",
                suite_name(cfg.suite),
                names.join(", ")
            )));
        }
        suite.variants.retain(|v| only.contains(v));
        suite.validate()?;
    }
    Ok(suite)
}

/// The suite a state file records (None when there is no readable one: opening it then says
/// what is wrong).
fn recorded_suite(path: &Path) -> Option<Suite> {
    let bytes = crate::io::read(path).ok()?;
    serde_json::from_slice::<SuiteState>(&bytes).ok().map(|s| s.suite)
}

/// Where run `key` of a suite trains.
pub fn run_dir(runs_dir: &Path, kind: SuiteKind, key: &RunKey) -> PathBuf {
    let mut name = format!("{}-s{}", key.variant, key.seed);
    if let Some(eta) = key.eta {
        name += &format!("-eta{eta}");
    }
    runs_dir.join(suite_name(kind)).join(name)
}

/// `<out>/<suite>-state.json`.
pub fn state_path(out: &Path, kind: SuiteKind) -> PathBuf {
    out.join(format!("{}-state.json", suite_name(kind)))
}

fn duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    if s >= 3600 { format!("{}h{:02}m", s / 3600, (s % 3600) / 60) } else { format!("{}m{:02}s", s / 60, s % 60) }
}

/// Does every remaining run of the suite, recording each and rewriting the reports after each;
/// returns the final state. A state file of another suite (other dataset, model, budget, seeds
/// or variants) is refused.
pub fn run_suite(dev: &mut dyn Backend, data: &Arc<DatasetReader>, cfg: &ExperimentConfig) -> Result<SuiteState> {
    let suite = build_suite(data, cfg)?;
    TrainConfig { variant: Variant::Ours, ..cfg.train.clone() }.validate()?;
    data.layout.check_fits(&cfg.model)?;
    // Every run needs all three; an empty one is found now, not after the first training.
    crate::train::require_items(data, "train", "the suite")?;
    crate::train::require_items(data, "val", "the suite")?;
    crate::train::require_items(data, "test", "the suite")?;
    std::fs::create_dir_all(&cfg.out).map_err(|e| Error::io(&cfg.out, e))?;
    let path = state_path(&cfg.out, cfg.suite);
    let reports = report_files(cfg.suite);
    refuse_foreign_reports(&cfg.out, &path, &reports.iter().map(String::as_str).collect::<Vec<_>>())?;
    let _one_at_a_time = claim_runs_dir(&cfg.runs_dir.join(suite_name(cfg.suite)), &path)?;
    let mut state = SuiteState::open(&path, &suite)?;
    fill_in_label_scores(dev, data, cfg, &mut state, &path)?;
    write_reports(&state, data.meta().name.as_str(), &cfg.out, &cfg.train.embedding)?;
    let remaining: Vec<RunKey> =
        state.remaining().into_iter().filter(|k| cfg.only_seed.is_none_or(|s| k.seed == s)).collect();
    let total = state.finished.len() + remaining.len();
    let mut fitted: Vec<(Variant, Report)> = Vec::new();
    let stop_asked = || cfg.stop.as_ref().is_some_and(|s| s.load(Ordering::Relaxed));
    for key in remaining {
        if stop_asked() {
            break;
        }
        let k = state.finished.len() + 1;
        if let Some(p) = &cfg.progress {
            let done: Vec<f64> = state.finished.iter().map(|r| r.seconds).collect();
            let eta = if done.is_empty() {
                "—".to_string()
            } else {
                duration(done.iter().sum::<f64>() / done.len() as f64 * (total - k + 1) as f64)
            };
            p.report(Progress::Note(format!("run {k}/{total}  {key}  starting  (suite ETA {eta})")));
        }
        let start = Instant::now();
        let dir = key.variant.spec().trained.then(|| run_dir(&cfg.runs_dir, cfg.suite, &key));
        state.start(&path, &key, dir.as_deref())?;
        let (report, label, best_step) = if key.variant.spec().trained {
            let Some((ckpt, best_step)) = train_run(dev, data, cfg, &key)? else {
                break; // stopped: its last checkpoint holds the step it reached
            };
            let (net, params) = load_model(dev, &ckpt)?;
            let report = test_report(dev, data, &net, &params, EmbeddingKind::Pooled)?;
            let label = test_report(dev, data, &net, &params, EmbeddingKind::Label)?;
            (report, Some(Scores::from_report(&label, NDCG_K)?), best_step)
        } else {
            // Deterministic: one fit serves every seed of a session.
            let report = match fitted.iter().find(|(v, _)| *v == key.variant) {
                Some((_, r)) => r.clone(),
                None => {
                    let (report, line) = closed_form_run(data, key.variant)?;
                    if let Some(p) = &cfg.progress {
                        p.report(Progress::Note(line));
                    }
                    fitted.push((key.variant, report.clone()));
                    report
                }
            };
            (report, None, 0)
        };
        let scores = Scores::from_report(&report, NDCG_K)?;
        let report = serde_json::to_value(&report).map_err(|e| Error::data(format!("report as JSON: {e}")))?;
        let seconds = start.elapsed().as_secs_f64();
        state.record(&path, RunRecord { key, scores, label, report, seconds, best_step })?;
        write_reports(&state, data.meta().name.as_str(), &cfg.out, &cfg.train.embedding)?;
        if let Some(p) = &cfg.progress {
            let done: Vec<f64> = state.finished.iter().map(|r| r.seconds).collect();
            let mean = done.iter().sum::<f64>() / done.len() as f64;
            p.report(Progress::Note(format!(
                "run {k}/{total}  {key}  test NDCG@{NDCG_K} {:.2}  mAP {:.2}  ({}, best step {best_step})  ETA {}",
                scores.ndcg.avg,
                scores.map_all.avg,
                duration(seconds),
                duration(mean * (total - k) as f64)
            )));
        }
    }
    Ok(state)
}

/// Scores runs recorded without `label` scores (by a suite from before they were kept) from
/// their best checkpoint, when the run directory still holds it; the others stay without.
fn fill_in_label_scores(
    dev: &mut dyn Backend,
    data: &Arc<DatasetReader>,
    cfg: &ExperimentConfig,
    state: &mut SuiteState,
    path: &Path,
) -> Result<()> {
    let missing: Vec<RunKey> =
        state.finished.iter().filter(|r| r.label.is_none() && r.key.variant.spec().trained).map(|r| r.key).collect();
    for key in missing {
        let ckpt = best_checkpoint(cfg, &key);
        if !ckpt.exists() {
            if let Some(p) = &cfg.progress {
                p.report(Progress::Note(format!(
                    "{key}: no label scores and no checkpoint at {} to compute them",
                    ckpt.display()
                )));
            }
            continue;
        }
        let (net, params) = load_model(dev, &ckpt)?;
        let scores = Scores::from_report(&test_report(dev, data, &net, &params, EmbeddingKind::Label)?, NDCG_K)?;
        if let Some(p) = &cfg.progress {
            p.report(Progress::Note(format!(
                "{key}: label scores filled in from {}: NDCG@{NDCG_K} {:.2}",
                ckpt.display(),
                scores.ndcg.avg
            )));
        }
        state.record_label(path, &key, scores)?;
    }
    Ok(())
}

/// The checkpoint run `key` is scored with (best validation NDCG, ranked with
/// `TrainConfig::embedding`).
fn best_checkpoint(cfg: &ExperimentConfig, key: &RunKey) -> PathBuf {
    run_dir(&cfg.runs_dir, cfg.suite, key).join(crate::train::BEST_CHECKPOINT)
}

/// The test report ranked with `embedding` (`EvalConfig::default()`, the protocol of
/// `inference::evaluate_split`).
fn test_report(
    dev: &mut dyn Backend,
    data: &DatasetReader,
    net: &SemShare,
    params: &Tensor,
    embedding: EmbeddingKind,
) -> Result<Report> {
    evaluate_split(dev, net, params, data, "test", embedding, &EvalConfig::default())
}

/// Trains run `key`, from its own last checkpoint when an earlier start of the suite started
/// it and was stopped or killed. Returns its best checkpoint and that checkpoint's step, or
/// None when `cfg.stop` stopped it.
fn train_run(
    dev: &mut dyn Backend,
    data: &Arc<DatasetReader>,
    cfg: &ExperimentConfig,
    key: &RunKey,
) -> Result<Option<(PathBuf, u64)>> {
    let model = key.variant.configure(&cfg.model);
    let train_cfg = TrainConfig {
        variant: key.variant,
        seed: key.seed,
        eta: key.eta.map_or(cfg.train.eta, |e| e as f32),
        ..cfg.train.clone()
    };
    let dir = run_dir(&cfg.runs_dir, cfg.suite, key);
    let opts = RunOptions {
        replace: true,
        progress: cfg.progress.clone(),
        stop: cfg.stop.clone(),
        identity: Some(run_identity(dev.name(), data, &model, &train_cfg)?),
        ..RunOptions::new(&dir)
    };
    let mut summary = train(dev, data, &model, &train_cfg, &opts)?;
    // Continued at its end (killed after its last validation, before it was recorded), a run
    // whose best checkpoint is gone or no longer loads (a damaged disk) is trained again.
    let usable = |best: &Option<PathBuf>| best.as_deref().is_some_and(|b| Checkpoint::load_for_inference(b).is_ok());
    if summary.losses.is_empty() && !summary.stopped && !usable(&summary.best_checkpoint) {
        if let Some(p) = &cfg.progress {
            p.report(Progress::Note(format!("run {key}: its best checkpoint cannot be used; the run starts again")));
        }
        remove_run_dir(&dir)?;
        summary = train(dev, data, &model, &train_cfg, &opts)?;
    }
    if summary.stopped {
        if let Some(p) = &cfg.progress {
            let last = dir.join(LAST_CHECKPOINT);
            let at = match summary.steps > 0 && last.is_file() {
                true => format!("at step {} ({} holds it)", summary.steps, last.display()),
                false => "before its first step".to_string(),
            };
            p.report(Progress::Note(format!("run {key} stopped {at}")));
        }
        return Ok(None);
    }
    let best = summary
        .best_checkpoint
        .ok_or_else(|| Error::data(format!("run {key}: no best checkpoint in {}", dir.display())))?;
    Ok(Some((best, summary.best_step)))
}

/// Figure 1, the η sweep's plot.
const FIGURE1_FILE: &str = "figure1.svg";

/// The reports [`write_reports`] writes for a suite of `kind`: its table as markdown and JSON,
/// named by the suite, and for the η sweep Figure 1.
fn report_files(kind: SuiteKind) -> Vec<String> {
    let stem = suite_name(kind);
    let mut files = vec![format!("{stem}.md"), format!("{stem}.json")];
    if kind == SuiteKind::Eta {
        files.push(FIGURE1_FILE.into());
    }
    files
}

/// Rewrites the suite's reports from its state: Table 1 (`table1.md`, `table1.json`), or for
/// the η sweep Figure 1 (`figure1.svg`) and its rows as a table (`eta.md`, `eta.json`).
pub fn write_reports(state: &SuiteState, dataset: &str, out: &Path, selected_with: &str) -> Result<()> {
    let tables = Tables::of(state, selected_with)?;
    if tables.pooled.is_empty() {
        return Ok(());
    }
    match state.suite.kind {
        SuiteKind::Table1 => write_table(out, suite_name(SuiteKind::Table1), &format!("Table 1 — {dataset}"), &tables),
        SuiteKind::Eta => {
            write_table(out, suite_name(SuiteKind::Eta), &format!("η sweep — {dataset}"), &tables)?;
            let title = format!("Figure 1 — {dataset}: NDCG@{NDCG_K} against η");
            write_figure1(&out.join(FIGURE1_FILE), &title, NDCG_K, &eta_curves(state)?)
        }
    }
}
