//! Training (Algorithm 1): each iteration samples a mini-batch of (image, text, labels)
//! pairs, runs both modalities forward and backward through the shared model, clips the
//! gradient norm and takes one AdamW step over the flat parameter buffer.
//! Deterministic on the CPU: the same seed gives bitwise the same loss curve.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::backend::{AdamW, Backend};
use crate::checkpoint::{Checkpoint, InferenceSpec};
use std::sync::Arc;

use crate::data::format::Layout;
use crate::data::loader::Loader;
use crate::data::reader::DatasetReader;
use crate::eval::metrics::{EvalConfig, Report};
use crate::inference::evaluate_split;
use crate::model::consistency::{
    BatchShape, DscmrWeights, PairBatch, dscmr_loss, imc_consistency, triplet_consistency,
};
use crate::model::{
    Batch, Consistency, EmbeddingKind, ImageBatch, LossWeights, MaskPlan, ModelConfig, SemShare, TextBatch, Variant,
};
use crate::nn::Dropout;
use crate::rng::Rng;
use crate::tensor::Tensor;
use crate::{Error, Result};

mod progress;
pub use progress::{Progress, ProgressFn};

/// Most image–text pairs per step.
pub const MAX_BATCH: usize = 1 << 16;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Image–text pairs per step.
    pub batch_size: usize,
    pub steps: u64,
    /// Peak learning rate, reached after `warmup` steps, then cosine decay to `lr · min_lr_ratio`.
    pub lr: f32,
    pub warmup: u64,
    pub min_lr_ratio: f32,
    pub weight_decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Global gradient-norm clip (0: off).
    pub clip_norm: f32,
    pub seed: u64,
    /// Validate (and keep the best checkpoint) every this many steps (0: only at the end).
    pub eval_every: u64,
    /// Which embedding validation ranks with: "pooled", "label", or "best" (both are scored and
    /// the better one selects the checkpoint, which records it).
    pub embedding: String,
    /// The validation score that selects the checkpoint: "ndcg" (NDCG@`eval_k`, the paper's)
    /// or "map" (mAP@all).
    pub val_metric: String,
    /// Validation NDCG cut-off.
    pub eval_k: usize,
    /// Stop after this many validations without a better validation score (0: never).
    pub patience: u64,
    /// Input normalisation: "none", or "standardize" (each feature to zero mean and unit
    /// variance with the training split's statistics, stored in the checkpoint).
    pub normalize: String,
    /// The method or Table 1 variant trained (`ours` is the paper's); its model structure must
    /// be in the model configuration (`Variant::configure`).
    pub variant: Variant,
    /// η: weight of the consistency term of `ours+con` and `imc`.
    pub eta: f32,
    /// Margin of `ours+con`'s triplet consistency loss.
    pub triplet_margin: f32,
    /// α and β of the DSCMR-style objective `J1 + α·J2 + β·J3`.
    pub dscmr_alpha: f32,
    pub dscmr_beta: f32,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            batch_size: 32,
            steps: 1000,
            lr: 5e-4,
            warmup: 100,
            min_lr_ratio: 0.05,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            clip_norm: 1.0,
            seed: 0,
            eval_every: 250,
            embedding: "pooled".into(),
            val_metric: "ndcg".into(),
            eval_k: 500,
            patience: 0,
            normalize: "none".into(),
            variant: Variant::Ours,
            eta: 1.0,
            triplet_margin: 0.2,
            dscmr_alpha: 1e-3,
            dscmr_beta: 0.1,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        if self.batch_size == 0 || self.steps == 0 {
            return Err(Error::config("train.batch_size and train.steps must be positive"));
        }
        if self.batch_size > MAX_BATCH {
            return Err(Error::config(format!("train.batch_size = {} is larger than {MAX_BATCH}", self.batch_size)));
        }
        if self.eval_k == 0 {
            return Err(Error::config("train.eval_k must be positive"));
        }
        for (name, v) in [("lr", self.lr), ("eps", self.eps)] {
            if !(v > 0.0 && v.is_finite()) {
                return Err(Error::config(format!("train.{name} = {v} must be finite and > 0")));
            }
        }
        // A ratio below 0 would make the learning rate negative at the end of the schedule.
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return Err(Error::config(format!("train.min_lr_ratio = {} is not in [0, 1]", self.min_lr_ratio)));
        }
        for (name, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err(Error::config(format!("train.{name} = {v} is not in [0, 1)")));
            }
        }
        self.validation_embeddings()?;
        if !["ndcg", "map"].contains(&self.val_metric.as_str()) {
            return Err(Error::config(format!("train.val_metric = `{}` (expected ndcg or map)", self.val_metric)));
        }
        if !["none", "standardize"].contains(&self.normalize.as_str()) {
            return Err(Error::config(format!(
                "train.normalize = `{}` (expected none or standardize)",
                self.normalize
            )));
        }
        if !self.variant.spec().trained {
            return Err(Error::config(format!("variant `{}` is fitted in closed form, not trained", self.variant)));
        }
        for (name, v) in [
            ("weight_decay", self.weight_decay),
            ("clip_norm", self.clip_norm),
            ("eta", self.eta),
            ("triplet_margin", self.triplet_margin),
            ("dscmr_alpha", self.dscmr_alpha),
            ("dscmr_beta", self.dscmr_beta),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(Error::config(format!("train.{name} = {v} must be finite and ≥ 0")));
            }
        }
        Ok(())
    }

    /// The embeddings validation scores: the one `embedding` names, or both for "best" (pooled
    /// first: on equal scores it is kept).
    pub fn validation_embeddings(&self) -> Result<Vec<EmbeddingKind>> {
        match self.embedding.as_str() {
            "best" => Ok(vec![EmbeddingKind::Pooled, EmbeddingKind::Label]),
            name => name
                .parse::<EmbeddingKind>()
                .map(|k| vec![k])
                .map_err(|_| Error::config(format!("train.embedding = `{name}` (expected pooled, label or best)"))),
        }
    }

    /// The name of the validation score, e.g. `NDCG@500` or `mAP@all`.
    pub fn metric_name(&self) -> String {
        if self.val_metric == "map" { "mAP@all".into() } else { format!("NDCG@{}", self.eval_k) }
    }

    /// Linear warm-up, then cosine decay.
    pub fn lr_at(&self, step: u64) -> f32 {
        if step < self.warmup {
            return self.lr * (step + 1) as f32 / self.warmup as f32;
        }
        let span = (self.steps.saturating_sub(self.warmup)).max(1) as f32;
        let t = ((step - self.warmup) as f32 / span).min(1.0);
        let floor = self.lr * self.min_lr_ratio;
        floor + (self.lr - floor) * 0.5 * (1.0 + (std::f32::consts::PI * t).cos())
    }
}

