//! The one interface every device implements: each op, forward and backward.
//!
//! `model/` and `nn/` call only this trait, so a CUDA backend fills it in without touching
//! them. Conventions, stated once:
//! - Activations are row-major `[rows, cols]` tensors, f32 except in the transformer trunk at
//!   `--precision bf16`, which stores its activations and their gradients as bf16
//!   ([`Backend::activations`]); a batch of variable-length sequences is packed without
//!   padding, item `b` owning rows `offsets[b]..offsets[b+1]` (`Segments`). Padding is never
//!   computed on.
//! - Ops that produce a new activation return it; ops named `*_bwd` return the input gradient
//!   (written, `=`) and accumulate parameter gradients (`+=`) into the views they are given.
//! - Shapes are checked at this boundary and reported as `Error::Shape` naming the op.

mod checks;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod graph;
mod open;
mod precision;
pub mod step;

pub use checks::prob_offsets;
pub(crate) use checks::{
    check_attention, check_attention_bwd, check_dropout, check_gemm, check_gemm_bias, check_gemm_types, check_gru_bwd,
    check_gru_fwd, check_gru_step_bwd, check_gru_step_fwd, check_layernorm_bwd, check_layernorm_fwd,
    check_residual_layernorm_bwd, check_residual_layernorm_fwd, check_segment_rows_bwd, check_segment_table,
    check_top_k, check_widen, expect_cols, expect_dtype, expect_len, f32s, rows_of, same_dtype, same_shape,
};
pub use graph::{Graph, GraphInput};
pub use open::{open, open_at};
pub use precision::{Half, Precision};
pub use step::{AdamW, AdamWConstants, AdamWScalars, DecayMask, GuardParams};
pub(crate) use step::{check_adamw_masked, check_step_guard};

use crate::Result;
use crate::tensor::{DType, Ids, Tensor, View, ViewMut};

/// `c = alpha · op(a) · op(b) + beta · c`, row-major; op(a) is `[m, k]`, op(b) is `[k, n]`.
#[derive(Clone, Copy, Debug)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// a is stored `[k, m]` and used transposed.
    pub trans_a: bool,
    /// b is stored `[n, k]` and used transposed.
    pub trans_b: bool,
    pub alpha: f32,
    pub beta: f32,
}

/// A batch of variable-length sequences packed row after row.
#[derive(Clone, Debug)]
pub struct Segments {
    /// `offsets[b]..offsets[b+1]` are item b's rows; `offsets[0] = 0`.
    pub offsets: Vec<usize>,
    /// The same offsets on the device.
    pub device: Ids,
    pub max_len: usize,
}

impl GruStep {
    /// The packed row item b reads at this step, or None if the item is idle.
    pub fn row(&self, offsets: &[usize], b: usize) -> Option<usize> {
        let len = offsets[b + 1] - offsets[b];
        if self.s >= len {
            return None;
        }
        Some(offsets[b] + if self.reverse { len - 1 - self.s } else { self.s })
    }
}

impl Segments {
    pub fn from_lengths(b: &mut dyn Backend, lengths: &[usize]) -> Result<Segments> {
        let offsets = Segments::offsets_of(lengths)?;
        let device = b.upload_ids(&offsets.iter().map(|&o| o as u32).collect::<Vec<_>>())?;
        Ok(Segments::from_offsets(offsets, device))
    }

    /// Offsets of items of `lengths` (each ≥ 1), from 0.
    pub fn offsets_of(lengths: &[usize]) -> Result<Vec<usize>> {
        let mut offsets = Vec::with_capacity(lengths.len() + 1);
        offsets.push(0);
        for (i, &l) in lengths.iter().enumerate() {
            if l == 0 {
                return Err(crate::Error::data(format!("item {i} of a batch has no segment")));
            }
            offsets.push(offsets[i] + l);
        }
        Ok(offsets)
    }

    /// Segments from host offsets and the same offsets already on the device.
    pub fn from_offsets(offsets: Vec<usize>, device: Ids) -> Segments {
        let max_len = offsets.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
        Segments { offsets, device, max_len }
    }
    pub fn items(&self) -> usize {
        self.offsets.len() - 1
    }
    pub fn tokens(&self) -> usize {
        *self.offsets.last().unwrap()
    }
    pub fn len(&self, item: usize) -> usize {
        self.offsets[item + 1] - self.offsets[item]
    }
}

/// The target of a cross-entropy row to skip (`Backend::cross_entropy_into`).
pub const IGNORE_TARGET: u32 = u32::MAX;

