//! Gradient checks through the nn layers (Linear, LayerNorm, Embedding, MultiHeadAttention,
//! EncoderBlock with and without dropout, BiGru, SegmentEmbed): the input gradient and every
//! parameter gradient, on random coordinates, against central finite differences of the
//! layer's own f32 forward. Also the convention of nn/mod.rs: parameter gradients accumulate
//! (a second backward doubles them), input gradients are written (a second backward returns
//! the same ones).
//!
//! Why f32 finite differences with a loose tolerance: the layers only run in f32, so the
//! forward being differentiated has rounding noise of a few ulps of S = Σ|r ⊙ y| on the loss
//! (accumulated in f64 from the f32 outputs). A central difference with step h = 1e-2 (with
//! one Richardson step, see common::fd32_at) turns that into ~8e-6·S absolute error per
//! coordinate (measured on gradients that are exactly zero: the key bias, which softmax
//! ignores), against gradient coordinates of ~1e-2..1. So 1e-2 relative norm: several times
//! the noise, while a wrong term (a transposed product, a missed residual, a mask applied
//! twice) is off by ~1.
//! Gradients near or below that noise are compared absolutely instead: the denominator is at
//! least FLOOR = max(1e-3, 5e-3·S) per coordinate, i.e. an absolute error of up to ~6× the
//! noise is accepted there.
//! At rare points the layer is too curved for any f32 step (a LayerNorm row with a tiny
//! variance, a saturated softmax: gradients of ~20 whose plain central difference moves by
//! 10% when the step is halved); such a random case is rejected (`prop_assume!`) and another
//! drawn — the decision looks only at the finite differences, never at the analytic gradient,
//! so a wrong backward cannot make its own cases disappear.
//! LayerNorm-based layers use widths ≥ 4: at width 2 LayerNorm's output is ±γ + β whatever
//! the input (its input gradient ~eps/var is pure rounding noise in f32), and at width 3 a
//! row with a small variance is likely enough (1 in ~200 cases) that its curvature defeats a
//! step of 1e-2 (gradients of ~50 seen). Width 2 and 3 are covered in f64 by ops_gradients.
//! Each op's gradient is checked tightly (1e-4, f64 differences) in tests/ops_gradients.rs;
//! this file checks that the layers wire the ops together correctly.

mod common;

use common::{
    fd32_with_curvature_at, naive, noisy_params, rand_ids, randv, rel_err, rel_err64, sample_coords, segments, to64,
};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use semshare::backend::{Backend, Segments};
use semshare::nn::segment::Location;
use semshare::nn::{
    BiGru, Dropout, Embedding, EncoderBlock, LayerNorm, Linear, MultiHeadAttention, ParamStore, SegmentEmbed,
};
use semshare::tensor::Tensor;

const TOL: f64 = 1e-2;
const STEP: f32 = 1e-2;
/// Coordinates sampled per parameter tensor and for the input.
const COORDS: usize = 12;
/// Gradient size per coordinate below which the comparison becomes absolute: the larger of
/// this and `NOISE_FLOOR · S` (see above).
const FLOOR: f64 = 1e-3;
const NOISE_FLOOR: f64 = 5e-3;

/// ‖got − fd‖ / max(‖fd‖, floor·√k).
fn fd_err(got: &[f32], fd: &[f64], floor: f64) -> f64 {
    let diff: Vec<f64> = got.iter().zip(fd).map(|(a, b)| *a as f64 - b).collect();
    common::norm(&diff) / common::norm(fd).max(floor * (fd.len() as f64).sqrt())
}

type R = Result<(), TestCaseError>;

type Fwd<'a> = Box<dyn FnMut(&mut dyn Backend, &Tensor, &[f32]) -> Vec<f32> + 'a>;
/// Forward + backward with output gradient r, accumulating into g; returns dx (if any).
type Bwd<'a> = Box<dyn FnMut(&mut dyn Backend, &Tensor, &mut Tensor, &[f32], &[f32]) -> Option<Vec<f32>> + 'a>;

struct Layer<'a> {
    store: &'a ParamStore,
    w: Vec<f32>,
    x: Vec<f32>,
    out_len: usize,
    fwd: Fwd<'a>,
    bwd: Bwd<'a>,
}

