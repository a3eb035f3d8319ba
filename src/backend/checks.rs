//! The shape checks both backends make at the `Backend` boundary, so that both name the same op
//! and operand in their errors (`Error::Shape`).

use super::{Gemm, GruRunBwd, GruRunFwd, GruStep, Segments};
use crate::Result;
use crate::tensor::{DType, Tensor, View, ViewMut};

/// An operand of the type the op takes (`what` names it).
pub(crate) fn expect_dtype(op: &'static str, what: &str, got: DType, want: DType) -> Result<()> {
    if got != want {
        return Err(crate::Error::dtype(op, format!("{what} is {}, expected {}", got.name(), want.name())));
    }
    Ok(())
}

/// An op's activation operands share one type (`b`, named `what`, has `a`'s).
pub(crate) fn same_dtype(op: &'static str, what: &str, a: &Tensor, b: &Tensor) -> Result<()> {
    expect_dtype(op, what, b.dtype(), a.dtype())
}

/// Parameters, their gradients and statistics are f32 whatever the activations' type.
pub(crate) fn f32s<const N: usize>(op: &'static str, operands: [(&str, DType); N]) -> Result<()> {
    operands.into_iter().try_for_each(|(what, dtype)| expect_dtype(op, what, dtype, DType::F32))
}

/// A GEMM's operand types: A and B share one, f32 or bf16 (a bf16 product needs both in bf16,
/// as cuBLAS does); C may be either.
pub(crate) fn check_gemm_types(op: &'static str, a: DType, b: DType) -> Result<()> {
    if a != b {
        return Err(crate::Error::dtype(
            op,
            format!("a is {} and b {}; a GEMM's operands share one type", a.name(), b.name()),
        ));
    }
    Ok(())
}

/// Row-wise ops need at least one column: a `[rows, 0]` tensor has no rows to walk.
pub(crate) fn expect_cols(op: &'static str, x: &Tensor) -> Result<()> {
    if x.cols() == 0 {
        return Err(crate::Error::shape(op, format!("tensor of shape {:?} has no columns", x.shape())));
    }
    Ok(())
}

/// Shape checks every backend makes, so that both name the same op and operand.
pub(crate) fn same_shape(op: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.shape() != b.shape() {
        return Err(crate::Error::shape(op, format!("{:?} vs {:?}", a.shape(), b.shape())));
    }
    Ok(())
}

pub(crate) fn rows_of(op: &'static str, x: &Tensor, seg: &Segments) -> Result<()> {
    if x.rows() != seg.tokens() {
        return Err(crate::Error::shape(op, format!("{} rows for a batch of {} segments", x.rows(), seg.tokens())));
    }
    Ok(())
}

/// `segment_rows`' table: f32, with a row for every position of the longest item.
pub(crate) fn check_segment_table(table: &Tensor, seg: &Segments) -> Result<()> {
    let op = "segment_rows";
    expect_dtype(op, "table", table.dtype(), DType::F32)?;
    if table.rows() < seg.max_len {
        return Err(crate::Error::shape(
            op,
            format!("table has {} rows for items up to {} long", table.rows(), seg.max_len),
        ));
    }
    Ok(())
}

/// `segment_rows_bwd`'s operands: an f32 gradient of the batch's rows, and a row out for
/// every position of the longest item.
pub(crate) fn check_segment_rows_bwd(dy: &Tensor, seg: &Segments, rows: usize) -> Result<()> {
    let op = "segment_rows_bwd";
    rows_of(op, dy, seg)?;
    expect_dtype(op, "dy", dy.dtype(), DType::F32)?;
    if rows < seg.max_len {
        return Err(crate::Error::shape(op, format!("{rows} rows out for items up to {} long", seg.max_len)));
    }
    Ok(())
}

/// `gemm_bias`'s operands (`Backend::gemm_bias`): the GEMM's, a bias of c's type with one
/// value per column of c, and, for a bf16 c, a product to add it to (k > 0, c's rows of n)
/// so that the sum is rounded once.
pub(crate) fn check_gemm_bias(g: &Gemm, a: &View, b: &View, bias: &View, c: &Tensor) -> Result<()> {
    let op = "gemm_bias";
    check_gemm(g, a.len(), b.len(), c.len())?;
    check_gemm_types(op, a.dtype(), b.dtype())?;
    expect_cols(op, c)?;
    expect_len(op, "bias", bias.len(), c.cols())?;
    expect_len(op, "bias", bias.len(), g.n)?;
    if bias.dtype() != c.dtype() {
        let (b, c) = (bias.dtype().name(), c.dtype().name());
        return Err(crate::Error::dtype(
            op,
            format!("the bias is {b} and the output {c}; a bias has its output's type"),
        ));
    }
    if c.dtype() == DType::Bf16 && g.k == 0 {
        return Err(crate::Error::dtype(op, "a bf16 output needs a product (k > 0) to round with its bias"));
    }
    Ok(())
}

