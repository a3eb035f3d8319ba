//! `semshare pack`: a source directory (what the importers in `tools/` write; docs/FORMAT.md,
//! "Source directory") becomes a dataset directory with shards of a chosen size, every item
//! validated on the way, checksums in the manifest, written atomically.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::SafeTensors;
use serde::Deserialize;

use super::format::{LABELS_FILE, Layout, SPLITS, TEXT_FEATURES, VOCAB_FILE, reserved_vocab};
use super::format::{Meta, diagnose, plain_file_name, read_lines, tensor::*};
use super::shard::{ImageRows, Shard};
use super::writer::{DatasetWriter, ImageRecord, TextRecord};
use crate::{Error, Result};

pub const SOURCE_FILE: &str = "source.json";
pub const SOURCE_FORMAT: &str = "semshare-source";
pub const SOURCE_VERSION: u32 = 1;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Source {
    format: String,
    version: u32,
    name: String,
    splits: BTreeMap<String, Vec<String>>,
    /// K_obj; absent: the largest class id found + 1.
    #[serde(default)]
    num_object_classes: Option<usize>,
    /// What wrote the directory: [`SYNTH_WRITER`] for `synth --format source`; absent for the
    /// importers' and a user's own.
    #[serde(default)]
    written_by: Option<String>,
}

/// `source.json`'s `written_by` of a source directory `synth --format source` wrote.
pub const SYNTH_WRITER: &str = "semshare synth";

/// Whether `dir` is a source directory `synth --format source` wrote (its `source.json` says
/// so) holding nothing but what it lists, the label and word lists and semshare's temporaries:
/// the only kind `synth --force` may replace. An importer's or a user's source (their data),
/// or one a user has added a file to, is not.
pub fn is_synth_source(dir: &Path) -> bool {
    let Ok(text) = crate::io::read_text(&dir.join(SOURCE_FILE), crate::io::SMALL_FILE_LIMIT) else { return false };
    let Ok(src) = serde_json::from_str::<Source>(&text) else { return false };
    if src.format != SOURCE_FORMAT || src.written_by.as_deref() != Some(SYNTH_WRITER) {
        return false;
    }
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    entries.flatten().all(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        [SOURCE_FILE, "labels.txt", "vocab.txt"].contains(&name.as_str())
            || src.splits.values().flatten().any(|f| *f == name)
            || crate::io::is_temp_name(&name)
    })
}

/// What `pack` wrote.
#[derive(Clone, Debug)]
pub struct PackSummary {
    pub out: PathBuf,
    /// (split, images, texts, shards)
    pub splits: Vec<(String, usize, usize, usize)>,
}

/// Shape `name` of a source file's header, without trusting anything else in it.
fn header_shape(path: &Path, bytes: &[u8], name: &str) -> Result<Option<Vec<usize>>> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| Error::format(path, diagnose(bytes, &e)))?;
    Ok(st.tensor(name).ok().map(|v| v.shape().to_vec()))
}

/// R, Dr, T, Dt, C from the first source file.
fn infer_layout(src: &Path, first: &Path, name: &str, text_features: bool) -> Result<Layout> {
    let bytes = crate::io::read(first)?;
    let dims = |tensor: &str, rank: usize| -> Result<Vec<usize>> {
        match header_shape(first, &bytes, tensor)? {
            Some(s) if s.len() == rank => Ok(s),
            Some(s) => Err(Error::format(first, format!("tensor {tensor}: shape {s:?} is not of rank {rank}"))),
            None => Err(Error::format(first, format!("tensor {tensor} missing"))),
        }
    };
    let f = dims(IMAGE_FEATURES, 3)?;
    let c = dims(LABELS, 2)?[1];
    let (t, dt) = if text_features {
        let s = dims(TEXT_FEATURES, 3)?;
        (s[1], s[2])
    } else {
        (dims(TEXT_TOKENS, 2)?[1], 0)
    };
    let vocab = if text_features { reserved_vocab() } else { read_lines(&src.join(VOCAB_FILE))? };
    let label_names = read_lines(&src.join(LABELS_FILE))?;
    if label_names.len() != c {
        let what = format!("{} label names, the tensors have C = {c} labels", label_names.len());
        return Err(Error::format(src.join(LABELS_FILE), what));
    }
    let meta = Meta {
        name: name.to_string(),
        regions: f[1],
        feature_dim: f[2],
        max_tokens: t,
        num_labels: c,
        num_object_classes: u16::MAX as usize + 1,
        vocab,
        label_names,
    };
    meta.check().map_err(|e| Error::format(first, e))?;
    Ok(Layout { meta, text_feature_dim: dt })
}

