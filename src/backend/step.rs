//! What a training step keeps on the device so that the host never waits for it: the step's
//! record (loss terms, gradient norm, clip factor, status, and the optimizer's scalars the host
//! writes with the batch), the guard that fills it and appends it to the ring of records not
//! yet read, and the per-parameter weight-decay mask of the one-launch AdamW. The guard's arithmetic is written
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
    /// AdamW's scalars for this step (`AdamWScalars`: step size, 1/√bc2, the decayed runs'
    /// factor), written by the host before the step: inputs, like the batch.
    pub const SCALARS: std::ops::Range<usize> = 10..13;
    pub const LEN: usize = 13;
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

/// The guard's state between steps, 2 f32 on the device (`Backend::step_guard`).
pub mod state {
    /// 1 after a divergence, until the host has reported it: every later step is a no-op.
    pub const HALTED: usize = 0;
    /// Rows of the record ring written since the host last read it.
    pub const ROWS: usize = 1;
    pub const LEN: usize = 2;
}

impl crate::backend::AdamWScalars {
    /// In the order of `record::SCALARS`.
    pub fn slots(&self) -> [f32; 3] {
        [self.step_size, self.inv_sqrt_bc2, self.decay]
    }
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
/// `state[HALTED]` makes every later step a no-op. In f32 in this order, as the kernel computes
/// it (no fused multiply-add there). Then the record is appended to `ring` (rows of
/// `record::LEN`) at row `state[ROWS]`, if the ring has room.
pub fn guard(rec: &mut [f32], st: &mut [f32], ring: &mut [f32], p: GuardParams) {
    use record::*;
    let halted = &mut st[state::HALTED];
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
    let row = st[state::ROWS] as usize;
    if let Some(dst) = ring.chunks_exact_mut(LEN).nth(row) {
        dst.copy_from_slice(&rec[..LEN]);
        st[state::ROWS] = (row + 1) as f32;
    }
}

/// The guard's operands (`Backend::step_guard`).
pub(crate) fn check_step_guard(record: usize, st: usize, ring: usize) -> Result<()> {
    super::expect_len("step_guard", "record", record, record::LEN)?;
    super::expect_len("step_guard", "state", st, state::LEN)?;
    if !ring.is_multiple_of(record::LEN) {
        return Err(crate::Error::shape("step_guard", format!("a ring of {ring} values is not whole records")));
    }
    Ok(())
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

/// AdamW hyper-parameters of one update over a range of the flat buffer.
#[derive(Clone, Copy, Debug)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1-based step, for bias correction.
    pub step: u64,
    /// Multiplies every gradient first (gradient-norm clipping).
    pub grad_scale: f32,
}

/// AdamW's constants over a run: what a step's update takes besides its scalars.
#[derive(Clone, Copy, Debug)]
pub struct AdamWConstants {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
}

impl AdamWConstants {
    pub(crate) fn check(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            return Err(crate::Error::config(format!(
                "AdamW betas ({}, {}) must be in [0, 1)",
                self.beta1, self.beta2
            )));
        }
        Ok(())
    }
}

/// AdamW's per-step scalars, computed on the host once for every element (f64 then f32, so
/// that every backend's update uses the same rounded values).
#[derive(Clone, Copy, Debug)]
pub struct AdamWScalars {
    /// lr / (1 − β1^step).
    pub step_size: f32,
    /// 1 / √(1 − β2^step).
    pub inv_sqrt_bc2: f32,
    /// 1 − lr · weight_decay (decay first, as PyTorch).
    pub decay: f32,
}

impl AdamW {
    pub fn scalars(&self) -> AdamWScalars {
        let bc1 = 1.0 - (self.beta1 as f64).powi(self.step as i32);
        let bc2 = 1.0 - (self.beta2 as f64).powi(self.step as i32);
        AdamWScalars {
            step_size: (self.lr as f64 / bc1) as f32,
            inv_sqrt_bc2: (1.0 / bc2.sqrt()) as f32,
            decay: 1.0 - self.lr * self.weight_decay,
        }
    }

    /// Bias correction divides by 1 − β^step: step 0 would write NaN into every parameter.
    pub(crate) fn check(&self) -> Result<()> {
        if self.step == 0 {
            return Err(crate::Error::config("AdamW step is 1-based; step 0 would divide by zero"));
        }
        self.constants().check()
    }

    pub fn constants(&self) -> AdamWConstants {
        AdamWConstants { beta1: self.beta1, beta2: self.beta2, eps: self.eps }
    }
}
