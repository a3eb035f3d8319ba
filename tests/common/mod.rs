//! Shared test helpers: seeded random inputs, relative-norm error, finite differences, and
//! the f64 reference definitions ("naive") every CPU op and layer is checked against.
//!
//! The references are written the obvious way, straight from the equations (PyTorch
//! conventions), with no attempt at speed or at sharing code with `src/`. The only thing
//! borrowed from the library is the dropout hash (`dropout_uniform`), which *defines* the
//! mask rather than computing anything.

#![allow(dead_code)]

pub mod cli;
pub mod gpu;
pub mod training;

use semshare::backend::{Backend, Segments};
use semshare::model::Batch;
use semshare::tensor::Tensor;

/// `got` is `want` bit for bit (a NaN as a NaN), or a failure naming the first element apart
/// (a whole tensor's bits in an `assert_eq!` would fill the log).
pub fn same_values(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let apart = |(g, w): (&f32, &f32)| if w.is_nan() { !g.is_nan() } else { g.to_bits() != w.to_bits() };
    if let Some(i) = got.iter().zip(want).position(apart) {
        panic!("{what}: element {i} is {:e}, not {:e}", got[i], want[i]);
    }
}

/// Proptest settings: `cases` random cases (`PROPTEST_CASES` overrides, e.g. for a long
/// soak), no regression files written into the tree (a failure prints its minimal case and
/// seed, which is what a fixed test should then pin).
pub fn config(cases: u32) -> proptest::test_runner::Config {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(cases);
    proptest::test_runner::Config { cases, failure_persistence: None, ..proptest::test_runner::Config::default() }
}

/// With `SEMSHARE_PRINT_ERRORS` set, print every measured error (to see the margins).
pub fn report(what: &str, err: f64) {
    if std::env::var_os("SEMSHARE_PRINT_ERRORS").is_some() {
        eprintln!("ERR {err:.3e} {what}");
    }
}

/// SplitMix64: an input generator independent of `semshare::rng`.
#[derive(Clone, Debug)]
pub struct Gen(u64);

impl Gen {
    pub fn new(seed: u64) -> Self {
        Gen(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
    /// Uniform in [-1, 1).
    pub fn sym(&mut self) -> f64 {
        self.uniform() * 2.0 - 1.0
    }
    /// Uniform integer in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }
}

/// `n` values uniform in [-scale, scale), never all zero.
pub fn randv_scaled(seed: u64, n: usize, scale: f64) -> Vec<f32> {
    let mut g = Gen::new(seed);
    let mut v: Vec<f32> = (0..n).map(|_| (g.sym() * scale) as f32).collect();
    if n > 0 && v.iter().all(|&x| x == 0.0) {
        v[0] = (0.5 * scale) as f32;
    }
    v
}

/// `n` values uniform in [-1, 1), never all zero.
pub fn randv(seed: u64, n: usize) -> Vec<f32> {
    randv_scaled(seed, n, 1.0)
}

/// `n` values uniform in [lo, hi) (e.g. positive LayerNorm gains).
pub fn rand_range(seed: u64, n: usize, lo: f64, hi: f64) -> Vec<f32> {
    let mut g = Gen::new(seed);
    (0..n).map(|_| (lo + (hi - lo) * g.uniform()) as f32).collect()
}

/// `n` ids uniform in [0, bound).
pub fn rand_ids(seed: u64, n: usize, bound: usize) -> Vec<u32> {
    let mut g = Gen::new(seed);
    (0..n).map(|_| g.below(bound) as u32).collect()
}

/// `n` random finite 16-bit floats of `half` (zeros, subnormals, both signs and the largest
/// exponents among them): their bits, packed two to a word as a step uploads them (the words'
/// f32 bits), and their values as the `half` crate widens them (the reference).
#[allow(dead_code)]
pub fn halves(seed: u64, n: usize, half: semshare::backend::Half) -> (Vec<f32>, Vec<f32>) {
    use semshare::backend::Half;
    let mut g = Gen::new(seed);
    let exponent = match half {
        Half::F16 => 0x7C00u16,
        Half::Bf16 => 0x7F80,
    };
    let bits: Vec<u16> = (0..n)
        .map(|_| {
            let b = g.next_u64() as u16;
            // All exponent bits set is inf or NaN, which a shard never holds: one bit fewer.
            if b & exponent == exponent { b & !0x4000 } else { b }
        })
        .collect();
    let words = bits.chunks(2).map(|p| f32::from_bits(p[0] as u32 | (*p.get(1).unwrap_or(&0) as u32) << 16)).collect();
    let values = bits
        .iter()
        .map(|&b| match half {
            Half::F16 => half::f16::from_bits(b).to_f32(),
            Half::Bf16 => half::bf16::from_bits(b).to_f32(),
        })
        .collect();
    (words, values)
}

/// `k` distinct coordinates of `0..n` (all of them if `n <= k`), in random order.
pub fn sample_coords(seed: u64, n: usize, k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    let mut g = Gen::new(seed);
    for i in (1..n).rev() {
        idx.swap(i, g.below(i + 1));
    }
    idx.truncate(k.min(n));
    idx
}

pub fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

pub fn to32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

pub fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// `‖got − want‖ / max(‖want‖, tiny)`; NaN anywhere makes it NaN (and every `<` fail).
pub fn rel_err64(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "rel_err of vectors of different lengths");
    let diff: f64 = got.iter().zip(want).map(|(a, b)| (a - b) * (a - b)).sum::<f64>().sqrt();
    diff / norm(want).max(1e-30)
}

pub fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    rel_err64(&to64(got), want)
}

