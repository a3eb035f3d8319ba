//! The on-disk dataset (docs/FORMAT.md, the normative spec): memory-mapped safetensors shards
//! read through [`DatasetReader`], written through [`DatasetWriter`].
//!
//! Validation is split in two (FORMAT.md §Validation):
//! - on open: the manifest, every shard header (dtypes, shapes against the manifest, byte ranges,
//!   file size) and the small per-item tensors (region counts, text lengths, `text.item`, labels);
//! - per item, when read ([`Shard::check_image`], [`Shard::check_text`]): features finite, boxes,
//!   object classes, token ids. The batch assembly runs them on every item it delivers, so a NaN
//!   never reaches training silently; `semshare check` runs them on every item plus checksums.
//!
//! Shards are little-endian (safetensors) and so is every supported host.

#[cfg(not(target_endian = "little"))]
compile_error!("semshare reads little-endian shards in place; big-endian hosts are not supported");

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, SafeTensors, View};
use serde::{Deserialize, Serialize};

use super::dataset::{
    Checksum, FORMAT_NAME, FORMAT_VERSION, MANIFEST_FILE, MASK, Meta, PAD, RESERVED_TOKENS, Split, UNK, checksum,
    diagnose, format_checksum, plain_file_name, read_lines, tensor::*,
};
use crate::{Error, Result};

/// The split names a manifest may hold; `database` is optional (the retrieval set of `test`).
pub const SPLITS: [&str; 4] = ["train", "val", "test", "database"];
/// The split names every manifest holds.
pub const REQUIRED_SPLITS: [&str; 3] = ["train", "val", "test"];
pub const VOCAB_FILE: &str = "vocab.txt";
pub const LABELS_FILE: &str = "labels.txt";
/// Pre-extracted text segments (instead of `text.tokens`).
pub const TEXT_FEATURES: &str = "text.features";

/// Storage type of region or text features; widened to f32 when a batch is built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeatureDtype {
    F32,
    F16,
    BF16,
}

