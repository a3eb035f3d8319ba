//! The dataset format (docs/FORMAT.md, the normative spec), as reader and writer both use it:
//! file and tensor names, reserved tokens, the manifest and [`Meta`], the [`Layout`] every shard
//! agrees on, the feature dtypes, and the vocabulary and label files.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorInfo};
use serde::{Deserialize, Serialize};

use crate::backend::Half;
use crate::backend::cpu::inputs::widen_halves;
use crate::model::{Features, ModelConfig};
use crate::{Error, Result};

/// The manifest file of a dataset directory.
pub const MANIFEST_FILE: &str = "dataset.json";
/// The `format` field of the manifest.
pub const FORMAT_NAME: &str = "semshare-dataset";
/// The manifest version this build reads and writes (docs/FORMAT.md lists the changes).
pub const FORMAT_VERSION: u32 = 2;
/// Reserved vocabulary ids.
pub const PAD: u32 = 0;
pub const UNK: u32 = 1;
pub const MASK: u32 = 2;
/// The reserved tokens, in id order.
pub const RESERVED_TOKENS: [&str; 3] = ["[PAD]", "[UNK]", "[MASK]"];
/// The split names, in manifest order.
pub const SPLIT_NAMES: [&str; 3] = ["train", "val", "test"];

/// Tensor names of a shard (DESIGN.md §6).
pub mod tensor {
    pub const IMAGE_FEATURES: &str = "image.features";
    pub const IMAGE_BOXES: &str = "image.boxes";
    pub const IMAGE_COUNT: &str = "image.count";
    pub const IMAGE_CLASSES: &str = "image.classes";
    pub const TEXT_TOKENS: &str = "text.tokens";
    pub const TEXT_LENGTH: &str = "text.length";
    pub const TEXT_ITEM: &str = "text.item";
    pub const LABELS: &str = "labels";
    pub const ALL: [&str; 8] =
        [IMAGE_FEATURES, IMAGE_BOXES, IMAGE_COUNT, IMAGE_CLASSES, TEXT_TOKENS, TEXT_LENGTH, TEXT_ITEM, LABELS];
}

/// The split names a manifest may hold; `database` is optional (the retrieval set of `test`).
pub const SPLITS: [&str; 4] = ["train", "val", "test", "database"];
/// The split names every manifest holds.
pub const REQUIRED_SPLITS: [&str; 3] = ["train", "val", "test"];
pub const VOCAB_FILE: &str = "vocab.txt";
pub const LABELS_FILE: &str = "labels.txt";

/// The text of [`VOCAB_FILE`] or [`LABELS_FILE`]: one entry per line.
pub fn one_per_line(entries: &[String]) -> String {
    entries.iter().flat_map(|s| [s.as_str(), "\n"]).collect()
}
/// Pre-extracted text segments (instead of `text.tokens`).
pub const TEXT_FEATURES: &str = "text.features";

/// What a dataset is made of: shapes, vocabulary, label names.
#[derive(Clone, PartialEq)]
pub struct Meta {
    pub name: String,
    /// R: region slots per image.
    pub regions: usize,
    /// Dr: region feature width.
    pub feature_dim: usize,
    /// T: token slots per text.
    pub max_tokens: usize,
    /// C: labels.
    pub num_labels: usize,
    /// K_obj: object classes of regions (0 when no split has classes).
    pub num_object_classes: usize,
    /// The vocabulary; 0 [PAD], 1 [UNK], 2 [MASK].
    pub vocab: Vec<String>,
    /// C label names.
    pub label_names: Vec<String>,
}

impl Meta {
    /// V: vocabulary size, reserved ids included.
    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }
}

impl fmt::Debug for Meta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Meta")
            .field("name", &self.name)
            .field("regions", &self.regions)
            .field("feature_dim", &self.feature_dim)
            .field("max_tokens", &self.max_tokens)
            .field("num_labels", &self.num_labels)
            .field("num_object_classes", &self.num_object_classes)
            .field("vocab_size", &self.vocab.len())
            .field("label_names", &self.label_names)
            .finish()
    }
}

