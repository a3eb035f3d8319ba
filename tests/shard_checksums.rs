//! A shard whose bytes changed after it was written (one flipped bit in its tensor data, a value
//! that is still valid) is refused by `train`, `eval` and `embed` with an error naming the file:
//! they compare every shard with its checksum in `dataset.json` before reading its items.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn semshare(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_semshare")).args(args).output().expect("the binary runs")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("semshare-checksums-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn ok(out: &Output) {
    assert!(out.status.success(), "failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// Rewrites the bytes of a shard's `image.features` in place: `edit` gets them and the tensor's
/// header entry (dtype, shape).
fn edit_features(shard: &Path, edit: impl FnOnce(&mut [u8], &serde_json::Value)) {
    let mut bytes = std::fs::read(shard).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let features = &header["image.features"];
    let offset = |i: usize| 8 + n + features["data_offsets"][i].as_u64().unwrap() as usize;
    let (start, end) = (offset(0), offset(1));
    edit(&mut bytes[start..end], features);
    std::fs::write(shard, &bytes).unwrap();
}

/// Flips the lowest bit of the first value of `image.features` (still a finite feature, so only
/// the checksum can tell).
fn flip_first_feature_bit(shard: &Path) {
    edit_features(shard, |data, _| data[0] ^= 1);
}

fn copy_dataset(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

fn refused_naming(out: &Output, file: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let line = stderr.lines().last().unwrap_or("");
    assert!(line.starts_with("error: ") && line.contains(file) && line.contains("checksum mismatch"), "{stderr}");
}

#[test]
fn a_flipped_byte_is_refused_by_train_eval_and_embed() {
    let dir = tmp("flip");
    let data = dir.join("data");
    ok(&semshare(&["synth", "--out", path(&data), "--train", "40", "--val", "10", "--test", "10"]));
    let cfg = dir.join("cfg.json");
    std::fs::write(&cfg, r#"{"model": {"layers": 1, "ffn": 64}, "train": {"eval_every": 2, "warmup": 1}}"#).unwrap();
    let train = |data: &Path, out: &Path| {
        let args = ["--config", path(&cfg), "--steps", "2", "--batch", "8", "--device", "cpu"];
        semshare(&[&["train", "--data", path(data), "--out", path(out)][..], &args[..]].concat())
    };
    let run = dir.join("run");
    ok(&train(&data, &run));
    let ckpt = run.join("best.safetensors");

    let bad_train = dir.join("bad-train");
    copy_dataset(&data, &bad_train);
    flip_first_feature_bit(&bad_train.join("train-00000.safetensors"));
    refused_naming(&train(&bad_train, &dir.join("run2")), "train-00000.safetensors");

    let bad_test = dir.join("bad-test");
    copy_dataset(&data, &bad_test);
    flip_first_feature_bit(&bad_test.join("test-00000.safetensors"));
    let eval = semshare(&["eval", "--data", path(&bad_test), "--checkpoint", path(&ckpt), "--device", "cpu"]);
    refused_naming(&eval, "test-00000.safetensors");
    let emb = dir.join("emb.safetensors");
    let embed = semshare(&[
        "embed",
        "--data",
        path(&bad_test),
        "--checkpoint",
        path(&ckpt),
        "--out",
        path(&emb),
        "--device",
        "cpu",
    ]);
    refused_naming(&embed, "test-00000.safetensors");
    assert!(!emb.exists(), "no embeddings written from a corrupt shard");

    // The untouched dataset still evaluates: the check costs nothing when the bytes are right.
    ok(&semshare(&["eval", "--data", path(&data), "--checkpoint", path(&ckpt), "--device", "cpu"]));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `check` says a shard's checksum mismatch once (each item read once repeated it, a hundred
/// lines of one problem) and still finds the items that are wrong in other ways.
#[test]
fn check_reports_a_mismatch_once_and_the_items_behind_it() {
    let dir = tmp("check");
    let data = dir.join("data");
    ok(&semshare(&["synth", "--out", path(&data), "--train", "40", "--val", "10", "--test", "10"]));
    let shard = data.join("train-00000.safetensors");
    flip_first_feature_bit(&shard);
    // Image 3's first feature value made NaN, in the features' own dtype.
    edit_features(&shard, |data, features| {
        let shape: Vec<usize> =
            features["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        let nan: &[u8] = match features["dtype"].as_str().unwrap() {
            "F32" => &[0x00, 0x00, 0xc0, 0x7f],
            "F16" => &[0x00, 0x7e],
            "BF16" => &[0xc0, 0x7f],
            other => panic!("features of dtype {other}"),
        };
        let at = 3 * shape[1..].iter().product::<usize>() * nan.len();
        data[at..at + nan.len()].copy_from_slice(nan);
    });

    let out = semshare(&["check", path(&data)]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert_eq!(stdout.matches("checksum mismatch").count(), 1, "{stdout}");
    assert!(stdout.contains("non-finite value NaN"), "{stdout}");
    assert!(stdout.contains("image 3") || stdout.contains("item 3"), "{stdout}");
    std::fs::remove_dir_all(&dir).unwrap();
}
