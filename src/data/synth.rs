//! Deterministic synthetic data (DESIGN.md §6): label sets from a topic co-occurrence model (or a
//! given label matrix), images as noisy label prototypes among background clutter, texts as label
//! words among filler and confuser words. Four knobs set how informative each modality is.
//!
//! **Labels.** `max(1, round(C/4))` latent topics; each label belongs to one topic (a random,
//! balanced partition) and has a popularity `u_c ∈ [0.5, 1.5)`. An item draws one topic, or two
//! with probability 0.3; label c is then on with probability `1 − Π_t (1 − p(c|t))`, where
//! `p(c|t) = min(0.95, u_c · (0.5 if c is in topic t else 0.03))`. Empty sets get one label of the
//! first topic; sets above [`MAX_LABELS`] keep a random [`MAX_LABELS`]. About 2.5 labels per item.
//!
//! **Images.** Each label owns [`PROTOS_PER_LABEL`] region prototypes, and there are
//! [`CLUTTER_PROTOS`] clutter prototypes; every prototype is a N(0, I) vector in R^Dr (norm ≈ √Dr)
//! with its own object class (distinct when K_obj allows, else shared round-robin). An image has
//! a region count uniform in [⌈R/3⌉, R]; each region comes, with probability `image_signal`, from
//! a prototype of one of the item's labels (label uniform, prototype uniform), else from a clutter
//! prototype. The feature is `(prototype + image_noise · ε) / √(1 + image_noise²)`, ε ~ N(0, I), so
//! every dimension has unit variance whatever the noise: `image_noise` is the noise-to-prototype
//! norm ratio. Boxes are random valid boxes (x1 < x2, y1 < y2 in [0, 1], area = (x2−x1)(y2−y1));
//! classes are the prototypes' classes. Padding regions are zero.
//!
//! **Texts.** Each label owns `W = clamp((V−3)/(4C), 1, 16)` words with Zipf weights 1/(j+1); the
//! rest of the vocabulary is filler words (Zipf). A text has a length uniform in [max(1, T/4), T];
//! each token is a word of one of the item's labels with probability `text_signal`, a confuser (a
//! word of a label the item does not have) with probability `text_confuser`, else a filler word.
//! Vocabulary: `[PAD] [UNK] [MASK]`, then `<label>.w<j>`, then `filler<j>`.
//!
//! **Determinism.** The world (topics, prototypes, words) comes from `Rng::derive(seed, 0)`; each
//! split has its own label, image and text streams, and each item its own stream derived from
//! those (`Rng::derive(stream_seed, item)`). So the same seed gives a bitwise identical dataset, a
//! larger split starts with the same items as a smaller one, and the image of an item does not
//! depend on the text knobs (nor the text on the image knobs): presets that differ in one
//! modality share labels and the other modality exactly.

use std::fmt;
use std::str::FromStr;

use super::dataset::{Dataset, Split};
use super::format::{Meta, RESERVED_TOKENS};
use crate::rng::Rng;
use crate::{Error, Result};

/// Region prototypes per label.
pub const PROTOS_PER_LABEL: usize = 3;
/// Background clutter prototypes.
pub const CLUTTER_PROTOS: usize = 16;
/// At most this many labels per generated item.
pub const MAX_LABELS: usize = 5;

/// The MIRFlickr-25K concept names, used (for readability) as the first label names.
const LABEL_NAMES: [&str; 24] = [
    "animals",
    "baby",
    "bird",
    "car",
    "clouds",
    "dog",
    "female",
    "flower",
    "food",
    "indoor",
    "lake",
    "male",
    "night",
    "people",
    "plant_life",
    "portrait",
    "river",
    "sea",
    "sky",
    "structures",
    "sunset",
    "transport",
    "tree",
    "water",
];

/// Which modality is strong.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SynthPreset {
    /// Both modalities informative.
    Balanced,
    /// Images clearly weaker than texts (texts as in `Balanced`).
    WeakImage,
    /// Texts clearly weaker than images (images as in `Balanced`).
    WeakText,
}

impl SynthPreset {
    pub const ALL: [SynthPreset; 3] = [SynthPreset::Balanced, SynthPreset::WeakImage, SynthPreset::WeakText];

    pub fn name(self) -> &'static str {
        match self {
            SynthPreset::Balanced => "balanced",
            SynthPreset::WeakImage => "weak-image",
            SynthPreset::WeakText => "weak-text",
        }
    }
}

