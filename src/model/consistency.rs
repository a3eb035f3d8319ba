//! The cross-modal consistency objectives that the Table 1 variants add to (or use instead of)
//! the label loss: `ours+con`'s triplet loss, `imc`'s Eq. 1, and the DSCMR-style baseline's three
//! losses. Pure functions on a batch's item embeddings held on the host.
//!
//! Layout: `images` U and `texts` V are `[B, d]` row-major (row i of each is the pair i),
//! `labels` Y is `[B, C]` multi-hot u8 (the pair's labels, shared by both rows). Every function
//! returns the loss and its gradient with respect to U and V (and DSCMR's projection P), so the
//! model downloads the pooled embeddings, calls one of these, and uploads the gradient to add to
//! the backward pass of its pooling. Arithmetic is f64 whatever the input type: B ≤ 256 makes
//! the B² terms cheap, and the f64 instantiation is what the gradient checks differentiate.
//!
//! Cosine similarity `cos(a, b) = â·b̂` with `â = a/‖a‖`; its backward is done once for a whole
//! matrix: with `G = ∂L/∂(ÛV̂ᵀ)`, `∂L/∂Û = G V̂` and `∂L/∂V̂ = Gᵀ Û`, then through the
//! normalisation `∂L/∂u = (∂L/∂û − (∂L/∂û·û) û) / ‖u‖`. A zero embedding row has no direction,
//! so it is an error rather than a silent 0/0.

use crate::{Error, Result};

/// The element type of embeddings and gradients: f32 from the model, f64 in gradient checks.
pub trait Real: Copy + PartialEq + std::fmt::Debug {
    fn to_f64(self) -> f64;
    fn from_f64(x: f64) -> Self;
}

impl Real for f32 {
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    fn from_f64(x: f64) -> Self {
        x as f32
    }
}

impl Real for f64 {
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(x: f64) -> Self {
        x
    }
}

/// B pairs, embedding width d, C labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchShape {
    pub items: usize,
    pub dim: usize,
    pub labels: usize,
}

/// One batch of pairs: `images` U `[B, d]`, `texts` V `[B, d]`, `labels` Y `[B, C]`.
#[derive(Clone, Copy, Debug)]
pub struct PairBatch<'a, T> {
    pub images: &'a [T],
    pub texts: &'a [T],
    pub labels: &'a [u8],
    pub shape: BatchShape,
}

