//! File helpers shared by checkpoints, datasets and embeddings.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::tensor::View;

use crate::{Error, Result};

/// Write `bytes` to `path` so that a reader sees the old file or the new one, never a torn
/// mix: [`stage`] it, then [`Staged::commit`].
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    stage(path, bytes)?.commit()
}

/// `bytes` written to a new sibling temp file of `path` and synced, not yet in place: commit
/// it, or drop it to remove it. Staging every file of a pair before either is committed leaves
/// the old pair whole when the disk fills or the process dies while they are written. Errors
/// name `path`, the file asked for, not the temp.
pub fn stage(path: &Path, bytes: &[u8]) -> Result<Staged> {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().ok_or_else(|| Error::config(format!("{} is not a file path", path.display())))?;
    let prefix = format!(".{}.tmp.", name.to_string_lossy());
    remove_stale_temps(&dir, &prefix);
    // PID, then a count: two writers of one process never share a temp file. A file by that
    // name is not this process's (its counts are unique) but an earlier one's that had the same
    // PID (a container's PID 1 has it every run): replaced if its writer is gone, passed over
    // while another PID namespace's writer holds it locked.
    let (tmp, mut file) = loop {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dir.join(format!("{prefix}{}.{n}", std::process::id()));
        let create = || fs::OpenOptions::new().write(true).create_new(true).open(&tmp);
        let opened = match create() {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if locked(&tmp) {
                    continue;
                }
                fs::remove_file(&tmp).map_err(|e| Error::io(path, e))?;
                create()
            }
            opened => opened,
        };
        break (tmp, opened.map_err(|e| Error::io(path, e))?);
    };
    // Locked while it exists, so that a process that cannot see this one's PID (another PID
    // namespace on a shared volume) does not take it for a dead one's. Best effort: not every
    // filesystem has locks.
    #[cfg(unix)]
    let _ = file.try_lock();
    // A replaced file keeps its permissions (a private checkpoint stays private); best effort.
    if let Ok(old) = fs::metadata(path) {
        let _ = file.set_permissions(old.permissions());
    }
    let written = file.write_all(bytes).and_then(|()| file.sync_all());
    let staged = Staged { tmp, target: path.to_path_buf(), dir, _file: file };
    written.map_err(|e| Error::io(path, e))?;
    Ok(staged)
}

/// A file [`stage`] wrote beside its target; removed when dropped uncommitted.
#[derive(Debug)]
#[must_use = "a staged file is removed unless it is committed"]
pub struct Staged {
    tmp: PathBuf,
    target: PathBuf,
    dir: PathBuf,
    /// The temp file, open so that its lock holds until it is committed or removed.
    _file: fs::File,
}

impl Staged {
    /// Renames the file over its target, then syncs the directory.
    pub fn commit(self) -> Result<()> {
        fs::rename(&self.tmp, &self.target).map_err(|e| Error::io(&self.target, e))?;
        self.sync_dir();
        Ok(())
    }

    /// Puts the file at its target only if nothing is there (a hard link: exclusive, as
    /// `create_new` is, but the file appears whole); false if something was. On a filesystem
    /// without hard links (FAT, some FUSE and SMB mounts) the target is created exclusively
    /// and the bytes copied in.
    pub fn commit_new(self) -> Result<bool> {
        let exists = |e: &std::io::Error| e.kind() == std::io::ErrorKind::AlreadyExists;
        match fs::hard_link(&self.tmp, &self.target) {
            Err(e) if exists(&e) => return Ok(false),
            Err(_) => {
                let bytes = fs::read(&self.tmp).map_err(|e| Error::io(&self.target, e))?;
                let mut f = match fs::OpenOptions::new().write(true).create_new(true).open(&self.target) {
                    Err(e) if exists(&e) => return Ok(false),
                    Err(e) => return Err(Error::io(&self.target, e)),
                    Ok(f) => f,
                };
                if let Err(e) = f.write_all(&bytes).and_then(|()| f.sync_all()) {
                    let _ = fs::remove_file(&self.target); // created above: ours, and partial
                    return Err(Error::io(&self.target, e));
                }
            }
            Ok(()) => {}
        }
        self.sync_dir();
        Ok(true)
    }

