//! Host-side batches, packed without padding: item b owns rows `offsets[b]..offsets[b+1]`.

use std::borrow::Cow;

use crate::backend::Half;
use crate::backend::cpu::inputs::widen_halves;
use crate::rng::Rng;

/// Feature values as the loader read them: f32, or 16-bit floats in their storage bits (an
/// fp16 or bf16 shard), which a step uploads as they are and widens on the device
/// (`Backend::widen_features`): half the bytes of the batch's bulk.
#[derive(Clone, Debug, PartialEq)]
pub enum Features {
    F32(Vec<f32>),
    Half(Half, Vec<u16>),
}

impl Features {
    /// Values held.
    pub fn len(&self) -> usize {
        match self {
            Features::F32(v) => v.len(),
            Features::Half(_, v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values as f32: borrowed, or widened (exactly) on the host.
    pub fn to_f32(&self) -> Cow<'_, [f32]> {
        match self {
            Features::F32(v) => Cow::Borrowed(v),
            Features::Half(h, v) => {
                let mut wide = vec![0.0; v.len()];
                widen_halves(*h, v, &mut wide);
                Cow::Owned(wide)
            }
        }
    }

    /// The values as f32 to edit: halves are widened first (the batch then holds f32).
    pub fn make_f32(&mut self) -> &mut Vec<f32> {
        if let Features::Half(..) = self {
            *self = Features::F32(self.to_f32().into_owned());
        }
        match self {
            Features::F32(v) => v,
            Features::Half(..) => unreachable!("widened above"),
        }
    }

    /// Bytes a step uploads for them (16-bit values two to a 4-byte word).
    pub fn bytes(&self) -> usize {
        match self {
            Features::F32(v) => 4 * v.len(),
            Features::Half(_, v) => 4 * v.len().div_ceil(2),
        }
    }

    /// The values rounded to `half` (to nearest, ties to even), as an fp16 or bf16 shard
    /// stores them.
    pub fn to_half(&self, half: Half) -> Features {
        let bits = self.to_f32().iter().map(|&x| half.narrow(x)).collect();
        Features::Half(half, bits)
    }
}

impl Default for Features {
    fn default() -> Self {
        Features::F32(Vec::new())
    }
}

impl From<Vec<f32>> for Features {
    fn from(v: Vec<f32>) -> Self {
        Features::F32(v)
    }
}

/// Images as bags of region features.
#[derive(Clone, Debug, Default)]
pub struct ImageBatch {
    /// Regions per item (≥ 1).
    pub lengths: Vec<usize>,
    /// [regions, Dr]
    pub features: Features,
    /// [regions, 5]: x1/W, y1/H, x2/W, y2/H, area/(W·H).
    pub boxes: Vec<f32>,
    /// `[regions]` detector class of each region, if known (the image context target).
    pub classes: Option<Vec<u32>>,
    /// [items, C] multi-hot as 0/1 floats.
    pub labels: Vec<f32>,
}

/// Texts as token sequences, or as pre-extracted segment features.
#[derive(Clone, Debug, Default)]
pub struct TextBatch {
    pub lengths: Vec<usize>,
    /// `[tokens]` ids < V, never `[PAD]`; empty when the texts are `features`.
    pub tokens: Vec<u32>,
    /// [segments, Dt] pre-extracted segment features; empty when the texts are `tokens`.
    pub features: Features,
    /// [items, C]
    pub labels: Vec<f32>,
}

#[derive(Clone, Debug)]
pub enum Batch {
    Image(ImageBatch),
    Text(TextBatch),
}

impl Batch {
    pub fn lengths(&self) -> &[usize] {
        match self {
            Batch::Image(b) => &b.lengths,
            Batch::Text(b) => &b.lengths,
        }
    }
    pub fn labels(&self) -> &[f32] {
        match self {
            Batch::Image(b) => &b.labels,
            Batch::Text(b) => &b.labels,
        }
    }
    pub fn items(&self) -> usize {
        self.lengths().len()
    }
    pub fn tokens(&self) -> usize {
        self.lengths().iter().sum()
    }
}

/// Which segments are masked for the context loss, and what they were.
#[derive(Clone, Debug, Default)]
pub struct MaskPlan {
    /// Packed row of each masked segment, ascending.
    pub rows: Vec<u32>,
    /// Its original object class or token id.
    pub targets: Vec<u32>,
}

impl MaskPlan {
    /// Each segment masked independently with probability p (Eq. 5's 15%).
    pub fn draw(rng: &mut Rng, originals: &[u32], p: f32) -> MaskPlan {
        let mut plan = MaskPlan::default();
        for (row, &t) in originals.iter().enumerate() {
            if rng.bernoulli(p as f64) {
                plan.rows.push(row as u32);
                plan.targets.push(t);
            }
        }
        plan
    }
}

impl ImageBatch {
    /// Random regions (unit normal features, valid boxes, classes < `classes`) for benchmarks
    /// and tests.
    pub fn random(rng: &mut Rng, lengths: &[usize], region_dim: usize, classes: usize, labels: usize) -> ImageBatch {
        let tokens: usize = lengths.iter().sum();
        let features = Features::F32((0..tokens * region_dim).map(|_| rng.normal() as f32).collect());
        let mut boxes = Vec::with_capacity(tokens * 5);
        for _ in 0..tokens {
            let (x1, y1) = (rng.uniform() * 0.5, rng.uniform() * 0.5);
            let (x2, y2) = (x1 + 0.1 + rng.uniform() * 0.4, y1 + 0.1 + rng.uniform() * 0.4);
            boxes.extend([x1, y1, x2, y2, (x2 - x1) * (y2 - y1)].map(|v| v as f32));
        }
        let classes = Some((0..tokens).map(|_| rng.below(classes) as u32).collect());
        let labels = (0..lengths.len() * labels).map(|_| rng.bernoulli(0.2) as u32 as f32).collect();
        ImageBatch { lengths: lengths.to_vec(), features, boxes, classes, labels }
    }
}

impl TextBatch {
    /// Random token ids in [3, vocab) for benchmarks and tests.
    pub fn random(rng: &mut Rng, lengths: &[usize], vocab: usize, labels: usize) -> TextBatch {
        let tokens: usize = lengths.iter().sum();
        let tokens = (0..tokens).map(|_| 3 + rng.below(vocab - 3) as u32).collect();
        let labels = (0..lengths.len() * labels).map(|_| rng.bernoulli(0.2) as u32 as f32).collect();
        TextBatch { lengths: lengths.to_vec(), tokens, labels, features: Features::default() }
    }
}