/// What one step did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct StepStats {
    pub step: u64,
    /// L = L1 + λ·L2 over both modalities, plus the variant's cross-modal term.
    pub loss: f32,
    pub image_label: f32,
    pub text_label: f32,
    pub image_context: f32,
    pub text_context: f32,
    /// The weighted cross-modal term of `ours+con`, `imc` (η·loss) or DSCMR (J); 0 otherwise.
    pub consistency: f32,
    pub grad_norm: f32,
    pub lr: f32,
}

/// The model, its flat parameter buffer, the gradient buffer and AdamW's moments, on a device.
pub struct Trainer {
    pub net: SemShare,
    pub params: Tensor,
    pub grads: Tensor,
    m: Tensor,
    v: Tensor,
    pub step: u64,
    pub cfg: TrainConfig,
    decay_runs: Vec<(usize, usize, bool)>,
}

impl Trainer {
    pub fn new(dev: &mut dyn Backend, model: &ModelConfig, cfg: TrainConfig) -> Result<Self> {
        let net = SemShare::new(model)?;
        crate::model::memory::check_memory(dev, &net, cfg.batch_size, true)?;
        let init = net.store.init_values(cfg.seed);
        Self::assemble(dev, net, &init, None, 0, cfg)
    }

    pub fn from_checkpoint(dev: &mut dyn Backend, ckpt: &Checkpoint, cfg: TrainConfig) -> Result<Self> {
        let net = SemShare::new(&ckpt.model)?;
        crate::model::memory::check_memory(dev, &net, cfg.batch_size, true)?;
        Self::assemble(dev, net, &ckpt.params, ckpt.optimizer.as_ref(), ckpt.step, cfg)
    }

