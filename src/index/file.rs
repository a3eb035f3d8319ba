//! The index file of `semshare index`: a gallery's normalised embeddings, its item ids, its
//! labels if any and where the vectors came from, in one safetensors file:
//!
//! | tensor        | dtype | shape   |                                                       |
//! |---------------|-------|---------|-------------------------------------------------------|
//! | `embeddings`  | F32   | [N, D]  | one L2-normalised row per item (a zero row stays zero) |
//! | `ids.offsets` | U64   | [N + 1] | item i's id is `ids.bytes[offsets[i]..offsets[i+1]]`   |
//! | `ids.bytes`   | U8    | `[B]`   | the ids, UTF-8, concatenated                           |
//! | `labels`      | U8    | [N, C]  | optional: multi-hot, 0 or 1                            |
//!
//! Metadata: `format` = `semshare-index-1`; `origin` = `model` or `vectors`; for a model's
//! index, `fingerprint` (`Checkpoint::fingerprint`), `checkpoint` (its path when indexed, for
//! messages), `embedding` (`pooled`|`label`) and `modality` (`image`|`text`); `label_names`
//! (a JSON list) when the labels' names are known. Ids are unique, non-empty, without line
//! breaks (an export writes one per line).
//!
//! [`Index::open`] maps the file (memmap2) rather than reading it, and validates all of it
//! (dtypes, shapes, offsets, UTF-8, unique ids, finite unit rows, label values) with errors
//! naming the file; [`Gallery::save`] writes atomically.

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::inference::Model;
use crate::io::{atomic_write, f32_to_bytes, open_regular, safetensors_bytes};
use crate::model::EmbeddingKind;
use crate::{Error, Result};

pub const FORMAT: &str = "semshare-index-1";
pub const EMBEDDINGS: &str = "embeddings";
pub const ID_OFFSETS: &str = "ids.offsets";
pub const ID_BYTES: &str = "ids.bytes";
pub const LABELS: &str = "labels";

/// How far a stored row's norm may be from 1 (f32 rounding of a normalised row is ~1e-7).
const UNIT_TOLERANCE: f64 = 1e-3;

/// What the items of an index are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Modality {
    Image,
    Text,
}

impl Modality {
    pub fn name(self) -> &'static str {
        match self {
            Modality::Image => "image",
            Modality::Text => "text",
        }
    }
}

impl std::str::FromStr for Modality {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "image" => Ok(Modality::Image),
            "text" => Ok(Modality::Text),
            _ => Err(Error::config(format!("unknown side `{s}` (expected image or text)"))),
        }
    }
}

/// Where an index's vectors came from.
#[derive(Clone, Debug, PartialEq)]
pub enum Origin {
    /// Embedded by a model: its checkpoint's fingerprint and path, the embedding, the items' kind.
    Model { fingerprint: String, checkpoint: String, embedding: EmbeddingKind, modality: Modality },
    /// Raw vectors (`index --vectors`): no model vouches for them, so only pre-computed query
    /// vectors (`query --vectors`) search them.
    Vectors,
}

impl Origin {
    fn describe(&self) -> String {
        match self {
            Origin::Model { fingerprint, checkpoint, embedding, modality } => {
                format!(
                    "{} items, {} embedding of model {fingerprint} ({checkpoint})",
                    modality.name(),
                    embedding.name()
                )
            }
            Origin::Vectors => "raw vectors (no model)".into(),
        }
    }
}

/// Multi-hot labels `[n, count]`, with their names when known.
#[derive(Clone, Debug, PartialEq)]
pub struct Labels {
    pub values: Vec<u8>,
    pub count: usize,
    pub names: Option<Vec<String>>,
}

/// An index in memory, to be written: `n` items of `dim` values each.
#[derive(Clone, Debug, PartialEq)]
pub struct Gallery {
    pub origin: Origin,
    pub dim: usize,
    /// `[n, dim]` row-major, rows normalised.
    pub vectors: Vec<f32>,
    pub ids: Vec<String>,
    pub labels: Option<Labels>,
}

impl Gallery {
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// What [`Index::open`] would refuse, said in words.
    pub fn check(&self) -> std::result::Result<(), String> {
        let n = self.ids.len();
        if n == 0 {
            return Err("no items".into());
        }
        if self.dim == 0 || n.checked_mul(self.dim) != Some(self.vectors.len()) {
            return Err(format!("{} values for {n} items of dimension {}", self.vectors.len(), self.dim));
        }
        check_rows(&self.vectors, self.dim)?;
        check_ids(self.ids.iter().map(String::as_str))?;
        if let Some(l) = &self.labels {
            check_labels(&l.values, n, l.count)?;
            if let Some(names) = &l.names
                && names.len() != l.count
            {
                return Err(format!("{} label names for {} labels", names.len(), l.count));
            }
        }
        Ok(())
    }

