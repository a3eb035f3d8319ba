//! The Semantic Sharing model (Yang et al., IJCAI 2021, §3.2), composed by hand in the order
//! of the paper's equations:
//!   Eq. 3  e_t = φ(ψ1(x̂_t) + ψ2(l_t))            modality-specific (image.rs, text.rs)
//!          h = SharedTransformer(e), z = mean_t h_t  shared by both modalities (shared.rs)
//!   Eq. 4  L1 = BCE(g(z), y)                          shared classifier g
//!   Eq. 5  L2 = CE(g_v(h_t), c_t) | CE(g_w(h_t), w_t) over masked segments t
//!   Eq. 6  L = L1 + λ·L2, summed over the two modalities
//! Table 1's structural variants are configuration (`ModelConfig`): `separate_models` gives
//! the text side its own trunk and classifier (`st`, `imc`), `trunk` the FC trunk (`wo-t`),
//! `global_segments` one segment per item (`wo-r`).

use crate::backend::{Backend, Segments};
use crate::nn::{Bf16Copy, Dropout, Linear, ParamStore, Weights};
use crate::tensor::{Ids, Tensor, ViewMut};
use crate::{Error, Result};

use super::batch::{Batch, MaskPlan};
use super::config::ModelConfig;
use super::image::{ImageCache, ImageEncoder};
use super::input_norm::InputNorm;
use super::shared::{SharedCache, SharedEncoder};
use super::staged::{Staged, StagedInput, Stager};
use super::text::{TextCache, TextEncoder};

#[derive(Clone, Debug)]
pub struct SemShare {
    pub cfg: ModelConfig,
    pub image: ImageEncoder,
    pub text: TextEncoder,
    pub shared: SharedEncoder,
    /// g: d → C, shared.
    pub classifier: Linear,
    /// The text side's own trunk and classifier when the models are separate.
    pub text_models: Option<(SharedEncoder, Linear)>,
    /// g_v: d → K_obj (masked region → object class).
    pub object_head: Linear,
    /// g_w: d → V (masked token → token).
    pub word_head: Linear,
    pub store: ParamStore,
    /// The training split's feature statistics, applied to every input before ψ1 (None: the
    /// features as they come). Set with [`SemShare::set_input_norm`].
    pub input_norm: Option<InputNorm>,
}

/// The two retrieval embeddings of DESIGN.md §1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmbeddingKind {
    /// z: the mean of the final hidden states.
    Pooled,
    /// The label space: mean over segments of the L2-normalised `label_coordinates` of
    /// g(h_t), normalised. The authors' code takes sigmoid(g(h_t)); see [`Backend::label_coordinates`]
    /// for why the coordinates are √(−log(1 − sigmoid)) here.
    Label,
}

impl EmbeddingKind {
    /// The name `FromStr` reads back: `pooled` or `label`.
    pub fn name(self) -> &'static str {
        match self {
            EmbeddingKind::Pooled => "pooled",
            EmbeddingKind::Label => "label",
        }
    }
}

impl std::str::FromStr for EmbeddingKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "pooled" => Ok(EmbeddingKind::Pooled),
            "label" => Ok(EmbeddingKind::Label),
            _ => Err(Error::config(format!("unknown embedding `{s}` (expected pooled or label)"))),
        }
    }
}

/// One modality's losses (unweighted means).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ModalityLoss {
    pub label: f32,
    pub context: f32,
    pub masked: usize,
}

/// Weights of the loss terms in one backward pass.
#[derive(Clone, Copy, Debug)]
pub struct LossWeights {
    pub label: f32,
    pub context: f32,
}

enum SideCache {
    Image(ImageCache),
    Text(TextCache),
}

/// What a staged batch holds for the losses, past the encoder.
struct LossInputs {
    labels: Option<Tensor>,
    masked: Option<(Ids, Ids)>,
}

/// A staged batch past its modality's encoder: the trunk's input e and segments, and what
/// the backward reads.
struct Sided {
    e: Tensor,
    seg: Segments,
    side: SideCache,
    /// With global segments: the encoder's segments, averaged into one per item.
    local: Option<Segments>,
    text: bool,
}

struct Encoded {
    hidden: Tensor,
    seg: Segments,
    side: SideCache,
    shared: SharedCache,
    /// With global segments: the encoder's segments, averaged into one per item.
    local: Option<Segments>,
}

