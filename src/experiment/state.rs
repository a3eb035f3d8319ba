//! The resumable bookkeeping every study shares (a Table 1 suite, an η sweep, a tuning run): a
//! plan of runs, the runs in progress and those finished, in one JSON file rewritten atomically
//! as each run starts and after each finishes.
//! A study stopped or killed at any point loses at most the steps of its runs in progress since
//! their last checkpoints (each run it started continues its own: [`StudyState::start`],
//! `RunOptions::identity`); the next start does exactly the planned runs not yet recorded.

use std::fmt::Display;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The file of a study's runs directory that names the state file whose runs it holds.
pub const OWNER_FILE: &str = "owner.txt";

/// Claims `root` for the runs of the study whose state file is `state`: a missing or empty
/// `root` becomes its own (the state's path, relative to `root`, written to [`OWNER_FILE`],
/// created exclusively so that two studies starting at once cannot both claim it); one this
/// state owns is taken again, and so is one from before [`OWNER_FILE`] existed (the state file
/// exists, and `root` holds run directories only). Anything else (another study's runs,
/// somebody's files) is refused, so that no run directory of another study is replaced, or
/// read as this one's.
///
/// Returns [`OWNER_FILE`] locked (`flock`, released when the file is dropped or the process
/// ends): one process at a time runs a study, a second start of it while the first runs is
/// refused (both would train the same run in the same directory).
pub fn claim_runs_dir(root: &Path, state: &Path) -> Result<std::fs::File> {
    claim_owner(root, state)?;
    let owner = root.join(OWNER_FILE);
    let file = std::fs::File::open(&owner).map_err(|e| Error::io(&owner, e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::refused(
            root,
            format!(
                "another semshare process is running the study whose state is {} (it holds {OWNER_FILE}); wait for it, or stop it",
                state.display()
            ),
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::io(&owner, e)),
    }
}

/// [`claim_runs_dir`] without the lock.
fn claim_owner(root: &Path, state: &Path) -> Result<()> {
    let owner = root.join(OWNER_FILE);
    if let Ok(text) = crate::io::read_limited(&owner, 4096) {
        return check_owner(root, state, &text);
    }
    // The owner file being written (by a study starting now, or one killed while writing it)
    // is not a foreign entry; a killed one's is removed.
    let writing = format!(".{OWNER_FILE}.tmp.");
    crate::io::remove_stale_temps(root, &writing);
    let entries: Vec<std::fs::DirEntry> = match std::fs::read_dir(root) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(Error::io(root, e)),
        Ok(d) => d
            .filter(|e| e.as_ref().map_or(true, |e| !e.file_name().to_string_lossy().starts_with(&writing)))
            .collect::<std::io::Result<_>>()
            .map_err(|e| Error::io(root, e))?,
    };
    let older_study = state.exists() && entries.iter().all(|e| e.file_type().is_ok_and(|t| t.is_dir()));
    if !entries.is_empty() && !older_study {
        return Err(Error::refused(
            root,
            format!(
                "is not empty and names no study ({OWNER_FILE}); refusing to put runs there (choose another --runs)"
            ),
        ));
    }
    std::fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
    let canonical = |p: &Path| std::fs::canonicalize(p).map_err(|e| Error::io(p, e));
    let dir = state.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let from_root = relative(&canonical(root)?, &canonical(dir)?).join(state.file_name().unwrap_or_default());
    let mut text = path_bytes(&from_root).ok_or_else(|| {
        Error::config(format!(
            "{}: the state file's path is not Unicode, which {OWNER_FILE} cannot record",
            state.display()
        ))
    })?;
    text.push(b'\n');
    // Written whole beside it, then linked in only if no other study claimed `root` meanwhile:
    // a full disk or a kill never leaves an empty owner file that would lock the study out.
    if crate::io::stage(&owner, &text)?.commit_new()? {
        return Ok(());
    }
    check_owner(root, state, &crate::io::read_limited(&owner, 4096)?)
}

/// A path as the bytes [`OWNER_FILE`] records: on Unix the name's own bytes (a name need not be
/// UTF-8; `display()` would replace what is not, and the study could not be found again).
fn path_bytes(path: &Path) -> Option<Vec<u8>> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        Some(path.as_os_str().as_bytes().to_vec())
    }
    #[cfg(not(unix))]
    {
        path.to_str().map(|s| s.as_bytes().to_vec())
    }
}