impl fmt::Display for SynthPreset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SynthPreset {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        SynthPreset::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| Error::config(format!("unknown synthetic preset {s:?} (balanced, weak-image, weak-text)")))
    }
}

/// Everything [`generate`] needs. Start from [`SynthConfig::preset`] and change fields.
#[derive(Clone, Debug, PartialEq)]
pub struct SynthConfig {
    pub preset: SynthPreset,
    pub seed: u64,
    /// Images per split.
    pub train: usize,
    pub val: usize,
    pub test: usize,
    /// C.
    pub num_labels: usize,
    /// R.
    pub regions: usize,
    /// Dr.
    pub feature_dim: usize,
    /// T.
    pub max_tokens: usize,
    /// V, reserved ids included.
    pub vocab_size: usize,
    /// K_obj.
    pub num_object_classes: usize,
    /// Texts per image (≥ 1).
    pub texts_per_image: usize,
    /// Probability that a region shows one of the item's labels (else clutter).
    pub image_signal: f32,
    /// Noise norm relative to the prototype norm (per-dimension noise std / prototype std).
    pub image_noise: f32,
    /// Probability that a token is a word of one of the item's labels.
    pub text_signal: f32,
    /// Probability that a token is a word of a label the item does not have.
    pub text_confuser: f32,
    /// A given label matrix `[train + val + test, C]` (rows in split order: train, val, test),
    /// e.g. the real MIRFlickr-25K labels, instead of the topic model.
    pub labels: Option<Vec<u8>>,
}

impl SynthConfig {
    /// Sizes for the `small` model preset (R = 36, Dr = 256, T = 24, V = 2000, C = 24,
    /// K_obj = 100; 4000/500/1000 images, one text each) and the preset's knobs:
    ///
    /// | preset | image_signal | image_noise | text_signal | text_confuser |
    /// |---|---|---|---|---|
    /// | balanced | 0.30 | 2.0 | 0.40 | 0.10 |
    /// | weak-image | 0.15 | 2.5 | 0.40 | 0.10 |
    /// | weak-text | 0.30 | 2.0 | 0.25 | 0.20 |
    ///
    /// Calibration (seed 7, these sizes; test-split NDCG@100 ×100, same-modality retrieval with
    /// the predicted label probabilities of a probe trained 15 epochs as embeddings; chance 27,
    /// true labels 97): `balanced` images 69 (max-over-regions logistic probe; mean-pooled
    /// logistic 59), texts 71 (bag-of-words logistic, near the Bayes limit: a text holds few
    /// label words); `weak-image` images 46; `weak-text` texts 51. The weak side stays well above
    /// chance (learnable) and well below the strong side; a transformer, which can attend to the
    /// few label regions, should do at least as well as the probes on images.
    pub fn preset(p: SynthPreset, seed: u64) -> Self {
        let (image_signal, image_noise, text_signal, text_confuser) = match p {
            SynthPreset::Balanced => (BALANCED.0, BALANCED.1, BALANCED.2, BALANCED.3),
            SynthPreset::WeakImage => (WEAK.0, WEAK.1, BALANCED.2, BALANCED.3),
            SynthPreset::WeakText => (BALANCED.0, BALANCED.1, WEAK.2, WEAK.3),
        };
        SynthConfig {
            preset: p,
            seed,
            train: 4000,
            val: 500,
            test: 1000,
            num_labels: 24,
            regions: 36,
            feature_dim: 256,
            max_tokens: 24,
            vocab_size: 2000,
            num_object_classes: 100,
            texts_per_image: 1,
            image_signal,
            image_noise,
            text_signal,
            text_confuser,
            labels: None,
        }
    }

    /// Words per label for this configuration.
    pub fn words_per_label(&self) -> usize {
        (self.vocab_size.saturating_sub(3) / (4 * self.num_labels.max(1))).clamp(1, 16)
    }

