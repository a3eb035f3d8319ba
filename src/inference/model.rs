//! A trained model as a library user sees it: one self-contained checkpoint in, normalised
//! embeddings of texts and images out, no dataset and no labels needed.

use std::collections::HashMap;

use rayon::prelude::*;
use std::path::{Path, PathBuf};

use crate::backend::Backend;
use crate::checkpoint::{Checkpoint, InferenceSpec};
use crate::data::format::{Layout, PAD, UNK};
use crate::data::reader::SplitReader;
use crate::eval::metrics::normalize_rows;
use crate::model::{Batch, EmbeddingKind, Features, ImageBatch, ModelConfig, SemShare, TextBatch};
use crate::nn::{Bf16Copy, Weights};
use crate::tensor::Tensor;
use crate::{Error, Result};

use super::{EMBED_CHUNK, upload_model};

/// A trained model on a device, ready to embed texts and images for retrieval.
///
/// Every embedding is an L2-normalised `f32` row, so the cosine similarity of a text and an
/// image is the dot product of their rows. Which embedding (`pooled` z or the `label`
/// embedding) is the one the checkpoint was selected with, or `pooled` for a checkpoint that
/// does not record it; [`Model::set_embedding`] chooses the other.
///
/// Inputs are checked, never trusted: wrong widths, empty inputs, too many regions or tokens,
/// ids outside the vocabulary and non-finite values are errors naming the item.
///
/// ```
/// # fn main() -> semshare::Result<()> {
/// # let path = semshare::inference::tiny_checkpoint("model")?;
/// use semshare::{Model, inference::Regions};
///
/// // `path`: a checkpoint of `semshare train`, e.g. the `best.safetensors` `semshare demo`
/// // writes to `$TMPDIR/semshare-demo`.
/// let mut model = Model::load(&path, semshare::backend::open("cpu")?)?;
/// let texts = model.embed_texts(&["sky clouds", "a dog by the sea"])?;
/// let images = model.embed_images(&[Regions::new(&[0.5; 8])])?; // two regions of width 4
/// assert_eq!((texts.len(), images.len(), texts.dim), (2, 1, 8));
/// // Rows are unit vectors: a dot product is the cosine.
/// let cosine: f32 = texts.row(0).iter().zip(images.row(0)).map(|(a, b)| a * b).sum();
/// assert!(cosine.abs() <= 1.0 + 1e-5);
/// // The texts closest to the image, best first.
/// let hits = model.search(&images, &texts, 2)?;
/// assert_eq!(hits[0].ids.len(), 2);
/// # std::fs::remove_file(&path).ok();
/// # Ok(())
/// # }
/// ```
pub struct Model {
    dev: Box<dyn Backend>,
    net: SemShare,
    params: Tensor,
    /// The trunk's bf16 copy on a device with bf16 activations, made once at load.
    bf16: Option<Bf16Copy>,
    spec: InferenceSpec,
    embedding: EmbeddingKind,
    /// Word → id of the stored vocabulary (None for a checkpoint without one).
    words: Option<HashMap<String, u32>>,
    path: PathBuf,
    /// `Checkpoint::fingerprint`, computed once at load.
    fingerprint: String,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("path", &self.path)
            .field("device", &self.dev.name())
            .field("embedding", &self.embedding)
            .field("config", &self.net.cfg)
            .finish()
    }
}

/// One image as its detector regions: `features` is `[regions, Dr]` row-major; `boxes`, if
/// given, `[regions, 5]` as the dataset stores them, `(x1/W, y1/H, x2/W, y2/H, area/(W·H))`.
/// Without boxes every region is given the whole image's box `(0, 0, 1, 1, 1)`: a model
/// trained with real boxes then embeds a little differently, so pass them when you have them.
///
/// ```
/// use semshare::inference::Regions;
///
/// let features = [0.1_f32; 2 * 4]; // two regions of width 4
/// let boxes = [0.0, 0.0, 0.5, 1.0, 0.5, 0.5, 0.0, 1.0, 1.0, 0.5]; // left half, right half
/// let image = Regions::new(&features).with_boxes(&boxes);
/// assert_eq!(image.boxes.map(|b| b.len()), Some(10));
/// ```
#[derive(Clone, Copy, Debug)]
pub struct Regions<'a> {
    /// `[regions, Dr]` row-major.
    pub features: &'a [f32],
    /// `[regions, 5]` row-major, or None for whole-image boxes.
    pub boxes: Option<&'a [f32]>,
}

