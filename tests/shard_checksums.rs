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

/// Flips the lowest bit of the first value of `image.features` (still a finite feature, so only
/// the checksum can tell).
fn flip_first_feature_bit(shard: &Path) {
    let mut bytes = std::fs::read(shard).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let start = header["image.features"]["data_offsets"][0].as_u64().unwrap() as usize;
    bytes[8 + n + start] ^= 1;
    std::fs::write(shard, &bytes).unwrap();
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
