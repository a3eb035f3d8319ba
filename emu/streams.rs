//! Streams that run apart. On a GPU a copy put on one stream may run before, during or after
//! work on another, unless an event wait orders them; a device that runs everything at once,
//! in the order the host asked, would hide every missing wait. So here:
//!
//! - A copy to the device (`cuMemcpyHtoDAsync`, `cuMemcpyDtoDAsync`) is queued on its stream,
//!   as a DMA engine holds it, and runs only when something orders it: a stream that waits for
//!   an event recorded after it (`cuStreamWaitEvent`), the host waiting for such an event, its
//!   stream or the context, a synchronous copy or a free, or later work on its own stream.
//!   Until then a query of its stream, or of an event recorded after it, is not ready.
//! - Any other work (kernels, memsets, GEMMs, copies to the host, graphs) runs at once, after
//!   the copies queued before it on its own stream.
//! - Before anything runs it is checked against the copies still queued on other streams:
//!   touching memory such a copy writes, or writing memory it reads, is a race that the device
//!   may lose, and fails with both named (a kernel touches every allocation a pointer argument
//!   lies in).
//!
//! A queued copy reads pinned host memory (`cuMemAllocHost`) when it runs, so a host that
//! rewrites it before the copy out of it has run sends the new bytes, as a GPU might; from
//! pageable memory the bytes are taken when the copy is queued, as the driver stages them.
//!
//! The queues are the process's, shared by every thread (the tests run in parallel): a copy is
//! checked and run with them locked, so no other thread sees its stream empty before it is
//! done. A query does not make progress (the device gets to a copy only when something orders
//! it), so a host that spins on a query waits forever here; semshare never spins.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, OnceLock};

use crate::{CUresult, SUCCESS};

/// Memory an operation reads or writes: `[start, end)`.
#[derive(Clone, Copy)]
pub struct Access {
    pub start: u64,
    pub end: u64,
    pub writes: bool,
}

impl Access {
    pub fn new(start: u64, bytes: u64, writes: bool) -> Access {
        Access { start, end: start.saturating_add(bytes), writes }
    }

    fn conflicts(&self, other: &Access) -> bool {
        (self.writes || other.writes) && self.start < other.end && other.start < self.end
    }
}

/// A copy waiting on its stream.
struct Queued {
    seq: u64,
    dst: u64,
    src: u64,
    bytes: usize,
    src_on_device: bool,
    /// The source's bytes, taken when it was queued (pageable host memory).
    taken: Option<Vec<u8>>,
    what: &'static str,
}

impl Queued {
    fn accesses(&self) -> Vec<Access> {
        let mut a = vec![Access::new(self.dst, self.bytes as u64, true)];
        if self.src_on_device {
            a.push(Access::new(self.src, self.bytes as u64, false));
        }
        a
    }
}

struct Queues {
    next: u64,
    by_stream: HashMap<u64, VecDeque<Queued>>,
}

impl Queues {
    /// The next place in the one order of copies and events.
    fn take_seq(&mut self) -> u64 {
        self.next += 1;
        self.next - 1
    }
}

fn queues() -> MutexGuard<'static, Queues> {
    static Q: OnceLock<Mutex<Queues>> = OnceLock::new();
    Q.get_or_init(|| Mutex::new(Queues { next: 1, by_stream: HashMap::new() }))
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// Queues a copy of `bytes` from `src` (host memory unless `src_on_device`; pinned memory read
/// when the copy runs, pageable memory now) to `dst` on `stream`.
///
/// # Safety
/// A host `src` holds `bytes` bytes now and, if pinned, until the copy has run.
pub unsafe fn enqueue(stream: u64, dst: u64, src: u64, bytes: usize, src_on_device: bool, what: &'static str) {
    let taken = (!src_on_device && !crate::pinned(src, bytes))
        .then(|| unsafe { std::slice::from_raw_parts(src as *const u8, bytes) }.to_vec());
    let mut q = queues();
    let seq = q.take_seq();
    let copy = Queued { seq, dst, src, bytes, src_on_device, taken, what };
    q.by_stream.entry(stream).or_default().push_back(copy);
}

/// Forgets every queued copy: the context they were queued in is gone.
pub fn clear() {
    queues().by_stream.clear();
}

/// Where an event recorded on `stream` now stands: it completes when every copy queued on the
/// stream before it has run.
pub fn position() -> u64 {
    queues().take_seq()
}