pub fn offsets_of(lengths: &[usize]) -> Vec<usize> {
    let mut o = vec![0];
    for &l in lengths {
        o.push(o.last().unwrap() + l);
    }
    o
}

/// `x` stored as bf16 on `dev` (each value rounded by the device's `convert`).
pub fn upload_bf16(dev: &mut dyn Backend, x: &[f32], shape: &[usize]) -> Tensor {
    let t = upload(dev, x, shape);
    dev.convert(t.view(), semshare::tensor::DType::Bf16).unwrap().reshape(shape)
}

/// Parameter values: the initialisation plus noise (both from `seed`), so LayerNorm gains are
/// not all 1 and biases not all 0 (a bias gradient of a zero bias is still checked, but a wrong
/// use of γ would hide behind γ = 1).
pub fn noisy_params(store: &semshare::nn::params::ParamStore, seed: u64) -> Vec<f32> {
    let init = store.init_values(seed);
    let noise = randv_scaled(seed ^ 0xABCD, store.total, 0.2);
    init.iter().zip(&noise).map(|(a, b)| a + b).collect()
}

/// Item `item` of a packed batch, as a batch of its own.
pub fn item_of(batch: &Batch, cfg: &semshare::model::ModelConfig, item: usize) -> Batch {
    let off = offsets_of(batch.lengths());
    let (rows, labels) = (off[item]..off[item + 1], item * cfg.labels..(item + 1) * cfg.labels);
    match batch {
        Batch::Image(x) => Batch::Image(semshare::model::ImageBatch {
            lengths: vec![rows.len()],
            features: x.features.to_f32()[rows.start * cfg.region_dim..rows.end * cfg.region_dim].to_vec().into(),
            boxes: x.boxes[rows.start * 5..rows.end * 5].to_vec(),
            classes: None,
            labels: x.labels[labels].to_vec(),
        }),
        Batch::Text(x) => Batch::Text(semshare::model::TextBatch {
            lengths: vec![rows.len()],
            tokens: x.tokens[rows].to_vec(),
            labels: x.labels[labels].to_vec(),
            features: Default::default(),
        }),
    }
}

