//! Command-line flags: `--flag value` pairs and bare `--switch`es, checked against what a
//! command takes (hand-written: a dozen lines instead of a parser dependency).

use std::collections::HashMap;
use std::path::PathBuf;

use semshare::{Error, Result};

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
