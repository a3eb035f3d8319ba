//! `synth --preset flickr-tags` (DESIGN.md §6): the real MIRFlickr-25K labels and tag texts
//! (`../shared/data/mirflickr25k`, DCMH's `LAll` and `YAll`) with synthetic regions.
//!
//! **Images.** [`synth::generate`](super::synth::generate) with the real label matrix (all rows, in file
//! order) and the `balanced` image knobs: each item's regions come from its own stream, keyed by
//! its MIRFlickr row, so an item has the same image in every split it is in.
//!
//! **Texts.** The tags of an item in `tags` column order (DCMH's `YAll` order, most frequent tag
//! first), token id = 3 + column; vocabulary `[PAD] [UNK] [MASK]` then the 1,386 tags of
//! `tags.txt`. T = 32 by default: the 11 items with more tags keep their 32 most frequent ones
//! ([`FlickrTags::truncated`] counts them).
//!
//! **Split (DCMH convention, seeded).** A permutation of the rows from `Rng::derive(seed, 0xF1C)`:
//! `test` = the first 2,000 (the queries), `database` = the other 18,015 (the retrieval set),
//! `train` = the first 10,000 of the database, `val` = the next 1,000 of the database (disjoint
//! from train and test; still in the retrieval set, as every non-query item is).

use std::fs;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors};

use super::dataset::{Dataset, Split};
use super::format::Layout;
use super::format::{Meta, RESERVED_TOKENS, one_per_line};
use super::synth::{SynthConfig, SynthPreset, generate};
use super::writer::{DatasetWriter, RawTensor};
use crate::rng::Rng;
use crate::{Error, Result};

/// The data file of the MIRFlickr-25K directory.
pub const DATA_FILE: &str = "mirflickr25k.safetensors";

/// Sizes and seed. Start from [`FlickrTagsConfig::new`].
#[derive(Clone, Debug, PartialEq)]
pub struct FlickrTagsConfig {
    pub seed: u64,
    /// Test queries (DCMH: 2,000); the other items are the retrieval set.
    pub queries: usize,
    /// Training items, the first of the retrieval set (DCMH: 10,000).
    pub train: usize,
    /// Validation items, the next of the retrieval set.
    pub val: usize,
    /// R, Dr, K_obj of the synthetic regions.
    pub regions: usize,
    pub feature_dim: usize,
    pub num_object_classes: usize,
    /// T: tags per text at most.
    pub max_tokens: usize,
}

impl FlickrTagsConfig {
    /// DCMH sizes (2,000 / 10,000, plus 1,000 validation items) and the `small` model's shapes
    /// (R = 36, Dr = 256, K_obj = 100), T = 32.
    pub fn new(seed: u64) -> Self {
        FlickrTagsConfig {
            seed,
            queries: 2000,
            train: 10_000,
            val: 1000,
            regions: 36,
            feature_dim: 256,
            num_object_classes: 100,
            max_tokens: 32,
        }
    }
}

/// The real data: labels [N, C] and bags of tags [N, K], 0/1, with their names.
#[derive(Clone, Debug, PartialEq)]
pub struct RealTags {
    pub labels: Vec<u8>,
    pub tags: Vec<u8>,
    pub label_names: Vec<String>,
    pub tag_names: Vec<String>,
}

impl RealTags {
    /// N.
    pub fn len(&self) -> usize {
        self.labels.len() / self.label_names.len().max(1)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads `mirflickr25k.safetensors` (`labels` u8 [N, C], `tags` u8 [N, K]), `labels.txt` and
    /// `tags.txt` from `dir`; every row needs ≥ 1 label and ≥ 1 tag.
    pub fn load(dir: impl AsRef<Path>) -> Result<RealTags> {
        let dir = dir.as_ref();
        let path = dir.join(DATA_FILE);
        let bytes = crate::io::read(&path)?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| Error::format(&path, format!("not safetensors: {e}")))?;
        let matrix = |name: &str| -> Result<(Vec<u8>, usize, usize)> {
            let v = st.tensor(name).map_err(|_| Error::format(&path, format!("tensor {name} missing")))?;
            match (v.dtype(), v.shape()) {
                (Dtype::U8, &[n, k]) if n > 0 && k > 0 => Ok((v.data().to_vec(), n, k)),
                (d, s) => Err(Error::format(&path, format!("tensor {name}: {d} {s:?}, expected U8 [N, K]"))),
            }
        };
        let (labels, n, c) = matrix("labels")?;
        let (tags, n_tags, k) = matrix("tags")?;
        if n_tags != n {
            return Err(Error::format(&path, format!("tensor tags has {n_tags} rows, labels {n}")));
        }
        for (name, m, w, what) in [("labels", &labels, c, "label"), ("tags", &tags, k, "tag")] {
            for (i, row) in m.chunks_exact(w).enumerate() {
                if let Some(j) = row.iter().position(|&x| x > 1) {
                    let msg = format!("tensor {name}, item {i}: {what} {j} has value {}, expected 0/1", row[j]);
                    return Err(Error::format(&path, msg));
                }
                if !row.contains(&1) {
                    return Err(Error::format(&path, format!("tensor {name}, item {i}: no {what}")));
                }
            }
        }
        let label_names = read_names(&dir.join("labels.txt"), c, "label columns")?;
        let tag_names = read_names(&dir.join("tags.txt"), k, "tag columns")?;
        Ok(RealTags { labels, tags, label_names, tag_names })
    }
}

