//! The on-disk data path end to end (docs/FORMAT.md): a source directory packed into shards,
//! checked, read back through the memory-mapped reader, trained on and evaluated (database
//! split, text features); the loader; `semshare check` on broken datasets; hostile shards.

mod common;
use common::tiny_model;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use proptest::prelude::*;
use safetensors::tensor::Dtype;
use semshare::backend::cpu::Cpu;
use semshare::data::format::{FeatureDtype, Layout, reserved_vocab};
use semshare::data::loader::Loader;
use semshare::data::pack::pack;
use semshare::data::reader::DatasetReader;
use semshare::data::writer::{DatasetWriter, ImageRecord, RawTensor, TextRecord};
use semshare::data::{Meta, checksum::checksum};
use semshare::eval::EvalConfig;
use semshare::inference::evaluate_split;
use semshare::model::EmbeddingKind;
use semshare::rng::Rng;
use semshare::train::{RunOptions, TrainConfig, train};

const R: usize = 4;
const DR: usize = 8;
const T: usize = 6;
const C: usize = 3;
const DT: usize = 5;
const VOCAB: usize = 20;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("semshare-data-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

fn f16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect()
}
fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect()
}
fn le<T: Copy, const K: usize>(v: &[T], f: impl Fn(T) -> [u8; K]) -> Vec<u8> {
    v.iter().flat_map(|&x| f(x)).collect()
}

/// A source file of `n` images with two texts each: f16 regions, tokens or bf16 text features.
fn source_file(path: &Path, n: usize, seed: u64, text_features: bool) {
    source_file_shaped(path, n, seed, text_features, R, T);
}

/// The same with `r` region slots and `t` text segment slots (1 and 1: global items).
fn source_file_shaped(path: &Path, n: usize, seed: u64, text_features: bool, r: usize, t: usize) {
    let mut rng = Rng::new(seed);
    let m = 2 * n;
    let feats: Vec<f32> = (0..n * r * DR).map(|_| rng.normal() as f32).collect();
    let mut boxes = Vec::new();
    for _ in 0..n * r {
        let (x1, y1) = (rng.uniform() * 0.5, rng.uniform() * 0.5);
        let (x2, y2) = (x1 + 0.3, y1 + 0.2);
        boxes.extend([x1, y1, x2, y2, (x2 - x1) * (y2 - y1)].map(|v| v as f32));
    }
    let count: Vec<u16> = (0..n).map(|_| 1 + rng.below(r) as u16).collect();
    let classes: Vec<u16> = (0..n * r).map(|_| rng.below(7) as u16).collect();
    let mut labels = vec![0u8; n * C];
    for i in 0..n {
        labels[i * C + rng.below(C)] = 1;
        labels[i * C + rng.below(C)] = 1;
    }
    let length: Vec<u16> = (0..m).map(|_| 1 + rng.below(t) as u16).collect();
    let item: Vec<u32> = (0..m as u32).map(|j| j / 2).collect();
    let mut tensors = vec![
        ("image.features", RawTensor { dtype: Dtype::F16, shape: vec![n, r, DR], data: f16_bytes(&feats) }),
        ("image.boxes", RawTensor { dtype: Dtype::F32, shape: vec![n, r, 5], data: le(&boxes, f32::to_le_bytes) }),
        ("image.count", RawTensor { dtype: Dtype::U16, shape: vec![n], data: le(&count, u16::to_le_bytes) }),
        ("image.classes", RawTensor { dtype: Dtype::U16, shape: vec![n, r], data: le(&classes, u16::to_le_bytes) }),
        ("text.length", RawTensor { dtype: Dtype::U16, shape: vec![m], data: le(&length, u16::to_le_bytes) }),
        ("text.item", RawTensor { dtype: Dtype::U32, shape: vec![m], data: le(&item, u32::to_le_bytes) }),
        ("labels", RawTensor { dtype: Dtype::U8, shape: vec![n, C], data: labels }),
    ];
    if text_features {
        let f: Vec<f32> = (0..m * t * DT).map(|_| rng.normal() as f32).collect();
        tensors.push(("text.features", RawTensor { dtype: Dtype::BF16, shape: vec![m, t, DT], data: bf16_bytes(&f) }));
    } else {
        let mut tokens = vec![0u32; m * t];
        for j in 0..m {
            for p in 0..length[j] as usize {
                tokens[j * t + p] = 3 + rng.below(VOCAB - 3) as u32;
            }
        }
        tensors.push((
            "text.tokens",
            RawTensor { dtype: Dtype::U32, shape: vec![m, t], data: le(&tokens, u32::to_le_bytes) },
        ));
    }
    let bytes = safetensors::tensor::serialize(tensors.iter().map(|(k, v)| (*k, v)), None).unwrap();
    fs::write(path, bytes).unwrap();
}

