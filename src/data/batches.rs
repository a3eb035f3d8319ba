//! Packing dataset items into model batches (no padding: DESIGN.md's packed layout).
//!
//! Items are copied from the shards into reusable buffers in their storage dtype (what a GPU
//! upload wants). Per-item data is copied by pread ([`Shard::read_features`] and friends), not
//! through the map, so streaming keeps the resident set at the pool's size; each item's content
//! is checked on the way ([`Shard::check_image`],
//! [`Shard::check_text`]): a NaN feature is an error naming file, tensor and item, never a
//! silent input. [`RawImages::batch`] and [`RawTexts::batch`] make the model's batches: f32
//! features, or fp16/bf16 ones kept as stored, uploaded so and widened on the device.

use rayon::prelude::*;

use crate::Result;
use crate::data::format::{FeatureDtype, Layout};
use crate::data::reader::SplitReader;
use crate::data::shard::Shard;
use crate::model::{ImageBatch, TextBatch};
use crate::rng::Rng;

/// Images of a batch, packed, features in storage dtype. Buffers keep their capacity between
/// batches.
#[derive(Clone, Debug, Default)]
pub struct RawImages {
    pub lengths: Vec<usize>,
    /// [regions, Dr] little-endian values of `dtype`.
    pub features: Vec<u8>,
    pub dtype: Option<FeatureDtype>,
    /// [regions, 5]
    pub boxes: Vec<f32>,
    /// `[regions]`, when the split has object classes.
    pub classes: Option<Vec<u32>>,
    /// [items, C] as 0/1 floats.
    pub labels: Vec<f32>,
    scratch: Vec<u8>,
}

/// Texts of a batch, packed: token ids, or segment features in storage dtype.
#[derive(Clone, Debug, Default)]
pub struct RawTexts {
    pub lengths: Vec<usize>,
    pub tokens: Vec<u32>,
    /// [segments, Dt] little-endian values of `dtype` (texts given as features).
    pub features: Vec<u8>,
    pub dtype: Option<FeatureDtype>,
    pub labels: Vec<f32>,
    scratch: Vec<u8>,
}

fn push_labels(out: &mut Vec<f32>, labels: &[u8]) {
    out.extend(labels.iter().map(|&y| y as f32));
}

/// `buf` cut into consecutive pieces of the given lengths (which sum to at most its length).
fn split_lengths<T>(mut buf: &mut [T], lens: impl Iterator<Item = usize>) -> Vec<&mut [T]> {
    let mut out = Vec::new();
    for len in lens {
        let (head, rest) = std::mem::take(&mut buf).split_at_mut(len);
        out.push(head);
        buf = rest;
    }
    out
}

/// Sets `v.len()` to `n`, zero-filling only what was never allocated: every byte is
/// overwritten next, so clearing first would be a wasted pass over the batch.
fn set_len_for_overwrite<T: Default + Clone>(v: &mut Vec<T>, n: usize) {
    if v.len() < n {
        v.resize(n, T::default());
    } else {
        v.truncate(n);
    }
}

impl RawImages {
    /// Replaces the content with images `items` (global indices < N) of `split`.
    pub fn fill(&mut self, layout: &Layout, split: &SplitReader, items: &[usize]) -> Result<()> {
        self.lengths.clear();
        self.labels.clear();
        self.dtype = Some(split.feature_dtype());
        let mut classes = self.classes.take().unwrap_or_default();
        classes.clear();
        let mut total = 0;
        for &i in items {
            let (shard, k) = split.locate_image(i);
            self.lengths.push(shard.count(k));
            total += shard.feature_len(layout, k);
            shard.read_classes(layout, k, &mut classes, &mut self.scratch)?;
            push_labels(&mut self.labels, shard.labels(k));
        }
        self.classes = split.has_classes().then_some(classes);
        // The bulk of the bytes: preads per item (features, boxes), spread over the thread pool.
        set_len_for_overwrite(&mut self.features, total);
        set_len_for_overwrite(&mut self.boxes, 5 * self.lengths.iter().sum::<usize>());
        let feature_lens = items.iter().map(|&i| {
            let (shard, k) = split.locate_image(i);
            shard.feature_len(layout, k)
        });
        let feature_dsts = split_lengths(&mut self.features, feature_lens);
        let box_dsts = split_lengths(&mut self.boxes, self.lengths.iter().map(|n| 5 * n));
        let results: Vec<Result<()>> = (items, feature_dsts, box_dsts)
            .into_par_iter()
            .map(|(&i, features, boxes)| {
                let (shard, k) = split.locate_image(i);
                shard.read_features(layout, k, features)?;
                shard.read_boxes(k, boxes)
            })
            .collect();
        results.into_iter().collect()
    }

