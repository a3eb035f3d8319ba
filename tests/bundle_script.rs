//! `tools/gpu-run.sh` (the GPU bundle's run.sh) on a fake bundle: shell scripts stand in for the
//! test binaries, the CLI, the criterion bench and PyTorch, and an empty file for libcuda and
//! cuBLAS, so the script's own logic runs on any machine: the summary's rows, ratios and
//! "% of copy bandwidth", criterion's results packed under $OUT, a failing test named with its
//! panic message, and one deadline that stops a hung stage and still writes the summary.
//! (Not named gpu_*: tools/gpu-check.sh bundles those.)

#![cfg(unix)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("semshare-bundle-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn script(path: &Path, body: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, format!("#!/usr/bin/env bash\n{body}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

const ESTIMATE: &str = r#"{"confidence_interval":{"confidence_level":0.95,"lower_bound":1.0,"upper_bound":2.0},"point_estimate":1.5,"standard_error":0.1}"#;

/// A bundle in `dir`: run.sh, two passing test binaries (one failing if `fail_test`), a test
/// that sleeps `SLOW` seconds, the demo, a bench writing criterion estimates, `python3` (on the
/// PATH given to run.sh) printing the baseline's JSON lines, and fake libraries. Without a
/// failing test the binaries are gzipped into bins.tar.gz, as tools/gpu-check.sh packs them.
/// With `base`, also a base commit's bench (`BASE=` in tools/gpu-check.sh), its times 1.25×.
fn bundle(dir: &Path, fail_test: bool, base: bool) {
    std::fs::copy(concat!(env!("CARGO_MANIFEST_DIR"), "/tools/gpu-run.sh"), dir.join("run.sh")).unwrap();
    let manifest = if base { "commit test\nbase abc1234\n" } else { "commit test\n" };
    std::fs::write(dir.join("MANIFEST"), manifest).unwrap();
    std::fs::create_dir_all(dir.join("lib")).unwrap();
    for f in ["libcuda.so.1", "libcublas.so.13", "libcublasLt.so.13"] {
        std::fs::write(dir.join("lib").join(f), "").unwrap();
    }
    script(
        &dir.join("tests/gpu_ops"),
        r#"echo "ERR 2.000e-06 gemm nn" >&2; echo "ERR 3.000e-05 layernorm dx" >&2
echo "test result: ok. 16 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out""#,
    );
    let train = if fail_test {
        "printf \"thread 'x' panicked at tests/gpu_train.rs:1:1:\\ngradient of w: relative error 3.0e-3\\n\"
echo 'test result: FAILED. 1 passed; 1 failed'; exit 101"
    } else {
        "echo 'worst parameter gradient: w at 2.0e-5' >&2; echo '20 steps: worst loss error 1.0e-5, parameters 3.0e-4' >&2
echo 'bf16: whole gradient 3.4e-4 from the CPU' >&2; echo 'test result: ok. 2 passed; 0 failed'"
    };
    script(&dir.join("tests/gpu_train"), train);
    script(&dir.join("tests/gpu_wait"), "sleep \"${SLOW:-0}\"; echo 'test result: ok. 1 passed; 0 failed'");
    script(
        &dir.join("semshare"),
        "printf 'semshare demo: 1000 test images / 1000 texts, trained 800 steps in 9s\\nmAP@all 0.30 0.70 0.69 0.71\\n'",
    );
    let bench = |scale: f64| {
        let mut bench = String::from("echo \"benches/gpu: loaded /x/libcublas.so.13.0\" >&2\n");
        for (name, ns) in [
            ("copy/dtod_1GiB", 500_000.0),
            ("layernorm_4608x1024/fwd", 10_000.0),
            ("attention_128x8x36x128/fwd", 80_000.0),
            ("paper_b128_t32/train_step_tf32", 95e6),
        ] {
            let ns = ns * scale;
            bench += &format!(
                "mkdir -p \"$CRITERION_HOME/{name}/new\"; echo '{{\"mean\":{ESTIMATE},\"median\":{{\"confidence_interval\":{{\"confidence_level\":0.95,\"lower_bound\":1.0,\"upper_bound\":2.0}},\"point_estimate\":{ns},\"standard_error\":0.1}},\"median_abs_dev\":{ESTIMATE},\"slope\":null,\"std_dev\":{ESTIMATE}}}' >\"$CRITERION_HOME/{name}/new/estimates.json\"\n"
            );
        }
        bench
    };
    script(&dir.join("benches/gpu"), &bench(1.0));
    if base {
        script(&dir.join("benches/gpu_base"), &bench(1.25));
    }
    script(
        &dir.join("bin/python3"),
        r#"[[ $1 == -c ]] && exit 0
echo '{"measure": "train_step", "median_ms": 38.0, "mode": "tf32", "shape": [1, 2], "torch": "2.11.0+cu130"}'
echo '{"measure": "sdpa_fwd", "mode": "fp32", "shape": [128, 8, 36, 128], "median_ms": 0.05}'
echo '{"measure": "bigru_fwd", "mode": "fp32", "error": "RuntimeError: no cuDNN"}'
echo '{"measure": "copy_bandwidth", "bytes": 2147483648, "median_ms": 0.5, "gb_per_s_median": 4295.0}'"#,
    );
    if !fail_test {
        let packed = Command::new("tar")
            .arg("-C")
            .arg(dir)
            .arg("-czf")
            .arg(dir.join("bins.tar.gz"))
            .args(["tests", "benches", "semshare"])
            .status()
            .expect("tar runs");
        assert!(packed.success());
        for p in ["tests", "benches"] {
            std::fs::remove_dir_all(dir.join(p)).unwrap();
        }
        std::fs::remove_file(dir.join("semshare")).unwrap();
    }
}

