//! `semshare tune` (issue 15, item 3): successive halving on the validation split, resumable
//! through the experiment runner's state file, deterministic by seed whatever the workers.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::cli::{ok, semshare};
use semshare::config::read_config_file;
use semshare::data::reader::DatasetReader;
use semshare::data::synth::{SynthConfig, SynthPreset, generate};
use semshare::experiment::state::Plan;
use semshare::experiment::tune::{TuneConfig, TunePlan, TuneState, best, build_plan, run_tune, state_path};
use semshare::model::ModelConfig;
use semshare::train::TrainConfig;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("semshare-tune-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn dataset(dir: &Path) -> Arc<DatasetReader> {
    let mut cfg = SynthConfig::preset(SynthPreset::Balanced, 3);
    (cfg.train, cfg.val, cfg.test) = (48, 16, 16);
    (cfg.feature_dim, cfg.vocab_size, cfg.max_tokens, cfg.regions) = (8, 30, 6, 3);
    let data = generate(&cfg).unwrap();
    data.save(dir.join("data")).unwrap();
    Arc::new(DatasetReader::open(dir.join("data")).unwrap())
}

fn config(data: &DatasetReader, dir: &Path, workers: usize) -> TuneConfig {
    let model = ModelConfig { word_dim: 8, gru_hidden: 8, ..common::tiny_model_of(data.meta(), 0) };
    TuneConfig {
        model,
        train: TrainConfig { eval_k: 10, ..TrainConfig::default() },
        trials: 5,
        min_steps: 2,
        reduction: 2,
        rungs: 3,
        repeats: 2,
        seed: 11,
        workers,
        device: "cpu".into(),
        out: dir.join("out"),
        runs_dir: dir.join("out/trials"),
        stop: None,
    }
}

fn scores(state: &TuneState) -> Vec<(usize, usize, usize, Option<f64>)> {
    let mut s: Vec<_> = state.finished.iter().map(|r| (r.key.trial, r.key.rung, r.key.repeat, r.score)).collect();
    s.sort_by_key(|x| (x.1, x.0, x.2));
    s
}

#[test]
fn halves_the_trials_rung_by_rung_and_writes_a_loadable_config() {
    let dir = tmp("halving");
    let data = dataset(&dir);
    let cfg = config(&data, &dir, 2);
    let state = run_tune(&data, &cfg, &|_| {}).unwrap();
    let plan = &state.suite;
    // 5 trials, then the best 2 (twice each: rung 1 chooses), then the best 1; steps 2, 4, 8.
    let per_rung: Vec<usize> = (0..3).map(|r| state.finished.iter().filter(|t| t.key.rung == r).count()).collect();
    assert_eq!(per_rung, [5, 4, 1]);
    assert_eq!((plan.steps(0), plan.steps(2), plan.budget()), (2, 8, 5 * 2 + 2 * 2 * 4 + 8));
    // Trial 0 is the base configuration itself.
    let base = &plan.trials[0];
    assert_eq!(
        (base.lr, base.weight_decay, base.batch_size),
        (cfg.train.lr, cfg.train.weight_decay, cfg.train.batch_size)
    );
    assert_eq!(
        (base.dim, base.layers, base.dropout, base.lambda),
        (cfg.model.dim, cfg.model.layers, cfg.model.dropout, cfg.model.lambda)
    );
    // Rung 1 ranks by the mean of its two seeds.
    for s in plan.ranking(&state.finished, 1) {
        let runs: Vec<f64> = state
            .finished
            .iter()
            .filter(|r| r.key.rung == 1 && r.key.trial == s.trial)
            .map(|r| r.score.unwrap())
            .collect();
        assert_eq!(runs.len(), 2);
        assert!((s.score.unwrap() - (runs[0] + runs[1]) / 2.0).abs() < 1e-12);
    }
    for rung in 1..3 {
        let promoted: Vec<usize> =
            plan.ranking(&state.finished, rung - 1).iter().take(plan.survivors(rung)).map(|r| r.trial).collect();
        let mut trained: Vec<usize> =
            state.finished.iter().filter(|r| r.key.rung == rung).map(|r| r.key.trial).collect();
        trained.sort();
        trained.dedup();
        let mut expected = promoted.clone();
        expected.sort();
        assert_eq!(trained, expected, "rung {rung} trains the best of rung {}", rung - 1);
    }
    assert!(state.finished.iter().all(|r| r.score.is_some_and(|s| (0.0..=100.0).contains(&s))));
    // Only the last rung's run directories are kept.
    let kept: Vec<String> = std::fs::read_dir(&cfg.runs_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != semshare::experiment::state::OWNER_FILE)
        .collect();
    let (winner, top) = best(&state).unwrap();
    assert_eq!(kept, [format!("trial{}-rung2", winner.id)]);
    assert_eq!(top.rung, 2);

    // best-config.json is a config file `train --config` reads, with the winner's values.
    // The step budget is left to `train`'s data-aware one (validation each epoch, early stop).
    let c = read_config_file(cfg.model.clone(), cfg.train.clone(), &cfg.out.join("best-config.json")).unwrap();
    assert_eq!((c.train.lr, c.train.batch_size), (winner.lr, winner.batch_size));
    assert!(["steps", "eval_every", "patience"].iter().all(|k| !c.train_keys.contains(*k)), "{:?}", c.train_keys);
    assert_eq!(c.train.warmup, (winner.warmup as f64 * 8.0).round() as u64, "the warm-up it had at the last rung");
    assert_eq!((c.model.dim, c.model.layers, c.model.lambda), (winner.dim, winner.layers, winner.lambda));
    let table = std::fs::read_to_string(cfg.out.join("trials.md")).unwrap();
    assert_eq!(table.lines().filter(|l| l.starts_with("| ") && !l.starts_with("| trial")).count(), 5, "{table}");

    // Deterministic by seed: one worker gives the same scores and the same winner as two.
    let dir1 = tmp("one-worker");
    let one = run_tune(&data, &config(&data, &dir1, 1), &|_| {}).unwrap();
    assert_eq!(scores(&one), scores(&state));
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&dir1);
}

