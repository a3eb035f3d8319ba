//! One shard of a dataset directory: a memory-mapped safetensors file, checked against the
//! [`Layout`] when opened, read row by row (pread) with each item's content checked.
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

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use memmap2::Mmap;
use safetensors::tensor::{SafeTensors, View};

use super::checksum::{Checksum, format_checksum};
use safetensors::tensor::Dtype;

use super::format::{FeatureDtype, Layout, MASK, PAD, TEXT_FEATURES, UNK, diagnose, tensor::*, typed};
use crate::{Error, Result};

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
    /// The manifest's checksum of this file (None for the source files of `pack`).
    pub(super) expected_checksum: Option<String>,
    /// Outcome of comparing the file with `expected_checksum`, done by the first item read, so
    /// that a flipped byte is never trained on (the error message when it differs).
    checksum_outcome: OnceLock<std::result::Result<(), String>>,
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
            expected_checksum: None,
            checksum_outcome: OnceLock::new(),
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
        self.verify_checksum()?;
        read_exact_at(&self.file, &self.map, &self.path, buf, offset)
    }

    /// Compares the whole file with the manifest's checksum the first time it is called (every
    /// pread of an item calls it: one pass over the file, cheap next to an epoch) and repeats
    /// the outcome afterwards; a shard opened without a manifest has nothing to compare.
    pub fn verify_checksum(&self) -> Result<()> {
        let Some(expected) = &self.expected_checksum else { return Ok(()) };
        let outcome = self.checksum_outcome.get_or_init(|| self.compare_checksum(expected));
        outcome.as_ref().map_err(|what| Error::format(&self.path, what.clone())).copied()
    }

    fn compare_checksum(&self, expected: &str) -> std::result::Result<(), String> {
        let sum = format_checksum(self.file_checksum().map_err(|e| format!("reading for the checksum: {e}"))?);
        if sum == expected {
            Ok(())
        } else {
            Err(format!(
                "checksum mismatch: file has {sum}, dataset.json says {expected} (changed after it was written)"
            ))
        }
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

    /// The checksum of the whole file (`checksum`), read by pread in blocks.
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
            // Not `read_at`: that one verifies this very checksum first.
            read_exact_at(&self.file, &self.map, &self.path, &mut buf[..n], offset)?;
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
