//! The command line's option parser and the merge of a `--config` file into the presets: in the
//! library rather than in `src/bin/semshare.rs` so that fuzz targets (fuzz/) reach them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::model::ModelConfig;
use crate::train::TrainConfig;
use crate::{Error, Result};

/// Parsed `--flag value` pairs and bare `--switch`es, checked against what a command takes.
pub struct Args {
    flags: HashMap<String, String>,
}

impl Args {
    pub fn parse(raw: &[String], takes_value: &[&str], switches: &[&str]) -> Result<Args> {
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
    pub fn get(&self, name: &str) -> Option<&str> {
        self.flags.get(name).map(String::as_str)
    }
    pub fn has(&self, name: &str) -> bool {
        self.flags.contains_key(name)
    }
    pub fn need(&self, name: &str) -> Result<&str> {
        self.get(name).ok_or_else(|| Error::config(format!("--{name} is required")))
    }
    pub fn path(&self, name: &str) -> Result<PathBuf> {
        self.need(name).map(PathBuf::from)
    }
    pub fn num<T: std::str::FromStr>(&self, name: &str) -> Result<Option<T>> {
        self.get(name)
            .map(|v| v.parse().map_err(|_| Error::config(format!("--{name}: `{v}` is not a valid number"))))
            .transpose()
    }
}

/// Overrides the fields of `model` and `train` with the `model` and `train` sections of the
/// config file `path` whose content is `text`.
pub fn apply_config_file(
    path: &Path,
    text: &str,
    model: ModelConfig,
    train: TrainConfig,
) -> Result<(ModelConfig, TrainConfig)> {
    let mut model = serde_json::to_value(model).expect("serialises");
    let mut train = serde_json::to_value(train).expect("serialises");
    let file: serde_json::Value = serde_json::from_str(text).map_err(|e| Error::format(path, e.to_string()))?;
    let obj = file.as_object().ok_or_else(|| Error::format(path, "expected a JSON object"))?;
    for (key, value) in obj {
        let target = match key.as_str() {
            "model" => &mut model,
            "train" => &mut train,
            _ => {
                return Err(Error::format(path, format!("unknown section `{key}` (expected model, train)")));
            }
        };
        let fields = value.as_object().ok_or_else(|| Error::format(path, format!("`{key}` must be an object")))?;
        for (k, v) in fields {
            target[k] = v.clone();
        }
    }
    let bad = |e: serde_json::Error| Error::config(e.to_string());
    Ok((serde_json::from_value(model).map_err(bad)?, serde_json::from_value(train).map_err(bad)?))
}
