//! The `semshare` command line: demo, synth, pack, check, train, eval, embed, score, experiment.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use semshare::backend::{self, Backend};
use semshare::checkpoint::Checkpoint;
use semshare::cli::{Args, apply_config_file};
use semshare::data::flickr_tags::{FlickrTagsConfig, RealTags, generate_flickr_tags};
use semshare::data::pack::pack;
use semshare::data::shards::{DatasetReader, Layout};
use semshare::data::synth::{SynthConfig, SynthPreset, generate};
use semshare::eval::{EmbeddingSet, EvalConfig, Report};
use semshare::experiment::run::{ExperimentConfig, build_suite, default_budget, run_suite, state_path, suite_name};
use semshare::experiment::suite::{SuiteKind, SuiteState, Variant};
use semshare::model::{EmbeddingKind, ModelConfig, SemShare};
use semshare::train::{RunOptions, TrainConfig, embed_split, evaluate_split, train};
use semshare::{Error, Result};

const USAGE: &str = "\
semshare — label-wise cross-modal retrieval by semantic sharing (Yang et al., IJCAI 2021)

USAGE: semshare <COMMAND> [OPTIONS]

COMMANDS:
  demo     synthesize data, train, evaluate; prints the trained model against the untrained one
             [--steps N] [--out DIR] [--seed S] [--device D]
  synth    write a synthetic dataset
             --out DIR [--preset balanced|weak-image|weak-text] [--seed S]
             [--train N] [--val N] [--test N]
           or real MIRFlickr-25K labels and tag texts with synthetic regions
             --preset flickr-tags --labels DIR --out DIR [--seed S] [--format dataset|source]
             [--train N] [--val N] [--test N]   (defaults 10000 / 1000 / 2000 queries)
             --format source writes a source directory for `pack`, retrieval set included
  pack     build a dataset directory from a source directory (docs/FORMAT.md)
             --from SRC --out DIR [--shard-mb N (default 256)]
  check    validate a dataset directory completely (checksums, every item); exit 1 on a problem
             DIR
  train    train on a dataset directory
             --data DIR [--out DIR] [--config FILE.json] [--model small|paper]
             [--steps N] [--batch N] [--lr X] [--lambda X] [--seed S] [--resume CKPT] [--device D]
  eval     retrieval metrics of a checkpoint on a split
             --data DIR --checkpoint CKPT [--split test|val|train|database]
             (test with a database split: test queries ranked against the database) [--embedding pooled|label] [--json] [--device D]
  embed    write the embeddings of a split (the input of `score`)
             --data DIR --checkpoint CKPT --out FILE [--split S] [--embedding E] [--device D]
  score    metrics for embeddings produced by any model
             --embeddings FILE [--json]
  experiment  run a suite of docs/EXPERIMENTS-DESIGN.md (resumes where a killed one stopped)
             --suite table1|eta --data DIR [--seeds N (default 3)] [--variants a,b,...]
             [--model small|paper] [--config FILE.json] [--steps N] [--device D]
             [--out DIR (default docs/results/<dataset>)] [--runs DIR (default runs/experiments/<dataset>)]
             budget per run unless the config file or --steps say otherwise: batch 32, 600 steps,
             warm-up 60, lr 5e-4, validation every 100 steps, patience 3

  --device auto|cpu|cuda   (default auto: CUDA when built with it and a GPU is present)
  A config file is JSON: {\"model\": {...}, \"train\": {...}}; flags override it.
";

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    match run(&argv) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(argv: &[String]) -> Result<()> {
    let Some((cmd, rest)) = argv.split_first() else {
        print!("{USAGE}");
        return Ok(());
    };
    match cmd.as_str() {
        "demo" => demo(&Args::parse(rest, &["steps", "out", "seed", "device"], &[])?),
        "synth" => {
            synth(&Args::parse(rest, &["out", "preset", "seed", "train", "val", "test", "labels", "format"], &[])?)
        }
        "pack" => pack_cmd(&Args::parse(rest, &["from", "out", "shard-mb"], &[])?),
        "check" => check_cmd(rest),
        "train" => train_cmd(&Args::parse(
            rest,
            &["data", "out", "config", "model", "steps", "batch", "lr", "lambda", "seed", "resume", "device"],
            &[],
        )?),
        "eval" => eval_cmd(&Args::parse(rest, &["data", "checkpoint", "split", "embedding", "device"], &["json"])?),
        "embed" => embed_cmd(&Args::parse(rest, &["data", "checkpoint", "out", "split", "embedding", "device"], &[])?),
        "score" => score_cmd(&Args::parse(rest, &["embeddings"], &["json"])?),
        "experiment" => experiment_cmd(&Args::parse(
            rest,
            &["suite", "data", "seeds", "variants", "model", "config", "out", "runs", "steps", "device"],
            &[],
        )?),
        "help" | "--help" | "-h" => {
            print!("{USAGE}");
            Ok(())
        }
        other => Err(Error::config(format!("unknown command `{other}` (try `semshare help`)"))),
    }
}

fn device(args: &Args) -> Result<Box<dyn Backend>> {
    backend::open(args.get("device").unwrap_or("auto"))
}

/// Model and training configuration: preset (and `base` for training), then the config file,
/// then flags.
fn configs(args: &Args, base: TrainConfig) -> Result<(ModelConfig, TrainConfig)> {
    let (mut model, mut train) = (ModelConfig::preset(args.get("model").unwrap_or("small"))?, base);
    if let Some(path) = args.get("config") {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        (model, train) = apply_config_file(Path::new(path), &text, model, train)?;
    }
    if let Some(v) = args.num("steps")? {
        train.steps = v;
    }
    if let Some(v) = args.num("batch")? {
        train.batch_size = v;
    }
    if let Some(v) = args.num("lr")? {
        train.lr = v;
    }
    if let Some(v) = args.num("seed")? {
        train.seed = v;
    }
    if let Some(v) = args.num("lambda")? {
        model.lambda = v;
    }
    Ok((model, train))
}

/// The model's vocabulary, labels, object classes and text representation come from the data.
fn fit_to_data(model: &mut ModelConfig, layout: &Layout) {
    let m = &layout.meta;
    model.vocab = m.vocab_size();
    model.labels = m.num_labels;
    model.region_dim = m.feature_dim;
    model.object_classes = m.num_object_classes.max(1);
    model.max_regions = m.regions;
    model.max_tokens = m.max_tokens;
    model.text_feature_dim = layout.text_feature_dim;
}

fn load_data(args: &Args) -> Result<Arc<DatasetReader>> {
    let dir = args.path("data")?;
    if !dir.is_dir() {
        return Err(Error::config(format!("data directory {} does not exist", dir.display())));
    }
    Ok(Arc::new(DatasetReader::open(&dir)?))
}

fn split_name(args: &Args) -> &str {
    args.get("split").unwrap_or("test")
}

fn pack_cmd(args: &Args) -> Result<()> {
    let mb: usize = args.num("shard-mb")?.unwrap_or(256);
    if mb == 0 {
        return Err(Error::config("--shard-mb must be positive"));
    }
    let s = pack(&args.path("from")?, &args.path("out")?, mb << 20)?;
    for (name, n, m, shards) in &s.splits {
        println!("{name}: {n} images, {m} texts in {shards} shard(s)");
    }
    println!("wrote {}", s.out.display());
    Ok(())
}

/// Every problem found, one per line; an error (exit 1) when there is any.
fn check_cmd(rest: &[String]) -> Result<()> {
    let [dir] = rest else {
        return Err(Error::config("usage: semshare check DIR"));
    };
    const LIMIT: usize = 100;
    let data = DatasetReader::open(dir)?;
    let problems = data.check(LIMIT);
    for p in &problems {
        eprintln!("{p}");
    }
    if problems.is_empty() {
        let counts: Vec<String> =
            data.splits().iter().map(|s| format!("{} {}/{}", s.name, s.num_images(), s.num_texts())).collect();
        println!("{dir}: ok ({} images/texts)", counts.join(", "));
        Ok(())
    } else {
        let more = if problems.len() == LIMIT { " (stopped counting)" } else { "" };
        Err(Error::data(format!("{dir}: {} problem(s){more}", problems.len())))
    }
}

fn synth(args: &Args) -> Result<()> {
    if args.get("preset") == Some("flickr-tags") {
        return synth_flickr_tags(args);
    }
    for flag in ["labels", "format"] {
        if args.has(flag) {
            return Err(Error::config(format!("--{flag} is only for --preset flickr-tags")));
        }
    }
    let name = args.get("preset").unwrap_or("balanced");
    let preset: SynthPreset = name.parse().map_err(|_| {
        Error::config(format!("unknown preset `{name}` (balanced, weak-image, weak-text, flickr-tags)"))
    })?;
    let mut cfg = SynthConfig::preset(preset, args.num("seed")?.unwrap_or(0));
    if let Some(n) = args.num("train")? {
        cfg.train = n;
    }
    if let Some(n) = args.num("val")? {
        cfg.val = n;
    }
    if let Some(n) = args.num("test")? {
        cfg.test = n;
    }
    let out = args.path("out")?;
    let data = generate(&cfg)?;
    data.save(&out)?;
    println!(
        "wrote {} ({} / {} / {} images in train / val / test) to {}",
        data.meta.name,
        data.train.num_images(),
        data.val.num_images(),
        data.test.num_images(),
        out.display()
    );
    Ok(())
}

fn synth_flickr_tags(args: &Args) -> Result<()> {
    let mut cfg = FlickrTagsConfig::new(args.num("seed")?.unwrap_or(0));
    for (flag, field) in [("train", &mut cfg.train), ("val", &mut cfg.val), ("test", &mut cfg.queries)] {
        if let Some(n) = args.num(flag)? {
            *field = n;
        }
    }
    let source = match args.get("format").unwrap_or("dataset") {
        "dataset" => false,
        "source" => true,
        f => return Err(Error::config(format!("unknown --format `{f}` (expected dataset or source)"))),
    };
    let labels = args.path("labels")?;
    let out = args.path("out")?;
    let data = generate_flickr_tags(&cfg, &RealTags::load(&labels)?)?;
    let sizes = format!(
        "{} / {} / {} queries / {} retrieval",
        data.train.num_images(),
        data.val.num_images(),
        data.test.num_images(),
        data.database.num_images()
    );
    let name = data.meta.name.clone();
    let (truncated, t) = (data.truncated, data.meta.max_tokens);
    if source {
        data.save_source(&out)?;
        println!("wrote source directory {name} (train / val / test {sizes}) to {}", out.display());
    } else {
        data.save(&out, 256 << 20)?;
        println!("wrote {name} (train / val / test {sizes}) to {}", out.display());
    }
    if truncated > 0 {
        println!("{truncated} items have more than {t} tags: their texts keep the first {t} (most frequent)");
    }
    Ok(())
}

fn train_cmd(args: &Args) -> Result<()> {
    let mut dev = device(args)?;
    let data = load_data(args)?;
    let (model, cfg) = configs(args, TrainConfig::default())?;
    // The variant's structure (trunk, separate models, segments) goes with it.
    let mut model = cfg.variant.configure(&model);
    fit_to_data(&mut model, &data.layout);
    let opts = RunOptions {
        out_dir: args.get("out").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("runs/latest")),
        resume: args.get("resume").map(PathBuf::from),
        progress: true,
    };
    let s = train(dev.as_mut(), &data, &model, &cfg, &opts)?;
    println!(
        "trained {} steps in {:.1}s on {}: final loss {:.4}, best validation NDCG@{} {:.2} at step {} ({})",
        s.steps,
        s.seconds,
        dev.name(),
        s.final_loss,
        cfg.eval_k,
        s.best_ndcg,
        s.best_step,
        s.best_checkpoint.display()
    );
    Ok(())
}

