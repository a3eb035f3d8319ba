//! Training (Algorithm 1): each iteration samples a mini-batch of (image, text, labels)
//! pairs, runs both modalities forward and backward through the shared model, clips the
//! gradient norm and takes one AdamW step over the flat parameter buffer.
//! Deterministic on the CPU: the same seed gives bitwise the same loss curve.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::checkpoint::{Checkpoint, InferenceSpec};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::data::loader::Loader;
use crate::data::reader::DatasetReader;
use crate::eval::metrics::{EvalConfig, Report};
use crate::inference::evaluate_split;
use crate::io::Staged;
use crate::model::{EmbeddingKind, ModelConfig};
use crate::{Error, Result};

mod config;
mod graphs;
mod progress;
mod trainer;
pub use config::{ContextPass, MAX_BATCH, TrainConfig};
pub use graphs::{MAX_GRAPHS, StepMode};
pub use progress::{Progress, ProgressFn};
pub use trainer::{STATS_ROWS, StepStats, Trainer};

/// Where a training run writes, and how it reports.
pub struct RunOptions {
    pub out_dir: PathBuf,
    /// Continue from this checkpoint (parameters, optimizer state and step) up to
    /// `TrainConfig::steps`, the total step count.
    pub resume: Option<PathBuf>,
    /// Replace the checkpoints of another run in `out_dir` (the CLI's `--force`); without it
    /// they are refused, unless `resume` (or `identity`) continues that run.
    pub replace: bool,
    /// Receives a report after every step and validation (None: nothing is reported).
    pub progress: Option<ProgressFn>,
    /// The configuration as resolved for this run (`defaults::resolve`), written to the run
    /// directory as [`RESOLVED_CONFIG`] once the directory is claimed.
    pub resolved_config: Option<String>,
    /// Checked before every step: once it is true the run stops where it is, writes
    /// `last.safetensors` at the step it reached (resumable as if never stopped) and returns
    /// with [`TrainSummary::stopped`] set. The CLI sets it on SIGINT and SIGTERM.
    pub stop: Option<Arc<AtomicBool>>,
    /// What this run is (a study's run: its data, model, configuration and device), written
    /// into its checkpoints. Without `resume`, a `last.safetensors` in `out_dir` that carries
    /// the same identity is continued rather than replaced: a study stopped or killed during a
    /// run goes on from that run's last checkpoint, to the same result. (A study empties the
    /// directory of a run it starts afresh, so what it continues is its own.)
    pub identity: Option<String>,
}

