//! One modality's batch staged on the device: every value the forward pass reads from the host,
//! computed from the batch and its mask plan (input normalisation, the `[MASK]` tokens, segment
//! offsets, labels, the masked rows and their targets) and uploaded before the pass starts, so
//! that the pass itself uploads nothing. A captured step (CUDA graph) replays on the same
//! device memory: `HostInputs::words` refills all of it with the next batch's values at once.

use std::borrow::Cow;

use crate::backend::{Backend, GraphInput, Half, IGNORE_TARGET, Segments};
use crate::tensor::{Ids, Tensor};
use crate::{Error, Result};

use super::batch::{Batch, Features, MaskPlan};
use super::config::{MASK_TOKEN, ModelConfig};
use super::input_norm::{FeatureNorm, InputNorm};
use super::text::TextInput;

/// A modality's batch on the device (`SemShare::stage`), consumed by one forward pass.
pub struct Staged {
    pub(crate) seg: Segments,
    /// With global segments: one segment per item (the encoder's are averaged into it).
    pub(crate) global: Option<Segments>,
    pub(crate) input: StagedInput,
    /// `[items, C]`, for the label loss (None when staged for embedding).
    pub(crate) labels: Option<Tensor>,
    /// The masked rows (packed row ids, ascending) and their targets.
    pub(crate) masked: Option<(Ids, Ids)>,
}

pub(crate) enum StagedInput {
    Image { features: StagedFeatures, boxes: Tensor },
    Text(StagedText),
}

/// A text batch on the device: token ids, or segment features.
pub(crate) enum StagedText {
    Tokens(Ids),
    Features(StagedFeatures),
}

impl StagedText {
    /// What the text encoder reads, features widened.
    pub fn widen(self, dev: &mut dyn Backend, norm: Option<&FeatureNorm>) -> Result<TextInput> {
        Ok(match self {
            StagedText::Tokens(t) => TextInput::Tokens(t),
            StagedText::Features(f) => TextInput::Features(f.widen(dev, norm)?),
        })
    }
}

/// Input features on the device as uploaded: f32 (normalised on the host), or 16-bit floats
/// two to a word that [`StagedFeatures::widen`] turns into f32 (and normalises) inside the
/// forward pass, so that a captured step widens each replay's new values.
pub(crate) enum StagedFeatures {
    F32(Tensor),
    Half { words: Tensor, half: Half, rows: usize, dim: usize },
}

impl StagedFeatures {
    /// The `[rows, dim]` f32 features the encoder reads.
    pub fn widen(self, dev: &mut dyn Backend, norm: Option<&FeatureNorm>) -> Result<Tensor> {
        match self {
            StagedFeatures::F32(x) => Ok(x),
            StagedFeatures::Half { words, half, rows, dim } => {
                let norm = norm.map(|n| (&n.mean[..], &n.inv_std[..]));
                dev.widen_features(words.view(), half, rows, dim, norm)
            }
        }
    }

    fn view(&self) -> crate::tensor::View<'_> {
        match self {
            StagedFeatures::F32(x) => x.view(),
            StagedFeatures::Half { words, .. } => words.view(),
        }
    }
}

