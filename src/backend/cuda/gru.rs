//! The Bi-GRU's recurrence on the GPU. Where every item fits one chunk of the persistent
//! kernel (`GruPath::Auto`), both directions' whole recurrence runs as one cooperative launch
//! per pass (kernels/gru_persistent.cu); elsewhere step by step: per timestep and direction a
//! cuBLAS GEMM and the gate kernel (kernels/gru.cu), one thread per (item, hidden unit).
//! `ops.rs` has already checked the shapes the CPU twin checks. At `--precision bf16` the persistent kernel rounds its operands
//! as the GEMMs it replaces would; at `tf32` its products stay IEEE f32 (CUDA cores, not
//! tensor cores), as on the step-by-step path under 64 items.

use super::{Arg, Cuda, GruPath, blocks, dev_ids};
use crate::backend::{GruRunBwd, GruRunFwd, GruStep, Precision, Segments, gru_bwd_by_steps, gru_fwd_by_steps};
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

/// The persistent recurrence's layout on this device (kernels/gru_persistent.cu): each
/// direction's hidden units split over `blocks` blocks of `units`, `chunk` items staged at a
/// time, `units · chunk` threads, `smem` bytes of dynamic shared memory.
#[derive(Clone, Copy, Debug)]
struct Persistent {
    units: usize,
    blocks: usize,
    chunk: usize,
    smem: usize,
}

/// Threads a persistent block aims for (its `__launch_bounds__` is 512).
const PERSISTENT_THREADS: usize = 256;

/// The persistent kernel's plan where `cuda.gru_path` takes it for `items`, else None.
fn chosen(
    cuda: &mut Cuda,
    kernel: &'static str,
    hidden: usize,
    items: usize,
    backward: bool,
) -> Result<Option<Persistent>> {
    let path = cuda.gru_path;
    if path == GruPath::BySteps {
        return Ok(None);
    }
    let plan = Persistent::plan(cuda, kernel, hidden, items, backward)?;
    Ok(plan.filter(|p| path == GruPath::Persistent || p.chunk == items))
}

impl Persistent {
    /// None where the device cannot run it (no cooperative launch, or not even one item's
    /// row beside the W_hh slice fits in shared memory): the step-by-step path runs instead.
    fn plan(
        cuda: &mut Cuda,
        kernel: &'static str,
        hidden: usize,
        items: usize,
        backward: bool,
    ) -> Result<Option<Self>> {
        use cudarc::driver::sys::CUdevice_attribute as A;
        if cuda.attribute(A::CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH)? == 0 || hidden == 0 || items == 0 {
            return Ok(None);
        }
        // One block per multiprocessor, half of them per direction: every block resident.
        let per_direction = (cuda.attribute(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? / 2).min(hidden);
        if per_direction == 0 {
            return Ok(None);
        }
        let units = hidden.div_ceil(per_direction);
        // Rows of `row` floats (kernels/gru_persistent.cu: `row_stride4`), W_hh's slice first.
        let row_floats = |cols: usize| 4 * (cols.div_ceil(4) | 1);
        let (slice, row) = if backward {
            (units * row_floats(3 * hidden), row_floats(3 * hidden))
        } else {
            (3 * units * row_floats(hidden), row_floats(hidden))
        };
        let room = (cuda.shared_limit(kernel)? / 4).saturating_sub(slice) / row;
        let chunk = (PERSISTENT_THREADS / units).max(1).min(items).min(room);
        if chunk == 0 || units * chunk > 512 {
            return Ok(None);
        }
        let smem = 4 * (slice + chunk * row);
        cuda.allow_shared(kernel, smem)?;
        Ok(Some(Persistent { units, blocks: hidden.div_ceil(units), chunk, smem }))
    }

    /// `shape`: items, hidden, steps, output columns. The recurrence's products are the
    /// layer GEMMs' of `items` rows (`Precision::of_gemm`): bf16 operands where those are.
    fn launch(self, cuda: &mut Cuda, kernel: &'static str, mut args: Vec<Arg>, shape: [usize; 4]) -> Result<()> {
        let bf16 = cuda.precision().of_gemm(shape[0]) == Precision::Bf16;
        args.push(cuda.grid_barrier()?);
        for v in shape.into_iter().chain([self.units, self.chunk]) {
            args.push(Arg::int(kernel, v)?);
        }
        args.push(Arg::I32(bf16 as i32));
        let (grid, block) = ((self.blocks as u32, 2, 1), ((self.units * self.chunk) as u32, 1, 1));
        cuda.launch_with(kernel, grid, block, self.smem as u32, &args, true)
    }
}

/// Both directions' forward recurrences (`Backend::gru_fwd`, shapes checked) in one launch, or
/// step by step where the persistent kernel does not fit.
pub(super) fn recurrence_fwd(
    cuda: &mut Cuda,
    seg: &Segments,
    hidden: usize,
    runs: [GruRunFwd<'_>; 2],
    out: &mut Tensor,
) -> Result<()> {
    const K: &str = "gru_fwd_persistent_f32";
    let Some(plan) = chosen(cuda, K, hidden, seg.items(), false)? else {
        return gru_fwd_by_steps(cuda, seg, hidden, runs, out);
    };
    let [r0, r1] = &runs;
    let args = vec![
        Arg::tensor(r0.xproj)?,
        Arg::tensor(r1.xproj)?,
        Arg::view(r0.w_hh)?,
        Arg::view(r1.w_hh)?,
        Arg::view(r0.bias_hh)?,
        Arg::view(r1.bias_hh)?,
        Arg::tensor(r0.hs)?,
        Arg::tensor(r1.hs)?,
        Arg::tensor(r0.gates)?,
        Arg::tensor(r1.gates)?,
        Arg::tensor(out)?,
        Arg::ids(&seg.device)?,
    ];
    plan.launch(cuda, K, args, [seg.items(), hidden, seg.max_len, out.cols()])
}

/// Both directions' backward recurrences (`Backend::gru_bwd`, shapes checked), as
/// `recurrence_fwd`.
pub(super) fn recurrence_bwd(
    cuda: &mut Cuda,
    seg: &Segments,
    hidden: usize,
    runs: [GruRunBwd<'_>; 2],
    dout: &Tensor,
) -> Result<()> {
    const K: &str = "gru_bwd_persistent_f32";
    let Some(plan) = chosen(cuda, K, hidden, seg.items(), true)? else {
        return gru_bwd_by_steps(cuda, seg, hidden, runs, dout);
    };
    let [r0, r1] = &runs;
    let args = vec![
        Arg::tensor(r0.gates)?,
        Arg::tensor(r1.gates)?,
        Arg::tensor(r0.hs)?,
        Arg::tensor(r1.hs)?,
        Arg::tensor(dout)?,
        Arg::tensor(r0.dh)?,
        Arg::tensor(r1.dh)?,
        Arg::tensor(r0.dxproj)?,
        Arg::tensor(r1.dxproj)?,
        Arg::tensor(r0.dhproj)?,
        Arg::tensor(r1.dhproj)?,
        Arg::view(r0.w_hh)?,
        Arg::view(r1.w_hh)?,
        Arg::ids(&seg.device)?,
    ];
    plan.launch(cuda, K, args, [seg.items(), hidden, seg.max_len, dout.cols()])
}
