//! Replays every input that ever crashed a fuzz target (`tests/fuzz-regressions/<target>/`) and
//! every fuzz seed (`fuzz/seeds/<target>/`) through the code the target runs (`fuzz/harness.rs`):
//! each must end in Ok or an error, never a panic. docs/results/fuzz.md says how they were found.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

#[path = "../fuzz/harness.rs"]
mod harness;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs every file under `dir/<target>/` through its target; returns the files that panicked.
fn replay(dir: &Path) -> (usize, Vec<String>) {
    let (mut count, mut panicked) = (0, Vec::new());
    for &(name, target) in harness::TARGETS {
        let Ok(entries) = std::fs::read_dir(dir.join(name)) else { continue };
        let mut files: Vec<PathBuf> = entries.map(|e| e.expect("directory entry").path()).collect();
        files.sort();
        for file in files {
            let bytes = std::fs::read(&file).expect("readable input");
            if catch_unwind(AssertUnwindSafe(|| target(&bytes))).is_err() {
                panicked.push(file.display().to_string());
            }
            count += 1;
        }
    }
    harness::remove_scratch();
    (count, panicked)
}

#[test]
fn inputs_that_crashed_a_fuzz_target_are_errors_now() {
    let (count, panicked) = replay(&root().join("tests/fuzz-regressions"));
    assert!(panicked.is_empty(), "panicked on {panicked:?}");
    eprintln!("{count} regression inputs replayed");
}

#[test]
fn fuzz_seeds_run_through_every_target() {
    let (count, panicked) = replay(&root().join("fuzz/seeds"));
    assert!(panicked.is_empty(), "panicked on {panicked:?}");
    assert!(count >= harness::TARGETS.len(), "every target has a seed ({count} files)");
}

/// Seeds must be valid inputs (each reaches the end of its parser), or the fuzzer starts lost.
#[test]
fn fuzz_seeds_are_accepted_where_they_should_be() {
    use semshare::experiment::suite::{Suite, SuiteState};
    let seed = |target: &str, file: &str| std::fs::read(root().join("fuzz/seeds").join(target).join(file)).unwrap();
    let dir = harness::scratch().join("dataset");
    harness::manifest(&seed("manifest", "dataset.json"));
    let data = semshare::data::reader::DatasetReader::open(&dir).expect("the manifest seed opens the fixture");
    assert!(data.check(10).is_empty(), "the fixture dataset passes `check`");
    let path = harness::scratch().join("c.safetensors");
    std::fs::write(&path, seed("checkpoint", "tiny.safetensors")).unwrap();
    semshare::checkpoint::Checkpoint::load(&path).expect("the checkpoint seed loads");
    std::fs::write(&path, seed("checkpoint", "with-vocabulary.safetensors")).unwrap();
    let cpu = semshare::backend::open("cpu").unwrap();
    let mut model = semshare::Model::load(&path, cpu).expect("the vocabulary seed loads as a Model");
    model.embed_texts(&["sky clouds"]).expect("the vocabulary seed tokenises");
    std::fs::write(&path, seed("embeddings", "with-items.safetensors")).unwrap();
    semshare::eval::EmbeddingSet::load(&path).expect("the embeddings seed loads");
    harness::pack_source(&seed("pack_source", "fixture.bin"));
    let packed = semshare::data::reader::DatasetReader::open(harness::scratch().join("packed")).expect("packed");
    assert_eq!(packed.split("train").unwrap().num_images(), 6);
    let text = String::from_utf8(seed("config", "variant.json")).unwrap();
    let (model, train) = (semshare::model::ModelConfig::small(), semshare::train::TrainConfig::default());
    semshare::config::apply_config_json(model, train, &text, Path::new("variant.json"))
        .expect("the config seed applies");
    let vectors = semshare::index::npy::parse_npy(&seed("npy", "vectors.npy")).expect("the vectors seed parses");
    let features = semshare::index::npy::parse_npy(&seed("npy", "features.npy")).expect("the features seed parses");
    let items = semshare::index::build::feature_items(&features, semshare::index::Modality::Image, 4, 0)
        .expect("the features seed has items");
    assert_eq!((vectors.shape, items.len(), items[1].len()), (vec![3, 4], 2, 8), "padding cut from item 1");
    for name in ["labelled.idx", "model.idx"] {
        std::fs::write(&path, seed("index", name)).unwrap();
        semshare::index::Index::open(&path).expect("the index seeds open");
    }
    for (name, suite) in [("table1.json", Suite::table1(3, "fuzz")), ("eta.json", Suite::eta_sweep(3, "fuzz"))] {
        std::fs::write(&path, seed("suite_state", name)).unwrap();
        let state = SuiteState::open(&path, &suite.unwrap()).expect("the suite state seeds open");
        assert_eq!(state.progress().0, 2);
    }
    std::fs::write(&path, seed("tune_state", "rung1.json")).unwrap();
    let tune = semshare::experiment::tune::TuneState::open(&path, &harness::tune_plan()).expect("the tune seed opens");
    assert_eq!(tune.progress(), (5, 8), "rung 0's 4 trials, rung 1's 2 trials × 2 repeats");
    std::fs::write(&path, seed("texts", "queries.txt")).unwrap();
    assert_eq!(semshare::index::build::read_lines(&path).expect("the texts seed reads").len(), 3);
    harness::remove_scratch();
}