    fn check(&self) -> Result<()> {
        let bad = |what: String| Err(Error::config(format!("synth: {what}")));
        let max16 = u16::MAX as usize;
        if self.num_labels == 0 {
            return bad("num_labels must be ≥ 1".into());
        }
        if self.regions == 0 || self.regions > max16 {
            return bad(format!("regions {} outside 1..={max16}", self.regions));
        }
        if self.feature_dim == 0 {
            return bad("feature_dim must be ≥ 1".into());
        }
        if self.max_tokens == 0 || self.max_tokens > max16 {
            return bad(format!("max_tokens {} outside 1..={max16}", self.max_tokens));
        }
        if self.num_object_classes == 0 || self.num_object_classes > max16 + 1 {
            return bad(format!("num_object_classes {} outside 1..=65536", self.num_object_classes));
        }
        if self.texts_per_image == 0 {
            return bad("texts_per_image must be ≥ 1".into());
        }
        let need = RESERVED_TOKENS.len() + self.num_labels * self.words_per_label() + 1;
        if self.vocab_size < need || self.vocab_size > u32::MAX as usize {
            return bad(format!(
                "vocab_size {} too small: need ≥ {need} (3 reserved, ≥ 1 word per label, ≥ 1 filler)",
                self.vocab_size
            ));
        }
        for (name, p) in [
            ("image_signal", self.image_signal),
            ("text_signal", self.text_signal),
            ("text_confuser", self.text_confuser),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return bad(format!("{name} {p} outside [0, 1]"));
            }
        }
        if self.text_signal + self.text_confuser > 1.0 {
            return bad(format!("text_signal {} + text_confuser {} exceeds 1", self.text_signal, self.text_confuser));
        }
        if !(self.image_noise.is_finite() && self.image_noise >= 0.0) {
            return bad(format!("image_noise {} must be finite and ≥ 0", self.image_noise));
        }
        let Some(n) = self.train.checked_add(self.val).and_then(|n| n.checked_add(self.test)) else {
            return bad("train + val + test overflows".into());
        };
        if n > u32::MAX as usize || n.checked_mul(self.texts_per_image).is_none_or(|m| m > u32::MAX as usize) {
            return bad(format!("{n} images × {} texts exceed u32 ids", self.texts_per_image));
        }
        // The dataset is generated in memory, then copied into shards: refused up front when
        // that cannot fit, rather than met by an allocation failure half-way.
        let per_image = 4 * self.regions * (self.feature_dim + 6)
            + self.num_labels
            + 4 * self.texts_per_image * (self.max_tokens + 2);
        let need = 2.0 * n as f64 * per_image as f64;
        if let Some(available) = crate::io::host_available_memory()
            && need > available as f64
        {
            let gib = |b: f64| b / (1u64 << 30) as f64;
            return bad(format!(
                "{n} images need about {:.1} GiB to generate, more than the {:.1} GiB available",
                gib(need),
                gib(available as f64)
            ));
        }
        if let Some(labels) = &self.labels {
            let c = self.num_labels;
            if labels.len() != n * c {
                return bad(format!(
                    "given label matrix has {} values, expected [{n}, {c}] (train + val + test rows)",
                    labels.len()
                ));
            }
            for (i, row) in labels.chunks_exact(c).enumerate() {
                if let Some(p) = row.iter().position(|&y| y > 1) {
                    return bad(format!("given labels: row {i}, label {p} has value {}, expected 0/1", row[p]));
                }
                if !row.contains(&1) {
                    return bad(format!("given labels: row {i} has no label"));
                }
            }
        }
        Ok(())
    }
}

/// (image_signal, image_noise, text_signal, text_confuser) of `balanced`.
/// Image: ~2.4 label regions per label of an average item; noise makes single regions ambiguous
/// for a linear read-out but not for a few regions together. Text: ~1.9 label words per label.
const BALANCED: (f32, f32, f32, f32) = (0.30, 2.0, 0.40, 0.10);
/// The weak modality's knobs (each weak preset uses only its weak side): half the label regions
/// (≈ 30% of an item's labels have no region at all) and more noise; fewer label words and twice
/// the confusers.
const WEAK: (f32, f32, f32, f32) = (0.15, 2.5, 0.25, 0.20);

/// The fixed random structure shared by all splits.
struct World {
    /// Topic of each label.
    topic_of: Vec<usize>,
    /// Labels of each topic.
    topics: Vec<Vec<usize>>,
    popularity: Vec<f64>,
    /// [C·P + Q, Dr]: label prototypes (label-major), then clutter.
    prototypes: Vec<f32>,
    /// Object class of each prototype.
    proto_class: Vec<u16>,
    /// Cumulative Zipf weights of a label's words (shared shape for every label).
    word_cdf: Vec<f64>,
    /// Cumulative Zipf weights of the filler words.
    filler_cdf: Vec<f64>,
}

fn zipf_cdf(n: usize) -> Vec<f64> {
    let mut acc = 0.0;
    let mut cdf: Vec<f64> = (0..n)
        .map(|j| {
            acc += 1.0 / (j + 1) as f64;
            acc
        })
        .collect();
    for x in &mut cdf {
        *x /= acc;
    }
    cdf
}