/// One uploaded part: values with their shape, or indices; borrowed from the batch where
/// the pass reads them as they are (no copy on the host).
pub enum HostPart<'a> {
    Values(Cow<'a, [f32]>, Vec<usize>),
    Ids(Cow<'a, [u32]>),
    /// `[rows, dim]` 16-bit floats, two to a word (the first in the low half).
    Halves {
        half: Half,
        words: Cow<'a, [u32]>,
        rows: usize,
        dim: usize,
    },
}

impl HostPart<'_> {
    /// Its 4-byte words.
    pub fn len(&self) -> usize {
        match self {
            HostPart::Values(v, _) => v.len(),
            HostPart::Ids(v) => v.len(),
            HostPart::Halves { words, .. } => words.len(),
        }
    }

    /// Which kind of part it is: with [`HostPart::len`], what a captured step's shape is
    /// keyed by (f32 values and halves of the same word count are different steps).
    pub fn kind(&self) -> u64 {
        match self {
            HostPart::Values(..) => 0,
            HostPart::Ids(_) => 1,
            HostPart::Halves { half: Half::F16, .. } => 2,
            HostPart::Halves { half: Half::Bf16, .. } => 3,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The host values of a [`Staged`], in the order `SemShare::stage` uploads them and
/// [`Staged::inputs`] lists their device memory.
pub struct HostInputs<'a> {
    pub parts: Vec<HostPart<'a>>,
    /// Whether the parts hold the labels, and the masked rows and their targets.
    pub labels: bool,
    pub masked: bool,
}

impl HostInputs<'_> {
    /// The items' segment offsets (the first part).
    pub fn offsets(&self) -> &[u32] {
        match self.parts.first() {
            Some(HostPart::Ids(o)) => o,
            _ => &[],
        }
    }

    /// Every part as 4-byte words (indices by their bits), in order: end to end they are the
    /// layout of a captured step's input buffer. Borrowed, not copied.
    pub fn words(&self) -> impl Iterator<Item = &[f32]> {
        self.parts.iter().map(|p| match p {
            HostPart::Values(v, _) => &v[..],
            HostPart::Ids(v) | HostPart::Halves { words: v, .. } => bytemuck::cast_slice(&v[..]),
        })
    }
}

/// The masked-row count a captured step is shaped for: `n` rounded up to one of four sizes per
/// power of two (at most 25 % padding, 8 at least), so that the counts a batch's random
/// masking draws fall into a few buckets, each one graph (`train/graphs.rs`).
pub fn masked_bucket(n: usize) -> usize {
    if n == 0 {
        return 0;
    }
    let b = n.max(8);
    let step = 1usize << (usize::BITS - 1 - b.leading_zeros() - 2);
    b.div_ceil(step) * step
}

/// Every id below `limit`, or an error naming the first that is not.
fn check_ids(what: &str, ids: &[u32], limit: usize) -> Result<()> {
    match ids.iter().position(|&i| i as usize >= limit) {
        Some(at) => Err(Error::data(format!("{what} {} at position {at} is out of range (< {limit})", ids[at]))),
        None => Ok(()),
    }
}

/// A batch's `[rows, dim]` features as the step uploads them: f32 normalised here, or halves
/// as they are (normalised on the device), their words borrowed where the values are aligned.
fn feature_part<'b>(
    features: &'b Features,
    norm: Option<&FeatureNorm>,
    rows: usize,
    dim: usize,
) -> Result<HostPart<'b>> {
    if features.len() != rows * dim {
        return Err(Error::shape("stage", format!("{} feature values for {rows} segments of {dim}", features.len())));
    }
    Ok(match features {
        Features::F32(v) => {
            let v = match norm {
                Some(n) => n.apply(v).into(),
                None => Cow::Borrowed(&v[..]),
            };
            HostPart::Values(v, vec![rows, dim])
        }
        Features::Half(half, v) => {
            let words = match bytemuck::try_cast_slice::<u16, u32>(v) {
                Ok(w) if cfg!(target_endian = "little") => Cow::Borrowed(w),
                // An odd count (the last word's high half is unused) or an unaligned vector.
                _ => Cow::Owned(v.chunks(2).map(|p| p[0] as u32 | (*p.get(1).unwrap_or(&0) as u32) << 16).collect()),
            };
            HostPart::Halves { half: *half, words, rows, dim }
        }
    })
}

fn offsets_of(lengths: &[usize]) -> Result<Vec<u32>> {
    let offsets = Segments::offsets_of(lengths)?;
    offsets
        .iter()
        .map(|&o| u32::try_from(o).map_err(|_| Error::data(format!("a batch of {o} segments exceeds u32 offsets"))))
        .collect()
}

/// What a model's inputs are made of: its widths and limits, and the input normalisation.
pub(crate) struct Stager<'a> {
    pub cfg: &'a ModelConfig,
    pub norm: Option<&'a InputNorm>,
}

