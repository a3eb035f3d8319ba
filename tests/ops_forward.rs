//! Every op of the `Backend` trait, run through `Cpu` as `&mut dyn Backend`, against its f64
//! definition (tests/common/mod.rs, `naive`) on random shapes: odd sizes, length-1 sequences,
//! a batch of one item with one segment, items of different lengths.
//!
//! Tolerance: relative norm 1e-5 (f32 arithmetic against an f64 definition; the observed
//! errors are ~1e-7) unless a test says why it needs another. Outputs the op overwrites are
//! poisoned with NaN first; outputs it must leave alone hold sentinels that are compared
//! bit for bit; accumulating ops start from random values and must add (`+=`).
//!
//! The backward ops (`*_bwd`, `scatter_add_rows`, the loss gradients) are checked against
//! finite differences in tests/ops_gradients.rs; here only their forward halves.

mod common;

use common::{Gen, naive, offsets_of, rand_ids, rand_range, randv, randv_scaled, rel_err, segments, to64};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use semshare::backend::{AdamW, Backend, Gemm, GruStep};
use semshare::tensor::Tensor;

const TOL: f64 = 1e-5;

fn dev() -> semshare::backend::cpu::Cpu {
    common::cpu()
}

type R = Result<(), TestCaseError>;

fn lengths_strategy(max_items: usize, max_len: usize) -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1usize..=max_len, 1..=max_items)
}

// ---- memory ---------------------------------------------------------------------------------

#[test]
fn name_is_cpu() {
    let mut c = dev();
    let b: &mut dyn Backend = &mut c;
    assert!(b.name().starts_with("cpu ("), "{}", b.name());
}

proptest! {
    #![proptest_config(common::config(128))]

    #[test]
    fn upload_download_zeros_fill_copy_roundtrip(rows in 1usize..9, cols in 1usize..13, v in -3.0f32..3.0, seed: u64) {
        let mut c = dev();
        let b: &mut dyn Backend = &mut c;
        let data = randv(seed, rows * cols);
        let t = b.upload(&data, &[rows, cols]).unwrap();
        prop_assert_eq!(t.shape(), &[rows, cols][..]);
        prop_assert_eq!(b.download(t.view()).unwrap(), data.clone());

        let mut z = b.zeros(&[rows, cols]).unwrap();
        prop_assert_eq!(z.shape(), &[rows, cols][..]);
        prop_assert!(b.download(z.view()).unwrap().iter().all(|&x| x == 0.0));

        b.fill(z.view_mut(), f32::NAN).unwrap();
        prop_assert!(b.download(z.view()).unwrap().iter().all(|x| x.is_nan()));
        b.fill(z.view_mut(), v).unwrap();
        prop_assert!(b.download(z.view()).unwrap().iter().all(|&x| x == v));

        // copy overwrites a NaN-poisoned destination, also into a sub-range.
        let mut dst = b.upload(&vec![f32::NAN; rows * cols + 3], &[rows * cols + 3]).unwrap();
        b.copy(t.view(), dst.sub_mut(2, rows * cols)).unwrap();
        let got = b.download(dst.view()).unwrap();
        prop_assert!(got[0].is_nan() && got[1].is_nan() && got[rows * cols + 2].is_nan());
        prop_assert_eq!(&got[2..2 + rows * cols], &data[..]);

        let ids = rand_ids(seed, rows, 1000);
        let i = b.upload_ids(&ids).unwrap();
        prop_assert_eq!(i.cpu(), &ids[..]);
        prop_assert_eq!(i.len(), rows);
    }
}

#[test]
fn alloc_has_the_shape_asked_and_takes_writes() {
    // `alloc`'s contents are unspecified (tests/dirty_buffers.rs checks that every op writing
    // into one overwrites it whole); its shape and length are not.
    let mut c = dev();
    let b: &mut dyn Backend = &mut c;
    for shape in [&[1usize][..], &[3, 5], &[2, 3, 7], &[5000]] {
        let n: usize = shape.iter().product();
        let mut t = b.alloc(shape).unwrap();
        assert_eq!((t.shape(), t.len()), (shape, n));
        let v = randv(n as u64, n);
        b.copy(b_view(&v).view(), t.view_mut()).unwrap();
        assert_eq!(b.download(t.view()).unwrap(), v);
    }
}

fn b_view(v: &[f32]) -> Tensor {
    Tensor::from_cpu(v.to_vec(), &[v.len()])
}

/// fp16/bf16 features widened (and normalised) by the backend are, bit for bit, the `half`
/// crate's widening followed by the host's input normalisation (`FeatureNorm::apply`): what a
/// batch of f32 features read from the same shard gave before.
#[test]
fn widen_features_is_the_host_widening_and_normalisation_bit_for_bit() {
    use semshare::backend::Half;
    use semshare::model::FeatureNorm;
    let mut dev = dev();
    for half in [Half::F16, Half::Bf16] {
        // The last two are split over threads (whole rows per task).
        let shapes = [(1, 1), (1, 7), (3, 5), (7, 33), (64, 256), (5, 2048), (301, 999), (70_001, 1)];
        for (seed, &(rows, dim)) in shapes.iter().enumerate() {
            let seed = seed as u64;
            let (words, values) = common::halves(seed, rows * dim, half);
            let norm = FeatureNorm { mean: randv(seed ^ 5, dim), inv_std: rand_range(seed ^ 6, dim, 0.1, 30.0) };
            let w = dev.upload(&words, &[words.len()]).unwrap();
            for normalised in [false, true] {
                let n = normalised.then(|| (&norm.mean[..], &norm.inv_std[..]));
                let got = dev.widen_features(w.view(), half, rows, dim, n).unwrap();
                assert_eq!(got.shape(), [rows, dim]);
                let want = if normalised { norm.apply(&values) } else { values.clone() };
                let got = dev.download(got.view()).unwrap();
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{half:?} {rows}x{dim} normalised {normalised}");
            }
        }
    }
    // Each operand's length is checked, naming the op and the operand.
    let w = dev.upload(&[0.0; 3], &[3]).unwrap();
    let (mean, inv_std) = ([0.0f32; 2], [1.0f32; 3]);
    for (rows, dim, norm, what) in [
        (2, 2, None, "words"),
        (3, 2, Some((&inv_std[..], &mean[..])), "mean"),
        (3, 2, Some((&mean[..], &inv_std[..])), "inv_std"),
        (usize::MAX, 2, None, "too many"),
    ] {
        let e = dev.widen_features(w.view(), Half::F16, rows, dim, norm).unwrap_err().to_string();
        assert!(e.contains("widen_features") && e.contains(what), "{rows}x{dim}: {e}");
    }
}

#[test]
fn memory_ops_reject_mismatched_lengths() {
    let mut c = dev();
    let b: &mut dyn Backend = &mut c;
    assert!(b.upload(&[1.0, 2.0, 3.0], &[2, 2]).is_err());
    let src = b.upload(&[1.0, 2.0, 3.0], &[3]).unwrap();
    let mut dst = b.zeros(&[4]).unwrap();
    assert!(b.copy(src.view(), dst.view_mut()).is_err());
    assert_eq!(b.download(dst.view()).unwrap(), vec![0.0; 4], "a rejected copy must not write");
}

// ---- dense algebra --------------------------------------------------------------------------

#[allow(clippy::too_many_arguments)]
fn check_gemm(m: usize, n: usize, k: usize, ta: bool, tb: bool, alpha: f32, beta: f32, seed: u64) -> R {
    let mut c = dev();
    let b: &mut dyn Backend = &mut c;
    let a = randv(seed, m * k);
    let bb = randv(seed ^ 1, k * n);
    let c0 = if beta == 0.0 { vec![f32::NAN; m * n] } else { randv(seed ^ 2, m * n) };
    let want = naive::gemm(&to64(&a), &to64(&bb), &to64(&c0), m, n, k, ta, tb, alpha as f64, beta as f64);
    // With beta = 0 the NaN in c must be ignored, not multiplied: compute the reference from 0.
    let want = if beta == 0.0 {
        naive::gemm(&to64(&a), &to64(&bb), &vec![0.0; m * n], m, n, k, ta, tb, alpha as f64, 0.0)
    } else {
        want
    };
    let at = b.upload(&a, &[m * k]).unwrap();
    let bt = b.upload(&bb, &[k * n]).unwrap();
    let mut ct = b.upload(&c0, &[m * n]).unwrap();
    let g = Gemm { m, n, k, trans_a: ta, trans_b: tb, alpha, beta };
    b.gemm(g, at.view(), bt.view(), ct.view_mut()).unwrap();
    let got = b.download(ct.view()).unwrap();
    // Measured against the product of the absolute values (the size of the terms summed):
    // a dot product that cancels to ~0 keeps the absolute f32 error of its terms.
    let abs = |v: &[f32]| v.iter().map(|x| x.abs() as f64).collect::<Vec<_>>();
    let c_abs = if beta == 0.0 { vec![0.0; m * n] } else { abs(&c0) };
    let terms = naive::gemm(&abs(&a), &abs(&bb), &c_abs, m, n, k, ta, tb, alpha.abs() as f64, beta.abs() as f64);
    let e = err_floor(&got, &want, common::norm(&terms));
    common::report("gemm", e);
    prop_assert!(e < TOL, "gemm {g:?}: rel err {e}");
    Ok(())
}

