//! Reading a dataset directory: [`DatasetReader`] opens the manifest, the vocabulary and label
//! files and every shard (structural checks on open); [`SplitReader`] indexes a split's items
//! across its shards.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::format::{
    FORMAT_NAME, FORMAT_VERSION, FeatureDtype, Layout, MANIFEST_FILE, Manifest, Meta, REQUIRED_SPLITS, SPLITS,
    ShardEntry, plain_file_name, read_lines,
};
use super::shard::{Counts, ImageRows, Shard};
use crate::{Error, Result};

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
            image_base.push(image_base[image_base.len() - 1] + s.num_images());
            text_base.push(text_base[text_base.len() - 1] + s.num_texts());
        }
        if image_base[shards.len()] > u32::MAX as usize || text_base[shards.len()] > u32::MAX as usize {
            return Err(Error::data(format!("split {name}: more than 2^32 items")));
        }
        if let Some(first) = shards.first() {
            for s in &shards[1..] {
                let same = s.feature_dtype() == first.feature_dtype()
                    && s.text_dtype() == first.text_dtype()
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
    /// `[M]` global image of each text.
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
        self.shards.first().map_or(FeatureDtype::F32, |s| s.feature_dtype())
    }
    pub fn text_dtype(&self) -> Option<FeatureDtype> {
        self.shards.first().and_then(|s| s.text_dtype())
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
        // Said of the directory, not as an OS error about the manifest inside it.
        let missing = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
        let not_a_dataset = match std::fs::metadata(dir) {
            Err(e) if missing(&e) => Some("the data directory does not exist"),
            Err(e) => return Err(Error::io(dir, e)),
            Ok(m) if !m.is_dir() => Some("not a directory: a dataset is a directory holding dataset.json"),
            Ok(_) => match std::fs::symlink_metadata(&mpath) {
                Err(e) if missing(&e) => Some("holds no dataset.json: not a dataset"),
                // Permission denied and the like: said by the read below, naming the file.
                _ => None,
            },
        };
        if let Some(what) = not_a_dataset {
            return Err(Error::format(dir, what));
        }
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
                let mut shard = Shard::open(&path, &layout, Some(Counts { images: e.images, texts: e.texts }))?;
                if shard.file_bytes().len() as u64 != e.bytes {
                    let what = format!("{} bytes, dataset.json says {}", shard.file_bytes().len(), e.bytes);
                    return Err(Error::format(&path, what));
                }
                shard.expected_checksum = Some(e.checksum.clone());
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
            for (verified, entry) in split.shards.iter().zip(entries) {
                let reopened;
                let shard = match verified.verify_checksum() {
                    Ok(()) => verified,
                    Err(e) => {
                        errors.push(e);
                        // Its items are read again without the comparison (each read would
                        // repeat it), for what else is wrong; a file that cannot be read whole
                        // would only repeat that.
                        let counts = Counts { images: entry.images, texts: entry.texts };
                        match Shard::open(&verified.path, &self.layout, Some(counts)) {
                            Ok(s) if s.file_checksum().is_ok() => {
                                reopened = s;
                                &reopened
                            }
                            _ => continue,
                        }
                    }
                };
                for i in 0..shard.num_images() {
                    if let Err(e) = shard.read_image_rows(&self.layout, i, &mut image) {
                        errors.push(e);
                    }
                }
                for j in 0..shard.num_texts() {
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