/// What a device's host code submitted to the device and waited for. Counted in the backend's
/// host code, not in a driver, so the emulated device and a GPU give the same counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Kernel launches of our own kernels.
    pub kernels: u64,
    /// cuBLAS calls (each one or more kernels on the device).
    pub blas_calls: u64,
    /// Memsets and device-to-device copies put on the stream (tensor clones included).
    pub copies: u64,
    /// Host waits on the device: every device-to-host read and stream synchronisation.
    pub syncs: u64,
    /// Device allocations that reached the driver (the caching pool's misses).
    pub allocs: u64,
    /// Bytes copied host to device.
    pub upload_bytes: u64,
    /// Graph launches (each replays a captured step: one launch for all its work).
    pub graphs: u64,
}

impl Counters {
    /// Everything the stream runs: kernels, cuBLAS calls, memsets, copies and graphs.
    pub fn launches(&self) -> u64 {
        self.kernels + self.blas_calls + self.copies + self.graphs
    }

    /// The counts since `earlier` (a snapshot of the same device).
    pub fn since(&self, earlier: &Counters) -> Counters {
        Counters {
            kernels: self.kernels - earlier.kernels,
            blas_calls: self.blas_calls - earlier.blas_calls,
            copies: self.copies - earlier.copies,
            syncs: self.syncs - earlier.syncs,
            allocs: self.allocs - earlier.allocs,
            upload_bytes: self.upload_bytes - earlier.upload_bytes,
            graphs: self.graphs - earlier.graphs,
        }
    }
}

/// What the GRU step kernels need to find one timestep inside a packed batch.
#[derive(Clone, Copy, Debug)]
pub struct GruStep {
    /// Step of the recurrence (0-based); items with `len <= s` are idle at this step.
    pub s: usize,
    /// The reverse direction visits item b's timestep `len_b − 1 − s` at step s.
    pub reverse: bool,
    pub hidden: usize,
    /// Column offset of this direction inside the output rows (0 forward, H reverse).
    pub out_col: usize,
}

/// One direction of a Bi-GRU's forward recurrence ([`Backend::gru_fwd`]): its input
/// projections `xproj [tokens, 3H]` (b_ih added), `w_hh [3H, H]` and `bias_hh [3H]`, and what
/// its steps write: `hs [(steps + 1)·items, H]` (h_0, at rows 0..items, already set) and
/// `gates [steps·items, 4H]`, as [`Backend::gru_step_fwd`] describes them.
pub struct GruRunFwd<'a> {
    pub reverse: bool,
    pub xproj: &'a Tensor,
    pub w_hh: View<'a>,
    pub bias_hh: View<'a>,
    pub hs: &'a mut Tensor,
    pub gates: &'a mut Tensor,
}

/// One direction of a Bi-GRU's backward recurrence ([`Backend::gru_bwd`]): the forward's
/// `gates` and `hs`, `w_hh`, and what its steps write: `dh [items, H]` (zero on entry: the
/// gradient into the last state), `dxproj [tokens, 3H]` (zero on entry) and
/// `dhproj [steps·items, 3H]`, as [`Backend::gru_step_bwd`] describes them.
pub struct GruRunBwd<'a> {
    pub reverse: bool,
    pub w_hh: View<'a>,
    pub gates: &'a Tensor,
    pub hs: &'a Tensor,
    pub dh: &'a mut Tensor,
    pub dxproj: &'a mut Tensor,
    pub dhproj: &'a mut Tensor,
}