impl<'a> Regions<'a> {
    /// An image of `features`, `[regions, Dr]`, every region with the whole-image box.
    pub fn new(features: &'a [f32]) -> Self {
        Regions { features, boxes: None }
    }
    /// The same image with its regions' boxes, `[regions, 5]`.
    pub fn with_boxes(self, boxes: &'a [f32]) -> Self {
        Regions { boxes: Some(boxes), ..self }
    }
}

/// Embeddings of n items, one L2-normalised row of width `dim` each.
///
/// ```
/// # fn main() -> semshare::Result<()> {
/// # let path = semshare::inference::tiny_checkpoint("embeddings")?;
/// let mut model = semshare::Model::load(&path, semshare::backend::open("cpu")?)?;
/// let e = model.embed_texts(&["sky", "sea dog", "clouds"])?;
/// assert_eq!((e.len(), e.dim, e.values.len()), (3, 8, 24));
/// for row in e.rows() {
///     let norm: f32 = row.iter().map(|x| x * x).sum::<f32>().sqrt();
///     assert!((norm - 1.0).abs() < 1e-5);
/// }
/// assert_eq!(e.row(1), &e.values[8..16]);
/// # std::fs::remove_file(&path).ok();
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Embeddings {
    /// `[n, dim]` row-major.
    pub values: Vec<f32>,
    /// The width of each row.
    pub dim: usize,
}

impl Embeddings {
    /// The number of items (rows).
    pub fn len(&self) -> usize {
        self.values.len() / self.dim.max(1)
    }
    /// True when there is no item.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
    /// Item `i`'s embedding.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.values[i * self.dim..(i + 1) * self.dim]
    }
    /// The items' embeddings in order.
    pub fn rows(&self) -> std::slice::ChunksExact<'_, f32> {
        self.values.chunks_exact(self.dim.max(1))
    }

    /// Refuses what a search cannot rank, naming the row as `what` and its number ("query 3"):
    /// no rows, values that are not whole rows of `dim`, a non-finite value, or a row whose
    /// norm exceeds `max_norm` (where its scores would overflow f32). Returns the largest norm.
    pub fn check_rows(&self, what: &str, max_norm: f64) -> Result<f64> {
        if self.dim == 0 || self.values.is_empty() || !self.values.len().is_multiple_of(self.dim) {
            return Err(Error::data(format!(
                "{what}: {} values are not whole rows of width {}",
                self.values.len(),
                self.dim
            )));
        }
        // On all threads: a gallery is checked on every search. NaN marks a non-finite row.
        let norms: Vec<f64> = self
            .values
            .par_chunks(self.dim)
            .map(|row| match row.iter().all(|x| x.is_finite()) {
                true => row.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt(),
                false => f64::NAN,
            })
            .collect();
        let mut largest = 0.0f64;
        for (i, &norm) in norms.iter().enumerate() {
            if norm.is_nan() {
                return Err(Error::data(format!("{what} {i} holds a non-finite value")));
            }
            if norm > max_norm {
                return Err(Error::data(format!(
                    "{what} {i} has norm {norm:e}: its scores would not fit a float32 (scale it down)"
                )));
            }
            largest = largest.max(norm);
        }
        Ok(largest)
    }
}

/// One query's nearest gallery items, best first: their rows in the gallery and their scores
/// (inner products; cosines for normalised rows). Equal scores go to the lower row.
#[derive(Clone, Debug, PartialEq)]
pub struct Hits {
    /// Gallery rows, best first.
    pub ids: Vec<u32>,
    /// Their scores, in the same order (non-increasing).
    pub scores: Vec<f32>,
}

