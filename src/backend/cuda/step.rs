//! The training step's device-side ops (`kernels/optim.cu`): losses and the gradient's Σx²
//! finished on the device, the step guard, the one-launch AdamW. Nothing here reads back.

use super::{Arg, Cuda, blocks, dev_ids, view_mut_ptr};
use crate::backend::step::record;
use crate::backend::{AdamWConstants, DecayMask, GuardParams, check_adamw_masked, check_step_guard, expect_len};
use crate::tensor::{Tensor, View, ViewMut};
use crate::{Error, Result};

const THREADS: u32 = 256;

impl Cuda {
    /// `out[0] = Σ partial / divisor` in f64 on the device (one warp).
    pub(crate) fn finish_sum(&mut self, partial: &Tensor, divisor: usize, out: &ViewMut) -> Result<()> {
        let args = [
            Arg::tensor(partial)?,
            Arg::int("sum_finish", partial.len())?,
            Arg::U64(divisor.max(1) as u64),
            Arg::Ptr(0),
            Arg::view_mut(out)?,
        ];
        self.launch("sum_finish_f32", (1, 1, 1), (32, 1, 1), 0, &args)
    }

    /// `out[0]` = the mean of `row_loss[..n]` over the count in `row_loss[n]` (n = len − 1),
    /// both left by the cross-entropy kernel: the divisor never comes from the host.
    pub(crate) fn finish_mean_counted(&mut self, row_loss: &Tensor, out: &ViewMut) -> Result<()> {
        let n = row_loss.len().saturating_sub(1);
        let args = [
            Arg::tensor(row_loss)?,
            Arg::int("sum_finish", n)?,
            Arg::U64(1),
            Arg::Ptr(super::tensor_ptr(row_loss)? + 4 * n as u64),
            Arg::view_mut(out)?,
        ];
        self.launch("sum_finish_f32", (1, 1, 1), (32, 1, 1), 0, &args)
    }
}

pub(super) fn sum_squares_into(cuda: &mut Cuda, x: View, out: ViewMut) -> Result<()> {
    expect_len("sum_squares_into", "out", out.len(), 1)?;
    let partial = cuda.sum_squares_partials(x)?;
    cuda.finish_sum(&partial, 1, &out)
}

pub(super) fn step_guard(cuda: &mut Cuda, rec: ViewMut, state: ViewMut, ring: ViewMut, p: GuardParams) -> Result<()> {
    check_step_guard(rec.len(), state.len(), ring.len())?;
    let args = [
        Arg::view_mut(&rec)?,
        Arg::view_mut(&state)?,
        Arg::view_mut(&ring)?,
        Arg::int("step_guard", ring.len() / record::LEN)?,
        Arg::F32(p.label_weight),
        Arg::F32(p.context_weight),
        Arg::F32(p.clip_norm),
    ];
    cuda.launch("step_guard_f32", (1, 1, 1), (1, 1, 1), 0, &args)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn adamw_masked(
    cuda: &mut Cuda,
    params: ViewMut,
    grads: View,
    m: ViewMut,
    v: ViewMut,
    mask: &DecayMask,
    hp: AdamWConstants,
    rec: View,
) -> Result<()> {
    hp.check()?;
    let n = params.len();
    check_adamw_masked(n, grads.len(), m.len(), v.len(), mask, rec.len())?;
    if n == 0 {
        return Ok(());
    }
    let table = dev_ids(&mask.device)?;
    if table.len() != 2 * mask.runs.len() + 1 {
        return Err(Error::shape("adamw_masked", "decay mask table does not match its runs"));
    }
    let args = [
        Arg::Ptr(view_mut_ptr(&params)?),
        Arg::view(grads)?,
        Arg::view_mut(&m)?,
        Arg::view_mut(&v)?,
        Arg::U64(n as u64),
        Arg::Ptr(table.ptr()),
        Arg::int("adamw_masked", mask.runs.len())?,
        Arg::F32(hp.beta1),
        Arg::F32(hp.beta2),
        Arg::F32(hp.eps),
        Arg::view(rec)?,
    ];
    // About one wave of 256-thread blocks (an H100/H200 holds 132 × 8): more blocks only
    // repeat each thread's start (the scalars, its first element's run) without more bandwidth.
    cuda.launch("adamw_masked_fwd_f32", (blocks(n, THREADS as usize).min(1024), 1, 1), (THREADS, 1, 1), 0, &args)
}