    fn sync_dir(&self) {
        if let Ok(d) = fs::File::open(&self.dir) {
            let _ = d.sync_all(); // best effort: not every filesystem syncs directories
        }
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        // After a commit the temp is gone (renamed) or a second link to the target.
        let _ = fs::remove_file(&self.tmp);
    }
}

/// The whole of a regular file (see [`read_limited`]).
pub fn read(path: &Path) -> Result<Vec<u8>> {
    read_limited(path, u64::MAX)
}

/// Most bytes a configuration or manifest file may have: they are parsed whole, in memory.
pub const SMALL_FILE_LIMIT: u64 = 16 << 20;

/// Opens `path` for reading if it is a regular file: a FIFO would block the open forever, a
/// device or a directory is never what a command wants. Returns the file and its size.
pub fn open_regular(path: &Path) -> Result<(fs::File, u64)> {
    // stat before open: opening a FIFO blocks until a writer comes.
    let meta = fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::format(path, format!("is {}, not a regular file", kind_of(&meta))));
    }
    let file = fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::format(path, format!("is {}, not a regular file", kind_of(&meta))));
    }
    Ok((file, meta.len()))
}

/// The whole of regular file `path`, refused when it is larger than `limit` bytes or than the
/// memory the machine can give (a 1 TB sparse file once aborted the process).
pub fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let (file, len) = open_regular(path)?;
    if len > limit {
        return Err(Error::format(path, format!("{len} bytes, more than the {limit} this file may have")));
    }
    let no_memory = || Error::format(path, format!("{len} bytes, more than the memory available to read it into"));
    if host_available_memory().is_some_and(|available| len > available) {
        return Err(no_memory());
    }
    let mut bytes = Vec::new();
    bytes.try_reserve_exact(usize::try_from(len).map_err(|_| no_memory())?).map_err(|_| no_memory())?;
    // `take`: a file growing while it is read stops at the limit, not at memory's end.
    file.take(limit.saturating_add(1)).read_to_end(&mut bytes).map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > limit {
        return Err(Error::format(path, format!("more than the {limit} bytes this file may have")));
    }
    Ok(bytes)
}

/// [`read_limited`] as UTF-8 text.
pub fn read_text(path: &Path, limit: u64) -> Result<String> {
    String::from_utf8(read_limited(path, limit)?)
        .map_err(|e| Error::format(path, format!("not UTF-8 (byte {})", e.utf8_error().valid_up_to())))
}

fn kind_of(meta: &fs::Metadata) -> String {
    let t = meta.file_type();
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO".into();
        }
        if t.is_char_device() || t.is_block_device() {
            return "a device".into();
        }
        if t.is_socket() {
            return "a socket".into();
        }
    }
    if t.is_dir() {
        "a directory".into()
    } else if t.is_symlink() {
        "a symbolic link".into()
    } else if t.is_file() {
        format!("a file of {} bytes", meta.len())
    } else {
        "not a file or directory".into()
    }
}

/// Checks that an output may be written at `out`: a missing path or an empty directory is free;
/// a `what` this program wrote (`is_ours` says so from its manifest) is replaced only with
/// `force`; anything else, never. The error says what is there.
pub fn claim_output(out: &Path, what: &str, force: bool, is_ours: impl Fn(&Path) -> bool) -> Result<()> {
    let meta = match fs::symlink_metadata(out) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(out, e)),
        Ok(m) => m,
    };
    if meta.is_dir() {
        let mut entries = fs::read_dir(out).map_err(|e| Error::io(out, e))?;
        if entries.next().is_none() {
            return Ok(());
        }
    }
    if !meta.file_type().is_symlink() && is_ours(out) {
        return if force {
            Ok(())
        } else {
            Err(Error::refused(out, format!("already holds {}; pass --force to replace it", with_article(what))))
        };
    }
    let there = if meta.is_dir() {
        let n = fs::read_dir(out).map(|d| d.count()).unwrap_or(0);
        format!("a directory with {n} entries")
    } else {
        kind_of(&meta)
    };
    Err(Error::refused(
        out,
        format!(
            "is {there}, not {} written by semshare; refusing to replace it (choose another output)",
            with_article(what)
        ),
    ))
}

