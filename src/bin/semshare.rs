//! The `semshare` command line: demo, synth, pack, check, train, eval, embed, score, experiment.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use semshare::backend::{self, Backend};
use semshare::config::{Configs, fit_to_data, read_config_file};
use semshare::data::flickr_tags::{FlickrTagsConfig, RealTags, generate_flickr_tags};
use semshare::data::pack::{is_source, pack};
use semshare::data::shards::{DatasetReader, Layout, is_dataset};
use semshare::data::synth::{SynthConfig, SynthPreset, generate};
use semshare::eval::{EmbeddingSet, EvalConfig, Report};
use semshare::experiment::run::{ExperimentConfig, build_suite, default_budget, run_suite, state_path, suite_name};
use semshare::experiment::suite::{SuiteKind, SuiteState};
use semshare::inference::{embed_split, evaluate_split, load_model};
use semshare::io::{claim_output, refuse_overlap, refuse_replacing};
use semshare::model::{EmbeddingKind, ModelConfig, SemShare, Variant};
use semshare::train::{RunOptions, TrainConfig, fresh_run_dir, train};
use semshare::{Error, Result};

const USAGE: &str = "\
semshare — label-wise cross-modal retrieval by semantic sharing (Yang et al., IJCAI 2021)

USAGE: semshare <COMMAND> [OPTIONS]