fn read_names(path: &Path, want: usize, what: &str) -> Result<Vec<String>> {
    let text = crate::io::read_text(path, 256 << 20)?;
    let names: Vec<String> = text.lines().map(str::to_string).collect();
    if names.len() != want {
        return Err(Error::format(path, format!("{} lines for {want} {what}", names.len())));
    }
    Ok(names)
}

/// The four splits of [`generate_flickr_tags`].
#[derive(Clone, Debug, PartialEq)]
pub struct FlickrTags {
    pub meta: Meta,
    pub train: Split,
    pub val: Split,
    /// The queries.
    pub test: Split,
    /// The retrieval set for the test queries: every item that is not a query.
    pub database: Split,
    /// The MIRFlickr row of each image, per split, in the order of [`FlickrTags::splits`].
    pub rows: [Vec<usize>; 4],
    /// Items with more than T tags (their texts keep the first T).
    pub truncated: usize,
}

impl FlickrTags {
    /// The splits with their names: train, val, test, database.
    pub fn splits(&self) -> [(&'static str, &Split); 4] {
        [("train", &self.train), ("val", &self.val), ("test", &self.test), ("database", &self.database)]
    }

    /// The dataset without the database split, as [`Dataset::save`] writes it today.
    pub fn into_dataset(self) -> Dataset {
        Dataset { meta: self.meta, train: self.train, val: self.val, test: self.test }
    }

    /// Writes the dataset directory (docs/FORMAT.md), the `database` split included, so that
    /// `semshare eval --split test` ranks the retrieval set for the queries (the standard
    /// MIRFlickr protocol). Atomic like every dataset write.
    pub fn save(&self, dir: impl AsRef<Path>, shard_bytes: usize) -> Result<()> {
        let layout = Layout { meta: self.meta.clone(), text_feature_dim: 0 };
        let mut w = DatasetWriter::create(dir, layout, shard_bytes)?;
        for (name, split) in
            [("train", &self.train), ("val", &self.val), ("test", &self.test), ("database", &self.database)]
        {
            w.write_split(name, split)?;
        }
        w.finish().map(drop)
    }

    /// Writes a source directory for `semshare pack`: one safetensors file per split (database
    /// included), `labels.txt`, `vocab.txt` and `source.json`. Every file is written and synced
    /// beside its target first, so a full disk or a kill while they are written leaves the old
    /// directory as it was; then the old manifest goes, the files are renamed into place and
    /// the manifest last, so no manifest ever names a file of another write.
    pub fn save_source(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let m = &self.meta;
        let mut files = serde_json::Map::new();
        let mut staged = Vec::new();
        for (name, s) in self.splits() {
            let file = format!("{name}.safetensors");
            let path = dir.join(&file);
            let bytes = encode_source_file(name, s, m).map_err(|e| Error::format(&path, e))?;
            staged.push(crate::io::stage(&path, &bytes)?);
            files.insert(name.into(), serde_json::json!([file]));
        }
        staged.push(crate::io::stage(&dir.join("labels.txt"), one_per_line(&m.label_names).as_bytes())?);
        staged.push(crate::io::stage(&dir.join("vocab.txt"), one_per_line(&m.vocab).as_bytes())?);
        let doc = serde_json::json!({
            "format": "semshare-source",
            "version": 1,
            "name": m.name,
            "num_object_classes": m.num_object_classes,
            "splits": files,
            "written_by": crate::data::pack::SYNTH_WRITER,
        });
        let mut json = serde_json::to_string_pretty(&doc).expect("a JSON value serialises");
        json.push('\n');
        let manifest = dir.join("source.json");
        let new_manifest = crate::io::stage(&manifest, json.as_bytes())?;
        match fs::remove_file(&manifest) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::io(&manifest, e)),
            _ => {}
        }
        for file in staged {
            file.commit()?;
        }
        new_manifest.commit()
    }
}

