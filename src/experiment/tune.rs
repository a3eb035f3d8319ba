//! `semshare tune`: hyper-parameter search on the validation split by successive halving
//! (Jamieson & Talwalkar 2016; the synchronous form of ASHA, Li et al. 2020).
//!
//! Trial 0 is the base configuration itself (the data-aware defaults `train` would use), so the
//! search can only replace the defaults with something that beat them on validation; the other
//! n − 1 trials are drawn from the search space by seed. Rung 0 trains each for `min_steps`;
//! rung r + 1 trains the best ⌊n / η^(r+1)⌋ of rung r (validation score, ties to the lower
//! trial) for η times as many steps, from scratch: the cosine schedule then spans each rung's
//! budget, and a trial's score at a rung does not depend on which rung it came from.
//!
//! A small validation split makes one run's score noisy (CUB-10: 60 items; two seeds of one
//! configuration differ by about as much as the trials that reach the later rungs), so the
//! rungs after the first that still choose between trials train each trial `repeats` times
//! with consecutive training seeds and rank by the mean. Rung 0 is a coarse filter and the last
//! rung, with one trial, chooses nothing: both train once.
//!
//! The plan and the finished trials are a [`StudyState`] (the experiment runner's resumable
//! state): a tune stopped or killed at any point continues only its trials in progress, each
//! from its last checkpoint, and the promotions are a function of the recorded scores, so a
//! resumed tune makes the same choices. Trials run
//! in parallel, one device per worker; each is deterministic by seed, so the result does not
//! depend on the number of workers.

use std::collections::VecDeque;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::run::{fingerprint, run_identity};
use super::state::{Plan, StudyState, claim_runs_dir, refuse_foreign_reports};
use crate::data::reader::DatasetReader;
use crate::model::ModelConfig;
use crate::rng::Rng;
use crate::train::{Progress, ProgressFn, RunOptions, TrainConfig, remove_run_dir, require_items, train};
use crate::{Error, Result};

/// One point of the search space. `dim` and `layers` size the shared model; heads stay the
/// base model's and the feed-forward width is 2·dim (the `small` preset's ratio).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Trial {
    pub id: usize,
    pub lr: f32,
    pub weight_decay: f32,
    pub dropout: f32,
    /// λ, the context loss's weight (0: no context loss).
    pub lambda: f32,
    /// Warm-up as a fraction of the trial's steps.
    pub warmup: f32,
    pub batch_size: usize,
    pub dim: usize,
    pub layers: usize,
}

fn log_uniform(rng: &mut Rng, lo: f64, hi: f64) -> f32 {
    (lo.ln() + rng.uniform() * (hi.ln() - lo.ln())).exp() as f32
}

/// Rounded to 3 significant digits: the table and the config file stay readable.
fn round3(x: f32) -> f32 {
    if x == 0.0 {
        return 0.0;
    }
    let scale = 10f32.powi(2 - x.abs().log10().floor() as i32);
    (x * scale).round() / scale
}

impl Trial {
    /// The base configuration's own values, as trial 0: warm-up as the fraction of the base's
    /// steps it is, the batch at most `max_batch`.
    pub fn base(model: &ModelConfig, train: &TrainConfig, max_batch: usize) -> Trial {
        Trial {
            id: 0,
            lr: train.lr,
            weight_decay: train.weight_decay,
            dropout: model.dropout,
            lambda: model.lambda,
            warmup: round3(train.warmup as f32 / train.steps.max(1) as f32),
            batch_size: train.batch_size.min(max_batch.max(1)),
            dim: model.dim,
            layers: model.layers,
        }
    }

