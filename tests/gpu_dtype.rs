//! Tensors stored as bf16 (issue 12 item 6, its first two steps): conversion, the memory ops
//! and the GEMMs on bf16 storage, each on the CPU (the reference: f32 values rounded to bf16)
//! and on the CUDA device (2-byte storage, cuBLAS's `CUDA_R_16BF`), and the refusals: a bf16
//! tensor handed to an op that reads f32 is an `Error::Type` naming the kernel or op, never
//! 2-byte values read as 4.

mod common;

use common::gpu::gpu_or_skip;
use common::{rand_range, randv, rel_err, same_values, upload_bf16};
use semshare::Error;
use semshare::backend::cpu::Cpu;
use semshare::backend::{Backend, Gemm, Precision};
use semshare::tensor::{DType, Tensor, bf16_bits};

/// The GPU computing at `precision`, or None after a skip line.
fn gpu_at(test: &str, precision: Precision) -> Option<Box<dyn Backend>> {
    #[cfg(feature = "cuda")]
    {
        common::gpu::cuda_or_skip(test).map(|mut g| {
            g.set_precision(precision);
            Box::new(g) as Box<dyn Backend>
        })
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = precision;
        gpu_or_skip(test)
    }
}

/// Values that exercise the rounding: random ones, exact ties (to even, both ways), values
/// just past a tie, signed zeros, infinities, the largest finite f32 (which rounds to
/// infinity), subnormals.
fn awkward(seed: u64, n: usize) -> Vec<f32> {
    let mut v = rand_range(seed, n, -1e3, 1e3);
    let specials = [
        f32::from_bits(0x3f80_8000), // a tie, even below: rounds down
        f32::from_bits(0x3f81_8000), // a tie, odd below: rounds up
        f32::from_bits(0x3f80_8001), // just past a tie: up
        f32::from_bits(0xbf80_7fff), // just under a tie, negative: down in magnitude
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
        f32::from_bits(0x0000_8000), // a subnormal tie
        f32::MIN_POSITIVE,
    ];
    for (i, s) in specials.into_iter().enumerate() {
        if i < n {
            v[i * n / specials.len().max(1)] = s;
        }
    }
    v
}

/// `DType::round` is the nearest bf16, ties to even: checked on the bits themselves.
#[test]
fn the_rounding_is_to_nearest_even() {
    let cases: [(u32, u16); 8] = [
        (0x3f80_0000, 0x3f80),
        (0x3f80_8000, 0x3f80), // tie, even kept
        (0x3f81_8000, 0x3f82), // tie, odd rounds up to even
        (0x3f80_8001, 0x3f81),
        (0x3f80_7fff, 0x3f80),
        (0x7f7f_ffff, 0x7f80), // f32::MAX rounds to infinity
        (0xff80_0000, 0xff80),
        (0x8000_0000, 0x8000),
    ];
    for (bits, want) in cases {
        let x = f32::from_bits(bits);
        assert_eq!(bf16_bits(x), want, "{bits:#010x}");
        assert_eq!(DType::Bf16.round(x).to_bits(), (want as u32) << 16, "{bits:#010x}");
        assert_eq!(DType::F32.round(x).to_bits(), bits);
    }
    assert!(DType::Bf16.round(f32::NAN).is_nan());
    assert!(DType::Bf16.round(f32::from_bits(0x7f80_0001)).is_nan(), "a NaN whose payload would carry into infinity");
    // A CPU tensor holds bf16 in 2 bytes, and widens back exactly.
    let t = Tensor::from_cpu_as(vec![1.0 + 2f32.powi(-9), 3.0, -0.5], &[3], DType::Bf16);
    assert_eq!((t.dtype(), t.cpu_bf16()), (DType::Bf16, &[0x3f80u16, 0x4040, 0xbf00][..]));
    assert_eq!(t.to_f32s(), [1.0f32, 3.0, -0.5]);
}

/// f32 → bf16 → f32 on each device: bf16 is `DType::round` of each value (bit for bit, NaN as
/// NaN), and widening back is exact.
#[test]
fn conversion_rounds_as_the_cpu_does() {
    let mut devices: Vec<Box<dyn Backend>> = vec![Box::new(common::cpu())];
    devices.extend(gpu_or_skip("convert"));
    for dev in &mut devices {
        for n in [1usize, 7, 300, 4099] {
            let mut x = awkward(n as u64, n);
            x[n / 2] = f32::NAN;
            let t = dev.upload(&x, &[n]).unwrap();
            let h = dev.convert(t.view(), DType::Bf16).unwrap().reshape(t.shape());
            assert_eq!((h.dtype(), h.shape()), (DType::Bf16, &[n][..]));
            let back = dev.convert(h.view(), DType::F32).unwrap().reshape(h.shape());
            assert_eq!(back.dtype(), DType::F32);
            let same = dev.convert(h.view(), DType::Bf16).unwrap().reshape(h.shape());
            let want: Vec<f32> = x.iter().map(|&v| DType::Bf16.round(v)).collect();
            for (what, got) in [
                ("download of the bf16 tensor", dev.download(h.view()).unwrap()),
                ("converted back to f32", dev.download(back.view()).unwrap()),
                ("a bf16 copy of it", dev.download(same.view()).unwrap()),
            ] {
                same_values(&format!("{} n={n} {what}", dev.name()), &got, &want);
            }
        }
    }
}