impl Stager<'_> {
    /// What the forward pass of `batch` reads from the host, with `plan`'s segments masked;
    /// `labels` for a pass that computes the label loss; `bucket` pads the masked rows to
    /// [`masked_bucket`] of their count.
    pub fn host_inputs<'b>(
        &self,
        batch: &'b Batch,
        plan: &MaskPlan,
        labels: bool,
        bucket: bool,
    ) -> Result<HostInputs<'b>> {
        let lengths = batch.lengths();
        let tokens: usize = lengths.iter().sum();
        let mut parts = vec![HostPart::Ids(offsets_of(lengths)?.into())];
        if self.cfg.global_segments {
            if !plan.rows.is_empty() {
                return Err(Error::config("global segments cannot be masked: nothing is left to predict them from"));
            }
            parts.push(HostPart::Ids(offsets_of(&vec![1; lengths.len()])?.into()));
        }
        match batch {
            Batch::Image(b) => {
                let norm = self.norm.map(|n| &n.image);
                parts.push(feature_part(&b.features, norm, tokens, self.cfg.region_dim)?);
                parts.push(HostPart::Values(Cow::Borrowed(&b.boxes[..]), vec![tokens, 5]));
            }
            Batch::Text(b) if self.cfg.text_features() => {
                let norm = self.norm.and_then(|n| n.text.as_ref());
                parts.push(feature_part(&b.features, norm, tokens, self.cfg.text_feature_dim)?);
            }
            Batch::Text(b) => {
                check_ids("token id", &b.tokens, self.cfg.vocab)?;
                let mut ids = Cow::Borrowed(&b.tokens[..]);
                for &r in &plan.rows {
                    let slot = ids
                        .to_mut()
                        .get_mut(r as usize)
                        .ok_or_else(|| Error::data(format!("masked row {r} is outside the batch's {tokens} tokens")))?;
                    *slot = MASK_TOKEN;
                }
                parts.push(HostPart::Ids(ids));
            }
        }
        if labels {
            parts.push(HostPart::Values(Cow::Borrowed(batch.labels()), vec![batch.items(), self.cfg.labels]));
        }
        if !plan.rows.is_empty() {
            // Checked here, against the limits the ops check: a captured step replays on new
            // indices without running those checks again.
            let classes = if matches!(batch, Batch::Text(_)) { self.cfg.vocab } else { self.cfg.object_classes };
            check_ids("masked row", &plan.rows, tokens)?;
            check_ids("masked segment's target", &plan.targets, classes)?;
            if plan.targets.len() != plan.rows.len() {
                return Err(Error::data(format!("{} masked rows but {} targets", plan.rows.len(), plan.targets.len())));
            }
            let (mut rows, mut targets) = (plan.rows.clone(), plan.targets.clone());
            if bucket {
                // The last masked row again, with no target: masking it twice is masking it
                // once, its [MASK] gradient is taken once (`set_rows_bwd` zeroes what it
                // takes), and the loss skips it (no loss, no gradient, not counted).
                let padded = masked_bucket(rows.len());
                rows.resize(padded, *plan.rows.last().expect("not empty"));
                targets.resize(padded, IGNORE_TARGET);
            }
            parts.push(HostPart::Ids(rows.into()));
            parts.push(HostPart::Ids(targets.into()));
        }
        Ok(HostInputs { parts, labels, masked: !plan.rows.is_empty() })
    }

    /// `host` (this batch's `host_inputs`) uploaded part by part.
    pub fn upload_inputs(&self, dev: &mut dyn Backend, batch: &Batch, host: &HostInputs) -> Result<Staged> {
        let mut c = Cursor(host.parts.iter());
        let seg = c.segments(dev)?;
        let global = if self.cfg.global_segments { Some(c.segments(dev)?) } else { None };
        let input = match batch {
            Batch::Image(_) => StagedInput::Image { features: c.features(dev)?, boxes: c.values(dev)? },
            Batch::Text(_) if self.cfg.text_features() => StagedInput::Text(StagedText::Features(c.features(dev)?)),
            Batch::Text(_) => StagedInput::Text(StagedText::Tokens(c.ids(dev)?)),
        };
        let labels = if host.labels { Some(c.values(dev)?) } else { None };
        let masked = if host.masked { Some((c.ids(dev)?, c.ids(dev)?)) } else { None };
        if c.0.next().is_some() {
            return Err(Error::shape("stage", "more host inputs than the batch has parts"));
        }
        Ok(Staged { seg, global, input, labels, masked })
    }
}

