//! The library's inference API (issue 13, items 1 and 2): a checkpoint of `train` is a
//! self-contained model, and `Model` embeds texts and images with it, with no dataset and no
//! labels, giving the same numbers as the evaluation path.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use semshare::backend::cpu::Cpu;
use semshare::backend::open;
use semshare::checkpoint::{Checkpoint, InferenceSpec};
use semshare::data::Dataset;
use semshare::data::format::FeatureDtype;
use semshare::data::reader::DatasetReader;
use semshare::data::synth::{SynthConfig, SynthPreset, generate};
use semshare::inference::{Embeddings, Regions, embed_split, load_model};
use semshare::model::EmbeddingKind;
use semshare::train::{RunOptions, TrainConfig, train};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("semshare-model-api-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A tiny dataset in `dir/data` and a model trained on it for four steps: its best checkpoint.
fn trained(dir: &Path) -> (Dataset, Arc<DatasetReader>, PathBuf) {
    trained_with(dir, "pooled")
}

fn trained_with(dir: &Path, embedding: &str) -> (Dataset, Arc<DatasetReader>, PathBuf) {
    trained_cfg(dir, |c| c.embedding = embedding.into())
}

fn trained_cfg(dir: &Path, change: impl FnOnce(&mut TrainConfig)) -> (Dataset, Arc<DatasetReader>, PathBuf) {
    let mut cfg = SynthConfig::preset(SynthPreset::Balanced, 7);
    (cfg.train, cfg.val, cfg.test) = (32, 16, 70);
    (cfg.feature_dim, cfg.vocab_size, cfg.max_tokens, cfg.regions) = (12, 40, 8, 5);
    let data = generate(&cfg).unwrap();
    data.save(dir.join("data")).unwrap();
    let reader = Arc::new(DatasetReader::open(dir.join("data")).unwrap());
    let model = common::tiny_model_of(&data.meta, 0);
    let mut train_cfg = TrainConfig { steps: 4, batch_size: 8, eval_every: 2, warmup: 1, ..TrainConfig::default() };
    change(&mut train_cfg);
    let opts = RunOptions::new(dir.join("run"));
    let summary = train(&mut Cpu::new(), &reader, &model, &train_cfg, &opts).unwrap();
    (data, reader, summary.best_checkpoint.unwrap())
}

fn unit_rows(e: &Embeddings) {
    for (i, row) in e.rows().enumerate() {
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "row {i} has norm {norm}");
    }
}

