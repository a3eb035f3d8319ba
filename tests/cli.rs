//! The `semshare` binary end to end, as a new user would run it: the happy path on a tiny
//! synthetic dataset, and bad input that must give a one-line error and a non-zero exit.

mod common;

use common::cli::{fails_with, ok, path, semshare, usage_error};

fn tmp(name: &str) -> std::path::PathBuf {
    common::cli::tmp("cli", name)
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
    assert!(out.contains("trained 2 steps (6 → 8)"), "{out}");

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
    fails_with(&semshare(&["train"]), "--data is required (see `semshare train --help`)");
    fails_with(&semshare(&["check", path(&dir)]), "holds no dataset.json: not a dataset");
    let file = dir.join("notes.txt");
    std::fs::write(&file, "x").unwrap();
    fails_with(&semshare(&["check", path(&file)]), "not a directory: a dataset is a directory");
    usage_error(&semshare(&["--version", "extra"]), "--version takes none");
    usage_error(&semshare(&["query", "--index", "i.idx", "--text", ""]), "--text is empty");
    for help in [["help", "--help"], ["help", "help"]] {
        let out = semshare(&help);
        assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("COMMANDS:"), "{help:?}");
    }
    fails_with(&semshare(&["demo", "--device", "cuda"]), "CUDA");
    fails_with(&semshare(&["demo", "--device", "tpu"]), "unknown device");
    usage_error(&semshare(&["frobnicate"]), "unknown command `frobnicate`");
    usage_error(&semshare(&["train", "--steps"]), "--steps needs a value");
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
    // f32 holds 1e300 only as infinity: the flag is named, not the config key it would set.
    let never = dir.join("never");
    let out = path(&never);
    fails_with(
        &semshare(&["train", "--data", path(&data), "--out", out, "--lr", "1e300"]),
        "--lr: `1e300` is not a finite",
    );
    fails_with(
        &semshare(&["train", "--data", path(&data), "--out", out, "--lambda", "nan"]),
        "--lambda: `nan` is not a finite",
    );
    assert!(!never.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn score_without_pairing_reports_label_metrics_and_says_why_not_recall() {
    let dir = tmp("unpaired");
    // 2 images, 3 texts, no `text.item`: nothing says which text belongs to which image.
    let set = semshare::eval::EmbeddingSet::new(
        vec![1.0, 0.0, 0.0, 1.0],
        vec![1, 0, 0, 1],
        vec![0.9, 0.1, 0.2, 0.8, 0.5, 0.5],
        vec![1, 0, 0, 1, 1, 1],
        2,
        2,
        None,
    )
    .unwrap();
    let emb = dir.join("unpaired.safetensors");
    set.save(&emb).unwrap();

    let out = semshare(&["score", "--embeddings", path(&emb)]);
    let table = ok(&out);
    assert!(table.contains("NDCG@10") && table.contains("mAP@all") && table.contains("P@"), "{table}");
    assert!(!table.contains("R@"), "{table}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let note: Vec<&str> = stderr.lines().filter(|l| l.contains("R@K")).collect();
    assert_eq!(note.len(), 1, "{stderr}");
    assert!(note[0].contains("3 texts and 2 images") && note[0].contains("text.item"), "{stderr}");

    // --json: one JSON document on stdout, the R@K fields absent.
    let json = ok(&semshare(&["score", "--embeddings", path(&emb), "--json"]));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    for dir in ["i2t", "t2i", "avg"] {
        assert!(v[dir].get("recall").is_none(), "{json}");
        assert!(v[dir]["map_all"].as_f64().is_some(), "{json}");
    }
    // An image query's relevant texts: image 0 (label 0) ranks text 0 first, which shares it.
    assert!(v["i2t"]["ndcg"][0][1].as_f64().unwrap() > 0.0, "{json}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Every command, as `semshare help` lists them.
const COMMANDS: [&str; 12] =
    ["demo", "synth", "pack", "check", "train", "eval", "embed", "score", "index", "query", "export", "experiment"];

#[test]
fn version_and_help_for_every_command() {
    for flag in ["--version", "-V"] {
        assert_eq!(ok(&semshare(&[flag])), format!("semshare {}\n", env!("CARGO_PKG_VERSION")));
    }
    let full = ok(&semshare(&["help"]));
    assert_eq!(ok(&semshare(&["--help"])), full);
    assert_eq!(ok(&semshare(&[])), full);
    for cmd in COMMANDS {
        let help = ok(&semshare(&["help", cmd]));
        assert!(help.starts_with(&format!("USAGE: semshare {cmd} ")), "{help}");
        for asked in [semshare(&[cmd, "--help"]), semshare(&[cmd, "-h"]), semshare(&[cmd, "--out", "x", "--help"])] {
            assert_eq!(ok(&asked), help, "{cmd}");
        }
        // One source: the command's block of the full usage is in its help, word for word.
        let block: String = full
            .lines()
            .skip_while(|l| !l.starts_with(&format!("  {cmd} ")))
            .take_while(|l| l.starts_with(&format!("  {cmd} ")) || l.starts_with("    "))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(!block.is_empty() && help.contains(&block), "{cmd}: {block:?} not in {help}");
    }
    usage_error(&semshare(&["help", "frobnicate"]), "unknown command `frobnicate`");
}

#[test]
fn unknown_options_and_stray_arguments_exit_2_with_one_line() {
    usage_error(&semshare(&["train", "--nope"]), "unknown option --nope");
    usage_error(&semshare(&["train", "--nope=1"]), "unknown option --nope");
    usage_error(&semshare(&["score", "--json=yes"]), "--json is a switch");
    usage_error(&semshare(&["score", "--embeddings="]), "--embeddings needs a value");
    usage_error(&semshare(&["eval", "data"]), "unexpected argument `data`");
    usage_error(&semshare(&["check"]), "check takes one directory");
    usage_error(&semshare(&["check", "a", "b"]), "check takes one directory");
    usage_error(&semshare(&["check", "--json"]), "unknown option --json");
    // A Linux file name may be any bytes; `env::args` panicked on one that is not UTF-8.
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let name = std::ffi::OsStr::from_bytes(b"/tmp/\xff\xfe");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_semshare")).arg("check").arg(name).output().unwrap();
        usage_error(&out, "is not UTF-8");
    }
    // A value the parser took but the command refuses is an ordinary error (exit 1).
    fails_with(&semshare(&["demo", "--steps=many"]), "--steps: `many` is not a valid number");
}

#[test]
fn flag_equals_value_works_like_flag_space_value() {
    let dir = tmp("equals");
    let (a, b) = (dir.join("a"), dir.join("b"));
    let sizes = ["--train", "40", "--val", "10", "--test", "10", "--seed", "5"];
    ok(&semshare(&[&["synth", "--out", path(&a)][..], &sizes].concat()));
    let (out_b, train_b) = (format!("--out={}", path(&b)), "--train=40");
    ok(&semshare(&["synth", &out_b, train_b, "--val=10", "--test", "10", "--seed=5"]));
    assert_eq!(common::cli::snapshot(&a), common::cli::snapshot(&b));
    let checked = ok(&semshare(&["check", path(&b)]));
    assert!(checked.contains("ok"), "{checked}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn piped_progress_is_plain_lines() {
    let dir = tmp("progress");
    let data = dir.join("data");
    ok(&semshare(&["synth", "--out", path(&data), "--train", "40", "--val", "10", "--test", "10"]));
    let cfg = dir.join("cfg.json");
    std::fs::write(&cfg, r#"{"model": {"layers": 1, "ffn": 32, "dim": 16, "heads": 2}, "train": {"eval_every": 3}}"#)
        .unwrap();
    let run = dir.join("run");
    let args = ["train", "--data", path(&data), "--out", path(&run), "--config", path(&cfg)];
    let out = semshare(&[&args[..], &["--steps=6", "--batch=8", "--device=cpu"]].concat());
    ok(&out);
    // stderr is a pipe here: no `\r` redraws, a plain line per tenth of the run (every step of 6).
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains('\r'), "{stderr:?}");
    for step in 1..=6 {
        let line = format!("step {step:>6}/6  loss ");
        assert!(stderr.lines().any(|l| l.starts_with(&line)), "no line for step {step}: {stderr}");
    }
    assert!(stderr.lines().any(|l| l.starts_with("step      6/6") && l.contains("val NDCG@")), "{stderr}");

    // The reader gone (`semshare train … 2>&1 | head -1`): the std print macros panicked at the
    // next line (exit 101, the run lost); the run now goes on and writes its checkpoints.
    let again = dir.join("again");
    let args = ["train", "--data", path(&data), "--out", path(&again), "--config", path(&cfg)];
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_semshare"))
        .args([&args[..], &["--steps=6", "--batch=8", "--device=cpu"]].concat())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop((child.stdout.take(), child.stderr.take()));
    assert!(child.wait().unwrap().success());
    assert!(again.join("best.safetensors").is_file());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `train` with no training flags resolves its configuration from the data, prints each choice
/// with its reason, writes it to the run directory, and a run from that file keeps every value.
#[test]
fn train_resolves_defaults_from_the_data_and_the_written_config_loads_back() {
    let dir = tmp("defaults");
    let data = dir.join("data");
    ok(&semshare(&["synth", "--out", path(&data), "--train", "40", "--val", "10", "--test", "10"]));
    let cfg = dir.join("cfg.json");
    std::fs::write(&cfg, r#"{"model": {"layers": 1, "ffn": 32, "dim": 16, "heads": 2}}"#).unwrap();
    let run = dir.join("run");
    let out = semshare(&["train", "--data", path(&data), "--out", path(&run), "--config", path(&cfg), "--device=cpu"]);
    ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    for want in [
        "train.normalize = \"standardize\"  (each input feature",
        "train.embedding = \"best\"  (validation scores both",
        "train.steps = 300  (a cap, not a target",
        "train.patience = 20  (stop after 20 epochs",
        "model.lambda = 0.01  (the context loss predicts masked region classes and tokens)",
    ] {
        assert!(stderr.contains(want), "no `{want}` in: {stderr}");
    }
    assert!(stderr.contains("val NDCG@10 pooled ") && stderr.contains(" / label "), "{stderr}");
    let resolved = run.join("resolved-config.json");
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&resolved).unwrap()).unwrap();
    assert_eq!(doc["train"]["steps"], 300);
    assert!(doc["reasons"]["train.steps"].as_str().unwrap().contains("a cap"));
    // The dataset's own values are not in it: it loads on any split of the same data.
    assert!(doc["model"].get("region_dim").is_none() && doc["model"]["dim"] == 16);

    // fp32, the default, is left out of the file (earlier fingerprints stay as they were).
    assert!(doc["train"].get("precision").is_none(), "{doc}");

    let run2 = dir.join("run2");
    let args = ["train", "--data", path(&data), "--out", path(&run2), "--config", path(&resolved), "--steps", "3"];
    let args = [&args[..], &["--precision", "bf16", "--device", "cpu"]].concat();
    let out = semshare(&args);
    let stdout = ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("train.steps = 3  (given explicitly)"), "{stderr}");
    assert!(stderr.contains("train.normalize = \"standardize\"  (given explicitly)"), "{stderr}");
    assert!(stdout.contains("trained 3 steps"), "{stdout}");
    // The flag is the run's train.precision, recorded with it.
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run2.join("resolved-config.json")).unwrap()).unwrap();
    assert_eq!(doc["train"]["precision"], "bf16", "{doc}");
    // From the file too; TF32 is CUDA's alone, an unknown name is refused naming the key.
    for (precision, error) in [("tf32", "precision tf32 is CUDA's"), ("fp16", "train.precision")] {
        std::fs::write(&cfg, format!(r#"{{"train": {{"precision": "{precision}", "steps": 1}}}}"#)).unwrap();
        let run = dir.join(format!("run-{precision}"));
        fails_with(
            &semshare(&["train", "--data", path(&data), "--out", path(&run), "--config", path(&cfg), "--device=cpu"]),
            error,
        );
        assert!(!run.exists(), "a refused run left {}", run.display());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A forced CPU kernel path that is unknown, or that this CPU (or this version) cannot run:
/// one `error:` line naming it and the missing feature, exit 1, never an illegal instruction.
#[test]
fn forced_cpu_path_errors_are_one_line() {
    use semshare::backend::cpu::dispatch::CpuPath;
    let dir = tmp("cpu-path");
    let with = |forced: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_semshare"))
            .env("SEMSHARE_CPU", forced)
            .args(["demo", "--device", "cpu", "--steps", "1", "--out", path(&dir.join("out"))])
            .output()
            .unwrap()
    };
    fails_with(&with("sse9"), "SEMSHARE_CPU=sse9: unknown CPU path");
    for p in CpuPath::ALL {
        match p.kernels() {
            Err(why) => fails_with(&with(p.name()), &why),
            Ok(_) => println!("{} runs here: no error to check", p.name()),
        }
    }
    assert!(!dir.join("out").exists(), "nothing written before the device opened");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A `SEMSHARE_GPU` other than `emulated` is a one-line error on `auto` and `cuda` alike: a
/// typo never runs the suite on the card, or on the CPU, as if it had been emulated.
#[cfg(feature = "cuda")]
#[test]
fn a_misspelt_gpu_emulation_is_an_error() {
    let dir = tmp("gpu-env");
    for device in ["auto", "cuda"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_semshare"))
            .env("SEMSHARE_GPU", "emulatd")
            .args(["demo", "--device", device, "--steps", "1", "--out", path(&dir.join("out"))])
            .output()
            .unwrap();
        fails_with(&out, "SEMSHARE_GPU = `emulatd` (expected `emulated`");
    }
    assert!(!dir.join("out").exists(), "nothing written before the device opened");
    let _ = std::fs::remove_dir_all(&dir);
}
