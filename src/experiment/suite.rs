//! What a suite runs, and its state file (`experiment::state`), which lets a killed suite resume
//! where it stopped.
//!
//! A suite is an ordered list of runs (variant, seed, η). The runner asks `SuiteState::remaining`
//! for what is left, trains one run, and calls `SuiteState::record`, which rewrites the state
//! file atomically; a suite stopped or killed at any point loses at most the steps of the run in
//! progress since its last checkpoint, and the next start does exactly the runs not yet
//! recorded, in the suite's order.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::scores::Scores;
use super::state::{Plan, StudyState};
use crate::model::Variant;
use crate::{Error, Result};

/// Figure 1's consistency weights.
pub const ETA_GRID: [f64; 5] = [0.0, 0.01, 0.1, 1.0, 10.0];

/// The consistency weight of `ours+con` and `imc` in Table 1: the plain sum of the two
/// objectives, as a method that "adds a consistency loss" states it untuned.
pub const TABLE1_ETA: f64 = 1.0;

/// One run: a variant trained (or fitted) with one seed, at one η for the variants that have one.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunKey {
    pub variant: Variant,
    pub seed: u64,
    /// Some exactly when `variant.uses_eta()`.
    pub eta: Option<f64>,
}

impl fmt::Display for RunKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} seed {}", self.variant, self.seed)?;
        match self.eta {
            Some(eta) => write!(f, " η={eta}"),
            None => Ok(()),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SuiteKind {
    /// Every variant at [`TABLE1_ETA`].
    #[serde(rename = "table1")]
    Table1,
    /// `imc` and `ours+con` over the η grid.
    #[serde(rename = "eta")]
    Eta,
}

impl FromStr for SuiteKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "table1" => Ok(SuiteKind::Table1),
            "eta" => Ok(SuiteKind::Eta),
            _ => Err(Error::config(format!("unknown suite `{s}` (expected table1 or eta)"))),
        }
    }
}

/// A suite: its kind, seeds and η values, and a caller-made `fingerprint` of everything else
/// that must not change between a run and its resumption (dataset, preset, budget).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Suite {
    pub kind: SuiteKind,
    pub variants: Vec<Variant>,
    pub seeds: Vec<u64>,
    /// Table 1: one value (the weight of `ours+con` and `imc`); η sweep: the grid.
    pub etas: Vec<f64>,
    pub fingerprint: String,
}

/// More seeds than a suite could train (each is a whole table of runs), refused before they
/// are listed.
const MAX_SEEDS: u64 = 1000;

fn check_seed_count(seeds: u64) -> Result<()> {
    if seeds > MAX_SEEDS {
        return Err(Error::config(format!("{seeds} seeds, more than the {MAX_SEEDS} a suite can run")));
    }
    Ok(())
}

fn seeds_up_to(seeds: u64) -> Result<Vec<u64>> {
    check_seed_count(seeds)?;
    Ok((0..seeds).collect())
}

impl Suite {
    /// Table 1 over seeds 0..seeds.
    pub fn table1(seeds: u64, fingerprint: impl Into<String>) -> Result<Suite> {
        let s = Suite {
            kind: SuiteKind::Table1,
            variants: Variant::ALL.to_vec(),
            seeds: seeds_up_to(seeds)?,
            etas: vec![TABLE1_ETA],
            fingerprint: fingerprint.into(),
        };
        s.validate()?;
        Ok(s)
    }

    /// Figure 1's sweep over seeds 0..seeds.
    pub fn eta_sweep(seeds: u64, fingerprint: impl Into<String>) -> Result<Suite> {
        let s = Suite {
            kind: SuiteKind::Eta,
            variants: Variant::ETA_SWEEP.to_vec(),
            seeds: seeds_up_to(seeds)?,
            etas: ETA_GRID.to_vec(),
            fingerprint: fingerprint.into(),
        };
        s.validate()?;
        Ok(s)
    }

    pub fn validate(&self) -> Result<()> {
        if self.variants.is_empty() || self.seeds.is_empty() || self.etas.is_empty() {
            return Err(Error::config("a suite needs at least one variant, one seed and one η"));
        }
        check_seed_count(self.seeds.len() as u64)?;
        if let Some(eta) = self.etas.iter().find(|e| !(e.is_finite() && **e >= 0.0)) {
            return Err(Error::config(format!("η = {eta} must be finite and ≥ 0")));
        }
        for (what, dup) in [
            ("variant", has_duplicate(&self.variants)),
            ("seed", has_duplicate(&self.seeds)),
            ("η", has_duplicate(&self.etas)),
        ] {
            if dup {
                return Err(Error::config(format!("the suite lists a {what} twice")));
            }
        }
        if self.kind == SuiteKind::Table1 && self.etas.len() != 1 {
            return Err(Error::config("table1 uses one η for ours+con and imc"));
        }
        if self.kind == SuiteKind::Eta
            && let Some(v) = self.variants.iter().find(|v| !v.uses_eta())
        {
            return Err(Error::config(format!("the η sweep cannot run `{v}`, which has no η")));
        }
        Ok(())
    }

