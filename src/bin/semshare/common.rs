//! What several commands share: the device, the configuration (preset, file, flags), the
//! dataset, a trained model to evaluate or embed with, and the report printout.

use std::io::IsTerminal;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use semshare::backend::{self, Backend};
use semshare::checkpoint::Checkpoint;
use semshare::cli::Args;
use semshare::config::{Configs, fit_to_data, read_config_file};
use semshare::data::format::Layout;
use semshare::data::reader::DatasetReader;
use semshare::eval::Report;
use semshare::inference::upload_model;
use semshare::model::{EmbeddingKind, ModelConfig, SemShare};
use semshare::tensor::Tensor;
use semshare::train::{Progress, ProgressFn, TrainConfig};
use semshare::{Error, Result};

/// `--device` at `--precision` (default fp32), for the commands that read no configuration.
pub fn device(args: &Args) -> Result<Box<dyn Backend>> {
    let precision = backend::Precision::parse(args.get("precision").unwrap_or("fp32"))?;
    backend::open_at(args.get("device").unwrap_or("auto"), precision)
}

/// `--device` at the configuration's `train.precision` (which `--precision` has overridden).
pub fn device_for(args: &Args, c: &Configs) -> Result<Box<dyn Backend>> {
    backend::open_at(args.get("device").unwrap_or("auto"), c.train.precision)
}

/// Model and training configuration: preset (and `base` for training), then the config file,
/// then flags.
pub fn configs(args: &Args, base: TrainConfig) -> Result<Configs> {
    let model = ModelConfig::preset(args.get("model").unwrap_or("small"))?;
    let mut c = match args.get("config") {
        Some(path) => read_config_file(model, base, Path::new(path))?,
        None => Configs::new(model, base),
    };
    // A flag is explicit, like a key of the file: the data-aware defaults keep it.
    if let Some(v) = args.num("steps")? {
        c.train.steps = v;
        c.train_keys.insert("steps".into());
    }
    if let Some(v) = args.num("batch")? {
        c.train.batch_size = v;
        c.train_keys.insert("batch_size".into());
    }
    if let Some(v) = args.real("lr")? {
        c.train.lr = v;
        c.train_keys.insert("lr".into());
    }
    if let Some(v) = args.num("seed")? {
        c.train.seed = v;
        c.train_keys.insert("seed".into());
    }
    if let Some(v) = args.real("lambda")? {
        c.model.lambda = v;
        c.model_keys.insert("lambda".into());
    }
    if let Some(v) = args.get("precision") {
        c.train.precision = backend::Precision::parse(v)?;
        c.train_keys.insert("precision".into());
    }
    Ok(c)
}

/// [`fit_to_data`] with the `--config` file named in its errors.
pub fn fit(model: &mut ModelConfig, layout: &Layout, c: &Configs, args: &Args) -> Result<()> {
    fit_to_data(model, layout, &c.model_keys, Path::new(args.get("config").unwrap_or("--config")))
}

pub fn load_data(args: &Args) -> Result<Arc<DatasetReader>> {
    Ok(Arc::new(DatasetReader::open(args.path("data")?)?))
}

pub fn split_name(args: &Args) -> &str {
    args.get("split").unwrap_or("test")
}

pub fn print_report(r: &Report, json: bool) {
    if json {
        println!("{}", r.to_json());
    } else {
        print!("{}", r.table());
    }
}

/// What `eval` and `embed` start from: the `--checkpoint` on the `--device`, checked against
/// the `--data` it is used with, and the `--embedding` to rank with (default: the checkpoint's).
pub struct Trained {
    pub dev: Box<dyn Backend>,
    pub data: Arc<DatasetReader>,
    pub net: SemShare,
    pub params: Tensor,
    pub kind: EmbeddingKind,
}

impl Trained {
    pub fn open(args: &Args) -> Result<Trained> {
        let mut dev = device(args)?;
        let data = load_data(args)?;
        let path = args.path("checkpoint")?;
        let ckpt = Checkpoint::load(&path)?;
        let (net, params) = upload_model(dev.as_mut(), &ckpt)?;
        data.layout
            .check_fits(&net.cfg)
            .and_then(|()| ckpt.spec.check_data(&data.layout))
            .map_err(|e| e.about(&path))?;
        // Without --embedding, the one the checkpoint was selected with (pooled if it has none).
        let kind = match args.get("embedding") {
            Some(name) => name.parse()?,
            None => ckpt.spec.embedding.unwrap_or(EmbeddingKind::Pooled),
        };
        Ok(Trained { dev, data, net, params, kind })
    }
}

/// The progress display of `train`, `demo` and `experiment`, on stderr: on a terminal the step
/// line is redrawn in place (`\r`) every 10 steps; piped (a log, CI) a plain line every tenth of
/// the run (of its step cap) or 30 s, whichever comes first. Validations, an early stop and the
/// suite's notes are lines of their own.
pub fn progress_printer() -> ProgressFn {
    let redraw = std::io::stderr().is_terminal();
    let cr = if redraw { "\r" } else { "" };
    let last_piped = Mutex::new(Instant::now());
    ProgressFn::new(move |p| match p {
        Progress::Step { step, total, loss, steps_per_sec } => {
            let mut last = last_piped.lock().unwrap_or_else(|e| e.into_inner());
            let due = if redraw {
                step % 10 == 0 || step == total
            } else {
                step % (total / 10).max(1) == 0 || last.elapsed() >= Duration::from_secs(30)
            };
            if !due {
                return;
            }
            let eta = (total - step) as f64 / steps_per_sec.max(1e-9);
            let line = format!("step {step:>6}/{total}  loss {loss:.4}  {steps_per_sec:.1} steps/s  ETA {eta:>4.0}s");
            if redraw {
                eprint!("\r{line}   ");
            } else {
                eprintln!("{line}");
                *last = Instant::now();
            }
        }
        Progress::Validation { step, total, loss, metric, scores, best, best_step, best_embedding } => {
            let scores: Vec<String> = scores.iter().map(|(k, s)| format!("{} {s:.2}", k.name())).collect();
            let with = best_embedding.map(|k| format!(", {}", k.name())).unwrap_or_default();
            eprintln!(
                "{cr}step {step:>6}/{total}  loss {loss:.4}  val {metric} {} (best {best:.2} at {best_step}{with})",
                scores.join(" / ")
            );
        }
        Progress::EarlyStop { stale, metric } => {
            eprintln!("early stop: {stale} validations without a better {metric}")
        }
        Progress::Note(line) => eprintln!("{line}"),
    })
}

/// Words for a model trained on text features: refused in the command line's terms (the
/// library's error names its own function).
pub fn words_for(model: &semshare::Model) -> Result<()> {
    match model.config().text_feature_dim {
        0 => Ok(()),
        width => Err(Error::config(format!(
            "{}: this model reads texts as segment features of width {width}, not words: give them with --features FILE.npy --side text",
            model.path().display()
        ))),
    }
}
