//! `semshare experiment`: a suite of docs/EXPERIMENTS-DESIGN.md, resumed where it stopped.

use std::path::{Path, PathBuf};

use crate::common::{configs, device_for, fit, load_data, progress_printer};
use crate::signals::{self, stop_on_signals};
use semshare::cli::Args;
use semshare::experiment::run::{ExperimentConfig, build_suite, default_budget, run_suite, state_path, suite_name};
use semshare::experiment::state::check_out_dir;
use semshare::experiment::suite::{SuiteKind, SuiteState};
use semshare::io::refuse_overlap;
use semshare::model::Variant;
use semshare::{Error, Result};

pub fn run(args: &Args) -> Result<()> {
    let suite: SuiteKind = args.need("suite")?.parse()?;
    let seeds: u64 = args.num("seeds")?.unwrap_or(3);
    if seeds == 0 {
        return Err(Error::config("--seeds must be positive"));
    }
    let only_seed: Option<u64> = args.num("seed")?;
    if only_seed.is_some() && args.has("seeds") {
        return Err(Error::config("--seed K runs one seed: it does not go with --seeds"));
    }
    let variants = match args.get("variants") {
        Some(list) => Some(list.split(',').map(|v| v.trim().parse::<Variant>()).collect::<Result<Vec<_>>>()?),
        None => None,
    };
    let data = load_data(args)?;
    let c = configs(args, default_budget())?;
    let (mut model, train) = (c.model.clone(), c.train.clone());
    fit(&mut model, &data.layout, &c, args)?;
    let dataset = data.meta().name.clone();
    let cfg = ExperimentConfig {
        suite,
        seeds,
        only_seed,
        variants,
        model,
        train,
        out: args.get("out").map_or_else(|| Path::new("docs/results").join(&dataset), PathBuf::from),
        runs_dir: args.get("runs").map_or_else(|| Path::new("runs/experiments").join(&dataset), PathBuf::from),
        progress: Some(progress_printer()),
        stop: None,
    };
    check_out_dir(&cfg.out)?;
    refuse_overlap(&cfg.out, &data.dir, "dataset (--data)")?;
    refuse_overlap(&cfg.runs_dir, &data.dir, "dataset (--data)")?;
    // A bad --variants or another suite's state file is refused before anything is printed.
    SuiteState::open(&state_path(&cfg.out, suite), &build_suite(&data, &cfg)?)?;
    let mut dev = device_for(args, &c)?;
    let seed_text = only_seed.map_or_else(|| format!("{seeds} seed(s)"), |k| format!("seed {k}"));
    eprintln!(
        "experiment {} on {dataset} ({seed_text}, {} steps per run) on {}; results in {}",
        suite_name(suite),
        cfg.train.steps,
        dev.name(),
        cfg.out.display()
    );
    let stop = stop_on_signals();
    let cfg = ExperimentConfig { stop: Some(stop.clone()), ..cfg };
    let state = run_suite(dev.as_mut(), &data, &cfg)?;
    let (done, total) = state.progress();
    // With --seed K, the runs of the other seeds are not this command's to finish.
    if state.remaining().iter().any(|k| only_seed.is_none_or(|s| k.seed == s)) {
        signals::end_if_stopped(&stop, || {
            format!(
                "{done}/{total} runs finished; the same command continues the suite (a run in progress from its last checkpoint, to the same result)"
            )
        });
    }
    let files = match suite {
        SuiteKind::Table1 => "table1.md, table1.json",
        SuiteKind::Eta => "figure1.svg, eta.md, eta.json",
    };
    println!(
        "{done}/{total} runs finished; wrote {files} and {} in {}",
        state_path(&cfg.out, suite).file_name().and_then(|n| n.to_str()).unwrap_or(""),
        cfg.out.display()
    );
    signals::end_if_stopped(&stop, || "the suite was finished by then".into());
    Ok(())
}
