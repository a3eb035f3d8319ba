//! The in-memory dataset (what `synth` generates) and the names, checks and checksum shared with
//! the on-disk format (DESIGN.md §6; `docs/FORMAT.md` is the normative spec).
//!
//! On disk a dataset is a directory of safetensors shards plus `dataset.json`, read through
//! [`DatasetReader`] and written through [`DatasetWriter`] (`reader.rs`, `writer.rs`);
//! [`Dataset::save`] and [`Dataset::load`] go through them. Training and evaluation read the
//! directory through the reader, never through this in-memory form. A [`Split`] holds, row-major:
//!
//! | tensor | shape | dtype |
//! |---|---|---|
//! | `image.features` | [N, R, Dr] | f32 |
//! | `image.boxes` | [N, R, 5] | f32, (x1/W, y1/H, x2/W, y2/H, area/(W·H)) |
//! | `image.count` | `[N]` | u16, valid regions per image, 1..=R |
//! | `image.classes` | [N, R] | u16, optional, object class < K_obj |
//! | `text.tokens` | [M, T] | u32, 0-padded after `text.length` |
//! | `text.length` | `[M]` | u16, 1..=T |
//! | `text.item` | `[M]` | u32, image index of each text |
//! | `labels` | [N, C] | u8, 0/1, ≥ 1 label per image |
//!
//! Everything is validated; every error names the split or file, the tensor and, where it
//! applies, the item.

use std::fmt;
use std::path::Path;

use super::format::{FeatureDtype, Layout, Meta, PAD, UNK, tensor::*, typed};
use super::reader::{DatasetReader, SplitReader};
use super::writer::{DatasetWriter, ImageRecord, TextRecord};

use crate::{Error, Result};

/// One split: N images and M texts, row-major, shapes as in the module table.
#[derive(Clone, Default, PartialEq)]
pub struct Split {
    /// [N, R, Dr]
    pub image_features: Vec<f32>,
    /// [N, R, 5]
    pub image_boxes: Vec<f32>,
    /// `[N]`, each in 1..=R
    pub image_count: Vec<u16>,
    /// [N, R], each < K_obj
    pub image_classes: Option<Vec<u16>>,
    /// [M, T], 0-padded
    pub text_tokens: Vec<u32>,
    /// `[M]`, each in 1..=T
    pub text_length: Vec<u16>,
    /// `[M]`, image index of each text
    pub text_item: Vec<u32>,
    /// [N, C], 0/1
    pub labels: Vec<u8>,
}

impl fmt::Debug for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Split")
            .field("images", &self.num_images())
            .field("texts", &self.num_texts())
            .field("image_features", &self.image_features.len())
            .field("image_classes", &self.image_classes.as_ref().map(Vec::len))
            .field("text_tokens", &self.text_tokens.len())
            .field("labels", &self.labels.len())
            .finish()
    }
}

/// A problem found in a split: which tensor, which item, what.
#[derive(Debug)]
struct Problem {
    tensor: &'static str,
    item: Option<usize>,
    what: String,
}

impl Problem {
    fn new(tensor: &'static str, item: Option<usize>, what: impl Into<String>) -> Self {
        Problem { tensor, item, what: what.into() }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.item {
            Some(i) => write!(f, "tensor {}, item {i}: {}", self.tensor, self.what),
            None => write!(f, "tensor {}: {}", self.tensor, self.what),
        }
    }
}

impl Split {
    /// N.
    pub fn num_images(&self) -> usize {
        self.image_count.len()
    }

    /// M.
    pub fn num_texts(&self) -> usize {
        self.text_length.len()
    }

    /// [M, C]: the labels of each text's image. `num_labels` is C.
    pub fn text_labels(&self, num_labels: usize) -> Vec<u8> {
        let c = num_labels;
        let mut out = Vec::with_capacity(self.num_texts() * c);
        for &item in &self.text_item {
            let i = item as usize;
            out.extend_from_slice(&self.labels[i * c..(i + 1) * c]);
        }
        out
    }

    /// For each image, the indices of its texts, in text order.
    pub fn image_texts(&self) -> Vec<Vec<usize>> {
        let mut groups = vec![Vec::new(); self.num_images()];
        for (t, &item) in self.text_item.iter().enumerate() {
            groups[item as usize].push(t);
        }
        groups
    }

