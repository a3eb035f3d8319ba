//! Whole-model gradient check: `SemShare::loss_backward` on a tiny configuration, for an image
//! batch (with region classes and two masked regions) and a text batch (with two masked
//! tokens), against central finite differences of the returned loss
//! L = label·1 + context·λ (λ = 0.5, so the context path weighs as much as the label path).
//!
//! Tolerance: relative norm 2e-2, with the same absolute floor as tests/layers_gradients.rs.
//! The loss comes back as f32 (relative rounding 6e-8 on L ≈ 2, i.e. ~1e-7) after a forward
//! of ~30 f32 ops (noise ~1e-6); a central difference with step 1e-2 turns that into ~5e-5
//! per coordinate, against gradient coordinates of ~1e-3..1e-1, plus truncation ~1e-5. So
//! a few 1e-3 relative, and 2e-2 still fails on any wrong or missing path (off by ~1).
//!
//! Also: parameters a modality never touches get exactly zero gradient, the two modalities'
//! gradients add up in one buffer, and embeddings do not depend on the rest of the batch.

mod common;

use common::{fd32_at, noisy_params, rand_ids, rand_range, randv, rel_err, sample_coords};
use semshare::backend::Backend;
use semshare::model::{Batch, EmbeddingKind, ImageBatch, LossWeights, MaskPlan, ModelConfig, SemShare, TextBatch};
use semshare::nn::Dropout;
use semshare::tensor::Tensor;

const TOL: f64 = 2e-2;
const STEP: f32 = 1e-2;
/// Per-coordinate gradient size below which the comparison is absolute (as in layers).
const FLOOR: f64 = 1e-4;
/// Coordinates sampled per parameter tensor the modality reaches (~30 tensors: ~90 in all).
const PER_TENSOR: usize = 3;

fn tiny() -> ModelConfig {
    ModelConfig {
        region_dim: 7,
        max_regions: 36,
        word_dim: 6,
        gru_hidden: 5,
        dim: 8,
        layers: 1,
        heads: 2,
        ffn: 16,
        max_tokens: 24,
        vocab: 20,
        labels: 4,
        object_classes: 5,
        dropout: 0.0,
        mask_prob: 0.15,
        lambda: 0.5,
        ..ModelConfig::small()
    }
}

fn weights(cfg: &ModelConfig) -> LossWeights {
    LossWeights { label: 1.0, context: cfg.lambda }
}

fn labels(seed: u64, items: usize, c: usize) -> Vec<f32> {
    rand_ids(seed, items * c, 2).iter().map(|&v| v as f32).collect()
}

fn image_batch(cfg: &ModelConfig, lengths: &[usize], with_classes: bool, seed: u64) -> Batch {
    let tokens: usize = lengths.iter().sum();
    Batch::Image(ImageBatch {
        lengths: lengths.to_vec(),
        features: randv(seed, tokens * cfg.region_dim).into(),
        boxes: rand_range(seed ^ 1, tokens * 5, 0.0, 1.0),
        classes: with_classes.then(|| rand_ids(seed ^ 2, tokens, cfg.object_classes)),
        labels: labels(seed ^ 3, lengths.len(), cfg.labels),
    })
}

fn text_batch(cfg: &ModelConfig, lengths: &[usize], seed: u64) -> Batch {
    let tokens: usize = lengths.iter().sum();
    let ids = rand_ids(seed, tokens, cfg.vocab - 3).iter().map(|&t| t + 3).collect(); // no [PAD] [UNK] [MASK]
    Batch::Text(TextBatch {
        lengths: lengths.to_vec(),
        tokens: ids,
        labels: labels(seed ^ 3, lengths.len(), cfg.labels),
        ..TextBatch::default()
    })
}

/// Mask these packed rows; the targets are the batch's own context targets there.
fn plan(batch: &Batch, rows: &[u32]) -> MaskPlan {
    let originals = SemShare::context_targets(batch).expect("the batch has context targets");
    MaskPlan { rows: rows.to_vec(), targets: rows.iter().map(|&r| originals[r as usize]).collect() }
}

struct Setup {
    model: SemShare,
    wv: Vec<f32>,
}