/// A source directory: train in two files, val, test and (optionally) a database.
fn source_dir(name: &str, text_features: bool, database: bool) -> PathBuf {
    source_dir_shaped(name, text_features, database, R, T)
}

fn source_dir_shaped(name: &str, text_features: bool, database: bool, r: usize, t: usize) -> PathBuf {
    let source_file = |p: &Path, n, seed, tf| source_file_shaped(p, n, seed, tf, r, t);
    let dir = tmp(name);
    let mut splits = serde_json::json!({
        "train": ["train-a.safetensors", "train-b.safetensors"],
        "val": ["val.safetensors"],
        "test": ["test.safetensors"],
    });
    source_file(&dir.join("train-a.safetensors"), 24, 1, text_features);
    source_file(&dir.join("train-b.safetensors"), 16, 2, text_features);
    source_file(&dir.join("val.safetensors"), 8, 3, text_features);
    source_file(&dir.join("test.safetensors"), 6, 4, text_features);
    if database {
        source_file(&dir.join("db.safetensors"), 20, 5, text_features);
        splits["database"] = serde_json::json!(["db.safetensors"]);
    }
    let source = serde_json::json!({"format": "semshare-source", "version": 1, "name": name, "splits": splits});
    fs::write(dir.join("source.json"), source.to_string()).unwrap();
    fs::write(dir.join("labels.txt"), "sky\nsea\ndog\n").unwrap();
    if !text_features {
        let mut vocab: Vec<String> = reserved_vocab();
        vocab.extend((3..VOCAB).map(|i| format!("w{i}")));
        fs::write(dir.join("vocab.txt"), vocab.join("\n") + "\n").unwrap();
    }
    dir
}

/// Packs, checks, trains 4 steps and evaluates `test`.
fn pack_train_eval(name: &str, text_features: bool, database: bool) -> (Arc<DatasetReader>, semshare::eval::Report) {
    pack_train_eval_shaped(name, text_features, database, R, T)
}

fn pack_train_eval_shaped(
    name: &str,
    text_features: bool,
    database: bool,
    r: usize,
    t: usize,
) -> (Arc<DatasetReader>, semshare::eval::Report) {
    let src = source_dir_shaped(name, text_features, database, r, t);
    let out = src.join("packed");
    let summary = pack(&src, &out, 3000 * r / R).unwrap();
    let data = Arc::new(DatasetReader::open(&out).unwrap());
    assert!(data.check(10).is_empty(), "{:?}", data.check(10));
    let train_split = data.split("train").unwrap();
    assert_eq!((train_split.num_images(), train_split.num_texts()), (40, 80));
    assert!(train_split.shards.len() > 2, "small shards: {:?}", summary.splits);
    assert_eq!(data.database().is_some(), database);
    assert_eq!(data.meta().num_object_classes, 7, "inferred as the largest class + 1");

    let model = tiny_model(&data);
    let cfg = TrainConfig { steps: 4, batch_size: 8, eval_every: 0, warmup: 1, ..TrainConfig::default() };
    let run = RunOptions::new(src.join("run"));
    let s = train(&mut Cpu::new(), &data, &model, &cfg, &run).unwrap();
    assert!(s.losses.iter().all(|l| l.is_finite()) && s.losses.len() == 4);
    let net = semshare::model::SemShare::new(&model).unwrap();
    let mut dev = Cpu::new();
    let params = net.store.upload(&mut dev, &net.store.init_values(0)).unwrap();
    let report =
        evaluate_split(&mut dev, &net, &params, &data, "test", EmbeddingKind::Pooled, &EvalConfig::default()).unwrap();
    (data, report)
}

