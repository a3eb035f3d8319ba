//! A whole training step of the `small` preset on the GPU against the CPU: the loss and every
//! parameter's gradient within 1e-4 (relative norm), and 20 AdamW steps (of the same model at
//! a quarter of its widths) whose losses and final parameters stay within 1e-3. Dropout is on
//! (p = 0.1): both devices draw the same mask.
//!
//! Why 1e-4 and not 1e-5: a step is ~200 ops whose reductions (GEMM dot products, LayerNorm
//! statistics, softmax sums) run in a different order on each device; each op adds ~1e-7..1e-6
//! of relative noise and the backward pass compounds it. TF32 stays off (it would cost ~1e-3).
//! Why 1e-3 after 20 steps: AdamW divides by √v, which amplifies tiny gradient differences
//! on near-zero coordinates, so trajectories drift slowly apart even when every step agrees.

mod common;

use common::gpu::gpu_or_skip;
use common::rel_err;
use semshare::backend::Backend;
use semshare::model::{Batch, ImageBatch, LossWeights, MaskPlan, ModelConfig, SemShare, TextBatch};
use semshare::nn::Dropout;
use semshare::rng::Rng;
use semshare::train::{TrainConfig, Trainer};

fn config() -> ModelConfig {
    ModelConfig { vocab: 2000, object_classes: 100, labels: 24, ..ModelConfig::small() }
}

/// `config()`'s layers, heads and lengths at a quarter of its widths, for the 20 steps: the
/// drift they check is AdamW's over steps, which the one-step twins above already see at full
/// width, and the emulated device interprets every hidden unit's recurrence and every
/// parameter's update (at full width the 20 steps were half of CI's emulated suite).
fn narrow() -> ModelConfig {
    ModelConfig { dim: 64, ffn: 128, word_dim: 32, gru_hidden: 32, ..config() }
}

/// Mixed lengths, so packing, masking and the GRU's idle items are all exercised.
fn batches(cfg: &ModelConfig, items: usize, seed: u64) -> (ImageBatch, TextBatch) {
    let mut rng = Rng::new(seed);
    let il: Vec<usize> = (0..items).map(|_| 1 + rng.below(cfg.max_regions)).collect();
    let tl: Vec<usize> = (0..items).map(|_| 1 + rng.below(cfg.max_tokens)).collect();
    (
        ImageBatch::random(&mut rng, &il, cfg.region_dim, cfg.object_classes, cfg.labels),
        TextBatch::random(&mut rng, &tl, cfg.vocab, cfg.labels),
    )
}

fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// (loss of each modality, gradient) of one forward + backward of both modalities.
fn one_step(dev: &mut dyn Backend, net: &SemShare, w: &[f32], seed: u64) -> (Vec<f32>, Vec<f32>) {
    let cfg = &net.cfg;
    let (ib, tb) = batches(cfg, 16, seed);
    let mut rng = Rng::new(seed ^ 77);
    let iplan = MaskPlan::draw(&mut rng, ib.classes.as_ref().unwrap(), cfg.mask_prob);
    let tplan = MaskPlan::draw(&mut rng, &tb.tokens, cfg.mask_prob);
    let drop = Dropout { p: cfg.dropout, seed: seed ^ 99 };
    let weights = LossWeights { label: 1.0, context: cfg.lambda };
    let wt = dev.upload(w, &[w.len()]).unwrap();
    let mut g = dev.zeros(&[w.len()]).unwrap();
    let li = net.loss_backward(dev, &wt, &mut g, &Batch::Image(ib), &iplan, drop.site(1), weights).unwrap();
    let lt = net.loss_backward(dev, &wt, &mut g, &Batch::Text(tb), &tplan, drop.site(2), weights).unwrap();
    (vec![li.label, li.context, lt.label, lt.context], dev.download(g.view()).unwrap())
}

