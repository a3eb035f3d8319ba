//! The Bi-GRU's recurrence on the GPU. Where every item fits one chunk of the persistent
//! kernel (`GruPath::Auto`), both directions' whole recurrence runs as one cooperative launch
//! per pass (kernels/gru_persistent.cu); elsewhere step by step: per timestep one cuBLAS
//! GEMM for both directions (strided-batched) and each direction's gate kernel
//! (kernels/gru.cu), one thread per (item, hidden unit). `ops.rs` has already checked the
//! shapes the CPU twin checks. At `--precision bf16` the persistent kernel rounds its operands
//! as the GEMMs it replaces would; at `tf32` its products stay IEEE f32 (CUDA cores, not
//! tensor cores), and so do the step-by-step path's (`Precision::of_recurrence`).

use super::{Arg, Cuda, GruPath, blocks, dev_ids, tensor_ptr};
use crate::backend::{Backend, GruRunBwd, GruRunFwd, GruStep, Precision, Segments, f32s};
use crate::tensor::{DType, Tensor, View, ViewMut};
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
    hproj: View,
    bias_hh: View,
    hs: ViewMut,
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
        Arg::view(hproj)?,
        Arg::view(bias_hh)?,
        Arg::view_mut(&hs)?,
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
    dh: ViewMut,
    dxproj: &mut Tensor,
    dhproj: ViewMut,
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
        Arg::view_mut(&dh)?,
        Arg::tensor(dxproj)?,
        Arg::view_mut(&dhproj)?,
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

    /// `shape`: items, hidden, steps, output columns. The recurrence's products round their
    /// operands to bf16 at bf16 (`Precision::of_recurrence`).
    fn launch(self, cuda: &mut Cuda, kernel: &'static str, mut args: Vec<Arg>, shape: [usize; 4]) -> Result<()> {
        let bf16 = cuda.precision().of_recurrence() == Precision::Bf16;
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
        return by_steps_fwd(cuda, seg, hidden, runs, out);
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
        return by_steps_bwd(cuda, seg, hidden, runs, dout);
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

/// The step-by-step recurrences of both directions, interleaved: per step one strided-batched
/// GEMM forms both directions' W_hh·h (two GEMMs of 12 output tiles each at 128 items and H 512
/// left most of the card idle, and their launches were 10 % of an H200's TF32 step), then
/// each direction's gate kernel. The batch needs each operand of the two directions a fixed
/// distance apart: W_hh and the states are copied into buffers of this pass's own, and the
/// states copied back after (a few µs).
fn by_steps_fwd(
    cuda: &mut Cuda,
    seg: &Segments,
    hidden: usize,
    mut runs: [GruRunFwd<'_>; 2],
    out: &mut Tensor,
) -> Result<()> {
    let items = seg.items();
    for run in &runs {
        // The gate kernel and the batched GEMM below read and write f32 (as the model's GRU).
        let types = [("xproj", run.xproj.dtype()), ("w_hh", run.w_hh.dtype()), ("hs", run.hs.dtype())];
        f32s("gru_fwd", types)?;
        f32s("gru_fwd", [("bias_hh", run.bias_hh.dtype()), ("gates", run.gates.dtype()), ("out", out.dtype())])?;
    }
    let (n_w, n_h, n_p) = (3 * hidden * hidden, runs[0].hs.len(), items * 3 * hidden);
    let mut w = cuda.alloc_typed(&[2 * n_w], DType::F32)?;
    let mut hs = cuda.alloc_typed(&[2 * n_h], DType::F32)?;
    let hproj = cuda.alloc_typed(&[2 * n_p], DType::F32)?;
    for (d, run) in runs.iter().enumerate() {
        cuda.copy(run.w_hh, w.sub_mut(d * n_w, n_w))?;
        // h_0, set by the caller.
        cuda.copy(run.hs.sub(0, items * hidden), hs.sub_mut(d * n_h, items * hidden))?;
    }
    let (pw, ph, pp) = (tensor_ptr(&w)?, tensor_ptr(&hs)?, tensor_ptr(&hproj)?);
    let precision = cuda.precision().of_recurrence();
    for s in 0..seg.max_len {
        // hproj_d = h_s,d · W_hh,dᵀ for d = 0, 1.
        let h_s = ph + (s * items * hidden * 4) as u64;
        let (mnk, trans) = ((items, 3 * hidden, hidden), (false, true));
        let (a, b, c) = ((h_s, hidden, n_h), (pw, hidden, n_w), (pp, 3 * hidden, n_p));
        cuda.gemm_strided_batched(precision, (DType::F32, DType::F32), mnk, trans, 1.0, a, b, 0.0, c, 2)?;
        for (d, run) in runs.iter_mut().enumerate() {
            let step = GruStep::of(s, run.reverse, hidden);
            let (hp, h) = (hproj.sub(d * n_p, n_p), hs.sub_mut(d * n_h, n_h));
            step_fwd(cuda, step, seg, run.xproj, hp, run.bias_hh, h, out, run.gates)?;
        }
    }
    for (d, run) in runs.iter_mut().enumerate() {
        cuda.copy(hs.sub(d * n_h, n_h), run.hs.view_mut())?;
    }
    Ok(())
}

/// The backward of [`by_steps_fwd`]: per step (last first) each direction's gate kernel, then
/// one strided-batched GEMM adds both directions' dhproj_s·W_hh into their dh. dh and dhproj
/// live in this pass's buffers, copied back after.
fn by_steps_bwd(
    cuda: &mut Cuda,
    seg: &Segments,
    hidden: usize,
    mut runs: [GruRunBwd<'_>; 2],
    dout: &Tensor,
) -> Result<()> {
    let items = seg.items();
    for run in &runs {
        let types = [("w_hh", run.w_hh.dtype()), ("dh", run.dh.dtype()), ("dhproj", run.dhproj.dtype())];
        f32s("gru_bwd", types)?;
        f32s("gru_bwd", [("gates", run.gates.dtype()), ("hs", run.hs.dtype()), ("dout", dout.dtype())])?;
    }
    let (n_w, n_dh, n_dp) = (3 * hidden * hidden, items * hidden, runs[0].dhproj.len());
    let mut w = cuda.alloc_typed(&[2 * n_w], DType::F32)?;
    let mut dh = cuda.alloc_typed(&[2 * n_dh], DType::F32)?;
    let mut dhproj = cuda.alloc_typed(&[2 * n_dp], DType::F32)?;
    for (d, run) in runs.iter().enumerate() {
        cuda.copy(run.w_hh, w.sub_mut(d * n_w, n_w))?;
        cuda.copy(run.dh.view(), dh.sub_mut(d * n_dh, n_dh))?;
    }
    let (pw, pdh, pdp) = (tensor_ptr(&w)?, tensor_ptr(&dh)?, tensor_ptr(&dhproj)?);
    let precision = cuda.precision().of_recurrence();
    for s in (0..seg.max_len).rev() {
        for (d, run) in runs.iter_mut().enumerate() {
            let step = GruStep::of(s, run.reverse, hidden);
            let (h, p) = (dh.sub_mut(d * n_dh, n_dh), dhproj.sub_mut(d * n_dp, n_dp));
            step_bwd(cuda, step, seg, run.gates, run.hs, dout, h, run.dxproj, p)?;
        }
        // dh_d += dhproj_s,d · W_hh,d for d = 0, 1.
        let dp_s = pdp + (s * items * 3 * hidden * 4) as u64;
        let (mnk, trans) = ((items, hidden, 3 * hidden), (false, false));
        let (a, b, c) = ((dp_s, 3 * hidden, n_dp), (pw, hidden, n_w), (pdh, hidden, n_dh));
        cuda.gemm_strided_batched(precision, (DType::F32, DType::F32), mnk, trans, 1.0, a, b, 1.0, c, 2)?;
    }
    for (d, run) in runs.iter_mut().enumerate() {
        cuda.copy(dh.sub(d * n_dh, n_dh), run.dh.view_mut())?;
        cuda.copy(dhproj.sub(d * n_dp, n_dp), run.dhproj.view_mut())?;
    }
    Ok(())
}
