//! Parity with an independent PyTorch implementation of the model (`tools/torch_reference.py`).
//!
//! Each fixture in `tests/fixtures/parity_seed*.safetensors` holds a tiny model configuration
//! (metadata `model`), random parameters under their Rust names, one image batch and one text
//! batch (packed, with explicit mask rows), and what PyTorch computed from them in float64:
//! the four losses, the gradient of image(L1 + λ·L2) + text(L1 + λ·L2) for every parameter,
//! and both retrieval embeddings. Integer tensors are I32. Regenerate with
//! `python3 tools/torch_reference.py fixture --out tests/fixtures/parity_seed1.safetensors --seed 1`.

use std::collections::HashMap;
use std::path::PathBuf;

use safetensors::{Dtype, SafeTensors};
use semshare::backend::Backend;
use semshare::backend::cpu::Cpu;
use semshare::model::{Batch, EmbeddingKind, ImageBatch, LossWeights, MaskPlan, ModelConfig, SemShare, TextBatch};
use semshare::nn::Dropout;

/// Relative-norm tolerance of each parameter gradient and of the losses (f32 vs f64).
const GRAD_TOL: f64 = 1e-4;
/// Relative-norm tolerance of the embeddings.
const EMBED_TOL: f64 = 1e-5;

struct Fixture {
    name: String,
    cfg: ModelConfig,
    f32s: HashMap<String, (Vec<usize>, Vec<f32>)>,
    i32s: HashMap<String, Vec<i32>>,
}

impl Fixture {
    fn load(file: &str) -> Fixture {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(file);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let (_, header) = SafeTensors::read_metadata(&bytes).expect("fixture header");
        let meta = header.metadata().clone().expect("fixture metadata");
        assert_eq!(meta.get("format").map(String::as_str), Some("semshare-torch-parity-v1"));
        let cfg: ModelConfig = serde_json::from_str(&meta["model"]).expect("model configuration in the metadata");
        let st = SafeTensors::deserialize(&bytes).expect("fixture tensors");
        let (mut f32s, mut i32s) = (HashMap::new(), HashMap::new());
        for (name, view) in st.tensors() {
            let data = view.data();
            match view.dtype() {
                Dtype::F32 => {
                    let v = data.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
                    f32s.insert(name, (view.shape().to_vec(), v));
                }
                Dtype::I32 => {
                    let v = data.chunks_exact(4).map(|b| i32::from_le_bytes(b.try_into().unwrap())).collect();
                    i32s.insert(name, v);
                }
                other => panic!("{file}: tensor {name} has unexpected dtype {other:?}"),
            }
        }
        Fixture { name: file.to_string(), cfg, f32s, i32s }
    }

    fn f(&self, name: &str) -> &[f32] {
        &self.f32s.get(name).unwrap_or_else(|| panic!("{}: no F32 tensor {name}", self.name)).1
    }

    fn shape(&self, name: &str) -> &[usize] {
        &self.f32s[name].0
    }

    fn u(&self, name: &str) -> Vec<u32> {
        self.i32s
            .get(name)
            .unwrap_or_else(|| panic!("{}: no I32 tensor {name}", self.name))
            .iter()
            .map(|&x| u32::try_from(x).expect("non-negative index"))
            .collect()
    }

    fn lengths(&self, name: &str) -> Vec<usize> {
        self.u(name).into_iter().map(|x| x as usize).collect()
    }

    fn scalar(&self, name: &str) -> f64 {
        let v = self.f(name);
        assert_eq!(v.len(), 1, "{name} is not a scalar");
        v[0] as f64
    }

    fn image(&self) -> (Batch, MaskPlan) {
        let classes = self.u("input.image.classes");
        let rows = self.u("input.image.mask_rows");
        let targets = rows.iter().map(|&r| classes[r as usize]).collect();
        let batch = ImageBatch {
            lengths: self.lengths("input.image.lengths"),
            features: self.f("input.image.features").to_vec().into(),
            boxes: self.f("input.image.boxes").to_vec(),
            classes: Some(classes),
            labels: self.f("input.image.labels").to_vec(),
        };
        (Batch::Image(batch), MaskPlan { rows, targets })
    }

    fn text(&self) -> (Batch, MaskPlan) {
        let tokens = self.u("input.text.tokens");
        let rows = self.u("input.text.mask_rows");
        let targets = rows.iter().map(|&r| tokens[r as usize]).collect();
        let batch = TextBatch {
            lengths: self.lengths("input.text.lengths"),
            tokens,
            labels: self.f("input.text.labels").to_vec(),
            ..TextBatch::default()
        };
        (Batch::Text(batch), MaskPlan { rows, targets })
    }
}

