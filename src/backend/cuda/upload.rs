//! Uploads through pinned memory, on a copy stream. A copy from pageable host memory makes the
//! driver wait for the stream to drain before it starts (CUDA's documented behaviour), so every
//! eager step and every chunk of an embedding would stall the host behind the work already
//! queued, and the device would then idle while the host prepares the next batch. Here each
//! upload is first copied by the host into a pinned ring (a graph's launch too: its inputs are
//! gathered there from where they lie), and the host goes on.
//!
//! The copy to the device runs on a stream of its own, into the same region of a device ring
//! that the uploader owns, while the compute stream is still busy with the previous step: a
//! copy into a pool block could not, since the pool hands blocks out in the compute stream's
//! order (one may still be read by work queued before it). The compute stream waits for the
//! copy's event, then moves the bytes into place with a device copy (about 1 µs per MB there,
//! against about 20 µs per MB across the bus), and records an event after it. A region of
//! both rings is written again only once that event has completed, which implies that both
//! copies out of it have run; the host waits, and counts a sync, only when the ring is full of
//! copies not yet run: when it is about two batches ahead of the device.

use std::collections::VecDeque;
use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::sys as cu;
use cudarc::driver::{CudaEvent, CudaStream, result};

use super::dev_err;
use crate::{Error, Result};

/// The most pinned memory the ring holds. An upload larger than half of it goes in pieces of
/// half (a model's weights, once): the ring never grows past it.
pub(crate) const MAX_RING_BYTES: usize = 64 << 20;
/// The largest piece one copy sends: half the largest ring.
pub(crate) const PIECE_BYTES: usize = MAX_RING_BYTES / 2;
/// The smallest ring: a `small` training step's inputs (1.2 MB) fit it twice.
const MIN_RING_BYTES: usize = 4 << 20;
/// Regions start on this boundary (the DMA engines' preferred alignment).
const ALIGN: usize = 256;

/// What the ring needs of an event: whether the copy before it has run, and a wait for it.
pub(crate) trait Completion {
    fn done(&self) -> Result<bool>;
    fn wait(&self) -> Result<()>;
}

impl Completion for CudaEvent {
    fn done(&self) -> Result<bool> {
        self.try_is_complete().map_err(dev_err("query an upload"))
    }
    fn wait(&self) -> Result<()> {
        self.synchronize().map_err(dev_err("wait for an upload"))
    }
}

/// The ring's bookkeeping, apart from its memory (so that it is tested without a device):
/// regions `[start, end)` of `bytes`, each read by a copy that `E` says is done or not.
pub(crate) struct Regions<E> {
    bytes: usize,
    /// Where the next region starts.
    head: usize,
    /// Regions whose copy may not have run yet, oldest first.
    in_flight: VecDeque<(usize, usize, E)>,
}

impl<E: Completion> Regions<E> {
    pub(crate) fn new(bytes: usize) -> Self {
        Regions { bytes, head: 0, in_flight: VecDeque::new() }
    }

    /// Where the next `n` bytes (at most half the ring) go: after the last region, or from the
    /// start when they do not fit before the end. Waits for the copies still reading there,
    /// and returns (start, how many waits). Copies run in stream order, so waiting for the
    /// newest overlapping region is waiting for every older one too.
    pub(crate) fn place(&mut self, n: usize) -> Result<(usize, u64)> {
        let start = if self.head + n > self.bytes { 0 } else { self.head };
        let end = start + n;
        let mut waits = 0;
        if let Some(i) = self.in_flight.iter().rposition(|&(s, e, _)| s < end && start < e) {
            let (_, _, event) = &self.in_flight[i];
            if !event.done()? {
                waits += 1;
                event.wait()?;
            }
            self.in_flight.drain(..=i);
        }
        while let Some((_, _, e)) = self.in_flight.front() {
            if !e.done()? {
                break;
            }
            self.in_flight.pop_front();
        }
        Ok((start, waits))
    }

    /// The region `place` gave, now read by the copy `event` follows.
    pub(crate) fn push(&mut self, start: usize, n: usize, event: E) {
        self.in_flight.push_back((start, start + n, event));
        self.head = (start + n).next_multiple_of(ALIGN);
    }

    /// Waits for every copy (1 if the host had to), and forgets them.
    pub(crate) fn finish(&mut self) -> Result<u64> {
        let waits = match self.in_flight.back() {
            Some((_, _, e)) if !e.done()? => {
                e.wait()?;
                1
            }
            _ => 0,
        };
        self.in_flight.clear();
        Ok(waits)
    }
}