impl Setup {
    fn new(seed: u64) -> Self {
        let model = SemShare::new(&tiny()).unwrap();
        let wv = noisy_params(&model.store, seed);
        Setup { model, wv }
    }

    /// One modality's forward + backward from a zero gradient: (loss, gradient).
    fn grad(&self, b: &mut dyn Backend, w: &[f32], batch: &Batch, plan: &MaskPlan, drop: Dropout) -> (f64, Vec<f32>) {
        let wt = b.upload(w, &[w.len()]).unwrap();
        let mut g = b.zeros(&[w.len()]).unwrap();
        let cfg = &self.model.cfg;
        let l = self.model.loss_backward(b, &wt, &mut g, batch, plan, drop, weights(cfg)).unwrap();
        (l.label as f64 + cfg.lambda as f64 * l.context as f64, b.download(g.view()).unwrap())
    }

    fn range(&self, name: &str) -> std::ops::Range<usize> {
        let p = self.model.store.find(name).unwrap_or_else(|| panic!("no parameter {name}")).param;
        p.offset..p.offset + p.len
    }

    /// Sampled coordinates of every parameter tensor whose name starts with one of `prefixes`,
    /// plus every coordinate of the tensors in `all_of`.
    fn coords(&self, prefixes: &[&str], all_of: &[std::ops::Range<usize>], seed: u64) -> Vec<usize> {
        let mut out = vec![];
        for (i, info) in self.model.store.infos.iter().enumerate() {
            if prefixes.iter().any(|p| info.name.starts_with(p)) {
                let p = info.param;
                out.extend(sample_coords(seed ^ (i as u64 * 7919), p.len, PER_TENSOR).iter().map(|c| c + p.offset));
            }
        }
        for r in all_of {
            out.extend(r.clone().filter(|c| !out.contains(c)).collect::<Vec<_>>());
        }
        out
    }

    fn check_fd(&self, what: &str, batch: &Batch, plan: &MaskPlan, drop: Dropout, coords: &[usize]) {
        let mut c = common::cpu();
        let b: &mut dyn Backend = &mut c;
        let (loss, g) = self.grad(b, &self.wv, batch, plan, drop);
        assert!(loss.is_finite() && loss > 0.0, "{what}: loss {loss}");
        let mut f = |w: &[f32]| self.grad(b, w, batch, plan, drop).0;
        let fd = fd32_at(&mut f, &self.wv, coords, STEP);
        let got: Vec<f32> = coords.iter().map(|&i| g[i]).collect();
        let diff: Vec<f64> = got.iter().zip(&fd).map(|(a, b)| *a as f64 - b).collect();
        let e = common::norm(&diff) / common::norm(&fd).max(FLOOR * (fd.len() as f64).sqrt());
        common::report(what, e);
        // Name the worst coordinate, to point at the layer if this fails.
        let (worst, _) =
            diff.iter().enumerate().fold((0, 0.0), |acc, (i, d)| if d.abs() > acc.1 { (i, d.abs()) } else { acc });
        let owner = self
            .model
            .store
            .infos
            .iter()
            .find(|i| (i.param.offset..i.param.offset + i.param.len).contains(&coords[worst]));
        assert!(
            e < TOL,
            "{what}: rel err {e:e} over {} coordinates (‖fd‖ = {:e}); worst at {} of {}: analytic {} vs fd {}",
            coords.len(),
            common::norm(&fd),
            coords[worst],
            owner.map(|i| i.name.as_str()).unwrap_or("?"),
            got[worst],
            fd[worst]
        );
        assert!(
            common::norm(&fd) > 1e-3,
            "{what}: the sampled gradient is ~0 (‖fd‖ = {:e}), the check is vacuous",
            common::norm(&fd)
        );
    }
}

const IMAGE_PARAMS: &[&str] = &["image.", "shared.", "classifier.", "heads.object."];
const TEXT_PARAMS: &[&str] = &["text.", "shared.", "classifier.", "heads.word."];

#[test]
fn image_loss_gradient_matches_fd() {
    let s = Setup::new(1);
    let batch = image_batch(&s.model.cfg, &[3, 1, 2], true, 2);
    let plan = plan(&batch, &[0, 4]);
    let coords = s.coords(IMAGE_PARAMS, &[s.range("image.mask_feature")], 3);
    s.check_fd("image batch", &batch, &plan, Dropout::OFF, &coords);
    // The [MASK] feature alone: the only route to it is through the two masked rows.
    let mask = s.range("image.mask_feature").collect::<Vec<_>>();
    s.check_fd("image.mask_feature", &batch, &plan, Dropout::OFF, &mask);
}

