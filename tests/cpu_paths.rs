//! The CPU's elementwise, norm (plain and fused with the residual join, for training and in place), cross-entropy and
//! GRU-gate ops compiled for each instruction-set path (`backend/cpu/simd.rs`) give bitwise
//! the portable path's results, on fresh random inputs. The path is chosen once per process, so the test runs itself once per path with
//! `SEMSHARE_CPU` forced and compares what each child prints, op by op. A path this machine
//! lacks is printed as not run, by name. (The GEMM's paths differ by rounding, not bitwise:
//! `cpu_gemm.rs` checks each against the f64 definition; attention, whose per-head products
//! are GEMMs, is checked against f64 by `ops_forward` on the default and the portable path.)

mod common;

use std::process::Command;

use common::{randv, segments, upload, upload_bf16};
use semshare::backend::cpu::Cpu;
use semshare::backend::cpu::dispatch::{CpuPath, ENV};
use semshare::backend::{Backend, GruStep};
use semshare::tensor::Tensor;

/// Set in a child: it prints its op outputs instead of comparing.
const CHILD: &str = "SEMSHARE_CPU_PATHS_CHILD";

/// FNV-1a over the bits of every element, with the element count.
fn digest(x: &[f32]) -> String {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for v in x {
        for byte in v.to_bits().to_le_bytes() {
            h = (h ^ byte as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{h:016x}/{}", x.len())
}

fn down(dev: &mut Cpu, t: &Tensor) -> Vec<f32> {
    dev.download(t.view()).unwrap()
}

/// Every op that simd.rs compiles per path, on inputs drawn from `seed`: one line per output,
/// `name digest`.
fn outputs(seed: u64) -> Vec<String> {
    let mut dev = Cpu::new();
    let d = &mut dev;
    let mut lines = vec![];
    let mut put = |name: &str, x: &[f32]| lines.push(format!("{name} {}", digest(x)));
    // 1152 × 40 spans several parallel blocks and ends off a multiple of 4 and 64 at 37 rows.
    for (rows, cols) in [(1152, 40), (37, 19), (3, 5)] {
        let n = rows * cols;
        let x = randv(seed ^ n as u64, n);
        let x = upload(d, &x, &[rows, cols]);
        let dy = upload(d, &randv(seed ^ 1 ^ n as u64, n), &[rows, cols]);
        let bias = randv(seed ^ 2, cols);
        let tag = format!("{rows}x{cols}");

        let mut t = x.clone();
        d.dropout_fwd(&mut t, 0.3, seed).unwrap();
        put(&format!("dropout_fwd {tag}"), &down(d, &t));
        let mut t = dy.clone();
        d.dropout_bwd(&mut t, 0.3, seed).unwrap();
        put(&format!("dropout_bwd {tag}"), &down(d, &t));
        let y = d.gelu_fwd(&x).unwrap();
        put(&format!("gelu_fwd {tag}"), &down(d, &y));
        let dx = d.gelu_bwd(&x, &dy).unwrap();
        put(&format!("gelu_bwd {tag}"), &down(d, &dx));
        let mut t = x.clone();
        let b = upload(d, &bias, &[cols]);
        d.add_bias(&mut t, b.view()).unwrap();
        put(&format!("add_bias {tag}"), &down(d, &t));
        let mut db = upload(d, &bias, &[cols]);
        d.bias_bwd(&dy, db.view_mut()).unwrap();
        put(&format!("bias_bwd {tag}"), &down(d, &db));
        let mut t = x.clone();
        d.add_assign(&mut t, &dy).unwrap();
        put(&format!("add_assign {tag}"), &down(d, &t));

        let gamma = upload(d, &randv(seed ^ 3, cols), &[cols]);
        let beta = upload(d, &randv(seed ^ 4, cols), &[cols]);
        let (y, stats) = d.layernorm_fwd(&x, gamma.view(), beta.view(), 1e-5).unwrap();
        put(&format!("layernorm_fwd {tag}"), &down(d, &y));
        let mut dgamma = upload(d, &vec![0.5; cols], &[cols]);
        let mut dbeta = upload(d, &vec![0.25; cols], &[cols]);
        let dx = d.layernorm_bwd(&x, &stats, gamma.view(), &dy, dgamma.view_mut(), dbeta.view_mut()).unwrap();
        put(&format!("layernorm_bwd {tag}"), &down(d, &dx));
        put(&format!("layernorm_bwd dgamma {tag}"), &down(d, &dgamma));
        put(&format!("layernorm_bwd dbeta {tag}"), &down(d, &dbeta));

        let mut s = dy.clone();
        let (y, stats) = d.residual_layernorm_fwd(&mut s, &x, gamma.view(), beta.view(), 1e-5, 0.3, seed).unwrap();
        put(&format!("residual_layernorm_fwd s {tag}"), &down(d, &s));
        put(&format!("residual_layernorm_fwd y {tag}"), &down(d, &y));
        let (dx, da) = d
            .residual_layernorm_bwd(&s, &stats, gamma.view(), &dy, dgamma.view_mut(), dbeta.view_mut(), None, 0.3, seed)
            .unwrap();
        put(&format!("residual_layernorm_bwd dx {tag}"), &down(d, &dx));
        put(&format!("residual_layernorm_bwd da {tag}"), &down(d, &da));
        put(&format!("residual_layernorm_bwd dgamma {tag}"), &down(d, &dgamma));
        let y = d.residual_layernorm(dy.clone(), &x, gamma.view(), beta.view(), 1e-5).unwrap();
        put(&format!("residual_layernorm (inference) {tag}"), &down(d, &y));

        let targets: Vec<u32> = (0..rows).map(|r| ((r * 7 + seed as usize) % cols) as u32).collect();
        let targets = d.upload_ids(&targets).unwrap();
        let mut logits = x.clone();
        let mut loss = upload(d, &[0.0], &[1]);
        d.cross_entropy_into(&mut logits, &targets, 0.5, loss.view_mut()).unwrap();
        put(&format!("cross_entropy grad {tag}"), &down(d, &logits));
        put(&format!("cross_entropy loss {tag}"), &down(d, &loss));
    }

    // The feed-forward's activation on bf16 activations, forward and backward: GELU looked up
    // by each value's 16 bits (`elementwise::gelu_tables`), chunks of other values computed.
    for (rows, cols) in [(1152, 40), (37, 19)] {
        let n = rows * cols;
        let bias = upload(d, &randv(seed ^ 5, cols), &[cols]);
        let mut u = upload_bf16(d, &randv(seed ^ 6 ^ n as u64, n), &[rows, cols]);
        let h = d.bias_gelu_dropout_fwd(&mut u, Some(bias.view()), 0.3, seed).unwrap();
        put(&format!("bias_gelu_dropout_fwd bf16 h {rows}x{cols}"), &down(d, &h));
        put(&format!("bias_gelu_dropout_fwd bf16 u {rows}x{cols}"), &down(d, &u));
        let dh = upload_bf16(d, &randv(seed ^ 7 ^ n as u64, n), &[rows, cols]);
        let du = d.gelu_dropout_bwd(&u, dh, 0.3, seed).unwrap();
        put(&format!("gelu_dropout_bwd bf16 {rows}x{cols}"), &down(d, &du));
    }

    // Items of 36, 1, 17 and 40 steps (loops of every length mod 8 and 16).
    let seg = segments(d, &[36, 1, 17, 40]);
    let tokens = seg.tokens();

    // Two GRU steps each way over the same items (hidden 40: a 16-lane loop and a tail).
    let hd = 40;
    let (items, steps) = (seg.items(), seg.max_len);
    let xproj = upload(d, &randv(seed ^ 7, tokens * 3 * hd), &[tokens, 3 * hd]);
    let hproj = upload(d, &randv(seed ^ 8, items * 3 * hd), &[items, 3 * hd]);
    let bias_hh = upload(d, &randv(seed ^ 9, 3 * hd), &[3 * hd]);
    for reverse in [false, true] {
        let mut hs = upload(d, &randv(seed ^ 10, (steps + 1) * items * hd), &[(steps + 1) * items, hd]);
        let mut out = upload(d, &vec![0.0; tokens * 2 * hd], &[tokens, 2 * hd]);
        let mut gates = upload(d, &vec![0.0; steps * items * 4 * hd], &[steps * items, 4 * hd]);
        let dout = upload(d, &randv(seed ^ 11, tokens * 2 * hd), &[tokens, 2 * hd]);
        let mut dh = upload(d, &randv(seed ^ 12, items * hd), &[items, hd]);
        let mut dxproj = upload(d, &vec![0.0; tokens * 3 * hd], &[tokens, 3 * hd]);
        let mut dhproj = upload(d, &vec![0.0; steps * items * 3 * hd], &[steps * items, 3 * hd]);
        let out_col = if reverse { hd } else { 0 };
        for s in [0, 20] {
            let step = GruStep { s, reverse, hidden: hd, out_col };
            d.gru_step_fwd(step, &seg, &xproj, &hproj, bias_hh.view(), &mut hs, &mut out, &mut gates).unwrap();
        }
        for s in [20, 0] {
            let step = GruStep { s, reverse, hidden: hd, out_col };
            d.gru_step_bwd(step, &seg, &gates, &hs, &dout, &mut dh, &mut dxproj, &mut dhproj).unwrap();
        }
        for (name, t) in [("hs", &hs), ("out", &out), ("gates", &gates), ("dh", &dh), ("dxproj", &dxproj)] {
            put(&format!("gru reverse={reverse} {name}"), &down(d, t));
        }
        put(&format!("gru reverse={reverse} dhproj"), &down(d, &dhproj));
    }
    lines
}

#[test]
fn child_prints_its_op_outputs() {
    if std::env::var_os(CHILD).is_none() {
        return; // run by `every_path_gives_the_portable_paths_bits` only
    }
    for line in outputs(std::env::var(CHILD).unwrap().parse().unwrap()) {
        println!("output {line}");
    }
}

#[test]
fn every_path_gives_the_portable_paths_bits() {
    if std::env::var_os(CHILD).is_some() {
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let seed = 0x5eed_0000 + std::process::id() as u64 % 1000; // fresh inputs on every run
    let mut runs = vec![];
    for path in CpuPath::ALL {
        if let Err(why) = path.kernels() {
            println!("not run: CPU path {}: {why}", path.name());
            continue;
        }
        let out = Command::new(&exe)
            .args(["--exact", "child_prints_its_op_outputs", "--nocapture", "--test-threads=1"])
            .env(CHILD, seed.to_string())
            .env(ENV, path.name())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "path {}: the child failed:\n{text}{}",
            path.name(),
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<String> = text.lines().filter_map(|l| l.strip_prefix("output ")).map(str::to_string).collect();
        assert!(lines.len() > 40, "path {}: {} outputs", path.name(), lines.len());
        println!("ran: CPU path {} ({} outputs, seed {seed})", path.name(), lines.len());
        runs.push((path, lines));
    }
    let (_, portable) = runs.iter().find(|(p, _)| *p == CpuPath::Portable).expect("the portable path runs everywhere");
    for (path, lines) in &runs {
        for (got, want) in lines.iter().zip(portable) {
            assert_eq!(got, want, "path {} differs from portable (seed {seed})", path.name());
        }
        assert_eq!(lines.len(), portable.len());
    }
}