/// A GEMM's operand lengths: a `[m, k]`, b `[k, n]`, c `[m, n]` (either transposed).
pub(crate) fn check_gemm(g: &Gemm, a: usize, b: usize, c: usize) -> Result<()> {
    expect_len("gemm", "a", a, g.m * g.k)?;
    expect_len("gemm", "b", b, g.k * g.n)?;
    expect_len("gemm", "c", c, g.m * g.n)
}

/// Layer norm's operands (for `op`: the plain norm or a join): x `[rows, d]` with d > 0, γ and
/// β of length d.
pub(crate) fn check_layernorm_fwd(op: &'static str, x: &Tensor, gamma: &View, beta: &View) -> Result<()> {
    expect_cols(op, x)?;
    f32s(op, [("gamma", gamma.dtype()), ("beta", beta.dtype())])?;
    expect_len(op, "gamma", gamma.len(), x.cols())?;
    expect_len(op, "beta", beta.len(), x.cols())
}

/// Layer norm backward's operands (`Backend::layernorm_bwd`).
pub(crate) fn check_layernorm_bwd(
    x: &Tensor,
    stats: &Tensor,
    gamma: &View,
    dy: &Tensor,
    dgamma: &ViewMut,
    dbeta: &ViewMut,
) -> Result<()> {
    same_shape("layernorm_bwd", x, dy)?;
    same_dtype("layernorm_bwd", "dy", x, dy)?;
    expect_cols("layernorm_bwd", x)?;
    expect_len("layernorm_bwd", "stats", stats.len(), 2 * x.rows())?;
    expect_len("layernorm_bwd", "gamma", gamma.len(), x.cols())?;
    expect_len("layernorm_bwd", "dgamma", dgamma.len(), x.cols())?;
    expect_len("layernorm_bwd", "dbeta", dbeta.len(), x.cols())?;
    let types =
        [("stats", stats.dtype()), ("gamma", gamma.dtype()), ("dgamma", dgamma.dtype()), ("dbeta", dbeta.dtype())];
    f32s("layernorm_bwd", types)
}

/// A join's operands (`Backend::residual_layernorm_fwd`, `residual_layernorm`; `op` names
/// which): a and x of one shape and type, and [`check_layernorm_fwd`]'s.
pub(crate) fn check_residual_layernorm_fwd(
    op: &'static str,
    a: &Tensor,
    x: &Tensor,
    gamma: &View,
    beta: &View,
) -> Result<()> {
    same_shape(op, a, x)?;
    same_dtype(op, "x", a, x)?;
    check_layernorm_fwd(op, a, gamma, beta)
}

/// [`check_layernorm_bwd`] for the join's backward, and its sublayer's bias gradient if given.
pub(crate) fn check_residual_layernorm_bwd(
    s: &Tensor,
    stats: &Tensor,
    gamma: &View,
    dy: &Tensor,
    dgamma: &ViewMut,
    dbeta: &ViewMut,
    dbias: Option<&ViewMut>,
) -> Result<()> {
    check_layernorm_bwd(s, stats, gamma, dy, dgamma, dbeta)?;
    dbias.map_or(Ok(()), |b| {
        expect_len("residual_layernorm_bwd", "dbias", b.len(), s.cols())?;
        f32s("residual_layernorm_bwd", [("dbias", b.dtype())])
    })
}

/// qkv `[tokens, 3·d]` for the batch, with d split into `heads` heads.
pub(crate) fn check_attention(op: &'static str, qkv: &Tensor, seg: &Segments, heads: usize) -> Result<()> {
    rows_of(op, qkv, seg)?;
    if heads == 0 || qkv.cols() == 0 || !qkv.cols().is_multiple_of(3 * heads) {
        return Err(crate::Error::shape(op, format!("{} qkv columns for {heads} heads", qkv.cols())));
    }
    Ok(())
}

/// Start of each item's saved attention probabilities (per item, then head, len × len) in
/// the packed buffer, and the total size: the layout both backends write.
pub fn prob_offsets(offsets: &[usize], heads: usize) -> Vec<usize> {
    let mut out = Vec::with_capacity(offsets.len());
    out.push(0);
    for w in offsets.windows(2) {
        let len = w[1] - w[0];
        out.push(out.last().unwrap() + heads * len * len);
    }
    out
}

