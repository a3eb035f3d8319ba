//! Issue 14's reproducers, each turned from "it lost data / it crashed" into "it refused with a
//! clear message": exit code 1, one `error:` line naming the file or option, and nothing that
//! existed before the command changed. Plus: the same command gives the same bytes.
//! Everything runs in its own temporary directory.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::cli::{fails_with, ok, path, semshare, snapshot, spawn};
#[cfg(unix)]
use common::cli::{stopped_by, strs};
use semshare::checkpoint::Checkpoint;

fn tmp(name: &str) -> PathBuf {
    common::cli::tmp("safety", name)
}

/// A tiny dataset at `dir/name`.
fn synth(dir: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let out = dir.join(name);
    let mut args = vec!["synth", "--out", path(&out), "--train", "40", "--val", "12", "--test", "12", "--seed", "2"];
    args.extend_from_slice(extra);
    ok(&semshare(&args));
    out
}

/// A tiny model and budget, as a config file in `dir`.
fn tiny_config(dir: &Path) -> PathBuf {
    tiny_model_config(dir, r#"{"eval_every": 2, "warmup": 1, "batch_size": 8}"#)
}

/// The tiny model with the `train` section `train`, as a config file in `dir`.
fn tiny_model_config(dir: &Path, train: &str) -> PathBuf {
    let model = r#"{"layers": 1, "dim": 16, "heads": 2, "ffn": 32, "word_dim": 8, "gru_hidden": 8}"#;
    let cfg = dir.join("tiny.json");
    std::fs::write(&cfg, format!(r#"{{"model": {model}, "train": {train}}}"#)).unwrap();
    cfg
}

fn train(data: &Path, cfg: &Path, out: &Path, steps: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "train",
        "--data",
        path(data),
        "--config",
        path(cfg),
        "--out",
        path(out),
        "--steps",
        steps,
        "--device",
        "cpu",
    ];
    args.extend_from_slice(extra);
    semshare(&args)
}

/// A config file holding `json`.
fn config(dir: &Path, json: &str) -> PathBuf {
    let p = dir.join("bad.json");
    std::fs::write(&p, json).unwrap();
    p
}

/// A PID no process can have (above the kernel's limit): what a killed process left behind.
fn dead_pid() -> u64 {
    let max = std::fs::read_to_string("/proc/sys/kernel/pid_max").map_or(4_194_304, |s| s.trim().parse().unwrap());
    max + 1
}

// ---- data lost --------------------------------------------------------------------------------

#[test]
fn outputs_never_replace_what_semshare_did_not_write() {
    let dir = tmp("outputs");
    // `synth --out p` over a user's directory: refused, with or without --force.
    let p = dir.join("p");
    std::fs::create_dir_all(p.join("sub")).unwrap();
    std::fs::write(p.join("thesis.txt"), "x").unwrap();
    let before = snapshot(&dir);
    fails_with(&semshare(&["synth", "--out", path(&p)]), "not a dataset");
    fails_with(&semshare(&["synth", "--out", path(&p), "--force"]), "p: is a directory with 2 entries");
    // `synth --out file.txt`: the file stays a file.
    let file = dir.join("file.txt");
    std::fs::write(&file, "keep").unwrap();
    let before_file = snapshot(&dir);
    fails_with(&semshare(&["synth", "--out", path(&file), "--force"]), "file.txt: is a file");
    assert_eq!(snapshot(&dir), before_file);
    std::fs::remove_file(&file).unwrap();
    assert_eq!(snapshot(&dir), before);

    // A dataset of ours is replaced only with --force.
    let data = synth(&dir, "data", &[]);
    let kept = snapshot(&data);
    fails_with(&semshare(&["synth", "--out", path(&data), "--seed", "9"]), "pass --force");
    assert_eq!(snapshot(&data), kept);
    #[cfg(unix)]
    let mode = |p: &Path| std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions()) & 0o777;
    #[cfg(unix)]
    std::fs::set_permissions(&data, std::os::unix::fs::PermissionsExt::from_mode(0o750)).unwrap();
    ok(&semshare(&["synth", "--out", path(&data), "--seed", "9", "--train", "40", "--force"]));
    assert_ne!(snapshot(&data), kept);
    #[cfg(unix)]
    assert_eq!(mode(&data), 0o750, "the replaced dataset's permissions stay");

    // `pack --from src --out src`, and an output holding the source: the source stays.
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("source.json"), r#"{"format": "semshare-source"}"#).unwrap();
    let before = snapshot(&dir);
    fails_with(&semshare(&["pack", "--from", path(&src), "--out", path(&src)]), "is the source directory");
    fails_with(&semshare(&["pack", "--from", path(&src), "--out", path(&dir), "--force"]), "contains the source");
    assert_eq!(snapshot(&dir), before);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn embed_never_writes_over_its_inputs() {
    let dir = tmp("embed");
    let data = synth(&dir, "data", &[]);
    let cfg = tiny_config(&dir);
    let run = dir.join("run");
    ok(&train(&data, &cfg, &run, "2", &[]));
    let ckpt = run.join("best.safetensors");
    let before = snapshot(&dir);
    let embed = |out: &Path, extra: &[&str]| {
        let mut args = vec!["embed", "--data", path(&data), "--checkpoint", path(&ckpt), "--out", path(out)];
        args.extend_from_slice(extra);
        semshare(&args)
    };
    fails_with(&embed(&ckpt, &["--force"]), "is the checkpoint");
    fails_with(&embed(&data.join("test-00000.safetensors"), &["--force"]), "is inside the dataset");
    fails_with(&embed(&dir.join("tiny.json"), &["--force"]), "tiny.json: is a file");
    assert_eq!(snapshot(&dir), before);
    // Its own output is replaced with --force only.
    let emb = dir.join("emb.safetensors");
    ok(&embed(&emb, &[]));
    fails_with(&embed(&emb, &[]), "pass --force");
    ok(&embed(&emb, &["--force"]));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn train_never_replaces_another_runs_checkpoints() {
    let dir = tmp("train");
    let data = synth(&dir, "data", &[]);
    let cfg = tiny_config(&dir);
    let run = dir.join("r");
    ok(&train(&data, &cfg, &run, "2", &[]));
    let first = snapshot(&run);
    // Training again into the same --out: refused, the best checkpoint stays.
    fails_with(&train(&data, &cfg, &run, "4", &["--seed", "1"]), "holds the checkpoints of another run");
    assert_eq!(snapshot(&run), first);
    // Continuing that run is what --resume is for; replacing it, what --force is for.
    let last = run.join("last.safetensors");
    ok(&train(&data, &cfg, &run, "4", &["--resume", path(&last)]));
    // A replacing run that cannot write its first checkpoints (here past a file-size limit;
    // a full disk alike) leaves the run it was replacing as it was.
    let before = snapshot(&run);
    let size = std::fs::metadata(&last).unwrap().len();
    let limit = format!("ulimit -f {}", size / 2048);
    let args = ["train", "--data", path(&data), "--config", path(&cfg), "--out", path(&run), "--steps", "2"];
    let capped = semshare_in_shell(&limit, &[&args[..], &["--seed", "1", "--force", "--device", "cpu"]].concat(), "");
    fails_with(&capped, "best.safetensors: File too large");
    let after = snapshot(&run);
    assert_eq!(after.keys().collect::<Vec<_>>(), before.keys().collect::<Vec<_>>());
    assert!(after.iter().all(|(f, bytes)| f.ends_with(".lock") || before[f] == *bytes), "the old run changed");
    ok(&train(&data, &cfg, &run, "2", &["--seed", "1", "--force"]));
    // Into the dataset: refused.
    let before = snapshot(&data);
    fails_with(&train(&data, &cfg, &data, "2", &[]), "is the dataset (--data)");
    fails_with(&train(&data, &cfg, &data.join("run"), "2", &[]), "is inside the dataset (--data)");
    assert_eq!(snapshot(&data), before);

    // A second `train` while one holds the run directory's lock fails at once; when the holder
    // is gone (as a killed process's lock is), training proceeds.
    let busy = dir.join("busy");
    std::fs::create_dir_all(&busy).unwrap();
    let lock = std::fs::File::create(busy.join(".lock")).unwrap();
    lock.try_lock().unwrap();
    fails_with(&train(&data, &cfg, &busy, "2", &[]), "another `semshare train` is writing this run directory");
    assert!(!busy.join("best.safetensors").exists());
    drop(lock);
    ok(&train(&data, &cfg, &busy, "2", &[]));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Two `train --out r` started together: one trains, the other fails (on the lock, or on the
/// first one's checkpoints if it came later), and `best.safetensors` is the one that trained.
#[test]
fn two_concurrent_trains_into_one_directory_never_both_succeed() {
    let dir = tmp("race");
    let data = synth(&dir, "data", &[]);
    let cfg = tiny_config(&dir);
    let run = dir.join("r");
    let start = |seed: &str| {
        Command::new(env!("CARGO_BIN_EXE_semshare"))
            .args(["train", "--data", path(&data), "--config", path(&cfg), "--out", path(&run)])
            .args(["--steps", "30", "--seed", seed, "--device", "cpu"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (start("1"), start("2"));
    let outs = [a.wait_with_output().unwrap(), b.wait_with_output().unwrap()];
    let won: Vec<usize> = (0..2).filter(|&i| outs[i].status.success()).collect();
    assert_eq!(won.len(), 1, "exactly one succeeds: {:?}", outs.iter().map(|o| o.status).collect::<Vec<_>>());
    let lost = &outs[1 - won[0]];
    let stderr = String::from_utf8_lossy(&lost.stderr);
    assert!(
        stderr.contains("another `semshare train` is writing")
            || stderr.contains("holds the checkpoints of another run"),
        "{stderr}"
    );
    assert_eq!(lost.status.code(), Some(1));
    let best = Checkpoint::load(&run.join("best.safetensors")).unwrap();
    let winner_out = String::from_utf8_lossy(&outs[won[0]].stdout);
    assert!(winner_out.contains(&format!("at step {}", best.step)), "{winner_out} vs step {}", best.step);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn train_writes_a_fresh_run_directory_by_default() {
    let dir = tmp("fresh");
    let data = synth(&dir, "data", &[]);
    let cfg = tiny_config(&dir);
    let run = |extra: &[&str]| {
        let mut args = vec!["train", "--data", path(&data), "--config", path(&cfg), "--steps", "2", "--device", "cpu"];
        args.extend_from_slice(extra);
        Command::new(env!("CARGO_BIN_EXE_semshare")).args(&args).current_dir(&dir).output().unwrap()
    };
    let a = ok(&run(&[]));
    let b = ok(&run(&[]));
    assert!(a.contains("runs/synth-balanced-2-1/best.safetensors"), "{a}");
    assert!(b.contains("runs/synth-balanced-2-2/best.safetensors"), "{b}");
    // A run refused before it trains leaves no directory behind.
    let bad = config(&dir, r#"{"train": {"eps": -1}}"#);
    fails_with(&run(&["--config", path(&bad)]), "train.eps");
    assert!(!dir.join("runs/synth-balanced-2-3").exists());
    // Resuming without --out continues in the checkpoint's directory.
    let c = ok(&run(&["--steps", "4", "--resume", "runs/synth-balanced-2-1/last.safetensors"]));
    assert!(c.contains("trained 2 steps (2 → 4)") && c.contains("runs/synth-balanced-2-1/best"), "{c}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn temporary_files_of_killed_processes_are_removed_when_the_output_is_written_again() {
    let dir = tmp("stale");
    let pid = dead_pid();
    let stale_dataset = dir.join(format!(".data.tmp-{pid}-0"));
    std::fs::create_dir_all(&stale_dataset).unwrap();
    std::fs::write(stale_dataset.join("train-00000.safetensors"), "half").unwrap();
    let live = dir.join(format!(".data.tmp-{}-0", std::process::id()));
    std::fs::create_dir_all(&live).unwrap();
    let data = synth(&dir, "data", &[]);
    assert!(!stale_dataset.exists(), "a dead process's temporary dataset is removed");
    assert!(live.exists(), "a running process's is not");
    // Killed between a replacement's two renames: the old dataset aside, none in its place.
    // The next command to write there puts it back first, and without --force then refuses
    // to replace it.
    let aside = dir.join(format!(".data.tmp-{pid}-1.old"));
    std::fs::rename(&data, &aside).unwrap();
    let finished = dir.join(format!(".data.tmp-{pid}-1"));
    std::fs::create_dir_all(&finished).unwrap();
    let again = semshare(&["synth", "--out", path(&data), "--train", "40", "--val", "12", "--test", "12"]);
    fails_with(&again, "already holds a dataset; pass --force to replace it");
    assert!(String::from_utf8_lossy(&again.stderr).contains("restored"), "{again:?}");
    assert!(!aside.exists() && !finished.exists());
    ok(&semshare(&["check", path(&data)]));

    let cfg = tiny_config(&dir);
    let run = dir.join("run");
    ok(&train(&data, &cfg, &run, "2", &[]));
    let stale = run.join(format!(".last.safetensors.tmp.{pid}.0"));
    std::fs::write(&stale, vec![0u8; 1000]).unwrap();
    let out = train(&data, &cfg, &run, "4", &["--resume", path(&run.join("last.safetensors"))]);
    ok(&out);
    assert!(!stale.exists());
    assert!(String::from_utf8_lossy(&out.stderr).contains("left behind by process"));
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---- panics and aborts ------------------------------------------------------------------------

#[test]
fn sizes_are_checked_before_anything_is_allocated() {
    let dir = tmp("sizes");
    let data = synth(&dir, "data", &[]);
    let run = dir.join("run");
    let cases = [
        (r#"{"model": {"dim": 1000000000}}"#, "model.dim = 1000000000"),
        (r#"{"model": {"gru_hidden": 1000000000}}"#, "model.gru_hidden"),
        (r#"{"model": {"word_dim": 1000000000}}"#, "model.word_dim"),
        (r#"{"model": {"layers": 100000}}"#, "model.layers"),
        (r#"{"model": {"ffn": 1000000000000}}"#, "model.ffn"),
        (r#"{"model": {"ffn": 1e12}}"#, "model.ffn"),
        (r#"{"model": {"dim": 65536}}"#, "this model needs about"),
        (r#"{"train": {"batch_size": 100000000}}"#, "train.batch_size"),
    ];
    for (json, needle) in cases {
        let cfg = config(&dir, json);
        fails_with(&semshare(&["train", "--data", path(&data), "--config", path(&cfg), "--out", path(&run)]), needle);
    }
    assert!(!run.join("best.safetensors").exists());
    let big = dir.join("big");
    fails_with(&semshare(&["synth", "--out", path(&big), "--train", "100000000"]), "GiB to generate");
    fails_with(&semshare(&["synth", "--out", path(&big), "--train", &u64::MAX.to_string()]), "overflows");
    assert!(!big.exists());
    fails_with(
        &semshare(&["pack", "--from", path(&dir), "--out", path(&dir.join("o")), "--shard-mb", "17592186044416"]),
        "--shard-mb 17592186044416",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Rewrites one `__metadata__` entry of a safetensors file.
fn set_metadata(file: &Path, key: &str, value: &str) {
    let bytes = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header["__metadata__"][key] = value.into();
    let mut h = serde_json::to_vec(&header).unwrap();
    h.resize(h.len().next_multiple_of(8), b' ');
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(file, out).unwrap();
}

#[test]
fn checkpoints_are_checked_before_anything_is_allocated() {
    let dir = tmp("ckpt");
    let data = synth(&dir, "data", &[]);
    let cfg = tiny_config(&dir);
    let run = dir.join("run");
    ok(&train(&data, &cfg, &run, "2", &[]));
    let good = std::fs::read(run.join("last.safetensors")).unwrap();
    let bad = dir.join("bad.safetensors");
    let model: serde_json::Value =
        serde_json::to_value(Checkpoint::load(&run.join("last.safetensors")).unwrap().model).unwrap();
    for (key, value, needle) in
        [("dim", 65536, "has shape"), ("dim", 1_000_000_000, "model.dim"), ("gru_hidden", 1_000_000_000, "gru_hidden")]
    {
        std::fs::write(&bad, &good).unwrap();
        let mut m = model.clone();
        m[key] = value.into();
        set_metadata(&bad, "model", &m.to_string());
        let e = Checkpoint::load(&bad).unwrap_err().to_string();
        assert!(e.contains("bad.safetensors") && e.contains(needle), "{e}");
        fails_with(&semshare(&["eval", "--data", path(&data), "--checkpoint", path(&bad)]), needle);
        fails_with(&train(&data, &cfg, &dir.join("resumed"), "4", &["--resume", path(&bad)]), "bad.safetensors");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// SIGINT (Ctrl-C) or SIGTERM (a scheduler's notice) to a running `train`: it stops after the
/// step under way, writes `last.safetensors` at that step, says so, and ends by the signal;
/// and `--resume` continues it.
#[cfg(unix)]
#[test]
fn a_signal_stops_train_with_a_checkpoint_to_resume_from() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tmp("signal");
    let data = synth(&dir, "data", &[]);
    let cfg = tiny_model_config(&dir, r#"{"eval_every": 2, "warmup": 1, "batch_size": 8, "patience": 0}"#);
    for (signal, number) in [("INT", 2), ("TERM", 15)] {
        let run = dir.join(signal);
        let args = ["train", "--data", path(&data), "--config", path(&cfg), "--out", path(&run)];
        // After a validation's line: steps are being trained.
        let (status, stdout, seen) =
            stopped_by(&[&args[..], &["--steps", "1000000", "--device", "cpu"]].concat(), " val ", signal);
        assert_eq!(status.signal(), Some(number), "ended by SIG{signal}: {seen}");
        assert!(seen.contains("stopping after this step"), "{seen}");
        let last = Checkpoint::load(&run.join("last.safetensors")).unwrap();
        assert!(stdout.contains(&format!("stopped by SIG{signal} at step {} of 1000000", last.step)), "{stdout}");
        let total = (last.step + 2).to_string();
        let resumed = ok(&train(&data, &cfg, &run, &total, &["--resume", path(&run.join("last.safetensors"))]));
        assert!(resumed.contains(&format!("trained 2 steps ({} → {total})", last.step)), "{resumed}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The studies stop the same way: `experiment` and `tune` end by the signal once the run or
/// trial in progress has written its checkpoint, and the same command continues from it to
/// the results of a study never stopped.
#[cfg(unix)]
#[test]
fn a_signal_stops_a_study_and_the_same_command_continues_it() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tmp("signal-study");
    let data = synth(&dir, "data", &[]);
    let cfg = tiny_model_config(&dir, r#"{"eval_every": 100, "warmup": 1, "batch_size": 8}"#);
    let experiment = |out: &Path| -> Vec<String> {
        let (results, runs) = (out.join("results"), out.join("runs"));
        let fixed = ["experiment", "--suite", "table1", "--variants", "ours", "--seeds", "1", "--steps", "300"];
        let paths = [("--data", data.clone()), ("--config", cfg.clone()), ("--out", results), ("--runs", runs)];
        let paths = paths.into_iter().flat_map(|(flag, p)| [flag.to_string(), path(&p).to_string()]);
        fixed.iter().map(|a| a.to_string()).chain(["--device".into(), "cpu".into()]).chain(paths).collect()
    };
    let stopped = experiment(&dir.join("stopped"));
    // Piped, the progress prints every tenth of the run: the first line is at step 30 of 300.
    let (status, stdout, stderr) = stopped_by(&strs(&stopped), "/300  loss", "TERM");
    assert_eq!(status.signal(), Some(15), "{stderr}");
    assert!(stdout.contains("stopped by SIGTERM: 0/1 runs finished; the same command continues"), "{stdout}");
    assert!(stderr.contains("run ours seed 0 stopped at step "), "{stderr}");
    let resumed = semshare(&strs(&stopped));
    let text = format!("{}{}", ok(&resumed), String::from_utf8_lossy(&resumed.stderr));
    assert!(text.contains("continuing this run from") && text.contains("1/1 runs finished"), "{text}");
    ok(&semshare(&strs(&experiment(&dir.join("whole")))));
    let scores = |out: &str| {
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join(out).join("results/table1-state.json")).unwrap()).unwrap();
        (state["finished"][0]["scores"].clone(), state["finished"][0]["best_step"].clone())
    };
    assert_eq!(scores("stopped"), scores("whole"));

    let tune = [
        "tune",
        "--trials",
        "3",
        "--rungs",
        "1",
        "--min-steps",
        "200",
        "--workers",
        "1",
        "--device",
        "cpu",
        "--data",
        path(&data),
        "--config",
        path(&cfg),
        "--out",
    ];
    let out = dir.join("tune");
    let tune = [&tune[..], &[path(&out)]].concat();
    let (status, stdout, stderr) = stopped_by(&tune, "trial 1 rung 0: 200 steps", "INT");
    assert_eq!(status.signal(), Some(2), "{stderr}");
    assert!(stdout.contains("stopped by SIGINT: 1/3 training runs finished; the same command continues"), "{stdout}");
    assert!(stderr.contains("trial 1 rung 0: stopped at step "), "{stderr}");
    let resumed = ok(&semshare(&tune));
    assert!(resumed.contains("3/3 training runs finished"), "{resumed}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Runs the binary, killing it if it has not finished within a minute (a hang is a failure).
fn semshare_within_a_minute(args: &[&str]) -> Output {
    let mut child = spawn(args);
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            panic!("semshare {args:?} hangs");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn fifos_devices_and_directories_are_refused_at_open() {
    let dir = tmp("fifo");
    let data = synth(&dir, "data", &[]);
    let cfg = tiny_config(&dir);
    let run = dir.join("run");
    ok(&train(&data, &cfg, &run, "2", &[]));
    let ckpt = run.join("best.safetensors");
    let shard = data.join("val-00000.safetensors");
    std::fs::remove_file(&shard).unwrap();
    assert!(Command::new("mkfifo").arg(&shard).status().unwrap().success());
    let d = path(&data);
    for args in [
        vec!["check", d],
        vec!["train", "--data", d, "--config", path(&cfg), "--out", path(&dir.join("r2"))],
        vec!["eval", "--data", d, "--checkpoint", path(&ckpt)],
        vec!["embed", "--data", d, "--checkpoint", path(&ckpt), "--out", path(&dir.join("e.safetensors"))],
    ] {
        fails_with(&semshare_within_a_minute(&args), "val-00000.safetensors: is a FIFO, not a regular file");
    }
    let fifo = dir.join("emb.safetensors");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    fails_with(&semshare_within_a_minute(&["score", "--embeddings", path(&fifo)]), "emb.safetensors: is a FIFO");
    let other = synth(&dir, "other", &[]);
    fails_with(
        &semshare(&["train", "--data", path(&other), "--config", "/dev/zero"]),
        "/dev/zero: is a device, not a regular file",
    );
    fails_with(&semshare(&["train", "--data", path(&other), "--config", path(&dir)]), "is a directory");
    let huge = dir.join("huge.json");
    std::fs::File::create(&huge).unwrap().set_len(17 << 20).unwrap();
    fails_with(&semshare(&["train", "--data", path(&other), "--config", path(&huge)]), "huge.json: 17825792 bytes");
    fails_with(&semshare(&["eval", "--data", path(&other), "--checkpoint", path(&dir)]), "is a directory");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `check` reads by pread: a shard truncated after the dataset was opened (as by another process
/// while `check` runs) is an error naming it, where reading through the map raised SIGBUS.
#[test]
fn a_shard_truncated_under_check_is_an_error_not_a_signal() {
    let dir = tmp("truncate");
    let data = synth(&dir, "data", &[]);
    let reader = semshare::data::reader::DatasetReader::open(&data).unwrap();
    assert!(reader.check(10).is_empty());
    let shard = data.join("train-00000.safetensors");
    let len = std::fs::metadata(&shard).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&shard).unwrap().set_len(len / 2).unwrap();
    let problems = reader.check(10);
    assert!(!problems.is_empty());
    for p in &problems {
        assert!(p.to_string().contains("train-00000.safetensors"), "{p}");
    }
    let split = reader.split("train").unwrap();
    let (shard, k) = split.locate_image(split.num_images() - 1);
    assert!(shard.check_image(&reader.layout, k).unwrap_err().to_string().contains("train-00000.safetensors"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `semshare args…` run by bash with `setup` first (a file-size limit, a redirection).
fn semshare_in_shell(setup: &str, args: &[&str], redirect: &str) -> Output {
    let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
    let line = format!("{setup}; exec '{}' {} {redirect}", env!("CARGO_BIN_EXE_semshare"), quoted.join(" "));
    Command::new("bash").args(["-c", &line]).output().expect("bash runs")
}

/// A memory limit of the process (`ulimit -v`, as a batch scheduler sets one) counts as the
/// machine's memory does: a one-line refusal before the allocation, not an abort (SIGABRT).
#[test]
#[cfg(target_os = "linux")]
fn a_process_memory_limit_is_a_refusal_not_an_abort() {
    let dir = tmp("rlimit");
    let (d, v) = (dir.join("d"), dir.join("v.idx"));
    let big = ["synth", "--out", path(&d), "--train", "200000", "--val", "5", "--test", "5"];
    let out = semshare_in_shell("ulimit -v 1000000", &big, "");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    fails_with(&out, "200010 images need about");
    // A sparse 3 GiB array is refused before it is read into memory.
    let npy = dir.join("big.npy");
    semshare::index::npy::write_npy(&npy, &[1.0; 256], &[1, 256]).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&npy).unwrap();
    f.set_len(3 << 30).unwrap();
    let index = ["index", "--vectors", path(&npy), "--out", path(&v)];
    fails_with(&semshare_in_shell("ulimit -v 1000000", &index, ""), "more than the memory available to read it into");
    assert!(!d.exists() && !v.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_full_disk_or_a_file_size_limit_is_an_error_naming_the_file_not_a_kill() {
    let dir = tmp("limits");
    let npy = dir.join("v.npy");
    let values: Vec<f32> = (0..4000 * 16).map(|i| (i % 7) as f32 + 1.0).collect();
    semshare::index::npy::write_npy(&npy, &values, &[4000, 16]).unwrap();
    let idx = dir.join("g.idx");
    let small = dir.join("small.idx");
    ok(&semshare(&["index", "--vectors", path(&npy), "--out", path(&small)]));
    // Past `ulimit -f` (16 KiB), the 256 KiB index cannot be written: EFBIG, not SIGXFSZ.
    let out = semshare_in_shell("ulimit -f 16", &["index", "--vectors", path(&npy), "--out", path(&idx)], "");
    fails_with(&out, &format!("{}: File too large", idx.display()));
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(left.iter().all(|n| !n.to_string_lossy().contains(".tmp.")), "temp files left: {left:?}");
    // A dataset's error names the file as the dataset would call it, not its hidden build.
    let d = dir.join("d");
    let synth = ["synth", "--out", path(&d), "--train", "40", "--val", "12", "--test", "12"];
    fails_with(
        &semshare_in_shell("ulimit -f 16", &synth, ""),
        &format!("{}: File too large", d.join("train-00000.safetensors").display()),
    );
    // An export is a pair, vectors and ids: both are written before either replaces the old
    // pair, so a failure in the larger one leaves the old ids beside the old vectors.
    let ids = dir.join("ids.txt");
    std::fs::write(&ids, (0..4000).map(|i| format!("other-{i}\n")).collect::<String>()).unwrap();
    let other = dir.join("other.idx");
    ok(&semshare(&["index", "--vectors", path(&npy), "--ids", path(&ids), "--out", path(&other)]));
    let export = dir.join("e.npy");
    ok(&semshare(&["export", "--index", path(&small), "--format", "npy", "--out", path(&export)]));
    let pair = |d: &Path| (std::fs::read(d.join("e.npy")).unwrap(), std::fs::read(d.join("e.ids.txt")).unwrap());
    let before = pair(&dir);
    let again = ["export", "--index", path(&other), "--format", "npy", "--out", path(&export), "--force"];
    fails_with(&semshare_in_shell("ulimit -f 100", &again, ""), "e.npy: File too large");
    assert!(pair(&dir) == before, "the old export changed");
    // The results of `query` are its output: lost to a full disk, the command says so.
    let query = ["query", "--index", path(&small), "--vectors", path(&npy), "--k", "3"];
    fails_with(&semshare_in_shell("true", &query, "> /dev/full"), "stdout: No space left on device");
    // A reader that stops early is not an error.
    let head = semshare_in_shell("set -o pipefail", &query, "| head -1");
    assert_eq!(head.status.code(), Some(0), "{head:?}");
    assert_eq!(String::from_utf8_lossy(&head.stdout).lines().count(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---- silently accepted ------------------------------------------------------------------------

#[test]
fn every_hyper_parameter_has_a_range_and_the_dataset_decides_its_own_sizes() {
    let dir = tmp("ranges");
    let data = synth(&dir, "data", &[]);
    let run = dir.join("run");
    let cases = [
        (r#"{"train": {"min_lr_ratio": -5}}"#, "train.min_lr_ratio = -5"),
        (r#"{"train": {"eps": -1}}"#, "train.eps = -1"),
        (r#"{"train": {"clip_norm": -1}}"#, "train.clip_norm = -1"),
        (r#"{"train": {"lr": 0}}"#, "train.lr = 0"),
        (r#"{"train": {"beta2": 1.5}}"#, "train.beta2 = 1.5"),
        (r#"{"train": {"weight_decay": -0.1}}"#, "train.weight_decay"),
        (
            r#"{"train": {"eval_k": 18446744073709551615}}"#,
            "train.eval_k = 18446744073709551615 is not in 1..=16777216",
        ),
        (r#"{"model": {"region_dim": 7}}"#, "model.region_dim = 7, but dataset"),
        (r#"{"model": {"vocab": 5}}"#, "model.vocab = 5, but dataset"),
        (r#"{"model": {"text_feature_dim": 12}}"#, "model.text_feature_dim = 12, but dataset"),
    ];
    for (json, needle) in cases {
        let cfg = config(&dir, json);
        fails_with(&semshare(&["train", "--data", path(&data), "--config", path(&cfg), "--out", path(&run)]), needle);
    }
    assert!(!run.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn resuming_a_finished_run_says_so_and_claims_no_checkpoint() {
    let dir = tmp("resume");
    let data = synth(&dir, "data", &[]);
    let cfg = tiny_config(&dir);
    let a = dir.join("a");
    ok(&train(&data, &cfg, &a, "2", &[]));
    let b = dir.join("b");
    let out = ok(&train(&data, &cfg, &b, "2", &["--resume", path(&a.join("last.safetensors"))]));
    assert!(out.contains("is at step 2 already") && out.contains("nothing trained"), "{out}");
    assert!(!out.contains("b/best.safetensors") && !b.exists(), "{out}");
    // Continued into another directory, the run gets its own best checkpoint there.
    let out = ok(&train(&data, &cfg, &b, "4", &["--resume", path(&a.join("last.safetensors"))]));
    assert!(out.contains("trained 2 steps (2 → 4)") && b.join("best.safetensors").is_file(), "{out}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn corrupt_optimiser_state_is_an_error_naming_file_and_tensor() {
    let dir = tmp("state");
    let data = synth(&dir, "data", &[]);
    let cfg = tiny_config(&dir);
    let run = dir.join("run");
    ok(&train(&data, &cfg, &run, "2", &[]));
    let last = run.join("last.safetensors");
    let bad = dir.join("bad.safetensors");
    let mut ckpt = Checkpoint::load(&last).unwrap();
    ckpt.state = "{\"best_ndcg\": ".into();
    ckpt.save(&bad).unwrap();
    fails_with(
        &train(&data, &cfg, &dir.join("r1"), "4", &["--resume", path(&bad)]),
        "bad.safetensors: metadata `state`",
    );
    // `save` refuses a negative second moment, so the file is corrupted in place.
    let mut bytes = std::fs::read(&last).unwrap();
    let (header_len, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let start = 8 + header_len + header.info("optimizer.exp_avg_sq").unwrap().data_offsets.0 + 3 * 4;
    bytes[start..start + 4].copy_from_slice(&(-1.0f32).to_le_bytes());
    std::fs::write(&bad, bytes).unwrap();
    fails_with(
        &train(&data, &cfg, &dir.join("r2"), "4", &["--resume", path(&bad)]),
        "bad.safetensors: not a valid semshare checkpoint: tensor `optimizer.exp_avg_sq` holds a negative value",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_empty_split_is_an_error_naming_it_before_any_work() {
    let dir = tmp("empty");
    let cfg = tiny_config(&dir);
    let no_val = synth(&dir, "no-val", &["--val", "0"]);
    let run = dir.join("run");
    fails_with(&train(&no_val, &cfg, &run, "2", &[]), "split `val` is empty");
    assert!(!run.exists(), "refused before the run directory is made");
    let no_test = synth(&dir, "no-test", &["--test", "0"]);
    ok(&train(&no_test, &cfg, &run, "2", &[]));
    let ckpt = run.join("best.safetensors");
    fails_with(&semshare(&["eval", "--data", path(&no_test), "--checkpoint", path(&ckpt)]), "split `test` is empty");
    let emb = dir.join("e.safetensors");
    fails_with(
        &semshare(&["embed", "--data", path(&no_test), "--checkpoint", path(&ckpt), "--out", path(&emb)]),
        "split `test` is empty",
    );
    assert!(!emb.exists());
    let suite = dir.join("suite");
    fails_with(
        &semshare(&[
            "experiment",
            "--suite",
            "table1",
            "--data",
            path(&no_test),
            "--variants",
            "ours",
            "--seeds",
            "1",
            "--out",
            path(&suite),
            "--runs",
            path(&suite),
            "--steps",
            "2",
        ]),
        "split `test` is empty",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---- same command, same bytes -----------------------------------------------------------------

#[test]
fn synth_train_and_embed_twice_give_byte_identical_files() {
    let dir = tmp("bytes");
    let cfg = tiny_config(&dir);
    let mut outputs = Vec::new();
    for name in ["a", "b"] {
        let root = dir.join(name);
        let data = synth(&root, "data", &["--preset", "weak-text"]);
        let run = root.join("run");
        ok(&train(&data, &cfg, &run, "4", &["--seed", "3"]));
        let emb = root.join("emb.safetensors");
        let ckpt = run.join("best.safetensors");
        ok(&semshare(&["embed", "--data", path(&data), "--checkpoint", path(&ckpt), "--out", path(&emb)]));
        let (results, runs) = (root.join("results"), root.join("suite-runs"));
        ok(&semshare(&[
            "experiment",
            "--suite",
            "table1",
            "--data",
            path(&data),
            "--variants",
            "ours",
            "--seeds",
            "1",
            "--config",
            path(&cfg),
            "--steps",
            "2",
            "--out",
            path(&results),
            "--runs",
            path(&runs),
            "--device",
            "cpu",
        ]));
        // The suite's state records each run's wall-clock seconds (for its ETA); the reports
        // made from it do not.
        std::fs::remove_file(results.join("table1-state.json")).unwrap();
        outputs.push(snapshot(&root));
    }
    let names: Vec<_> = outputs[0].keys().collect();
    assert!(names.iter().any(|n| n.ends_with("train-00000.safetensors")), "{names:?}");
    assert!(names.iter().any(|n| n.ends_with("run/last.safetensors")), "{names:?}");
    assert!(names.iter().any(|n| n.ends_with("results/table1.json")), "{names:?}");
    assert_eq!(outputs[0].keys().collect::<Vec<_>>(), outputs[1].keys().collect::<Vec<_>>());
    for (file, bytes) in &outputs[0] {
        assert!(&outputs[1][file] == bytes, "{} differs between two identical runs", file.display());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--force` replaces what semshare wrote and nothing else: a dataset, a run directory or the
/// demo's directory that also holds a user's own file is refused whole, naming the file, the
/// demo writes only where it wrote before (its mark) or into a new directory, and a
/// replacing run that fails before its first checkpoint leaves the old run as it was.
#[test]
fn force_never_deletes_a_users_own_files() {
    let dir = tmp("force");
    let data = synth(&dir, "data", &[]);
    let cfg = tiny_config(&dir);

    // A dataset holding a user's notes: synth --force would have replaced the directory whole.
    std::fs::write(data.join("notes.txt"), "mine").unwrap();
    let before = snapshot(&dir);
    fails_with(
        &semshare(&["synth", "--out", path(&data), "--force"]),
        "holds an entry that its manifest does not list (`notes.txt`)",
    );
    assert_eq!(snapshot(&dir), before);
    std::fs::remove_file(data.join("notes.txt")).unwrap();

    // A run directory: the user's own files there (a log, an index) are never touched, and do
    // not stop a resume or a replacing run.
    let run = dir.join("run");
    ok(&train(&data, &cfg, &run, "2", &[]));
    std::fs::write(run.join("train.log"), "mine").unwrap();
    ok(&train(&data, &cfg, &run, "4", &["--resume", path(&run.join("last.safetensors"))]));
    ok(&train(&data, &cfg, &run, "2", &["--force"]));
    assert_eq!(std::fs::read(run.join("train.log")).unwrap(), b"mine");
    std::fs::remove_file(run.join("train.log")).unwrap();
    let mine = dir.join("mine");
    std::fs::create_dir_all(&mine).unwrap();
    std::fs::write(mine.join("best.safetensors"), "not a checkpoint").unwrap();
    std::fs::write(mine.join("resolved-config.json"), "{\"mine\": 1}").unwrap();
    let before = snapshot(&dir);
    fails_with(&train(&data, &cfg, &mine, "2", &["--force"]), "which is not a checkpoint semshare wrote");
    std::fs::remove_file(mine.join("best.safetensors")).unwrap();
    fails_with(
        &train(&data, &cfg, &mine, "2", &[]),
        "holds `resolved-config.json`, which is not a configuration semshare wrote",
    );
    std::fs::write(mine.join("best.safetensors"), "not a checkpoint").unwrap();
    assert_eq!(snapshot(&dir), before);

    // Resuming a checkpoint that lies among a user's files, without --out: not a run directory.
    let models = dir.join("models");
    std::fs::create_dir_all(&models).unwrap();
    std::fs::copy(run.join("last.safetensors"), models.join("model.safetensors")).unwrap();
    std::fs::write(models.join("last.safetensors"), "another model").unwrap();
    let before = snapshot(&dir);
    let resume = models.join("model.safetensors");
    let out = semshare(&[
        "train",
        "--data",
        path(&data),
        "--config",
        path(&cfg),
        "--resume",
        path(&resume),
        "--steps",
        "4",
        "--device",
        "cpu",
    ]);
    fails_with(&out, "holds `last.safetensors`, which is not a checkpoint semshare wrote");
    assert_eq!(snapshot(&dir), before);

    // --force over our own run, failing before its first checkpoint: the old run is unchanged.
    let before = snapshot(&run);
    fails_with(&train(&data, &cfg, &run, "2", &["--force", "--batch", "300"]), "fewer paired images");
    assert_eq!(snapshot(&run), before);

    // A run that made its directory and fails before a checkpoint leaves no directory behind.
    let fresh = dir.join("fresh");
    fails_with(&train(&data, &cfg, &fresh, "2", &["--batch", "300"]), "fewer paired images");
    assert!(!fresh.exists(), "a failed run leaves no directory it made");

    // The demo replaces its own earlier output only.
    let demo = |out: &Path| {
        semshare(&[
            "demo",
            "--out",
            path(out),
            "--steps",
            "1",
            "--train",
            "64",
            "--val",
            "16",
            "--test",
            "16",
            "--device",
            "cpu",
        ])
    };
    let d = dir.join("demo");
    ok(&demo(&d));
    ok(&demo(&d));
    std::fs::write(d.join("data").join("notes.txt"), "mine").unwrap();
    // semshare's own files in a directory the demo did not mark are a user's: a dataset where
    // the demo puts its data, a model where it puts its checkpoints.
    let project = dir.join("project");
    synth(&project, "data", &[]);
    let kept = dir.join("kept");
    std::fs::create_dir_all(&kept).unwrap();
    std::fs::copy(run.join("best.safetensors"), kept.join("best.safetensors")).unwrap();
    let before = snapshot(&dir);
    fails_with(&demo(&project), "holds an entry and is not marked as the demo's (semshare-demo.txt)");
    fails_with(&demo(&kept), "is not marked as the demo's");
    fails_with(&demo(&d), "(`notes.txt`)");
    fails_with(&demo(&data), "is a dataset; a run directory may not be one");
    fails_with(&demo(&mine), "holds a `semshare train` run");
    fails_with(&demo(&run), "holds a `semshare train` run");
    assert_eq!(snapshot(&dir), before);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Studies (`experiment`, `tune`) share nothing they did not make: a runs directory belongs to
/// the state file that claimed it (another study's runs were deleted, and its checkpoints
/// read as this one's), and a report file with no state file beside it is somebody's.
#[test]
fn studies_never_replace_another_studys_runs_or_reports() {
    let dir = tmp("studies");
    let data = synth(&dir, "data", &[]);
    let cfg = tiny_config(&dir);
    let experiment = |out: &str, runs: &str| {
        let (out, runs) = (dir.join(out), dir.join(runs));
        semshare(&[
            "experiment",
            "--suite",
            "table1",
            "--data",
            path(&data),
            "--config",
            path(&cfg),
            "--seed",
            "0",
            "--steps",
            "2",
            "--variants",
            "ridge",
            "--out",
            path(&out),
            "--runs",
            path(&runs),
            "--device",
            "cpu",
        ])
    };
    ok(&experiment("a", "runs"));
    ok(&experiment("a", "runs")); // its own runs: resumed
    // A study from before owner.txt (its state file there, run directories only): adopted,
    // also when a study killed while writing owner.txt left its temp file there.
    std::fs::create_dir_all(dir.join("runs/table1/ours-s0")).unwrap();
    std::fs::remove_file(dir.join("runs/table1/owner.txt")).unwrap();
    let killed = dir.join(format!("runs/table1/.owner.txt.tmp.{}.0", dead_pid()));
    std::fs::write(&killed, "").unwrap();
    ok(&experiment("a", "runs"));
    assert!(dir.join("runs/table1/owner.txt").is_file() && !killed.exists());
    let before = snapshot(&dir);
    fails_with(&experiment("b", "runs"), "holds the runs of the study whose state is");
    assert_eq!(snapshot(&dir), before);

    // A report without its state file beside it.
    let mine = dir.join("mine");
    std::fs::create_dir_all(&mine).unwrap();
    std::fs::write(mine.join("table1.md"), "# my own table").unwrap();
    let before = snapshot(&dir);
    fails_with(&experiment("mine", "runs-mine"), "table1.md: exists, and no table1-state.json beside it");
    assert_eq!(snapshot(&dir), before);

    // A runs directory holding somebody's files.
    std::fs::create_dir_all(dir.join("theirs/table1")).unwrap();
    std::fs::write(dir.join("theirs/table1/notes.txt"), "mine").unwrap();
    fails_with(&experiment("c", "theirs"), "is not empty and names no study");
    std::fs::write(dir.join("file.txt"), "mine").unwrap();
    fails_with(&experiment("file.txt", "runs-file"), "file.txt: is not a directory");
    assert!(dir.join("theirs/table1/notes.txt").is_file());
    std::fs::remove_dir_all(&dir).unwrap();
}