    /// Trial `id` of the search space, drawn from `seed`'s stream `id` (so trial k is the same
    /// whatever the number of trials). Widths are multiples of the base model's heads; batches
    /// are at most `max_batch` (the training split's pairs).
    pub fn sample(seed: u64, id: usize, base: &ModelConfig, max_batch: usize) -> Trial {
        let mut rng = Rng::derive(seed, 0x7475_6e65_0000_0000 | id as u64);
        let mut pick = |xs: &[usize]| xs[rng.below(xs.len())];
        let batch_size = pick(&[16, 32, 64]).min(max_batch.max(1));
        let dim = pick(&[128, 256, 384]).next_multiple_of(base.heads);
        let layers = pick(&[1, 2, 3]);
        let lr = round3(log_uniform(&mut rng, 1e-4, 3e-3));
        let weight_decay = round3(log_uniform(&mut rng, 1e-4, 0.3));
        let dropout = round3((rng.uniform() * 0.3) as f32);
        // One trial in six without the context loss: whether it helps is data-dependent. A base
        // without it (nothing to predict, or switched off) keeps it off.
        let lambda = match rng.below(6) {
            _ if base.lambda == 0.0 => 0.0,
            0 => 0.0,
            _ => round3(log_uniform(&mut rng, 1e-3, 0.3)),
        };
        let warmup = round3((0.02 + rng.uniform() * 0.18) as f32);
        Trial { id, lr, weight_decay, dropout, lambda, warmup, batch_size, dim, layers }
    }

    /// The base configuration with this trial's values, trained for `steps`.
    pub fn apply(&self, model: &ModelConfig, train: &TrainConfig, steps: u64) -> (ModelConfig, TrainConfig) {
        let model = ModelConfig {
            dim: self.dim,
            ffn: 2 * self.dim,
            layers: self.layers,
            dropout: self.dropout,
            lambda: self.lambda,
            ..model.clone()
        };
        let train = TrainConfig {
            lr: self.lr,
            weight_decay: self.weight_decay,
            warmup: (self.warmup as f64 * steps as f64).round() as u64,
            batch_size: self.batch_size,
            steps,
            // Four validations per trial: the best checkpoint of each is its score.
            eval_every: (steps / 4).max(1),
            patience: 0,
            ..train.clone()
        };
        (model, train)
    }
}

/// A trial at a rung, trained with the base training seed + `repeat`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrialKey {
    pub trial: usize,
    pub rung: usize,
    #[serde(default)]
    pub repeat: usize,
}

impl fmt::Display for TrialKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "trial {} rung {}", self.trial, self.rung)?;
        if self.repeat > 0 { write!(f, " repeat {}", self.repeat) } else { Ok(()) }
    }
}

/// A trial's score at a rung: the mean over its repeats (None if one failed).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RungScore {
    pub trial: usize,
    pub rung: usize,
    pub score: Option<f64>,
}

/// A finished trial at a rung.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrialRecord {
    pub key: TrialKey,
    pub steps: u64,
    /// Best validation score of the run (`TrainConfig::metric_name`); None when the trial failed
    /// (`error` says why), which ranks it last.
    pub score: Option<f64>,
    pub best_step: u64,
    /// Wall-clock seconds of training in the start of the tune that finished the trial (one
    /// continued from its checkpoint counts the time after it only).
    pub seconds: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What a tune runs: the trials drawn, the rungs, and a fingerprint of the dataset and the base
/// configuration (`experiment::run::fingerprint`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TunePlan {
    pub trials: Vec<Trial>,
    pub min_steps: u64,
    /// η of successive halving: each rung keeps 1/η of the trials and trains η times longer.
    pub reduction: usize,
    pub rungs: usize,
    /// Runs of each trial at the rungs that choose between trials after the first
    /// ([`TunePlan::repeats_at`]). A state file without it is from before repeats: one.
    #[serde(default = "one")]
    pub repeats: usize,
    pub seed: u64,
    /// The validation score trials are ranked by (`TrainConfig::metric_name`).
    pub metric: String,
    pub fingerprint: String,
}

fn one() -> usize {
    1
}

impl TunePlan {
    /// Steps of a trial at `rung`.
    pub fn steps(&self, rung: usize) -> u64 {
        self.min_steps * (self.reduction as u64).pow(rung as u32)
    }

