//! Inference: a trained model's embeddings of a split and their retrieval metrics. The one
//! embedding path of `semshare eval`, `embed` and `demo`, of validation during training and of
//! the experiment runner; and [`Model`], a trained model as a library user embeds with it.

#![deny(missing_docs)]

mod doc_example;
mod model;

#[doc(hidden)]
pub use doc_example::tiny_checkpoint;
pub use model::{Embeddings, Hits, Model, Regions};

use crate::backend::Backend;
use crate::checkpoint::Checkpoint;
use crate::data::batches::{image_batch, text_batch};
use crate::data::format::Layout;
use crate::data::reader::{DatasetReader, SplitReader};
use crate::eval::metrics::{EvalConfig, Report, Side, evaluate, evaluate_against_gallery};
use crate::model::{Batch, EmbeddingKind, SemShare};
use crate::nn::Weights;
use crate::tensor::Tensor;
use crate::{Error, Result};

/// A checkpoint's model and its parameters on `dev`, refused before the upload when the model
/// and a batch of [`EMBED_CHUNK`] items would not fit in the device's memory.
pub fn load_model(dev: &mut dyn Backend, path: &std::path::Path) -> Result<(SemShare, Tensor)> {
    upload_model(dev, &Checkpoint::load(path)?)
}

/// A loaded checkpoint's model and its parameters on `dev`, refused as [`load_model`] does.
/// The parameters are frozen (`Backend::freeze`): read-only, so the device prepares its
/// GEMM operands from them once.
pub fn upload_model(dev: &mut dyn Backend, ckpt: &Checkpoint) -> Result<(SemShare, Tensor)> {
    let mut net = SemShare::new(&ckpt.model)?;
    net.set_input_norm(ckpt.spec.normalization.clone())?;
    crate::model::memory::check_memory(dev, &net, EMBED_CHUNK, false)?;
    let params = net.store.upload(dev, &ckpt.params)?;
    Ok((net, dev.freeze(params)?))
}

/// Items per forward pass of [`embed_split`].
pub const EMBED_CHUNK: usize = 64;

/// Embeddings of every image and text of a split, `[N, D]` and `[M, D]`.
pub fn embed_split<'w>(
    dev: &mut dyn Backend,
    net: &SemShare,
    params: impl Into<Weights<'w>>,
    layout: &Layout,
    split: &SplitReader,
    kind: EmbeddingKind,
) -> Result<(Vec<f32>, Vec<f32>, usize)> {
    if split.num_images() == 0 {
        return Err(Error::data(format!("split `{}` is empty: nothing to embed or evaluate", split.name)));
    }
    let mut out = [Vec::new(), Vec::new()];
    let mut dim = 0;
    // A chunk's embeddings are downloaded after the next chunk is read and queued: on a GPU the
    // download waits for the device, which then has the next chunk's work while the host reads
    // the one after (uploads do not wait: they go through pinned memory).
    let mut pending: Option<(usize, Tensor)> = None;
    // At bf16 activations every chunk multiplies one bf16 copy of the trunk: the caller's
    // (a loaded `Model`'s) or one made here.
    let w = params.into();
    let own = net.bf16_weights(dev, w)?;
    let w = Weights { values: w.values, bf16: own.as_ref().or(w.bf16) };
    for (side, n) in [split.num_images(), split.num_texts()].into_iter().enumerate() {
        let idx: Vec<usize> = (0..n).collect();
        for c in idx.chunks(EMBED_CHUNK) {
            let batch = match side {
                0 => Batch::Image(image_batch(layout, split, c)?),
                _ => Batch::Text(text_batch(layout, split, c)?),
            };
            let e = net.embed(dev, w, &batch, kind)?;
            dim = e.cols();
            if let Some((s, done)) = pending.replace((side, e)) {
                out[s].extend(dev.download(done.view())?);
            }
        }
    }
    if let Some((s, done)) = pending {
        out[s].extend(dev.download(done.view())?);
    }
    let [ie, te] = out;
    Ok((ie, te, dim))
}

/// Retrieval metrics of a model on split `name` (I2T, T2I, average). For `test` with a
/// `database` split, the test items are the queries and the database is the gallery (the
/// MIRFlickr protocol); otherwise queries and gallery are the split itself.
pub fn evaluate_split(
    dev: &mut dyn Backend,
    net: &SemShare,
    params: &Tensor,
    data: &DatasetReader,
    name: &str,
    kind: EmbeddingKind,
    cfg: &EvalConfig,
) -> Result<Report> {
    evaluate_embedded(data, name, cfg, |split| embed_split(dev, net, params, &data.layout, split, kind))
}

/// Retrieval metrics on split `name` of any embedding: `embed` gives a split's image and text
/// embeddings, `[N, D]` and `[M, D]`, and D. The protocol of [`evaluate_split`]: `test` is
/// ranked against the `database` split when there is one, every other split against itself.
pub fn evaluate_embedded(
    data: &DatasetReader,
    name: &str,
    cfg: &EvalConfig,
    mut embed: impl FnMut(&SplitReader) -> Result<(Vec<f32>, Vec<f32>, usize)>,
) -> Result<Report> {
    let split = data.split(name)?;
    let c = data.meta().num_labels;
    let (ie, te, dim) = embed(split)?;
    let (image_labels, text_labels) = (split.image_labels(), split.text_labels());
    let (images, texts) = (Side::new(&ie, dim, &image_labels, c), Side::new(&te, dim, &text_labels, c));
    match data.database() {
        Some(db) if name == "test" => {
            let (gie, gte, db_dim) = embed(db)?;
            if db_dim != dim {
                return Err(Error::shape(
                    "evaluate",
                    format!("the database's embeddings have width {db_dim}, the test split's {dim}"),
                ));
            }
            let (gil, gtl) = (db.image_labels(), db.text_labels());
            let gallery_images = Side::new(&gie, dim, &gil, c);
            evaluate_against_gallery(&images, &texts, &gallery_images, &Side::new(&gte, dim, &gtl, c), cfg)
        }
        _ => evaluate(&images, &texts, &split.text_items(), cfg),
    }
}
