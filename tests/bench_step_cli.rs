//! `semshare bench-step` on the CPU: one JSON line after the warm-up; `--counts` needs a
//! device that counts (CUDA), and says so.

mod common;

use common::cli::{fails_with, ok, semshare};

#[test]
fn bench_step_prints_one_json_line() {
    let out =
        semshare(&["bench-step", "--device", "cpu", "--batch", "2", "--tokens", "3", "--warmup", "1", "--steps", "1"]);
    let line = ok(&out);
    let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("{line}: {e}"));
    assert_eq!(v["model"], "small");
    assert_eq!(v["batch"], 2);
    assert_eq!(v["graph"], false);
    assert!(v["ms_per_step"].as_f64().is_some_and(|ms| ms > 0.0), "{line}");
    assert!(v.get("syncs_per_step").is_none(), "counts without --counts: {line}");
}

#[test]
fn counts_need_a_counting_device() {
    let out = semshare(&["bench-step", "--device", "cpu", "--counts", "--steps", "1"]);
    fails_with(&out, "--counts needs a device that counts its launches (--device cuda)");
    let out = semshare(&["bench-step", "--device", "cpu", "--graph", "--steps", "1"]);
    fails_with(&out, "--graph needs a device that captures graphs (--device cuda)");
    let out = semshare(&["bench-step", "--device", "cpu", "--tokens", "0"]);
    fails_with(&out, "--tokens 0 is not in 1..=");
}

/// `--embed`: embedding passes of a loaded model (weights frozen) instead of training steps,
/// with their rate; a captured graph is a training step's, so `--graph` with it is refused.
#[test]
fn bench_step_times_embedding_passes() {
    for precision in ["fp32", "bf16"] {
        let out = semshare(&[
            "bench-step",
            "--device",
            "cpu",
            "--embed",
            "--precision",
            precision,
            "--batch",
            "3",
            "--tokens",
            "4",
            "--warmup",
            "1",
            "--steps",
            "2",
        ]);
        let line = ok(&out);
        let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("{line}: {e}"));
        assert_eq!((v["embed"].as_bool(), v["passes"].as_u64(), v["batch"].as_u64()), (Some(true), Some(2), Some(3)));
        let ms = v["ms_per_pass"].as_f64().unwrap_or_else(|| panic!("no ms_per_pass: {line}"));
        let rate = v["items_per_s"].as_f64().unwrap_or_else(|| panic!("no items_per_s: {line}"));
        // 6 items a pass: the rate is the time's, to its printed rounding.
        assert!(ms > 0.0 && (rate - 6.0 / (ms / 1e3)).abs() <= 0.5 + 1e-3 * rate, "{line}");
        assert!(v.get("ms_per_step").is_none(), "a training step's field: {line}");
    }
    let out = semshare(&["bench-step", "--device", "cpu", "--embed", "--graph", "--steps", "1"]);
    fails_with(&out, "--graph needs a device that captures graphs");
}