/// A loss, its named parts (for logs and progress lines) and its input gradients.
#[derive(Clone, Debug, PartialEq)]
pub struct PairLoss<T> {
    pub loss: f64,
    /// The unweighted terms the loss is made of, e.g. `("inter", 0.3)`.
    pub terms: Vec<(&'static str, f64)>,
    /// ∂loss/∂U, `[B, d]`.
    pub d_images: Vec<T>,
    /// ∂loss/∂V, `[B, d]`.
    pub d_texts: Vec<T>,
}

/// [`PairLoss`] plus the gradient of DSCMR's label projection P `[d, C]`.
#[derive(Clone, Debug, PartialEq)]
pub struct DscmrLoss<T> {
    pub pair: PairLoss<T>,
    /// ∂loss/∂P, `[d, C]`.
    pub d_projection: Vec<T>,
}

// ---------------------------------------------------------------------------------------------
// Validation and the shared cosine machinery.

/// Rows of one modality after validation: unit rows Û and the norms.
struct UnitRows {
    hat: Vec<f64>,
    norm: Vec<f64>,
}

/// A validated batch in f64.
struct Prepared {
    b: usize,
    d: usize,
    u: UnitRows,
    v: UnitRows,
    /// `shared[i·B + j] = y_i·y_j`, the number of labels items i and j share.
    shared: Vec<u32>,
    /// Number of labels of each item.
    label_count: Vec<u32>,
}

fn check_len(op: &'static str, what: &str, got: usize, rows: usize, cols: usize) -> Result<()> {
    match rows.checked_mul(cols) {
        Some(want) if want == got => Ok(()),
        _ => Err(Error::shape(op, format!("{what} has {got} values, expected {rows} × {cols}"))),
    }
}

fn finite_values<T: Real>(op: &'static str, what: &str, x: &[T], cols: usize) -> Result<Vec<f64>> {
    let out: Vec<f64> = x.iter().map(|v| v.to_f64()).collect();
    if let Some(k) = out.iter().position(|v| !v.is_finite()) {
        return Err(Error::data(format!(
            "{op}: {what} row {} has a non-finite value ({}) at column {}",
            k / cols,
            out[k],
            k % cols
        )));
    }
    Ok(out)
}

fn unit_rows(op: &'static str, what: &str, x: Vec<f64>, d: usize) -> Result<UnitRows> {
    let mut hat = x;
    let mut norm = Vec::with_capacity(hat.len() / d);
    for (i, row) in hat.chunks_exact_mut(d).enumerate() {
        // Scaled so that rows near f64's range do not overflow in the squares.
        let scale = row.iter().fold(0.0f64, |m, a| m.max(a.abs()));
        let n = if scale > 0.0 { scale * row.iter().map(|a| (a / scale).powi(2)).sum::<f64>().sqrt() } else { 0.0 };
        if !(n > 0.0 && n.is_finite()) {
            return Err(Error::data(format!(
                "{op}: {what} row {i} has norm {n}; cosine similarity needs a non-zero finite row"
            )));
        }
        row.iter_mut().for_each(|a| *a /= n);
        norm.push(n);
    }
    Ok(UnitRows { hat, norm })
}

fn prepare<T: Real>(op: &'static str, batch: &PairBatch<'_, T>) -> Result<Prepared> {
    let BatchShape { items: b, dim: d, labels: c } = batch.shape;
    if b == 0 || d == 0 || c == 0 {
        return Err(Error::shape(op, format!("batch of {b} items × width {d} × {c} labels: each must be ≥ 1")));
    }
    check_len(op, "images", batch.images.len(), b, d)?;
    check_len(op, "texts", batch.texts.len(), b, d)?;
    check_len(op, "labels", batch.labels.len(), b, c)?;
    if let Some(k) = batch.labels.iter().position(|&y| y > 1) {
        return Err(Error::data(format!(
            "{op}: labels row {} has value {} at label {} (multi-hot labels must be 0 or 1)",
            k / c,
            batch.labels[k],
            k % c
        )));
    }
    let u = unit_rows(op, "images", finite_values(op, "images", batch.images, d)?, d)?;
    let v = unit_rows(op, "texts", finite_values(op, "texts", batch.texts, d)?, d)?;
    let rows: Vec<&[u8]> = batch.labels.chunks_exact(c).collect();
    let mut shared = vec![0u32; b * b];
    for i in 0..b {
        for j in 0..b {
            shared[i * b + j] = rows[i].iter().zip(rows[j]).map(|(&p, &q)| u32::from(p & q)).sum();
        }
    }
    let label_count = rows.iter().map(|r| r.iter().map(|&y| u32::from(y)).sum()).collect();
    Ok(Prepared { b, d, u, v, shared, label_count })
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `C[i·B + j] = cos(a_i, b_j)`.
fn cosines(a: &UnitRows, b: &UnitRows, d: usize) -> Vec<f64> {
    let ra: Vec<&[f64]> = a.hat.chunks_exact(d).collect();
    let rb: Vec<&[f64]> = b.hat.chunks_exact(d).collect();
    ra.iter().flat_map(|x| rb.iter().map(move |y| dot(x, y))).collect()
}

/// Gradients of the loss with respect to the three cosine matrices of a batch.
struct CosineGrads {
    /// ∂L/∂cos(u_i, v_j).
    uv: Vec<f64>,
    /// ∂L/∂cos(u_i, u_j).
    uu: Vec<f64>,
    /// ∂L/∂cos(v_i, v_j).
    vv: Vec<f64>,
}

impl CosineGrads {
    fn zeros(b: usize) -> Self {
        CosineGrads { uv: vec![0.0; b * b], uu: vec![0.0; b * b], vv: vec![0.0; b * b] }
    }
}

/// `∂L/∂u_i = (g_i − (g_i·û_i) û_i) / ‖u_i‖` for `g = ∂L/∂Û`, in place.
fn through_normalisation(g: &mut [f64], rows: &UnitRows, d: usize) {
    for ((gi, ui), n) in g.chunks_exact_mut(d).zip(rows.hat.chunks_exact(d)).zip(&rows.norm) {
        let along = dot(gi, ui);
        gi.iter_mut().zip(ui).for_each(|(g, u)| *g = (*g - along * u) / n);
    }
}

/// ∂L/∂U and ∂L/∂V from the cosine-matrix gradients:
/// `∂L/∂Û = G_uv V̂ + (G_uu + G_uuᵀ) Û`, `∂L/∂V̂ = G_uvᵀ Û + (G_vv + G_vvᵀ) V̂`.
fn cosine_backward(p: &Prepared, g: &CosineGrads) -> (Vec<f64>, Vec<f64>) {
    let (b, d) = (p.b, p.d);
    let (uh, vh) = (&p.u.hat, &p.v.hat);
    let mut du = vec![0.0; b * d];
    let mut dv = vec![0.0; b * d];
    for i in 0..b {
        for j in 0..b {
            let guv = g.uv[i * b + j];
            let guu = g.uu[i * b + j] + g.uu[j * b + i];
            let gvv = g.vv[i * b + j] + g.vv[j * b + i];
            for k in 0..d {
                du[i * d + k] += guv * vh[j * d + k] + guu * uh[j * d + k];
                dv[j * d + k] += guv * uh[i * d + k];
                dv[i * d + k] += gvv * vh[j * d + k];
            }
        }
    }
    through_normalisation(&mut du, &p.u, d);
    through_normalisation(&mut dv, &p.v, d);
    (du, dv)
}

fn finish<T: Real>(
    op: &'static str,
    loss: f64,
    terms: Vec<(&'static str, f64)>,
    du: Vec<f64>,
    dv: Vec<f64>,
) -> Result<PairLoss<T>> {
    if !loss.is_finite() || du.iter().chain(&dv).any(|x| !x.is_finite()) {
        return Err(Error::NonFinite { what: format!("{op}: loss {loss} or its gradient is not finite") });
    }
    let cast = |x: Vec<f64>| x.into_iter().map(T::from_f64).collect();
    Ok(PairLoss { loss, terms, d_images: cast(du), d_texts: cast(dv) })
}

// ---------------------------------------------------------------------------------------------
// ours+con: bidirectional triplet consistency.

/// Default margin m of [`triplet_consistency`].
pub const DEFAULT_TRIPLET_MARGIN: f64 = 0.2;

/// `ours+con`'s consistency loss: a bidirectional triplet (hinge) loss on cosine similarity
/// `s_ij = cos(u_i, v_j)`, with label-wise negatives N(i) = { j ≠ i : y_i·y_j = 0 } (items that
/// share no label with i; a pair that shares a label is not pushed apart, and an unlabelled
/// item is never its own negative):
///
/// `L = (1/B) Σ_i Σ_{j∈N(i)} ( [m − s_ii + s_ij]_+ + [m − s_ii + s_ji]_+ )`
///
/// (image i against texts j, then text i against images j). It SUMS over the negatives rather
/// than taking the hardest one (VSE++): the hardest negative sends the whole gradient through one
/// pair per anchor, which Faghri et al. (2018) needed pretrained encoders and large batches to
/// keep from collapsing; the sum is the classic variant that works from random initialisation in
/// small batches, and it is what `ours+con` should be: a plain consistency term, not a tuned one.
/// B = 1, or a batch where every pair shares a label, has no negative and gives 0.
/// `margin` must be finite and ≥ 0 (default [`DEFAULT_TRIPLET_MARGIN`]).
pub fn triplet_consistency<T: Real>(batch: &PairBatch<'_, T>, margin: f64) -> Result<PairLoss<T>> {
    const OP: &str = "triplet consistency";
    if !(margin.is_finite() && margin >= 0.0) {
        return Err(Error::config(format!("{OP}: margin {margin} must be finite and ≥ 0")));
    }
    let p = prepare(OP, batch)?;
    let b = p.b;
    let s = cosines(&p.u, &p.v, p.d);
    let mut g = CosineGrads::zeros(b);
    let (mut i2t, mut t2i) = (0.0, 0.0);
    let w = 1.0 / b as f64;
    for i in 0..b {
        let pos = s[i * b + i];
        for j in (0..b).filter(|&j| j != i && p.shared[i * b + j] == 0) {
            let image_anchor = margin - pos + s[i * b + j];
            if image_anchor > 0.0 {
                i2t += image_anchor;
                g.uv[i * b + i] -= w;
                g.uv[i * b + j] += w;
            }
            let text_anchor = margin - pos + s[j * b + i];
            if text_anchor > 0.0 {
                t2i += text_anchor;
                g.uv[i * b + i] -= w;
                g.uv[j * b + i] += w;
            }
        }
    }
    let (i2t, t2i) = (i2t * w, t2i * w);
    let (du, dv) = cosine_backward(&p, &g);
    finish(OP, i2t + t2i, vec![("image_anchor", i2t), ("text_anchor", t2i)], du, dv)
}

// ---------------------------------------------------------------------------------------------
// imc: Eq. 1, inter- and intra-modal consistency.

/// Label similarity `S_ij = y_i·y_j / (‖y_i‖ ‖y_j‖)` (cosine of the multi-hot rows; 0 when
/// either item has no label), in [0, 1]: 1 for identical label sets.
fn label_cosines(p: &Prepared) -> Vec<f64> {
    let b = p.b;
    let mut s = vec![0.0; b * b];
    for i in 0..b {
        for j in 0..b {
            let denom = (f64::from(p.label_count[i]) * f64::from(p.label_count[j])).sqrt();
            if denom > 0.0 {
                s[i * b + j] = f64::from(p.shared[i * b + j]) / denom;
            }
        }
    }
    s
}

/// `imc`'s consistency objective (the paper's Eq. 1 without its weight; the caller adds
/// `η · IMC` to the two modalities' label losses). The paper's text is not at hand, so this is
/// our reconstruction from the label-wise literature it cites: DSCMR's common-space loss
/// (Zhen et al., CVPR 2019) sums an inter-modal and two intra-modal pairwise terms driven by
/// label similarity, and DCMH (Jiang & Li, CVPR 2017) ties paired items together. With cosine
/// similarities `c^{uv}_ij = cos(u_i, v_j)`, `c^{uu}_ij = cos(u_i, u_j)`, `c^{vv}_ij = cos(v_i, v_j)`
/// and the label cosine `S_ij = y_i·y_j / (‖y_i‖‖y_j‖)`:
///
/// `L_inter = (1/B) Σ_i (1 − c^{uv}_ii) + (1/B²) Σ_{i,j} (c^{uv}_ij − S_ij)²`
///   — pulls each pair together and makes cross-modal similarity follow label similarity;
/// `L_intra = 1/(B(B−1)) Σ_{i≠j} [ (c^{uu}_ij − S_ij)² + (c^{vv}_ij − S_ij)² ]` (0 when B = 1)
///   — makes same-modality similarity follow label similarity (the diagonal is left out: it
///   is 1 whatever the embedding, so it would only add a constant);
/// `IMC = L_inter + L_intra`.
///
/// A squared regression to S rather than DSCMR's likelihood keeps every summand in [0, 4] so η
/// means the same thing at every batch size. Terms: `("inter", L_inter)`, `("intra", L_intra)`.
pub fn imc_consistency<T: Real>(batch: &PairBatch<'_, T>) -> Result<PairLoss<T>> {
    const OP: &str = "imc consistency";
    let p = prepare(OP, batch)?;
    let b = p.b;
    let s = label_cosines(&p);
    let cuv = cosines(&p.u, &p.v, p.d);
    let cuu = cosines(&p.u, &p.u, p.d);
    let cvv = cosines(&p.v, &p.v, p.d);
    let mut g = CosineGrads::zeros(b);
    let bf = b as f64;
    let mut inter = 0.0;
    for i in 0..b {
        inter += (1.0 - cuv[i * b + i]) / bf;
        g.uv[i * b + i] -= 1.0 / bf;
    }
    for k in 0..b * b {
        let r = cuv[k] - s[k];
        inter += r * r / (bf * bf);
        g.uv[k] += 2.0 * r / (bf * bf);
    }
    let mut intra = 0.0;
    if b > 1 {
        let w = 1.0 / (bf * (bf - 1.0));
        for i in 0..b {
            for j in (0..b).filter(|&j| j != i) {
                let k = i * b + j;
                let (ru, rv) = (cuu[k] - s[k], cvv[k] - s[k]);
                intra += w * (ru * ru + rv * rv);
                g.uu[k] += 2.0 * w * ru;
                g.vv[k] += 2.0 * w * rv;
            }
        }
    }
    let (du, dv) = cosine_backward(&p, &g);
    finish(OP, inter + intra, vec![("inter", inter), ("intra", intra)], du, dv)
}

// ---------------------------------------------------------------------------------------------
// DSCMR-style baseline (Zhen et al., CVPR 2019).

/// DSCMR's weights: `J = J1 + α·J2 + β·J3`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DscmrWeights {
    pub alpha: f64,
    pub beta: f64,
}

impl Default for DscmrWeights {
    /// α = 1e-3, β = 1e-1: the values in the authors' released `main.py` (penghu-cs/DSCMR).
    fn default() -> Self {
        DscmrWeights { alpha: 1e-3, beta: 1e-1 }
    }
}

/// The DSCMR-style baseline's objective on one batch, with P `[d, C]` the linear label
/// projection shared by both modalities (prediction `U P`; DSCMR writes it `PᵀU` with items
/// as columns):
///
/// - label-space discrimination `J1 = (‖U P − Y‖²_F + ‖V P − Y‖²_F) / B`;
/// - common-space discrimination, the pairwise negative log-likelihood over the inter-modal
///   and both intra-modal pairs, with `ℓ(Γ, S) = log(1 + e^Γ) − S Γ`:
///   `J2 = (1/B²) Σ_{i,j} [ ℓ(Γ_ij, S_ij) + ℓ(Φ_ij, S_ij) + ℓ(Θ_ij, S_ij) ]`,
///   `Γ_ij = ½cos(u_i, v_j)`, `Φ_ij = ½cos(u_i, u_j)`, `Θ_ij = ½cos(v_i, v_j)`,
///   `S_ij = 1` iff items i and j share a label, else 0;
/// - modality invariance `J3 = ‖U − V‖²_F / B`;
/// - `J = J1 + α J2 + β J3`.
///
/// This is the paper's definition. The released code differs in two places we do not copy:
/// J1 and J3 use the row norm (not squared; non-smooth at 0) and S is the count `y_i·y_j`
/// rather than the indicator. Terms: `("label", J1)`, `("common", J2)`, `("invariance", J3)`.
pub fn dscmr_loss<T: Real>(batch: &PairBatch<'_, T>, projection: &[T], weights: DscmrWeights) -> Result<DscmrLoss<T>> {
    const OP: &str = "dscmr loss";
    let DscmrWeights { alpha, beta } = weights;
    if !(alpha.is_finite() && beta.is_finite() && alpha >= 0.0 && beta >= 0.0) {
        return Err(Error::config(format!("{OP}: weights α = {alpha}, β = {beta} must be finite and ≥ 0")));
    }
    let p = prepare(OP, batch)?;
    let (b, d, c) = (p.b, p.d, batch.shape.labels);
    check_len(OP, "projection P", projection.len(), d, c)?;
    let proj = finite_values(OP, "projection P", projection, c)?;
    // Raw rows: J1 and J3 act on U and V themselves, not on their directions.
    let u = finite_values(OP, "images", batch.images, d)?;
    let v = finite_values(OP, "texts", batch.texts, d)?;
    let bf = b as f64;

    // J1 and its gradients: R = X P − Y, ∂J1/∂X = 2 R Pᵀ / B, ∂J1/∂P = 2 XᵀR / B.
    let mut label = 0.0;
    let mut du = vec![0.0; b * d];
    let mut dv = vec![0.0; b * d];
    let mut dp = vec![0.0; d * c];
    for (x, dx) in [(&u, &mut du), (&v, &mut dv)] {
        for i in 0..b {
            for l in 0..c {
                let pred: f64 = (0..d).map(|k| x[i * d + k] * proj[k * c + l]).sum();
                let r = pred - f64::from(batch.labels[i * c + l]);
                label += r * r / bf;
                for k in 0..d {
                    dx[i * d + k] += 2.0 * r * proj[k * c + l] / bf;
                    dp[k * c + l] += 2.0 * r * x[i * d + k] / bf;
                }
            }
        }
    }

    // J2: ∂ℓ/∂Γ = σ(Γ) − S and ∂Γ/∂cos = ½.
    let mut common = 0.0;
    let mut g = CosineGrads::zeros(b);
    let w = 1.0 / (bf * bf);
    let mats = [cosines(&p.u, &p.v, d), cosines(&p.u, &p.u, d), cosines(&p.v, &p.v, d)];
    for (cos, grad) in mats.iter().zip([&mut g.uv, &mut g.uu, &mut g.vv]) {
        for k in 0..b * b {
            let gamma = 0.5 * cos[k];
            let sim = if p.shared[k] > 0 { 1.0 } else { 0.0 };
            common += w * (softplus(gamma) - sim * gamma);
            grad[k] += w * (sigmoid(gamma) - sim) * 0.5;
        }
    }
    let (dcu, dcv) = cosine_backward(&p, &g);

    // J3: ∂J3/∂U = 2(U − V)/B = −∂J3/∂V.
    let mut invariance = 0.0;
    for k in 0..b * d {
        let r = u[k] - v[k];
        invariance += r * r / bf;
        du[k] += alpha * dcu[k] + beta * 2.0 * r / bf;
        dv[k] += alpha * dcv[k] - beta * 2.0 * r / bf;
    }
    let loss = label + alpha * common + beta * invariance;
    let terms = vec![("label", label), ("common", common), ("invariance", invariance)];
    let pair = finish(OP, loss, terms, du, dv)?;
    if dp.iter().any(|x| !x.is_finite()) {
        return Err(Error::NonFinite { what: format!("{OP}: the gradient of P is not finite") });
    }
    Ok(DscmrLoss { pair, d_projection: dp.into_iter().map(T::from_f64).collect() })
}

/// `log(1 + e^x)` without overflow.
fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

#[cfg(test)]
mod tests {
    use super::*;

    const R2: f64 = std::f64::consts::FRAC_1_SQRT_2;

    /// u1 = (1,0), u2 = (0,1), v1 = (1,0), v2 = (1,1): cos(u,v) = [[1, 1/√2], [0, 1/√2]].
    fn two_pairs(labels: &[u8]) -> (Vec<f64>, Vec<f64>, Vec<u8>) {
        (vec![1.0, 0.0, 0.0, 1.0], vec![1.0, 0.0, 1.0, 1.0], labels.to_vec())
    }

    fn batch<'a>(u: &'a [f64], v: &'a [f64], y: &'a [u8], b: usize, d: usize) -> PairBatch<'a, f64> {
        PairBatch { images: u, texts: v, labels: y, shape: BatchShape { items: b, dim: d, labels: y.len() / b } }
    }

