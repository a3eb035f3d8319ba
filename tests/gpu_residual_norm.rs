//! The fused post-LN join (`kernels/residual_norm.cu`) against its CPU twin (dropout, add,
//! LayerNorm composed, and the sublayer's bias gradient `bias_bwd` of da) on fresh random
//! inputs, and against the unfused ops on the same device: bit for bit for every row output
//! (the same mask, the same rounding), to summation order for the column sums (dgamma, dbeta,
//! dbias: the fused backward adds each block's 8 rows first), forward and backward, with and
//! without dropout and the bias gradient. Outputs start as NaN (`poison`), so an element a
//! kernel forgets fails.

mod common;

use common::gpu::{compare_twins, gpu_or_skip, poison};
use common::{rand_range, randv};
use semshare::backend::Backend;

/// (rows, d): one row, odd widths, a partial last block of 8 rows, the `small` width, a
/// width past one 128-column chunk that is not a multiple of it, more blocks of 8 rows than
/// the finishing kernel's 8 lanes, and rows wider than the 1,024 a lane's registers hold
/// (read where they lie: version 1).
const SHAPES: [(usize, usize); 8] =
    [(1, 1), (3, 33), (9, 300), (17, 256), (40, 1024), (75, 130), (203, 96), (11, 1100)];

/// The outputs that are row by row (bit for bit the unfused ops'), then the column sums.
const ROW_OUTPUTS: usize = 5;

/// Forward then backward of the join; every output, named.
fn join(
    dev: &mut dyn Backend,
    fused: bool,
    rows: usize,
    d: usize,
    p: f32,
    bias: bool,
    seed: u64,
) -> Vec<(&'static str, Vec<f32>)> {
    poison(dev, &[rows * d, rows * 2]);
    let n = rows * d;
    let mut a = dev.upload(&randv(seed, n), &[rows, d]).unwrap();
    let x = dev.upload(&randv(seed + 1, n), &[rows, d]).unwrap();
    let gamma = dev.upload(&rand_range(seed + 2, d, 0.5, 1.5), &[d]).unwrap();
    let beta = dev.upload(&randv(seed + 3, d), &[d]).unwrap();
    let dy = dev.upload(&randv(seed + 4, n), &[rows, d]).unwrap();
    // dgamma, dbeta and the sublayer's dbias, accumulated into (not overwritten).
    let mut sums = dev.upload(&randv(seed + 5, 3 * d), &[3 * d]).unwrap();
    let drop_seed = seed ^ 0xD0;
    let (y, stats, dx, da) = if fused {
        let (y, stats) = dev.residual_layernorm_fwd(&mut a, &x, gamma.view(), beta.view(), 1e-5, p, drop_seed).unwrap();
        let [dg, db, dbias] = sums.subs_mut([(0, d), (d, d), (2 * d, d)]);
        let dbias = bias.then_some(dbias);
        let (dx, da) = dev.residual_layernorm_bwd(&a, &stats, gamma.view(), &dy, dg, db, dbias, p, drop_seed).unwrap();
        (y, stats, dx, da)
    } else {
        if p > 0.0 {
            dev.dropout_fwd(&mut a, p, drop_seed).unwrap();
        }
        dev.add_assign(&mut a, &x).unwrap();
        let (y, stats) = dev.layernorm_fwd(&a, gamma.view(), beta.view(), 1e-5).unwrap();
        let [dg, db, dbias] = sums.subs_mut([(0, d), (d, d), (2 * d, d)]);
        let dx = dev.layernorm_bwd(&a, &stats, gamma.view(), &dy, dg, db).unwrap();
        let mut da = dx.clone();
        if p > 0.0 {
            dev.dropout_bwd(&mut da, p, drop_seed).unwrap();
        }
        if bias {
            dev.bias_bwd(&da, dbias).unwrap();
        }
        (y, stats, dx, da)
    };
    let mut down = |t: &semshare::tensor::Tensor| dev.download(t.view()).unwrap();
    vec![
        ("s (norm input)", down(&a)),
        ("y", down(&y)),
        ("stats", down(&stats)),
        ("dx", down(&dx)),
        ("da", down(&da)),
        ("dgamma, dbeta, dbias", down(&sums)),
    ]
}