/// Pinned host memory and its device twin, used as one ring of upload regions.
#[derive(Default)]
pub(crate) struct UploadRing {
    /// The pinned block's host address.
    ptr: Option<usize>,
    /// The device block of the same size: region `[s, e)` of the pinned one arrives at
    /// `[s, e)` of this one.
    device: Option<u64>,
    /// Regions, each free again once the compute stream's copy out of it has run.
    regions: Option<Regions<CudaEvent>>,
    /// The stream the copies across the bus run on, beside the compute stream.
    copies: Option<Arc<CudaStream>>,
}

impl UploadRing {
    /// Queues a copy of `parts`, end to end, to device memory at `dst`, in `stream`'s order (an eager
    /// upload is one part; a graph's launch its batch's parts, scalars and salt, copied from
    /// where they lie straight into the ring). Returns how many times the host had to wait for
    /// an earlier copy first.
    pub(crate) fn copy(&mut self, stream: &CudaStream, dst: u64, parts: &[&[u8]], what: &str) -> Result<u64> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let mut waits = 0;
        for at in (0..total).step_by(PIECE_BYTES) {
            let n = PIECE_BYTES.min(total - at);
            waits += self.copy_piece(stream, dst + at as u64, n, |out| gather(parts, at, out), what)?;
        }
        Ok(waits)
    }

    /// Bytes `[dst.., dst + n)` of the upload, written into the ring by `fill`.
    fn copy_piece(
        &mut self,
        stream: &CudaStream,
        dst: u64,
        n: usize,
        fill: impl FnOnce(&mut [u8]),
        what: &str,
    ) -> Result<u64> {
        let mut waits = 0;
        if self.regions.as_ref().is_none_or(|r| r.bytes < 2 * n) {
            waits += self.grow(stream, (2 * n).next_power_of_two().clamp(MIN_RING_BYTES, MAX_RING_BYTES))?;
        }
        let (Some(base), Some(device), Some(copies), Some(regions)) =
            (self.ptr, self.device, self.copies.as_ref(), self.regions.as_mut())
        else {
            return Err(Error::Device { what: format!("no upload ring for {what}") });
        };
        let (start, waited) = regions.place(n)?;
        // SAFETY: [start, start + n) is inside the ring (n ≤ bytes / 2, and `place` starts at
        // 0 or where n bytes still fit) and no queued copy reads it (`place` waited).
        let pinned = unsafe { std::slice::from_raw_parts_mut((base + start) as *mut u8, n) };
        fill(pinned);
        let staged = device + start as u64;
        let timing = Some(cu::CUevent_flags::CU_EVENT_DISABLE_TIMING);
        // SAFETY: the region is inside both rings and no queued copy uses it (`place` waited);
        // `pinned` stays untouched, and the device region unwritten, until the event recorded
        // after the compute stream's copy has completed. The caller names a device range of at
        // least n bytes, which the compute stream's own order makes free to write.
        unsafe {
            result::memcpy_htod_async(staged, &pinned[..], copies.cu_stream())
                .map_err(dev_err(format!("upload {n} bytes of {what}")))?;
            let arrived = copies.record_event(timing).map_err(dev_err("record an upload's arrival"))?;
            stream.wait(&arrived).map_err(dev_err("wait for an upload"))?;
            result::memcpy_dtod_async(dst, staged, n, stream.cu_stream())
                .map_err(dev_err(format!("move {n} uploaded bytes of {what} into place")))?;
        }
        let moved = stream.record_event(timing).map_err(dev_err("record an upload's event"))?;
        regions.push(start, n, moved);
        Ok(waits + waited)
    }

    /// Rings of `bytes`, once every copy out of the old ones is done (counted as a wait if it
    /// had to be waited for), and the copy stream, once. Only while the uploads grow (a run's
    /// first steps).
    fn grow(&mut self, stream: &CudaStream, bytes: usize) -> Result<u64> {
        let waits = self.release()?;
        if self.copies.is_none() {
            self.copies = Some(stream.context().new_stream().map_err(dev_err("create the copy stream"))?);
        }
        // SAFETY: plain allocations, freed in `release`.
        let ptr =
            unsafe { result::malloc_host(bytes, 0) }.map_err(dev_err(format!("pin {bytes} bytes for uploads")))?;
        self.ptr = Some(ptr as usize);
        let device = unsafe { result::malloc_sync(bytes) }
            .map_err(dev_err(format!("allocate {bytes} bytes of device memory for uploads")))?;
        (self.device, self.regions) = (Some(device), Some(Regions::new(bytes)));
        Ok(waits)
    }

    /// Frees both rings once every copy out of them has run.
    fn release(&mut self) -> Result<u64> {
        let waits = match self.regions.take() {
            Some(mut r) => r.finish()?,
            None => 0,
        };
        if let Some(p) = self.ptr.take() {
            // SAFETY: p came from malloc_host and no copy reads it any more (`finish`).
            unsafe { result::free_host(p as *mut c_void) }.map_err(dev_err("free pinned upload memory"))?;
        }
        if let Some(d) = self.device.take() {
            // SAFETY: d came from malloc_sync and no copy uses it any more (`finish`).
            unsafe { result::free_sync(d) }.map_err(dev_err("free the device upload ring"))?;
        }
        Ok(waits)
    }
}

