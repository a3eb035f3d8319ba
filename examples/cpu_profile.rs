//! Time by op of the full-length `small` training step and embedding on the CPU (issue 17
//! item 4), the configuration of `cargo bench --bench cpu`: batch 32, every image 36 regions,
//! every text 24 tokens.
//!
//!     cargo run --release --example cpu_profile [steps] [fp32|bf16]
//!
//! Prints, for the train step and for embedding 32 images + 32 texts, markdown tables of the
//! time per step by kind of op, by op, and of the GEMMs by shape, after two untimed warm-up
//! steps. The op timer (backend/cpu/profile.rs)
//! measures each backend call's wall time; what the model does between calls is not in it.

use semshare::backend::cpu::{Cpu, dispatch, profile};
use semshare::backend::{Backend, Precision};
use semshare::model::{Batch, EmbeddingKind, ImageBatch, ModelConfig, SemShare, TextBatch};
use semshare::rng::Rng;
use semshare::train::{TrainConfig, Trainer};

const BATCH: usize = 32;

fn main() -> semshare::Result<()> {
    let steps: usize = match std::env::args().nth(1) {
        Some(s) => s.parse().map_err(|_| semshare::Error::config(format!("steps: `{s}` is not a count")))?,
        None => 10,
    };
    let precision = Precision::parse(std::env::args().nth(2).as_deref().unwrap_or("fp32"))?;
    profile::enable();
    let cfg = ModelConfig { vocab: 2000, object_classes: 100, labels: 24, ..ModelConfig::small() };
    let mut rng = Rng::new(1);
    let ib = ImageBatch::random(&mut rng, &[cfg.max_regions; BATCH], cfg.region_dim, cfg.object_classes, cfg.labels);
    let tb = TextBatch::random(&mut rng, &[cfg.max_tokens; BATCH], cfg.vocab, cfg.labels);
    let mut dev = Cpu::with_precision(precision)?;
    println!(
        "CPU path: {}, {}; {} rayon threads; {steps} steps timed\n",
        dispatch::active()?.describe(),
        precision.name(),
        rayon::current_num_threads()
    );

    let mut trainer = Trainer::new(&mut dev, &cfg, TrainConfig::default())?;
    for _ in 0..2 {
        trainer.step(&mut dev, ib.clone(), tb.clone())?;
    }
    profile::reset();
    let t0 = std::time::Instant::now();
    for _ in 0..steps {
        trainer.step(&mut dev, ib.clone(), tb.clone())?;
    }
    let wall = t0.elapsed().as_secs_f64() * 1e3 / steps as f64;
    println!("## train step, full lengths: {wall:.1} ms per step (wall)\n\n{}", profile::table(steps));

    let net = SemShare::new(&cfg)?;
    // Frozen, as inference's weights are (`inference::upload_model`): packed once.
    let w = net.store.upload(&mut dev, &net.store.init_values(0))?;
    let w = dev.freeze(w)?;
    let (ib, tb) = (Batch::Image(ib), Batch::Text(tb));
    let embed = |dev: &mut Cpu| -> semshare::Result<()> {
        net.embed(dev, &w, &ib, EmbeddingKind::Pooled)?;
        net.embed(dev, &w, &tb, EmbeddingKind::Pooled)?;
        Ok(())
    };
    for _ in 0..2 {
        embed(&mut dev)?;
    }
    profile::reset();
    let t0 = std::time::Instant::now();
    for _ in 0..steps {
        embed(&mut dev)?;
    }
    let wall = t0.elapsed().as_secs_f64() * 1e3 / steps as f64;
    println!("## embed 32 images + 32 texts, full lengths: {wall:.1} ms (wall)\n\n{}", profile::table(steps));
    Ok(())
}