/// `convert_owned` is `convert` keeping the shape (the CPU's in place): to bf16, back to f32, to
/// its own type, and from a frozen tensor, which is left as it was.
#[test]
fn convert_owned_is_convert_keeping_the_shape() {
    let mut devices: Vec<Box<dyn Backend>> = vec![Box::new(common::cpu())];
    devices.extend(gpu_or_skip("convert_owned"));
    for dev in &mut devices {
        for (rows, cols) in [(1usize, 1usize), (3, 7), (41, 100)] {
            let n = rows * cols;
            let mut x = awkward(n as u64 + 5, n);
            x[n / 2] = f32::NAN;
            let want: Vec<f32> = x.iter().map(|&v| DType::Bf16.round(v)).collect();
            let t = dev.upload(&x, &[rows, cols]).unwrap();
            let h = dev.convert_owned(t, DType::Bf16).unwrap();
            assert_eq!((h.dtype(), h.shape()), (DType::Bf16, &[rows, cols][..]));
            same_values(&format!("{} {rows}x{cols} to bf16", dev.name()), &dev.download(h.view()).unwrap(), &want);
            let h = dev.convert_owned(h, DType::Bf16).unwrap();
            let back = dev.convert_owned(h, DType::F32).unwrap();
            assert_eq!((back.dtype(), back.shape()), (DType::F32, &[rows, cols][..]));
            same_values(
                &format!("{} {rows}x{cols} back to f32", dev.name()),
                &dev.download(back.view()).unwrap(),
                &want,
            );
            let up = dev.upload(&x, &[n]).unwrap();
            let frozen = dev.freeze(up).unwrap();
            let kept = frozen.clone();
            let h = dev.convert_owned(frozen, DType::Bf16).unwrap();
            same_values(&format!("{} frozen {n} to bf16", dev.name()), &dev.download(h.view()).unwrap(), &want);
            same_values(&format!("{} frozen {n} left as it was", dev.name()), &dev.download(kept.view()).unwrap(), &x);
        }
    }
}

/// fill, write, scale and copy store their results as the destination's type; a copy between
/// types is refused on both devices.
#[test]
fn memory_ops_store_the_destination_type() {
    let mut devices: Vec<Box<dyn Backend>> = vec![Box::new(common::cpu())];
    devices.extend(gpu_or_skip("bf16 memory ops"));
    for dev in &mut devices {
        let n = 1000;
        let x = randv(3, n);
        let mut t = dev.alloc_as(&[n], DType::Bf16).unwrap();
        dev.write(t.view_mut(), &x).unwrap();
        let rounded: Vec<f32> = x.iter().map(|&v| DType::Bf16.round(v)).collect();
        same_values(&format!("{}: write", dev.name()), &dev.download(t.view()).unwrap(), &rounded);
        dev.scale(t.view_mut(), 1.0 / 3.0).unwrap();
        let scaled: Vec<f32> = rounded.iter().map(|&v| DType::Bf16.round(v * (1.0 / 3.0))).collect();
        same_values(&format!("{}: scale", dev.name()), &dev.download(t.view()).unwrap(), &scaled);
        let mut u = dev.alloc_as(&[n], DType::Bf16).unwrap();
        dev.copy(t.view(), u.view_mut()).unwrap();
        same_values(&format!("{}: copy", dev.name()), &dev.download(u.view()).unwrap(), &scaled);
        // A range inside the tensor: offsets count elements of the tensor's type.
        dev.fill(u.sub_mut(10, 20), 0.1).unwrap();
        dev.fill(u.sub_mut(40, 5), 0.0).unwrap();
        let got = dev.download(u.view()).unwrap();
        for (i, &g) in got.iter().enumerate() {
            let want = match i {
                10..30 => DType::Bf16.round(0.1),
                40..45 => 0.0,
                _ => scaled[i],
            };
            assert_eq!(g.to_bits(), want.to_bits(), "{}: fill, element {i}", dev.name());
        }
        assert_eq!(dev.download(u.sub(10, 3)).unwrap(), vec![DType::Bf16.round(0.1); 3]);
        let mut f = dev.alloc(&[n]).unwrap();
        match dev.copy(t.view(), f.view_mut()) {
            Err(e @ Error::Type { op: "copy", .. }) => {
                assert_eq!(e.to_string(), "copy: element type: the destination is f32, expected bf16")
            }
            other => panic!("{}: a bf16 → f32 copy gave {other:?}", dev.name()),
        }
    }
}

