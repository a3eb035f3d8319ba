//! What each fuzz target does with its input: one function per parser a user's file reaches,
//! shared by the targets (`fuzz/fuzz_targets/`) and the replay of the regression corpus
//! (`tests/fuzz_regressions.rs`), so that a crash found by one is replayed through the same code.
//! Errors are the expected outcome; a panic or an abort is a bug. See docs/results/fuzz.md.
#![allow(dead_code)] // each includer uses part of it

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use semshare::checkpoint::Checkpoint;
use semshare::cli::Args;
use semshare::config::apply_config_json;
use semshare::data::Meta;
use semshare::data::batches::{RawImages, RawTexts};
use semshare::data::format::{Layout, reserved_vocab};
use semshare::data::pack::pack;
use semshare::data::reader::DatasetReader;
use semshare::data::shard::Shard;
use semshare::eval::{EmbeddingSet, EvalConfig};
use semshare::experiment::plot::{eta_curves, figure1_svg};
use semshare::experiment::report::{Tables, table1_markdown};
use semshare::experiment::suite::{Suite, SuiteState};
use semshare::experiment::tune::{Trial, TunePlan, TuneState, best, write_table};
use semshare::index::build::{embed_features, feature_items, from_vectors, generated_ids, read_ids, read_lines};
use semshare::index::npy::parse_npy;
use semshare::index::{Index, Modality, search};
use semshare::inference::{Embeddings, Model, Regions, tiny_checkpoint};
use semshare::model::{EmbeddingKind, ModelConfig, SemShare};
use semshare::train::TrainConfig;

/// A fuzz target's body: takes the input, must not panic.
pub type Target = fn(&[u8]);

/// Every target by name, as `cargo fuzz run NAME` and `tests/fuzz-regressions/NAME/` name it.
pub const TARGETS: &[(&str, Target)] = &[
    ("shard", shard),
    ("manifest", manifest),
    ("checkpoint", checkpoint),
    ("checkpoint_model", checkpoint_model),
    ("embeddings", embeddings),
    ("config", config),
    ("pack_source", pack_source),
    ("cli", cli),
    ("npy", npy),
    ("index", index),
    ("texts", texts),
    ("suite_state", suite_state),
    ("tune_state", tune_state),
];

/// A dataset of the fuzz layout (token texts): train in two shards, val, test, database.
/// Committed rather than generated, so that the checksums of the manifest seeds match it.
pub const DATASET_FILES: &[(&str, &[u8])] = &[
    ("vocab.txt", include_bytes!("fixtures/dataset/vocab.txt")),
    ("labels.txt", include_bytes!("fixtures/dataset/labels.txt")),
    ("train-00000.safetensors", include_bytes!("fixtures/dataset/train-00000.safetensors")),
    ("train-00001.safetensors", include_bytes!("fixtures/dataset/train-00001.safetensors")),
    ("val-00000.safetensors", include_bytes!("fixtures/dataset/val-00000.safetensors")),
    ("test-00000.safetensors", include_bytes!("fixtures/dataset/test-00000.safetensors")),
    ("database-00000.safetensors", include_bytes!("fixtures/dataset/database-00000.safetensors")),
];

/// Separates the files of one `pack_source` input: source.json, labels.txt, vocab.txt, then the
/// data files `f3.safetensors`, `f4.safetensors`, … (named by their position).
pub const FILE_SEPARATOR: &[u8] = b"\n--8<--\n";

/// The layout of the shard target and of the fixture dataset.
pub fn layout(text_feature_dim: usize) -> Layout {
    let mut vocab = reserved_vocab();
    vocab.extend((3..20).map(|i| format!("w{i}")));
    let meta = Meta {
        name: "fuzz".into(),
        regions: 4,
        feature_dim: 8,
        max_tokens: 6,
        num_labels: 3,
        num_object_classes: 7,
        vocab,
        label_names: vec!["a".into(), "b".into(), "c".into()],
    };
    Layout { meta, text_feature_dim }
}

/// This thread's scratch directory (in memory where /dev/shm exists: pack fsyncs what it writes).
pub fn scratch() -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static DIR: PathBuf = {
            let shm = Path::new("/dev/shm");
            let base = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
            let k = NEXT.fetch_add(1, Ordering::Relaxed);
            base.join(format!("semshare-fuzz-{}-{k}", std::process::id()))
        };
    }
    let dir = DIR.with(PathBuf::clone);
    std::fs::create_dir_all(&dir).expect("scratch directory");
    dir
}