fn run(dir: &Path, out: &Path, env: &[(&str, &str)]) -> (Output, String) {
    let path = format!("{}:{}", dir.join("bin").display(), std::env::var("PATH").unwrap_or_default());
    let lib = dir.join("lib");
    let o = Command::new("bash")
        .arg(dir.join("run.sh"))
        .env("OUT", out)
        .env("PATH", path)
        .env("LD_LIBRARY_PATH", &lib)
        .env("CUBLAS_DIR", &lib)
        .envs(env.iter().copied())
        .output()
        .expect("bash runs");
    let summary = std::fs::read_to_string(out.join("summary.txt")).unwrap_or_else(|e| {
        panic!(
            "no summary.txt ({e}); stdout {} stderr {}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    });
    (o, summary)
}

fn line<'a>(summary: &'a str, start: &str) -> &'a str {
    summary.lines().find(|l| l.starts_with(start)).unwrap_or_else(|| panic!("no line {start:?} in\n{summary}"))
}

#[test]
fn every_stage_is_summarised_with_ratios_from_one_call() {
    let dir = tmp("ok");
    bundle(&dir, false, false);
    let out = dir.join("out");
    let (o, s) = run(&dir, &out, &[]);
    assert!(o.status.success(), "{s}");
    assert!(s.contains("OVERALL: ok"), "{s}");
    for stage in ["tests ", "demo ", "bench ", "torch "] {
        assert!(line(&s, stage).contains(" ok "), "{stage}: {s}");
    }
    assert!(line(&s, "test      gpu_ops").contains("16 passed, max error 3.00e-05 (layernorm)"), "{s}");
    assert!(s.contains("20 steps: worst loss error 1.0e-5, parameters 3.0e-4"), "{s}");
    assert!(s.contains("bf16: whole gradient 3.4e-4 from the CPU"), "{s}");
    assert!(line(&s, "bench").contains("cuBLAS loaded: /x/libcublas.so.13.0"), "{s}");
    assert!(line(&s, "copy bandwidth").contains("semshare 4295.0 GB/s  pytorch 4295.0 GB/s"), "{s}");
    // 2 × 18.9 MB in 10 µs = 3774.9 GB/s = 87.9 % of 4295 GB/s.
    assert!(line(&s, "layernorm fwd").contains("3774.9 GB/s =  87.9% of copy"), "{s}");
    assert!(line(&s, "attention fwd vs SDPA").contains("ratio 1.60"), "{s}");
    assert!(line(&s, "train step TF32").contains("ratio 2.50"), "{s}");
    let gru = line(&s, "Bi-GRU fwd vs cuDNN");
    assert!(gru.contains("missing: semshare bigru_b128_t32_300x512_ieee/fwd pytorch bigru_fwd fp32 (error)"), "{s}");
    assert!(s.contains("error: RuntimeError: no cuDNN"), "{s}");
    // What comes back from the device tool: a few flat files, criterion's packed.
    let files: Vec<String> =
        std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(files.len() <= 8 && files.contains(&"criterion.tar.gz".to_string()), "{files:?}");
    assert!(!out.join("criterion").exists());
    let device = std::fs::read_to_string(out.join("device.txt")).unwrap();
    let cublas = dir.join("lib/libcublas.so.13").canonicalize().unwrap();
    assert!(device.contains(&format!("cuBLAS: {}", cublas.display())), "{device}");
    let lt = dir.join("lib/libcublasLt.so.13").canonicalize().unwrap();
    assert!(device.contains(&format!("cuBLASLt: {}", lt.display())), "{device}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_failure_names_its_test_and_the_deadline_stops_a_hung_stage() {
    let dir = tmp("fail");
    bundle(&dir, true, false);
    let out = dir.join("out");
    let (o, s) = run(&dir, &out, &[("STAGES", "tests,torch")]);
    assert!(!o.status.success(), "{s}");
    assert!(line(&s, "tests ").contains("gpu_train: exit 101: gradient of w: relative error 3.0e-3"), "{s}");
    assert!(s.contains("OVERALL: FAIL") && !s.contains("demo "), "{s}");

    // DEADLINE_S 27 keeps 15 s back for the summary: the sleeping test gets the other 12.
    let out = dir.join("out-deadline");
    let t0 = Instant::now();
    let (o, s) = run(&dir, &out, &[("DEADLINE_S", "27"), ("SLOW", "60")]);
    assert!(t0.elapsed() < Duration::from_secs(27), "{:?}", t0.elapsed());
    assert!(!o.status.success(), "{s}");
    assert!(line(&s, "test      gpu_wait").contains("timed out"), "{s}");
    for stage in ["demo ", "bench ", "torch "] {
        assert!(line(&s, stage).contains("not run: the 27 s deadline was reached"), "{stage}: {s}");
    }

    // cuBLASLt (the bias epilogue's GEMMs) must lie beside the chosen cuBLAS: without it
    // nothing runs, and the summary says why.
    std::fs::remove_file(dir.join("lib/libcublasLt.so.13")).unwrap();
    let (o, s) = run(&dir, &dir.join("out-no-lt"), &[("STAGES", "tests")]);
    assert!(!o.status.success(), "{s}");
    assert!(line(&s, "tests ").contains("not run: no libcublasLt.so.13 beside"), "{s}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The device tool returns at most 8 files from `$OUT`: a set of stages that would leave more
/// is refused before any stage runs (as an unknown stage is), and says how many.
#[test]
fn stages_that_would_leave_more_than_eight_files_are_refused() {
    let dir = tmp("files");
    bundle(&dir, false, false);
    let o = Command::new("bash")
        .arg(dir.join("run.sh"))
        .env("OUT", dir.join("out"))
        .env("STAGES", "tests,demo,bench,torch,profile,cpu")
        .output()
        .expect("bash runs");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("leave 9 files in $OUT and the device tool returns 8"), "{err}");
    assert!(!dir.join("out/tests.log").exists(), "a stage ran");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A bundle with a base commit's bench (`BASE=` in tools/gpu-check.sh): the bench stage runs
/// both, and the summary gives each benchmark's time against the base's, packed together.
#[test]
fn a_base_commits_benchmarks_come_back_as_an_a_b_section() {
    let dir = tmp("ab");
    bundle(&dir, false, true);
    let out = dir.join("out");
    let (o, s) = run(&dir, &out, &[("STAGES", "bench")]);
    assert!(o.status.success(), "{s}");
    assert!(line(&s, "A/B: ").contains("against base abc1234"), "{s}");
    assert!(line(&s, "layernorm_4608x1024/fwd").contains("0.0100 ms  base    0.0125 ms  ratio 0.80"), "{s}");
    assert!(line(&s, "paper_b128_t32/train_step_tf32 ").contains("ratio 0.80"), "{s}");
    assert!(line(&s, "base      copy/dtod_1GiB").contains("0.6250 ms"), "{s}");
    let listed = Command::new("tar").arg("-tzf").arg(out.join("criterion.tar.gz")).output().expect("tar runs");
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.contains("criterion-base/copy/dtod_1GiB/new/estimates.json"), "{listed}");
    assert!(!out.join("criterion-base").exists());
    let _ = std::fs::remove_dir_all(&dir);
}