proptest! {
    #![proptest_config(common::config(256))]

    #[test]
    fn gemm_matches_definition(
        m in 1usize..40, n in 1usize..40, k in 1usize..70, ta: bool, tb: bool,
        alpha in prop_oneof![Just(1.0f32), -2.0f32..2.0],
        beta in prop_oneof![Just(0.0f32), Just(1.0f32), -1.5f32..1.5],
        seed: u64,
    ) {
        check_gemm(m, n, k, ta, tb, alpha, beta, seed)?;
    }
}

#[test]
fn gemm_all_transpose_combinations_fixed_odd_shapes() {
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        for &(m, n, k) in &[(1, 1, 1), (7, 13, 5), (17, 3, 33), (1, 9, 64), (65, 1, 3)] {
            for &(alpha, beta) in &[(1.0, 0.0), (0.5, 1.0), (-1.0, 0.25)] {
                check_gemm(m, n, k, ta, tb, alpha, beta, (m * 31 + n * 7 + k) as u64).unwrap();
            }
        }
    }
}

#[test]
fn gemm_with_empty_inner_dimension_scales_c() {
    let mut c = dev();
    let b: &mut dyn Backend = &mut c;
    let (m, n) = (3, 4);
    let empty = b.zeros(&[0]).unwrap();
    let mut ct = b.upload(&[f32::NAN; 12], &[12]).unwrap();
    let g = Gemm { m, n, k: 0, trans_a: false, trans_b: false, alpha: 1.0, beta: 0.0 };
    b.gemm(g, empty.view(), empty.view(), ct.view_mut()).unwrap();
    assert_eq!(b.download(ct.view()).unwrap(), vec![0.0; 12], "k = 0, beta = 0: c = 0");
    let c0 = randv(5, 12);
    let mut ct = b.upload(&c0, &[12]).unwrap();
    b.gemm(Gemm { beta: 0.5, ..g }, empty.view(), empty.view(), ct.view_mut()).unwrap();
    let want: Vec<f32> = c0.iter().map(|x| 0.5 * x).collect();
    assert_eq!(b.download(ct.view()).unwrap(), want, "k = 0: c = beta·c");
}

#[test]
fn gemm_rejects_mismatched_operands() {
    let mut c = dev();
    let b: &mut dyn Backend = &mut c;
    let a = b.zeros(&[6]).unwrap();
    let bb = b.zeros(&[6]).unwrap();
    let mut ct = b.zeros(&[4]).unwrap();
    let g = Gemm { m: 2, n: 2, k: 3, trans_a: false, trans_b: false, alpha: 1.0, beta: 0.0 };
    assert!(b.gemm(g, a.view(), bb.view(), ct.view_mut()).is_ok());
    assert!(b.gemm(Gemm { k: 2, ..g }, a.view(), bb.view(), ct.view_mut()).is_err());
    assert!(b.gemm(Gemm { n: 3, ..g }, a.view(), bb.view(), ct.view_mut()).is_err());
}

proptest! {
    #![proptest_config(common::config(128))]

    #[test]
    fn add_bias_adds_to_every_row(rows in 1usize..12, cols in 1usize..20, seed: u64) {
        let mut c = dev();
        let b: &mut dyn Backend = &mut c;
        let y0 = randv(seed, rows * cols);
        let bias = randv(seed ^ 1, cols);
        let mut y = b.upload(&y0, &[rows, cols]).unwrap();
        let bt = b.upload(&bias, &[cols]).unwrap();
        b.add_bias(&mut y, bt.view()).unwrap();
        let want: Vec<f64> = (0..rows * cols).map(|i| y0[i] as f64 + bias[i % cols] as f64).collect();
        let e = rel_err(&b.download(y.view()).unwrap(), &want);
        prop_assert!(e < TOL, "rel err {e}");
        prop_assert!(b.add_bias(&mut y, b_zeros(cols + 1).view()).is_err());
    }

    #[test]
    fn bias_bwd_accumulates_column_sums(rows in 1usize..12, cols in 1usize..20, seed: u64) {
        let mut c = dev();
        let b: &mut dyn Backend = &mut c;
        let dy = randv(seed, rows * cols);
        let d0 = randv(seed ^ 1, cols);
        let dyt = b.upload(&dy, &[rows, cols]).unwrap();
        let mut db = b.upload(&d0, &[cols]).unwrap();
        b.bias_bwd(&dyt, db.view_mut()).unwrap();
        let want: Vec<f64> = (0..cols).map(|j| d0[j] as f64 + (0..rows).map(|r| dy[r * cols + j] as f64).sum::<f64>()).collect();
        // Against the sum of absolute values: a column sum may cancel to ~0.
        let terms: Vec<f64> = (0..cols).map(|j| d0[j].abs() as f64 + (0..rows).map(|r| dy[r * cols + j].abs() as f64).sum::<f64>()).collect();
        let e = err_floor(&b.download(db.view()).unwrap(), &want, common::norm(&terms));
        prop_assert!(e < TOL, "rel err {e}");
    }

    #[test]
    fn add_assign_and_scale(n in 1usize..300, s in -3.0f32..3.0, seed: u64) {
        let mut c = dev();
        let b: &mut dyn Backend = &mut c;
        let (y0, x0) = (randv(seed, n), randv(seed ^ 1, n));
        let mut y = b.upload(&y0, &[n]).unwrap();
        let x = b.upload(&x0, &[n]).unwrap();
        b.add_assign(&mut y, &x).unwrap();
        let want: Vec<f64> = y0.iter().zip(&x0).map(|(a, b)| *a as f64 + *b as f64).collect();
        let e = rel_err(&b.download(y.view()).unwrap(), &want);
        prop_assert!(e < TOL, "add_assign rel err {e}");
        b.scale(y.view_mut(), s).unwrap();
        let want: Vec<f64> = want.iter().map(|v| v * s as f64).collect();
        let e = rel_err(&b.download(y.view()).unwrap(), &want);
        prop_assert!(e < TOL || (s == 0.0 && b.download(y.view()).unwrap().iter().all(|&v| v == 0.0)), "scale rel err {e}");
        let other = b.zeros(&[n + 1]).unwrap();
        prop_assert!(b.add_assign(&mut y, &other).is_err());
    }

    #[test]
    fn sum_squares_matches_f64(n in 1usize..5000, scale in 0.01f64..100.0, seed: u64) {
        let mut c = dev();
        let b: &mut dyn Backend = &mut c;
        let x = randv_scaled(seed, n, scale);
        let t = b.upload(&x, &[n]).unwrap();
        let got = b.sum_squares(t.view()).unwrap();
        let want: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
        prop_assert!(((got - want) / want).abs() < TOL, "{got} vs {want}");
    }
}

fn b_zeros(n: usize) -> Tensor {
    Tensor::from_cpu(vec![0.0; n], &[n])
}

// ---- elementwise ----------------------------------------------------------------------------

fn check_gelu(x: &[f32]) -> R {
    let mut c = dev();
    let b: &mut dyn Backend = &mut c;
    let t = b.upload(x, &[x.len()]).unwrap();
    let y = b.gelu_fwd(&t).unwrap();
    prop_assert_eq!(y.shape(), t.shape());
    let want: Vec<f64> = x.iter().map(|&v| naive::gelu(v as f64)).collect();
    // The kernel's tanh is a rational approximation with a documented absolute error below
    // TANH_ABS_ERR (elementwise::tanh_fast), i.e. 0.5·|x|·TANH_ABS_ERR on GELU(x): that
    // allowance is added to TOL·‖want‖. It matters where GELU(x) ≈ 0 (x ≲ −3), where also
    // 1 + tanh(u) cancels in f32: GELU(−5) ≈ −2.3e-7 comes out as 0.
    let allow: Vec<f64> = x.iter().map(|&v| 0.5 * (v as f64).abs() * TANH_ABS_ERR).collect();
    let e = err_allow(&b.download(y.view()).unwrap(), &want, common::norm(&allow));
    prop_assert!(e < TOL, "gelu error {e}");
    Ok(())
}