#[test]
fn one_training_step_matches_the_cpu() {
    let Some(mut gpu) = gpu_or_skip("training step (small preset)") else { return };
    let mut cpu = common::cpu();
    let net = SemShare::new(&config()).unwrap();
    let w = net.store.init_values(3);
    let (lw, gw) = one_step(&mut cpu, &net, &w, 11);
    let (lg, gg) = one_step(gpu.as_mut(), &net, &w, 11);
    let e = rel_err(&lg, &to64(&lw));
    assert!(e <= 1e-4, "losses {lg:?} vs {lw:?}: {e:.3e}");
    let mut worst = (0.0, String::new());
    for info in &net.store.infos {
        let r = info.param.offset..info.param.offset + info.param.len;
        let e = rel_err(&gg[r.clone()], &to64(&gw[r]));
        common::report(&info.name, e);
        assert!(e <= 1e-4, "gradient of {}: relative error {e:.3e}", info.name);
        if e > worst.0 {
            worst = (e, info.name.clone());
        }
    }
    eprintln!("worst parameter gradient: {} at {:.3e}", worst.1, worst.0);
}

/// `--precision bf16` on both devices: the layers' GEMMs and the GRU's recurrence take bf16
/// operands (rounded to nearest even) and sum in f32 on both. Each such GEMM matches
/// the CPU's to 1e-7 on the same inputs (gpu_ops), but across a step the devices' f32 values
/// differ in their last bits, an operand near a rounding boundary then lands on the other bf16
/// value (2⁻⁸ away) on one device, and the differences grow layer by layer. The CPU's own
/// avx512 and portable paths differ by as much in bf16 (2.3e-4 on the small model's pooled
/// embeddings, against 2e-7 in fp32; docs/results/gpu.md). So the bound is that spread's, not
/// fp32's: losses within 1e-4, the whole gradient within 1e-3 (measured 3.4e-4 on the
/// emulated device), each parameter's within 5e-3 (measured at most 2.1e-3); and the whole
/// gradient at least 4× closer to the CPU's bf16 step than to its fp32 one (measured 11×),
/// so the GPU did round.
///
/// On a card those bounds hold for the emulated device only. A GEMM of f32 operands (the
/// region features into ψ1, and its weight gradient) may keep more than bf16's bits there
/// (cuBLAS's FAST_16BF: gpu_ops), and an H200 (2026-12-04) put ψ1's weight gradient 7.9e-3
/// from the CPU's bf16 one: the size of bf16's own error. So a card is held to bf16's
/// spread: each parameter within 2e-2, the whole gradient within 1e-2 of the CPU's bf16
/// step, and still measurably off its fp32 one (the bf16 trunk did round).
#[cfg(feature = "cuda")]
#[test]
fn one_bf16_training_step_matches_the_cpus_bf16() {
    use semshare::backend::Precision;
    use semshare::backend::cpu::Cpu;
    let Some(mut gpu) = common::gpu::cuda_or_skip("bf16 training step (small preset)") else { return };
    gpu.set_precision(Precision::Bf16);
    let net = SemShare::new(&config()).unwrap();
    let w = net.store.init_values(3);
    let (lg, gg) = one_step(&mut gpu, &net, &w, 11);
    let (lw, gw) = one_step(&mut Cpu::with_precision(Precision::Bf16).unwrap(), &net, &w, 11);
    let (_, g32) = one_step(&mut common::cpu(), &net, &w, 11);
    let e = rel_err(&lg, &to64(&lw));
    common::report("bf16 losses", e);
    assert!(e <= 1e-4, "bf16 losses {lg:?} vs the CPU's {lw:?}: {e:.3e}");
    let emulated = common::gpu::emulated();
    let (per_param, whole_bound) = if emulated { (5e-3, 1e-3) } else { (2e-2, 1e-2) };
    let mut worst = (0.0, String::new());
    for info in &net.store.infos {
        let r = info.param.offset..info.param.offset + info.param.len;
        let e = rel_err(&gg[r.clone()], &to64(&gw[r]));
        common::report(&format!("bf16 gradient {}", info.name), e);
        assert!(e <= per_param, "bf16 gradient of {}: relative error {e:.3e} against the CPU's bf16", info.name);
        if e > worst.0 {
            worst = (e, info.name.clone());
        }
    }
    let (whole, from_fp32) = (rel_err(&gg, &to64(&gw)), rel_err(&gg, &to64(&g32)));
    eprintln!(
        "bf16: whole gradient {whole:.3e} from the CPU's bf16 step, {from_fp32:.3e} from its fp32 step; worst parameter {} at {:.3e}",
        worst.1, worst.0
    );
    assert!(whole <= whole_bound, "bf16 gradient: relative error {whole:.3e} against the CPU's bf16 step");
    assert!(from_fp32 > 1e-4, "bf16 gradient {from_fp32:.2e} from fp32's: did the trunk round?");
    assert!(from_fp32 > whole, "bf16 gradient {from_fp32:.2e} from fp32's, {whole:.2e} from bf16's");
    assert!(
        !emulated || from_fp32 > 4.0 * whole,
        "bf16 gradient {from_fp32:.2e} from fp32's, {whole:.2e} from bf16's: did the GEMMs round?"
    );
}