    fn assemble(
        dev: &mut dyn Backend,
        net: SemShare,
        values: &[f32],
        moments: Option<&(Vec<f32>, Vec<f32>)>,
        step: u64,
        cfg: TrainConfig,
    ) -> Result<Self> {
        cfg.validate()?;
        cfg.variant.check_model(&net.cfg)?;
        let n = net.store.total;
        let params = dev.upload(values, &[n])?;
        let grads = dev.zeros(&[n])?;
        let (m, v) = match moments {
            Some((m, v)) => (dev.upload(m, &[n])?, dev.upload(v, &[n])?),
            None => (dev.zeros(&[n])?, dev.zeros(&[n])?),
        };
        let decay_runs = net.store.decay_runs();
        Ok(Trainer { net, params, grads, m, v, step, cfg, decay_runs })
    }

    /// One iteration of Algorithm 1 on a batch of pairs (text i describes image i). On a
    /// non-finite loss or gradient the parameters are left untouched and an error says which
    /// term diverged.
    pub fn step(&mut self, dev: &mut dyn Backend, images: ImageBatch, texts: TextBatch) -> Result<StepStats> {
        let cfg = &self.net.cfg;
        let weights = self.loss_weights();
        let mut rng = Rng::derive(self.cfg.seed ^ 0x5EED, self.step);
        // Segments are masked only for a context loss to predict them.
        let (image_plan, text_plan) = if weights.context != 0.0 && !cfg.global_segments {
            let image_plan =
                images.classes.as_ref().map(|c| MaskPlan::draw(&mut rng, c, cfg.mask_prob)).unwrap_or_default();
            (image_plan, MaskPlan::draw(&mut rng, &texts.tokens, cfg.mask_prob))
        } else {
            Default::default()
        };
        let drop = Dropout { p: cfg.dropout, seed: rng.next_u64() };
        let pair_labels: Vec<u8> = images.labels.iter().map(|&y| (y > 0.5) as u8).collect();

        let (images, texts) = (Batch::Image(images), Batch::Text(texts));
        let fi = self.net.forward_loss(dev, &self.params, &images, &image_plan, drop.site(1), weights)?;
        let ft = self.net.forward_loss(dev, &self.params, &texts, &text_plan, drop.site(2), weights)?;
        let (image, text) = (fi.loss, ft.loss);
        dev.fill(self.grads.view_mut(), 0.0)?;
        let (consistency, extra) = self.cross_modal(dev, &fi.z, &ft.z, &pair_labels)?;
        let (dz_images, dz_texts) = match &extra {
            Some((du, dv)) => (Some(du), Some(dv)),
            None => (None, None),
        };
        self.net.backward_loss(dev, &self.params, &mut self.grads, fi, dz_images)?;
        self.net.backward_loss(dev, &self.params, &mut self.grads, ft, dz_texts)?;

        let loss =
            weights.label * (image.label + text.label) + weights.context * (image.context + text.context) + consistency;
        let stats = StepStats {
            step: self.step,
            loss,
            image_label: image.label,
            text_label: text.label,
            image_context: image.context,
            text_context: text.context,
            consistency,
            grad_norm: 0.0,
            lr: self.cfg.lr_at(self.step),
        };
        for (name, v) in [
            ("image label loss", image.label),
            ("text label loss", text.label),
            ("image context loss", image.context),
            ("text context loss", text.context),
            ("consistency loss", consistency),
        ] {
            if !v.is_finite() {
                return Err(Error::NonFinite { what: format!("{name} is {v} at step {}", self.step) });
            }
        }
        let norm = dev.sum_squares(self.grads.view())?.sqrt() as f32;
        if !norm.is_finite() {
            return Err(Error::NonFinite { what: format!("gradient norm is {norm} at step {}", self.step) });
        }
        let grad_scale =
            if self.cfg.clip_norm > 0.0 && norm > self.cfg.clip_norm { self.cfg.clip_norm / norm } else { 1.0 };
        self.optimizer_update(dev, stats.lr, grad_scale)?;
        self.step += 1;
        Ok(StepStats { grad_norm: norm, ..stats })
    }