/// One modality's forward pass and losses, held until its backward (so that a loss over both
/// modalities' pooled embeddings can join in first).
pub struct Forward {
    enc: Encoded,
    /// z: the pooled embedding, `[items, d]`.
    pub z: Tensor,
    /// ∂(weight·L1)/∂logits, written in place by the loss.
    dlogits: Tensor,
    /// Masked rows, their hidden states and ∂(weight·L2)/∂(context logits); None if no context
    /// gradient flows.
    context: Option<(crate::tensor::Ids, Tensor, Tensor)>,
    text: bool,
    /// Segments masked for L2.
    pub masked: usize,
}

impl SemShare {
    pub fn new(cfg: &ModelConfig) -> Result<Self> {
        cfg.validate()?;
        let mut store = ParamStore::new();
        let image = ImageEncoder::new(&mut store, cfg);
        let text = TextEncoder::new(&mut store, cfg);
        let shared = SharedEncoder::new(&mut store, "shared", cfg);
        let classifier = Linear::new(&mut store, "classifier", cfg.dim, cfg.labels, true);
        let object_head = Linear::new(&mut store, "heads.object", cfg.dim, cfg.object_classes, true);
        let word_head = Linear::new(&mut store, "heads.word", cfg.dim, cfg.vocab, true);
        let text_models = cfg.separate_models.then(|| {
            let trunk = SharedEncoder::new(&mut store, "text_shared", cfg);
            (trunk, Linear::new(&mut store, "text_classifier", cfg.dim, cfg.labels, true))
        });
        Ok(SemShare {
            cfg: cfg.clone(),
            image,
            text,
            shared,
            classifier,
            text_models,
            object_head,
            word_head,
            store,
            input_norm: None,
        })
    }

    /// Normalise every input with `norm` (checked against the model's input widths).
    pub fn set_input_norm(&mut self, norm: Option<InputNorm>) -> Result<()> {
        if let Some(n) = &norm {
            n.check(self.cfg.region_dim, self.cfg.text_feature_dim)?;
        }
        self.input_norm = norm;
        Ok(())
    }

    /// The trunk and classifier a modality goes through: the shared ones, or the text side's own.
    fn models(&self, text: bool) -> (&SharedEncoder, &Linear) {
        match &self.text_models {
            Some((trunk, classifier)) if text => (trunk, classifier),
            _ => (&self.shared, &self.classifier),
        }
    }