/// [`Backend::gru_fwd`] as a device without a fused recurrence runs it: each direction in
/// turn, per step one GEMM (`hproj = h_s·W_hhᵀ`) and one [`Backend::gru_step_fwd`].
pub fn gru_fwd_by_steps<B: Backend + ?Sized>(
    dev: &mut B,
    seg: &Segments,
    hidden: usize,
    runs: [GruRunFwd<'_>; 2],
    out: &mut Tensor,
) -> Result<()> {
    let items = seg.items();
    let gh = Gemm { m: items, n: 3 * hidden, k: hidden, trans_a: false, trans_b: true, alpha: 1.0, beta: 0.0 };
    for run in runs {
        let mut hproj = dev.alloc(&[items, 3 * hidden])?;
        for s in 0..seg.max_len {
            dev.gemm(gh, run.hs.sub(s * items * hidden, items * hidden), run.w_hh, hproj.view_mut())?;
            let step = GruStep::of(s, run.reverse, hidden);
            dev.gru_step_fwd(step, seg, run.xproj, &hproj, run.bias_hh, run.hs, out, run.gates)?;
        }
    }
    Ok(())
}

/// [`Backend::gru_bwd`] as a device without a fused recurrence runs it: each direction in
/// turn, per step (last first) one [`Backend::gru_step_bwd`] and one GEMM
/// (`dh += dhproj_s·W_hh`).
pub fn gru_bwd_by_steps<B: Backend + ?Sized>(
    dev: &mut B,
    seg: &Segments,
    hidden: usize,
    runs: [GruRunBwd<'_>; 2],
    dout: &Tensor,
) -> Result<()> {
    let items = seg.items();
    let gh = Gemm { m: items, n: hidden, k: 3 * hidden, trans_a: false, trans_b: false, alpha: 1.0, beta: 1.0 };
    for run in runs {
        for s in (0..seg.max_len).rev() {
            let step = GruStep::of(s, run.reverse, hidden);
            dev.gru_step_bwd(step, seg, run.gates, run.hs, dout, run.dh, run.dxproj, run.dhproj)?;
            dev.gemm(gh, run.dhproj.sub(s * items * 3 * hidden, items * 3 * hidden), run.w_hh, run.dh.view_mut())?;
        }
    }
    Ok(())
}

impl GruStep {
    /// Step s of a direction whose output is the first (forward) or second (reverse) half of
    /// rows [h→ ; h←].
    pub fn of(s: usize, reverse: bool, hidden: usize) -> GruStep {
        GruStep { s, reverse, hidden, out_col: if reverse { hidden } else { 0 } }
    }
}

pub trait Backend {
    fn name(&self) -> &'static str;
    /// Whether this device computes on host memory, so that `View::Cpu` of any slice (a memory
    /// map, say) is an operand as it is, with no upload.
    fn on_host(&self) -> bool {
        false
    }
    /// Bytes this device can still allocate (None: unknown, and no size check is made).
    fn available_memory(&self) -> Option<u64>;
    /// The type the model's transformer trunk stores its activations and their gradients in:
    /// bf16 at `--precision bf16` (each layer's GEMMs then multiply bf16 by bf16, its norms,
    /// activation and attention read and write bf16), f32 otherwise. One meaning on every
    /// device, so that the CPU stays the GPU's twin.
    fn activations(&self) -> DType {
        DType::F32
    }
    /// What this device has run and waited for since it was opened (None: not counted, as on
    /// the CPU, where nothing is launched or waited for).
    fn counters(&self) -> Option<Counters> {
        None
    }
    /// Runs `f` on this device as one piece of host work (an embedding, a training step).
    /// The CPU runs it on a thread of its pool, so that each op's parallel loop starts there
    /// instead of waking the pool from the caller's thread and parking that thread until the
    /// loop ends: two thread switches per op, 2.5 % of the fp32 embedding and 4.5 % of the
    /// training step on the Zen 4 VM (session 30). A device whose work is launched runs `f`
    /// as it is.
    fn run_pooled(&mut self, f: &mut (dyn FnMut(&mut dyn Backend) -> Result<()> + Send)) -> Result<()>;

    // ---- graphs (`graph.rs`) --------------------------------------------------------------
    /// Starts recording the work of the calls that follow instead of running it, until
    /// [`Backend::end_capture`]; `inputs` are refilled from the host at each launch. The
    /// inputs' buffers must be dropped before the capture ends (the graph keeps their memory).
    /// An error on a device without graphs.
    fn begin_capture(&mut self, inputs: &[GraphInput]) -> Result<()> {
        let _ = inputs;
        Err(crate::Error::Device { what: format!("the {} backend does not capture graphs", self.name()) })
    }
    /// Whether `begin_capture` can work here.
    fn captures_graphs(&self) -> bool {
        false
    }
    /// Ends the capture begun last: the graph, or why the recording cannot be replayed.
    fn end_capture(&mut self) -> Result<Graph> {
        Err(crate::Error::Device { what: format!("the {} backend does not capture graphs", self.name()) })
    }
    /// Runs a captured graph: `inputs` (the capture's inputs' values in pieces that end to end
    /// are its input words, 4-byte words each) and the dropout salt in one upload, then one
    /// launch.
    fn launch_graph(&mut self, graph: &Graph, inputs: &[&[f32]], dropout_salt: u64) -> Result<()> {
        let _ = (graph, inputs, dropout_salt);
        Err(crate::Error::Device { what: format!("the {} backend does not capture graphs", self.name()) })
    }

    // ---- memory -------------------------------------------------------------------------
    fn upload(&mut self, data: &[f32], shape: &[usize]) -> Result<Tensor>;
    fn upload_ids(&mut self, data: &[u32]) -> Result<Ids>;
    fn zeros(&mut self, shape: &[usize]) -> Result<Tensor>;
    /// A tensor whose contents are unspecified: only for outputs an op overwrites whole.
    fn alloc(&mut self, shape: &[usize]) -> Result<Tensor>;
    /// [`Backend::alloc`] of a tensor of `dtype`.
    fn alloc_as(&mut self, shape: &[usize], dtype: DType) -> Result<Tensor>;
    /// `x` stored as `dtype`, a `[x.len()]` tensor: to bf16 each value rounded to nearest, ties
    /// to even (a NaN stays a NaN); to f32 widened exactly; to its own type a copy. A view, so
    /// that a run of the flat parameters (the trunk's) is converted without the rest.
    fn convert(&mut self, x: View, dtype: DType) -> Result<Tensor>;
    /// `x` stored as `dtype`, of x's shape, taking x: a backend that can retype its memory
    /// in place (the CPU, whose bf16 values are f32 rounded) need not copy it; itself when it
    /// already is of that type.
    fn convert_owned(&mut self, x: Tensor, dtype: DType) -> Result<Tensor> {
        if x.dtype() == dtype {
            return Ok(x);
        }
        Ok(self.convert(x.view(), dtype)?.reshape(x.shape()))
    }
    /// The values of `x` as f32 (a bf16 view widened).
    fn download(&mut self, x: View) -> Result<Vec<f32>>;
    /// `value` stored in every element, as `x`'s type stores it.
    fn fill(&mut self, x: ViewMut, value: f32) -> Result<()>;
    /// `src` into `dst`, of one type and length.
    fn copy(&mut self, src: View, dst: ViewMut) -> Result<()>;
    /// A loaded model's parameters, never to be written again (inference): the device may
    /// then prepare what it computes from them once instead of on every call, as the CPU packs
    /// (and in bf16 converts) a layer's weights for its GEMM on first use and keeps them for
    /// as long as the parameters live. Writing to the returned tensor panics
    /// ([`Tensor::freeze`]). Training's parameters are never frozen.
    fn freeze(&mut self, params: Tensor) -> Result<Tensor> {
        Ok(params)
    }

    /// `[rows, dim]` f32 from 16-bit floats: `words` holds `rows · dim` of them two to a
    /// 4-byte word, the first in the low half (the last word's high half unused when the count
    /// is odd), as the loader read them from an fp16 or bf16 shard and a step uploads them:
    /// half the bytes of f32. With `norm` (each feature's mean and 1/std, `dim` long) every
    /// value is then standardised, `(x − mean) · inv_std`, rounded as the host's input
    /// normalisation rounds it: bit for bit the values of widening on the host and normalising.
    fn widen_features(
        &mut self,
        words: View,
        half: Half,
        rows: usize,
        dim: usize,
        norm: Option<(&[f32], &[f32])>,
    ) -> Result<Tensor>;

    // ---- dense algebra ------------------------------------------------------------------
    /// `c = alpha·op(a)·op(b) + beta·c` ([`Gemm`]). `a` and `b` are both f32 or both bf16;
    /// `c` either. bf16 operands' products are exact in f32 and summed in f32 whatever the
    /// precision (f32 operands: [`Precision`] says how they are rounded); a bf16 `c` is read
    /// widened and the result rounded once, as it is stored.
    fn gemm(&mut self, g: Gemm, a: View, b: View, c: ViewMut) -> Result<()>;
    /// [`Backend::gemm`] into `c`, then `bias` (of `c`'s type) added to each of its rows (a
    /// linear layer's forward), in f32 before a bf16 `c` is rounded: the same values as `gemm`
    /// and `add_bias` in turn on f32 (a bf16 bias is rounded already, as PyTorch's autocast
    /// rounds it; CUDA's cuBLASLt takes no f32 bias for a bf16 output). The CPU adds the bias
    /// where its micro-kernel stores a tile, so c is not read and written a second time; the
    /// default runs the two ops.
    fn gemm_bias(&mut self, g: Gemm, a: View, b: View, bias: View, c: &mut Tensor) -> Result<()> {
        self.gemm(g, a, b, c.view_mut())?;
        self.add_bias(c, bias)
    }
    /// [`Backend::gemm_bias`], then GELU of `c` in place, stored as `c`'s type: a linear layer
    /// and the feed-forward's activation at inference, where no backward reads the
    /// pre-activation. Bit for bit `gemm_bias` then [`Backend::bias_gelu_dropout_fwd`] without
    /// a bias or dropout. The CPU applies GELU in c's memory, so no second tensor is written;
    /// the default runs the two ops.
    fn gemm_bias_gelu(&mut self, g: Gemm, a: View, b: View, bias: View, c: &mut Tensor) -> Result<()> {
        self.gemm_bias(g, a, b, bias, c)?;
        *c = self.bias_gelu_dropout_fwd(c, None, 0.0, 0)?;
        Ok(())
    }
    /// `y[r, :] += bias`.
    fn add_bias(&mut self, y: &mut Tensor, bias: View) -> Result<()>;
    /// `dbias += Σ_r dy[r, :]`.
    fn bias_bwd(&mut self, dy: &Tensor, dbias: ViewMut) -> Result<()>;
    /// `y += x` (the residual stream).
    fn add_assign(&mut self, y: &mut Tensor, x: &Tensor) -> Result<()>;
    /// `x *= s` (stored as `x`'s type).
    fn scale(&mut self, x: ViewMut, s: f32) -> Result<()>;
    /// `Σ x²`, accumulated in f64 on the host side of the reduction.
    fn sum_squares(&mut self, x: View) -> Result<f64>;

    // ---- elementwise --------------------------------------------------------------------
    /// GELU, tanh approximation (PyTorch `approximate="tanh"`).
    fn gelu_fwd(&mut self, x: &Tensor) -> Result<Tensor>;
    fn gelu_bwd(&mut self, x: &Tensor, dy: &Tensor) -> Result<Tensor>;
    /// The feed-forward's activation: `u += bias` (the first linear's, when given; u then
    /// holds the pre-activation the backward reads), returns `dropout(GELU(u))` with (p, seed).
    /// Bit for bit `add_bias`, `gelu_fwd`, `dropout_fwd`; one pass where a device fuses them.
    fn bias_gelu_dropout_fwd(&mut self, u: &mut Tensor, bias: Option<View>, p: f32, seed: u64) -> Result<Tensor> {
        if let Some(b) = bias {
            self.add_bias(u, b)?;
        }
        let mut h = self.gelu_fwd(u)?;
        self.dropout_fwd(&mut h, p, seed)?;
        Ok(h)
    }
    /// Its backward from the saved pre-activation u: `GELU'(u) ⊙ dropout(dh)`, in dh's memory.
    /// Bit for bit `dropout_bwd` then `gelu_bwd`.
    fn gelu_dropout_bwd(&mut self, u: &Tensor, mut dh: Tensor, p: f32, seed: u64) -> Result<Tensor> {
        self.dropout_bwd(&mut dh, p, seed)?;
        self.gelu_bwd(u, &dh)
    }
    /// [`Backend::gelu_dropout_bwd`], then `dbias += Σ_rows` of what it wrote (the first
    /// linear's bias gradient, [`Backend::bias_bwd`]): bit for bit the two ops in turn. CUDA
    /// sums the columns as it writes them: one launch, and the gradient is not read again.
    fn gelu_dropout_bias_bwd(&mut self, u: &Tensor, dh: Tensor, p: f32, seed: u64, dbias: ViewMut) -> Result<Tensor> {
        let dh = self.gelu_dropout_bwd(u, dh, p, seed)?;
        self.bias_bwd(&dh, dbias)?;
        Ok(dh)
    }
    /// Copies host values into device memory that exists (an upload without an allocation),
    /// stored as `dst`'s type.
    fn write(&mut self, dst: ViewMut, data: &[f32]) -> Result<()>;
    /// The salt every later dropout XORs into its seed (0 at first): a training step sets its
    /// own, so that the per-site seeds stay fixed and a captured step (CUDA graphs) still draws
    /// new masks at each replay. On the CUDA device an 8-byte upload, read by the kernels.
    fn set_dropout_salt(&mut self, salt: u64) -> Result<()>;
    /// Inverted dropout in place; the keep mask is a hash of (seed, element index), so the
    /// backward pass recomputes it and every device draws the same mask.
    fn dropout_fwd(&mut self, x: &mut Tensor, p: f32, seed: u64) -> Result<()>;
    fn dropout_bwd(&mut self, dy: &mut Tensor, p: f32, seed: u64) -> Result<()>;
    /// The label embedding's coordinates from label logits g, in place (f32): `√softplus(g)` =
    /// `√(−log(1 − σ(g)))`, the square root of the negative log-probability that the label is
    /// absent. The authors' `σ(g)` saturates after training: the top label rounds to 1.0 and
    /// the rest fall to ≈ 1e-4, so the items of a class become one vector whose cosines differ
    /// below f32 rounding, and ties, not the model, order them. Like σ this is increasing in g
    /// (every label keeps its order of items) and ≈ `e^{g/2}` for a negative g, but it grows
    /// without bound with the top label's confidence, and the square root (power
    /// normalisation) lifts the small coordinates far enough above rounding to keep
    /// near-duplicates apart. On CUB-10 and the synthetic sets it ranks as well as σ
    /// (docs/results/cub.md, "defaults"). On the device, so that a label embedding does not
    /// wait for the host.
    fn label_coordinates(&mut self, g: &mut Tensor) -> Result<()>;
    /// Each row scaled to unit L2 norm (a zero row stays zero).
    fn l2_normalize_rows(&mut self, x: &mut Tensor) -> Result<()>;

    // ---- rows ---------------------------------------------------------------------------
    /// `out[i, :] = table[ids[i], :]` (embedding lookup; also picks masked segments).
    fn gather_rows(&mut self, table: View, cols: usize, ids: &Ids) -> Result<Tensor>;
    /// `dtable[ids[i], :] += dy[i, :]`.
    fn scatter_add_rows(&mut self, dy: &Tensor, ids: &Ids, dtable: ViewMut) -> Result<()>;
    /// `x[rows[i], :] = value` (the learned `[MASK]` feature).
    fn set_rows(&mut self, x: &mut Tensor, rows: &Ids, value: View) -> Result<()>;
    /// `dvalue += Σ_i dx[rows[i], :]`, then those rows of dx are zeroed.
    fn set_rows_bwd(&mut self, dx: &mut Tensor, rows: &Ids, dvalue: ViewMut) -> Result<()>;
    /// Mean over each item's rows: `[tokens, d] -> [items, d]`.
    fn segment_mean_fwd(&mut self, x: &Tensor, seg: &Segments) -> Result<Tensor>;
    fn segment_mean_bwd(&mut self, dy: &Tensor, seg: &Segments) -> Result<Tensor>;
    /// `[rows, dim]`: the sinusoidal position encodings of positions 0..rows
    /// (`cpu::positions`). The CUDA backend keeps the table on the device, so a batch uploads
    /// none of it.
    fn position_table(&mut self, rows: usize, dim: usize) -> Result<Tensor>;
    /// `[tokens, d]`: row t of each item is `table`'s row t (a value per position in an item,
    /// as ψ2 of the position encodings). `table` is f32 with at least `seg.max_len` rows.
    fn segment_rows(&mut self, table: &Tensor, seg: &Segments) -> Result<Tensor>;
    /// Its backward, `[rows, d]`: row t is the sum of dy's row t of every item that has one,
    /// items in order (zero where none has), f32.
    fn segment_rows_bwd(&mut self, dy: &Tensor, seg: &Segments, rows: usize) -> Result<Tensor>;

    // ---- layers -------------------------------------------------------------------------
    /// LayerNorm over the last dimension; returns y and the saved `[rows, 2]` (mean, rstd).
    fn layernorm_fwd(&mut self, x: &Tensor, gamma: View, beta: View, eps: f32) -> Result<(Tensor, Tensor)>;
    #[allow(clippy::too_many_arguments)]
    fn layernorm_bwd(
        &mut self,
        x: &Tensor,
        stats: &Tensor,
        gamma: View,
        dy: &Tensor,
        dgamma: ViewMut,
        dbeta: ViewMut,
    ) -> Result<Tensor>;
    /// The post-LN join of a sublayer: `a ← x + dropout(a)` (kept: LayerNorm backward reads
    /// it), then LayerNorm of it; returns y and the saved `[rows, 2]` (mean, rstd). The same
    /// values as `dropout_fwd`, `add_assign`, `layernorm_fwd` in turn (bit for bit on the
    /// CPU), in one pass over the rows on both devices.
    #[allow(clippy::too_many_arguments)]
    fn residual_layernorm_fwd(
        &mut self,
        a: &mut Tensor,
        x: &Tensor,
        gamma: View,
        beta: View,
        eps: f32,
        p: f32,
        seed: u64,
    ) -> Result<(Tensor, Tensor)>;
    /// The join at inference, `LN(x + a)` in a's memory: no dropout, and neither the sum nor
    /// the stats kept (no backward reads them). Bit for bit `residual_layernorm_fwd`'s y with
    /// p = 0; the CPU normalises each row where it lies, the default runs that op.
    fn residual_layernorm(&mut self, mut a: Tensor, x: &Tensor, gamma: View, beta: View, eps: f32) -> Result<Tensor> {
        Ok(self.residual_layernorm_fwd(&mut a, x, gamma, beta, eps, 0.0, 0)?.0)
    }
    /// Backward of [`Backend::residual_layernorm_fwd`] from its saved input s: returns
    /// `(dx, da)`, the residual's gradient (`layernorm_bwd`) and the sublayer's (`dx` through
    /// the dropout mask), and accumulates dgamma and dbeta and, when given, `dbias` (the
    /// sublayer's output bias: `bias_bwd` of da). One row pass over the activations, no copy.
    #[allow(clippy::too_many_arguments)]
    fn residual_layernorm_bwd(
        &mut self,
        s: &Tensor,
        stats: &Tensor,
        gamma: View,
        dy: &Tensor,
        dgamma: ViewMut,
        dbeta: ViewMut,
        dbias: Option<ViewMut>,
        p: f32,
        seed: u64,
    ) -> Result<(Tensor, Tensor)>;
    /// Multi-head self-attention core on packed `qkv [tokens, 3d]` (q | k | v, heads
    /// contiguous inside each): returns the context `[tokens, d]` and the saved softmax
    /// probabilities (per item and head, `len × len`, packed).
    fn attention_fwd(&mut self, qkv: &Tensor, seg: &Segments, heads: usize) -> Result<(Tensor, Tensor)>;
    /// [`Backend::attention_fwd`]'s context alone, at inference: a backend may skip keeping
    /// the probabilities, which only the backward reads.
    fn attention(&mut self, qkv: &Tensor, seg: &Segments, heads: usize) -> Result<Tensor> {
        Ok(self.attention_fwd(qkv, seg, heads)?.0)
    }
    /// `dqkv`; with `dbias`, also `dbias += Σ_rows dqkv` (the qkv projection's bias gradient,
    /// summed as the pass writes dqkv rather than by a `bias_bwd` that reads it again).
    fn attention_bwd(
        &mut self,
        qkv: &Tensor,
        probs: &Tensor,
        seg: &Segments,
        heads: usize,
        dout: &Tensor,
        dbias: Option<ViewMut>,
    ) -> Result<Tensor>;
    /// One GRU timestep for every item (gate order r, z, n as in PyTorch) over the run's
    /// buffers: `xproj [tokens, 3H]` (input projections incl. b_ih), `hproj [items, 3H]`
    /// (W_hh·h_s, without its bias), `bias_hh [3H]` (added here: no launch of its own),
    /// `hs [(steps + 1)·items, H]` holding h_s at rows s·items.. (read) and receiving h_{s+1}
    /// at rows (s + 1)·items.. (idle items copy h_s), the output row of each active item
    /// written at `out[step.row(b), out_col..out_col + H]`, and this step's rows s·items.. of
    /// `gates [steps·items, 4H]` (r, z, n, W_hn h + b_hn) saved. `steps` is the batch's longest
    /// sequence. Nothing is copied or cleared per step: the states stay for the backward pass.
    #[allow(clippy::too_many_arguments)]
    fn gru_step_fwd(
        &mut self,
        step: GruStep,
        seg: &Segments,
        xproj: &Tensor,
        hproj: &Tensor,
        bias_hh: View,
        hs: &mut Tensor,
        out: &mut Tensor,
        gates: &mut Tensor,
    ) -> Result<()>;
    /// Backward of one timestep, over the forward's `gates` and `hs`. `dh [items, H]` holds
    /// the gradient flowing into h_{s+1} from later steps; on return it holds the part of
    /// dL/dh_s that bypasses W_hh (the caller adds `dhproj_s · W_hh`). Writes this step's rows
    /// of `dxproj [tokens, 3H]` and rows s·items.. of `dhproj [steps·items, 3H]`, so that
    /// the weight and bias gradients of W_hh are one GEMM and one reduction after the last step.
    #[allow(clippy::too_many_arguments)]
    fn gru_step_bwd(
        &mut self,
        step: GruStep,
        seg: &Segments,
        gates: &Tensor,
        hs: &Tensor,
        dout: &Tensor,
        dh: &mut Tensor,
        dxproj: &mut Tensor,
        dhproj: &mut Tensor,
    ) -> Result<()>;

    /// Both directions' forward recurrences of a Bi-GRU over the batch's longest sequence,
    /// each direction's outputs written to its half of `out [tokens, 2H]` (forward first).
    /// The two are independent, so a device may run them at once (the CPU does, one per
    /// thread); by default they run one after the other ([`gru_fwd_by_steps`]).
    fn gru_fwd(&mut self, seg: &Segments, hidden: usize, runs: [GruRunFwd<'_>; 2], out: &mut Tensor) -> Result<()> {
        gru_fwd_by_steps(self, seg, hidden, runs, out)
    }
    /// Both directions' backward recurrences (over `dout [tokens, 2H]`), as [`Backend::gru_fwd`]
    /// runs the forward ones; by default [`gru_bwd_by_steps`].
    fn gru_bwd(&mut self, seg: &Segments, hidden: usize, runs: [GruRunBwd<'_>; 2], dout: &Tensor) -> Result<()> {
        gru_bwd_by_steps(self, seg, hidden, runs, dout)
    }

    // ---- losses (fused: loss and gradient in one pass) ---------------------------------
    /// Mean sigmoid binary cross-entropy over all `[n, C]` entries, written to `loss[0]` on
    /// the device (no host read); the gradient of that mean (times `scale`) overwrites the
    /// logits.
    fn bce_with_logits_into(&mut self, logits: &mut Tensor, targets: &Tensor, scale: f32, loss: ViewMut) -> Result<()>;
    /// Mean softmax cross-entropy over rows, written to `loss[0]` on the device; the gradient
    /// of that mean (times `scale`) overwrites the logits. A row whose target is
    /// [`IGNORE_TARGET`] has neither loss nor gradient and is not counted in the mean (the
    /// padding of a masked-row bucket, `model/staged.rs`).
    fn cross_entropy_into(&mut self, logits: &mut Tensor, targets: &Ids, scale: f32, loss: ViewMut) -> Result<()>;
    /// [`Backend::bce_with_logits_into`], read back (one host sync).
    fn bce_with_logits(&mut self, logits: &mut Tensor, targets: &Tensor, scale: f32) -> Result<f32> {
        let mut loss = self.alloc(&[1])?;
        self.bce_with_logits_into(logits, targets, scale, loss.view_mut())?;
        Ok(self.download(loss.view())?[0])
    }
    /// [`Backend::cross_entropy_into`], read back (one host sync).
    fn cross_entropy(&mut self, logits: &mut Tensor, targets: &Ids, scale: f32) -> Result<f32> {
        let mut loss = self.alloc(&[1])?;
        self.cross_entropy_into(logits, targets, scale, loss.view_mut())?;
        Ok(self.download(loss.view())?[0])
    }

    // ---- retrieval ----------------------------------------------------------------------
    /// Exact top-k by inner product: for each row of `queries [nq, dim]`, the k rows of
    /// `gallery [ng, dim]` with the largest score, best first, ties to the lower gallery id
    /// (`cpu::topk::rank_key`). Returns (ids, scores), `nq · k` each, query after query. The
    /// full score matrix is never built (the gallery is tiled). Errors for dim = 0, an empty
    /// side, a length that is not a multiple of dim, k = 0 or k > ng (no clamping). At bf16
    /// the CPU may choose candidates by a pass on bf16 operands first (`cpu::topk::
    /// top_k_keys_filtered`), but ranks by f32 scores and proves that no other row can enter:
    /// the result is the f32 top k at every precision.
    fn top_k(&mut self, queries: View, gallery: View, dim: usize, k: usize) -> Result<(Vec<u32>, Vec<f32>)>;

    // ---- optimizer ----------------------------------------------------------------------
    fn adamw(&mut self, params: ViewMut, grads: View, m: ViewMut, v: ViewMut, hp: AdamW) -> Result<()>;
    /// `Σ x²` (f32) into `out[0]`, left on the device.
    fn sum_squares_into(&mut self, x: View, out: ViewMut) -> Result<()>;
    /// Completes a step's record (`step::record`) on the device: total loss, gradient norm,
    /// clip factor and status (`step::guard`, the CPU's and the kernel's arithmetic), and
    /// appends it to `ring` at row `state[ROWS]` (`step::state`).
    fn step_guard(&mut self, record: ViewMut, state: ViewMut, ring: ViewMut, p: GuardParams) -> Result<()>;
    /// AdamW over the whole flat buffer in one pass, decaying the parameters `mask` says,
    /// every gradient times the record's clip factor; nothing changes when the record's status
    /// is not 0. β1, β2 and ε from `hp`; the step's scalars (step size, 1/√bc2, decay) from the
    /// record's `SCALARS` slots, which the host writes before the step.
    #[allow(clippy::too_many_arguments)]
    fn adamw_masked(
        &mut self,
        params: ViewMut,
        grads: View,
        m: ViewMut,
        v: ViewMut,
        mask: &DecayMask,
        hp: AdamWConstants,
        record: View,
    ) -> Result<()>;
}