    /// Adds `more` after this gallery's items: the same origin (model, embedding, kind of
    /// items), dimension and labels (both or neither, the same count), and no id twice.
    pub fn append(&mut self, more: Gallery) -> Result<()> {
        if more.origin != self.origin {
            return Err(Error::data(format!(
                "cannot append {} to an index of {}",
                more.origin.describe(),
                self.origin.describe()
            )));
        }
        if more.dim != self.dim {
            return Err(Error::data(format!("cannot append vectors of dimension {} to {}", more.dim, self.dim)));
        }
        let ours: HashSet<&str> = self.ids.iter().map(String::as_str).collect();
        if let Some(id) = more.ids.iter().find(|id| ours.contains(id.as_str())) {
            return Err(Error::data(format!("item id `{id}` is already in the index (ids must be unique)")));
        }
        self.labels = match (self.labels.take(), more.labels) {
            (None, None) => None,
            (Some(mut a), Some(b)) if a.count == b.count => {
                a.values.extend(b.values);
                a.names = a.names.or(b.names);
                Some(a)
            }
            (a, b) => {
                let count = |l: &Option<Labels>| l.as_ref().map_or("no".to_string(), |l| l.count.to_string());
                return Err(Error::data(format!(
                    "cannot append items with {} labels to an index with {} labels",
                    count(&b),
                    count(&a)
                )));
            }
        };
        self.vectors.extend(more.vectors);
        self.ids.extend(more.ids);
        Ok(())
    }

    /// Writes the gallery to `path` atomically (checked first: nothing invalid is written).
    pub fn save(&self, path: &Path) -> Result<()> {
        self.check().map_err(|e| Error::format(path, format!("index not written: {e}")))?;
        let n = self.len();
        let mut offsets = Vec::with_capacity(8 * (n + 1));
        let mut id_bytes = Vec::new();
        offsets.extend_from_slice(&0u64.to_le_bytes());
        for id in &self.ids {
            id_bytes.extend_from_slice(id.as_bytes());
            offsets.extend_from_slice(&(id_bytes.len() as u64).to_le_bytes());
        }
        let vectors = f32_to_bytes(&self.vectors);
        let mut tensors = vec![
            (EMBEDDINGS, Dtype::F32, vec![n, self.dim], vectors.as_slice()),
            (ID_OFFSETS, Dtype::U64, vec![n + 1], offsets.as_slice()),
            (ID_BYTES, Dtype::U8, vec![id_bytes.len()], id_bytes.as_slice()),
        ];
        let mut meta = BTreeMap::from([("format", FORMAT.to_string())]);
        match &self.origin {
            Origin::Model { fingerprint, checkpoint, embedding, modality } => {
                meta.insert("origin", "model".into());
                meta.insert("fingerprint", fingerprint.clone());
                meta.insert("checkpoint", checkpoint.clone());
                meta.insert("embedding", embedding.name().into());
                meta.insert("modality", modality.name().into());
            }
            Origin::Vectors => {
                meta.insert("origin", "vectors".into());
            }
        }
        if let Some(l) = &self.labels {
            tensors.push((LABELS, Dtype::U8, vec![n, l.count], l.values.as_slice()));
            if let Some(names) = &l.names {
                meta.insert("label_names", serde_json::to_string(names).expect("strings serialise"));
            }
        }
        let views = tensors
            .into_iter()
            .map(|(name, dtype, shape, data)| TensorView::new(dtype, shape, data).map(|v| (name, v)))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::format(path, e.to_string()))?;
        let bytes = safetensors_bytes(views, &meta).map_err(|e| Error::format(path, e))?;
        atomic_write(path, &bytes)
    }
}

/// Every row finite, of norm 1 (or exactly 0). In parallel: a 100,000 × 256 index is checked
/// on every `query` start.
fn check_rows(vectors: &[f32], dim: usize) -> std::result::Result<(), String> {
    const ROWS: usize = 1024;
    let bad = vectors.par_chunks(dim * ROWS).enumerate().find_map_first(|(c, rows)| {
        rows.chunks_exact(dim).enumerate().find_map(|(r, row)| {
            let i = c * ROWS + r;
            let mut sum = 0.0f64;
            for &x in row {
                if !x.is_finite() {
                    return Some(format!("embedding row {i} holds a non-finite value"));
                }
                sum += f64::from(x) * f64::from(x);
            }
            let norm = sum.sqrt();
            (norm != 0.0 && (norm - 1.0).abs() > UNIT_TOLERANCE)
                .then(|| format!("embedding row {i} has norm {norm:.6}, not 1 (rows are stored normalised)"))
        })
    });
    bad.map_or(Ok(()), Err)
}