/// Texts as pre-extracted segment features: ψ1 reads them (no embedding, no GRU) and, with
/// no token to predict, the text context loss is dropped.
#[test]
fn text_feature_loss_gradient_matches_fd() {
    let cfg = ModelConfig { text_feature_dim: 5, ..tiny() };
    let model = SemShare::new(&cfg).unwrap();
    assert!(model.store.find("text.embedding.weight").is_none() && model.store.find("text.psi1.weight").is_some());
    assert_eq!(model.store.find("text.psi1.weight").unwrap().param.len, 5 * cfg.dim);
    let wv = noisy_params(&model.store, 11);
    let s = Setup { model, wv };
    let lengths = [4, 1, 3];
    let batch = Batch::Text(TextBatch {
        lengths: lengths.to_vec(),
        features: rand_range(12, 8 * 5, -1.0, 1.0).into(),
        labels: labels(13, lengths.len(), cfg.labels),
        ..TextBatch::default()
    });
    assert!(SemShare::context_targets(&batch).is_none());
    let coords = s.coords(&["text.", "shared.", "classifier."], &[], 14);
    s.check_fd("text feature batch", &batch, &MaskPlan::default(), Dropout::OFF, &coords);
}

#[test]
fn text_loss_gradient_matches_fd() {
    let s = Setup::new(4);
    let batch = text_batch(&s.model.cfg, &[4, 1, 3], 5);
    let plan = plan(&batch, &[1, 4]); // row 4: the one-token item, masked
    // The [MASK] token's embedding row (id 2) is what the masked tokens read.
    let emb = s.range("text.embedding.weight");
    let dw = s.model.cfg.word_dim;
    let mask_row = emb.start + 2 * dw..emb.start + 3 * dw;
    let coords = s.coords(TEXT_PARAMS, std::slice::from_ref(&mask_row), 6);
    s.check_fd("text batch", &batch, &plan, Dropout::OFF, &coords);
    s.check_fd("text [MASK] embedding row", &batch, &plan, Dropout::OFF, &mask_row.collect::<Vec<_>>());
}

#[test]
fn loss_gradient_with_dropout_matches_fd() {
    // The dropout masks are a hash of (seed, index): fixed while the weights move.
    let s = Setup::new(7);
    let drop = Dropout { p: 0.2, seed: 99 };
    let img = image_batch(&s.model.cfg, &[2, 3], true, 8);
    let pi = plan(&img, &[1]);
    s.check_fd("image batch, dropout 0.2", &img, &pi, drop, &s.coords(IMAGE_PARAMS, &[], 9));
    let txt = text_batch(&s.model.cfg, &[2, 3], 10);
    let pt = plan(&txt, &[0, 3]);
    s.check_fd("text batch, dropout 0.2", &txt, &pt, drop, &s.coords(TEXT_PARAMS, &[], 11));
}

fn assert_zero(s: &Setup, g: &[f32], prefixes: &[&str], what: &str) {
    let mut checked = 0;
    for info in &s.model.store.infos {
        if prefixes.iter().any(|p| info.name.starts_with(p)) {
            let p = info.param;
            let nz = g[p.offset..p.offset + p.len].iter().filter(|&&v| v != 0.0).count();
            assert_eq!(nz, 0, "{what}: {} has {nz} non-zero gradient entries", info.name);
            checked += 1;
        }
    }
    assert!(checked > 0, "{what}: no parameter matched {prefixes:?}");
}

fn assert_some_nonzero(s: &Setup, g: &[f32], name: &str) {
    let r = s.range(name);
    assert!(g[r].iter().any(|&v| v != 0.0), "{name} got no gradient");
}

