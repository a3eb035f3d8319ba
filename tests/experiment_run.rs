//! The experiment runner (`src/experiment/run.rs`) and `semshare experiment`: a restricted Table 1
//! suite on a tiny dataset, resumption after a kill, refusal of another suite's state, the CCA
//! baseline's features (hand-computed) and its retrieval on exactly linearly related modalities.

mod common;
use common::tiny_model;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use semshare::Error;
use semshare::backend::cpu::Cpu;
use semshare::data::Meta;
use semshare::data::format::{FeatureDtype, Layout, reserved_vocab};
use semshare::data::reader::DatasetReader;
use semshare::data::synth::{SynthConfig, SynthPreset, generate};
use semshare::data::writer::{DatasetWriter, ImageRecord, TextRecord};
use semshare::eval::EvalConfig;
use semshare::eval::cca::CcaConfig;
use semshare::experiment::baselines::{
    RIDGE_GRID, bag_of_words, bow_vocabulary, cca_grid, cca_report, linear_report, mean_region_features,
    mean_text_features, ridge_report, select_cca,
};
use semshare::experiment::run::{ExperimentConfig, fingerprint, is_legacy_fingerprint, run_suite, state_path};
use semshare::experiment::suite::{RunKey, RunRecord, SuiteKind, SuiteState};
use semshare::model::ModelConfig;
use semshare::model::Variant;
use semshare::train::TrainConfig;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("semshare-exprun-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A tiny synthetic dataset on disk (token texts).
fn tiny_data(dir: &Path) -> Arc<DatasetReader> {
    let mut cfg = SynthConfig::preset(SynthPreset::Balanced, 4);
    (cfg.train, cfg.val, cfg.test) = (48, 16, 24);
    (cfg.feature_dim, cfg.vocab_size, cfg.max_tokens, cfg.regions) = (16, 60, 8, 6);
    generate(&cfg).unwrap().save(dir.join("data")).unwrap();
    Arc::new(DatasetReader::open(dir.join("data")).unwrap())
}

fn config(data: &DatasetReader, dir: &Path, variants: &[Variant], seeds: u64) -> ExperimentConfig {
    ExperimentConfig {
        suite: SuiteKind::Table1,
        seeds,
        only_seed: None,
        variants: Some(variants.to_vec()),
        model: tiny_model(data),
        train: TrainConfig { steps: 3, batch_size: 8, warmup: 1, eval_every: 0, ..TrainConfig::default() },
        out: dir.join("results"),
        runs_dir: dir.join("runs"),
        progress: None,
        stop: None,
    }
}

fn keys(state: &SuiteState) -> Vec<RunKey> {
    state.finished.iter().map(|r| r.key).collect()
}

/// The same records, up to the last digit the state file's JSON may change (serde_json reads
/// floats back to within an ulp, not always exactly).
fn same_records(a: &[RunRecord], b: &[RunRecord]) {
    assert_eq!(a.len(), b.len());
    let close = |x: f64, y: f64| (x - y).abs() <= 1e-9 * x.abs().max(1.0);
    for (x, y) in a.iter().zip(b) {
        assert_eq!((x.key, x.best_step, x.scores.k), (y.key, y.best_step, y.scores.k));
        let (s, t) = (&x.scores, &y.scores);
        let pairs = [
            (s.ndcg.i2t, t.ndcg.i2t),
            (s.ndcg.t2i, t.ndcg.t2i),
            (s.ndcg.avg, t.ndcg.avg),
            (s.map_all.i2t, t.map_all.i2t),
            (s.map_all.t2i, t.map_all.t2i),
            (s.map_all.avg, t.map_all.avg),
            (x.seconds, y.seconds),
        ];
        assert!(pairs.iter().all(|&(u, v)| close(u, v)), "{}: {pairs:?}", x.key);
        match (x.label, y.label) {
            (Some(l), Some(m)) => assert!(close(l.ndcg.avg, m.ndcg.avg) && close(l.map_all.avg, m.map_all.avg)),
            (l, m) => assert_eq!(l.is_some(), m.is_some(), "{}: label scores on one side only", x.key),
        }
    }
}

#[test]
fn a_restricted_table1_suite_completes_and_writes_the_table() {
    let dir = tmp("table1");
    let data = tiny_data(&dir);
    let cfg = config(&data, &dir, &[Variant::WoC, Variant::Ours, Variant::Cca], 2);
    let state = run_suite(&mut Cpu::new(), &data, &cfg).unwrap();
    // Suite order (seed-major, Table 1's variant order), whatever order --variants named them.
    let want: Vec<RunKey> = (0..2)
        .flat_map(|seed| [Variant::Ours, Variant::WoC, Variant::Cca].map(|variant| RunKey { variant, seed, eta: None }))
        .collect();
    assert_eq!(keys(&state), want);
    for r in &state.finished {
        let trained = r.key.variant != Variant::Cca;
        assert_eq!(r.best_step, if trained { 3 } else { 0 }, "{}", r.key);
        assert!(r.scores.k == 500 && r.scores.ndcg.avg > 0.0 && r.seconds > 0.0, "{:?}", r.scores);
        assert!(r.report["i2t"]["ndcg"].is_array(), "the full report is kept");
        // Label scores of the same checkpoint for the trained runs; CCA has no classifier.
        assert_eq!(r.label.is_some(), trained, "{}", r.key);
        assert!(r.label.is_none_or(|l| l.k == 500 && l.ndcg.avg > 0.0 && l != r.scores), "{:?}", r.label);
        let run = dir.join("runs/table1").join(format!("{}-s{}", r.key.variant, r.key.seed));
        assert_eq!(run.join("best.safetensors").is_file(), trained, "{}", run.display());
    }
    let md = std::fs::read_to_string(dir.join("results/table1.md")).unwrap();
    let (pooled, label) = md.split_once("ranked with the label embedding").unwrap();
    for row in ["| ours | 2 |", "| wo-c | 2 |", "| cca | 2 |"] {
        assert!(pooled.contains(row), "{row} missing from\n{md}");
    }
    assert!(label.contains("| ours | 2 |") && label.contains("| wo-c | 2 |") && !label.contains("| cca"), "{md}");
    assert!(!md.contains("ours+con"), "{md}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("results/table1.json")).unwrap()).unwrap();
    assert_eq!(json["rows"].as_array().unwrap().len(), 3);
    assert_eq!(json["label_rows"].as_array().unwrap().len(), 2);
    // CCA is deterministic: both seeds give the same scores.
    let cca = state.records_of(Variant::Cca, None);
    assert_eq!(cca[0].scores, cca[1].scores);
    // Run again: nothing left to do, nothing changes.
    let again = run_suite(&mut Cpu::new(), &data, &cfg).unwrap();
    assert_eq!(again.suite, state.suite);
    same_records(&again.finished, &state.finished);
}

#[test]
fn an_eta_sweep_writes_figure1_and_its_own_table() {
    let dir = tmp("eta");
    let data = tiny_data(&dir);
    let cfg = ExperimentConfig { suite: SuiteKind::Eta, ..config(&data, &dir, &[Variant::OursCon], 1) };
    let state = run_suite(&mut Cpu::new(), &data, &cfg).unwrap();
    let etas: Vec<Option<f64>> = state.finished.iter().map(|r| r.key.eta).collect();
    assert_eq!(etas, [0.0, 0.01, 0.1, 1.0, 10.0].map(Some));
    assert!(dir.join("runs/eta/ours+con-s0-eta0.01/best.safetensors").is_file());
    let svg = std::fs::read_to_string(dir.join("results/figure1.svg")).unwrap();
    assert!(svg.contains("ours+con") && svg.trim_end().ends_with("</svg>"));
    let md = std::fs::read_to_string(dir.join("results/eta.md")).unwrap();
    assert!(md.contains("| ours+con (η=0.01) | 1 |"), "{md}");
    assert!(dir.join("results/eta.json").is_file() && dir.join("results/eta-state.json").is_file());
    assert!(!dir.join("results/table1.md").exists(), "the sweep leaves Table 1 alone");
}

#[test]
fn a_resumed_suite_does_only_the_remaining_runs() {
    let dir = tmp("resume");
    let data = tiny_data(&dir);
    let full_cfg = config(&data, &dir.join("full"), &[Variant::Ours, Variant::Cca], 2);
    let full = run_suite(&mut Cpu::new(), &data, &full_cfg).unwrap();
    assert_eq!(full.finished.len(), 4);

    // A suite killed during its third run (ours, seed 1): two records on disk, its runs
    // directory claimed, a half-written run directory: a stale checkpoint (another run's
    // bytes), the lock, the temp file of a write the kill interrupted.
    let cfg = config(&data, &dir.join("killed"), &[Variant::Ours, Variant::Cca], 2);
    let killed = SuiteState {
        suite: full.suite.clone(),
        finished: full.finished[..2].to_vec(),
        in_progress: vec![full.finished[2].key],
    };
    std::fs::create_dir_all(&cfg.out).unwrap();
    let path = state_path(&cfg.out, SuiteKind::Table1);
    std::fs::write(&path, serde_json::to_vec(&killed).unwrap()).unwrap();
    semshare::experiment::state::claim_runs_dir(&cfg.runs_dir.join("table1"), &path).unwrap();
    let stale = cfg.runs_dir.join("table1/ours-s1");
    std::fs::create_dir_all(&stale).unwrap();
    // Another run's checkpoints (seed 0's; a suite before this state file could have left
    // them): not this run's to continue.
    let old_best = full_cfg.runs_dir.join("table1/ours-s0/best.safetensors");
    std::fs::copy(&old_best, stale.join("best.safetensors")).unwrap();
    std::fs::copy(old_best.with_file_name("last.safetensors"), stale.join("last.safetensors")).unwrap();
    std::fs::write(stale.join(".lock"), "").unwrap();
    let dead =
        std::fs::read_to_string("/proc/sys/kernel/pid_max").map_or(4_194_304, |s| s.trim().parse::<u64>().unwrap()) + 1;
    let temp = stale.join(format!(".last.safetensors.tmp.{dead}.0"));
    std::fs::write(&temp, "half").unwrap();

    let resumed = run_suite(&mut Cpu::new(), &data, &cfg).unwrap();
    assert_eq!(keys(&resumed), keys(&full));
    same_records(&resumed.finished[..2], &full.finished[..2]); // kept as recorded
    assert!(!cfg.runs_dir.join("table1/ours-s0").exists(), "the recorded run was trained again");
    let best = std::fs::read(stale.join("best.safetensors")).unwrap();
    assert!(best != std::fs::read(&old_best).unwrap() && !temp.exists(), "the stale run was replaced");
    // Training and evaluation are deterministic on the CPU: the redone run scores the same.
    assert_eq!(resumed.finished[2].scores, full.finished[2].scores);
    assert_eq!(resumed.finished[2].best_step, full.finished[2].best_step);
    assert!(resumed.finished[2].seconds != full.finished[2].seconds, "timed anew");
}

/// A progress report that keeps the notes.
fn collect_notes(notes: &std::sync::Arc<std::sync::Mutex<Vec<String>>>) -> semshare::train::ProgressFn {
    let notes = std::sync::Arc::clone(notes);
    semshare::train::ProgressFn::new(move |p| {
        if let semshare::train::Progress::Note(n) = p {
            notes.lock().unwrap().push(n.clone());
        }
    })
}

/// The checkpoints of the trained run `key` in a suite's runs directory.
fn run_files(cfg: &ExperimentConfig, key: &str) -> (Vec<u8>, Vec<u8>) {
    let run = cfg.runs_dir.join("table1").join(key);
    (std::fs::read(run.join("best.safetensors")).unwrap(), std::fs::read(run.join("last.safetensors")).unwrap())
}

/// A suite told to stop (Ctrl-C in the CLI) during a run, or killed there (a panic in its
/// progress report stands in for the kill), goes on from that run's last checkpoint: the stop's
/// step, or the kill's last validation. Its records and checkpoints are those of a suite never
/// interrupted, bit for bit.
#[test]
fn a_stopped_or_killed_suite_continues_its_run_in_progress_to_the_same_result() {
    use semshare::train::{Progress, ProgressFn};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let dir = tmp("stop");
    let data = tiny_data(&dir);
    let base = config(&data, &dir.join("whole"), &[Variant::Ours, Variant::Cca], 1);
    let base = ExperimentConfig { train: TrainConfig { steps: 6, eval_every: 2, ..base.train.clone() }, ..base };
    let whole = run_suite(&mut Cpu::new(), &data, &base).unwrap();

    let notes = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let (seen, flag) = (Arc::clone(&notes), Arc::clone(&stop));
    // Stop asked after step 3 (between validations): the run stops before step 4.
    let progress = ProgressFn::new(move |p| match p {
        Progress::Step { step: 3, .. } => flag.store(true, Ordering::SeqCst),
        Progress::Note(n) => seen.lock().unwrap().push(n.clone()),
        _ => {}
    });
    let cfg = ExperimentConfig {
        out: dir.join("stopped/results"),
        runs_dir: dir.join("stopped/runs"),
        progress: Some(progress),
        stop: Some(Arc::clone(&stop)),
        ..base.clone()
    };
    let stopped = run_suite(&mut Cpu::new(), &data, &cfg).unwrap();
    assert!(stopped.finished.is_empty(), "nothing recorded: {:?}", keys(&stopped));
    let last = cfg.runs_dir.join("table1/ours-s0/last.safetensors");
    assert_eq!(semshare::checkpoint::Checkpoint::load(&last).unwrap().step, 3);
    assert!(notes.lock().unwrap().iter().any(|n| n.starts_with("run ours seed 0 stopped at step 3 (")), "{notes:?}");

    // A copy whose state file is then removed: a new study in the same runs directory, which
    // trains its runs again rather than continue the old study's checkpoints.
    assert!(
        Command::new("cp").arg("-a").arg(dir.join("stopped")).arg(dir.join("forgotten")).status().unwrap().success()
    );
    stop.store(false, Ordering::SeqCst);
    let forgotten = ExperimentConfig {
        out: dir.join("forgotten/results"),
        runs_dir: dir.join("forgotten/runs"),
        progress: Some(collect_notes(&notes)),
        stop: None,
        ..cfg.clone()
    };
    std::fs::remove_file(state_path(&forgotten.out, SuiteKind::Table1)).unwrap();
    // Its directory cannot be emptied (a file by a run's name that semshare did not write):
    // refused, and the run is not marked in progress, so that nothing of the old study is
    // continued once the file is gone.
    let foreign = forgotten.runs_dir.join("table1/ours-s0/resolved-config.json");
    std::fs::write(&foreign, "{}").unwrap();
    let e = run_suite(&mut Cpu::new(), &data, &forgotten).unwrap_err().to_string();
    assert!(e.contains("not a configuration semshare wrote"), "{e}");
    std::fs::remove_file(&foreign).unwrap();
    notes.lock().unwrap().clear();
    let anew = run_suite(&mut Cpu::new(), &data, &forgotten).unwrap();
    assert!(!notes.lock().unwrap().iter().any(|n| n.contains("continuing")), "{notes:?}");
    assert_eq!(keys(&anew), keys(&whole));
    notes.lock().unwrap().clear();
    let cfg = ExperimentConfig { progress: Some(collect_notes(&notes)), ..cfg };
    let resumed = run_suite(&mut Cpu::new(), &data, &cfg).unwrap();
    assert!(notes.lock().unwrap().iter().any(|n| n.contains("continuing this run from") && n.contains("at step 3")));
    assert_eq!(keys(&resumed), keys(&whole));
    let same_scores = |a: &SuiteState| {
        a.finished
            .iter()
            .zip(&whole.finished)
            .all(|(x, y)| (x.scores, x.label, x.best_step, &x.report) == (y.scores, y.label, y.best_step, &y.report))
    };
    assert!(same_scores(&resumed));
    assert!(run_files(&cfg, "ours-s0") == run_files(&base, "ours-s0"), "the checkpoints of the uninterrupted run");

    // Killed after the validation at step 4 (the panic unwinds out of step 5's report).
    let killed = ExperimentConfig {
        out: dir.join("killed/results"),
        runs_dir: dir.join("killed/runs"),
        progress: Some(ProgressFn::new(|p| {
            if let Progress::Step { step: 5, .. } = p {
                panic!("killed");
            }
        })),
        stop: None,
        ..base.clone()
    };
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_suite(&mut Cpu::new(), &data, &killed)));
    assert!(run.is_err());
    let last = killed.runs_dir.join("table1/ours-s0/last.safetensors");
    assert_eq!(semshare::checkpoint::Checkpoint::load(&last).unwrap().step, 4);
    // The same, with that checkpoint's values damaged (a bad disk): the run starts again.
    assert!(Command::new("cp").arg("-a").arg(dir.join("killed")).arg(dir.join("damaged")).status().unwrap().success());
    let damaged = ExperimentConfig {
        out: dir.join("damaged/results"),
        runs_dir: dir.join("damaged/runs"),
        progress: Some(collect_notes(&notes)),
        ..killed.clone()
    };
    let mut bytes = std::fs::read(&last).unwrap();
    let header = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    bytes[header..header + 64].fill(0xff); // NaNs where the first parameters were
    std::fs::write(damaged.runs_dir.join("table1/ours-s0/last.safetensors"), &bytes).unwrap();
    notes.lock().unwrap().clear();
    let resumed = run_suite(&mut Cpu::new(), &data, &damaged).unwrap();
    let said = notes.lock().unwrap().clone();
    assert!(said.iter().any(|n| n.ends_with(": not continued; this run starts again")), "{said:?}");
    assert!(!said.iter().any(|n| n.contains("continuing this run")), "{said:?}");
    assert!(same_scores(&resumed));
    assert!(run_files(&damaged, "ours-s0") == run_files(&base, "ours-s0"));
    notes.lock().unwrap().clear();
    let resumed = run_suite(
        &mut Cpu::new(),
        &data,
        &ExperimentConfig { progress: Some(collect_notes(&notes)), ..killed.clone() },
    )
    .unwrap();
    assert!(notes.lock().unwrap().iter().any(|n| n.contains("continuing this run from") && n.contains("at step 4")));
    assert!(same_scores(&resumed));
    assert!(run_files(&killed, "ours-s0") == run_files(&base, "ours-s0"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A study whose state lies under a name that is not UTF-8 is found again by its runs
/// directory (the owner file records the name's bytes, not a lossy rendering of them).
#[test]
#[cfg(target_os = "linux")]
fn a_study_under_a_non_utf8_name_claims_its_runs_again() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tmp("non-utf8");
    let out = dir.join(std::ffi::OsStr::from_bytes(b"nd\xff"));
    std::fs::create_dir_all(&out).unwrap();
    let state = out.join("table1-state.json");
    std::fs::write(&state, "{}").unwrap();
    let runs = dir.join("runs");
    drop(semshare::experiment::state::claim_runs_dir(&runs, &state).unwrap());
    drop(semshare::experiment::state::claim_runs_dir(&runs, &state).unwrap());
    let other = dir.join("other-state.json");
    let e = semshare::experiment::state::claim_runs_dir(&runs, &other).unwrap_err().to_string();
    assert!(e.contains("holds the runs of the study whose state is"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// One process at a time runs a study: a second start while the first holds its runs
/// directory is refused (both would train the same run in one directory), and a run directory
/// a `train` is writing is not emptied under it.
#[test]
fn a_study_runs_in_one_process_at_a_time() {
    let dir = tmp("one-at-a-time");
    let data = tiny_data(&dir);
    let cfg = config(&data, &dir, &[Variant::Ours], 1);
    std::fs::create_dir_all(&cfg.out).unwrap();
    let path = state_path(&cfg.out, SuiteKind::Table1);
    let held = semshare::experiment::state::claim_runs_dir(&cfg.runs_dir.join("table1"), &path).unwrap();
    let e = run_suite(&mut Cpu::new(), &data, &cfg).unwrap_err().to_string();
    assert!(e.contains("another semshare process is running the study"), "{e}");
    drop(held);
    run_suite(&mut Cpu::new(), &data, &cfg).unwrap();
    let run = cfg.runs_dir.join("table1/ours-s0");
    let lock = std::fs::File::open(run.join(".lock")).unwrap();
    lock.try_lock().unwrap();
    let e = semshare::train::remove_run_dir(&run).unwrap_err().to_string();
    assert!(e.contains("another `semshare train` is writing"), "{e}");
    assert!(run.join("best.safetensors").is_file());
    drop(lock);
    semshare::train::remove_run_dir(&run).unwrap();
    assert!(!run.exists());
}

#[test]
fn runs_recorded_without_label_scores_get_them_from_their_checkpoints() {
    let dir = tmp("fill-label");
    let data = tiny_data(&dir);
    let cfg = config(&data, &dir, &[Variant::Ours, Variant::WoL, Variant::Cca], 1);
    let full = run_suite(&mut Cpu::new(), &data, &cfg).unwrap();
    // The state file of a suite from before label scores were kept; wo-l's checkpoint is gone.
    let mut old = full.clone();
    for r in &mut old.finished {
        r.label = None;
    }
    let path = state_path(&cfg.out, SuiteKind::Table1);
    let text = String::from_utf8(serde_json::to_vec_pretty(&old).unwrap()).unwrap();
    assert!(!text.contains("\"label\""), "an old state file has no label field");
    std::fs::write(&path, text).unwrap();
    std::fs::remove_dir_all(cfg.runs_dir.join("table1/wo-l-s0")).unwrap();

    let filled = run_suite(&mut Cpu::new(), &data, &cfg).unwrap();
    assert_eq!(keys(&filled), keys(&full));
    assert!(filled.finished.iter().zip(&full.finished).all(|(a, b)| a.scores == b.scores && a.seconds == b.seconds));
    let label = |s: &SuiteState, v: Variant| s.records_of(v, None)[0].label;
    assert_eq!(label(&filled, Variant::Ours), label(&full, Variant::Ours), "deterministic: the same scores");
    assert!(label(&filled, Variant::Ours).is_some());
    assert_eq!(label(&filled, Variant::WoL), None, "no checkpoint, nothing to score");
    assert_eq!(label(&filled, Variant::Cca), None);
    let on_disk: SuiteState = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(on_disk.records_of(Variant::Ours, None)[0].label, label(&full, Variant::Ours));
    let md = std::fs::read_to_string(cfg.out.join("table1.md")).unwrap();
    let (_, label_table) = md.split_once("ranked with the label embedding").unwrap();
    assert!(label_table.contains("| ours | 1 |") && !label_table.contains("| wo-l"), "{md}");
}

#[test]
fn a_suite_can_select_checkpoints_with_the_label_embedding() {
    let dir = tmp("label-val");
    let data = tiny_data(&dir);
    let pooled = config(&data, &dir, &[Variant::Ours], 1);
    let cfg =
        ExperimentConfig { train: TrainConfig { embedding: "label".into(), ..pooled.train.clone() }, ..pooled.clone() };
    assert_ne!(
        fingerprint(&data, &cfg.model, &cfg.train).unwrap(),
        fingerprint(&data, &pooled.model, &pooled.train).unwrap(),
        "another selection is another suite"
    );
    let state = run_suite(&mut Cpu::new(), &data, &cfg).unwrap();
    assert!(state.finished[0].label.is_some());
    let md = std::fs::read_to_string(cfg.out.join("table1.md")).unwrap();
    assert!(md.contains("best validation NDCG ranked with the label embedding"), "{md}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cfg.out.join("table1.json")).unwrap()).unwrap();
    assert_eq!(json["checkpoints_selected_with"], "label");
}

/// `--seed K`: one chosen seed runs alone, added to what the state file records; a later run
/// of seeds 0..N keeps it and does only the missing ones. A rebuilt identical dataset resumes
/// the suite (its fingerprint holds the shards' checksums, and the shards' bytes are the same).
#[test]
fn one_chosen_seed_runs_alone_and_joins_the_suite() {
    let dir = tmp("one-seed");
    let data = tiny_data(&dir);
    let cfg = config(&data, &dir, &[Variant::Ours], 1);
    let seed2 = ExperimentConfig { only_seed: Some(2), ..cfg.clone() };
    let state = run_suite(&mut Cpu::new(), &data, &seed2).unwrap();
    assert_eq!(state.finished.iter().map(|r| r.key.seed).collect::<Vec<_>>(), [2]);
    let seed0 = ExperimentConfig { only_seed: Some(0), ..cfg.clone() };
    let state = run_suite(&mut Cpu::new(), &data, &seed0).unwrap();
    assert_eq!(state.suite.seeds, [2, 0]);
    assert_eq!(state.finished.iter().map(|r| r.key.seed).collect::<Vec<_>>(), [2, 0]);
    // Seeds 0..3 from a dataset rebuilt byte for byte: only seed 1 is left to do.
    std::fs::remove_dir_all(dir.join("data")).unwrap();
    let rebuilt = tiny_data(&dir);
    let all = ExperimentConfig { seeds: 3, ..config(&rebuilt, &dir, &[Variant::Ours], 1) };
    let state = run_suite(&mut Cpu::new(), &rebuilt, &all).unwrap();
    assert_eq!(state.finished.iter().map(|r| r.key.seed).collect::<Vec<_>>(), [2, 0, 1]);
}

/// Shards written before their `__metadata__` was sorted had it in a per-process order: a
/// suite fingerprinted then is recognised on the same data written now.
#[test]
fn a_fingerprint_made_with_another_metadata_order_is_the_same_suite() {
    let dir = tmp("legacy");
    let data = tiny_data(&dir);
    let cfg = config(&data, &dir, &[Variant::Cca], 1);
    let now = fingerprint(&data, &cfg.model, &cfg.train).unwrap();
    let (shard, manifest) = (dir.join("data/train-00000.safetensors"), dir.join("data/dataset.json"));
    let (sorted, sorted_manifest) = (std::fs::read(&shard).unwrap(), std::fs::read_to_string(&manifest).unwrap());
    let from = r#"{"__metadata__":{"format":"semshare-shard","split":"train","version":"2"}"#;
    let to = r#"{"__metadata__":{"version":"2","format":"semshare-shard","split":"train"}"#;
    assert!(sorted[8..].starts_with(from.as_bytes()));
    let mut shuffled = sorted.clone();
    shuffled[8..8 + to.len()].copy_from_slice(to.as_bytes());
    std::fs::write(&shard, &shuffled).unwrap();
    let sum = |b: &[u8]| format!("fnv1a64x4:{:016x}", semshare::data::checksum::checksum(b));
    std::fs::write(&manifest, sorted_manifest.replace(&sum(&sorted), &sum(&shuffled))).unwrap();
    let old = Arc::new(DatasetReader::open(dir.join("data")).unwrap());
    let old_fp = fingerprint(&old, &cfg.model, &cfg.train).unwrap();
    assert_ne!(old_fp, now);
    run_suite(&mut Cpu::new(), &old, &cfg).unwrap();

    // The same dataset written by today's writer.
    std::fs::write(&shard, &sorted).unwrap();
    std::fs::write(&manifest, &sorted_manifest).unwrap();
    let data = Arc::new(DatasetReader::open(dir.join("data")).unwrap());
    assert!(is_legacy_fingerprint(&data, &cfg.model, &cfg.train, &old_fp).unwrap());
    assert!(!is_legacy_fingerprint(&data, &cfg.model, &cfg.train, &now.replace(':', ":0")).unwrap());
    let more = ExperimentConfig { seeds: 2, ..cfg.clone() };
    let state = run_suite(&mut Cpu::new(), &data, &more).unwrap();
    assert_eq!(state.finished.len(), 2, "resumed and extended");
    assert_eq!(state.suite.fingerprint, old_fp);
}

/// Suites recorded before the budget had `val_metric` and `normalize` (the committed Table 1
/// suites of 2026-11-27) are the same suite when the budget has those keys' old values; the
/// old form is rebuilt here from its definition (`experiment::run::fingerprint` of then).
#[test]
fn a_fingerprint_made_before_the_budget_had_val_metric_and_normalize_is_the_same_suite() {
    let dir = tmp("legacy-keys");
    let data = tiny_data(&dir);
    let cfg = config(&data, &dir, &[Variant::Cca], 1);
    let d = TrainConfig::default();
    let budget = TrainConfig { variant: d.variant, seed: d.seed, eta: d.eta, ..cfg.train.clone() };
    let json = serde_json::to_string(&budget).unwrap();
    let json = json.replace(r#","val_metric":"ndcg""#, "").replace(r#","normalize":"none""#, "");
    assert!(!json.contains("val_metric") && !json.contains("normalize"), "{json}");
    let mut text = format!("dataset {}\n", data.meta().name);
    for (split, entries) in data.shard_entries() {
        for e in entries {
            text += &format!("shard {split} {} {}\n", e.file, e.checksum);
        }
    }
    text += &format!("model {}\n", serde_json::to_string(&cfg.model).unwrap());
    text += &format!("train {json}\n");
    let old = format!("{}:{:016x}", data.meta().name, semshare::data::checksum::checksum(text.as_bytes()));
    assert_ne!(old, fingerprint(&data, &cfg.model, &cfg.train).unwrap());
    assert!(is_legacy_fingerprint(&data, &cfg.model, &cfg.train, &old).unwrap());
    // A budget with other values of those keys did not exist then.
    let standardized = TrainConfig { normalize: "standardize".into(), ..cfg.train.clone() };
    assert!(!is_legacy_fingerprint(&data, &cfg.model, &standardized, &old).unwrap());
}

#[test]
fn a_state_of_another_suite_is_refused() {
    let dir = tmp("refuse");
    let data = tiny_data(&dir);
    let cfg = config(&data, &dir, &[Variant::Cca], 1);
    run_suite(&mut Cpu::new(), &data, &cfg).unwrap();
    let longer = ExperimentConfig { train: TrainConfig { steps: 4, ..cfg.train.clone() }, ..cfg.clone() };
    let e = run_suite(&mut Cpu::new(), &data, &longer).unwrap_err();
    assert!(matches!(e, Error::Config { .. }) && e.to_string().contains("different suite"), "{e}");
    // More seeds extend the suite: the finished run is kept, only the new seed runs.
    let more_seeds = ExperimentConfig { seeds: 2, ..cfg.clone() };
    let extended = run_suite(&mut Cpu::new(), &data, &more_seeds).unwrap();
    assert_eq!(extended.finished.iter().map(|r| r.key.seed).collect::<Vec<_>>(), [0, 1]);
    // Fewer seeds than recorded: the recorded seed-1 run is not in the suite asked for.
    let e = run_suite(&mut Cpu::new(), &data, &cfg).unwrap_err();
    assert!(e.to_string().contains("not in the requested suite"), "{e}");
    // A state that finished no run still holds its run in progress (its checkpoints): another
    // budget is refused as well.
    let path = state_path(&cfg.out, SuiteKind::Table1);
    let started = SuiteState { finished: Vec::new(), in_progress: vec![extended.finished[0].key], ..extended.clone() };
    std::fs::write(&path, serde_json::to_vec(&started).unwrap()).unwrap();
    let e = run_suite(&mut Cpu::new(), &data, &longer).unwrap_err();
    assert!(e.to_string().contains("different suite"), "{e}");

    // The fingerprint: dataset and budget, not what each run sets.
    let fp = fingerprint(&data, &cfg.model, &cfg.train).unwrap();
    assert!(fp.starts_with(&format!("{}:", data.meta().name)), "{fp}");
    let per_run = TrainConfig { seed: 7, variant: Variant::Imc, eta: 10.0, ..cfg.train.clone() };
    assert_eq!(fingerprint(&data, &cfg.model, &per_run).unwrap(), fp);
    let model = ModelConfig { lambda: 0.5, ..cfg.model.clone() };
    assert_ne!(fingerprint(&data, &model, &cfg.train).unwrap(), fp);
    let other = tmp("refuse-other");
    let mut synth = SynthConfig::preset(SynthPreset::Balanced, 5);
    (synth.train, synth.val, synth.test) = (48, 16, 24);
    (synth.feature_dim, synth.vocab_size, synth.max_tokens, synth.regions) = (16, 60, 8, 6);
    generate(&synth).unwrap().save(other.join("data")).unwrap();
    let other = DatasetReader::open(other.join("data")).unwrap();
    assert_ne!(fingerprint(&other, &cfg.model, &cfg.train).unwrap(), fp, "other shard checksums");

    // Variants outside the suite are named.
    let eta = ExperimentConfig { suite: SuiteKind::Eta, variants: Some(vec![Variant::Ours]), ..cfg };
    assert!(run_suite(&mut Cpu::new(), &data, &eta).unwrap_err().to_string().contains("no variant `ours`"));
}

// ---------------------------------------------------------------------------------------------
// CCA

/// One image with its valid region rows and labels, and one text: tokens or segment rows.
struct Item {
    regions: Vec<Vec<f32>>,
    labels: Vec<u8>,
    tokens: Vec<u32>,
    segments: Vec<Vec<f32>>,
}

const R: usize = 3;
const T: usize = 4;
const GARBAGE: f32 = 1e3; // in the padding rows: must not reach a mean

/// Writes `splits` with the writer; texts are segment features when `dt > 0`, else tokens.
fn write(dir: &Path, dr: usize, dt: usize, vocab: usize, splits: &[(&str, Vec<Item>)]) -> DatasetReader {
    let c = splits[0].1[0].labels.len();
    let mut words = reserved_vocab();
    words.extend((3..vocab).map(|i| format!("w{i}")));
    let meta = Meta {
        name: "hand".into(),
        regions: R,
        feature_dim: dr,
        max_tokens: T,
        num_labels: c,
        num_object_classes: 0,
        vocab: words,
        label_names: (0..c).map(|i| format!("l{i}")).collect(),
    };
    let out = dir.join("data");
    let mut w = DatasetWriter::create(&out, Layout { meta, text_feature_dim: dt }, usize::MAX).unwrap();
    let le = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let boxes = le(&[0.1f32, 0.1, 0.5, 0.5, 0.16].repeat(R));
    for (name, items) in splits {
        w.begin_split(name).unwrap();
        for it in items {
            let mut f: Vec<f32> = it.regions.concat();
            f.resize(R * dr, GARBAGE);
            let image = ImageRecord {
                features: &le(&f),
                feature_dtype: FeatureDtype::F32,
                boxes: &boxes,
                count: it.regions.len() as u16,
                classes: None,
                labels: &it.labels,
            };
            let (content, dtype, length) = if dt > 0 {
                let mut s = it.segments.concat();
                s.resize(T * dt, GARBAGE);
                (le(&s), Some(FeatureDtype::F32), it.segments.len())
            } else {
                let mut t = it.tokens.clone();
                t.resize(T, 0);
                (t.iter().flat_map(|x| x.to_le_bytes()).collect(), None, it.tokens.len())
            };
            w.push(&image, &[TextRecord { content: &content, dtype, length: length as u16 }]).unwrap();
        }
    }
    w.finish().unwrap();
    DatasetReader::open(&out).unwrap()
}

/// SplitMix64 uniforms in [-1, 1).
struct Gen(u64);
impl Gen {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

#[test]
fn cca_features_are_means_of_valid_rows_and_a_normalised_bag_of_words() {
    let dir = tmp("cca-features");
    let item = |regions: Vec<Vec<f32>>, tokens: Vec<u32>, l: u8| Item {
        regions,
        labels: vec![l, 1 - l],
        tokens,
        segments: vec![],
    };
    // Tokens: 1 is [UNK] (dropped), 3..=6 words; document frequencies in train: w3 2, w4 2,
    // w5 1, w6 1.
    let train = vec![
        item(vec![vec![1.0, 2.0], vec![3.0, 6.0]], vec![3, 3, 4, 1], 1),
        item(vec![vec![-1.0, 0.5]], vec![4, 5, 3], 0),
        item(vec![vec![0.0, 0.0], vec![1.0, 1.0], vec![2.0, 5.0]], vec![1, 6], 1),
    ];
    let test = vec![item(vec![vec![4.0, 4.0]], vec![1, 1], 0), item(vec![vec![2.0, 0.0]], vec![5, 6, 6], 1)];
    let data = write(&dir, 2, 0, 8, &[("train", train), ("val", vec![]), ("test", test)]);
    let tr = data.split("train").unwrap();

    assert_eq!(mean_region_features(&data, tr).unwrap(), [2.0, 4.0, -1.0, 0.5, 1.0, 2.0]);
    assert!(mean_text_features(&data, tr).is_err(), "token texts have no segment features");

    assert_eq!(bow_vocabulary(&data, tr, 100).unwrap(), [3, 4, 5, 6], "words seen in train; 7 never is");
    // The two most frequent (w3, w4: 2 each), then w5 before w6 on the tie.
    assert_eq!(bow_vocabulary(&data, tr, 2).unwrap(), [3, 4]);
    assert_eq!(bow_vocabulary(&data, tr, 3).unwrap(), [3, 4, 5]);

    let words = [3, 4, 5];
    let bow = bag_of_words(&data, tr, &words).unwrap();
    let (a, b) = (2.0 / 5f32.sqrt(), 1.0 / 5f32.sqrt()); // counts (2, 1, 0)
    let c = 1.0 / 3f32.sqrt(); // (1, 1, 1)
    let want = [a, b, 0.0, c, c, c, 0.0, 0.0, 0.0]; // the third text has only [UNK] and w6
    for (g, w) in bow.iter().zip(want) {
        assert!((g - w).abs() < 1e-6, "{bow:?}");
    }
    let te = data.split("test").unwrap();
    assert_eq!(bag_of_words(&data, te, &words).unwrap(), [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]);
}

/// Text features an exact linear map of the images' mean region features (each side spread over
/// its valid rows differently): CCA finds the paired item first.
#[test]
fn cca_retrieves_the_pair_when_the_modalities_are_linearly_related() {
    let dir = tmp("cca-linear");
    let (dr, dt) = (6, 8);
    let mut g = Gen(9);
    let a: Vec<f32> = g.vec(dt * dr); // [dt, dr]
    let mut items = |n: usize| -> Vec<Item> {
        (0..n)
            .map(|i| {
                let x = g.vec(dr);
                let d = g.vec(dr);
                let regions = match i % 3 {
                    0 => vec![x.clone()],
                    1 => vec![
                        x.iter().zip(&d).map(|(u, v)| u + v).collect(),
                        x.iter().zip(&d).map(|(u, v)| u - v).collect(),
                    ],
                    _ => vec![
                        x.clone(),
                        x.iter().zip(&d).map(|(u, v)| u + v).collect(),
                        x.iter().zip(&d).map(|(u, v)| u - v).collect(),
                    ],
                };
                let y: Vec<f32> = (0..dt).map(|r| (0..dr).map(|c| a[r * dr + c] * x[c]).sum()).collect();
                let e = g.vec(dt);
                let segments = if i % 2 == 0 {
                    vec![y]
                } else {
                    vec![y.iter().zip(&e).map(|(u, v)| u + v).collect(), y.iter().zip(&e).map(|(u, v)| u - v).collect()]
                };
                Item { regions, labels: vec![1, (i % 2) as u8], tokens: vec![], segments }
            })
            .collect()
    };
    let splits = [("train", items(80)), ("val", items(4)), ("test", items(40))];
    let data = write(&dir, dr, dt, 4, &splits);
    let te = data.split("test").unwrap();
    let means = mean_text_features(&data, te).unwrap();
    assert_eq!(means.len(), 40 * dt);

    let eval = EvalConfig { recall_ks: vec![1], ..EvalConfig::default() };
    let r = cca_report(&data, "train", "test", CcaConfig { dims: dr, reg: 1e-6 }, &eval).unwrap();
    for (name, d) in [("I2T", &r.i2t), ("T2I", &r.t2i)] {
        assert!(d.recall_at(1).unwrap() > 97.0, "{name} R@1 {:?}", d.recall);
    }
    // Validation picks a setting that still ranks the pair first almost always.
    let (best, val) = select_cca(&data, "train", "val", &cca_grid(), 500).unwrap();
    assert!(cca_grid().iter().any(|c| (c.dims, c.reg) == (best.dims, best.reg)) && val > 0.0, "{best:?} {val}");
    let one = [CcaConfig { dims: 6, reg: 1e-6 }];
    let (_, ndcg) = select_cca(&data, "train", "test", &one, 500).unwrap();
    assert_eq!(ndcg, cca_report(&data, "train", "test", one[0], &eval).unwrap().avg.ndcg_at(500).unwrap());
    assert!(select_cca(&data, "train", "val", &[], 500).is_err());
    let r = cca_report(&data, "train", "test", CcaConfig { dims: 6, reg: 0.1 }, &eval).unwrap();
    assert!(r.avg.recall_at(1).unwrap() > 80.0, "{:?}", r.avg.recall);
}

#[test]
fn ridge_maps_each_direction_and_the_linear_map_recovers_the_classes() {
    let dir = tmp("ridge-linear");
    let (dr, dt) = (6, 8);
    let mut g = Gen(21);
    let a: Vec<f32> = g.vec(dt * dr);
    // Texts are a linear function of their image; the class is the sign of the image's first
    // feature, one-hot: a linear map onto the labels separates it.
    let mut items = |n: usize| -> Vec<Item> {
        (0..n)
            .map(|_| {
                let x = g.vec(dr);
                let y: Vec<f32> = (0..dt).map(|r| (0..dr).map(|c| a[r * dr + c] * x[c]).sum()).collect();
                let positive = x[0] > 0.0;
                Item {
                    labels: vec![positive as u8, !positive as u8],
                    regions: vec![x],
                    tokens: vec![],
                    segments: vec![y],
                }
            })
            .collect()
    };
    let splits = [("train", items(120)), ("val", items(30)), ("test", items(60))];
    let data = Arc::new(write(&dir, dr, dt, 4, &splits));
    let (ridge, regs) = ridge_report(&data, "val", "test").unwrap();
    for (name, d) in [("I2T", &ridge.i2t), ("T2I", &ridge.t2i)] {
        assert!(d.recall_at(1).unwrap() > 97.0, "{name} R@1 {:?} (ridges {regs:?})", d.recall);
    }
    assert!(regs.iter().all(|r| RIDGE_GRID.contains(r)));
    assert_eq!(ridge.avg.map_all, (ridge.i2t.map_all + ridge.t2i.map_all) / 2.0);
    let (linear, reg) = linear_report(&data, "val", "test").unwrap();
    assert!(linear.avg.map_all > 80.0, "mAP {} at ridge {reg} (chance ≈ 50)", linear.avg.map_all);

    // In a suite they are runs like CCA's: recorded without label scores, the same in every seed.
    let cfg = config(&data, &dir, &[Variant::Ridge, Variant::Linear], 2);
    let state = run_suite(&mut Cpu::new(), &data, &cfg).unwrap();
    assert_eq!(state.finished.len(), 4);
    let linear_runs = state.records_of(Variant::Linear, None);
    assert_eq!(linear_runs[0].scores, linear_runs[1].scores);
    assert!(state.finished.iter().all(|r| r.label.is_none() && r.best_step == 0));
    assert_eq!(state.records_of(Variant::Ridge, None)[0].scores.map_all.avg, ridge.avg.map_all);
    let table = std::fs::read_to_string(cfg.out.join("table1.md")).unwrap();
    assert!(table.contains("ridge") && table.contains("linear"), "{table}");
}

// ---------------------------------------------------------------------------------------------
// The command line

fn semshare(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_semshare")).args(args).output().expect("the binary runs")
}

fn fails_with(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(
        lines.len() == 1 && lines[0].starts_with("error: ") && lines[0].contains(needle),
        "expected one error line about `{needle}`, got: {stderr}"
    );
}

#[test]
fn semshare_experiment_runs_a_restricted_suite_and_refuses_bad_arguments() {
    let dir = tmp("cli");
    let _ = tiny_data(&dir);
    let data = dir.join("data");
    let cfg = dir.join("cfg.json");
    std::fs::write(&cfg, r#"{"model": {"layers": 1, "ffn": 32, "dim": 16, "heads": 2}, "train": {"batch_size": 8}}"#)
        .unwrap();
    let (out, runs) = (dir.join("results"), dir.join("runs"));
    let p = |x: &Path| x.to_str().unwrap().to_string();
    let args = [
        "experiment",
        "--suite",
        "table1",
        "--data",
        &p(&data),
        "--steps",
        "2",
        "--seeds",
        "1",
        "--variants",
        "ours,cca",
        "--config",
        &p(&cfg),
        "--out",
        &p(&out),
        "--runs",
        &p(&runs),
        "--device",
        "cpu",
    ];
    let o = semshare(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let md = std::fs::read_to_string(out.join("table1.md")).unwrap();
    assert!(md.contains("| ours | 1 |") && md.contains("| cca | 1 |"), "{md}");
    assert!(runs.join("table1/ours-s0/best.safetensors").is_file());
    assert!(String::from_utf8_lossy(&o.stdout).contains("2/2 runs finished"));

    // Same suite, different budget: refused, the state untouched.
    let mut longer = args.to_vec();
    longer[6] = "3";
    fails_with(&semshare(&longer), "different suite");

    let d = p(&data);
    fails_with(&semshare(&["experiment", "--suite", "table2", "--data", &d]), "unknown suite `table2`");
    fails_with(&semshare(&["experiment", "--data", &d]), "--suite is required");
    // 10¹² seeds were once listed before anything was checked: the process aborted out of memory.
    fails_with(&semshare(&["experiment", "--suite", "table1", "--data", &d, "--seeds", "1000000000000"]), "seeds");
    fails_with(&semshare(&["experiment", "--suite", "eta", "--data", &p(&dir.join("nope"))]), "does not exist");
    fails_with(
        &semshare(&["experiment", "--suite", "eta", "--data", &d, "--variants", "ours,foo"]),
        "unknown variant `foo`",
    );
    fails_with(
        &semshare(&["experiment", "--suite", "eta", "--data", &d, "--variants", "ours", "--out", &p(&dir.join("x"))]),
        "no variant `ours`",
    );
    fails_with(&semshare(&["experiment", "--suite", "eta", "--data", &d, "--seeds", "0"]), "--seeds");
    fails_with(&semshare(&["experiment", "--suite", "eta", "--data", &d, "--seeds", "2", "--seed", "1"]), "--seed K");
    fails_with(&semshare(&["experiment", "--suite", "eta", "--data", &d, "--out", &d]), "is the dataset (--data)");
    // Not understood by the parser: exit 2 (main.rs, USAGE_ERROR).
    let unknown = semshare(&["experiment", "--suite", "eta", "--data", &d, "--lr", "1"]);
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert_eq!(unknown.status.code(), Some(2), "{stderr}");
    assert!(stderr.starts_with("error: unknown option --lr") && stderr.lines().count() == 1, "{stderr}");
}