    /// The images at `images` (in that order, repeats allowed) with all their texts; `text_item`
    /// is remapped to positions in `images`. Texts are grouped by new image, in original order.
    ///
    /// Panics if an index is ≥ N (a caller bug, like slice indexing).
    pub fn subset(&self, images: &[usize]) -> Split {
        let n = self.num_images();
        let m = self.num_texts();
        if let Some(&bad) = images.iter().find(|&&i| i >= n) {
            panic!("Split::subset: image index {bad} out of range (N = {n})");
        }
        if images.is_empty() {
            return Split { image_classes: self.image_classes.as_ref().map(|_| Vec::new()), ..Split::default() };
        }
        // Per-item widths from the (non-empty) split itself.
        let r = self.image_boxes.len() / (5 * n);
        let dr = self.image_features.len() / (n * r).max(1);
        let c = self.labels.len() / n;
        let t = self.text_tokens.len().checked_div(m).unwrap_or(0);

        let take = |src: &[f32], width: usize| -> Vec<f32> {
            let mut v = Vec::with_capacity(images.len() * width);
            for &i in images {
                v.extend_from_slice(&src[i * width..(i + 1) * width]);
            }
            v
        };
        let groups = self.image_texts();
        let mut out = Split {
            image_features: take(&self.image_features, r * dr),
            image_boxes: take(&self.image_boxes, r * 5),
            image_count: images.iter().map(|&i| self.image_count[i]).collect(),
            image_classes: self.image_classes.as_ref().map(|cls| {
                let mut v = Vec::with_capacity(images.len() * r);
                for &i in images {
                    v.extend_from_slice(&cls[i * r..(i + 1) * r]);
                }
                v
            }),
            labels: Vec::with_capacity(images.len() * c),
            ..Split::default()
        };
        for (new, &i) in images.iter().enumerate() {
            out.labels.extend_from_slice(&self.labels[i * c..(i + 1) * c]);
            for &tx in &groups[i] {
                out.text_tokens.extend_from_slice(&self.text_tokens[tx * t..(tx + 1) * t]);
                out.text_length.push(self.text_length[tx]);
                out.text_item.push(new as u32);
            }
        }
        out
    }

    /// Checks every invariant of this split against `meta`.
    pub(crate) fn check(&self, meta: &Meta) -> std::result::Result<(), impl std::fmt::Display> {
        let (r, dr, t, c) = (meta.regions, meta.feature_dim, meta.max_tokens, meta.num_labels);
        let (k_obj, v) = (meta.num_object_classes, meta.vocab.len());
        let n = self.num_images();
        let m = self.num_texts();
        let want_len = |tensor, got: usize, dims: &[usize]| {
            let want = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            if want == Some(got) {
                Ok(())
            } else {
                Err(Problem::new(tensor, None, format!("{got} values, expected shape {dims:?}")))
            }
        };
        want_len(IMAGE_FEATURES, self.image_features.len(), &[n, r, dr])?;
        want_len(IMAGE_BOXES, self.image_boxes.len(), &[n, r, 5])?;
        if let Some(cls) = &self.image_classes {
            want_len(IMAGE_CLASSES, cls.len(), &[n, r])?;
            if n > 0 && k_obj == 0 {
                return Err(Problem::new(IMAGE_CLASSES, None, "present but num_object_classes is 0"));
            }
        }
        want_len(LABELS, self.labels.len(), &[n, c])?;
        want_len(TEXT_TOKENS, self.text_tokens.len(), &[m, t])?;
        want_len(TEXT_ITEM, self.text_item.len(), &[m])?;
        if n > u32::MAX as usize {
            return Err(Problem::new(IMAGE_COUNT, None, format!("{n} images exceed u32 ids")));
        }

        for i in 0..n {
            let count = self.image_count[i] as usize;
            if count == 0 || count > r {
                let what = format!("region count {count} outside 1..={r}");
                return Err(Problem::new(IMAGE_COUNT, Some(i), what));
            }
            let feats = &self.image_features[i * r * dr..(i + 1) * r * dr];
            if let Some(p) = feats.iter().position(|x| !x.is_finite()) {
                let what = format!("non-finite value {} at region {}, dim {}", feats[p], p / dr, p % dr);
                return Err(Problem::new(IMAGE_FEATURES, Some(i), what));
            }
            let boxes = &self.image_boxes[i * r * 5..(i + 1) * r * 5];
            for (reg, b) in boxes.chunks_exact(5).enumerate() {
                if let Some(&x) = b.iter().find(|x| !(0.0..=1.0).contains(*x)) {
                    let what = format!("region {reg}: box value {x} outside [0, 1] in {b:?}");
                    return Err(Problem::new(IMAGE_BOXES, Some(i), what));
                }
                if reg < count && (b[0] > b[2] || b[1] > b[3]) {
                    let what = format!("region {reg}: box {b:?} has x1 > x2 or y1 > y2");
                    return Err(Problem::new(IMAGE_BOXES, Some(i), what));
                }
            }
            if let Some(cls) = &self.image_classes {
                let row = &cls[i * r..(i + 1) * r];
                if let Some(p) = row.iter().position(|&k| k as usize >= k_obj) {
                    let what = format!("region {p}: class {} ≥ num_object_classes {k_obj}", row[p]);
                    return Err(Problem::new(IMAGE_CLASSES, Some(i), what));
                }
            }
            let row = &self.labels[i * c..(i + 1) * c];
            if let Some(p) = row.iter().position(|&y| y > 1) {
                let what = format!("label {p} has value {}, expected 0 or 1", row[p]);
                return Err(Problem::new(LABELS, Some(i), what));
            }
            if !row.contains(&1) {
                return Err(Problem::new(LABELS, Some(i), "image has no label"));
            }
        }

        let mut has_text = vec![false; n];
        for j in 0..m {
            let len = self.text_length[j] as usize;
            if len == 0 || len > t {
                let what = format!("text length {len} outside 1..={t}");
                return Err(Problem::new(TEXT_LENGTH, Some(j), what));
            }
            let row = &self.text_tokens[j * t..(j + 1) * t];
            for (p, &tok) in row.iter().enumerate() {
                let bad = if p < len { !(tok == UNK || (tok >= 3 && (tok as usize) < v)) } else { tok != PAD };
                if bad {
                    let what = if p < len {
                        format!("token {tok} at position {p} (length {len}) is not [UNK] or in 3..{v}")
                    } else {
                        format!("token {tok} at padding position {p} (length {len}), expected 0")
                    };
                    return Err(Problem::new(TEXT_TOKENS, Some(j), what));
                }
            }
            let item = self.text_item[j] as usize;
            if item >= n {
                let what = format!("image index {item} ≥ number of images {n}");
                return Err(Problem::new(TEXT_ITEM, Some(j), what));
            }
            has_text[item] = true;
        }
        if let Some(i) = has_text.iter().position(|&h| !h) {
            return Err(Problem::new(TEXT_ITEM, None, format!("image {i} has no text")));
        }
        Ok(())
    }
}