fn check_name_list(what: &str, names: &[String]) -> std::result::Result<(), String> {
    let mut seen = HashSet::with_capacity(names.len());
    for (i, s) in names.iter().enumerate() {
        if s.is_empty() || s.contains(['\n', '\r']) {
            return Err(format!("{what} entry {i} ({s:?}) is empty or contains a line break"));
        }
        if !seen.insert(s.as_str()) {
            return Err(format!("{what} entry {i} ({s:?}) is a duplicate"));
        }
    }
    Ok(())
}

impl Meta {
    pub(crate) fn check(&self) -> std::result::Result<(), String> {
        let max16 = u16::MAX as usize;
        if self.regions == 0 || self.regions > max16 {
            return Err(format!("regions {} outside 1..={max16}", self.regions));
        }
        if self.feature_dim == 0 {
            return Err("feature_dim is 0".into());
        }
        if self.max_tokens == 0 || self.max_tokens > max16 {
            return Err(format!("max_tokens {} outside 1..={max16}", self.max_tokens));
        }
        if self.num_labels == 0 {
            return Err("num_labels is 0".into());
        }
        if self.num_object_classes > max16 + 1 {
            return Err(format!("num_object_classes {} > 65536", self.num_object_classes));
        }
        if self.label_names.len() != self.num_labels {
            let n = self.label_names.len();
            return Err(format!("{n} label names for num_labels {}", self.num_labels));
        }
        if self.vocab.len() < RESERVED_TOKENS.len() || self.vocab.len() > u32::MAX as usize {
            return Err(format!("vocabulary size {} outside 3..=2^32-1", self.vocab.len()));
        }
        for (id, want) in RESERVED_TOKENS.iter().enumerate() {
            if self.vocab[id] != *want {
                return Err(format!("vocabulary id {id} is {:?}, expected {want}", self.vocab[id]));
            }
        }
        check_name_list("vocabulary", &self.vocab)?;
        check_name_list("label names", &self.label_names)?;
        Ok(())
    }
}

/// Storage type of region or text features: f32, or 16-bit values a batch keeps as they are
/// (`FeatureDtype::features`) until the device widens them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FeatureDtype {
    F32,
    F16,
    BF16,
}

impl FeatureDtype {
    pub(crate) fn of(d: Dtype) -> Option<Self> {
        match d {
            Dtype::F32 => Some(FeatureDtype::F32),
            Dtype::F16 => Some(FeatureDtype::F16),
            Dtype::BF16 => Some(FeatureDtype::BF16),
            _ => None,
        }
    }
    pub fn dtype(self) -> Dtype {
        match self {
            FeatureDtype::F32 => Dtype::F32,
            FeatureDtype::F16 => Dtype::F16,
            FeatureDtype::BF16 => Dtype::BF16,
        }
    }
    pub fn size(self) -> usize {
        match self {
            FeatureDtype::F32 => 4,
            FeatureDtype::F16 | FeatureDtype::BF16 => 2,
        }
    }

    /// Appends `bytes` (little-endian values of this type) widened to f32.
    pub fn widen_into(self, bytes: &[u8], out: &mut Vec<f32>) {
        let n = bytes.len() / self.size();
        let start = out.len();
        out.resize(start + n, 0.0);
        let dst = &mut out[start..];
        match self.half() {
            None => bytemuck::cast_slice_mut::<f32, u8>(dst).copy_from_slice(&bytes[..4 * n]),
            Some(half) => match bytemuck::try_cast_slice::<u8, u16>(&bytes[..2 * n]) {
                Ok(src) if cfg!(target_endian = "little") => widen_halves(half, src, dst),
                _ => {
                    for (d, c) in dst.iter_mut().zip(bytes.chunks_exact(2)) {
                        *d = half.widen(u16::from_le_bytes([c[0], c[1]]));
                    }
                }
            },
        }
    }

    /// The 16-bit format, for F16 and BF16.
    pub fn half(self) -> Option<Half> {
        match self {
            FeatureDtype::F32 => None,
            FeatureDtype::F16 => Some(Half::F16),
            FeatureDtype::BF16 => Some(Half::Bf16),
        }
    }