    /// The AdamW update of `step` from the gradient buffer: one launch per run of parameters
    /// sharing a weight-decay setting, bias correction for step `self.step + 1` (the caller
    /// advances the step). Public so the GPU benchmark times exactly what a step runs.
    pub fn optimizer_update(&mut self, dev: &mut dyn Backend, lr: f32, grad_scale: f32) -> Result<()> {
        let hp = AdamW {
            lr,
            beta1: self.cfg.beta1,
            beta2: self.cfg.beta2,
            eps: self.cfg.eps,
            weight_decay: 0.0,
            step: self.step + 1,
            grad_scale,
        };
        for &(off, len, decay) in &self.decay_runs {
            let hp = AdamW { weight_decay: if decay { self.cfg.weight_decay } else { 0.0 }, ..hp };
            dev.adamw(
                self.params.sub_mut(off, len),
                self.grads.sub(off, len),
                self.m.sub_mut(off, len),
                self.v.sub_mut(off, len),
                hp,
            )?;
        }
        Ok(())
    }

    /// How many AdamW launches `optimizer_update` makes (one per decay run).
    pub fn optimizer_launches(&self) -> usize {
        self.decay_runs.len()
    }

    /// The weights of L1 and L2 (Eq. 6) for the variant: `wo-l` keeps L2 at weight 1 (AdamW
    /// is invariant to a constant loss scale, so λ alone would change nothing but clipping).
    pub fn loss_weights(&self) -> LossWeights {
        let spec = self.cfg.variant.spec();
        let context = match (spec.context_loss, spec.label_loss) {
            (false, _) => 0.0,
            (true, false) => 1.0,
            (true, true) => self.net.cfg.lambda,
        };
        LossWeights { label: if spec.label_loss { 1.0 } else { 0.0 }, context }
    }

    /// The variant's loss over both modalities' pooled embeddings U and V: its weighted value
    /// and `(∂/∂U, ∂/∂V)` on the device. DSCMR's label projection P = gᵀ also receives its
    /// gradient here, in the classifier weight's gradient.
    fn cross_modal(
        &mut self,
        dev: &mut dyn Backend,
        u: &Tensor,
        v: &Tensor,
        labels: &[u8],
    ) -> Result<(f32, Option<(Tensor, Tensor)>)> {
        let kind = self.cfg.variant.spec().consistency;
        if kind == Consistency::None {
            return Ok((0.0, None));
        }
        let (items, dim, c) = (u.rows(), u.cols(), self.net.cfg.labels);
        let (uh, vh) = (dev.download(u.view())?, dev.download(v.view())?);
        let batch = PairBatch { images: &uh, texts: &vh, labels, shape: BatchShape { items, dim, labels: c } };
        let eta = self.cfg.eta as f64;
        let (loss, d_images, d_texts) = match kind {
            Consistency::Triplet | Consistency::Imc => {
                let l = if kind == Consistency::Triplet {
                    triplet_consistency(&batch, self.cfg.triplet_margin as f64)?
                } else {
                    imc_consistency(&batch)?
                };
                let scale = |d: Vec<f32>| d.into_iter().map(|x| (eta * x as f64) as f32).collect::<Vec<f32>>();
                (eta * l.loss, scale(l.d_images), scale(l.d_texts))
            }
            Consistency::Dscmr => {
                let weight = self.net.classifier.weight;
                let w = dev.download(weight.of(&self.params))?;
                // P = Wᵀ: the classifier weight is stored [C, d].
                let p: Vec<f32> = (0..dim * c).map(|i| w[(i % c) * dim + i / c]).collect();
                let weights = DscmrWeights { alpha: self.cfg.dscmr_alpha as f64, beta: self.cfg.dscmr_beta as f64 };
                let l = dscmr_loss(&batch, &p, weights)?;
                let dw: Vec<f32> = (0..c * dim).map(|i| l.d_projection[(i % dim) * c + i / dim]).collect();
                let dw = dev.upload(&dw, &[c, dim])?;
                let rows = dev.upload_ids(&(0..c as u32).collect::<Vec<_>>())?;
                dev.scatter_add_rows(&dw, &rows, weight.of_mut(&mut self.grads))?;
                (l.pair.loss, l.pair.d_images, l.pair.d_texts)
            }
            Consistency::None => unreachable!("returned above"),
        };
        let du = dev.upload(&d_images, &[items, dim])?;
        let dv = dev.upload(&d_texts, &[items, dim])?;
        Ok((loss as f32, Some((du, dv))))
    }