/// C = alpha·op(A)·op(B) + beta·C with A and B in bf16 and C in f32 or bf16, on both devices:
/// against the f64 product of the stored operands (exact products, f32 sums: k·2⁻²⁴ relative
/// to Σ|a·b|, plus one bf16 rounding of C when C is bf16), and the devices against each other.
#[test]
fn bf16_gemms_multiply_the_stored_values_and_round_once() {
    let cases = [
        (64, 96, 256, false, true, 0.0),
        (130, 300, 257, true, false, 0.5),
        (200, 33, 70, true, true, 1.0),
        (7, 40, 129, false, false, -0.25),
        (3, 5, 1, false, true, 0.0),
    ];
    for precision in [Precision::F32, Precision::Bf16] {
        let mut devices: Vec<Box<dyn Backend>> = vec![Box::new(Cpu::with_precision(precision).unwrap())];
        devices.extend(gpu_at("bf16 gemm", precision));
        let mut results: Vec<Vec<Vec<f32>>> = vec![];
        for dev in &mut devices {
            let mut mine = vec![];
            for (i, &(m, n, k, ta, tb, beta)) in cases.iter().enumerate() {
                let seed = 70 + i as u64;
                let (a, b, c0) = (randv(seed, m * k), randv(seed ^ 5, k * n), randv(seed ^ 11, m * n));
                let g = Gemm { m, n, k, trans_a: ta, trans_b: tb, alpha: 0.75, beta };
                let ah = {
                    let t = dev.upload(&a, &[m * k]).unwrap();
                    dev.convert(t.view(), DType::Bf16).unwrap().reshape(t.shape())
                };
                let bh = {
                    let t = dev.upload(&b, &[k * n]).unwrap();
                    dev.convert(t.view(), DType::Bf16).unwrap().reshape(t.shape())
                };
                for c_type in [DType::F32, DType::Bf16] {
                    let c_start = {
                        let t = dev.upload(&c0, &[m, n]).unwrap();
                        dev.convert(t.view(), c_type).unwrap().reshape(t.shape())
                    };
                    let mut c = c_start;
                    dev.gemm(g, ah.view(), bh.view(), c.view_mut()).unwrap();
                    assert_eq!(c.dtype(), c_type);
                    let got = dev.download(c.view()).unwrap();
                    let what = format!("{} {m}x{n}x{k} ta={ta} tb={tb} beta={beta} into {}", dev.name(), c_type.name());
                    // The definition on the stored values.
                    let r = |v: &[f32]| v.iter().map(|&x| DType::Bf16.round(x) as f64).collect::<Vec<_>>();
                    let c_in: Vec<f64> = c0.iter().map(|&x| c_type.round(x) as f64).collect();
                    let (a64, b64) = (r(&a), r(&b));
                    let exact = common::naive::gemm(&a64, &b64, &c_in, m, n, k, ta, tb, 0.75, beta as f64);
                    let abs = |v: &[f64]| v.iter().map(|x| x.abs()).collect::<Vec<_>>();
                    let mag = common::naive::matmul(&abs(&a64), &abs(&b64), m, n, k, ta, tb);
                    for (j, ((&got, &want), &mag)) in got.iter().zip(&exact).zip(&mag).enumerate() {
                        let sums = 0.75 * mag * (k as f64 + 2.0) * 2f64.powi(-24) + 1e-7 * want.abs();
                        let store = if c_type == DType::Bf16 { want.abs() * 2f64.powi(-8) } else { 0.0 };
                        let err = (got as f64 - want).abs();
                        assert!(err <= sums + store, "{what}: element {j} is {got} against {want} (error {err:.2e})");
                        if c_type == DType::Bf16 {
                            assert_eq!(got, DType::Bf16.round(got), "{what}: element {j} is not a bf16 value");
                        }
                    }
                    let e = rel_err(&got, &exact);
                    eprintln!("{what}: {e:.2e} from the f64 product of the stored values");
                    mine.push(got);
                }
            }
            results.push(mine);
        }
        // The devices against each other: f32 outputs to 1e-5; bf16 outputs may round a sum
        // that lies near a boundary to neighbouring values (one bf16 step, 2⁻⁸ relative).
        if let [cpu, gpu] = &results[..] {
            for (i, (c, g)) in cpu.iter().zip(gpu).enumerate() {
                let e = rel_err(g, &c.iter().map(|&v| v as f64).collect::<Vec<_>>());
                let tol = if i % 2 == 0 { 1e-5 } else { 4e-3 };
                common::report(
                    &format!(
                        "bf16 gemm {} case {} ({}): GPU against the CPU",
                        precision.name(),
                        i / 2,
                        ["f32 output", "bf16 output"][i % 2]
                    ),
                    e,
                );
                assert!(e <= tol, "bf16 gemm case {i}: the devices differ by {e:.2e}");
            }
        }
    }
}

/// The linear layer's GEMM with its bf16 bias into a bf16 output (cuBLASLt's `BIAS`
/// epilogue, the bias of D's type, on the device): the product and the bias summed in f32,
/// then one rounding; one launch.
#[test]
fn bf16_gemm_bias_rounds_product_and_bias_once() {
    let gpu = gpu_or_skip("bf16 gemm_bias");
    let mut devices: Vec<Box<dyn Backend>> = vec![Box::new(common::cpu())];
    devices.extend(gpu);
    let (m, n, k) = (96, 80, 130);
    let (x, w, bias) = (randv(1, m * k), randv(2, n * k), randv(3, n));
    let g = Gemm { m, n, k, trans_a: false, trans_b: true, alpha: 1.0, beta: 0.0 };
    let mut outs = vec![];
    for dev in &mut devices {
        let xh = {
            let t = dev.upload(&x, &[m, k]).unwrap();
            dev.convert(t.view(), DType::Bf16).unwrap().reshape(t.shape())
        };
        let wh = {
            let t = dev.upload(&w, &[n, k]).unwrap();
            dev.convert(t.view(), DType::Bf16).unwrap().reshape(t.shape())
        };
        let b = dev.upload(&bias, &[n]).unwrap();
        let bh = dev.convert(b.view(), DType::Bf16).unwrap();
        let mut y = dev.alloc_as(&[m, n], DType::Bf16).unwrap();
        let launches = dev.counters().map(|c| c.launches());
        dev.gemm_bias(g, xh.view(), wh.view(), bh.view(), &mut y).unwrap();
        if let (Some(before), Some(after)) = (launches, dev.counters().map(|c| c.launches())) {
            assert_eq!(after - before, 1, "{}: a bf16 gemm_bias is one launch", dev.name());
        }
        let got = dev.download(y.view()).unwrap();
        // The f32 product plus the bias's bf16 values, then rounded once.
        let rounded_bias: Vec<f32> = bias.iter().map(|&v| DType::Bf16.round(v)).collect();
        let b = dev.upload(&rounded_bias, &[n]).unwrap();
        let mut f = dev.alloc(&[m, n]).unwrap();
        dev.gemm(g, xh.view(), wh.view(), f.view_mut()).unwrap();
        dev.add_bias(&mut f, b.view()).unwrap();
        let want: Vec<f32> = dev.download(f.view()).unwrap().iter().map(|&v| DType::Bf16.round(v)).collect();
        same_values(&format!("{}: gemm_bias into bf16 against the f32 result rounded once", dev.name()), &got, &want);
        outs.push(got);
    }
    if let [c, g] = &outs[..] {
        let e = rel_err(g, &c.iter().map(|&v| v as f64).collect::<Vec<_>>());
        common::report("bf16 gemm_bias: GPU against the CPU", e);
        assert!(e <= 4e-3, "{e:.2e}");
    }
}

