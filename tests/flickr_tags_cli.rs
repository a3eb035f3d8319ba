//! `semshare synth --preset flickr-tags` end to end on a small MIRFlickr-like directory that the
//! test writes (the real one is checked in src/data/flickr_tags.rs when it is present), then
//! `train` and `eval` on the result; bad arguments give one `error:` line.

use std::path::{Path, PathBuf};
use std::process::Output;

fn semshare(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_semshare")).args(args).output().expect("the binary runs")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("semshare-ftcli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fails_with(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let line = stderr.lines().last().unwrap_or("");
    assert!(line.starts_with("error: ") && line.contains(needle), "expected `{needle}` in: {stderr}");
}

/// `n` items, 3 labels, 5 tags, in the layout of ../shared/data/mirflickr25k (safetensors by hand).
fn fake_mirflickr(dir: &Path, n: usize) {
    let (c, k) = (3, 5);
    let labels: Vec<u8> = (0..n * c).map(|x| (x % c == (x / c) % c || x % 7 == 0) as u8).collect();
    let tags: Vec<u8> = (0..n * k).map(|x| (x % k == (x / k) % k || x % 3 == 0) as u8).collect();
    let header = format!(
        r#"{{"labels":{{"dtype":"U8","shape":[{n},{c}],"data_offsets":[0,{a}]}},"tags":{{"dtype":"U8","shape":[{n},{k}],"data_offsets":[{a},{b}]}}}}"#,
        a = n * c,
        b = n * c + n * k
    );
    let mut h = header.into_bytes();
    h.resize(h.len().div_ceil(8) * 8, b' ');
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend(h);
    bytes.extend(labels);
    bytes.extend(tags);
    std::fs::write(dir.join("mirflickr25k.safetensors"), bytes).unwrap();
    std::fs::write(dir.join("labels.txt"), "sky\nsea\ndog\n").unwrap();
    std::fs::write(dir.join("tags.txt"), "blue\nwater\npuppy\nsun\nart\n").unwrap();
}

#[test]
fn flickr_tags_synth_train_eval() {
    let dir = tmp("happy");
    let real = dir.join("real");
    std::fs::create_dir_all(&real).unwrap();
    fake_mirflickr(&real, 60);
    let data = dir.join("data");
    let sizes = ["--train", "30", "--val", "8", "--test", "10", "--seed", "4"];
    let out = ok(&semshare(
        &[&["synth", "--preset", "flickr-tags", "--labels", p(&real), "--out", p(&data)], &sizes[..]].concat(),
    ));
    assert!(out.contains("30 / 8 / 10 queries / 50 retrieval"), "{out}");
    let vocab = std::fs::read_to_string(data.join("vocab.txt")).unwrap();
    assert_eq!(vocab, "[PAD]\n[UNK]\n[MASK]\nblue\nwater\npuppy\nsun\nart\n");
    assert_eq!(std::fs::read_to_string(data.join("labels.txt")).unwrap(), "sky\nsea\ndog\n");

    let cfg = dir.join("cfg.json");
    std::fs::write(&cfg, r#"{"model": {"layers": 1, "ffn": 64}, "train": {"eval_every": 2, "warmup": 1}}"#).unwrap();
    let run = dir.join("run");
    let args = ["train", "--data", p(&data), "--out", p(&run), "--config", p(&cfg), "--steps", "2", "--batch", "8"];
    assert!(ok(&semshare(&args)).contains("trained 2 steps"));
    let best = run.join("best.safetensors");
    let table = ok(&semshare(&["eval", "--data", p(&data), "--checkpoint", p(&best)]));
    assert!(table.contains("NDCG@500"), "{table}");

    let src = dir.join("src");
    let out = ok(&semshare(
        &[
            &["synth", "--preset", "flickr-tags", "--labels", p(&real), "--out", p(&src), "--format", "source"],
            &sizes[..],
        ]
        .concat(),
    ));
    assert!(out.contains("source directory"), "{out}");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("source.json")).unwrap()).unwrap();
    for split in ["train", "val", "test", "database"] {
        let file = doc["splits"][split][0].as_str().unwrap();
        assert!(src.join(file).is_file(), "{split}: {file}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn flickr_tags_bad_arguments() {
    let dir = tmp("bad");
    let out = dir.join("out");
    let missing = dir.join("nowhere");
    fails_with(&semshare(&["synth", "--preset", "flickr-tags", "--labels", p(&missing), "--out", p(&out)]), "nowhere");
    fails_with(&semshare(&["synth", "--preset", "flickr-tags", "--out", p(&out)]), "--labels is required");
    fails_with(&semshare(&["synth", "--labels", p(&dir), "--out", p(&out)]), "only for --preset flickr-tags");
    fake_mirflickr(&dir, 20);
    let base = ["synth", "--preset", "flickr-tags", "--labels", p(&dir), "--out", p(&out)];
    fails_with(&semshare(&[&base[..], &["--format", "zip"]].concat()), "unknown --format `zip`");
    fails_with(&semshare(&[&base[..], &["--test", "15"]].concat()), "fit the 20 items");
    fails_with(
        &semshare(&["synth", "--preset", "strong", "--out", p(&out)]),
        "strong` (balanced, weak-image, weak-text, flickr-tags)",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The source directory of `--format source` goes through `semshare pack` and `semshare check`.
#[test]
fn flickr_tags_source_packs_and_checks() {
    let dir = tmp("pack");
    let real = dir.join("real");
    std::fs::create_dir_all(&real).unwrap();
    fake_mirflickr(&real, 60);
    let (src, packed) = (dir.join("src"), dir.join("packed"));
    let args = ["synth", "--preset", "flickr-tags", "--labels", p(&real), "--out", p(&src), "--format", "source"];
    ok(&semshare(&[&args[..], &["--train", "30", "--val", "8", "--test", "10"]].concat()));
    ok(&semshare(&["pack", "--from", p(&src), "--out", p(&packed)]));
    ok(&semshare(&["check", p(&packed)]));
    // --force replaces a source directory synth wrote, and no other: not once a user's file is
    // in it, nor an importer's (or a hand-made) one, whose source.json names no writer.
    let again = [&args[..], &["--train", "30", "--val", "8", "--test", "10", "--force"]].concat();
    ok(&semshare(&again));
    std::fs::write(src.join("README.txt"), "my notes").unwrap();
    fails_with(&semshare(&again), "not a source directory written by semshare");
    std::fs::remove_file(src.join("README.txt")).unwrap();
    let manifest = src.join("source.json");
    let mut doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    assert_eq!(doc["written_by"], "semshare synth");
    doc.as_object_mut().unwrap().remove("written_by");
    std::fs::write(&manifest, doc.to_string()).unwrap();
    let imported = std::fs::read(src.join("train.safetensors")).unwrap();
    fails_with(&semshare(&again), "not a source directory written by semshare");
    assert_eq!(std::fs::read(src.join("train.safetensors")).unwrap(), imported);
    ok(&semshare(&["pack", "--from", p(&src), "--out", p(&packed), "--force"]));
    let _ = std::fs::remove_dir_all(&dir);
}