#[test]
fn packed_shards_read_back_the_source_values() {
    let src = source_dir("values", false, false);
    let out = src.join("packed");
    pack(&src, &out, 2500).unwrap();
    let data = DatasetReader::open(&out).unwrap();
    let split = data.split("train").unwrap();
    // Image 30 is image 6 of the second source file: same f16 bytes, widened identically.
    let bytes = fs::read(src.join("train-b.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let want = &st.tensor("image.features").unwrap().data()[6 * R * DR * 2..7 * R * DR * 2];
    let (shard, k) = split.locate_image(30);
    assert_eq!(shard.feature_bytes(k), want);
    assert_eq!(shard.feature_dtype(), FeatureDtype::F16);
    let mut widened = Vec::new();
    FeatureDtype::F16.widen_into(want, &mut widened);
    let slow: Vec<f32> = want.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect();
    assert_eq!(widened, slow);
    // Texts stay with their image across shard boundaries.
    for j in 0..split.num_texts() {
        assert_eq!(split.text_image(j), j / 2);
    }
}

#[test]
fn test_queries_rank_the_database_when_there_is_one() {
    let (data, report) = pack_train_eval("database", false, true);
    assert_eq!(data.database().unwrap().num_images(), 20);
    assert!(report.i2t.recall.is_empty(), "no paired items across query and gallery");
    let ndcg = report.avg.ndcg_at(10).unwrap();
    assert!(ndcg > 0.0 && ndcg <= 100.0, "{ndcg}");
    // Without a database, R@K of the paired item is reported within the split.
    let (_, within) = pack_train_eval("no-database", false, false);
    assert!(!within.i2t.recall.is_empty());
}

#[test]
fn texts_as_segment_features_train_and_evaluate() {
    let (data, report) = pack_train_eval("text-features", true, false);
    assert_eq!(data.layout.text_feature_dim, DT);
    assert_eq!(data.split("train").unwrap().text_dtype(), Some(FeatureDtype::BF16));
    assert!(report.avg.map_all > 0.0);
}

/// Global items in both modalities: one region per image, one segment per text.
#[test]
fn global_items_train_and_evaluate() {
    let (data, report) = pack_train_eval_shaped("global", true, true, 1, 1);
    assert_eq!((data.meta().regions, data.meta().max_tokens), (1, 1));
    assert!(report.avg.ndcg_at(10).unwrap() > 0.0);
}

#[test]
fn pack_refuses_bad_sources_and_leaves_nothing_behind() {
    let src = source_dir("refuse", false, false);
    let out = src.join("packed");
    pack(&src, &out, 1 << 20).unwrap();
    let before = fs::read(out.join("dataset.json")).unwrap();
    // A token id ≥ V in the last file: found, named, and the old dataset stays as it was.
    fs::write(src.join("vocab.txt"), "[PAD]\n[UNK]\n[MASK]\nw3\n").unwrap();
    let e = pack(&src, &out, 1 << 20).unwrap_err().to_string();
    assert!(e.contains("train-a.safetensors") && e.contains("text.tokens") && e.contains("item"), "{e}");
    assert_eq!(fs::read(out.join("dataset.json")).unwrap(), before);
    let leftovers: Vec<_> =
        fs::read_dir(&src).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().starts_with('.')).collect();
    assert!(leftovers.is_empty(), "temporary directories left: {leftovers:?}");
    // Shapes that disagree between files name the file.
    source_file(&src.join("val.safetensors"), 8, 3, true);
    let e = pack(&src, &out, 1 << 20).unwrap_err().to_string();
    assert!(e.contains("val.safetensors"), "{e}");
}

/// A dataset written straight through the writer (no content checks on the way), with a NaN
/// at image `nan_item`, region 0, of the only train shard.
fn dataset_with_nan(name: &str, nan_item: usize) -> PathBuf {
    let dir = tmp(name);
    let mut vocab = reserved_vocab();
    vocab.extend((3..VOCAB).map(|i| format!("w{i}")));
    let meta = Meta {
        name: name.into(),
        regions: R,
        feature_dim: DR,
        max_tokens: T,
        num_labels: C,
        num_object_classes: 0,
        vocab,
        label_names: vec!["a".into(), "b".into(), "c".into()],
    };
    let out = dir.join("data");
    let mut w = DatasetWriter::create(&out, Layout { meta, text_feature_dim: 0 }, usize::MAX).unwrap();
    let boxes: Vec<u8> = le(&[0.1f32, 0.1, 0.5, 0.5, 0.16].repeat(R), f32::to_le_bytes);
    let tokens: Vec<u8> = le(&[5u32, 6, 0, 0, 0, 0], u32::to_le_bytes);
    for split in ["train", "val", "test"] {
        w.begin_split(split).unwrap();
        for i in 0..12 {
            let mut f = vec![0.25f32; R * DR];
            if split == "train" && i == nan_item {
                f[3] = f32::NAN;
            }
            let image = ImageRecord {
                features: &le(&f, f32::to_le_bytes),
                feature_dtype: FeatureDtype::F32,
                boxes: &boxes,
                count: 2,
                classes: None,
                labels: &[1, 0, (i % 2) as u8],
            };
            w.push(&image, &[TextRecord { content: &tokens, dtype: None, length: 2 }]).unwrap();
        }
    }
    w.finish().unwrap();
    out
}

#[test]
fn the_loader_is_seeded_bounded_and_passes_errors_on() {
    let out = dataset_with_nan("loader", 9);
    let data = Arc::new(DatasetReader::open(&out).unwrap());
    // Steps 0 and 1 (4 images of 12 each) may or may not reach image 9: compare two runs.
    let collect = |seed| {
        let mut l = Loader::new(Arc::clone(&data), "val", 4, seed, 0..6, 2).unwrap();
        let mut labels = Vec::new();
        while let Some(b) = l.next_batch() {
            let b = b.unwrap();
            assert_eq!(b.images.lengths, vec![2; 4]);
            labels.push(b.images.labels.clone());
        }
        labels
    };
    assert_eq!(collect(7), collect(7));
    assert_eq!(collect(7).len(), 6);
    assert_ne!(collect(7), collect(8), "the seed changes the order");
    // Dropped with batches still queued: the thread stops and is joined (no hang).
    let mut l = Loader::new(Arc::clone(&data), "val", 4, 1, 0..1000, 3).unwrap();
    drop(l.next_batch());
    drop(l);
    // One epoch of train covers image 9: the NaN comes back as an error naming file and item.
    let mut l = Loader::new(Arc::clone(&data), "train", 4, 3, 0..3, 2).unwrap();
    let mut errors = Vec::new();
    while let Some(b) = l.next_batch() {
        if let Err(e) = b {
            errors.push(e.to_string());
        }
    }
    assert_eq!(errors.len(), 1, "{errors:?}");
    let e = &errors[0];
    assert!(
        e.contains("train-00000.safetensors")
            && e.contains("image.features")
            && e.contains("item 9")
            && e.contains("NaN"),
        "{e}"
    );
}

fn semshare(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_semshare")).args(args).output().expect("the binary runs")
}

/// The acceptance test of the issue: `semshare check` names the NaN's item and the truncated
/// shard's file, and both exit non-zero.
#[test]
fn check_names_the_nan_item_and_the_truncated_file() {
    let out = dataset_with_nan("check", 5);
    let run = semshare(&["check", out.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("train-00000.safetensors: tensor image.features, item 5: non-finite value NaN"),
        "{stderr}"
    );

    let shard = out.join("val-00000.safetensors");
    let bytes = fs::read(&shard).unwrap();
    fs::write(&shard, &bytes[..bytes.len() - 100]).unwrap();
    let run = semshare(&["check", out.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("val-00000.safetensors") && stderr.contains("truncated"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    // And a clean dataset passes, through `pack` from the command line.
    let src = source_dir("check-clean", false, true);
    let packed = src.join("packed");
    let run =
        semshare(&["pack", "--from", src.to_str().unwrap(), "--out", packed.to_str().unwrap(), "--shard-mb", "1"]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let run = semshare(&["check", packed.to_str().unwrap()]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert!(String::from_utf8_lossy(&run.stdout).contains("database 20/40"));

    // Train and evaluate from the command line: test queries against the database.
    let (packed, run_dir) = (packed.to_str().unwrap(), src.join("run"));
    let run_dir = run_dir.to_str().unwrap();
    let run =
        semshare(&["train", "--data", packed, "--steps", "3", "--batch", "8", "--out", run_dir, "--device", "cpu"]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let ckpt = format!("{run_dir}/best.safetensors");
    let run = semshare(&["eval", "--data", packed, "--checkpoint", &ckpt, "--device", "cpu"]);
    let table = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert!(table.contains("NDCG@500") && !table.contains("R@1"), "{table}");
}

// ---------------------------------------------------------------------------------------------
// Hostile shards: any corruption is an error from open or check, never a panic.

/// Open and fully check; Ok(()) only if the dataset is accepted as is.
fn open_and_check(dir: &Path) -> Result<(), String> {
    let data = DatasetReader::open(dir).map_err(|e| e.to_string())?;
    match data.check(1).into_iter().next() {
        Some(e) => Err(e.to_string()),
        None => Ok(()),
    }
}

/// A packed dataset and the bytes of its first test shard.
fn hostile_base(tag: &str) -> (PathBuf, PathBuf, Vec<u8>) {
    let src = source_dir(tag, false, false);
    let out = src.join("packed");
    pack(&src, &out, 1 << 20).unwrap();
    let shard = out.join("test-00000.safetensors");
    let bytes = fs::read(&shard).unwrap();
    (out, shard, bytes)
}

/// Writes `bytes` as the shard, resealing the manifest's size and checksum so the corruption
/// itself must be found (not just the checksum).
fn install(out: &Path, shard: &Path, bytes: &[u8], reseal: bool) {
    fs::write(shard, bytes).unwrap();
    if reseal {
        let mpath = out.join("dataset.json");
        let mut man: serde_json::Value = serde_json::from_str(&fs::read_to_string(&mpath).unwrap()).unwrap();
        man["splits"]["test"][0]["bytes"] = bytes.len().into();
        man["splits"]["test"][0]["checksum"] = format!("fnv1a64x4:{:016x}", checksum(bytes)).into();
        fs::write(&mpath, man.to_string()).unwrap();
    }
}

fn header(bytes: &[u8]) -> (usize, String) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (n, String::from_utf8(bytes[8..8 + n].to_vec()).unwrap())
}

/// Replaces the header JSON (keeping the data section), fixing the length prefix.
fn with_header(bytes: &[u8], new: &str) -> Vec<u8> {
    let (n, _) = header(bytes);
    let mut out = (new.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(new.as_bytes());
    out.extend_from_slice(&bytes[8 + n..]);
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn truncation_anywhere_is_an_error(frac in 0.0f64..1.0, reseal: bool) {
        let (out, shard, bytes) = hostile_base("trunc");
        let cut = ((frac * bytes.len() as f64) as usize).min(bytes.len() - 1);
        install(&out, &shard, &bytes[..cut], reseal);
        let e = open_and_check(&out).unwrap_err();
        prop_assert!(e.contains("test-00000.safetensors"), "{}", e);
    }

    #[test]
    fn flipped_bytes_are_found(pos_frac in 0.0f64..1.0, bit in 0u8..8, in_header: bool) {
        let (out, shard, mut bytes) = hostile_base("flip");
        let (n, _) = header(&bytes);
        let pos = if in_header { (pos_frac * (8 + n) as f64) as usize } else { 8 + n + (pos_frac * (bytes.len() - 8 - n) as f64) as usize };
        let pos = pos.min(bytes.len() - 1);
        bytes[pos] ^= 1 << bit;
        install(&out, &shard, &bytes, false);
        // Without resealing, the checksum alone must catch what the structure does not.
        prop_assert!(open_and_check(&out).is_err());
    }

    #[test]
    fn lying_lengths_offsets_and_dtypes_are_errors(which in 0usize..4, value in any::<u64>(), k in 0usize..8) {
        let (out, shard, bytes) = hostile_base("lie");
        let (n, json) = header(&bytes);
        let corrupted = match which {
            // The header length prefix.
            0 => {
                let mut b = bytes.clone();
                let v = if value % 2 == 0 { value } else { (n as u64).wrapping_add(value % 64).wrapping_sub(32) };
                if v == n as u64 { return Ok(()); }
                b[..8].copy_from_slice(&v.to_le_bytes());
                b
            }
            // One data offset of one tensor.
            1 => {
                let mut h: serde_json::Value = serde_json::from_str(&json).unwrap();
                let names: Vec<String> = h.as_object().unwrap().keys().filter(|k| *k != "__metadata__").cloned().collect();
                let name = &names[k % names.len()];
                let end = (value % 2) as usize;
                let old = h[name]["data_offsets"][end].as_u64().unwrap();
                let new = if value % 3 == 0 { value >> 1 } else { old.wrapping_add(1 + value % 16) };
                h[name]["data_offsets"][end] = new.into();
                with_header(&bytes, &h.to_string())
            }
            // A dtype of the same or another size.
            2 => {
                let mut h: serde_json::Value = serde_json::from_str(&json).unwrap();
                let names: Vec<String> = h.as_object().unwrap().keys().filter(|k| *k != "__metadata__").cloned().collect();
                let name = &names[k % names.len()];
                let dtypes = ["F32", "F16", "BF16", "U8", "I8", "U16", "I16", "U32", "I32", "I64", "F64", "BOOL"];
                let old = h[name]["dtype"].as_str().unwrap().to_string();
                let new = dtypes[(value as usize) % dtypes.len()];
                // f16 ↔ bf16 features are both allowed; that swap changes values, not validity.
                if new == old || (name == "image.features" && (new == "BF16" || new == "F16")) { return Ok(()); }
                h[name]["dtype"] = new.into();
                with_header(&bytes, &h.to_string())
            }
            // A shape dimension.
            _ => {
                let mut h: serde_json::Value = serde_json::from_str(&json).unwrap();
                let names: Vec<String> = h.as_object().unwrap().keys().filter(|k| *k != "__metadata__").cloned().collect();
                let name = &names[k % names.len()];
                let old = h[name]["shape"][0].as_u64().unwrap();
                let new = value % 1000;
                if new == old { return Ok(()); }
                h[name]["shape"][0] = new.into();
                with_header(&bytes, &h.to_string())
            }
        };
        install(&out, &shard, &corrupted, true);
        let e = open_and_check(&out).unwrap_err();
        prop_assert!(e.contains("test-00000.safetensors"), "{}", e);
    }
}

#[test]
fn an_empty_or_tiny_file_is_an_error() {
    let (out, shard, _) = hostile_base("tiny");
    for len in [0usize, 1, 7, 8, 9] {
        install(&out, &shard, &vec![0u8; len], true);
        let e = open_and_check(&out).unwrap_err();
        assert!(e.contains("test-00000.safetensors"), "{e}");
    }
}

/// The batch path (pread, parallel, storage dtype) against the in-memory path (the map, widened
/// on load): the same images and texts, the same values.
#[test]
fn batches_equal_the_loaded_dataset() {
    use semshare::data::Dataset;
    use semshare::data::batches::{image_batch, text_batch};
    let src = source_dir("batches", false, false);
    let out = src.join("packed");
    pack(&src, &out, 2500).unwrap();
    let data = DatasetReader::open(&out).unwrap();
    let mem = Dataset::load(&out).unwrap();
    let split = data.split("train").unwrap();
    let items = [39, 0, 17, 17, 24, 5];
    let b = image_batch(&data.layout, split, &items).unwrap();
    let features = b.features.to_f32();
    let (mut at, mut box_at) = (0, 0);
    for (n, &i) in items.iter().enumerate() {
        let count = mem.train.image_count[i] as usize;
        assert_eq!(b.lengths[n], count);
        assert_eq!(features[at..at + count * DR], mem.train.image_features[i * R * DR..(i * R + count) * DR]);
        assert_eq!(b.boxes[box_at..box_at + 5 * count], mem.train.image_boxes[i * R * 5..(i * R + count) * 5]);
        let classes = &mem.train.image_classes.as_ref().unwrap()[i * R..i * R + count];
        let got: Vec<u16> = b.classes.as_ref().unwrap()[at / DR..at / DR + count].iter().map(|&k| k as u16).collect();
        assert_eq!(got, classes);
        let want: Vec<f32> = mem.train.labels[i * C..(i + 1) * C].iter().map(|&y| y as f32).collect();
        assert_eq!(b.labels[n * C..(n + 1) * C], want);
        at += count * DR;
        box_at += 5 * count;
    }
    assert_eq!(at, b.features.len());
    let texts = [79, 1, 40, 41];
    let t = text_batch(&data.layout, split, &texts).unwrap();
    let mut at = 0;
    for (n, &j) in texts.iter().enumerate() {
        let len = mem.train.text_length[j] as usize;
        assert_eq!(t.tokens[at..at + len], mem.train.text_tokens[j * T..j * T + len]);
        let i = mem.train.text_item[j] as usize;
        let want: Vec<f32> = mem.train.labels[i * C..(i + 1) * C].iter().map(|&y| y as f32).collect();
        assert_eq!(t.labels[n * C..(n + 1) * C], want);
        at += len;
    }
}

/// A generator with a retrieval set writes it through `write_split`; invalid splits are refused.
#[test]
fn in_memory_splits_write_as_any_split_database_included() {
    use semshare::data::synth::{SynthConfig, SynthPreset, generate};
    let mut cfg = SynthConfig::preset(SynthPreset::Balanced, 3);
    (cfg.train, cfg.val, cfg.test) = (20, 6, 8);
    (cfg.feature_dim, cfg.vocab_size, cfg.max_tokens, cfg.regions) = (8, 60, 6, 4);
    let ds = generate(&cfg).unwrap();
    let out = tmp("write-split").join("data");
    let mut w = DatasetWriter::create(&out, Layout { meta: ds.meta.clone(), text_feature_dim: 0 }, 4000).unwrap();
    for (name, split) in [("train", &ds.train), ("val", &ds.val), ("test", &ds.val), ("database", &ds.test)] {
        w.write_split(name, split).unwrap();
    }
    let mut bad = ds.test.clone();
    bad.labels[0] = 9;
    let e = w.write_split("val", &bad).unwrap_err().to_string();
    assert!(e.contains("labels") && e.contains("item 0"), "{e}");
    w.finish().unwrap();
    let data = DatasetReader::open(&out).unwrap();
    assert_eq!(data.database().unwrap().num_images(), 8);
    assert!(data.split("train").unwrap().shards.len() > 1);
    assert!(data.check(10).is_empty());
}

/// `train`'s data-aware defaults (`defaults::resolve`): decided from the data, explicit values
/// kept, and the written `resolved-config.json` loads back to the same configuration.
#[test]
fn defaults_are_resolved_from_the_data_and_explicit_values_win() {
    use semshare::config::{Configs, apply_config_json, fit_to_data};
    use semshare::defaults::resolve;
    // Global items with text features: a context loss would have nothing to predict.
    let src = source_dir_shaped("defaults-global", true, false, 1, 1);
    pack(&src, &src.join("packed"), 1 << 20).unwrap();
    let data = DatasetReader::open(src.join("packed")).unwrap();
    let model = tiny_model(&data);
    let c = Configs::new(model.clone(), TrainConfig::default());
    let r = resolve(&c, &model, &data).unwrap();
    let reason = |r: &semshare::defaults::Resolved, key: &str| {
        r.choices.iter().find(|c| c.key == key).unwrap_or_else(|| panic!("no choice {key}")).reason.clone()
    };
    assert_eq!(r.model.lambda, 0.0);
    assert!(reason(&r, "model.lambda").contains("nothing to predict"), "{}", reason(&r, "model.lambda"));
    assert_eq!((r.train.normalize.as_str(), r.train.embedding.as_str()), ("standardize", "best"));
    // 40 training items in batches of 32: one step an epoch, validated every epoch; the cap is
    // 100,000 / 40 epochs, clamped to 300, and patience a tenth of it, clamped to 20.
    assert_eq!((r.train.eval_every, r.train.steps, r.train.patience), (1, 300, 20));
    // Items with two labels: NDCG, cut at the validation split's 8 items.
    assert_eq!((r.train.val_metric.as_str(), r.train.eval_k), ("ndcg", 8));
    assert!(r.lines().iter().all(|l| l.contains(" = ") && l.ends_with(')')), "{:?}", r.lines());

    // Explicit values (a config key, a flag) win, and say so.
    let mut given = c.clone();
    (given.train.steps, given.model.lambda) = (7, 0.5);
    given.train_keys.insert("steps".into());
    given.model_keys.insert("lambda".into());
    let mut given_model = model.clone();
    given_model.lambda = 0.5;
    let g = resolve(&given, &given_model, &data).unwrap();
    assert_eq!((g.train.steps, g.model.lambda), (7, 0.5));
    assert_eq!(reason(&g, "train.steps"), "given explicitly");
    assert_eq!(reason(&g, "model.lambda"), "given explicitly");

    // The written file is a config: read back, everything in it is explicit, and resolving it
    // again changes nothing.
    let path = Path::new("resolved-config.json");
    let mut back =
        apply_config_json(semshare::model::ModelConfig::small(), TrainConfig::default(), &r.to_json(), path).unwrap();
    let mut back_model = back.model.clone();
    fit_to_data(&mut back_model, &data.layout, &back.model_keys, path).unwrap();
    back.model = back_model.clone();
    let again = resolve(&back, &back_model, &data).unwrap();
    assert_eq!((&again.train, &again.model), (&r.train, &r.model));
    assert!(again.choices.iter().filter(|c| c.key != "model.inputs").all(|c| c.reason == "given explicitly"));

    // Token texts and region classes: the context loss stays.
    let src = source_dir("defaults-tokens", false, false);
    pack(&src, &src.join("packed"), 1 << 20).unwrap();
    let data = DatasetReader::open(src.join("packed")).unwrap();
    let model = tiny_model(&data);
    let r = resolve(&Configs::new(model.clone(), TrainConfig::default()), &model, &data).unwrap();
    assert_eq!(r.model.lambda, model.lambda);
    assert!(reason(&r, "model.lambda").contains("region classes and tokens"), "{}", reason(&r, "model.lambda"));
}