/// Removes this thread's scratch directory (the tests call it; a fuzzer leaves one behind).
pub fn remove_scratch() {
    let _ = std::fs::remove_dir_all(scratch());
}

fn write_scratch_file(name: &str, data: &[u8]) -> Option<PathBuf> {
    let path = scratch().join(name);
    std::fs::write(&path, data).ok().map(|()| path)
}

/// Reads every item of every split the way training and evaluation do (pread, content checks,
/// the shard checksum on the first read).
fn read_all_items(data: &DatasetReader) {
    for split in data.splits() {
        let images: Vec<usize> = (0..split.num_images()).collect();
        let texts: Vec<usize> = (0..split.num_texts()).collect();
        let _ = RawImages::default().fill(&data.layout, split, &images);
        let _ = RawTexts::default().fill(&data.layout, split, &texts);
    }
}

/// Arbitrary bytes as a shard file, opened against the fixed layouts (token texts and feature
/// texts), then every item checked and read.
pub fn shard(data: &[u8]) {
    let Some(path) = write_scratch_file("shard.safetensors", data) else { return };
    for layout in [layout(0), layout(5)] {
        let Ok(shard) = Shard::open(&path, &layout, None) else { continue };
        let mut buf = Vec::new();
        for i in 0..shard.num_images() {
            let _ = shard.check_image(&layout, i);
            buf.resize(shard.feature_len(&layout, i), 0);
            let _ = shard.read_features(&layout, i, &mut buf);
        }
        for j in 0..shard.num_texts() {
            let _ = shard.check_text(&layout, j);
            let _ = shard.text_item(j);
        }
    }
}

/// Arbitrary bytes as `dataset.json` next to the fixture dataset's files; an opened dataset is
/// checked (`semshare check`) and every item read.
pub fn manifest(data: &[u8]) {
    let dir = scratch().join("dataset");
    if !dir.join(DATASET_FILES[0].0).is_file() {
        std::fs::create_dir_all(&dir).expect("fixture directory");
        for (name, bytes) in DATASET_FILES {
            std::fs::write(dir.join(name), bytes).expect("fixture file");
        }
    }
    if std::fs::write(dir.join("dataset.json"), data).is_err() {
        return;
    }
    let Ok(reader) = DatasetReader::open(&dir) else { return };
    let _ = reader.check(100);
    read_all_items(&reader);
}

/// Arbitrary bytes as a checkpoint (`eval`, `embed`, `train --resume`), and as the library's
/// `Model::load` reads one (`index`, `query`): a model that loads embeds an image of its region
/// width and a text through its vocabulary.
pub fn checkpoint(data: &[u8]) {
    let Some(path) = write_scratch_file("checkpoint.safetensors", data) else { return };
    if let Ok(ckpt) = Checkpoint::load(&path) {
        let _ = SemShare::new(&ckpt.model);
    }
    let Ok(cpu) = semshare::backend::open("cpu") else { return };
    if let Ok(mut model) = Model::load(&path, cpu) {
        let width = model.config().region_dim;
        let _ = model.embed_images(&[Regions::new(&vec![0.5; width])]);
        let _ = model.embed_texts(&["sky clouds"]);
    }
}

/// Arbitrary bytes as the model configuration in a checkpoint's metadata (JSON inside a JSON
/// string of the header, which byte mutations of a whole file rarely keep valid): the tiny
/// checkpoint seed with its `model` entry replaced, through [`checkpoint`].
pub fn checkpoint_model(data: &[u8]) {
    const TINY: &[u8] = include_bytes!("seeds/checkpoint/tiny.safetensors");
    let Ok(model) = std::str::from_utf8(data) else { return };
    let st = safetensors::SafeTensors::deserialize(TINY).expect("the seed parses");
    let (_, header) = safetensors::SafeTensors::read_metadata(TINY).expect("the seed parses");
    let mut metadata = header.metadata().clone().unwrap_or_default();
    metadata.insert("model".into(), model.into());
    checkpoint(&safetensors::serialize(st.tensors(), Some(metadata)).expect("the seed's tensors serialise"));
}

/// Arbitrary bytes as the embeddings file of `score`, loaded and scored.
pub fn embeddings(data: &[u8]) {
    let Some(path) = write_scratch_file("embeddings.safetensors", data) else { return };
    if let Ok(set) = EmbeddingSet::load(&path) {
        let _ = set.evaluate(&EvalConfig::default());
    }
}