    /// The bf16 copy of the shared trunk's weights when `dev` runs bf16 activations and `w`
    /// holds none ([`Bf16Copy::missing`]). Made once and handed to every pass as
    /// [`Weights::bf16`] (a training step's passes, a loaded model's embeddings); a trunk the
    /// copy does not cover (the text side's own, `separate_models`) makes its own per pass.
    pub fn bf16_weights<'w>(&self, dev: &mut dyn Backend, w: impl Into<Weights<'w>>) -> Result<Option<Bf16Copy>> {
        Bf16Copy::missing(dev, w.into(), self.shared.params.clone())
    }

    /// What this model's inputs are made of (`host_inputs`, `upload_inputs`).
    pub(crate) fn stager(&self) -> Stager<'_> {
        Stager { cfg: &self.cfg, norm: self.input_norm.as_ref() }
    }

    /// `batch` staged on `dev` for one forward pass.
    pub fn stage(&self, dev: &mut dyn Backend, batch: &Batch, plan: &MaskPlan, labels: bool) -> Result<Staged> {
        let stager = self.stager();
        let host = stager.host_inputs(batch, plan, labels, false)?;
        stager.upload_inputs(dev, batch, &host)
    }

    /// Modality-specific encoder, then the shared transformer, on a staged batch; gives back
    /// what the losses read (the labels, the masked rows and their targets).
    fn encode(
        &self,
        dev: &mut dyn Backend,
        w: Weights,
        staged: Staged,
        drop: Dropout,
    ) -> Result<(Encoded, LossInputs)> {
        let (Sided { e, seg, side, local, text }, losses) = self.encode_side(dev, w, staged, drop)?;
        let trunk = self.models(text).0;
        let (hidden, shared) = trunk.forward(dev, w, e, &seg, drop.site(3))?;
        Ok((Encoded { hidden, seg, side, shared, local }, losses))
    }

    /// The modality-specific encoder on a staged batch: the trunk's input e and segments.
    fn encode_side(
        &self,
        dev: &mut dyn Backend,
        w: Weights,
        staged: Staged,
        drop: Dropout,
    ) -> Result<(Sided, LossInputs)> {
        let Staged { seg, global, input, labels, masked } = staged;
        let text = matches!(input, StagedInput::Text(_));
        let norm = self.input_norm.as_ref();
        let (e, side) = match input {
            StagedInput::Image { features, boxes } => {
                let features = features.widen(dev, norm.map(|n| &n.image))?;
                let rows = masked.as_ref().map(|m| m.0.clone());
                let (e, c) = self.image.forward(dev, w.values, features, boxes, rows, drop.site(1))?;
                (e, SideCache::Image(c))
            }
            StagedInput::Text(input) => {
                let input = input.widen(dev, norm.and_then(|n| n.text.as_ref()))?;
                let (e, c) = self.text.forward(dev, w.values, input, &seg, drop.site(2))?;
                (e, SideCache::Text(c))
            }
        };
        let (e, seg, local) = match global {
            Some(global) => (dev.segment_mean_fwd(&e, &seg)?, global, Some(seg)),
            None => (e, seg, None),
        };
        Ok((Sided { e, seg, side, local, text }, LossInputs { labels, masked }))
    }

    fn encode_backward(
        &self,
        dev: &mut dyn Backend,
        w: Weights,
        g: &mut Tensor,
        enc: Encoded,
        dh: Tensor,
    ) -> Result<()> {
        let trunk = self.models(matches!(enc.side, SideCache::Text(_))).0;
        let de = trunk.backward(dev, w, g, &enc.seg, enc.shared, dh)?;
        let (de, seg) = match enc.local {
            Some(local) => (dev.segment_mean_bwd(&de, &local)?, local),
            None => (de, enc.seg),
        };
        match enc.side {
            SideCache::Image(c) => self.image.backward(dev, w.values, g, &seg, c, de),
            SideCache::Text(c) => self.text.backward(dev, w.values, g, &seg, c, de),
        }
    }

    /// The context targets of a batch, if it has any: region classes or tokens. Texts given
    /// as segment features have no token to predict, so their L2 term is dropped (like images
    /// without region classes).
    pub fn context_targets(batch: &Batch) -> Option<&[u32]> {
        match batch {
            Batch::Image(b) => b.classes.as_deref(),
            Batch::Text(b) if b.tokens.is_empty() => None,
            Batch::Text(b) => Some(&b.tokens),
        }
    }

    /// Forward and backward of one modality: accumulates the gradient of
    /// `weights.label · L1 + weights.context · L2` into `g` and returns the unweighted losses.
    #[allow(clippy::too_many_arguments)]
    pub fn loss_backward<'w>(
        &self,
        dev: &mut dyn Backend,
        w: impl Into<Weights<'w>>,
        g: &mut Tensor,
        batch: &Batch,
        plan: &MaskPlan,
        drop: Dropout,
        weights: LossWeights,
    ) -> Result<ModalityLoss> {
        let w = w.into();
        let mut losses = dev.alloc(&[2])?;
        let staged = self.stage(dev, batch, plan, true)?;
        let f = self.forward_loss(dev, w, staged, drop, weights, losses.view_mut())?;
        let masked = f.masked;
        self.backward_loss(dev, w, g, f, None)?;
        let l = dev.download(losses.view())?;
        Ok(ModalityLoss { label: l[0], context: l[1], masked })
    }

    /// One modality's forward pass on a batch staged with its labels (`SemShare::stage`) and
    /// its losses L1 (Eq. 4) and L2 (Eq. 5), unweighted, written to `losses[0..2]` on the
    /// device (no host read, no upload; 0 for an L2 with nothing masked); the weighted
    /// gradients are applied by [`SemShare::backward_loss`].
    pub fn forward_loss<'w>(
        &self,
        dev: &mut dyn Backend,
        w: impl Into<Weights<'w>>,
        staged: Staged,
        drop: Dropout,
        weights: LossWeights,
        losses: ViewMut,
    ) -> Result<Forward> {
        if losses.len() != 2 {
            return Err(Error::shape("forward_loss", format!("{} loss slots, expected 2", losses.len())));
        }
        let w = w.into();
        let text = matches!(staged.input, StagedInput::Text(_));
        let (enc, LossInputs { labels, masked }) = self.encode(dev, w, staged, drop)?;
        let labels = labels.ok_or_else(|| Error::shape("forward_loss", "the batch was staged without its labels"))?;
        // Eq. 4: L1 = BCE(g(z), y), z = mean_t h_t.
        let z = dev.segment_mean_fwd(&enc.hidden, &enc.seg)?;
        let mut dlogits = self.models(text).1.forward(dev, w, &z)?;
        let (label_slot, mut context_slot) = losses.split_at(1);
        dev.bce_with_logits_into(&mut dlogits, &labels, weights.label, label_slot)?;
        // Eq. 5: L2 over the masked segments, by the modality's head.
        let mut context = None;
        let count = masked.as_ref().map_or(0, |m| m.0.len());
        match masked {
            None => dev.fill(context_slot.reborrow(), 0.0)?,
            Some((rows, targets)) => {
                let head = if text { &self.word_head } else { &self.object_head };
                let hm = dev.gather_rows(enc.hidden.view(), self.cfg.dim, &rows)?;
                let mut ctx_logits = head.forward(dev, w, &hm)?;
                dev.cross_entropy_into(&mut ctx_logits, &targets, weights.context, context_slot)?;
                if weights.context != 0.0 {
                    context = Some((rows, hm, ctx_logits));
                }
            }
        }
        Ok(Forward { enc, z, dlogits, context, text, masked: count })
    }

    /// Backward of [`SemShare::forward_loss`] into `g`, with `extra_dz` (the gradient of a
    /// further loss with respect to the pooled embedding z) added where z's gradient is formed.
    pub fn backward_loss<'w>(
        &self,
        dev: &mut dyn Backend,
        w: impl Into<Weights<'w>>,
        g: &mut Tensor,
        f: Forward,
        extra_dz: Option<&Tensor>,
    ) -> Result<()> {
        let w = w.into();
        let mut dz = self.models(f.text).1.backward(dev, w, g, &f.z, &f.dlogits)?;
        if let Some(extra) = extra_dz {
            dev.add_assign(&mut dz, extra)?;
        }
        let mut dh = dev.segment_mean_bwd(&dz, &f.enc.seg)?;
        if let Some((rows, hm, ctx_logits)) = f.context {
            let head = if f.text { &self.word_head } else { &self.object_head };
            let dhm = head.backward(dev, w, g, &hm, &ctx_logits)?;
            dev.scatter_add_rows(&dhm, &rows, dh.view_mut())?;
        }
        self.encode_backward(dev, w, g, f.enc, dh)
    }

    /// Retrieval embeddings of a batch, `[items, d]` (pooled) or `[items, C]` (label).
    pub fn embed<'w>(
        &self,
        dev: &mut dyn Backend,
        w: impl Into<Weights<'w>>,
        batch: &Batch,
        kind: EmbeddingKind,
    ) -> Result<Tensor> {
        let w = w.into();
        let mut out = None;
        dev.run_pooled(&mut |dev| {
            out = Some(self.embed_here(dev, w, batch, kind)?);
            Ok(())
        })?;
        out.ok_or_else(|| crate::Error::Device { what: format!("{} did not run the embedding", dev.name()) })
    }

    /// [`SemShare::embed`] on the calling thread: the encoders at inference, keeping nothing
    /// for a backward (`SharedEncoder::infer`).
    fn embed_here(&self, dev: &mut dyn Backend, w: Weights, batch: &Batch, kind: EmbeddingKind) -> Result<Tensor> {
        let staged = self.stage(dev, batch, &MaskPlan::default(), false)?;
        let (Sided { e, seg, text, .. }, _) = self.encode_side(dev, w, staged, Dropout::OFF)?;
        let hidden = self.models(text).0.infer(dev, w, e, &seg)?;
        match kind {
            EmbeddingKind::Pooled => dev.segment_mean_fwd(&hidden, &seg),
            EmbeddingKind::Label => {
                let mut s = self.models(text).1.forward(dev, w, &hidden)?;
                dev.label_coordinates(&mut s)?; // √softplus(g): `Backend::label_coordinates` says why not σ(g)
                dev.l2_normalize_rows(&mut s)?;
                let mut e = dev.segment_mean_fwd(&s, &seg)?;
                dev.l2_normalize_rows(&mut e)?;
                Ok(e)
            }
        }
    }

    /// Label logits g(z) of a batch, `[items, C]` (evaluation of the classifier itself).
    pub fn classify<'w>(&self, dev: &mut dyn Backend, w: impl Into<Weights<'w>>, batch: &Batch) -> Result<Tensor> {
        let w = w.into();
        let z = self.embed(dev, w, batch, EmbeddingKind::Pooled)?;
        self.models(matches!(batch, Batch::Text(_))).1.forward(dev, w, &z)
    }
}

