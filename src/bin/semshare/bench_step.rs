//! `semshare bench-step`: training steps of a preset on synthetic batches of the benchmark's
//! shape (DESIGN.md §2: vocabulary 10,000, 24 labels, 1,600 object classes, every image with
//! R regions and every text with T tokens). After the warm-up it prints one JSON line per
//! configuration: wall milliseconds per step and, with `--counts`, what one step launches,
//! waits for, allocates and uploads, as the backend's host code counts them (the same on the
//! emulated device as on a GPU). The measured steps are deferred (`Trainer::step_deferred`):
//! the counts are those of steps between two log points; `ms_per_step` includes the one read
//! after them. With `--graph` the steps are captured once per shape and replayed, as the
//! trainer takes them on CUDA (a shape is captured the second time it comes: give the warm-up
//! enough steps to see each masked-row bucket twice); without it every step runs eagerly.
//! With `--embed` a step is an embedding pass instead, as a loaded model runs it (weights
//! frozen, the trunk's bf16 copy made once): the batch's images, then its texts, pooled; the
//! line gives milliseconds per pass and items per second, and `--counts` the pass's counts.

use crate::common::device;
use semshare::backend::{Backend, Counters, Half};
use semshare::cli::Args;
use semshare::model::{Batch, EmbeddingKind, ImageBatch, ModelConfig, SemShare, TextBatch};
use semshare::nn::Weights;
use semshare::rng::Rng;
use semshare::train::{StepMode, TrainConfig, Trainer};
use semshare::{Error, Result};

pub fn run(args: &Args) -> Result<()> {
    let preset = args.get("model").unwrap_or("small");
    let base = ModelConfig::preset(preset)?;
    let model = ModelConfig { vocab: 10_000, object_classes: 1600, labels: 24, ..base };
    let paper = preset == "paper";
    let batch: usize = args.num("batch")?.unwrap_or(if paper { 128 } else { 32 });
    let tokens: usize = args.num("tokens")?.unwrap_or(if paper { 32 } else { model.max_tokens });
    let warmup: u64 = args.num("warmup")?.unwrap_or(2);
    let steps: u64 = args.num("steps")?.unwrap_or(3);
    if batch == 0 || steps == 0 {
        return Err(Error::config("bench-step: --batch and --steps must be positive"));
    }
    // A benchmark's steps, not a training run's: bounded so that a typo does not run for days.
    const MOST_STEPS: u64 = 100_000;
    if steps > MOST_STEPS || warmup > MOST_STEPS {
        return Err(Error::config(format!("bench-step: --steps and --warmup are at most {MOST_STEPS}")));
    }
    if tokens == 0 || tokens > model.max_tokens.max(32) {
        return Err(Error::config(format!("bench-step: --tokens {tokens} is not in 1..={}", model.max_tokens.max(32))));
    }
    let half = match args.get("feature-dtype").unwrap_or("f32") {
        "f32" => None,
        "f16" => Some(Half::F16),
        "bf16" => Some(Half::Bf16),
        other => return Err(Error::config(format!("bench-step: --feature-dtype {other}: expected f32, f16 or bf16"))),
    };
    let mut dev = device(args)?;
    if args.has("counts") && dev.counters().is_none() {
        return Err(Error::config(format!(
            "bench-step: --counts needs a device that counts its launches (--device cuda), not `{}`",
            dev.name()
        )));
    }
    let graph = args.has("graph");
    if graph && !dev.captures_graphs() {
        return Err(Error::config(format!(
            "bench-step: --graph needs a device that captures graphs (--device cuda), not `{}`",
            dev.name()
        )));
    }
    let model = ModelConfig { max_tokens: model.max_tokens.max(tokens), ..model };
    let regions = model.max_regions;
    let batch_of = |step: u64| {
        let mut rng = Rng::derive(0xBE7C, step);
        let mut images =
            ImageBatch::random(&mut rng, &vec![regions; batch], model.region_dim, model.object_classes, 24);
        if let Some(h) = half {
            images.features = images.features.to_half(h);
        }
        let texts = TextBatch::random(&mut rng, &vec![tokens; batch], model.vocab, 24);
        (images, texts)
    };
    let shape = format!(
        "\"model\": \"{preset}\", \"device\": \"{}\", \"batch\": {batch}, \"regions\": {regions}, \"tokens\": {tokens}, \"features\": \"{}\"",
        dev.name(),
        half.map_or("f32", Half::name)
    );
    if args.has("embed") {
        if graph {
            return Err(Error::config(
                "bench-step: --graph captures training steps; --embed times embedding passes, taken eagerly",
            ));
        }
        return embed(dev.as_mut(), &model, batch, (warmup, steps), batch_of, &shape, args.has("counts"));
    }
    let cfg = TrainConfig { batch_size: batch, steps: warmup + steps, warmup: 1, ..TrainConfig::default() };
    let mut trainer = Trainer::new(dev.as_mut(), &model, cfg)?;
    trainer.set_step_mode(if graph { StepMode::Captured } else { StepMode::Eager }, dev.as_ref());
    for s in 0..warmup {
        let (i, t) = batch_of(s);
        trainer.step(dev.as_mut(), i, t)?;
    }
    let batches: Vec<_> = (warmup..warmup + steps).map(batch_of).collect();
    // The measured steps are the steps between two log points: deferred, their stats read
    // once after the count (the read is the log point's one sync).
    let before = dev.counters().unwrap_or_default();
    let start = std::time::Instant::now();
    for (i, t) in batches {
        trainer.step_deferred(dev.as_mut(), i, t)?;
    }
    let after = dev.counters().unwrap_or_default();
    let stats = trainer.read_stats(dev.as_mut())?;
    let seconds = start.elapsed().as_secs_f64();
    if stats.len() as u64 != steps {
        return Err(Error::Device { what: format!("bench-step: {} stats for {steps} steps", stats.len()) });
    }
    let mut line = format!("{{{shape}, \"steps\": {steps}, \"ms_per_step\": {:.3}", seconds * 1e3 / steps as f64);
    if args.has("counts") {
        line += &per_step(&after.since(&before), steps);
    }
    if graph {
        let (held, bytes) = trainer.graphs_held();
        line += &format!(", \"graphs_held\": {held}, \"graph_mib\": {:.1}", bytes as f64 / (1 << 20) as f64);
        if let Some(why) = trainer.graphs_refused() {
            return Err(Error::Device { what: format!("bench-step: a capture failed: {why}") });
        }
    }
    println!("{line}, \"graph\": {graph}}}");
    Ok(())
}