fn normalised(values: &[f32], dim: usize) -> Vec<f32> {
    let mut v = values.to_vec();
    for row in v.chunks_exact_mut(dim) {
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        row.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// An image's valid region features and boxes.
type Image = (Vec<f32>, Vec<f32>);

/// The images and texts of a split as `Model` takes them: valid regions and tokens only.
fn items(data: &Dataset) -> (Vec<Image>, Vec<Vec<u32>>) {
    let (m, s) = (&data.meta, &data.test);
    let images = (0..s.num_images())
        .map(|i| {
            let n = s.image_count[i] as usize;
            let f = &s.image_features[i * m.regions * m.feature_dim..][..n * m.feature_dim];
            let b = &s.image_boxes[i * m.regions * 5..][..n * 5];
            (f.to_vec(), b.to_vec())
        })
        .collect();
    let texts =
        (0..s.num_texts()).map(|j| s.text_tokens[j * m.max_tokens..][..s.text_length[j] as usize].to_vec()).collect();
    (images, texts)
}

#[test]
fn a_trained_checkpoint_embeds_like_the_evaluation_path() {
    let dir = tmp("same");
    let (data, reader, best) = trained(&dir);
    let mut model = semshare::Model::load(&best, open("cpu").unwrap()).unwrap();

    // The checkpoint is self-contained: what inference needs came from the dataset.
    let spec = model.spec();
    assert_eq!(spec.vocab.as_deref(), Some(&data.meta.vocab[..]));
    assert_eq!(spec.label_names.as_deref(), Some(&data.meta.label_names[..]));
    let inputs = spec.inputs.as_ref().unwrap();
    assert_eq!((inputs.region_dim, inputs.max_regions, inputs.max_tokens), (12, 5, 8));
    assert_eq!((inputs.region_dtype, inputs.text_dtype), (FeatureDtype::F32, None));
    assert_eq!(model.embedding(), EmbeddingKind::Pooled);
    assert_eq!(model.label_names(), Some(&data.meta.label_names[..]));

    let (images, texts) = items(&data);
    assert!(images.len() > semshare::inference::EMBED_CHUNK, "the test must cross a chunk boundary");
    let regions: Vec<Regions> = images.iter().map(|(f, b)| Regions::new(f).with_boxes(b)).collect();
    let mut dev = Cpu::new();
    let (net, params) = load_model(&mut dev, &best).unwrap();
    let split = reader.split("test").unwrap();
    for kind in [EmbeddingKind::Pooled, EmbeddingKind::Label] {
        model.set_embedding(kind);
        let ie = model.embed_images(&regions).unwrap();
        let te = model.embed_token_ids(&texts).unwrap();
        assert_eq!((ie.len(), te.len(), ie.dim), (images.len(), texts.len(), model.dim()));
        unit_rows(&ie);
        unit_rows(&te);
        let (want_i, want_t, dim) = embed_split(&mut dev, &net, &params, &reader.layout, split, kind).unwrap();
        assert_eq!(dim, ie.dim);
        let (di, dt) =
            (max_diff(&ie.values, &normalised(&want_i, dim)), max_diff(&te.values, &normalised(&want_t, dim)));
        assert!(di <= 1e-6 && dt <= 1e-6, "{kind:?}: images differ by {di}, texts by {dt}");
        // The same input gives bitwise the same output.
        assert_eq!(model.embed_images(&regions).unwrap(), ie);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// At `--precision bf16` the `Model` multiplies the trunk's bf16 copy it made at load, and the
/// evaluation path one made per split: the same embeddings, and not the fp32 ones.
#[test]
fn a_bf16_model_embeds_like_the_bf16_evaluation_path() {
    use semshare::backend::{Precision, open_at};
    let dir = tmp("bf16");
    let (data, reader, best) = trained(&dir);
    let mut model = semshare::Model::load(&best, open_at("cpu", Precision::Bf16).unwrap()).unwrap();
    let mut fp32 = semshare::Model::load(&best, open("cpu").unwrap()).unwrap();
    let (images, texts) = items(&data);
    let regions: Vec<Regions> = images.iter().map(|(f, b)| Regions::new(f).with_boxes(b)).collect();
    let mut dev = Cpu::with_precision(Precision::Bf16).unwrap();
    let (net, params) = load_model(&mut dev, &best).unwrap();
    let split = reader.split("test").unwrap();
    let (ie, te) = (model.embed_images(&regions).unwrap(), model.embed_token_ids(&texts).unwrap());
    let kind = model.embedding();
    let (want_i, want_t, dim) = embed_split(&mut dev, &net, &params, &reader.layout, split, kind).unwrap();
    let (di, dt) = (max_diff(&ie.values, &normalised(&want_i, dim)), max_diff(&te.values, &normalised(&want_t, dim)));
    assert!(di <= 1e-6 && dt <= 1e-6, "images differ by {di}, texts by {dt}");
    let from_fp32 = max_diff(&ie.values, &fp32.embed_images(&regions).unwrap().values);
    assert!(from_fp32 > 1e-5, "bf16 embeddings within {from_fp32} of fp32: was bf16 used?");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The library's `Model` on the GPU against the same checkpoint on the CPU, across a chunk
/// boundary (each chunk's embeddings are downloaded after the next chunk is queued): images,
/// texts and a split, both embeddings, within 1e-5 of the CPU's.
#[test]
fn the_model_embeds_on_the_gpu_as_on_the_cpu() {
    let Some(gpu) = common::gpu::gpu_or_skip("Model on the GPU") else { return };
    let dir = tmp("gpu");
    let (data, reader, best) = trained(&dir);
    let (mut on_gpu, mut on_cpu) =
        (semshare::Model::load(&best, gpu).unwrap(), semshare::Model::load(&best, open("cpu").unwrap()).unwrap());
    let (images, texts) = items(&data);
    assert!(images.len() > semshare::inference::EMBED_CHUNK, "the test must cross a chunk boundary");
    let regions: Vec<Regions> = images.iter().map(|(f, b)| Regions::new(f).with_boxes(b)).collect();
    let split = reader.split("test").unwrap();
    for kind in [EmbeddingKind::Pooled, EmbeddingKind::Label] {
        on_gpu.set_embedding(kind);
        on_cpu.set_embedding(kind);
        let (gi, ci) = (on_gpu.embed_images(&regions).unwrap(), on_cpu.embed_images(&regions).unwrap());
        let (gt, ct) = (on_gpu.embed_token_ids(&texts).unwrap(), on_cpu.embed_token_ids(&texts).unwrap());
        let ((gsi, gst), (csi, cst)) =
            (on_gpu.embed_split(&reader.layout, split).unwrap(), on_cpu.embed_split(&reader.layout, split).unwrap());
        for (what, g, c) in
            [("images", &gi, &ci), ("texts", &gt, &ct), ("split images", &gsi, &csi), ("split texts", &gst, &cst)]
        {
            assert_eq!(g.len(), c.len(), "{kind:?} {what}");
            let d = max_diff(&g.values, &c.values);
            assert!(d <= 1e-5, "{kind:?} {what}: the GPU's differ from the CPU's by {d}");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn standardised_inputs_are_stored_in_the_checkpoint_and_applied_by_every_path() {
    let dir = tmp("norm");
    let (data, reader, best) = trained_cfg(&dir, |c| c.normalize = "standardize".into());
    let ckpt = Checkpoint::load(&best).unwrap();
    let norm = ckpt.spec.normalization.clone().expect("the checkpoint stores the statistics");
    let train_split = reader.split("train").unwrap();
    assert_eq!(norm, semshare::data::stats::input_norm(&reader.layout, train_split).unwrap());
    // The training split's regions, standardised, have mean 0 and variance 1 per feature.
    let b = semshare::data::batches::image_batch(&reader.layout, train_split, &(0..32).collect::<Vec<_>>()).unwrap();
    let x = norm.image.apply(&b.features.to_f32());
    let rows = (x.len() / 12) as f64;
    for j in 0..12 {
        let mean = x.iter().skip(j).step_by(12).map(|&v| v as f64).sum::<f64>() / rows;
        let var = x.iter().skip(j).step_by(12).map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / rows;
        assert!(mean.abs() < 1e-4 && (var - 1.0).abs() < 1e-3, "feature {j}: mean {mean}, variance {var}");
    }
    assert!(norm.text.is_none(), "token texts have no features to normalise");

    // eval/embed (embed_split) and the library's Model apply it alike, to raw features.
    let (images, _) = items(&data);
    let regions: Vec<Regions> = images.iter().map(|(f, b)| Regions::new(f).with_boxes(b)).collect();
    let mut model = semshare::Model::load(&best, open("cpu").unwrap()).unwrap();
    let mut dev = Cpu::new();
    let (net, params) = load_model(&mut dev, &best).unwrap();
    assert_eq!(net.input_norm.as_ref(), Some(&norm));
    let split = reader.split("test").unwrap();
    let (want, _, dim) = embed_split(&mut dev, &net, &params, &reader.layout, split, EmbeddingKind::Pooled).unwrap();
    model.set_embedding(EmbeddingKind::Pooled);
    let got = model.embed_images(&regions).unwrap();
    assert!(max_diff(&got.values, &normalised(&want, dim)) <= 1e-6);
    // Without it the same parameters embed differently: the statistics are really applied.
    let mut plain = net.clone();
    plain.set_input_norm(None).unwrap();
    let (raw, _, _) = embed_split(&mut dev, &plain, &params, &reader.layout, split, EmbeddingKind::Pooled).unwrap();
    assert!(max_diff(&normalised(&raw, dim), &normalised(&want, dim)) > 1e-3);
    // Statistics of the wrong width are refused, naming what disagrees.
    let mut bad = norm.clone();
    bad.image.mean.pop();
    let e = plain.set_input_norm(Some(bad)).unwrap_err().to_string();
    assert!(e.contains("11 means") && e.contains("12 features"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn validation_with_both_embeddings_records_the_better_one() {
    let dir = tmp("best");
    let (_, reader, best) = trained_cfg(&dir, |c| {
        c.embedding = "best".into();
        c.val_metric = "map".into();
    });
    let ckpt = Checkpoint::load(&best).unwrap();
    let state: serde_json::Value = serde_json::from_str(&ckpt.state).unwrap();
    let chosen = ckpt.spec.embedding.expect("recorded");
    assert_eq!(state["best_embedding"].as_str(), Some(chosen.name()));
    // The recorded embedding is the one with the better validation mAP at that step.
    let mut dev = Cpu::new();
    let (net, params) = load_model(&mut dev, &best).unwrap();
    let mut score = |k| {
        let cfg = semshare::eval::EvalConfig::default();
        semshare::inference::evaluate_split(&mut dev, &net, &params, &reader, "val", k, &cfg).unwrap().avg.map_all
    };
    let (pooled, label) = (score(EmbeddingKind::Pooled), score(EmbeddingKind::Label));
    let want = if label > pooled { EmbeddingKind::Label } else { EmbeddingKind::Pooled };
    assert_eq!(chosen, want, "pooled {pooled}, label {label}");
    assert!((state["best_score"].as_f64().unwrap() - pooled.max(label)).abs() < 1e-9);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_embedding_a_checkpoint_was_selected_with_is_the_default() {
    let dir = tmp("label");
    let (_, _, best) = trained_with(&dir, "label");
    let mut model = semshare::Model::load(&best, open("cpu").unwrap()).unwrap();
    assert_eq!((model.embedding(), model.dim()), (EmbeddingKind::Label, model.config().labels));
    assert_eq!(model.embed_token_ids(&[vec![3, 4]]).unwrap().dim, model.config().labels);
    // `semshare eval` without --embedding ranks with it too.
    let eval = |extra: &[&str]| {
        let (data, ckpt) = (dir.join("data"), best.clone());
        let args =
            [&["eval", "--data", common::cli::path(&data), "--checkpoint", common::cli::path(&ckpt), "--json"], extra];
        common::cli::ok(&common::cli::semshare(&args.concat()))
    };
    let default = eval(&[]);
    assert_eq!(default, eval(&["--embedding", "label"]));
    assert_ne!(default, eval(&["--embedding", "pooled"]));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn strings_are_tokenised_by_the_stored_vocabulary() {
    let dir = tmp("strings");
    let (data, _, best) = trained(&dir);
    let mut model = semshare::Model::load(&best, open("cpu").unwrap()).unwrap();
    let v = &data.meta.vocab;
    let text = format!("{}, {}!  no-such-word {}", v[5].to_uppercase(), v[9], v[3]);
    assert_eq!(model.tokenize(&text).unwrap(), vec![5, 9, 1, 1, 1, 3]);
    let long = vec![v[4].as_str(); 20].join(" ");
    assert_eq!(model.tokenize(&long).unwrap().len(), 8, "truncated to max_tokens");
    let by_string = model.embed_texts(&[text.as_str(), long.as_str()]).unwrap();
    let by_ids = model.embed_token_ids(&[vec![5, 9, 1, 1, 1, 3], vec![4; 8]]).unwrap();
    assert_eq!(by_string, by_ids);
    unit_rows(&by_string);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_inputs_are_errors_naming_the_item() {
    let dir = tmp("errors");
    let (_, _, best) = trained(&dir);
    let mut model = semshare::Model::load(&best, open("cpu").unwrap()).unwrap();
    let err = |r: semshare::Result<Embeddings>| r.unwrap_err().to_string();
    let f = vec![0.1f32; 12 * 2];
    let e = err(model.embed_images(&[Regions::new(&f), Regions::new(&f[..13])]));
    assert!(e.contains("image 1") && e.contains("width 12"), "{e}");
    let six = vec![0.1f32; 12 * 6];
    assert!(err(model.embed_images(&[Regions::new(&six)])).contains("1 to 5 regions"));
    let e = err(model.embed_images(&[Regions::new(&f).with_boxes(&[0.0; 5])]));
    assert!(e.contains("image 0 has 5 box values for 2 regions"), "{e}");
    let mut nan = f.clone();
    nan[3] = f32::NAN;
    assert!(err(model.embed_images(&[Regions::new(&nan)])).contains("non-finite"));
    assert!(err(model.embed_images(&[])).contains("no images"));
    assert!(err(model.embed_token_ids::<Vec<u32>>(&[])).contains("no texts"));
    assert!(err(model.embed_token_ids(&[vec![3], vec![]])).contains("text 1 has 0 tokens"));
    assert!(err(model.embed_token_ids(&[vec![3; 9]])).contains("text 0 has 9 tokens, the model takes 1 to 8"));
    assert!(err(model.embed_token_ids(&[vec![3, 40]])).contains("token id 40"));
    assert!(err(model.embed_token_ids(&[vec![0]])).contains("token id 0"));
    assert!(err(model.embed_texts(&["ok", " ?! "])).contains("text 1"));
    // Boxes are optional: without them every region is the whole image.
    let whole: Vec<f32> = [0.0, 0.0, 1.0, 1.0, 1.0].repeat(2);
    let a = model.embed_images(&[Regions::new(&f)]).unwrap();
    assert_eq!(a, model.embed_images(&[Regions::new(&f).with_boxes(&whole)]).unwrap());

    // A checkpoint written before the vocabulary was stored still loads and embeds ids, but
    // strings are refused with a message saying why.
    let old = dir.join("old.safetensors");
    Checkpoint { spec: InferenceSpec::default(), ..Checkpoint::load(&best).unwrap() }.save(&old).unwrap();
    let mut model = semshare::Model::load(&old, open("cpu").unwrap()).unwrap();
    assert_eq!(model.embedding(), EmbeddingKind::Pooled);
    model.embed_token_ids(&[vec![3, 4]]).unwrap();
    let e = err(model.embed_texts(&["sky"]));
    assert!(e.contains("old.safetensors") && e.contains("no vocabulary"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn searches_and_datasets_the_model_cannot_rank_are_refused() {
    let dir = tmp("refusals");
    let (_, reader, best) = trained(&dir);
    let mut model = semshare::Model::load(&best, open("cpu").unwrap()).unwrap();
    let err = |r: semshare::Result<Vec<semshare::inference::Hits>>| r.unwrap_err().to_string();
    let gallery = model.embed_texts(&["sky", "sea", "dog"]).unwrap();
    let query = model.embed_texts(&["sky"]).unwrap();
    let dim = query.dim;
    let with = |at: usize, x: f32, e: &Embeddings| {
        let mut values = e.values.clone();
        values[at] = x;
        Embeddings { values, dim }
    };
    // NaN would rank first, an infinite or overflowing score would tie: both refused, by row.
    let e = err(model.search(&query, &with(dim + 1, f32::NAN, &gallery), 2));
    assert!(e.contains("gallery item 1 holds a non-finite value"), "{e}");
    let e = err(model.search(&with(0, f32::INFINITY, &query), &gallery, 2));
    assert!(e.contains("query 0 holds a non-finite value"), "{e}");
    let e = err(model.search(&with(0, 1e30, &query), &with(0, 1e30, &gallery), 2));
    assert!(e.contains("gallery item 0 has norm") && e.contains("would not fit a float32"), "{e}");
    let ragged = Embeddings { values: vec![0.5; dim + 1], dim };
    let e = err(model.search(&ragged, &gallery, 2));
    assert!(e.contains(&format!("query: {} values are not whole rows of width {dim}", dim + 1)), "{e}");

    // An index knows its embedding: a model set to the other one is refused, not searched.
    let file = dir.join("label.idx");
    model.set_embedding(EmbeddingKind::Label);
    let ids = (0..3).map(|i| format!("c{i}")).collect();
    let captions = ["sky", "sea", "dog"].map(String::from);
    semshare::index::build::from_texts(&mut model, &captions, ids).unwrap().save(&file).unwrap();
    let index = semshare::index::Index::open(&file).unwrap();
    model.set_embedding(EmbeddingKind::Pooled);
    let e = index.check_model(&model).unwrap_err().to_string();
    assert!(e.contains("holds the label embedding") && e.contains("set_embedding(EmbeddingKind::Label)"), "{e}");
    let pooled = model.embed_texts(&["dog"]).unwrap();
    let e = semshare::index::search(model.device(), &index, &pooled, 2).unwrap_err().to_string();
    assert!(
        e.contains(&format!("queries of width {dim}")) && e.contains(&format!("holds width {}", index.dim())),
        "{e}"
    );
    model.set_embedding(EmbeddingKind::Label);
    index.check_model(&model).unwrap();
    let label = model.embed_texts(&["dog"]).unwrap();
    let hits = semshare::index::search(model.device(), &index, &label, 2).unwrap();
    assert_eq!(hits[0].len(), 2);
    assert_eq!((index.id(2), index.id(3), index.labels(0)), (Some("c2"), None, None));

    // A dataset with the model's shapes but another word at id 5 (or another label) would be
    // read as other words: refused, naming the entry.
    let split = reader.split("test").unwrap();
    model.embed_split(&reader.layout, split).unwrap();
    let mut other = reader.layout.clone();
    other.meta.vocab[5] = "elsewhere".into();
    let e = model.embed_split(&other, split).unwrap_err().to_string();
    assert!(e.contains("its word 5 is `elsewhere`"), "{e}");
    let mut other = reader.layout.clone();
    other.meta.label_names[2] = "renamed".into();
    let e = model.embed_split(&other, split).unwrap_err().to_string();
    assert!(e.contains("its label 2 is `renamed`"), "{e}");

    // Finite inputs far outside the data's range overflow the network: an error, not NaN rows.
    let e = model.embed_images(&[Regions::new(&[3e38; 12 * 2])]).unwrap_err().to_string();
    assert!(e.contains("image 0: its embedding is not finite"), "{e}");

    // What `load` refuses, `save` does not write.
    let mut ckpt = Checkpoint::load(&best).unwrap();
    ckpt.params[7] = f32::NAN;
    let e = ckpt.save(&dir.join("nan.safetensors")).unwrap_err().to_string();
    assert!(e.contains("not written") && e.contains("non-finite value"), "{e}");
    assert!(!dir.join("nan.safetensors").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_model_of_text_features_embeds_features_and_refuses_tokens() {
    let dir = tmp("features");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = semshare::model::ModelConfig {
        region_dim: 4,
        max_regions: 3,
        text_feature_dim: 6,
        dim: 8,
        layers: 1,
        heads: 2,
        ffn: 16,
        max_tokens: 4,
        vocab: 3,
        labels: 3,
        object_classes: 2,
        ..semshare::model::ModelConfig::small()
    };
    let params = semshare::model::SemShare::new(&cfg).unwrap().store.init_values(3);
    let path = dir.join("f.safetensors");
    let ckpt =
        Checkpoint { model: cfg, params, optimizer: None, step: 0, state: String::new(), spec: Default::default() };
    ckpt.save(&path).unwrap();
    let mut model = semshare::Model::load(&path, open("cpu").unwrap()).unwrap();
    let (a, b) = (common::randv(1, 12), common::randv(2, 6));
    let e = model.embed_text_features(&[&a, &b]).unwrap();
    assert_eq!((e.len(), e.dim), (2, 8));
    unit_rows(&e);
    // One at a time gives the same rows: an item's embedding does not depend on its batch.
    assert!(max_diff(e.row(1), model.embed_text_features(&[&b]).unwrap().row(0)) <= 1e-6);
    let msg = |r: semshare::Result<Embeddings>| r.unwrap_err().to_string();
    assert!(msg(model.embed_text_features(&[&a[..7]])).contains("text 0 has 7 feature values"));
    assert!(msg(model.embed_token_ids(&[vec![1]])).contains("embed_text_features"));
    assert!(model.label_names().is_none());
    std::fs::remove_dir_all(&dir).unwrap();
}
