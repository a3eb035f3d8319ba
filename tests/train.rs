//! Training behaviour: bitwise determinism on the CPU, learning, divergence handling that
//! keeps the last good checkpoint, and resumption.

mod common;

use semshare::Error;
use semshare::backend::cpu::Cpu;
use std::path::Path;

use semshare::data::Dataset;
use semshare::model::ModelConfig;
use semshare::train::{RunOptions, TrainConfig, train};

use common::training::{open, tiny_data, tiny_model};

fn run(data: &Dataset, cfg: &TrainConfig, dir: &Path) -> semshare::Result<semshare::train::TrainSummary> {
    common::training::run(&mut Cpu::new(), data, cfg, dir)
}

fn tmp(name: &str) -> std::path::PathBuf {
    common::training::tmp("train", name)
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
    let opts = RunOptions { resume: Some(last.clone()), ..RunOptions::new(&dir) };
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
    let opts = RunOptions { resume: Some(dir.join("last.safetensors")), ..RunOptions::new(&dir) };
    let rest = train(&mut Cpu::new(), &open(&data, &dir), &tiny_model(&data), &cfg, &opts).unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&rest.losses), bits(&whole.losses[5..]));
}

/// A run told to stop (Ctrl-C in the CLI) between validations writes `last.safetensors` at the
/// step it reached, and resuming from it gives bitwise the rest of the uninterrupted run.
#[test]
fn a_stopped_run_resumes_as_if_it_had_not_stopped() {
    common::training::stopped_run_resumes(&|| Box::new(Cpu::new()), "cpu", true);
}

// ---- Table 1's variants in the trainer ------------------------------------------------------

use semshare::data::batches::{image_batch, text_batch};
use semshare::model::Variant;
use semshare::train::Trainer;

fn run_variant(data: &Dataset, cfg: &TrainConfig, dir: &Path) -> semshare::train::TrainSummary {
    let opts = RunOptions::new(dir);
    let model = cfg.variant.configure(&tiny_model(data));
    train(&mut Cpu::new(), &open(data, dir), &model, cfg, &opts).unwrap()
}

/// η = 0 turns `ours+con` into `ours` and `imc` into `st`: the consistency path adds nothing
/// else, so the loss curves are bitwise the same; η > 0 changes them.
#[test]
fn eta_zero_variants_equal_their_base_bitwise() {
    let data = tiny_data(7);
    let base = TrainConfig { steps: 6, batch_size: 8, eval_every: 3, warmup: 2, seed: 3, ..TrainConfig::default() };
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let curve = |variant, eta, name: &str| {
        bits(&run_variant(&data, &TrainConfig { variant, eta, ..base.clone() }, &tmp(name)).losses)
    };
    assert_eq!(curve(Variant::OursCon, 0.0, "con0"), curve(Variant::Ours, 0.0, "ours"));
    assert_eq!(curve(Variant::Imc, 0.0, "imc0"), curve(Variant::St, 0.0, "st"));
    assert_ne!(curve(Variant::OursCon, 1.0, "con1"), curve(Variant::Ours, 1.0, "ours1"));
    assert_ne!(curve(Variant::Imc, 1.0, "imc1"), curve(Variant::St, 1.0, "st1"));
}

