//! `impl Backend for Cuda`: shape checks (the CPU twin's, word for word in the messages) and
//! one launch per op. Attention and the GRU step live in `attention.rs` and `gru.rs`.

use super::typed::entry;
use super::{Arg, COLSUM_ROWS, Cuda, DevBuf, DevIds, MAX_GRID_Y, blocks, dev_ids, tensor_ptr, view_mut_ptr, view_ptr};
use crate::backend::{
    AdamW, AdamWConstants, AdamWScalars, Backend, Counters, DecayMask, Gemm, Graph, GraphInput, GruRunBwd, GruRunFwd,
    GruStep, GuardParams, Half, IGNORE_TARGET, Precision, Segments, check_attention, check_attention_bwd,
    check_dropout, check_gru_bwd, check_gru_fwd, check_gru_step_bwd, check_gru_step_fwd, check_layernorm_bwd,
    check_layernorm_fwd, check_top_k, check_widen, expect_cols, expect_len, f32s, rows_of, same_dtype, same_shape,
};
use crate::tensor::{DType, IdStorage, Ids, Tensor, View, ViewMut};
use crate::{Error, Result};

const THREADS: u32 = 256;

/// What dropout with probability p scales kept values by (1 for p = 0), or why p is refused.
/// The CPU's f32 expression, so kept values match bit for bit.
fn dropout_scale(p: f32) -> Result<f32> {
    check_dropout(p)?;
    Ok(1.0 / (1.0 - p))
}

/// The bound is tracked on the host at upload, so this costs no device round trip.
fn check_ids(op: &'static str, ids: &Ids, bound: usize) -> Result<()> {
    if dev_ids(ids)?.ignores() {
        return Err(Error::shape(op, format!("index {IGNORE_TARGET} (the ignore marker) is out of range (< {bound})")));
    }
    check_targets(op, ids, bound)
}

/// As `check_ids`, `IGNORE_TARGET` allowed (a target the loss skips).
fn check_targets(op: &'static str, ids: &Ids, bound: usize) -> Result<()> {
    let b = dev_ids(ids)?.bound() as usize;
    if b > bound {
        return Err(Error::shape(op, format!("index {} is out of range (< {bound})", b - 1)));
    }
    Ok(())
}

fn ptr_of(v: &View) -> Result<u64> {
    view_ptr(*v)
}

fn ptr_of_mut(v: &ViewMut) -> Result<u64> {
    view_mut_ptr(v)
}

impl Cuda {
    /// A flat elementwise launch: grid-stride over `n`.
    pub(super) fn flat(&mut self, name: &'static str, n: usize, args: &[Arg]) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.launch(name, (blocks(n, THREADS as usize).min(4096), 1, 1), (THREADS, 1, 1), 0, args)
    }

    /// `outs[i][c] += Σ_r x_i[r, c]` (one or two outputs) in one launch of `stage1`: its
    /// blocks write partial sums `[outs][parts][cols]`, and each column strip's last block to
    /// finish adds them up in a fixed order (kernels/common.cuh `colsum_finish_strip`).
    pub(super) fn column_sum(
        &mut self,
        stage1: &'static str,
        rows: usize,
        cols: usize,
        pre: &[Arg],
        outs: &[u64],
    ) -> Result<()> {
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        let parts = rows.div_ceil(COLSUM_ROWS);
        if parts > MAX_GRID_Y {
            return Err(Error::shape(
                stage1,
                format!(
                    "{rows} rows need {parts} blocks in grid y, over the GPU's {MAX_GRID_Y}: at most {} rows",
                    MAX_GRID_Y * COLSUM_ROWS
                ),
            ));
        }
        let strips = cols.div_ceil(32);
        let partial = self.scratch(parts * cols * outs.len())?;
        let counters = self.strip_counters(strips)?;
        let mut args = pre.to_vec();
        args.extend([Arg::int(stage1, rows)?, Arg::int(stage1, cols)?, Arg::tensor(&partial)?]);
        args.extend(outs.iter().map(|&o| Arg::Ptr(o)));
        args.push(counters);
        self.launch(stage1, (strips as u32, parts as u32, 1), (32, 8, 1), 0, &args)
    }

