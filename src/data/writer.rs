//! Writing a dataset directory: [`DatasetWriter`] takes images and texts as raw rows, cuts
//! shards at a size, and publishes the directory atomically (a temporary directory renamed into
//! place) with the manifest and its checksums.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use std::borrow::Cow;

use safetensors::tensor::{Dtype, View};

use super::checksum::{checksum, format_checksum};
use super::format::{
    FORMAT_NAME, FORMAT_VERSION, FeatureDtype, LABELS_FILE, Layout, MANIFEST_FILE, Manifest, REQUIRED_SPLITS, SPLITS,
    ShardEntry, TEXT_FEATURES, VOCAB_FILE, foreign_entries, is_dataset, one_per_line, tensor::*,
};
use crate::{Error, Result};

/// One image as raw little-endian rows (shapes of the shard table: `[R, Dr]`, `[R, 5]`, `[R]`).
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
    /// `tmp` open and locked, so that no other process takes it for a dead one's.
    _tmp_lock: Option<fs::File>,
    layout: Layout,
    shard_bytes: usize,
    splits: BTreeMap<String, Vec<ShardEntry>>,
    split: Option<String>,
    current: ShardBuilder,
    finished: bool,
}

impl DatasetWriter {
    /// What every shard of this dataset agrees on.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

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
        let prefix = format!(".{}.tmp-", name.to_string_lossy());
        crate::io::remove_stale_temps(&parent, &prefix);
        // One by this name is an earlier process's with this PID (a container's PID 1): removed
        // when gone, passed over while a writer in another PID namespace holds it locked.
        let tmp = loop {
            let k = NEXT.fetch_add(1, Ordering::Relaxed);
            let tmp = parent.join(format!("{prefix}{}-{k}", std::process::id()));
            if !crate::io::locked(&tmp) {
                break tmp;
            }
        };
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
        // Locked while this writer lives (best effort: not every filesystem has locks).
        let tmp_lock = fs::File::open(&tmp).ok();
        #[cfg(unix)]
        if let Some(dir) = &tmp_lock {
            let _ = dir.try_lock();
        }
        Ok(DatasetWriter {
            out,
            tmp,
            _tmp_lock: tmp_lock,
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
        // Errors name the file as it will be called, not the hidden directory it is built in.
        let path = self.out.join(&file);
        let info = BTreeMap::from([
            ("format", "semshare-shard".to_string()),
            ("version", FORMAT_VERSION.to_string()),
            ("split", split.clone()),
        ]);
        let bytes = crate::io::safetensors_bytes(tensors.iter().map(|(k, v)| (*k, v)), &info)
            .map_err(|e| Error::format(&path, format!("cannot encode shard: {e}")))?;
        write_synced(&self.tmp.join(&file), &path, &bytes)?;
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
        write_synced(&self.tmp.join(VOCAB_FILE), &self.out.join(VOCAB_FILE), one_per_line(&m.vocab).as_bytes())?;
        let labels = one_per_line(&m.label_names);
        write_synced(&self.tmp.join(LABELS_FILE), &self.out.join(LABELS_FILE), labels.as_bytes())?;
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
        let mpath = self.out.join(MANIFEST_FILE);
        let mut json = serde_json::to_string_pretty(&manifest)
            .map_err(|e| Error::format(&mpath, format!("cannot encode manifest: {e}")))?;
        json.push('\n');
        write_synced(&self.tmp.join(MANIFEST_FILE), &mpath, json.as_bytes())?;
        // Checked again: something may have appeared at `out` while the dataset was written.
        refuse_non_dataset(&self.out)?;
        if let Ok(d) = fs::File::open(&self.tmp) {
            let _ = d.sync_all(); // the new dataset's entries, before it is renamed into place
        }
        // A reader sees the old or the new dataset, never a mix.
        if let Ok(old) = fs::metadata(&self.out) {
            // The replaced dataset's permissions stay (a shared group's access, say).
            let _ = fs::set_permissions(&self.tmp, old.permissions());
            let mut aside = self.tmp.clone().into_os_string();
            aside.push(".old");
            crate::io::replace_dir(&self.tmp, &self.out, Path::new(&aside))?;
        } else {
            fs::rename(&self.tmp, &self.out).map_err(|e| Error::io(&self.out, e))?;
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

/// A writer replaces a dataset (or an empty directory), never anything else; whether it may
/// replace a dataset is the caller's decision (the CLI's `--force`, [`claim_dataset_output`]).
fn refuse_non_dataset(out: &Path) -> Result<()> {
    claim_dataset_output(out, true)
}

/// [`crate::io::claim_output`] for a dataset directory: a dataset is replaced whole, so one
/// holding anything its manifest does not list (a user's notes, another program's output) is
/// refused, naming what is there, even with `force`.
pub fn claim_dataset_output(out: &Path, force: bool) -> Result<()> {
    restore_aside(out);
    if is_dataset(out) {
        let why = match foreign_entries(out) {
            Some(f) if f.is_empty() => None,
            Some(f) => Some(format!(
                "holds {} that its manifest does not list ({}); refusing to replace the dataset (move {} away first)",
                if f.len() == 1 { "an entry".to_string() } else { format!("{} entries", f.len()) },
                f.iter().take(3).map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
                    + if f.len() > 3 { ", …" } else { "" },
                if f.len() == 1 { "it" } else { "them" },
            )),
            None => Some(
                "holds a dataset manifest this version cannot read, so which files are the dataset's is unknown; refusing to replace it (delete it yourself first)".into(),
            ),
        };
        if let Some(why) = why {
            return Err(Error::refused(out, why));
        }
    }
    crate::io::claim_output(out, "dataset", force, is_dataset)
}

/// A process killed between [`DatasetWriter::finish`]'s two renames left the old dataset aside
/// (`.NAME.tmp-PID-K.old`) and none at `out`: it is put back, with a notice, before `out` is
/// judged or the dead process's temps are removed.
fn restore_aside(out: &Path) {
    let Some(name) = out.file_name() else { return };
    if fs::symlink_metadata(out).is_ok() {
        return;
    }
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let prefix = format!(".{}.tmp-", name.to_string_lossy());
    for (aside, pid) in crate::io::stale_temps(parent, &prefix) {
        if aside.extension().is_some_and(|e| e == "old") && fs::rename(&aside, out).is_ok() {
            let _ = writeln!(
                std::io::stderr(),
                "restored {} from {}, set aside by process {pid} (killed while replacing it)",
                out.display(),
                aside.display()
            );
            // The new dataset that process had finished goes too, whatever follows.
            crate::io::remove_stale_temps(parent, &prefix);
            return;
        }
    }
}

/// `bytes` to `path` (inside the dataset being built), synced; errors name `named`, the file
/// as the finished dataset will call it.
fn write_synced(path: &Path, named: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = fs::File::create(path).map_err(|e| Error::io(named, e))?;
    f.write_all(bytes).map_err(|e| Error::io(named, e))?;
    f.sync_all().map_err(|e| Error::io(named, e))
}