fn sample_cdf(rng: &mut Rng, cdf: &[f64]) -> usize {
    let u = rng.uniform();
    cdf.partition_point(|&x| x <= u).min(cdf.len() - 1)
}

impl World {
    fn new(cfg: &SynthConfig) -> World {
        let mut rng = Rng::derive(cfg.seed, 0);
        let c = cfg.num_labels;
        let n_topics = ((c as f64 / 4.0).round() as usize).max(1);
        let mut order: Vec<usize> = (0..c).collect();
        rng.shuffle(&mut order);
        let mut topic_of = vec![0; c];
        let mut topics = vec![Vec::new(); n_topics];
        for (i, &label) in order.iter().enumerate() {
            topic_of[label] = i % n_topics;
            topics[i % n_topics].push(label);
        }
        for t in &mut topics {
            t.sort_unstable();
        }
        let popularity = (0..c).map(|_| 0.5 + rng.uniform()).collect();

        let n_protos = c * PROTOS_PER_LABEL + CLUTTER_PROTOS;
        let prototypes = (0..n_protos * cfg.feature_dim).map(|_| rng.normal() as f32).collect();
        let k_obj = cfg.num_object_classes;
        let mut classes: Vec<u16> = (0..k_obj).map(|k| k as u16).collect();
        rng.shuffle(&mut classes);
        let proto_class = (0..n_protos).map(|p| classes[p % k_obj]).collect();

        let w = cfg.words_per_label();
        let fillers = cfg.vocab_size - RESERVED_TOKENS.len() - c * w;
        World {
            topic_of,
            topics,
            popularity,
            prototypes,
            proto_class,
            word_cdf: zipf_cdf(w),
            filler_cdf: zipf_cdf(fillers),
        }
    }

    /// One label set from the topic model, as a sorted list.
    fn sample_labels(&self, rng: &mut Rng) -> Vec<usize> {
        let n_topics = self.topics.len();
        let first = rng.below(n_topics);
        let mut chosen = vec![first];
        if n_topics > 1 && rng.bernoulli(0.3) {
            let other = (first + 1 + rng.below(n_topics - 1)) % n_topics;
            chosen.push(other);
        }
        let mut set: Vec<usize> = Vec::new();
        for (c, &u) in self.popularity.iter().enumerate() {
            let off: f64 = chosen
                .iter()
                .map(|&t| {
                    let base = if self.topic_of[c] == t { 0.5 } else { 0.03 };
                    1.0 - (base * u).min(0.95)
                })
                .product();
            if rng.bernoulli(1.0 - off) {
                set.push(c);
            }
        }
        if set.is_empty() {
            let group = &self.topics[first];
            set.push(group[rng.below(group.len())]);
        }
        if set.len() > MAX_LABELS {
            rng.shuffle(&mut set);
            set.truncate(MAX_LABELS);
            set.sort_unstable();
        }
        set
    }
}

/// Per-split stream seeds: labels, images, texts.
fn split_streams(seed: u64, split: usize) -> [u64; 3] {
    [16, 32, 48].map(|base| Rng::derive(seed, base + split as u64).next_u64())
}

/// Generates the dataset described by `cfg` (validated before it is returned).
pub fn generate(cfg: &SynthConfig) -> Result<Dataset> {
    cfg.check()?;
    let world = World::new(cfg);
    let c = cfg.num_labels;
    let w = cfg.words_per_label();
    let mut vocab: Vec<String> = RESERVED_TOKENS.iter().map(|s| s.to_string()).collect();
    let label_names: Vec<String> =
        (0..c).map(|l| LABEL_NAMES.get(l).map_or_else(|| format!("label{l}"), |s| s.to_string())).collect();
    for name in &label_names {
        vocab.extend((0..w).map(|j| format!("{name}.w{j}")));
    }
    let fillers = cfg.vocab_size - vocab.len();
    vocab.extend((0..fillers).map(|j| format!("filler{j}")));
    let meta = Meta {
        name: format!("synth-{}-{}", cfg.preset, cfg.seed),
        regions: cfg.regions,
        feature_dim: cfg.feature_dim,
        max_tokens: cfg.max_tokens,
        num_labels: c,
        num_object_classes: cfg.num_object_classes,
        vocab,
        label_names,
    };

    let sizes = [cfg.train, cfg.val, cfg.test];
    let mut splits = Vec::with_capacity(3);
    let mut row0 = 0;
    for (s, &n) in sizes.iter().enumerate() {
        let [label_seed, image_seed, text_seed] = split_streams(cfg.seed, s);
        let label_sets: Vec<Vec<usize>> = (0..n)
            .map(|i| match &cfg.labels {
                Some(given) => {
                    let row = &given[(row0 + i) * c..(row0 + i + 1) * c];
                    (0..c).filter(|&l| row[l] == 1).collect()
                }
                None => world.sample_labels(&mut Rng::derive(label_seed, i as u64)),
            })
            .collect();
        row0 += n;
        splits.push(generate_split(cfg, &world, &label_sets, image_seed, text_seed));
    }
    let test = splits.pop().expect("three splits");
    let val = splits.pop().expect("three splits");
    let train = splits.pop().expect("three splits");
    let ds = Dataset { meta, train, val, test };
    ds.validate()?;
    Ok(ds)
}