/// `gemm_bias_gelu` (inference's fc1 and its activation) is bit for bit `gemm_bias` then
/// `bias_gelu_dropout_fwd` without bias or dropout on each device, into f32 and bf16; the
/// devices agree within the GEMM's tolerance; a bias of another length is refused naming the op.
#[test]
fn gemm_bias_gelu_is_the_gemm_then_the_activation() {
    let mut devices: Vec<Box<dyn Backend>> = vec![Box::new(common::cpu())];
    devices.extend(gpu_or_skip("gemm_bias_gelu"));
    // 400 × 96: past the 32,768 values from which the CPU's pass is split over threads.
    let (m, n, k) = (400, 96, 130);
    let (x, w, bias) = (randv(11, m * k), randv(12, n * k), randv(13, n));
    let g = Gemm { m, n, k, trans_a: false, trans_b: true, alpha: 1.0, beta: 0.0 };
    let mut outs = vec![];
    for dev in &mut devices {
        for dtype in [DType::F32, DType::Bf16] {
            let what = format!("{} gemm_bias_gelu into {}", dev.name(), dtype.name());
            let up = |dev: &mut Box<dyn Backend>, v: &[f32], shape: &[usize]| {
                let t = dev.upload(v, shape).unwrap();
                dev.convert(t.view(), dtype).unwrap().reshape(shape)
            };
            let (xd, wd, bd) = (up(dev, &x, &[m, k]), up(dev, &w, &[n, k]), up(dev, &bias, &[n]));
            let mut y = dev.alloc_as(&[m, n], dtype).unwrap();
            dev.gemm_bias_gelu(g, xd.view(), wd.view(), bd.view(), &mut y).unwrap();
            let mut u = dev.alloc_as(&[m, n], dtype).unwrap();
            dev.gemm_bias(g, xd.view(), wd.view(), bd.view(), &mut u).unwrap();
            let h = dev.bias_gelu_dropout_fwd(&mut u, None, 0.0, 0).unwrap();
            let (got, want) = (dev.download(y.view()).unwrap(), dev.download(h.view()).unwrap());
            same_values(&what, &got, &want);
            assert!(got.iter().any(|&v| v < 0.0) && got.iter().all(|&v| v > -0.2), "{what}: not GELU");
            let short = up(dev, &bias[..n - 1], &[n - 1]);
            let e = dev.gemm_bias_gelu(g, xd.view(), wd.view(), short.view(), &mut y).unwrap_err().to_string();
            assert!(e.contains("gemm_bias") && e.contains("bias"), "{what}: {e}");
            outs.push(got);
        }
    }
    if let [cf, cb, gf, gb] = &outs[..] {
        for (c, g, tol) in [(cf, gf, 1e-5), (cb, gb, 2e-2)] {
            let e = rel_err(g, &c.iter().map(|&v| v as f64).collect::<Vec<_>>());
            common::report("gemm_bias_gelu: GPU against the CPU", e);
            assert!(e <= tol, "{e:.2e}");
        }
    }
}

/// Mixed operand types and a bf16 tensor handed to an op that reads f32 are refused with one
/// line naming the op (the CPU) or the kernel (the device), before anything runs.
#[test]
fn bf16_where_f32_is_read_is_an_error_naming_the_op() {
    let mut devices: Vec<Box<dyn Backend>> = vec![Box::new(common::cpu())];
    devices.extend(gpu_or_skip("bf16 refused"));
    for dev in &mut devices {
        let a = dev.upload(&randv(1, 12), &[3, 4]).unwrap();
        let ah = dev.convert(a.view(), DType::Bf16).unwrap().reshape(a.shape());
        let mut c = dev.zeros(&[3, 3]).unwrap();
        let g = Gemm { m: 3, n: 3, k: 4, trans_a: false, trans_b: true, alpha: 1.0, beta: 0.0 };
        match dev.gemm(g, ah.view(), a.view(), c.view_mut()) {
            Err(e @ Error::Type { op: "gemm", .. }) => {
                assert_eq!(e.to_string(), "gemm: element type: a is bf16 and b f32; a GEMM's operands share one type")
            }
            other => panic!("{}: mixed GEMM operands gave {other:?}", dev.name()),
        }
        let zeros = dev.zeros(&[3]).unwrap();
        let bias = dev.convert(zeros.view(), DType::Bf16).unwrap().reshape(zeros.shape());
        let r = dev.gemm_bias(g, a.view(), a.view(), bias.view(), &mut c);
        match r {
            Err(e @ Error::Type { op: "gemm_bias", .. }) => assert_eq!(
                e.to_string(),
                "gemm_bias: element type: the bias is bf16 and the output f32; a bias has its output's type"
            ),
            other => panic!("{}: a bf16 bias on an f32 output gave {other:?}", dev.name()),
        }
        let mut ch = dev.alloc_as(&[3, 3], DType::Bf16).unwrap();
        let r = dev.gemm_bias(g, ah.view(), ah.view(), zeros.view(), &mut ch);
        assert!(
            matches!(r, Err(Error::Type { op: "gemm_bias", .. })),
            "{}: an f32 bias on a bf16 output gave {r:?}",
            dev.name()
        );
        // Parameters stay f32 under bf16 activations; activations of one op share a type.
        let z4 = dev.zeros(&[4]).unwrap();
        let g4 = dev.convert(z4.view(), DType::Bf16).unwrap().reshape(z4.shape());
        let r = dev.layernorm_fwd(&ah, g4.view(), z4.view(), 1e-5);
        match r {
            Err(e @ Error::Type { op: "layernorm_fwd", .. }) => {
                assert_eq!(e.to_string(), "layernorm_fwd: element type: gamma is bf16, expected f32")
            }
            other => panic!("{}: a bf16 gamma gave {other:?}", dev.name()),
        }
        let mut ah2 = dev.convert(a.view(), DType::Bf16).unwrap().reshape(a.shape());
        let r = dev.residual_layernorm_fwd(&mut ah2, &a, z4.view(), z4.view(), 1e-5, 0.0, 1);
        assert!(matches!(r, Err(Error::Type { op: "residual_layernorm_fwd", .. })), "{}: gave {r:?}", dev.name());
    }
    #[cfg(feature = "cuda")]
    if let Some(mut gpu) = common::gpu::cuda_or_skip("bf16 refused by an f32 kernel") {
        let a = gpu.upload(&randv(1, 12), &[3, 4]).unwrap();
        let ah = gpu.convert(a.view(), DType::Bf16).unwrap().reshape(a.shape());
        match gpu.gelu_fwd(&ah) {
            Err(e @ Error::Type { op: "gelu_fwd_f32", .. }) => assert_eq!(
                e.to_string(),
                "gelu_fwd_f32: element type: argument 0 is a bf16 tensor; this kernel reads and writes f32"
            ),
            other => panic!("gelu on a bf16 tensor gave {other:?}"),
        }
        let mut g = ah.clone();
        let launches = gpu.counts().launches();
        let r = gpu.label_coordinates(&mut g);
        assert!(
            matches!(r, Err(Error::Type { op: "label_coordinates_f32", .. })),
            "label coordinates on bf16 gave {r:?}"
        );
        assert_eq!(gpu.counts().launches(), launches, "a refused op launched something");
    }
}