#[test]
fn untouched_parameters_get_exactly_zero_gradient() {
    let s = Setup::new(12);
    let mut c = common::cpu();
    let b: &mut dyn Backend = &mut c;
    let img = image_batch(&s.model.cfg, &[3, 1], true, 13);
    let (_, g) = s.grad(b, &s.wv, &img, &plan(&img, &[2]), Dropout::OFF);
    assert_zero(&s, &g, &["text.", "heads.word."], "image-only pass");
    assert_some_nonzero(&s, &g, "image.mask_feature");
    assert_some_nonzero(&s, &g, "heads.object.weight");
    assert_some_nonzero(&s, &g, "shared.layers.0.attn.qkv.weight");

    let txt = text_batch(&s.model.cfg, &[2, 2], 14);
    let (_, g) = s.grad(b, &s.wv, &txt, &plan(&txt, &[3]), Dropout::OFF);
    assert_zero(&s, &g, &["image.", "heads.object."], "text-only pass");
    assert_some_nonzero(&s, &g, "text.gru.weight_hh_l0_reverse");
    assert_some_nonzero(&s, &g, "heads.word.bias");

    // Images without region classes and nothing masked: no context term, no [MASK] feature.
    let img = image_batch(&s.model.cfg, &[2, 2], false, 15);
    let (_, g) = s.grad(b, &s.wv, &img, &MaskPlan::default(), Dropout::OFF);
    assert_zero(&s, &g, &["text.", "heads.", "image.mask_feature"], "image pass without masks");
    assert_some_nonzero(&s, &g, "classifier.weight");

    // λ = 0 (the wo-c variant): the heads get nothing even though segments are masked.
    let img = image_batch(&s.model.cfg, &[3], true, 16);
    let wt = b.upload(&s.wv, &[s.wv.len()]).unwrap();
    let mut gt = b.zeros(&[s.wv.len()]).unwrap();
    let lw = LossWeights { label: 1.0, context: 0.0 };
    let l = s.model.loss_backward(b, &wt, &mut gt, &img, &plan(&img, &[0]), Dropout::OFF, lw).unwrap();
    assert!(l.context > 0.0 && l.masked == 1, "the context loss is still reported: {l:?}");
    let g = b.download(gt.view()).unwrap();
    assert_zero(&s, &g, &["heads.", "text."], "λ = 0");
}

#[test]
fn two_modalities_accumulate_into_one_buffer() {
    let s = Setup::new(17);
    let mut c = common::cpu();
    let b: &mut dyn Backend = &mut c;
    let img = image_batch(&s.model.cfg, &[2, 1], true, 18);
    let txt = text_batch(&s.model.cfg, &[3, 2], 19);
    let (pi, pt) = (plan(&img, &[0]), plan(&txt, &[2]));
    let (_, gi) = s.grad(b, &s.wv, &img, &pi, Dropout::OFF);
    let (_, gx) = s.grad(b, &s.wv, &txt, &pt, Dropout::OFF);
    let wt = b.upload(&s.wv, &[s.wv.len()]).unwrap();
    let mut g: Tensor = b.zeros(&[s.wv.len()]).unwrap();
    let lw = weights(&s.model.cfg);
    s.model.loss_backward(b, &wt, &mut g, &img, &pi, Dropout::OFF, lw).unwrap();
    s.model.loss_backward(b, &wt, &mut g, &txt, &pt, Dropout::OFF, lw).unwrap();
    let sum: Vec<f64> = gi.iter().zip(&gx).map(|(a, c)| *a as f64 + *c as f64).collect();
    let e = rel_err(&b.download(g.view()).unwrap(), &sum);
    assert!(e < 1e-6, "image + text in one buffer differs from the sum of the two: {e:e}");
}

/// Packing without padding means an item's embedding cannot depend on its batch-mates.
#[test]
fn embeddings_do_not_depend_on_the_rest_of_the_batch() {
    let s = Setup::new(20);
    let cfg = s.model.cfg.clone();
    let mut c = common::cpu();
    let b: &mut dyn Backend = &mut c;
    let w = b.upload(&s.wv, &[s.wv.len()]).unwrap();
    let lengths = [3, 1, 2];
    for batch in [image_batch(&cfg, &lengths, false, 21), text_batch(&cfg, &lengths, 22)] {
        for kind in [EmbeddingKind::Pooled, EmbeddingKind::Label] {
            let all = s.model.embed(b, &w, &batch, kind).unwrap();
            let cols = all.cols();
            assert_eq!(all.shape(), &[3, if kind == EmbeddingKind::Pooled { cfg.dim } else { cfg.labels }][..]);
            let all = b.download(all.view()).unwrap();
            for item in 0..lengths.len() {
                let one = s.model.embed(b, &w, &common::item_of(&batch, &cfg, item), kind).unwrap();
                let one = b.download(one.view()).unwrap();
                let row = &all[item * cols..(item + 1) * cols];
                let e = rel_err(&one, &common::to64(row));
                assert!(e < 1e-5, "{kind:?} item {item}: alone vs in a batch rel err {e:e}");
                if kind == EmbeddingKind::Label {
                    let n = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
                    assert!((n - 1.0).abs() < 1e-5, "label embedding of item {item} has norm {n}");
                }
            }
        }
    }
}

