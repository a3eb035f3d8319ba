//! The `semshare` command line: a dispatcher over one file per command (demo, synth, pack,
//! check, train, eval, embed, score, index, query, export, experiment, tune, bench-step); the
//! commands are thin glue over the library.

// The std print macros panic when stdout or stderr is closed (`semshare demo 2>&1 | head -1`
// ended the run with exit 101): these drop the text and let the command go on (its files are
// its work). Defined before the modules, so every command's printing is these.
macro_rules! write_or_drop {
    ($stream:ident, $how:ident, $($t:tt)*) => {{
        use std::io::Write as _;
        let _ = $how!(std::io::$stream(), $($t)*);
    }};
}
macro_rules! print { ($($t:tt)*) => { write_or_drop!(stdout, write, $($t)*) }; }
macro_rules! println { ($($t:tt)*) => { write_or_drop!(stdout, writeln, $($t)*) }; }
macro_rules! eprint { ($($t:tt)*) => { write_or_drop!(stderr, write, $($t)*) }; }
macro_rules! eprintln { ($($t:tt)*) => { write_or_drop!(stderr, writeln, $($t)*) }; }

mod bench_step;
mod check;
mod common;
mod demo;
mod embed;
mod eval;
mod experiment;
mod export;
mod index;
mod pack;
mod query;
mod score;
mod signals;
mod synth;
mod train;
mod tune;

use std::process::ExitCode;

use semshare::cli::{self, Args};
use semshare::{Error, Result};

/// What `semshare` and `semshare help` print above the commands.
const HEADER: &str = "\
semshare — label-wise cross-modal retrieval by semantic sharing (Yang et al., IJCAI 2021)

USAGE: semshare <COMMAND> [OPTIONS]
       semshare help <COMMAND>   (or semshare <COMMAND> --help): one command's usage
       semshare --version

COMMANDS:
";

/// How a command takes its arguments.
enum Takes {
    /// `--flag value` options and `--switch`es, those [`cli::options`] gives the command,
    /// parsed by [`Args`].
    Flags(fn(&Args) -> Result<()>),
    /// One directory, no options.
    Dir(fn(&str) -> Result<()>),
}

/// One command: its name, its part of the usage text (the one source of both `semshare help`
/// and `semshare help CMD`), and what it takes.
struct Command {
    name: &'static str,
    /// What it does, then its options, indented as in the full usage.
    usage: &'static str,
    takes: Takes,
}