proptest! {
    #![proptest_config(common::config(128))]

    #[test]
    fn gelu_matches_tanh_definition(n in 1usize..500, scale in 0.1f64..8.0, seed: u64) {
        check_gelu(&randv_scaled(seed, n, scale))?;
    }

    #[test]
    fn label_coordinates_match_definition(n in 1usize..500, scale in 0.1f64..60.0, seed: u64) {
        let mut c = dev();
        let b: &mut dyn Backend = &mut c;
        let x = randv_scaled(seed, n, scale);
        let mut t = b.upload(&x, &[n]).unwrap();
        b.label_coordinates(&mut t).unwrap();
        let y = b.download(t.view()).unwrap();
        // Elementwise relative error: √softplus(−60) ≈ 1e−13 must keep its digits, and
        // √softplus(60) must not overflow on the way.
        for (i, (&got, &xi)) in y.iter().zip(&x).enumerate() {
            let g = xi as f64;
            let want = if g > 0.0 { g + (-g).exp().ln_1p() } else { g.exp().ln_1p() }.sqrt();
            prop_assert!(((got as f64 - want) / want).abs() < 1e-6, "label coordinate of {xi} = {got}, want {want} (at {i})");
        }
    }

    #[test]
    fn dropout_fwd_matches_mask_definition(n in 1usize..2000, p in 0.0f32..0.9, seed: u64) {
        let mut c = dev();
        let b: &mut dyn Backend = &mut c;
        let x = randv(seed, n);
        let mut t = b.upload(&x, &[n]).unwrap();
        b.dropout_fwd(&mut t, p, seed).unwrap();
        let want = naive::dropout(&to64(&x), p as f64, seed);
        let got = b.download(t.view()).unwrap();
        // The zeros must be exactly the definition's zeros (same mask), the rest scaled.
        for (g, w) in got.iter().zip(&want) {
            prop_assert_eq!(*g == 0.0, *w == 0.0);
        }
        let e = rel_err(&got, &want);
        prop_assert!(e < TOL, "dropout rel err {e}");
    }

    #[test]
    fn l2_normalize_rows_matches_definition(rows in 1usize..10, cols in 1usize..30, zero_row in 0usize..10, scale in 1e-3f64..1e3, seed: u64) {
        let mut c = dev();
        let b: &mut dyn Backend = &mut c;
        let mut x = randv_scaled(seed, rows * cols, scale);
        if zero_row < rows {
            x[zero_row * cols..(zero_row + 1) * cols].fill(0.0);
        }
        let mut t = b.upload(&x, &[rows, cols]).unwrap();
        b.l2_normalize_rows(&mut t).unwrap();
        let got = b.download(t.view()).unwrap();
        let want = naive::l2_normalize_rows(&to64(&x), cols);
        let e = rel_err(&got, &want);
        prop_assert!(e < TOL, "rel err {e}");
        if zero_row < rows {
            prop_assert!(got[zero_row * cols..(zero_row + 1) * cols].iter().all(|&v| v == 0.0), "a zero row stays zero");
        }
    }
}

#[test]
fn gelu_fixed_cases_and_parallel_path() {
    check_gelu(&[0.0, 1.0, -1.0, 3.0, -3.0, 10.0, -10.0, 1e-4]).unwrap();
    // Above the 32768-element threshold the kernel splits the work over threads.
    check_gelu(&randv_scaled(9, 40_000, 6.0)).unwrap();
}

#[test]
fn dropout_fwd_rate_identity_and_rejections() {
    let mut c = dev();
    let b: &mut dyn Backend = &mut c;
    let n = 200_000;
    let x = vec![1.0f32; n];
    for &p in &[0.1f32, 0.5] {
        let mut t = b.upload(&x, &[n]).unwrap();
        b.dropout_fwd(&mut t, p, 42).unwrap();
        let got = b.download(t.view()).unwrap();
        let dropped = got.iter().filter(|&&v| v == 0.0).count() as f64 / n as f64;
        assert!((dropped - p as f64).abs() < 0.005, "p = {p}: dropped {dropped}");
        // Inverted dropout keeps the expectation: mean ≈ 1.
        let mean = got.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        assert!((mean - 1.0).abs() < 0.01, "p = {p}: mean {mean}");
        // Another seed, another mask.
        let mut t2 = b.upload(&x, &[n]).unwrap();
        b.dropout_fwd(&mut t2, p, 43).unwrap();
        let same = got.iter().zip(b.download(t2.view()).unwrap()).filter(|(a, b)| (**a == 0.0) == (*b == 0.0)).count();
        assert!(same < n, "seeds 42 and 43 drew the same mask");
    }
    let x = randv(3, 50);
    let mut t = b.upload(&x, &[50]).unwrap();
    b.dropout_fwd(&mut t, 0.0, 7).unwrap();
    assert_eq!(b.download(t.view()).unwrap(), x, "p = 0 is the identity");
    for p in [1.0f32, -0.1, 1.5, f32::NAN] {
        assert!(b.dropout_fwd(&mut t, p, 7).is_err(), "p = {p} must be rejected");
    }
}

// ---- rows -----------------------------------------------------------------------------------

proptest! {
    #![proptest_config(common::config(128))]

    #[test]
    fn gather_rows_matches_definition(vocab in 1usize..20, cols in 1usize..9, n in 1usize..30, seed: u64) {
        let mut c = dev();
        let b: &mut dyn Backend = &mut c;
        let table = randv(seed, vocab * cols);
        let ids = rand_ids(seed ^ 1, n, vocab); // duplicates likely
        let tt = b.upload(&table, &[vocab, cols]).unwrap();
        let it = b.upload_ids(&ids).unwrap();
        let y = b.gather_rows(tt.view(), cols, &it).unwrap();
        prop_assert_eq!(y.shape(), &[n, cols][..]);
        let want = naive::gather_rows(&to64(&table), cols, &ids);
        prop_assert_eq!(rel_err(&b.download(y.view()).unwrap(), &want), 0.0);
        let bad = b.upload_ids(&[vocab as u32]).unwrap();
        prop_assert!(b.gather_rows(tt.view(), cols, &bad).is_err());
    }

    #[test]
    fn set_rows_overwrites_exactly_those_rows(rows in 1usize..20, cols in 1usize..9, n in 1usize..6, seed: u64) {
        let mut c = dev();
        let b: &mut dyn Backend = &mut c;
        let x = randv(seed, rows * cols);
        let value = randv(seed ^ 1, cols);
        let idx = rand_ids(seed ^ 2, n, rows);
        let mut xt = b.upload(&x, &[rows, cols]).unwrap();
        let vt = b.upload(&value, &[cols]).unwrap();
        let it = b.upload_ids(&idx).unwrap();
        b.set_rows(&mut xt, &it, vt.view()).unwrap();
        let want = naive::set_rows(&to64(&x), &idx, &to64(&value));
        prop_assert_eq!(rel_err(&b.download(xt.view()).unwrap(), &want), 0.0);
        let bad = b.upload_ids(&[rows as u32]).unwrap();
        prop_assert!(b.set_rows(&mut xt, &bad, vt.view()).is_err());
    }

    #[test]
    fn segment_mean_fwd_matches_definition(lengths in lengths_strategy(6, 7), cols in 1usize..10, seed: u64) {
        check_segment_mean(&lengths, cols, seed)?;
    }
}

fn check_segment_mean(lengths: &[usize], cols: usize, seed: u64) -> R {
    let mut c = dev();
    let b: &mut dyn Backend = &mut c;
    let seg = segments(b, lengths);
    let x = randv(seed, seg.tokens() * cols);
    let xt = b.upload(&x, &[seg.tokens(), cols]).unwrap();
    let y = b.segment_mean_fwd(&xt, &seg).unwrap();
    prop_assert_eq!(y.shape(), &[lengths.len(), cols][..]);
    let want = naive::segment_mean(&to64(&x), cols, &offsets_of(lengths));
    // Against the mean of absolute values: a mean may cancel to ~0.
    let abs: Vec<f64> = x.iter().map(|v| v.abs() as f64).collect();
    let terms = naive::segment_mean(&abs, cols, &offsets_of(lengths));
    let e = err_floor(&b.download(y.view()).unwrap(), &want, common::norm(&terms));
    prop_assert!(e < TOL, "rel err {e}");
    let short = b.zeros(&[seg.tokens() + 1, cols]).unwrap();
    prop_assert!(b.segment_mean_fwd(&short, &seg).is_err());
    Ok(())
}

#[test]
fn segment_mean_single_item_single_segment() {
    check_segment_mean(&[1], 5, 1).unwrap();
    check_segment_mean(&[1, 1, 1], 1, 2).unwrap();
}

#[test]
fn segments_reject_empty_items() {
    let mut c = dev();
    let b: &mut dyn Backend = &mut c;
    assert!(semshare::backend::Segments::from_lengths(b, &[2, 0, 1]).is_err());
    let s = segments(b, &[2, 3, 1]);
    assert_eq!((s.offsets.clone(), s.items(), s.tokens(), s.max_len, s.len(1)), (vec![0, 2, 5, 6], 3, 6, 3, 3));
}

// ---- layers ---------------------------------------------------------------------------------

