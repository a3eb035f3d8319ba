//! Fused multi-head attention on the GPU (kernels/attention.cu): launch configuration and the
//! limits of the on-chip design. `ops.rs` has already checked the shapes the CPU twin checks.
//!
//! One block per (item, head) holds that head's Q, K, V (and dO) plus the `len × len` scores in
//! shared memory, so the launch is sized by the batch's longest item: `threads` one per 4×4
//! output tile, shared memory as in the kernel file's header; on bf16 storage, the tensor-core
//! versions a warp per 16 rows (`mma_launch_shape`). Items longer than `MAX_LEN` or heads
//! wider than `MAX_HEAD_DIM`, or a size the GPU's shared memory cannot hold, are refused
//! with an error before anything is launched (never a truncated answer).

use super::typed::entry;
use super::{Arg, Cuda, dev_ids, view_mut_ptr};
use crate::backend::Segments;
use crate::tensor::{DType, Tensor, ViewMut};
use crate::{Error, Result};

/// Longest item (rows of one sequence) the fused kernels hold on chip.
pub const MAX_LEN: usize = 64;
/// Widest head the fused kernels hold on chip.
pub const MAX_HEAD_DIM: usize = 128;

/// Threads per block and dynamic shared-memory bytes for items up to `max_len` rows and head
/// dim `dh` (mirrors `Shape` in kernels/attention.cu).
pub fn launch_shape(max_len: usize, dh: usize, backward: bool) -> (u32, usize) {
    let lp = max_len.div_ceil(4) * 4;
    let dp = dh.div_ceil(4) * 4;
    let (ds, ls) = (dp + 4, lp + 4);
    let floats = if backward { 4 * lp * ds + 2 * lp * ls } else { 3 * lp * ds + lp * ls };
    let tiles = (lp / 4) * (dp / 4);
    let threads = tiles.max(1).div_ceil(32) * 32;
    (threads as u32, floats * 4)
}

/// kernels/attention.cu's `MMA_BWD_WARPS`.
const MMA_BWD_WARPS: usize = 8;

/// The same for the bf16 versions on tensor cores (`fwd_mma`, `bwd_mma`): the forward a warp
/// per 16 rows, the backward 8 warps (`MMA_BWD_WARPS`: those past the rows' only load); in
/// bf16, `L16`/`D16` the length and head dim rounded up to 16, the forward holds Q and K
/// `[L16][D16 + 8]` and V transposed `[D16][L16 + 8]`; the backward dO and V `[L16][D16 + 8]`,
/// K, Q and dO transposed `[D16][L16 + 8]`, and P and dS `[L16][L16 + 4]` in f32.
pub fn mma_launch_shape(max_len: usize, dh: usize, backward: bool) -> (u32, usize) {
    let (l16, d16) = (max_len.div_ceil(16) * 16, dh.div_ceil(16) * 16);
    let (rows, transposed) = (2 * l16 * (d16 + 8), d16 * (l16 + 8));
    let bytes = if backward { (rows + 3 * transposed) * 2 + 2 * l16 * (l16 + 4) * 4 } else { (rows + transposed) * 2 };
    let warps = if backward { MMA_BWD_WARPS } else { l16.max(16) / 16 };
    ((warps * 32) as u32, bytes)
}

/// Everything the two launches share: checked geometry and the launch configuration.
struct Plan {
    dh: usize,
    max_len: usize,
    grid: u32,
    threads: u32,
    smem: usize,
}

fn plan(
    cuda: &mut Cuda,
    (op, kernel, backward): (&'static str, &'static str, bool),
    qkv: &Tensor,
    seg: &Segments,
    heads: usize,
) -> Result<Plan> {
    if heads == 0 || !qkv.cols().is_multiple_of(3 * heads) {
        return Err(Error::shape(op, format!("{} qkv columns for {heads} heads", qkv.cols())));
    }
    let d = qkv.cols() / 3;
    let dh = d / heads;
    if dh == 0 || dh > MAX_HEAD_DIM {
        return Err(Error::shape(
            op,
            format!("head dim {dh} (d {d}, {heads} heads): the fused kernel supports 1..={MAX_HEAD_DIM}"),
        ));
    }
    let items = seg.items();
    let ids = dev_ids(&seg.device)?;
    if ids.len() != items + 1 {
        return Err(Error::shape(op, format!("{} device offsets for {items} items", ids.len())));
    }
    // The host offsets are the truth: seg.max_len is a public field a caller may have left stale.
    let max_len = seg.offsets.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    if max_len > MAX_LEN {
        let item = seg.offsets.windows(2).position(|w| w[1] - w[0] == max_len).unwrap_or(0);
        return Err(Error::shape(
            op,
            format!("item {item} has {max_len} segments; the fused attention kernel holds at most {MAX_LEN} on chip"),
        ));
    }
    let grid = items
        .checked_mul(heads)
        .filter(|&g| g <= i32::MAX as usize)
        .ok_or_else(|| Error::shape(op, format!("{items} items × {heads} heads exceeds one launch")))?;
    let (threads, smem) = match qkv.dtype() {
        DType::F32 => launch_shape(max_len, dh, backward),
        DType::Bf16 => mma_launch_shape(max_len, dh, backward),
    };
    let limit = cuda.shared_limit(kernel)?;
    if smem > limit {
        return Err(Error::shape(
            op,
            format!(
                "items of {max_len} segments at head dim {dh} need {smem} bytes of dynamic shared memory per block; \
                 {} allows {limit}",
                cuda.device_name()
            ),
        ));
    }
    cuda.allow_shared(kernel, smem)?;
    Ok(Plan { dh, max_len, grid: grid as u32, threads, smem })
}

