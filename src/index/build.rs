//! Galleries from what users have: a dataset split, a file of texts, a feature file, or raw
//! vectors. Embedding goes through [`Model`] (and so through the evaluation's own path); every
//! row is normalised.

use std::path::Path;

use super::file::{Gallery, Labels, Modality, Origin};
use super::npy::NpyF32;
use crate::data::format::Layout;
use crate::data::reader::SplitReader;
use crate::eval::metrics::normalize_rows;
use crate::inference::{Embeddings, Model, Regions};
use crate::{Error, Result};

/// The origin an index embedded by `model` records.
pub fn model_origin(model: &Model, modality: Modality) -> Origin {
    Origin::Model {
        fingerprint: model.fingerprint().to_string(),
        checkpoint: model.path().display().to_string(),
        embedding: model.embedding(),
        modality,
    }
}

/// Ids `prefix/0`, `prefix/1`, …
pub fn generated_ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}/{i}")).collect()
}

/// The lines of a text file (`index --texts`, `query --queries`, `--ids`), a trailing `\r`
/// dropped; no line, or a blank one, is an error naming the file.
pub fn read_lines(path: &Path) -> Result<Vec<String>> {
    let text = crate::io::read_text(path, u64::MAX)?;
    let lines: Vec<String> = text.lines().map(|l| l.trim_end_matches('\r').to_string()).collect();
    if lines.is_empty() {
        return Err(Error::format(path, "no lines"));
    }
    if let Some(i) = lines.iter().position(|l| l.trim().is_empty()) {
        return Err(Error::format(path, format!("line {} is empty", i + 1)));
    }
    Ok(lines)
}

/// One id per line of `path` (a trailing empty line aside), `n` of them.
pub fn read_ids(path: &Path, n: usize) -> Result<Vec<String>> {
    let ids = read_lines(path)?;
    if ids.len() != n {
        return Err(Error::format(path, format!("{} ids (one per line) for {n} items", ids.len())));
    }
    // Said of this file, before anything is embedded (the index would refuse it when written).
    let mut seen = std::collections::HashMap::with_capacity(n);
    for (i, id) in ids.iter().enumerate() {
        if let Some(j) = seen.insert(id.as_str(), i) {
            return Err(Error::format(path, format!("id `{id}` appears twice (lines {} and {})", j + 1, i + 1)));
        }
    }
    Ok(ids)
}

/// Every image (or every text) of a dataset split, ids `split/i` (texts `split/text/j`), with
/// the split's labels and the checkpoint's label names.
pub fn from_split(model: &mut Model, layout: &Layout, split: &SplitReader, side: Modality) -> Result<Gallery> {
    let (images, texts) = model.embed_split(layout, split)?;
    let (emb, labels, ids) = match side {
        Modality::Image => (images, split.image_labels(), generated_ids(&split.name, split.num_images())),
        Modality::Text => {
            (texts, split.text_labels(), generated_ids(&format!("{}/text", split.name), split.num_texts()))
        }
    };
    let count = layout.meta.num_labels;
    let names = model.label_names().map(<[String]>::to_vec).or_else(|| Some(layout.meta.label_names.clone()));
    let labels = Some(Labels { values: labels, count, names: names.filter(|n| n.len() == count) });
    Ok(Gallery { origin: model_origin(model, side), dim: emb.dim, vectors: emb.values, ids, labels })
}

/// Texts as strings (tokenised by the model's vocabulary), no labels.
pub fn from_texts(model: &mut Model, texts: &[String], ids: Vec<String>) -> Result<Gallery> {
    let emb = model.embed_texts(texts)?;
    Ok(unlabelled(model_origin(model, Modality::Text), emb, ids))
}

/// Items as segment features `[N, S, D]` (or `[N, D]`, one segment each): image regions, or a
/// text-feature model's text segments. Trailing all-zero segments of an item are padding.
pub fn from_features(model: &mut Model, features: &NpyF32, side: Modality, ids: Vec<String>) -> Result<Gallery> {
    let emb = embed_features(model, features, side)?;
    Ok(unlabelled(model_origin(model, side), emb, ids))
}

