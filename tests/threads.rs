//! The thread count changes how the CPU's work is cut up, never the order of a sum: a training
//! run on 1 thread and on 3 writes the same checkpoint, bit for bit. The shapes are large
//! enough that every GEMM route splits (row blocks, the deep-k weight gradients each thread
//! packing its own B, column blocks), and 3 threads cut them unevenly.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use semshare::backend::cpu::Cpu;
use semshare::data::reader::DatasetReader;
use semshare::data::synth::{SynthConfig, SynthPreset, generate};
use semshare::model::ModelConfig;
use semshare::train::{RunOptions, TrainConfig, train};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("semshare-threads-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Trains `steps` steps on a pool of `threads`; returns the loss curve's bits and the last
/// checkpoint's bytes (parameters, AdamW's moments, the validation state).
fn run(data: &Arc<DatasetReader>, model: &ModelConfig, threads: usize, dir: &Path) -> (Vec<u32>, Vec<u8>) {
    let cfg = TrainConfig { steps: 4, batch_size: 16, eval_every: 2, warmup: 1, seed: 3, ..TrainConfig::default() };
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    let summary = pool.install(|| train(&mut Cpu::new(), data, model, &cfg, &RunOptions::new(dir))).unwrap();
    let losses = summary.losses.iter().map(|x| x.to_bits()).collect();
    (losses, std::fs::read(dir.join("last.safetensors")).unwrap())
}

#[test]
fn one_thread_and_three_train_bit_for_bit_the_same() {
    let mut synth = SynthConfig::preset(SynthPreset::Balanced, 11);
    (synth.train, synth.val, synth.test) = (48, 16, 16);
    (synth.feature_dim, synth.vocab_size, synth.max_tokens, synth.regions) = (64, 300, 24, 36);
    let root = tmp("data");
    generate(&synth).unwrap().save(root.join("data")).unwrap();
    let data = Arc::new(DatasetReader::open(root.join("data")).unwrap());
    // Batch 16: 576 region rows. The qkv product's weight gradient (384 × 576 × 128) takes
    // the deep-k route, the forward products row blocks.
    let model = ModelConfig {
        word_dim: 32,
        gru_hidden: 32,
        dim: 128,
        heads: 2,
        ffn: 256,
        ..common::tiny_model_of(&data.layout.meta, 0)
    };
    let (one, three) = (tmp("one"), tmp("three"));
    let (losses_one, ckpt_one) = run(&data, &model, 1, &one);
    let (losses_three, ckpt_three) = run(&data, &model, 3, &three);
    assert_eq!(losses_one, losses_three, "loss curves");
    assert!(ckpt_one == ckpt_three, "the checkpoints differ");
    for d in [root, one, three] {
        std::fs::remove_dir_all(d).unwrap();
    }
}