    /// `bytes` as the model's batch holds them: f32, or the 16-bit values as they are (the
    /// device widens them where they are read: half the upload).
    pub fn features(self, bytes: &[u8]) -> Features {
        match self.half() {
            Some(half) => {
                Features::Half(half, bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect())
            }
            None => {
                let mut v = Vec::new();
                self.widen_into(bytes, &mut v);
                Features::F32(v)
            }
        }
    }

    /// Index of the first NaN or infinite value in `bytes`, found on the raw bits (no widening).
    pub fn first_non_finite(self, bytes: &[u8]) -> Option<usize> {
        // All exponent bits set ⇔ NaN or ±inf. The OR-fold has no early exit, so it vectorises;
        // the position is searched only when something is wrong.
        fn scan<T: bytemuck::Pod + Copy + std::ops::BitAnd<Output = T> + PartialEq>(
            bytes: &[u8],
            mask: T,
        ) -> Option<usize> {
            let v = typed::<T>(bytes);
            if !v.iter().fold(false, |acc, &w| acc | ((w & mask) == mask)) {
                return None;
            }
            v.iter().position(|&w| (w & mask) == mask)
        }
        match self {
            FeatureDtype::F32 => scan::<u32>(bytes, 0x7f80_0000),
            FeatureDtype::F16 => scan::<u16>(bytes, 0x7c00),
            FeatureDtype::BF16 => scan::<u16>(bytes, 0x7f80),
        }
    }

    pub(crate) fn value(self, bytes: &[u8], k: usize) -> f32 {
        let mut v = Vec::with_capacity(1);
        self.widen_into(&bytes[k * self.size()..(k + 1) * self.size()], &mut v);
        v[0]
    }
}

/// The raw bytes of a tensor as `&[T]`: borrowed when aligned, copied otherwise.
pub fn typed<T: bytemuck::Pod>(bytes: &[u8]) -> Cow<'_, [T]> {
    match bytemuck::try_cast_slice(bytes) {
        Ok(v) => Cow::Borrowed(v),
        Err(_) => Cow::Owned(bytes.chunks_exact(std::mem::size_of::<T>()).map(bytemuck::pod_read_unaligned).collect()),
    }
}

/// `dataset.json` (version 2).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Manifest {
    pub(crate) format: String,
    pub(crate) version: u32,
    pub(crate) name: String,
    pub(crate) regions: usize,
    pub(crate) feature_dim: usize,
    pub(crate) max_tokens: usize,
    /// Dt of `text.features`; 0 when texts are tokens.
    pub(crate) text_feature_dim: usize,
    pub(crate) num_labels: usize,
    pub(crate) num_object_classes: usize,
    pub(crate) vocab_size: usize,
    pub(crate) vocab_file: String,
    pub(crate) labels_file: String,
    pub(crate) splits: BTreeMap<String, Vec<ShardEntry>>,
}

/// One shard of a split, as the manifest lists it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardEntry {
    pub file: String,
    pub images: usize,
    pub texts: usize,
    pub bytes: u64,
    pub checksum: String,
}

/// What every shard of a dataset agrees on: the meta of [`Meta`] plus the text representation.
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    pub meta: Meta,
    /// Dt: width of pre-extracted text segments; 0 when texts are token ids.
    pub text_feature_dim: usize,
}

impl Layout {
    pub fn text_features(&self) -> bool {
        self.text_feature_dim > 0
    }

    /// Refuses a model whose shapes are not this dataset's.
    pub fn check_fits(&self, model: &ModelConfig) -> Result<()> {
        let m = &self.meta;
        let checks = [
            ("region feature width (Dr)", m.feature_dim, model.region_dim),
            ("vocabulary size (V)", m.vocab_size(), model.vocab),
            ("label count (C)", m.num_labels, model.labels),
            ("text feature width (Dt, 0 for tokens)", self.text_feature_dim, model.text_feature_dim),
        ];
        for (what, d, want) in checks {
            if d != want {
                return Err(Error::config(format!("dataset `{}` has {what} {d}, the model expects {want}", m.name)));
            }
        }
        if m.num_object_classes > model.object_classes {
            return Err(Error::config(format!(
                "dataset `{}` has {} object classes, the model has {}",
                m.name, m.num_object_classes, model.object_classes
            )));
        }
        Ok(())
    }
}