    /// How many trials rung `rung` trains.
    pub fn survivors(&self, rung: usize) -> usize {
        (self.trials.len() / self.reduction.pow(rung as u32)).max(1)
    }

    /// Runs of each trial at `rung`: `repeats` where the rung's ranking chooses between trials
    /// after the first rung, else one.
    pub fn repeats_at(&self, rung: usize) -> usize {
        if rung > 0 && self.survivors(rung) > 1 { self.repeats } else { 1 }
    }

    /// The model and training configuration run `key` trains with: its trial's values on the
    /// base, its rung's steps, the base's seed + its repeat.
    pub fn run_configs(&self, model: &ModelConfig, train: &TrainConfig, key: &TrialKey) -> (ModelConfig, TrainConfig) {
        let (model, mut train) = self.trials[key.trial].apply(model, train, self.steps(key.rung));
        train.seed = train.seed.wrapping_add(key.repeat as u64);
        (model, train)
    }

    /// Steps of the whole tune.
    pub fn budget(&self) -> u64 {
        (0..self.rungs).map(|r| (self.survivors(r) * self.repeats_at(r)) as u64 * self.steps(r)).sum()
    }

    /// The trials with every repeat of rung `rung` recorded, best first by their mean score
    /// (failed last, ties to the lower trial).
    pub fn ranking(&self, finished: &[TrialRecord], rung: usize) -> Vec<RungScore> {
        let repeats = self.repeats_at(rung);
        let mut trials: Vec<usize> = finished.iter().filter(|r| r.key.rung == rung).map(|r| r.key.trial).collect();
        trials.sort();
        trials.dedup();
        let mut at: Vec<RungScore> = trials
            .into_iter()
            .filter_map(|trial| {
                let runs: Vec<Option<f64>> = finished
                    .iter()
                    .filter(|r| r.key.rung == rung && r.key.trial == trial && r.key.repeat < repeats)
                    .map(|r| r.score)
                    .collect();
                let score = runs.iter().copied().sum::<Option<f64>>().map(|s| s / runs.len() as f64);
                (runs.len() == repeats).then_some(RungScore { trial, rung, score })
            })
            .collect();
        let score = |r: &RungScore| r.score.unwrap_or(f64::NEG_INFINITY);
        at.sort_by(|a, b| score(b).total_cmp(&score(a)).then(a.trial.cmp(&b.trial)));
        at
    }
}

impl Plan for TunePlan {
    type Key = TrialKey;
    type Record = TrialRecord;

    fn key(record: &TrialRecord) -> &TrialKey {
        &record.key
    }

    fn validate(&self) -> Result<()> {
        if self.trials.is_empty() || self.min_steps == 0 || self.rungs == 0 {
            return Err(Error::config("tune: trials, min_steps and rungs must be positive"));
        }
        check_counts(self.trials.len(), self.repeats)?;
        if self.reduction < 2 {
            return Err(Error::config(format!("tune: reduction (η) = {} must be at least 2", self.reduction)));
        }
        // Rung r trains min_steps · η^r steps: no overflow, and not absurdly long.
        // (`rungs - 1` taken whole: cast to u32, 2³² + 1 rungs once passed as 1.)
        let last = u32::try_from(self.rungs - 1)
            .ok()
            .and_then(|r| (self.reduction as u64).checked_pow(r))
            .and_then(|f| f.checked_mul(self.min_steps));
        if last.is_none_or(|s| s > 10_000_000) {
            return Err(Error::config(format!(
                "tune: {} rungs from {} steps at η = {} is more than 10,000,000 steps for the last rung",
                self.rungs, self.min_steps, self.reduction
            )));
        }
        Ok(())
    }

    fn conflict(&self, old: &TunePlan) -> Option<String> {
        (old != self).then(|| "tune (dataset, base configuration, seed, trials or rungs)".to_string())
    }

