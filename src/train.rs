//! Training (Algorithm 1): each iteration samples a mini-batch of (image, text, labels)
//! pairs, runs both modalities forward and backward through the shared model, clips the
//! gradient norm and takes one AdamW step over the flat parameter buffer.
//! Deterministic on the CPU: the same seed gives bitwise the same loss curve.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::backend::step::record;
use crate::backend::{AdamW, Backend, DecayMask, GuardParams};
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
    /// Which embedding validation ranks with: "pooled" or "label".
    pub embedding: String,
    /// Validation NDCG cut-off.
    pub eval_k: usize,
    /// Stop after this many validations without a better validation NDCG (0: never).
    pub patience: u64,
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
            eval_k: 500,
            patience: 0,
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
        self.embedding.parse::<EmbeddingKind>()?;
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

/// Steps whose records the device holds until the host reads them (`Trainer::read_stats`);
/// a step past this many reads them first.
pub const STATS_ROWS: usize = 64;

/// The model, its flat parameter buffer, the gradient buffer and AdamW's moments, on a device.
pub struct Trainer {
    pub net: SemShare,
    pub params: Tensor,
    pub grads: Tensor,
    m: Tensor,
    v: Tensor,
    /// The next step to take (steps left untaken by a divergence are taken again).
    pub step: u64,
    pub cfg: TrainConfig,
    decay: DecayMask,
    /// One `step::record` row per step not yet read: `[STATS_ROWS, record::LEN]`.
    records: Tensor,
    /// 1 on the device from a diverging step until the host reports it: later updates skip.
    halted: Tensor,
    /// (step, learning rate) of each record row in use, in order.
    unread: Vec<(u64, f32)>,
    /// Stats read early (the rows ran out) and not yet returned.
    read: Vec<StepStats>,
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
        let decay = DecayMask::new(dev, net.store.decay_runs())?;
        let records = dev.zeros(&[STATS_ROWS, record::LEN])?;
        let halted = dev.zeros(&[1])?;
        let (unread, read) = (Vec::new(), Vec::new());
        Ok(Trainer { net, params, grads, m, v, step, cfg, decay, records, halted, unread, read })
    }

    /// One iteration of Algorithm 1 on a batch of pairs (text i describes image i), read back
    /// at once: [`Trainer::step_deferred`] then [`Trainer::read_stats`] (one host sync). On a
    /// non-finite loss or gradient the parameters are left untouched and an error says which
    /// term diverged. Stats of earlier deferred steps not yet read are read and dropped.
    pub fn step(&mut self, dev: &mut dyn Backend, images: ImageBatch, texts: TextBatch) -> Result<StepStats> {
        self.step_deferred(dev, images, texts)?;
        let stats = self.read_stats(dev)?;
        Ok(*stats.last().expect("the step just taken"))
    }

    /// One iteration of Algorithm 1 that leaves its losses, gradient norm and status on the
    /// device: the host does not wait for the device (variants with a cross-modal loss aside,
    /// which compute it on the host). The non-finite check and the clipping run on the device;
    /// a diverging step leaves the parameters untouched, and so does every step after it until
    /// [`Trainer::read_stats`] reports it.
    pub fn step_deferred(&mut self, dev: &mut dyn Backend, images: ImageBatch, texts: TextBatch) -> Result<()> {
        if self.unread.len() == STATS_ROWS {
            let early = self.read_stats(dev)?;
            self.read.extend(early);
        }
        let row = self.unread.len() * record::LEN;
        let weights = self.loss_weights();
        let (image_plan, text_plan, drop) = self.draws(&images, &texts);
        let pair_labels: Vec<u8> = images.labels.iter().map(|&y| (y > 0.5) as u8).collect();

        let (images, texts) = (Batch::Image(images), Batch::Text(texts));
        let fi = self.net.forward_loss(
            dev,
            &self.params,
            &images,
            &image_plan,
            drop.site(1),
            weights,
            self.records.sub_mut(row + record::IMAGE_LABEL, 2),
        )?;
        let ft = self.net.forward_loss(
            dev,
            &self.params,
            &texts,
            &text_plan,
            drop.site(2),
            weights,
            self.records.sub_mut(row + record::TEXT_LABEL, 2),
        )?;
        dev.fill(self.grads.view_mut(), 0.0)?;
        let (consistency, extra) = self.cross_modal(dev, &fi.z, &ft.z, &pair_labels)?;
        // A kernel fill, not an upload: the batch is the step's only upload.
        dev.fill(self.records.sub_mut(row + record::CONSISTENCY, 1), consistency)?;
        let (dz_images, dz_texts) = match &extra {
            Some((du, dv)) => (Some(du), Some(dv)),
            None => (None, None),
        };
        self.net.backward_loss(dev, &self.params, &mut self.grads, fi, dz_images)?;
        self.net.backward_loss(dev, &self.params, &mut self.grads, ft, dz_texts)?;

        dev.sum_squares_into(self.grads.view(), self.records.sub_mut(row + record::SUM_SQUARES, 1))?;
        let guard =
            GuardParams { label_weight: weights.label, context_weight: weights.context, clip_norm: self.cfg.clip_norm };
        dev.step_guard(self.records.sub_mut(row, record::LEN), self.halted.view_mut(), guard)?;
        let lr = self.cfg.lr_at(self.step);
        self.apply_update(dev, lr, row)?;
        self.unread.push((self.step, lr));
        self.step += 1;
        Ok(())
    }

    /// What the next step draws for this batch: the masked segments of each modality and the
    /// dropout seed (a function of the seed and the step alone).
    pub fn draws(&self, images: &ImageBatch, texts: &TextBatch) -> (MaskPlan, MaskPlan, Dropout) {
        let cfg = &self.net.cfg;
        let mut rng = Rng::derive(self.cfg.seed ^ 0x5EED, self.step);
        // Segments are masked only for a context loss to predict them.
        let (image_plan, text_plan) = if self.loss_weights().context != 0.0 && !cfg.global_segments {
            let image_plan =
                images.classes.as_ref().map(|c| MaskPlan::draw(&mut rng, c, cfg.mask_prob)).unwrap_or_default();
            (image_plan, MaskPlan::draw(&mut rng, &texts.tokens, cfg.mask_prob))
        } else {
            Default::default()
        };
        (image_plan, text_plan, Dropout { p: cfg.dropout, seed: rng.next_u64() })
    }

    /// The stats of every step taken since the last read, oldest first, in one download (one
    /// host sync). The first diverging step is an error naming its term and step; the trainer
    /// then stands at that step, its parameters as they were before it.
    pub fn read_stats(&mut self, dev: &mut dyn Backend) -> Result<Vec<StepStats>> {
        let mut out = std::mem::take(&mut self.read);
        if self.unread.is_empty() {
            return Ok(out);
        }
        let unread = std::mem::take(&mut self.unread);
        let rows = dev.download(self.records.sub(0, unread.len() * record::LEN))?;
        for (&(step, lr), r) in unread.iter().zip(rows.chunks_exact(record::LEN)) {
            let status = r[record::STATUS] as u32;
            if status != 0 {
                self.step = step;
                dev.fill(self.halted.view_mut(), 0.0)?;
                let bit = status.trailing_zeros() as usize;
                let value = match bit {
                    0..=4 => r[bit],
                    _ => r[record::GRAD_NORM],
                };
                let what = record::NAMES[bit.min(record::NAMES.len() - 1)];
                return Err(Error::NonFinite { what: format!("{what} is {value} at step {step}") });
            }
            out.push(StepStats {
                step,
                loss: r[record::LOSS],
                image_label: r[record::IMAGE_LABEL],
                text_label: r[record::TEXT_LABEL],
                image_context: r[record::IMAGE_CONTEXT],
                text_context: r[record::TEXT_CONTEXT],
                consistency: r[record::CONSISTENCY],
                grad_norm: r[record::GRAD_NORM],
                lr,
            });
        }
        Ok(out)
    }

    /// The AdamW update of `self.step` from the gradient buffer in one launch, the clip factor
    /// and the go/skip status read on the device from record row `row` (element offset).
    fn apply_update(&mut self, dev: &mut dyn Backend, lr: f32, row: usize) -> Result<()> {
        let hp = AdamW {
            lr,
            beta1: self.cfg.beta1,
            beta2: self.cfg.beta2,
            eps: self.cfg.eps,
            weight_decay: self.cfg.weight_decay,
            step: self.step + 1,
            grad_scale: 1.0,
        };
        dev.adamw_masked(
            self.params.view_mut(),
            self.grads.view(),
            self.m.view_mut(),
            self.v.view_mut(),
            &self.decay,
            hp,
            self.records.sub(row, record::LEN),
        )
    }

    /// The AdamW update a step makes, with a clip factor given here: bias correction for
    /// step `self.step + 1` (the caller advances the step). Public so the GPU benchmark times
    /// exactly what a step runs; the factor goes through the next free record row (one upload).
    pub fn optimizer_update(&mut self, dev: &mut dyn Backend, lr: f32, grad_scale: f32) -> Result<()> {
        if self.unread.len() == STATS_ROWS {
            let early = self.read_stats(dev)?;
            self.read.extend(early);
        }
        let mut rec = vec![0.0; record::LEN];
        rec[record::CLIP] = grad_scale;
        let row = self.unread.len() * record::LEN;
        let given = dev.upload(&rec, &[record::LEN])?;
        dev.copy(given.view(), self.records.sub_mut(row, record::LEN))?;
        self.apply_update(dev, lr, row)
    }

    /// How many AdamW launches `optimizer_update` makes: one, whatever the decay runs.
    pub fn optimizer_launches(&self) -> usize {
        1
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
    /// Print progress to stderr: one line redrawn in place on a terminal; when stderr is piped
    /// (a log file, CI), plain lines every tenth of the run or 30 s, whichever comes first.
    pub progress: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct TrainSummary {
    /// The step the run ended at (the resumed checkpoint's when there was nothing to train).
    pub steps: u64,
    pub final_loss: f32,
    pub best_ndcg: f64,
    pub best_step: u64,
    pub seconds: f64,
    /// The loss of each step trained; empty when a resumed checkpoint had reached `steps`.
    pub losses: Vec<f32>,
    /// The run directory's best checkpoint; None when the run wrote none.
    pub best_checkpoint: Option<PathBuf>,
}

#[derive(Serialize, Deserialize)]
struct RunState {
    best_ndcg: f64,
    best_step: u64,
    /// Validations since the best one (early stopping).
    #[serde(default)]
    stale: u64,
}

fn validation_ndcg(report: &Report, k: usize) -> f64 {
    report.avg.ndcg_at(k).or_else(|| report.avg.ndcg.last().map(|x| x.1)).unwrap_or(0.0)
}

/// The checkpoint file of the best validation step in a run directory.
pub const BEST_CHECKPOINT: &str = "best.safetensors";
/// The checkpoint of the last validation step, to resume from.
pub const LAST_CHECKPOINT: &str = "last.safetensors";
/// Locked by the process training into a run directory (`flock`: released when it exits).
pub const LOCK_FILE: &str = ".lock";

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
    let fresh = RunState { best_ndcg: -1.0, best_step: 0, stale: 0 };
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
                    best_ndcg: state.best_ndcg,
                    best_step: state.best_step,
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
    let (mut trainer, mut state) = match resumed {
        Some((ckpt, state)) => {
            // Continued elsewhere, the best checkpoint is chosen anew among the steps trained
            // here: the resumed run's best lies in its own directory.
            let same_dir =
                opts.resume.as_deref().and_then(Path::parent).is_some_and(|d| crate::io::same_path(d, &opts.out_dir));
            (Trainer::from_checkpoint(dev, &ckpt, cfg.clone())?, if same_dir { state } else { fresh })
        }
        None => (Trainer::new(dev, model, cfg.clone())?, fresh),
    };
    let kind: EmbeddingKind = cfg.embedding.parse()?;
    // Every checkpoint of the run carries what inference needs from this dataset.
    let train_split = data.split("train")?;
    let spec = InferenceSpec::of(&data.layout, train_split.feature_dtype(), train_split.text_dtype(), kind);
    let checkpoint = |trainer: &Trainer, dev: &mut dyn Backend, state: &RunState| -> Result<Checkpoint> {
        let state = serde_json::to_string(state).expect("state serialises");
        Ok(Checkpoint { spec: spec.clone(), ..trainer.checkpoint(dev, state)? })
    };
    let eval_cfg = EvalConfig { ndcg_ks: vec![cfg.eval_k], precision_ks: vec![], recall_ks: vec![], pr_points: 1 };
    let best_path = opts.out_dir.join(BEST_CHECKPOINT);
    let last_path = opts.out_dir.join(LAST_CHECKPOINT);
    let start = Instant::now();
    let first = trainer.step;
    let mut losses = Vec::new();
    let mut last_loss = f32::NAN;
    const POOL: usize = 3;
    // `\r` redraws are for a terminal; in a log they pile up on one line.
    let redraw = std::io::stderr().is_terminal();
    let cr = if redraw { "\r" } else { "" };
    let piped_every_steps = (cfg.steps / 10).max(1);
    let mut last_piped = Instant::now();
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
        let line_due = if redraw {
            done % 10 == 0 || done == cfg.steps
        } else {
            done % piped_every_steps == 0 || last_piped.elapsed() >= Duration::from_secs(30)
        };
        if opts.progress && line_due {
            let rate = (done - first) as f64 / start.elapsed().as_secs_f64().max(1e-9);
            let eta = (cfg.steps - done) as f64 / rate.max(1e-9);
            let line =
                format!("step {done:>6}/{}  loss {:.4}  {rate:.1} steps/s  ETA {:>4.0}s", cfg.steps, stats.loss, eta);
            if redraw {
                eprint!("\r{line}   ");
            } else {
                eprintln!("{line}");
                last_piped = Instant::now();
            }
        }
        let validate = done == cfg.steps || (cfg.eval_every > 0 && done % cfg.eval_every == 0);
        if validate {
            let report = evaluate_split(dev, &trainer.net, &trainer.params, data, "val", kind, &eval_cfg)?;
            let ndcg = validation_ndcg(&report, cfg.eval_k);
            if ndcg > state.best_ndcg {
                state = RunState { best_ndcg: ndcg, best_step: done, stale: 0 };
                checkpoint(&trainer, dev, &state)?.save(&best_path)?;
            } else {
                state.stale += 1;
            }
            if opts.progress {
                eprintln!(
                    "{cr}step {done:>6}/{}  loss {:.4}  val NDCG@{} {ndcg:.2} (best {:.2} at {})",
                    cfg.steps, stats.loss, cfg.eval_k, state.best_ndcg, state.best_step
                );
            }
            checkpoint(&trainer, dev, &state)?.save(&last_path)?;
            if cfg.patience > 0 && state.stale >= cfg.patience {
                if opts.progress {
                    eprintln!("early stop: {} validations without a better NDCG@{}", state.stale, cfg.eval_k);
                }
                break;
            }
        }
    }
    Ok(TrainSummary {
        steps: trainer.step,
        final_loss: last_loss,
        best_ndcg: state.best_ndcg,
        best_step: state.best_step,
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
