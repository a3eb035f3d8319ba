//! What a training step keeps on the device so that the host never waits for it: the step's
//! record (loss terms, gradient norm, clip factor, status), the guard that fills it, and the
//! per-parameter weight-decay mask of the one-launch AdamW. The guard's arithmetic is written
//! once here for the CPU backend; `kernels/optim.cu::step_guard` is its twin, line for line.

use crate::Result;
use crate::tensor::Ids;

/// Slots of one step's record, `LEN` f32 (a row of the trainer's history on the device).
pub mod record {
    /// Unweighted image L1, then image L2 (`SemShare::forward_loss` writes both).
    pub const IMAGE_LABEL: usize = 0;
    pub const IMAGE_CONTEXT: usize = 1;
    /// Unweighted text L1, then text L2.
    pub const TEXT_LABEL: usize = 2;
    pub const TEXT_CONTEXT: usize = 3;
    /// The variant's weighted cross-modal term (0 for `ours`).
    pub const CONSISTENCY: usize = 4;
    /// Σ g² over the whole gradient.
    pub const SUM_SQUARES: usize = 5;
    /// Filled by the guard: L = w1·(L1ᵢ + L1ₜ) + w2·(L2ᵢ + L2ₜ) + consistency.
    pub const LOSS: usize = 6;
    pub const GRAD_NORM: usize = 7;
    /// What AdamW multiplies every gradient by (clipping); 0 when the step is skipped.
    pub const CLIP: usize = 8;
    /// 0: applied. Otherwise bit i (i < 5) says loss slot i was not finite, `NORM_BIT` the
    /// gradient norm, `HALTED_BIT` that an earlier step diverged (so this one was skipped).
    pub const STATUS: usize = 9;
    pub const LEN: usize = 10;
    pub const NORM_BIT: u32 = 1 << 5;
    pub const HALTED_BIT: u32 = 1 << 6;
    /// What each status bit names, in the order the host reports them.
    pub const NAMES: [&str; 7] = [
        "image label loss",
        "image context loss",
        "text label loss",
        "text context loss",
        "consistency loss",
        "gradient norm",
        "an earlier step's divergence",
    ];
}

/// The constants of the guard (`Backend::step_guard`).
#[derive(Clone, Copy, Debug)]
pub struct GuardParams {
    pub label_weight: f32,
    pub context_weight: f32,
    /// Global gradient-norm clip (0: off).
    pub clip_norm: f32,
}

/// The guard on one record: the total loss, the gradient norm, the clip factor and the status;
/// `halted` (1 after a divergence, until the host has reported it) makes every later step a
/// no-op. In f32 in this order, as the kernel computes it (no fused multiply-add there).
pub fn guard(rec: &mut [f32], halted: &mut f32, p: GuardParams) {
    use record::*;
    let loss = p.label_weight * (rec[IMAGE_LABEL] + rec[TEXT_LABEL])
        + p.context_weight * (rec[IMAGE_CONTEXT] + rec[TEXT_CONTEXT])
        + rec[CONSISTENCY];
    let norm = (rec[SUM_SQUARES] as f64).sqrt() as f32;
    let mut status = 0u32;
    for (bit, slot) in [IMAGE_LABEL, IMAGE_CONTEXT, TEXT_LABEL, TEXT_CONTEXT, CONSISTENCY].into_iter().enumerate() {
        if !rec[slot].is_finite() {
            status |= 1 << bit;
        }
    }
    if !norm.is_finite() {
        status |= NORM_BIT;
    }
    if *halted != 0.0 {
        status |= HALTED_BIT;
    } else if status != 0 {
        *halted = 1.0;
    }
    let clip = if status != 0 {
        0.0
    } else if p.clip_norm > 0.0 && norm > p.clip_norm {
        p.clip_norm / norm
    } else {
        1.0
    };
    rec[LOSS] = loss;
    rec[GRAD_NORM] = norm;
    rec[CLIP] = clip;
    rec[STATUS] = status as f32;
}

/// Which parameters AdamW decays, for the one-launch update: runs of the flat buffer that
/// cover it from 0, each decayed or not. On the device as `[start₀ … start_{R-1}, end,
/// decay₀ … decay_{R-1}]` (u32), searched by each thread.
#[derive(Clone, Debug)]
pub struct DecayMask {
    /// `(offset, len, decayed)`, contiguous from offset 0.
    pub runs: Vec<(usize, usize, bool)>,
    pub device: Ids,
}

impl DecayMask {
    pub fn new(dev: &mut dyn super::Backend, runs: Vec<(usize, usize, bool)>) -> Result<DecayMask> {
        let mut end = 0usize;
        for &(off, len, _) in &runs {
            if off != end {
                return Err(crate::Error::shape("decay mask", format!("run at {off} leaves a gap after {end}")));
            }
            end = off + len;
        }
        if end > u32::MAX as usize {
            return Err(crate::Error::shape("decay mask", format!("{end} parameters exceed a u32 offset")));
        }
        let mut table: Vec<u32> = runs.iter().map(|r| r.0 as u32).collect();
        table.push(end as u32);
        table.extend(runs.iter().map(|r| r.2 as u32));
        let device = dev.upload_ids(&table)?;
        Ok(DecayMask { runs, device })
    }

    /// Parameters covered.
    pub fn len(&self) -> usize {
        self.runs.last().map_or(0, |r| r.0 + r.1)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The one-pass AdamW's operands (`Backend::adamw_masked`).
pub(crate) fn check_adamw_masked(
    n: usize,
    grads: usize,
    m: usize,
    v: usize,
    mask: &DecayMask,
    record: usize,
) -> Result<()> {
    super::expect_len("adamw_masked", "grads", grads, n)?;
    super::expect_len("adamw_masked", "m", m, n)?;
    super::expect_len("adamw_masked", "v", v, n)?;
    super::expect_len("adamw_masked", "decay mask", mask.len(), n)?;
    super::expect_len("adamw_masked", "record", record, record::LEN)
}