// ---- Table 1's structural variants ----------------------------------------------------------

fn setup_with(cfg: ModelConfig, seed: u64) -> Setup {
    let model = SemShare::new(&cfg).unwrap();
    let wv = noisy_params(&model.store, seed);
    Setup { model, wv }
}

/// `wo-t` and `wo-r`: the FC trunk has no attention parameters, and with global segments every
/// path (encoder → mean → FC trunk → classifier) still has the gradient of its loss.
#[test]
fn fc_trunk_and_global_segments_gradients_match_fd() {
    use semshare::model::Trunk;
    let fc = ModelConfig { trunk: Trunk::Fc, ..tiny() };
    let s = setup_with(fc.clone(), 31);
    assert!(s.model.store.infos.iter().all(|i| !i.name.contains(".attn.") && !i.name.contains(".norm1.")));
    let img = image_batch(&fc, &[3, 1, 2], true, 32);
    s.check_fd("FC trunk, image batch", &img, &plan(&img, &[0, 4]), Dropout::OFF, &s.coords(IMAGE_PARAMS, &[], 33));
    let txt = text_batch(&fc, &[4, 1, 3], 34);
    s.check_fd("FC trunk, text batch", &txt, &plan(&txt, &[2]), Dropout::OFF, &s.coords(TEXT_PARAMS, &[], 35));

    let global = ModelConfig { global_segments: true, ..fc };
    let s = setup_with(global.clone(), 36);
    let img = image_batch(&global, &[3, 1, 2], false, 37);
    let none = MaskPlan::default();
    s.check_fd(
        "global segments, image batch",
        &img,
        &none,
        Dropout::OFF,
        &s.coords(&["image.", "shared.", "classifier."], &[], 38),
    );
    let txt = text_batch(&global, &[4, 1, 3], 39);
    s.check_fd(
        "global segments, text batch",
        &txt,
        &none,
        Dropout::OFF,
        &s.coords(&["text.", "shared.", "classifier."], &[], 40),
    );
    // The trunk sees the mean of the encoded segments: the order of an item's regions is lost.
    let mut c = common::cpu();
    let b: &mut dyn Backend = &mut c;
    let wt = b.upload(&s.wv, &[s.wv.len()]).unwrap();
    let swapped = match &img {
        Batch::Image(x) => {
            let (r, dr) = (0..3, global.region_dim);
            let mut y = x.clone();
            for (i, j) in r.clone().zip(r.rev()) {
                y.features.make_f32()[i * dr..(i + 1) * dr].copy_from_slice(&x.features.to_f32()[j * dr..(j + 1) * dr]);
                y.boxes[i * 5..(i + 1) * 5].copy_from_slice(&x.boxes[j * 5..(j + 1) * 5]);
            }
            Batch::Image(y)
        }
        _ => unreachable!(),
    };
    let mut embed = |batch: &Batch| {
        let e = s.model.embed(b, &wt, batch, EmbeddingKind::Pooled).unwrap();
        b.download(e.view()).unwrap()
    };
    let (e1, e2) = (embed(&img), embed(&swapped));
    assert!(rel_err(&e2, &common::to64(&e1)) < 1e-5, "global segments depend on the regions' order");
    // A masked global segment has nothing left to predict it from.
    let mut g = b.zeros(&[s.wv.len()]).unwrap();
    let with_classes = image_batch(&global, &[2], true, 41);
    let lw = LossWeights { label: 1.0, context: 1.0 };
    let err = s.model.loss_backward(b, &wt, &mut g, &with_classes, &plan(&with_classes, &[0]), Dropout::OFF, lw);
    assert!(err.is_err(), "masking a global segment must be refused");
}

