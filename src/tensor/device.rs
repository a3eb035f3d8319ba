//! Device memory as a tensor stores it (feature `cuda`): the caching allocator (`Pool`), its
//! buffers (`DevBuf`, `DevIds`) and borrowed ranges of them (`DevView`, `DevViewMut`).
//!
//! On the tensor's floor, below `backend/`, so that `tensor` can hold device buffers without
//! importing the CUDA backend; the backend allocates through `Pool` and reads pointers from here.
//!
//! The allocator: size classes (4 per power of two, ≤ 25% slack), free lists per class, blocks
//! handed back when a buffer drops; a request no list of its class serves takes the smallest
//! cached block of up to twice its size. After the first training step every request is served from
//! the lists: no cuMemAlloc/cuMemFree inside the step loop (those synchronise the device). On out
//! of memory the cached blocks are released and the request retried once; if it still fails the
//! error says how much was asked and is free.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys as cu;
use cudarc::driver::{CudaContext, CudaStream, DriverError, result};

use super::dtype::DType;
use crate::{Error, Result};

pub(crate) fn describe(e: DriverError) -> String {
    let name = e.error_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|_| format!("{:?}", e.0));
    let text = e.error_string().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    format!("{name} ({text})")
}

pub(crate) fn dev_err(what: impl std::fmt::Display) -> impl FnOnce(DriverError) -> Error {
    move |e| Error::Device { what: format!("CUDA: {what}: {}", describe(e)) }
}
/// The caching allocator shared by every buffer of one `Cuda` backend.
pub struct Pool {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    free: Mutex<BTreeMap<usize, Vec<u64>>>,
    /// Requests the free lists could not serve (each reached the driver).
    misses: AtomicU64,
    /// Device-to-device copies made by `DevBuf::try_clone` (a tensor's `clone`).
    clones: AtomicU64,
    /// While a graph is captured: the arena that keeps every block the capture touches.
    capturing: Mutex<Option<Arc<Arena>>>,
}

/// The blocks a captured graph (CUDA graphs) uses: every block the capture took or freed. A
/// replay writes them again, so they stay out of the pool's lists while the graph lives; the
/// arena's own list serves the capture's later requests, as the pool's would. Handed back to
/// the pool when the graph and every buffer taken from the arena are gone.
pub struct Arena {
    pool: Arc<Pool>,
    free: Mutex<BTreeMap<usize, Vec<u64>>>,
    /// Every block the arena holds, free or in a live buffer: (start, bytes).
    blocks: Mutex<Vec<(u64, usize)>>,
}

impl Arena {
    /// Whether `[ptr, ptr + bytes)` lies in one of the arena's blocks.
    pub fn holds(&self, ptr: u64, bytes: usize) -> bool {
        let blocks = self.blocks.lock().unwrap_or_else(|p| p.into_inner());
        blocks.iter().any(|&(s, n)| s <= ptr && ptr + bytes as u64 <= s + n as u64)
    }

    /// Bytes the arena holds.
    pub fn bytes(&self) -> usize {
        self.blocks.lock().map(|b| b.iter().map(|&(_, n)| n).sum()).unwrap_or(0)
    }

    fn keep(&self, ptr: u64, class: usize) {
        if let Ok(mut b) = self.blocks.lock() {
            b.push((ptr, class));
        }
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // Every buffer from the arena is gone (each holds it): all its blocks are free.
        let free = self.free.get_mut().map(std::mem::take).unwrap_or_default();
        for (class, ptrs) in free {
            for p in ptrs {
                self.pool.give(p, class, None);
            }
        }
    }
}

/// The smallest cached block of `class`, or of at most twice its size.
fn pop_fit(lists: &mut BTreeMap<usize, Vec<u64>>, class: usize) -> Option<(u64, usize)> {
    lists.range_mut(class..=2 * class).find_map(|(&c, v)| v.pop().map(|p| (p, c)))
}

