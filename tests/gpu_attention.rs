//! Fused attention on the GPU (kernels/attention.cu) against its CPU twin
//! (`semshare::backend::cpu::Cpu`), forward and backward, on fresh random inputs: the benchmark
//! shape, the small preset's, odd lengths (1, 35, 36, 64), odd head dims (not a multiple of 4:
//! the kernel's scalar load path and zero-padded columns), a single item, and random shapes.
//! Every output buffer the GPU hands out is first poisoned with NaN (the pool recycles it), so
//! an element the kernel forgets to write fails the test. Tolerance: relative norm 1e-5; the two
//! sides sum in different orders (CPU GEMM blocking vs per-thread 4×4 tiles and shuffle
//! reductions), nothing else differs.
//!
//! Without a GPU each test prints one skip line; with SEMSHARE_REQUIRE_GPU=1 it fails.

mod common;

use common::gpu::{compare_twins, gpu_or_skip, poison};
use common::{Gen, cpu, randv, segments};
use semshare::Error;
use semshare::backend::Backend;

const TOL: f64 = 1e-5;

fn check(g: &mut dyn Backend, lengths: &[usize], heads: usize, dh: usize, seed: u64) {
    let what = format!("lengths {lengths:?} heads {heads} dh {dh}");
    let mut c = cpu();
    let d = heads * dh;
    let tokens: usize = lengths.iter().sum();
    let n_probs: usize = lengths.iter().map(|l| heads * l * l).sum();
    let qkv = randv(seed, tokens * 3 * d);
    let dout = randv(seed ^ 0xD0, tokens * d);

    let cseg = segments(&mut c, lengths);
    let cq = c.upload(&qkv, &[tokens, 3 * d]).unwrap();
    let (c_out, c_probs) = c.attention_fwd(&cq, &cseg, heads).unwrap();
    let cdo = c.upload(&dout, &[tokens, d]).unwrap();

    let gseg = segments(g, lengths);
    let gq = g.upload(&qkv, &[tokens, 3 * d]).unwrap();
    let gdo = g.upload(&dout, &[tokens, d]).unwrap();
    poison(g, &[tokens * d, n_probs, tokens * 3 * d]);
    let (g_out, g_probs) = g.attention_fwd(&gq, &gseg, heads).unwrap();
    assert_eq!(g_out.shape(), c_out.shape(), "{what}: out shape");
    assert_eq!(g_probs.shape(), c_probs.shape(), "{what}: probs shape");
    compare_twins(&format!("attention_fwd out, {what}"), &g.download(g_out.view()).unwrap(), &c_out.to_f32s(), TOL);
    compare_twins(
        &format!("attention_fwd probs, {what}"),
        &g.download(g_probs.view()).unwrap(),
        &c_probs.to_f32s(),
        TOL,
    );
    // The backward with the qkv bias's gradient summed in the same launch, added to what the
    // gradient held: dqkv and dbias against the CPU, dbias against the device's own bias_bwd of
    // that dqkv (another order: to rounding). Small cases (the emulated suite's time) run it
    // again, bit for bit, and without the bias gradient: the same dqkv, bit for bit. Every
    // output and the partials' scratch are poisoned first.
    let db0 = randv(seed ^ 0xB1A5, 3 * d);
    let mut c_db = c.upload(&db0, &[3 * d]).unwrap();
    let c_dqkv = c.attention_bwd(&cq, &c_probs, &cseg, heads, &cdo, Some(c_db.view_mut())).unwrap();
    let added = |db: &[f32]| -> Vec<f32> { db.iter().zip(&db0).map(|(x, x0)| x - x0).collect() };
    let small = tokens * 3 * d <= 1 << 16;
    let mut runs: Vec<(Vec<f32>, Option<Vec<f32>>)> = Vec::new();
    for with_bias in if small { vec![true, true, false] } else { vec![true] } {
        poison(g, &[tokens * 3 * d, lengths.len() * 3 * d]);
        let mut g_db = g.upload(&db0, &[3 * d]).unwrap();
        let dqkv = g.attention_bwd(&gq, &g_probs, &gseg, heads, &gdo, with_bias.then(|| g_db.view_mut())).unwrap();
        assert_eq!(dqkv.shape(), c_dqkv.shape(), "{what}: dqkv shape");
        let dqkv = g.download(dqkv.view()).unwrap();
        runs.push((dqkv, with_bias.then(|| g.download(g_db.view()).unwrap())));
    }
    let (g_dqkv, fused) = (&runs[0].0, runs[0].1.as_deref().expect("first run has the bias"));
    compare_twins(&format!("attention_bwd dqkv, {what}"), g_dqkv, &c_dqkv.to_f32s(), TOL);
    compare_twins(&format!("attention_bwd dbias, {what}"), &added(fused), &added(c_db.cpu()), TOL);
    let mut unfused = g.upload(&db0, &[3 * d]).unwrap();
    let dqkv = g.upload(g_dqkv, &[tokens, 3 * d]).unwrap();
    g.bias_bwd(&dqkv, unfused.view_mut()).unwrap();
    let unfused = g.download(unfused.view()).unwrap();
    compare_twins(&format!("attention_bwd dbias against bias_bwd, {what}"), &added(fused), &added(&unfused), TOL);
    for (dqkv, db) in &runs[1..] {
        assert!(bits(dqkv) == bits(g_dqkv), "{what}: dqkv differs between runs (with and without the bias gradient)");
        if let Some(db) = db {
            assert!(bits(db) == bits(fused), "{what}: the qkv bias gradient differs between two runs");
        }
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn attention_matches_cpu_at_named_shapes() {
    let Some(mut g) = gpu_or_skip("gpu_attention::attention_matches_cpu_at_named_shapes") else { return };
    let g = g.as_mut();
    // Benchmark configuration (DESIGN.md §2): 128 items of 36 regions, 8 heads of 128.
    check(g, &[36; 128], 8, 128, 1);
    // Small preset: d 256, 4 heads of 64; text-like ragged lengths around 35/36.
    check(g, &[35, 36, 1, 24, 36, 17, 2], 4, 64, 2);
    // The longest item the kernel holds, at both head dims, and next to short ones.
    check(g, &[64, 3, 64, 33], 2, 128, 3);
    check(g, &[64], 4, 64, 4);
    // A single item of length 1 (softmax of one score is 1; dS is 0).
    check(g, &[1], 1, 64, 5);
    check(g, &[1, 1, 1], 8, 128, 6);
    // Head dims that are not a multiple of 4: scalar loads, zero-padded columns.
    check(g, &[5, 64, 2], 3, 13, 7);
    check(g, &[36, 7], 2, 1, 8);
    check(g, &[9, 36, 35], 5, 126, 9);
}

#[test]
fn attention_matches_cpu_at_random_shapes() {
    let Some(mut g) = gpu_or_skip("gpu_attention::attention_matches_cpu_at_random_shapes") else { return };
    let mut r = Gen::new(0xA77E);
    for case in 0..40u64 {
        let items = 1 + r.below(9);
        let lengths: Vec<usize> = (0..items).map(|_| 1 + r.below(64)).collect();
        let heads = 1 + r.below(8);
        let dh = 1 + r.below(128);
        check(g.as_mut(), &lengths, heads, dh, 100 + case);
    }
}

/// Longer than the kernel holds on chip, or a head too wide: an error naming the op, never a
/// launch that would truncate.
#[test]
fn attention_refuses_what_it_cannot_hold() {
    let Some(mut g) = gpu_or_skip("gpu_attention::attention_refuses_what_it_cannot_hold") else { return };
    let g = g.as_mut();
    for (lengths, heads, dh) in [(vec![3, 65], 2, 64), (vec![4], 1, 132)] {
        let tokens: usize = lengths.iter().sum();
        let d = heads * dh;
        let seg = segments(g, &lengths);
        let qkv = g.upload(&randv(7, tokens * 3 * d), &[tokens, 3 * d]).unwrap();
        match g.attention_fwd(&qkv, &seg, heads) {
            Err(Error::Shape { op: "attention_fwd", .. }) => {}
            other => panic!("attention_fwd at lengths {lengths:?}, dh {dh}: expected a shape error, got {other:?}"),
        }
        let probs = g.zeros(&[lengths.iter().map(|l| heads * l * l).sum()]).unwrap();
        let dout = g.upload(&randv(8, tokens * d), &[tokens, d]).unwrap();
        match g.attention_bwd(&qkv, &probs, &seg, heads, &dout, None) {
            Err(Error::Shape { op: "attention_bwd", .. }) => {}
            other => panic!("attention_bwd at lengths {lengths:?}, dh {dh}: expected a shape error, got {other:?}"),
        }
    }
    // qkv columns that do not split into 3 × heads (27 = 3 · 9 for 2 heads).
    let seg = segments(g, &[3, 4]);
    let qkv = g.upload(&randv(9, 7 * 27), &[7, 27]).unwrap();
    let probs = g.zeros(&[2 * (9 + 16)]).unwrap();
    let dout = g.upload(&randv(10, 7 * 9), &[7, 9]).unwrap();
    assert!(matches!(g.attention_fwd(&qkv, &seg, 2), Err(Error::Shape { .. })), "attention_fwd, 27 columns, 2 heads");
    assert!(
        matches!(g.attention_bwd(&qkv, &probs, &seg, 2, &dout, None), Err(Error::Shape { .. })),
        "attention_bwd, 27 columns, 2 heads"
    );
}
