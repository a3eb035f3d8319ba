//! The `semshare` binary run as a user runs it, and the checks on what it answers.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn semshare(args: &[&str]) -> Output {
    Command::new(binary()).args(args).output().expect("the binary runs")
}

/// The `semshare` binary: cargo's build of it, or `SEMSHARE_BIN` where the test binaries run
/// away from the tree they were built in (the GPU bundle on the device machine: cargo's path
/// is this machine's).
pub fn binary() -> PathBuf {
    std::env::var_os("SEMSHARE_BIN").map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_semshare")), PathBuf::from)
}

/// The binary started with `args`, its output piped.
pub fn spawn(args: &[&str]) -> std::process::Child {
    use std::process::Stdio;
    Command::new(binary()).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("the binary runs")
}

/// A fresh, empty directory `semshare-<tag>-<pid>-<name>` in the system temp folder.
pub fn tmp(tag: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("semshare-{tag}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn ok(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "failed: {stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A clean failure: exit code 1 (no panic, no signal), and the last line of stderr the one
/// `error:` line, naming `needle`.
pub fn fails_with(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should have failed: {stderr}");
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.lines().filter(|l| l.starts_with("error: ")).count(), 1, "one error line: {stderr}");
    let line = stderr.lines().last().unwrap_or("");
    assert!(line.starts_with("error: ") && line.contains(needle), "expected an error about `{needle}`, got: {stderr}");
}

/// A command line `semshare` does not understand: exit code 2, one `error:` line naming
/// `needle` and pointing to the help.
pub fn usage_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(out.stdout.is_empty(), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains(needle),
        "expected an error about `{needle}`: {stderr}"
    );
    assert!(lines[0].contains("--help`)") || lines[0].contains("`semshare help`)"), "{stderr}");
}

/// Owned arguments as `semshare` takes them.
pub fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

pub fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Every file under `dir` (relative path → bytes), for before/after and run-to-run comparisons.
pub fn snapshot(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.strip_prefix(dir).unwrap().to_path_buf(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// Runs `semshare args`, sends it `signal` (`INT`, `TERM`) once a line of its standard error
/// contains `cue`, and returns how it ended, its standard output and its standard error. A
/// stop that hangs fails the test rather than CI: the process is killed after a minute.
#[cfg(unix)]
pub fn stopped_by(args: &[&str], cue: &str, signal: &str) -> (std::process::ExitStatus, String, String) {
    use std::io::{BufRead, BufReader, Read};
    use std::os::unix::process::CommandExt;
    use std::process::Stdio;
    let mut command = Command::new(binary());
    command.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    // SAFETY: signal(2) is async-signal-safe. A test run as a script's background job inherits
    // SIGINT ignored, which semshare keeps ignored (as a user's would be): the signal this test
    // sends must reach it.
    unsafe {
        command.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            Ok(())
        })
    };
    let mut child = command.spawn().expect("the binary runs");
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    while !seen.contains(cue) {
        assert_ne!(stderr.read_line(&mut seen).unwrap(), 0, "ended before `{cue}`: {seen}");
    }
    let sent =
        std::process::Command::new("kill").arg(format!("-{signal}")).arg(child.id().to_string()).status().unwrap();
    assert!(sent.success());
    // The PID is still the child's: it is not reaped before `done`.
    let (pid, done) = (child.id().to_string(), std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)));
    let watched = std::sync::Arc::clone(&done);
    let watchdog = std::thread::spawn(move || {
        let start = std::time::Instant::now();
        while !watched.load(std::sync::atomic::Ordering::SeqCst) {
            if start.elapsed() > std::time::Duration::from_secs(60) {
                let _ = std::process::Command::new("kill").args(["-KILL", &pid]).status();
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    });
    stderr.read_to_string(&mut seen).unwrap();
    let mut stdout = String::new();
    child.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    watchdog.join().unwrap();
    (child.wait().unwrap(), stdout, seen)
}