/// [`claim_output`] for an output that is one file: a directory there (even an empty one) is
/// refused before anything is computed or written beside it.
pub fn claim_file_output(out: &Path, what: &str, force: bool, is_ours: impl Fn(&Path) -> bool) -> Result<()> {
    if fs::symlink_metadata(out).is_ok_and(|m| m.is_dir()) {
        return Err(Error::refused(out, format!("is a directory; the {what} is a file (name the file to write)")));
    }
    claim_output(out, what, force, is_ours)
}

/// `path` made absolute with symbolic links resolved as far as it exists (an output may not).
fn resolved(path: &Path) -> PathBuf {
    if let Ok(p) = fs::canonicalize(path) {
        return p;
    }
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => {
            let parent = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
            resolved(parent).join(name)
        }
        _ => std::env::current_dir().map(|d| d.join(path)).unwrap_or_else(|_| path.to_path_buf()),
    }
}

/// Whether two paths name the same file or directory (after resolving links).
pub fn same_path(a: &Path, b: &Path) -> bool {
    resolved(a) == resolved(b) || same_file(a, b)
}

/// Refuses an output that is one of the command's inputs: the same path or file (hard links
/// included), a directory holding the input (replacing it would delete the input), or a path
/// inside an input directory (a dataset must not gain or lose files under its readers).
pub fn refuse_overlap(out: &Path, input: &Path, input_what: &str) -> Result<()> {
    overlap(out, input, input_what, true)
}

/// [`refuse_overlap`] for an input directory that may hold the output (a source directory
/// `pack` reads only the listed files of): the output may not be the input or hold it.
pub fn refuse_replacing(out: &Path, input: &Path, input_what: &str) -> Result<()> {
    overlap(out, input, input_what, false)
}

fn overlap(out: &Path, input: &Path, input_what: &str, refuse_inside: bool) -> Result<()> {
    let (o, i) = (resolved(out), resolved(input));
    // By name, and by identity: a bind mount (or a second mount) names a directory another way.
    let under = |path: &Path, dir: &Path| path.starts_with(dir) || path.ancestors().skip(1).any(|a| same_file(a, dir));
    let why = if o == i {
        Some(format!("is the {input_what} {}", input.display()))
    } else if under(&i, &o) {
        Some(format!("contains the {input_what} {}", input.display()))
    } else if refuse_inside && i.is_dir() && under(&o, &i) {
        Some(format!("is inside the {input_what} {}", input.display()))
    } else {
        same_file(out, input).then(|| format!("is the same file as the {input_what} {}", input.display()))
    };
    match why {
        Some(w) => Err(Error::refused(out, format!("{w}: an output may not overwrite an input"))),
        None => Ok(()),
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(x), Ok(y)) = (fs::metadata(a), fs::metadata(b)) {
            return x.dev() == y.dev() && x.ino() == y.ino();
        }
    }
    let _ = (a, b);
    false
}

/// "a dataset", "an embeddings file".
fn with_article(what: &str) -> String {
    let vowel = what.starts_with(['a', 'e', 'i', 'o', 'u']);
    format!("{} {what}", if vowel { "an" } else { "a" })
}