/// Bytes `[at, at + out.len())` of `parts` end to end, into `out`.
fn gather(parts: &[&[u8]], mut at: usize, out: &mut [u8]) {
    let mut filled = 0;
    for part in parts {
        if filled == out.len() {
            break;
        }
        if at >= part.len() {
            at -= part.len();
            continue;
        }
        let n = (part.len() - at).min(out.len() - filled);
        out[filled..filled + n].copy_from_slice(&part[at..at + n]);
        (filled, at) = (filled + n, 0);
    }
}

impl Drop for UploadRing {
    fn drop(&mut self) {
        let _ = self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    /// A device that runs copies in order, only as far as `ran` says (or a wait makes it).
    struct Copy {
        index: usize,
        ran: Rc<Cell<usize>>,
        waited: Rc<Cell<usize>>,
    }

    impl Completion for Copy {
        fn done(&self) -> Result<bool> {
            Ok(self.index < self.ran.get())
        }
        fn wait(&self) -> Result<()> {
            self.waited.set(self.waited.get() + 1);
            self.ran.set(self.ran.get().max(self.index + 1));
            Ok(())
        }
    }

    /// Any window of parts end to end is what their concatenation holds there.
    #[test]
    fn a_piece_gathers_its_window_of_the_parts() {
        let parts: [&[u8]; 4] = [&[1, 2, 3], &[], &[4], &[5, 6, 7, 8]];
        let whole: Vec<u8> = parts.concat();
        for at in 0..whole.len() {
            for n in 0..=whole.len() - at {
                let mut out = vec![0; n];
                gather(&parts, at, &mut out);
                assert_eq!(out, whole[at..at + n], "at {at}, {n} bytes");
            }
        }
    }

    /// Copies of mixed sizes, the device `lag` copies behind the host: a region is never
    /// handed out while a copy not yet run reads it, and the host waits only when the ring
    /// holds no room that is not still being read.
    #[test]
    fn a_region_is_reused_only_after_its_copy_has_run() {
        for lag in [0, 1, 3, 8, 40] {
            let (ran, waited) = (Rc::new(Cell::new(0)), Rc::new(Cell::new(0)));
            let mut r = Regions::new(1 << 16);
            let mut live: Vec<(usize, usize, usize)> = Vec::new(); // (copy, start, end)
            let mut waits = 0;
            for i in 0..500usize {
                let n = 1 + (i * 7919) % (1 << 15);
                ran.set(ran.get().max(i.saturating_sub(lag)));
                let (start, w) = r.place(n).unwrap();
                waits += w;
                assert!(start + n <= 1 << 16, "copy {i}: region past the ring's end");
                assert_eq!(start % ALIGN, 0, "copy {i}: unaligned region");
                for &(j, s, e) in &live {
                    let overlaps = s < start + n && start < e;
                    assert!(
                        !(overlaps && j >= ran.get()),
                        "copy {i} at {start}..{} over copy {j}'s unread {s}..{e}",
                        start + n
                    );
                }
                live.retain(|&(j, ..)| j >= ran.get());
                live.push((i, start, start + n));
                r.push(start, n, Copy { index: i, ran: ran.clone(), waited: waited.clone() });
            }
            assert_eq!(waits as usize, waited.get(), "lag {lag}: every wait counted");
            if lag == 0 {
                assert_eq!(waits, 0, "a device that keeps up is never waited for");
            } else if lag >= 8 {
                assert!(waits > 0, "lag {lag}: a full ring must be waited for");
            }
            let last_unrun = (ran.get() < 500) as u64;
            assert_eq!(
                r.finish().unwrap(),
                last_unrun,
                "lag {lag}: finish waits for the last copy only if it has not run"
            );
        }
    }
}
