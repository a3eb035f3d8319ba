//! The fused post-LN join (`kernels/residual_norm.cu`): dropout, residual add and LayerNorm in
//! one launch forward; backward, LayerNorm's, the dropout mask and the first stage of the
//! column sums (dgamma, dbeta and the sublayer's bias gradient) in one row launch, and one
//! launch that finishes the sums.

use super::typed::entry;
use super::{Arg, Cuda, view_mut_ptr};
use crate::backend::{check_residual_layernorm_bwd, check_residual_layernorm_fwd};
use crate::tensor::{Tensor, View, ViewMut};
use crate::{Error, Result};

const THREADS: u32 = 256;
/// The forward's block: 2 rows. Holding a row's a and x takes 142–145 registers a thread, so an
/// SM fits 14 warps; in 256-thread blocks only 8 of them (one block).
const FWD_THREADS: u32 = 64;

fn dropout_scale(p: f32) -> Result<f32> {
    if !(0.0..1.0).contains(&p) {
        return Err(Error::config(format!("dropout probability {p} is not in [0, 1)")));
    }
    Ok(1.0 / (1.0 - p)) // the CPU's f32 expression
}

#[allow(clippy::too_many_arguments)]
pub(super) fn forward(
    cuda: &mut Cuda,
    a: &mut Tensor,
    x: &Tensor,
    gamma: View,
    beta: View,
    eps: f32,
    p: f32,
    seed: u64,
) -> Result<(Tensor, Tensor)> {
    check_residual_layernorm_fwd("residual_layernorm_fwd", a, x, &gamma, &beta)?;
    let scale = dropout_scale(p)?;
    let (rows, d) = (a.rows(), a.cols());
    let y = cuda.alloc_typed(a.shape(), a.dtype())?;
    let stats = cuda.alloc_tensor(&[rows, 2])?;
    if rows == 0 {
        return Ok((y, stats));
    }
    let args = [
        Arg::tensor(a)?,
        Arg::tensor(x)?,
        Arg::view(gamma)?,
        Arg::view(beta)?,
        Arg::F32(eps),
        Arg::F32(p),
        Arg::F32(scale),
        Arg::U64(seed),
        cuda.salt()?,
        Arg::int("residual_layernorm_fwd", rows)?,
        Arg::int("residual_layernorm_fwd", d)?,
        Arg::tensor(&y)?,
        Arg::tensor(&stats)?,
    ];
    let name = entry(a.dtype(), "residual_layernorm_fwd_f32", "residual_layernorm_fwd_bf16");
    cuda.launch(name, (rows.div_ceil(FWD_THREADS as usize / 32) as u32, 1, 1), (FWD_THREADS, 1, 1), 0, &args)?;
    Ok((y, stats))
}

/// Rows per block of the backward (a warp each), so the rows of one column partial.
const ROWS_PER_BLOCK: usize = THREADS as usize / 32;

#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    cuda: &mut Cuda,
    s: &Tensor,
    stats: &Tensor,
    gamma: View,
    dy: &Tensor,
    dgamma: ViewMut,
    dbeta: ViewMut,
    dbias: Option<ViewMut>,
    p: f32,
    seed: u64,
) -> Result<(Tensor, Tensor)> {
    check_residual_layernorm_bwd(s, stats, &gamma, dy, &dgamma, &dbeta, dbias.as_ref())?;
    let da = cuda.alloc_typed(s.shape(), s.dtype())?;
    let dx = rows_backward(cuda, s, stats, gamma, dy, (dgamma, dbeta, dbias), Some(&da), (p, seed))?;
    Ok((dx, da))
}

/// dx (returned) and, given `da`, dropout(dx) into it; the column sums added into dgamma,
/// dbeta and (given) dbias. Also LayerNorm's own backward (no da, p 0): `Cuda::layernorm_bwd`.
#[allow(clippy::too_many_arguments)]
pub(super) fn rows_backward(
    cuda: &mut Cuda,
    s: &Tensor,
    stats: &Tensor,
    gamma: View,
    dy: &Tensor,
    (dgamma, dbeta, dbias): (ViewMut, ViewMut, Option<ViewMut>),
    da: Option<&Tensor>,
    (p, seed): (f32, u64),
) -> Result<Tensor> {
    let scale = dropout_scale(p)?;
    let (rows, d) = (s.rows(), s.cols());
    let dx = cuda.alloc_typed(s.shape(), s.dtype())?;
    if rows == 0 || d == 0 {
        return Ok(dx);
    }
    let blocks = rows.div_ceil(ROWS_PER_BLOCK);
    let outs = if dbias.is_some() { 3 } else { 2 };
    let partial = cuda.scratch(outs * blocks * d)?;
    let args = [
        Arg::tensor(s)?,
        Arg::tensor(stats)?,
        Arg::view(gamma)?,
        Arg::tensor(dy)?,
        Arg::F32(p),
        Arg::F32(scale),
        Arg::U64(seed),
        cuda.salt()?,
        Arg::int("residual_layernorm_bwd", rows)?,
        Arg::int("residual_layernorm_bwd", d)?,
        Arg::tensor(&dx)?,
        match da {
            Some(da) => Arg::tensor(da)?,
            None => Arg::Ptr(0),
        },
        Arg::I32(outs as i32),
        Arg::tensor(&partial)?,
    ];
    let name = entry(s.dtype(), "residual_layernorm_bwd_f32", "residual_layernorm_bwd_bf16");
    cuda.launch(name, (blocks as u32, 1, 1), (THREADS, 1, 1), 0, &args)?;
    let bias = dbias.as_ref().map_or(Ok(0), view_mut_ptr)?;
    let finish = [
        Arg::tensor(&partial)?,
        Arg::int("residual_layernorm_params_finish", blocks)?,
        Arg::int("residual_layernorm_params_finish", d)?,
        Arg::Ptr(view_mut_ptr(&dgamma)?),
        Arg::Ptr(view_mut_ptr(&dbeta)?),
        Arg::Ptr(bias),
    ];
    let grid = (d.div_ceil(32) as u32, outs as u32, 1);
    cuda.launch("residual_layernorm_params_finish", grid, (32, 8, 1), 0, &finish)?;
    Ok(dx)
}