const WHOLE_IMAGE_BOX: [f32; 5] = [0.0, 0.0, 1.0, 1.0, 1.0];

impl Model {
    /// The checkpoint at `path` (a `best.safetensors` of `semshare train`) on `dev`, e.g.
    /// `semshare::backend::open("cpu")?` or `open("auto")?` (CUDA when built and present).
    /// Errors name the file: missing, not a checkpoint, corrupt, or too large for the device.
    ///
    /// ```
    /// # fn main() -> semshare::Result<()> {
    /// # let path = semshare::inference::tiny_checkpoint("load")?;
    /// # let mut model = semshare::Model::load(&path, semshare::backend::open("cpu")?)?;
    /// let model = semshare::Model::load(&path, semshare::backend::open("cpu")?)?;
    /// assert_eq!(model.config().dim, 8);
    /// assert!(semshare::Model::load("no/such/file.safetensors", semshare::backend::open("cpu")?).is_err());
    /// # std::fs::remove_file(&path).ok();
    /// # Ok(())
    /// # }
    /// ```
    pub fn load(path: impl AsRef<Path>, mut dev: Box<dyn Backend>) -> Result<Model> {
        let path = path.as_ref().to_path_buf();
        let ckpt = Checkpoint::load_for_inference(&path)?;
        let (net, params) = upload_model(dev.as_mut(), &ckpt)?;
        let bf16 = net.bf16_weights(dev.as_mut(), &params)?;
        let words =
            ckpt.spec.vocab.as_ref().map(|v| v.iter().enumerate().map(|(i, w)| (w.clone(), i as u32)).collect());
        let embedding = ckpt.spec.embedding.unwrap_or(EmbeddingKind::Pooled);
        let fingerprint = ckpt.fingerprint();
        Ok(Model { dev, net, params, bf16, spec: ckpt.spec, embedding, words, path, fingerprint })
    }

    /// The checkpoint file this model was loaded from.
    ///
    /// ```
    /// # fn main() -> semshare::Result<()> {
    /// # let path = semshare::inference::tiny_checkpoint("path")?;
    /// # let mut model = semshare::Model::load(&path, semshare::backend::open("cpu")?)?;
    /// assert_eq!(model.path(), path.as_path());
    /// # std::fs::remove_file(&path).ok();
    /// # Ok(())
    /// # }
    /// ```
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The checkpoint's `Checkpoint::fingerprint`: an index records it, so that a query with
    /// another model is refused.
    ///
    /// ```
    /// # fn main() -> semshare::Result<()> {
    /// # let path = semshare::inference::tiny_checkpoint("fingerprint")?;
    /// # let mut model = semshare::Model::load(&path, semshare::backend::open("cpu")?)?;
    /// let again = semshare::Model::load(&path, semshare::backend::open("cpu")?)?;
    /// assert_eq!(model.fingerprint(), again.fingerprint()); // the same parameters and config
    /// # std::fs::remove_file(&path).ok();
    /// # Ok(())
    /// # }
    /// ```
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The device the model runs on (e.g. for `Backend::top_k` against a gallery).
    ///
    /// ```
    /// # fn main() -> semshare::Result<()> {
    /// # let path = semshare::inference::tiny_checkpoint("device")?;
    /// # let mut model = semshare::Model::load(&path, semshare::backend::open("cpu")?)?;
    /// assert!(model.device().on_host()); // the CPU backend: a gallery in host memory is searched in place
    /// # std::fs::remove_file(&path).ok();
    /// # Ok(())
    /// # }
    /// ```
    pub fn device(&mut self) -> &mut dyn Backend {
        self.dev.as_mut()
    }

    /// The model's configuration (widths, depth, vocabulary and label counts).
    ///
    /// ```
    /// # fn main() -> semshare::Result<()> {
    /// # let path = semshare::inference::tiny_checkpoint("config")?;
    /// # let mut model = semshare::Model::load(&path, semshare::backend::open("cpu")?)?;
    /// assert_eq!((model.config().region_dim, model.config().max_regions), (4, 3));
    /// # std::fs::remove_file(&path).ok();
    /// # Ok(())
    /// # }
    /// ```
    pub fn config(&self) -> &ModelConfig {
        &self.net.cfg
    }