    fn runs(&self, finished: &[TrialRecord]) -> Vec<TrialKey> {
        let mut keys: Vec<TrialKey> =
            self.trials.iter().map(|t| TrialKey { trial: t.id, rung: 0, repeat: 0 }).collect();
        for rung in 1..self.rungs {
            let previous = self.ranking(finished, rung - 1);
            if previous.len() < self.survivors(rung - 1) {
                break; // rung - 1 is not finished: who goes on is not known yet
            }
            for r in previous.iter().take(self.survivors(rung)) {
                keys.extend((0..self.repeats_at(rung)).map(|repeat| TrialKey { trial: r.trial, rung, repeat }));
            }
        }
        keys
    }

    fn widen_hint(&self) -> &'static str {
        "ask for the same tune"
    }
}

pub type TuneState = StudyState<TunePlan>;

/// What `semshare tune` runs.
#[derive(Clone, Debug)]
pub struct TuneConfig {
    /// The base configuration: the data's sizes fitted, every value the search does not set.
    pub model: ModelConfig,
    pub train: TrainConfig,
    pub trials: usize,
    pub min_steps: u64,
    pub reduction: usize,
    pub rungs: usize,
    /// Runs per trial at the later rungs that choose ([`TunePlan::repeats_at`]).
    pub repeats: usize,
    pub seed: u64,
    /// Trials trained at once, each on its own device.
    pub workers: usize,
    /// The device each worker opens (`backend::open_at`, at `train.precision`).
    pub device: String,
    /// `tune-state.json`, `trials.md`, `best-config.json`.
    pub out: PathBuf,
    /// A directory per trial and rung; those of the last rung are kept.
    pub runs_dir: PathBuf,
    /// Checked before each trial and each training step: once true, the tune stops, each
    /// trial in progress writing a checkpoint that the next start continues.
    pub stop: Option<Arc<AtomicBool>>,
}

/// Rungs so that the last trains a single trial: ⌊log_η n⌋ + 1.
pub fn default_rungs(trials: usize, reduction: usize) -> usize {
    let (mut rungs, mut n) = (1, trials);
    while reduction >= 2 && n >= reduction {
        n /= reduction;
        rungs += 1;
    }
    rungs
}

/// The tune's report of every trial ([`write_table`]), beside its state file.
const TRIALS_FILE: &str = "trials.md";
/// The winner as a config file ([`write_best_config`]), beside the state file.
const BEST_CONFIG_FILE: &str = "best-config.json";

pub fn state_path(out: &Path) -> PathBuf {
    out.join("tune-state.json")
}

/// More trials than a search can train, or repeats than a ranking needs, are refused before
/// anything is sized by them (each trial and repeat is a record, a directory, a training run).
const MAX_TRIALS: usize = 10_000;
const MAX_REPEATS: usize = 100;

fn check_counts(trials: usize, repeats: usize) -> Result<()> {
    if trials > MAX_TRIALS {
        return Err(Error::config(format!("tune: {trials} trials, more than the {MAX_TRIALS} a search can train")));
    }
    if !(1..=MAX_REPEATS).contains(&repeats) {
        return Err(Error::config(format!("tune: repeats = {repeats} is not in 1..={MAX_REPEATS}")));
    }
    Ok(())
}

/// The plan `cfg` describes on `data`.
pub fn build_plan(data: &DatasetReader, cfg: &TuneConfig) -> Result<TunePlan> {
    check_counts(cfg.trials, cfg.repeats)?;
    let max_batch = data.split("train")?.num_images();
    let trial = |id| match id {
        0 => Trial::base(&cfg.model, &cfg.train, max_batch),
        _ => Trial::sample(cfg.seed, id, &cfg.model, max_batch),
    };
    let plan = TunePlan {
        trials: (0..cfg.trials).map(trial).collect(),
        min_steps: cfg.min_steps,
        reduction: cfg.reduction,
        rungs: cfg.rungs,
        repeats: cfg.repeats,
        seed: cfg.seed,
        metric: cfg.train.metric_name(),
        fingerprint: fingerprint(data, &cfg.model, &cfg.train)?,
    };
    plan.validate()?;
    Ok(plan)
}