fn check_layer(what: &str, mut l: Layer, seed: u64) -> R {
    let mut c = common::cpu();
    let b: &mut dyn Backend = &mut c;
    let r = randv(seed ^ 0x5151, l.out_len);
    let w = b.upload(&l.w, &[l.store.total]).unwrap();
    let mut g = b.zeros(&[l.store.total]).unwrap();

    // Once: the gradients to check. Twice: parameter gradients double (+=), dx is the same (=).
    let dx1 = (l.bwd)(b, &w, &mut g, &l.x, &r);
    let g1 = b.download(g.view()).unwrap();
    let dx2 = (l.bwd)(b, &w, &mut g, &l.x, &r);
    let g2 = b.download(g.view()).unwrap();
    let twice: Vec<f64> = g1.iter().map(|&v| 2.0 * v as f64).collect();
    // Not bit-exact: the second pass adds its terms one by one onto g1. An overwrite would be
    // off by 0.5; rounding stays ~1e-6, up to ~2e-5 where the terms of a sum cancel (the key
    // bias's gradient is a sum over rows that is exactly 0 in exact arithmetic).
    let e = rel_err(&g2, &twice);
    prop_assert!(e < 1e-4, "{}: second backward did not double the parameter gradients (rel err {:e})", what, e);
    prop_assert!(g1.iter().any(|&v| v != 0.0), "{}: all parameter gradients are zero", what);
    if let (Some(a), Some(bb)) = (&dx1, &dx2) {
        let e = rel_err(bb, &to64(a));
        prop_assert!(
            e < 1e-6,
            "{}: second backward changed dx (rel err {:e}): input gradients are written, not added",
            what,
            e
        );
    }

    // Finite differences of L = Σ r ⊙ forward(w, x), in f32.
    let x = l.x.clone();
    let wv = l.w.clone();
    let y = (l.fwd)(b, &w, &x);
    let scale: f64 = r.iter().zip(&y).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum();
    let floor = FLOOR.max(NOISE_FLOOR * scale);
    for (i, info) in l.store.infos.iter().enumerate() {
        let p = info.param;
        let coords: Vec<usize> =
            sample_coords(seed ^ (i as u64 + 1), p.len, COORDS).iter().map(|c| c + p.offset).collect();
        let mut f = |wp: &[f32]| {
            let wt = b.upload(wp, &[wp.len()]).unwrap();
            common::dot(&r, &(l.fwd)(b, &wt, &x))
        };
        let (fd, curv) = fd32_with_curvature_at(&mut f, &wv, &coords, STEP);
        assume_smooth(&fd, &curv, floor)?;
        let got: Vec<f32> = coords.iter().map(|&c| g1[c]).collect();
        let e = fd_err(&got, &fd, floor);
        common::report(&format!("{what} d{}", info.name), e);
        prop_assert!(e < TOL, "{}: d{} rel err {:e} (‖fd‖ = {:e})", what, info.name, e, common::norm(&fd));
    }
    if let Some(dx) = dx1 {
        let coords = sample_coords(seed ^ 0x77, x.len(), 2 * COORDS);
        let mut f = |xp: &[f32]| common::dot(&r, &(l.fwd)(b, &w, xp));
        let (fd, curv) = fd32_with_curvature_at(&mut f, &x, &coords, STEP);
        assume_smooth(&fd, &curv, floor)?;
        let got: Vec<f32> = coords.iter().map(|&c| dx[c]).collect();
        let e = fd_err(&got, &fd, floor);
        common::report(&format!("{what} dx"), e);
        prop_assert!(e < TOL, "{}: dx rel err {:e} (‖fd‖ = {:e})", what, e, common::norm(&fd));
    }
    Ok(())
}

/// Reject the case if halving the step moves the plain central difference by more than 5%
/// of the gradient (see the header): the point is too curved to check in f32.
fn assume_smooth(fd: &[f64], curvature: &[f64], floor: f64) -> R {
    let scale = common::norm(fd).max(floor * (fd.len() as f64).sqrt());
    common::report("curvature ratio", common::norm(curvature) / scale);
    prop_assume!(common::norm(curvature) < 0.05 * scale, "too curved for f32 differences");
    Ok(())
}