/// Real labels and tags, synthetic regions, the seeded DCMH split (module docs).
pub fn generate_flickr_tags(cfg: &FlickrTagsConfig, real: &RealTags) -> Result<FlickrTags> {
    let n = real.len();
    let (c, k, t) = (real.label_names.len(), real.tag_names.len(), cfg.max_tokens);
    let used = cfg.queries.checked_add(cfg.train).and_then(|u| u.checked_add(cfg.val));
    if cfg.queries == 0 || cfg.train == 0 || used.is_none_or(|u| u > n) {
        let what = format!(
            "flickr-tags: queries {} + train {} + val {} must be ≥ 1 each (val ≥ 0) and fit the {n} items",
            cfg.queries, cfg.train, cfg.val
        );
        return Err(Error::config(what));
    }
    // Images of every row from the synthetic generator; its throwaway texts are one token long
    // over the smallest vocabulary it accepts (the images do not depend on the vocabulary).
    let images = SynthConfig {
        train: n,
        val: 0,
        test: 0,
        num_labels: c,
        regions: cfg.regions,
        feature_dim: cfg.feature_dim,
        max_tokens: 1,
        vocab_size: RESERVED_TOKENS.len() + c + 1,
        num_object_classes: cfg.num_object_classes,
        texts_per_image: 1,
        labels: Some(real.labels.clone()),
        ..SynthConfig::preset(SynthPreset::Balanced, cfg.seed)
    };
    if t == 0 || t > u16::MAX as usize {
        return Err(Error::config(format!("flickr-tags: max_tokens {t} outside 1..=65535")));
    }
    let mut all = generate(&images)?.train;
    all.text_tokens = vec![0; n * t];
    all.text_length = vec![0; n];
    let mut truncated = 0;
    for (i, row) in real.tags.chunks_exact(k).enumerate() {
        let ids = row.iter().enumerate().filter(|&(_, &x)| x == 1).map(|(j, _)| (RESERVED_TOKENS.len() + j) as u32);
        let mut len = 0;
        for (slot, id) in all.text_tokens[i * t..(i + 1) * t].iter_mut().zip(ids) {
            *slot = id;
            len += 1;
        }
        truncated += (row.iter().filter(|&&x| x == 1).count() > t) as usize;
        all.text_length[i] = len as u16;
    }

    let mut perm: Vec<usize> = (0..n).collect();
    Rng::derive(cfg.seed, 0xF1C).shuffle(&mut perm);
    let (test_rows, database_rows) = perm.split_at(cfg.queries);
    let train_rows = &database_rows[..cfg.train];
    let val_rows = &database_rows[cfg.train..cfg.train + cfg.val];

    let mut vocab: Vec<String> = RESERVED_TOKENS.iter().map(|s| s.to_string()).collect();
    vocab.extend(real.tag_names.iter().cloned());
    let meta = Meta {
        name: format!("flickr-tags-{}", cfg.seed),
        regions: cfg.regions,
        feature_dim: cfg.feature_dim,
        max_tokens: t,
        num_labels: c,
        num_object_classes: cfg.num_object_classes,
        vocab,
        label_names: real.label_names.clone(),
    };
    // Every split is a subset of `all`: validating it (names, vocabulary, every tensor) once
    // validates them all.
    let ds = Dataset { meta, train: all, val: Split::default(), test: Split::default() };
    ds.validate()?;
    let Dataset { meta, train: all, .. } = ds;
    Ok(FlickrTags {
        meta,
        train: all.subset(train_rows),
        val: all.subset(val_rows),
        test: all.subset(test_rows),
        database: all.subset(database_rows),
        rows: [train_rows.to_vec(), val_rows.to_vec(), test_rows.to_vec(), database_rows.to_vec()],
        truncated,
    })
}