fn check_layernorm(rows: usize, d: usize, seed: u64) -> R {
    let mut c = dev();
    let b: &mut dyn Backend = &mut c;
    let eps = 1e-5f32;
    // An offset and a scale per case, so the mean is not ~0 and the variance not ~1/3.
    let mut g = Gen::new(seed);
    let (shift, scale) = (g.sym() * 3.0, 0.1 + 3.0 * g.uniform());
    let x: Vec<f32> = randv(seed, rows * d).iter().map(|&v| (v as f64 * scale + shift) as f32).collect();
    let gamma = rand_range(seed ^ 1, d, 0.5, 1.5);
    let beta = randv(seed ^ 2, d);
    let xt = b.upload(&x, &[rows, d]).unwrap();
    let (gt, bt) = (b.upload(&gamma, &[d]).unwrap(), b.upload(&beta, &[d]).unwrap());
    let (y, stats) = b.layernorm_fwd(&xt, gt.view(), bt.view(), eps).unwrap();
    prop_assert_eq!(y.shape(), &[rows, d][..]);
    prop_assert_eq!(stats.shape(), &[rows, 2][..]);
    let (wy, ws) = naive::layernorm(&to64(&x), &to64(&gamma), &to64(&beta), eps as f64);
    // Against the size of the terms, |x|·rstd·|γ| + |mean|·rstd·|γ| + |β|: y = (x − mean)·rstd·γ + β
    // may cancel to ~0, and x − mean cancels when the spread is small next to the mean (an f32
    // error of ulp(x), magnified by rstd).
    let terms: Vec<f64> = (0..rows * d)
        .map(|i| {
            let (r, c) = (i / d, i % d);
            let (mean, rstd) = (ws[2 * r], ws[2 * r + 1]);
            ((x[i] as f64).abs() + mean.abs()) * rstd * (gamma[c] as f64).abs() + (beta[c] as f64).abs()
        })
        .collect();
    let e = err_floor(&b.download(y.view()).unwrap(), &wy, common::norm(&terms));
    common::report("layernorm y", e);
    prop_assert!(e < TOL, "layernorm y rel err {e} (rows {rows}, d {d})");
    let e = rel_err(&b.download(stats.view()).unwrap(), &ws);
    prop_assert!(e < TOL, "layernorm stats rel err {e}");
    Ok(())
}

proptest! {
    #![proptest_config(common::config(128))]

    #[test]
    fn layernorm_fwd_matches_definition(rows in 1usize..80, d in 1usize..70, seed: u64) {
        check_layernorm(rows, d, seed)?;
    }
}

#[test]
fn layernorm_fwd_fixed_shapes() {
    // d = 1 (y = β), one row, and a multiple-of-64 row count (the parallel path).
    for &(rows, d) in &[(1, 1), (3, 1), (1, 257), (64, 8), (130, 33)] {
        check_layernorm(rows, d, (rows * 1000 + d) as u64).unwrap();
    }
}

fn check_attention(lengths: &[usize], heads: usize, dh: usize, seed: u64) -> R {
    let mut c = dev();
    let b: &mut dyn Backend = &mut c;
    let d = heads * dh;
    let seg = segments(b, lengths);
    let qkv = randv_scaled(seed, seg.tokens() * 3 * d, 1.5);
    let qt = b.upload(&qkv, &[seg.tokens(), 3 * d]).unwrap();
    let (out, probs) = b.attention_fwd(&qt, &seg, heads).unwrap();
    prop_assert_eq!(out.shape(), &[seg.tokens(), d][..]);
    let (wo, wp) = naive::attention(&to64(&qkv), &seg.offsets, heads);
    // Against Σ_j p_ij·|v_j| (the same attention over |v|): a weighted sum may cancel to ~0.
    let qkv_abs_v: Vec<f64> =
        qkv.iter().enumerate().map(|(i, &v)| if i % (3 * d) >= 2 * d { v.abs() as f64 } else { v as f64 }).collect();
    let terms = naive::attention(&qkv_abs_v, &seg.offsets, heads).0;
    let e = err_floor(&b.download(out.view()).unwrap(), &wo, common::norm(&terms));
    common::report("attention out", e);
    prop_assert!(e < TOL, "attention out rel err {e} (lengths {lengths:?}, heads {heads}, dh {dh})");
    let got_p = b.download(probs.view()).unwrap();
    prop_assert_eq!(got_p.len(), wp.len());
    let e = rel_err(&got_p, &wp);
    prop_assert!(e < TOL, "attention probs rel err {e}");
    Ok(())
}

proptest! {
    #![proptest_config(common::config(128))]

    #[test]
    fn attention_fwd_matches_definition(lengths in lengths_strategy(5, 9), heads in 1usize..4, dh in 1usize..6, seed: u64) {
        check_attention(&lengths, heads, dh, seed)?;
    }
}

#[test]
fn attention_fwd_edge_batches() {
    check_attention(&[1], 1, 1, 1).unwrap(); // one item, one segment: out = v
    check_attention(&[1], 3, 2, 2).unwrap();
    check_attention(&[1, 7, 1, 2], 2, 3, 3).unwrap();
    check_attention(&[36, 5], 4, 4, 4).unwrap(); // the image side's longest bag
}

#[test]
fn attention_fwd_rejects_bad_shapes() {
    let mut c = dev();
    let b: &mut dyn Backend = &mut c;
    let seg = segments(b, &[2, 1]);
    let qkv = b.zeros(&[3, 12]).unwrap();
    assert!(b.attention_fwd(&qkv, &seg, 3).is_err(), "d = 4 is not divisible by 3 heads");
    let short = b.zeros(&[2, 12]).unwrap();
    assert!(b.attention_fwd(&short, &seg, 2).is_err(), "2 rows for 3 segments");
}