#[cfg(test)]
mod tests {
    use crate::backend::cpu::elementwise::label_coordinates;

    #[test]
    fn label_coordinates_are_increasing_unsaturated_and_match_the_f64_definition() {
        let mut rng = crate::rng::Rng::new(11);
        let mut g: Vec<f32> = (0..2000).map(|_| (rng.normal() * 30.0) as f32).collect();
        g.extend([0.0, 1e-30, -1e-30, 88.0, -88.0, 200.0, -200.0, 17.0, 18.0]);
        let mut c = g.clone();
        label_coordinates(&mut c);
        for (&x, &y) in g.iter().zip(&c) {
            // ln(1 + e^g) directly (e^g is finite for |g| ≤ 700), by log1p where 1 + e^g rounds to 1.
            let e = f64::from(x).exp();
            let want = if x < 0.0 { e.ln_1p() } else { (1.0 + e).ln() }.sqrt();
            assert!(y.is_finite() && y >= 0.0, "{x} -> {y}");
            assert!((f64::from(y) - want).abs() <= 1e-6 * want.max(1e-30), "{x}: {y} vs {want}");
        }
        // Strictly increasing where σ rounds to 1.0 in f32 (g = 17 and 18): no saturation.
        let mut top = [17.0f32, 18.0, 30.0, 60.0];
        label_coordinates(&mut top);
        assert!(top.windows(2).all(|w| w[0] < w[1]), "{top:?}");
        assert_eq!(1.0 / (1.0 + (-17.0f32).exp()), 1.0 / (1.0 + (-18.0f32).exp()));
    }