// ---------------------------------------------------------------------------------------------
// Source-file encoding (the tensors of src/data/dataset.rs, one file per split)

fn le<T: Copy, const B: usize>(v: &[T], f: impl Fn(T) -> [u8; B]) -> Vec<u8> {
    v.iter().flat_map(|&x| f(x)).collect()
}

fn encode_source_file(split: &str, s: &Split, m: &Meta) -> std::result::Result<Vec<u8>, String> {
    let (n, nt) = (s.num_images(), s.num_texts());
    let (r, dr, t, c) = (m.regions, m.feature_dim, m.max_tokens, m.num_labels);
    let own = |dtype, shape: Vec<usize>, data| RawTensor { dtype, shape, data };
    let mut tensors = vec![
        ("image.features", own(Dtype::F32, vec![n, r, dr], le(&s.image_features, f32::to_le_bytes))),
        ("image.boxes", own(Dtype::F32, vec![n, r, 5], le(&s.image_boxes, f32::to_le_bytes))),
        ("image.count", own(Dtype::U16, vec![n], le(&s.image_count, u16::to_le_bytes))),
        ("text.tokens", own(Dtype::U32, vec![nt, t], le(&s.text_tokens, u32::to_le_bytes))),
        ("text.length", own(Dtype::U16, vec![nt], le(&s.text_length, u16::to_le_bytes))),
        ("labels", own(Dtype::U8, vec![n, c], s.labels.clone())),
    ];
    if let Some(cls) = &s.image_classes {
        tensors.push(("image.classes", own(Dtype::U16, vec![n, r], le(cls, u16::to_le_bytes))));
    }
    let info = std::collections::BTreeMap::from([("format", "semshare-source".to_string()), ("split", split.into())]);
    crate::io::safetensors_bytes(tensors.iter().map(|(k, v)| (*k, v)), &info)
        .map_err(|e| format!("cannot encode split {split}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A MIRFlickr-like directory: `n` items, `c` labels, `k` tags, written like the real one.
    pub(crate) fn fake_dir(dir: &Path, n: usize, c: usize, k: usize, seed: u64) -> RealTags {
        let mut rng = Rng::new(seed);
        let mut matrix = |w: usize, p: f64| -> Vec<u8> {
            let mut m: Vec<u8> = (0..n * w).map(|_| rng.bernoulli(p) as u8).collect();
            for i in 0..n {
                let j = rng.below(w);
                m[i * w + j] = 1;
            }
            m
        };
        let (labels, tags) = (matrix(c, 0.3), matrix(k, 0.5));
        let real = RealTags {
            labels,
            tags,
            label_names: (0..c).map(|j| format!("concept{j}")).collect(),
            tag_names: (0..k).map(|j| format!("tag{j}")).collect(),
        };
        write_real(dir, &real);
        real
    }

    pub(crate) fn write_real(dir: &Path, real: &RealTags) {
        fs::create_dir_all(dir).unwrap();
        let (n, c, k) = (real.len(), real.label_names.len(), real.tag_names.len());
        let t = [
            ("labels", RawTensor { dtype: Dtype::U8, shape: vec![n, c], data: real.labels.clone() }),
            ("tags", RawTensor { dtype: Dtype::U8, shape: vec![n, k], data: real.tags.clone() }),
        ];
        let bytes = safetensors::tensor::serialize(t.iter().map(|(k, v)| (*k, v)), None).unwrap();
        fs::write(dir.join(DATA_FILE), bytes).unwrap();
        fs::write(dir.join("labels.txt"), real.label_names.join("\n") + "\n").unwrap();
        fs::write(dir.join("tags.txt"), real.tag_names.join("\n") + "\n").unwrap();
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("semshare-flickr-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    /// Everything the split promises, checked against the real matrices row by row.
    fn check_against(real: &RealTags, cfg: &FlickrTagsConfig, ft: &FlickrTags) {
        let (n, c, k, t) = (real.len(), real.label_names.len(), real.tag_names.len(), cfg.max_tokens);
        let [train, val, test, database] = &ft.rows;
        assert_eq!(
            [train.len(), val.len(), test.len(), database.len()],
            [cfg.train, cfg.val, cfg.queries, n - cfg.queries]
        );
        let mut all: Vec<usize> = test.iter().chain(database).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..n).collect::<Vec<_>>(), "queries and retrieval set partition the items");
        assert_eq!(&database[..cfg.train], &train[..], "train = the first of the retrieval set");
        assert_eq!(&database[cfg.train..cfg.train + cfg.val], &val[..], "val = the next of the retrieval set");
        let mut truncated = 0;
        for ((name, s), rows) in ft.splits().into_iter().zip(&ft.rows) {
            assert_eq!(s.num_images(), rows.len(), "{name}");
            assert_eq!(s.num_texts(), rows.len(), "{name}");
            for (i, &row) in rows.iter().enumerate() {
                assert_eq!(s.labels[i * c..(i + 1) * c], real.labels[row * c..(row + 1) * c], "{name} item {i}");
                let cols: Vec<u32> = (0..k).filter(|&j| real.tags[row * k + j] == 1).map(|j| (3 + j) as u32).collect();
                let len = cols.len().min(t);
                let mut want = cols[..len].to_vec();
                want.resize(t, 0);
                assert_eq!(s.text_tokens[i * t..(i + 1) * t], want[..], "{name} item {i} (row {row})");
                assert_eq!(s.text_length[i] as usize, len);
                assert_eq!(s.text_item[i] as usize, i);
                if name == "database" {
                    truncated += (cols.len() > t) as usize;
                }
            }
        }
        for &row in test {
            truncated += ((0..k).filter(|&j| real.tags[row * k + j] == 1).count() > t) as usize;
        }
        assert_eq!(ft.truncated, truncated);
        // An item has one image wherever it appears: train is the head of the database.
        let per = cfg.regions * cfg.feature_dim;
        assert_eq!(ft.train.image_features, ft.database.image_features[..cfg.train * per]);
        assert_eq!(ft.meta.vocab.len(), 3 + k);
        assert_eq!(ft.meta.vocab[3..], real.tag_names[..]);
        assert_eq!(ft.meta.label_names, real.label_names);
    }

    fn small(seed: u64) -> FlickrTagsConfig {
        FlickrTagsConfig {
            queries: 8,
            train: 20,
            val: 5,
            regions: 3,
            feature_dim: 4,
            num_object_classes: 7,
            max_tokens: 3,
            ..FlickrTagsConfig::new(seed)
        }
    }

    #[test]
    fn fake_directory_splits_labels_tokens_and_determinism() {
        let dir = tmp("fake");
        let real = fake_dir(&dir, 40, 3, 6, 1);
        let loaded = RealTags::load(&dir).unwrap();
        assert_eq!(loaded, real);
        let cfg = small(5);
        let a = generate_flickr_tags(&cfg, &real).unwrap();
        check_against(&real, &cfg, &a);
        assert!(a.truncated > 0, "T = 3 with ~3.5 tags per item truncates some texts");
        assert_eq!(generate_flickr_tags(&cfg, &real).unwrap(), a, "same seed, same data");
        let b = generate_flickr_tags(&small(6), &real).unwrap();
        assert!(b.rows[2] != a.rows[2], "another seed, another split");
        assert!(b.test.image_features != a.test.image_features);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn writes_a_dataset_and_a_source_directory() {
        let dir = tmp("write");
        let real = fake_dir(&dir.join("real"), 40, 3, 6, 2);
        let ft = generate_flickr_tags(&small(1), &real).unwrap();
        ft.save_source(dir.join("src")).unwrap();
        let doc: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(dir.join("src/source.json")).unwrap()).unwrap();
        assert_eq!(doc["format"], "semshare-source");
        assert_eq!(doc["version"], 1);
        assert_eq!(doc["num_object_classes"], 7);
        assert_eq!(doc["splits"]["database"][0], "database.safetensors");
        let vocab = fs::read_to_string(dir.join("src/vocab.txt")).unwrap();
        assert_eq!(vocab, "[PAD]\n[UNK]\n[MASK]\ntag0\ntag1\ntag2\ntag3\ntag4\ntag5\n");
        for (name, s) in ft.splits() {
            let bytes = fs::read(dir.join(format!("src/{name}.safetensors"))).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            let get = |t: &str| st.tensor(t).unwrap();
            assert_eq!(get("image.features").shape(), [s.num_images(), 3, 4]);
            assert_eq!(get("image.features").data(), le(&s.image_features, f32::to_le_bytes));
            assert_eq!(get("text.tokens").dtype(), Dtype::U32);
            assert_eq!(get("text.tokens").data(), le(&s.text_tokens, u32::to_le_bytes));
            assert_eq!(get("labels").data(), &s.labels[..]);
            assert_eq!(get("image.classes").shape(), [s.num_images(), 3]);
            assert!(st.tensor("text.item").is_err(), "one text per image: text.item omitted");
        }
        let no_temp =
            fs::read_dir(dir.join("src")).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().starts_with('.'));
        assert!(no_temp);

        let (test, val) = (ft.test.clone(), ft.val.clone());
        ft.into_dataset().save(dir.join("ds")).unwrap();
        let back = Dataset::load(dir.join("ds")).unwrap();
        assert!(back.test == test && back.val == val);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_inputs_are_errors_naming_the_file_and_item() {
        let dir = tmp("bad");
        let real = fake_dir(&dir, 12, 2, 4, 3);
        let e = RealTags::load(dir.join("missing")).unwrap_err().to_string();
        assert!(e.contains("missing") && e.contains(DATA_FILE), "{e}");

        let mut no_tag = real.clone();
        no_tag.tags[5 * 4..6 * 4].fill(0);
        write_real(&dir, &no_tag);
        let e = RealTags::load(&dir).unwrap_err().to_string();
        assert!(e.contains(DATA_FILE) && e.contains("tensor tags, item 5: no tag"), "{e}");

        let mut two = real.clone();
        two.labels[7 * 2 + 1] = 2;
        write_real(&dir, &two);
        let e = RealTags::load(&dir).unwrap_err().to_string();
        assert!(e.contains("tensor labels, item 7: label 1 has value 2"), "{e}");

        write_real(&dir, &real);
        fs::write(dir.join("tags.txt"), "a\nb\n").unwrap();
        let e = RealTags::load(&dir).unwrap_err().to_string();
        assert!(e.contains("tags.txt") && e.contains("2 lines for 4 tag columns"), "{e}");
        fs::write(dir.join(DATA_FILE), b"\x08\0\0\0\0\0\0\0{}").unwrap();
        let e = RealTags::load(&dir).unwrap_err().to_string();
        assert!(e.contains(DATA_FILE), "{e}");

        let too_big = FlickrTagsConfig { queries: 5, train: 6, val: 2, ..small(1) };
        let e = generate_flickr_tags(&too_big, &real).unwrap_err().to_string();
        assert!(e.contains("fit the 12 items"), "{e}");
        let mut dup = real.clone();
        dup.tag_names[3] = "tag0".into();
        let e = generate_flickr_tags(&FlickrTagsConfig { queries: 2, train: 4, val: 1, ..small(1) }, &dup)
            .unwrap_err()
            .to_string();
        assert!(e.contains("duplicate"), "{e}");
        let _ = fs::remove_dir_all(&dir);
    }

    /// The real MIRFlickr-25K directory beside the repository (or `$SEMSHARE_MIRFLICKR`).
    fn real_dir() -> Option<PathBuf> {
        let dir = std::env::var_os("SEMSHARE_MIRFLICKR")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/mirflickr25k"));
        if dir.join(DATA_FILE).is_file() {
            Some(dir)
        } else {
            println!("skipped: no MIRFlickr-25K data at {} (set SEMSHARE_MIRFLICKR)", dir.display());
            None
        }
    }

    #[test]
    fn real_mirflickr_standard_split() {
        let Some(dir) = real_dir() else { return };
        let real = RealTags::load(&dir).unwrap();
        assert_eq!((real.len(), real.label_names.len(), real.tag_names.len()), (20015, 24, 1386));
        // Tiny regions: the test is about labels, texts and the split, not about features.
        let cfg = FlickrTagsConfig { regions: 2, feature_dim: 3, ..FlickrTagsConfig::new(11) };
        let a = generate_flickr_tags(&cfg, &real).unwrap();
        check_against(&real, &cfg, &a);
        assert_eq!([a.train.num_images(), a.val.num_images(), a.test.num_images()], [10_000, 1000, 2000]);
        assert_eq!(a.database.num_images(), 18_015);
        assert_eq!(a.truncated, 11, "items with more than 32 of the 1,386 tags (README: at most 57)");
        assert_eq!(a.meta.vocab[3], "explore");
        let b = generate_flickr_tags(&cfg, &real).unwrap();
        assert!(a == b, "same seed, same data");
        let c = generate_flickr_tags(&FlickrTagsConfig { seed: 12, ..cfg }, &real).unwrap();
        assert!(c.rows[2] != a.rows[2]);
    }
}