impl RunOptions {
    /// A new run into `out_dir`: no resume, no replacing, no progress.
    pub fn new(out_dir: impl Into<PathBuf>) -> RunOptions {
        RunOptions {
            out_dir: out_dir.into(),
            resume: None,
            replace: false,
            progress: None,
            resolved_config: None,
            stop: None,
            identity: None,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct TrainSummary {
    /// The step the run ended at (the resumed checkpoint's when there was nothing to train).
    pub steps: u64,
    pub final_loss: f32,
    /// The best validation score (`TrainConfig::metric_name`), its step and embedding.
    pub best_score: f64,
    pub best_step: u64,
    pub best_embedding: Option<EmbeddingKind>,
    pub seconds: f64,
    /// The loss of each step trained; empty when a resumed checkpoint had reached `steps`, or
    /// its run had stopped early with this patience.
    pub losses: Vec<f32>,
    /// The run directory's best checkpoint; None when the run wrote none.
    pub best_checkpoint: Option<PathBuf>,
    /// Stopped by [`RunOptions::stop`] before `steps`: `last.safetensors` holds step `steps`
    /// (unless no step was trained).
    pub stopped: bool,
}

#[derive(Clone, Serialize, Deserialize)]
struct RunState {
    /// The best validation score (named `best_ndcg` by checkpoints before other scores existed).
    #[serde(alias = "best_ndcg")]
    best_score: f64,
    best_step: u64,
    /// Validations since the best one (early stopping).
    #[serde(default)]
    stale: u64,
    /// The embedding the best score was reached with.
    #[serde(default)]
    best_embedding: Option<String>,
    /// [`RunOptions::identity`] of the run that wrote the checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    identity: Option<String>,
}

impl RunState {
    /// Before the first validation.
    fn fresh() -> RunState {
        RunState { best_score: -1.0, best_step: 0, stale: 0, best_embedding: None, identity: None }
    }

    fn embedding(&self) -> Option<EmbeddingKind> {
        self.best_embedding.as_deref().and_then(|e| e.parse().ok())
    }

    /// Whether the run stopped early: `patience` validations in a row without a better score.
    fn stopped_early(&self, cfg: &TrainConfig) -> bool {
        cfg.patience > 0 && self.stale >= cfg.patience
    }
}

/// `out_dir`'s last checkpoint when it was written by the run `identity` names (a run of a
/// study, stopped or killed before it finished): what [`train`] continues without `resume`.
pub fn own_last_checkpoint(out_dir: &Path, identity: &str) -> Option<PathBuf> {
    let last = out_dir.join(LAST_CHECKPOINT);
    written_by(&last, identity).then_some(last)
}

/// Whether the checkpoint at `path` was written by the run `identity` names.
fn written_by(path: &Path, identity: &str) -> bool {
    let state = Checkpoint::read_state(path).and_then(|s| serde_json::from_str::<RunState>(&s).ok());
    state.is_some_and(|s| s.identity.as_deref() == Some(identity))
}

/// The averaged validation score `cfg.val_metric` of a report.
fn validation_score(report: &Report, cfg: &TrainConfig) -> f64 {
    if cfg.val_metric == "map" {
        return report.avg.map_all;
    }
    report.avg.ndcg_at(cfg.eval_k).or_else(|| report.avg.ndcg.last().map(|x| x.1)).unwrap_or(0.0)
}

/// The checkpoint file of the best validation step in a run directory.
pub const BEST_CHECKPOINT: &str = "best.safetensors";
/// The checkpoint of the last validation step, or of the step a stopped run reached: to resume
/// from.
pub const LAST_CHECKPOINT: &str = "last.safetensors";
/// Locked by the process training into a run directory (`flock`: released when it exits).
pub const LOCK_FILE: &str = ".lock";
/// The run's resolved configuration, loadable by `train --config`.
pub const RESOLVED_CONFIG: &str = "resolved-config.json";

/// A new run directory `<root>/<name>-<k>` (the first k ≥ 1 not taken), created here so that
/// two runs started at once get different ones.
pub fn fresh_run_dir(root: &Path, name: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
    let name: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() || "-_".contains(c) { c } else { '_' }).collect();
    for k in 1u32.. {
        let dir = root.join(format!("{name}-{k}"));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::io(&dir, e)),
        }
    }
    Err(Error::config(format!("{}: no free run directory name", root.display())))
}

/// Whether `path` is a resolved configuration a run wrote ([`RESOLVED_CONFIG`]).
fn is_resolved_config(path: &Path) -> bool {
    crate::io::read_text(path, crate::io::SMALL_FILE_LIMIT)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| ["model", "train", "reasons"].iter().all(|k| v.get(k).is_some_and(|x| x.is_object())))
}

/// What claiming a run directory found: the checkpoints of another run, which `replace`
/// removes once this run writes its first checkpoint (so that a run failing before it leaves
/// them as they were), and whether the directory was missing or empty (a run that fails
/// before its first checkpoint then leaves nothing behind).
#[derive(Debug, Default)]
pub struct Claimed {
    pub stale: Vec<PathBuf>,
    pub fresh: bool,
}