fn check_ids<'a>(ids: impl Iterator<Item = &'a str>) -> std::result::Result<(), String> {
    let ids: Vec<&str> = ids.collect();
    for (i, id) in ids.iter().enumerate() {
        if id.is_empty() {
            return Err(format!("item {i} has an empty id"));
        }
        if id.contains(['\n', '\r']) {
            return Err(format!("item {i}'s id {id:?} holds a line break"));
        }
    }
    // Sorted in parallel to find a duplicate; the slower walk only to name it.
    let mut sorted = ids.clone();
    sorted.par_sort_unstable();
    if sorted.windows(2).all(|w| w[0] != w[1]) {
        return Ok(());
    }
    let mut seen = HashSet::new();
    match ids.iter().enumerate().find(|(_, id)| !seen.insert(**id)) {
        Some((i, id)) => Err(format!("item id `{id}` appears twice (item {i})")),
        None => Ok(()),
    }
}

fn check_labels(values: &[u8], n: usize, count: usize) -> std::result::Result<(), String> {
    if n.checked_mul(count) != Some(values.len()) {
        return Err(format!("{} label values for {n} items of {count} labels", values.len()));
    }
    if let Some(at) = values.iter().position(|&v| v > 1) {
        return Err(format!("label value {} of item {} is not 0 or 1", values[at], at / count.max(1)));
    }
    Ok(())
}

/// An index file mapped into memory (not copied) and validated.
pub struct Index {
    path: PathBuf,
    map: Mmap,
    origin: Origin,
    n: usize,
    dim: usize,
    /// Byte ranges into the map.
    vectors: Range<usize>,
    id_bytes: Range<usize>,
    id_offsets: Vec<usize>,
    labels: Option<(Range<usize>, usize)>,
    label_names: Option<Vec<String>>,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index").field("path", &self.path).field("origin", &self.origin).field("n", &self.n).finish()
    }
}