/// Attention backward's operands, probabilities included (`Backend::attention_bwd`).
pub(crate) fn check_attention_bwd(
    qkv: &Tensor,
    probs: &Tensor,
    seg: &Segments,
    heads: usize,
    dout: &Tensor,
    dbias: Option<&ViewMut>,
) -> Result<()> {
    check_attention("attention_bwd", qkv, seg, heads)?;
    rows_of("attention_bwd", dout, seg)?;
    expect_len("attention_bwd", "dout columns", dout.cols() * 3, qkv.cols())?;
    same_dtype("attention_bwd", "probs", qkv, probs)?;
    same_dtype("attention_bwd", "dout", qkv, dout)?;
    if let Some(db) = dbias {
        expect_len("attention_bwd", "dbias", db.len(), qkv.cols())?;
        f32s("attention_bwd", [("dbias", db.dtype())])?;
    }
    let poff = prob_offsets(&seg.offsets, heads);
    expect_len("attention_bwd", "probs", probs.len(), poff[poff.len() - 1])
}

/// The GRU step's operands against the batch and the hidden width (`Backend::gru_step_fwd`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_gru_step_fwd(
    step: GruStep,
    seg: &Segments,
    xproj: &Tensor,
    hproj: usize,
    bias_hh: usize,
    hs: &Tensor,
    out: &Tensor,
    gates: &Tensor,
) -> Result<()> {
    let (b, hd, steps) = (seg.items(), step.hidden, seg.max_len);
    rows_of("gru_step_fwd", xproj, seg)?;
    rows_of("gru_step_fwd", out, seg)?;
    expect_len("gru_step_fwd", "xproj columns", xproj.cols(), 3 * hd)?;
    expect_len("gru_step_fwd", "hproj", hproj, b * 3 * hd)?;
    expect_len("gru_step_fwd", "bias_hh", bias_hh, 3 * hd)?;
    expect_len("gru_step_fwd", "hs", hs.len(), (steps + 1) * b * hd)?;
    expect_len("gru_step_fwd", "gates", gates.len(), steps * b * 4 * hd)?;
    check_step_of("gru_step_fwd", step, steps, out.cols())
}

/// The GRU step backward's operands (`Backend::gru_step_bwd`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_gru_step_bwd(
    step: GruStep,
    seg: &Segments,
    gates: &Tensor,
    hs: &Tensor,
    dout: &Tensor,
    dh: &Tensor,
    dxproj: &Tensor,
    dhproj: &Tensor,
) -> Result<()> {
    let (b, hd, steps) = (seg.items(), step.hidden, seg.max_len);
    rows_of("gru_step_bwd", dout, seg)?;
    rows_of("gru_step_bwd", dxproj, seg)?;
    expect_len("gru_step_bwd", "dxproj columns", dxproj.cols(), 3 * hd)?;
    expect_len("gru_step_bwd", "gates", gates.len(), steps * b * 4 * hd)?;
    expect_len("gru_step_bwd", "hs", hs.len(), (steps + 1) * b * hd)?;
    expect_len("gru_step_bwd", "dh", dh.len(), b * hd)?;
    expect_len("gru_step_bwd", "dhproj", dhproj.len(), steps * b * 3 * hd)?;
    check_step_of("gru_step_bwd", step, steps, dout.cols())
}

/// `widen_features`' operands: `rows · dim` halves in `words` (rounded up to whole words), a
/// normalisation `dim` long. The element count, checked for overflow.
pub(crate) fn check_widen(words: usize, rows: usize, dim: usize, norm: Option<(&[f32], &[f32])>) -> Result<usize> {
    let n = rows
        .checked_mul(dim)
        .filter(|&n| n <= i32::MAX as usize)
        .ok_or_else(|| crate::Error::shape("widen_features", format!("{rows} × {dim} features is too many")))?;
    expect_len("widen_features", "words", words, n.div_ceil(2))?;
    if let Some((mean, inv_std)) = norm {
        expect_len("widen_features", "mean", mean.len(), dim)?;
        expect_len("widen_features", "inv_std", inv_std.len(), dim)?;
    }
    Ok(n)
}

/// A dropout probability in [0, 1) (`Backend::dropout_fwd` and the ops that drop).
pub(crate) fn check_dropout(p: f32) -> Result<()> {
    if !(0.0..1.0).contains(&p) {
        return Err(crate::Error::config(format!("dropout probability {p} is not in [0, 1)")));
    }
    Ok(())
}