fn generate_split(
    cfg: &SynthConfig,
    world: &World,
    label_sets: &[Vec<usize>],
    image_seed: u64,
    text_seed: u64,
) -> Split {
    let n = label_sets.len();
    let (r, dr, t, c) = (cfg.regions, cfg.feature_dim, cfg.max_tokens, cfg.num_labels);
    let tpi = cfg.texts_per_image;
    let mut s = Split {
        image_features: vec![0.0; n * r * dr],
        image_boxes: vec![0.0; n * r * 5],
        image_count: vec![0; n],
        image_classes: Some(vec![0; n * r]),
        text_tokens: vec![0; n * tpi * t],
        text_length: vec![0; n * tpi],
        text_item: vec![0; n * tpi],
        labels: vec![0; n * c],
    };
    let noise = cfg.image_noise as f64;
    let scale = 1.0 / (1.0 + noise * noise).sqrt();
    let min_regions = r.div_ceil(3).max(1);
    let min_len = (t / 4).max(1);
    let w = cfg.words_per_label();
    let filler0 = RESERVED_TOKENS.len() + c * w;
    let classes = s.image_classes.as_mut().expect("generated with classes");

    for (i, set) in label_sets.iter().enumerate() {
        for &l in set {
            s.labels[i * c + l] = 1;
        }

        // Image.
        let mut rng = Rng::derive(image_seed, i as u64);
        let count = min_regions + rng.below(r - min_regions + 1);
        s.image_count[i] = count as u16;
        for k in 0..count {
            let proto = if rng.bernoulli(cfg.image_signal as f64) {
                set[rng.below(set.len())] * PROTOS_PER_LABEL + rng.below(PROTOS_PER_LABEL)
            } else {
                c * PROTOS_PER_LABEL + rng.below(CLUTTER_PROTOS)
            };
            let p = &world.prototypes[proto * dr..(proto + 1) * dr];
            let f = &mut s.image_features[(i * r + k) * dr..(i * r + k + 1) * dr];
            for (x, &pv) in f.iter_mut().zip(p) {
                *x = ((pv as f64 + noise * rng.normal()) * scale) as f32;
            }
            classes[i * r + k] = world.proto_class[proto];
            let (x1, x2) = random_span(&mut rng);
            let (y1, y2) = random_span(&mut rng);
            s.image_boxes[(i * r + k) * 5..(i * r + k + 1) * 5].copy_from_slice(&[
                x1,
                y1,
                x2,
                y2,
                (x2 - x1) * (y2 - y1),
            ]);
        }

        // Texts.
        let others: Vec<usize> = (0..c).filter(|l| !set.contains(l)).collect();
        let mut rng = Rng::derive(text_seed, i as u64);
        for k in 0..tpi {
            let j = i * tpi + k;
            s.text_item[j] = i as u32;
            let len = min_len + rng.below(t - min_len + 1);
            s.text_length[j] = len as u16;
            for tok in &mut s.text_tokens[j * t..j * t + len] {
                let u = rng.uniform();
                let label = if u < cfg.text_signal as f64 {
                    Some(set[rng.below(set.len())])
                } else if u < (cfg.text_signal + cfg.text_confuser) as f64 && !others.is_empty() {
                    Some(others[rng.below(others.len())])
                } else {
                    None
                };
                *tok = match label {
                    Some(l) => (RESERVED_TOKENS.len() + l * w + sample_cdf(&mut rng, &world.word_cdf)) as u32,
                    None => (filler0 + sample_cdf(&mut rng, &world.filler_cdf)) as u32,
                };
            }
        }
    }
    s
}

