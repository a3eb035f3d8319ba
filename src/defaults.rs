//! Data-aware defaults: before `semshare train` starts, the configuration is resolved from the
//! dataset (its size, its label structure, what each modality has to predict) instead of fixed
//! numbers that suit one dataset and not another. Every choice comes with a one-line reason;
//! a value given explicitly (a config file key or a flag) is kept as it is. The result is
//! written to the run directory as `resolved-config.json`, which `train --config` loads back.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use crate::Result;
use crate::config::Configs;
use crate::data::reader::DatasetReader;
use crate::model::ModelConfig;
use crate::train::TrainConfig;

/// Most epochs of a run: the cap scales inversely with the training split (a small set needs
/// many passes, a large one few), within these bounds.
pub const EPOCH_BUDGET_ITEMS: usize = 100_000;
pub const MIN_EPOCHS: usize = 20;
pub const MAX_EPOCHS: usize = 300;

/// One resolved value: `section.key = value`, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Choice {
    pub key: String,
    pub value: Value,
    pub reason: String,
}

/// A configuration resolved for a dataset.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub model: ModelConfig,
    pub train: TrainConfig,
    /// In the order they were decided.
    pub choices: Vec<Choice>,
}

/// The model keys the dataset decides (`config::fit_to_data`): left out of the written file,
/// so that it loads on any split of the same data.
const DATA_KEYS: [&str; 7] =
    ["vocab", "labels", "region_dim", "max_regions", "max_tokens", "text_feature_dim", "object_classes"];

impl Resolved {
    /// `{"model": …, "train": …, "reasons": {"train.steps": "…", …}}`: a config file for
    /// `train --config` (every value in it is then explicit; `reasons` is ignored on reading).
    pub fn to_json(&self) -> String {
        let mut model = as_json(&self.model);
        if let Some(m) = model.as_object_mut() {
            DATA_KEYS.iter().for_each(|k| drop(m.remove(*k)));
        }
        let reasons: serde_json::Map<String, Value> =
            self.choices.iter().map(|c| (c.key.clone(), Value::String(c.reason.clone()))).collect();
        let doc = json!({ "model": model, "train": as_json(&self.train), "reasons": reasons });
        serde_json::to_string_pretty(&doc).expect("json serialises") + "\n"
    }

    /// One line per choice: `train.steps = 3094  (reason)`.
    pub fn lines(&self) -> Vec<String> {
        self.choices.iter().map(|c| format!("{} = {}  ({})", c.key, c.value, c.reason)).collect()
    }
}

/// `v` as JSON with f32 fields written as f32 (`0.01`, not `0.009999999776482582`).
fn as_json<T: serde::Serialize>(v: &T) -> Value {
    serde_json::from_str(&serde_json::to_string(v).expect("value serialises")).expect("valid JSON")
}

struct Resolver<'a> {
    model_keys: &'a BTreeSet<String>,
    train_keys: &'a BTreeSet<String>,
    choices: Vec<Choice>,
}

impl Resolver<'_> {
    /// Sets `field` to `value` unless `section.key` was given; records the choice either way.
    fn set<T: Clone + serde::Serialize>(&mut self, section: &str, key: &str, field: &mut T, value: T, why: String) {
        let given = if section == "model" { self.model_keys } else { self.train_keys };
        let reason = if given.contains(key) {
            "given explicitly".to_string()
        } else {
            *field = value;
            why
        };
        let value = as_json(&*field);
        self.choices.push(Choice { key: format!("{section}.{key}"), value, reason });
    }
}