fn up(b: &mut dyn Backend, x: &[f32], cols: usize) -> Tensor {
    b.upload(x, &[x.len() / cols, cols]).unwrap()
}

fn lengths_strategy(max_items: usize, max_len: usize) -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1usize..=max_len, 1..=max_items)
}

// ---- Linear ---------------------------------------------------------------------------------

fn check_linear(rows: usize, inputs: usize, outputs: usize, bias: bool, seed: u64) -> R {
    let mut store = ParamStore::new();
    let lin = Linear::new(&mut store, "lin", inputs, outputs, bias);
    let layer = Layer {
        store: &store,
        w: noisy_params(&store, seed),
        x: randv(seed ^ 1, rows * inputs),
        out_len: rows * outputs,
        fwd: Box::new(|b, w, x| {
            let xt = up(b, x, inputs);
            let y = lin.forward(b, w, &xt).unwrap();
            b.download(y.view()).unwrap()
        }),
        bwd: Box::new(|b, w, g, x, r| {
            let xt = up(b, x, inputs);
            let dy = up(b, r, outputs);
            let dx = lin.backward(b, w, g, &xt, &dy).unwrap();
            Some(b.download(dx.view()).unwrap())
        }),
    };
    check_layer("Linear", layer, seed)
}

// ---- LayerNorm ------------------------------------------------------------------------------

fn check_layernorm(rows: usize, dim: usize, seed: u64) -> R {
    let mut store = ParamStore::new();
    let ln = LayerNorm::new(&mut store, "ln", dim);
    let layer = Layer {
        store: &store,
        w: noisy_params(&store, seed),
        x: randv(seed ^ 1, rows * dim),
        out_len: rows * dim,
        fwd: Box::new(|b, w, x| {
            let xt = up(b, x, dim);
            let (y, _) = ln.forward(b, w, xt).unwrap();
            b.download(y.view()).unwrap()
        }),
        bwd: Box::new(|b, w, g, x, r| {
            let xt = up(b, x, dim);
            let (_, cache) = ln.forward(b, w, xt).unwrap();
            let dy = up(b, r, dim);
            let dx = ln.backward(b, w, g, cache, &dy).unwrap();
            Some(b.download(dx.view()).unwrap())
        }),
    };
    check_layer("LayerNorm", layer, seed)
}

// ---- Embedding ------------------------------------------------------------------------------

fn check_embedding(vocab: usize, dim: usize, n: usize, seed: u64) -> R {
    let mut store = ParamStore::new();
    let emb = Embedding::new(&mut store, "emb", vocab, dim);
    let ids = rand_ids(seed ^ 3, n, vocab);
    let layer = Layer {
        store: &store,
        w: noisy_params(&store, seed),
        x: vec![],
        out_len: n * dim,
        fwd: Box::new(|b, w, _| {
            let it = b.upload_ids(&ids).unwrap();
            let y = emb.forward(b, w, &it).unwrap();
            b.download(y.view()).unwrap()
        }),
        bwd: Box::new(|b, _w, g, _, r| {
            let it = b.upload_ids(&ids).unwrap();
            let dy = up(b, r, dim);
            emb.backward(b, g, &it, &dy).unwrap();
            None
        }),
    };
    check_layer("Embedding", layer, seed)
}

// ---- MultiHeadAttention ---------------------------------------------------------------------

fn check_mha(lengths: &[usize], heads: usize, dh: usize, seed: u64) -> R {
    let mut c = common::cpu();
    let seg: Segments = segments(&mut c, lengths);
    let dim = heads * dh;
    let mut store = ParamStore::new();
    let mha = MultiHeadAttention::new(&mut store, "attn", dim, heads);
    let layer = Layer {
        store: &store,
        w: noisy_params(&store, seed),
        x: randv(seed ^ 1, seg.tokens() * dim),
        out_len: seg.tokens() * dim,
        fwd: Box::new(|b, w, x| {
            let xt = up(b, x, dim);
            let (y, _) = mha.forward(b, w, &xt, &seg).unwrap();
            b.download(y.view()).unwrap()
        }),
        bwd: Box::new(|b, w, g, x, r| {
            let xt = up(b, x, dim);
            let (_, cache) = mha.forward(b, w, &xt, &seg).unwrap();
            let dy = up(b, r, dim);
            let mut dx = b.zeros(&[seg.tokens(), dim]).unwrap();
            // The out-projection's bias gradient is the caller's (the block's join sums it).
            b.bias_bwd(&dy, mha.out.bias.expect("a bias").of_mut(g)).unwrap();
            mha.backward_into(b, w, g, &xt, &seg, cache, &dy, &mut dx).unwrap();
            Some(b.download(dx.view()).unwrap())
        }),
    };
    check_layer("MultiHeadAttention", layer, seed)
}

