//! What a suite runs, and the state file that lets a killed suite resume where it stopped.
//!
//! A suite is an ordered list of runs (variant, seed, η). The runner asks [`SuiteState::remaining`]
//! for what is left, trains one run, and calls [`SuiteState::record`], which rewrites the state
//! file atomically; a suite killed at any point loses at most the run in progress, and the next
//! start does exactly the runs not yet recorded, in the suite's order.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::report::Scores;
use crate::model::ModelConfig;
pub use crate::model::Trunk;
use crate::{Error, Result};

/// The methods of the paper's Table 1 (DESIGN.md §1 "Experiments"). Each differs from `ours`
/// only in what its doc comment names; [`Variant::spec`] states that as data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Variant {
    /// The method: one shared transformer over both modalities' segments, shared classifier,
    /// `L = L1 + λ·L2` (Eq. 6).
    #[serde(rename = "ours")]
    Ours,
    /// `ours` plus `η · L_tri`, the bidirectional triplet consistency loss on the pooled
    /// embeddings (`consistency::triplet_consistency`, margin 0.2).
    #[serde(rename = "ours+con")]
    OursCon,
    /// Eq. 1: no shared model (two modality-specific models as in `st`), each with its label and
    /// context loss, plus `η · IMC`, inter- and intra-modal consistency
    /// (`consistency::imc_consistency`). At η = 0 it is `st`.
    #[serde(rename = "imc")]
    Imc,
    /// Separate training: two unshared models (each its own transformer and classifier), same
    /// losses as `ours`; nothing ties the modalities but the label space.
    #[serde(rename = "st")]
    St,
    /// Global features: one segment per item (mean of the region features with the whole-image
    /// box; mean of the text segments) and the FC shared model of `wo-t`. No context loss: a
    /// masked global segment has no other segment to be predicted from, so L2 is undefined.
    #[serde(rename = "wo-r")]
    WoR,
    /// The shared transformer replaced by an FC shared model of the same depth and widths
    /// (each block `x = LN(x + FFN(x))`, no attention), applied per segment, then the same pooling.
    #[serde(rename = "wo-t")]
    WoT,
    /// No context loss: λ = 0, so `L = L1`.
    #[serde(rename = "wo-c")]
    WoC,
    /// No label loss: `L = L2` alone; the classifier is untrained and retrieval uses the
    /// pooled embedding.
    #[serde(rename = "wo-l")]
    WoL,
    /// DSCMR-style baseline (Zhen et al., CVPR 2019): the shared model with its objective
    /// replaced by `J1 + α·J2 + β·J3` (`consistency::dscmr_loss`); no BCE label loss, no
    /// context loss.
    #[serde(rename = "dscmr")]
    Dscmr,
    /// Regularised CCA in closed form on pooled input features (mean region feature, mean text
    /// segment feature); no training (`eval::cca`).
    #[serde(rename = "cca")]
    Cca,
}

/// The segments an item is made of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Segments {
    /// Regions for images, tokens (or text segments) for texts.
    Local,
    /// One segment per item: the mean of its local segment features.
    Global,
}

/// The cross-modal term added to the objective.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Consistency {
    None,
    /// `η · consistency::triplet_consistency`.
    Triplet,
    /// `η · consistency::imc_consistency`.
    Imc,
    /// `consistency::dscmr_loss` replaces the label loss.
    Dscmr,
}

/// What defines a variant, as the model and trainer must read it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct VariantSpec {
    /// False only for the closed-form CCA.
    pub trained: bool,
    /// One set of trunk and classifier weights for both modalities.
    pub shared_model: bool,
    pub trunk: Trunk,
    pub segments: Segments,
    /// The BCE label loss L1 (Eq. 4).
    pub label_loss: bool,
    /// The context loss L2 (Eq. 5) with weight λ; false means λ = 0.
    pub context_loss: bool,
    pub consistency: Consistency,
}

impl Variant {
    /// Every variant, in the row order of Table 1.
    pub const ALL: [Variant; 10] = [
        Variant::Ours,
        Variant::OursCon,
        Variant::Imc,
        Variant::St,
        Variant::WoR,
        Variant::WoT,
        Variant::WoC,
        Variant::WoL,
        Variant::Dscmr,
        Variant::Cca,
    ];

    /// The variants of Figure 1's η sweep.
    pub const ETA_SWEEP: [Variant; 2] = [Variant::Imc, Variant::OursCon];

    pub fn name(self) -> &'static str {
        match self {
            Variant::Ours => "ours",
            Variant::OursCon => "ours+con",
            Variant::Imc => "imc",
            Variant::St => "st",
            Variant::WoR => "wo-r",
            Variant::WoT => "wo-t",
            Variant::WoC => "wo-c",
            Variant::WoL => "wo-l",
            Variant::Dscmr => "dscmr",
            Variant::Cca => "cca",
        }
    }

    /// Whether the variant has a consistency weight η.
    pub fn uses_eta(self) -> bool {
        matches!(self.spec().consistency, Consistency::Triplet | Consistency::Imc)
    }

    pub fn spec(self) -> VariantSpec {
        let ours = VariantSpec {
            trained: true,
            shared_model: true,
            trunk: Trunk::Transformer,
            segments: Segments::Local,
            label_loss: true,
            context_loss: true,
            consistency: Consistency::None,
        };
        match self {
            Variant::Ours => ours,
            Variant::OursCon => VariantSpec { consistency: Consistency::Triplet, ..ours },
            Variant::Imc => VariantSpec { shared_model: false, consistency: Consistency::Imc, ..ours },
            Variant::St => VariantSpec { shared_model: false, ..ours },
            Variant::WoR => VariantSpec { trunk: Trunk::Fc, segments: Segments::Global, context_loss: false, ..ours },
            Variant::WoT => VariantSpec { trunk: Trunk::Fc, ..ours },
            Variant::WoC => VariantSpec { context_loss: false, ..ours },
            Variant::WoL => VariantSpec { label_loss: false, ..ours },
            Variant::Dscmr => {
                VariantSpec { label_loss: false, context_loss: false, consistency: Consistency::Dscmr, ..ours }
            }
            Variant::Cca => VariantSpec { trained: false, context_loss: false, label_loss: false, ..ours },
        }
    }
}