    /// What the checkpoint records of its training data (vocabulary, label names, inputs).
    ///
    /// ```
    /// # fn main() -> semshare::Result<()> {
    /// # let path = semshare::inference::tiny_checkpoint("spec")?;
    /// # let mut model = semshare::Model::load(&path, semshare::backend::open("cpu")?)?;
    /// assert_eq!(model.spec().vocab.as_ref().map(Vec::len), Some(7));
    /// # std::fs::remove_file(&path).ok();
    /// # Ok(())
    /// # }
    /// ```
    pub fn spec(&self) -> &InferenceSpec {
        &self.spec
    }

    /// The label names, in the order of the `label` embedding's coordinates (None for a
    /// checkpoint that does not record them).
    ///
    /// ```
    /// # fn main() -> semshare::Result<()> {
    /// # let path = semshare::inference::tiny_checkpoint("labels")?;
    /// # let mut model = semshare::Model::load(&path, semshare::backend::open("cpu")?)?;
    /// assert_eq!(model.label_names().unwrap(), ["sky", "water", "animal"]);
    /// # std::fs::remove_file(&path).ok();
    /// # Ok(())
    /// # }
    /// ```
    pub fn label_names(&self) -> Option<&[String]> {
        self.spec.label_names.as_deref()
    }

    /// The embedding returned: the checkpoint's, or `pooled` when it records none.
    ///
    /// ```
    /// # fn main() -> semshare::Result<()> {
    /// # let path = semshare::inference::tiny_checkpoint("embedding")?;
    /// # let mut model = semshare::Model::load(&path, semshare::backend::open("cpu")?)?;
    /// use semshare::model::EmbeddingKind;
    /// assert_eq!(model.embedding(), EmbeddingKind::Pooled); // this checkpoint records none
    /// # std::fs::remove_file(&path).ok();
    /// # Ok(())
    /// # }
    /// ```
    pub fn embedding(&self) -> EmbeddingKind {
        self.embedding
    }

    /// Returns `kind` from now on: `Pooled` (width d) or `Label` (one coordinate per label).
    ///
    /// ```
    /// # fn main() -> semshare::Result<()> {
    /// # let path = semshare::inference::tiny_checkpoint("set-embedding")?;
    /// # let mut model = semshare::Model::load(&path, semshare::backend::open("cpu")?)?;
    /// use semshare::model::EmbeddingKind;
    /// model.set_embedding(EmbeddingKind::Label);
    /// assert_eq!(model.embed_texts(&["sky"])?.dim, 3); // C = 3 labels
    /// # std::fs::remove_file(&path).ok();
    /// # Ok(())
    /// # }
    /// ```
    pub fn set_embedding(&mut self, kind: EmbeddingKind) {
        self.embedding = kind;
    }

    /// Width of the embeddings: d for `pooled`, C (one coordinate per label) for `label`.
    ///
    /// ```
    /// # fn main() -> semshare::Result<()> {
    /// # let path = semshare::inference::tiny_checkpoint("dim")?;
    /// # let mut model = semshare::Model::load(&path, semshare::backend::open("cpu")?)?;
    /// assert_eq!(model.dim(), model.config().dim);
    /// # std::fs::remove_file(&path).ok();
    /// # Ok(())
    /// # }
    /// ```
    pub fn dim(&self) -> usize {
        match self.embedding {
            EmbeddingKind::Pooled => self.net.cfg.dim,
            EmbeddingKind::Label => self.net.cfg.labels,
        }
    }