    /// Every run, in the order they are done: seed-major (a whole table for seed 0 first, so a
    /// partial suite already compares every variant), then variant, then η.
    pub fn runs(&self) -> Vec<RunKey> {
        let mut out = Vec::new();
        for &seed in &self.seeds {
            for &variant in &self.variants {
                if variant.uses_eta() {
                    out.extend(self.etas.iter().map(|&eta| RunKey { variant, seed, eta: Some(eta) }));
                } else {
                    out.push(RunKey { variant, seed, eta: None });
                }
            }
        }
        out
    }
}

fn has_duplicate<T: PartialEq>(xs: &[T]) -> bool {
    xs.iter().enumerate().any(|(i, x)| xs[..i].contains(x))
}

/// A finished run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub key: RunKey,
    /// Test scores ranked with the `pooled` embedding z (every variant; the space the
    /// consistency losses act on). Validation ranks with `TrainConfig::embedding` (pooled
    /// unless the suite's configuration says label).
    pub scores: Scores,
    /// The same checkpoint's test scores ranked with the `label` embedding (DESIGN.md §1, the
    /// authors' retrieval embedding); None for CCA, which has no classifier, and for runs
    /// recorded before suites kept it until [`crate::experiment::run::run_suite`] fills it in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<Scores>,
    /// The full `eval::Report` of the test split (PR curves, every cut-off), kept as JSON.
    pub report: serde_json::Value,
    /// Wall-clock seconds of the run (training + evaluation) in the start of the suite that
    /// finished it: a run continued from its checkpoint counts the time after it only.
    pub seconds: f64,
    /// The step whose checkpoint (best validation NDCG) was evaluated; 0 for CCA.
    pub best_step: u64,
}

/// The suite and its finished runs; on disk as one JSON file (`experiment::state`).
pub type SuiteState = StudyState<Suite>;

impl Plan for Suite {
    type Key = RunKey;
    type Record = RunRecord;

    fn key(record: &RunRecord) -> &RunKey {
        &record.key
    }
    fn validate(&self) -> Result<()> {
        Suite::validate(self)
    }
    // More seeds or variants extend a suite: its finished runs stay valid.
    fn conflict(&self, old: &Suite) -> Option<String> {
        let same = (old.kind, &old.etas, &old.fingerprint) == (self.kind, &self.etas, &self.fingerprint);
        (!same).then(|| "suite (kind, η or fingerprint)".to_string())
    }
    fn runs(&self, _finished: &[RunRecord]) -> Vec<RunKey> {
        Suite::runs(self)
    }
    fn widen_hint(&self) -> &'static str {
        "ask for its seeds and variants too"
    }
}

impl StudyState<Suite> {
    /// Sets the `label` scores of finished run `key` and rewrites the state file atomically.
    pub fn record_label(&mut self, path: &Path, key: &RunKey, label: Scores) -> Result<()> {
        self.update(path, key, |r| r.label = Some(label))
    }

    /// The finished records of one variant at one η, in seed order of the suite.
    pub fn records_of(&self, variant: Variant, eta: Option<f64>) -> Vec<&RunRecord> {
        let mut out: Vec<&RunRecord> =
            self.finished.iter().filter(|r| r.key.variant == variant && r.key.eta == eta).collect();
        let seed_pos = |s: u64| self.suite.seeds.iter().position(|&x| x == s);
        out.sort_by_key(|r| seed_pos(r.key.seed));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_from_str_and_serde() {
        for v in Variant::ALL {
            assert_eq!(v.name().parse::<Variant>().unwrap(), v);
            assert_eq!(serde_json::to_string(&v).unwrap(), format!("\"{}\"", v.name()));
        }
        assert!("ours-con".parse::<Variant>().is_err());
    }

    #[test]
    fn each_variant_differs_from_ours_only_where_its_definition_says() {
        let ours = Variant::Ours.spec();
        let differs = |v: Variant| {
            let s = v.spec();
            let mut d = Vec::new();
            if s.trained != ours.trained {
                d.push("trained");
            }
            if s.shared_model != ours.shared_model {
                d.push("shared_model");
            }
            if s.trunk != ours.trunk {
                d.push("trunk");
            }
            if s.segments != ours.segments {
                d.push("segments");
            }
            if s.label_loss != ours.label_loss {
                d.push("label_loss");
            }
            if s.context_loss != ours.context_loss {
                d.push("context_loss");
            }
            if s.consistency != ours.consistency {
                d.push("consistency");
            }
            d
        };
        assert_eq!(differs(Variant::Ours), Vec::<&str>::new());
        assert_eq!(differs(Variant::OursCon), ["consistency"]);
        assert_eq!(differs(Variant::Imc), ["shared_model", "consistency"]);
        assert_eq!(differs(Variant::St), ["shared_model"]);
        assert_eq!(differs(Variant::WoR), ["trunk", "segments", "context_loss"]);
        assert_eq!(differs(Variant::WoT), ["trunk"]);
        assert_eq!(differs(Variant::WoC), ["context_loss"]);
        assert_eq!(differs(Variant::WoL), ["label_loss"]);
        assert_eq!(differs(Variant::Dscmr), ["label_loss", "context_loss", "consistency"]);
        for closed_form in [Variant::Cca, Variant::Ridge, Variant::Linear] {
            assert_eq!(differs(closed_form), ["trained", "label_loss", "context_loss"]);
        }
    }
}
