//! Ops that write their output into a recycled buffer (`Backend::alloc`, and the CPU kernels'
//! `pool::dirty`) must overwrite every element. The CPU backend recycles buffers of at least
//! 4096 elements through a process-wide pool, so the other test files, whose tensors are
//! small, never see a recycled buffer. Here the pool is filled with poisoned buffers (NaN, then
//! 7.0) of exactly the sizes an op is about to request, the op is run at those sizes, and its
//! outputs must be finite and bit-identical under both poisons: an element the op forgot to
//! write would hold the poison.
//!
//! Every output must also start on a 64-byte line (`host`).
//!
//! One #[test] only, so no other test of this binary takes or returns pool buffers meanwhile.

mod common;

use common::{rand_ids, randv, segments};
use semshare::backend::Backend;
use semshare::nn::{Dropout, EncoderBlock, Linear, ParamStore};

/// A CPU tensor's values (`download`, without borrowing the backend). Each backend output
/// starts on a 64-byte line, recycled or not (`tensor::HostBuf`: the AMX GEMM reads A's rows
/// in place only then).
fn host(t: &semshare::tensor::Tensor) -> Vec<f32> {
    assert_eq!(t.cpu().as_ptr() as usize % 64, 0, "an output of {} values is off a 64-byte line", t.len());
    t.cpu().to_vec()
}

/// Copies per size: more than the pool can hold of one size class in this test, so every
/// buffer the op can be handed is poisoned.
const COPIES: usize = 16;

/// Take every pooled buffer that a request of each size could be given, fill it with `value`,
/// and hand it back.
fn poison(b: &mut dyn Backend, sizes: &[usize], value: f32) {
    let mut held = Vec::new();
    for &n in sizes {
        for _ in 0..COPIES {
            let mut t = b.alloc(&[n]).unwrap();
            b.fill(t.view_mut(), value).unwrap();
            held.push(t);
        }
    }
    drop(held);
}

/// Run `op` after poisoning with NaN and after poisoning with 7.0: same bits, all finite.
fn check(b: &mut dyn Backend, what: &str, sizes: &[usize], op: &mut dyn FnMut(&mut dyn Backend) -> Vec<Vec<f32>>) {
    poison(b, sizes, f32::NAN);
    let first = op(b);
    poison(b, sizes, 7.0);
    let second = op(b);
    assert_eq!(first.len(), second.len());
    for (k, (a, c)) in first.iter().zip(&second).enumerate() {
        let bad = a.iter().position(|v| !v.is_finite());
        assert!(
            bad.is_none(),
            "{what}: output {k} element {} is {} after NaN poisoning",
            bad.unwrap(),
            a[bad.unwrap()]
        );
        let diff = a.iter().zip(c).position(|(x, y)| x.to_bits() != y.to_bits());
        assert!(
            diff.is_none(),
            "{what}: output {k} element {} depends on the recycled buffer's contents",
            diff.unwrap()
        );
    }
}