/// Uploads `host_inputs`' parts in order.
struct Cursor<'a, 'b>(std::slice::Iter<'a, HostPart<'b>>);

impl Cursor<'_, '_> {
    fn values(&mut self, dev: &mut dyn Backend) -> Result<Tensor> {
        match self.0.next() {
            Some(HostPart::Values(v, shape)) => dev.upload(v, shape),
            _ => Err(Error::shape("stage", "expected values next in the host inputs")),
        }
    }

    /// Features: f32 values, or halves uploaded as their words.
    fn features(&mut self, dev: &mut dyn Backend) -> Result<StagedFeatures> {
        match self.0.next() {
            Some(HostPart::Values(v, shape)) => Ok(StagedFeatures::F32(dev.upload(v, shape)?)),
            Some(HostPart::Halves { half, words, rows, dim }) => {
                let words = dev.upload(bytemuck::cast_slice(&words[..]), &[words.len()])?;
                Ok(StagedFeatures::Half { words, half: *half, rows: *rows, dim: *dim })
            }
            _ => Err(Error::shape("stage", "expected features next in the host inputs")),
        }
    }

    /// Segment offsets: uploaded, and kept on the host as they are.
    fn segments(&mut self, dev: &mut dyn Backend) -> Result<Segments> {
        match self.0.next() {
            Some(HostPart::Ids(o)) => {
                Ok(Segments::from_offsets(o.iter().map(|&o| o as usize).collect(), dev.upload_ids(o)?))
            }
            _ => Err(Error::shape("stage", "expected segment offsets next in the host inputs")),
        }
    }

    fn ids(&mut self, dev: &mut dyn Backend) -> Result<Ids> {
        match self.0.next() {
            Some(HostPart::Ids(v)) => dev.upload_ids(v),
            _ => Err(Error::shape("stage", "expected indices next in the host inputs")),
        }
    }
}

impl Staged {
    /// The device memory of every part, in `host_inputs`' order: a captured step's inputs.
    pub fn inputs(&self) -> Vec<GraphInput<'_>> {
        let mut out = vec![GraphInput::Ids(&self.seg.device)];
        if let Some(g) = &self.global {
            out.push(GraphInput::Ids(&g.device));
        }
        match &self.input {
            StagedInput::Image { features, boxes } => {
                out.push(GraphInput::Values(features.view()));
                out.push(GraphInput::Values(boxes.view()));
            }
            StagedInput::Text(StagedText::Features(f)) => out.push(GraphInput::Values(f.view())),
            StagedInput::Text(StagedText::Tokens(t)) => out.push(GraphInput::Ids(t)),
        }
        if let Some(l) = &self.labels {
            out.push(GraphInput::Values(l.view()));
        }
        if let Some((rows, targets)) = &self.masked {
            out.push(GraphInput::Ids(rows));
            out.push(GraphInput::Ids(targets));
        }
        out
    }

    /// Segments masked for L2.
    pub fn masked_rows(&self) -> usize {
        self.masked.as_ref().map_or(0, |(r, _)| r.len())
    }
}

#[cfg(test)]
mod tests {
    use super::masked_bucket;

    #[test]
    fn buckets_cover_every_count_with_at_most_a_quarter_of_padding() {
        assert_eq!(masked_bucket(0), 0);
        for n in 1..5000 {
            let b = masked_bucket(n);
            assert!(b >= n && b >= 8, "{n} -> {b}");
            assert!(n < 8 || 4 * (b - n) <= b, "{n} -> {b}: more than a quarter is padding");
            assert_eq!(masked_bucket(b), b, "{n} -> {b}: a bucket is its own bucket");
        }
        // The `small` preset's 32 texts of 24 tokens at 15 %: 115 ± 10 masked, four buckets.
        let buckets: std::collections::BTreeSet<usize> = (95..=135).map(masked_bucket).collect();
        assert_eq!(buckets.into_iter().collect::<Vec<_>>(), [96, 112, 128, 160]);
    }
}