/// Where trial `key` trains.
pub fn trial_dir(runs_dir: &Path, key: &TrialKey) -> PathBuf {
    match key.repeat {
        0 => runs_dir.join(format!("trial{}-rung{}", key.trial, key.rung)),
        k => runs_dir.join(format!("trial{}-rung{}-repeat{k}", key.trial, key.rung)),
    }
}

/// Trains every remaining trial, rung after rung, `cfg.workers` at a time, recording each;
/// rewrites `trials.md` after each and `best-config.json` at the end. `progress` receives one
/// line per trial started and finished. Returns the final state.
pub fn run_tune(data: &Arc<DatasetReader>, cfg: &TuneConfig, progress: &(dyn Fn(&str) + Sync)) -> Result<TuneState> {
    if cfg.workers == 0 {
        return Err(Error::config("tune: workers must be positive"));
    }
    let plan = build_plan(data, cfg)?;
    for trial in &plan.trials {
        let (model, train) = trial.apply(&cfg.model, &cfg.train, plan.steps(plan.rungs - 1));
        model.validate()?;
        train.validate()?;
        data.layout.check_fits(&model)?;
    }
    require_items(data, "train", "tune")?;
    require_items(data, "val", "tune")?;
    std::fs::create_dir_all(&cfg.out).map_err(|e| Error::io(&cfg.out, e))?;
    let path = state_path(&cfg.out);
    refuse_foreign_reports(&cfg.out, &path, &[TRIALS_FILE, BEST_CONFIG_FILE])?;
    let _one_at_a_time = claim_runs_dir(&cfg.runs_dir, &path)?;
    let state = Mutex::new(TuneState::open(&path, &plan)?);
    let study = Study { plan: &plan, state: &state, path: &path };
    loop {
        let remaining: VecDeque<TrialKey> = state.lock().map_err(poisoned)?.remaining().into();
        if remaining.is_empty() {
            break;
        }
        if stop_asked(cfg) {
            return state.into_inner().map_err(poisoned);
        }
        let queue = Mutex::new(remaining);
        let first_error: Mutex<Option<Error>> = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..cfg.workers.min(queue.lock().map_or(1, |q| q.len())) {
                s.spawn(|| {
                    if let Err(e) = worker(data, cfg, &study, &queue, progress) {
                        queue.lock().map(|mut q| q.clear()).ok(); // the others stop after their trial
                        first_error.lock().map(|mut f| f.get_or_insert(e).to_string()).ok();
                    }
                });
            }
        });
        if let Some(e) = first_error.into_inner().map_err(poisoned)? {
            return Err(e);
        }
        write_table(&*state.lock().map_err(poisoned)?, &cfg.out)?;
    }
    let state = state.into_inner().map_err(poisoned)?;
    write_table(&state, &cfg.out)?;
    write_best_config(&state, cfg)?;
    Ok(state)
}

fn stop_asked(cfg: &TuneConfig) -> bool {
    cfg.stop.as_ref().is_some_and(|s| s.load(Ordering::Relaxed))
}

fn poisoned<T>(_: std::sync::PoisonError<T>) -> Error {
    Error::data("tune: a worker panicked")
}

/// What the workers share of a tune: its plan and its state (at `path`).
struct Study<'a> {
    plan: &'a TunePlan,
    state: &'a Mutex<TuneState>,
    path: &'a Path,
}