/// A name in the manifest must be a plain file name inside the dataset directory.
pub(crate) fn plain_file_name<'a>(mpath: &Path, field: &str, name: &'a str) -> Result<&'a str> {
    let ok = !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\', '\0']);
    if ok { Ok(name) } else { Err(Error::format(mpath, format!("{field} {name:?} is not a plain file name"))) }
}

/// Most bytes of a vocabulary or label file (a few million words).
const LINES_FILE_LIMIT: u64 = 256 << 20;

pub(crate) fn read_lines(path: &Path) -> Result<Vec<String>> {
    let text = crate::io::read_text(path, LINES_FILE_LIMIT)?;
    let mut lines: Vec<String> = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l).to_string()).collect();
    if lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    if let Some(i) = lines.iter().position(String::is_empty) {
        return Err(Error::format(path, format!("line {} is empty", i + 1)));
    }
    Ok(lines)
}

/// Whether `dir` is a dataset directory by its manifest's `format` (the one thing a writer may
/// replace).
pub fn is_dataset(dir: &Path) -> bool {
    let Ok(text) = crate::io::read_text(&dir.join(MANIFEST_FILE), crate::io::SMALL_FILE_LIMIT) else { return false };
    serde_json::from_str::<serde_json::Value>(&text)
        .is_ok_and(|v| v.get("format").and_then(|f| f.as_str()) == Some(FORMAT_NAME))
}

/// The entries of dataset directory `dir` that its manifest does not name (the manifest, the
/// vocabulary, the label names and the shards are the dataset; anything else is somebody's own
/// file, which replacing the dataset would delete). None when `dir` is not a readable dataset.
pub fn foreign_entries(dir: &Path) -> Option<Vec<String>> {
    let text = crate::io::read_text(&dir.join(MANIFEST_FILE), crate::io::SMALL_FILE_LIMIT).ok()?;
    let m: Manifest = serde_json::from_str(&text).ok()?;
    let mut ours: Vec<&str> = vec![MANIFEST_FILE, &m.vocab_file, &m.labels_file];
    ours.extend(m.splits.values().flatten().map(|e| e.file.as_str()));
    let mut foreign: Vec<String> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| !ours.contains(&name.as_str()))
        .collect();
    foreign.sort();
    Some(foreign)
}

/// The reserved vocabulary alone (datasets whose texts are features).
pub fn reserved_vocab() -> Vec<String> {
    RESERVED_TOKENS.iter().map(|s| s.to_string()).collect()
}