/// Checks that `out` may be a run directory, before anything is written there. A run writes
/// `best.safetensors`, `last.safetensors`, [`RESOLVED_CONFIG`] and [`LOCK_FILE`] and nothing
/// else, so only those names are checked: each that exists must be what a run wrote (a
/// checkpoint's header, a parsed configuration, an empty lock), else `out` is refused even
/// with `replace`. Other entries (a log, an index built from the checkpoints) are never
/// touched. A dataset is not a run directory. Another run's checkpoints are refused unless
/// `resume` is one of them (continuing that run) or `replace` is set, when they are stale.
pub fn check_run_dir(out: &Path, resume: Option<&Path>, replace: bool) -> Result<Claimed> {
    let fresh = match std::fs::read_dir(out) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => return Err(Error::io(out, e)),
        Ok(mut d) => d.next().is_none(),
    };
    if crate::data::format::is_dataset(out) {
        return Err(Error::refused(out, "is a dataset; a run directory may not be one (choose another output)"));
    }
    let mut existing = Vec::new();
    for (name, what) in [
        (BEST_CHECKPOINT, "a checkpoint semshare wrote"),
        (LAST_CHECKPOINT, "a checkpoint semshare wrote"),
        (RESOLVED_CONFIG, "a configuration semshare wrote"),
        (LOCK_FILE, "a run's lock"),
    ] {
        let path = out.join(name);
        let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
        let ours = match name {
            RESOLVED_CONFIG => is_resolved_config(&path),
            LOCK_FILE => meta.is_file() && meta.len() == 0,
            _ => meta.is_file() && Checkpoint::is_checkpoint(&path),
        };
        if !ours {
            return Err(Error::refused(
                out,
                format!("holds `{name}`, which is not {what}; refusing to write a run there (choose another output)"),
            ));
        }
        if name.ends_with(".safetensors") {
            existing.push(name);
        }
    }
    let continuing = resume.is_some_and(|r| existing.iter().any(|f| crate::io::same_path(r, &out.join(f))));
    if existing.is_empty() || continuing {
        return Ok(Claimed { stale: Vec::new(), fresh });
    }
    if !replace {
        return Err(Error::refused(
            out,
            format!(
                "holds the checkpoints of another run ({}); pass --resume {} to continue it, --force to replace it, or choose another --out",
                existing.join(", "),
                out.join(LAST_CHECKPOINT).display()
            ),
        ));
    }
    Ok(Claimed { stale: existing.iter().map(|f| out.join(f)).collect(), fresh })
}

/// Deletes what a run wrote in `dir` (checkpoints, configuration, lock), then `dir` if that
/// leaves it empty; anything else is left. Refused where [`check_run_dir`] refuses, and while
/// a `train` holds the directory's lock.
pub fn remove_run_dir(dir: &Path) -> Result<()> {
    check_run_dir(dir, None, true)?;
    // Held until the files are gone (the lock file last).
    let _held = match std::fs::File::open(dir.join(LOCK_FILE)) {
        Ok(lock) => Some(lock_run_dir(dir, lock, "")?),
        Err(_) => None,
    };
    remove_run_files(dir, &[BEST_CHECKPOINT, LAST_CHECKPOINT, RESOLVED_CONFIG, LOCK_FILE])
}

fn remove_run_files(dir: &Path, files: &[&str]) -> Result<()> {
    for f in files {
        match std::fs::remove_file(dir.join(f)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::io(dir.join(f), e)),
            _ => {}
        }
    }
    let _ = std::fs::remove_dir(dir); // kept when anything else is there
    Ok(())
}

/// Makes `out` this run's directory: [`check_run_dir`], then creates it and takes its lock (a
/// second `train` into it fails here; the lock goes with the process, so a killed run leaves
/// none behind), then checks again under the lock. The returned file holds the lock.
fn claim_run_dir(out: &Path, resume: Option<&Path>, replace: bool) -> Result<(std::fs::File, Claimed)> {
    let before = check_run_dir(out, resume, replace)?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let lock_path = out.join(LOCK_FILE);
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| Error::io(&lock_path, e))?;
    let lock = lock_run_dir(out, lock, "; choose another --out")?;
    let claimed = check_run_dir(out, resume, replace)?;
    Ok((lock, Claimed { fresh: before.fresh, ..claimed }))
}

/// `lock`, the opened [`LOCK_FILE`] of run directory `dir`, locked; refused (with `hint`
/// appended) while another process holds it.
fn lock_run_dir(dir: &Path, lock: std::fs::File, hint: &str) -> Result<std::fs::File> {
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::refused(
            dir,
            format!("another `semshare train` is writing this run directory (it holds {LOCK_FILE}){hint}"),
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::io(dir.join(LOCK_FILE), e)),
    }
}

/// A split that must hold items: refused before any work, naming the split and what needs it.
pub fn require_items(data: &DatasetReader, name: &str, needed_for: &str) -> Result<()> {
    let split = data.split(name)?;
    if split.num_images() == 0 || split.num_texts() == 0 {
        return Err(Error::data(format!(
            "dataset {}: split `{name}` is empty, and {needed_for} needs it",
            data.dir.display()
        )));
    }
    Ok(())
}