fn check_gru_step_fwd(lengths: &[usize], hd: usize, s: usize, reverse: bool, out_col: usize, seed: u64) -> R {
    let mut c = dev();
    let b: &mut dyn Backend = &mut c;
    let seg = segments(b, lengths);
    let (items, tokens, oc, steps) = (seg.items(), seg.tokens(), 2 * hd, seg.max_len);
    let xproj = randv(seed, tokens * 3 * hd);
    let hproj = randv(seed ^ 1, items * 3 * hd);
    let bias = randv(seed ^ 4, 3 * hd);
    // The run's states: h_s at rows s·items.. of hs; every other row a sentinel.
    let hs0 = randv(seed ^ 2, (steps + 1) * items * hd);
    let h0 = hs0[s * items * hd..(s + 1) * items * hd].to_vec();
    let sentinel = randv(seed ^ 3, tokens * oc);
    let step = GruStep { s, reverse, hidden: hd, out_col };
    let xt = b.upload(&xproj, &[tokens, 3 * hd]).unwrap();
    let ht = b.upload(&hproj, &[items, 3 * hd]).unwrap();
    let bt = b.upload(&bias, &[3 * hd]).unwrap();
    let mut hs = b.upload(&hs0, &[(steps + 1) * items, hd]).unwrap();
    let mut out = b.upload(&sentinel, &[tokens, oc]).unwrap();
    let mut gates = b.upload(&vec![f32::NAN; steps * items * 4 * hd], &[steps * items, 4 * hd]).unwrap();
    b.gru_step_fwd(step, &seg, &xt, &ht, bt.view(), &mut hs, &mut out, &mut gates).unwrap();
    let (hs1, out1, gates_all) =
        (b.download(hs.view()).unwrap(), b.download(out.view()).unwrap(), b.download(gates.view()).unwrap());
    let h1 = &hs1[(s + 1) * items * hd..(s + 2) * items * hd];
    let gates1 = &gates_all[s * items * 4 * hd..(s + 1) * items * 4 * hd];
    // Only h_{s+1} and this step's gates are written.
    for (i, (&got, &was)) in hs1.iter().zip(&hs0).enumerate() {
        if i / (items * hd) != s + 1 {
            prop_assert_eq!(got.to_bits(), was.to_bits(), "hs[{}] outside h_(s+1) written", i);
        }
    }
    let others = gates_all.iter().enumerate().filter(|(i, _)| i / (items * 4 * hd) != s);
    prop_assert!(others.clone().all(|(_, v)| v.is_nan()), "gates of another step written");

    let mut want_out = to64(&sentinel);
    let mut want_h = to64(&h0);
    // |(1 − z)·n| + |z·h| per entry: h' is their sum and may cancel to ~0, so its f32 error is
    // measured against the size of the terms.
    let mut h_terms: Vec<f64> = h0.iter().map(|v| v.abs() as f64).collect();
    let mut want_gates = vec![0.0; items * 4 * hd]; // idle items: zeros
    let mut active_rows = vec![];
    for it in 0..items {
        let len = lengths[it];
        if s >= len {
            continue;
        }
        let row = seg.offsets[it] + if reverse { len - 1 - s } else { s };
        active_rows.push(row);
        let xp = to64(&xproj[row * 3 * hd..(row + 1) * 3 * hd]);
        // W_hh h + b_hh: the step adds the bias.
        let hp: Vec<f64> =
            hproj[it * 3 * hd..(it + 1) * 3 * hd].iter().zip(&bias).map(|(&a, &b)| a as f64 + b as f64).collect();
        let (hn, r, z, n) = naive::gru_cell(&xp, &hp, &want_h[it * hd..(it + 1) * hd]);
        for i in 0..hd {
            let j = it * hd + i;
            h_terms[j] = ((1.0 - z[i]) * n[i]).abs() + (z[i] * want_h[j]).abs();
        }
        want_h[it * hd..(it + 1) * hd].copy_from_slice(&hn);
        want_out[row * oc + out_col..row * oc + out_col + hd].copy_from_slice(&hn);
        let g = &mut want_gates[it * 4 * hd..(it + 1) * 4 * hd];
        g[..hd].copy_from_slice(&r);
        g[hd..2 * hd].copy_from_slice(&z);
        g[2 * hd..3 * hd].copy_from_slice(&n);
        g[3 * hd..].copy_from_slice(&hp[2 * hd..]);
    }
    let e = err_floor(h1, &want_h, common::norm(&h_terms));
    common::report("gru h", e);
    prop_assert!(e < TOL, "h rel err {e}");
    let e = rel_err(&out1, &want_out);
    prop_assert!(e < TOL, "out rel err {e}");
    let e = rel_err(gates1, &want_gates);
    prop_assert!(e < TOL, "gates rel err {e}");
    // What the step must not touch stays bit-identical: other rows and the other direction's
    // columns of `out`, and the state of idle items.
    for r in 0..tokens {
        for col in 0..oc {
            let written = active_rows.contains(&r) && (out_col..out_col + hd).contains(&col);
            if !written {
                prop_assert_eq!(
                    out1[r * oc + col].to_bits(),
                    sentinel[r * oc + col].to_bits(),
                    "out[{}, {}] touched",
                    r,
                    col
                );
            }
        }
    }
    for it in 0..items {
        if s >= lengths[it] {
            prop_assert_eq!(&h1[it * hd..(it + 1) * hd], &h0[it * hd..(it + 1) * hd], "idle item {} changed h", it);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(common::config(192))]

    #[test]
    fn gru_step_fwd_matches_pytorch_equations(
        lengths in lengths_strategy(5, 6), hd in 1usize..6, s_frac in 0.0f64..1.0, reverse: bool, seed: u64,
    ) {
        let max = *lengths.iter().max().unwrap();
        let s = ((s_frac * max as f64) as usize).min(max - 1);
        let out_col = if reverse { hd } else { 0 };
        check_gru_step_fwd(&lengths, hd, s, reverse, out_col, seed)?;
    }
}

#[test]
fn gru_step_fwd_edge_batches() {
    for reverse in [false, true] {
        let oc = |hd| if reverse { hd } else { 0 };
        check_gru_step_fwd(&[1], 1, 0, reverse, oc(1), 1).unwrap();
        check_gru_step_fwd(&[1], 4, 0, reverse, oc(4), 2).unwrap();
        for s in 0..4 {
            check_gru_step_fwd(&[4, 1, 2], 3, s, reverse, oc(3), 3 + s as u64).unwrap();
        }
    }
}

/// The absolute error bound `elementwise::tanh_fast` documents (GELU's tanh).
const TANH_ABS_ERR: f64 = 1e-6;

/// Passes (`< TOL`) iff ‖got − want‖ < TOL·‖want‖ + allow: relative error with an absolute
/// allowance for a documented approximation.
fn err_allow(got: &[f32], want: &[f64], allow: f64) -> f64 {
    let diff: Vec<f64> = got.iter().zip(want).map(|(a, b)| *a as f64 - b).collect();
    common::norm(&diff) / (common::norm(want) + allow / TOL).max(1e-30)
}

/// `‖got − want‖ / max(‖want‖, floor)`.
fn err_floor(got: &[f32], want: &[f64], floor: f64) -> f64 {
    let diff: Vec<f64> = got.iter().zip(want).map(|(a, b)| *a as f64 - b).collect();
    common::norm(&diff) / common::norm(want).max(floor).max(1e-30)
}

// ---- losses ---------------------------------------------------------------------------------

proptest! {
    #![proptest_config(common::config(128))]

    #[test]
    fn bce_with_logits_loss_and_gradient(n in 1usize..12, classes in 1usize..30, scale in 0.1f64..20.0, w in -2.0f32..2.0, soft: bool, seed: u64) {
        let mut c = dev();
        let b: &mut dyn Backend = &mut c;
        let x = randv_scaled(seed, n * classes, scale);
        let y: Vec<f32> = if soft {
            rand_range(seed ^ 1, n * classes, 0.0, 1.0)
        } else {
            rand_ids(seed ^ 1, n * classes, 2).iter().map(|&v| v as f32).collect()
        };
        let mut xt = b.upload(&x, &[n, classes]).unwrap();
        let yt = b.upload(&y, &[n, classes]).unwrap();
        let loss = b.bce_with_logits(&mut xt, &yt, w).unwrap();
        let want = naive::bce_mean(&to64(&x), &to64(&y));
        prop_assert!(((loss as f64 - want) / want).abs() < TOL, "loss {loss} vs {want}");
        let m = (n * classes) as f64;
        let want_g: Vec<f64> = x.iter().zip(&y).map(|(&a, &t)| w as f64 * (naive::sigmoid(a as f64) - t as f64) / m).collect();
        // σ(x) − y cancels when the prediction is confident: f32 leaves an absolute error of a
        // few ulps of w/m (the size of each term), so that is the floor of the denominator.
        let e = err_floor(&b.download(xt.view()).unwrap(), &want_g, w.abs() as f64 / m);
        prop_assert!(e < TOL, "gradient error {e}");
    }

    #[test]
    fn cross_entropy_loss_and_gradient(n in 1usize..12, classes in 1usize..40, scale in 0.1f64..10.0, w in -2.0f32..2.0, seed: u64) {
        let mut c = dev();
        let b: &mut dyn Backend = &mut c;
        let x = randv_scaled(seed, n * classes, scale);
        let t = rand_ids(seed ^ 1, n, classes);
        let mut xt = b.upload(&x, &[n, classes]).unwrap();
        let tt = b.upload_ids(&t).unwrap();
        let loss = b.cross_entropy(&mut xt, &tt, w).unwrap();
        let want = naive::ce_mean(&to64(&x), classes, &t);
        // classes = 1 gives a loss of exactly 0: compare absolutely there.
        prop_assert!((loss as f64 - want).abs() < TOL * want.abs().max(1e-2), "loss {loss} vs {want}");
        let want_g = naive::ce_grad(&to64(&x), classes, &t, w as f64);
        // softmax − onehot cancels at the target when the prediction is confident (p_t ≈ 1):
        // f32 leaves an absolute error of a few ulps of w/n there, the floor of the denominator.
        let e = err_floor(&b.download(xt.view()).unwrap(), &want_g, w.abs() as f64 / n as f64);
        prop_assert!(e < TOL, "gradient error {e}");
        let bad = b.upload_ids(&vec![classes as u32; n]).unwrap();
        prop_assert!(b.cross_entropy(&mut xt, &bad, w).is_err());
    }
}

/// Logits far apart: softmax(x)[target] underflows in f32, but the loss `logsumexp − x_t`
/// is finite (here ≈ 200). The kernel once took `ln(exp(x_t − max))`, which is ln 0 = −∞
/// (and imprecise from a gap of ~87 on, in the subnormals): fixed, kept as a regression test.
#[test]
fn cross_entropy_is_finite_for_far_apart_logits() {
    let mut c = dev();
    let b: &mut dyn Backend = &mut c;
    let t = b.upload_ids(&[0]).unwrap();
    // The loss is gap + ln(1 + e^−gap) = gap to f32 precision for all of these.
    for gap in [90.0f32, 100.0, 104.0, 200.0] {
        let mut x = b.upload(&[0.0, gap], &[1, 2]).unwrap();
        let loss = b.cross_entropy(&mut x, &t, 1.0).unwrap();
        assert!((loss - gap).abs() < 1e-5 * gap, "gap {gap}: loss {loss}");
        assert_eq!(b.download(x.view()).unwrap(), vec![-1.0, 1.0], "gap {gap}: gradient");
    }
}

// ---- optimizer ------------------------------------------------------------------------------

proptest! {
    #![proptest_config(common::config(128))]

    #[test]
    fn adamw_matches_pytorch(
        n in 1usize..200, lr in 1e-3f32..0.3, wd in prop_oneof![Just(0.0f32), 0.0f32..0.2],
        beta1 in 0.5f32..0.95, beta2 in 0.9f32..0.9999, eps in prop_oneof![Just(1e-8f32), 1e-6f32..1e-2],
        grad_scale in prop_oneof![Just(1.0f32), 0.05f32..2.0], steps in 1u64..5, seed: u64,
    ) {
        let mut c = dev();
        let b: &mut dyn Backend = &mut c;
        let p0 = randv(seed, n);
        let mut pt = b.upload(&p0, &[n]).unwrap();
        let mut mt = b.zeros(&[n]).unwrap();
        let mut vt = b.zeros(&[n]).unwrap();
        let (mut p, mut m, mut v) = (to64(&p0), vec![0.0; n], vec![0.0; n]);
        // m over |g|: the size of the terms of m, which may cancel to ~0 over steps.
        let mut m_abs = vec![0.0f64; n];
        for step in 1..=steps {
            let g = randv(seed ^ step, n);
            for (ma, gi) in m_abs.iter_mut().zip(&g) {
                *ma = beta1 as f64 * *ma + (1.0 - beta1 as f64) * (*gi as f64 * grad_scale as f64).abs();
            }
            let gt = b.upload(&g, &[n]).unwrap();
            let hp = AdamW { lr, beta1, beta2, eps, weight_decay: wd, step, grad_scale };
            b.adamw(pt.view_mut(), gt.view(), mt.view_mut(), vt.view_mut(), hp).unwrap();
            naive::adamw(&mut p, &to64(&g), &mut m, &mut v, lr as f64, beta1 as f64, beta2 as f64, eps as f64, wd as f64, step as i32, grad_scale as f64);
        }
        let got_p = b.download(pt.view()).unwrap();
        // Against ‖p0‖: a weight that the update moves to ~0 keeps the f32 error of p0's size.
        let e = err_floor(&got_p, &p, common::norm(&to64(&p0)));
        prop_assert!(e < TOL, "params rel err {e}");
        // The update itself, p − p0, to 1e-4: it is a difference of two f32 numbers of size
        // ~1, so f32 rounding of p (6e-8) shows up relative to an update as small as lr·1e-3.
        // Measured against the update the steps would make without cancellation in m (last
        // step's m̂ of |g|, times lr·steps, plus the decay), as m may cancel to ~0.
        let du: Vec<f64> = got_p.iter().zip(&p0).map(|(a, b)| *a as f64 - *b as f64).collect();
        let dw: Vec<f64> = p.iter().zip(&p0).map(|(a, b)| a - *b as f64).collect();
        let bc1 = 1.0 - (beta1 as f64).powi(steps as i32);
        let bc2 = 1.0 - (beta2 as f64).powi(steps as i32);
        let terms: Vec<f64> = (0..n)
            .map(|i| {
                let step = lr as f64 * (m_abs[i] / bc1) / ((v[i] / bc2).sqrt() + eps as f64);
                steps as f64 * (step + lr as f64 * wd as f64 * p0[i].abs() as f64)
            })
            .collect();
        let diff: Vec<f64> = du.iter().zip(&dw).map(|(a, b)| a - b).collect();
        let e = common::norm(&diff) / common::norm(&dw).max(common::norm(&terms));
        common::report("adamw update", e);
        prop_assert!(e < 1e-4, "update rel err {e}");
        let e = err_floor(&b.download(mt.view()).unwrap(), &m, common::norm(&m_abs));
        prop_assert!(e < TOL, "m rel err {e}");
        let e = rel_err(&b.download(vt.view()).unwrap(), &v);
        prop_assert!(e < TOL, "v rel err {e}");
    }
}

#[test]
fn adamw_first_step_moves_each_weight_by_lr() {
    // Step 1, no decay: m̂ = g, v̂ = g², so p moves by −lr·sign(g) (up to eps) — a value a
    // reader can check by hand.
    let mut c = dev();
    let b: &mut dyn Backend = &mut c;
    let mut p = b.upload(&[1.0, 1.0, -2.0], &[3]).unwrap();
    let g = b.upload(&[0.5, -3.0, 1e-3], &[3]).unwrap();
    let (mut m, mut v) = (b.zeros(&[3]).unwrap(), b.zeros(&[3]).unwrap());
    let hp = AdamW { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, step: 1, grad_scale: 1.0 };
    b.adamw(p.view_mut(), g.view(), m.view_mut(), v.view_mut(), hp).unwrap();
    let got = b.download(p.view()).unwrap();
    for (g, w) in got.iter().zip([0.9f32, 1.1, -2.1]) {
        assert!((g - w).abs() < 1e-5, "{got:?}");
    }
    // Decay alone (zero gradient): p ← p·(1 − lr·wd).
    let mut p = b.upload(&[2.0], &[1]).unwrap();
    let g = b.upload(&[0.0], &[1]).unwrap();
    let (mut m, mut v) = (b.zeros(&[1]).unwrap(), b.zeros(&[1]).unwrap());
    b.adamw(p.view_mut(), g.view(), m.view_mut(), v.view_mut(), AdamW { weight_decay: 0.5, ..hp }).unwrap();
    assert!((b.download(p.view()).unwrap()[0] - 2.0 * 0.95).abs() < 1e-6);
}

#[test]
fn adamw_rejects_step_zero_and_betas_outside_the_unit_interval() {
    let mut c = dev();
    let b: &mut dyn Backend = &mut c;
    let mut p = b.upload(&[1.0], &[1]).unwrap();
    let g = b.upload(&[0.5], &[1]).unwrap();
    let (mut m, mut v) = (b.zeros(&[1]).unwrap(), b.zeros(&[1]).unwrap());
    let hp = AdamW { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, step: 0, grad_scale: 1.0 };
    for bad in [hp, AdamW { step: 1, beta1: 1.0, ..hp }, AdamW { step: 1, beta2: -0.1, ..hp }] {
        assert!(b.adamw(p.view_mut(), g.view(), m.view_mut(), v.view_mut(), bad).is_err(), "{bad:?}");
    }
    assert_eq!(b.download(p.view()).unwrap(), [1.0], "a rejected update must not touch the parameters");
}

#[test]
fn row_ops_reject_tensors_without_columns_and_attention_zero_heads() {
    // Each of these walked rows of width 0 (a panic in chunks_exact) or divided by heads.
    let mut c = dev();
    let b: &mut dyn Backend = &mut c;
    let empty = b.zeros(&[3, 0]).unwrap();
    let none = b.zeros(&[0]).unwrap();
    let seg = segments(b, &[1, 2]);
    assert!(b.add_bias(&mut empty.clone(), none.view()).is_err());
    assert!(b.bias_bwd(&empty, b_zeros(0).view_mut()).is_err());
    assert!(b.l2_normalize_rows(&mut empty.clone()).is_err());
    assert!(b.segment_mean_fwd(&empty, &seg).is_err());
    assert!(b.layernorm_fwd(&empty, none.view(), none.view(), 1e-5).is_err());
    let ids = b.upload_ids(&[0, 0, 0]).unwrap();
    assert!(b.cross_entropy(&mut empty.clone(), &ids, 1.0).is_err());
    assert!(b.bce_with_logits(&mut empty.clone(), &empty, 1.0).is_err());
    let qkv = b.zeros(&[3, 12]).unwrap();
    assert!(b.attention_fwd(&qkv, &seg, 0).is_err());
    let (dout, probs) = (b.zeros(&[3, 4]).unwrap(), b.zeros(&[5]).unwrap());
    assert!(b.attention_bwd(&qkv, &probs, &seg, 0, &dout, None).is_err());
}

/// The suite runs per forced path (`SEMSHARE_CPU=portable cargo test --test ops_forward`, .ci/run):
/// the path the kernels took is the one asked for, and it is printed.
#[test]
fn cpu_path_is_the_forced_one() {
    use semshare::backend::cpu::dispatch;
    let active = dispatch::active().unwrap().path();
    println!("CPU path: {}", active.name());
    match std::env::var(dispatch::ENV) {
        Ok(name) if !name.is_empty() => assert_eq!(active.name(), name),
        _ => assert_eq!(active, dispatch::best().path()),
    }
}

/// The CPU's fused post-LN join (`residual_layernorm_fwd`/`_bwd`, one visit per row) is bit
/// for bit its definition as separate ops: dropout, residual add, LayerNorm; LayerNorm's
/// backward, then the mask on a copy. Rows whose start is not a multiple of four (d = 19) take
/// the dropout hash groups across rows, as the unfused op does.
#[test]
fn bias_gelu_dropout_is_its_ops_bitwise() {
    let bits = |t: &[f32]| t.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    // d 19: blocks of whole rows that start off a hash group of 4; 70 × 1024 runs in parallel.
    for (rows, d) in [(3, 19), (70, 1024), (1152, 256), (5, 1)] {
        for p in [0.0, 0.3] {
            for with_bias in [true, false] {
                let mut dev = dev();
                let seed = 31 + rows as u64;
                for (name, fused, ops) in common::ffn_activation_both_ways(&mut dev, (rows, d), p, with_bias, seed) {
                    assert_eq!(bits(&fused), bits(&ops), "{name}: rows {rows}, d {d}, p {p}, bias {with_bias}");
                }
            }
        }
    }
    let mut dev = dev();
    let mut u = dev.upload(&[1.0; 6], &[2, 3]).unwrap();
    let e = dev.bias_gelu_dropout_fwd(&mut u, None, 1.0, 7).unwrap_err().to_string();
    assert!(e.contains("dropout probability 1"), "{e}");
    let bias = dev.upload(&[1.0; 2], &[2]).unwrap();
    let e = dev.bias_gelu_dropout_fwd(&mut u, Some(bias.view()), 0.1, 7).unwrap_err().to_string();
    assert!(e.contains("bias_gelu_dropout_fwd") && e.contains("bias"), "{e}");
}

#[test]
fn residual_layernorm_is_its_ops_bitwise() {
    let bits = |t: &[f32]| t.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    for (rows, d) in [(3, 19), (70, 19), (1152, 256), (5, 1)] {
        for p in [0.0, 0.3] {
            let mut dev = dev();
            let b: &mut dyn Backend = &mut dev;
            let seed = 11 + rows as u64;
            let n = rows * d;
            let (a0, x, dy) = (randv(seed, n), randv(seed ^ 1, n), randv(seed ^ 2, n));
            let (gamma, beta) = (randv(seed ^ 3, d), randv(seed ^ 4, d));
            let up = |b: &mut dyn Backend, v: &[f32], shape: &[usize]| b.upload(v, shape).unwrap();
            let (xt, dyt) = (up(b, &x, &[rows, d]), up(b, &dy, &[rows, d]));
            let (g, be) = (up(b, &gamma, &[d]), up(b, &beta, &[d]));

            let mut a = up(b, &a0, &[rows, d]);
            let (y, stats) = b.residual_layernorm_fwd(&mut a, &xt, g.view(), be.view(), 1e-5, p, 7).unwrap();
            let mut dgamma = up(b, &vec![0.5; d], &[d]);
            let mut dbeta = up(b, &vec![0.25; d], &[d]);
            let mut dbias = up(b, &vec![-0.5; d], &[d]);
            let (dx, da) = b
                .residual_layernorm_bwd(
                    &a,
                    &stats,
                    g.view(),
                    &dyt,
                    dgamma.view_mut(),
                    dbeta.view_mut(),
                    Some(dbias.view_mut()),
                    p,
                    7,
                )
                .unwrap();

            let mut s = up(b, &a0, &[rows, d]);
            b.dropout_fwd(&mut s, p, 7).unwrap();
            b.add_assign(&mut s, &xt).unwrap();
            let (y2, stats2) = b.layernorm_fwd(&s, g.view(), be.view(), 1e-5).unwrap();
            let mut dgamma2 = up(b, &vec![0.5; d], &[d]);
            let mut dbeta2 = up(b, &vec![0.25; d], &[d]);
            let dx2 = b.layernorm_bwd(&s, &stats2, g.view(), &dyt, dgamma2.view_mut(), dbeta2.view_mut()).unwrap();
            let mut da2 = dx2.clone();
            b.dropout_bwd(&mut da2, p, 7).unwrap();
            let mut dbias2 = up(b, &vec![-0.5; d], &[d]);
            b.bias_bwd(&da2, dbias2.view_mut()).unwrap();

            let what = format!("rows {rows}, d {d}, p {p}");
            for (name, got, want) in [
                ("s", &a, &s),
                ("y", &y, &y2),
                ("stats", &stats, &stats2),
                ("dx", &dx, &dx2),
                ("da", &da, &da2),
                ("dgamma", &dgamma, &dgamma2),
                ("dbeta", &dbeta, &dbeta2),
                ("the sublayer's dbias", &dbias, &dbias2),
            ] {
                assert_eq!(bits(got.cpu()), bits(want.cpu()), "{name}: {what}");
            }
        }
    }
}

/// The attention backward with the qkv bias's gradient is the backward then `bias_bwd` of
/// dqkv, bit for bit, and it adds to what the gradient held.
#[test]
fn attention_bwd_with_bias_is_its_ops_bitwise() {
    let bits = |t: &[f32]| t.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    for (lengths, heads, dh) in [(vec![1], 1, 1), (vec![5, 1, 36], 2, 3), (vec![36; 16], 4, 16)] {
        let mut dev = dev();
        let b: &mut dyn Backend = &mut dev;
        let seg = segments(b, &lengths);
        let (t, d) = (seg.tokens(), heads * dh);
        let qkv = b.upload(&randv(t as u64, t * 3 * d), &[t, 3 * d]).unwrap();
        let dout = b.upload(&randv(5, t * d), &[t, d]).unwrap();
        let (_, probs) = b.attention_fwd(&qkv, &seg, heads).unwrap();
        let db0 = randv(6, 3 * d);
        let mut dbias = b.upload(&db0, &[3 * d]).unwrap();
        let dqkv = b.attention_bwd(&qkv, &probs, &seg, heads, &dout, Some(dbias.view_mut())).unwrap();
        let dqkv2 = b.attention_bwd(&qkv, &probs, &seg, heads, &dout, None).unwrap();
        let mut dbias2 = b.upload(&db0, &[3 * d]).unwrap();
        b.bias_bwd(&dqkv2, dbias2.view_mut()).unwrap();
        let what = format!("lengths {lengths:?}, {heads} heads of {dh}");
        assert_eq!(bits(dqkv.cpu()), bits(dqkv2.cpu()), "dqkv: {what}");
        assert_eq!(bits(dbias.cpu()), bits(dbias2.cpu()), "dbias: {what}");
        assert_ne!(bits(dbias.cpu()), bits(&db0), "dbias unchanged: {what}");
        let mut short = b.zeros(&[3 * d - 1]).unwrap();
        assert!(b.attention_bwd(&qkv, &probs, &seg, heads, &dout, Some(short.view_mut())).is_err(), "{what}");
    }
}

/// A frozen model's weights (`Backend::freeze`: packed for the GEMM once, then reused) embed
/// bit for bit as the same weights unfrozen, in fp32 and bf16, call after call; the packed
/// copies are dropped with the weights, and the memory is never mistaken for them afterwards.
#[test]
fn frozen_weights_embed_bitwise_as_unfrozen() {
    use semshare::backend::Precision;
    use semshare::backend::cpu::Cpu;
    use semshare::model::{Batch, EmbeddingKind, ImageBatch, ModelConfig, SemShare, TextBatch};
    let cfg = ModelConfig { vocab: 300, object_classes: 20, labels: 6, ..ModelConfig::small() };
    let net = SemShare::new(&cfg).unwrap();
    let mut rng = semshare::rng::Rng::new(5);
    let images = Batch::Image(ImageBatch::random(&mut rng, &[36, 7, 20, 30], cfg.region_dim, 20, 6));
    let texts = Batch::Text(TextBatch::random(&mut rng, &[24, 3, 11, 9, 24, 20], cfg.vocab, 6));
    for precision in [Precision::F32, Precision::Bf16] {
        let mut dev = Cpu::with_precision(precision).unwrap();
        let values = net.store.init_values(1);
        let w = net.store.upload(&mut dev, &values).unwrap();
        let uploaded = net.store.upload(&mut dev, &values).unwrap();
        let frozen = dev.freeze(uploaded).unwrap();
        assert!(frozen.frozen().is_some() && w.frozen().is_none());
        for kind in [EmbeddingKind::Pooled, EmbeddingKind::Label] {
            for batch in [&images, &texts] {
                let want = net.embed(&mut dev, &w, batch, kind).unwrap();
                for _ in 0..2 {
                    let got = net.embed(&mut dev, &frozen, batch, kind).unwrap();
                    let same = got.cpu().iter().zip(want.cpu()).all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(same, "{precision:?} {kind:?}");
                }
            }
        }
        let packed = dev.packed_bytes();
        assert!(packed > 0, "the frozen weights were packed");
        net.embed(&mut dev, &frozen, &texts, EmbeddingKind::Pooled).unwrap();
        assert_eq!(dev.packed_bytes(), packed, "{precision:?}: a later call copied or packed again");
        drop(frozen);
        assert_eq!(dev.packed_bytes(), 0, "the packed copies went with the weights");
        // New weights, perhaps at the old address: embedded from their own values.
        let other = net.store.init_values(2);
        let unfrozen = net.store.upload(&mut dev, &other).unwrap();
        let uploaded = net.store.upload(&mut dev, &other).unwrap();
        let refrozen = dev.freeze(uploaded).unwrap();
        let want = net.embed(&mut dev, &unfrozen, &images, EmbeddingKind::Pooled).unwrap();
        let got = net.embed(&mut dev, &refrozen, &images, EmbeddingKind::Pooled).unwrap();
        assert!(got.cpu().iter().zip(want.cpu()).all(|(x, y)| x.to_bits() == y.to_bits()));
    }
}

/// The embedding at inference (`SharedEncoder::infer`: no cache kept, GELU in fc1's GEMM) is
/// the training forward's pooled z with dropout off, bit for bit: fp32 and bf16, images and
/// texts, the transformer trunk and the FC trunk, frozen and unfrozen weights.
#[test]
fn inference_embeds_bitwise_as_the_training_forward() {
    use semshare::backend::Precision;
    use semshare::backend::cpu::Cpu;
    use semshare::model::{
        Batch, EmbeddingKind, ImageBatch, LossWeights, MaskPlan, ModelConfig, SemShare, TextBatch, Trunk,
    };
    use semshare::nn::Dropout;
    for trunk in [Trunk::Transformer, Trunk::Fc] {
        let cfg = ModelConfig { vocab: 300, object_classes: 20, labels: 6, trunk, ..ModelConfig::small() };
        let net = SemShare::new(&cfg).unwrap();
        let mut rng = semshare::rng::Rng::new(8);
        let images = Batch::Image(ImageBatch::random(&mut rng, &[36, 7, 20, 30, 36], cfg.region_dim, 20, 6));
        let texts = Batch::Text(TextBatch::random(&mut rng, &[24, 3, 11, 9, 24, 20], cfg.vocab, 6));
        for precision in [Precision::F32, Precision::Bf16] {
            let mut dev = Cpu::with_precision(precision).unwrap();
            let values = net.store.init_values(3);
            let w = net.store.upload(&mut dev, &values).unwrap();
            let frozen = {
                let uploaded = net.store.upload(&mut dev, &values).unwrap();
                dev.freeze(uploaded).unwrap()
            };
            for batch in [&images, &texts] {
                let staged = net.stage(&mut dev, batch, &MaskPlan::default(), true).unwrap();
                let mut losses = dev.zeros(&[2]).unwrap();
                let weights = LossWeights { label: 1.0, context: 0.0 };
                let f = net.forward_loss(&mut dev, &w, staged, Dropout::OFF, weights, losses.view_mut()).unwrap();
                let want = f.z.cpu().to_vec();
                for weights in [&w, &frozen] {
                    let got = net.embed(&mut dev, weights, batch, EmbeddingKind::Pooled).unwrap();
                    let same = got.cpu().len() == want.len()
                        && got.cpu().iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(same, "{trunk:?} {precision:?}: the embedding differs from the forward's z");
                }
            }
        }
    }
}

/// An item's bf16 embedding does not depend on its batch, bit for bit (`small` preset): a
/// query embedded alone is the embedding the gallery indexed it with. An item alone has fewer
/// rows than its batch (36 regions against 92; 24 tokens against 72); until session 34 a GEMM
/// of fewer than 64 rows ran in fp32 at bf16 (2.7e-3 relative apart for an image), and the
/// GRU's recurrence was fp32 under 64 texts. Here so that CI runs it on the portable path too.
#[test]
fn bf16_embeddings_do_not_depend_on_the_rest_of_the_batch() {
    use semshare::backend::Precision;
    use semshare::backend::cpu::Cpu;
    use semshare::model::{Batch, EmbeddingKind, ImageBatch, ModelConfig, SemShare, TextBatch};
    let cfg = ModelConfig { vocab: 300, object_classes: 20, labels: 6, ..ModelConfig::small() };
    let model = SemShare::new(&cfg).unwrap();
    let mut dev = Cpu::with_precision(Precision::Bf16).unwrap();
    let w = model.store.upload(&mut dev, &common::noisy_params(&model.store, 23)).unwrap();
    let mut rng = semshare::rng::Rng::new(24);
    let batches = [
        Batch::Image(ImageBatch::random(&mut rng, &[36, 20, 36], cfg.region_dim, 20, 6)),
        Batch::Text(TextBatch::random(&mut rng, &[24, 24, 24], cfg.vocab, 6)),
    ];
    for batch in &batches {
        let all = model.embed(&mut dev, &w, batch, EmbeddingKind::Pooled).unwrap();
        let all = dev.download(all.view()).unwrap();
        for item in 0..3 {
            let one = model.embed(&mut dev, &w, &common::item_of(batch, &cfg, item), EmbeddingKind::Pooled).unwrap();
            let one = dev.download(one.view()).unwrap();
            let kind = if matches!(batch, Batch::Image(_)) { "image" } else { "text" };
            let what = format!("{kind} item {item}, alone and in a batch of 3, at bf16");
            assert!(one.iter().all(|v| v.is_finite()), "{what}: not finite");
            common::same_values(&what, &one, &all[item * cfg.dim..(item + 1) * cfg.dim]);
        }
    }
}

/// Writing to frozen weights is a programming error, caught rather than served stale.
#[test]
#[should_panic(expected = "frozen tensor")]
fn writing_frozen_weights_panics() {
    let mut dev = dev();
    let mut t = dev.freeze(Tensor::from_cpu(vec![1.0; 6], &[2, 3])).unwrap();
    dev.fill(t.view_mut(), 0.0).unwrap();
}

/// The CPU's Bi-GRU recurrence (`gru_fwd` / `gru_bwd`: both directions at once, one per
/// thread) is bit for bit the step-by-step one every other device runs (`gru_fwd_by_steps`:
/// a GEMM and a gate op per step, one direction after the other), in fp32 and in bf16 (70
/// items: the recurrent GEMMs then take the bf16 kernel), with W_hh frozen or not; and both
/// refuse operands of the wrong size.
#[test]
fn gru_recurrence_is_bitwise_the_step_by_step_one() {
    use semshare::backend::cpu::Cpu;
    use semshare::backend::{GruRunBwd, GruRunFwd, Precision, gru_bwd_by_steps, gru_fwd_by_steps};
    let hd = 40;
    for (precision, lengths) in [
        (Precision::F32, vec![36, 1, 17, 40, 3]),
        (Precision::Bf16, (0..70).map(|i| 1 + (i * 7) % 23).collect::<Vec<usize>>()),
    ] {
        for frozen in [false, true] {
            let mut d = Cpu::with_precision(precision).unwrap();
            let seg = common::segments(&mut d, &lengths);
            let (items, steps, tokens) = (seg.items(), seg.max_len, seg.tokens());
            let up = |d: &mut Cpu, seed: u64, shape: &[usize]| {
                common::upload(d, &randv(seed, shape.iter().product()), shape)
            };
            let xproj = [up(&mut d, 1, &[tokens, 3 * hd]), up(&mut d, 2, &[tokens, 3 * hd])];
            let mut w = up(&mut d, 3, &[2, 3 * hd * hd + 3 * hd]);
            if frozen {
                w = d.freeze(w).unwrap();
            }
            let dout = up(&mut d, 4, &[tokens, 2 * hd]);
            // Outputs of one run of each: hs, gates, out; dh, dxproj, dhproj.
            let mut results = Vec::new();
            for fused in [false, true] {
                let zeros = |d: &mut Cpu, shape: &[usize]| d.zeros(shape).unwrap();
                let mut hs = [zeros(&mut d, &[(steps + 1) * items, hd]), zeros(&mut d, &[(steps + 1) * items, hd])];
                let mut gates = [zeros(&mut d, &[steps * items, 4 * hd]), zeros(&mut d, &[steps * items, 4 * hd])];
                let mut out = zeros(&mut d, &[tokens, 2 * hd]);
                let [h0, h1] = &mut hs;
                let [g0, g1] = &mut gates;
                let weights = |i: usize| w.sub(i * (3 * hd * hd + 3 * hd), 3 * hd * hd);
                let bias = |i: usize| w.sub(i * (3 * hd * hd + 3 * hd) + 3 * hd * hd, 3 * hd);
                if fused {
                    // The runs come forward first, then reverse: swapped, they are refused.
                    let swapped = [
                        GruRunFwd {
                            reverse: true,
                            xproj: &xproj[1],
                            w_hh: weights(1),
                            bias_hh: bias(1),
                            hs: h1,
                            gates: g1,
                        },
                        GruRunFwd {
                            reverse: false,
                            xproj: &xproj[0],
                            w_hh: weights(0),
                            bias_hh: bias(0),
                            hs: h0,
                            gates: g0,
                        },
                    ];
                    let e = d.gru_fwd(&seg, hd, swapped, &mut out).unwrap_err().to_string();
                    assert!(e.contains("gru_fwd") && e.contains("expected [false, true]"), "{e}");
                }
                let run = |i: usize, hs, gates| GruRunFwd {
                    reverse: i == 1,
                    xproj: &xproj[i],
                    w_hh: weights(i),
                    bias_hh: bias(i),
                    hs,
                    gates,
                };
                let runs = [run(0, h0, g0), run(1, h1, g1)];
                if fused {
                    d.gru_fwd(&seg, hd, runs, &mut out).unwrap();
                } else {
                    gru_fwd_by_steps(&mut d, &seg, hd, runs, &mut out).unwrap();
                }
                let mut grads: Vec<[Tensor; 3]> = (0..2)
                    .map(|_| {
                        [
                            zeros(&mut d, &[items, hd]),
                            zeros(&mut d, &[tokens, 3 * hd]),
                            zeros(&mut d, &[steps * items, 3 * hd]),
                        ]
                    })
                    .collect();
                let (a, b) = grads.split_at_mut(1);
                let ([dh0, dx0, dp0], [dh1, dx1, dp1]) = (&mut a[0], &mut b[0]);
                let run = |i: usize, dh, dxproj, dhproj| GruRunBwd {
                    reverse: i == 1,
                    w_hh: weights(i),
                    gates: &gates[i],
                    hs: &hs[i],
                    dh,
                    dxproj,
                    dhproj,
                };
                let runs = [run(0, dh0, dx0, dp0), run(1, dh1, dx1, dp1)];
                if fused {
                    d.gru_bwd(&seg, hd, runs, &dout).unwrap();
                } else {
                    gru_bwd_by_steps(&mut d, &seg, hd, runs, &dout).unwrap();
                }
                let mut all = vec![out.cpu().to_vec()];
                for i in 0..2 {
                    all.extend([hs[i].cpu().to_vec(), gates[i].cpu().to_vec()]);
                    all.extend(grads[i].iter().map(|t| t.cpu().to_vec()));
                }
                results.push(all);
            }
            for (i, (want, got)) in results[0].iter().zip(&results[1]).enumerate() {
                let same = want.iter().zip(got).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "{precision:?} frozen {frozen}: output {i} differs");
            }
            assert!(results[1][0].iter().any(|&v| v != 0.0), "the recurrence wrote its outputs");
            // A W_hh one row short is refused.
            let short = w.sub(0, 3 * hd * hd - hd);
            let mut hs = [d.zeros(&[(steps + 1) * items, hd]).unwrap(), d.zeros(&[(steps + 1) * items, hd]).unwrap()];
            let mut gates = [d.zeros(&[steps * items, 4 * hd]).unwrap(), d.zeros(&[steps * items, 4 * hd]).unwrap()];
            let mut out = d.zeros(&[tokens, 2 * hd]).unwrap();
            let ([h0, h1], [g0, g1]) = (&mut hs, &mut gates);
            let run = |i: usize, hs, gates| GruRunFwd {
                reverse: i == 1,
                xproj: &xproj[i],
                w_hh: short,
                bias_hh: w.sub(0, 3 * hd),
                hs,
                gates,
            };
            let runs = [run(0, h0, g0), run(1, h1, g1)];
            assert!(d.gru_fwd(&seg, hd, runs, &mut out).is_err());
        }
    }
}