    pub fn checkpoint(&self, dev: &mut dyn Backend, state: String) -> Result<Checkpoint> {
        Ok(Checkpoint {
            model: self.net.cfg.clone(),
            params: dev.download(self.params.view())?,
            optimizer: Some((dev.download(self.m.view())?, dev.download(self.v.view())?)),
            step: self.step,
            state,
            spec: InferenceSpec::default(),
        })
    }
}

/// Where a training run writes, and how it reports.
pub struct RunOptions {
    pub out_dir: PathBuf,
    /// Continue from this checkpoint (parameters, optimizer state and step) up to
    /// `TrainConfig::steps`, the total step count.
    pub resume: Option<PathBuf>,
    /// Replace the checkpoints of another run in `out_dir` (the CLI's `--force`); without it
    /// they are refused, unless `resume` continues that run.
    pub replace: bool,
    /// Receives a report after every step and validation (None: nothing is reported).
    pub progress: Option<ProgressFn>,
    /// The configuration as resolved for this run (`defaults::resolve`), written to the run
    /// directory as [`RESOLVED_CONFIG`] once the directory is claimed.
    pub resolved_config: Option<String>,
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
    /// The loss of each step trained; empty when a resumed checkpoint had reached `steps`.
    pub losses: Vec<f32>,
    /// The run directory's best checkpoint; None when the run wrote none.
    pub best_checkpoint: Option<PathBuf>,
}

#[derive(Serialize, Deserialize)]
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
}