/// `c` (a preset with the config file and flags applied, its model fitted to the data) with
/// the data-aware defaults filled in where nothing was given.
pub fn resolve(c: &Configs, model: &ModelConfig, data: &DatasetReader) -> Result<Resolved> {
    let (mut model, mut train) = (model.clone(), c.train.clone());
    let mut r = Resolver { model_keys: &c.model_keys, train_keys: &c.train_keys, choices: Vec::new() };
    let meta = data.meta();
    let train_split = data.split("train")?;
    let (n_train, n_val) = (train_split.num_images(), data.split("val")?.num_images());

    // Input sizes: fitted from the data already (config::fit_to_data); said here once.
    let text = match data.layout.text_feature_dim {
        0 => format!("token ids, T = {}, V = {}", meta.max_tokens, meta.vocab_size()),
        dt => format!("segment features Dt = {dt}, at most {} per text", meta.max_tokens),
    };
    r.choices.push(Choice {
        key: "model.inputs".into(),
        value: json!({ "region_dim": model.region_dim, "max_regions": model.max_regions,
                       "text_feature_dim": model.text_feature_dim, "labels": model.labels }),
        reason: format!(
            "from the dataset: images of at most {} regions of width {}, texts as {text}, {} labels",
            meta.regions, meta.feature_dim, meta.num_labels
        ),
    });

    r.set(
        "train",
        "normalize",
        &mut train.normalize,
        "standardize".into(),
        format!(
            "each input feature to zero mean and unit variance with the statistics of the {n_train} training items (stored in the checkpoint): raw features come at any scale"
        ),
    );

    // L2 needs a segment to predict and others to predict it from.
    let image_context = train_split.has_classes() && meta.regions > 1;
    let text_context = data.layout.text_feature_dim == 0 && meta.max_tokens > 1;
    let (lambda, why) = if image_context || text_context {
        let what = match (image_context, text_context) {
            (true, true) => "region classes and tokens",
            (true, false) => "region classes (texts have no tokens to predict)",
            _ => "tokens (images have no region classes to predict)",
        };
        (model.lambda, format!("the context loss predicts masked {what}"))
    } else {
        let image = if meta.regions == 1 { "one region per image" } else { "no region classes" };
        let text = if data.layout.text_feature_dim > 0 { "texts are segment features" } else { "one token per text" };
        (0.0, format!("no context loss: nothing to predict ({image}; {text})"))
    };
    r.set("model", "lambda", &mut model.lambda, lambda, why);

    let labels = train_split.image_labels();
    let c_labels = meta.num_labels.max(1);
    let single = labels.chunks(c_labels).all(|row| row.iter().filter(|&&y| y != 0).count() == 1);
    let (metric, why) = if single {
        ("map".to_string(), "every item has exactly one label: mAP@all ranks the whole validation split; NDCG's graded relevance has no grades to use".to_string())
    } else {
        ("ndcg".to_string(), "multi-label items: NDCG, the paper's metric, counts shared labels".to_string())
    };
    r.set("train", "val_metric", &mut train.val_metric, metric, why);
    if train.val_metric == "ndcg" {
        let k = train.eval_k.min(n_val.max(1));
        let why = format!("NDCG cut-off: at most the validation split's {n_val} items");
        r.set("train", "eval_k", &mut train.eval_k, k, why);
    }
    r.set(
        "train",
        "embedding",
        &mut train.embedding,
        "best".into(),
        "validation scores both the pooled and the label embedding; the checkpoint records the better one, which eval and embed then use".into(),
    );

    // An epoch-based budget: validate every epoch, stop after `patience` epochs without a
    // better score, at most `epochs` epochs.
    let per_epoch = (n_train / train.batch_size.max(1)).max(1) as u64;
    let epochs = (EPOCH_BUDGET_ITEMS / n_train.max(1)).clamp(MIN_EPOCHS, MAX_EPOCHS) as u64;
    let patience = (epochs / 10).clamp(5, 20);
    r.set(
        "train",
        "eval_every",
        &mut train.eval_every,
        per_epoch,
        format!("validate once an epoch ({n_train} training items / batch {})", train.batch_size),
    );
    r.set(
        "train",
        "patience",
        &mut train.patience,
        patience,
        format!("stop after {patience} epochs without a better validation score"),
    );
    r.set(
        "train",
        "steps",
        &mut train.steps,
        epochs * per_epoch,
        format!(
            "a cap, not a target: at most {epochs} epochs ({EPOCH_BUDGET_ITEMS} / {n_train} items, within {MIN_EPOCHS}..{MAX_EPOCHS}); early stopping usually ends the run first"
        ),
    );
    if !r.train_keys.contains("warmup") && train.warmup >= train.steps {
        let w = (train.steps / 10).max(1);
        r.set("train", "warmup", &mut train.warmup, w, "a tenth of the step cap".into());
    }
    train.validate()?;
    Ok(Resolved { model, train, choices: r.choices })
}