const COMMANDS: &[Command] = &[
    Command {
        name: "demo",
        usage: "  demo     synthesize data, train, evaluate; prints the trained model against the untrained one
             [--steps N (default 800)] [--out DIR (default <temp dir>/semshare-demo)] [--seed S (default 0)]
             [--device D] [--precision P] [--train N] [--val N] [--test N]   (defaults 2000 / 300 / 1000)
             --out: a new or empty directory, or one an earlier demo wrote (its semshare-demo.txt)
",
        takes: Takes::Flags(demo::run),
    },
    Command {
        name: "synth",
        usage: "  synth    write a synthetic dataset
             --out DIR [--preset balanced|weak-image|weak-text (default balanced)] [--seed S (default 0)]
             [--train N] [--val N] [--test N] [--force]   (defaults 4000 / 500 / 1000)
           or real MIRFlickr-25K labels and tag texts with synthetic regions
             --preset flickr-tags --labels DIR --out DIR [--seed S] [--format dataset|source]
             [--train N] [--val N] [--test N] [--force]  (defaults 10000 / 1000 / 2000 queries)
             --format source writes a source directory for `pack`, retrieval set included
",
        takes: Takes::Flags(synth::run),
    },
    Command {
        name: "pack",
        usage: "  pack     build a dataset directory from a source directory (docs/FORMAT.md)
             --from SRC --out DIR [--shard-mb N (default 256)] [--force]
",
        takes: Takes::Flags(pack::run),
    },
    Command {
        name: "check",
        usage: "  check    validate a dataset directory completely (checksums, every item); exit 1 on a problem
             DIR
",
        takes: Takes::Dir(check::run),
    },
    Command {
        name: "train",
        usage: "  train    train on a dataset directory
             --data DIR [--out DIR (default: a new runs/<dataset>-<k>)] [--config FILE.json]
             [--model small|paper] [--steps N] [--batch N (default 32)] [--lr X (peak, default 5e-4)]
             [--lambda X (weight of the context loss L2: L = L1 + λ·L2)] [--seed S (default 0)]
             [--resume CKPT] [--force] [--device D] [--precision P]
             --steps is the total: --resume continues CKPT's run up to it (nothing to do if
             CKPT is there already, or its run stopped early with this patience: a larger
             \"patience\" in a --config file continues it); --force replaces another run's
             checkpoints in --out
             What no flag or config key gives is decided from the data (normalisation, step
             cap and early stopping by epochs, context loss, validation score, embedding),
             printed with a reason each and written to --out as resolved-config.json
             Ctrl-C (SIGINT) or SIGTERM stops it after the step under way and writes
             last.safetensors there, to --resume from, then ends by it; a second one at once
",
        takes: Takes::Flags(train::run),
    },
    Command {
        name: "eval",
        usage: "  eval     retrieval metrics of a checkpoint on a split
             --data DIR --checkpoint CKPT [--split test|val|train|database]
             (test with a database split: test queries ranked against the database) [--embedding pooled|label] [--json] [--device D] [--precision P]
",
        takes: Takes::Flags(eval::run),
    },
    Command {
        name: "embed",
        usage: "  embed    write the L2-normalised embeddings of a split (the input of `score`)
             --data DIR --checkpoint CKPT --out FILE [--split S (default test)]
             [--embedding pooled|label (default: the one the checkpoint was selected with)]
             [--force] [--device D] [--precision P]
",
        takes: Takes::Flags(embed::run),
    },
    Command {
        name: "score",
        usage: "  score    metrics for embeddings produced by any model
             --embeddings FILE [--json]
             without `text.item` and with more (or fewer) texts than images, nothing pairs them:
             the label metrics only, R@K left out (absent from --json)
",
        takes: Takes::Flags(score::run),
    },
    Command {
        name: "index",
        usage: "  index    build a gallery index (normalised embeddings, ids, labels if any, the model's fingerprint)
             --checkpoint CKPT --out INDEX and one source:
               --data DIR [--split S (default test)] [--side image|text]   a split; ids split/i, split/text/j
               --texts FILE                  one text per line (unlabelled)
               --features F.npy [--side image|text (default image)]   float32 [N, S, D] or [N, D]
                                             segment features of the model's width for that side
                                             (unlabelled; trailing all-zero segments are padding)
             or raw vectors, no model (only `query --vectors` searches them):
               --vectors V.npy               float32 [N, D], normalised here
             [--ids FILE (one per line; default FILE-stem/i)] [--embedding pooled|label]
             [--append (add to INDEX: same model and embedding, new ids)] [--force] [--device D] [--precision P]
",
        takes: Takes::Flags(index::run),
    },
    Command {
        name: "query",
        usage: "  query    the top-k items of an index, best first (ties to the earlier item)
             --index INDEX --checkpoint CKPT (the model that built it) and queries:
               --text \"...\" (repeatable) and/or --queries FILE (one text per line)
               --features Q.npy [--side image|text]   segment features, as for `index`
             or pre-computed query vectors (inner product, as given; CKPT optional):
               --vectors Q.npy               float32 [Q, D]
             [--k N (default 10)] [--json (one {\"query\", \"results\": [{\"id\", \"score\"}]} per line)] [--device D] [--precision P]
             [--timing (stderr: time to open the index, to search, in all)]
",
        takes: Takes::Flags(query::run),
    },
    Command {
        name: "export",
        usage: "  export   an index's vectors for FAISS, hnswlib, USearch or a vector database
             --index INDEX --format npy|jsonl --out PATH [--force]
             npy: PATH holds float32 [N, D] (.npy v1), PATH.ids.txt (for X.npy: X.ids.txt) the ids;
             jsonl: one {\"id\", \"vector\", \"payload\": {\"labels\": [...]}} per line (Qdrant, Milvus);
             PATH.export.json lists what it wrote: --force replaces only files listed there as they are
",
        takes: Takes::Flags(export::run),
    },
    Command {
        name: "experiment",
        usage: "  experiment  run a suite of docs/EXPERIMENTS-DESIGN.md (resumable)
             --suite table1|eta --data DIR [--seeds N (default 3) | --seed K]
             [--variants a,b,... (default: the suite's; of ours, ours+con, imc, st, wo-r, wo-t, wo-c,
             wo-l, dscmr, cca, ridge, linear)]
             [--model small|paper] [--config FILE.json] [--steps N] [--device D] [--precision P]
             [--out DIR (default docs/results/<dataset>)] [--runs DIR (default runs/experiments/<dataset>)]
             budget per run unless the config file or --steps say otherwise: batch 32, 600 steps,
             warm-up 60, lr 5e-4, validation every 100 steps, patience 3
             --seed K runs seed K alone (adding it to the suite's state file)
             stopped (Ctrl-C, SIGTERM: after the step under way) or killed, the same command
             continues it: finished runs kept, the run in progress from its last checkpoint
",
        takes: Takes::Flags(experiment::run),
    },
    Command {
        name: "tune",
        usage: "  tune     search hyper-parameters on the validation split by successive halving (resumable)
             --data DIR [--trials N (default 27)] [--reduction η (default 3)]
             [--rungs N (default: until one trial is left)]
             [--min-steps N (default one epoch, at least 50)] [--repeats N (default 3)]
             [--seed S (default 0)] [--workers N (default: the cores on the CPU, 1 on a GPU)]
             [--model small|paper] [--config FILE.json] [--device D (default cpu)] [--precision P]
             [--out DIR (default runs/tune/<dataset>)] [--runs DIR (default <out>/trials)]
             searches lr, weight decay, dropout, λ, warm-up, batch size, width and depth; trial 0
             is the data-aware defaults; rung r trains the best n/η^r trials for min-steps·η^r
             steps, repeats times (seeds) at the later rungs that still choose, ranked by the
             mean; writes trials.md (every trial) and best-config.json (for `train --config`)
             stopped (Ctrl-C, SIGTERM: after the step under way) or killed, the same command
             continues it: finished trials kept, those in progress from their last checkpoints
",
        takes: Takes::Flags(tune::run),
    },
    Command {
        name: "bench-step",
        usage: "  bench-step  time training steps on synthetic batches of the benchmark's shape; one JSON line
             [--model small|paper] [--device D] [--precision P] [--batch N (small 32, paper 128)]
             [--tokens T (small 24, paper 32)]
             [--warmup N (default 2)] [--steps N (default 3)] [--feature-dtype f32|f16|bf16] [--counts] [--graph]
             [--embed]
             --feature-dtype: the region features as a shard of that dtype gives them (f16 and
             bf16 are uploaded as they are and widened on the device; default f32)
             --counts adds what one step launches, waits for (syncs), allocates and uploads, as
             the CUDA backend counts them (the same on the emulated device as on a GPU)
             --graph takes the steps as the trainer does on CUDA: captured once per shape and
             replayed (CUDA graphs); without it every step runs eagerly
             --embed times embedding passes instead, as a loaded model runs them (its
             weights frozen): per step the batch's images, then its texts; the line gives
             ms_per_pass and items_per_s (--counts: one pass's counts; the device's pool
             grows over the first few passes, so warm up with 4 or more for steady counts)
",
        takes: Takes::Flags(bench_step::run),
    },
];

/// Notes under the commands; each goes with a command's own help when it takes the option.
const FORCE_NOTE: &str = "  An existing output is replaced only with --force and only if semshare wrote it (its
  manifest says so); an output may not be one of the command's inputs.
";
const DEVICE_NOTE: &str = "  --device auto|cpu|cuda   (auto: CUDA when built with it and a GPU is present; the default
                           unless the command names another)
";
const PRECISION_NOTE: &str =
    "  --precision fp32|tf32|bf16  the layers' arithmetic (default fp32, IEEE); bf16 stores the
                           transformer's activations as bfloat16 and multiplies them by bf16
                           weights with fp32 sums (AMX or AVX-512 BF16 where the CPU has them,
                           its fp32 units where not; tensor cores on CUDA); parameters stay
                           fp32; tf32 rounds the GEMMs' operands to TF32 (CUDA only)
";
const CONFIG_NOTE: &str = "  A config file is JSON: {\"model\": {...}, \"train\": {...}}; flags override it.
";
const GENERAL_NOTE: &str = "  --flag=value is the same as --flag value. Progress goes to stderr: redrawn in place on a
  terminal, a plain line now and then when piped. Exit status: 0 success, 1 error,
  2 command line not understood (unknown command or option, missing value, stray argument),
  train, experiment and tune stopped by SIGINT or SIGTERM end by that signal (130 or 143 in
  a shell) after writing a checkpoint to resume from.
";

/// Exit status of a command line that is not understood (1 is every other error).
const USAGE_ERROR: u8 = 2;

impl Command {
    fn takes(&self, option: &str) -> bool {
        let (values, switches) = cli::options(self.name);
        values.contains(&option) || switches.contains(&option)
    }

    /// `semshare help CMD`: this command's part of the usage and the notes that concern it.
    fn help(&self) -> String {
        let operands = match self.takes {
            Takes::Flags(_) => "[OPTIONS]",
            Takes::Dir(_) => "DIR",
        };
        let mut s = format!("USAGE: semshare {} {operands}\n\n{}\n", self.name, self.usage);
        for (option, note) in
            [("force", FORCE_NOTE), ("device", DEVICE_NOTE), ("precision", PRECISION_NOTE), ("config", CONFIG_NOTE)]
        {
            if self.takes(option) {
                s += note;
            }
        }
        s + GENERAL_NOTE
    }
}

/// `semshare help`: every command and every note.
fn usage() -> String {
    let commands: String = COMMANDS.iter().map(|c| c.usage).collect();
    format!("{HEADER}{commands}\n{FORCE_NOTE}\n{DEVICE_NOTE}{PRECISION_NOTE}{CONFIG_NOTE}\n{GENERAL_NOTE}")
}

fn find(name: &str) -> std::result::Result<&'static Command, Failure> {
    COMMANDS
        .iter()
        .find(|c| c.name == name)
        .ok_or_else(|| Failure::Usage { error: Error::config(format!("unknown command `{name}`")), command: None })
}

/// Why `semshare` stopped: a command line it did not understand (exit 2) or an error (exit 1).
enum Failure {
    Usage {
        error: Error,
        command: Option<&'static str>,
    },
    /// A command's option refused once read (`--data is required`, `--k must be at least 1`):
    /// exit 1, with the pointer to the command's usage.
    Option {
        what: String,
        command: &'static str,
    },
    Run(Error),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        Failure::Run(e)
    }
}

fn main() -> ExitCode {
    // A write past `ulimit -f` raises SIGXFSZ, whose default kills the process with its temp
    // files in place; ignored, the write fails with EFBIG: a one-line error naming the file,
    // and the temps removed.
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to "ignore" before any thread exists.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    // `env::args` panics on an argument that is not UTF-8 (a Linux file name may be any bytes).
    let argv: std::result::Result<Vec<String>, Failure> = std::env::args_os()
        .skip(1)
        .map(|a| {
            a.into_string().map_err(|a| Failure::Usage {
                error: Error::config(format!("argument {a:?} is not UTF-8, which semshare's options must be")),
                command: None,
            })
        })
        .collect();
    match argv.and_then(|argv| run(&argv)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Run(e)) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
        Err(Failure::Option { what, command }) => {
            eprintln!("error: {what} (see `semshare {command} --help`)");
            ExitCode::FAILURE
        }
        Err(Failure::Usage { error, command }) => {
            let help = command.map_or_else(|| "semshare help".to_string(), |c| format!("semshare {c} --help"));
            // The parser's errors are `Config`; its "configuration:" prefix says nothing here.
            let what = match error {
                Error::Config { what } => what,
                other => other.to_string(),
            };
            eprintln!("error: {what} (see `{help}`)");
            ExitCode::from(USAGE_ERROR)
        }
    }
}

