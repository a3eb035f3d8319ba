//! What several commands share: the device, the configuration (preset, file, flags), the
//! dataset, a trained model to evaluate or embed with, and the report printout.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

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
use semshare::train::TrainConfig;
use semshare::{Error, Result};

pub fn device(args: &Args) -> Result<Box<dyn Backend>> {
    backend::open(args.get("device").unwrap_or("auto"))
}

/// Model and training configuration: preset (and `base` for training), then the config file,
/// then flags.
pub fn configs(args: &Args, base: TrainConfig) -> Result<Configs> {
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
pub fn fit(model: &mut ModelConfig, layout: &Layout, c: &Configs, args: &Args) -> Result<()> {
    fit_to_data(model, layout, &c.model_keys, Path::new(args.get("config").unwrap_or("--config")))
}

pub fn load_data(args: &Args) -> Result<Arc<DatasetReader>> {
    let dir = args.path("data")?;
    if !dir.is_dir() {
        return Err(Error::config(format!("data directory {} does not exist", dir.display())));
    }
    Ok(Arc::new(DatasetReader::open(&dir)?))
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
        let ckpt = Checkpoint::load(&args.path("checkpoint")?)?;
        let (net, params) = upload_model(dev.as_mut(), &ckpt)?;
        semshare::train::check_fits(&data.layout, &net.cfg)?;
        // Without --embedding, the one the checkpoint was selected with (pooled if it has none).
        let kind = match args.get("embedding") {
            Some(name) => name.parse()?,
            None => ckpt.spec.embedding.unwrap_or(EmbeddingKind::Pooled),
        };
        Ok(Trained { dev, data, net, params, kind })
    }
}