fn experiment_cmd(args: &Args) -> Result<()> {
    let suite: SuiteKind = args.need("suite")?.parse()?;
    let seeds: u64 = args.num("seeds")?.unwrap_or(3);
    if seeds == 0 {
        return Err(Error::config("--seeds must be positive"));
    }
    let variants = match args.get("variants") {
        Some(list) => Some(list.split(',').map(|v| v.trim().parse::<Variant>()).collect::<Result<Vec<_>>>()?),
        None => None,
    };
    let data = load_data(args)?;
    let (mut model, train) = configs(args, default_budget())?;
    fit_to_data(&mut model, &data.layout);
    let dataset = data.meta().name.clone();
    let cfg = ExperimentConfig {
        suite,
        seeds,
        variants,
        model,
        train,
        out: args.get("out").map_or_else(|| Path::new("docs/results").join(&dataset), PathBuf::from),
        runs_dir: args.get("runs").map_or_else(|| Path::new("runs/experiments").join(&dataset), PathBuf::from),
        progress: true,
    };
    // A bad --variants or another suite's state file is refused before anything is printed.
    SuiteState::open(&state_path(&cfg.out, suite), &build_suite(&data, &cfg)?)?;
    let mut dev = device(args)?;
    eprintln!(
        "experiment {} on {dataset} ({} seed(s), {} steps per run) on {}; results in {}",
        suite_name(suite),
        seeds,
        cfg.train.steps,
        dev.name(),
        cfg.out.display()
    );
    let state = run_suite(dev.as_mut(), &data, &cfg)?;
    let (done, total) = state.progress();
    let files = match suite {
        SuiteKind::Table1 => "table1.md, table1.json",
        SuiteKind::Eta => "figure1.svg, eta.md, eta.json",
    };
    println!(
        "{done}/{total} runs finished; wrote {files} and {} in {}",
        state_path(&cfg.out, suite).file_name().and_then(|n| n.to_str()).unwrap_or(""),
        cfg.out.display()
    );
    Ok(())
}

