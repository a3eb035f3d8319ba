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
        // Ended by that signal, as its default would (everything written is whole): a shell
        // script running `train` stops on Ctrl-C too, which an exit status would not make it do.
        signals::end_by(signal);
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

    /// Only async-signal-safe work: atomics, write(2), signal(2), raise(3). A second signal
    /// ends the process at once, by that signal; a checkpoint being written then stays a temp
    /// file beside the last whole one (every write is staged and renamed).
    extern "C" fn on_signal(signal: libc::c_int) {
        let Some(stop) = STOP.get() else { return };
        // Before the flag: the main thread reads which signal it was once it sees the flag.
        RECEIVED.compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst).ok();
        if stop.swap(true, Ordering::SeqCst) {
            end_by(signal);
            return;
        }
        #[cfg(target_os = "linux")]
        // SAFETY: errno is this thread's; write(2) may set it, and the code this handler
        // interrupted may be about to read it.
        let saved = unsafe { *libc::__errno_location() };
        let note = b"\nstopping after this step to write a checkpoint (signal again to stop at once)\n";
        // SAFETY: write(2) is async-signal-safe; the buffer outlives the call.
        unsafe { libc::write(2, note.as_ptr().cast(), note.len()) };
        #[cfg(target_os = "linux")]
        // SAFETY: as above.
        unsafe {
            *libc::__errno_location() = saved
        };
    }

    /// Ends the process by `signal`'s default action: what a parent (a shell, `make`,
    /// `subprocess`) sees of a process killed by it. Inside the handler the signal is blocked,
    /// so it arrives as the handler returns.
    pub fn end_by(signal: libc::c_int) {
        // SAFETY: signal(2) and raise(3) are async-signal-safe.
        unsafe {
            libc::signal(signal, libc::SIG_DFL);
            libc::raise(signal);
        }
    }

    pub fn install(stop: Arc<AtomicBool>) {
        if STOP.set(stop).is_err() {
            return;
        }
        for signal in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: zeroed sigactions are valid; the handler is an `extern "C" fn(c_int)`,
            // and SA_RESTART keeps interrupted reads and writes from failing with EINTR.
            unsafe {
                let mut old: libc::sigaction = std::mem::zeroed();
                libc::sigaction(signal, std::ptr::null(), &mut old);
                // A signal the parent ignores (a background job of a script) stays ignored.
                if old.sa_sigaction == libc::SIG_IGN {
                    continue;
                }
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
    pub fn end_by(_: i32) {
        std::process::exit(1)
    }
    pub fn name(_: i32) -> &'static str {
        "a signal"
    }
}