/// Runs the copies queued on `stream` before `until` (all of them for None), oldest first.
pub fn drain(stream: u64, until: Option<u64>) -> CUresult {
    let mut q = queues();
    loop {
        let Some(queue) = q.by_stream.get_mut(&stream) else { return SUCCESS };
        let copy = match queue.front() {
            Some(c) if until.is_none_or(|u| c.seq < u) => queue.pop_front(),
            _ => None,
        };
        let Some(copy) = copy else { return SUCCESS };
        let r = run(&q, stream, &copy);
        if r != SUCCESS {
            return r;
        }
    }
}

/// Whether a copy queued on `stream` before `until` (at all, for None) has not run yet.
pub fn waiting(stream: u64, until: Option<u64>) -> bool {
    queues().by_stream.get(&stream).and_then(|q| q.front()).is_some_and(|c| until.is_none_or(|u| c.seq < u))
}

/// Runs every queued copy of every stream, in the order they were queued.
pub fn drain_all() -> CUresult {
    let mut q = queues();
    loop {
        let oldest = q.by_stream.iter().filter_map(|(&s, queue)| queue.front().map(|c| (c.seq, s))).min();
        let Some((_, stream)) = oldest else { return SUCCESS };
        let Some(copy) = q.by_stream.get_mut(&stream).and_then(VecDeque::pop_front) else { return SUCCESS };
        let r = run(&q, stream, &copy);
        if r != SUCCESS {
            return r;
        }
    }
}

/// Runs a copy taken off `stream`'s queue (the queues locked as `q`). A race is the
/// context's fault: the copy's caller has long returned. (Its ranges were checked when it was
/// queued, and a free runs every queued copy first, so they still hold.)
fn run(q: &Queues, stream: u64, copy: &Queued) -> CUresult {
    if let Err(e) = check(q, stream, &copy.accesses(), copy.what) {
        return crate::fault(crate::LAUNCH_FAILED, e);
    }
    let src = copy.taken.as_ref().map_or(copy.src, |t| t.as_ptr() as u64);
    crate::run_copy(copy.dst, src, copy.bytes, copy.what, true, copy.src_on_device)
}

/// Work about to run on `stream`: the copies queued before it there run first, and it must
/// not race a copy still queued on another stream. Returns the fault to give, if any.
pub fn before(stream: u64, accesses: &[Access], what: &str) -> Option<CUresult> {
    let r = drain(stream, None);
    if r != SUCCESS {
        return Some(r);
    }
    check(&queues(), stream, accesses, what).err().map(|e| crate::fault(crate::LAUNCH_FAILED, e))
}

/// Whether `accesses` by work on `stream` race a copy queued on another stream.
fn check(q: &Queues, stream: u64, accesses: &[Access], what: &str) -> Result<(), String> {
    for (&other, queue) in q.by_stream.iter().filter(|(&s, _)| s != stream) {
        for copy in queue {
            for theirs in copy.accesses() {
                if let Some(ours) = accesses.iter().find(|a| a.conflicts(&theirs)) {
                    let (verb, their_verb) = (rw(ours.writes), rw(theirs.writes));
                    return Err(format!(
                        "a race between streams: {what} on stream {stream:#x} {verb} {:#x}..{:#x}, which {} queued on \
                         stream {other:#x} {their_verb} ({:#x}..{:#x}) with no event wait ordering them",
                        ours.start, ours.end, copy.what, theirs.start, theirs.end
                    ));
                }
            }
        }
    }
    Ok(())
}

fn rw(writes: bool) -> &'static str {
    if writes {
        "writes"
    } else {
        "reads"
    }
}

/// The allocations a kernel may touch: each one a pointer-sized argument points into, read and
/// written.
pub fn kernel_accesses(params: &[u8]) -> Vec<Access> {
    let mut out: Vec<Access> = Vec::new();
    for word in params.chunks_exact(8) {
        let p = u64::from_le_bytes(word.try_into().unwrap_or_default());
        if let Some(a) = allocation_of(p, true).filter(|a| !out.iter().any(|o| o.start == a.start)) {
            out.push(a);
        }
    }
    out
}

/// The allocation `p` lies in, as an access (nothing when it lies in none: the work's own
/// range checks report that).
pub fn allocation_of(p: u64, writes: bool) -> Option<Access> {
    let allocs = crate::allocations();
    let i = allocs.partition_point(|&(s, _)| s <= p);
    (i > 0 && p < allocs[i - 1].0 + allocs[i - 1].1).then(|| Access::new(allocs[i - 1].0, allocs[i - 1].1, writes))
}
