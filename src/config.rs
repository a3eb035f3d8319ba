//! Configuration files (`--config`): JSON with optional `model` and `train` sections whose
//! fields override a preset (and an optional `reasons` section, which `train` writes into
//! `resolved-config.json` and reading ignores); and the model values the dataset decides. Library functions, so
//! that a fuzz target reaches the parser the command line uses.

use std::collections::BTreeSet;
use std::path::Path;

use crate::data::format::Layout;
use crate::io::{SMALL_FILE_LIMIT, read_text};
use crate::model::ModelConfig;
use crate::train::TrainConfig;
use crate::{Error, Result};

/// A preset with a config file's fields applied.
#[derive(Clone, Debug)]
pub struct Configs {
    pub model: ModelConfig,
    pub train: TrainConfig,
    /// The `model` keys the file sets: the dataset must agree with those it decides
    /// ([`fit_to_data`]).
    pub model_keys: BTreeSet<String>,
    /// The `train` keys the file (or a flag) sets: the data-aware defaults leave them as given.
    pub train_keys: BTreeSet<String>,
}

impl Configs {
    /// A preset, nothing given explicitly.
    pub fn new(model: ModelConfig, train: TrainConfig) -> Configs {
        Configs { model, train, model_keys: BTreeSet::new(), train_keys: BTreeSet::new() }
    }
}

/// `model` and `train` with the fields of config file `path` (at most 16 MiB, a regular file).
pub fn read_config_file(model: ModelConfig, train: TrainConfig, path: &Path) -> Result<Configs> {
    apply_config_json(model, train, &read_text(path, SMALL_FILE_LIMIT)?, path)
}

/// `model` and `train` with the fields of the JSON `text` (from `path`, for the messages). An
/// error names the section and key.
pub fn apply_config_json(model: ModelConfig, train: TrainConfig, text: &str, path: &Path) -> Result<Configs> {
    let mut model = serde_json::to_value(model).map_err(|e| Error::config(e.to_string()))?;
    let mut train = serde_json::to_value(train).map_err(|e| Error::config(e.to_string()))?;
    let (mut model_keys, mut train_keys) = (BTreeSet::new(), BTreeSet::new());
    let file: serde_json::Value = serde_json::from_str(text).map_err(|e| Error::format(path, e.to_string()))?;
    let obj = file.as_object().ok_or_else(|| Error::format(path, "expected a JSON object"))?;
    for (key, value) in obj {
        let target = match key.as_str() {
            "model" => &mut model,
            "train" => &mut train,
            "reasons" => continue,
            _ => return Err(Error::format(path, format!("unknown section `{key}` (expected model, train)"))),
        };
        let fields = value.as_object().ok_or_else(|| Error::format(path, format!("`{key}` must be an object")))?;
        for (k, v) in fields {
            target[k] = v.clone();
            // Parsed key by key, so that an error names the key (serde's does not).
            let parsed = match key.as_str() {
                "model" => serde_json::from_value::<ModelConfig>(target.clone()).map(drop),
                _ => serde_json::from_value::<TrainConfig>(target.clone()).map(drop),
            };
            parsed.map_err(|e| Error::format(path, format!("{key}.{k}: {e}")))?;
            if key == "model" {
                model_keys.insert(k.clone());
            } else {
                train_keys.insert(k.clone());
            }
        }
    }
    let bad = |e: serde_json::Error| Error::format(path, e.to_string());
    Ok(Configs {
        model: serde_json::from_value(model).map_err(bad)?,
        train: serde_json::from_value(train).map_err(bad)?,
        model_keys,
        train_keys,
    })
}

/// The model's vocabulary, labels, object classes, shapes and text representation come from
/// the data. A value the config file `source` set (`file_keys`) must agree with the dataset: it
/// is not silently replaced. More object classes than the data has are allowed (a larger head).
pub fn fit_to_data(
    model: &mut ModelConfig,
    layout: &Layout,
    file_keys: &BTreeSet<String>,
    source: &Path,
) -> Result<()> {
    let m = &layout.meta;
    let data_values = [
        ("vocab", &mut model.vocab, m.vocab_size()),
        ("labels", &mut model.labels, m.num_labels),
        ("region_dim", &mut model.region_dim, m.feature_dim),
        ("max_regions", &mut model.max_regions, m.regions),
        ("max_tokens", &mut model.max_tokens, m.max_tokens),
        ("text_feature_dim", &mut model.text_feature_dim, layout.text_feature_dim),
    ];
    for (key, field, from_data) in data_values {
        if file_keys.contains(key) && *field != from_data {
            let what = format!(
                "model.{key} = {field}, but dataset `{}` has {from_data} (the dataset sets it: remove the key)",
                m.name
            );
            return Err(Error::format(source, what));
        }
        *field = from_data;
    }
    let classes = m.num_object_classes.max(1);
    if !file_keys.contains("object_classes") {
        model.object_classes = classes;
    } else if model.object_classes < classes {
        let what = format!("model.object_classes = {}, but dataset `{}` has {classes}", model.object_classes, m.name);
        return Err(Error::format(source, what));
    }
    Ok(())
}