impl RunState {
    fn embedding(&self) -> Option<EmbeddingKind> {
        self.best_embedding.as_deref().and_then(|e| e.parse().ok())
    }
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
/// The checkpoint of the last validation step, to resume from.
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

/// Makes `out` this run's directory: creates it and takes its lock (a second `train` into it
/// fails here; the lock goes with the process, so a killed run leaves none behind). The
/// checkpoints of another run there are refused unless `resume` continues that run (it lies in
/// `out`) or `replace` says to remove them. The returned file holds the lock.
fn claim_run_dir(out: &Path, resume: Option<&Path>, replace: bool) -> Result<std::fs::File> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let lock_path = out.join(LOCK_FILE);
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| Error::io(&lock_path, e))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            return Err(Error::refused(
                out,
                format!(
                    "another `semshare train` is writing this run directory (it holds {LOCK_FILE}); choose another --out"
                ),
            ));
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&lock_path, e)),
    }
    let continuing = resume.and_then(Path::parent).is_some_and(|dir| crate::io::same_path(dir, out));
    let existing: Vec<&str> = [BEST_CHECKPOINT, LAST_CHECKPOINT].into_iter().filter(|f| out.join(f).exists()).collect();
    if !existing.is_empty() && !continuing {
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
        for f in existing {
            std::fs::remove_file(out.join(f)).map_err(|e| Error::io(out.join(f), e))?;
        }
    }
    Ok(lock)
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
    check_fits(&data.layout, model)?;
    cfg.validate()?;
    require_items(data, "train", "training")?;
    require_items(data, "val", "selecting the best checkpoint")?;
    let fresh = RunState { best_score: -1.0, best_step: 0, stale: 0, best_embedding: None };
    let resumed = match &opts.resume {
        Some(path) => {
            let ckpt = Checkpoint::load(path)?;
            if &ckpt.model != model {
                return Err(Error::config(format!(
                    "{}: the checkpoint's model configuration differs from the requested one",
                    path.display()
                )));
            }
            let state: RunState = serde_json::from_str(&ckpt.state).map_err(|e| {
                Error::format(path, format!("metadata `state` is not a trainer state ({e}); cannot resume from it"))
            })?;
            if ckpt.step >= cfg.steps {
                // Nothing to train: `steps` is the total, and this run has done it.
                return Ok(TrainSummary {
                    steps: ckpt.step,
                    final_loss: f32::NAN,
                    best_score: state.best_score,
                    best_step: state.best_step,
                    best_embedding: state.embedding(),
                    seconds: 0.0,
                    losses: Vec::new(),
                    best_checkpoint: None,
                });
            }
            Some((ckpt, state))
        }
        None => None,
    };
    let _lock = claim_run_dir(&opts.out_dir, opts.resume.as_deref(), opts.replace)?;
    if let Some(text) = &opts.resolved_config {
        crate::io::atomic_write(&opts.out_dir.join(RESOLVED_CONFIG), text.as_bytes())?;
    }
    let train_split = data.split("train")?;
    let (mut trainer, mut state, norm) = match resumed {
        Some((ckpt, state)) => {
            // Continued elsewhere, the best checkpoint is chosen anew among the steps trained
            // here: the resumed run's best lies in its own directory.
            let same_dir =
                opts.resume.as_deref().and_then(Path::parent).is_some_and(|d| crate::io::same_path(d, &opts.out_dir));
            // A resumed run keeps the inputs it was trained on.
            let norm = ckpt.spec.normalization.clone();
            (Trainer::from_checkpoint(dev, &ckpt, cfg.clone())?, if same_dir { state } else { fresh }, norm)
        }
        None => {
            let norm = match cfg.normalize.as_str() {
                "standardize" => Some(crate::data::stats::input_norm(&data.layout, train_split)?),
                _ => None,
            };
            (Trainer::new(dev, model, cfg.clone())?, fresh, norm)
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
        let state = serde_json::to_string(state).expect("state serialises");
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
    while trainer.step < cfg.steps {
        let (images, texts) = match loader.next_batch() {
            Some(Ok(b)) => (b.images.widen(), b.texts.widen()),
            Some(Err(e)) => return Err(e),
            None => return Err(Error::data("the loader stopped before the last step")),
        };
        let stats = trainer.step(dev, images, texts)?;
        losses.push(stats.loss);
        last_loss = stats.loss;
        let done = trainer.step;
        let steps_per_sec = (done - first) as f64 / start.elapsed().as_secs_f64().max(1e-9);
        report(Progress::Step { step: done, total: cfg.steps, loss: stats.loss, steps_per_sec });
        let validate = done == cfg.steps || (cfg.eval_every > 0 && done % cfg.eval_every == 0);
        if validate {
            let mut scores = Vec::with_capacity(kinds.len());
            for &kind in &kinds {
                let r = evaluate_split(dev, &trainer.net, &trainer.params, data, "val", kind, &eval_cfg)?;
                scores.push((kind, validation_score(&r, cfg)));
            }
            // The better embedding; on equal scores the first (pooled).
            let (kind, score) =
                scores.iter().copied().reduce(|a, b| if b.1 > a.1 { b } else { a }).expect("one embedding at least");
            if score > state.best_score {
                let best_embedding = Some(kind.name().to_string());
                state = RunState { best_score: score, best_step: done, stale: 0, best_embedding };
                checkpoint(&trainer, dev, &state)?.save(&best_path)?;
            } else {
                state.stale += 1;
            }
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
            checkpoint(&trainer, dev, &state)?.save(&last_path)?;
            if cfg.patience > 0 && state.stale >= cfg.patience {
                report(Progress::EarlyStop { stale: state.stale, metric: metric.clone() });
                break;
            }
        }
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
    })
}

/// The dataset's shapes must match the model's.
pub fn check_fits(layout: &Layout, model: &ModelConfig) -> Result<()> {
    let m = &layout.meta;
    let checks = [
        ("region feature width (Dr)", m.feature_dim, model.region_dim),
        ("vocabulary size (V)", m.vocab_size(), model.vocab),
        ("label count (C)", m.num_labels, model.labels),
        ("text feature width (Dt, 0 for tokens)", layout.text_feature_dim, model.text_feature_dim),
    ];
    for (what, d, want) in checks {
        if d != want {
            return Err(Error::config(format!("dataset `{}` has {what} {d}, the model expects {want}", m.name)));
        }
    }
    if m.num_object_classes > model.object_classes {
        return Err(Error::config(format!(
            "dataset `{}` has {} object classes, the model has {}",
            m.name, m.num_object_classes, model.object_classes
        )));
    }
    Ok(())
}