/// Bytes actually reserved for a request: 4 size classes per power of two, 256 B minimum.
fn size_class(bytes: usize) -> usize {
    let b = bytes.max(256);
    let top = usize::BITS - 1 - b.leading_zeros(); // floor(log2 b)
    let step = 1usize << top.saturating_sub(2);
    b.div_ceil(step) * step
}

impl Pool {
    pub(crate) fn new(ctx: Arc<CudaContext>, stream: Arc<CudaStream>) -> Pool {
        Pool {
            ctx,
            stream,
            free: Mutex::new(BTreeMap::new()),
            misses: AtomicU64::new(0),
            clones: AtomicU64::new(0),
            capturing: Mutex::new(None),
        }
    }

    /// From now until `end_capture`, every block taken or freed belongs to a new arena.
    pub fn begin_capture(self: &Arc<Self>) -> Result<()> {
        let mut c = self.capturing.lock().unwrap_or_else(|p| p.into_inner());
        if c.is_some() {
            return Err(Error::Device { what: "a graph is already being captured".into() });
        }
        let arena = Arena { pool: self.clone(), free: Mutex::new(BTreeMap::new()), blocks: Mutex::new(Vec::new()) };
        *c = Some(Arc::new(arena));
        Ok(())
    }

    /// The arena of the capture that ends (None if none was begun).
    pub fn end_capture(&self) -> Option<Arc<Arena>> {
        self.capturing.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    fn take(self: &Arc<Self>, bytes: usize) -> Result<(u64, usize, Option<Arc<Arena>>)> {
        let arena = self.capturing.lock().ok().and_then(|c| c.clone());
        let (ptr, class) = self.take_block(bytes, arena.as_ref())?;
        Ok((ptr, class, arena))
    }

    fn take_block(self: &Arc<Self>, bytes: usize, arena: Option<&Arc<Arena>>) -> Result<(u64, usize)> {
        let class = size_class(bytes);
        if let Some(hit) = arena.and_then(|a| a.free.lock().ok().and_then(|mut f| pop_fit(&mut f, class))) {
            return Ok(hit);
        }
        let hit = self.take_general(bytes, class)?;
        if let Some(a) = arena {
            a.keep(hit.0, hit.1);
        }
        Ok(hit)
    }

    fn take_general(self: &Arc<Self>, bytes: usize, class: usize) -> Result<(u64, usize)> {
        // The request's class, else the smallest cached block of at most twice its size: a
        // batch whose masked-segment count moves between steps then still reuses the blocks
        // of the earlier steps instead of reaching the driver (which synchronises).
        if let Some(hit) = self.free.lock().ok().and_then(|mut f| pop_fit(&mut f, class)) {
            return Ok(hit);
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        self.ctx.bind_to_thread().map_err(dev_err("bind context"))?;
        // SAFETY: a plain device allocation of `class` bytes in the bound context.
        match unsafe { result::malloc_sync(class) } {
            Ok(p) => Ok((p, class)),
            Err(e) if e.0 == cu::CUresult::CUDA_ERROR_OUT_OF_MEMORY => {
                self.release_cached()?;
                // SAFETY: as above.
                unsafe { result::malloc_sync(class) }.map(|p| (p, class)).map_err(|_| {
                    let (free, total) = self.ctx.mem_get_info().unwrap_or((0, 0));
                    Error::Device {
                        what: format!(
                            "CUDA out of memory: asked for {} ({bytes} bytes), {} free of {}",
                            mib(class),
                            mib(free),
                            mib(total)
                        ),
                    }
                })
            }
            Err(e) => Err(dev_err(format!("allocate {bytes} bytes"))(e)),
        }
    }

    /// A block back: to the arena it came from, to the arena of a capture under way (a graph
    /// may use a buffer it frees), else to the pool's lists.
    fn give(&self, ptr: u64, class: usize, arena: Option<&Arc<Arena>>) {
        let capturing = match arena {
            Some(_) => None,
            None => self.capturing.lock().ok().and_then(|c| c.clone()),
        };
        if let Some(a) = &capturing {
            a.keep(ptr, class);
        }
        let lists = match arena.or(capturing.as_ref()) {
            Some(a) => &a.free,
            None => &self.free,
        };
        if let Ok(mut f) = lists.lock() {
            f.entry(class).or_default().push(ptr);
        }
    }

    /// Frees every cached block (after the stream drains, since kernels may still use them).
    pub fn release_cached(&self) -> Result<()> {
        self.stream.synchronize().map_err(dev_err("synchronize"))?;
        self.ctx.bind_to_thread().map_err(dev_err("bind context"))?;
        let blocks: Vec<u64> = match self.free.lock() {
            Ok(mut f) => std::mem::take(&mut *f).into_values().flatten().collect(),
            Err(_) => return Ok(()),
        };
        for p in blocks {
            // SAFETY: p came from malloc_sync in this context and is in no live buffer.
            unsafe { result::free_sync(p) }.map_err(dev_err("free"))?;
        }
        Ok(())
    }

    /// Allocations that reached the driver so far (the free lists' misses).
    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }

    /// Tensor clones (device-to-device copies) made through the pool so far.
    pub fn clones(&self) -> u64 {
        self.clones.load(Ordering::Relaxed)
    }

    /// Bytes held in the free lists.
    pub fn cached_bytes(&self) -> usize {
        self.free.lock().map(|f| f.iter().map(|(c, v)| c * v.len()).sum()).unwrap_or(0)
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Errors cannot be returned from drop; a failing free at teardown leaks, nothing worse.
        let _ = self.release_cached();
    }
}

fn mib(b: usize) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}