pub fn segments(dev: &mut dyn Backend, lengths: &[usize]) -> Segments {
    Segments::from_lengths(dev, lengths).expect("segments")
}

pub fn upload(dev: &mut dyn Backend, data: &[f32], shape: &[usize]) -> Tensor {
    dev.upload(data, shape).expect("upload")
}

/// The feed-forward's activation on `dev` both ways, fused (`bias_gelu_dropout_fwd`,
/// `gelu_dropout_bwd`) and as its ops (`add_bias`, `gelu_fwd`, `dropout_fwd`; `dropout_bwd`,
/// `gelu_bwd`), from the same random inputs: (name, fused, ops) for the pre-activation u, the
/// output h and the gradient du; and `gelu_dropout_bias_bwd` against those ops and `bias_bwd`:
/// its du, and the bias gradient it adds to a random start.
pub fn ffn_activation_both_ways(
    dev: &mut dyn Backend,
    (rows, d): (usize, usize),
    p: f32,
    with_bias: bool,
    seed: u64,
) -> Vec<(&'static str, Vec<f32>, Vec<f32>)> {
    let n = rows * d;
    // Pre-activations around GELU's bend, where its tanh approximation matters.
    let (u0, bias, dh) = (randv_scaled(seed, n, 2.0), randv(seed ^ 1, d), randv(seed ^ 2, n));
    let bias = upload(dev, &bias, &[d]);
    let dht = upload(dev, &dh, &[rows, d]);
    let b = with_bias.then(|| bias.view());

    let mut u = upload(dev, &u0, &[rows, d]);
    let h = dev.bias_gelu_dropout_fwd(&mut u, b, p, 7).unwrap();
    let du = dev.gelu_dropout_bwd(&u, dht.clone(), p, 7).unwrap();

    let mut u2 = upload(dev, &u0, &[rows, d]);
    if let Some(b) = b {
        dev.add_bias(&mut u2, b).unwrap();
    }
    let mut h2 = dev.gelu_fwd(&u2).unwrap();
    dev.dropout_fwd(&mut h2, p, 7).unwrap();
    let mut dh2 = dht.clone();
    dev.dropout_bwd(&mut dh2, p, 7).unwrap();
    let du2 = dev.gelu_bwd(&u2, &dh2).unwrap();

    let db0 = randv(seed ^ 3, d);
    let mut db = upload(dev, &db0, &[d]);
    let du_b = dev.gelu_dropout_bias_bwd(&u, dht.clone(), p, 7, db.view_mut()).unwrap();
    let mut db2 = upload(dev, &db0, &[d]);
    dev.bias_bwd(&du2, db2.view_mut()).unwrap();

    let mut down = |t: &Tensor| dev.download(t.view()).unwrap();
    vec![
        ("u", down(&u), down(&u2)),
        ("h", down(&h), down(&h2)),
        ("du", down(&du), down(&du2)),
        ("du (with the bias gradient)", down(&du_b), down(&du2)),
        ("dbias", down(&db), down(&db2)),
    ]
}

pub fn cpu() -> semshare::backend::cpu::Cpu {
    semshare::backend::cpu::Cpu::new()
}

/// Central finite differences of an f64 function at the given coordinates of `x`.
pub fn fd_grad_at(f: &mut dyn FnMut(&[f64]) -> f64, x: &[f64], coords: &[usize], h: f64) -> Vec<f64> {
    let mut xp = x.to_vec();
    coords
        .iter()
        .map(|&i| {
            let x0 = xp[i];
            xp[i] = x0 + h;
            let fp = f(&xp);
            xp[i] = x0 - h;
            let fm = f(&xp);
            xp[i] = x0;
            (fp - fm) / (2.0 * h)
        })
        .collect()
}

/// Central finite differences of an f64 function at every coordinate of `x`.
pub fn fd_grad(f: &mut dyn FnMut(&[f64]) -> f64, x: &[f64], h: f64) -> Vec<f64> {
    let coords: Vec<usize> = (0..x.len()).collect();
    fd_grad_at(f, x, &coords, h)
}