/// Whether [`OWNER_FILE`]'s `text` names `state`; an error naming the owner if not.
fn check_owner(root: &Path, state: &Path, text: &[u8]) -> Result<()> {
    let text = text.strip_suffix(b"\n").unwrap_or(text);
    #[cfg(unix)]
    let recorded = std::path::PathBuf::from(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(text));
    #[cfg(not(unix))]
    let recorded = std::path::PathBuf::from(String::from_utf8_lossy(text).as_ref());
    let named = root.join(recorded);
    if crate::io::same_path(&named, state) {
        return Ok(());
    }
    Err(Error::refused(
        root,
        format!(
            "holds the runs of the study whose state is {}, not {}; choose another --runs",
            named.display(),
            state.display()
        ),
    ))
}

/// `to` as a path from directory `from` (both absolute): the runs directory names its state
/// file relatively, so that the two can be moved together, and two identical studies in two
/// places write the same bytes.
fn relative(from: &Path, to: &Path) -> std::path::PathBuf {
    let (a, b): (Vec<_>, Vec<_>) = (from.components().collect(), to.components().collect());
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut path: std::path::PathBuf = a[common..].iter().map(|_| "..").collect();
    path.extend(&b[common..]);
    path
}

/// A study's `--out` holds its state file and reports: a directory, or nothing yet.
pub fn check_out_dir(out: &Path) -> Result<()> {
    match std::fs::metadata(out) {
        Ok(m) if !m.is_dir() => Err(Error::refused(
            out,
            "is not a directory; --out names the directory of the study's state file and reports",
        )),
        _ => Ok(()),
    }
}

/// Refuses a study's first start in `out` where one of its `reports` exists already: with no
/// state file beside it, that report is not this study's to rewrite (another program's, or a
/// study whose state was moved away).
pub fn refuse_foreign_reports(out: &Path, state: &Path, reports: &[&str]) -> Result<()> {
    if state.exists() {
        return Ok(());
    }
    match reports.iter().map(|r| out.join(r)).find(|p| std::fs::symlink_metadata(p).is_ok()) {
        Some(p) => Err(Error::refused(
            &p,
            format!(
                "exists, and no {} beside it says this study wrote it; refusing to replace it (choose another --out)",
                state.file_name().unwrap_or_default().to_string_lossy()
            ),
        )),
        None => Ok(()),
    }
}

/// What a study runs. The plan may depend on results: successive halving promotes the best
/// trials of a rung only once the rung is finished, so [`Plan::runs`] sees the finished records.
pub trait Plan: Clone + PartialEq + Serialize + DeserializeOwned {
    /// Names one run.
    type Key: Clone + PartialEq + Display + Serialize + DeserializeOwned;
    /// What a finished run recorded.
    type Record: Clone + Serialize + DeserializeOwned;

    /// The run a record is of.
    fn key(record: &Self::Record) -> &Self::Key;
    /// An error for a plan that cannot be run (empty, duplicated, out of range).
    fn validate(&self) -> Result<()>;
    /// Why a state file recording `old` cannot be continued as this plan (another dataset,
    /// model, budget …), or None when it can.
    fn conflict(&self, old: &Self) -> Option<String>;
    /// Every run known so far, in the order they are done, given the finished runs.
    fn runs(&self, finished: &[Self::Record]) -> Vec<Self::Key>;
    /// What to ask for so that a recorded run outside this plan is in it again.
    fn widen_hint(&self) -> &'static str;
}

/// A plan, its finished runs and those in progress; on disk as one JSON file (`suite`,
/// `finished`, `in_progress`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(bound(serialize = "P: Serialize", deserialize = "P: DeserializeOwned"))]
pub struct StudyState<P: Plan> {
    pub suite: P,
    pub finished: Vec<P::Record>,
    /// Runs this state file started and has not recorded yet ([`start`](Self::start)): a run
    /// stopped or killed goes on from its own checkpoint only if it is here, so that a study
    /// whose state file was removed never continues what the earlier one left.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub in_progress: Vec<P::Key>,
}

