//! The CPU backend: the reference implementation of every op, and the device the tests,
//! CI and embedded inference run on. Kernels live one concern per file as plain functions
//! over slices; this file only checks shapes and dispatches.

#[cfg(target_arch = "x86_64")]
pub mod amx;
pub mod attention;
pub mod dispatch;
pub mod elementwise;
pub mod frozen;
pub mod gemm;
pub mod gru;
pub mod inputs;
pub mod layernorm;
pub mod losses;
pub mod microkernel;
pub mod operands;
pub mod optim;
pub mod pack;
pub mod positions;
pub mod profile;
pub mod simd;
pub mod store;
pub mod topk;
pub mod typed;

use super::{
    AdamW, AdamWConstants, Backend, DecayMask, Gemm, GruRunBwd, GruRunFwd, GruStep, GuardParams, Half, Precision,
    Segments, check_adamw_masked, check_attention, check_attention_bwd, check_dropout, check_gemm, check_gemm_bias,
    check_gemm_types, check_gru_bwd, check_gru_fwd, check_gru_step_bwd, check_gru_step_fwd, check_layernorm_bwd,
    check_layernorm_fwd, check_residual_layernorm_bwd, check_residual_layernorm_fwd, check_segment_rows_bwd,
    check_segment_table, check_step_guard, check_top_k, check_widen, expect_cols, expect_dtype, expect_len, f32s,
    rows_of, same_dtype, same_shape,
};
use crate::tensor::{DType, Ids, Tensor, View, ViewMut, host_pool};
use crate::{Error, Result};
use typed::{in_f32, input, output, retyped, stored, tensor_in_f32, wide};

/// The op timer's name of a GEMM, by the role its transposes give it in the model: a layer's
/// input gradient dY·W (`gemm dY·W`), its weight gradient dYᵀ·X (`gemm dYᵀ·X`), the forward
/// without a bias (`gemm x·Wᵀ`).
fn gemm_name(g: Gemm) -> &'static str {
    match (g.trans_a, g.trans_b) {
        (false, true) => "gemm x·Wᵀ",
        (false, false) => "gemm dY·W",
        (true, false) => "gemm dYᵀ·X",
        (true, true) => "gemm Aᵀ·Bᵀ",
    }
}

#[derive(Debug, Default)]
pub struct Cpu {
    /// The arithmetic of `gemm` (the model's layers); every other op is fp32.
    precision: Precision,
    /// Weights of frozen parameters, packed for the GEMM once (`Backend::freeze`).
    frozen: frozen::FrozenOperands,
    /// `Backend::set_dropout_salt`, XORed into every dropout seed.
    dropout_salt: u64,
    /// The position encodings `Backend::position_table` copies rows of, kept between calls.
    positions: positions::Table,
}

impl Cpu {
    pub fn new() -> Self {
        Cpu::default()
    }

    /// A CPU whose layer GEMMs run at `precision` (bf16: AVX-512 BF16 where the CPU has it,
    /// the path's fp32 kernel on operands rounded to bf16 elsewhere). TF32 is refused: no CPU unit has it.
    pub fn with_precision(precision: Precision) -> Result<Self> {
        if precision == Precision::Tf32 {
            return Err(Error::config(
                "precision tf32 is CUDA's tensor-core arithmetic: the CPU computes fp32 or bf16 (--precision fp32|bf16)",
            ));
        }
        Ok(Cpu { precision, ..Cpu::default() })
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Bytes of frozen weights kept packed for the GEMM (`Backend::freeze`), those of weights
    /// dropped since (and of their bf16 copies) let go first.
    pub fn packed_bytes(&mut self) -> usize {
        self.frozen.bytes()
    }

    /// B of a layer GEMM `g` as it is multiplied: at the layers' precision, whatever the rows
    /// (`Precision`), with its packed slivers kept when b is a frozen weight.
    fn operand<'a>(&mut self, g: Gemm, b: gemm::Input<'a>) -> Result<gemm::Operand<'a>> {
        let (kernels, precision) = (dispatch::active()?, self.precision);
        let packed = self.frozen.packed_b(kernels, precision, g, b);
        Ok(gemm::Operand { kernels, precision, b, packed })
    }

    /// [`Cpu::operand`] for a B that one call multiplies by many times (the GRU's W_hh, once
    /// per step): packed once for the call when it is not frozen, instead of once per product
    /// (48 packings of W_hh per direction and step of a training batch). The same slivers, so
    /// the same bits.
    fn operand_for_run<'a>(&mut self, g: Gemm, b: gemm::Input<'a>) -> Result<gemm::Operand<'a>> {
        let mut operand = self.operand(g, b)?;
        if operand.packed.is_none() {
            operand.packed = gemm::PackedB::new(operand.kernels, operand.precision, g, b).map(std::sync::Arc::new);
        }
        Ok(operand)
    }
}

