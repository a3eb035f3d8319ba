//! `semshare tune`: successive halving over the hyper-parameters on the validation split
//! (`semshare::experiment::tune`), resumed where a killed one stopped.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::common::{configs, fit, load_data};
use crate::signals::{self, stop_on_signals};
use semshare::cli::Args;
use semshare::defaults::resolve;
use semshare::experiment::state::check_out_dir;
use semshare::experiment::tune::{TuneConfig, build_plan, default_rungs, run_tune, state_path};
use semshare::io::refuse_overlap;
use semshare::train::TrainConfig;
use semshare::{Error, Result};

pub fn run(args: &Args) -> Result<()> {
    let data = load_data(args)?;
    let c = configs(args, TrainConfig::default())?;
    let mut model = c.model.clone();
    fit(&mut model, &data.layout, &c, args)?;
    // The base every trial starts from: what `train` would resolve from the data (input
    // normalisation, validation score and embedding, λ when there is nothing to predict).
    let resolved = resolve(&c, &model, &data)?;
    // Printed once the options are known to be usable: a refusal is then the last line.
    let base: Vec<String> = resolved.lines().iter().map(|l| format!("  {l}")).collect();
    let trials = args.num("trials")?.unwrap_or(27);
    let reduction = args.num("reduction")?.unwrap_or(3);
    // One epoch of the training split at the base batch, at least 50 steps.
    let epoch = data.split("train")?.num_images().div_ceil(c.train.batch_size.max(1)) as u64;
    let dataset = data.meta().name.clone();
    let device = args.get("device").unwrap_or("cpu").to_string();
    let out = args.get("out").map_or_else(|| Path::new("runs/tune").join(&dataset), PathBuf::from);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Trials on the CPU share its cores; a GPU trains one at a time. `auto` is whichever it opens.
    let on_cpu = semshare::backend::open(&device)?.on_host();
    let cfg = TuneConfig {
        model: resolved.model,
        train: resolved.train,
        trials,
        min_steps: args.num("min-steps")?.unwrap_or(epoch.max(50)),
        reduction,
        rungs: args.num("rungs")?.unwrap_or_else(|| default_rungs(trials, reduction)),
        repeats: args.num("repeats")?.unwrap_or(3),
        seed: args.num("seed")?.unwrap_or(0),
        workers: args.num("workers")?.unwrap_or(if on_cpu { cores } else { 1 }),
        device,
        runs_dir: args.get("runs").map_or_else(|| out.join("trials"), PathBuf::from),
        out,
        stop: None,
    };
    if cfg.workers == 0 {
        return Err(Error::config("--workers must be positive"));
    }
    check_out_dir(&cfg.out)?;
    refuse_overlap(&cfg.out, &data.dir, "dataset (--data)")?;
    refuse_overlap(&cfg.runs_dir, &data.dir, "dataset (--data)")?;
    let plan = build_plan(&data, &cfg)?;
    eprintln!("base configuration for {dataset} (given values kept; the search sets its own):\n{}", base.join("\n"));
    eprintln!(
        "tune on {dataset}: {} trials, {} rungs of {} steps (η = {}), {} worker(s) on {}; budget {} steps; results in {}",
        cfg.trials,
        cfg.rungs,
        (0..cfg.rungs).map(|r| plan.steps(r).to_string()).collect::<Vec<_>>().join("/"),
        cfg.reduction,
        cfg.workers,
        cfg.device,
        plan.budget(),
        cfg.out.display()
    );
    // Lines from several workers: one at a time.
    let stderr = Mutex::new(());
    let progress = |line: &str| {
        let _one = stderr.lock();
        eprintln!("{line}");
    };
    let stop = stop_on_signals();
    let cfg = TuneConfig { stop: Some(stop.clone()), ..cfg };
    let state = run_tune(&data, &cfg, &progress)?;
    let (done, total) = state.progress();
    if done < total {
        signals::end_if_stopped(&stop, || {
            format!(
                "{done}/{total} training runs finished; the same command continues the tune (a trial in progress from its last checkpoint, to the same result)"
            )
        });
    }
    println!(
        "{done}/{total} training runs finished; wrote trials.md, best-config.json and {} in {}",
        state_path(&cfg.out).file_name().and_then(|n| n.to_str()).unwrap_or(""),
        cfg.out.display()
    );
    signals::end_if_stopped(&stop, || "the tune was finished by then".into());
    Ok(())
}
