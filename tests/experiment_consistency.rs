//! The consistency losses of `src/model/consistency.rs`: hand-computed cases, central
//! finite-difference gradient checks in f64 on random batches (B = 1, small, and batches where
//! every pair shares a label), f32 = f64, and bad input returned as errors.

use proptest::prelude::*;
use semshare::Error;
use semshare::model::consistency::{
    BatchShape, DscmrWeights, PairBatch, PairLoss, dscmr_loss, imc_consistency, triplet_consistency,
};

const R2: f64 = std::f64::consts::FRAC_1_SQRT_2;

/// SplitMix64 + Box–Muller: inputs independent of the library's RNG.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (a, b) = (1.0 - self.uniform(), self.uniform());
        (-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos()
    }
}

/// A random batch: normal embeddings; labels with probability 0.4 each, or (all_share) label 0
/// set on every item so that no pair is a negative.
struct Case {
    u: Vec<f64>,
    v: Vec<f64>,
    y: Vec<u8>,
    p: Vec<f64>,
    shape: BatchShape,
}

fn case(seed: u64, b: usize, d: usize, c: usize, all_share: bool) -> Case {
    let mut g = Gen(seed);
    let u = (0..b * d).map(|_| g.normal()).collect();
    let v = (0..b * d).map(|_| g.normal()).collect();
    let mut y: Vec<u8> = (0..b * c).map(|_| u8::from(g.uniform() < 0.4)).collect();
    if all_share {
        (0..b).for_each(|i| y[i * c] = 1);
    }
    let p = (0..d * c).map(|_| 0.5 * g.normal()).collect();
    Case { u, v, y, p, shape: BatchShape { items: b, dim: d, labels: c } }
}

fn batch<'a>(u: &'a [f64], v: &'a [f64], y: &'a [u8], shape: BatchShape) -> PairBatch<'a, f64> {
    PairBatch { images: u, texts: v, labels: y, shape }
}

/// Compares `analytic` with central differences of `f` at every coordinate of `x`. Coordinates
/// where the one-sided differences disagree sit on a hinge's kink and are skipped; returns how
/// many were skipped.
fn check_gradient(what: &str, x: &[f64], analytic: &[f64], f: &mut dyn FnMut(&[f64]) -> f64) -> usize {
    const H: f64 = 1e-6;
    assert_eq!(x.len(), analytic.len(), "{what}: gradient length");
    let f0 = f(x);
    let mut skipped = 0;
    for k in 0..x.len() {
        let mut xp = x.to_vec();
        xp[k] += H;
        let mut xm = x.to_vec();
        xm[k] -= H;
        let (fp, fm) = (f(&xp), f(&xm));
        let (fwd, bwd) = ((fp - f0) / H, (f0 - fm) / H);
        if (fwd - bwd).abs() > 1e-3 * (1.0 + fwd.abs()) {
            skipped += 1;
            continue;
        }
        let numeric = (fp - fm) / (2.0 * H);
        let err = (numeric - analytic[k]).abs();
        assert!(err <= 1e-6 + 1e-5 * analytic[k].abs(), "{what}[{k}]: analytic {} numeric {numeric}", analytic[k]);
    }
    skipped
}

fn check_pair_loss(
    what: &str,
    c: &Case,
    out: &PairLoss<f64>,
    loss: &dyn Fn(&[f64], &[f64]) -> f64,
) -> Result<(), TestCaseError> {
    let skipped_u = check_gradient(&format!("{what} ∂/∂U"), &c.u, &out.d_images, &mut |x| loss(x, &c.v));
    let skipped_v = check_gradient(&format!("{what} ∂/∂V"), &c.v, &out.d_texts, &mut |x| loss(&c.u, x));
    // Kinks are measure-zero: a few skipped coordinates at most, never most of them.
    prop_assert!(skipped_u + skipped_v <= 2, "{what}: {skipped_u} + {skipped_v} coordinates on a kink");
    Ok(())
}

