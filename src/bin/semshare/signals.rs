//! SIGINT (Ctrl-C) and SIGTERM (a scheduler's notice) for the commands that train (`train`,
//! `experiment`, `tune`): the first sets the flag their runs check before each step, so that a
//! run stops after the step under way and writes a checkpoint to resume from; the command then
//! ends by that signal ([`end_by`]).

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

#[cfg(not(unix))]
pub use other::{end_by_now, name, received};
#[cfg(unix)]
pub use unix::{end_by_now, name, received};

/// Once `stop` is set (the command's work written): prints `stopped by SIGNAL: ` and what
/// `then` says, and ends by that signal.
pub fn end_if_stopped(stop: &AtomicBool, then: impl FnOnce() -> String) {
    if stop.load(std::sync::atomic::Ordering::SeqCst) {
        let signal = received();
        println!("stopped by {}: {}", name(signal), then());
        end_by_now(signal);
    }
}

/// The flag the runs check before each step, set by the first SIGINT or SIGTERM.
pub fn stop_on_signals() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    #[cfg(unix)]
    unix::install(Arc::clone(&stop));
    stop
}

#[cfg(unix)]
mod unix {
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
    /// `subprocess`) sees of a process killed by it, so that a script running the command
    /// stops on Ctrl-C too, which an exit status would not make it do. Everything written is
    /// whole by then. Inside the handler the signal is blocked, so it arrives as the handler
    /// returns; elsewhere it arrives at once, and the exit is the shell's 128 + signal should
    /// it not.
    fn end_by(signal: libc::c_int) {
        // SAFETY: signal(2) and raise(3) are async-signal-safe.
        unsafe {
            libc::signal(signal, libc::SIG_DFL);
            libc::raise(signal);
        }
    }

    /// [`end_by`] from the main thread, once the work is written: it does not return.
    pub fn end_by_now(signal: libc::c_int) -> ! {
        end_by(signal);
        std::process::exit(128 + signal)
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
mod other {
    pub fn received() -> i32 {
        0
    }
    pub fn end_by_now(_: i32) -> ! {
        std::process::exit(1)
    }
    pub fn name(_: i32) -> &'static str {
        "a signal"
    }
}