/// Packs `src` into `out` with shards of about `shard_bytes`.
pub fn pack(src: &Path, out: &Path, shard_bytes: usize) -> Result<PackSummary> {
    let spath = src.join(SOURCE_FILE);
    let text = crate::io::read_text(&spath, crate::io::SMALL_FILE_LIMIT)?;
    let source: Source =
        serde_json::from_str(&text).map_err(|e| Error::format(&spath, format!("not a valid source.json: {e}")))?;
    if source.format != SOURCE_FORMAT || source.version != SOURCE_VERSION {
        let what = format!(
            "format {:?} version {}, expected {SOURCE_FORMAT:?} version {SOURCE_VERSION}",
            source.format, source.version
        );
        return Err(Error::format(&spath, what));
    }
    for (name, files) in &source.splits {
        if !SPLITS.contains(&name.as_str()) {
            return Err(Error::format(&spath, format!("unknown split {name:?} (expected {SPLITS:?})")));
        }
        if files.is_empty() && name == "train" {
            return Err(Error::format(&spath, "split \"train\" lists no file"));
        }
    }
    let mut files: Vec<(&str, Vec<PathBuf>)> = Vec::new();
    for name in SPLITS {
        match source.splits.get(name) {
            Some(list) => {
                let paths = list
                    .iter()
                    .enumerate()
                    .map(|(k, f)| plain_file_name(&spath, &format!("splits.{name}[{k}]"), f).map(|f| src.join(f)))
                    .collect::<Result<Vec<_>>>()?;
                files.push((name, paths));
            }
            None if name == "database" => {}
            None => return Err(Error::format(&spath, format!("split {name:?} missing"))),
        }
    }
    let first =
        files.iter().flat_map(|(_, f)| f.first()).next().ok_or_else(|| Error::format(&spath, "no source file"))?;
    let first_bytes = crate::io::read(first)?;
    let text_features = header_shape(first, &first_bytes, TEXT_FEATURES)?.is_some();
    let mut layout = infer_layout(src, first, &source.name, text_features)?;

    // Pass 1: open everything (structure checked against the first file's shapes) and find K_obj.
    let mut opened: Vec<(&str, Vec<Shard>)> = Vec::new();
    let mut max_class: Option<usize> = None;
    let (mut classes, mut scratch) = (Vec::new(), Vec::new());
    for (name, paths) in &files {
        let mut shards = Vec::new();
        for p in paths {
            let shard = Shard::open(p, &layout, None)?;
            for i in 0..shard.num_images() {
                // By pread, as everything `pack` reads: a file truncated meanwhile is an error.
                classes.clear();
                shard.read_classes(&layout, i, &mut classes, &mut scratch)?;
                max_class = max_class.max(classes.iter().map(|&k| k as usize).max());
            }
            shards.push(shard);
        }
        opened.push((name, shards));
    }
    let found = max_class.map_or(0, |k| k + 1);
    layout.meta.num_object_classes = match source.num_object_classes {
        Some(k) if k < found => {
            let what = format!("num_object_classes {k}, but the files hold class id {}", found - 1);
            return Err(Error::format(&spath, what));
        }
        Some(k) => k,
        None => found,
    };
    layout.meta.check().map_err(|e| Error::format(&spath, e))?;

    // Pass 2: validate every item and write it.
    let mut w = DatasetWriter::create(out, layout.clone(), shard_bytes)?;
    let mut summary = PackSummary { out: out.to_path_buf(), splits: Vec::new() };
    let (mut rows, mut text_rows) = (ImageRows::default(), Vec::new());
    for (name, shards) in &opened {
        w.begin_split(name)?;
        let (mut n, mut m) = (0, 0);
        for shard in shards {
            let mut texts_of = vec![Vec::new(); shard.num_images()];
            for j in 0..shard.num_texts() {
                texts_of[shard.text_item(j)].push(j);
            }
            for (i, texts) in texts_of.iter().enumerate() {
                shard.read_image_rows(&layout, i, &mut rows)?;
                text_rows.resize_with(texts.len(), Vec::new);
                for (row, &j) in text_rows.iter_mut().zip(texts) {
                    shard.read_text_row(&layout, j, row)?;
                }
                let image = ImageRecord {
                    features: &rows.features,
                    feature_dtype: shard.feature_dtype(),
                    boxes: &rows.boxes,
                    count: shard.count(i) as u16,
                    classes: rows.classes.as_deref(),
                    labels: shard.labels(i),
                };
                let records: Vec<TextRecord> = texts
                    .iter()
                    .zip(&text_rows)
                    .map(|(&j, row)| TextRecord {
                        content: row,
                        dtype: shard.text_dtype(),
                        length: shard.length(j) as u16,
                    })
                    .collect();
                w.push(&image, &records).map_err(|e| Error::format(&shard.path, format!("image {i}: {e}")))?;
            }
            n += shard.num_images();
            m += shard.num_texts();
        }
        summary.splits.push((name.to_string(), n, m, 0));
    }
    let out = w.finish()?;
    // Read back what was written: the reader's structural checks see the final files.
    let written = super::reader::DatasetReader::open(&out)?;
    for s in &mut summary.splits {
        s.3 = written.split(&s.0)?.shards.len();
    }
    Ok(summary)
}