/// Puts the directory `new` in place of the directory `out` and removes the one that was
/// there. Where Linux can swap two names in one step (`renameat2(RENAME_EXCHANGE)`), a reader
/// of `out` sees the old directory or the new one, always one of them; elsewhere (another OS,
/// a filesystem without the swap) the old one is renamed to `aside` first, so that between
/// the two renames there is none, and a failed second rename puts it back. A process killed
/// between them leaves the old directory at `aside`, for its next writer to restore.
pub fn replace_dir(new: &Path, out: &Path, aside: &Path) -> Result<()> {
    if swap_names(new, out) {
        // `new` is the old directory now.
        let _ = fs::remove_dir_all(new);
        return Ok(());
    }
    replace_dir_by_renames(new, out, aside)
}

fn replace_dir_by_renames(new: &Path, out: &Path, aside: &Path) -> Result<()> {
    fs::rename(out, aside).map_err(|e| Error::io(out, e))?;
    if let Err(e) = fs::rename(new, out) {
        let _ = fs::rename(aside, out);
        return Err(Error::io(out, e));
    }
    let _ = fs::remove_dir_all(aside);
    Ok(())
}

/// Swaps what the names `a` and `b` refer to in one step; false where it did not (a kernel
/// before 3.15, a filesystem or sandbox without the exchange, any other error): a failed swap
/// changes nothing, and the renames that follow report what is wrong. Called as a system call,
/// not through glibc's wrapper (glibc 2.28 and later only).
#[cfg(target_os = "linux")]
fn swap_names(a: &Path, b: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).ok();
    let (Some(a), Some(b)) = (c(a), c(b)) else { return false };
    // SAFETY: two NUL-terminated paths that outlive the call; renameat2's five arguments.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    r == 0
}

#[cfg(not(target_os = "linux"))]
fn swap_names(_: &Path, _: &Path) -> bool {
    false
}

/// Whether process `pid` may still be running (unknown counts as running: nothing is removed).
pub(crate) fn process_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    if cfg!(target_os = "linux") { Path::new("/proc").join(pid.to_string()).exists() } else { true }
}

/// The entries of `dir` that are temporaries semshare made and a process that is gone left,
/// with its PID: named exactly `prefix` + PID + sep + count, sep the prefix's last character
/// (files `.NAME.tmp.PID.N`, dataset directories `.NAME.tmp-PID-K` and `.NAME.tmp-PID-K.old`),
/// and not locked (a writer in another PID namespace, a container sharing the volume, holds its
/// temporary locked: [`stage`], the dataset writer). A user's `.NAME.tmp.2024.bak` is none.
pub fn stale_temps(dir: &Path, prefix: &str) -> Vec<(PathBuf, u32)> {
    let Ok(entries) = fs::read_dir(dir) else { return Vec::new() };
    let Some(sep) = prefix.chars().last() else { return Vec::new() };
    let mut stale = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(prefix)) else { continue };
        match temp_pid(rest, sep) {
            Some(pid) if !process_alive(pid) && !locked(&entry.path()) => stale.push((entry.path(), pid)),
            _ => {}
        }
    }
    stale
}

/// The PID of a temporary's name after its `.NAME.tmp` + `sep`: `PID.N` for a file (`sep` '.'),
/// `PID-K` or `PID-K.old` for a dataset directory (`sep` '-'); None for any other name.
fn temp_pid(rest: &str, sep: char) -> Option<u32> {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let rest = if sep == '-' { rest.strip_suffix(".old").unwrap_or(rest) } else { rest };
    let (pid, count) = rest.split_once(sep)?;
    if digits(pid) && digits(count) { pid.parse().ok() } else { None }
}

/// Whether another process holds `path` locked (`flock`); false where it cannot be opened or
/// the filesystem has no locks. A file is opened for writing (nothing is written): NFS emulates
/// `flock` with byte-range locks, which need it. Only a file or a directory is opened (a FIFO
/// would block).
pub(crate) fn locked(path: &Path) -> bool {
    let Ok(meta) = fs::symlink_metadata(path) else { return false };
    let opened = if meta.is_file() {
        fs::OpenOptions::new().write(true).open(path)
    } else if meta.is_dir() {
        fs::File::open(path)
    } else {
        return false;
    };
    opened.is_ok_and(|f| matches!(f.try_lock(), Err(fs::TryLockError::WouldBlock)))
}

