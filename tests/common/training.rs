//! Training runs on a tiny dataset on disk, for the trainer's tests on every device.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use semshare::backend::Backend;
use semshare::checkpoint::Checkpoint;
use semshare::data::Dataset;
use semshare::data::reader::DatasetReader;
use semshare::data::synth::{SynthConfig, SynthPreset, generate};
use semshare::model::ModelConfig;
use semshare::train::{Progress, ProgressFn, RunOptions, TrainConfig, TrainSummary, train};

/// A balanced synthetic dataset: 64 / 24 / 24 items, 16-wide features, texts of 8 tokens.
pub fn tiny_data(seed: u64) -> Dataset {
    let mut cfg = SynthConfig::preset(SynthPreset::Balanced, seed);
    (cfg.train, cfg.val, cfg.test) = (64, 24, 24);
    (cfg.feature_dim, cfg.vocab_size, cfg.max_tokens, cfg.regions) = (16, 60, 8, 6);
    generate(&cfg).unwrap()
}

pub fn tiny_model(data: &Dataset) -> ModelConfig {
    super::tiny_model_of(&data.meta, 0)
}

/// Training reads datasets from disk: `data` is written to `dir/data` and opened.
pub fn open(data: &Dataset, dir: &Path) -> Arc<DatasetReader> {
    data.save(dir.join("data")).unwrap();
    Arc::new(DatasetReader::open(dir.join("data")).unwrap())
}

/// A new run of the tiny model into `dir`.
pub fn run(dev: &mut dyn Backend, data: &Dataset, cfg: &TrainConfig, dir: &Path) -> semshare::Result<TrainSummary> {
    train(dev, &open(data, dir), &tiny_model(data), cfg, &RunOptions::new(dir))
}

/// `semshare-<tag>-<pid>-<name>` in the temp folder, not there yet.
pub fn tmp(tag: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("semshare-{tag}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A run asked to stop (`RunOptions::stop`) by its first report at or after step 7 (the host
/// reports every step, a device every 16) writes `last.safetensors` at that step; resumed, it
/// trains the rest of the uninterrupted run: the same loss bits where `exact` (the CPU), within
/// 1e-5 elsewhere. A run asked to stop before its first step writes nothing.
pub fn stopped_run_resumes(device: &dyn Fn() -> Box<dyn Backend>, tag: &str, exact: bool) {
    let data = tiny_data(5);
    let cfg =
        TrainConfig { steps: 20, batch_size: 8, eval_every: 0, warmup: 2, min_lr_ratio: 1.0, ..TrainConfig::default() };
    let whole_dir = tmp(tag, "stop-whole");
    let whole = run(device().as_mut(), &data, &cfg, &whole_dir).unwrap();
    let dir = tmp(tag, "stop-parts");
    let stop = Arc::new(AtomicBool::new(false));
    let asker = Arc::clone(&stop);
    let progress = ProgressFn::new(move |p| {
        if let Progress::Step { step: 7.., .. } = p {
            asker.store(true, Ordering::SeqCst);
        }
    });
    let reader = open(&data, &dir);
    let model = tiny_model(&data);
    let opts = RunOptions { progress: Some(progress), stop: Some(stop), ..RunOptions::new(&dir) };
    let part = train(device().as_mut(), &reader, &model, &cfg, &opts).unwrap();
    let at = part.steps as usize;
    assert!(part.stopped && (7..20).contains(&at), "stopped: {} at {at}", part.stopped);
    assert_eq!(part.losses.len(), at, "every step's loss is read before the run returns");
    assert!(part.best_checkpoint.is_none(), "no validation before step 20");
    let last = Checkpoint::load(&dir.join("last.safetensors")).unwrap();
    assert_eq!(last.step, part.steps, "last.safetensors holds the step the run stopped at");
    let opts = RunOptions { resume: Some(dir.join("last.safetensors")), ..RunOptions::new(&dir) };
    let rest = train(device().as_mut(), &reader, &model, &cfg, &opts).unwrap();
    assert!(!rest.stopped && rest.steps == 20);
    let resumed: Vec<f32> = part.losses.iter().chain(&rest.losses).copied().collect();
    if exact {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&resumed), bits(&whole.losses));
        assert_eq!(rest.best_score.to_bits(), whole.best_score.to_bits());
    } else {
        for (step, (a, b)) in resumed.iter().zip(&whole.losses).enumerate() {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "step {}: {a} vs {b}", step + 1);
        }
    }
    // Asked before its first step, a run trains nothing and writes no checkpoint.
    let empty = tmp(tag, "stop-first");
    let opts = RunOptions { stop: Some(Arc::new(AtomicBool::new(true))), ..RunOptions::new(&empty) };
    let none = train(device().as_mut(), &open(&data, &empty), &model, &cfg, &opts).unwrap();
    assert!(none.stopped && none.losses.is_empty() && none.best_checkpoint.is_none());
    assert!(!empty.join("last.safetensors").exists());
    for d in [whole_dir, dir, empty] {
        std::fs::remove_dir_all(d).unwrap();
    }
}
