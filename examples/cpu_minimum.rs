//! The minimum, lower quartile and median time of the `small` embedding (32 images + 32 texts,
//! full lengths, weights frozen as inference's are) or of one GEMM (B packed once), over N
//! runs. On a VM whose speed swings 2× within seconds (docs/results/cpu.md, sessions 31–32) a
//! median says which phase it met; the minimum of many is what stays steady enough for an A/B
//! between two builds, run in turn on one pinned core:
//!
//!     RAYON_NUM_THREADS=1 taskset -c 0 target/release/examples/cpu_minimum embed bf16 30
//!     RAYON_NUM_THREADS=1 taskset -c 0 target/release/examples/cpu_minimum gemm 1152 256 256 bf16 bf16 1000
//!
//! `embed fp32|bf16 [runs]`; `gemm M K N fp32|bf16 [C: f32|bf16|bf16-2byte] [runs] [packed|per-call]`
//! (C = x·Wᵀ; W packed once as a frozen weight is, or packed by every call as `torch.mm`
//! does). Prints one line. `tools/gemm_turnabout.py` runs it in turn with `torch.mm`.

use semshare::backend::cpu::{Cpu, dispatch, gemm as cpu_gemm};
use semshare::backend::{Backend, Gemm, Precision};
use semshare::model::{Batch, EmbeddingKind, ImageBatch, ModelConfig, SemShare, TextBatch};
use semshare::rng::Rng;
use semshare::tensor::{DType, Tensor, host_pool};
use semshare::{Error, Result};
use std::time::Instant;

/// A count from the command line, at most 10^7 (runs) or 2^28 (a size).
fn count(what: &str, s: Option<&String>, default: usize) -> Result<usize> {
    let Some(s) = s else { return Ok(default) };
    match s.parse::<usize>() {
        Ok(v) if v <= 1 << 28 && (what != "runs" || v <= 10_000_000) => Ok(v),
        _ => Err(Error::config(format!("{what}: `{s}` is not a count (runs at most 10^7, sizes 2^28)"))),
    }
}