fn load_model(dev: &mut dyn Backend, path: &Path) -> Result<(SemShare, semshare::tensor::Tensor)> {
    let ckpt = Checkpoint::load(path)?;
    let net = SemShare::new(&ckpt.model)?;
    let params = net.store.upload(dev, &ckpt.params)?;
    Ok((net, params))
}

fn eval_cmd(args: &Args) -> Result<()> {
    let mut dev = device(args)?;
    let data = load_data(args)?;
    let (net, params) = load_model(dev.as_mut(), &args.path("checkpoint")?)?;
    semshare::train::check_fits(&data.layout, &net.cfg)?;
    let kind: EmbeddingKind = args.get("embedding").unwrap_or("pooled").parse()?;
    let report = evaluate_split(dev.as_mut(), &net, &params, &data, split_name(args), kind, &EvalConfig::default())?;
    print_report(&report, args.has("json"));
    Ok(())
}

fn embed_cmd(args: &Args) -> Result<()> {
    let mut dev = device(args)?;
    let data = load_data(args)?;
    let (net, params) = load_model(dev.as_mut(), &args.path("checkpoint")?)?;
    semshare::train::check_fits(&data.layout, &net.cfg)?;
    let kind: EmbeddingKind = args.get("embedding").unwrap_or("pooled").parse()?;
    let split = data.split(split_name(args))?;
    let (ie, te, dim) = embed_split(dev.as_mut(), &net, &params, &data.layout, split, kind)?;
    let c = data.meta().num_labels;
    let set = EmbeddingSet::new(ie, split.image_labels(), te, split.text_labels(), dim, c, Some(split.text_items()))?;
    let out = args.path("out")?;
    set.save(&out)?;
    println!(
        "wrote {} image and {} text embeddings of width {dim} to {}",
        split.num_images(),
        split.num_texts(),
        out.display()
    );
    Ok(())
}

