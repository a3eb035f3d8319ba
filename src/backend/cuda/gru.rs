//! GRU step gates on the GPU (kernels/gru.cu): one launch per timestep and direction, one thread
//! per (item, hidden unit). The recurrent GEMM around it is cuBLAS (`nn/gru.rs` drives both).
//! `ops.rs` has already checked the shapes the CPU twin checks.

use super::{Arg, Cuda, blocks, dev_ids};
use crate::backend::{GruStep, Segments};
use crate::tensor::{Tensor, View};
use crate::{Error, Result};

const THREADS: u32 = 256;

/// Grid for `items × hidden` threads, and the kernel's integer arguments in signature order
/// (items, H, s, reverse, out_cols, out_col).
fn common_args(op: &'static str, step: GruStep, seg: &Segments, out_cols: usize) -> Result<(u32, [Arg; 6])> {
    let items = seg.items();
    let ids = dev_ids(&seg.device)?;
    if ids.len() != items + 1 {
        return Err(Error::shape(op, format!("{} device offsets for {items} items", ids.len())));
    }
    let n = items.checked_mul(step.hidden).ok_or_else(|| Error::shape(op, "items × hidden overflows"))?;
    let args = [
        Arg::int(op, items)?,
        Arg::int(op, step.hidden)?,
        Arg::int(op, step.s)?,
        Arg::I32(step.reverse as i32),
        Arg::int(op, out_cols)?,
        Arg::int(op, step.out_col)?,
    ];
    // The kernel strides over the rest: a few waves are enough, and the cap keeps grid.x legal.
    Ok((blocks(n, THREADS as usize).min(4096), args))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn step_fwd(
    cuda: &mut Cuda,
    step: GruStep,
    seg: &Segments,
    xproj: &Tensor,
    hproj: &Tensor,
    bias_hh: View,
    hs: &mut Tensor,
    out: &mut Tensor,
    gates: &mut Tensor,
) -> Result<()> {
    const K: &str = "gru_step_fwd_f32";
    let (grid, ints) = common_args("gru_step_fwd", step, seg, out.cols())?;
    if seg.items() == 0 || step.hidden == 0 {
        return Ok(());
    }
    let mut args = vec![
        Arg::tensor(xproj)?,
        Arg::tensor(hproj)?,
        Arg::view(bias_hh)?,
        Arg::tensor(hs)?,
        Arg::tensor(out)?,
        Arg::tensor(gates)?,
        Arg::ids(&seg.device)?,
    ];
    args.extend(ints);
    cuda.launch(K, (grid, 1, 1), (THREADS, 1, 1), 0, &args)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn step_bwd(
    cuda: &mut Cuda,
    step: GruStep,
    seg: &Segments,
    gates: &Tensor,
    hs: &Tensor,
    dout: &Tensor,
    dh: &mut Tensor,
    dxproj: &mut Tensor,
    dhproj: &mut Tensor,
) -> Result<()> {
    const K: &str = "gru_step_bwd_f32";
    let (grid, ints) = common_args("gru_step_bwd", step, seg, dout.cols())?;
    if seg.items() == 0 || step.hidden == 0 {
        return Ok(());
    }
    let mut args = vec![
        Arg::tensor(gates)?,
        Arg::tensor(hs)?,
        Arg::tensor(dout)?,
        Arg::tensor(dh)?,
        Arg::tensor(dxproj)?,
        Arg::tensor(dhproj)?,
        Arg::ids(&seg.device)?,
    ];
    args.extend(ints);
    cuda.launch(K, (grid, 1, 1), (THREADS, 1, 1), 0, &args)
}