impl FeatureDtype {
    fn of(d: Dtype) -> Option<Self> {
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
        match self {
            FeatureDtype::F32 => bytemuck::cast_slice_mut::<f32, u8>(dst).copy_from_slice(&bytes[..4 * n]),
            FeatureDtype::F16 => match bytemuck::try_cast_slice::<u8, u16>(&bytes[..2 * n]) {
                Ok(src) => src.reinterpret_cast::<f16>().convert_to_f32_slice(dst),
                Err(_) => {
                    for (d, c) in dst.iter_mut().zip(bytes.chunks_exact(2)) {
                        *d = f16::from_le_bytes([c[0], c[1]]).to_f32();
                    }
                }
            },
            FeatureDtype::BF16 => match bytemuck::try_cast_slice::<u8, u16>(&bytes[..2 * n]) {
                Ok(src) => src.reinterpret_cast::<bf16>().convert_to_f32_slice(dst),
                Err(_) => {
                    for (d, c) in dst.iter_mut().zip(bytes.chunks_exact(2)) {
                        *d = bf16::from_le_bytes([c[0], c[1]]).to_f32();
                    }
                }
            },
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

    fn value(self, bytes: &[u8], k: usize) -> f32 {
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

// ---------------------------------------------------------------------------------------------
// Manifest (version 2)

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    format: String,
    version: u32,
    name: String,
    regions: usize,
    feature_dim: usize,
    max_tokens: usize,
    /// Dt of `text.features`; 0 when texts are tokens.
    text_feature_dim: usize,
    num_labels: usize,
    num_object_classes: usize,
    vocab_size: usize,
    vocab_file: String,
    labels_file: String,
    splits: BTreeMap<String, Vec<ShardEntry>>,
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
}

// ---------------------------------------------------------------------------------------------
// One shard

#[derive(Clone, Copy, Debug)]
struct Loc {
    /// Byte offset of row 0 in the file.
    start: usize,
    /// Bytes per leading-dimension row.
    row: usize,
}

/// A memory-mapped, structurally validated shard: every tensor's dtype and shape match the
/// layout and every byte range lies inside the file, so row access cannot go out of bounds.
pub struct Shard {
    pub path: PathBuf,
    /// For streaming copies (`read_*`): pread moves bytes from the page cache without
    /// mapping them, so streaming a dataset larger than memory keeps the resident set small.
    file: fs::File,
    map: Mmap,
    images: usize,
    texts: usize,
    features: Loc,
    feature_dtype: FeatureDtype,
    boxes: Loc,
    /// The small per-item tensors, copied at open (a few bytes per item): every batch needs
    /// them, and reading them through the map would keep their page-cache folios mapped.
    counts: Vec<u16>,
    classes: Option<Loc>,
    /// `text.tokens` or `text.features` rows.
    text: Loc,
    text_dtype: Option<FeatureDtype>,
    lengths: Vec<u16>,
    /// Empty when the shard has no `text.item` (text j describes image j).
    items: Vec<u32>,
    /// [N, C]
    label_rows: Vec<u8>,
    label_width: usize,
}

/// The per-shard facts a reader checks: from the manifest, or inferred (source files).
#[derive(Clone, Copy, Debug)]
pub struct Counts {
    pub images: usize,
    pub texts: usize,
}

fn item_err(path: &Path, tensor: &str, item: usize, what: impl std::fmt::Display) -> Error {
    Error::format(path, format!("tensor {tensor}, item {item}: {what}"))
}

impl Shard {
    /// Maps `path` and checks its header against `layout`; `counts` None takes N and M from the
    /// file itself (source files of `pack`).
    pub fn open(path: &Path, layout: &Layout, counts: Option<Counts>) -> Result<Shard> {
        let (file, len) = crate::io::open_regular(path)?;
        if len < 8 {
            return Err(Error::format(
                path,
                format!("truncated: {len} bytes, shorter than the 8-byte safetensors header length"),
            ));
        }
        // SAFETY: the map is read-only and shards are never modified in place (writers replace
        // files by rename); FORMAT.md requires that nothing truncates a shard while it is open.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let st = SafeTensors::deserialize(&map).map_err(|e| Error::format(path, diagnose(&map, &e)))?;
        // Parsed, so the 8-byte length prefix exists and fits.
        let header_len = u64::from_le_bytes([map[0], map[1], map[2], map[3], map[4], map[5], map[6], map[7]]) as usize;
        let data0 = 8 + header_len;
        let text_name = if layout.text_features() { TEXT_FEATURES } else { TEXT_TOKENS };
        for name in st.names() {
            let name: &str = name;
            let known = [IMAGE_FEATURES, IMAGE_BOXES, IMAGE_COUNT, IMAGE_CLASSES, TEXT_LENGTH, TEXT_ITEM, LABELS];
            if !known.contains(&name) && name != text_name {
                let what = format!("unexpected tensor {name:?} (this dataset's texts are {text_name})");
                return Err(Error::format(path, what));
            }
        }
        let fmt_err = |what: String| Error::format(path, what);
        let m = &layout.meta;
        let (r, dr, t, c, dt) = (m.regions, m.feature_dim, m.max_tokens, m.num_labels, layout.text_feature_dim);
        let shape_of = |name: &str| st.tensor(name).ok().map(|v| v.shape().to_vec());
        let lead = |name: &str| shape_of(name).and_then(|s| s.first().copied());
        let counts = match counts {
            Some(c) => c,
            None => Counts { images: lead(IMAGE_COUNT).unwrap_or(0), texts: lead(TEXT_LENGTH).unwrap_or(0) },
        };
        let (n, mm) = (counts.images, counts.texts);
        let get = |name: &str, dtypes: &[Dtype], shape: &[usize]| -> Result<Option<(Loc, Dtype)>> {
            let Ok(view) = st.tensor(name) else { return Ok(None) };
            if !dtypes.contains(&view.dtype()) {
                let list = dtypes.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(" or ");
                return Err(fmt_err(format!("tensor {name}: dtype {}, expected {list}", view.dtype())));
            }
            if view.shape() != shape {
                return Err(fmt_err(format!("tensor {name}: shape {:?}, expected {shape:?}", view.shape())));
            }
            let info = st_info(&map, name).ok_or_else(|| fmt_err(format!("tensor {name}: no header entry")))?;
            let rows = shape[0].max(1);
            let row = view.data_len() / rows;
            Ok(Some((Loc { start: data0 + info, row }, view.dtype())))
        };
        let need = |name: &str, v: Option<(Loc, Dtype)>| v.ok_or_else(|| fmt_err(format!("tensor {name} missing")));
        let floats = [Dtype::F32, Dtype::F16, Dtype::BF16];
        let (features, fdt) = need(IMAGE_FEATURES, get(IMAGE_FEATURES, &floats, &[n, r, dr])?)?;
        let (boxes, _) = need(IMAGE_BOXES, get(IMAGE_BOXES, &[Dtype::F32], &[n, r, 5])?)?;
        let (count, _) = need(IMAGE_COUNT, get(IMAGE_COUNT, &[Dtype::U16], &[n])?)?;
        let classes = get(IMAGE_CLASSES, &[Dtype::U16], &[n, r])?.map(|x| x.0);
        let (text, text_dtype) = if layout.text_features() {
            let (l, d) = need(TEXT_FEATURES, get(TEXT_FEATURES, &floats, &[mm, t, dt])?)?;
            (l, FeatureDtype::of(d))
        } else {
            (need(TEXT_TOKENS, get(TEXT_TOKENS, &[Dtype::U32], &[mm, t])?)?.0, None)
        };
        let (length, _) = need(TEXT_LENGTH, get(TEXT_LENGTH, &[Dtype::U16], &[mm])?)?;
        let item = get(TEXT_ITEM, &[Dtype::U32], &[mm])?.map(|x| x.0);
        let (labels, _) = need(LABELS, get(LABELS, &[Dtype::U8], &[n, c])?)?;
        if item.is_none() && mm != n {
            let what = format!("tensor {TEXT_ITEM} missing, required when texts ({mm}) ≠ images ({n})");
            return Err(fmt_err(what));
        }
        let feature_dtype = FeatureDtype::of(fdt).ok_or_else(|| fmt_err("image.features: bad dtype".into()))?;
        // In bounds: each tensor's shape was checked and its bytes lie inside the file.
        // Copied by pread, as every bulk read: only the header is read through the map.
        let read = |start: usize, len: usize| -> Result<Vec<u8>> {
            let mut buf = vec![0u8; len];
            read_exact_at(&file, &map, path, &mut buf, start)?;
            Ok(buf)
        };
        let counts = typed::<u16>(&read(count.start, 2 * n)?).into_owned();
        let lengths = typed::<u16>(&read(length.start, 2 * mm)?).into_owned();
        let items = match item {
            Some(l) => typed::<u32>(&read(l.start, 4 * mm)?).into_owned(),
            None => Vec::new(),
        };
        let label_rows = read(labels.start, n * c)?;
        let shard = Shard {
            path: path.to_path_buf(),
            file,
            map,
            images: n,
            texts: mm,
            features,
            feature_dtype,
            boxes,
            counts,
            classes,
            text,
            text_dtype,
            lengths,
            items,
            label_rows,
            label_width: c,
        };
        shard.check_structure(layout)?;
        shard.release_mapped_pages();
        Ok(shard)
    }

    pub fn num_images(&self) -> usize {
        self.images
    }
    pub fn num_texts(&self) -> usize {
        self.texts
    }
    pub fn feature_dtype(&self) -> FeatureDtype {
        self.feature_dtype
    }
    pub fn text_dtype(&self) -> Option<FeatureDtype> {
        self.text_dtype
    }
    pub fn has_classes(&self) -> bool {
        self.classes.is_some()
    }
    pub fn file_bytes(&self) -> &[u8] {
        &self.map
    }

    /// Row `i` of a tensor; `i` < its leading dimension (checked by the callers' index ranges).
    fn row(&self, loc: Loc, i: usize) -> &[u8] {
        &self.map[loc.start + i * loc.row..loc.start + (i + 1) * loc.row]
    }

    /// Valid regions of image `i`.
    pub fn count(&self, i: usize) -> usize {
        self.counts[i] as usize
    }
    /// Valid segments of text `j`.
    pub fn length(&self, j: usize) -> usize {
        self.lengths[j] as usize
    }
    /// The image (shard-local index) text `j` describes.
    pub fn text_item(&self, j: usize) -> usize {
        self.items.get(j).map_or(j, |&i| i as usize)
    }
    pub fn labels(&self, i: usize) -> &[u8] {
        &self.label_rows[i * self.label_width..(i + 1) * self.label_width]
    }
    /// All R region rows of image `i`, raw (feature dtype).
    pub fn feature_bytes(&self, i: usize) -> &[u8] {
        self.row(self.features, i)
    }
    /// [R, 5] boxes of image `i`, raw f32.
    pub fn box_bytes(&self, i: usize) -> &[u8] {
        self.row(self.boxes, i)
    }
    pub fn class_bytes(&self, i: usize) -> Option<&[u8]> {
        self.classes.map(|l| self.row(l, i))
    }
    /// All T token ids (raw u32) or segment rows (raw features) of text `j`.
    pub fn text_bytes(&self, j: usize) -> &[u8] {
        self.row(self.text, j)
    }

    /// Unmaps the pages the open scan read through the map (they stay in the page cache): a
    /// reader's resident set does not start at the size of its per-item tensors.
    fn release_mapped_pages(&self) {
        #[cfg(unix)]
        // SAFETY: a read-only file mapping: MADV_DONTNEED only drops page-table entries; the
        // next access faults the same bytes back from the file, so no reference sees other data.
        unsafe {
            let _ = self.map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, 0, self.map.len());
        }
    }

    /// The cheap checks every open runs: counts and lengths in range, `text.item` < N, every
    /// image with a text, labels 0/1 with at least one label.
    fn check_structure(&self, layout: &Layout) -> Result<()> {
        let m = &layout.meta;
        let p = &self.path;
        let mut has_text = vec![false; self.images];
        for i in 0..self.images {
            let count = self.count(i);
            if count == 0 || count > m.regions {
                return Err(item_err(p, IMAGE_COUNT, i, format!("region count {count} outside 1..={}", m.regions)));
            }
            let row = self.labels(i);
            if let Some(k) = row.iter().position(|&y| y > 1) {
                return Err(item_err(p, LABELS, i, format!("label {k} has value {}, expected 0 or 1", row[k])));
            }
            if !row.contains(&1) {
                return Err(item_err(p, LABELS, i, "image has no label"));
            }
        }
        for j in 0..self.texts {
            let len = self.length(j);
            if len == 0 || len > m.max_tokens {
                let what = format!("text length {len} outside 1..={}", m.max_tokens);
                return Err(item_err(p, TEXT_LENGTH, j, what));
            }
            let item = self.text_item(j);
            if item >= self.images {
                let what = format!("image index {item} ≥ number of images {}", self.images);
                return Err(item_err(p, TEXT_ITEM, j, what));
            }
            has_text[item] = true;
        }
        if let Some(i) = has_text.iter().position(|&h| !h) {
            return Err(Error::format(p, format!("tensor {TEXT_ITEM}: image {i} has no text")));
        }
        Ok(())
    }

    /// Bytes of image `i`'s valid region features.
    pub fn feature_len(&self, layout: &Layout, i: usize) -> usize {
        self.count(i) * layout.meta.feature_dim * self.feature_dtype.size()
    }

    /// Bytes of text `j`'s valid segment features (0 for token texts).
    pub fn text_feature_len(&self, layout: &Layout, j: usize) -> usize {
        self.text_dtype.map_or(0, |d| self.length(j) * layout.text_feature_dim * d.size())
    }

    /// Copies image `i`'s valid region features into `dst` (of [`Shard::feature_len`] bytes) by
    /// pread, not through the map, and checks that they are finite.
    pub fn read_features(&self, layout: &Layout, i: usize, dst: &mut [u8]) -> Result<()> {
        self.read_at(dst, self.features.start + i * self.features.row)?;
        self.check_image_features(layout, i, dst)
    }

    /// Copies text `j`'s valid segment features into `dst` (of [`Shard::text_feature_len`]
    /// bytes) by pread and checks them.
    pub fn read_text_features(&self, layout: &Layout, j: usize, dst: &mut [u8]) -> Result<()> {
        self.read_at(dst, self.text.start + j * self.text.row)?;
        self.check_text_features(layout, j, dst)
    }

    fn read_at(&self, buf: &mut [u8], offset: usize) -> Result<()> {
        read_exact_at(&self.file, &self.map, &self.path, buf, offset)
    }

    fn check_image_features(&self, layout: &Layout, i: usize, feats: &[u8]) -> Result<()> {
        let dr = layout.meta.feature_dim;
        match self.feature_dtype.first_non_finite(feats) {
            None => Ok(()),
            Some(k) => {
                let v = self.feature_dtype.value(feats, k);
                let what = format!("non-finite value {v} at region {}, dim {}", k / dr, k % dr);
                Err(item_err(&self.path, IMAGE_FEATURES, i, what))
            }
        }
    }

    fn check_text_features(&self, layout: &Layout, j: usize, feats: &[u8]) -> Result<()> {
        let (Some(dt), d) = (self.text_dtype, layout.text_feature_dim) else { return Ok(()) };
        match dt.first_non_finite(feats) {
            None => Ok(()),
            Some(k) => {
                let what = format!("non-finite value {} at segment {}, dim {}", dt.value(feats, k), k / d, k % d);
                Err(item_err(&self.path, TEXT_FEATURES, j, what))
            }
        }
    }

    /// Content checks of image `i`: finite features and boxes in [0, 1] with x1 ≤ x2, y1 ≤ y2
    /// in its valid regions, object classes < K_obj. Read by pread (as every full scan reads):
    /// a file truncated meanwhile is an error naming it, where the map would raise SIGBUS.
    pub fn check_image(&self, layout: &Layout, i: usize) -> Result<()> {
        self.read_image_rows(layout, i, &mut ImageRows::default())
    }

    /// Image `i`'s full rows (valid regions and padding) into `rows`, by pread, content-checked
    /// ([`Shard::check_image`]): what `pack` copies into its shards.
    pub fn read_image_rows(&self, layout: &Layout, i: usize, rows: &mut ImageRows) -> Result<()> {
        let count = self.count(i);
        rows.features.resize(self.features.row, 0);
        self.read_at(&mut rows.features, self.features.start + i * self.features.row)?;
        let valid = count * layout.meta.feature_dim * self.feature_dtype.size();
        self.check_image_features(layout, i, &rows.features[..valid])?;
        rows.boxes.resize(self.boxes.row, 0);
        self.read_at(&mut rows.boxes, self.boxes.start + i * self.boxes.row)?;
        self.check_boxes(i, &typed::<f32>(&rows.boxes)[..5 * count])?;
        match self.classes {
            Some(loc) => {
                let classes = rows.classes.get_or_insert_with(Vec::new);
                classes.resize(loc.row, 0);
                self.read_at(classes, loc.start + i * loc.row)?;
                self.check_classes(layout, i, &typed::<u16>(classes)[..count])
            }
            None => {
                rows.classes = None;
                Ok(())
            }
        }
    }

    /// Boxes of image `i`'s valid regions: in [0, 1], x1 ≤ x2, y1 ≤ y2.
    fn check_boxes(&self, i: usize, boxes: &[f32]) -> Result<()> {
        for (reg, b) in boxes.chunks_exact(5).enumerate() {
            if let Some(&x) = b.iter().find(|x| !(0.0..=1.0).contains(*x)) {
                let what = format!("region {reg}: box value {x} outside [0, 1] in {b:?}");
                return Err(item_err(&self.path, IMAGE_BOXES, i, what));
            }
            if b[0] > b[2] || b[1] > b[3] {
                let what = format!("region {reg}: box {b:?} has x1 > x2 or y1 > y2");
                return Err(item_err(&self.path, IMAGE_BOXES, i, what));
            }
        }
        Ok(())
    }

    /// Object classes of image `i`'s valid regions: < K_obj.
    fn check_classes(&self, layout: &Layout, i: usize, cls: &[u16]) -> Result<()> {
        let k_obj = layout.meta.num_object_classes;
        match cls.iter().position(|&k| k as usize >= k_obj) {
            None => Ok(()),
            Some(reg) => {
                let what = format!("region {reg}: class {} ≥ num_object_classes {k_obj}", cls[reg]);
                Err(item_err(&self.path, IMAGE_CLASSES, i, what))
            }
        }
    }

    /// A [T] token row of text `j` of length `len`: [UNK] or 3..V before it, [PAD] after.
    fn check_tokens(&self, layout: &Layout, j: usize, len: usize, row: &[u32]) -> Result<()> {
        let v = layout.meta.vocab.len();
        for (pos, &tok) in row.iter().enumerate() {
            let bad = if pos < len { !(tok == UNK || (tok > MASK && (tok as usize) < v)) } else { tok != PAD };
            if bad {
                let what = if pos < len {
                    format!("token {tok} at position {pos} (length {len}) is not [UNK] or in 3..{v}")
                } else {
                    format!("token {tok} at padding position {pos} (length {len}), expected 0")
                };
                return Err(item_err(&self.path, TEXT_TOKENS, j, what));
            }
        }
        Ok(())
    }

    /// Content checks of text `j`: tokens [UNK] or in 3..V before its length and [PAD] after
    /// it; or finite segment features. Read by pread, as [`Shard::check_image`].
    pub fn check_text(&self, layout: &Layout, j: usize) -> Result<()> {
        self.read_text_row(layout, j, &mut Vec::new())
    }

    /// Text `j`'s full row (`[T]` tokens or `[T, Dt]` features, padding included) into `row`,
    /// by pread, content-checked ([`Shard::check_text`]).
    pub fn read_text_row(&self, layout: &Layout, j: usize, row: &mut Vec<u8>) -> Result<()> {
        let len = self.length(j);
        row.resize(self.text.row, 0);
        self.read_at(row, self.text.start + j * self.text.row)?;
        match self.text_dtype {
            Some(dt) => self.check_text_features(layout, j, &row[..len * layout.text_feature_dim * dt.size()]),
            None => self.check_tokens(layout, j, len, &typed::<u32>(row)),
        }
    }

    /// The checksum of the whole file ([`checksum`]), read by pread in blocks.
    pub fn file_checksum(&self) -> Result<u64> {
        let mut sum = Checksum::new();
        self.checksum_from(0, &mut sum)?;
        Ok(sum.finish())
    }

    /// Feeds the file's bytes from `offset` to its end into `sum`, by pread in blocks.
    fn checksum_from(&self, mut offset: usize, sum: &mut Checksum) -> Result<()> {
        const BLOCK: usize = 4 << 20;
        let len = self.map.len();
        let mut buf = vec![0u8; BLOCK.min(len.saturating_sub(offset))];
        while offset < len {
            let n = BLOCK.min(len - offset);
            self.read_at(&mut buf[..n], offset)?;
            sum.update(&buf[..n]);
            offset += n;
        }
        Ok(())
    }

    /// The file's checksum under every order of its header's `__metadata__` entries: what
    /// writers before the entries were sorted (they went through a `HashMap`) wrote for the same
    /// content, so a suite fingerprint made from one of them still identifies this dataset.
    /// The file's own order comes first; just that one when there are more than 6 entries.
    pub fn metadata_order_checksums(&self) -> Result<Vec<u64>> {
        let own = self.file_checksum()?;
        let mut len8 = [0u8; 8];
        self.read_at(&mut len8, 0)?;
        let n = u64::from_le_bytes(len8) as usize; // validated at open
        let mut header = vec![0u8; n];
        self.read_at(&mut header, 8)?;
        const PREFIX: &str = "{\"__metadata__\":";
        let Some(after) = std::str::from_utf8(&header).ok().and_then(|h| h.strip_prefix(PREFIX)) else {
            return Ok(vec![own]);
        };
        let mut stream =
            serde_json::Deserializer::from_str(after).into_iter::<serde_json::Map<String, serde_json::Value>>();
        let Some(Ok(entries)) = stream.next() else { return Ok(vec![own]) };
        let rest = &after[stream.byte_offset()..];
        let entries: Vec<String> =
            entries.iter().map(|(k, v)| format!("{}:{v}", serde_json::Value::from(k.as_str()))).collect();
        if entries.len() > 6 {
            return Ok(vec![own]);
        }
        let mut sums = vec![own];
        for order in permutations(entries.len()) {
            let meta: Vec<&str> = order.iter().map(|&i| entries[i].as_str()).collect();
            let candidate = format!("{PREFIX}{{{}}}{rest}", meta.join(","));
            if candidate.len() != n {
                continue;
            }
            let mut sum = Checksum::new();
            sum.update(&len8);
            sum.update(candidate.as_bytes());
            self.checksum_from(8 + n, &mut sum)?;
            let sum = sum.finish();
            if !sums.contains(&sum) {
                sums.push(sum);
            }
        }
        Ok(sums)
    }

    /// Copies image `i`'s valid boxes (pread) into `dst` (5 × count values) and checks them.
    pub fn read_boxes(&self, i: usize, dst: &mut [f32]) -> Result<()> {
        self.read_at(bytemuck::cast_slice_mut(dst), self.boxes.start + i * self.boxes.row)?;
        self.check_boxes(i, dst)
    }

    /// Appends image `i`'s valid object classes (pread), if the shard has them, to `classes`,
    /// checked; `scratch` is reused.
    pub fn read_classes(&self, layout: &Layout, i: usize, classes: &mut Vec<u32>, scratch: &mut Vec<u8>) -> Result<()> {
        let Some(loc) = self.classes else { return Ok(()) };
        scratch.resize(2 * self.count(i), 0);
        self.read_at(scratch, loc.start + i * loc.row)?;
        let cls = typed::<u16>(scratch);
        self.check_classes(layout, i, &cls)?;
        classes.extend(cls.iter().map(|&k| k as u32));
        Ok(())
    }

    /// Appends text `j`'s valid token ids (pread) to `tokens`, checked; `scratch` is reused.
    pub fn read_tokens(&self, layout: &Layout, j: usize, tokens: &mut Vec<u32>, scratch: &mut Vec<u8>) -> Result<()> {
        scratch.resize(self.text.row, 0);
        self.read_at(scratch, self.text.start + j * self.text.row)?;
        let row = typed::<u32>(scratch);
        let len = self.length(j);
        self.check_tokens(layout, j, len, &row)?;
        tokens.extend_from_slice(&row[..len]);
        Ok(())
    }
}

/// Every order of `0..k`.
fn permutations(k: usize) -> Vec<Vec<usize>> {
    if k == 0 {
        return vec![Vec::new()];
    }
    let mut out = Vec::new();
    for p in permutations(k - 1) {
        for at in 0..=p.len() {
            let mut q = p.clone();
            q.insert(at, k - 1);
            out.push(q);
        }
    }
    out
}

/// One image's full rows as `pack` copies them (see [`Shard::read_image_rows`]); reused.
#[derive(Default)]
pub struct ImageRows {
    pub features: Vec<u8>,
    pub boxes: Vec<u8>,
    /// None when the shard has no `image.classes`.
    pub classes: Option<Vec<u8>>,
}

/// Fills `buf` from `offset` of `file` by pread: a file truncated meanwhile is an error naming
/// `path`, where reading through `map` would raise SIGBUS (hosts without pread use the map).
fn read_exact_at(file: &fs::File, map: &Mmap, path: &Path, buf: &mut [u8], offset: usize) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileExt;
        let _ = map;
        file.read_exact_at(buf, offset as u64).map_err(|e| Error::io(path, e))
    }
    #[cfg(not(unix))]
    {
        let _ = (file, path);
        buf.copy_from_slice(&map[offset..offset + buf.len()]);
        Ok(())
    }
}