// ---- EncoderBlock ---------------------------------------------------------------------------

/// `heads: None` is the FC block (no attention sublayer) of Table 1's `wo-t`.
fn check_block(lengths: &[usize], heads: Option<usize>, dh: usize, ffn: usize, drop: Dropout, seed: u64) -> R {
    let mut c = common::cpu();
    let seg: Segments = segments(&mut c, lengths);
    let dim = heads.unwrap_or(1) * dh;
    let mut store = ParamStore::new();
    let block = EncoderBlock::new(&mut store, "block", dim, heads, ffn);
    let layer = Layer {
        store: &store,
        w: noisy_params(&store, seed),
        x: randv(seed ^ 1, seg.tokens() * dim),
        out_len: seg.tokens() * dim,
        fwd: Box::new(|b, w, x| {
            let xt = up(b, x, dim);
            let (y, _) = block.forward(b, w, xt, &seg, drop).unwrap();
            b.download(y.view()).unwrap()
        }),
        bwd: Box::new(|b, w, g, x, r| {
            let xt = up(b, x, dim);
            let (_, cache) = block.forward(b, w, xt, &seg, drop).unwrap();
            let dy = up(b, r, dim);
            let dx = block.backward(b, w, g, &seg, cache, &dy).unwrap();
            Some(b.download(dx.view()).unwrap())
        }),
    };
    check_layer(&format!("EncoderBlock (dropout {})", drop.p), layer, seed)
}

// ---- BiGru ----------------------------------------------------------------------------------

fn check_bigru(lengths: &[usize], inputs: usize, hidden: usize, seed: u64) -> R {
    let mut c = common::cpu();
    let seg: Segments = segments(&mut c, lengths);
    let mut store = ParamStore::new();
    let gru = BiGru::new(&mut store, "gru", inputs, hidden);
    let layer = Layer {
        store: &store,
        w: noisy_params(&store, seed),
        x: randv(seed ^ 1, seg.tokens() * inputs),
        out_len: seg.tokens() * 2 * hidden,
        fwd: Box::new(|b, w, x| {
            let xt = up(b, x, inputs);
            let (y, _) = gru.forward(b, w, xt, &seg).unwrap();
            b.download(y.view()).unwrap()
        }),
        bwd: Box::new(|b, w, g, x, r| {
            let xt = up(b, x, inputs);
            let (_, cache) = gru.forward(b, w, xt, &seg).unwrap();
            let dy = up(b, r, 2 * hidden);
            let dx = gru.backward(b, w, g, &seg, cache, &dy).unwrap();
            Some(b.download(dx.view()).unwrap())
        }),
    };
    check_layer("BiGru", layer, seed)
}

// ---- SegmentEmbed ---------------------------------------------------------------------------

/// With `positions`, ψ2 reads each segment's position in its item (the text side: one row
/// of ψ2 per position, copied to the items' rows and summed back); else a row of data each.
fn check_segment_embed(
    lengths: &[usize],
    content: usize,
    location: usize,
    dim: usize,
    positions: bool,
    seed: u64,
) -> R {
    let seg: Segments = segments(&mut common::cpu(), lengths);
    let tokens = seg.tokens();
    let mut store = ParamStore::new();
    let se = SegmentEmbed::new(&mut store, "seg", content, location, dim);
    let loc = randv(seed ^ 9, tokens * location);
    let place =
        |b: &mut dyn Backend| if positions { Location::Positions(&seg) } else { Location::Rows(up(b, &loc, location)) };
    let layer = Layer {
        store: &store,
        w: noisy_params(&store, seed),
        x: randv(seed ^ 1, tokens * content),
        out_len: tokens * dim,
        fwd: Box::new(|b, w, x| {
            let (xt, lt) = (up(b, x, content), place(b));
            let (y, _) = se.forward(b, w, xt, lt).unwrap();
            b.download(y.view()).unwrap()
        }),
        bwd: Box::new(|b, w, g, x, r| {
            let (xt, lt) = (up(b, x, content), place(b));
            let (_, cache) = se.forward(b, w, xt, lt).unwrap();
            let dy = up(b, r, dim);
            let dx = se.backward(b, w, g, &seg, cache, &dy, true).unwrap().unwrap();
            Some(b.download(dx.view()).unwrap())
        }),
    };
    check_layer(if positions { "SegmentEmbed by position" } else { "SegmentEmbed" }, layer, seed)
}