#[test]
fn fused_join_matches_the_cpu_and_the_unfused_ops() {
    let Some(mut gpu) = gpu_or_skip("fused residual + layer norm") else { return };
    let mut cpu = common::cpu();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for (k, &(rows, d)) in SHAPES.iter().enumerate() {
        for (p, bias) in [(0.0, false), (0.1, false), (0.1, true)] {
            let seed = 100 + 7 * k as u64;
            let what = format!("{rows}x{d} p {p} bias {bias}");
            let want = join(&mut cpu, true, rows, d, p, bias, seed);
            let got = join(gpu.as_mut(), true, rows, d, p, bias, seed);
            let unfused = join(gpu.as_mut(), false, rows, d, p, bias, seed);
            for (i, ((name, w), ((_, g), (_, u)))) in want.iter().zip(got.iter().zip(&unfused)).enumerate() {
                compare_twins(&format!("residual_layernorm {what} {name}"), g, w, 1e-4);
                if i < ROW_OUTPUTS {
                    assert_eq!(bits(g), bits(u), "{what} {name}: fused and unfused differ on the device");
                } else {
                    compare_twins(&format!("residual_layernorm {what} {name}, fused vs unfused"), g, u, 1e-5);
                }
            }
            // The column sums are added in a fixed order: the same bits run to run.
            assert_eq!(got, join(gpu.as_mut(), true, rows, d, p, bias, seed), "{what}: a second run");
            // The CPU's fused op is the composition itself.
            assert_eq!(want, join(&mut cpu, false, rows, d, p, bias, seed), "{what}: CPU");
        }
    }
}

#[test]
fn fused_join_refuses_bad_operands() {
    let Some(mut gpu) = gpu_or_skip("fused join operands") else { return };
    let mut cpu = common::cpu();
    for dev in [&mut cpu as &mut dyn Backend, gpu.as_mut()] {
        let mut a = dev.zeros(&[2, 3]).unwrap();
        let x = dev.zeros(&[3, 2]).unwrap();
        let g = dev.zeros(&[3]).unwrap();
        assert!(dev.residual_layernorm_fwd(&mut a, &x, g.view(), g.view(), 1e-5, 0.1, 1).is_err(), "{}", dev.name());
        let x = dev.zeros(&[2, 3]).unwrap();
        let err = dev.residual_layernorm_fwd(&mut a, &x, g.view(), g.view(), 1e-5, 1.0, 1).unwrap_err();
        assert!(err.to_string().contains("dropout probability 1"), "{}: {err}", dev.name());
    }
}

/// The join at inference (`residual_layernorm`: in a's memory, nothing kept) is the forward
/// join's y with p = 0, bit for bit, in f32 and bf16, on the CPU and on the device; a bad
/// operand is refused naming the op.
#[test]
fn the_join_at_inference_is_the_forward_y() {
    use semshare::tensor::DType;
    let mut devices: Vec<Box<dyn Backend>> = vec![Box::new(common::cpu())];
    devices.extend(gpu_or_skip("the join at inference"));
    for dev in &mut devices {
        for (k, &(rows, d)) in SHAPES.iter().enumerate() {
            for dtype in [DType::F32, DType::Bf16] {
                let seed = 300 + 5 * k as u64;
                let what = format!("{} {rows}x{d} {}", dev.name(), dtype.name());
                let up = |dev: &mut Box<dyn Backend>, v: &[f32], shape: &[usize]| {
                    let t = dev.upload(v, shape).unwrap();
                    dev.convert(t.view(), dtype).unwrap().reshape(shape)
                };
                let (a0, x0) = (randv(seed, rows * d), randv(seed + 1, rows * d));
                let gamma = dev.upload(&rand_range(seed + 2, d, 0.5, 1.5), &[d]).unwrap();
                let beta = dev.upload(&randv(seed + 3, d), &[d]).unwrap();
                let x = up(dev, &x0, &[rows, d]);
                let mut a = up(dev, &a0, &[rows, d]);
                let (want, _) =
                    dev.residual_layernorm_fwd(&mut a, &x, gamma.view(), beta.view(), 1e-5, 0.0, 0).unwrap();
                let a = up(dev, &a0, &[rows, d]);
                let got = dev.residual_layernorm(a, &x, gamma.view(), beta.view(), 1e-5).unwrap();
                assert_eq!((got.shape(), got.dtype()), (want.shape(), want.dtype()), "{what}");
                let bits = |v: Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                let (got, want) = (dev.download(got.view()).unwrap(), dev.download(want.view()).unwrap());
                assert_eq!(bits(got), bits(want), "{what}");
            }
        }
        let (a, x, g) = (dev.zeros(&[2, 3]).unwrap(), dev.zeros(&[3, 2]).unwrap(), dev.zeros(&[3]).unwrap());
        let err = dev.residual_layernorm(a, &x, g.view(), g.view(), 1e-5).unwrap_err().to_string();
        assert!(err.contains("residual_layernorm"), "{}: {err}", dev.name());
        let (a, x) = (dev.zeros(&[3, 2]).unwrap(), dev.zeros(&[3, 2]).unwrap());
        let err = dev.residual_layernorm(a, &x, g.view(), g.view(), 1e-5).unwrap_err().to_string();
        assert!(err.contains("residual_layernorm") && err.contains("gamma"), "{}: {err}", dev.name());
    }
}