    /// Block partial sums written to scratch (left on the device: no synchronisation).
    fn partial_sums(&mut self, name: &'static str, n: usize, pre: &[Arg]) -> Result<Tensor> {
        if n == 0 {
            return self.scratch(0); // no launch; sums to 0
        }
        let nb = blocks(n, THREADS as usize).min(1024) as usize;
        let partial = self.scratch(nb)?;
        let mut args = pre.to_vec();
        args.extend([Arg::U64(n as u64), Arg::tensor(&partial)?]);
        self.launch(name, (nb as u32, 1, 1), (THREADS, 1, 1), 0, &args)?;
        Ok(partial)
    }

    /// Partial sums summed on the host in f64 (the download synchronises).
    fn host_total(&mut self, partial: &Tensor) -> Result<f64> {
        Ok(self.download(partial.view())?.iter().map(|&v| v as f64).sum())
    }

    /// The kernel of `sum_squares` alone: per-block partial sums of squares, on the device.
    /// `sum_squares` is this plus a download; the GPU benchmark times this part.
    pub fn sum_squares_partials(&mut self, x: View) -> Result<Tensor> {
        self.partial_sums("sum_squares_fwd_f32", x.len(), &[Arg::view(x)?])
    }

    /// The kernel of `bce_with_logits` alone (the gradient overwrites the logits; per-block
    /// partial loss sums stay on the device); `bce_with_logits` is this plus a download.
    pub fn bce_with_logits_partials(&mut self, logits: &mut Tensor, targets: &Tensor, scale: f32) -> Result<Tensor> {
        expect_cols("bce_with_logits", logits)?;
        same_shape("bce_with_logits", logits, targets)?;
        let n = logits.len();
        self.partial_sums("bce_with_logits_fwd_f32", n, &[Arg::tensor(logits)?, Arg::tensor(targets)?, Arg::F32(scale)])
    }

    /// The kernel of `cross_entropy` alone (the gradient overwrites the logits; the per-row
    /// losses stay on the device); `cross_entropy` is this plus a download.
    pub fn cross_entropy_rows(&mut self, logits: &mut Tensor, targets: &Ids, scale: f32) -> Result<Tensor> {
        expect_cols("cross_entropy", logits)?;
        expect_len("cross_entropy", "targets", targets.len(), logits.rows())?;
        let (rows, classes) = (logits.rows(), logits.cols());
        check_targets("cross_entropy", targets, classes)?;
        // The rows' losses, then how many rows have a target (the mean's divisor).
        let mut row_loss = self.scratch(rows + 1)?;
        if rows == 0 {
            self.fill(row_loss.view_mut(), 0.0)?;
            return Ok(row_loss);
        }
        let args = [
            Arg::tensor(logits)?,
            Arg::ids(targets)?,
            Arg::int("cross_entropy", rows)?,
            Arg::int("cross_entropy", classes)?,
            Arg::F32(scale),
            Arg::tensor(&row_loss)?,
        ];
        self.launch("cross_entropy_fwd_f32", (rows as u32, 1, 1), (THREADS, 1, 1), 0, &args)?;
        Ok(row_loss)
    }
}