/// Whether `name` is a temporary semshare makes, of any target: `.NAME.tmp.PID.N`,
/// `.NAME.tmp-PID-K` or `.NAME.tmp-PID-K.old`.
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with('.')
        && [(".tmp.", '.'), (".tmp-", '-')]
            .into_iter()
            .any(|(marker, sep)| name.rsplit_once(marker).is_some_and(|(_, rest)| temp_pid(rest, sep).is_some()))
}

/// Removes what killed processes left in `dir`: the temporaries [`stale_temps`] finds.
/// Each removal is reported on stderr; returns what was removed.
pub fn remove_stale_temps(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for (path, pid) in stale_temps(dir, prefix) {
        let gone = match fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&path),
            _ => fs::remove_file(&path),
        };
        if gone.is_ok() {
            // A notice, never a panic when stderr is closed.
            let _ = writeln!(
                std::io::stderr(),
                "removed {}, left behind by process {pid} (no longer running)",
                path.display()
            );
            removed.push(path);
        }
    }
    removed
}

pub fn f32_to_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn bytes_to_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// safetensors bytes that are the same for the same tensors and metadata. The crate writes
/// `__metadata__` from a `HashMap`, whose order changes per process; here the tensors are
/// serialised without it and the metadata is put first in the header in key order.
pub fn safetensors_bytes<S, V, I>(tensors: I, metadata: &BTreeMap<&str, String>) -> std::result::Result<Vec<u8>, String>
where
    S: AsRef<str> + Ord + std::fmt::Display,
    V: View,
    I: IntoIterator<Item = (S, V)>,
{
    let bytes = safetensors::tensor::serialize(tensors, None).map_err(|e| e.to_string())?;
    if metadata.is_empty() {
        return Ok(bytes);
    }
    // The crate's own output: an 8-byte length, a JSON object padded with spaces, the data.
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + n]).map_err(|e| e.to_string())?.trim_end();
    let tensors_json = header.strip_prefix('{').ok_or("safetensors header is not a JSON object")?;
    let meta_json = serde_json::to_string(metadata).map_err(|e| e.to_string())?;
    let sep = if tensors_json.starts_with('}') { "" } else { "," };
    let mut new_header = format!("{{\"__metadata__\":{meta_json}{sep}{tensors_json}").into_bytes();
    // Data stays 8-byte aligned, as the crate aligns it.
    new_header.resize(new_header.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + new_header.len() + bytes.len() - 8 - n);
    out.extend_from_slice(&(new_header.len() as u64).to_le_bytes());
    out.extend_from_slice(&new_header);
    out.extend_from_slice(&bytes[8 + n..]);
    Ok(out)
}

/// Bytes this process can still allocate: the least of the machine's `MemAvailable` (of
/// /proc/meminfo; `MemTotal` on kernels without it), its memory cgroup's limit less the
/// cgroup's anonymous memory (a container's `--memory`, a batch job's allocation; cgroup v2
/// and v1, every level up to the root), and `ulimit -v` / `-d` less what the process maps
/// already. Past any of them an allocation aborts the process or has it killed. None where
/// none is known (no check is made then).
pub fn host_available_memory() -> Option<u64> {
    let meminfo = fs::read_to_string("/proc/meminfo").ok();
    let machine = meminfo.as_deref().and_then(|t| kib_field(t, "MemAvailable:").or_else(|| kib_field(t, "MemTotal:")));
    [machine, cgroup_headroom(), rlimit_headroom()].into_iter().flatten().min()
}

/// `name`'s value in a /proc file of `name  N kB` lines, in bytes.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib.saturating_mul(1024))
}