#[test]
fn twenty_steps_stay_within_1e3() {
    let Some(mut gpu) = gpu_or_skip("20 training steps (small preset, narrowed)") else { return };
    let mut cpu = common::cpu();
    let cfg = narrow();
    let tc = TrainConfig { warmup: 2, lr: 1e-3, ..TrainConfig::default() };
    let run = |dev: &mut dyn Backend| {
        let mut t = Trainer::new(dev, &cfg, tc.clone()).unwrap();
        let mut losses = vec![];
        for s in 0..20 {
            // 8 pairs a step (the one-step twins above use 16): the drift being checked is per
            // step, not per item.
            let (ib, tb) = batches(&cfg, 8, 1000 + s);
            losses.push(t.step(dev, ib, tb).unwrap().loss);
        }
        (losses, dev.download(t.params.view()).unwrap())
    };
    let (lw, pw) = run(&mut cpu);
    let (lg, pg) = run(gpu.as_mut());
    let mut worst_loss = 0.0f64;
    for (s, (a, b)) in lg.iter().zip(&lw).enumerate() {
        let e = ((a - b) / b).abs() as f64;
        assert!(e <= 1e-3, "step {s}: loss {a} vs {b} ({e:.3e})");
        worst_loss = worst_loss.max(e);
    }
    let e = rel_err(&pg, &to64(&pw));
    assert!(e <= 1e-3, "parameters after 20 steps: relative error {e:.3e}");
    eprintln!("20 steps: worst loss error {worst_loss:.3e}, parameters {e:.3e}");
}