/// Takes trials off `queue` until it is empty, training and recording each.
fn worker(
    data: &Arc<DatasetReader>,
    cfg: &TuneConfig,
    study: &Study<'_>,
    queue: &Mutex<VecDeque<TrialKey>>,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<()> {
    let Study { plan, state, path } = *study;
    let mut dev = crate::backend::open_at(&cfg.device, cfg.train.precision)?;
    while !stop_asked(cfg)
        && let Some(key) = queue.lock().map_err(poisoned)?.pop_front()
    {
        let trial = &plan.trials[key.trial];
        let steps = plan.steps(key.rung);
        let (model, train_cfg) = plan.run_configs(&cfg.model, &cfg.train, &key);
        let dir = trial_dir(&cfg.runs_dir, &key);
        progress(&format!("{key}: {steps} steps  {}", describe(trial)));
        let start = Instant::now();
        // The tune's own runs directory, a directory per trial: a trial stopped or killed
        // half-way goes on from its last checkpoint; another run's checkpoints are replaced.
        // Afresh in an emptied directory, or on from its last checkpoint (`StudyState::start`).
        state.lock().map_err(poisoned)?.start(path, &key, Some(&dir))?;
        // The run's notes (continuing, or why not), each said once the trial ends.
        let notes = Arc::new(Mutex::new(Vec::new()));
        let opts = RunOptions {
            replace: true,
            stop: cfg.stop.clone(),
            identity: Some(run_identity(dev.name(), data, &model, &train_cfg)?),
            progress: Some(ProgressFn::new({
                let notes = Arc::clone(&notes);
                move |p| {
                    if let Progress::Note(n) = p {
                        notes.lock().map(|mut v| v.push(n.clone())).ok();
                    }
                }
            })),
            ..RunOptions::new(&dir)
        };
        let result = train(dev.as_mut(), data, &model, &train_cfg, &opts);
        for note in notes.lock().map_err(poisoned)?.iter() {
            progress(&format!("{key}: {note}"));
        }
        let record = match result {
            Ok(summary) if summary.stopped => {
                progress(&format!("{key}: stopped at step {} of {steps}", summary.steps));
                return Ok(());
            }
            Ok(summary) => TrialRecord {
                key,
                steps,
                score: Some(summary.best_score),
                best_step: summary.best_step,
                seconds: start.elapsed().as_secs_f64(),
                error: None,
            },
            // A configuration that diverges is a result of the search, not a reason to stop it.
            Err(e @ Error::NonFinite { .. }) => TrialRecord {
                key,
                steps,
                score: None,
                best_step: 0,
                seconds: start.elapsed().as_secs_f64(),
                error: Some(e.to_string()),
            },
            Err(e) => return Err(e),
        };
        let line = match (&record.score, &record.error) {
            (Some(score), _) => {
                format!("{key}: validation {} {:.2} ({:.0}s)", train_cfg.metric_name(), score, record.seconds)
            }
            (None, Some(e)) => format!("{key}: failed: {e}"),
            (None, None) => format!("{key}: no score"),
        };
        state.lock().map_err(poisoned)?.record(path, record)?;
        if key.rung + 1 < plan.rungs {
            // Later rungs train from scratch: only the last rung's checkpoints are worth keeping.
            remove_run_dir(&dir)?;
        }
        progress(&line);
    }
    Ok(())
}

fn describe(t: &Trial) -> String {
    format!(
        "lr {} wd {} dropout {} λ {} warmup {} batch {} dim {} layers {}",
        t.lr, t.weight_decay, t.dropout, t.lambda, t.warmup, t.batch_size, t.dim, t.layers
    )
}

/// The best trial of the highest rung with a complete trial, and its score there.
pub fn best(state: &TuneState) -> Option<(&Trial, RungScore)> {
    let plan = &state.suite;
    let ranked = (0..plan.rungs).rev().map(|rung| plan.ranking(&state.finished, rung)).find(|r| !r.is_empty())?;
    let top = ranked.into_iter().next().filter(|r| r.score.is_some())?;
    Some((&plan.trials[top.trial], top))
}

/// `trials.md`: every trial, its values and its score at each rung, best of the last rung first.
pub fn write_table(state: &TuneState, out: &Path) -> Result<()> {
    let plan = &state.suite;
    let mut text = format!(
        "# semshare tune\n\n{} trials, {} rungs of {} steps (η = {}), seed {}; budget {} steps. Score: best validation {}; — not trained at that rung.\n\n",
        plan.trials.len(),
        plan.rungs,
        (0..plan.rungs).map(|r| plan.steps(r).to_string()).collect::<Vec<_>>().join(" / "),
        plan.reduction,
        plan.seed,
        plan.budget(),
        plan.metric
    );
    text += &format!(
        "Trial 0 is the base configuration (the data-aware defaults). A rung that chooses between trials after the first shows the mean of {} runs (training seeds base + 0…{}).\n\n",
        plan.repeats,
        plan.repeats.saturating_sub(1)
    );
    text += "| trial | lr | weight decay | dropout | λ | warm-up | batch | dim | layers |";
    text += &(0..plan.rungs).map(|r| format!(" rung {r} |")).collect::<String>();
    text += "\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|";
    text += &"---:|".repeat(plan.rungs);
    text += "\n";
    let rankings: Vec<Vec<RungScore>> = (0..plan.rungs).map(|r| plan.ranking(&state.finished, r)).collect();
    let at = |id: usize, rung: usize| rankings[rung].iter().find(|s| s.trial == id);
    // Trials by the highest rung completed, then by score there.
    let mut order: Vec<(usize, f64, usize)> = plan
        .trials
        .iter()
        .map(|t| {
            let top = (0..plan.rungs).rev().find_map(|rung| at(t.id, rung));
            (top.map_or(0, |s| s.rung), top.and_then(|s| s.score).unwrap_or(f64::NEG_INFINITY), t.id)
        })
        .collect();
    order.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.total_cmp(&a.1)).then(a.2.cmp(&b.2)));
    for (_, _, id) in order {
        let t = &plan.trials[id];
        text += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            t.id, t.lr, t.weight_decay, t.dropout, t.lambda, t.warmup, t.batch_size, t.dim, t.layers
        );
        for rung in 0..plan.rungs {
            let cell = match at(id, rung) {
                Some(RungScore { score: Some(s), .. }) => format!(" {s:.2} |"),
                Some(_) => " failed |".to_string(),
                None => " — |".to_string(),
            };
            text += &cell;
        }
        text += "\n";
    }
    crate::io::atomic_write(&out.join(TRIALS_FILE), text.as_bytes())
}