/// Without the content's gradient (features that are data), the parameters get the same
/// gradients, bit for bit, and no dx is made.
#[test]
fn segment_embed_without_the_content_gradient_gives_the_same_parameter_gradients() {
    let (tokens, content, location, dim) = (7, 5, 3, 8);
    let mut store = ParamStore::new();
    let se = SegmentEmbed::new(&mut store, "seg", content, location, dim);
    let mut c = common::cpu();
    let b: &mut dyn Backend = &mut c;
    let w = b.upload(&noisy_params(&store, 3), &[store.total]).unwrap();
    let dy = up(b, &randv(4, tokens * dim), dim);
    let mut grads = Vec::new();
    let seg = segments(b, &[tokens]);
    for content_grad in [true, false] {
        let (x, loc) = (up(b, &randv(1, tokens * content), content), up(b, &randv(2, tokens * location), location));
        let (_, cache) = se.forward(b, &w, x, Location::Rows(loc)).unwrap();
        let mut g = b.zeros(&[store.total]).unwrap();
        let dx = se.backward(b, &w, &mut g, &seg, cache, &dy, content_grad).unwrap();
        assert_eq!(dx.is_some(), content_grad);
        grads.push(b.download(g.view()).unwrap());
    }
    assert_eq!(grads[0], grads[1]);
    assert!(grads[0].iter().any(|&v| v != 0.0));
}

proptest! {
    #![proptest_config(common::config(48))]

    #[test]
    fn linear_gradients(rows in 1usize..7, inputs in 1usize..9, outputs in 1usize..9, bias: bool, seed: u64) {
        check_linear(rows, inputs, outputs, bias, seed)?;
    }

    #[test]
    fn layernorm_gradients(rows in 1usize..6, dim in 4usize..12, seed: u64) {
        check_layernorm(rows, dim, seed)?;
    }

    #[test]
    fn embedding_gradients(vocab in 1usize..8, dim in 1usize..6, n in 1usize..10, seed: u64) {
        check_embedding(vocab, dim, n, seed)?;
    }

    #[test]
    fn attention_gradients(lengths in lengths_strategy(3, 5), heads in 1usize..3, dh in 1usize..4, seed: u64) {
        check_mha(&lengths, heads, dh, seed)?;
    }

    #[test]
    fn encoder_block_gradients(lengths in lengths_strategy(3, 4), heads in prop_oneof![Just(None), (1usize..3).prop_map(Some)], dh in 4usize..6, ffn in 1usize..8, p in prop_oneof![Just(0.0f32), 0.1f32..0.5], seed: u64) {
        check_block(&lengths, heads, dh, ffn, Dropout { p, seed: seed ^ 0xD0 }, seed)?;
    }

    #[test]
    fn bigru_gradients(lengths in lengths_strategy(3, 4), inputs in 1usize..4, hidden in 1usize..4, seed: u64) {
        check_bigru(&lengths, inputs, hidden, seed)?;
    }

    #[test]
    fn segment_embed_gradients(lengths in lengths_strategy(3, 4), content in 1usize..7, location in 1usize..6, dim in 4usize..9, positions: bool, seed: u64) {
        check_segment_embed(&lengths, content, location, dim, positions, seed)?;
    }
}

