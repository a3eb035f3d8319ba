//! `eval`'s mAP against a float64 recomputation from `embed`'s output (issue 15, item 2): the
//! ranking must not depend on float rounding. A model trained until its label embedding is
//! confident (the regime where sigmoid probabilities saturate into ties) is evaluated by the
//! binary, and the same split's embeddings, written by `embed`, are ranked again here in f64
//! (cosine, ties by the lower gallery index), the definition written the obvious way.

mod common;

use std::sync::Arc;

use common::cli::{ok, path, semshare};
use safetensors::SafeTensors;
use semshare::backend::cpu::Cpu;
use semshare::data::reader::DatasetReader;
use semshare::data::synth::{SynthConfig, SynthPreset, generate};
use semshare::model::ModelConfig;
use semshare::train::{RunOptions, TrainConfig, train};

fn f32s(st: &SafeTensors, name: &str) -> Vec<f32> {
    st.tensor(name).unwrap().data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

/// Mean AP (×100) of each query row of `q` against the gallery `g`, both `[*, dim]`;
/// relevant = at least one shared label.
fn map_f64(q: &[f32], ql: &[u8], g: &[f32], gl: &[u8], dim: usize, c: usize) -> f64 {
    let unit = |v: &[f32]| -> Vec<Vec<f64>> {
        v.chunks_exact(dim)
            .map(|r| {
                let n = r.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
                r.iter().map(|&x| if n > 0.0 { x as f64 / n } else { 0.0 }).collect()
            })
            .collect()
    };
    let (q, g) = (unit(q), unit(g));
    let mut total = 0.0;
    for (i, qv) in q.iter().enumerate() {
        let mut order: Vec<(f64, usize)> =
            g.iter().enumerate().map(|(j, gv)| (qv.iter().zip(gv).map(|(a, b)| a * b).sum(), j)).collect();
        order.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let (mut hits, mut ap) = (0usize, 0.0);
        for (rank, &(_, j)) in order.iter().enumerate() {
            let rel = (0..c).any(|k| ql[i * c + k] != 0 && gl[j * c + k] != 0);
            if rel {
                hits += 1;
                ap += hits as f64 / (rank + 1) as f64;
            }
        }
        total += if hits > 0 { ap / hits as f64 } else { 0.0 };
    }
    100.0 * total / q.len() as f64
}

/// An easy set (strong signal in both modalities, few labels) and a small model trained on it
/// until its label logits are large: where sigmoid probabilities round to 0 and 1.
fn confident_run(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let mut cfg = SynthConfig::preset(SynthPreset::Balanced, 5);
    (cfg.train, cfg.val, cfg.test) = (160, 20, 150);
    (cfg.num_labels, cfg.regions, cfg.feature_dim, cfg.max_tokens, cfg.vocab_size) = (5, 3, 12, 6, 40);
    (cfg.image_signal, cfg.image_noise, cfg.text_signal, cfg.text_confuser) = (0.9, 0.3, 0.9, 0.0);
    let data = dir.join("data");
    generate(&cfg).unwrap().save(&data).unwrap();
    let reader = Arc::new(DatasetReader::open(&data).unwrap());
    let model = ModelConfig { dropout: 0.0, ..common::tiny_model_of(reader.meta(), 0) };
    let train_cfg = TrainConfig {
        steps: 400,
        batch_size: 32,
        lr: 1e-2,
        warmup: 5,
        weight_decay: 0.0,
        eval_every: 400,
        embedding: "label".into(),
        ..TrainConfig::default()
    };
    let opts = RunOptions::new(dir.join("run"));
    let summary = train(&mut Cpu::new(), &reader, &model, &train_cfg, &opts).unwrap();
    (data, summary.best_checkpoint.unwrap())
}

#[test]
fn eval_map_equals_a_float64_recomputation_from_embed_output() {
    let dir = common::cli::tmp("evalf64", "label");
    let (data, best) = confident_run(&dir);
    let emb = dir.join("emb.safetensors");
    let common = ["--data", path(&data), "--checkpoint", path(&best), "--split", "test", "--embedding", "label"];
    let eval: serde_json::Value =
        serde_json::from_str(&ok(&semshare(&[&["eval", "--json"][..], &common].concat()))).unwrap();
    ok(&semshare(&[&["embed", "--out", path(&emb)][..], &common].concat()));

    let bytes = std::fs::read(&emb).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (ie, te) = (f32s(&st, "image.embedding"), f32s(&st, "text.embedding"));
    let (il, tl) = (st.tensor("image.labels").unwrap().data(), st.tensor("text.labels").unwrap().data());
    let c = st.tensor("image.labels").unwrap().shape()[1];
    let dim = st.tensor("image.embedding").unwrap().shape()[1];
    assert_eq!(dim, c, "the label embedding has one coordinate per label");
    let i2t = map_f64(&ie, il, &te, tl, dim, c);
    let t2i = map_f64(&te, tl, &ie, il, dim, c);
    // The model is confident: it ranks well above chance.
    assert!(i2t > 70.0 && t2i > 70.0, "mAP {i2t} / {t2i}: the model did not train");
    for (name, want) in [("i2t", i2t), ("t2i", t2i), ("avg", (i2t + t2i) / 2.0)] {
        let got = eval[name]["map_all"].as_f64().unwrap();
        assert!((got - want).abs() <= 1e-3, "{name}: eval mAP {got}, float64 recomputation {want}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