/// ‖got − want‖ / ‖want‖ (absolute when ‖want‖ = 0).
fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        num += (g as f64 - w as f64).powi(2);
        den += (w as f64).powi(2);
    }
    if den > 0.0 { (num / den).sqrt() } else { num.sqrt() }
}

fn check_fixture(file: &str) {
    let fx = Fixture::load(file);
    let cfg = fx.cfg.clone();
    let net = SemShare::new(&cfg).expect("model");
    let mut dev = Cpu::new();

    // Parameters by name; every Rust parameter must be in the fixture, with its shape.
    let mut values = vec![f32::NAN; net.store.total];
    for info in &net.store.infos {
        assert_eq!(fx.shape(&info.name), &info.shape[..], "{file}: shape of {}", info.name);
        values[info.param.offset..info.param.offset + info.param.len].copy_from_slice(fx.f(&info.name));
    }
    let n_params = fx.f32s.keys().filter(|k| !k.starts_with("input.") && !k.starts_with("expect.")).count();
    assert_eq!(n_params, net.store.infos.len(), "{file}: the fixture has parameters the model lacks");
    let w = net.store.upload(&mut dev, &values).expect("upload");
    let mut g = dev.zeros(&[net.store.total]).expect("grad buffer");
    let weights = LossWeights { label: 1.0, context: cfg.lambda };

    let (image, image_plan) = fx.image();
    let (text, text_plan) = fx.text();
    let li = net
        .loss_backward(&mut dev, &w, &mut g, &image, &image_plan, Dropout::OFF, weights)
        .expect("image loss_backward");
    let lt =
        net.loss_backward(&mut dev, &w, &mut g, &text, &text_plan, Dropout::OFF, weights).expect("text loss_backward");

    let mut failures = Vec::new();
    let mut worst_loss = 0.0f64;
    for (what, got, want) in [
        ("image.label_loss", li.label as f64, fx.scalar("expect.image.label_loss")),
        ("image.context_loss", li.context as f64, fx.scalar("expect.image.context_loss")),
        ("text.label_loss", lt.label as f64, fx.scalar("expect.text.label_loss")),
        ("text.context_loss", lt.context as f64, fx.scalar("expect.text.context_loss")),
    ] {
        let e = (got - want).abs() / want.abs().max(1e-30);
        worst_loss = worst_loss.max(e);
        if e > GRAD_TOL {
            failures.push(format!("{what}: rust {got} torch {want} (rel {e:.3e})"));
        }
    }

    let grads = dev.download(g.view()).expect("download grads");
    let (mut worst_grad, mut worst_name) = (0.0f64, String::new());
    for info in &net.store.infos {
        let got = &grads[info.param.offset..info.param.offset + info.param.len];
        let want = fx.f(&format!("expect.grad.{}", info.name));
        let e = rel_err(got, want);
        if e > worst_grad {
            (worst_grad, worst_name) = (e, info.name.clone());
        }
        #[allow(clippy::neg_cmp_op_on_partial_ord)] // a NaN error must fail too
        if !(e <= GRAD_TOL) {
            failures.push(format!("grad {}: rel err {e:.3e}", info.name));
        }
    }

    let mut worst_embed = 0.0f64;
    for (kind, batch) in [("image", &image), ("text", &text)] {
        for (ek, key) in [(EmbeddingKind::Pooled, "pooled"), (EmbeddingKind::Label, "label_embedding")] {
            let e = net.embed(&mut dev, &w, batch, ek).expect("embed");
            let got = dev.download(e.view()).expect("download embedding");
            let want_name = format!("expect.{kind}.{key}");
            assert_eq!(e.shape(), fx.shape(&want_name), "{file}: shape of {want_name}");
            let err = rel_err(&got, fx.f(&want_name));
            worst_embed = worst_embed.max(err);
            #[allow(clippy::neg_cmp_op_on_partial_ord)] // a NaN error must fail too
            if !(err <= EMBED_TOL) {
                failures.push(format!("{kind} {key} embedding: rel err {err:.3e}"));
            }
        }
    }

    println!(
        "{file}: losses max rel err {worst_loss:.3e}; grads max rel err {worst_grad:.3e} ({worst_name}) \
         over {} tensors; embeddings max rel err {worst_embed:.3e}",
        net.store.infos.len()
    );
    assert!(failures.is_empty(), "{file}: {} mismatches vs PyTorch:\n  {}", failures.len(), failures.join("\n  "));
}

#[test]
fn parity_with_pytorch_seed1() {
    check_fixture("parity_seed1.safetensors");
}

#[test]
fn parity_with_pytorch_seed2() {
    check_fixture("parity_seed2.safetensors");
}