/// A dataset: meta plus the three splits.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    pub meta: Meta,
    pub train: Split,
    pub val: Split,
    pub test: Split,
}

impl Dataset {
    /// The splits with their names, in manifest order.
    pub fn splits(&self) -> [(&'static str, &Split); 3] {
        [("train", &self.train), ("val", &self.val), ("test", &self.test)]
    }

    /// Checks every invariant: meta sanity, shapes, region counts in 1..=R, boxes in [0, 1] with
    /// x1 ≤ x2 and y1 ≤ y2, object classes < K_obj, finite features, text lengths in 1..=T,
    /// tokens [UNK] or in 3..V before the length and [PAD] after it, `text.item` < N, every
    /// image with ≥ 1 text, labels 0/1 with ≥ 1 label per image.
    pub fn validate(&self) -> Result<()> {
        self.meta.check().map_err(|e| Error::data(format!("dataset {:?}: {e}", self.meta.name)))?;
        for (name, split) in self.splits() {
            split.check(&self.meta).map_err(|p| Error::data(format!("{name} split: {p}")))?;
        }
        Ok(())
    }

    /// Writes the dataset directory through [`DatasetWriter`] (one shard per split, f32
    /// features), replacing whatever was there. Validates first.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        self.save_sharded(dir, usize::MAX)
    }

    /// Like [`Dataset::save`], with shards of about `shard_bytes` each.
    pub fn save_sharded(&self, dir: impl AsRef<Path>, shard_bytes: usize) -> Result<()> {
        self.validate()?;
        let layout = Layout { meta: self.meta.clone(), text_feature_dim: 0 };
        let mut w = DatasetWriter::create(dir, layout, shard_bytes)?;
        for (name, split) in self.splits() {
            w.write_split(name, split)?;
        }
        w.finish().map(drop)
    }

    /// Reads a dataset directory into memory through [`DatasetReader`], with the full content
    /// check of `semshare check` (checksums included). Texts must be tokens and there must be
    /// no `database` split: the in-memory form has neither (use [`DatasetReader`]).
    pub fn load(dir: impl AsRef<Path>) -> Result<Dataset> {
        let reader = DatasetReader::open(dir)?;
        if let Some(e) = reader.check(1).into_iter().next() {
            return Err(e);
        }
        if reader.layout.text_features() || reader.database().is_some() {
            return Err(Error::config(format!(
                "{}: text features or a database split cannot be held by the in-memory Dataset",
                reader.dir.display()
            )));
        }
        let mut splits = Vec::with_capacity(3);
        for name in ["train", "val", "test"] {
            splits.push(materialize(&reader, reader.split(name)?));
        }
        let test = splits.pop().expect("three splits");
        let val = splits.pop().expect("three splits");
        let train = splits.pop().expect("three splits");
        Ok(Dataset { meta: reader.layout.meta.clone(), train, val, test })
    }
}

/// The in-memory form's way onto disk (here rather than in `writer.rs`, so the writer knows only
/// raw records and the dependency runs one way: dataset -> writer).
impl DatasetWriter {
    /// Validates an in-memory split and writes it as split `name`: f32 features, token texts.
    /// `Dataset::save` writes train, val and test this way; a generator with a retrieval set
    /// writes it as `"database"`.
    pub fn write_split(&mut self, name: &str, split: &Split) -> Result<()> {
        let m = &self.layout().meta;
        split.check(m).map_err(|p| Error::data(format!("{name} split: {p}")))?;
        let (r, dr, t, c) = (m.regions, m.feature_dim, m.max_tokens, m.num_labels);
        self.begin_split(name)?;
        for (i, texts) in split.image_texts().iter().enumerate() {
            let image = ImageRecord {
                features: bytemuck::cast_slice(&split.image_features[i * r * dr..(i + 1) * r * dr]),
                feature_dtype: FeatureDtype::F32,
                boxes: bytemuck::cast_slice(&split.image_boxes[i * r * 5..(i + 1) * r * 5]),
                count: split.image_count[i],
                classes: split.image_classes.as_ref().map(|k| bytemuck::cast_slice(&k[i * r..(i + 1) * r])),
                labels: &split.labels[i * c..(i + 1) * c],
            };
            let texts: Vec<TextRecord> = texts
                .iter()
                .map(|&j| TextRecord {
                    content: bytemuck::cast_slice(&split.text_tokens[j * t..(j + 1) * t]),
                    dtype: None,
                    length: split.text_length[j],
                })
                .collect();
            self.push(&image, &texts)?;
        }
        Ok(())
    }
}

