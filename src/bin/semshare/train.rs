//! `semshare train`: one training run into a run directory.

use std::path::{Path, PathBuf};

use crate::common::{configs, device_for, fit, load_data, progress_printer};
use crate::signals::{self, stop_on_signals};
use semshare::Result;
use semshare::cli::Args;
use semshare::defaults::resolve;
use semshare::io::refuse_overlap;
use semshare::train::{LAST_CHECKPOINT, RunOptions, TrainConfig, fresh_run_dir, train};

pub fn run(args: &Args) -> Result<()> {
    let data = load_data(args)?;
    let c = configs(args, TrainConfig::default())?;
    let mut dev = device_for(args, &c)?;
    // The variant's structure (trunk, separate models, segments) goes with it.
    let mut model = c.train.variant.configure(&c.model);
    fit(&mut model, &data.layout, &c, args)?;
    // What was not given is decided from the data, each choice with its reason.
    let resolved = resolve(&c, &model, &data)?;
    let (model, cfg) = (resolved.model.clone(), resolved.train.clone());
    let resume = args.get("resume").map(PathBuf::from);
    let (out_dir, fresh) = match args.get("out") {
        Some(out) => (PathBuf::from(out), false),
        // Resuming in place continues that run's directory; otherwise a new one, never
        // another run's.
        None => match resume.as_deref().and_then(Path::parent) {
            Some(dir) if !dir.as_os_str().is_empty() => (dir.to_path_buf(), false),
            _ => (fresh_run_dir(Path::new("runs"), &data.meta().name)?, true),
        },
    };
    refuse_overlap(&out_dir, &data.dir, "dataset (--data)")?;
    eprintln!("configuration for {} (given values kept):", data.meta().name);
    for line in resolved.lines() {
        eprintln!("  {line}");
    }
    let opts = RunOptions {
        out_dir,
        resume,
        replace: args.has("force"),
        progress: Some(progress_printer()),
        resolved_config: Some(resolved.to_json()),
        stop: Some(stop_on_signals()),
        identity: None,
    };
    let s = train(dev.as_mut(), &data, &model, &cfg, &opts).inspect_err(|_| {
        if fresh {
            // The new directory of a run refused before it claimed it: still empty.
            let _ = std::fs::remove_dir(&opts.out_dir);
        }
    })?;
    if s.stopped {
        let signal = signals::received();
        if s.losses.is_empty() {
            println!("stopped by {} before a step was trained: no checkpoint written", signals::name(signal));
        } else {
            let last = opts.out_dir.join(LAST_CHECKPOINT);
            println!(
                "stopped by {} at step {} of {}: {} holds it; the same options with --resume {} continue the run as if it had not stopped",
                signals::name(signal),
                s.steps,
                cfg.steps,
                last.display(),
                last.display()
            );
        }
        signals::end_by_now(signal);
    }
    if s.losses.is_empty() {
        let from = opts.resume.as_deref().unwrap_or(Path::new("the checkpoint"));
        if s.steps >= cfg.steps {
            println!(
                "{} is at step {} already, and --steps {} is the total: nothing trained, no checkpoint written (pass a larger --steps to continue)",
                from.display(),
                s.steps,
                cfg.steps
            );
        } else {
            println!(
                "{}: its run stopped early at step {}, {} validations without a better {} (patience {}): nothing trained, no checkpoint written (a larger \"patience\" in a --config file continues it)",
                from.display(),
                s.steps,
                cfg.patience,
                cfg.metric_name(),
                cfg.patience
            );
        }
        return Ok(());
    }
    let Some(best) = &s.best_checkpoint else {
        return Err(semshare::Error::data(format!("{}: no best checkpoint written", opts.out_dir.display())));
    };
    let with = s.best_embedding.map(|k| format!(" with the {} embedding", k.name())).unwrap_or_default();
    // A resumed run trained the steps after its checkpoint's.
    let here = s.losses.len() as u64;
    let trained = match s.steps - here {
        0 => format!("{here} steps"),
        from => format!("{here} steps ({from} → {})", s.steps),
    };
    println!(
        "trained {trained} in {:.1}s on {}: final loss {:.4}, best validation {} {:.2} at step {}{with} ({})",
        s.seconds,
        dev.name(),
        s.final_loss,
        cfg.metric_name(),
        s.best_score,
        s.best_step,
        best.display()
    );
    Ok(())
}