/// `passes.1` embedding passes after `passes.0` untimed ones, each the batch's images then its
/// texts (pooled), as a loaded model embeds: its parameters frozen and the trunk's bf16 copy
/// made once. Timed to the last pass's embeddings downloaded (on a GPU the host runs ahead).
fn embed(
    dev: &mut dyn Backend,
    model: &ModelConfig,
    batch: usize,
    (warmup, passes): (u64, u64),
    batch_of: impl Fn(u64) -> (ImageBatch, TextBatch),
    shape: &str,
    counts: bool,
) -> Result<()> {
    let net = SemShare::new(model)?;
    semshare::model::memory::check_memory(dev, &net, batch, false)?;
    let w = net.store.upload(dev, &net.store.init_values(0))?;
    let w = dev.freeze(w)?;
    let copy = net.bf16_weights(dev, &w)?;
    let weights = Weights { values: &w, bf16: copy.as_ref() };
    let pass = |dev: &mut dyn Backend, (i, t): (ImageBatch, TextBatch)| -> Result<[semshare::tensor::Tensor; 2]> {
        Ok([
            net.embed(dev, weights, &Batch::Image(i), EmbeddingKind::Pooled)?,
            net.embed(dev, weights, &Batch::Text(t), EmbeddingKind::Pooled)?,
        ])
    };
    // Each pass's embeddings live until the next pass has run, as `embed_split` keeps a chunk's
    // until the next is queued; the device's pool grows to hold both over the first few passes
    // (4 at a small batch on the emulated device), so steady counts need that much warm-up.
    let mut held = None;
    for s in 0..warmup {
        held = Some(pass(dev, batch_of(s))?);
    }
    for e in held.iter().flatten() {
        dev.download(e.view())?; // the device idle before the clock starts
    }
    let batches: Vec<_> = (warmup..warmup + passes).map(batch_of).collect();
    let before = dev.counters().unwrap_or_default();
    let start = std::time::Instant::now();
    for b in batches {
        held = Some(pass(dev, b)?);
    }
    let after = dev.counters().unwrap_or_default();
    for e in held.iter().flatten() {
        dev.download(e.view())?;
    }
    let ms = start.elapsed().as_secs_f64() * 1e3 / passes as f64;
    let mut line = format!(
        "{{{shape}, \"embed\": true, \"passes\": {passes}, \"ms_per_pass\": {ms:.3}, \"items_per_s\": {:.0}",
        2.0 * batch as f64 / (ms / 1e3)
    );
    if counts {
        line += &per_step(&after.since(&before), passes);
    }
    println!("{line}}}");
    Ok(())
}

/// The counts of `steps` steps as per-step JSON fields (a fraction where they differ per step).
fn per_step(c: &Counters, steps: u64) -> String {
    let f = |v: u64| {
        let x = v as f64 / steps as f64;
        if x.fract() == 0.0 { format!("{x}") } else { format!("{x:.2}") }
    };
    format!(
        ", \"launches_per_step\": {}, \"graph_launches_per_step\": {}, \"kernels_per_step\": {}, \"blas_per_step\": {}, \"copies_per_step\": {}, \"syncs_per_step\": {}, \"allocs_per_step\": {}, \"upload_bytes_per_step\": {}",
        f(c.launches()),
        f(c.graphs),
        f(c.kernels),
        f(c.blas_calls),
        f(c.copies),
        f(c.syncs),
        f(c.allocs),
        f(c.upload_bytes)
    )
}
