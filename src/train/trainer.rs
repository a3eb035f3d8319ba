//! One training step of Algorithm 1 on a device: both modalities forward and backward through
//! the shared model, the gradient norm, one AdamW update; the step's losses stay on the device
//! until they are read.

use serde::Serialize;

use crate::backend::step::{record, state};
use crate::backend::{AdamW, AdamWConstants, Backend, DecayMask, GraphInput, GuardParams};
use crate::checkpoint::{Checkpoint, InferenceSpec};

use crate::model::consistency::{
    BatchShape, DscmrWeights, PairBatch, dscmr_loss, imc_consistency, triplet_consistency,
};
use crate::model::{Batch, Consistency, ImageBatch, LossWeights, MaskPlan, ModelConfig, SemShare, Staged, TextBatch};
use crate::nn::{Dropout, Weights};
use crate::rng::Rng;
use crate::tensor::Tensor;
use crate::{Error, Result};

use super::config::{ContextPass, TrainConfig};
use super::graphs::{Pass, StepGraphs, StepMode};

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
    /// The record of the step being taken (`step::record`, `[record::LEN]`): its losses, then
    /// the guard's total, norm, clip factor and status; AdamW's scalars written before it.
    current: Tensor,
    /// The guard's copies of every record not yet read, oldest first: `[STATS_ROWS, record::LEN]`.
    records: Tensor,
    /// `step::state`: the halt flag (1 from a diverging step until the host reports it: later
    /// updates skip) and how many rows of `records` are written.
    state: Tensor,
    /// (step, learning rate) of each record row in use, in order.
    unread: Vec<(u64, f32)>,
    /// Stats read early (the rows ran out) and not yet returned.
    read: Vec<StepStats>,
    /// The step captured once per shape and replayed (CUDA graphs), where the device can.
    graphs: StepGraphs,
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
        let current = dev.zeros(&[record::LEN])?;
        let records = dev.zeros(&[STATS_ROWS, record::LEN])?;
        let state = dev.zeros(&[state::LEN])?;
        let (unread, read) = (Vec::new(), Vec::new());
        let mode = if dev.captures_graphs() { StepMode::Captured } else { StepMode::Eager };
        let graphs = StepGraphs::new(mode);
        Ok(Trainer { net, params, grads, m, v, step, cfg, decay, current, records, state, unread, read, graphs })
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
        let mut batches = Some((images, texts));
        dev.run_pooled(&mut |dev| match batches.take() {
            Some((images, texts)) => self.step_here(dev, images, texts),
            None => Ok(()),
        })
    }

    /// [`Trainer::step_deferred`] on the calling thread.
    fn step_here(&mut self, dev: &mut dyn Backend, images: ImageBatch, texts: TextBatch) -> Result<()> {
        if self.unread.len() == STATS_ROWS {
            let early = self.read_stats(dev)?;
            self.read.extend(early);
        }
        let (image_plan, text_plan, drop, salt) = self.draws(&images, &texts);
        let lr = self.cfg.lr_at(self.step);
        let scalars = self.optimizer(lr).scalars().slots();
        let pair_labels: Vec<u8> = images.labels.iter().map(|&y| (y > 0.5) as u8).collect();
        let batches = [Batch::Image(images), Batch::Text(texts)];
        let passes = self.passes([image_plan, text_plan], drop);
        // A step whose shapes were seen before replays its graph (captured the second time a
        // shape comes): one upload of the batch and the step's scalars, one launch. Variants
        // with a cross-modal loss read the embeddings on the host: never captured.
        let capturable =
            self.graphs.mode == StepMode::Captured && self.cfg.variant.spec().consistency == Consistency::None;
        let shaped = capturable || self.graphs.mode == StepMode::Shaped;
        let hosts = passes
            .iter()
            .map(|p| self.net.stager().host_inputs(&batches[p.text as usize], &p.plan, true, shaped))
            .collect::<Result<Vec<_>>>()?;
        let key = capturable.then(|| StepGraphs::key(&passes, &hosts));
        // A launch's inputs: every pass's staged values, then the scalars (`GraphInput` order),
        // borrowed: the launch gathers them straight into the pinned upload ring.
        let words = || -> Vec<&[f32]> { hosts.iter().flat_map(|h| h.words()).chain([&scalars[..]]).collect() };
        if let Some(graph) = key.as_ref().and_then(|k| self.graphs.get(k)) {
            dev.launch_graph(graph, &words(), salt)?;
            self.taken(lr);
            return Ok(());
        }
        let free = dev.available_memory();
        let capture = key.as_ref().is_some_and(|k| self.graphs.second_sighting(k, free));
        dev.set_dropout_salt(salt)?;
        dev.write(self.current.sub_mut(record::SCALARS.start, scalars.len()), &scalars)?;
        let stage = |net: &SemShare, dev: &mut dyn Backend| -> Result<Vec<Staged>> {
            passes
                .iter()
                .zip(&hosts)
                .map(|(p, h)| net.stager().upload_inputs(dev, &batches[p.text as usize], h))
                .collect()
        };
        let staged = stage(&self.net, dev)?;
        let Some(key) = key.filter(|_| capture) else {
            self.run_step(dev, &passes, staged, &pair_labels)?;
            self.taken(lr);
            return Ok(());
        };
        let mut inputs: Vec<GraphInput> = staged.iter().flat_map(|s| s.inputs()).collect();
        inputs.push(GraphInput::Kept(self.current.sub(record::SCALARS.start, scalars.len())));
        let began = dev.begin_capture(&inputs);
        std::mem::drop(inputs);
        // A capture that cannot begin or end ran nothing: steps on this device are taken
        // eagerly from now on, this one too.
        let (staged, failed) = match began {
            Ok(()) => {
                let ran = self.run_step(dev, &passes, staged, &pair_labels);
                match (ran, dev.end_capture()) {
                    (Ok(()), Ok(graph)) => {
                        // The capture ran nothing: its first launch takes the step.
                        dev.launch_graph(&graph, &words(), salt)?;
                        self.graphs.insert(key, graph);
                        self.taken(lr);
                        return Ok(());
                    }
                    (ran, graph) => (stage(&self.net, dev)?, ran.err().or(graph.err())),
                }
            }
            Err(e) => (staged, Some(e)),
        };
        self.graphs.refuse(failed.map_or_else(String::new, |e| e.to_string()));
        self.run_step(dev, &passes, staged, &pair_labels)?;
        self.taken(lr);
        Ok(())
    }

    /// How steps are taken (`StepMode::Captured` by default where the device captures
    /// graphs, `Eager` elsewhere, whatever is asked); leaving `Captured` drops every graph.
    pub fn set_step_mode(&mut self, mode: StepMode, dev: &dyn Backend) {
        self.graphs.mode = if dev.captures_graphs() { mode } else { StepMode::Eager };
        if self.graphs.mode != StepMode::Captured {
            self.graphs.clear();
        }
    }

    pub fn step_mode(&self) -> StepMode {
        self.graphs.mode
    }

    /// Graphs kept, and the device bytes they hold.
    pub fn graphs_held(&self) -> (usize, usize) {
        self.graphs.held()
    }

    /// Why steps stopped being captured on this device, if a capture failed (the step was
    /// then taken eagerly, as every later one is).
    pub fn graphs_refused(&self) -> Option<&str> {
        self.graphs.refused.as_deref()
    }

    /// Books a step taken at learning rate `lr`: its record is the next unread one.
    fn taken(&mut self, lr: f32) {
        self.unread.push((self.step, lr));
        self.step += 1;
    }

    /// The forward passes of a step: each modality's, and with masked segments and
    /// `ContextPass::Separate` a second, masked one for L2 (L1 on the batch as it is).
    fn passes(&self, [image_plan, text_plan]: [MaskPlan; 2], drop: Dropout) -> Vec<Pass> {
        let weights = self.loss_weights();
        let mut passes = Vec::new();
        let mut masked = Vec::new();
        for (text, plan, site, slot) in
            [(false, image_plan, 1, record::IMAGE_LABEL), (true, text_plan, 2, record::TEXT_LABEL)]
        {
            let drop = drop.site(site);
            if plan.rows.is_empty() || self.cfg.context_pass == ContextPass::Shared {
                passes.push(Pass { text, plan, drop, weights, slot, context_only: false });
                continue;
            }
            let clean = LossWeights { context: 0.0, ..weights };
            passes.push(Pass { text, plan: MaskPlan::default(), drop, weights: clean, slot, context_only: false });
            let weights = LossWeights { label: 0.0, ..weights };
            masked.push(Pass { text, plan, drop: drop.site(7), weights, slot, context_only: true });
        }
        passes.extend(masked);
        passes
    }

    /// The device's part of a step, on its staged passes: forward, losses, backward, the
    /// gradient norm, the guard and the update. Reads nothing from the host but the
    /// cross-modal loss of the variants that have one.
    fn run_step(
        &mut self,
        dev: &mut dyn Backend,
        passes: &[Pass],
        staged: Vec<Staged>,
        pair_labels: &[u8],
    ) -> Result<()> {
        let weights = self.loss_weights();
        // At bf16 activations every pass multiplies one bf16 copy of the trunk, made here.
        let bf16 = self.net.bf16_weights(dev, &self.params)?;
        let w = Weights { values: &self.params, bf16: bf16.as_ref() };
        let mut forwards = Vec::with_capacity(passes.len());
        for (p, s) in passes.iter().zip(staged) {
            let f = if p.context_only {
                // L2 only: its L1 slot is discarded.
                let mut losses = dev.alloc(&[2])?;
                let f = self.net.forward_loss(dev, w, s, p.drop, p.weights, losses.view_mut())?;
                dev.copy(losses.sub(1, 1), self.current.sub_mut(p.slot + 1, 1))?;
                f
            } else {
                self.net.forward_loss(dev, w, s, p.drop, p.weights, self.current.sub_mut(p.slot, 2))?
            };
            forwards.push(f);
        }
        let mut forwards = forwards.into_iter();
        let (fi, ft) = (forwards.next(), forwards.next());
        let (fi, ft) = fi.zip(ft).ok_or_else(|| Error::shape("step", "a step has both modalities"))?;
        dev.fill(self.grads.view_mut(), 0.0)?;
        let (consistency, extra) = self.cross_modal(dev, &fi.z, &ft.z, pair_labels)?;
        // A kernel fill, not an upload: the batch is the step's only upload.
        dev.fill(self.current.sub_mut(record::CONSISTENCY, 1), consistency)?;
        let (dz_images, dz_texts) = match &extra {
            Some((du, dv)) => (Some(du), Some(dv)),
            None => (None, None),
        };
        let w = Weights { values: &self.params, bf16: bf16.as_ref() };
        self.net.backward_loss(dev, w, &mut self.grads, fi, dz_images)?;
        self.net.backward_loss(dev, w, &mut self.grads, ft, dz_texts)?;
        for f in forwards {
            self.net.backward_loss(dev, w, &mut self.grads, f, None)?;
        }

        dev.sum_squares_into(self.grads.view(), self.current.sub_mut(record::SUM_SQUARES, 1))?;
        let guard =
            GuardParams { label_weight: weights.label, context_weight: weights.context, clip_norm: self.cfg.clip_norm };
        dev.step_guard(self.current.view_mut(), self.state.view_mut(), self.records.view_mut(), guard)?;
        self.apply_update(dev)
    }

    /// What the next step draws for this batch: the masked segments of each modality, the
    /// dropout (its per-site seeds a function of the run's seed alone) and the step's dropout
    /// salt (`Backend::set_dropout_salt`), all functions of the seed and the step alone. The
    /// seeds stay fixed and the salt moves, so a step captured once replays with new masks.
    pub fn draws(&self, images: &ImageBatch, texts: &TextBatch) -> (MaskPlan, MaskPlan, Dropout, u64) {
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
        let drop = Dropout { p: cfg.dropout, seed: Rng::derive(self.cfg.seed ^ 0xD50D, 0).next_u64() };
        (image_plan, text_plan, drop, rng.next_u64())
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
        dev.fill(self.state.sub_mut(state::ROWS, 1), 0.0)?;
        for (&(step, lr), r) in unread.iter().zip(rows.chunks_exact(record::LEN)) {
            let status = r[record::STATUS] as u32;
            if status != 0 {
                self.step = step;
                dev.fill(self.state.sub_mut(state::HALTED, 1), 0.0)?;
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

    /// AdamW at learning rate `lr` for step `self.step + 1` (bias correction is 1-based).
    fn optimizer(&self, lr: f32) -> AdamW {
        AdamW {
            lr,
            beta1: self.cfg.beta1,
            beta2: self.cfg.beta2,
            eps: self.cfg.eps,
            weight_decay: self.cfg.weight_decay,
            step: self.step + 1,
            grad_scale: 1.0,
        }
    }

    /// The AdamW update of the current step from the gradient buffer in one launch: the step's
    /// scalars, the clip factor and the go/skip status read on the device from its record.
    fn apply_update(&mut self, dev: &mut dyn Backend) -> Result<()> {
        let hp = AdamWConstants { beta1: self.cfg.beta1, beta2: self.cfg.beta2, eps: self.cfg.eps };
        dev.adamw_masked(
            self.params.view_mut(),
            self.grads.view(),
            self.m.view_mut(),
            self.v.view_mut(),
            &self.decay,
            hp,
            self.current.view(),
        )
    }

    /// The AdamW update a step makes, with a clip factor given here: bias correction for
    /// step `self.step + 1` (the caller advances the step). Public so the GPU benchmark times
    /// exactly what a step runs; the factor and the scalars go in as the step's do (one upload).
    pub fn optimizer_update(&mut self, dev: &mut dyn Backend, lr: f32, grad_scale: f32) -> Result<()> {
        let mut rec = vec![0.0; record::LEN];
        rec[record::CLIP] = grad_scale;
        rec[record::SCALARS].copy_from_slice(&self.optimizer(lr).scalars().slots());
        dev.write(self.current.view_mut(), &rec)?;
        self.apply_update(dev)
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