/// `f` run `runs` times after `warm` untimed runs: (minimum, lower quartile, median) in ms.
fn timed(warm: usize, runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<[f64; 3]> {
    for _ in 0..warm {
        f()?;
    }
    let mut ms = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let t0 = Instant::now();
        f()?;
        ms.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    Ok([ms[0], ms[ms.len() / 4], ms[ms.len() / 2]])
}

fn main() {
    if let Err(e) = run() {
        eprintln!("cpu_minimum: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = || {
        Error::config(
            "usage: cpu_minimum embed fp32|bf16 [runs] | gemm M K N fp32|bf16 [f32|bf16|bf16-2byte] [runs] [packed|per-call]",
        )
    };
    let path = dispatch::active()?.describe();
    let threads = rayon::current_num_threads();
    match args.first().map(String::as_str) {
        Some("embed") => {
            let precision = Precision::parse(args.get(1).ok_or_else(usage)?)?;
            let runs = count("runs", args.get(2), 30)?;
            let cfg = ModelConfig { vocab: 2000, object_classes: 100, labels: 24, ..ModelConfig::small() };
            let mut rng = Rng::new(1);
            let ib =
                ImageBatch::random(&mut rng, &[cfg.max_regions; 32], cfg.region_dim, cfg.object_classes, cfg.labels);
            let tb = TextBatch::random(&mut rng, &[cfg.max_tokens; 32], cfg.vocab, cfg.labels);
            let mut dev = Cpu::with_precision(precision)?;
            let net = SemShare::new(&cfg)?;
            let w = net.store.upload(&mut dev, &net.store.init_values(0))?;
            let w = dev.freeze(w)?;
            let (ib, tb) = (Batch::Image(ib), Batch::Text(tb));
            let [min, q1, med] = timed(3, runs, || {
                net.embed(&mut dev, &w, &ib, EmbeddingKind::Pooled)?;
                net.embed(&mut dev, &w, &tb, EmbeddingKind::Pooled)?;
                Ok(())
            })?;
            println!(
                "embed 32 + 32, {}, path {path}, {threads} threads, {runs} runs: min {min:.2} q25 {q1:.2} median {med:.2} ms",
                precision.name()
            );
        }
        Some("gemm") => {
            let dims = (1..4).map(|i| count("M K N", args.get(i), 0)).collect::<Result<Vec<_>>>()?;
            let (m, k, n) = (dims[0], dims[1], dims[2]);
            // Each operand at most 2^28 values (1 GiB), checked before anything is allocated.
            let fits = |a: usize, b: usize| a.checked_mul(b).is_some_and(|v| v <= 1 << 28);
            if m == 0 || k == 0 || n == 0 || !fits(m, k) || !fits(k, n) || !fits(m, n) {
                return Err(Error::config(format!(
                    "gemm {m} × {k} × {n}: each size from 1, each operand at most 2^28 values"
                )));
            }
            let precision = Precision::parse(args.get(4).ok_or_else(usage)?)?;
            if precision == Precision::Tf32 {
                return Err(Error::config("precision tf32: the CPU has no TF32 unit"));
            }
            // bf16-2byte: A and C hold bf16 in 2 bytes (`gemm::Input::Bf16`, `Output::Bf16`).
            let (store, two_bytes) = match args.get(5).map(String::as_str) {
                None | Some("f32") => (DType::F32, false),
                Some("bf16") => (DType::Bf16, false),
                Some("bf16-2byte") => (DType::Bf16, true),
                Some(other) => return Err(Error::config(format!("C: `{other}` (expected f32, bf16 or bf16-2byte)"))),
            };
            let runs = count("runs", args.get(6), 300)?;
            let once = match args.get(7).map(String::as_str) {
                None | Some("packed") => true,
                Some("per-call") => false,
                Some(other) => return Err(Error::config(format!("B: `{other}` (expected packed or per-call)"))),
            };
            let kernels = dispatch::active()?;
            let g = Gemm { m, n, k, trans_a: false, trans_b: true, alpha: 1.0, beta: 0.0 };
            let mut rng = Rng::new(2);
            let a: Vec<f32> = (0..m * k).map(|_| rng.normal() as f32).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rng.normal() as f32).collect();
            let packed =
                if once { cpu_gemm::PackedB::new(kernels, precision, g, cpu_gemm::Input::F32(&b)) } else { None };
            // A and C in pooled buffers, as the model's tensors are: each starts on a 64-byte line.
            let mut a32 = host_pool::dirty(m * k);
            a32.copy_from_slice(&a);
            let mut c = host_pool::zeroed(m * n);
            let a16 = Tensor::from_cpu_as(a.clone(), &[m, k], DType::Bf16);
            let mut c16 = Tensor::from_cpu_as(vec![0.0; m * n], &[m, n], DType::Bf16);
            let [min, q1, med] = timed(3, runs, || {
                let (input, output) = match two_bytes {
                    true => (cpu_gemm::Input::Bf16(a16.cpu_bf16()), cpu_gemm::Output::Bf16(c16.cpu_bf16_mut())),
                    false => (cpu_gemm::Input::F32(&a32), cpu_gemm::Output::F32(&mut c, store)),
                };
                cpu_gemm::gemm_packed(
                    kernels,
                    precision,
                    g,
                    input,
                    cpu_gemm::Input::F32(&b),
                    packed.as_ref(),
                    None,
                    output,
                );
                Ok(())
            })?;
            let gflops = 2.0 * (m * k * n) as f64 / min / 1e6;
            println!(
                "gemm {m}x{k}x{n}, {}, C {}, B {}, path {path}, {threads} threads, {runs} runs: min {:.1} q25 {:.1} median {:.1} µs ({gflops:.0} GFLOP/s at the minimum)",
                precision.name(),
                match (store, two_bytes) {
                    (_, true) => "and A bf16 in 2 bytes",
                    (DType::Bf16, false) => "f32 rounded to bf16",
                    _ => "f32",
                },
                if packed.is_some() { "packed once" } else { "packed per call" },
                min * 1e3,
                q1 * 1e3,
                med * 1e3
            );
        }
        _ => return Err(usage()),
    }
    Ok(())
}