    /// The token ids of `text` by the stored vocabulary. The rule: the text is lowercased and
    /// split on whitespace; a piece that is a word of the vocabulary is that word; otherwise
    /// its leading and trailing punctuation is dropped and it is looked up again (`sky,` is
    /// `sky`); otherwise each of its runs of letters and digits is a word (`sea-side` is `sea`
    /// `side`). A word not in the vocabulary becomes `[UNK]`; only the first T words (the model's
    /// `max_tokens`) are kept.
    ///
    /// ```
    /// # fn main() -> semshare::Result<()> {
    /// # let path = semshare::inference::tiny_checkpoint("tokenize")?;
    /// # let mut model = semshare::Model::load(&path, semshare::backend::open("cpu")?)?;
    /// // Vocabulary: [PAD] [UNK] [MASK] sky clouds sea dog
    /// assert_eq!(model.tokenize("Sky, clouds! A dog.")?, [3, 4, 1, 6]); // `a` is not a word: [UNK]
    /// assert_eq!(model.tokenize("sea-dog")?, [5, 6]);
    /// assert!(model.tokenize("?!")?.is_empty());
    /// # std::fs::remove_file(&path).ok();
    /// # Ok(())
    /// # }
    /// ```
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        let vocab = self.words.as_ref().ok_or_else(|| {
            Error::config(format!(
                "{}: the checkpoint holds no vocabulary (written before semshare stored one): pass token ids to embed_token_ids",
                self.path.display()
            ))
        })?;
        let not_alphanumeric = |c: char| !c.is_alphanumeric();
        let mut ids = Vec::new();
        // Word by word, up to T tokens: a huge text costs no more than its first T words.
        for piece in text.split_whitespace().map(str::to_lowercase) {
            if ids.len() >= self.net.cfg.max_tokens {
                break;
            }
            let piece = piece.as_str();
            let trimmed = piece.trim_matches(not_alphanumeric);
            match vocab.get(piece).or_else(|| vocab.get(trimmed)) {
                Some(&id) => ids.push(id),
                None => ids.extend(
                    trimmed
                        .split(not_alphanumeric)
                        .filter(|w| !w.is_empty())
                        .map(|w| vocab.get(w).copied().unwrap_or(UNK)),
                ),
            }
        }
        ids.truncate(self.net.cfg.max_tokens);
        Ok(ids)
    }

    /// Embeddings of texts given as strings, tokenised by [`Model::tokenize`]. A text with no
    /// word at all (empty, or punctuation only) is an error.
    ///
    /// ```
    /// # fn main() -> semshare::Result<()> {
    /// # let path = semshare::inference::tiny_checkpoint("embed-texts")?;
    /// # let mut model = semshare::Model::load(&path, semshare::backend::open("cpu")?)?;
    /// let e = model.embed_texts(&["sky clouds", "a dog by the sea"])?;
    /// assert_eq!(e, model.embed_token_ids(&[vec![3, 4], vec![1, 6, 1, 1, 5]])?);
    /// assert!(model.embed_texts(&["?!"]).is_err()); // no word
    /// # std::fs::remove_file(&path).ok();
    /// # Ok(())
    /// # }
    /// ```
    pub fn embed_texts<S: AsRef<str>>(&mut self, texts: &[S]) -> Result<Embeddings> {
        if texts.is_empty() {
            return Err(Error::data("embed_texts: no texts given"));
        }
        let ids = texts.iter().map(|t| self.tokenize(t.as_ref())).collect::<Result<Vec<_>>>()?;
        if let Some(i) = ids.iter().position(Vec::is_empty) {
            return Err(Error::data(format!("embed_texts: text {i} ({:?}) has no word", texts[i].as_ref())));
        }
        self.embed_token_ids(&ids)
    }

    /// Embeddings of texts given as token ids: each 1..=T ids in 1..V (`[PAD]` is not a token).
    ///
    /// ```
    /// # fn main() -> semshare::Result<()> {
    /// # let path = semshare::inference::tiny_checkpoint("embed-token-ids")?;
    /// # let mut model = semshare::Model::load(&path, semshare::backend::open("cpu")?)?;
    /// let e = model.embed_token_ids(&[vec![3, 4], vec![6]])?;
    /// assert_eq!(e.len(), 2);
    /// assert!(model.embed_token_ids(&[vec![0]]).is_err()); // [PAD]
    /// assert!(model.embed_token_ids(&[vec![7]]).is_err()); // outside the vocabulary of 7
    /// assert!(model.embed_token_ids(&[vec![3; 7]]).is_err()); // more than T = 6 tokens
    /// # std::fs::remove_file(&path).ok();
    /// # Ok(())
    /// # }
    /// ```
    pub fn embed_token_ids<T: AsRef<[u32]>>(&mut self, texts: &[T]) -> Result<Embeddings> {
        let cfg = &self.net.cfg;
        if cfg.text_features() {
            return Err(Error::config(format!(
                "{}: this model reads texts as segment features of width {}, not tokens: use embed_text_features",
                self.path.display(),
                cfg.text_feature_dim
            )));
        }
        if texts.is_empty() {
            return Err(Error::data("embed_token_ids: no texts given"));
        }
        for (i, t) in texts.iter().enumerate() {
            let t = t.as_ref();
            if t.is_empty() || t.len() > cfg.max_tokens {
                return Err(Error::data(format!(
                    "embed_token_ids: text {i} has {} tokens, the model takes 1 to {}",
                    t.len(),
                    cfg.max_tokens
                )));
            }
            if let Some(&id) = t.iter().find(|&&id| id == PAD || id as usize >= cfg.vocab) {
                return Err(Error::data(format!(
                    "embed_token_ids: text {i} has token id {id}, outside 1..{} (0 is [PAD])",
                    cfg.vocab
                )));
            }
        }
        let labels = cfg.labels;
        self.embed_chunks("text", texts.len(), |items| {
            let lengths = items.clone().map(|i| texts[i].as_ref().len()).collect();
            let tokens = items.clone().flat_map(|i| texts[i].as_ref().iter().copied()).collect();
            Batch::Text(TextBatch {
                lengths,
                tokens,
                features: Features::default(),
                labels: vec![0.0; items.len() * labels],
            })
        })
    }

    /// Embeddings of texts given as pre-extracted segment features, for a model trained on them
    /// (`text_feature_dim` Dt > 0): each text 1..=T segments, `[segments, Dt]` row-major.
    /// A model trained on token ids refuses them.
    ///
    /// ```
    /// # fn main() -> semshare::Result<()> {
    /// # let path = semshare::inference::tiny_checkpoint("embed-text-features")?;
    /// # let mut model = semshare::Model::load(&path, semshare::backend::open("cpu")?)?;
    /// // This model reads token ids (Dt = 0): segment features are refused, naming the reason.
    /// let err = model.embed_text_features(&[&[0.1; 4]]).unwrap_err();
    /// assert!(err.to_string().contains("token ids"));
    /// # std::fs::remove_file(&path).ok();
    /// # Ok(())
    /// # }
    /// ```
    pub fn embed_text_features(&mut self, texts: &[&[f32]]) -> Result<Embeddings> {
        let cfg = &self.net.cfg;
        let dt = cfg.text_feature_dim;
        if dt == 0 {
            return Err(Error::config(format!(
                "{}: this model reads texts as token ids, not segment features",
                self.path.display()
            )));
        }
        if texts.is_empty() {
            return Err(Error::data("embed_text_features: no texts given"));
        }
        for (i, t) in texts.iter().enumerate() {
            if t.is_empty() || !t.len().is_multiple_of(dt) || t.len() / dt > cfg.max_tokens {
                return Err(Error::data(format!(
                    "embed_text_features: text {i} has {} feature values, not 1 to {} segments of width {dt}",
                    t.len(),
                    cfg.max_tokens
                )));
            }
            if !t.iter().all(|x| x.is_finite()) {
                return Err(Error::data(format!("embed_text_features: text {i} has a non-finite feature value")));
            }
        }
        let labels = cfg.labels;
        self.embed_chunks("text", texts.len(), |items| {
            let lengths = texts[items.clone()].iter().map(|t| t.len() / dt).collect();
            let features = texts[items.clone()].concat();
            Batch::Text(TextBatch {
                lengths,
                tokens: Vec::new(),
                features: features.into(),
                labels: vec![0.0; items.len() * labels],
            })
        })
    }

    /// Embeddings of images, each 1..=R regions of width Dr (the model's `region_dim`).
    ///
    /// ```
    /// # fn main() -> semshare::Result<()> {
    /// # let path = semshare::inference::tiny_checkpoint("embed-images")?;
    /// # let mut model = semshare::Model::load(&path, semshare::backend::open("cpu")?)?;
    /// use semshare::inference::Regions;
    /// let one = [0.2_f32; 4]; // one region of width 4
    /// let two = [0.1_f32, 0.3, 0.0, 0.9, 0.5, 0.5, 0.5, 0.5];
    /// let e = model.embed_images(&[Regions::new(&one), Regions::new(&two)])?;
    /// assert_eq!(e.len(), 2);
    /// assert!(model.embed_images(&[Regions::new(&[0.2; 5])]).is_err()); // not a multiple of 4
    /// assert!(model.embed_images(&[Regions::new(&[0.2; 16])]).is_err()); // 4 regions, R = 3
    /// # std::fs::remove_file(&path).ok();
    /// # Ok(())
    /// # }
    /// ```
    pub fn embed_images(&mut self, images: &[Regions<'_>]) -> Result<Embeddings> {
        let cfg = &self.net.cfg;
        let dr = cfg.region_dim;
        if images.is_empty() {
            return Err(Error::data("embed_images: no images given"));
        }
        for (i, im) in images.iter().enumerate() {
            let n = im.features.len();
            if n == 0 || !n.is_multiple_of(dr) || n / dr > cfg.max_regions {
                return Err(Error::data(format!(
                    "embed_images: image {i} has {n} feature values, not 1 to {} regions of width {dr}",
                    cfg.max_regions
                )));
            }
            if let Some(b) = im.boxes
                && b.len() != 5 * (n / dr)
            {
                return Err(Error::data(format!(
                    "embed_images: image {i} has {} box values for {} regions (5 each)",
                    b.len(),
                    n / dr
                )));
            }
            let finite = im.features.iter().chain(im.boxes.unwrap_or(&[])).all(|x| x.is_finite());
            if !finite {
                return Err(Error::data(format!("embed_images: image {i} has a non-finite feature or box value")));
            }
        }
        let labels = cfg.labels;
        self.embed_chunks("image", images.len(), |items| {
            let mut b = ImageBatch { labels: vec![0.0; items.len() * labels], ..ImageBatch::default() };
            let mut features = Vec::new();
            for im in &images[items] {
                let regions = im.features.len() / dr;
                b.lengths.push(regions);
                features.extend_from_slice(im.features);
                match im.boxes {
                    Some(boxes) => b.boxes.extend_from_slice(boxes),
                    None => (0..regions).for_each(|_| b.boxes.extend_from_slice(&WHOLE_IMAGE_BOX)),
                }
            }
            b.features = features.into();
            Batch::Image(b)
        })
    }

    /// For each query, the `k` gallery rows with the largest inner product, best first, ties to
    /// the lower row: exact search on the model's device (`Backend::top_k`, the ranking `eval`
    /// uses). Queries and gallery must have the same width; `k` must be 1 to the gallery's size.
    ///
    /// ```
    /// # fn main() -> semshare::Result<()> {
    /// # let path = semshare::inference::tiny_checkpoint("search")?;
    /// # let mut model = semshare::Model::load(&path, semshare::backend::open("cpu")?)?;
    /// use semshare::inference::Regions;
    /// let gallery = model.embed_texts(&["sky", "sea", "dog", "sky clouds"])?;
    /// let query = model.embed_images(&[Regions::new(&[0.3; 8])])?;
    /// let hits = model.search(&query, &gallery, 3)?;
    /// assert_eq!((hits.len(), hits[0].ids.len()), (1, 3));
    /// assert!(hits[0].scores[0] >= hits[0].scores[1]);
    /// assert!(model.search(&query, &gallery, 5).is_err()); // k larger than the gallery
    /// # std::fs::remove_file(&path).ok();
    /// # Ok(())
    /// # }
    /// ```
    pub fn search(&mut self, queries: &Embeddings, gallery: &Embeddings, k: usize) -> Result<Vec<Hits>> {
        if queries.dim != gallery.dim {
            return Err(Error::shape(
                "search",
                format!("queries have width {} and the gallery {}", queries.dim, gallery.dim),
            ));
        }
        // A score is at most the product of the two norms, which must fit an f32.
        let largest_query = queries.check_rows("query", f64::from(f32::MAX))?;
        gallery.check_rows("gallery item", f64::from(f32::MAX) / largest_query.max(1.0))?;
        if k == 0 || k > gallery.len() {
            return Err(Error::config(format!("search: k = {k}, the gallery has {} items", gallery.len())));
        }
        let dim = queries.dim;
        let q = self.dev.upload(&queries.values, &[queries.len(), dim])?;
        let g = self.dev.upload(&gallery.values, &[gallery.len(), dim])?;
        let (ids, scores) = self.dev.top_k(q.view(), g.view(), dim, k)?;
        Ok(ids
            .chunks_exact(k)
            .zip(scores.chunks_exact(k))
            .map(|(i, s)| Hits { ids: i.to_vec(), scores: s.to_vec() })
            .collect())
    }

    /// The embeddings of every image and every text of a dataset split, by the evaluation's own
    /// path ([`super::embed_split`]), each row normalised as `eval` normalises before ranking.
    /// A dataset of other shapes, another vocabulary or other labels than the model was trained
    /// on is refused. No labels are read.
    pub fn embed_split(&mut self, layout: &Layout, split: &SplitReader) -> Result<(Embeddings, Embeddings)> {
        layout.check_fits(self.config())?;
        self.spec.check_data(layout)?;
        let w = Weights { values: &self.params, bf16: self.bf16.as_ref() };
        let (mut images, mut texts, dim) =
            super::embed_split(self.dev.as_mut(), &self.net, w, layout, split, self.embedding)?;
        unit_rows(&mut images, dim, "image")?;
        unit_rows(&mut texts, dim, "text")?;
        Ok((Embeddings { values: images, dim }, Embeddings { values: texts, dim }))
    }

    /// The embeddings of `n` checked items (`what`: image or text), [`EMBED_CHUNK`] per forward
    /// pass, normalised.
    fn embed_chunks(
        &mut self,
        what: &str,
        n: usize,
        batch_of: impl Fn(std::ops::Range<usize>) -> Batch,
    ) -> Result<Embeddings> {
        let mut values = Vec::with_capacity(n * self.dim());
        // Each chunk downloaded after the next is queued, as `embed_split` does: on a GPU the
        // host builds the next batch while the device computes.
        let mut pending = None;
        for start in (0..n).step_by(EMBED_CHUNK) {
            let batch = batch_of(start..(start + EMBED_CHUNK).min(n));
            let w = Weights { values: &self.params, bf16: self.bf16.as_ref() };
            let e = self.net.embed(self.dev.as_mut(), w, &batch, self.embedding)?;
            if let Some(done) = pending.replace(e) {
                values.extend(self.dev.download(done.view())?);
            }
        }
        if let Some(done) = pending {
            values.extend(self.dev.download(done.view())?);
        }
        let dim = self.dim();
        unit_rows(&mut values, dim, what)?;
        Ok(Embeddings { values, dim })
    }
}

/// Each row scaled to unit length as `eval` ranks them (a zero row, which has no direction,
/// stays zero); a row that is not finite (inputs far outside the training data's range can
/// overflow the network) is an error naming `what` and its number.
fn unit_rows(values: &mut [f32], dim: usize, what: &str) -> Result<()> {
    if let Some(i) = values.chunks_exact(dim).position(|row| row.iter().any(|x| !x.is_finite())) {
        return Err(Error::data(format!(
            "{what} {i}: its embedding is not finite (are its input values far outside the training data's range?)"
        )));
    }
    normalize_rows(values, dim);
    Ok(())
}