/// Offset of tensor `name` inside the data section, from the (already validated) header.
fn st_info(bytes: &[u8], name: &str) -> Option<usize> {
    let (_, meta) = SafeTensors::read_metadata(bytes).ok()?;
    meta.info(name).map(|i| i.data_offsets.0)
}

// ---------------------------------------------------------------------------------------------
// A split: many shards, one indexable collection

/// The shards of one split behind global image and text indices.
pub struct SplitReader {
    pub name: String,
    pub shards: Vec<Shard>,
    /// image_base[s] = global index of shard s's image 0; last entry N.
    image_base: Vec<usize>,
    text_base: Vec<usize>,
}

impl SplitReader {
    fn new(name: &str, shards: Vec<Shard>) -> Result<SplitReader> {
        let mut image_base = vec![0];
        let mut text_base = vec![0];
        for s in &shards {
            image_base.push(image_base[image_base.len() - 1] + s.images);
            text_base.push(text_base[text_base.len() - 1] + s.texts);
        }
        if image_base[shards.len()] > u32::MAX as usize || text_base[shards.len()] > u32::MAX as usize {
            return Err(Error::data(format!("split {name}: more than 2^32 items")));
        }
        if let Some(first) = shards.first() {
            for s in &shards[1..] {
                let same = s.feature_dtype == first.feature_dtype
                    && s.text_dtype == first.text_dtype
                    && s.has_classes() == first.has_classes();
                if !same {
                    let what = format!(
                        "feature dtypes or presence of image.classes differ from {} (a split's shards must agree)",
                        first.path.display()
                    );
                    return Err(Error::format(&s.path, what));
                }
            }
        }
        Ok(SplitReader { name: name.to_string(), shards, image_base, text_base })
    }

