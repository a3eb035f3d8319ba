//! Precomputed embeddings, the input of `score --embeddings FILE`: a safetensors file with
//!
//! | tensor            | dtype | shape  |                                                  |
//! |-------------------|-------|--------|--------------------------------------------------|
//! | `image.embedding` | F32   | [N, D] |                                                  |
//! | `text.embedding`  | F32   | [M, D] |                                                  |
//! | `image.labels`    | U8    | [N, C] | multi-hot, 0 or 1                                |
//! | `text.labels`     | U8    | [M, C] | multi-hot, 0 or 1                                |
//! | `text.item`       | U32   | `[M]`  | optional: the image of each text (see below)      |
//!
//! Without `text.item`, M = N pairs text i with image i; M ≠ N leaves the set unpaired: it is
//! scored with the label metrics only, since R@K needs to know which text belongs to which
//! image ([`EmbeddingSet::is_paired`]). Other tensors are ignored. Everything is validated on load (dtype, shape, label values,
//! finiteness, item ids) with an error naming the file, the tensor and the row.

use std::borrow::Cow;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use super::metrics::{EvalConfig, Report, Side, evaluate, evaluate_unpaired};
use crate::{Error, Result};

pub const IMAGE_EMBEDDING: &str = "image.embedding";
pub const TEXT_EMBEDDING: &str = "text.embedding";
pub const IMAGE_LABELS: &str = "image.labels";
pub const TEXT_LABELS: &str = "text.labels";
pub const TEXT_ITEM: &str = "text.item";

/// Image and text embeddings with their labels and the text → image pairing, if any; always
/// valid.
#[derive(Clone, Debug, PartialEq)]
pub struct EmbeddingSet {
    dim: usize,
    num_labels: usize,
    image_emb: Vec<f32>,
    image_labels: Vec<u8>,
    text_emb: Vec<f32>,
    text_labels: Vec<u8>,
    text_item: Option<Vec<u32>>,
}

/// The metadata entry that marks a file semshare wrote, and its value.
const WRITTEN_BY: &str = "written_by";
const WRITER: &str = "semshare";

impl EmbeddingSet {
    /// Builds a set from row-major `[N, dim]` / `[M, dim]` embeddings and `[N, num_labels]` /
    /// `[M, num_labels]` labels; `text_item = None` pairs text i with image i when M = N and
    /// leaves the set unpaired otherwise.
    /// Validated like a loaded file (errors are `Error::Data`).
    pub fn new(
        image_emb: Vec<f32>,
        image_labels: Vec<u8>,
        text_emb: Vec<f32>,
        text_labels: Vec<u8>,
        dim: usize,
        num_labels: usize,
        text_item: Option<Vec<u32>>,
    ) -> Result<Self> {
        let set = EmbeddingSet { dim, num_labels, image_emb, image_labels, text_emb, text_labels, text_item };
        set.check().map_err(Error::data)?;
        Ok(set)
    }