/// One step of each variant from the same start: the gradient reaches exactly the parameters
/// its definition says.
#[test]
fn each_variant_trains_exactly_what_defines_it() {
    let data = tiny_data(8);
    let dir = tmp("variants");
    let reader = open(&data, &dir);
    let split = reader.split("train").unwrap();
    let items: Vec<usize> = (0..8).collect();
    let grads_after_step = |variant: Variant| {
        let mut dev = Cpu::new();
        let cfg = TrainConfig { variant, batch_size: 8, ..TrainConfig::default() };
        let model = variant.configure(&tiny_model(&data));
        let mut t = Trainer::new(&mut dev, &model, cfg).unwrap();
        let images = image_batch(&reader.layout, split, &items).unwrap();
        let texts = text_batch(&reader.layout, split, &items).unwrap();
        let stats = t.step(&mut dev, images, texts).unwrap();
        let g = dev_download(&mut dev, &t.grads);
        let norm_of = |prefix: &str| -> f64 {
            let infos = t.net.store.infos.iter().filter(|i| i.name.starts_with(prefix));
            infos.flat_map(|i| &g[i.param.offset..i.param.offset + i.param.len]).map(|&x| (x as f64).powi(2)).sum()
        };
        let norms: Vec<(String, f64)> = ["heads.", "classifier.weight", "classifier.bias", "shared.", "text_shared."]
            .iter()
            .map(|p| (p.to_string(), norm_of(p)))
            .collect();
        (stats, norms)
    };
    let norm = |n: &[(String, f64)], p: &str| n.iter().find(|(k, _)| k == p).unwrap().1;

    let (s, n) = grads_after_step(Variant::Ours);
    assert!(s.text_context > 0.0 && norm(&n, "heads.") > 0.0 && s.consistency == 0.0, "{s:?}");
    for v in [Variant::WoC, Variant::WoR] {
        let (s, n) = grads_after_step(v);
        assert_eq!((s.image_context, s.text_context, norm(&n, "heads.")), (0.0, 0.0, 0.0), "{v}: no context loss");
        assert!(norm(&n, "classifier.weight") > 0.0, "{v}");
    }
    let (s, n) = grads_after_step(Variant::WoL);
    assert_eq!(norm(&n, "classifier.weight") + norm(&n, "classifier.bias"), 0.0, "wo-l trains no classifier");
    assert!(norm(&n, "heads.") > 0.0 && (s.loss - (s.image_context + s.text_context)).abs() < 1e-6, "{s:?}");
    let (s, n) = grads_after_step(Variant::Dscmr);
    assert!(s.consistency > 0.0 && (s.loss - s.consistency).abs() < 1e-6, "DSCMR's J is the whole loss: {s:?}");
    assert_eq!(norm(&n, "heads.") + norm(&n, "classifier.bias"), 0.0, "DSCMR: no context loss, P has no bias");
    assert!(norm(&n, "classifier.weight") > 0.0, "DSCMR's projection P = gᵀ is trained");
    for v in [Variant::St, Variant::Imc] {
        let (_, n) = grads_after_step(v);
        assert!(norm(&n, "shared.") > 0.0 && norm(&n, "text_shared.") > 0.0, "{v}: two trunks, both trained");
    }
    let (s, _) = grads_after_step(Variant::OursCon);
    assert!(s.consistency > 0.0, "{s:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn dev_download(dev: &mut Cpu, t: &semshare::tensor::Tensor) -> Vec<f32> {
    use semshare::backend::Backend;
    dev.download(t.view()).unwrap()
}

#[test]
fn a_model_without_the_variants_structure_is_refused() {
    let data = tiny_data(9);
    let cfg = TrainConfig { variant: Variant::St, ..TrainConfig::default() };
    let err = Trainer::new(&mut Cpu::new(), &tiny_model(&data), cfg).err().expect("st needs separate models");
    assert!(err.to_string().contains("separate_models = true"), "{err}");
    let cca = TrainConfig { variant: Variant::Cca, ..TrainConfig::default() };
    assert!(Trainer::new(&mut Cpu::new(), &tiny_model(&data), cca).is_err(), "CCA is not trained");
}

/// With patience p, training stops after p validations without a better validation NDCG. The
/// run has then done what its options ask: resumed with the same patience it trains nothing
/// (its best checkpoint still named), with a larger one it goes on.
#[test]
fn patience_stops_a_run_that_no_longer_improves() {
    let data = tiny_data(10);
    // A learning rate so small that validation NDCG never strictly improves after the first.
    let cfg = TrainConfig {
        steps: 40,
        batch_size: 8,
        eval_every: 4,
        warmup: 1,
        lr: 1e-20,
        patience: 2,
        ..TrainConfig::default()
    };
    let dir = tmp("patience");
    let s = run(&data, &cfg, &dir).unwrap();
    assert_eq!((s.best_step, s.steps), (4, 12), "best at the first validation, stop after two more");
    let opts = RunOptions { resume: Some(dir.join("last.safetensors")), ..RunOptions::new(&dir) };
    let (reader, model) = (open(&data, &dir), tiny_model(&data));
    let again = train(&mut Cpu::new(), &reader, &model, &cfg, &opts).unwrap();
    assert!(again.losses.is_empty() && !again.stopped, "{again:?}");
    assert_eq!((again.best_step, again.steps), (4, 12));
    assert_eq!(again.best_checkpoint, Some(dir.join("best.safetensors")));
    let more = train(&mut Cpu::new(), &reader, &model, &TrainConfig { patience: 3, ..cfg }, &opts).unwrap();
    assert_eq!((more.steps, more.losses.len()), (16, 4), "one more validation without a better score");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `context_pass = separate`: L1 is taken on the batch as it is and L2 on a second pass with the
/// step's segments masked, and the step's gradient is the sum of the two passes' (each checked
/// against `SemShare::loss_backward` on the same plan); `shared` takes both on the masked pass.
#[test]
fn the_separate_context_pass_keeps_masks_out_of_the_label_loss() {
    use semshare::backend::Backend;
    use semshare::model::{Batch, LossWeights, MaskPlan};
    use semshare::nn::Dropout;
    use semshare::train::ContextPass;

    let data = tiny_data(9);
    let dir = tmp("context-pass");
    let reader = open(&data, &dir);
    let split = reader.split("train").unwrap();
    let items: Vec<usize> = (0..8).collect();
    // No dropout: each pass is then a function of its plan alone.
    let model = ModelConfig { dropout: 0.0, lambda: 0.3, ..tiny_model(&data) };
    for pass in [ContextPass::Separate, ContextPass::Shared] {
        let mut dev = Cpu::new();
        let cfg = TrainConfig { batch_size: 8, context_pass: pass, ..TrainConfig::default() };
        let mut t = Trainer::new(&mut dev, &model, cfg).unwrap();
        let images = image_batch(&reader.layout, split, &items).unwrap();
        let texts = text_batch(&reader.layout, split, &items).unwrap();
        let (image_plan, text_plan, _, _) = t.draws(&images, &texts);
        assert!(!image_plan.rows.is_empty() && !text_plan.rows.is_empty(), "the step masks segments");
        let params = t.params.clone();
        let (bi, bt) = (Batch::Image(images.clone()), Batch::Text(texts.clone()));
        let stats = t.step(&mut dev, images, texts).unwrap();
        let got = dev_download(&mut dev, &t.grads);

        // The same step's losses and gradient from the model's own passes.
        let mut g = dev.zeros(&[t.net.store.total]).unwrap();
        let (label, context) = (LossWeights { label: 1.0, context: 0.0 }, LossWeights { label: 0.0, context: 0.3 });
        let clean = MaskPlan::default();
        let mut want = Vec::new();
        for (b, plan) in [(&bi, &image_plan), (&bt, &text_plan)] {
            let (l1, l2) = match pass {
                ContextPass::Separate => {
                    let l1 = t.net.loss_backward(&mut dev, &params, &mut g, b, &clean, Dropout::OFF, label).unwrap();
                    let l2 = t.net.loss_backward(&mut dev, &params, &mut g, b, plan, Dropout::OFF, context).unwrap();
                    (l1.label, l2.context)
                }
                ContextPass::Shared => {
                    let both = LossWeights { label: 1.0, context: 0.3 };
                    let l = t.net.loss_backward(&mut dev, &params, &mut g, b, plan, Dropout::OFF, both).unwrap();
                    (l.label, l.context)
                }
            };
            want.push((l1, l2));
        }
        let s = [(stats.image_label, stats.image_context), (stats.text_label, stats.text_context)];
        for ((got_l1, got_l2), (want_l1, want_l2)) in s.iter().zip(&want) {
            assert!((got_l1 - want_l1).abs() < 1e-6 && (got_l2 - want_l2).abs() < 1e-6, "{pass:?}: {s:?} vs {want:?}");
        }
        let want_g = dev.download(g.view()).unwrap();
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for (a, b) in got.iter().zip(&want_g) {
            num += ((a - b) as f64).powi(2);
            den += (*b as f64).powi(2);
        }
        assert!(den > 0.0 && (num / den).sqrt() < 1e-5, "{pass:?}: gradient rel err {}", (num / den).sqrt());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