/// The least headroom of this process's memory cgroups: limit less anonymous memory (page
/// cache is reclaimed before the limit bites, so it is not counted as used).
fn cgroup_headroom() -> Option<u64> {
    let cgroups = fs::read_to_string("/proc/self/cgroup").ok()?;
    let number = |p: &Path| fs::read_to_string(p).ok()?.trim().parse::<u64>().ok(); // "max": none
    let stat = |text: &str, key: &str| {
        text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse::<u64>().ok())
    };
    let mut least: Option<u64> = None;
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else { continue };
        // (where the hierarchy is mounted, the limit's file, memory.stat's key for anonymous)
        let (roots, limit, anon): (&[&str], &str, &str) = if controllers.is_empty() {
            (&["/sys/fs/cgroup", "/sys/fs/cgroup/unified"], "memory.max", "anon")
        } else if controllers.split(',').any(|c| c == "memory") {
            (&["/sys/fs/cgroup/memory"], "memory.limit_in_bytes", "total_rss")
        } else {
            continue;
        };
        for root in roots {
            // The process's own group and each above it (inside a container, its path may not
            // exist under the container's mount: its root is then the container's group).
            let mut group = Some(Path::new(path.trim_start_matches('/')));
            while let Some(g) = group {
                let dir = Path::new(root).join(g);
                let stats = fs::read_to_string(dir.join("memory.stat")).unwrap_or_default();
                // v1's own limit may be above an ancestor's: memory.stat says the one in force.
                let in_force = stat(&stats, "hierarchical_memory_limit").or_else(|| number(&dir.join(limit)));
                if let (Some(l), Some(used)) = (in_force, stat(&stats, anon)) {
                    let room = l.saturating_sub(used);
                    least = Some(least.map_or(room, |x| x.min(room)));
                }
                group = g.parent();
            }
        }
    }
    least
}

/// Room left under `ulimit -v` (`RLIMIT_AS`, against the process's mapped size) and
/// `ulimit -d` (`RLIMIT_DATA`, against its data segment).
#[cfg(target_os = "linux")]
fn rlimit_headroom() -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let mut least: Option<u64> = None;
    for (resource, field) in [(libc::RLIMIT_AS, "VmSize:"), (libc::RLIMIT_DATA, "VmData:")] {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit writes the struct it is given and nothing else.
        if unsafe { libc::getrlimit(resource, &mut lim) } != 0 || lim.rlim_cur == libc::RLIM_INFINITY {
            continue;
        }
        let used = kib_field(&status, field).unwrap_or(0);
        #[allow(clippy::useless_conversion)] // rlim_t is 32-bit on some Linux targets
        let room = u64::from(lim.rlim_cur).saturating_sub(used);
        least = Some(least.map_or(room, |x| x.min(room)));
    }
    least
}