// ---- the transformer block's memory-bound ops on bf16 activations ------------------------
//
// Each op's bf16 entry computes in f32 from the stored values and rounds what it stores, so on
// each device it is checked bit for bit against its f32 entry run on the same values widened
// (then rounded), or, where it stores an intermediate it reads back (the join's sum s), against
// the ops that define it; and the two devices against each other, within one bf16 step.

/// `x` rounded to bf16, as an f32 tensor (the values a bf16 op reads).
fn widened(dev: &mut dyn Backend, x: &[f32], shape: &[usize]) -> Tensor {
    let r: Vec<f32> = x.iter().map(|&v| DType::Bf16.round(v)).collect();
    dev.upload(&r, shape).unwrap()
}

fn rounded(v: Vec<f32>) -> Vec<f32> {
    v.into_iter().map(|x| DType::Bf16.round(x)).collect()
}

/// Runs `body` on the CPU and the GPU; compares their outputs within `tol` (relative norm).
fn bf16_twin(test: &str, body: impl Fn(&mut dyn Backend) -> Vec<(&'static str, Vec<f32>)>) {
    let mut devices: Vec<Box<dyn Backend>> = vec![Box::new(common::cpu())];
    devices.extend(gpu_or_skip(test));
    let outs: Vec<_> = devices.iter_mut().map(|d| body(d.as_mut())).collect();
    if let [cpu, gpu] = &outs[..] {
        for ((name, c), (_, g)) in cpu.iter().zip(gpu) {
            // One bf16 step (2⁻⁸ relative) where the devices' f32 values straddle a rounding
            // boundary; f32 sums (parameter gradients) to their own REDUCE tolerance.
            common::gpu::compare_twins(&format!("{test} {name}"), g, c, 1e-3);
        }
    }
}

/// The last two: a row of the 1,024 a lane's registers hold, and a wider one read where it lies.
const BLOCK_SHAPES: [(usize, usize); 6] = [(1, 1), (7, 33), (64, 256), (130, 300), (3, 1024), (5, 1031)];

#[test]
fn layernorm_in_bf16_is_the_f32_norm_rounded() {
    bf16_twin("layernorm bf16", |dev| {
        let mut out = vec![];
        for (i, &(r, d)) in BLOCK_SHAPES.iter().enumerate() {
            let (x, dy, gb) = (randv(10 + i as u64, r * d), randv(20 + i as u64, r * d), randv(30 + i as u64, 2 * d));
            let params = dev.upload(&gb, &[2 * d]).unwrap();
            let (xh, dyh) = (upload_bf16(dev, &x, &[r, d]), upload_bf16(dev, &dy, &[r, d]));
            let (xw, dyw) = (widened(dev, &x, &[r, d]), widened(dev, &dy, &[r, d]));
            let (y, stats) = dev.layernorm_fwd(&xh, params.sub(0, d), params.sub(d, d), 1e-5).unwrap();
            let (yf, statsf) = dev.layernorm_fwd(&xw, params.sub(0, d), params.sub(d, d), 1e-5).unwrap();
            assert_eq!(y.dtype(), DType::Bf16);
            let what = format!("{} layernorm_fwd {r}x{d}", dev.name());
            same_values(&what, &dev.download(y.view()).unwrap(), &rounded(dev.download(yf.view()).unwrap()));
            same_values(
                &format!("{what} stats"),
                &dev.download(stats.view()).unwrap(),
                &dev.download(statsf.view()).unwrap(),
            );
            let mut grads = dev.zeros(&[4 * d]).unwrap();
            let [g1, b1, g2, b2] = grads.subs_mut([(0, d), (d, d), (2 * d, d), (3 * d, d)]);
            let dx = dev.layernorm_bwd(&xh, &stats, params.sub(0, d), &dyh, g1, b1).unwrap();
            let dxf = dev.layernorm_bwd(&xw, &stats, params.sub(0, d), &dyw, g2, b2).unwrap();
            let what = format!("{} layernorm_bwd {r}x{d}", dev.name());
            same_values(&what, &dev.download(dx.view()).unwrap(), &rounded(dev.download(dxf.view()).unwrap()));
            let g = dev.download(grads.view()).unwrap();
            same_values(&format!("{what} dgamma, dbeta"), &g[..2 * d], &g[2 * d..]);
            out.extend([("y", dev.download(y.view()).unwrap()), ("dx", dev.download(dx.view()).unwrap())]);
            out.push(("dgamma, dbeta", g[..2 * d].to_vec()));
        }
        out
    });
}

#[test]
fn the_join_in_bf16_rounds_its_sum_and_norms_it_as_stored() {
    bf16_twin("residual layernorm bf16", |dev| {
        let mut out = vec![];
        for (i, &(r, d)) in BLOCK_SHAPES.iter().enumerate() {
            for p in [0.0f32, 0.25] {
                let seed = 40 + i as u64;
                let (a, x, dy, gb) =
                    (randv(seed, r * d), randv(seed ^ 3, r * d), randv(seed ^ 5, r * d), randv(seed ^ 7, 2 * d));
                let params = dev.upload(&gb, &[2 * d]).unwrap();
                let (mut ah, xh, dyh) =
                    (upload_bf16(dev, &a, &[r, d]), upload_bf16(dev, &x, &[r, d]), upload_bf16(dev, &dy, &[r, d]));
                let (mut af, xf) = (widened(dev, &a, &[r, d]), widened(dev, &x, &[r, d]));
                let (y, stats) = dev
                    .residual_layernorm_fwd(&mut ah, &xh, params.sub(0, d), params.sub(d, d), 1e-5, p, seed)
                    .unwrap();
                dev.residual_layernorm_fwd(&mut af, &xf, params.sub(0, d), params.sub(d, d), 1e-5, p, seed).unwrap();
                let what = format!("{} residual_layernorm_fwd {r}x{d} p={p}", dev.name());
                // s = x + dropout(a), rounded once as stored; y = LN(s as stored), rounded.
                same_values(
                    &format!("{what} s"),
                    &dev.download(ah.view()).unwrap(),
                    &rounded(dev.download(af.view()).unwrap()),
                );
                let (y_of_s, stats_of_s) = dev.layernorm_fwd(&ah, params.sub(0, d), params.sub(d, d), 1e-5).unwrap();
                same_values(
                    &format!("{what} y"),
                    &dev.download(y.view()).unwrap(),
                    &dev.download(y_of_s.view()).unwrap(),
                );
                same_values(
                    &format!("{what} stats"),
                    &dev.download(stats.view()).unwrap(),
                    &dev.download(stats_of_s.view()).unwrap(),
                );
                // Backward: dx as layernorm_bwd gives it; da = dropout(dx as stored), rounded;
                // the bias gradient Σ da of the stored values.
                let mut grads = dev.zeros(&[5 * d]).unwrap();
                let [g1, b1, bias, g2, b2] = grads.subs_mut([(0, d), (d, d), (2 * d, d), (3 * d, d), (4 * d, d)]);
                let (dx, da) = dev
                    .residual_layernorm_bwd(&ah, &stats, params.sub(0, d), &dyh, g1, b1, Some(bias), p, seed)
                    .unwrap();
                let dx_ln = dev.layernorm_bwd(&ah, &stats, params.sub(0, d), &dyh, g2, b2).unwrap();
                let what = format!("{} residual_layernorm_bwd {r}x{d} p={p}", dev.name());
                let dxv = dev.download(dx.view()).unwrap();
                same_values(&format!("{what} dx"), &dxv, &dev.download(dx_ln.view()).unwrap());
                let dav = dev.download(da.view()).unwrap();
                let mut dxf = widened(dev, &dxv, &[r, d]);
                dev.dropout_fwd(&mut dxf, p, seed).unwrap();
                same_values(&format!("{what} da"), &dav, &rounded(dev.download(dxf.view()).unwrap()));
                let mut sum = dev.zeros(&[d]).unwrap();
                dev.bias_bwd(&da, sum.view_mut()).unwrap();
                let g = dev.download(grads.view()).unwrap();
                let sums = dev.download(sum.view()).unwrap();
                let e = rel_err(&g[2 * d..3 * d], &sums.iter().map(|&v| v as f64).collect::<Vec<_>>());
                assert!(e <= 1e-5, "{what}: the bias gradient is {e:.2e} from bias_bwd of da");
                let e = rel_err(&g[..2 * d], &g[3 * d..].iter().map(|&v| v as f64).collect::<Vec<_>>());
                assert!(e <= 1e-5, "{what}: dgamma, dbeta are {e:.2e} from layernorm_bwd's");
                out.extend([
                    ("s", dev.download(ah.view()).unwrap()),
                    ("y", dev.download(y.view()).unwrap()),
                    ("dx", dxv),
                    ("da", dav),
                    ("dgamma, dbeta, dbias", g[..3 * d].to_vec()),
                ]);
            }
        }
        out
    });
}

#[test]
fn the_feed_forward_activation_in_bf16_is_the_f32_one_rounded() {
    bf16_twin("gelu dropout bf16", |dev| {
        let mut out = vec![];
        for (i, &(r, d)) in BLOCK_SHAPES.iter().enumerate() {
            for p in [0.0f32, 0.1] {
                let seed = 60 + i as u64;
                let (u, dh, b) = (randv(seed, r * d), randv(seed ^ 1, r * d), randv(seed ^ 2, d));
                let bias = dev.upload(&b, &[d]).unwrap();
                let what = format!("{} bias_gelu_dropout_fwd {r}x{d} p={p}", dev.name());
                // Without a bias: h is the f32 op's h rounded.
                let mut uh = upload_bf16(dev, &u, &[r, d]);
                let mut uf = widened(dev, &u, &[r, d]);
                let h = dev.bias_gelu_dropout_fwd(&mut uh, None, p, seed).unwrap();
                let hf = dev.bias_gelu_dropout_fwd(&mut uf, None, p, seed).unwrap();
                assert_eq!(h.dtype(), DType::Bf16);
                same_values(&what, &dev.download(h.view()).unwrap(), &rounded(dev.download(hf.view()).unwrap()));
                // With one: u + b rounded as stored, and h of u as stored.
                let mut ub = upload_bf16(dev, &u, &[r, d]);
                let hb = dev.bias_gelu_dropout_fwd(&mut ub, Some(bias.view()), p, seed).unwrap();
                let mut uw = widened(dev, &u, &[r, d]);
                dev.add_bias(&mut uw, bias.view()).unwrap();
                let ubv = dev.download(ub.view()).unwrap();
                same_values(&format!("{what}, bias: u"), &ubv, &rounded(dev.download(uw.view()).unwrap()));
                let mut us = dev.upload(&ubv, &[r, d]).unwrap();
                let hs = dev.bias_gelu_dropout_fwd(&mut us, None, p, seed).unwrap();
                same_values(
                    &format!("{what}, bias: h"),
                    &dev.download(hb.view()).unwrap(),
                    &rounded(dev.download(hs.view()).unwrap()),
                );
                // Backward in dh's memory, with and without fc1's bias gradient.
                let what = format!("{} gelu_dropout_bwd {r}x{d} p={p}", dev.name());
                let dhh = upload_bf16(dev, &dh, &[r, d]);
                let dx = dev.gelu_dropout_bwd(&uh, dhh, p, seed).unwrap();
                let (uw, dhw) = (widened(dev, &u, &[r, d]), widened(dev, &dh, &[r, d]));
                let dxf = dev.gelu_dropout_bwd(&uw, dhw, p, seed).unwrap();
                let dxv = dev.download(dx.view()).unwrap();
                same_values(&what, &dxv, &rounded(dev.download(dxf.view()).unwrap()));
                let mut sums = dev.zeros(&[2 * d]).unwrap();
                let [s1, s2] = sums.subs_mut([(0, d), (d, d)]);
                let dhh = upload_bf16(dev, &dh, &[r, d]);
                let dxb = dev.gelu_dropout_bias_bwd(&uh, dhh, p, seed, s1).unwrap();
                same_values(&format!("{what} with the bias gradient"), &dev.download(dxb.view()).unwrap(), &dxv);
                // Σ of the stored values, in bias_bwd's order: bias_bwd of dx (bf16) and of it
                // widened (f32) give the same bits.
                dev.bias_bwd(&dxb, s2).unwrap();
                let sv = dev.download(sums.view()).unwrap();
                same_values(&format!("{what}: the bias gradient against bias_bwd"), &sv[..d], &sv[d..]);
                let mut again = dev.zeros(&[d]).unwrap();
                let dxw = dev.upload(&dxv, &[r, d]).unwrap();
                dev.bias_bwd(&dxw, again.view_mut()).unwrap();
                same_values(
                    &format!("{what}: bias_bwd in bf16 against f32"),
                    &dev.download(again.view()).unwrap(),
                    &sv[..d],
                );
                out.extend([
                    ("h", dev.download(h.view()).unwrap()),
                    ("h with bias", dev.download(hb.view()).unwrap()),
                    ("dpre", dxv),
                    ("dbias", sv[..d].to_vec()),
                ]);
            }
        }
        out
    });
}

/// The attention backward in f64 from the values a bf16 backward reads (qkv, dout rounded;
/// the saved probabilities `p`), each dqkv element with its bound, and the whole with dS
/// rounded to bf16 before dQ = dS·K and dK = dSᵀ·Q as the definition says.
struct AttentionBwdReference {
    /// (value with dS exact, bound) per element of dqkv: one rounding of the result (2⁻⁸ of
    /// it), one of dS as an operand (2⁻⁸ of Σ|dS|·|k|, dQ and dK only), and 2⁻¹⁴ of the sums'
    /// sizes for f32 arithmetic.
    elements: Vec<(f64, f64)>,
    /// dqkv with dS rounded to bf16, then rounded to bf16.
    rounded_ds: Vec<f64>,
}

fn attention_bwd_reference(
    qkv: &[f32],
    p: &[f32],
    dout: &[f32],
    offsets: &[usize],
    heads: usize,
) -> AttentionBwdReference {
    let t = offsets[offsets.len() - 1];
    let d = dout.len() / t;
    let dh = d / heads;
    let scale = 1.0 / (dh as f64).sqrt();
    let r = |v: f32| DType::Bf16.round(v) as f64;
    let round = |v: f64| DType::Bf16.round(v as f32) as f64;
    let mut elements = vec![(0.0, 0.0); t * 3 * d];
    let mut rounded_ds = vec![0.0; t * 3 * d];
    let poff = semshare::backend::prob_offsets(offsets, heads);
    for (b, w) in offsets.windows(2).enumerate() {
        let (s, len) = (w[0], w[1] - w[0]);
        for h in 0..heads {
            let pr = |i: usize, j: usize| p[poff[b] + h * len * len + i * len + j] as f64;
            let x = |row: usize, part: usize, c: usize| r(qkv[(s + row) * 3 * d + part * d + h * dh + c]);
            let go = |row: usize, c: usize| r(dout[(s + row) * d + h * dh + c]);
            // dP, its size Σ|dO|·|v|; dS and its size.
            let mut ds = vec![0.0; len * len];
            let mut ds_size = vec![0.0; len * len];
            for i in 0..len {
                let (mut dp, mut dp_size) = (vec![0.0; len], vec![0.0; len]);
                for j in 0..len {
                    for c in 0..dh {
                        dp[j] += go(i, c) * x(j, 2, c);
                        dp_size[j] += (go(i, c) * x(j, 2, c)).abs();
                    }
                }
                let dot: f64 = (0..len).map(|j| pr(i, j) * dp[j]).sum();
                let dot_size: f64 = (0..len).map(|j| pr(i, j) * dp_size[j]).sum();
                for j in 0..len {
                    ds[i * len + j] = pr(i, j) * (dp[j] - dot) * scale;
                    ds_size[i * len + j] = pr(i, j) * (dp_size[j] + dot_size) * scale;
                }
            }
            let dsr: Vec<f64> = ds.iter().map(|&v| round(v)).collect();
            for i in 0..len {
                for c in 0..dh {
                    let at = |part: usize| (s + i) * 3 * d + part * d + h * dh + c;
                    // dV[i] = Σ_q P[q][i] dO[q]
                    let (mut v, mut size) = (0.0, 0.0);
                    for q in 0..len {
                        v += pr(q, i) * go(q, c);
                        size += (pr(q, i) * go(q, c)).abs();
                    }
                    elements[at(2)] = (v, 2f64.powi(-8) * v.abs() + 2f64.powi(-14) * size);
                    rounded_ds[at(2)] = round(v);
                    // dQ[i] = Σ_k dS[i][k] K[k]; dK[i] = Σ_q dS[q][i] Q[q]
                    for (part, other, row_major) in [(0, 1, true), (1, 0, false)] {
                        let (mut v, mut vr, mut mag, mut size) = (0.0, 0.0, 0.0, 0.0);
                        for k in 0..len {
                            let e = if row_major { i * len + k } else { k * len + i };
                            v += ds[e] * x(k, other, c);
                            vr += dsr[e] * x(k, other, c);
                            mag += (ds[e] * x(k, other, c)).abs();
                            size += ds_size[e] * x(k, other, c).abs();
                        }
                        let bound = 2f64.powi(-8) * (v.abs() + mag) + 2f64.powi(-14) * (size + mag);
                        elements[at(part)] = (v, bound);
                        rounded_ds[at(part)] = round(vr);
                    }
                }
            }
        }
    }
    AttentionBwdReference { elements, rounded_ds }
}

/// Attention on bf16 storage (the GPU's forward on tensor cores).
/// - The saved probabilities are the f32 entry's on the same values, rounded: within one
///   rounding, 2⁻⁸ (bf16's unit roundoff) of each, and 2⁻¹⁶ more for the f32 sums of S, which
///   the tensor cores take in their own order.
/// - The context is those saved probabilities times V, rounded once: within 2⁻⁸ of the f64
///   product, plus 2⁻¹⁴ of Σ p·|v| for the f32 sums. (With the f32 probabilities in the product,
///   as before the tensor cores, it would be up to 2⁻⁸ of Σ p·|v| away.)
/// - The backward from the saved probabilities and bf16 qkv and dout (on tensor cores on the
///   GPU, dS rounded to bf16 before dQ and dK on both devices): each element of dqkv within its
///   bound of the f64 backward (`AttentionBwdReference`), and the whole within 2⁻¹¹ of the one
///   with dS rounded; the qkv bias gradient sums dqkv as stored.
#[test]
fn attention_in_bf16_multiplies_the_saved_probabilities() {
    bf16_twin("attention bf16", |dev| {
        let mut out = vec![];
        for (lengths, heads, dh) in [
            (&[1usize, 5, 36, 17][..], 2usize, 8usize),
            (&[64, 3][..], 4, 33),
            (&[36; 3][..], 8, 16),
            (&[36, 20, 49][..], 2, 128),
            (&[16, 7][..], 3, 2),
        ] {
            let seg = common::segments(dev, lengths);
            let (t, d) = (seg.tokens(), heads * dh);
            let seed = (t * d) as u64;
            let (qkv, dout) = (randv(seed, t * 3 * d), randv(seed ^ 1, t * d));
            let what = format!("{} attention {lengths:?} {heads}x{dh}", dev.name());
            let (qh, qf) = (upload_bf16(dev, &qkv, &[t, 3 * d]), widened(dev, &qkv, &[t, 3 * d]));
            let (ctx, probs) = dev.attention_fwd(&qh, &seg, heads).unwrap();
            let (_, probsf) = dev.attention_fwd(&qf, &seg, heads).unwrap();
            assert_eq!((ctx.dtype(), probs.dtype()), (DType::Bf16, DType::Bf16));
            let pv = dev.download(probs.view()).unwrap();
            let pf = dev.download(probsf.view()).unwrap();
            for (i, (&p, &f)) in pv.iter().zip(&pf).enumerate() {
                let bound = (2f32.powi(-8) + 2f32.powi(-16)) * f.abs();
                assert!((p - f).abs() <= bound, "{what}: probability {i} is {p:e}, the f32 entry's {f:e}");
            }
            let cv = dev.download(ctx.view()).unwrap();
            let v = |row: usize, col: usize| DType::Bf16.round(qkv[row * 3 * d + 2 * d + col]) as f64;
            let poff = semshare::backend::prob_offsets(&seg.offsets, heads);
            for (b, w) in seg.offsets.windows(2).enumerate() {
                let (s, len) = (w[0], w[1] - w[0]);
                for h in 0..heads {
                    let p = &pv[poff[b] + h * len * len..][..len * len];
                    for (i, c) in (0..len).flat_map(|i| (0..dh).map(move |c| (i, c))) {
                        let col = h * dh + c;
                        let terms = (0..len).map(|j| p[i * len + j] as f64 * v(s + j, col));
                        let (want, size) = terms.fold((0.0, 0.0), |(w, z), x| (w + x, z + x.abs()));
                        let got = cv[(s + i) * d + col] as f64;
                        let bound = 2f64.powi(-8) * want.abs() + 2f64.powi(-14) * size;
                        assert!(
                            (got - want).abs() <= bound,
                            "{what}: context of item {b} row {i} column {col} is {got:e}, the saved probabilities times V {want:e}"
                        );
                    }
                }
            }
            let dh_ = upload_bf16(dev, &dout, &[t, d]);
            let mut sums = dev.zeros(&[6 * d]).unwrap();
            let [s1, s2] = sums.subs_mut([(0, 3 * d), (3 * d, 3 * d)]);
            let dq = dev.attention_bwd(&qh, &probs, &seg, heads, &dh_, Some(s1)).unwrap();
            let dqv = dev.download(dq.view()).unwrap();
            let want = attention_bwd_reference(&qkv, &pv, &dout, &seg.offsets, heads);
            for (i, (&got, (want, bound))) in dqv.iter().zip(&want.elements).enumerate() {
                let (row, col) = (i / (3 * d), i % (3 * d));
                assert!(
                    (got as f64 - want).abs() <= *bound,
                    "{what}: dqkv[{row}][{col}] is {got:e}, the f64 backward {want:e} (bound {bound:.1e})"
                );
            }
            // The per-element bound allows dS unrounded; the whole does not: with dS rounded as
            // the definition says, dqkv is within 2⁻¹¹ of the rounded-dS reference (measured
            // ≤ 6.6e-6 on both devices), with dS unrounded 1.1e-3 from it (a planted fault).
            let e = rel_err(&dqv, &want.rounded_ds);
            assert!(e <= 2f64.powi(-11), "{what}: dqkv is {e:.2e} from dQ, dK with dS rounded to bf16");
            dev.bias_bwd(&dq, s2).unwrap();
            let sv = dev.download(sums.view()).unwrap();
            let e = rel_err(&sv[..3 * d], &sv[3 * d..].iter().map(|&v| v as f64).collect::<Vec<_>>());
            assert!(e <= 1e-5, "{what}: the bias gradient is {e:.2e} from bias_bwd of dqkv as stored");
            out.extend([("context", cv), ("probabilities", pv), ("dqkv", dqv), ("dbias", sv[..3 * d].to_vec())]);
        }
        out
    });
}