#[test]
fn layer_gradients_fixed_cases() {
    check_linear(1, 1, 1, true, 1).unwrap();
    check_layernorm(1, 4, 2).unwrap();
    check_mha(&[1], 2, 2, 3).unwrap(); // one item with one segment
    check_mha(&[4, 1, 2], 2, 3, 4).unwrap();
    check_block(&[1], Some(2), 2, 5, Dropout::OFF, 5).unwrap(); // width 4
    check_block(&[3, 1, 2], Some(2), 3, 7, Dropout::OFF, 6).unwrap();
    check_block(&[3, 1, 2], Some(2), 3, 7, Dropout { p: 0.3, seed: 77 }, 7).unwrap();
    check_block(&[3, 1, 2], None, 4, 7, Dropout { p: 0.3, seed: 78 }, 8).unwrap(); // FC block
    check_bigru(&[1], 2, 3, 8).unwrap();
    check_bigru(&[4, 1, 3], 3, 2, 9).unwrap();
    check_segment_embed(&[1], 3, 5, 4, false, 10).unwrap(); // one token
    check_segment_embed(&[6], 7, 5, 8, false, 11).unwrap();
    check_segment_embed(&[1], 3, 5, 4, true, 12).unwrap();
    check_segment_embed(&[4, 1, 3], 7, 6, 8, true, 13).unwrap();
}

/// The dropout inside a block really drops (and the gradient check above therefore covers
/// the masked paths): with p > 0 the output differs from p = 0, and with the same seed it is
/// reproducible.
#[test]
fn encoder_block_dropout_is_active_and_deterministic() {
    let mut c = common::cpu();
    let b: &mut dyn Backend = &mut c;
    let seg = segments(b, &[3, 2]);
    let mut store = ParamStore::new();
    let block = EncoderBlock::new(&mut store, "block", 4, Some(2), 6);
    let w = b.upload(&noisy_params(&store, 1), &[store.total]).unwrap();
    let x = randv(2, 5 * 4);
    let run = |b: &mut dyn Backend, drop: Dropout| {
        let xt = up(b, &x, 4);
        let (y, _) = block.forward(b, &w, xt, &seg, drop).unwrap();
        b.download(y.view()).unwrap()
    };
    let y0 = run(b, Dropout::OFF);
    let y1 = run(b, Dropout { p: 0.5, seed: 3 });
    let y1b = run(b, Dropout { p: 0.5, seed: 3 });
    let y2 = run(b, Dropout { p: 0.5, seed: 4 });
    assert_eq!(y1, y1b, "same seed, same output");
    assert!(rel_err64(&to64(&y1), &to64(&y0)) > 1e-2, "p = 0.5 changed nothing");
    assert!(rel_err64(&to64(&y1), &to64(&y2)) > 1e-2, "seeds 3 and 4 gave the same mask");
}

/// The BiGru layer's forward against the f64 reference (the gradient checks above only use
/// the layer's own forward).
#[test]
fn bigru_forward_matches_reference() {
    let mut c = common::cpu();
    let b: &mut dyn Backend = &mut c;
    let lengths = [4, 1, 3];
    let seg = segments(b, &lengths);
    let (inputs, hidden) = (3, 2);
    let mut store = ParamStore::new();
    let gru = BiGru::new(&mut store, "gru", inputs, hidden);
    let wv = noisy_params(&store, 5);
    let x = randv(6, seg.tokens() * inputs);
    let w = b.upload(&wv, &[store.total]).unwrap();
    let xt = up(b, &x, inputs);
    let (y, _) = gru.forward(b, &w, xt, &seg).unwrap();
    let get = |n: &str| {
        let p = store.find(n).unwrap().param;
        to64(&wv[p.offset..p.offset + p.len])
    };
    let dir = |s: &str| naive::GruParams {
        w_ih: get(&format!("gru.weight_ih_l0{s}")),
        b_ih: get(&format!("gru.bias_ih_l0{s}")),
        w_hh: get(&format!("gru.weight_hh_l0{s}")),
        b_hh: get(&format!("gru.bias_hh_l0{s}")),
    };
    let want = naive::bigru(&to64(&x), inputs, hidden, &seg.offsets, &[dir(""), dir("_reverse")]);
    let e = rel_err(&b.download(y.view()).unwrap(), &want);
    assert!(e < 1e-5, "rel err {e}");
}