#[cfg(not(target_os = "linux"))]
fn rlimit_headroom() -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::{Dtype, SafeTensors, TensorView};

    fn temp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("semshare-io-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    /// Both ways of replacing a directory leave the new one in place, the old one gone, and
    /// nothing aside; a failed second rename puts the old one back.
    #[test]
    fn a_replaced_directory_is_the_new_one_and_the_old_one_is_gone() {
        let d = temp("replace");
        let dir = |name: &str, marker: &str| {
            let p = d.join(name);
            fs::create_dir_all(&p).unwrap();
            fs::write(p.join("marker"), marker).unwrap();
            p
        };
        let (out, aside) = (d.join("out"), d.join("aside"));
        type Replace = fn(&Path, &Path, &Path) -> Result<()>;
        for (i, replace) in [replace_dir as Replace, replace_dir_by_renames].into_iter().enumerate() {
            let _ = fs::remove_dir_all(&out);
            dir("out", "old");
            let new = dir(&format!("new{i}"), "new");
            replace(&new, &out, &aside).unwrap();
            assert_eq!(fs::read_to_string(out.join("marker")).unwrap(), "new");
            assert!(!new.exists() && !aside.exists());
        }
        // The new directory vanished before its rename: the old one is back at `out`.
        let err = replace_dir_by_renames(&d.join("missing"), &out, &aside).unwrap_err();
        assert!(err.to_string().contains("out"), "{err}");
        assert_eq!(fs::read_to_string(out.join("marker")).unwrap(), "new");
        assert!(!aside.exists());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_staged_file_appears_whole_or_not_at_all_and_keeps_the_permissions_it_replaces() {
        let d = temp("stage");
        let f = d.join("f.bin");
        atomic_write(&f, b"old").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&f, fs::Permissions::from_mode(0o600)).unwrap();
            atomic_write(&f, b"new").unwrap();
            assert_eq!(fs::metadata(&f).unwrap().permissions().mode() & 0o777, 0o600);
        }
        // Dropped uncommitted: the target as it was, no temp left.
        drop(stage(&f, b"never").unwrap());
        let (a, b) = (stage(&f, b"a").unwrap(), stage(&f, b"b").unwrap());
        b.commit().unwrap();
        assert_eq!(fs::read(&f).unwrap(), b"b");
        drop(a);
        assert_eq!(fs::read_dir(&d).unwrap().count(), 1, "only f.bin");
        // commit_new never replaces.
        assert!(!stage(&f, b"c").unwrap().commit_new().unwrap());
        assert!(stage(&d.join("g.bin"), b"g").unwrap().commit_new().unwrap());
        assert_eq!((fs::read(&f).unwrap(), fs::read(d.join("g.bin")).unwrap()), (b"b".to_vec(), b"g".to_vec()));
        assert_eq!(fs::read_dir(&d).unwrap().count(), 2, "f.bin and g.bin");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn safetensors_metadata_is_written_in_key_order_and_reads_back() {
        let data = [1u8, 2, 3, 4, 5, 6, 7, 8];
        let view = TensorView::new(Dtype::U8, vec![8], &data).unwrap();
        let meta = BTreeMap::from([("zeta", "1".to_string()), ("alpha", "2".to_string()), ("mid", "3".into())]);
        let bytes = safetensors_bytes([("t", view.clone())], &meta).unwrap();
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!((8 + header_len) % 8, 0, "data stays aligned");
        let header = std::str::from_utf8(&bytes[8..8 + header_len]).unwrap();
        assert!(header.starts_with(r#"{"__metadata__":{"alpha":"2","mid":"3","zeta":"1"},"t":"#), "{header}");
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("t").unwrap().data(), &data);
        let (_, m) = SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(m.metadata().as_ref().unwrap()["mid"], "3");
        // No tensors and no metadata are the crate's own output.
        let empty = safetensors_bytes(Vec::<(&str, TensorView)>::new(), &meta).unwrap();
        assert!(SafeTensors::read_metadata(&empty).is_ok());
        let plain = safetensors_bytes([("t", view)], &BTreeMap::new()).unwrap();
        assert!(SafeTensors::deserialize(&plain).is_ok());
    }

    #[test]
    fn outputs_are_claimed_only_where_nothing_foreign_is_lost() {
        let d = temp("claim");
        let never = |_: &Path| false;
        assert!(claim_output(&d.join("new"), "dataset", false, never).is_ok());
        assert!(claim_output(&d, "dataset", false, never).is_ok(), "an empty directory");
        fs::write(d.join("f"), "x").unwrap();
        let e = claim_output(&d.join("f"), "dataset", true, never).unwrap_err().to_string();
        assert!(e.contains("is a file of 1 bytes, not a dataset"), "{e}");
        let e = claim_output(&d, "dataset", true, never).unwrap_err().to_string();
        assert!(e.contains("a directory with 1 entries"), "{e}");
        let ours = |_: &Path| true;
        assert!(claim_output(&d, "dataset", false, ours).unwrap_err().to_string().contains("--force"));
        assert!(claim_output(&d, "dataset", true, ours).is_ok());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn overlapping_outputs_and_inputs_are_refused() {
        let d = temp("overlap");
        let input = d.join("in");
        fs::create_dir_all(&input).unwrap();
        fs::write(input.join("a"), "x").unwrap();
        assert!(refuse_overlap(&input, &input, "dataset").is_err());
        assert!(refuse_overlap(&d, &input, "dataset").is_err(), "holds the input");
        assert!(refuse_overlap(&input.join("out"), &input, "dataset").is_err(), "inside the input");
        assert!(refuse_replacing(&input.join("out"), &input, "source").is_ok());
        assert!(refuse_overlap(&d.join("other"), &input, "dataset").is_ok());
        // A hard link is the same file under another name.
        fs::hard_link(input.join("a"), d.join("link")).unwrap();
        assert!(refuse_overlap(&d.join("link"), &input.join("a"), "checkpoint").is_err());
        assert!(refuse_overlap(&d.join(".").join("in").join("a"), &input.join("a"), "checkpoint").is_err());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn only_temporaries_of_dead_processes_are_removed() {
        let d = temp("stale");
        let dead = u32::MAX; // above any pid_max
        fs::write(d.join(format!(".x.tmp.{dead}.0")), "left").unwrap();
        fs::write(d.join(format!(".x.tmp.{}.0", std::process::id())), "mine").unwrap();
        fs::write(d.join(".x.tmp.notapid.0"), "other").unwrap();
        fs::write(d.join(format!(".y.tmp.{dead}.0")), "another target's").unwrap();
        // Names semshare never makes are a user's, whatever number they start with.
        fs::write(d.join(format!(".x.tmp.{dead}.0.bak")), "a user's").unwrap();
        fs::write(d.join(format!(".x.tmp.{dead}")), "a user's").unwrap();
        fs::create_dir(d.join(format!(".x.tmp.{dead}.mine"))).unwrap();
        // A temporary its writer holds locked is alive, wherever that writer's PID is.
        let held = d.join(format!(".x.tmp.{dead}.1"));
        let lock = fs::File::create(&held).unwrap();
        lock.lock().unwrap();
        assert_eq!(remove_stale_temps(&d, ".x.tmp."), [d.join(format!(".x.tmp.{dead}.0"))]);
        assert_eq!(fs::read_dir(&d).unwrap().count(), 7);
        drop(lock);
        assert_eq!(remove_stale_temps(&d, ".x.tmp."), [held]);
        // A dataset's temporary directory and the old dataset it set aside.
        for name in [format!(".s.tmp-{dead}-3"), format!(".s.tmp-{dead}-3.old"), format!(".s.tmp-{dead}-backup")] {
            fs::create_dir(d.join(name)).unwrap();
        }
        let mut removed = remove_stale_temps(&d, ".s.tmp-");
        removed.sort();
        assert_eq!(removed, [d.join(format!(".s.tmp-{dead}-3")), d.join(format!(".s.tmp-{dead}-3.old"))]);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn files_are_read_only_when_regular_and_small_enough() {
        let d = temp("read");
        fs::write(d.join("f"), "12345").unwrap();
        assert_eq!(read_limited(&d.join("f"), 5).unwrap(), b"12345");
        assert!(read_limited(&d.join("f"), 4).unwrap_err().to_string().contains("more than the 4"));
        assert!(read(&d).unwrap_err().to_string().contains("is a directory, not a regular file"));
        #[cfg(target_os = "linux")]
        assert!(read(Path::new("/dev/zero")).unwrap_err().to_string().contains("is a device"));
        // A sparse file larger than memory is refused before anything is allocated for it.
        let huge = fs::File::create(d.join("sparse")).unwrap();
        huge.set_len(1 << 40).unwrap();
        let e = read(&d.join("sparse")).unwrap_err().to_string();
        assert!(e.contains("1099511627776 bytes, more than the memory available") && e.contains("sparse"), "{e}");
        fs::remove_dir_all(&d).unwrap();
    }
}