    /// The model's batch: f32 features, or 16-bit ones as stored (widened on the device).
    pub fn batch(&self) -> ImageBatch {
        ImageBatch {
            lengths: self.lengths.clone(),
            features: self.dtype.unwrap_or(FeatureDtype::F32).features(&self.features),
            boxes: self.boxes.clone(),
            classes: self.classes.clone(),
            labels: self.labels.clone(),
        }
    }

    /// Bytes of region features held.
    pub fn feature_bytes(&self) -> usize {
        self.features.len()
    }
}

impl RawTexts {
    /// Replaces the content with texts `texts` (global indices < M) of `split`; each text
    /// carries its image's labels.
    pub fn fill(&mut self, layout: &Layout, split: &SplitReader, texts: &[usize]) -> Result<()> {
        self.lengths.clear();
        self.tokens.clear();
        self.labels.clear();
        self.dtype = split.text_dtype();
        let mut total = 0;
        for &j in texts {
            let (shard, k): (&Shard, usize) = split.locate_text(j);
            let n = shard.length(k);
            self.lengths.push(n);
            total += shard.text_feature_len(layout, k);
            if shard.text_dtype().is_none() {
                shard.read_tokens(layout, k, &mut self.tokens, &mut self.scratch)?;
            }
            push_labels(&mut self.labels, shard.labels(shard.text_item(k)));
        }
        set_len_for_overwrite(&mut self.features, total);
        let mut at = 0;
        for &j in texts {
            let (shard, k) = split.locate_text(j);
            let len = shard.text_feature_len(layout, k);
            shard.read_text_features(layout, k, &mut self.features[at..at + len])?;
            at += len;
        }
        Ok(())
    }

    /// The model's batch: tokens, or features as [`RawImages::batch`] gives them.
    pub fn batch(&self) -> TextBatch {
        let features = self.dtype.map(|d| d.features(&self.features)).unwrap_or_default();
        TextBatch { lengths: self.lengths.clone(), tokens: self.tokens.clone(), features, labels: self.labels.clone() }
    }
}

/// Images `items` of a split as one batch.
pub fn image_batch(layout: &Layout, split: &SplitReader, items: &[usize]) -> Result<ImageBatch> {
    let mut raw = RawImages::default();
    raw.fill(layout, split, items)?;
    Ok(raw.batch())
}

/// Texts `texts` of a split as one batch.
pub fn text_batch(layout: &Layout, split: &SplitReader, texts: &[usize]) -> Result<TextBatch> {
    let mut raw = RawTexts::default();
    raw.fill(layout, split, texts)?;
    Ok(raw.batch())
}

/// Algorithm 1's sampling: each epoch visits every image once in a seeded random order,
/// paired with one of its texts drawn at random. Step s always gets the same pairs.
#[derive(Clone, Debug)]
pub struct PairSampler {
    seed: u64,
    texts_of: Vec<Vec<usize>>,
    usable: Vec<usize>,
    batch: usize,
    /// The shuffled order of the epoch last asked for (shuffling per step would cost O(N)).
    order: Option<(u64, Vec<usize>)>,
}

impl PairSampler {
    /// `texts_of[i]`: the texts of image i ([`SplitReader::image_texts`]).
    pub fn new(texts_of: Vec<Vec<usize>>, batch: usize, seed: u64) -> Self {
        let usable = (0..texts_of.len()).filter(|&i| !texts_of[i].is_empty()).collect();
        PairSampler { seed, texts_of, usable, batch: batch.max(1), order: None }
    }

    pub fn steps_per_epoch(&self) -> usize {
        self.usable.len() / self.batch
    }

    /// The images and texts of global step `step` (0-based), written into `images`, `texts`.
    pub fn pairs_into(&mut self, step: u64, images: &mut Vec<usize>, texts: &mut Vec<usize>) {
        let per_epoch = self.steps_per_epoch().max(1) as u64;
        let (epoch, k) = (step / per_epoch, (step % per_epoch) as usize);
        if self.order.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut order = self.usable.clone();
            Rng::derive(self.seed, epoch).shuffle(&mut order);
            self.order = Some((epoch, order));
        }
        let order = &self.order.as_ref().expect("set above").1;
        let mut pick = Rng::derive(self.seed ^ 0x7E57, step);
        images.clear();
        texts.clear();
        for &i in order.iter().cycle().skip(k * self.batch).take(self.batch) {
            images.push(i);
            texts.push(self.texts_of[i][pick.below(self.texts_of[i].len())]);
        }
    }
}