fn run(argv: &[String]) -> std::result::Result<(), Failure> {
    let Some((first, rest)) = argv.split_first() else {
        print!("{}", usage());
        return Ok(());
    };
    match first.as_str() {
        "--version" | "-V" => {
            if let Some(extra) = rest.first() {
                let error = Error::config(format!("unexpected argument `{extra}`: --version takes none"));
                return Err(Failure::Usage { error, command: None });
            }
            println!("semshare {}", env!("CARGO_PKG_VERSION"));
            return Ok(());
        }
        "help" | "--help" | "-h" => {
            match rest {
                [] => print!("{}", usage()),
                // `help --help`, `help help`: help's own usage is the whole of it.
                [name] if ["help", "--help", "-h"].contains(&name.as_str()) => print!("{}", usage()),
                [name] => print!("{}", find(name)?.help()),
                [_, extra, ..] => {
                    let error = Error::config(format!("unexpected argument `{extra}`: help takes one command"));
                    return Err(Failure::Usage { error, command: None });
                }
            }
            return Ok(());
        }
        _ => {}
    }
    let cmd = find(first)?;
    // As in every Rust CLI, --help anywhere asks for the command's usage rather than running it.
    if rest.iter().any(|a| a == "--help" || a == "-h") {
        print!("{}", cmd.help());
        return Ok(());
    }
    let usage_error = |error| Failure::Usage { error, command: Some(cmd.name) };
    match &cmd.takes {
        Takes::Flags(run) => {
            let (values, switches) = cli::options(cmd.name);
            let args = Args::parse(rest, values, switches).map_err(usage_error)?;
            run(&args).map_err(|error| match error {
                // An option missing or out of range: the command's usage says what it takes.
                Error::Config { what } if what.starts_with("--") => Failure::Option { what, command: cmd.name },
                other => Failure::Run(other),
            })
        }
        Takes::Dir(run) => match rest {
            [dir] if !dir.starts_with("--") => Ok(run(dir)?),
            [flag] => Err(usage_error(Error::config(format!("unknown option {flag}: {} takes a directory", cmd.name)))),
            _ => {
                Err(usage_error(Error::config(format!("{} takes one directory: semshare {} DIR", cmd.name, cmd.name))))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The options live in the library (`cli::COMMAND_OPTIONS`, which the fuzz target `cli`
    /// parses with too): a command that takes flags is there, and every entry is such a command.
    #[test]
    fn every_command_that_takes_flags_has_its_options_in_the_library() {
        let flags: Vec<&str> = COMMANDS.iter().filter(|c| matches!(c.takes, Takes::Flags(_))).map(|c| c.name).collect();
        let listed: Vec<&str> = cli::COMMAND_OPTIONS.iter().map(|c| c.0).collect();
        assert_eq!(flags, listed);
    }

    /// The usage text and the parser come from one table: every option a command accepts is in
    /// its usage, and its help is its block of the full usage.
    #[test]
    fn every_option_a_command_takes_is_in_its_usage() {
        let full = usage();
        for c in COMMANDS {
            assert!(c.usage.starts_with(&format!("  {} ", c.name)), "{}", c.usage);
            assert!(full.contains(c.usage) && c.help().contains(c.usage), "{}", c.name);
            if let Takes::Flags(_) = c.takes {
                let (values, switches) = cli::options(c.name);
                for option in values.iter().chain(switches.iter()) {
                    assert!(c.usage.contains(&format!("--{option}")), "{}: --{option} is not in its usage", c.name);
                }
            }
        }
    }
}