impl Index {
    /// Maps and validates the index at `path`; every error names the file. The file is read
    /// through the map, not copied: semshare replaces an index by rename, never in place, but
    /// another program that truncates it while it is open makes the next read a SIGBUS.
    pub fn open(path: &Path) -> Result<Index> {
        let bad = |what: String| Error::format(path, format!("not a valid semshare index: {what}"));
        if cfg!(target_endian = "big") {
            return Err(bad("index files are little-endian; this machine is not".into()));
        }
        let (file, len) = open_regular(path)?;
        if len < 8 {
            return Err(bad(format!("{len} bytes, truncated")));
        }
        // SAFETY: read-only map; index files are replaced by rename (`atomic_write`), never
        // modified in place, so the mapped inode's bytes do not change under the reader.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let st = SafeTensors::deserialize(&map).map_err(|e| bad(format!("{e} (truncated or corrupt?)")))?;
        let (_, header) = SafeTensors::read_metadata(&map).map_err(|e| bad(e.to_string()))?;
        let meta = header.metadata().clone().unwrap_or_default();
        match meta.get("format") {
            Some(f) if f == FORMAT => {}
            Some(f) => return Err(bad(format!("format `{f}`, expected `{FORMAT}`"))),
            None => return Err(bad("no `format` in the metadata".into())),
        }
        let field = |k: &str| meta.get(k).cloned().ok_or_else(|| bad(format!("no `{k}` in the metadata")));
        let origin = match field("origin")?.as_str() {
            "vectors" => Origin::Vectors,
            "model" => {
                let fingerprint = field("fingerprint")?;
                if fingerprint.len() != 16 || !fingerprint.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(bad(format!("fingerprint `{fingerprint}` is not 16 hex digits")));
                }
                let embedding = field("embedding")?.parse().map_err(|e: Error| bad(e.to_string()))?;
                let modality = field("modality")?.parse().map_err(|e: Error| bad(e.to_string()))?;
                Origin::Model { fingerprint, checkpoint: field("checkpoint")?, embedding, modality }
            }
            other => return Err(bad(format!("origin `{other}` (expected model or vectors)"))),
        };
        let base = map.as_ptr() as usize;
        let tensor = |name: &str, dtype: Dtype| -> Result<(Vec<usize>, Range<usize>)> {
            let t = st.tensor(name).map_err(|_| bad(format!("tensor `{name}` is missing")))?;
            if t.dtype() != dtype {
                return Err(bad(format!("tensor `{name}` is {:?}, expected {dtype:?}", t.dtype())));
            }
            let start = t.data().as_ptr() as usize - base;
            Ok((t.shape().to_vec(), start..start + t.data().len()))
        };
        for name in st.names() {
            if ![EMBEDDINGS, ID_OFFSETS, ID_BYTES, LABELS].contains(&name) {
                return Err(bad(format!("unexpected tensor `{name}`")));
            }
        }
        let (shape, vectors) = tensor(EMBEDDINGS, Dtype::F32)?;
        let [n, dim] = shape[..] else {
            return Err(bad(format!("tensor `{EMBEDDINGS}` has shape {shape:?}, not [N, D]")));
        };
        if n == 0 || dim == 0 {
            return Err(bad(format!("tensor `{EMBEDDINGS}` has shape {shape:?}: no items")));
        }
        if !(base + vectors.start).is_multiple_of(4) {
            return Err(bad(format!("tensor `{EMBEDDINGS}` is not 4-byte aligned")));
        }
        let (shape, offsets) = tensor(ID_OFFSETS, Dtype::U64)?;
        if shape != [n + 1] {
            return Err(bad(format!("tensor `{ID_OFFSETS}` has shape {shape:?}, expected [{}]", n + 1)));
        }
        let (_, id_bytes) = tensor(ID_BYTES, Dtype::U8)?;
        let id_offsets: Vec<usize> =
            map[offsets].chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")) as usize).collect();
        let ids_len = id_bytes.len();
        if id_offsets[0] != 0 || id_offsets[n] != ids_len || id_offsets.windows(2).any(|w| w[0] > w[1]) {
            return Err(bad(format!("tensor `{ID_OFFSETS}` is not an increasing 0..={ids_len}")));
        }
        let text = std::str::from_utf8(&map[id_bytes.clone()]).map_err(|_| bad("the ids are not UTF-8".into()))?;
        if let Some(i) = id_offsets.iter().position(|&o| !text.is_char_boundary(o)) {
            return Err(bad(format!("id offset {i} splits a character")));
        }
        check_ids((0..n).map(|i| &text[id_offsets[i]..id_offsets[i + 1]])).map_err(bad)?;
        let labels = match st.tensor(LABELS) {
            Err(_) => None,
            Ok(_) => {
                let (shape, range) = tensor(LABELS, Dtype::U8)?;
                let [rows, count] = shape[..] else {
                    return Err(bad(format!("tensor `{LABELS}` has shape {shape:?}")));
                };
                if rows != n {
                    return Err(bad(format!("tensor `{LABELS}` has {rows} rows for {n} items")));
                }
                check_labels(&map[range.clone()], n, count).map_err(bad)?;
                Some((range, count))
            }
        };
        let label_names = match meta.get("label_names") {
            None => None,
            Some(json) => {
                let names: Vec<String> = serde_json::from_str(json).map_err(|e| bad(format!("`label_names`: {e}")))?;
                if labels.as_ref().map(|l| l.1) != Some(names.len()) {
                    return Err(bad(format!("{} label names for the labels tensor", names.len())));
                }
                Some(names)
            }
        };
        let index =
            Index { path: path.to_path_buf(), map, origin, n, dim, vectors, id_bytes, id_offsets, labels, label_names };
        check_rows(index.vectors(), dim).map_err(bad)?;
        Ok(index)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn origin(&self) -> &Origin {
        &self.origin
    }
    pub fn len(&self) -> usize {
        self.n
    }
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The embeddings `[n, dim]`, straight from the map.
    pub fn vectors(&self) -> &[f32] {
        // Alignment and length were checked in `open`.
        bytemuck::cast_slice(&self.map[self.vectors.clone()])
    }

    /// Item `i`'s id; None past the last item.
    pub fn id(&self, i: usize) -> Option<&str> {
        let (start, end) = (self.id_offsets.get(i)?, self.id_offsets.get(i + 1)?);
        let bytes = &self.map[self.id_bytes.start + start..self.id_bytes.start + end];
        std::str::from_utf8(bytes).ok() // checked in `open`
    }

