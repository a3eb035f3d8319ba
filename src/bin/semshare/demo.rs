//! `semshare demo`: synthesize data, train the `small` model, evaluate it against the
//! untrained one.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::common::{device, progress_printer};
use semshare::cli::Args;
use semshare::config::fit_to_data;
use semshare::data::reader::DatasetReader;
use semshare::data::synth::{SynthConfig, SynthPreset, generate};
use semshare::data::writer::claim_dataset_output;
use semshare::eval::{EvalConfig, Report};
use semshare::inference::{evaluate_split, load_model};
use semshare::model::{EmbeddingKind, ModelConfig, SemShare};
use semshare::train::{RESOLVED_CONFIG, RunOptions, TrainConfig, check_run_dir, train};
use semshare::{Error, Result};

/// The file that makes a directory the demo's own: the next demo there replaces what the demo
/// wrote (`data/`, the checkpoints). A directory without it that holds anything is not the
/// demo's to write into, whatever semshare files it holds (a user's dataset or model).
const DEMO_MARK: &str = "semshare-demo.txt";
const DEMO_MARK_TEXT: &str =
    "written by `semshare demo`: the next demo into this directory replaces its data/ and checkpoints\n";

/// What the demo wrote before it marked its directory (at its default place only).
const UNMARKED_DEMO_OUTPUT: [&str; 4] = ["data", "best.safetensors", "last.safetensors", ".lock"];

/// Makes `out` the demo's (created and marked) when it is new or empty; takes it again when
/// marked, or when it is `default` and holds only what an earlier demo wrote there; refuses it
/// otherwise, before anything is written.
fn claim_demo_dir(out: &Path, default: bool) -> Result<()> {
    let entries: Vec<String> = match std::fs::read_dir(out) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(Error::io(out, e)),
        // A killed demo's temporaries are its own (the next write removes them).
        Ok(d) => d
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| !semshare::io::is_temp_name(name))
            .collect(),
    };
    let mark = out.join(DEMO_MARK);
    let marked = std::fs::symlink_metadata(&mark).is_ok_and(|m| m.is_file())
        && semshare::io::read_text(&mark, 4096).is_ok_and(|t| t == DEMO_MARK_TEXT);
    let earlier_default = default && entries.iter().all(|e| UNMARKED_DEMO_OUTPUT.contains(&e.as_str()));
    if !(entries.is_empty() || marked || earlier_default) {
        return Err(Error::refused(
            out,
            format!(
                "holds {} and is not marked as the demo's ({DEMO_MARK}); the demo writes into a new or empty directory or its own earlier one (choose another --out)",
                if entries.len() == 1 { "an entry".to_string() } else { format!("{} entries", entries.len()) }
            ),
        ));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    if !marked {
        semshare::io::atomic_write(&mark, DEMO_MARK_TEXT.as_bytes())?;
    }
    Ok(())
}

pub fn run(args: &Args) -> Result<()> {
    let mut dev = device(args)?;
    let seed = args.num("seed")?.unwrap_or(0);
    let default_out = std::env::temp_dir().join("semshare-demo");
    let out = args.get("out").map(PathBuf::from).unwrap_or_else(|| default_out.clone());
    let mut synth_cfg = SynthConfig::preset(SynthPreset::Balanced, seed);
    synth_cfg.train = args.num("train")?.unwrap_or(2000);
    synth_cfg.val = args.num("val")?.unwrap_or(300);
    synth_cfg.test = args.num("test")?.unwrap_or(1000);
    let steps = args.num("steps")?.unwrap_or(800);
    // The demo's own directory: its earlier output (data/, checkpoints) is replaced, checked
    // before a file is written; a `train` run's (which writes its configuration) is not.
    if out.join(RESOLVED_CONFIG).exists() {
        return Err(Error::refused(
            &out,
            format!(
                "holds a `semshare train` run ({RESOLVED_CONFIG}); the demo replaces only its own output (choose another --out)"
            ),
        ));
    }
    check_run_dir(&out, None, true)?;
    claim_demo_dir(&out, out == default_out)?;
    claim_dataset_output(&out.join("data"), true)?;
    eprintln!(
        "synthesizing {} / {} / {} images (balanced preset, seed {seed}) ...",
        synth_cfg.train, synth_cfg.val, synth_cfg.test
    );
    generate(&synth_cfg)?.save(out.join("data"))?;
    let data = Arc::new(DatasetReader::open(out.join("data"))?);
    let mut model = ModelConfig::small();
    fit_to_data(&mut model, &data.layout, &BTreeSet::new(), Path::new("the small preset"))?;
    let cfg = TrainConfig { steps, eval_every: 200, seed, warmup: 50, ..TrainConfig::default() };
    let eval_cfg = EvalConfig::default();
    let untrained = SemShare::new(&model)?;
    let init = untrained.store.upload(dev.as_mut(), &untrained.store.init_values(seed))?;
    let before = evaluate_split(dev.as_mut(), &untrained, &init, &data, "test", EmbeddingKind::Pooled, &eval_cfg)?;
    eprintln!("training the `small` model for {} steps of {} pairs on {} ...", cfg.steps, cfg.batch_size, dev.name());
    // The demo's own directory: its previous checkpoints are replaced.
    let opts = RunOptions { replace: true, progress: Some(progress_printer()), ..RunOptions::new(out.clone()) };
    let summary = train(dev.as_mut(), &data, &model, &cfg, &opts)?;
    let best = summary.best_checkpoint.clone().ok_or_else(|| Error::data("the demo run wrote no checkpoint"))?;
    let (net, params) = load_model(dev.as_mut(), &best)?;
    let after = evaluate_split(dev.as_mut(), &net, &params, &data, "test", EmbeddingKind::Pooled, &eval_cfg)?;
    println!(
        "\nsemshare demo: {} test images / {} texts, trained {} steps in {:.0}s",
        data.split("test")?.num_images(),
        data.split("test")?.num_texts(),
        summary.steps,
        summary.seconds
    );
    println!("{:<10}{:>12}{:>12}{:>12}{:>12}", "metric", "untrained", "trained", "I2T", "T2I");
    let row = |name: &str, f: &dyn Fn(&Report) -> f64, i2t: f64, t2i: f64| {
        println!("{name:<10}{:>12.2}{:>12.2}{:>12.2}{:>12.2}", f(&before), f(&after), i2t, t2i);
    };
    for k in [10, 100, 500] {
        let get = |r: &Report| r.avg.ndcg_at(k).unwrap_or(0.0);
        row(&format!("NDCG@{k}"), &get, after.i2t.ndcg_at(k).unwrap_or(0.0), after.t2i.ndcg_at(k).unwrap_or(0.0));
    }
    row("mAP@all", &|r: &Report| r.avg.map_all, after.i2t.map_all, after.t2i.map_all);
    for k in [1, 5, 10] {
        let get = |r: &Report| r.avg.recall_at(k).unwrap_or(0.0);
        row(&format!("R@{k}"), &get, after.i2t.recall_at(k).unwrap_or(0.0), after.t2i.recall_at(k).unwrap_or(0.0));
    }
    println!("(untrained/trained: average of I2T and T2I; best checkpoint: {})", best.display());
    Ok(())
}
