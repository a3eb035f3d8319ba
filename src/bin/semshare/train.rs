//! `semshare train`: one training run into a run directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use crate::common::{configs, device_for, fit, load_data, progress_printer};
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
        // The shell's status of a process ended by that signal; everything it wrote is whole.
        std::process::exit(128 + signal);
    }
    let Some(best) = &s.best_checkpoint else {
        let from = opts.resume.as_deref().unwrap_or(Path::new("the checkpoint"));
        println!(
            "{} is at step {} already, and --steps {} is the total: nothing trained, no checkpoint written (pass a larger --steps to continue)",
            from.display(),
            s.steps,
            cfg.steps
        );
        return Ok(());
    };
    let with = s.best_embedding.map(|k| format!(" with the {} embedding", k.name())).unwrap_or_default();
    println!(
        "trained {} steps in {:.1}s on {}: final loss {:.4}, best validation {} {:.2} at step {}{with} ({})",
        s.steps,
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

/// The flag the run checks before each step, set by SIGINT (Ctrl-C) or SIGTERM (a scheduler's
/// notice): the run stops after the step under way and writes a checkpoint to resume from.
fn stop_on_signals() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    #[cfg(unix)]
    signals::install(Arc::clone(&stop));
    stop
}

#[cfg(unix)]
mod signals {
    use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
    use std::sync::{Arc, OnceLock};

    static STOP: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    static RECEIVED: AtomicI32 = AtomicI32::new(0);

    /// Only async-signal-safe work: atomics, write(2), _exit(2). A second signal ends the
    /// process at once, as its default would; a checkpoint being written then stays a temp
    /// file beside the last whole one (every write is staged and renamed).
    extern "C" fn on_signal(signal: libc::c_int) {
        let Some(stop) = STOP.get() else { return };
        if stop.swap(true, Ordering::SeqCst) {
            // SAFETY: _exit is async-signal-safe.
            unsafe { libc::_exit(128 + signal) }
        }
        RECEIVED.store(signal, Ordering::SeqCst);
        let note = b"\nstopping after this step to write a checkpoint (signal again to stop at once)\n";
        // SAFETY: write(2) is async-signal-safe; the buffer outlives the call.
        unsafe { libc::write(2, note.as_ptr().cast(), note.len()) };
    }

    pub fn install(stop: Arc<AtomicBool>) {
        if STOP.set(stop).is_err() {
            return;
        }
        for signal in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: a zeroed sigaction is valid; the handler is an `extern "C" fn(c_int)`,
            // and SA_RESTART keeps interrupted reads and writes from failing with EINTR.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
                action.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut action.sa_mask);
                libc::sigaction(signal, &action, std::ptr::null_mut());
            }
        }
    }

    pub fn received() -> i32 {
        RECEIVED.load(Ordering::SeqCst)
    }

    pub fn name(signal: i32) -> &'static str {
        match signal {
            libc::SIGINT => "SIGINT",
            libc::SIGTERM => "SIGTERM",
            _ => "a signal",
        }
    }
}

/// No signals to catch: the flag stays false.
#[cfg(not(unix))]
mod signals {
    pub fn received() -> i32 {
        0
    }
    pub fn name(_: i32) -> &'static str {
        "a signal"
    }
}