/// A device buffer from the pool; back to the pool on drop.
pub struct DevBuf {
    ptr: u64,
    class: usize,
    /// The graph arena the block belongs to (taken while a graph was captured).
    arena: Option<Arc<Arena>>,
    /// Elements the owner asked for.
    len: usize,
    /// Their type (u32 index data is stored as `F32`'s 4 bytes).
    dtype: DType,
    pool: Arc<Pool>,
}

impl std::fmt::Debug for DevBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DevBuf({:#x}, {} {} elements)", self.ptr, self.len, self.dtype.name())
    }
}

impl DevBuf {
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// `len` elements of `dtype` from the pool. The byte count is checked, not wrapped.
    pub(crate) fn new(pool: &Arc<Pool>, len: usize, dtype: DType) -> Result<DevBuf> {
        let bytes = len.checked_mul(dtype.bytes()).ok_or_else(|| Error::Device {
            what: format!("CUDA: {len} {} elements do not fit in memory", dtype.name()),
        })?;
        let (ptr, class, arena) = pool.take(bytes)?;
        Ok(DevBuf { ptr, class, arena, len, dtype, pool: pool.clone() })
    }
    /// A device copy (ordered on the pool's stream).
    pub fn try_clone(&self) -> Result<DevBuf> {
        let c = DevBuf::new(&self.pool, self.len, self.dtype)?;
        self.pool.clones.fetch_add(1, Ordering::Relaxed);
        self.pool.ctx.bind_to_thread().map_err(dev_err("bind context"))?;
        let bytes = self.len * self.dtype.bytes();
        // SAFETY: both ranges are live pool blocks of at least `bytes` bytes.
        unsafe { result::memcpy_dtod_async(c.ptr, self.ptr, bytes, self.pool.stream.cu_stream()) }
            .map_err(dev_err("copy device to device"))?;
        Ok(c)
    }
    pub fn view(&self, offset: usize, len: usize) -> DevView<'_> {
        let ptr = self.ptr + (offset * self.dtype.bytes()) as u64;
        DevView { ptr, len, dtype: self.dtype, _b: std::marker::PhantomData }
    }
    pub fn view_mut(&mut self, offset: usize, len: usize) -> DevViewMut<'_> {
        let ptr = self.ptr + (offset * self.dtype.bytes()) as u64;
        DevViewMut { ptr, len, dtype: self.dtype, _b: std::marker::PhantomData }
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        // Stream order makes reuse safe: the next kernel using this block runs after every
        // earlier one that read or wrote it.
        self.pool.give(self.ptr, self.class, self.arena.as_ref());
    }
}