    pub fn num_images(&self) -> usize {
        self.image_base[self.shards.len()]
    }
    pub fn num_texts(&self) -> usize {
        self.text_base[self.shards.len()]
    }
    /// (shard, local index) of global image `i` (< N).
    pub fn locate_image(&self, i: usize) -> (&Shard, usize) {
        let s = self.image_base.partition_point(|&b| b <= i) - 1;
        (&self.shards[s], i - self.image_base[s])
    }
    pub fn locate_text(&self, j: usize) -> (&Shard, usize) {
        let s = self.text_base.partition_point(|&b| b <= j) - 1;
        (&self.shards[s], j - self.text_base[s])
    }
    /// Global image index of text `j`.
    pub fn text_image(&self, j: usize) -> usize {
        let s = self.text_base.partition_point(|&b| b <= j) - 1;
        self.image_base[s] + self.shards[s].text_item(j - self.text_base[s])
    }
    pub fn labels(&self, i: usize) -> &[u8] {
        let (s, k) = self.locate_image(i);
        s.labels(k)
    }
    /// [N, C] labels of every image.
    pub fn image_labels(&self) -> Vec<u8> {
        (0..self.num_images()).flat_map(|i| self.labels(i).iter().copied()).collect()
    }
    /// [M, C]: the labels of each text's image.
    pub fn text_labels(&self) -> Vec<u8> {
        (0..self.num_texts()).flat_map(|j| self.labels(self.text_image(j)).iter().copied()).collect()
    }
    /// [M] global image of each text.
    pub fn text_items(&self) -> Vec<u32> {
        (0..self.num_texts()).map(|j| self.text_image(j) as u32).collect()
    }
    /// For each image, its texts (global indices, in text order).
    pub fn image_texts(&self) -> Vec<Vec<usize>> {
        let mut groups = vec![Vec::new(); self.num_images()];
        for j in 0..self.num_texts() {
            groups[self.text_image(j)].push(j);
        }
        groups
    }
    pub fn feature_dtype(&self) -> FeatureDtype {
        self.shards.first().map_or(FeatureDtype::F32, |s| s.feature_dtype)
    }
    pub fn text_dtype(&self) -> Option<FeatureDtype> {
        self.shards.first().and_then(|s| s.text_dtype)
    }
    pub fn has_classes(&self) -> bool {
        self.shards.first().is_some_and(|s| s.has_classes())
    }
}