/// `st` and `imc`: two models that share no parameter; each modality's batch reaches only its own.
#[test]
fn separate_models_share_no_parameter() {
    let cfg = ModelConfig { separate_models: true, ..tiny() };
    let s = setup_with(cfg.clone(), 42);
    let shared_names = |prefix: &str| -> Vec<String> {
        s.model.store.infos.iter().filter(|i| i.name.starts_with(prefix)).map(|i| i.name.clone()).collect()
    };
    let (image_trunk, text_trunk) = (shared_names("shared."), shared_names("text_shared."));
    assert_eq!(image_trunk.len(), text_trunk.len());
    assert!(s.model.store.find("text_classifier.weight").is_some());
    let mut c = common::cpu();
    let b: &mut dyn Backend = &mut c;
    let txt = text_batch(&cfg, &[3, 2], 43);
    let (_, g) = s.grad(b, &s.wv, &txt, &plan(&txt, &[1]), Dropout::OFF);
    assert_zero(&s, &g, &["shared.", "classifier.", "image.", "heads.object."], "text batch, separate models");
    assert_some_nonzero(&s, &g, "text_shared.layers.0.attn.qkv.weight");
    assert_some_nonzero(&s, &g, "text_classifier.weight");
    let img = image_batch(&cfg, &[2, 2], true, 44);
    let (_, g) = s.grad(b, &s.wv, &img, &plan(&img, &[1]), Dropout::OFF);
    assert_zero(&s, &g, &["text_shared.", "text_classifier.", "text.", "heads.word."], "image batch, separate models");
    let coords = s.coords(&["text.", "text_shared.", "text_classifier.", "heads.word."], &[], 45);
    s.check_fd("separate models, text batch", &txt, &plan(&txt, &[1]), Dropout::OFF, &coords);
}

/// `backward_loss(extra_dz = r)` is the gradient of `L + Σ r ⊙ z`: how the cross-modal losses
/// of `ours+con`, `imc` and DSCMR reach the model.
#[test]
fn extra_pooled_gradient_matches_fd() {
    let s = Setup::new(46);
    let cfg = s.model.cfg.clone();
    let img = image_batch(&cfg, &[3, 1, 2], true, 47);
    let pl = plan(&img, &[1]);
    let r = randv(48, 3 * cfg.dim);
    let mut c = common::cpu();
    let b: &mut dyn Backend = &mut c;
    let mut eval = |w: &[f32], want_grad: bool| -> (f64, Vec<f32>) {
        let wt = b.upload(w, &[w.len()]).unwrap();
        let mut losses = b.zeros(&[2]).unwrap();
        let staged = s.model.stage(b, &img, &pl, true).unwrap();
        let f = s.model.forward_loss(b, &wt, staged, Dropout::OFF, weights(&cfg), losses.view_mut()).unwrap();
        let z = b.download(f.z.view()).unwrap();
        let l = b.download(losses.view()).unwrap();
        let loss = l[0] as f64
            + cfg.lambda as f64 * l[1] as f64
            + z.iter().zip(&r).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>();
        if !want_grad {
            return (loss, vec![]);
        }
        let mut g = b.zeros(&[w.len()]).unwrap();
        let rt = b.upload(&r, &[3, cfg.dim]).unwrap();
        s.model.backward_loss(b, &wt, &mut g, f, Some(&rt)).unwrap();
        (loss, b.download(g.view()).unwrap())
    };
    let (_, g) = eval(&s.wv, true);
    let coords = s.coords(IMAGE_PARAMS, &[], 49);
    let fd = fd32_at(&mut |w: &[f32]| eval(w, false).0, &s.wv, &coords, STEP);
    let got: Vec<f32> = coords.iter().map(|&i| g[i]).collect();
    let diff: Vec<f64> = got.iter().zip(&fd).map(|(a, b)| *a as f64 - b).collect();
    let e = common::norm(&diff) / common::norm(&fd);
    common::report("extra dz", e);
    assert!(e < TOL && common::norm(&fd) > 1e-3, "extra dz: rel err {e:e}");
}
