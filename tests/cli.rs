//! The `semshare` binary end to end, as a new user would run it: the happy path on a tiny
//! synthetic dataset, and bad input that must give a one-line error and a non-zero exit.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn semshare(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_semshare")).args(args).output().expect("the binary runs")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("semshare-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn ok(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "failed: {stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A clean failure: non-zero exit, no panic, one `error:` line naming the problem.
fn fails_with(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should have failed: {stderr}");
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let line = stderr.lines().last().unwrap_or("");
    assert!(line.starts_with("error: ") && line.contains(needle), "expected an error about `{needle}`, got: {stderr}");
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn synth_train_eval_embed_score() {
    let dir = tmp("happy");
    let data = dir.join("data");
    let run = dir.join("run");
    ok(&semshare(&[
        "synth",
        "--preset",
        "weak-image",
        "--out",
        path(&data),
        "--train",
        "96",
        "--val",
        "40",
        "--test",
        "50",
        "--seed",
        "3",
    ]));
    assert!(data.join("dataset.json").is_file());
    let cfg = dir.join("cfg.json");
    std::fs::write(&cfg, r#"{"model": {"layers": 1, "ffn": 64}, "train": {"eval_every": 3, "warmup": 2}}"#).unwrap();
    let out = ok(&semshare(&[
        "train",
        "--data",
        path(&data),
        "--out",
        path(&run),
        "--config",
        path(&cfg),
        "--steps",
        "6",
        "--batch",
        "16",
        "--device",
        "cpu",
    ]));
    assert!(out.contains("trained 6 steps"), "{out}");
    let best = run.join("best.safetensors");
    assert!(best.is_file() && run.join("last.safetensors").is_file());

    // Resuming continues from step 6 to 8.
    let out = ok(&semshare(&[
        "train",
        "--data",
        path(&data),
        "--out",
        path(&run),
        "--config",
        path(&cfg),
        "--steps",
        "8",
        "--batch",
        "16",
        "--resume",
        path(&run.join("last.safetensors")),
    ]));
    assert!(out.contains("trained 8 steps"), "{out}");

    let table = ok(&semshare(&["eval", "--data", path(&data), "--checkpoint", path(&best)]));
    assert!(table.contains("NDCG@500") && table.contains("mAP@all") && table.contains("R@10"), "{table}");
    let json =
        ok(&semshare(&["eval", "--data", path(&data), "--checkpoint", path(&best), "--embedding", "label", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let ndcg = v["avg"]["ndcg"][2][1].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&ndcg), "{json}");

    let emb = dir.join("emb.safetensors");
    ok(&semshare(&[
        "embed",
        "--data",
        path(&data),
        "--checkpoint",
        path(&best),
        "--out",
        path(&emb),
        "--split",
        "val",
    ]));
    let scored = ok(&semshare(&["score", "--embeddings", path(&emb), "--json"]));
    let s: serde_json::Value = serde_json::from_str(&scored).unwrap();
    // `score` on the embeddings of a split equals `eval` on that split.
    let direct =
        ok(&semshare(&["eval", "--data", path(&data), "--checkpoint", path(&best), "--split", "val", "--json"]));
    let d: serde_json::Value = serde_json::from_str(&direct).unwrap();
    assert_eq!(s["avg"]["map_all"], d["avg"]["map_all"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_input_gives_one_line_errors() {
    let dir = tmp("bad");
    fails_with(&semshare(&["train", "--data", path(&dir.join("nope"))]), "does not exist");
    fails_with(&semshare(&["demo", "--device", "cuda"]), "CUDA");
    fails_with(&semshare(&["demo", "--device", "tpu"]), "unknown device");
    fails_with(&semshare(&["frobnicate"]), "unknown command");
    fails_with(&semshare(&["train", "--steps"]), "needs a value");
    fails_with(&semshare(&["synth", "--out", path(&dir), "--train", "many"]), "not a valid number");

    let data = dir.join("data");
    ok(&semshare(&["synth", "--out", path(&data), "--train", "40", "--val", "10", "--test", "10"]));
    let ckpt = dir.join("corrupt.safetensors");
    std::fs::write(&ckpt, b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":").unwrap();
    fails_with(&semshare(&["eval", "--data", path(&data), "--checkpoint", path(&ckpt)]), "corrupt.safetensors");
    fails_with(
        &semshare(&["eval", "--data", path(&data), "--checkpoint", path(&dir.join("missing.safetensors"))]),
        "missing.safetensors",
    );
    fails_with(&semshare(&["score", "--embeddings", path(&ckpt)]), "corrupt.safetensors");
    std::fs::remove_dir_all(&dir).unwrap();
}