fn score_cmd(args: &Args) -> Result<()> {
    let set = EmbeddingSet::load(&args.path("embeddings")?)?;
    print_report(&set.evaluate(&EvalConfig::default())?, args.has("json"));
    Ok(())
}

fn print_report(r: &Report, json: bool) {
    if json {
        println!("{}", r.to_json());
    } else {
        print!("{}", r.table());
    }
}

fn demo(args: &Args) -> Result<()> {
    let mut dev = device(args)?;
    let seed = args.num("seed")?.unwrap_or(0);
    let out = args.get("out").map(PathBuf::from).unwrap_or_else(|| std::env::temp_dir().join("semshare-demo"));
    let mut synth_cfg = SynthConfig::preset(SynthPreset::Balanced, seed);
    (synth_cfg.train, synth_cfg.val, synth_cfg.test) = (2000, 300, 1000);
    eprintln!(
        "synthesizing {} / {} / {} images (balanced preset, seed {seed}) ...",
        synth_cfg.train, synth_cfg.val, synth_cfg.test
    );
    generate(&synth_cfg)?.save(out.join("data"))?;
    let data = Arc::new(DatasetReader::open(out.join("data"))?);
    let mut model = ModelConfig::small();
    fit_to_data(&mut model, &data.layout);
    let cfg = TrainConfig {
        steps: args.num("steps")?.unwrap_or(800),
        eval_every: 200,
        seed,
        warmup: 50,
        ..TrainConfig::default()
    };
    let eval_cfg = EvalConfig::default();
    let untrained = SemShare::new(&model)?;
    let init = untrained.store.upload(dev.as_mut(), &untrained.store.init_values(seed))?;
    let before = evaluate_split(dev.as_mut(), &untrained, &init, &data, "test", EmbeddingKind::Pooled, &eval_cfg)?;
    eprintln!("training the `small` model for {} steps of {} pairs on {} ...", cfg.steps, cfg.batch_size, dev.name());
    let opts = RunOptions { out_dir: out.clone(), resume: None, progress: true };
    let summary = train(dev.as_mut(), &data, &model, &cfg, &opts)?;
    let (net, params) = load_model(dev.as_mut(), &summary.best_checkpoint)?;
    let after = evaluate_split(dev.as_mut(), &net, &params, &data, "test", EmbeddingKind::Pooled, &eval_cfg)?;
    println!(
        "\nsemshare demo: {} test images / {} texts, trained {} steps in {:.0}s",
        data.split("test")?.num_images(),
        data.split("test")?.num_texts(),
        summary.steps,
        summary.seconds
    );
    println!("{:<10}{:>12}{:>12}{:>12}{:>12}", "metric", "untrained", "trained", "I2T", "T2I");
    let row = |name: &str, f: &dyn Fn(&Report) -> f64, i2t: f64, t2i: f64| {
        println!("{name:<10}{:>12.2}{:>12.2}{:>12.2}{:>12.2}", f(&before), f(&after), i2t, t2i);
    };
    for k in [10, 100, 500] {
        let get = |r: &Report| r.avg.ndcg_at(k).unwrap_or(0.0);
        row(&format!("NDCG@{k}"), &get, after.i2t.ndcg_at(k).unwrap_or(0.0), after.t2i.ndcg_at(k).unwrap_or(0.0));
    }
    row("mAP@all", &|r: &Report| r.avg.map_all, after.i2t.map_all, after.t2i.map_all);
    for k in [1, 5, 10] {
        let get = |r: &Report| r.avg.recall_at(k).unwrap_or(0.0);
        row(&format!("R@{k}"), &get, after.i2t.recall_at(k).unwrap_or(0.0), after.t2i.recall_at(k).unwrap_or(0.0));
    }
    println!("(untrained/trained: average of I2T and T2I; best checkpoint: {})", summary.best_checkpoint.display());
    Ok(())
}