/// A random interval [a, b] ⊂ [0, 1] with b − a ≥ 0.05.
fn random_span(rng: &mut Rng) -> (f32, f32) {
    let a = 0.9 * rng.uniform();
    let b = a + 0.05 + (1.0 - a - 0.05) * rng.uniform();
    (a as f32, (b as f32).min(1.0))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small configuration that exercises everything (several texts per image, classes).
    pub(crate) fn tiny(preset: SynthPreset, seed: u64) -> SynthConfig {
        SynthConfig {
            train: 60,
            val: 20,
            test: 30,
            num_labels: 6,
            regions: 8,
            feature_dim: 16,
            max_tokens: 10,
            vocab_size: 200,
            num_object_classes: 40,
            texts_per_image: 3,
            ..SynthConfig::preset(preset, seed)
        }
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    fn same_bits(a: &Dataset, b: &Dataset) -> bool {
        a == b
            && a.splits()
                .iter()
                .zip(b.splits())
                .all(|((_, x), (_, y))| bits(&x.image_features) == bits(&y.image_features))
    }

    #[test]
    fn same_seed_gives_bitwise_identical_dataset() {
        let cfg = tiny(SynthPreset::Balanced, 11);
        let (a, b) = (generate(&cfg).unwrap(), generate(&cfg).unwrap());
        assert!(same_bits(&a, &b));
        let c = generate(&tiny(SynthPreset::Balanced, 12)).unwrap();
        assert!(a.train.image_features != c.train.image_features);
        assert!(a.train.text_tokens != c.train.text_tokens);
        assert_eq!(a.meta.name, "synth-balanced-11");
    }

    #[test]
    fn every_preset_validates_with_expected_shapes() {
        for p in SynthPreset::ALL {
            let cfg = tiny(p, 3);
            let ds = generate(&cfg).unwrap();
            ds.validate().unwrap();
            for ((name, s), n) in ds.splits().into_iter().zip([60, 20, 30]) {
                assert_eq!(s.num_images(), n, "{name}");
                assert_eq!(s.num_texts(), 3 * n, "{name}");
                assert_eq!(s.image_features.len(), n * 8 * 16);
                for (j, &item) in s.text_item.iter().enumerate() {
                    assert_eq!(item as usize, j / 3);
                }
                for &count in &s.image_count {
                    assert!((3..=8).contains(&count), "{count}");
                }
                for &len in &s.text_length {
                    assert!((2..=10).contains(&len), "{len}");
                }
                for b in s.image_boxes.chunks_exact(5) {
                    if b[4] > 0.0 {
                        assert!(b[0] < b[2] && b[1] < b[3]);
                        assert!((b[4] - (b[2] - b[0]) * (b[3] - b[1])).abs() < 1e-6);
                    }
                }
            }
            assert_eq!(ds.meta.vocab.len(), 200);
            assert_eq!(ds.meta.vocab[3], "animals.w0");
            assert_eq!(ds.meta.vocab[199], format!("filler{}", 200 - 3 - 6 * 8 - 1));
        }
    }

    #[test]
    fn splits_use_independent_streams_and_items_do_not_depend_on_split_size() {
        let cfg = tiny(SynthPreset::Balanced, 5);
        let ds = generate(&cfg).unwrap();
        let k = 20 * 8 * 16;
        assert!(ds.train.image_features[..k] != ds.val.image_features[..k]);
        assert!(ds.train.labels[..20 * 6] != ds.val.labels[..20 * 6]);
        let bigger = generate(&SynthConfig { train: 90, ..cfg }).unwrap();
        let first60: Vec<usize> = (0..60).collect();
        assert!(bigger.train.subset(&first60) == ds.train);
        assert!(bigger.test == ds.test);
    }

    #[test]
    fn presets_differ_only_in_their_weak_modality() {
        let (b, wi, wt) = (SynthPreset::Balanced, SynthPreset::WeakImage, SynthPreset::WeakText);
        let (cb, ci, ct) = (SynthConfig::preset(b, 1), SynthConfig::preset(wi, 1), SynthConfig::preset(wt, 1));
        assert!(ci.image_signal < cb.image_signal && ci.image_noise > cb.image_noise);
        assert_eq!((ci.text_signal, ci.text_confuser), (cb.text_signal, cb.text_confuser));
        assert!(ct.text_signal < cb.text_signal && ct.text_confuser > cb.text_confuser);
        assert_eq!((ct.image_signal, ct.image_noise), (cb.image_signal, cb.image_noise));
        assert_eq!((cb.regions, cb.feature_dim, cb.max_tokens, cb.vocab_size), (36, 256, 24, 2000));
        assert_eq!((cb.num_labels, cb.num_object_classes), (24, 100));
        assert_eq!((cb.train, cb.val, cb.test), (4000, 500, 1000));

        let (db, di, dt) =
            (generate(&tiny(b, 9)).unwrap(), generate(&tiny(wi, 9)).unwrap(), generate(&tiny(wt, 9)).unwrap());
        assert_eq!(db.train.labels, di.train.labels);
        assert_eq!(db.train.text_tokens, di.train.text_tokens);
        assert!(db.train.image_features != di.train.image_features);
        assert_eq!(db.train.image_features, dt.train.image_features);
        assert!(db.train.text_tokens != dt.train.text_tokens);
    }

    #[test]
    fn preset_names_round_trip() {
        for p in SynthPreset::ALL {
            assert_eq!(p.to_string().parse::<SynthPreset>().unwrap(), p);
        }
        assert_eq!("weak-image".parse::<SynthPreset>().unwrap(), SynthPreset::WeakImage);
        let e = "strong".parse::<SynthPreset>().unwrap_err().to_string();
        assert!(e.contains("strong"), "{e}");
    }

    #[test]
    fn label_frequencies_and_cooccurrence_are_sane() {
        let cfg = SynthConfig {
            train: 3000,
            val: 0,
            test: 0,
            regions: 3,
            feature_dim: 1,
            max_tokens: 4,
            ..SynthConfig::preset(SynthPreset::Balanced, 21)
        };
        let ds = generate(&cfg).unwrap();
        let (n, c) = (ds.train.num_images(), cfg.num_labels);
        let y = &ds.train.labels;
        let per_item: Vec<usize> = y.chunks(c).map(|r| r.iter().map(|&v| v as usize).sum()).collect();
        assert!(per_item.iter().all(|&k| (1..=MAX_LABELS).contains(&k)));
        let mean = per_item.iter().sum::<usize>() as f64 / n as f64;
        assert!((2.0..4.0).contains(&mean), "mean labels per item {mean}");
        let freq: Vec<f64> = (0..c).map(|l| (0..n).filter(|&i| y[i * c + l] == 1).count() as f64 / n as f64).collect();
        for (l, &f) in freq.iter().enumerate() {
            assert!((0.02..0.5).contains(&f), "label {l} frequency {f}");
        }
        // Labels of one topic co-occur more than independence predicts, others less.
        let world = World::new(&cfg);
        let (mut same, mut cross) = ((0.0, 0), (0.0, 0));
        for a in 0..c {
            for b in a + 1..c {
                let both = (0..n).filter(|&i| y[i * c + a] == 1 && y[i * c + b] == 1).count() as f64 / n as f64;
                let lift = both / (freq[a] * freq[b]);
                let acc = if world.topic_of[a] == world.topic_of[b] { &mut same } else { &mut cross };
                acc.0 += lift;
                acc.1 += 1;
            }
        }
        let (same, cross) = (same.0 / same.1 as f64, cross.0 / cross.1 as f64);
        assert!(same > 2.0 && cross < 1.0, "co-occurrence lift: same topic {same}, across {cross}");
    }

    /// The knobs mean what they say: the share of label regions and of label/confuser words
    /// matches the configured probabilities, and noisy regions stay nearest their prototype.
    #[test]
    fn knobs_set_the_share_of_signal_in_each_modality() {
        let cfg = SynthConfig { train: 400, val: 0, test: 0, feature_dim: 64, ..tiny(SynthPreset::Balanced, 4) };
        let ds = generate(&cfg).unwrap();
        let world = World::new(&cfg);
        let (s, r, dr, t, c) = (&ds.train, cfg.regions, cfg.feature_dim, cfg.max_tokens, cfg.num_labels);
        let classes = s.image_classes.as_ref().unwrap();
        let (mut regions, mut signal, mut nearest_ok) = (0, 0, 0);
        for i in 0..s.num_images() {
            for k in 0..s.image_count[i] as usize {
                regions += 1;
                let proto_of_class = world.proto_class.iter().position(|&x| x == classes[i * r + k]).unwrap();
                if proto_of_class < c * PROTOS_PER_LABEL {
                    assert_eq!(s.labels[i * c + proto_of_class / PROTOS_PER_LABEL], 1);
                    signal += 1;
                }
                let x = &s.image_features[(i * r + k) * dr..(i * r + k + 1) * dr];
                let dist = |p: usize| -> f32 {
                    let q = &world.prototypes[p * dr..(p + 1) * dr];
                    let scale = 1.0 / (1.0 + cfg.image_noise * cfg.image_noise).sqrt();
                    x.iter().zip(q).map(|(a, b)| (a - b * scale).powi(2)).sum()
                };
                let best = (0..world.proto_class.len()).min_by(|&a, &b| dist(a).total_cmp(&dist(b))).unwrap();
                nearest_ok += (best == proto_of_class) as usize;
            }
        }
        let share = signal as f64 / regions as f64;
        assert!((share - cfg.image_signal as f64).abs() < 0.03, "label-region share {share}");
        let nearest = nearest_ok as f64 / regions as f64;
        assert!(nearest > 0.9, "regions nearest to their own prototype: {nearest}");

        let w = cfg.words_per_label();
        let (mut tokens, mut own, mut confuser) = (0, 0, 0);
        for j in 0..s.num_texts() {
            let item = s.text_item[j] as usize;
            for &tok in &s.text_tokens[j * t..j * t + s.text_length[j] as usize] {
                tokens += 1;
                let id = tok as usize - 3;
                if id < c * w {
                    if s.labels[item * c + id / w] == 1 {
                        own += 1;
                    } else {
                        confuser += 1;
                    }
                }
            }
        }
        let (own, confuser) = (own as f64 / tokens as f64, confuser as f64 / tokens as f64);
        assert!((own - cfg.text_signal as f64).abs() < 0.03, "label-word share {own}");
        assert!((confuser - cfg.text_confuser as f64).abs() < 0.03, "confuser share {confuser}");
    }

    #[test]
    fn given_labels_are_used_row_by_row_in_split_order() {
        let mut cfg = tiny(SynthPreset::WeakText, 2);
        let n = cfg.train + cfg.val + cfg.test;
        let c = cfg.num_labels;
        let labels: Vec<u8> = (0..n * c).map(|k| (k / c + k % c).is_multiple_of(3) as u8).collect();
        cfg.labels = Some(labels.clone());
        let ds = generate(&cfg).unwrap();
        let got: Vec<u8> = [&ds.train, &ds.val, &ds.test].iter().flat_map(|s| s.labels.clone()).collect();
        assert_eq!(got, labels);

        cfg.labels = Some(labels[c..].to_vec());
        let e = generate(&cfg).unwrap_err().to_string();
        assert!(e.contains("given label matrix"), "{e}");
        let mut empty_row = labels.clone();
        empty_row[5 * c..6 * c].fill(0);
        cfg.labels = Some(empty_row);
        let e = generate(&cfg).unwrap_err().to_string();
        assert!(e.contains("row 5 has no label"), "{e}");
    }

    #[test]
    fn bad_configurations_are_errors() {
        let base = tiny(SynthPreset::Balanced, 1);
        let cases: Vec<(SynthConfig, &str)> = vec![
            (SynthConfig { vocab_size: 9, ..base.clone() }, "vocab_size"),
            (SynthConfig { image_signal: 1.5, ..base.clone() }, "image_signal"),
            (SynthConfig { text_signal: 0.7, text_confuser: 0.5, ..base.clone() }, "exceeds 1"),
            (SynthConfig { image_noise: f32::NAN, ..base.clone() }, "image_noise"),
            (SynthConfig { texts_per_image: 0, ..base.clone() }, "texts_per_image"),
            (SynthConfig { num_labels: 0, ..base.clone() }, "num_labels"),
            (SynthConfig { regions: 0, ..base.clone() }, "regions"),
            (SynthConfig { num_object_classes: 0, ..base.clone() }, "num_object_classes"),
        ];
        for (cfg, want) in cases {
            let e = generate(&cfg).unwrap_err();
            assert!(matches!(e, Error::Config { .. }) && e.to_string().contains(want), "{e}");
        }
    }

    #[test]
    fn odd_shapes_generate_valid_data() {
        // One label, one region, one token, few object classes (shared round-robin).
        let cfg = SynthConfig {
            num_labels: 1,
            regions: 1,
            max_tokens: 1,
            vocab_size: 5,
            num_object_classes: 2,
            train: 5,
            val: 0,
            test: 1,
            ..tiny(SynthPreset::WeakImage, 8)
        };
        let ds = generate(&cfg).unwrap();
        assert_eq!(ds.train.image_count, vec![1; 5]);
        assert_eq!(ds.val.num_images(), 0);
        assert!(ds.train.labels.iter().all(|&y| y == 1));
    }
}