// ---------------------------------------------------------------------------------------------
// A dataset directory

/// An opened dataset directory: the layout and its splits, memory-mapped.
pub struct DatasetReader {
    pub dir: PathBuf,
    pub layout: Layout,
    splits: Vec<SplitReader>,
    entries: BTreeMap<String, Vec<ShardEntry>>,
}

impl DatasetReader {
    /// Opens `dir` with the structural checks of the module doc.
    pub fn open(dir: impl AsRef<Path>) -> Result<DatasetReader> {
        let dir = dir.as_ref();
        let mpath = dir.join(MANIFEST_FILE);
        let text = crate::io::read_text(&mpath, crate::io::SMALL_FILE_LIMIT)?;
        let probe: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::format(&mpath, format!("not a valid manifest: {e}")))?;
        if probe.get("format").and_then(|f| f.as_str()) != Some(FORMAT_NAME) {
            let what = format!("format {:?}, expected {FORMAT_NAME:?}", probe.get("format"));
            return Err(Error::format(&mpath, what));
        }
        let version = probe.get("version").and_then(|v| v.as_u64());
        if version != Some(FORMAT_VERSION as u64) {
            let what = format!(
                "format version {}, this build reads {FORMAT_VERSION} (docs/FORMAT.md says what changed)",
                version.map_or("?".into(), |v| v.to_string())
            );
            return Err(Error::format(&mpath, what));
        }
        let man: Manifest =
            serde_json::from_value(probe).map_err(|e| Error::format(&mpath, format!("not a valid manifest: {e}")))?;
        let vocab_path = dir.join(plain_file_name(&mpath, "vocab_file", &man.vocab_file)?);
        let labels_path = dir.join(plain_file_name(&mpath, "labels_file", &man.labels_file)?);
        let vocab = read_lines(&vocab_path)?;
        if vocab.len() != man.vocab_size {
            let what = format!("{} tokens, dataset.json says vocab_size {}", vocab.len(), man.vocab_size);
            return Err(Error::format(&vocab_path, what));
        }
        let label_names = read_lines(&labels_path)?;
        if label_names.len() != man.num_labels {
            let n = label_names.len();
            let what = format!("{n} label names, dataset.json says num_labels {}", man.num_labels);
            return Err(Error::format(&labels_path, what));
        }
        let meta = Meta {
            name: man.name.clone(),
            regions: man.regions,
            feature_dim: man.feature_dim,
            max_tokens: man.max_tokens,
            num_labels: man.num_labels,
            num_object_classes: man.num_object_classes,
            vocab,
            label_names,
        };
        meta.check().map_err(|e| Error::format(&mpath, e))?;
        let layout = Layout { meta, text_feature_dim: man.text_feature_dim };
        for key in man.splits.keys() {
            if !SPLITS.contains(&key.as_str()) {
                return Err(Error::format(&mpath, format!("unknown split {key:?} (expected {SPLITS:?})")));
            }
        }
        let mut splits = Vec::new();
        for name in SPLITS {
            let Some(entries) = man.splits.get(name) else {
                if REQUIRED_SPLITS.contains(&name) {
                    return Err(Error::format(&mpath, format!("split {name:?} missing")));
                }
                continue;
            };
            let mut shards = Vec::with_capacity(entries.len());
            for (k, e) in entries.iter().enumerate() {
                let file = plain_file_name(&mpath, &format!("splits.{name}[{k}].file"), &e.file)?;
                let path = dir.join(file);
                let shard = Shard::open(&path, &layout, Some(Counts { images: e.images, texts: e.texts }))?;
                if shard.map.len() as u64 != e.bytes {
                    let what = format!("{} bytes, dataset.json says {}", shard.map.len(), e.bytes);
                    return Err(Error::format(&path, what));
                }
                shards.push(shard);
            }
            splits.push(SplitReader::new(name, shards)?);
        }
        Ok(DatasetReader { dir: dir.to_path_buf(), layout, splits, entries: man.splits })
    }

    pub fn meta(&self) -> &Meta {
        &self.layout.meta
    }
    pub fn split(&self, name: &str) -> Result<&SplitReader> {
        self.splits
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| Error::config(format!("dataset {} has no split {name:?}", self.dir.display())))
    }
    pub fn database(&self) -> Option<&SplitReader> {
        self.splits.iter().find(|s| s.name == "database")
    }
    pub fn splits(&self) -> &[SplitReader] {
        &self.splits
    }
    /// The manifest's shard list of every split (file, counts, size, checksum).
    pub fn shard_entries(&self) -> &BTreeMap<String, Vec<ShardEntry>> {
        &self.entries
    }

    /// The full scan of `semshare check`: every shard's checksum and every item's content.
    /// Returns every problem found (at most `limit`), each naming file, tensor and item. Reads
    /// by pread, never through the map: a shard truncated meanwhile is an error, not SIGBUS.
    pub fn check(&self, limit: usize) -> Vec<Error> {
        let mut errors = Vec::new();
        let (mut image, mut text) = (ImageRows::default(), Vec::new());
        for split in &self.splits {
            let entries = &self.entries[&split.name];
            for (shard, entry) in split.shards.iter().zip(entries) {
                match shard.file_checksum().map(format_checksum) {
                    Ok(sum) if sum != entry.checksum => {
                        let what = format!("checksum mismatch: file has {sum}, dataset.json says {}", entry.checksum);
                        errors.push(Error::format(&shard.path, what));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        // Unreadable (truncated): its items would only repeat that.
                        errors.push(e);
                        continue;
                    }
                }
                for i in 0..shard.images {
                    if let Err(e) = shard.read_image_rows(&self.layout, i, &mut image) {
                        errors.push(e);
                    }
                }
                for j in 0..shard.texts {
                    if let Err(e) = shard.read_text_row(&self.layout, j, &mut text) {
                        errors.push(e);
                    }
                }
                if errors.len() >= limit {
                    errors.truncate(limit);
                    return errors;
                }
            }
        }
        errors
    }
}

