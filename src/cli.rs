//! The command line's option parser: in the library rather than in the binary
//! (`src/bin/semshare/main.rs`) so that fuzz targets (fuzz/) reach it. (A `--config` file is
//! merged by `crate::config`.)

use std::collections::HashMap;
use std::path::PathBuf;

use crate::{Error, Result};

/// Parsed `--flag value` (or `--flag=value`) pairs and bare `--switch`es, checked against what
/// a command takes.
pub struct Args {
    /// Every value of a flag, in the order given (a repeated flag keeps them all).
    flags: HashMap<String, Vec<String>>,
}

impl Args {
    pub fn parse(raw: &[String], takes_value: &[&str], switches: &[&str]) -> Result<Args> {
        let mut flags = HashMap::new();
        let mut it = raw.iter();
        while let Some(a) = it.next() {
            let flag = a.strip_prefix("--").ok_or_else(|| Error::config(format!("unexpected argument `{a}`")))?;
            let (name, inline) = match flag.split_once('=') {
                Some((name, value)) => (name, Some(value)),
                None => (flag, None),
            };
            if switches.contains(&name) {
                if inline.is_some() {
                    return Err(Error::config(format!("--{name} is a switch: it takes no value")));
                }
                flags.insert(name.to_string(), vec![String::new()]);
            } else if takes_value.contains(&name) {
                let v = match inline {
                    Some(v) => v,
                    None => it.next().ok_or_else(|| Error::config(format!("--{name} needs a value")))?,
                };
                // `--out=` is a missing value, not an empty path; `--text ""` an empty one.
                if v.is_empty() {
                    let what = if inline.is_some() { "needs a value" } else { "is empty: give it a value" };
                    return Err(Error::config(format!("--{name} {what}")));
                }
                flags.entry(name.to_string()).or_insert_with(Vec::new).push(v.to_string());
            } else {
                return Err(Error::config(format!("unknown option --{name}")));
            }
        }
        Ok(Args { flags })
    }
    /// The flag's value; the last one when it is given more than once.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.flags.get(name).and_then(|v| v.last()).map(String::as_str)
    }
    /// Every value of a repeatable flag (`--text a --text b`), in order; empty when absent.
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.flags.get(name).map(|v| v.iter().map(String::as_str).collect()).unwrap_or_default()
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
    /// A real-valued flag: [`Args::num`] that also refuses what f32 holds only as NaN or
    /// infinity (`--lr 1e300`), naming the flag rather than the config key it sets.
    pub fn real(&self, name: &str) -> Result<Option<f32>> {
        match self.num::<f32>(name)? {
            Some(v) if !v.is_finite() => Err(Error::config(format!(
                "--{name}: `{}` is not a finite 32-bit number",
                self.get(name).unwrap_or("")
            ))),
            v => Ok(v),
        }
    }
}

/// The options of each command that takes them: (command, options that take a value,
/// switches). The one list the binary parses a command line against, and the `cli` fuzz
/// target's (fuzz/harness.rs); the binary's usage text names each option (a test checks).
pub const COMMAND_OPTIONS: &[(&str, &[&str], &[&str])] = &[
    ("demo", &["steps", "out", "seed", "device", "precision", "train", "val", "test"], &[]),
    ("synth", &["out", "preset", "seed", "train", "val", "test", "labels", "format"], &["force"]),
    ("pack", &["from", "out", "shard-mb"], &["force"]),
    (
        "train",
        &["data", "out", "config", "model", "steps", "batch", "lr", "lambda", "seed", "resume", "device", "precision"],
        &["force"],
    ),
    ("eval", &["data", "checkpoint", "split", "embedding", "device", "precision"], &["json"]),
    ("embed", &["data", "checkpoint", "out", "split", "embedding", "device", "precision"], &["force"]),
    ("score", &["embeddings"], &["json"]),
    (
        "index",
        &[
            "checkpoint",
            "out",
            "data",
            "split",
            "side",
            "texts",
            "features",
            "vectors",
            "ids",
            "embedding",
            "device",
            "precision",
        ],
        &["append", "force"],
    ),
    (
        "query",
        &["index", "checkpoint", "text", "queries", "features", "side", "vectors", "k", "device", "precision"],
        &["json", "timing"],
    ),
    ("export", &["index", "format", "out"], &["force"]),
    (
        "experiment",
        &[
            "suite",
            "data",
            "seeds",
            "seed",
            "variants",
            "model",
            "config",
            "out",
            "runs",
            "steps",
            "device",
            "precision",
        ],
        &[],
    ),
    (
        "tune",
        &[
            "data",
            "trials",
            "reduction",
            "rungs",
            "min-steps",
            "repeats",
            "seed",
            "workers",
            "model",
            "config",
            "device",
            "precision",
            "out",
            "runs",
        ],
        &[],
    ),
    (
        "bench-step",
        &["model", "device", "precision", "batch", "tokens", "warmup", "steps", "feature-dtype"],
        &["counts", "graph", "embed"],
    ),
];

/// `command`'s options (values, switches) from [`COMMAND_OPTIONS`]; none for another command.
pub fn options(command: &str) -> (&'static [&'static str], &'static [&'static str]) {
    COMMAND_OPTIONS.iter().find(|c| c.0 == command).map_or((&[], &[]), |c| (c.1, c.2))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[&str]) -> Result<Args> {
        let raw: Vec<String> = raw.iter().map(|s| s.to_string()).collect();
        Args::parse(&raw, &["out", "steps"], &["force"])
    }

    #[test]
    fn flag_equals_value_is_the_same_as_flag_space_value() {
        let a = parse(&["--out=dir/x=y", "--steps", "5", "--force"]).unwrap();
        assert_eq!(a.get("out"), Some("dir/x=y"));
        assert_eq!(a.num::<u64>("steps").unwrap(), Some(5));
        assert!(a.has("force"));
        let b = parse(&["--steps=7"]).unwrap();
        assert_eq!(b.num::<u64>("steps").unwrap(), Some(7));
        let c = parse(&["--out", "a", "--out=b"]).unwrap();
        assert_eq!((c.all("out"), c.get("out"), c.all("steps").len()), (vec!["a", "b"], Some("b"), 0));
    }

    #[test]
    fn bad_command_lines_are_errors_naming_the_option() {
        let err = |raw: &[&str]| parse(raw).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err(&["--out="]).contains("--out needs a value"));
        assert!(err(&["--out"]).contains("--out needs a value"));
        assert!(err(&["--out", ""]).contains("--out is empty"));
        assert!(err(&["--force=yes"]).contains("--force is a switch"));
        assert!(err(&["--nope=1"]).contains("unknown option --nope"));
        assert!(err(&["--nope"]).contains("unknown option --nope"));
        assert!(err(&["out"]).contains("unexpected argument `out`"));
    }
}