/// A split of an opened (token-text) dataset, copied into memory.
fn materialize(reader: &DatasetReader, s: &SplitReader) -> Split {
    let mut out = Split {
        image_classes: s.has_classes().then(Vec::new),
        text_item: s.text_items(),
        labels: s.image_labels(),
        ..Split::default()
    };
    let r = reader.layout.meta.regions;
    for i in 0..s.num_images() {
        let (shard, k) = s.locate_image(i);
        shard.feature_dtype().widen_into(shard.feature_bytes(k), &mut out.image_features);
        out.image_boxes.extend_from_slice(&typed::<f32>(shard.box_bytes(k)));
        out.image_count.push(shard.count(k) as u16);
        if let (Some(dst), Some(b)) = (out.image_classes.as_mut(), shard.class_bytes(k)) {
            dst.extend_from_slice(&typed::<u16>(b)[..r]);
        }
    }
    for j in 0..s.num_texts() {
        let (shard, k) = s.locate_text(j);
        out.text_tokens.extend_from_slice(&typed::<u32>(shard.text_bytes(k)));
        out.text_length.push(shard.length(k) as u16);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::checksum::{Checksum, checksum, format_checksum};
    use crate::data::format::MANIFEST_FILE;
    use crate::data::synth::tests::tiny;
    use crate::data::synth::{SynthPreset, generate};
    use crate::data::writer::RawTensor;
    use proptest::prelude::*;
    use safetensors::tensor::{Dtype, SafeTensors};
    use std::collections::HashSet;
    use std::fs;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fresh, empty directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> TempDir {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let k = NEXT.fetch_add(1, Ordering::Relaxed);
            let p = std::env::temp_dir().join(format!("semshare-test-{}-{tag}-{k}", std::process::id()));
            let _ = fs::remove_dir_all(&p);
            TempDir(p)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn small() -> Dataset {
        generate(&tiny(SynthPreset::Balanced, 17)).unwrap()
    }

    /// Saves `small()` and returns (dir, dataset).
    fn saved(tag: &str) -> (TempDir, Dataset) {
        let dir = TempDir::new(tag);
        let ds = small();
        ds.save(&dir.0).unwrap();
        (dir, ds)
    }

    fn load_err(dir: &Path) -> String {
        match Dataset::load(dir) {
            Ok(_) => panic!("load of a corrupted dataset succeeded"),
            Err(e) => e.to_string(),
        }
    }

    fn assert_mentions(msg: &str, parts: &[&str]) {
        for p in parts {
            assert!(msg.contains(p), "error {msg:?} does not mention {p:?}");
        }
    }

    /// Rewrites the manifest entry of `split` so that size and checksum match the shard again:
    /// lets a test get past the checksum to the value checks.
    fn reseal(dir: &Path, split: &str) {
        let bytes = fs::read(dir.join(format!("{split}-00000.safetensors"))).unwrap();
        let mpath = dir.join(MANIFEST_FILE);
        let mut man: serde_json::Value = serde_json::from_str(&fs::read_to_string(&mpath).unwrap()).unwrap();
        man["splits"][split][0]["checksum"] = format_checksum(checksum(&bytes)).into();
        man["splits"][split][0]["bytes"] = bytes.len().into();
        fs::write(&mpath, serde_json::to_string(&man).unwrap()).unwrap();
    }

    /// Byte offset in the shard file of element `index` of `tensor`.
    fn element_offset(bytes: &[u8], tensor: &str, index: usize) -> usize {
        let (n, meta) = SafeTensors::read_metadata(bytes).unwrap();
        let info = meta.info(tensor).unwrap();
        8 + n + info.data_offsets.0 + index * info.dtype.bitsize() / 8
    }

    fn edit_manifest(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
        let mpath = dir.join(MANIFEST_FILE);
        let mut man: serde_json::Value = serde_json::from_str(&fs::read_to_string(&mpath).unwrap()).unwrap();
        f(&mut man);
        fs::write(&mpath, serde_json::to_string(&man).unwrap()).unwrap();
    }

    #[test]
    fn the_checksum_in_chunks_equals_the_checksum_in_one_pass() {
        let bytes: Vec<u8> = (0..1000u32).map(|i| (i * 7 + i / 13) as u8).collect();
        for chunk in [1, 7, 32, 33, 96, 999] {
            let mut sum = Checksum::new();
            for c in bytes.chunks(chunk) {
                sum.update(c);
            }
            assert_eq!(sum.finish(), checksum(&bytes), "chunks of {chunk}");
        }
    }

    #[test]
    fn save_then_load_gives_the_same_dataset() {
        let (dir, ds) = saved("roundtrip");
        let back = Dataset::load(&dir.0).unwrap();
        assert!(back == ds);
        let names: HashSet<String> =
            fs::read_dir(&dir.0).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        let want = [
            "dataset.json",
            "vocab.txt",
            "labels.txt",
            "train-00000.safetensors",
            "val-00000.safetensors",
            "test-00000.safetensors",
        ];
        assert_eq!(names, want.iter().map(|s| s.to_string()).collect(), "no temp files left behind");
        let vocab = fs::read_to_string(dir.0.join("vocab.txt")).unwrap();
        assert!(vocab.starts_with("[PAD]\n[UNK]\n[MASK]\nanimals.w0\n"));

        // Overwriting an existing dataset, without classes and with an empty split.
        let mut other = ds.clone();
        other.train.image_classes = None;
        other.val = Split::default(); // an empty split has no shard, so no image.classes either
        other.save(&dir.0).unwrap();
        assert!(Dataset::load(&dir.0).unwrap() == other);
    }

    #[test]
    fn save_refuses_invalid_data() {
        let dir = TempDir::new("invalid");
        let mut ds = small();
        ds.test.labels[0] = 2;
        let e = ds.save(&dir.0).unwrap_err().to_string();
        assert_mentions(&e, &["test split", "labels", "item 0"]);
        assert!(!dir.0.exists());
    }

    #[test]
    fn subset_keeps_texts_and_remaps_items() {
        let ds = small();
        let s = ds.train.subset(&[5, 2, 5]);
        assert_eq!(s.num_images(), 3);
        assert_eq!(s.num_texts(), 9);
        assert_eq!(s.text_item, vec![0, 0, 0, 1, 1, 1, 2, 2, 2]);
        let (r, dr, t, c) = (8, 16, 10, 6);
        assert_eq!(s.image_features[r * dr..2 * r * dr], ds.train.image_features[2 * r * dr..3 * r * dr]);
        assert_eq!(s.text_tokens[3 * t..4 * t], ds.train.text_tokens[6 * t..7 * t]);
        assert_eq!(s.labels[..c], ds.train.labels[5 * c..6 * c]);
        assert_eq!(s.image_classes.as_ref().unwrap()[..r], ds.train.image_classes.as_ref().unwrap()[5 * r..6 * r]);
        let sub = Dataset { train: s, ..ds.clone() };
        sub.validate().unwrap();
        let tl = sub.train.text_labels(c);
        for j in 0..sub.train.num_texts() {
            let i = sub.train.text_item[j] as usize;
            assert_eq!(tl[j * c..(j + 1) * c], sub.train.labels[i * c..(i + 1) * c]);
        }
        assert_eq!(sub.train.image_texts()[1], vec![3, 4, 5]);
    }

    #[test]
    fn validate_names_split_tensor_and_item() {
        type Corrupt = fn(&mut Dataset);
        let cases: Vec<(Corrupt, &[&str])> = vec![
            (|d| d.train.image_count[3] = 0, &["train split", "image.count", "item 3"]),
            (|d| d.val.image_count[1] = 9, &["val split", "image.count", "item 1"]),
            (|d| d.test.image_features[2 * 8 * 16 + 5] = f32::NAN, &["test split", "image.features", "item 2", "NaN"]),
            (|d| d.train.image_features.pop().map(drop).unwrap(), &["train split", "image.features", "shape"]),
            (|d| d.train.image_boxes[4 * 8 * 5 + 1] = 1.5, &["image.boxes", "item 4"]),
            (|d| d.train.image_boxes[7 * 8 * 5] = 0.99, &["image.boxes", "item 7", "x1 > x2"]),
            (|d| d.val.image_classes.as_mut().unwrap()[8 * 2 + 1] = 40, &["val split", "image.classes", "item 2"]),
            (|d| d.train.text_length[10] = 0, &["text.length", "item 10"]),
            (|d| d.train.text_length[11] = 11, &["text.length", "item 11"]),
            (|d| d.train.text_tokens[12 * 10] = 200, &["text.tokens", "item 12", "token 200"]),
            (|d| d.train.text_tokens[12 * 10] = 2, &["text.tokens", "item 12", "token 2"]),
            (|d| d.train.text_tokens[12 * 10] = 0, &["text.tokens", "item 12", "token 0"]),
            (
                |d| {
                    let j = 13;
                    let len = d.train.text_length[j] as usize;
                    d.train.text_length[j] = (len - 1) as u16;
                },
                &["text.tokens", "item 13", "padding"],
            ),
            (|d| d.train.text_item[14] = 60, &["text.item", "item 14", "60"]),
            (|d| d.train.labels[6 * 6 + 2] = 3, &["labels", "item 6"]),
            (|d| d.train.labels[8 * 6..9 * 6].fill(0), &["labels", "item 8", "no label"]),
            (
                |d| {
                    let keep: Vec<usize> = (0..d.train.num_texts()).filter(|&j| d.train.text_item[j] != 4).collect();
                    d.train.text_item = keep.iter().map(|&j| d.train.text_item[j]).collect();
                    d.train.text_length = keep.iter().map(|&j| d.train.text_length[j]).collect();
                    d.train.text_tokens =
                        keep.iter().flat_map(|&j| d.train.text_tokens[j * 10..(j + 1) * 10].to_vec()).collect();
                },
                &["text.item", "image 4 has no text"],
            ),
            (|d| d.meta.vocab[2] = "[MSK]".into(), &["vocabulary id 2"]),
            (|d| d.meta.vocab[7] = "animals.w0".into(), &["vocabulary entry 7", "duplicate"]),
            (|d| d.meta.label_names.pop().map(drop).unwrap(), &["label names"]),
        ];
        let base = small();
        base.validate().unwrap();
        for (corrupt, parts) in cases {
            let mut d = base.clone();
            corrupt(&mut d);
            let e = d.validate().unwrap_err();
            assert!(matches!(e, Error::Data { .. }), "{e}");
            assert_mentions(&e.to_string(), parts);
        }
    }

    #[test]
    fn truncated_shards_are_errors_naming_file_and_tensor() {
        let (dir, _) = saved("truncate");
        let path = dir.0.join("train-00000.safetensors");
        let full = fs::read(&path).unwrap();
        let data_start = element_offset(&full, IMAGE_FEATURES, 0).min(element_offset(&full, LABELS, 0));
        let len = full.len();
        let cases: Vec<(usize, Vec<&str>)> = vec![
            (0, vec!["train-00000.safetensors", "truncated"]),
            (5, vec!["train-00000.safetensors", "truncated"]),
            (20, vec!["train-00000.safetensors", "truncated inside the header"]),
            (data_start + 10, vec!["train-00000.safetensors", "truncated: tensor"]),
            (
                element_offset(&full, IMAGE_FEATURES, 100),
                vec!["train-00000.safetensors", "truncated: tensor image.features"],
            ),
            (len - 1, vec!["train-00000.safetensors", "truncated: tensor"]),
        ];
        for (cut, parts) in cases {
            fs::write(&path, &full[..cut]).unwrap();
            assert_mentions(&load_err(&dir.0), &parts);
        }
        // One byte too many: the data section is longer than its tensors.
        let mut longer = full.clone();
        longer.push(0);
        fs::write(&path, &longer).unwrap();
        assert_mentions(&load_err(&dir.0), &["train-00000.safetensors", "data section"]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn any_truncation_or_byte_flip_is_an_error_not_a_panic(cut_frac in 0.0f64..1.0, flip_frac in 0.0f64..1.0, bit in 0u8..8) {
            let (dir, _) = saved("prop");
            let path = dir.0.join("val-00000.safetensors");
            let full = fs::read(&path).unwrap();
            let cut = (cut_frac * full.len() as f64) as usize;
            fs::write(&path, &full[..cut]).unwrap();
            let e = Dataset::load(&dir.0).unwrap_err().to_string();
            prop_assert!(e.contains("val-00000.safetensors"), "{}", e);
            let mut flipped = full.clone();
            let k = (flip_frac * full.len() as f64) as usize;
            flipped[k] ^= 1 << bit;
            fs::write(&path, &flipped).unwrap();
            let e = Dataset::load(&dir.0).unwrap_err().to_string();
            prop_assert!(e.contains("val-00000.safetensors"), "{}", e);
        }

        #[test]
        fn random_shapes_round_trip(seed in 0u64..1000, r in 1usize..6, dr in 1usize..9, t in 1usize..7, c in 1usize..5, tpi in 1usize..4) {
            let cfg = crate::data::synth::SynthConfig {
                train: 7, val: 1, test: 3, regions: r, feature_dim: dr, max_tokens: t, num_labels: c,
                texts_per_image: tpi, vocab_size: 40, num_object_classes: 3,
                ..tiny(SynthPreset::WeakText, seed)
            };
            let ds = generate(&cfg).unwrap();
            let dir = TempDir::new("shapes");
            ds.save(&dir.0).unwrap();
            prop_assert!(Dataset::load(&dir.0).unwrap() == ds);
        }
    }

    #[test]
    fn header_dtype_changes_are_errors_naming_the_tensor() {
        let (dir, _) = saved("dtype");
        let path = dir.0.join("test-00000.safetensors");
        let full = fs::read(&path).unwrap();
        let n = u64::from_le_bytes(full[..8].try_into().unwrap()) as usize;
        let header = std::str::from_utf8(&full[8..8 + n]).unwrap().to_string();
        let cases = [
            // Same element size: safetensors accepts it, our dtype check does not.
            (
                "\"image.count\":{\"dtype\":\"U16\"",
                "\"image.count\":{\"dtype\":\"I16\"",
                vec!["test-00000.safetensors", "image.count", "dtype I16"],
            ),
            (
                "\"text.tokens\":{\"dtype\":\"U32\"",
                "\"text.tokens\":{\"dtype\":\"F32\"",
                vec!["text.tokens", "dtype F32"],
            ),
            // Different size: the header no longer matches the byte ranges.
            (
                "\"image.features\":{\"dtype\":\"F32\"",
                "\"image.features\":{\"dtype\":\"F16\"",
                vec!["image.features", "needs"],
            ),
            ("\"labels\":{\"dtype\":\"U8\"", "\"labels\":{\"dtype\":\"I8\"", vec!["labels", "dtype I8"]),
        ];
        for (from, to, parts) in cases {
            assert!(header.contains(from), "{from} not in {header}");
            let mut bytes = full.clone();
            bytes[8..8 + n].copy_from_slice(header.replacen(from, to, 1).as_bytes());
            fs::write(&path, &bytes).unwrap();
            assert_mentions(&load_err(&dir.0), &parts);
        }
        // A wrong shape with the right byte count: [30, 6] labels as [6, 30].
        let from = "\"labels\":{\"dtype\":\"U8\",\"shape\":[30,6]";
        assert!(header.contains(from), "{header}");
        let mut bytes = full.clone();
        bytes[8..8 + n]
            .copy_from_slice(header.replacen(from, "\"labels\":{\"dtype\":\"U8\",\"shape\":[6,30]", 1).as_bytes());
        fs::write(&path, &bytes).unwrap();
        assert_mentions(&load_err(&dir.0), &["test-00000.safetensors", "labels", "shape [6, 30]", "expected [30, 6]"]);
    }

    #[test]
    fn checksum_mismatch_is_an_error() {
        let (dir, _) = saved("checksum");
        let path = dir.0.join("train-00000.safetensors");
        let mut bytes = fs::read(&path).unwrap();
        let k = element_offset(&bytes, IMAGE_FEATURES, 77);
        bytes[k] ^= 1;
        fs::write(&path, &bytes).unwrap();
        assert_mentions(&load_err(&dir.0), &["train-00000.safetensors", "checksum mismatch"]);
        edit_manifest(&dir.0, |m| m["splits"]["val"][0]["checksum"] = "fnv1a64x4:0000000000000000".into());
        reseal(&dir.0, "train");
        assert_mentions(&load_err(&dir.0), &["val-00000.safetensors", "checksum mismatch"]);
    }

    #[test]
    fn bad_values_on_disk_are_errors_naming_file_tensor_and_item() {
        let (r, dr, t) = (8, 16, 10);
        type Patch = (&'static str, &'static str, usize, Vec<u8>, Vec<&'static str>);
        let cases: Vec<Patch> = vec![
            (
                "train",
                IMAGE_FEATURES,
                (4 * r + 1) * dr + 3,
                f32::NAN.to_le_bytes().to_vec(),
                vec!["train-00000.safetensors", "image.features", "item 4", "NaN"],
            ),
            (
                "val",
                IMAGE_FEATURES,
                2 * r * dr,
                f32::INFINITY.to_le_bytes().to_vec(),
                vec!["val-00000.safetensors", "image.features", "item 2", "inf"],
            ),
            (
                "test",
                TEXT_TOKENS,
                5 * t,
                200u32.to_le_bytes().to_vec(),
                vec!["test-00000.safetensors", "text.tokens", "item 5", "token 200"],
            ),
            ("test", TEXT_TOKENS, 6 * t, u32::MAX.to_le_bytes().to_vec(), vec!["text.tokens", "item 6"]),
            ("train", IMAGE_COUNT, 9, 0u16.to_le_bytes().to_vec(), vec!["image.count", "item 9"]),
            ("train", IMAGE_CLASSES, 3 * r, 999u16.to_le_bytes().to_vec(), vec!["image.classes", "item 3", "999"]),
            ("train", IMAGE_BOXES, 2 * r * 5, (-0.5f32).to_le_bytes().to_vec(), vec!["image.boxes", "item 2"]),
            ("train", TEXT_ITEM, 11, 1000u32.to_le_bytes().to_vec(), vec!["text.item", "item 11"]),
            (
                "val",
                TEXT_LENGTH,
                1,
                50u16.to_le_bytes().to_vec(),
                vec!["val-00000.safetensors", "text.length", "item 1"],
            ),
            ("train", LABELS, 6 * 7 + 1, vec![7], vec!["labels", "item 7"]),
        ];
        for (split, tensor, index, value, parts) in cases {
            let (dir, _) = saved("values");
            let path = dir.0.join(format!("{split}-00000.safetensors"));
            let mut bytes = fs::read(&path).unwrap();
            let k = element_offset(&bytes, tensor, index);
            bytes[k..k + value.len()].copy_from_slice(&value);
            fs::write(&path, &bytes).unwrap();
            reseal(&dir.0, split);
            let e = Dataset::load(&dir.0).unwrap_err();
            assert!(matches!(e, Error::Format { .. }), "{e}");
            assert_mentions(&e.to_string(), &parts);
        }
    }

    #[test]
    fn missing_files_and_bad_manifests_are_errors() {
        let (dir, _) = saved("missing");
        let d = &dir.0;
        let e = Dataset::load(d.join("nowhere")).unwrap_err();
        assert!(matches!(e, Error::Format { .. }));
        assert_mentions(&e.to_string(), &["nowhere", "does not exist"]);
        fs::create_dir_all(d.join("empty")).unwrap();
        assert_mentions(&load_err(&d.join("empty")), &["empty", "holds no dataset.json"]);

        let manifest = fs::read_to_string(d.join(MANIFEST_FILE)).unwrap();
        let restore = || fs::write(d.join(MANIFEST_FILE), &manifest).unwrap();
        for file in ["val-00000.safetensors", "vocab.txt", "labels.txt"] {
            let keep = fs::read(d.join(file)).unwrap();
            fs::remove_file(d.join(file)).unwrap();
            assert_mentions(&load_err(d), &[file]);
            fs::write(d.join(file), keep).unwrap();
        }
        Dataset::load(d).unwrap();

        fs::write(d.join(MANIFEST_FILE), &manifest[..manifest.len() / 2]).unwrap();
        assert_mentions(&load_err(d), &["dataset.json", "not a valid manifest"]);
        restore();
        type Edit = fn(&mut serde_json::Value);
        let edits: Vec<(Edit, &[&str])> = vec![
            (|m| m["version"] = 1.into(), &["dataset.json", "version 1"]),
            (|m| m["format"] = "other".into(), &["dataset.json", "format"]),
            (|m| m["colour"] = 1.into(), &["dataset.json", "colour"]),
            (|m| m["vocab_size"] = 199.into(), &["vocab.txt", "vocab_size 199"]),
            (|m| m["num_labels"] = 7.into(), &["labels.txt", "num_labels 7"]),
            (|m| m["regions"] = 9.into(), &["train-00000.safetensors", "image.features", "shape"]),
            (|m| m["splits"]["val"][0]["images"] = 21.into(), &["val-00000.safetensors", "shape"]),
            (|m| m["splits"]["test"][0]["texts"] = 89.into(), &["test-00000.safetensors", "text.tokens", "shape"]),
            (|m| m["splits"]["train"][0]["bytes"] = 1.into(), &["train-00000.safetensors", "dataset.json says 1"]),
            (
                |m| m["splits"]["train"][0]["file"] = "../x.safetensors".into(),
                &["dataset.json", "not a plain file name"],
            ),
            (
                |m| drop(m["splits"].as_object_mut().unwrap().remove("test")),
                &["dataset.json", "split \"test\" missing"],
            ),
            (|m| m["splits"]["extra"] = m["splits"]["val"].clone(), &["dataset.json", "unknown split"]),
        ];
        for (edit, parts) in edits {
            edit_manifest(d, edit);
            assert_mentions(&load_err(d), parts);
            restore();
        }
        let vocab = fs::read_to_string(d.join("vocab.txt")).unwrap();
        fs::write(d.join("vocab.txt"), vocab.replacen("animals.w1\n", "\n", 1)).unwrap();
        assert_mentions(&load_err(d), &["vocab.txt", "line 5 is empty"]);
    }

    /// Re-encodes a shard with different tensors (as a converter might write it).
    fn rewrite_shard(path: &Path, f: impl FnOnce(&mut Vec<(String, RawTensor<Vec<u8>>)>)) {
        let bytes = fs::read(path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut tensors: Vec<(String, RawTensor<Vec<u8>>)> = st
            .tensors()
            .into_iter()
            .map(|(k, v)| (k, RawTensor { dtype: v.dtype(), shape: v.shape().to_vec(), data: v.data().to_vec() }))
            .collect();
        f(&mut tensors);
        let out = safetensors::tensor::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), None).unwrap();
        fs::write(path, out).unwrap();
    }

    #[test]
    fn half_precision_features_and_implicit_text_item_are_read() {
        let mut cfg = tiny(SynthPreset::Balanced, 23);
        cfg.texts_per_image = 1;
        let ds = generate(&cfg).unwrap();
        let dir = TempDir::new("half");
        for dtype in [Dtype::BF16, Dtype::F16] {
            let p = dir.0.join("train-00000.safetensors");
            ds.save(&dir.0).unwrap();
            rewrite_shard(&p, |ts| {
                ts.retain(|(k, _)| k != TEXT_ITEM);
                let f = ts.iter_mut().find(|(k, _)| k == IMAGE_FEATURES).unwrap();
                f.1.dtype = dtype;
                f.1.data = ds
                    .train
                    .image_features
                    .iter()
                    .flat_map(|&x| {
                        let h = if dtype == Dtype::BF16 {
                            half::bf16::from_f32(x).to_bits()
                        } else {
                            half::f16::from_f32(x).to_bits()
                        };
                        h.to_le_bytes()
                    })
                    .collect();
            });
            reseal(&dir.0, "train");
            let back = Dataset::load(&dir.0).unwrap();
            assert_eq!(back.train.text_item, ds.train.text_item);
            for (a, b) in back.train.image_features.iter().zip(&ds.train.image_features) {
                assert!((a - b).abs() <= 1e-2 * b.abs().max(1e-2), "{dtype}: {a} vs {b}");
            }
        }
        // Without text.item, M must equal N.
        let p = dir.0.join("val-00000.safetensors");
        let mut cfg3 = cfg.clone();
        cfg3.texts_per_image = 2;
        generate(&cfg3).unwrap().save(&dir.0).unwrap();
        rewrite_shard(&p, |ts| ts.retain(|(k, _)| k != TEXT_ITEM));
        reseal(&dir.0, "val");
        assert_mentions(&load_err(&dir.0), &["val-00000.safetensors", "text.item missing"]);
        // Unknown and missing tensors.
        generate(&cfg).unwrap().save(&dir.0).unwrap();
        rewrite_shard(&p, |ts| ts.retain(|(k, _)| k != IMAGE_BOXES));
        reseal(&dir.0, "val");
        assert_mentions(&load_err(&dir.0), &["val-00000.safetensors", "tensor image.boxes missing"]);
        rewrite_shard(&p, |ts| {
            let extra = RawTensor { dtype: Dtype::U8, shape: vec![1], data: vec![0] };
            ts.push(("text.feature".to_string(), extra));
        });
        reseal(&dir.0, "val");
        assert_mentions(&load_err(&dir.0), &["val-00000.safetensors", "unexpected tensor \"text.feature\""]);
    }

    #[test]
    fn checksum_sees_every_byte_and_length() {
        let base: Vec<u8> = (0..100u32).map(|i| (i * 7 + 3) as u8).collect();
        let c0 = checksum(&base);
        for pos in [0, 31, 32, 63, 96, 99] {
            let mut b = base.clone();
            b[pos] ^= 0x80;
            assert_ne!(checksum(&b), c0, "flip at {pos}");
        }
        assert_ne!(checksum(&base[..99]), c0);
        assert_ne!(checksum(&[]), checksum(&[0]));
    }
}