// ---------------------------------------------------------------------------------------------
// Writer

/// One image as raw little-endian rows (shapes of the shard table: [R, Dr], [R, 5], [R]).
pub struct ImageRecord<'a> {
    pub features: &'a [u8],
    pub feature_dtype: FeatureDtype,
    pub boxes: &'a [u8],
    pub count: u16,
    pub classes: Option<&'a [u8]>,
    pub labels: &'a [u8],
}

/// One text of that image: raw `[T]` u32 tokens (`dtype` None) or `[T, Dt]` features.
pub struct TextRecord<'a> {
    pub content: &'a [u8],
    pub dtype: Option<FeatureDtype>,
    pub length: u16,
}

#[derive(Default)]
struct ShardBuilder {
    images: usize,
    texts: usize,
    feature_dtype: Option<FeatureDtype>,
    text_dtype: Option<FeatureDtype>,
    classes: Option<bool>,
    features: Vec<u8>,
    boxes: Vec<u8>,
    count: Vec<u8>,
    class_bytes: Vec<u8>,
    text: Vec<u8>,
    length: Vec<u8>,
    item: Vec<u8>,
    labels: Vec<u8>,
}

impl ShardBuilder {
    fn bytes(&self) -> usize {
        self.features.len() + self.boxes.len() + self.class_bytes.len() + self.text.len() + self.labels.len()
    }
}