    #[test]
    fn cosine_backward_matches_the_single_pair_formula() {
        // ∂cos(u, v)/∂u = (v̂ − cos·û)/‖u‖ for u = (3, 4), v = (1, 0): cos = 0.6, û = (0.6, 0.8).
        let (u, v, y) = (vec![3.0, 4.0], vec![1.0, 0.0], vec![1u8]);
        let p = prepare("test", &batch(&u, &v, &y, 1, 2)).unwrap();
        let mut g = CosineGrads::zeros(1);
        g.uv[0] = 1.0;
        let (du, dv) = cosine_backward(&p, &g);
        let want_du = [(1.0 - 0.6 * 0.6) / 5.0, (0.0 - 0.6 * 0.8) / 5.0];
        let want_dv = [0.0, 0.8]; // (û − cos·v̂)/‖v‖ = (0.6 − 0.6, 0.8)
        for (a, b) in du.iter().zip(want_du).chain(dv.iter().zip(want_dv)) {
            assert!((a - b).abs() < 1e-12, "{du:?} {dv:?}");
        }
    }

    #[test]
    fn label_cosine_is_shared_labels_over_norms() {
        let (u, v, y) = two_pairs(&[1, 0, 1, 1]);
        let p = prepare("test", &batch(&u, &v, &y, 2, 2)).unwrap();
        let s = label_cosines(&p);
        let want = [1.0, R2, R2, 1.0];
        assert!(s.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-12), "{s:?}");
    }

    #[test]
    fn softplus_is_stable_at_extremes() {
        assert_eq!(softplus(1000.0), 1000.0);
        assert!(softplus(-1000.0) >= 0.0 && softplus(-1000.0) < 1e-300);
        assert!((softplus(0.0) - 2f64.ln()).abs() < 1e-15);
    }
}
