//! Packing dataset items into model batches (no padding: DESIGN.md's packed layout).

use crate::data::dataset::{Meta, Split};
use crate::model::{ImageBatch, TextBatch};
use crate::rng::Rng;

/// Images `items` of a split as one packed batch.
pub fn image_batch(meta: &Meta, split: &Split, items: &[usize]) -> ImageBatch {
    let (r, dr, c) = (meta.regions, meta.feature_dim, meta.num_labels);
    let mut b = ImageBatch::default();
    let mut classes = split.image_classes.as_ref().map(|_| Vec::new());
    for &i in items {
        let n = split.image_count[i] as usize;
        b.lengths.push(n);
        b.features.extend_from_slice(&split.image_features[i * r * dr..(i * r + n) * dr]);
        b.boxes.extend_from_slice(&split.image_boxes[i * r * 5..(i * r + n) * 5]);
        if let (Some(out), Some(src)) = (classes.as_mut(), split.image_classes.as_ref()) {
            out.extend(src[i * r..i * r + n].iter().map(|&k| k as u32));
        }
        b.labels.extend(split.labels[i * c..(i + 1) * c].iter().map(|&y| y as f32));
    }
    b.classes = classes;
    b
}

/// Texts `texts` of a split as one packed batch; each text carries its image's labels.
pub fn text_batch(meta: &Meta, split: &Split, texts: &[usize]) -> TextBatch {
    let (t, c) = (meta.max_tokens, meta.num_labels);
    let mut b = TextBatch::default();
    for &j in texts {
        let n = split.text_length[j] as usize;
        b.lengths.push(n);
        b.tokens.extend_from_slice(&split.text_tokens[j * t..j * t + n]);
        let i = split.text_item[j] as usize;
        b.labels.extend(split.labels[i * c..(i + 1) * c].iter().map(|&y| y as f32));
    }
    b
}

/// Algorithm 1's sampling: each epoch visits every image once in a seeded random order,
/// paired with one of its texts drawn at random. Step s always gets the same pairs.
#[derive(Clone, Debug)]
pub struct PairSampler {
    seed: u64,
    images: usize,
    texts_of: Vec<Vec<usize>>,
    batch: usize,
}

impl PairSampler {
    pub fn new(split: &Split, batch: usize, seed: u64) -> Self {
        let texts_of = split.image_texts();
        PairSampler { seed, images: split.num_images(), texts_of, batch: batch.max(1) }
    }

    /// Images that have at least one text are the ones sampled.
    fn usable(&self) -> Vec<usize> {
        (0..self.images).filter(|&i| !self.texts_of[i].is_empty()).collect()
    }

    pub fn steps_per_epoch(&self) -> usize {
        self.usable().len() / self.batch
    }

    /// The (image, text) pairs of global step `step` (0-based).
    pub fn pairs(&self, step: u64) -> Vec<(usize, usize)> {
        let per_epoch = self.steps_per_epoch().max(1) as u64;
        let (epoch, k) = (step / per_epoch, (step % per_epoch) as usize);
        let mut order = self.usable();
        Rng::derive(self.seed, epoch).shuffle(&mut order);
        let mut pick = Rng::derive(self.seed ^ 0x7E57, step);
        order
            .iter()
            .cycle()
            .skip(k * self.batch)
            .take(self.batch)
            .map(|&i| (i, self.texts_of[i][pick.below(self.texts_of[i].len())]))
            .collect()
    }
}