COMMANDS:
  demo     synthesize data, train, evaluate; prints the trained model against the untrained one
             [--steps N] [--out DIR] [--seed S] [--device D]
             [--train N] [--val N] [--test N]   (defaults 2000 / 300 / 1000)
  synth    write a synthetic dataset
             --out DIR [--preset balanced|weak-image|weak-text] [--seed S]
             [--train N] [--val N] [--test N] [--force]
           or real MIRFlickr-25K labels and tag texts with synthetic regions
             --preset flickr-tags --labels DIR --out DIR [--seed S] [--format dataset|source]
             [--train N] [--val N] [--test N] [--force]  (defaults 10000 / 1000 / 2000 queries)
             --format source writes a source directory for `pack`, retrieval set included
  pack     build a dataset directory from a source directory (docs/FORMAT.md)
             --from SRC --out DIR [--shard-mb N (default 256)] [--force]
  check    validate a dataset directory completely (checksums, every item); exit 1 on a problem
             DIR
  train    train on a dataset directory
             --data DIR [--out DIR (default: a new runs/<dataset>-<k>)] [--config FILE.json]
             [--model small|paper] [--steps N] [--batch N] [--lr X] [--lambda X] [--seed S]
             [--resume CKPT] [--force] [--device D]
             --steps is the total: --resume continues CKPT's run up to it (nothing to do if
             CKPT is there already); --force replaces another run's checkpoints in --out
  eval     retrieval metrics of a checkpoint on a split
             --data DIR --checkpoint CKPT [--split test|val|train|database]
             (test with a database split: test queries ranked against the database) [--embedding pooled|label] [--json] [--device D]
  embed    write the embeddings of a split (the input of `score`)
             --data DIR --checkpoint CKPT --out FILE [--split S] [--embedding E] [--force] [--device D]
  score    metrics for embeddings produced by any model
             --embeddings FILE [--json]
  experiment  run a suite of docs/EXPERIMENTS-DESIGN.md (resumes where a killed one stopped)
             --suite table1|eta --data DIR [--seeds N (default 3) | --seed K] [--variants a,b,...]
             [--model small|paper] [--config FILE.json] [--steps N] [--device D]
             [--out DIR (default docs/results/<dataset>)] [--runs DIR (default runs/experiments/<dataset>)]
             budget per run unless the config file or --steps say otherwise: batch 32, 600 steps,
             warm-up 60, lr 5e-4, validation every 100 steps, patience 3
             --seed K runs seed K alone (adding it to the suite's state file)

  An existing output is replaced only with --force and only if semshare wrote it (its
  manifest says so); an output may not be one of the command's inputs.

  --device auto|cpu|cuda   (default auto: CUDA when built with it and a GPU is present)
  A config file is JSON: {\"model\": {...}, \"train\": {...}}; flags override it.
";

/// Parsed `--flag value` pairs and bare `--switch`es, checked against what a command takes.
struct Args {
    flags: HashMap<String, String>,
}

impl Args {
    fn parse(raw: &[String], takes_value: &[&str], switches: &[&str]) -> Result<Args> {
        let mut flags = HashMap::new();
        let mut it = raw.iter();
        while let Some(a) = it.next() {
            let name = a.strip_prefix("--").ok_or_else(|| Error::config(format!("unexpected argument `{a}`")))?;
            if switches.contains(&name) {
                flags.insert(name.to_string(), String::new());
            } else if takes_value.contains(&name) {
                let v = it.next().ok_or_else(|| Error::config(format!("--{name} needs a value")))?;
                flags.insert(name.to_string(), v.clone());
            } else {
                return Err(Error::config(format!("unknown option --{name}")));
            }
        }
        Ok(Args { flags })
    }
    fn get(&self, name: &str) -> Option<&str> {
        self.flags.get(name).map(String::as_str)
    }
    fn has(&self, name: &str) -> bool {
        self.flags.contains_key(name)
    }
    fn need(&self, name: &str) -> Result<&str> {
        self.get(name).ok_or_else(|| Error::config(format!("--{name} is required")))
    }
    fn path(&self, name: &str) -> Result<PathBuf> {
        self.need(name).map(PathBuf::from)
    }
    fn num<T: std::str::FromStr>(&self, name: &str) -> Result<Option<T>> {
        self.get(name)
            .map(|v| v.parse().map_err(|_| Error::config(format!("--{name}: `{v}` is not a valid number"))))
            .transpose()
    }
}

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
        "demo" => demo(&Args::parse(rest, &["steps", "out", "seed", "device", "train", "val", "test"], &[])?),
        "synth" => synth(&Args::parse(
            rest,
            &["out", "preset", "seed", "train", "val", "test", "labels", "format"],
            &["force"],
        )?),
        "pack" => pack_cmd(&Args::parse(rest, &["from", "out", "shard-mb"], &["force"])?),
        "check" => check_cmd(rest),
        "train" => train_cmd(&Args::parse(
            rest,
            &["data", "out", "config", "model", "steps", "batch", "lr", "lambda", "seed", "resume", "device"],
            &["force"],
        )?),
        "eval" => eval_cmd(&Args::parse(rest, &["data", "checkpoint", "split", "embedding", "device"], &["json"])?),
        "embed" => {
            embed_cmd(&Args::parse(rest, &["data", "checkpoint", "out", "split", "embedding", "device"], &["force"])?)
        }
        "score" => score_cmd(&Args::parse(rest, &["embeddings"], &["json"])?),
        "experiment" => experiment_cmd(&Args::parse(
            rest,
            &["suite", "data", "seeds", "seed", "variants", "model", "config", "out", "runs", "steps", "device"],
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
fn configs(args: &Args, base: TrainConfig) -> Result<Configs> {
    let model = ModelConfig::preset(args.get("model").unwrap_or("small"))?;
    let mut c = match args.get("config") {
        Some(path) => read_config_file(model, base, Path::new(path))?,
        None => Configs { model, train: base, model_keys: BTreeSet::new() },
    };
    if let Some(v) = args.num("steps")? {
        c.train.steps = v;
    }
    if let Some(v) = args.num("batch")? {
        c.train.batch_size = v;
    }
    if let Some(v) = args.num("lr")? {
        c.train.lr = v;
    }
    if let Some(v) = args.num("seed")? {
        c.train.seed = v;
    }
    if let Some(v) = args.num("lambda")? {
        c.model.lambda = v;
    }
    Ok(c)
}

/// [`fit_to_data`] with the `--config` file named in its errors.
fn fit(model: &mut ModelConfig, layout: &Layout, c: &Configs, args: &Args) -> Result<()> {
    fit_to_data(model, layout, &c.model_keys, Path::new(args.get("config").unwrap_or("--config")))
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

/// Most MiB per shard `pack` takes (1 TiB).
const MAX_SHARD_MB: usize = 1 << 20;

fn pack_cmd(args: &Args) -> Result<()> {
    let mb: usize = args.num("shard-mb")?.unwrap_or(256);
    let shard_bytes = mb
        .checked_mul(1 << 20)
        .filter(|_| (1..=MAX_SHARD_MB).contains(&mb))
        .ok_or_else(|| Error::config(format!("--shard-mb {mb} is outside 1..={MAX_SHARD_MB}")))?;
    let (from, out) = (args.path("from")?, args.path("out")?);
    refuse_replacing(&out, &from, "source directory (--from)")?;
    claim_output(&out, "dataset", args.has("force"), is_dataset)?;
    let s = pack(&from, &out, shard_bytes)?;
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
    claim_output(&out, "dataset", args.has("force"), is_dataset)?;
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
    refuse_replacing(&out, &labels, "labels directory (--labels)")?;
    if source {
        claim_output(&out, "source directory", args.has("force"), is_source)?;
    } else {
        claim_output(&out, "dataset", args.has("force"), is_dataset)?;
    }
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
    let c = configs(args, TrainConfig::default())?;
    let cfg = c.train.clone();
    // The variant's structure (trunk, separate models, segments) goes with it.
    let mut model = cfg.variant.configure(&c.model);
    fit(&mut model, &data.layout, &c, args)?;
    let resume = args.get("resume").map(PathBuf::from);
    let (out_dir, fresh) = match args.get("out") {
        Some(out) => (PathBuf::from(out), false),
        // Resuming in place continues that run's directory; otherwise a new one, never
        // another run's.
        None => match resume.as_deref().and_then(Path::parent) {
            Some(dir) if !dir.as_os_str().is_empty() => (dir.to_path_buf(), false),
            _ => (fresh_run_dir(Path::new("runs"), &data.meta().name)?, true),
        },
    };
    refuse_overlap(&out_dir, &data.dir, "dataset (--data)")?;
    let opts = RunOptions { out_dir, resume, replace: args.has("force"), progress: true };
    let s = train(dev.as_mut(), &data, &model, &cfg, &opts).inspect_err(|_| {
        if fresh {
            // A run refused before writing a checkpoint leaves no empty directory behind
            // (remove_dir keeps one that holds anything).
            let _ = std::fs::remove_file(opts.out_dir.join(semshare::train::LOCK_FILE));
            let _ = std::fs::remove_dir(&opts.out_dir);
        }
    })?;
    let Some(best) = &s.best_checkpoint else {
        let from = opts.resume.as_deref().unwrap_or(Path::new("the checkpoint"));
        println!(
            "{} is at step {} already, and --steps {} is the total: nothing trained, no checkpoint written (pass a larger --steps to continue)",
            from.display(),
            s.steps,
            cfg.steps
        );
        return Ok(());
    };
    println!(
        "trained {} steps in {:.1}s on {}: final loss {:.4}, best validation NDCG@{} {:.2} at step {} ({})",
        s.steps,
        s.seconds,
        dev.name(),
        s.final_loss,
        cfg.eval_k,
        s.best_ndcg,
        s.best_step,
        best.display()
    );
    Ok(())
}

fn experiment_cmd(args: &Args) -> Result<()> {
    let suite: SuiteKind = args.need("suite")?.parse()?;
    let seeds: u64 = args.num("seeds")?.unwrap_or(3);
    if seeds == 0 {
        return Err(Error::config("--seeds must be positive"));
    }
    let only_seed: Option<u64> = args.num("seed")?;
    if only_seed.is_some() && args.has("seeds") {
        return Err(Error::config("--seed K runs one seed: it does not go with --seeds"));
    }
    let variants = match args.get("variants") {
        Some(list) => Some(list.split(',').map(|v| v.trim().parse::<Variant>()).collect::<Result<Vec<_>>>()?),
        None => None,
    };
    let data = load_data(args)?;
    let c = configs(args, default_budget())?;
    let (mut model, train) = (c.model.clone(), c.train.clone());
    fit(&mut model, &data.layout, &c, args)?;
    let dataset = data.meta().name.clone();
    let cfg = ExperimentConfig {
        suite,
        seeds,
        only_seed,
        variants,
        model,
        train,
        out: args.get("out").map_or_else(|| Path::new("docs/results").join(&dataset), PathBuf::from),
        runs_dir: args.get("runs").map_or_else(|| Path::new("runs/experiments").join(&dataset), PathBuf::from),
        progress: true,
    };
    refuse_overlap(&cfg.out, &data.dir, "dataset (--data)")?;
    refuse_overlap(&cfg.runs_dir, &data.dir, "dataset (--data)")?;
    // A bad --variants or another suite's state file is refused before anything is printed.
    SuiteState::open(&state_path(&cfg.out, suite), &build_suite(&data, &cfg)?)?;
    let mut dev = device(args)?;
    let seed_text = only_seed.map_or_else(|| format!("{seeds} seed(s)"), |k| format!("seed {k}"));
    eprintln!(
        "experiment {} on {dataset} ({seed_text}, {} steps per run) on {}; results in {}",
        suite_name(suite),
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
    let out = args.path("out")?;
    refuse_overlap(&out, &args.path("checkpoint")?, "checkpoint (--checkpoint)")?;
    refuse_overlap(&out, &data.dir, "dataset (--data)")?;
    claim_output(&out, "embeddings file", args.has("force"), |p| EmbeddingSet::load(p).is_ok())?;
    let (ie, te, dim) = embed_split(dev.as_mut(), &net, &params, &data.layout, split, kind)?;
    let c = data.meta().num_labels;
    let set = EmbeddingSet::new(ie, split.image_labels(), te, split.text_labels(), dim, c, Some(split.text_items()))?;
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
    synth_cfg.train = args.num("train")?.unwrap_or(2000);
    synth_cfg.val = args.num("val")?.unwrap_or(300);
    synth_cfg.test = args.num("test")?.unwrap_or(1000);
    eprintln!(
        "synthesizing {} / {} / {} images (balanced preset, seed {seed}) ...",
        synth_cfg.train, synth_cfg.val, synth_cfg.test
    );
    generate(&synth_cfg)?.save(out.join("data"))?;
    let data = Arc::new(DatasetReader::open(out.join("data"))?);
    let mut model = ModelConfig::small();
    fit_to_data(&mut model, &data.layout, &BTreeSet::new(), Path::new("the small preset"))?;
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
    // The demo's own directory: its previous checkpoints are replaced.
    let opts = RunOptions { out_dir: out.clone(), resume: None, replace: true, progress: true };
    let summary = train(dev.as_mut(), &data, &model, &cfg, &opts)?;
    let best = summary.best_checkpoint.clone().ok_or_else(|| Error::data("the demo run wrote no checkpoint"))?;
    let (net, params) = load_model(dev.as_mut(), &best)?;
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
    println!("(untrained/trained: average of I2T and T2I; best checkpoint: {})", best.display());
    Ok(())
}