/// Writes the fixture dataset (`fuzz/fixtures/dataset/`) and the seeds of every target
/// (`fuzz/seeds/`). Run by hand after a format change:
/// `cargo test --test fuzz_regressions -- --ignored write_fuzz_fixtures_and_seeds`.
#[test]
#[ignore = "rewrites committed files under fuzz/"]
fn write_fuzz_fixtures_and_seeds() {
    use semshare::checkpoint::Checkpoint;
    use semshare::data::format::FeatureDtype;
    use semshare::data::writer::{DatasetWriter, ImageRecord, TextRecord};
    use semshare::eval::EmbeddingSet;
    use semshare::model::{ModelConfig, SemShare};

    let fuzz = root().join("fuzz");
    let fixture = fuzz.join("fixtures/dataset");
    let _ = std::fs::remove_dir_all(&fixture);
    let layout = harness::layout(0);
    let mut w = DatasetWriter::create(&fixture, layout, 700).unwrap();
    let le_f32 = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let boxes =
        le_f32(&[0.1, 0.1, 0.5, 0.5, 0.16, 0.0, 0.2, 1.0, 0.9, 0.72, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    let classes: Vec<u8> = [3u16, 6, 0, 0].iter().flat_map(|x| x.to_le_bytes()).collect();
    for (split, n) in [("train", 6), ("val", 3), ("test", 3), ("database", 3)] {
        w.begin_split(split).unwrap();
        for i in 0..n {
            let features = le_f32(&(0..32).map(|k| (k + i) as f32 * 0.125 - 1.0).collect::<Vec<_>>());
            let labels = [1, (i % 2) as u8, (i % 3 == 0) as u8];
            let count = if i % 2 == 0 { 2 } else { 1 };
            let image = ImageRecord {
                features: &features,
                feature_dtype: FeatureDtype::F32,
                boxes: &boxes,
                count,
                classes: Some(&classes),
                labels: &labels,
            };
            let le_u32 = |v: &[u32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
            let (three, one) = (le_u32(&[5 + i as u32, 1, 7, 0, 0, 0]), le_u32(&[8 + i as u32, 0, 0, 0, 0, 0]));
            let mut texts = vec![TextRecord { content: &three, dtype: None, length: 3 }];
            if i % 3 == 1 {
                texts.push(TextRecord { content: &one, dtype: None, length: 1 });
            }
            w.push(&image, &texts).unwrap();
        }
    }
    w.finish().unwrap();
    let mut listed: Vec<String> = std::fs::read_dir(&fixture)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "dataset.json")
        .collect();
    listed.sort();
    let mut expected: Vec<String> = harness::DATASET_FILES.iter().map(|f| f.0.to_string()).collect();
    expected.sort();
    assert_eq!(listed, expected, "harness::DATASET_FILES must list the fixture's files");

    let seeds = fuzz.join("seeds");
    let put = |target: &str, name: &str, bytes: &[u8]| {
        let dir = seeds.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    };
    put("manifest", "dataset.json", &std::fs::read(fixture.join("dataset.json")).unwrap());

    let model = ModelConfig {
        region_dim: 3,
        max_regions: 2,
        word_dim: 2,
        gru_hidden: 2,
        dim: 4,
        layers: 1,
        heads: 2,
        ffn: 4,
        max_tokens: 3,
        vocab: 5,
        labels: 2,
        object_classes: 2,
        ..ModelConfig::small()
    };
    let total = SemShare::new(&model).unwrap().store.total;
    let params = SemShare::new(&model).unwrap().store.init_values(1);
    let path = seeds.join("checkpoint/tiny.safetensors");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let moments = (vec![0.01; total], vec![0.001; total]);
    Checkpoint {
        model: model.clone(),
        params: params.clone(),
        optimizer: Some(moments),
        step: 3,
        state: "{}".into(),
        spec: Default::default(),
    }
    .save(&path)
    .unwrap();
    put("checkpoint_model", "tiny.json", serde_json::to_string(&model).unwrap().as_bytes());
    // The library's example checkpoint: a vocabulary, label names, what `Model::load` reads.
    let example = semshare::inference::tiny_checkpoint("fuzz-seed").unwrap();
    put("checkpoint", "with-vocabulary.safetensors", &std::fs::read(&example).unwrap());
    std::fs::remove_file(&example).unwrap();
    let path = seeds.join("checkpoint/inference.safetensors");
    Checkpoint { model, params, optimizer: None, step: 0, state: String::new(), spec: Default::default() }
        .save(&path)
        .unwrap();

    let image_emb = vec![1.0, 0.0, 0.0, -2.5, 0.5, 0.5];
    let (image_labels, text_labels) = (vec![1, 0, 1, 0, 1, 0, 1, 1, 0], vec![1, 1, 0, 0, 1, 0, 1, 0, 1, 0, 1, 1]);
    let set = EmbeddingSet::new(
        image_emb.clone(),
        image_labels.clone(),
        vec![0.5, 0.5, 1.0, 0.0, -1.0, 3.0, 0.0, 1.0],
        text_labels,
        2,
        3,
        Some(vec![1, 0, 2, 1]),
    )
    .unwrap();
    std::fs::create_dir_all(seeds.join("embeddings")).unwrap();
    set.save(&seeds.join("embeddings/with-items.safetensors")).unwrap();
    let set = EmbeddingSet::new(image_emb.clone(), image_labels.clone(), image_emb, image_labels, 2, 3, None).unwrap();
    set.save(&seeds.join("embeddings/paired.safetensors")).unwrap();

    put("config", "small.json", br#"{"model": {"layers": 1, "ffn": 64}, "train": {"eval_every": 3, "warmup": 2}}"#);
    put("config", "variant.json", br#"{"train": {"variant": "imc", "eta": 0.1, "lr": 1e-3, "min_lr_ratio": 0.1}}"#);
    put("config", "fc.json", br#"{"model": {"dim": 16, "heads": 2, "trunk": "fc", "separate_models": true}}"#);

    let source = br#"{"format": "semshare-source", "version": 1, "name": "fuzz", "splits": {"train": ["f3.safetensors", "f4.safetensors"], "val": ["f5.safetensors"], "test": ["f6.safetensors"], "database": ["f7.safetensors"]}, "num_object_classes": 7}"#;
    let mut packed: Vec<u8> = source.to_vec();
    for file in [
        "labels.txt",
        "vocab.txt",
        "train-00000.safetensors",
        "train-00001.safetensors",
        "val-00000.safetensors",
        "test-00000.safetensors",
        "database-00000.safetensors",
    ] {
        packed.extend_from_slice(harness::FILE_SEPARATOR);
        packed.extend_from_slice(&std::fs::read(fixture.join(file)).unwrap());
    }
    put("pack_source", "fixture.bin", &packed);

    put("cli", "train.txt", b"train\n--data\nd\n--steps\n5\n--lr\n1e-3\n--model\nsmall\n--config\nc.json");
    put("cli", "eval.txt", b"eval\n--data\nd\n--checkpoint\nc\n--json\n--embedding\nlabel\n--split\nval");
    put("cli", "experiment.txt", b"experiment\n--suite\ntable1\n--variants\nours,cca\n--seeds\n2\n--data\nd");
    put("cli", "synth.txt", b"synth\n--preset\nweak-image\n--train\n10\n--out\no");
    put("cli", "pack.txt", b"pack\n--from\na\n--out\nb\n--shard-mb\n1");
    put("cli", "index.txt", b"index\n--checkpoint\nc\n--out\ng.idx\n--features\nf.npy\n--side\ntext\n--append");
    put("cli", "query.txt", b"query\n--index\ng.idx\n--text\nsky\n--text\nsea\n--k\n3\n--precision\nbf16\n--json");

    // Raw vectors [3, 4], and features [2, 3, 4] of the tiny model's width, the second item's
    // last region all zeros (padding).
    use semshare::index::npy::npy_bytes;
    put(
        "npy",
        "vectors.npy",
        &npy_bytes(&[0.5, -1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0, 4.0, 0.0, 1e-3], &[3, 4]).unwrap(),
    );
    let mut features: Vec<f32> = (0..24).map(|i| i as f32 * 0.25 - 2.0).collect();
    features[20..].fill(0.0);
    put("npy", "features.npy", &npy_bytes(&features, &[2, 3, 4]).unwrap());

    use semshare::index::{Gallery, Labels, Modality, Origin};
    let labelled = Gallery {
        origin: Origin::Vectors,
        dim: 2,
        vectors: vec![0.6, 0.8, 1.0, 0.0, 0.0, 0.0],
        ids: vec!["a/0".into(), "é/1".into(), "z".into()],
        labels: Some(Labels {
            values: vec![1, 0, 0, 1, 1, 1],
            count: 2,
            names: Some(vec!["sky".into(), "sea".into()]),
        }),
    };
    let model = Gallery {
        origin: Origin::Model {
            fingerprint: "0123456789abcdef".into(),
            checkpoint: "runs/x/best.safetensors".into(),
            embedding: semshare::model::EmbeddingKind::Label,
            modality: Modality::Text,
        },
        labels: None,
        ..labelled.clone()
    };
    std::fs::create_dir_all(seeds.join("index")).unwrap();
    labelled.save(&seeds.join("index/labelled.idx")).unwrap();
    model.save(&seeds.join("index/model.idx")).unwrap();

    put("texts", "queries.txt", "sky clouds\nA dog, by the SEA!\r\nnuage\u{e9} ?\n".as_bytes());

    // Suite states with finished runs: Table 1's (ours with both embeddings' scores, CCA with
    // the pooled one only) and the η sweep's (imc at two η).
    use semshare::experiment::scores::{Directions, Scores};
    use semshare::experiment::suite::{RunKey, RunRecord, Suite, SuiteState};
    use semshare::model::Variant;
    let scores = |x: f64| Scores {
        k: 500,
        ndcg: Directions { i2t: x, t2i: x + 1.5, avg: x + 0.75 },
        map_all: Directions { i2t: x - 10.0, t2i: x - 9.0, avg: x - 9.5 },
    };
    let record = |variant, seed, eta, x| RunRecord {
        key: RunKey { variant, seed, eta },
        scores: scores(x),
        label: (variant != Variant::Cca).then(|| scores(x + 2.0)),
        report: serde_json::json!({"note": "the eval report"}),
        seconds: 12.5,
        best_step: 40,
    };
    // A tune state with rung 0 finished (trial 2 failed) and one repeat of rung 1.
    use semshare::experiment::tune::{TrialKey, TrialRecord, TuneState};
    let dir = seeds.join("tune_state");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("rung1.json");
    let _ = std::fs::remove_file(&path);
    let mut state = TuneState::open(&path, &harness::tune_plan()).unwrap();
    let trial = |trial, rung, repeat, score| TrialRecord {
        key: TrialKey { trial, rung, repeat },
        steps: 2 << rung,
        score,
        best_step: 2,
        seconds: 0.5,
        error: score.is_none().then(|| "diverged".to_string()),
    };
    for (t, score) in [(0, Some(40.0)), (1, Some(42.5)), (2, None), (3, Some(41.0))] {
        state.record(&path, trial(t, 0, 0, score)).unwrap();
    }
    state.record(&path, trial(1, 1, 0, Some(44.0))).unwrap();

    let dir = seeds.join("suite_state");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, suite, records) in [
        (
            "table1.json",
            Suite::table1(3, "fuzz").unwrap(),
            vec![record(Variant::Ours, 0, None, 60.0), record(Variant::Cca, 0, None, 40.0)],
        ),
        (
            "eta.json",
            Suite::eta_sweep(3, "fuzz").unwrap(),
            vec![record(Variant::Imc, 0, Some(0.0), 55.0), record(Variant::Imc, 0, Some(0.01), 56.0)],
        ),
    ] {
        let path = dir.join(name);
        let _ = std::fs::remove_file(&path);
        let mut state = SuiteState::open(&path, &suite).unwrap();
        for r in records {
            state.record(&path, r).unwrap();
        }
    }
}