/// Arbitrary bytes as the `--config` file of `train` and `experiment`, over the `small` preset;
/// an accepted configuration is validated and its model built (parameter layout, no weights).
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return }; // the binary reads it as UTF-8
    let Ok(c) = apply_config_json(ModelConfig::small(), TrainConfig::default(), text, Path::new("config.json")) else {
        return;
    };
    let _ = c.train.validate();
    let _ = SemShare::new(&c.model);
}

/// Arbitrary bytes as a source directory (files split at [`FILE_SEPARATOR`]), packed into a
/// dataset with small shards, which is then opened.
pub fn pack_source(data: &[u8]) {
    let src = scratch().join("source");
    let out = scratch().join("packed");
    let _ = std::fs::remove_dir_all(&src);
    let _ = std::fs::remove_dir_all(&out);
    if std::fs::create_dir_all(&src).is_err() {
        return;
    }
    let mut rest = data;
    let mut k = 0;
    loop {
        let (file, next) = match find(rest, FILE_SEPARATOR) {
            Some(at) => (&rest[..at], Some(&rest[at + FILE_SEPARATOR.len()..])),
            None => (rest, None),
        };
        let name = match k {
            0 => "source.json".to_string(),
            1 => "labels.txt".to_string(),
            2 => "vocab.txt".to_string(),
            _ => format!("f{k}.safetensors"),
        };
        if std::fs::write(src.join(name), file).is_err() {
            return;
        }
        k += 1;
        match next {
            Some(n) => rest = n,
            None => break,
        }
    }
    if let Ok(summary) = pack(&src, &out, 1 << 11)
        && let Ok(reader) = DatasetReader::open(&summary.out)
    {
        read_all_items(&reader);
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Arbitrary bytes as a command line (arguments separated by newlines): the option parser of the
/// command named first, then every accessor and value parser the binary applies to its options.
pub fn cli(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let argv: Vec<String> = text.split('\n').map(str::to_string).collect();
    let Some((cmd, rest)) = argv.split_first() else { return };
    let Some(&(_, takes, switches)) = semshare::cli::COMMAND_OPTIONS.iter().find(|c| c.0 == cmd) else { return };
    let Ok(args) = Args::parse(rest, takes, switches) else { return };
    for &name in takes {
        let _ = args.all(name);
        let _ = args.need(name);
        let _ = args.path(name);
        let _ = args.num::<u64>(name);
        let _ = args.num::<usize>(name);
        let _ = args.num::<f32>(name);
    }
    for &name in switches {
        let _ = args.has(name);
    }
    if let Some(m) = args.get("model") {
        let _ = ModelConfig::preset(m);
    }
    if let Some(e) = args.get("embedding") {
        let _ = e.parse::<EmbeddingKind>();
    }
    if let Some(s) = args.get("suite") {
        let _ = s.parse::<semshare::experiment::suite::SuiteKind>();
    }
    if let Some(list) = args.get("variants") {
        for v in list.split(',') {
            let _ = v.trim().parse::<semshare::model::Variant>();
        }
    }
    if let Some(p) = args.get("precision") {
        let _ = semshare::backend::Precision::parse(p);
    }
    if let Some(s) = args.get("side") {
        let _ = s.parse::<semshare::index::Modality>();
    }
    if let Some(p) = args.get("preset") {
        let _ = p.parse::<semshare::data::SynthPreset>();
    }
}

/// Runs `f` on this thread's tiny model (`inference::tiny_checkpoint`: 7 words, regions of
/// width 4, at most 3 regions and 6 tokens) on the CPU, loaded once.
fn with_model(f: impl FnOnce(&mut Model)) {
    thread_local! {
        static MODEL: std::cell::RefCell<Model> = {
            let path = tiny_checkpoint("fuzz").expect("the tiny checkpoint is written");
            let dev = semshare::backend::open("cpu").expect("the CPU backend");
            let model = Model::load(&path, dev).expect("the tiny checkpoint loads");
            let _ = std::fs::remove_file(&path);
            std::cell::RefCell::new(model)
        };
    }
    MODEL.with(|m| f(&mut m.borrow_mut()));
}

/// Arbitrary bytes as a `.npy` file (`index` and `query`, `--features` and `--vectors`): parsed;
/// as features, cut into items and embedded as images by the tiny model; as raw vectors, a
/// gallery with the ids `index` gives them, which must be written, open again and be searched
/// with its own rows.
pub fn npy(data: &[u8]) {
    let Ok(array) = parse_npy(data) else { return };
    // The segments cut at the array's own width, then embedded by a model of width 4.
    let width = array.shape.last().copied().unwrap_or(0);
    let _ = feature_items(&array, Modality::Image, width, 0);
    with_model(|m| drop(embed_features(m, &array, Modality::Image)));
    let n = array.shape.first().copied().unwrap_or(0); // as `index --vectors` counts its ids
    let queries = Embeddings { values: array.values.clone(), dim: array.shape.last().copied().unwrap_or(0) };
    let Ok(gallery) = from_vectors(array, generated_ids("v", n)) else { return };
    let path = scratch().join("vectors.idx");
    gallery.save(&path).expect("a gallery of normalised vectors is written");
    let index = Index::open(&path).expect("a written gallery opens");
    with_model(|m| drop(search(m.device(), &index, &queries, 5)));
}

/// Arbitrary bytes as a gallery index (`query`, `export`, `index --append`): opened and
/// validated; one that opens is searched with its first row, and written back, which must open
/// again with the same items; appended to itself, it is refused (its ids are taken).
pub fn index(data: &[u8]) {
    let Some(path) = write_scratch_file("gallery.idx", data) else { return };
    let Ok(index) = Index::open(&path) else { return };
    for i in 0..index.len() {
        let _ = (index.id(i), index.labels(i));
    }
    let first = Embeddings { values: index.vectors()[..index.dim()].to_vec(), dim: index.dim() };
    with_model(|m| drop(search(m.device(), &index, &first, 3)));
    let gallery = index.to_gallery();
    let copy = scratch().join("copy.idx");
    gallery.save(&copy).expect("an index that opened is written back");
    let reopened = Index::open(&copy).expect("an index written back opens");
    assert_eq!(reopened.to_gallery(), gallery, "written back, an index keeps its items");
    assert!(gallery.clone().append(gallery).is_err(), "an index appended to itself is refused");
}

/// Arbitrary bytes as a text file of `index --texts`, `query --queries` or `--ids`: read as
/// lines (and as 3 ids), each line tokenised and embedded by the tiny model.
pub fn texts(data: &[u8]) {
    let Some(path) = write_scratch_file("texts.txt", data) else { return };
    let _ = read_ids(&path, 3);
    let Ok(lines) = read_lines(&path) else { return };
    with_model(|m| drop(m.embed_texts(&lines)));
}

/// Arbitrary bytes as the state file of an `experiment` suite (what a resumed suite reads),
/// opened as Table 1's and as the η sweep's (3 seeds each); a state that opens gives its
/// remaining runs, its tables in markdown, and Figure 1's curves and SVG.
pub fn suite_state(data: &[u8]) {
    let Some(path) = write_scratch_file("suite-state.json", data) else { return };
    for suite in [Suite::table1(3, "fuzz"), Suite::eta_sweep(3, "fuzz")] {
        let Ok(state) = SuiteState::open(&path, &suite.expect("a valid suite")) else { continue };
        let _ = (state.remaining(), state.progress());
        if let Ok(tables) = Tables::of(&state, "pooled") {
            let _ = table1_markdown("fuzz", &tables);
        }
        if let Ok(curves) = eta_curves(&state) {
            let _ = figure1_svg("fuzz", 500, &curves);
        }
    }
}

/// The plan of the `tune_state` target and its seed: 4 trials, 3 rungs from 2 steps at η = 2,
/// 2 repeats where a rung chooses after the first.
pub fn tune_plan() -> TunePlan {
    let base = ModelConfig::small();
    let trials = (0..4)
        .map(|id| match id {
            0 => Trial::base(&base, &TrainConfig::default(), 32),
            _ => Trial::sample(0, id, &base, 32),
        })
        .collect();
    TunePlan {
        trials,
        min_steps: 2,
        reduction: 2,
        rungs: 3,
        repeats: 2,
        seed: 0,
        metric: "ndcg@500".into(),
        fingerprint: "fuzz".into(),
    }
}

/// Arbitrary bytes as the state file of `tune` (what a resumed tune reads), opened against
/// [`tune_plan`]; a state that opens gives its remaining trials, each rung's ranking, the best
/// trial and `trials.md`.
pub fn tune_state(data: &[u8]) {
    let Some(path) = write_scratch_file("tune-state.json", data) else { return };
    let plan = tune_plan();
    let Ok(state) = TuneState::open(&path, &plan) else { return };
    let _ = (state.remaining(), state.progress());
    for rung in 0..plan.rungs {
        let _ = plan.ranking(&state.finished, rung);
    }
    let _ = best(&state);
    let _ = write_table(&state, &scratch());
}