/// `semshare demo --device cuda`, end to end through the CLI (synthesis, training, checkpoint,
/// evaluation), shrunk to one step and a few items (the demo's batch is 32 pairs, whose Bi-GRU
/// the emulated device interprets: 3 steps and twice the items took 2 minutes of CI): the run
/// completes and reports finite metrics.
#[test]
fn demo_runs_on_the_device() {
    if gpu_or_skip("demo_runs_on_the_device").is_none() {
        return;
    }
    let out = std::env::temp_dir().join(format!("semshare-gpu-demo-{}", std::process::id()));
    let run = std::process::Command::new(common::cli::binary())
        .args(["demo", "--device", "cuda", "--steps", "1", "--train", "32", "--val", "8", "--test", "16", "--out"])
        .arg(&out)
        .output()
        .expect("run semshare");
    let _ = std::fs::remove_dir_all(&out);
    let (stdout, stderr) = (String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    assert!(run.status.success(), "demo --device cuda failed ({}):\n{stderr}", run.status);
    assert!(stderr.contains("on cuda") || stderr.contains("emulated"), "not on the CUDA device:\n{stderr}");
    let ndcg =
        stdout.lines().find(|l| l.starts_with("NDCG@500")).unwrap_or_else(|| panic!("no NDCG@500 row:\n{stdout}"));
    let values: Vec<f64> = ndcg.split_whitespace().skip(1).map(|v| v.parse().expect("a number")).collect();
    assert_eq!(values.len(), 4, "{ndcg}");
    assert!(values.iter().all(|v| v.is_finite() && (0.0..=100.0).contains(v)), "{ndcg}");
}

/// Stopped (Ctrl-C in the CLI) at its step-16 log point, a run on the device writes
/// `last.safetensors` there and resumes as if it had not stopped. (A stop between log points,
/// which reads the steps not yet read first: the signal test below.)
#[test]
fn a_stopped_run_on_the_device_resumes_as_if_it_had_not_stopped() {
    if gpu_or_skip("a_stopped_run_on_the_device_resumes_as_if_it_had_not_stopped").is_none() {
        return;
    }
    let device = || gpu_or_skip("a stopped run").expect("the device opened once already");
    common::training::stopped_run_resumes(&device, "gpu", false);
}

/// SIGINT to `train --device cuda`, whose steps are deferred and read back every 16 steps and
/// at each validation (every 5 here): the run stops after the step under way, most often
/// between those reads, so the steps not yet read are read (and checked) before
/// `last.safetensors` is written at the step reached. Resumed, it ends where an uninterrupted
/// run of as many steps ends (constant learning rate after warm-up: a longer run's prefix).
#[cfg(unix)]
#[test]
fn a_signal_stops_a_run_on_the_device_with_a_checkpoint_to_resume_from() {
    use common::cli::{ok, path, semshare, stopped_by, strs, tmp};
    use semshare::checkpoint::Checkpoint;
    use std::os::unix::process::ExitStatusExt;
    if gpu_or_skip("a_signal_stops_a_run_on_the_device_with_a_checkpoint_to_resume_from").is_none() {
        return;
    }
    let dir = tmp("gpu-signal", "run");
    let data = dir.join("data");
    ok(&semshare(&["synth", "--out", path(&data), "--train", "40", "--val", "12", "--test", "12", "--seed", "2"]));
    let cfg = dir.join("tiny.json");
    std::fs::write(
        &cfg,
        r#"{"model": {"layers": 1, "dim": 16, "heads": 2, "ffn": 32, "word_dim": 8, "gru_hidden": 8},
            "train": {"eval_every": 5, "warmup": 1, "batch_size": 8, "patience": 0, "min_lr_ratio": 1.0}}"#,
    )
    .unwrap();
    let train = |out: &str, steps: &str, more: &[&str]| -> Vec<String> {
        let run = dir.join(out);
        let args = ["train", "--data", path(&data), "--config", path(&cfg), "--out", path(&run), "--steps", steps];
        args.iter().chain(&["--device", "cuda"]).chain(more).map(|a| a.to_string()).collect()
    };
    let (status, stdout, stderr) = stopped_by(&strs(&train("part", "1000000", &[])), " val ", "INT");
    assert_eq!(status.signal(), Some(2), "{stderr}");
    let last = dir.join("part/last.safetensors");
    let at = Checkpoint::load(&last).unwrap().step;
    assert!(stdout.contains(&format!("stopped by SIGINT at step {at} of 1000000")), "{stdout}");
    eprintln!("stopped at step {at} (reads every 16 steps and every 5th)");
    let total = (at + 3).to_string();
    ok(&semshare(&strs(&train("part", &total, &["--resume", path(&last)]))));
    ok(&semshare(&strs(&train("whole", &total, &[]))));
    let (resumed, whole) =
        (Checkpoint::load(&last).unwrap(), Checkpoint::load(&dir.join("whole/last.safetensors")).unwrap());
    assert_eq!(resumed.step, whole.step);
    let err = rel_err(&resumed.params, &common::to64(&whole.params));
    assert!(err <= 1e-5, "resumed parameters differ from the uninterrupted run's by {err:e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