impl Backend for Cuda {
    fn name(&self) -> &'static str {
        match self.precision() {
            Precision::F32 => "cuda",
            Precision::Tf32 => "cuda (tf32)",
            Precision::Bf16 => "cuda (bf16)",
        }
    }

    fn counters(&self) -> Option<Counters> {
        Some(self.counts())
    }

    fn available_memory(&self) -> Option<u64> {
        // Free on the device plus what the pool holds for reuse.
        let (free, _) = self.ctx.mem_get_info().ok()?;
        Some(free as u64 + self.pool.cached_bytes() as u64)
    }

    fn run_pooled(&mut self, f: &mut (dyn FnMut(&mut dyn Backend) -> Result<()> + Send)) -> Result<()> {
        f(self)
    }

    fn activations(&self) -> DType {
        if self.precision() == Precision::Bf16 { DType::Bf16 } else { DType::F32 }
    }

    fn upload(&mut self, data: &[f32], shape: &[usize]) -> Result<Tensor> {
        expect_len("upload", "data", data.len(), shape.iter().product())?;
        let t = self.alloc_tensor(shape)?;
        self.htod(tensor_ptr(&t)?, data, "values")?;
        Ok(t)
    }

    fn upload_ids(&mut self, data: &[u32]) -> Result<Ids> {
        let buf = DevBuf::new(&self.pool, data.len(), DType::F32)?;
        self.htod(buf.ptr(), data, "indices")?;
        let bound = data.iter().filter(|&&i| i != IGNORE_TARGET).max().map_or(0, |&m| m + 1);
        let ignores = data.contains(&IGNORE_TARGET);
        Ok(Ids { storage: IdStorage::Cuda(DevIds::new(buf, bound, ignores)) })
    }

    fn zeros(&mut self, shape: &[usize]) -> Result<Tensor> {
        let t = self.alloc_tensor(shape)?;
        let p = ptr_of(&t.view())?;
        self.memset0(p, t.len() * 4)?;
        Ok(t)
    }

    fn alloc(&mut self, shape: &[usize]) -> Result<Tensor> {
        self.alloc_tensor(shape)
    }

    fn alloc_as(&mut self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        self.alloc_typed(shape, dtype)
    }

    fn convert(&mut self, x: View, dtype: DType) -> Result<Tensor> {
        self.convert_values(x, dtype)
    }

    fn download(&mut self, x: View) -> Result<Vec<f32>> {
        self.download_values(x)
    }

    fn fill(&mut self, x: ViewMut, value: f32) -> Result<()> {
        self.fill_values(x, value)
    }

    fn copy(&mut self, src: View, dst: ViewMut) -> Result<()> {
        self.copy_values(src, dst)
    }

    fn gemm(&mut self, g: Gemm, a: View, b: View, c: ViewMut) -> Result<()> {
        self.gemm_typed(g, a, b, c)
    }

    fn gemm_bias(&mut self, g: Gemm, a: View, b: View, bias: View, c: &mut Tensor) -> Result<()> {
        self.gemm_bias_typed(g, a, b, bias, c)
    }

    fn add_bias(&mut self, y: &mut Tensor, bias: View) -> Result<()> {
        expect_cols("add_bias", y)?;
        expect_len("add_bias", "bias", bias.len(), y.cols())?;
        let n = y.len();
        let args = [Arg::tensor(y)?, Arg::view(bias)?, Arg::U64(n as u64), Arg::int("add_bias", y.cols())?];
        self.flat("add_bias_fwd_f32", n, &args)
    }

    fn bias_bwd(&mut self, dy: &Tensor, dbias: ViewMut) -> Result<()> {
        expect_cols("bias_bwd", dy)?;
        expect_len("bias_bwd", "dbias", dbias.len(), dy.cols())?;
        f32s("bias_bwd", [("dbias", dbias.dtype())])?;
        let out = ptr_of_mut(&dbias)?;
        let name = entry(dy.dtype(), "bias_bwd_f32", "bias_bwd_bf16");
        self.column_sum(name, dy.rows(), dy.cols(), &[Arg::tensor(dy)?], &[out])
    }

    fn add_assign(&mut self, y: &mut Tensor, x: &Tensor) -> Result<()> {
        same_shape("add_assign", y, x)?;
        let n = y.len();
        self.flat("add_assign_fwd_f32", n, &[Arg::tensor(y)?, Arg::tensor(x)?, Arg::U64(n as u64)])
    }

    fn scale(&mut self, x: ViewMut, s: f32) -> Result<()> {
        self.scale_values(x, s)
    }

    fn sum_squares(&mut self, x: View) -> Result<f64> {
        let partial = self.sum_squares_partials(x)?;
        self.host_total(&partial)
    }

    fn gelu_fwd(&mut self, x: &Tensor) -> Result<Tensor> {
        let y = self.alloc_tensor(x.shape())?;
        let n = x.len();
        self.flat("gelu_fwd_f32", n, &[Arg::tensor(x)?, Arg::tensor(&y)?, Arg::U64(n as u64)])?;
        Ok(y)
    }

    fn gelu_bwd(&mut self, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
        same_shape("gelu_bwd", x, dy)?;
        let dx = self.alloc_tensor(x.shape())?;
        let n = x.len();
        self.flat("gelu_bwd_f32", n, &[Arg::tensor(x)?, Arg::tensor(dy)?, Arg::tensor(&dx)?, Arg::U64(n as u64)])?;
        Ok(dx)
    }

    fn bias_gelu_dropout_fwd(&mut self, u: &mut Tensor, bias: Option<View>, p: f32, seed: u64) -> Result<Tensor> {
        let scale = dropout_scale(p)?;
        let bias = match bias {
            Some(b) => {
                expect_cols("bias_gelu_dropout_fwd", u)?;
                expect_len("bias_gelu_dropout_fwd", "bias", b.len(), u.cols())?;
                f32s("bias_gelu_dropout_fwd", [("bias", b.dtype())])?;
                Arg::view(b)?
            }
            None => Arg::Ptr(0),
        };
        let h = self.alloc_typed(u.shape(), u.dtype())?;
        let n = u.len();
        let args = [
            Arg::tensor(u)?,
            bias,
            Arg::U64(u.cols().max(1) as u64),
            Arg::tensor(&h)?,
            Arg::F32(p),
            Arg::F32(scale),
            Arg::U64(seed),
            self.salt()?,
            Arg::U64(n as u64),
        ];
        let name = entry(u.dtype(), "bias_gelu_dropout_fwd_f32", "bias_gelu_dropout_fwd_bf16");
        self.flat(name, n, &args)?;
        Ok(h)
    }

    fn gelu_dropout_bwd(&mut self, u: &Tensor, dh: Tensor, p: f32, seed: u64) -> Result<Tensor> {
        same_shape("gelu_dropout_bwd", u, &dh)?;
        same_dtype("gelu_dropout_bwd", "dh", u, &dh)?;
        let scale = dropout_scale(p)?;
        let n = u.len();
        let args = [
            Arg::tensor(u)?,
            Arg::tensor(&dh)?,
            Arg::F32(p),
            Arg::F32(scale),
            Arg::U64(seed),
            self.salt()?,
            Arg::U64(n as u64),
        ];
        self.flat(entry(u.dtype(), "gelu_dropout_bwd_f32", "gelu_dropout_bwd_bf16"), n, &args)?;
        Ok(dh)
    }

    fn gelu_dropout_bias_bwd(&mut self, u: &Tensor, dh: Tensor, p: f32, seed: u64, dbias: ViewMut) -> Result<Tensor> {
        same_shape("gelu_dropout_bias_bwd", u, &dh)?;
        same_dtype("gelu_dropout_bias_bwd", "dh", u, &dh)?;
        expect_cols("gelu_dropout_bias_bwd", &dh)?;
        expect_len("gelu_dropout_bias_bwd", "dbias", dbias.len(), dh.cols())?;
        f32s("gelu_dropout_bias_bwd", [("dbias", dbias.dtype())])?;
        let scale = dropout_scale(p)?;
        let pre = [Arg::tensor(u)?, Arg::tensor(&dh)?, Arg::F32(p), Arg::F32(scale), Arg::U64(seed), self.salt()?];
        let out = ptr_of_mut(&dbias)?;
        let name = entry(u.dtype(), "gelu_dropout_bias_bwd_f32", "gelu_dropout_bias_bwd_bf16");
        self.column_sum(name, dh.rows(), dh.cols(), &pre, &[out])?;
        Ok(dh)
    }

    fn begin_capture(&mut self, inputs: &[GraphInput]) -> Result<()> {
        super::graph::begin(self, inputs)
    }

    fn captures_graphs(&self) -> bool {
        true
    }

    fn end_capture(&mut self) -> Result<Graph> {
        super::graph::end(self)
    }

    fn launch_graph(&mut self, graph: &Graph, inputs: &[&[f32]], dropout_salt: u64) -> Result<()> {
        super::graph::launch(self, graph, inputs, dropout_salt)
    }

    fn write(&mut self, dst: ViewMut, data: &[f32]) -> Result<()> {
        self.write_values(dst, data)
    }

    fn set_dropout_salt(&mut self, salt: u64) -> Result<()> {
        let dst = self.salt_ptr()?;
        self.htod(dst, &[salt], "the dropout salt")
    }

    fn dropout_fwd(&mut self, x: &mut Tensor, p: f32, seed: u64) -> Result<()> {
        let scale = dropout_scale(p)?;
        if p <= 0.0 {
            return Ok(());
        }
        let n = x.len();
        let args = [Arg::tensor(x)?, Arg::F32(p), Arg::F32(scale), Arg::U64(seed), self.salt()?, Arg::U64(n as u64)];
        self.flat("dropout_fwd_f32", n, &args)
    }

    fn dropout_bwd(&mut self, dy: &mut Tensor, p: f32, seed: u64) -> Result<()> {
        let scale = dropout_scale(p)?;
        if p <= 0.0 {
            return Ok(());
        }
        let n = dy.len();
        let args = [Arg::tensor(dy)?, Arg::F32(p), Arg::F32(scale), Arg::U64(seed), self.salt()?, Arg::U64(n as u64)];
        self.flat("dropout_bwd_f32", n, &args)
    }

    fn label_coordinates(&mut self, g: &mut Tensor) -> Result<()> {
        let n = g.len();
        self.flat("label_coordinates_f32", n, &[Arg::tensor(g)?, Arg::U64(n as u64)])
    }

    fn l2_normalize_rows(&mut self, x: &mut Tensor) -> Result<()> {
        expect_cols("l2_normalize_rows", x)?;
        let (rows, cols) = (x.rows(), x.cols());
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        let args = [Arg::tensor(x)?, Arg::int("l2_normalize_rows", rows)?, Arg::int("l2_normalize_rows", cols)?];
        self.launch("l2norm_fwd_f32", (rows.div_ceil(8) as u32, 1, 1), (THREADS, 1, 1), 0, &args)
    }

    fn gather_rows(&mut self, table: View, cols: usize, ids: &Ids) -> Result<Tensor> {
        if cols == 0 || !table.len().is_multiple_of(cols) {
            return Err(Error::shape("gather_rows", format!("table of {} values with {cols} columns", table.len())));
        }
        check_ids("gather_rows", ids, table.len() / cols)?;
        let out = self.alloc_tensor(&[ids.len(), cols])?;
        let n = ids.len() * cols;
        let args = [
            Arg::view(table)?,
            Arg::ids(ids)?,
            Arg::int("gather_rows", ids.len())?,
            Arg::int("gather_rows", cols)?,
            Arg::tensor(&out)?,
        ];
        self.flat("gather_rows_fwd_f32", n, &args)?;
        Ok(out)
    }

    fn scatter_add_rows(&mut self, dy: &Tensor, ids: &Ids, dtable: ViewMut) -> Result<()> {
        expect_cols("scatter_add_rows", dy)?;
        let cols = dy.cols();
        expect_len("scatter_add_rows", "dy", dy.rows(), ids.len())?;
        check_ids("scatter_add_rows", ids, dtable.len() / cols.max(1))?;
        if dy.is_empty() {
            return Ok(());
        }
        let args = [
            Arg::tensor(dy)?,
            Arg::ids(ids)?,
            Arg::int("scatter_add_rows", ids.len())?,
            Arg::int("scatter_add_rows", cols)?,
            Arg::view_mut(&dtable)?,
        ];
        // A thread per column and id residue mod PARTS, 8 warps of 32 columns a block
        // (kernels/rows.cu, version 3: each id's rows added in order, deterministic); PARTS a
        // power of two, the kernel's mask.
        const PARTS: u32 = 64;
        const _: () = assert!(PARTS.is_power_of_two());
        const WARPS: usize = 8; // SCATTER_WARPS
        self.launch(
            "scatter_add_rows_bwd_f32",
            (cols.div_ceil(32 * WARPS) as u32, PARTS, 1),
            (32, WARPS as u32, 1),
            0,
            &args,
        )
    }

    fn set_rows(&mut self, x: &mut Tensor, rows: &Ids, value: View) -> Result<()> {
        expect_len("set_rows", "value", value.len(), x.cols())?;
        check_ids("set_rows", rows, x.rows())?;
        let n = rows.len() * x.cols();
        let args = [
            Arg::tensor(x)?,
            Arg::ids(rows)?,
            Arg::int("set_rows", rows.len())?,
            Arg::int("set_rows", x.cols())?,
            Arg::view(value)?,
        ];
        self.flat("set_rows_fwd_f32", n, &args)
    }

    fn set_rows_bwd(&mut self, dx: &mut Tensor, rows: &Ids, dvalue: ViewMut) -> Result<()> {
        expect_len("set_rows_bwd", "dvalue", dvalue.len(), dx.cols())?;
        check_ids("set_rows_bwd", rows, dx.rows())?;
        let cols = dx.cols();
        if cols == 0 || rows.is_empty() {
            return Ok(());
        }
        let args = [
            Arg::tensor(dx)?,
            Arg::ids(rows)?,
            Arg::int("set_rows_bwd", rows.len())?,
            Arg::int("set_rows_bwd", cols)?,
            Arg::view_mut(&dvalue)?,
        ];
        self.launch("set_rows_bwd_f32", (blocks(cols, THREADS as usize), 1, 1), (THREADS, 1, 1), 0, &args)
    }

    fn segment_mean_fwd(&mut self, x: &Tensor, seg: &Segments) -> Result<Tensor> {
        expect_cols("segment_mean_fwd", x)?;
        rows_of("segment_mean_fwd", x, seg)?;
        self.per_item("segment_mean_fwd", "segment_mean_fwd_f32", x, seg, seg.items())
    }

    fn position_table(&mut self, rows: usize, dim: usize) -> Result<Tensor> {
        self.kept_positions(rows, dim)
    }

    fn segment_rows(&mut self, table: &Tensor, seg: &Segments) -> Result<Tensor> {
        self.rows_by_position(table, seg)
    }

    fn segment_rows_bwd(&mut self, dy: &Tensor, seg: &Segments, rows: usize) -> Result<Tensor> {
        self.rows_by_position_bwd(dy, seg, rows)
    }

    fn widen_features(
        &mut self,
        words: View,
        half: Half,
        rows: usize,
        dim: usize,
        norm: Option<(&[f32], &[f32])>,
    ) -> Result<Tensor> {
        let n = check_widen(words.len(), rows, dim, norm)?;
        let norm = match norm {
            Some((mean, inv_std)) => Arg::Ptr(self.input_norm(mean, inv_std)?),
            None => Arg::Ptr(0),
        };
        let out = self.alloc_tensor(&[rows, dim])?;
        if n == 0 {
            return Ok(out);
        }
        let args = [
            Arg::view(words)?,
            Arg::I32((half == Half::Bf16) as i32),
            Arg::int("widen_features", n)?,
            Arg::int("widen_features", dim)?,
            norm,
            Arg::tensor(&out)?,
        ];
        self.launch("widen_features_f32", (blocks(n.div_ceil(2), 256), 1, 1), (256, 1, 1), 0, &args)?;
        Ok(out)
    }

    fn segment_mean_bwd(&mut self, dy: &Tensor, seg: &Segments) -> Result<Tensor> {
        expect_cols("segment_mean_bwd", dy)?;
        expect_len("segment_mean_bwd", "dy rows", dy.rows(), seg.items())?;
        self.per_item("segment_mean_bwd", "segment_mean_bwd_f32", dy, seg, seg.tokens())
    }

    fn layernorm_fwd(&mut self, x: &Tensor, gamma: View, beta: View, eps: f32) -> Result<(Tensor, Tensor)> {
        check_layernorm_fwd("layernorm_fwd", x, &gamma, &beta)?;
        let (rows, d) = (x.rows(), x.cols());
        let y = self.alloc_typed(x.shape(), x.dtype())?;
        let stats = self.alloc_tensor(&[rows, 2])?;
        if rows == 0 || d == 0 {
            return Ok((y, stats));
        }
        let args = [
            Arg::tensor(x)?,
            Arg::view(gamma)?,
            Arg::view(beta)?,
            Arg::F32(eps),
            Arg::int("layernorm_fwd", rows)?,
            Arg::int("layernorm_fwd", d)?,
            Arg::tensor(&y)?,
            Arg::tensor(&stats)?,
        ];
        let name = entry(x.dtype(), "layernorm_fwd_f32", "layernorm_fwd_bf16");
        self.launch(name, (rows.div_ceil(8) as u32, 1, 1), (THREADS, 1, 1), 0, &args)?;
        Ok((y, stats))
    }

    fn layernorm_bwd(
        &mut self,
        x: &Tensor,
        stats: &Tensor,
        gamma: View,
        dy: &Tensor,
        dgamma: ViewMut,
        dbeta: ViewMut,
    ) -> Result<Tensor> {
        check_layernorm_bwd(x, stats, &gamma, dy, &dgamma, &dbeta)?;
        // The join's backward with no dropout and no da: dgamma and dbeta come from the row
        // pass's partial sums, not a second read of x and dy (5 passes over the activation
        // forward and backward, not 7).
        super::norm::rows_backward(self, x, stats, gamma, dy, (dgamma, dbeta, None), None, (0.0, 0))
    }

    fn residual_layernorm_fwd(
        &mut self,
        a: &mut Tensor,
        x: &Tensor,
        gamma: View,
        beta: View,
        eps: f32,
        p: f32,
        seed: u64,
    ) -> Result<(Tensor, Tensor)> {
        super::norm::forward(self, a, x, gamma, beta, eps, p, seed)
    }

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
    ) -> Result<(Tensor, Tensor)> {
        super::norm::backward(self, s, stats, gamma, dy, dgamma, dbeta, dbias, p, seed)
    }

    fn attention_fwd(&mut self, qkv: &Tensor, seg: &Segments, heads: usize) -> Result<(Tensor, Tensor)> {
        check_attention("attention_fwd", qkv, seg, heads)?;
        super::attention::forward(self, qkv, seg, heads)
    }

    fn attention_bwd(
        &mut self,
        qkv: &Tensor,
        probs: &Tensor,
        seg: &Segments,
        heads: usize,
        dout: &Tensor,
        dbias: Option<ViewMut>,
    ) -> Result<Tensor> {
        check_attention_bwd(qkv, probs, seg, heads, dout, dbias.as_ref())?;
        super::attention::backward(self, qkv, probs, seg, heads, dout, dbias)
    }

    fn gru_fwd(&mut self, seg: &Segments, hidden: usize, runs: [GruRunFwd<'_>; 2], out: &mut Tensor) -> Result<()> {
        if seg.max_len == 0 {
            return Ok(());
        }
        check_gru_fwd(seg, hidden, &runs, out)?;
        super::gru::recurrence_fwd(self, seg, hidden, runs, out)
    }

    fn gru_bwd(&mut self, seg: &Segments, hidden: usize, runs: [GruRunBwd<'_>; 2], dout: &Tensor) -> Result<()> {
        if seg.max_len == 0 {
            return Ok(());
        }
        check_gru_bwd(seg, hidden, &runs, dout)?;
        super::gru::recurrence_bwd(self, seg, hidden, runs, dout)
    }

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
    ) -> Result<()> {
        check_gru_step_fwd(step, seg, xproj, hproj.len(), bias_hh.len(), hs, out, gates)?;
        super::gru::step_fwd(self, step, seg, xproj, hproj.view(), bias_hh, hs.view_mut(), out, gates)
    }

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
    ) -> Result<()> {
        check_gru_step_bwd(step, seg, gates, hs, dout, dh, dxproj, dhproj)?;
        super::gru::step_bwd(self, step, seg, gates, hs, dout, dh.view_mut(), dxproj, dhproj.view_mut())
    }

    fn bce_with_logits_into(&mut self, logits: &mut Tensor, targets: &Tensor, scale: f32, loss: ViewMut) -> Result<()> {
        expect_len("bce_with_logits", "loss", loss.len(), 1)?;
        let partial = self.bce_with_logits_partials(logits, targets, scale)?;
        self.finish_sum(&partial, logits.len(), &loss)
    }

    fn cross_entropy_into(&mut self, logits: &mut Tensor, targets: &Ids, scale: f32, loss: ViewMut) -> Result<()> {
        expect_len("cross_entropy", "loss", loss.len(), 1)?;
        let row_loss = self.cross_entropy_rows(logits, targets, scale)?;
        self.finish_mean_counted(&row_loss, &loss)
    }

    fn top_k(&mut self, queries: View, gallery: View, dim: usize, k: usize) -> Result<(Vec<u32>, Vec<f32>)> {
        let (nq, ng) = check_top_k(queries.len(), gallery.len(), dim, k)?;
        self.top_k_tiled(queries, gallery, dim, k, super::topk::default_tile(nq, ng))
    }

    fn adamw(&mut self, params: ViewMut, grads: View, m: ViewMut, v: ViewMut, hp: AdamW) -> Result<()> {
        hp.check()?;
        let n = params.len();
        expect_len("adamw", "grads", grads.len(), n)?;
        expect_len("adamw", "m", m.len(), n)?;
        expect_len("adamw", "v", v.len(), n)?;
        // The CPU's host-side constants (one definition: `AdamW::scalars`).
        let AdamWScalars { step_size, inv_sqrt_bc2, decay } = hp.scalars();
        let args = [
            Arg::view_mut(&params)?,
            Arg::view(grads)?,
            Arg::view_mut(&m)?,
            Arg::view_mut(&v)?,
            Arg::U64(n as u64),
            Arg::F32(hp.beta1),
            Arg::F32(hp.beta2),
            Arg::F32(hp.eps),
            Arg::F32(step_size),
            Arg::F32(inv_sqrt_bc2),
            Arg::F32(decay),
            Arg::F32(hp.grad_scale),
        ];
        self.flat("adamw_fwd_f32", n, &args)
    }

    fn sum_squares_into(&mut self, x: View, out: ViewMut) -> Result<()> {
        super::step::sum_squares_into(self, x, out)
    }

    fn step_guard(&mut self, record: ViewMut, state: ViewMut, ring: ViewMut, p: GuardParams) -> Result<()> {
        super::step::step_guard(self, record, state, ring, p)
    }

    fn adamw_masked(
        &mut self,
        params: ViewMut,
        grads: View,
        m: ViewMut,
        v: ViewMut,
        mask: &DecayMask,
        hp: AdamWConstants,
        record: View,
    ) -> Result<()> {
        super::step::adamw_masked(self, params, grads, m, v, mask, hp, record)
    }
}