fn sizes() -> impl Strategy<Value = usize> {
    prop_oneof![Just(1usize), 2usize..6, Just(8usize)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn triplet_gradient_matches_finite_differences(
        b in sizes(), d in 2usize..6, c in 1usize..5, all_share: bool, margin in 0.0f64..0.8, seed: u64,
    ) {
        let c_ = case(seed, b, d, c, all_share);
        let out = triplet_consistency(&batch(&c_.u, &c_.v, &c_.y, c_.shape), margin).unwrap();
        let f = |u: &[f64], v: &[f64]| triplet_consistency(&batch(u, v, &c_.y, c_.shape), margin).unwrap().loss;
        check_pair_loss("triplet", &c_, &out, &f)?;
        if all_share || b == 1 {
            // No negative anywhere: nothing to push apart.
            prop_assert_eq!(out.loss, 0.0);
            prop_assert!(out.d_images.iter().chain(&out.d_texts).all(|&g| g == 0.0));
        }
        prop_assert!(out.loss >= 0.0);
    }

    #[test]
    fn imc_gradient_matches_finite_differences(
        b in sizes(), d in 2usize..6, c in 1usize..5, all_share: bool, seed: u64,
    ) {
        let c_ = case(seed, b, d, c, all_share);
        let out = imc_consistency(&batch(&c_.u, &c_.v, &c_.y, c_.shape)).unwrap();
        let f = |u: &[f64], v: &[f64]| imc_consistency(&batch(u, v, &c_.y, c_.shape)).unwrap().loss;
        check_pair_loss("imc", &c_, &out, &f)?;
        let parts: f64 = out.terms.iter().map(|t| t.1).sum();
        prop_assert!((parts - out.loss).abs() < 1e-12);
        if b == 1 {
            prop_assert_eq!(out.terms[1], ("intra", 0.0));
        }
    }

    #[test]
    fn dscmr_gradient_matches_finite_differences(
        b in sizes(), d in 2usize..6, c in 1usize..5, all_share: bool,
        alpha in 0.0f64..2.0, beta in 0.0f64..2.0, seed: u64,
    ) {
        let c_ = case(seed, b, d, c, all_share);
        let w = DscmrWeights { alpha, beta };
        let out = dscmr_loss(&batch(&c_.u, &c_.v, &c_.y, c_.shape), &c_.p, w).unwrap();
        let f = |u: &[f64], v: &[f64]| dscmr_loss(&batch(u, v, &c_.y, c_.shape), &c_.p, w).unwrap().pair.loss;
        check_pair_loss("dscmr", &c_, &out.pair, &f)?;
        let skipped = check_gradient("dscmr ∂/∂P", &c_.p, &out.d_projection, &mut |p| {
            dscmr_loss(&batch(&c_.u, &c_.v, &c_.y, c_.shape), p, w).unwrap().pair.loss
        });
        prop_assert_eq!(skipped, 0, "the DSCMR loss is smooth in P");
        let t = &out.pair.terms;
        prop_assert!((t[0].1 + alpha * t[1].1 + beta * t[2].1 - out.pair.loss).abs() < 1e-12);
    }

    #[test]
    fn f32_inputs_give_the_f64_result(b in sizes(), d in 2usize..6, c in 1usize..5, seed: u64) {
        let c_ = case(seed, b, d, c, false);
        // Round the inputs to f32 first so both precisions see the same numbers.
        let (u32_, v32, p32): (Vec<f32>, Vec<f32>, Vec<f32>) = (
            c_.u.iter().map(|&x| x as f32).collect(),
            c_.v.iter().map(|&x| x as f32).collect(),
            c_.p.iter().map(|&x| x as f32).collect(),
        );
        let (u64_, v64, p64): (Vec<f64>, Vec<f64>, Vec<f64>) = (
            u32_.iter().map(|&x| f64::from(x)).collect(),
            v32.iter().map(|&x| f64::from(x)).collect(),
            p32.iter().map(|&x| f64::from(x)).collect(),
        );
        let b32 = PairBatch { images: &u32_[..], texts: &v32[..], labels: &c_.y[..], shape: c_.shape };
        let b64 = batch(&u64_, &v64, &c_.y, c_.shape);
        let pairs = [
            (triplet_consistency(&b32, 0.2).unwrap(), triplet_consistency(&b64, 0.2).unwrap()),
            (imc_consistency(&b32).unwrap(), imc_consistency(&b64).unwrap()),
            (
                dscmr_loss(&b32, &p32, DscmrWeights::default()).unwrap().pair,
                dscmr_loss(&b64, &p64, DscmrWeights::default()).unwrap().pair,
            ),
        ];
        for (single, double) in pairs {
            prop_assert_eq!(single.loss, double.loss, "the arithmetic is f64 in both");
            for (a, b) in single.d_images.iter().chain(&single.d_texts).zip(double.d_images.iter().chain(&double.d_texts)) {
                prop_assert_eq!(*a, *b as f32);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Hand-computed cases. Two pairs, d = 2: u1 = (1,0), u2 = (0,1), v1 = (1,0), v2 = (1,1), so
// cos(u_i, v_j) = [[1, 1/√2], [0, 1/√2]], cos(u_i, u_j) = I, cos(v_1, v_2) = 1/√2.

const U: [f64; 4] = [1.0, 0.0, 0.0, 1.0];
const V: [f64; 4] = [1.0, 0.0, 1.0, 1.0];
const TWO: BatchShape = BatchShape { items: 2, dim: 2, labels: 2 };

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

#[test]
fn triplet_hand_computed() {
    // y1 = {0}, y2 = {1}: each pair is the other's negative. Margin 0.2, s = cos(u, v):
    //   image 1 vs text 2: 0.2 − 1 + 1/√2 = −0.093 → 0     image 2 vs text 1: 0.2 − 1/√2 + 0 < 0 → 0
    //   text 1 vs image 2: 0.2 − 1 + 0 < 0 → 0             text 2 vs image 1: 0.2 − 1/√2 + 1/√2 = 0.2
    // L = 0.2 / B = 0.1, and only s22 (−½) and s12 (+½) get gradient:
    //   ∂s12/∂u1 = v̂2 − s12·û1 = (0, 1/√2)   → ∂L/∂u1 = (0, 1/(2√2))
    //   ∂s22/∂u2 = v̂2 − s22·û2 = (1/√2, 0)   → ∂L/∂u2 = (−1/(2√2), 0)
    //   ∂s12/∂v2 = (û1 − s12·v̂2)/‖v2‖ = ((1,0) − (½,½))/√2 = (1/(2√2), −1/(2√2))
    //   ∂s22/∂v2 = (û2 − s22·v̂2)/‖v2‖ = (−1/(2√2), 1/(2√2))
    //   → ∂L/∂v2 = ½(1/(2√2), −1/(2√2)) − ½(−1/(2√2), 1/(2√2)) = (1/(2√2), −1/(2√2)); ∂L/∂v1 = 0.
    let y = [1u8, 0, 0, 1];
    let out = triplet_consistency(&batch(&U, &V, &y, TWO), 0.2).unwrap();
    assert!(close(out.loss, 0.1), "{}", out.loss);
    assert!(close(out.terms[0].1, 0.0) && close(out.terms[1].1, 0.1), "{:?}", out.terms);
    let q = R2 / 2.0;
    let want_u = [0.0, q, -q, 0.0];
    let want_v = [0.0, 0.0, q, -q];
    for (a, b) in out.d_images.iter().zip(want_u).chain(out.d_texts.iter().zip(want_v)) {
        assert!(close(*a, b), "{:?} {:?}", out.d_images, out.d_texts);
    }
    // The same embeddings with a shared label: no negative, nothing to pay.
    let shared = [1u8, 0, 1, 1];
    assert_eq!(triplet_consistency(&batch(&U, &V, &shared, TWO), 0.2).unwrap().loss, 0.0);
}

#[test]
fn unlabelled_item_is_not_its_own_negative() {
    // One pair, no label: it shares no label with itself, but j = i is the positive.
    let (u, v, y) = ([1.0, 2.0], [0.5, -1.0], [0u8]);
    let shape = BatchShape { items: 1, dim: 2, labels: 1 };
    assert_eq!(triplet_consistency(&batch(&u, &v, &y, shape), 0.2).unwrap().loss, 0.0);
}

#[test]
fn imc_hand_computed() {
    // y1 = {0}, y2 = {0, 1}: label cosine S = [[1, 1/√2], [1/√2, 1]].
    // L_inter: pair term (1/2)[(1 − 1) + (1 − 1/√2)] = (1 − 1/√2)/2 = 0.1464466
    //          regression (1/4)[(1−1)² + (1/√2 − 1/√2)² + (0 − 1/√2)² + (1/√2 − 1)²]
    //                   = (1/4)[0.5 + (1 − 1/√2)²] = (1/4)(0.5857864) = 0.1464466
    //          L_inter = 0.2928932
    // L_intra: 1/(2·1) · [images: 2·(0 − 1/√2)² + texts: 2·(1/√2 − 1/√2)²] = ½ · 1 = 0.5
    // IMC = 0.7928932
    let y = [1u8, 0, 1, 1];
    let out = imc_consistency(&batch(&U, &V, &y, TWO)).unwrap();
    let inter = (1.0 - R2) / 2.0 + (0.5 + (1.0 - R2).powi(2)) / 4.0;
    assert!(close(out.terms[0].1, inter) && close(inter, 0.292_893_218_813_452_4), "{:?}", out.terms);
    assert!(close(out.terms[1].1, 0.5), "{:?}", out.terms);
    assert!(close(out.loss, 0.792_893_218_813_452_4), "{}", out.loss);
}

#[test]
fn imc_is_zero_only_when_similarities_equal_label_similarities() {
    // Identical one-hot labels and identical, parallel embeddings: every cosine is 1 = S.
    let (u, v, y) = ([1.0, 1.0, 2.0, 2.0], [3.0, 3.0, 0.5, 0.5], [1u8, 1]);
    let shape = BatchShape { items: 2, dim: 2, labels: 1 };
    let out = imc_consistency(&batch(&u, &v, &y, shape)).unwrap();
    assert!(out.loss.abs() < 1e-12 && out.d_images.iter().chain(&out.d_texts).all(|g| g.abs() < 1e-12));
}

#[test]
fn dscmr_hand_computed() {
    // P = I (d = C = 2), y1 = {0}, y2 = {0, 1}: every pair shares label 0, so S ≡ 1 and each
    // summand of J2 is log(1 + e^Γ) − Γ = log(1 + e^−Γ).
    // J1 = (‖UP − Y‖² + ‖VP − Y‖²)/2 = (|(0,1) − (1,1)|² + 0)/2 = 0.5
    // J2 = (1/4) Σ over cos(u,v) = [1, 1/√2, 0, 1/√2], cos(u,u) = [1, 0, 0, 1],
    //      cos(v,v) = [1, 1/√2, 1/√2, 1] of log(1 + e^{−cos/2}):
    //      log(1+e^−0.5) = 0.4740770, log(1+e^−0.3535534) = 0.5319155, log 2 = 0.6931472
    //      = (1/4)(2.2310852 + 2.3344484 + 2.0119851) = 1.6443714
    // J3 = ‖U − V‖²/2 = |(0,1) − (1,1)|²/2 = 0.5
    // J = 0.5 + 1e-3·1.6443714 + 0.1·0.5 = 0.5516444
    let y = [1u8, 0, 1, 1];
    let p = [1.0, 0.0, 0.0, 1.0];
    let out = dscmr_loss(&batch(&U, &V, &y, TWO), &p, DscmrWeights::default()).unwrap();
    let t = &out.pair.terms;
    assert!(close(t[0].1, 0.5) && close(t[2].1, 0.5), "{t:?}");
    assert!((t[1].1 - 1.644_371_392_499_448_5).abs() < 1e-9, "{t:?}");
    assert!((out.pair.loss - 0.551_644_371_392_499_4).abs() < 1e-9, "{}", out.pair.loss);
    // ∂J1/∂P = 2 Σ_X XᵀR / B with the only non-zero residual R_2 = (−1, 0) at u2 = (0, 1):
    // ∂J1/∂P = [[0, 0], [−1, 0]].
    let want_dp = [0.0, 0.0, -1.0, 0.0];
    assert!(out.d_projection.iter().zip(want_dp).all(|(a, b)| close(*a, b)), "{:?}", out.d_projection);
}

// ---------------------------------------------------------------------------------------------
// Bad input: an error that names the problem, never a panic.

#[test]
fn bad_input_is_an_error() {
    let y = [1u8, 0, 0, 1];
    let p = [1.0, 0.0, 0.0, 1.0];
    let all = |u: &[f64], v: &[f64], y: &[u8], shape: BatchShape| {
        let b = batch(u, v, y, shape);
        [
            triplet_consistency(&b, 0.2).err(),
            imc_consistency(&b).err(),
            dscmr_loss(&b, &p, DscmrWeights::default()).err(),
        ]
    };
    let shape_err = |e: &Option<Error>| matches!(e, Some(Error::Shape { .. }));
    let data_err = |e: &Option<Error>| matches!(e, Some(Error::Data { .. }));

    assert!(all(&U[..3], &V, &y, TWO).iter().all(shape_err), "short images");
    assert!(all(&U, &V[..2], &y, TWO).iter().all(shape_err), "short texts");
    assert!(all(&U, &V, &y[..3], TWO).iter().all(shape_err), "short labels");
    assert!(all(&[], &[], &[], BatchShape { items: 0, dim: 2, labels: 2 }).iter().all(shape_err), "empty batch");
    assert!(all(&U, &V, &y, BatchShape { items: 2, dim: 2, labels: 0 }).iter().all(shape_err), "0 labels");

    let mut nan = U;
    nan[3] = f64::NAN;
    assert!(all(&nan, &V, &y, TWO).iter().all(data_err), "NaN image");
    let mut inf = V;
    inf[0] = f64::INFINITY;
    assert!(all(&U, &inf, &y, TWO).iter().all(data_err), "infinite text");
    let zero_row = [0.0, 0.0, 0.0, 1.0];
    assert!(all(&zero_row, &V, &y, TWO).iter().all(data_err), "zero image row");
    assert!(all(&U, &V, &[2, 0, 0, 1], TWO).iter().all(data_err), "label value 2");

    let b = batch(&U, &V, &y, TWO);
    for m in [f64::NAN, -0.1, f64::INFINITY] {
        assert!(matches!(triplet_consistency(&b, m), Err(Error::Config { .. })), "margin {m}");
    }
    assert!(matches!(dscmr_loss(&b, &p[..3], DscmrWeights::default()), Err(Error::Shape { .. })));
    assert!(matches!(dscmr_loss(&b, &[f64::NAN, 0.0, 0.0, 1.0], DscmrWeights::default()), Err(Error::Data { .. })));
    for w in [DscmrWeights { alpha: -1.0, beta: 0.1 }, DscmrWeights { alpha: 1e-3, beta: f64::NAN }] {
        assert!(matches!(dscmr_loss(&b, &p, w), Err(Error::Config { .. })), "{w:?}");
    }
    // An f32 batch overflowing f64 cannot happen; a huge but finite one must stay finite.
    let big = [1e300, 0.0, 0.0, 1e300];
    assert!(imc_consistency(&batch(&big, &V, &y, TWO)).is_ok());
}