/// `best-config.json`: the best trial's values as a config file for `train --config` (or, for
/// an unfinished tune, nothing: the best is not known yet). The step count, validation interval
/// and patience are left out, so that `train` stops the winner as it stops the defaults (the
/// data-aware epoch budget with early stopping): a rung's fixed steps are a way to rank trials
/// cheaply, and on flickr-tags the last rung's 1,440 steps were under the 2,000–2,875 at which
/// the defaults stop. Its warm-up is the steps it had at the last rung.
pub fn write_best_config(state: &TuneState, cfg: &TuneConfig) -> Result<Option<PathBuf>> {
    if !state.remaining().is_empty() {
        return Ok(None);
    }
    let Some((trial, top)) = best(state) else {
        return Err(Error::data("tune: every trial of the last rung failed: no configuration to recommend"));
    };
    let (model, train) = trial.apply(&cfg.model, &cfg.train, state.suite.steps(top.rung));
    // f32 values as their shortest decimal (0.0255, not 0.025499999523162842): they read back equal.
    let short = |x: f32| x.to_string().parse::<f64>().unwrap_or(f64::from(x));
    let json = serde_json::json!({
        "model": {
            "dim": model.dim, "ffn": model.ffn, "layers": model.layers,
            "dropout": short(model.dropout), "lambda": short(model.lambda)
        },
        "train": {
            "lr": short(train.lr), "weight_decay": short(train.weight_decay), "warmup": train.warmup,
            "batch_size": train.batch_size
        }
    });
    let text = serde_json::to_string_pretty(&json).map_err(|e| Error::data(format!("best config: {e}")))? + "\n";
    let path = cfg.out.join(BEST_CONFIG_FILE);
    crate::io::atomic_write(&path, text.as_bytes())?;
    Ok(Some(path))
}