impl Variant {
    /// `base` with the structure this variant defines (trunk, separate models, segments).
    pub fn configure(self, base: &ModelConfig) -> ModelConfig {
        let spec = self.spec();
        ModelConfig {
            trunk: spec.trunk,
            separate_models: !spec.shared_model,
            global_segments: spec.segments == Segments::Global,
            ..base.clone()
        }
    }

    /// Whether `model` has the structure this variant defines.
    pub fn check_model(self, model: &ModelConfig) -> Result<()> {
        let want = self.configure(model);
        if &want != model {
            return Err(Error::config(format!(
                "variant `{self}` needs model.trunk = {:?}, model.separate_models = {}, model.global_segments = {}",
                want.trunk, want.separate_models, want.global_segments
            )));
        }
        Ok(())
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Variant {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Variant::ALL.into_iter().find(|v| v.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Variant::ALL.iter().map(|v| v.name()).collect();
            Error::config(format!("unknown variant `{s}` (expected one of {})", names.join(", ")))
        })
    }
}

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

impl Suite {
    /// Table 1 over seeds 0..seeds.
    pub fn table1(seeds: u64, fingerprint: impl Into<String>) -> Result<Suite> {
        let s = Suite {
            kind: SuiteKind::Table1,
            variants: Variant::ALL.to_vec(),
            seeds: (0..seeds).collect(),
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
            seeds: (0..seeds).collect(),
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
    /// Wall-clock seconds of the run (training + evaluation).
    pub seconds: f64,
    /// The step whose checkpoint (best validation NDCG) was evaluated; 0 for CCA.
    pub best_step: u64,
}

/// The suite and its finished runs; on disk as one JSON file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SuiteState {
    pub suite: Suite,
    pub finished: Vec<RunRecord>,
}

impl SuiteState {
    /// The state at `path` if it exists (it must be for the same suite), else a fresh one
    /// (written at the first [`record`](Self::record)).
    pub fn open(path: &Path, suite: &Suite) -> Result<SuiteState> {
        suite.validate()?;
        if !path.exists() {
            return Ok(SuiteState { suite: suite.clone(), finished: Vec::new() });
        }
        let bytes = crate::io::read(path)?;
        let mut state: SuiteState =
            serde_json::from_slice(&bytes).map_err(|e| Error::format(path, format!("not a suite state file: {e}")))?;
        // More seeds or variants extend a suite: its finished runs stay valid.
        let old = &state.suite;
        if (old.kind, &old.etas, &old.fingerprint) != (suite.kind, &suite.etas, &suite.fingerprint) {
            return Err(Error::config(format!(
                "{}: holds a different suite (kind, η or fingerprint); \
                 use another output directory or remove the file to start over",
                path.display()
            )));
        }
        state.suite = suite.clone();
        let runs = suite.runs();
        for (i, r) in state.finished.iter().enumerate() {
            if state.finished[..i].iter().any(|q| q.key == r.key) {
                return Err(Error::format(path, format!("run `{}` is recorded twice", r.key)));
            }
            if !runs.contains(&r.key) {
                return Err(Error::config(format!(
                    "{}: run `{}` is not in the requested suite; \
                     ask for its seeds and variants too, or use another output directory",
                    path.display(),
                    r.key
                )));
            }
        }
        Ok(state)
    }

    /// The runs not yet recorded, in the suite's order.
    pub fn remaining(&self) -> Vec<RunKey> {
        self.suite.runs().into_iter().filter(|k| !self.finished.iter().any(|r| r.key == *k)).collect()
    }

    /// (finished, total) runs.
    pub fn progress(&self) -> (usize, usize) {
        (self.finished.len(), self.suite.runs().len())
    }

    /// Adds a finished run and rewrites the state file atomically.
    pub fn record(&mut self, path: &Path, record: RunRecord) -> Result<()> {
        if !self.suite.runs().contains(&record.key) {
            return Err(Error::config(format!("run `{}` is not part of this suite", record.key)));
        }
        if self.finished.iter().any(|r| r.key == record.key) {
            return Err(Error::config(format!("run `{}` is already recorded", record.key)));
        }
        self.finished.push(record);
        self.save(path).inspect_err(|_| {
            self.finished.pop(); // memory stays what the disk says
        })
    }

    /// Sets the `label` scores of finished run `key` and rewrites the state file atomically.
    pub fn record_label(&mut self, path: &Path, key: &RunKey, label: Scores) -> Result<()> {
        let Some(i) = self.finished.iter().position(|r| r.key == *key) else {
            return Err(Error::config(format!("run `{key}` is not recorded")));
        };
        let old = self.finished[i].label.replace(label);
        self.save(path).inspect_err(|_| {
            self.finished[i].label = old; // memory stays what the disk says
        })
    }

    fn save(&self, path: &Path) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| Error::data(format!("suite state: {e}")))?;
        crate::io::atomic_write(path, &bytes)
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
        assert_eq!(differs(Variant::Cca), ["trained", "label_loss", "context_loss"]);
    }
}