impl<P: Plan> StudyState<P> {
    /// The state at `path` if it exists (it must be of a plan this one continues: even one
    /// that finished no run holds its runs in progress), else a fresh one (written when its
    /// first run starts).
    pub fn open(path: &Path, plan: &P) -> Result<Self> {
        plan.validate()?;
        if !path.exists() {
            return Ok(StudyState { suite: plan.clone(), finished: Vec::new(), in_progress: Vec::new() });
        }
        let bytes = crate::io::read(path)?;
        let mut state: Self =
            serde_json::from_slice(&bytes).map_err(|e| Error::format(path, format!("not a state file: {e}")))?;
        if let Some(why) = plan.conflict(&state.suite) {
            return Err(Error::config(format!(
                "{}: holds a different {why}; use another output directory or remove the file to start over",
                path.display()
            )));
        }
        state.suite = plan.clone();
        for (i, r) in state.finished.iter().enumerate() {
            let key = P::key(r);
            if state.finished[..i].iter().any(|q| P::key(q) == key) {
                return Err(Error::format(path, format!("run `{key}` is recorded twice")));
            }
            if !state.suite.runs(&state.finished[..i]).contains(key) {
                return Err(Error::config(format!(
                    "{}: run `{key}` is not in the requested suite; {}, or use another output directory",
                    path.display(),
                    plan.widen_hint()
                )));
            }
        }
        Ok(state)
    }

    /// Marks run `key` in progress, rewriting the state file. A run already in progress (an
    /// earlier start of this study started it, and was stopped or killed) goes on from its own
    /// last checkpoint in `run_dir`. Any other starts afresh: what its `run_dir` holds was left
    /// by an earlier study (its state file removed), and is removed before the run is marked,
    /// so that a kill in between empties it again.
    pub fn start(&mut self, path: &Path, key: &P::Key, run_dir: Option<&Path>) -> Result<()> {
        if self.in_progress.contains(key) {
            return Ok(());
        }
        if let Some(dir) = run_dir {
            crate::train::remove_run_dir(dir)?;
        }
        self.in_progress.push(key.clone());
        self.save(path).inspect_err(|_| {
            self.in_progress.pop(); // memory stays what the disk says
        })
    }

    /// The planned runs not yet recorded, in the plan's order.
    pub fn remaining(&self) -> Vec<P::Key> {
        let done: Vec<&P::Key> = self.finished.iter().map(P::key).collect();
        self.suite.runs(&self.finished).into_iter().filter(|k| !done.contains(&k)).collect()
    }

    /// (finished, known so far) runs.
    pub fn progress(&self) -> (usize, usize) {
        (self.finished.len(), self.suite.runs(&self.finished).len())
    }

    /// Adds a finished run and rewrites the state file atomically.
    pub fn record(&mut self, path: &Path, record: P::Record) -> Result<()> {
        let key = P::key(&record);
        if !self.suite.runs(&self.finished).contains(key) {
            return Err(Error::config(format!("run `{key}` is not part of this suite")));
        }
        if self.finished.iter().any(|r| P::key(r) == key) {
            return Err(Error::config(format!("run `{key}` is already recorded")));
        }
        let in_progress = self.in_progress.clone();
        self.in_progress.retain(|k| k != key);
        self.finished.push(record);
        self.save(path).inspect_err(|_| {
            self.finished.pop(); // memory stays what the disk says
            self.in_progress = in_progress;
        })
    }

    /// Changes finished run `key`'s record with `change` and rewrites the state file atomically.
    pub fn update(&mut self, path: &Path, key: &P::Key, change: impl FnOnce(&mut P::Record)) -> Result<()> {
        let Some(i) = self.finished.iter().position(|r| P::key(r) == key) else {
            return Err(Error::config(format!("run `{key}` is not recorded")));
        };
        let old = self.finished[i].clone();
        change(&mut self.finished[i]);
        self.save(path).inspect_err(|_| {
            self.finished[i] = old; // memory stays what the disk says
        })
    }

    fn save(&self, path: &Path) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| Error::data(format!("state file: {e}")))?;
        crate::io::atomic_write(path, &bytes)
    }
}