    /// Cosines in f32 of a query with confident items of its own class, as retrieval scores them.
    fn cosines(rows: &[Vec<f32>]) -> Vec<f32> {
        let unit: Vec<Vec<f32>> = rows
            .iter()
            .map(|r| {
                let n = r.iter().map(|x| x * x).sum::<f32>().sqrt();
                r.iter().map(|x| x / n).collect()
            })
            .collect();
        unit[1..].iter().map(|r| r.iter().zip(&unit[0]).map(|(a, b)| a * b).sum()).collect()
    }

    #[test]
    fn confident_items_of_a_class_are_not_tied() {
        // 60 confident items of label 0 among 10: top logit 18..26, the others −14..−8 (sigmoids
        // of 1e-6..3e-4, the tails seen after training).
        let mut rng = crate::rng::Rng::new(3);
        let logits: Vec<Vec<f32>> = (0..60)
            .map(|_| {
                (0..10)
                    .map(|j| if j == 0 { 18.0 + 8.0 * rng.uniform() } else { -14.0 + 6.0 * rng.uniform() } as f32)
                    .collect()
            })
            .collect();
        let distinct = |mut v: Vec<f32>| {
            v.sort_by(f32::total_cmp);
            v.dedup();
            v.len()
        };
        // The authors' sigmoid: the top coordinate rounds to 1.0, the cosines to a handful of values.
        let sigmoid: Vec<Vec<f32>> =
            logits.iter().map(|r| r.iter().map(|&g| 1.0 / (1.0 + (-g).exp())).collect()).collect();
        let tied = distinct(cosines(&sigmoid));
        assert!(tied < 10, "sigmoid cosines: {tied} distinct values");
        // √softplus keeps them apart: (almost) every item its own score.
        let coords: Vec<Vec<f32>> = logits
            .iter()
            .map(|r| {
                let mut r = r.clone();
                label_coordinates(&mut r);
                r
            })
            .collect();
        assert!(distinct(cosines(&coords)) >= 50, "distinct cosines {}", distinct(cosines(&coords)));
    }
}