/// Train on `data.train`, validate on `data.val`, keep `best.safetensors` and `last.safetensors`
/// in `opts.out_dir`. A diverging loss stops the run with an error; checkpoints already
/// written stay as they were.
pub fn train(
    dev: &mut dyn Backend,
    data: &Arc<DatasetReader>,
    model: &ModelConfig,
    cfg: &TrainConfig,
    opts: &RunOptions,
) -> Result<TrainSummary> {
    data.layout.check_fits(model)?;
    cfg.validate()?;
    require_items(data, "train", "training")?;
    require_items(data, "val", "selecting the best checkpoint")?;
    let note = |line: String| {
        if let Some(f) = &opts.progress {
            f.report(Progress::Note(line));
        }
    };
    let own = opts.identity.as_ref();
    let loaded = match (&opts.resume, own) {
        (Some(path), _) => Some((path.clone(), Checkpoint::load(path)?)),
        // A study's run goes on from its own last checkpoint; one that no longer loads (a
        // damaged disk) is this run's to replace: the run starts again, as it would have.
        (None, Some(identity)) => match own_last_checkpoint(&opts.out_dir, identity) {
            Some(last) => match Checkpoint::load(&last) {
                Ok(ckpt) => {
                    note(format!(
                        "continuing this run from {} at step {} (left by an earlier start of its study)",
                        last.display(),
                        ckpt.step
                    ));
                    Some((last, ckpt))
                }
                Err(e) => {
                    note(format!("{e}: not continued; this run starts again"));
                    None
                }
            },
            None => None,
        },
        (None, None) => None,
    };
    let resume = loaded.as_ref().map(|(path, _)| path.clone());
    // Continued elsewhere, the best checkpoint is chosen anew among the steps trained here: the
    // resumed run's best lies in its own directory.
    let here = resume.as_deref().and_then(Path::parent).is_some_and(|d| crate::io::same_path(d, &opts.out_dir));
    let resumed = match loaded {
        Some((path, ckpt)) => {
            ckpt.spec.check_data(&data.layout).map_err(|e| e.about(&path))?;
            if &ckpt.model != model {
                return Err(Error::config(format!(
                    "{}: the checkpoint's model configuration differs from the requested one",
                    path.display()
                )));
            }
            let state: RunState = serde_json::from_str(&ckpt.state).map_err(|e| {
                Error::format(&path, format!("metadata `state` is not a trainer state ({e}); cannot resume from it"))
            })?;
            if ckpt.step >= cfg.steps || (here && state.stopped_early(cfg)) {
                // Nothing to train: `steps` is the total, or this run stopped early with this
                // patience; either way it has done what was asked.
                let best = opts.out_dir.join(BEST_CHECKPOINT);
                let ours = here && best.is_file() && opts.identity.as_ref().is_none_or(|id| written_by(&best, id));
                return Ok(TrainSummary {
                    steps: ckpt.step,
                    final_loss: f32::NAN,
                    best_score: state.best_score,
                    best_step: state.best_step,
                    best_embedding: state.embedding(),
                    seconds: 0.0,
                    losses: Vec::new(),
                    best_checkpoint: ours.then_some(best),
                    stopped: false,
                });
            }
            Some((ckpt, if here { state } else { RunState::fresh() }))
        }
        None => None,
    };
    let (_lock, mut claimed) = claim_run_dir(&opts.out_dir, resume.as_deref(), opts.replace)?;
    if let (None, Some(identity), Some(_)) = (&opts.resume, own, &resume) {
        // Continuing its own last checkpoint, a run may find another run's best beside it (a
        // kill between putting its first checkpoint in place and removing the one it
        // replaced): that one is stale too.
        let best = opts.out_dir.join(BEST_CHECKPOINT);
        if best.is_file() && !written_by(&best, identity) {
            claimed.stale.push(best);
        }
    }
    let result = train_in_claimed_dir(dev, data, model, cfg, opts, resumed, claimed.stale);
    let dir = &opts.out_dir;
    let nothing_written = result.as_ref().map_or(true, |s| s.stopped);
    if nothing_written && claimed.fresh && ![BEST_CHECKPOINT, LAST_CHECKPOINT].iter().any(|f| dir.join(f).exists()) {
        // A run that found its directory missing or empty and failed before a checkpoint
        // leaves nothing behind. It still holds the lock: nobody else wrote there.
        let _ = remove_run_files(dir, &[RESOLVED_CONFIG, LOCK_FILE]);
    }
    result
}

