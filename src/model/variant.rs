//! The ablation variants of the paper's Table 1 as parts of the objective: which losses a run
//! trains with (label, context, a consistency term) and which model structure it needs. The
//! trainer reads a variant's [`VariantSpec`]; the experiment suites only list variants.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::config::{ModelConfig, Trunk};
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
    /// Ridge least squares in closed form on the same pooled features, one map per direction:
    /// image features onto text features (I2T) and back (T2I), ranked by cosine; no training
    /// (`eval::ridge`).
    #[serde(rename = "ridge")]
    Ridge,
    /// The supervised linear map: ridge regression of each modality's pooled features onto the
    /// one-hot (multi-hot) labels, ranked by cosine in label space; no training (`eval::ridge`).
    #[serde(rename = "linear")]
    Linear,
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
    pub const ALL: [Variant; 12] = [
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
        Variant::Ridge,
        Variant::Linear,
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
            Variant::Ridge => "ridge",
            Variant::Linear => "linear",
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
            Variant::Cca | Variant::Ridge | Variant::Linear => {
                VariantSpec { trained: false, context_loss: false, label_loss: false, ..ours }
            }
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