/// Context `[tokens, d]` and the saved probabilities (per item and head, `len × len`, packed
/// like the CPU's `prob_offsets`).
pub(super) fn forward(cuda: &mut Cuda, qkv: &Tensor, seg: &Segments, heads: usize) -> Result<(Tensor, Tensor)> {
    let store = qkv.dtype();
    let k = entry(store, "attention_fwd_f32", "attention_fwd_bf16");
    let p = plan(cuda, ("attention_fwd", k, false), qkv, seg, heads)?;
    let tokens = seg.tokens();
    let n_probs = crate::backend::prob_offsets(&seg.offsets, heads)[seg.items()];
    let out = cuda.alloc_typed(&[tokens, qkv.cols() / 3], store)?;
    let probs = cuda.alloc_typed(&[n_probs], store)?;
    if tokens == 0 {
        return Ok((out, probs));
    }
    let scale = 1.0 / (p.dh as f32).sqrt();
    let args = [
        Arg::tensor(qkv)?,
        Arg::ids(&seg.device)?,
        Arg::int(k, heads)?,
        Arg::int(k, p.dh)?,
        Arg::int(k, p.max_len)?,
        Arg::F32(scale),
        Arg::tensor(&out)?,
        Arg::tensor(&probs)?,
    ];
    cuda.launch(k, (p.grid, 1, 1), (p.threads, 1, 1), p.smem as u32, &args)?;
    Ok((out, probs))
}

/// `dqkv [tokens, 3d]`, and with `dbias` its column sums added to it in the same launch
/// (per item and head, then the items in order: kernels/attention.cu `bias_grad`).
pub(super) fn backward(
    cuda: &mut Cuda,
    qkv: &Tensor,
    probs: &Tensor,
    seg: &Segments,
    heads: usize,
    dout: &Tensor,
    dbias: Option<ViewMut>,
) -> Result<Tensor> {
    let k = entry(qkv.dtype(), "attention_bwd_f32", "attention_bwd_bf16");
    let p = plan(cuda, ("attention_bwd", k, true), qkv, seg, heads)?;
    let dqkv = cuda.alloc_typed(qkv.shape(), qkv.dtype())?;
    if seg.tokens() == 0 {
        return Ok(dqkv);
    }
    let scale = 1.0 / (p.dh as f32).sqrt();
    // Null pointers: no bias gradient (the kernel skips it).
    let (partial, bias, counters) = match &dbias {
        Some(v) => {
            let partial = cuda.scratch(seg.items() * qkv.cols())?;
            (Some(partial), Arg::Ptr(view_mut_ptr(v)?), cuda.strip_counters(heads)?)
        }
        None => (None, Arg::Ptr(0), Arg::Ptr(0)),
    };
    let args = [
        Arg::tensor(qkv)?,
        Arg::tensor(probs)?,
        Arg::ids(&seg.device)?,
        Arg::int(k, heads)?,
        Arg::int(k, p.dh)?,
        Arg::int(k, p.max_len)?,
        Arg::F32(scale),
        Arg::tensor(dout)?,
        Arg::tensor(&dqkv)?,
        partial.as_ref().map_or(Ok(Arg::Ptr(0)), Arg::tensor)?,
        bias,
        counters,
    ];
    cuda.launch(k, (p.grid, 1, 1), (p.threads, 1, 1), p.smem as u32, &args)?;
    Ok(dqkv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_shape_matches_the_kernel_header() {
        // kernels/attention.cu header: len 36, dh 128 → 62.8 KB fwd, 87.6 KB bwd, 288 threads.
        assert_eq!(launch_shape(36, 128, false), (288, 62_784));
        assert_eq!(launch_shape(36, 128, true), (288, 87_552));
        assert_eq!(launch_shape(64, 128, true), (512, 169_984));
        assert_eq!(launch_shape(1, 64, false).0, 32);
        assert!(launch_shape(MAX_LEN, MAX_HEAD_DIM, false).0 <= 512); // __launch_bounds__
        // The tensor-core forward: len 36, dh 128 → 3 warps, 40.4 KB; len 64 → 4 warps, 53.2 KB.
        assert_eq!(mma_launch_shape(36, 128, false), (96, 40_448));
        assert_eq!(mma_launch_shape(MAX_LEN, MAX_HEAD_DIM, false), (128, 53_248)); // MMA_MAX_WARPS
        assert_eq!(mma_launch_shape(1, 1, false), (32, 2 * (2 * 16 * 24 + 16 * 24)));
        // The tensor-core backward: len 36, dh 128 → 89.1 KB; len 64 → 124.9 KB.
        assert_eq!(mma_launch_shape(36, 128, true), (256, 89_088)); // MMA_BWD_WARPS
        assert_eq!(mma_launch_shape(MAX_LEN, MAX_HEAD_DIM, true), (256, 124_928));
    }
}