/// [`train`] once the run directory is claimed: `resumed` is the checkpoint resumed from and
/// the run state to go on with, `stale` holds the checkpoints of the run it replaces, if any.
fn train_in_claimed_dir(
    dev: &mut dyn Backend,
    data: &Arc<DatasetReader>,
    model: &ModelConfig,
    cfg: &TrainConfig,
    opts: &RunOptions,
    resumed: Option<(Checkpoint, RunState)>,
    stale: Vec<PathBuf>,
) -> Result<TrainSummary> {
    // The checkpoints of a validation, written (staged) before any is put in place. Replacing
    // another run, this run's resolved configuration goes with its first ones; they are renamed
    // over the old run's files together, and what they did not replace is removed: a run that
    // fails before then, or while writing them, changes nothing.
    let mut stale = Some(stale);
    let put_in_place = |stale: &mut Option<Vec<PathBuf>>, mut staged: Vec<(PathBuf, Staged)>| -> Result<()> {
        if stale.is_some()
            && let Some(text) = &opts.resolved_config
        {
            let path = opts.out_dir.join(RESOLVED_CONFIG);
            staged.push((path.clone(), crate::io::stage(&path, text.as_bytes())?));
        }
        let written: Vec<PathBuf> = staged.iter().map(|(path, _)| path.clone()).collect();
        for (_, file) in staged {
            file.commit()?;
        }
        for f in stale.take().unwrap_or_default().iter().filter(|f| !written.contains(f)) {
            std::fs::remove_file(f).map_err(|e| Error::io(f, e))?;
        }
        Ok(())
    };
    if stale.as_ref().is_some_and(Vec::is_empty) {
        put_in_place(&mut stale, Vec::new())?;
    }
    let train_split = data.split("train")?;
    let (mut trainer, mut state, norm) = match resumed {
        Some((ckpt, state)) => {
            // A resumed run keeps the inputs it was trained on.
            let norm = ckpt.spec.normalization.clone();
            (Trainer::from_checkpoint(dev, &ckpt, cfg.clone())?, state, norm)
        }
        None => {
            let norm = match cfg.normalize.as_str() {
                "standardize" => Some(crate::data::stats::input_norm(&data.layout, train_split)?),
                _ => None,
            };
            (Trainer::new(dev, model, cfg.clone())?, RunState::fresh(), norm)
        }
    };
    trainer.net.set_input_norm(norm.clone())?;
    let kinds = cfg.validation_embeddings()?;
    // Every checkpoint of the run carries what inference needs from this dataset.
    let spec = InferenceSpec {
        normalization: norm,
        ..InferenceSpec::of(&data.layout, train_split.feature_dtype(), train_split.text_dtype(), kinds[0])
    };
    let checkpoint = |trainer: &Trainer, dev: &mut dyn Backend, state: &RunState| -> Result<Checkpoint> {
        let embedding = Some(state.embedding().unwrap_or(kinds[0]));
        let spec = InferenceSpec { embedding, ..spec.clone() };
        let state = RunState { identity: opts.identity.clone(), ..state.clone() };
        let state = serde_json::to_string(&state).expect("state serialises");
        Ok(Checkpoint { spec, ..trainer.checkpoint(dev, state)? })
    };
    let metric = cfg.metric_name();
    let report = |p: Progress| {
        if let Some(f) = &opts.progress {
            f.report(p);
        }
    };
    let eval_cfg = EvalConfig { ndcg_ks: vec![cfg.eval_k], precision_ks: vec![], recall_ks: vec![], pr_points: 1 };
    let best_path = opts.out_dir.join(BEST_CHECKPOINT);
    let last_path = opts.out_dir.join(LAST_CHECKPOINT);
    let start = Instant::now();
    let first = trainer.step;
    let mut losses = Vec::new();
    let mut last_loss = f32::NAN;
    const POOL: usize = 3;
    let mut loader = Loader::new(Arc::clone(data), "train", cfg.batch_size, cfg.seed, first..cfg.steps, POOL)?;
    // A device's steps are deferred (no host sync inside a step) and their losses read back
    // at log points, every READ_EVERY steps and before each validation; the host's are read
    // after every step, which costs nothing there.
    const READ_EVERY: u64 = 16;
    let read_every = if dev.on_host() { 1 } else { READ_EVERY };
    // A capture that fails turns the trainer's graphs off (the step runs eagerly): said once.
    let mut graphs_noted = false;
    // The step `last.safetensors` holds: a stopped run writes it if it has trained since.
    let mut saved_step = first;
    let stop_asked = || opts.stop.as_ref().is_some_and(|s| s.load(Ordering::Relaxed));
    let mut stopped = false;
    while trainer.step < cfg.steps {
        if stop_asked() {
            stopped = true;
            break;
        }
        let (images, texts) = match loader.next_batch() {
            Some(Ok(b)) => (b.images.batch(), b.texts.batch()),
            Some(Err(e)) => return Err(e),
            None => return Err(Error::data("the loader stopped before the last step")),
        };
        trainer.step_deferred(dev, images, texts)?;
        let done = trainer.step;
        let validate = done == cfg.steps || (cfg.eval_every > 0 && done % cfg.eval_every == 0);
        if !validate && done % read_every != 0 {
            continue;
        }
        let read = trainer.read_stats(dev)?;
        if let (false, Some(why)) = (graphs_noted, trainer.graphs_refused()) {
            report(Progress::Note(format!("CUDA graphs are off for this run, steps run eagerly: {why}")));
            graphs_noted = true;
        }
        losses.extend(read.iter().map(|s| s.loss));
        let Some(stats) = read.last().copied() else { continue };
        last_loss = stats.loss;
        let steps_per_sec = (done - first) as f64 / start.elapsed().as_secs_f64().max(1e-9);
        report(Progress::Step { step: done, total: cfg.steps, loss: stats.loss, steps_per_sec });
        if validate {
            let mut scores = Vec::with_capacity(kinds.len());
            for &kind in &kinds {
                let r = evaluate_split(dev, &trainer.net, &trainer.params, data, "val", kind, &eval_cfg)?;
                scores.push((kind, validation_score(&r, cfg)));
            }
            // The better embedding; on equal scores the first (pooled).
            let (kind, score) =
                scores.iter().copied().reduce(|a, b| if b.1 > a.1 { b } else { a }).expect("one embedding at least");
            let improved = score > state.best_score;
            if improved {
                let best_embedding = Some(kind.name().to_string());
                state = RunState { best_score: score, best_step: done, stale: 0, best_embedding, identity: None };
            } else {
                state.stale += 1;
            }
            let ckpt = checkpoint(&trainer, dev, &state)?;
            let mut staged = Vec::with_capacity(2);
            if improved {
                staged.push((best_path.clone(), ckpt.stage(&best_path)?));
            }
            staged.push((last_path.clone(), ckpt.stage(&last_path)?));
            put_in_place(&mut stale, staged)?;
            saved_step = done;
            report(Progress::Validation {
                step: done,
                total: cfg.steps,
                loss: stats.loss,
                metric: metric.clone(),
                scores,
                best: state.best_score,
                best_step: state.best_step,
                best_embedding: state.embedding(),
            });
            if cfg.patience > 0 && state.stale >= cfg.patience {
                report(Progress::EarlyStop { stale: state.stale, metric: metric.clone() });
                break;
            }
        }
    }
    if stopped && trainer.step > saved_step {
        // The steps not read back yet are read (and checked for a non-finite loss) first.
        let read = trainer.read_stats(dev)?;
        losses.extend(read.iter().map(|s| s.loss));
        last_loss = read.last().map_or(last_loss, |s| s.loss);
        let ckpt = checkpoint(&trainer, dev, &state)?;
        put_in_place(&mut stale, vec![(last_path.clone(), ckpt.stage(&last_path)?)])?;
    }
    Ok(TrainSummary {
        steps: trainer.step,
        final_loss: last_loss,
        best_score: state.best_score,
        best_step: state.best_step,
        best_embedding: state.embedding(),
        seconds: start.elapsed().as_secs_f64(),
        losses,
        best_checkpoint: best_path.is_file().then_some(best_path),
        stopped,
    })
}