/// A tensor for `safetensors::serialize`, its bytes in any container (borrowed from a shard
/// builder, or owned by a converter).
pub struct RawTensor<B: AsRef<[u8]>> {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: B,
}

impl<B: AsRef<[u8]>> View for &RawTensor<B> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.data.as_ref())
    }
    fn data_len(&self) -> usize {
        self.data.as_ref().len()
    }
}

/// Writes a dataset directory: shards of about `shard_bytes` each (whole images with their
/// texts), then vocabulary, labels and the manifest with checksums; all into a hidden temporary
/// directory renamed into place by [`DatasetWriter::finish`]. Dropped unfinished, it removes
/// the temporary directory: a half-written dataset is never visible.
pub struct DatasetWriter {
    out: PathBuf,
    tmp: PathBuf,
    layout: Layout,
    shard_bytes: usize,
    splits: BTreeMap<String, Vec<ShardEntry>>,
    split: Option<String>,
    current: ShardBuilder,
    finished: bool,
}

impl DatasetWriter {
    pub fn create(out: impl AsRef<Path>, layout: Layout, shard_bytes: usize) -> Result<DatasetWriter> {
        let out = out.as_ref().to_path_buf();
        layout.meta.check().map_err(|e| Error::data(format!("dataset {:?}: {e}", layout.meta.name)))?;
        let name =
            out.file_name().ok_or_else(|| Error::config(format!("{} is not a directory path", out.display())))?;
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        refuse_non_dataset(&out)?;
        fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let prefix = format!(".{}.tmp-", name.to_string_lossy());
        crate::io::remove_stale_temps(&parent, &prefix);
        let tmp = parent.join(format!("{prefix}{}-{k}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
        Ok(DatasetWriter {
            out,
            tmp,
            layout,
            shard_bytes: shard_bytes.max(1),
            splits: BTreeMap::new(),
            split: None,
            current: ShardBuilder::default(),
            finished: false,
        })
    }

    /// Starts split `name` (one of [`SPLITS`]); ends the previous one.
    pub fn begin_split(&mut self, name: &str) -> Result<()> {
        if !SPLITS.contains(&name) || self.splits.contains_key(name) {
            return Err(Error::config(format!("split {name:?} unknown or written twice")));
        }
        self.flush()?;
        self.splits.insert(name.to_string(), Vec::new());
        self.split = Some(name.to_string());
        Ok(())
    }

    /// Appends one image with its texts to the current split.
    pub fn push(&mut self, image: &ImageRecord, texts: &[TextRecord]) -> Result<()> {
        let m = &self.layout.meta;
        let (r, dr, t, dt) = (m.regions, m.feature_dim, m.max_tokens, self.layout.text_feature_dim);
        let split = self.split.clone().ok_or_else(|| Error::config("DatasetWriter::push before begin_split"))?;
        let bad = |what: String| Error::data(format!("{split} split, image {}: {what}", self.current.images));
        let b = &self.current;
        if image.features.len() != r * dr * image.feature_dtype.size()
            || image.boxes.len() != r * 5 * 4
            || image.labels.len() != m.num_labels
            || image.classes.is_some_and(|c| c.len() != 2 * r)
        {
            return Err(bad("row sizes do not match the layout".into()));
        }
        if b.feature_dtype.is_some_and(|d| d != image.feature_dtype)
            || b.classes.is_some_and(|c| c != image.classes.is_some())
        {
            return Err(bad("feature dtype or presence of classes differs from the shard's first image".into()));
        }
        if texts.is_empty() {
            return Err(bad("no text".into()));
        }
        for tx in texts {
            let want = match tx.dtype {
                Some(d) if dt > 0 => t * dt * d.size(),
                None if dt == 0 => t * 4,
                _ => return Err(bad("text representation differs from the layout".into())),
            };
            if tx.content.len() != want || (b.texts > 0 && b.text_dtype != tx.dtype) {
                return Err(bad("text row size or dtype does not match the layout".into()));
            }
        }
        let b = &mut self.current;
        b.feature_dtype = Some(image.feature_dtype);
        b.classes = Some(image.classes.is_some());
        b.features.extend_from_slice(image.features);
        b.boxes.extend_from_slice(image.boxes);
        b.count.extend_from_slice(&image.count.to_le_bytes());
        if let Some(c) = image.classes {
            b.class_bytes.extend_from_slice(c);
        }
        b.labels.extend_from_slice(image.labels);
        for tx in texts {
            b.text_dtype = tx.dtype;
            b.text.extend_from_slice(tx.content);
            b.length.extend_from_slice(&tx.length.to_le_bytes());
            b.item.extend_from_slice(&(b.images as u32).to_le_bytes());
            b.texts += 1;
        }
        b.images += 1;
        if b.bytes() >= self.shard_bytes {
            self.flush()?;
        }
        Ok(())
    }

    /// Validates an in-memory split and writes it as split `name`: f32 features, token texts.
    /// `Dataset::save` writes train, val and test this way; a generator with a retrieval set
    /// writes it as `"database"`.
    pub fn write_split(&mut self, name: &str, split: &Split) -> Result<()> {
        let m = &self.layout.meta;
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

    /// Writes the current shard (if it holds anything) and lists it in the manifest.
    fn flush(&mut self) -> Result<()> {
        let b = std::mem::take(&mut self.current);
        let Some(split) = self.split.clone() else { return Ok(()) };
        let list = self.splits.get_mut(&split).expect("begin_split inserted the split");
        if b.images == 0 {
            return Ok(());
        }
        let m = &self.layout.meta;
        let (n, mm) = (b.images, b.texts);
        let (r, dr, t, c, dt) = (m.regions, m.feature_dim, m.max_tokens, m.num_labels, self.layout.text_feature_dim);
        let fdt = b.feature_dtype.unwrap_or(FeatureDtype::F32);
        let mut tensors = vec![
            (IMAGE_FEATURES, RawTensor { dtype: fdt.dtype(), shape: vec![n, r, dr], data: &b.features }),
            (IMAGE_BOXES, RawTensor { dtype: Dtype::F32, shape: vec![n, r, 5], data: &b.boxes }),
            (IMAGE_COUNT, RawTensor { dtype: Dtype::U16, shape: vec![n], data: &b.count }),
            (TEXT_LENGTH, RawTensor { dtype: Dtype::U16, shape: vec![mm], data: &b.length }),
            (TEXT_ITEM, RawTensor { dtype: Dtype::U32, shape: vec![mm], data: &b.item }),
            (LABELS, RawTensor { dtype: Dtype::U8, shape: vec![n, c], data: &b.labels }),
        ];
        match b.text_dtype {
            Some(d) => {
                tensors.push((TEXT_FEATURES, RawTensor { dtype: d.dtype(), shape: vec![mm, t, dt], data: &b.text }))
            }
            None => tensors.push((TEXT_TOKENS, RawTensor { dtype: Dtype::U32, shape: vec![mm, t], data: &b.text })),
        }
        if b.classes == Some(true) {
            tensors.push((IMAGE_CLASSES, RawTensor { dtype: Dtype::U16, shape: vec![n, r], data: &b.class_bytes }));
        }
        let file = format!("{split}-{:05}.safetensors", list.len());
        let path = self.tmp.join(&file);
        let info = BTreeMap::from([
            ("format", "semshare-shard".to_string()),
            ("version", FORMAT_VERSION.to_string()),
            ("split", split.clone()),
        ]);
        let bytes = crate::io::safetensors_bytes(tensors.iter().map(|(k, v)| (*k, v)), &info)
            .map_err(|e| Error::format(&path, format!("cannot encode shard: {e}")))?;
        write_synced(&path, &bytes)?;
        list.push(ShardEntry {
            file,
            images: n,
            texts: mm,
            bytes: bytes.len() as u64,
            checksum: format_checksum(checksum(&bytes)),
        });
        Ok(())
    }

    /// Writes vocabulary, labels and manifest, then moves the directory into place (replacing
    /// an existing dataset there). Required splits never begun are written empty.
    pub fn finish(mut self) -> Result<PathBuf> {
        self.flush()?;
        for name in REQUIRED_SPLITS {
            self.splits.entry(name.to_string()).or_default();
        }
        let m = &self.layout.meta;
        let lines = |v: &[String]| v.iter().flat_map(|s| [s.as_str(), "\n"]).collect::<String>();
        write_synced(&self.tmp.join(VOCAB_FILE), lines(&m.vocab).as_bytes())?;
        write_synced(&self.tmp.join(LABELS_FILE), lines(&m.label_names).as_bytes())?;
        let manifest = Manifest {
            format: FORMAT_NAME.into(),
            version: FORMAT_VERSION,
            name: m.name.clone(),
            regions: m.regions,
            feature_dim: m.feature_dim,
            max_tokens: m.max_tokens,
            text_feature_dim: self.layout.text_feature_dim,
            num_labels: m.num_labels,
            num_object_classes: m.num_object_classes,
            vocab_size: m.vocab.len(),
            vocab_file: VOCAB_FILE.into(),
            labels_file: LABELS_FILE.into(),
            splits: std::mem::take(&mut self.splits),
        };
        let mpath = self.tmp.join(MANIFEST_FILE);
        let mut json = serde_json::to_string_pretty(&manifest)
            .map_err(|e| Error::format(&mpath, format!("cannot encode manifest: {e}")))?;
        json.push('\n');
        write_synced(&mpath, json.as_bytes())?;
        // Checked again: something may have appeared at `out` while the dataset was written.
        refuse_non_dataset(&self.out)?;
        // Replace: old aside, new in, old removed. A reader sees the old or the new dataset
        // (or, between the two renames, none), never a mix.
        let mut old = self.tmp.clone().into_os_string();
        old.push(".old");
        let old = PathBuf::from(old);
        let had_old = self.out.exists();
        if had_old {
            fs::rename(&self.out, &old).map_err(|e| Error::io(&self.out, e))?;
        }
        fs::rename(&self.tmp, &self.out).map_err(|e| Error::io(&self.out, e))?;
        if had_old {
            let _ = fs::remove_dir_all(&old);
        }
        if let Some(parent) = self.out.parent()
            && let Ok(d) = fs::File::open(if parent.as_os_str().is_empty() { Path::new(".") } else { parent })
        {
            let _ = d.sync_all(); // best effort: not every filesystem syncs directories
        }
        self.finished = true;
        Ok(self.out.clone())
    }
}

impl Drop for DatasetWriter {
    fn drop(&mut self) {
        if !self.finished {
            let _ = fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Whether `dir` is a dataset directory by its manifest's `format` (the one thing a writer may
/// replace).
pub fn is_dataset(dir: &Path) -> bool {
    let Ok(text) = crate::io::read_text(&dir.join(MANIFEST_FILE), crate::io::SMALL_FILE_LIMIT) else { return false };
    serde_json::from_str::<serde_json::Value>(&text)
        .is_ok_and(|v| v.get("format").and_then(|f| f.as_str()) == Some(FORMAT_NAME))
}

/// A writer replaces a dataset (or an empty directory), never anything else; whether it may
/// replace a dataset is the caller's decision (the CLI's `--force`, [`crate::io::claim_output`]).
fn refuse_non_dataset(out: &Path) -> Result<()> {
    crate::io::claim_output(out, "dataset", true, is_dataset)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = fs::File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).map_err(|e| Error::io(path, e))?;
    f.sync_all().map_err(|e| Error::io(path, e))
}

/// The reserved vocabulary alone (datasets whose texts are features).
pub fn reserved_vocab() -> Vec<String> {
    RESERVED_TOKENS.iter().map(|s| s.to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