/// Central finite differences of a function of f32 inputs (loss accumulated in f64), with one
/// Richardson step: R = (4·D(h/2) − D(h))/3 cancels the h² truncation term, which at h = 1e-2
/// is not negligible where attention is sharp (seen: 15% on a query bias), while f32 forces
/// a step that large (the forward's rounding noise is divided by the step). The divisor is
/// the step actually taken after rounding `x ± h` to f32.
pub fn fd32_at(f: &mut dyn FnMut(&[f32]) -> f64, x: &[f32], coords: &[usize], h: f32) -> Vec<f64> {
    fd32_with_curvature_at(f, x, coords, h).0
}

/// As `fd32_at`, also returning `|D(h) − D(h/2)|` per coordinate: how far the plain central
/// difference still moves when the step is halved. Where it moves by a sizeable fraction of
/// the gradient, the function is too curved at this point for an f32 check (the Richardson
/// residual is no longer small either) and a caller should pick another point.
pub fn fd32_with_curvature_at(
    f: &mut dyn FnMut(&[f32]) -> f64,
    x: &[f32],
    coords: &[usize],
    h: f32,
) -> (Vec<f64>, Vec<f64>) {
    let mut xp = x.to_vec();
    let mut central = |i: usize, h: f32, xp: &mut Vec<f32>| {
        let x0 = xp[i];
        let (a, b) = (x0 + h, x0 - h);
        xp[i] = a;
        let fp = f(xp);
        xp[i] = b;
        let fm = f(xp);
        xp[i] = x0;
        (fp - fm) / (a as f64 - b as f64)
    };
    coords
        .iter()
        .map(|&i| {
            let d1 = central(i, h, &mut xp);
            let d2 = central(i, h / 2.0, &mut xp);
            ((4.0 * d2 - d1) / 3.0, (d1 - d2).abs())
        })
        .unzip()
}

/// `Σ r ⊙ y` in f64: the random projection that turns an output into a scalar loss.
pub fn dot(r: &[f32], y: &[f32]) -> f64 {
    assert_eq!(r.len(), y.len());
    r.iter().zip(y).map(|(&a, &b)| a as f64 * b as f64).sum()
}

pub fn dot64(r: &[f64], y: &[f64]) -> f64 {
    assert_eq!(r.len(), y.len());
    r.iter().zip(y).map(|(a, b)| a * b).sum()
}

/// The f64 definitions, written the obvious way.
pub mod naive {
    /// `op(a)[i, p]` where op(a) is `[m, k]`; a stored `[m, k]`, or `[k, m]` if transposed.
    fn at(a: &[f64], rows: usize, cols: usize, trans: bool, i: usize, p: usize) -> f64 {
        if trans { a[p * rows + i] } else { a[i * cols + p] }
    }