#[test]
fn a_killed_tune_resumes_and_makes_the_same_choices() {
    let dir = tmp("resume");
    let data = dataset(&dir);
    let cfg = config(&data, &dir, 1);
    let full = run_tune(&data, &cfg, &|_| {}).unwrap();

    // Killed after rung 0 and one run of rung 1 (2 trials × 2 seeds), with the next half-way.
    let dir2 = tmp("resume-killed");
    let cfg2 = config(&data, &dir2, 2);
    let path = state_path(&cfg2.out);
    std::fs::create_dir_all(&cfg2.out).unwrap();
    let mut killed = TuneState::open(&path, &build_plan(&data, &cfg2).unwrap()).unwrap();
    let upto: Vec<_> = full
        .finished
        .iter()
        .filter(|r| r.key.rung == 0)
        .chain(full.finished.iter().find(|r| r.key.rung == 1))
        .cloned()
        .collect();
    for r in upto {
        killed.record(&path, r).unwrap();
    }
    let pending = killed.remaining();
    assert_eq!(pending.len(), 3, "{pending:?}");
    // Its runs directory claimed, a trial's directory as the kill left it: the lock, and the
    // temp file of an interrupted checkpoint write (checkpoints are renamed into place whole).
    semshare::experiment::state::claim_runs_dir(&cfg2.runs_dir, &path).unwrap();
    let stale = semshare::experiment::tune::trial_dir(&cfg2.runs_dir, &pending[0]);
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join(".lock"), b"").unwrap();
    let dead =
        std::fs::read_to_string("/proc/sys/kernel/pid_max").map_or(4_194_304, |s| s.trim().parse::<u64>().unwrap()) + 1;
    std::fs::write(stale.join(format!(".last.safetensors.tmp.{dead}.0")), b"half-written").unwrap();
    let mut lines = std::sync::Mutex::new(Vec::new());
    let resumed = run_tune(&data, &cfg2, &|l| lines.lock().unwrap().push(l.to_string())).unwrap();
    assert_eq!(scores(&resumed), scores(&full));
    // Only the runs not recorded were trained again: rung 1's other three and rung 2's.
    let started = lines.get_mut().unwrap().iter().filter(|l| l.contains(" steps  lr ")).count();
    assert_eq!(started, 4);

    // Another seed's tune does not continue this state file.
    let other = TuneConfig { seed: 12, ..cfg2.clone() };
    let e = run_tune(&data, &other, &|_| {}).unwrap_err().to_string();
    assert!(e.contains("holds a different tune"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&dir2);
}