/// u32 index data on the device; `bound` (max + 1) is kept on the host so range checks need
/// no device round trip.
#[derive(Clone, Debug)]
pub struct DevIds {
    buf: Arc<DevBuf>,
    bound: u32,
    /// Whether some entry is `u32::MAX` (a target to ignore; left out of `bound`).
    ignores: bool,
}

impl DevIds {
    /// Index data in `buf` whose largest id, `u32::MAX` aside, is `bound - 1`; `ignores` if
    /// some entry is `u32::MAX`.
    pub(crate) fn new(buf: DevBuf, bound: u32, ignores: bool) -> DevIds {
        DevIds { buf: Arc::new(buf), bound, ignores }
    }
    pub fn ignores(&self) -> bool {
        self.ignores
    }
    pub fn len(&self) -> usize {
        self.buf.len
    }
    pub fn is_empty(&self) -> bool {
        self.buf.len == 0
    }
    pub fn ptr(&self) -> u64 {
        self.buf.ptr
    }
    /// 1 + the largest id other than `u32::MAX` (0 when there is none).
    pub fn bound(&self) -> u32 {
        self.bound
    }
}

/// A borrowed device range of `len` elements of `dtype`.
#[derive(Clone, Copy, Debug)]
pub struct DevView<'a> {
    ptr: u64,
    len: usize,
    dtype: DType,
    _b: std::marker::PhantomData<&'a ()>,
}

#[derive(Debug)]
pub struct DevViewMut<'a> {
    ptr: u64,
    len: usize,
    dtype: DType,
    _b: std::marker::PhantomData<&'a mut ()>,
}

impl<'a> DevView<'a> {
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn sub(self, offset: usize, len: usize) -> DevView<'a> {
        DevView { ptr: self.ptr + (offset * self.dtype.bytes()) as u64, len, ..self }
    }
}

impl<'a> DevViewMut<'a> {
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn reborrow(&mut self) -> DevViewMut<'_> {
        DevViewMut { ptr: self.ptr, len: self.len, dtype: self.dtype, _b: std::marker::PhantomData }
    }
    /// Split at `mid` into two disjoint mutable ranges.
    pub fn split_at(self, mid: usize) -> (DevViewMut<'a>, DevViewMut<'a>) {
        let (mid, dtype) = (mid.min(self.len), self.dtype);
        let tail = self.ptr + (mid * dtype.bytes()) as u64;
        (
            DevViewMut { ptr: self.ptr, len: mid, dtype, _b: std::marker::PhantomData },
            DevViewMut { ptr: tail, len: self.len - mid, dtype, _b: std::marker::PhantomData },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn size_classes_fit_waste_little_and_are_few() {
        let mut classes = std::collections::BTreeSet::new();
        for bytes in (0..1 << 20).step_by(97).chain([1, 255, 256, 257, 1 << 30, (1 << 30) + 1]) {
            let c = size_class(bytes);
            assert!(c >= bytes.max(256), "{bytes} -> {c}");
            assert!(c as f64 <= 1.25 * bytes.max(256) as f64, "{bytes} -> {c}: over 25% slack");
            assert_eq!(size_class(c), c, "a class is its own class");
            if bytes < 1 << 20 {
                classes.insert(c);
            }
        }
        // 4 per power of two between 256 B and 1 MiB: a bounded number of free lists.
        assert!(classes.len() <= 4 * 13, "{} classes", classes.len());
    }
}