/// Explains why safetensors rejected `bytes`, naming the tensor where possible (a truncated file,
/// a header whose dtype or shape does not match the byte range of a tensor).
pub(crate) fn diagnose(bytes: &[u8], err: &safetensors::SafeTensorError) -> String {
    let len = bytes.len();
    if len < 8 {
        return format!("truncated: {len} bytes, shorter than the 8-byte safetensors header length");
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    if n > (len - 8) as u64 {
        return format!("truncated inside the header: header length {n}, but only {} bytes follow", len - 8);
    }
    let header = &bytes[8..8 + n as usize];
    let Ok(map) = serde_json::from_slice::<BTreeMap<String, serde_json::Value>>(header) else {
        return format!("not a safetensors file: {err}");
    };
    let data_len = len - 8 - n as usize;
    let mut infos = Vec::new();
    for (name, value) in map {
        if name == "__metadata__" {
            continue;
        }
        match serde_json::from_value::<TensorInfo>(value) {
            Ok(info) => infos.push((name, info)),
            Err(e) => return format!("tensor {name}: bad header entry: {e}"),
        }
    }
    infos.sort_by_key(|(_, i)| i.data_offsets);
    let mut expected_start = 0usize;
    for (name, info) in &infos {
        let (s, e) = info.data_offsets;
        let elems = info.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let need = elems.and_then(|x| x.checked_mul(info.dtype.bitsize())).map(|b| b.div_ceil(8));
        if e < s || Some(e - s) != need {
            let need = need.map_or("an overflowing number of".to_string(), |b| b.to_string());
            return format!(
                "tensor {name}: dtype {} with shape {:?} needs {need} bytes, but its data_offsets [{s}, {e}) span {}",
                info.dtype,
                info.shape,
                e.saturating_sub(s)
            );
        }
        if e > data_len {
            return format!(
                "truncated: tensor {name} needs bytes [{s}, {e}) of the data section, which has {data_len} bytes"
            );
        }
        if s != expected_start {
            return format!("tensor {name}: data_offsets start at {s}, expected {expected_start}");
        }
        expected_start = e;
    }
    if expected_start != data_len {
        return format!("data section has {data_len} bytes, tensors cover {expected_start}");
    }
    format!("not a valid safetensors file: {err}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    fn f16s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()).collect()
    }

    #[test]
    fn widening_is_the_same_aligned_or_not() {
        let values = [0.5f32, -3.25, 1000.0, 6.1e-5, 0.0, -0.0, 65504.0];
        for dtype in [FeatureDtype::F32, FeatureDtype::F16, FeatureDtype::BF16] {
            let bytes: Vec<u8> = match dtype {
                FeatureDtype::F32 => values.iter().flat_map(|x| x.to_le_bytes()).collect(),
                FeatureDtype::F16 => f16s(&values),
                FeatureDtype::BF16 => values.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect(),
            };
            let mut aligned = Vec::new();
            dtype.widen_into(&bytes, &mut aligned);
            // The same bytes one past an aligned address take the copying path.
            let mut shifted = vec![0u8; bytes.len() + 1];
            shifted[1..].copy_from_slice(&bytes);
            let mut unaligned = vec![7.0];
            dtype.widen_into(&shifted[1..], &mut unaligned);
            assert_eq!(unaligned[0], 7.0, "appends");
            assert_eq!(aligned, unaligned[1..]);
            for (got, want) in aligned.iter().zip(values) {
                assert!((got - want).abs() <= want.abs() * 4e-3, "{dtype:?}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn non_finite_values_are_found_where_they_are() {
        let mut v = vec![1.0f32; 37];
        for (pos, bad) in [(0, f32::NAN), (36, f32::INFINITY), (17, f32::NEG_INFINITY)] {
            v.fill(1.0);
            v[pos] = bad;
            let f32_bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            assert_eq!(FeatureDtype::F32.first_non_finite(&f32_bytes), Some(pos));
            assert_eq!(FeatureDtype::F16.first_non_finite(&f16s(&v)), Some(pos));
            let bf: Vec<u8> = v.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect();
            assert_eq!(FeatureDtype::BF16.first_non_finite(&bf), Some(pos));
        }
        // The largest finite values are finite; f16 overflows to inf when converted, not here.
        let big: Vec<u8> = [f32::MAX, -f32::MAX].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(FeatureDtype::F32.first_non_finite(&big), None);
        assert_eq!(FeatureDtype::F16.first_non_finite(&0x7bffu16.to_le_bytes()), None);
        assert_eq!(FeatureDtype::F16.first_non_finite(&0x7c00u16.to_le_bytes()), Some(0));
    }

    #[test]
    fn typed_views_borrow_when_aligned_and_copy_otherwise() {
        let words = [1u32, 2, 0xdead_beef];
        let bytes: Vec<u8> = words.iter().flat_map(|x| x.to_le_bytes()).collect();
        let mut shifted = vec![0u8; bytes.len() + 1];
        shifted[1..].copy_from_slice(&bytes);
        let a = typed::<u32>(&bytes);
        let b = typed::<u32>(&shifted[1..]);
        assert!(matches!(b, Cow::Owned(_)));
        assert_eq!(&a[..], &words[..]);
        assert_eq!(&b[..], &words[..]);
    }
}