/// Items as segment features `[N, S, D]` or `[N, D]` embedded by `model` as images or texts;
/// D must be the model's width for that side.
pub fn embed_features(model: &mut Model, features: &NpyF32, side: Modality) -> Result<Embeddings> {
    let cfg = model.config();
    let (image_width, text_width) = (cfg.region_dim, cfg.text_feature_dim);
    let (width, most, what) = match side {
        Modality::Image => (image_width, cfg.max_regions, "images have"),
        Modality::Text => (text_width, cfg.max_tokens, "texts have"),
    };
    let items = feature_items(features, side, image_width, text_width)?;
    if let Some((i, item)) = items.iter().enumerate().find(|(_, item)| item.len() / width > most) {
        return Err(Error::data(format!(
            "feature item {i} has {} segments (of shape {:?}, trailing all-zero segments left out), but the model's {what} at most {most}",
            item.len() / width,
            features.shape
        )));
    }
    match side {
        Modality::Image => model.embed_images(&items.iter().map(|f| Regions::new(f)).collect::<Vec<_>>()),
        Modality::Text => model.embed_text_features(&items),
    }
}

/// Each item's segments of a `[N, S, D]` or `[N, D]` array, trailing all-zero segments cut;
/// D is refused unless it is the `side`'s width (`text_width` 0: the model reads tokens).
pub fn feature_items(features: &NpyF32, side: Modality, image_width: usize, text_width: usize) -> Result<Vec<&[f32]>> {
    features.check()?;
    let (n, d) = match features.shape[..] {
        [n, d] | [n, _, d] => (n, d),
        _ => return Err(Error::data(format!("features of shape {:?}: expected [N, S, D] or [N, D]", features.shape))),
    };
    if n == 0 || d == 0 {
        return Err(Error::data(format!("features of shape {:?}: no items", features.shape)));
    }
    let (width, what, other, other_what) = match side {
        Modality::Image => (image_width, "image regions", text_width, "text segments"),
        Modality::Text => (text_width, "text segments", image_width, "image regions"),
    };
    if width == 0 {
        return Err(Error::data(format!(
            "features of shape {:?} as texts: the model reads texts as words (token ids), not features",
            features.shape
        )));
    }
    if d != width {
        let hint = if d == other { format!(" ({d} is the width of its {other_what})") } else { String::new() };
        return Err(Error::data(format!(
            "features of shape {:?}: segments of {d} values, but the model's {what} have {width}{hint}",
            features.shape
        )));
    }
    let per_item = features.values.len() / n;
    if per_item == 0 {
        return Err(Error::data(format!("features of shape {:?}: no values", features.shape)));
    }
    let mut items = Vec::with_capacity(n);
    for (i, item) in features.values.chunks_exact(per_item).enumerate() {
        let used = item.chunks_exact(d).rposition(|s| s.iter().any(|&x| x != 0.0)).map_or(0, |p| p + 1);
        if used == 0 {
            return Err(Error::data(format!("feature item {i} is all zeros: no segment to embed")));
        }
        items.push(&item[..used * d]);
    }
    Ok(items)
}

/// Raw vectors `[N, D]`, normalised here (an all-zero row is refused); no model, no labels.
pub fn from_vectors(vectors: NpyF32, ids: Vec<String>) -> Result<Gallery> {
    vectors.check()?;
    let [n, dim] = vectors.shape[..] else {
        return Err(Error::data(format!("vectors of shape {:?}: expected [N, D]", vectors.shape)));
    };
    if n == 0 || dim == 0 {
        return Err(Error::data(format!("vectors of shape {:?}: no items", vectors.shape)));
    }
    if let Some(i) = vectors.values.iter().position(|x| !x.is_finite()) {
        return Err(Error::data(format!("vector {} holds a non-finite value", i / dim)));
    }
    // Normalised, a zero row would score 0 against every query: it has no direction.
    if let Some(i) = vectors.values.chunks_exact(dim).position(|r| r.iter().all(|&x| x == 0.0)) {
        return Err(Error::data(format!("vector {i} is all zeros: it has no direction to search by")));
    }
    let mut values = vectors.values;
    normalize_rows(&mut values, dim);
    Ok(Gallery { origin: Origin::Vectors, dim, vectors: values, ids, labels: None })
}

fn unlabelled(origin: Origin, emb: Embeddings, ids: Vec<String>) -> Gallery {
    Gallery { origin, dim: emb.dim, vectors: emb.values, ids, labels: None }
}