    /// `op(a) · op(b)`, `[m, n]`.
    pub fn matmul(a: &[f64], b: &[f64], m: usize, n: usize, k: usize, ta: bool, tb: bool) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0;
                for p in 0..k {
                    s += at(a, m, k, ta, i, p) * at(b, k, n, tb, p, j);
                }
                c[i * n + j] = s;
            }
        }
        c
    }

    /// `alpha · op(a) · op(b) + beta · c`.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        a: &[f64],
        b: &[f64],
        c: &[f64],
        m: usize,
        n: usize,
        k: usize,
        ta: bool,
        tb: bool,
        alpha: f64,
        beta: f64,
    ) -> Vec<f64> {
        let ab = matmul(a, b, m, n, k, ta, tb);
        ab.iter().zip(c).map(|(x, y)| alpha * x + beta * y).collect()
    }

    /// `y = x Wᵀ + b`, W `[out, in]`.
    pub fn linear(x: &[f64], w: &[f64], b: Option<&[f64]>, inputs: usize, outputs: usize) -> Vec<f64> {
        let rows = x.len() / inputs;
        let mut y = matmul(x, w, rows, outputs, inputs, false, true);
        if let Some(b) = b {
            for r in 0..rows {
                for j in 0..outputs {
                    y[r * outputs + j] += b[j];
                }
            }
        }
        y
    }

    pub fn gelu(x: f64) -> f64 {
        let c = (2.0 / std::f64::consts::PI).sqrt();
        0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
    }

    pub fn sigmoid(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }

    /// LayerNorm over rows of width d (biased variance); returns y and (mean, 1/√(var+eps)).
    pub fn layernorm(x: &[f64], gamma: &[f64], beta: &[f64], eps: f64) -> (Vec<f64>, Vec<f64>) {
        let d = gamma.len();
        let rows = x.len() / d;
        let mut y = vec![0.0; x.len()];
        let mut stats = vec![0.0; 2 * rows];
        for r in 0..rows {
            let row = &x[r * d..(r + 1) * d];
            let mean = row.iter().sum::<f64>() / d as f64;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / d as f64;
            let rstd = 1.0 / (var + eps).sqrt();
            for i in 0..d {
                y[r * d + i] = (row[i] - mean) * rstd * gamma[i] + beta[i];
            }
            stats[2 * r] = mean;
            stats[2 * r + 1] = rstd;
        }
        (y, stats)
    }

    /// Softmax self-attention per item and head on packed `qkv [tokens, 3d]`: returns the
    /// context `[tokens, d]` and the probabilities (item, head, len × len), packed.
    pub fn attention(qkv: &[f64], offsets: &[usize], heads: usize) -> (Vec<f64>, Vec<f64>) {
        let tokens = offsets[offsets.len() - 1];
        let d = qkv.len() / tokens / 3;
        let dh = d / heads;
        let scale = 1.0 / (dh as f64).sqrt();
        let mut out = vec![0.0; tokens * d];
        let mut probs = Vec::new();
        for b in 0..offsets.len() - 1 {
            let (s, e) = (offsets[b], offsets[b + 1]);
            for h in 0..heads {
                let q = |t: usize, c: usize| qkv[t * 3 * d + h * dh + c];
                let k = |t: usize, c: usize| qkv[t * 3 * d + d + h * dh + c];
                let v = |t: usize, c: usize| qkv[t * 3 * d + 2 * d + h * dh + c];
                for i in s..e {
                    let scores: Vec<f64> =
                        (s..e).map(|j| (0..dh).map(|c| q(i, c) * k(j, c)).sum::<f64>() * scale).collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let exps: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                    let sum: f64 = exps.iter().sum();
                    let p: Vec<f64> = exps.iter().map(|x| x / sum).collect();
                    for c in 0..dh {
                        out[i * d + h * dh + c] = (s..e).zip(&p).map(|(j, pj)| pj * v(j, c)).sum();
                    }
                    probs.extend_from_slice(&p);
                }
            }
        }
        (out, probs)
    }

    /// One GRU cell (PyTorch): xp = W_i x + b_i, hp = W_h h + b_h, both (r, z, n) blocks.
    /// Returns (h', r, z, n).
    pub fn gru_cell(xp: &[f64], hp: &[f64], h: &[f64]) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
        let hd = h.len();
        let mut out = (vec![0.0; hd], vec![0.0; hd], vec![0.0; hd], vec![0.0; hd]);
        for i in 0..hd {
            let r = sigmoid(xp[i] + hp[i]);
            let z = sigmoid(xp[hd + i] + hp[hd + i]);
            let n = (xp[2 * hd + i] + r * hp[2 * hd + i]).tanh();
            out.0[i] = (1.0 - z) * n + z * h[i];
            out.1[i] = r;
            out.2[i] = z;
            out.3[i] = n;
        }
        out
    }

    /// One direction's parameters, torch.nn.GRU layout: w_ih [3H, In], w_hh [3H, H].
    #[derive(Clone, Debug)]
    pub struct GruParams {
        pub w_ih: Vec<f64>,
        pub b_ih: Vec<f64>,
        pub w_hh: Vec<f64>,
        pub b_hh: Vec<f64>,
    }

    /// Bidirectional GRU over packed sequences from h₀ = 0: `[tokens, 2H] = [h→_t ; h←_t]`.
    pub fn bigru(x: &[f64], inputs: usize, hidden: usize, offsets: &[usize], dirs: &[GruParams; 2]) -> Vec<f64> {
        let tokens = offsets[offsets.len() - 1];
        let mut out = vec![0.0; tokens * 2 * hidden];
        for (dir, p) in dirs.iter().enumerate() {
            for b in 0..offsets.len() - 1 {
                let (s, e) = (offsets[b], offsets[b + 1]);
                let order: Vec<usize> = if dir == 0 { (s..e).collect() } else { (s..e).rev().collect() };
                let mut h = vec![0.0; hidden];
                for t in order {
                    let xp = linear(&x[t * inputs..(t + 1) * inputs], &p.w_ih, Some(&p.b_ih), inputs, 3 * hidden);
                    let hp = linear(&h, &p.w_hh, Some(&p.b_hh), hidden, 3 * hidden);
                    h = gru_cell(&xp, &hp, &h).0;
                    let o = t * 2 * hidden + dir * hidden;
                    out[o..o + hidden].copy_from_slice(&h);
                }
            }
        }
        out
    }

    /// Mean over all entries of `−[y log σ(x) + (1 − y) log(1 − σ(x))]`.
    pub fn bce_mean(logits: &[f64], targets: &[f64]) -> f64 {
        let n = logits.len() as f64;
        logits
            .iter()
            .zip(targets)
            .map(|(&x, &y)| {
                // log σ(x) = −log(1 + e^{−x}), log(1 − σ(x)) = −log(1 + e^{x}), both stable.
                let log_p = -softplus(-x);
                let log_q = -softplus(x);
                -(y * log_p + (1.0 - y) * log_q)
            })
            .sum::<f64>()
            / n
    }

    pub fn softplus(x: f64) -> f64 {
        if x > 0.0 { x + (-x).exp().ln_1p() } else { x.exp().ln_1p() }
    }

    /// Mean over rows of `logsumexp(x) − x[target]`.
    pub fn ce_mean(logits: &[f64], classes: usize, targets: &[u32]) -> f64 {
        let n = targets.len() as f64;
        logits
            .chunks_exact(classes)
            .zip(targets)
            .map(|(row, &t)| {
                let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
                lse - row[t as usize]
            })
            .sum::<f64>()
            / n
    }

    /// Gradient of `scale · ce_mean` w.r.t. the logits: `scale · (softmax − onehot) / n`.
    pub fn ce_grad(logits: &[f64], classes: usize, targets: &[u32], scale: f64) -> Vec<f64> {
        let n = targets.len() as f64;
        let mut g = vec![0.0; logits.len()];
        for (r, (row, &t)) in logits.chunks_exact(classes).zip(targets).enumerate() {
            let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = row.iter().map(|x| (x - max).exp()).sum();
            for c in 0..classes {
                let p = (row[c] - max).exp() / sum;
                g[r * classes + c] = scale * (p - if c == t as usize { 1.0 } else { 0.0 }) / n;
            }
        }
        g
    }

    /// PyTorch AdamW, one step, in f64: g *= grad_scale; p *= 1 − lr·wd; then Adam with bias
    /// correction, `p −= lr · m̂ / (√v̂ + eps)`.
    #[allow(clippy::too_many_arguments)]
    pub fn adamw(
        p: &mut [f64],
        g: &[f64],
        m: &mut [f64],
        v: &mut [f64],
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        wd: f64,
        step: i32,
        grad_scale: f64,
    ) {
        for i in 0..p.len() {
            let gi = g[i] * grad_scale;
            p[i] *= 1.0 - lr * wd;
            m[i] = beta1 * m[i] + (1.0 - beta1) * gi;
            v[i] = beta2 * v[i] + (1.0 - beta2) * gi * gi;
            let mhat = m[i] / (1.0 - beta1.powi(step));
            let vhat = v[i] / (1.0 - beta2.powi(step));
            p[i] -= lr * mhat / (vhat.sqrt() + eps);
        }
    }

    pub fn segment_mean(x: &[f64], cols: usize, offsets: &[usize]) -> Vec<f64> {
        let items = offsets.len() - 1;
        let mut y = vec![0.0; items * cols];
        for b in 0..items {
            let (s, e) = (offsets[b], offsets[b + 1]);
            for c in 0..cols {
                y[b * cols + c] = (s..e).map(|t| x[t * cols + c]).sum::<f64>() / (e - s) as f64;
            }
        }
        y
    }

    pub fn gather_rows(table: &[f64], cols: usize, ids: &[u32]) -> Vec<f64> {
        ids.iter().flat_map(|&i| table[i as usize * cols..(i as usize + 1) * cols].iter().copied()).collect()
    }

    pub fn scatter_add_rows(dy: &[f64], cols: usize, ids: &[u32], dtable: &mut [f64]) {
        for (r, &i) in ids.iter().enumerate() {
            for c in 0..cols {
                dtable[i as usize * cols + c] += dy[r * cols + c];
            }
        }
    }

    /// `x[rows[i], :] = value`.
    pub fn set_rows(x: &[f64], rows: &[u32], value: &[f64]) -> Vec<f64> {
        let cols = value.len();
        let mut y = x.to_vec();
        for &r in rows {
            y[r as usize * cols..(r as usize + 1) * cols].copy_from_slice(value);
        }
        y
    }

    /// Inverted dropout with the keep mask `dropout_uniform(seed, i) >= p`.
    pub fn dropout(x: &[f64], p: f64, seed: u64) -> Vec<f64> {
        if p <= 0.0 {
            return x.to_vec();
        }
        x.iter()
            .enumerate()
            .map(|(i, &v)| {
                let u = semshare::backend::cpu::elementwise::dropout_uniform(seed, i as u64) as f64;
                if u < p { 0.0 } else { v / (1.0 - p) }
            })
            .collect()
    }

    pub fn l2_normalize_rows(x: &[f64], cols: usize) -> Vec<f64> {
        let mut y = x.to_vec();
        for row in y.chunks_exact_mut(cols) {
            let n = row.iter().map(|v| v * v).sum::<f64>().sqrt();
            if n > 0.0 {
                row.iter_mut().for_each(|v| *v /= n);
            }
        }
        y
    }
}

/// A tiny model (d = 16, one layer) fitted to a dataset's shapes: training tests on disk.
pub fn tiny_model(data: &semshare::data::reader::DatasetReader) -> semshare::model::ModelConfig {
    tiny_model_of(data.meta(), data.layout.text_feature_dim)
}

/// [`tiny_model`] from a dataset's metadata (an in-memory `Dataset` has token texts: 0).
pub fn tiny_model_of(m: &semshare::data::Meta, text_feature_dim: usize) -> semshare::model::ModelConfig {
    semshare::model::ModelConfig {
        region_dim: m.feature_dim,
        max_regions: m.regions,
        word_dim: 8,
        gru_hidden: 8,
        dim: 16,
        layers: 1,
        heads: 2,
        ffn: 32,
        max_tokens: m.max_tokens,
        vocab: m.vocab_size(),
        labels: m.num_labels,
        object_classes: m.num_object_classes.max(1),
        text_feature_dim,
        ..semshare::model::ModelConfig::small()
    }
}