    pub fn dim(&self) -> usize {
        self.dim
    }
    pub fn num_labels(&self) -> usize {
        self.num_labels
    }
    pub fn n_images(&self) -> usize {
        self.image_emb.len() / self.dim
    }
    pub fn n_texts(&self) -> usize {
        self.text_emb.len() / self.dim
    }
    pub fn images(&self) -> Side<'_> {
        Side::new(&self.image_emb, self.dim, &self.image_labels, self.num_labels)
    }
    pub fn texts(&self) -> Side<'_> {
        Side::new(&self.text_emb, self.dim, &self.text_labels, self.num_labels)
    }
    /// `text.item` as stored (None when the file had none).
    pub fn explicit_text_item(&self) -> Option<&[u32]> {
        self.text_item.as_deref()
    }
    /// Whether texts are paired with images: by `text.item`, or one to one when M = N.
    pub fn is_paired(&self) -> bool {
        self.text_item.is_some() || self.n_texts() == self.n_images()
    }
    /// The image of each text: `text.item`, or the identity when absent and M = N; None for an
    /// unpaired set.
    pub fn text_item(&self) -> Option<Cow<'_, [u32]>> {
        match &self.text_item {
            Some(v) => Some(Cow::Borrowed(v)),
            None if self.is_paired() => Some(Cow::Owned((0..self.n_texts() as u32).collect())),
            None => None,
        }
    }

    /// Retrieval scores of these embeddings (see [`evaluate`]); an unpaired set gets the label
    /// metrics without R@K ([`evaluate_unpaired`]).
    pub fn evaluate(&self, cfg: &EvalConfig) -> Result<Report> {
        match self.text_item() {
            Some(items) => evaluate(&self.images(), &self.texts(), &items, cfg),
            None => evaluate_unpaired(&self.images(), &self.texts(), cfg),
        }
    }

    /// Shape and value checks; the message names the tensor and the row.
    fn check(&self) -> std::result::Result<(), String> {
        let (d, c) = (self.dim, self.num_labels);
        if d == 0 {
            return Err(format!("tensor `{IMAGE_EMBEDDING}`: embedding dimension is 0"));
        }
        if c == 0 {
            return Err(format!("tensor `{IMAGE_LABELS}`: number of labels is 0"));
        }
        let rows = |name: &str, len: usize, width: usize| -> std::result::Result<usize, String> {
            if !len.is_multiple_of(width) {
                return Err(format!("tensor `{name}`: {len} values is not a multiple of {width}"));
            }
            match len / width {
                0 => Err(format!("tensor `{name}` has no rows")),
                n if n > u32::MAX as usize => Err(format!("tensor `{name}`: {n} rows is too many")),
                n => Ok(n),
            }
        };
        let n = rows(IMAGE_EMBEDDING, self.image_emb.len(), d)?;
        let m = rows(TEXT_EMBEDDING, self.text_emb.len(), d)?;
        for (name, labels, want) in [(IMAGE_LABELS, &self.image_labels, n), (TEXT_LABELS, &self.text_labels, m)] {
            let got = rows(name, labels.len(), c)?;
            if got != want {
                return Err(format!("tensor `{name}` has {got} rows, expected {want}"));
            }
            if let Some(i) = labels.iter().position(|&v| v > 1) {
                return Err(format!(
                    "tensor `{name}` row {}: value {} at label {} (labels must be 0 or 1)",
                    i / c,
                    labels[i],
                    i % c
                ));
            }
        }
        for (name, emb) in [(IMAGE_EMBEDDING, &self.image_emb), (TEXT_EMBEDDING, &self.text_emb)] {
            if let Some(i) = emb.iter().position(|x| !x.is_finite()) {
                return Err(format!("tensor `{name}` row {}: non-finite value {} at column {}", i / d, emb[i], i % d));
            }
        }
        match &self.text_item {
            None => Ok(()),
            Some(items) if items.len() != m => {
                Err(format!("tensor `{TEXT_ITEM}` has {} entries, expected {m} (one per text)", items.len()))
            }
            Some(items) => match items.iter().position(|&i| i as usize >= n) {
                Some(j) => {
                    Err(format!("tensor `{TEXT_ITEM}` row {j}: image {} out of range (there are {n} images)", items[j]))
                }
                None => Ok(()),
            },
        }
    }

    /// Reads and validates an embeddings file.
    pub fn load(path: &Path) -> Result<EmbeddingSet> {
        EmbeddingSet::parse(path, &crate::io::read(path)?)
    }

    /// [`EmbeddingSet::load`] of the bytes read from `path`.
    fn parse(path: &Path, bytes: &[u8]) -> Result<EmbeddingSet> {
        let bad = |what: String| Error::format(path, what);
        let st = SafeTensors::deserialize(bytes).map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;

        let tensor = |name: &str, dtype: Dtype, rank: usize| -> Result<Option<TensorView<'_>>> {
            let view = match st.tensor(name) {
                Ok(v) => v,
                Err(_) => return Ok(None),
            };
            if view.dtype() != dtype {
                return Err(bad(format!("tensor `{name}` has dtype {:?}, expected {dtype:?}", view.dtype())));
            }
            if view.shape().len() != rank {
                return Err(bad(format!("tensor `{name}` has shape {:?}, expected rank {rank}", view.shape())));
            }
            Ok(Some(view))
        };
        let required = |name: &str, dtype: Dtype, rank: usize| -> Result<TensorView<'_>> {
            tensor(name, dtype, rank)?.ok_or_else(|| bad(format!("missing tensor `{name}`")))
        };

        let image_emb = required(IMAGE_EMBEDDING, Dtype::F32, 2)?;
        let text_emb = required(TEXT_EMBEDDING, Dtype::F32, 2)?;
        let image_labels = required(IMAGE_LABELS, Dtype::U8, 2)?;
        let text_labels = required(TEXT_LABELS, Dtype::U8, 2)?;
        let text_item = tensor(TEXT_ITEM, Dtype::U32, 1)?;

        let (n, d) = (image_emb.shape()[0], image_emb.shape()[1]);
        let (m, c) = (text_emb.shape()[0], image_labels.shape()[1]);
        let expect = |name: &str, view: &TensorView, want: &[usize]| -> Result<()> {
            if view.shape() != want {
                return Err(bad(format!("tensor `{name}` has shape {:?}, expected {want:?}", view.shape())));
            }
            Ok(())
        };
        expect(TEXT_EMBEDDING, &text_emb, &[m, d])?;
        expect(IMAGE_LABELS, &image_labels, &[n, c])?;
        expect(TEXT_LABELS, &text_labels, &[m, c])?;
        if let Some(item) = &text_item {
            expect(TEXT_ITEM, item, &[m])?;
        }

        let f32s = |v: &TensorView| -> Vec<f32> {
            v.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
        };
        let set = EmbeddingSet {
            dim: d,
            num_labels: c,
            image_emb: f32s(&image_emb),
            image_labels: image_labels.data().to_vec(),
            text_emb: f32s(&text_emb),
            text_labels: text_labels.data().to_vec(),
            text_item: text_item
                .map(|v| v.data().chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()),
        };
        set.check().map_err(bad)?;
        Ok(set)
    }

    /// Writes the set as safetensors, atomically (`io::atomic_write`).
    pub fn save(&self, path: &Path) -> Result<()> {
        let le_f32 = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let image_emb = le_f32(&self.image_emb);
        let text_emb = le_f32(&self.text_emb);
        let item = self.text_item.as_ref().map(|v| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>());
        let (n, m, d, c) = (self.n_images(), self.n_texts(), self.dim, self.num_labels);
        let bad = |e: safetensors::SafeTensorError| Error::format(path, format!("cannot serialise embeddings: {e}"));
        let view = |dtype, shape: Vec<usize>, data| TensorView::new(dtype, shape, data).map_err(bad);
        let mut tensors = vec![
            (IMAGE_EMBEDDING, view(Dtype::F32, vec![n, d], &image_emb)?),
            (TEXT_EMBEDDING, view(Dtype::F32, vec![m, d], &text_emb)?),
            (IMAGE_LABELS, view(Dtype::U8, vec![n, c], &self.image_labels)?),
            (TEXT_LABELS, view(Dtype::U8, vec![m, c], &self.text_labels)?),
        ];
        if let Some(item) = &item {
            tensors.push((TEXT_ITEM, view(Dtype::U32, vec![m], item)?));
        }
        let meta = std::collections::BTreeMap::from([(WRITTEN_BY, WRITER.to_string())]);
        let bytes = crate::io::safetensors_bytes(tensors, &meta).map_err(|e| Error::format(path, e))?;
        crate::io::atomic_write(path, &bytes)
    }

    /// Whether `path` is an embeddings file semshare wrote (its metadata says so, and it loads):
    /// `score` reads any producer's, but `embed --force` replaces only its own.
    pub fn written_by_semshare(path: &Path) -> bool {
        let Ok(bytes) = crate::io::read(path) else { return false };
        let ours = SafeTensors::read_metadata(&bytes)
            .ok()
            .and_then(|(_, m)| m.metadata().as_ref().and_then(|m| m.get(WRITTEN_BY).cloned()))
            .is_some_and(|w| w == WRITER);
        ours && EmbeddingSet::parse(path, &bytes).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fresh path in the system temp folder (no tempfile crate).
    fn temp_path(tag: &str) -> PathBuf {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        std::env::temp_dir().join(format!("semshare-emb-{}-{n}-{tag}.safetensors", std::process::id()))
    }

    /// 2 images, D = 2, C = 3; with `item`, 3 texts paired by `text.item`, else 2 texts.
    fn sample(item: bool) -> EmbeddingSet {
        let m = if item { 3 } else { 2 };
        EmbeddingSet::new(
            vec![1.0, 0.0, 0.0, -2.5],
            vec![1, 0, 1, 0, 1, 0],
            vec![0.5, 0.5, 1.0, 0.0, -1.0, 3.0][..2 * m].to_vec(),
            vec![1, 1, 0, 0, 1, 0, 0, 0, 1][..3 * m].to_vec(),
            2,
            3,
            item.then(|| vec![1, 0, 1]),
        )
        .unwrap()
    }

    /// Writes raw tensors (name, dtype, shape, bytes) as a safetensors file.
    fn write_raw(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
        let views: Vec<(&str, TensorView)> =
            tensors.iter().map(|(n, dt, s, b)| (*n, TensorView::new(*dt, s.clone(), b).unwrap())).collect();
        std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// The tensors of a valid file with 2 images and 2 texts (D = 2, C = 2), no text.item.
    fn valid_raw() -> Vec<(&'static str, Dtype, Vec<usize>, Vec<u8>)> {
        vec![
            (IMAGE_EMBEDDING, Dtype::F32, vec![2, 2], f32_bytes(&[1.0, 0.0, 0.0, 1.0])),
            (TEXT_EMBEDDING, Dtype::F32, vec![2, 2], f32_bytes(&[1.0, 1.0, 0.0, 1.0])),
            (IMAGE_LABELS, Dtype::U8, vec![2, 2], vec![1, 0, 0, 1]),
            (TEXT_LABELS, Dtype::U8, vec![2, 2], vec![1, 0, 1, 1]),
        ]
    }

    fn load_err(path: &Path) -> String {
        let e = EmbeddingSet::load(path).unwrap_err().to_string();
        let _ = std::fs::remove_file(path);
        e
    }

    #[test]
    fn round_trip_with_and_without_text_item() {
        for item in [true, false] {
            let set = sample(item);
            let path = temp_path("roundtrip");
            set.save(&path).unwrap();
            let mut tmp = path.clone().into_os_string();
            tmp.push(".tmp");
            assert!(!Path::new(&tmp).exists(), "temporary file left behind");
            let back = EmbeddingSet::load(&path).unwrap();
            std::fs::remove_file(&path).unwrap();
            assert_eq!(back, set);
            assert_eq!(back.explicit_text_item().is_some(), item);
            if item {
                assert_eq!(&*back.text_item().unwrap(), &[1, 0, 1]);
                assert_eq!((back.n_images(), back.n_texts(), back.dim()), (2, 3, 2));
            } else {
                assert_eq!(&*back.text_item().unwrap(), &[0, 1]);
            }
            assert!(back.is_paired());
            assert!(back.evaluate(&crate::eval::EvalConfig::default()).is_ok());
        }
        // Saving over an existing file replaces it.
        let path = temp_path("overwrite");
        sample(false).save(&path).ok();
        sample(true).save(&path).unwrap();
        assert_eq!(EmbeddingSet::load(&path).unwrap(), sample(true));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn the_valid_raw_file_loads() {
        let path = temp_path("valid");
        write_raw(&path, &valid_raw());
        let set = EmbeddingSet::load(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(set.text_labels, vec![1, 0, 1, 1]);
        assert_eq!(set.text_emb, vec![1.0, 1.0, 0.0, 1.0]);
    }

    #[test]
    fn bad_files_are_errors_naming_the_tensor() {
        let check = |tag: &str, raw: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)>, needles: &[&str]| {
            let path = temp_path(tag);
            write_raw(&path, &raw);
            let e = load_err(&path);
            assert!(e.contains(&path.display().to_string()), "{tag}: {e}");
            for n in needles {
                assert!(e.contains(n), "{tag}: `{n}` not in: {e}");
            }
        };

        let mut raw = valid_raw();
        raw[0] = (IMAGE_EMBEDDING, Dtype::F64, vec![2, 1], f32_bytes(&[1.0, 0.0, 0.0, 1.0]));
        check("dtype", raw, &["image.embedding", "F64"]);

        let mut raw = valid_raw();
        raw[3].3 = vec![1, 0, 2, 1];
        check("label2", raw, &["text.labels", "row 1", "value 2"]);

        let mut raw = valid_raw();
        raw[1].3 = f32_bytes(&[1.0, 1.0, f32::NAN, 1.0]);
        check("nan", raw, &["text.embedding", "row 1", "NaN"]);

        let mut raw = valid_raw();
        raw.remove(2);
        check("missing", raw, &["missing tensor `image.labels`"]);

        let mut raw = valid_raw();
        raw[3] = (TEXT_LABELS, Dtype::U8, vec![2, 3], vec![0; 6]);
        check("labelshape", raw, &["text.labels", "[2, 3]", "[2, 2]"]);

        let mut raw = valid_raw();
        raw[2] = (IMAGE_LABELS, Dtype::U8, vec![3, 2], vec![0; 6]);
        check("labelrows", raw, &["image.labels", "[3, 2]", "[2, 2]"]);

        let mut raw = valid_raw();
        raw[1] = (TEXT_EMBEDDING, Dtype::F32, vec![2, 3], f32_bytes(&[0.0; 6]));
        check("dimmismatch", raw, &["text.embedding", "[2, 3]"]);

        let mut raw = valid_raw();
        raw.push((TEXT_ITEM, Dtype::U32, vec![2], [0u32, 2].iter().flat_map(|x| x.to_le_bytes()).collect()));
        check("item", raw, &["text.item", "row 1", "image 2"]);

        let mut raw = valid_raw();
        raw.push((TEXT_ITEM, Dtype::I64, vec![2], vec![0; 16]));
        check("itemdtype", raw, &["text.item", "I64"]);

        let mut raw = valid_raw();
        raw[0] = (IMAGE_EMBEDDING, Dtype::F32, vec![0, 2], vec![]);
        raw[2] = (IMAGE_LABELS, Dtype::U8, vec![0, 2], vec![]);
        check("empty", raw, &["image.embedding", "no rows"]);

        let mut raw = valid_raw();
        raw[0] = (IMAGE_EMBEDDING, Dtype::F32, vec![4], f32_bytes(&[0.0; 4]));
        check("rank", raw, &["image.embedding", "rank 2"]);
    }

    #[test]
    fn more_texts_than_images_without_text_item_is_unpaired() {
        let mut raw = valid_raw();
        raw[1] = (TEXT_EMBEDDING, Dtype::F32, vec![3, 2], f32_bytes(&[1.0, 1.0, 0.0, 1.0, 1.0, 0.0]));
        raw[3] = (TEXT_LABELS, Dtype::U8, vec![3, 2], vec![1, 0, 1, 1, 0, 1]);
        let path = temp_path("unpaired");
        write_raw(&path, &raw);
        let set = EmbeddingSet::load(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(!set.is_paired() && set.text_item().is_none());
        let report = set.evaluate(&EvalConfig::default()).unwrap();
        assert!(report.avg.recall.is_empty() && report.avg.ndcg_at(10).is_some(), "{report:?}");
        // Paired by a `text.item`, the same file gets R@K.
        let paired = EmbeddingSet { text_item: Some(vec![0, 1, 1]), ..set };
        assert!(paired.evaluate(&EvalConfig::default()).unwrap().avg.recall_at(1).is_some());
    }

    #[test]
    fn truncated_garbage_and_missing_files_are_errors() {
        let path = temp_path("good");
        sample(true).save(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        // Every truncation, every byte of header damage: an error, never a panic.
        for cut in [0, 1, 7, 8, 9, 20, bytes.len() / 2, bytes.len() - 1] {
            let p = temp_path("trunc");
            std::fs::write(&p, &bytes[..cut]).unwrap();
            let e = load_err(&p);
            assert!(e.contains("not a valid safetensors file"), "cut {cut}: {e}");
        }
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x5a;
            let p = temp_path("flip");
            std::fs::write(&p, &b).unwrap();
            let _ = EmbeddingSet::load(&p); // any Ok/Err, no panic
            std::fs::remove_file(&p).unwrap();
        }
        let p = temp_path("garbage");
        std::fs::write(&p, b"this is not a safetensors file at all").unwrap();
        let e = load_err(&p);
        assert!(e.contains("not a valid safetensors file") && e.contains("garbage"), "{e}");
        let p = temp_path("absent");
        let e = EmbeddingSet::load(&p).unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e}");
    }

    #[test]
    fn new_validates_like_load() {
        let e = EmbeddingSet::new(vec![1.0, f32::INFINITY], vec![1], vec![1.0, 0.0], vec![1], 2, 1, None);
        let e = e.unwrap_err().to_string();
        assert!(e.contains("image.embedding") && e.contains("row 0"), "{e}");
        let e = EmbeddingSet::new(vec![1.0, 0.0], vec![1], vec![1.0, 0.0], vec![1], 2, 1, Some(vec![1]));
        assert!(e.unwrap_err().to_string().contains("text.item"));
        let e = EmbeddingSet::new(vec![1.0, 0.0], vec![1], vec![1.0, 0.0], vec![1], 0, 1, None);
        assert!(e.is_err());
    }
}