#[test]
fn outputs_in_recycled_buffers_are_overwritten_whole() {
    let mut c = common::cpu();
    let b: &mut dyn Backend = &mut c;
    let n = 5000;

    // The premise: a poisoned buffer does come back from `alloc` (else this file checks nothing).
    poison(b, &[n], f32::NAN);
    let t = b.alloc(&[n]).unwrap();
    assert!(
        host(&t).iter().any(|v| v.is_nan()),
        "alloc did not hand back a recycled buffer: the pool changed, this test needs updating"
    );
    drop(t);

    // Memory ops that must not leak recycled contents.
    let v = randv(1, n);
    poison(b, &[n], f32::NAN);
    let z = b.zeros(&[n]).unwrap();
    assert!(host(&z).iter().all(|&x| x == 0.0), "zeros from a recycled buffer");
    poison(b, &[n], f32::NAN);
    let u = b.upload(&v, &[n]).unwrap();
    assert_eq!(host(&u), v, "upload into a recycled buffer");
    poison(b, &[n], f32::NAN);
    assert_eq!(host(&u.clone()), v, "clone into a recycled buffer");

    // Elementwise.
    let x = b.upload(&common::randv_scaled(2, n, 5.0), &[n]).unwrap();
    let dy = b.upload(&randv(3, n), &[n]).unwrap();
    check(b, "gelu_fwd", &[n], &mut |b| vec![host(&b.gelu_fwd(&x).unwrap())]);
    check(b, "gelu_bwd", &[n], &mut |b| vec![host(&b.gelu_bwd(&x, &dy).unwrap())]);

    // Rows.
    let (vocab, cols, rows) = (20, 8, 625);
    let table = b.upload(&randv(4, vocab * cols), &[vocab, cols]).unwrap();
    let ids = b.upload_ids(&rand_ids(5, rows, vocab)).unwrap();
    check(b, "gather_rows", &[rows * cols], &mut |b| vec![host(&b.gather_rows(table.view(), cols, &ids).unwrap())]);
    let lengths: Vec<usize> = rand_ids(6, 700, 3).iter().map(|&l| l as usize + 1).collect();
    let seg = segments(b, &lengths);
    let xs = b.upload(&randv(7, seg.tokens() * cols), &[seg.tokens(), cols]).unwrap();
    let dys = b.upload(&randv(8, seg.items() * cols), &[seg.items(), cols]).unwrap();
    check(b, "segment_mean_fwd", &[seg.items() * cols], &mut |b| vec![host(&b.segment_mean_fwd(&xs, &seg).unwrap())]);
    check(b, "segment_mean_bwd", &[seg.tokens() * cols], &mut |b| vec![host(&b.segment_mean_bwd(&dys, &seg).unwrap())]);

    // LayerNorm: y and stats [rows, 2], both ≥ 4096 elements with rows = 2500, d = 2.
    let (lr, ld) = (2500, 2);
    let xl = b.upload(&common::randv_scaled(9, lr * ld, 3.0), &[lr, ld]).unwrap();
    let gamma = b.upload(&common::rand_range(10, ld, 0.5, 1.5), &[ld]).unwrap();
    let beta = b.upload(&randv(11, ld), &[ld]).unwrap();
    let dyl = b.upload(&randv(12, lr * ld), &[lr, ld]).unwrap();
    check(b, "layernorm_fwd/bwd", &[lr * ld], &mut |b| {
        let (y, stats) = b.layernorm_fwd(&xl, gamma.view(), beta.view(), 1e-5).unwrap();
        let (mut dg, mut db) = (b.zeros(&[ld]).unwrap(), b.zeros(&[ld]).unwrap());
        let dx = b.layernorm_bwd(&xl, &stats, gamma.view(), &dyl, dg.view_mut(), db.view_mut()).unwrap();
        vec![host(&y), host(&stats), host(&dx)]
    });

    // Attention: context 96×48, probabilities 4·(40² + 30² + 25² + 1), dqkv 96×144.
    let (heads, dh) = (4, 12);
    let d = heads * dh;
    let alen = [40, 30, 25, 1];
    let aseg = segments(b, &alen);
    let qkv = b.upload(&randv(13, aseg.tokens() * 3 * d), &[aseg.tokens(), 3 * d]).unwrap();
    let dout = b.upload(&randv(14, aseg.tokens() * d), &[aseg.tokens(), d]).unwrap();
    let probs_len = heads * alen.iter().map(|l| l * l).sum::<usize>();
    check(b, "attention_fwd/bwd", &[aseg.tokens() * d, probs_len, aseg.tokens() * 3 * d], &mut |b| {
        let (out, probs) = b.attention_fwd(&qkv, &aseg, heads).unwrap();
        let dqkv = b.attention_bwd(&qkv, &probs, &aseg, heads, &dout, None).unwrap();
        vec![host(&out), host(&probs), host(&dqkv)]
    });

    // Layers that allocate their outputs: Linear (alloc + GEMM with beta = 0), and a whole
    // encoder block, forward and backward, with dropout.
    let mut store = ParamStore::new();
    let lin = Linear::new(&mut store, "lin", 50, 50, true);
    let block = EncoderBlock::new(&mut store, "block", d, Some(heads), 2 * d);
    let w = b.upload(&store.init_values(15), &[store.total]).unwrap();
    let xlin = b.upload(&randv(16, 100 * 50), &[100, 50]).unwrap();
    let xb = randv(17, aseg.tokens() * d);
    let drop = Dropout { p: 0.1, seed: 18 };
    let sizes = [100 * 50, aseg.tokens() * d, aseg.tokens() * 3 * d, aseg.tokens() * 2 * d, probs_len, store.total];
    check(b, "Linear, EncoderBlock", &sizes, &mut |b| {
        let mut g = b.zeros(&[store.total]).unwrap();
        let y = lin.forward(b, &w, &xlin).unwrap();
        let dx = lin.backward(b, &w, &mut g, &xlin, &y).unwrap();
        let xt = b.upload(&xb, &[aseg.tokens(), d]).unwrap();
        let (yb, cache) = block.forward(b, &w, xt, &aseg, drop).unwrap();
        let dxb = block.backward(b, &w, &mut g, &aseg, cache, &yb).unwrap();
        vec![host(&y), host(&dx), host(&yb), host(&dxb), host(&g)]
    });
}