fn check_ids(op: &'static str, ids: &[u32], bound: usize) -> Result<()> {
    if let Some((i, &id)) = ids.iter().enumerate().find(|&(_, &id)| id as usize >= bound) {
        return Err(Error::shape(op, format!("index {id} at position {i} is out of range (< {bound})")));
    }
    Ok(())
}

fn dropout(x: &mut Tensor, p: f32, seed: u64) -> Result<()> {
    dropout_rule(p, seed)?;
    tensor_in_f32(x, |x| elementwise::dropout(x, p, seed));
    Ok(())
}

/// The rule of a dropout with probability p (None: p = 0), or why p is refused.
fn dropout_rule(p: f32, seed: u64) -> Result<Option<elementwise::DropoutRule>> {
    check_dropout(p)?;
    Ok(elementwise::DropoutRule::new(p, seed))
}

impl Backend for Cpu {
    fn on_host(&self) -> bool {
        true
    }

    /// "cpu (avx2)": the device and the kernels' path (dispatch.rs), so that every command
    /// and bench that prints the device says which path ran; ", bf16" when the layers are.
    fn name(&self) -> &'static str {
        use dispatch::CpuPath::*;
        match (dispatch::current().path(), self.precision == Precision::Bf16) {
            (Amx, false) => "cpu (amx)",
            (Avx512, false) => "cpu (avx512)",
            (Avx2, false) => "cpu (avx2)",
            (Portable, false) => "cpu (portable)",
            (Amx, true) => "cpu (amx, bf16)",
            (Avx512, true) => "cpu (avx512, bf16)",
            (Avx2, true) => "cpu (avx2, bf16)",
            (Portable, true) => "cpu (portable, bf16)",
        }
    }

    fn available_memory(&self) -> Option<u64> {
        crate::io::host_available_memory()
    }

    fn run_pooled(&mut self, f: &mut (dyn FnMut(&mut dyn Backend) -> Result<()> + Send)) -> Result<()> {
        if rayon::current_thread_index().is_some() {
            return f(self);
        }
        // From outside the pool `scope` hands its body to a worker and waits once.
        let dev = self;
        rayon::scope(|_| f(dev))
    }

    fn activations(&self) -> DType {
        if self.precision == Precision::Bf16 { DType::Bf16 } else { DType::F32 }
    }

    fn upload(&mut self, data: &[f32], shape: &[usize]) -> Result<Tensor> {
        let _timer = profile::time("upload");
        expect_len("upload", "data", data.len(), shape.iter().product())?;
        let mut v = host_pool::dirty(data.len());
        v.copy_from_slice(data);
        Ok(Tensor::from_cpu(v, shape))
    }

    fn freeze(&mut self, params: Tensor) -> Result<Tensor> {
        let params = params.freeze();
        if let Some(memory) = params.frozen() {
            self.frozen.register(memory);
        }
        Ok(params)
    }

    fn upload_ids(&mut self, data: &[u32]) -> Result<Ids> {
        let _timer = profile::time("upload_ids");
        Ok(Ids::from_cpu(data.to_vec()))
    }

    fn zeros(&mut self, shape: &[usize]) -> Result<Tensor> {
        let _timer = profile::time("zeros");
        Ok(Tensor::from_cpu(host_pool::zeroed(shape.iter().product()), shape))
    }

    fn alloc(&mut self, shape: &[usize]) -> Result<Tensor> {
        self.alloc_as(shape, DType::F32)
    }

    fn alloc_as(&mut self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let _timer = profile::time("alloc");
        Ok(Tensor::cpu_dirty(shape, dtype))
    }

    fn convert(&mut self, x: View, dtype: DType) -> Result<Tensor> {
        let _timer = profile::time("convert");
        if let (View::Cpu(values), DType::Bf16) = (x, dtype) {
            // A loaded model's bf16 weights: copied (and packed) once, not once per pass.
            if let Some(copy) = self.frozen.bf16_copy(values) {
                return Ok(copy);
            }
        }
        let mut y = self.alloc_as(&[x.len()], dtype)?;
        match (x, y.view_mut()) {
            (View::CpuBf16(x), ViewMut::CpuBf16(y)) => y.copy_from_slice(x),
            (View::CpuBf16(x), y) => elementwise::widen(x, y.cpu()),
            (x, ViewMut::CpuBf16(y)) => elementwise::narrow(x.cpu(), y),
            (x, y) => y.cpu().copy_from_slice(x.cpu()),
        }
        Ok(y)
    }

    /// To bf16 each value rounded into 2 bytes, to f32 widened (exactly), each in a buffer of
    /// its own; x itself when it has the type already.
    fn convert_owned(&mut self, x: Tensor, dtype: DType) -> Result<Tensor> {
        let _timer = profile::time("convert");
        Ok(retyped(x, dtype))
    }

    fn download(&mut self, x: View) -> Result<Vec<f32>> {
        let _timer = profile::time("download");
        Ok(wide(x).to_vec())
    }

    fn fill(&mut self, x: ViewMut, value: f32) -> Result<()> {
        let _timer = profile::time("fill");
        match x {
            ViewMut::CpuBf16(bits) => bits.fill(crate::tensor::bf16_bits(value)),
            x => x.cpu().fill(value),
        }
        Ok(())
    }

    fn copy(&mut self, src: View, dst: ViewMut) -> Result<()> {
        let _timer = profile::time("copy");
        expect_len("copy", "destination", dst.len(), src.len())?;
        expect_dtype("copy", "the destination", dst.dtype(), src.dtype())?;
        match (src, dst) {
            (View::CpuBf16(src), ViewMut::CpuBf16(dst)) => dst.copy_from_slice(src),
            (src, dst) => dst.cpu().copy_from_slice(src.cpu()),
        }
        Ok(())
    }

    fn gemm(&mut self, g: Gemm, a: View, b: View, c: ViewMut) -> Result<()> {
        let _timer = profile::time_gemm(gemm_name(g), (g.m, g.k, g.n));
        check_gemm(&g, a.len(), b.len(), c.len())?;
        check_gemm_types("gemm", a.dtype(), b.dtype())?;
        self.operand(g, input(b))?.gemm_typed(g, input(a), None, output(c));
        Ok(())
    }

    fn gemm_bias(&mut self, g: Gemm, a: View, b: View, bias: View, c: &mut Tensor) -> Result<()> {
        let _timer = profile::time_gemm("gemm x·Wᵀ+b", (g.m, g.k, g.n));
        check_gemm_bias(&g, &a, &b, &bias, c)?;
        let bias = wide(bias);
        self.operand(g, input(b))?.gemm_typed(g, input(a), Some(&bias), output(c.view_mut()));
        Ok(())
    }

    /// `gemm_bias`, then GELU in c's memory: applied to each tile as the micro-kernel stored it,
    /// the same values took longer (1,843–1,916 µs against 1,379–1,710 for this pass on 1152 ×
    /// 256 × 512 bf16, one core, session 33).
    fn gemm_bias_gelu(&mut self, g: Gemm, a: View, b: View, bias: View, c: &mut Tensor) -> Result<()> {
        self.gemm_bias(g, a, b, bias, c)?;
        let _timer = profile::time("gelu_in_place");
        match c.view_mut() {
            ViewMut::CpuBf16(bits) => elementwise::gelu_bf16_in_place(bits),
            c => elementwise::gelu_in_place(c.cpu(), DType::F32),
        }
        Ok(())
    }

    fn add_bias(&mut self, y: &mut Tensor, bias: View) -> Result<()> {
        let _timer = profile::time("add_bias");
        expect_cols("add_bias", y)?;
        expect_len("add_bias", "bias", bias.len(), y.cols())?;
        let bias = wide(bias);
        tensor_in_f32(y, |y| elementwise::add_bias(y, &bias));
        Ok(())
    }

    fn bias_bwd(&mut self, dy: &Tensor, dbias: ViewMut) -> Result<()> {
        let _timer = profile::time("bias_bwd");
        expect_cols("bias_bwd", dy)?;
        expect_len("bias_bwd", "dbias", dbias.len(), dy.cols())?;
        f32s("bias_bwd", [("dbias", dbias.dtype())])?;
        elementwise::bias_bwd(&wide(dy.view()), dbias.cpu());
        Ok(())
    }

    fn add_assign(&mut self, y: &mut Tensor, x: &Tensor) -> Result<()> {
        let _timer = profile::time("add_assign");
        same_shape("add_assign", y, x)?;
        let x = wide(x.view());
        tensor_in_f32(y, |y| elementwise::add_assign(y, &x));
        Ok(())
    }

    fn scale(&mut self, x: ViewMut, s: f32) -> Result<()> {
        let _timer = profile::time("scale");
        in_f32(x, |x| x.iter_mut().for_each(|v| *v *= s));
        Ok(())
    }

    fn sum_squares(&mut self, x: View) -> Result<f64> {
        let _timer = profile::time("sum_squares");
        Ok(optim::sum_squares(&wide(x)))
    }

    fn gelu_fwd(&mut self, x: &Tensor) -> Result<Tensor> {
        let _timer = profile::time("gelu_fwd");
        Ok(Tensor::from_cpu(elementwise::gelu_fwd(&wide(x.view())), x.shape()))
    }

    fn gelu_bwd(&mut self, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
        let _timer = profile::time("gelu_bwd");
        same_shape("gelu_bwd", x, dy)?;
        Ok(Tensor::from_cpu(elementwise::gelu_bwd(&wide(x.view()), &wide(dy.view())), x.shape()))
    }

    fn bias_gelu_dropout_fwd(&mut self, u: &mut Tensor, bias: Option<View>, p: f32, seed: u64) -> Result<Tensor> {
        let _timer = profile::time("bias_gelu_dropout_fwd");
        let rule = dropout_rule(p, seed ^ self.dropout_salt)?;
        if let Some(b) = bias {
            expect_cols("bias_gelu_dropout_fwd", u)?;
            expect_len("bias_gelu_dropout_fwd", "bias", b.len(), u.cols())?;
            f32s("bias_gelu_dropout_fwd", [("bias", b.dtype())])?;
        }
        let cols = u.cols().max(1);
        let (shape, store) = (u.shape().to_vec(), u.dtype());
        let bias = bias.map(wide);
        let h = tensor_in_f32(u, |u| elementwise::bias_gelu_dropout(u, bias.as_deref(), cols, rule, store));
        Ok(stored(h, &shape, store))
    }

    fn gelu_dropout_bwd(&mut self, u: &Tensor, mut dh: Tensor, p: f32, seed: u64) -> Result<Tensor> {
        let _timer = profile::time("gelu_dropout_bwd");
        same_shape("gelu_dropout_bwd", u, &dh)?;
        same_dtype("gelu_dropout_bwd", "dh", u, &dh)?;
        let rule = dropout_rule(p, seed ^ self.dropout_salt)?;
        let (store, u) = (u.dtype(), wide(u.view()));
        tensor_in_f32(&mut dh, |dh| elementwise::dropout_gelu_bwd(&u, dh, rule, store));
        Ok(dh)
    }

    fn write(&mut self, dst: ViewMut, data: &[f32]) -> Result<()> {
        expect_len("write", "data", data.len(), dst.len())?;
        match dst {
            ViewMut::CpuBf16(bits) => elementwise::narrow(data, bits),
            dst => dst.cpu().copy_from_slice(data),
        }
        Ok(())
    }

    fn set_dropout_salt(&mut self, salt: u64) -> Result<()> {
        self.dropout_salt = salt;
        Ok(())
    }

    fn dropout_fwd(&mut self, x: &mut Tensor, p: f32, seed: u64) -> Result<()> {
        let _timer = profile::time("dropout_fwd");
        dropout(x, p, seed ^ self.dropout_salt)
    }

    fn dropout_bwd(&mut self, dy: &mut Tensor, p: f32, seed: u64) -> Result<()> {
        let _timer = profile::time("dropout_bwd");
        dropout(dy, p, seed ^ self.dropout_salt) // the same mask (same seed) on the gradient
    }

    fn label_coordinates(&mut self, g: &mut Tensor) -> Result<()> {
        let _timer = profile::time("label_coordinates");
        f32s("label_coordinates", [("g", g.dtype())])?;
        elementwise::label_coordinates(g.cpu_mut());
        Ok(())
    }

    fn l2_normalize_rows(&mut self, x: &mut Tensor) -> Result<()> {
        let _timer = profile::time("l2_normalize_rows");
        expect_cols("l2_normalize_rows", x)?;
        let cols = x.cols();
        elementwise::l2_normalize_rows(x.cpu_mut(), cols);
        Ok(())
    }

    fn gather_rows(&mut self, table: View, cols: usize, ids: &Ids) -> Result<Tensor> {
        let _timer = profile::time("gather_rows");
        if cols == 0 || !table.len().is_multiple_of(cols) {
            return Err(Error::shape("gather_rows", format!("table of {} values with {cols} columns", table.len())));
        }
        check_ids("gather_rows", ids.cpu(), table.len() / cols)?;
        Ok(Tensor::from_cpu(elementwise::gather_rows(&wide(table), cols, ids.cpu()), &[ids.len(), cols]))
    }

    fn scatter_add_rows(&mut self, dy: &Tensor, ids: &Ids, dtable: ViewMut) -> Result<()> {
        let _timer = profile::time("scatter_add_rows");
        expect_cols("scatter_add_rows", dy)?;
        let cols = dy.cols();
        expect_len("scatter_add_rows", "dy", dy.rows(), ids.len())?;
        check_ids("scatter_add_rows", ids.cpu(), dtable.len() / cols.max(1))?;
        elementwise::scatter_add_rows(&wide(dy.view()), cols, ids.cpu(), dtable.cpu());
        Ok(())
    }

    fn set_rows(&mut self, x: &mut Tensor, rows: &Ids, value: View) -> Result<()> {
        let _timer = profile::time("set_rows");
        expect_len("set_rows", "value", value.len(), x.cols())?;
        check_ids("set_rows", rows.cpu(), x.rows())?;
        elementwise::set_rows(x.cpu_mut(), rows.cpu(), value.cpu());
        Ok(())
    }

    fn set_rows_bwd(&mut self, dx: &mut Tensor, rows: &Ids, dvalue: ViewMut) -> Result<()> {
        let _timer = profile::time("set_rows_bwd");
        expect_len("set_rows_bwd", "dvalue", dvalue.len(), dx.cols())?;
        check_ids("set_rows_bwd", rows.cpu(), dx.rows())?;
        elementwise::set_rows_bwd(dx.cpu_mut(), rows.cpu(), dvalue.cpu());
        Ok(())
    }

    fn segment_mean_fwd(&mut self, x: &Tensor, seg: &Segments) -> Result<Tensor> {
        let _timer = profile::time("segment_mean_fwd");
        rows_of("segment_mean_fwd", x, seg)?;
        expect_cols("segment_mean_fwd", x)?;
        let y = elementwise::segment_mean_fwd(&wide(x.view()), x.cols(), &seg.offsets);
        Ok(Tensor::from_cpu(y, &[seg.items(), x.cols()]))
    }

    fn widen_features(
        &mut self,
        words: View,
        half: Half,
        rows: usize,
        dim: usize,
        norm: Option<(&[f32], &[f32])>,
    ) -> Result<Tensor> {
        let _timer = profile::time("widen_features");
        let n = check_widen(words.len(), rows, dim, norm)?;
        let mut out = host_pool::dirty(n);
        inputs::widen_features(words.cpu(), half, dim, norm, &mut out);
        Ok(Tensor::from_cpu(out, &[rows, dim]))
    }

    fn position_table(&mut self, rows: usize, dim: usize) -> Result<Tensor> {
        let _timer = profile::time("position_table");
        Ok(Tensor::from_cpu(self.positions.rows(rows, dim).to_vec(), &[rows, dim]))
    }

    fn segment_rows(&mut self, table: &Tensor, seg: &Segments) -> Result<Tensor> {
        let _timer = profile::time("segment_rows");
        check_segment_table(table, seg)?;
        let d = table.cols();
        Ok(Tensor::from_cpu(positions::segment_rows(table.cpu(), d, &seg.offsets), &[seg.tokens(), d]))
    }

    fn segment_rows_bwd(&mut self, dy: &Tensor, seg: &Segments, rows: usize) -> Result<Tensor> {
        let _timer = profile::time("segment_rows_bwd");
        check_segment_rows_bwd(dy, seg, rows)?;
        let d = dy.cols();
        Ok(Tensor::from_cpu(positions::segment_rows_bwd(dy.cpu(), d, &seg.offsets, rows), &[rows, d]))
    }

    fn segment_mean_bwd(&mut self, dy: &Tensor, seg: &Segments) -> Result<Tensor> {
        let _timer = profile::time("segment_mean_bwd");
        expect_len("segment_mean_bwd", "dy rows", dy.rows(), seg.items())?;
        expect_cols("segment_mean_bwd", dy)?;
        let dx = elementwise::segment_mean_bwd(&wide(dy.view()), dy.cols(), &seg.offsets);
        Ok(Tensor::from_cpu(dx, &[seg.tokens(), dy.cols()]))
    }

    fn layernorm_fwd(&mut self, x: &Tensor, gamma: View, beta: View, eps: f32) -> Result<(Tensor, Tensor)> {
        let _timer = profile::time("layernorm_fwd");
        check_layernorm_fwd("layernorm_fwd", x, &gamma, &beta)?;
        let (y, stats) = layernorm::forward(&wide(x.view()), &wide(gamma), &wide(beta), eps, x.dtype());
        Ok((stored(y, x.shape(), x.dtype()), Tensor::from_cpu(stats, &[x.rows(), 2])))
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
        let _timer = profile::time("layernorm_bwd");
        check_layernorm_bwd(x, stats, &gamma, dy, &dgamma, &dbeta)?;
        let (store, shape) = (x.dtype(), x.shape().to_vec());
        let (x, gamma, dy) = (wide(x.view()), wide(gamma), wide(dy.view()));
        let dx = layernorm::backward(&x, stats.cpu(), &gamma, &dy, dgamma.cpu(), dbeta.cpu(), store);
        Ok(stored(dx, &shape, store))
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
        let _timer = profile::time("residual_layernorm_fwd");
        check_residual_layernorm_fwd("residual_layernorm_fwd", a, x, &gamma, &beta)?;
        let rule = dropout_rule(p, seed ^ self.dropout_salt)?;
        let (shape, rows, store) = (a.shape().to_vec(), a.rows(), a.dtype());
        let (x, gamma, beta) = (wide(x.view()), wide(gamma), wide(beta));
        let (y, stats) = tensor_in_f32(a, |a| layernorm::residual_forward(a, &x, &gamma, &beta, eps, rule, store));
        Ok((stored(y, &shape, store), Tensor::from_cpu(stats, &[rows, 2])))
    }

    fn residual_layernorm(&mut self, mut a: Tensor, x: &Tensor, gamma: View, beta: View, eps: f32) -> Result<Tensor> {
        let _timer = profile::time("residual_layernorm");
        check_residual_layernorm_fwd("residual_layernorm", &a, x, &gamma, &beta)?;
        let (gamma, beta) = (wide(gamma), wide(beta));
        match (a.view_mut(), x.view()) {
            (ViewMut::CpuBf16(a), View::CpuBf16(x)) => layernorm::residual_in_place_bf16(a, x, &gamma, &beta, eps),
            (a, x) => layernorm::residual_in_place(a.cpu(), x.cpu(), &gamma, &beta, eps, DType::F32),
        }
        Ok(a)
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
        let _timer = profile::time("residual_layernorm_bwd");
        check_residual_layernorm_bwd(s, stats, &gamma, dy, &dgamma, &dbeta, dbias.as_ref())?;
        let rule = dropout_rule(p, seed ^ self.dropout_salt)?;
        let (store, shape) = (s.dtype(), s.shape().to_vec());
        let (s, gamma, dy) = (wide(s.view()), wide(gamma), wide(dy.view()));
        let (dx, da) =
            layernorm::residual_backward(&s, stats.cpu(), &gamma, &dy, dgamma.cpu(), dbeta.cpu(), rule, store);
        if let Some(b) = dbias {
            elementwise::bias_bwd(&da, b.cpu());
        }
        Ok((stored(dx, &shape, store), stored(da, &shape, store)))
    }

    fn attention_fwd(&mut self, qkv: &Tensor, seg: &Segments, heads: usize) -> Result<(Tensor, Tensor)> {
        let _timer = profile::time("attention_fwd");
        check_attention("attention_fwd", qkv, seg, heads)?;
        dispatch::active()?;
        // The probabilities come back as stored already: P V multiplied them so.
        let store = qkv.dtype();
        let (out, probs) = attention::forward(qkv.view(), &seg.offsets, heads, store);
        let n = probs.len();
        // A bf16 context is rounded as it is narrowed.
        let out = stored(out, &[seg.tokens(), qkv.cols() / 3], store);
        Ok((out, stored(probs, &[n], store)))
    }

    fn attention(&mut self, qkv: &Tensor, seg: &Segments, heads: usize) -> Result<Tensor> {
        let _timer = profile::time("attention");
        check_attention("attention", qkv, seg, heads)?;
        dispatch::active()?;
        Ok(attention::infer(qkv.view(), &seg.offsets, heads, qkv.dtype()))
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
        let _timer = profile::time("attention_bwd");
        check_attention_bwd(qkv, probs, seg, heads, dout, dbias.as_ref())?;
        dispatch::active()?;
        let (q, p, d) = (wide(qkv.view()), wide(probs.view()), wide(dout.view()));
        let mut dqkv = attention::backward(&q, &p, &seg.offsets, heads, &d, qkv.dtype());
        elementwise::store_as(qkv.dtype(), &mut dqkv);
        if let Some(db) = dbias {
            elementwise::bias_bwd(&dqkv, db.cpu());
        }
        Ok(stored(dqkv, qkv.shape(), qkv.dtype()))
    }

    /// Both directions at once, one per thread of the pool (each step's 32-row GEMM is
    /// latency-bound: one thread per direction instead of both threads on each GEMM).
    fn gru_fwd(&mut self, seg: &Segments, hidden: usize, runs: [GruRunFwd<'_>; 2], out: &mut Tensor) -> Result<()> {
        let _timer = profile::time("gru_fwd");
        let (items, steps) = (seg.items(), seg.max_len);
        if steps == 0 {
            return Ok(());
        }
        let g = Gemm { m: items, n: 3 * hidden, k: hidden, trans_a: false, trans_b: true, alpha: 1.0, beta: 0.0 };
        check_gru_fwd(seg, hidden, &runs, out)?;
        let mut hproj = [self.alloc(&[items, 3 * hidden])?, self.alloc(&[items, 3 * hidden])?];
        let [r0, r1] = runs;
        let (w0, w1) = (self.operand_for_run(g, input(r0.w_hh))?, self.operand_for_run(g, input(r1.w_hh))?);
        let oc = out.cols();
        let (mut forward, mut reverse) = gru::halves(out.cpu_mut(), oc, hidden);
        let [h0, h1] = &mut hproj;
        let offsets = &seg.offsets;
        let (b0, b1) = (r0.bias_hh.cpu(), r1.bias_hh.cpu());
        let (x0, x1) = (r0.xproj.cpu(), r1.xproj.cpu());
        let (hs0, g0, hs1, g1) = (r0.hs.cpu_mut(), r0.gates.cpu_mut(), r1.hs.cpu_mut(), r1.gates.cpu_mut());
        let (hp0, hp1) = (h0.cpu_mut(), h1.cpu_mut());
        rayon::join(
            || gru::recurrence_fwd(&w0, r0.reverse, offsets, steps, x0, b0, hs0, &mut forward, g0, hp0),
            || gru::recurrence_fwd(&w1, r1.reverse, offsets, steps, x1, b1, hs1, &mut reverse, g1, hp1),
        );
        Ok(())
    }

    /// Both directions at once, as `gru_fwd`.
    fn gru_bwd(&mut self, seg: &Segments, hidden: usize, runs: [GruRunBwd<'_>; 2], dout: &Tensor) -> Result<()> {
        let _timer = profile::time("gru_bwd");
        let (items, steps) = (seg.items(), seg.max_len);
        if steps == 0 {
            return Ok(());
        }
        let g = Gemm { m: items, n: hidden, k: 3 * hidden, trans_a: false, trans_b: false, alpha: 1.0, beta: 1.0 };
        check_gru_bwd(seg, hidden, &runs, dout)?;
        let [r0, r1] = runs;
        let (w0, w1) = (self.operand_for_run(g, input(r0.w_hh))?, self.operand_for_run(g, input(r1.w_hh))?);
        let (oc, offsets, dout) = (dout.cols(), &seg.offsets, dout.cpu());
        let run = |w: &gemm::Operand<'_>, r: GruRunBwd<'_>| {
            let (gates, hs) = (r.gates.cpu(), r.hs.cpu());
            let (dh, dxproj, dhproj) = (r.dh.cpu_mut(), r.dxproj.cpu_mut(), r.dhproj.cpu_mut());
            gru::recurrence_bwd(w, r.reverse, offsets, steps, gates, hs, dout, oc, hidden, dh, dxproj, dhproj)
        };
        rayon::join(|| run(&w0, r0), || run(&w1, r1));
        Ok(())
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
        let _timer = profile::time("gru_step_fwd");
        check_gru_step_fwd(step, seg, xproj, hproj.len(), bias_hh.len(), hs, out, gates)?;
        let oc = out.cols();
        let mut rows = gru::column_rows(out.cpu_mut(), oc, step.out_col, step.hidden);
        gru::step_fwd(
            step,
            &seg.offsets,
            xproj.cpu(),
            hproj.cpu(),
            bias_hh.cpu(),
            hs.cpu_mut(),
            &mut rows,
            gates.cpu_mut(),
        );
        Ok(())
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
        let _timer = profile::time("gru_step_bwd");
        check_gru_step_bwd(step, seg, gates, hs, dout, dh, dxproj, dhproj)?;
        let oc = dout.cols();
        gru::step_bwd(
            step,
            &seg.offsets,
            gates.cpu(),
            hs.cpu(),
            dout.cpu(),
            oc,
            dh.cpu_mut(),
            dxproj.cpu_mut(),
            dhproj.cpu_mut(),
        );
        Ok(())
    }

    fn bce_with_logits_into(&mut self, logits: &mut Tensor, targets: &Tensor, scale: f32, loss: ViewMut) -> Result<()> {
        let _timer = profile::time("bce_with_logits");
        same_shape("bce_with_logits", logits, targets)?;
        expect_cols("bce_with_logits", logits)?;
        expect_len("bce_with_logits", "loss", loss.len(), 1)?;
        loss.cpu()[0] = losses::bce_with_logits(logits.cpu_mut(), targets.cpu(), scale);
        Ok(())
    }

    fn cross_entropy_into(&mut self, logits: &mut Tensor, targets: &Ids, scale: f32, loss: ViewMut) -> Result<()> {
        let _timer = profile::time("cross_entropy");
        expect_len("cross_entropy", "targets", targets.len(), logits.rows())?;
        expect_cols("cross_entropy", logits)?;
        expect_len("cross_entropy", "loss", loss.len(), 1)?;
        let classes = logits.cols();
        let ignored = |&(_, &t): &(usize, &u32)| t == super::IGNORE_TARGET;
        if let Some((i, &t)) =
            targets.cpu().iter().enumerate().filter(|e| !ignored(e)).find(|(_, t)| **t as usize >= classes)
        {
            return Err(Error::shape(
                "cross_entropy",
                format!("index {t} at position {i} is out of range (< {classes})"),
            ));
        }
        loss.cpu()[0] = losses::cross_entropy(logits.cpu_mut(), classes, targets.cpu(), scale);
        Ok(())
    }

    fn top_k(&mut self, queries: View, gallery: View, dim: usize, k: usize) -> Result<(Vec<u32>, Vec<f32>)> {
        let _timer = profile::time("top_k");
        check_top_k(queries.len(), gallery.len(), dim, k)?;
        dispatch::active()?;
        let search = if self.precision == Precision::Bf16 { topk::top_k_keys_bf16 } else { topk::top_k_keys };
        Ok(topk::split_keys(&search(queries.cpu(), gallery.cpu(), dim, k, topk::TILE)))
    }

    fn adamw(&mut self, params: ViewMut, grads: View, m: ViewMut, v: ViewMut, hp: AdamW) -> Result<()> {
        let _timer = profile::time("adamw");
        hp.check()?;
        let n = params.len();
        expect_len("adamw", "grads", grads.len(), n)?;
        expect_len("adamw", "m", m.len(), n)?;
        expect_len("adamw", "v", v.len(), n)?;
        optim::adamw(params.cpu(), grads.cpu(), m.cpu(), v.cpu(), hp);
        Ok(())
    }

    fn sum_squares_into(&mut self, x: View, out: ViewMut) -> Result<()> {
        let _timer = profile::time("sum_squares_into");
        expect_len("sum_squares_into", "out", out.len(), 1)?;
        out.cpu()[0] = optim::sum_squares(x.cpu()) as f32;
        Ok(())
    }

    fn step_guard(&mut self, record: ViewMut, state: ViewMut, ring: ViewMut, p: GuardParams) -> Result<()> {
        let _timer = profile::time("step_guard");
        check_step_guard(record.len(), state.len(), ring.len())?;
        super::step::guard(record.cpu(), state.cpu(), ring.cpu(), p);
        Ok(())
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
        let _timer = profile::time("adamw_masked");
        hp.check()?;
        check_adamw_masked(params.len(), grads.len(), m.len(), v.len(), mask, record.len())?;
        optim::adamw_masked(params.cpu(), grads.cpu(), m.cpu(), v.cpu(), &mask.runs, hp, record.cpu());
        Ok(())
    }
}
