//! The `semshare` command line: a dispatcher over one file per command (demo, synth, pack,
//! check, train, eval, embed, score, experiment); the commands are thin glue over the library.

mod check;
mod common;
mod demo;
mod embed;
mod eval;
mod experiment;
mod pack;
mod score;
mod synth;
mod train;

use std::process::ExitCode;

use semshare::cli::Args;
use semshare::{Error, Result};

const USAGE: &str = "\
semshare — label-wise cross-modal retrieval by semantic sharing (Yang et al., IJCAI 2021)

USAGE: semshare <COMMAND> [OPTIONS]

COMMANDS:
  demo     synthesize data, train, evaluate; prints the trained model against the untrained one
             [--steps N] [--out DIR] [--seed S] [--device D]
             [--train N] [--val N] [--test N]   (defaults 2000 / 300 / 1000)
  synth    write a synthetic dataset
             --out DIR [--preset balanced|weak-image|weak-text] [--seed S]
             [--train N] [--val N] [--test N] [--force]
           or real MIRFlickr-25K labels and tag texts with synthetic regions
             --preset flickr-tags --labels DIR --out DIR [--seed S] [--format dataset|source]
             [--train N] [--val N] [--test N] [--force]  (defaults 10000 / 1000 / 2000 queries)
             --format source writes a source directory for `pack`, retrieval set included
  pack     build a dataset directory from a source directory (docs/FORMAT.md)
             --from SRC --out DIR [--shard-mb N (default 256)] [--force]
  check    validate a dataset directory completely (checksums, every item); exit 1 on a problem
             DIR
  train    train on a dataset directory
             --data DIR [--out DIR (default: a new runs/<dataset>-<k>)] [--config FILE.json]
             [--model small|paper] [--steps N] [--batch N] [--lr X] [--lambda X] [--seed S]
             [--resume CKPT] [--force] [--device D]
             --steps is the total: --resume continues CKPT's run up to it (nothing to do if
             CKPT is there already); --force replaces another run's checkpoints in --out
  eval     retrieval metrics of a checkpoint on a split
             --data DIR --checkpoint CKPT [--split test|val|train|database]
             (test with a database split: test queries ranked against the database) [--embedding pooled|label] [--json] [--device D]
  embed    write the embeddings of a split (the input of `score`)
             --data DIR --checkpoint CKPT --out FILE [--split S] [--embedding E] [--force] [--device D]
  score    metrics for embeddings produced by any model
             --embeddings FILE [--json]
  experiment  run a suite of docs/EXPERIMENTS-DESIGN.md (resumes where a killed one stopped)
             --suite table1|eta --data DIR [--seeds N (default 3) | --seed K] [--variants a,b,...]
             [--model small|paper] [--config FILE.json] [--steps N] [--device D]
             [--out DIR (default docs/results/<dataset>)] [--runs DIR (default runs/experiments/<dataset>)]
             budget per run unless the config file or --steps say otherwise: batch 32, 600 steps,
             warm-up 60, lr 5e-4, validation every 100 steps, patience 3
             --seed K runs seed K alone (adding it to the suite's state file)

  An existing output is replaced only with --force and only if semshare wrote it (its
  manifest says so); an output may not be one of the command's inputs.

  --device auto|cpu|cuda   (default auto: CUDA when built with it and a GPU is present)
  A config file is JSON: {\"model\": {...}, \"train\": {...}}; flags override it.
";

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    match run(&argv) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(argv: &[String]) -> Result<()> {
    let Some((cmd, rest)) = argv.split_first() else {
        print!("{USAGE}");
        return Ok(());
    };
    match cmd.as_str() {
        "demo" => demo::run(&Args::parse(rest, &["steps", "out", "seed", "device", "train", "val", "test"], &[])?),
        "synth" => synth::run(&Args::parse(
            rest,
            &["out", "preset", "seed", "train", "val", "test", "labels", "format"],
            &["force"],
        )?),
        "pack" => pack::run(&Args::parse(rest, &["from", "out", "shard-mb"], &["force"])?),
        "check" => check::run(rest),
        "train" => train::run(&Args::parse(
            rest,
            &["data", "out", "config", "model", "steps", "batch", "lr", "lambda", "seed", "resume", "device"],
            &["force"],
        )?),
        "eval" => eval::run(&Args::parse(rest, &["data", "checkpoint", "split", "embedding", "device"], &["json"])?),
        "embed" => {
            embed::run(&Args::parse(rest, &["data", "checkpoint", "out", "split", "embedding", "device"], &["force"])?)
        }
        "score" => score::run(&Args::parse(rest, &["embeddings"], &["json"])?),
        "experiment" => experiment::run(&Args::parse(
            rest,
            &["suite", "data", "seeds", "seed", "variants", "model", "config", "out", "runs", "steps", "device"],
            &[],
        )?),
        "help" | "--help" | "-h" => {
            print!("{USAGE}");
            Ok(())
        }
        other => Err(Error::config(format!("unknown command `{other}` (try `semshare help`)"))),
    }
}