/// A tune told to stop (Ctrl-C in the CLI) records no trial it stopped, and takes no other; a
/// trial in progress goes on from its own last checkpoint (left by a stop or a kill), and the
/// tune ends with the scores and choices of one never interrupted.
#[test]
fn a_stopped_tune_continues_its_trials_from_their_checkpoints() {
    use semshare::backend::Backend;
    use semshare::train::{Progress, ProgressFn, RunOptions, own_last_checkpoint, train};
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tmp("stop");
    let data = dataset(&dir);
    let full = run_tune(&data, &config(&data, &dir.join("whole"), 1), &|_| {}).unwrap();

    // Stopped as the second trial starts: it trains no step, nothing else is started.
    let stop = Arc::new(AtomicBool::new(false));
    let cfg = TuneConfig { stop: Some(Arc::clone(&stop)), ..config(&data, &dir.join("stopped"), 1) };
    let started = std::sync::Mutex::new(0);
    let stopped = run_tune(&data, &cfg, &|l| {
        if l.contains(" steps  lr ") {
            let mut n = started.lock().unwrap();
            *n += 1;
            if *n == 2 {
                stop.store(true, Ordering::SeqCst);
            }
        }
    })
    .unwrap();
    assert_eq!((stopped.finished.len(), *started.lock().unwrap()), (1, 2));
    assert!(!cfg.out.join("best-config.json").exists(), "no winner before the tune ends");

    // The trial it stopped, and the next one, half-way: a checkpoint at step 1 of their 2,
    // written by the run the tune would start (its configuration and identity), as a stop or a
    // kill leaves it. The first is in progress in the state file (started, not recorded), and
    // goes on from it; the second was never started by this tune, so what its directory holds
    // is not its own (an earlier tune's, say): emptied, and trained afresh.
    let plan = build_plan(&data, &cfg).unwrap();
    let (key, unstarted) = (stopped.remaining()[0], stopped.remaining()[1]);
    assert_eq!(stopped.in_progress, [key]);
    for k in [key, unstarted] {
        let (model, train_cfg) = plan.run_configs(&cfg.model, &cfg.train, &k);
        let mut dev = semshare::backend::cpu::Cpu::new();
        let identity = semshare::experiment::run::run_identity(dev.name(), &data, &model, &train_cfg).unwrap();
        let trial_dir = semshare::experiment::tune::trial_dir(&cfg.runs_dir, &k);
        let half = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&half);
        let opts = RunOptions {
            progress: Some(ProgressFn::new(move |p| {
                if let Progress::Step { step: 1, .. } = p {
                    flag.store(true, Ordering::SeqCst);
                }
            })),
            stop: Some(half),
            identity: Some(identity.clone()),
            ..RunOptions::new(&trial_dir)
        };
        assert!(train(&mut dev, &data, &model, &train_cfg, &opts).unwrap().stopped);
        assert!(own_last_checkpoint(&trial_dir, &identity).is_some());
        assert!(own_last_checkpoint(&trial_dir, "another run").is_none());
    }

    stop.store(false, Ordering::SeqCst);
    let lines = std::sync::Mutex::new(Vec::new());
    // A stop asked once the last trial is recorded (its result's line) finds nothing left to
    // stop: the tune ends as it would have, its winner written.
    let resumed = run_tune(&data, &cfg, &|l| {
        if l.contains("rung 2: validation") {
            stop.store(true, Ordering::SeqCst);
        }
        lines.lock().unwrap().push(l.to_string())
    })
    .unwrap();
    assert!(stop.load(Ordering::SeqCst) && cfg.out.join("best-config.json").is_file());
    let lines = lines.into_inner().unwrap();
    assert!(lines.iter().any(|l| l.starts_with(&format!("{key}: continuing this run from "))), "{lines:?}");
    assert_eq!(lines.iter().filter(|l| l.contains("continuing this run from")).count(), 1, "{lines:?}");
    assert_eq!(scores(&resumed), scores(&full));
    assert_eq!(best(&resumed).unwrap().0, best(&full).unwrap().0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_plan_promotes_only_after_a_rung_is_finished() {
    let dir = tmp("plan");
    let data = dataset(&dir);
    let plan = build_plan(&data, &config(&data, &dir, 1)).unwrap();
    assert_eq!(plan.runs(&[]).len(), 5);
    assert!(TunePlan { reduction: 1, ..plan.clone() }.validate().is_err());
    assert!(TunePlan { rungs: 40, ..plan.clone() }.validate().is_err(), "2^39 steps");
    assert!(TunePlan { repeats: 0, ..plan.clone() }.validate().is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_command_tunes_and_refuses_bad_options() {
    let dir = tmp("cli");
    dataset(&dir);
    let (data, out) = (dir.join("data"), dir.join("tuned"));
    let (d, o) = (data.to_str().unwrap(), out.to_str().unwrap());
    let config = dir.join("tiny.json");
    std::fs::write(&config, r#"{"model": {"word_dim": 8, "gru_hidden": 8, "heads": 2}, "train": {"eval_k": 10}}"#)
        .unwrap();
    let c = config.to_str().unwrap();
    let args = ["tune", "--data", d, "--out", o, "--config", c, "--trials", "3", "--min-steps", "1", "--workers", "1"];
    let stdout = ok(&semshare(&args));
    assert!(stdout.contains("training runs finished") && out.join("best-config.json").exists(), "{stdout}");
    let train_out = dir.join("run");
    let best = out.join("best-config.json");
    ok(&semshare(&["train", "--data", d, "--config", best.to_str().unwrap(), "--out", train_out.to_str().unwrap()]));
    common::cli::fails_with(&semshare(&["tune", "--data", d, "--out", o, "--reduction", "1"]), "reduction");
    // Counts that would size the plan (10⁹ trials once aborted the process out of memory).
    common::cli::fails_with(&semshare(&["tune", "--data", d, "--out", o, "--trials", "1000000000"]), "trials");
    common::cli::fails_with(&semshare(&["tune", "--data", d, "--out", o, "--repeats", "1000000000"]), "repeats");
    common::cli::fails_with(&semshare(&["tune", "--data", d, "--out", o, "--rungs", "4294967297"]), "rungs");
    let _ = std::fs::remove_dir_all(&dir);
}
