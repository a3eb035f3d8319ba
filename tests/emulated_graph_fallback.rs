//! A capture the device refuses (`SEMSHARE_EMU_CAPTURE` on the emulated device: at its begin,
//! or invalidated by the time it ends) costs the trainer nothing but its graphs: that step and
//! every later one run eagerly, with the bits of an eager trainer's steps, and the trainer
//! says why (`Trainer::graphs_refused`). A binary of its own: the variable is process-wide.
//! Not `gpu_*`, so the GPU bundle (tools/gpu-check.sh) leaves it out: no driver can be made to
//! refuse on demand, so on a real GPU it runs nothing.
#![cfg(feature = "cuda")]

mod common;

use semshare::backend::Backend;
use semshare::model::{ImageBatch, ModelConfig, TextBatch};
use semshare::rng::Rng;
use semshare::train::{StepMode, TrainConfig, Trainer};

fn batch(cfg: &ModelConfig, seed: u64) -> (ImageBatch, TextBatch) {
    let mut rng = Rng::new(seed);
    (
        ImageBatch::random(&mut rng, &[5; 4], cfg.region_dim, cfg.object_classes, cfg.labels),
        TextBatch::random(&mut rng, &[4; 4], cfg.vocab, cfg.labels),
    )
}

#[test]
fn a_refused_capture_falls_back_to_eager_steps() {
    if !semshare::backend::cuda::emulated() {
        eprintln!("not run: SEMSHARE_EMU_CAPTURE makes the emulated device refuse captures; a GPU cannot be made to");
        return;
    }
    let Some(mut cuda) = common::gpu::cuda_or_skip("capture fallback") else { return };
    let dev: &mut dyn Backend = &mut cuda;
    // No masking: every step has the same shape, so the second one is captured.
    let cfg = ModelConfig {
        vocab: 300,
        object_classes: 20,
        labels: 6,
        region_dim: 32,
        mask_prob: 0.0,
        ..ModelConfig::small()
    };
    let tc = TrainConfig { batch_size: 4, steps: 10, warmup: 2, ..TrainConfig::default() };
    for how in ["refuse-begin", "invalidate"] {
        let mut eager = Trainer::new(dev, &cfg, tc.clone()).unwrap();
        eager.set_step_mode(StepMode::Eager, dev);
        let mut graphed = Trainer::new(dev, &cfg, tc.clone()).unwrap();
        // SAFETY (edition 2024's set_var): this binary's one test; nothing else reads the
        // environment while it runs.
        unsafe { std::env::set_var("SEMSHARE_EMU_CAPTURE", how) };
        for s in 0..4 {
            let (i, x) = batch(&cfg, 200 + s);
            let want = eager.step(dev, i.clone(), x.clone()).unwrap();
            let got = graphed.step(dev, i, x).unwrap();
            assert_eq!(format!("{got:?}"), format!("{want:?}"), "{how}, step {s}: stats");
            let (a, b) = (dev.download(graphed.params.view()).unwrap(), dev.download(eager.params.view()).unwrap());
            assert!(a == b, "{how}, step {s}: parameters differ from the eager trainer's");
        }
        unsafe { std::env::remove_var("SEMSHARE_EMU_CAPTURE") };
        let why = graphed.graphs_refused().unwrap_or_else(|| panic!("{how}: no reason kept"));
        assert!(why.contains("SEMSHARE_EMU_CAPTURE"), "{how}: {why}");
        assert_eq!(graphed.graphs_held().0, 0, "{how}: graphs held");
        assert_eq!(graphed.step_mode(), StepMode::Eager, "{how}: capturing stays off");
    }
}
