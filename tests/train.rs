//! Training behaviour: bitwise determinism on the CPU, learning, divergence handling that
//! keeps the last good checkpoint, and resumption.

use semshare::Error;
use semshare::backend::cpu::Cpu;
use std::path::Path;
use std::sync::Arc;

use semshare::data::Dataset;
use semshare::data::shards::DatasetReader;
use semshare::data::synth::{SynthConfig, SynthPreset, generate};
use semshare::model::ModelConfig;
use semshare::train::{RunOptions, TrainConfig, train};

fn tiny_data(seed: u64) -> Dataset {
    let mut cfg = SynthConfig::preset(SynthPreset::Balanced, seed);
    (cfg.train, cfg.val, cfg.test) = (64, 24, 24);
    (cfg.feature_dim, cfg.vocab_size, cfg.max_tokens, cfg.regions) = (16, 60, 8, 6);
    generate(&cfg).unwrap()
}

fn tiny_model(data: &Dataset) -> ModelConfig {
    ModelConfig {
        region_dim: data.meta.feature_dim,
        max_regions: data.meta.regions,
        word_dim: 8,
        gru_hidden: 8,
        dim: 16,
        layers: 1,
        heads: 2,
        ffn: 32,
        max_tokens: data.meta.max_tokens,
        vocab: data.meta.vocab_size(),
        labels: data.meta.num_labels,
        object_classes: data.meta.num_object_classes,
        ..ModelConfig::small()
    }
}

/// Training reads datasets from disk: `data` is written to `dir/data` and opened.
fn open(data: &Dataset, dir: &Path) -> Arc<DatasetReader> {
    data.save(dir.join("data")).unwrap();
    Arc::new(DatasetReader::open(dir.join("data")).unwrap())
}

fn run(data: &Dataset, cfg: &TrainConfig, dir: &Path) -> semshare::Result<semshare::train::TrainSummary> {
    let opts = RunOptions { out_dir: dir.to_path_buf(), resume: None, progress: false };
    train(&mut Cpu::new(), &open(data, dir), &tiny_model(data), cfg, &opts)
}

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("semshare-train-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn same_seed_gives_bitwise_the_same_loss_curve() {
    let data = tiny_data(1);
    let cfg = TrainConfig { steps: 12, batch_size: 8, eval_every: 6, warmup: 2, seed: 5, ..TrainConfig::default() };
    let a = run(&data, &cfg, &tmp("det-a")).unwrap();
    let b = run(&data, &cfg, &tmp("det-b")).unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a.losses), bits(&b.losses));
    let c = run(&data, &TrainConfig { seed: 6, ..cfg }, &tmp("det-c")).unwrap();
    assert_ne!(bits(&a.losses), bits(&c.losses), "a different seed must change the run");
}

#[test]
fn training_lowers_the_loss() {
    let data = tiny_data(2);
    let cfg = TrainConfig { steps: 60, batch_size: 16, eval_every: 0, warmup: 5, lr: 2e-3, ..TrainConfig::default() };
    let s = run(&data, &cfg, &tmp("learn")).unwrap();
    let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
    let (first, last) = (mean(&s.losses[..10]), mean(&s.losses[50..]));
    assert!(last < 0.8 * first, "loss {first} -> {last}");
}

#[test]
fn a_non_finite_loss_stops_training_and_keeps_the_last_checkpoint() {
    let mut data = tiny_data(3);
    let dir = tmp("nan");
    let cfg = TrainConfig { steps: 4, batch_size: 8, eval_every: 2, warmup: 1, ..TrainConfig::default() };
    run(&data, &cfg, &dir).unwrap();
    let last = dir.join("last.safetensors");
    let before = std::fs::read(&last).unwrap();
    // Finite (a NaN could not get past the loader) but large enough to overflow ψ1.
    data.train.image_features.iter_mut().for_each(|x| *x = f32::MAX);
    let opts = RunOptions { out_dir: dir.clone(), resume: Some(last.clone()), progress: false };
    let reader = open(&data, &dir);
    let err = train(&mut Cpu::new(), &reader, &tiny_model(&data), &TrainConfig { steps: 8, ..cfg }, &opts).unwrap_err();
    assert!(matches!(err, Error::NonFinite { .. }), "{err}");
    assert!(err.to_string().contains("image label loss is NaN at step 4"), "{err}");
    assert_eq!(std::fs::read(&last).unwrap(), before, "the last good checkpoint must stay intact");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn resuming_reproduces_an_uninterrupted_run() {
    let data = tiny_data(4);
    // A constant learning rate after warm-up, so a 5-step run is the first half of a 10-step one.
    let cfg =
        TrainConfig { steps: 10, batch_size: 8, eval_every: 5, warmup: 2, min_lr_ratio: 1.0, ..TrainConfig::default() };
    let whole = run(&data, &cfg, &tmp("whole")).unwrap();
    let dir = tmp("parts");
    run(&data, &TrainConfig { steps: 5, ..cfg.clone() }, &dir).unwrap();
    // Continued from step 5 to 10.
    let opts = RunOptions { out_dir: dir.clone(), resume: Some(dir.join("last.safetensors")), progress: false };
    let rest = train(&mut Cpu::new(), &open(&data, &dir), &tiny_model(&data), &cfg, &opts).unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&rest.losses), bits(&whole.losses[5..]));
}