/// Both directions' forward recurrences (`Backend::gru_fwd`): each run's buffers as its steps
/// check them, W_hh `[3H, H]`, one forward and one reverse direction. For a batch with steps.
pub(crate) fn check_gru_fwd(seg: &Segments, hidden: usize, runs: &[GruRunFwd<'_>; 2], out: &Tensor) -> Result<()> {
    check_gru_directions("gru_fwd", [runs[0].reverse, runs[1].reverse])?;
    for run in runs {
        let step = GruStep::of(0, run.reverse, hidden);
        let hproj = seg.items() * 3 * hidden;
        check_gru_step_fwd(step, seg, run.xproj, hproj, run.bias_hh.len(), run.hs, out, run.gates)?;
        expect_len("gru_fwd", "w_hh", run.w_hh.len(), 3 * hidden * hidden)?;
    }
    Ok(())
}

/// Both directions' backward recurrences (`Backend::gru_bwd`), as `check_gru_fwd`.
pub(crate) fn check_gru_bwd(seg: &Segments, hidden: usize, runs: &[GruRunBwd<'_>; 2], dout: &Tensor) -> Result<()> {
    check_gru_directions("gru_bwd", [runs[0].reverse, runs[1].reverse])?;
    for run in runs {
        let step = GruStep::of(0, run.reverse, hidden);
        check_gru_step_bwd(step, seg, run.gates, run.hs, dout, run.dh, run.dxproj, run.dhproj)?;
        expect_len("gru_bwd", "w_hh", run.w_hh.len(), 3 * hidden * hidden)?;
    }
    Ok(())
}

/// The runs of a Bi-GRU: the forward direction, then the reverse one.
fn check_gru_directions(op: &'static str, reverse: [bool; 2]) -> Result<()> {
    if reverse != [false, true] {
        return Err(crate::Error::shape(op, format!("directions {reverse:?} (reverse); expected [false, true]")));
    }
    Ok(())
}

/// A GRU step inside the batch's longest sequence, its output columns inside the rows.
fn check_step_of(op: &'static str, step: GruStep, steps: usize, out_cols: usize) -> Result<()> {
    if step.s >= steps {
        return Err(crate::Error::shape(op, format!("step {} of a batch whose longest sequence is {steps}", step.s)));
    }
    if step.out_col + step.hidden > out_cols {
        return Err(crate::Error::shape(op, "output columns too narrow"));
    }
    Ok(())
}

/// `Backend::top_k`'s operands; returns (queries, gallery rows).
pub(crate) fn check_top_k(queries: usize, gallery: usize, dim: usize, k: usize) -> Result<(usize, usize)> {
    let err = |what: String| Err(crate::Error::shape("top_k", what));
    if dim == 0 {
        return err("dimension 0".into());
    }
    for (what, len) in [("queries", queries), ("gallery", gallery)] {
        if len == 0 {
            return err(format!("{what} are empty"));
        }
        if !len.is_multiple_of(dim) {
            return err(format!("{what} have {len} values, not a multiple of dimension {dim}"));
        }
    }
    let (nq, ng) = (queries / dim, gallery / dim);
    if ng >= u32::MAX as usize {
        return err(format!("{ng} gallery rows do not fit a u32 id"));
    }
    if k == 0 || k > ng {
        return err(format!("k = {k} for a gallery of {ng} rows (1 ≤ k ≤ {ng})"));
    }
    // Held at once: every result (a key, an id and a score, and the caller's copy: 32 bytes)
    // and, on each thread, the candidates of a block of up to 256 queries (2k + 64 keys each).
    let bytes = (nq as u128 * k as u128 * 32)
        + rayon::current_num_threads() as u128 * nq.min(256) as u128 * (2 * k as u128 + 64) * 8;
    // Below a GiB not worth reading /proc/meminfo for on every search.
    let large = bytes > 1 << 30;
    if let Some(available) = large.then(crate::io::host_available_memory).flatten().filter(|&a| bytes > u128::from(a)) {
        const GIB: f64 = (1u64 << 30) as f64;
        return Err(crate::Error::config(format!(
            "top_k: {nq} queries × k = {k} need about {:.1} GiB for their results, more than the {:.1} GiB available: ask for fewer (a smaller k, or the queries in parts)",
            bytes as f64 / GIB,
            available as f64 / GIB
        )));
    }
    Ok((nq, ng))
}

/// Check that a tensor has the expected element count; name the op and the operand.
pub(crate) fn expect_len(op: &'static str, what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(crate::Error::shape(op, format!("{what} has {got} elements, expected {want}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check_top_k;

    #[test]
    fn a_top_k_larger_than_memory_is_refused_before_anything_is_allocated() {
        assert_eq!(check_top_k(10 * 4, 100 * 4, 4, 10).unwrap(), (10, 100));
        // A million queries × k of a billion: results of 32 PB.
        if crate::io::host_available_memory().is_some() {
            let e = check_top_k(1 << 20, 1 << 30, 1, 1 << 30).unwrap_err().to_string();
            assert!(e.contains("1048576 queries × k = 1073741824 need about") && e.contains("GiB available"), "{e}");
        }
    }
}