    /// The items' ids in order.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        (0..self.n).map(|i| self.id(i).unwrap_or_default()) // every id checked in `open`
    }

    /// Item `i`'s labels (multi-hot); None without labels or past the last item.
    pub fn labels(&self, i: usize) -> Option<&[u8]> {
        let (r, c) = self.labels.as_ref().filter(|_| i < self.n)?;
        Some(&self.map[r.start + i * c..r.start + (i + 1) * c])
    }

    pub fn label_names(&self) -> Option<&[String]> {
        self.label_names.as_deref()
    }

    /// Refuses a model other than the one that built the index, or the same model set to the
    /// other embedding (its queries would land in another space: [`Model::set_embedding`] to
    /// the index's first); names both files.
    pub fn check_model(&self, model: &Model) -> Result<()> {
        let (fingerprint, checkpoint) = (model.fingerprint(), model.path().display());
        match &self.origin {
            Origin::Model { fingerprint: ours, embedding, .. } if ours == fingerprint => {
                if *embedding == model.embedding() {
                    return Ok(());
                }
                Err(Error::refused(
                    &self.path,
                    format!(
                        "holds the {} embedding, but {checkpoint} is set to the {} embedding: set_embedding(EmbeddingKind::{embedding:?}) before embedding queries",
                        embedding.name(),
                        model.embedding().name()
                    ),
                ))
            }
            Origin::Model { fingerprint: ours, checkpoint: built, .. } => Err(Error::refused(
                &self.path,
                format!(
                    "was built by model {ours} ({built}), but {checkpoint} is model {fingerprint}: query with the checkpoint that built the index"
                ),
            )),
            Origin::Vectors => Err(Error::refused(
                &self.path,
                format!(
                    "holds raw vectors (index --vectors), not a model's embeddings: {checkpoint} cannot query it; pass query vectors with --vectors"
                ),
            )),
        }
    }

    /// An owned copy, to append to.
    pub fn to_gallery(&self) -> Gallery {
        let labels = self.labels.as_ref().map(|(r, c)| Labels {
            values: self.map[r.clone()].to_vec(),
            count: *c,
            names: self.label_names.clone(),
        });
        Gallery {
            origin: self.origin.clone(),
            dim: self.dim,
            vectors: self.vectors().to_vec(),
            ids: self.ids().map(String::from).collect(),
            labels,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gallery(ids: &[&str]) -> Gallery {
        let n = ids.len();
        let vectors = (0..n).flat_map(|i| if i % 2 == 0 { [0.6, 0.8] } else { [1.0, 0.0] }).collect();
        Gallery {
            origin: Origin::Vectors,
            dim: 2,
            vectors,
            ids: ids.iter().map(|s| s.to_string()).collect(),
            labels: None,
        }
    }

    #[test]
    fn a_saved_gallery_opens_mapped_and_a_duplicate_id_in_the_file_is_refused() {
        let dir = std::env::temp_dir().join(format!("semshare-index-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("g.idx");
        let g = gallery(&["x/10", "x/11", "é"]);
        g.save(&path).unwrap();
        let index = Index::open(&path).unwrap();
        assert_eq!((index.len(), index.dim(), index.id(2), index.vectors()), (3, 2, Some("é"), &g.vectors[..]));
        assert_eq!(index.to_gallery(), g);
        // The same length, another id: x/11 becomes x/10.
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.windows(8).position(|w| w == b"x/10x/11").unwrap();
        bytes[at + 7] = b'0';
        std::fs::write(&path, &bytes).unwrap();
        let e = Index::open(&path).unwrap_err().to_string();
        assert!(e.contains("item id `x/10` appears twice (item 1)") && e.contains("g.idx"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn galleries_append_only_what_matches() {
        let mut a = gallery(&["a", "b"]);
        assert!(a.clone().append(gallery(&["b"])).unwrap_err().to_string().contains("`b` is already in the index"));
        let mut wide = gallery(&["c"]);
        wide.dim = 1;
        wide.vectors = vec![1.0];
        assert!(a.clone().append(wide).unwrap_err().to_string().contains("dimension 1 to 2"));
        let model = Origin::Model {
            fingerprint: "0123456789abcdef".into(),
            checkpoint: "m.safetensors".into(),
            embedding: EmbeddingKind::Pooled,
            modality: Modality::Image,
        };
        let other = Gallery { origin: model, ..gallery(&["c"]) };
        assert!(a.clone().append(other).unwrap_err().to_string().contains("image items"));
        a.append(gallery(&["c", "d"])).unwrap();
        assert_eq!((a.len(), a.ids[3].as_str(), a.check()), (4, "d", Ok(())));
        assert!(gallery(&["a", "a"]).check().unwrap_err().contains("appears twice"));
        assert!(gallery(&["a\nb"]).check().unwrap_err().contains("line break"));
        assert!(gallery(&[]).check().unwrap_err().contains("no items"));
    }
}
