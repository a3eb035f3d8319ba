//! The emulated CUDA device: a stand-in for `libcuda.so` that runs the kernels' PTX on the CPU.
//!
//! build.rs compiles this file (with `ptx.rs`, `exec.rs`, `gemm.rs`) into
//! `$OUT_DIR/emu/libcuda.so` (soname `libcuda.so`) and `libcublas.rs` into `libcublas.so`, with
//! plain `rustc` and no dependencies. With `SEMSHARE_GPU=emulated` the CUDA backend opens them by
//! path before cudarc loads the driver, so cudarc's `dlopen("libcuda.so")` finds this one by its
//! soname: every line of `src/backend/cuda/` and of cudarc runs as on a real GPU.
//!
//! "Device" memory is host memory (pointers are host addresses), filled with NaN bytes when
//! allocated; every copy, kernel access and GEMM operand is checked against the live
//! allocations. Launches run when they are made; copies to the device wait on their stream
//! until something orders them, and work that races a copy queued on another stream fails
//! (`streams.rs`); a capturing stream records its work into a graph instead (`graph.rs`). A fault in a kernel
//! (out of bounds, misaligned, a shared-memory race, a deadlock) makes the context sticky-failed
//! as on the hardware: every later call returns the error until the primary context is
//! released; `cuGetErrorString` gives the detailed message (kernel, block, thread, PTX).

#![allow(non_snake_case, clippy::missing_safety_doc)]

mod exec;
mod gemm;
mod graph;
mod ptx;
mod sgemm_abi;
mod streams;

use std::alloc::Layout;
use std::collections::{BTreeMap, HashMap};
use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

pub type CUresult = c_uint;
const SUCCESS: CUresult = 0;
const INVALID_VALUE: CUresult = 1;
const OUT_OF_MEMORY: CUresult = 2;
const NOT_INITIALIZED: CUresult = 3;
const INVALID_DEVICE: CUresult = 101;
const INVALID_IMAGE: CUresult = 200;
const INVALID_HANDLE: CUresult = 400;
const NOT_FOUND: CUresult = 500;
const ILLEGAL_ADDRESS: CUresult = 700;
const LAUNCH_OUT_OF_RESOURCES: CUresult = 701;
const MISALIGNED_ADDRESS: CUresult = 716;
const LAUNCH_FAILED: CUresult = 719;
const NOT_SUPPORTED: CUresult = 801;
const NOT_READY: CUresult = 600;
const COOPERATIVE_LAUNCH_TOO_LARGE: CUresult = 720;
const UNKNOWN: CUresult = 999;

/// What the emulated device says it is: an sm_90 part with H100/H200 limits.
const DEVICE_NAME: &str = "semshare emulated device (sm_90 PTX on the CPU)";
const MAX_SHARED_DEFAULT: u64 = 48 * 1024;
const MAX_SHARED_OPTIN: u64 = 227 * 1024;
/// An H100/H200's multiprocessors and shared memory per multiprocessor.
const MULTIPROCESSORS: u64 = 132;
const SHARED_PER_SM: u64 = 233_472;

struct State {
    allocs: BTreeMap<u64, (u64, Layout)>,
    snapshot: Option<Arc<Vec<(u64, u64)>>>,
    used: u64,
    ctx_refs: u32,
    /// A kernel fault: (code, message), returned by every call until the context is reset.
    sticky: Option<(CUresult, String)>,
}

fn state() -> &'static Mutex<State> {
    static S: OnceLock<Mutex<State>> = OnceLock::new();
    S.get_or_init(|| Mutex::new(State { allocs: BTreeMap::new(), snapshot: None, used: 0, ctx_refs: 0, sticky: None }))
}

fn lock() -> std::sync::MutexGuard<'static, State> {
    state().lock().unwrap_or_else(|p| p.into_inner())
}

/// Messages by code, for cuGetErrorString: the last detailed message of each code.
fn messages() -> &'static Mutex<HashMap<CUresult, &'static CStr>> {
    static M: OnceLock<Mutex<HashMap<CUresult, &'static CStr>>> = OnceLock::new();
    M.get_or_init(|| Mutex::new(HashMap::new()))
}

fn fail(code: CUresult, msg: String) -> CUresult {
    eprintln!("semshare-emu: {msg}");
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    if let Ok(mut m) = messages().lock() {
        m.insert(code, Box::leak(c.into_boxed_c_str()));
    }
    code
}

/// A kernel fault: sticky until the context is released.
fn fault(code: CUresult, msg: String) -> CUresult {
    let code = fail(code, msg.clone());
    let mut s = lock();
    if s.sticky.is_none() {
        s.sticky = Some((code, msg));
    }
    code
}

fn sticky() -> Option<CUresult> {
    lock().sticky.as_ref().map(|(c, _)| *c)
}

/// Device memory the emulated device offers: half the host's, at most 64 GiB.
fn total_memory() -> u64 {
    static T: OnceLock<u64> = OnceLock::new();
    *T.get_or_init(|| {
        let kb = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            })
            .unwrap_or(8 << 20);
        (kb * 1024 / 2).min(64 << 30)
    })
}

/// Live allocations (start, bytes), sorted; shared with running launches.
pub fn allocations() -> Arc<Vec<(u64, u64)>> {
    let mut s = lock();
    if let Some(a) = &s.snapshot {
        return a.clone();
    }
    let a: Arc<Vec<(u64, u64)>> = Arc::new(s.allocs.iter().map(|(&p, &(n, _))| (p, n)).collect());
    s.snapshot = Some(a.clone());
    a
}

/// Whether [ptr, ptr + bytes) lies inside one live allocation; else a description.
pub fn check_range(ptr: u64, bytes: u64, what: &str) -> Result<(), String> {
    if bytes == 0 {
        return Ok(());
    }
    let a = allocations();
    let i = a.partition_point(|&(s, _)| s <= ptr);
    if i > 0 {
        let (s, n) = a[i - 1];
        if ptr.saturating_add(bytes) <= s + n {
            return Ok(());
        }
        if ptr < s + n {
            return Err(format!(
                "{what}: {bytes} bytes at {ptr:#x} run {} bytes past the end of the {n}-byte allocation at {s:#x}",
                ptr + bytes - (s + n)
            ));
        }
    }
    Err(format!("{what}: {bytes} bytes at {ptr:#x} are outside every device allocation"))
}

fn guard(f: impl FnOnce() -> CUresult + std::panic::UnwindSafe) -> CUresult {
    std::panic::catch_unwind(f).unwrap_or_else(|p| {
        let what = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        fail(UNKNOWN, format!("internal emulator error: {what}"))
    })
}

// ---- init, devices, contexts ----------------------------------------------------------------

#[no_mangle]
pub extern "C" fn cuInit(_flags: c_uint) -> CUresult {
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDriverGetVersion(v: *mut c_int) -> CUresult {
    if v.is_null() {
        return INVALID_VALUE;
    }
    *v = 13000;
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetCount(n: *mut c_int) -> CUresult {
    if n.is_null() {
        return INVALID_VALUE;
    }
    *n = 1;
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGet(d: *mut c_int, ordinal: c_int) -> CUresult {
    if d.is_null() {
        return INVALID_VALUE;
    }
    if ordinal != 0 {
        return INVALID_DEVICE;
    }
    *d = 0;
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetName(name: *mut c_char, len: c_int, _dev: c_int) -> CUresult {
    if name.is_null() || len <= 0 {
        return INVALID_VALUE;
    }
    let bytes = DEVICE_NAME.as_bytes();
    let n = bytes.len().min(len as usize - 1);
    std::ptr::copy_nonoverlapping(bytes.as_ptr() as *const c_char, name, n);
    *name.add(n) = 0;
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceTotalMem_v2(bytes: *mut usize, _dev: c_int) -> CUresult {
    if bytes.is_null() {
        return INVALID_VALUE;
    }
    *bytes = total_memory() as usize;
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetUuid(uuid: *mut u8, _dev: c_int) -> CUresult {
    if uuid.is_null() {
        return INVALID_VALUE;
    }
    std::ptr::write_bytes(uuid, 0x5e, 16);
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetUuid_v2(uuid: *mut u8, dev: c_int) -> CUresult {
    cuDeviceGetUuid(uuid, dev)
}

#[no_mangle]
pub unsafe extern "C" fn cuDeviceGetAttribute(v: *mut c_int, attr: c_int, _dev: c_int) -> CUresult {
    if v.is_null() {
        return INVALID_VALUE;
    }
    *v = match attr {
        1 => 1024,                        // max threads per block
        2 | 3 => 1024,                    // max block dim x, y
        4 => 64,                          // max block dim z
        5 => i32::MAX,                    // max grid dim x
        6 | 7 => 65535,                   // max grid dim y, z
        8 => MAX_SHARED_DEFAULT as c_int, // shared memory per block
        9 => 65536,                       // constant memory
        10 => 32,                         // warp size
        12 => 65536,                      // registers per block
        13 => 1_980_000,                  // clock rate (kHz)
        16 => MULTIPROCESSORS as c_int,   // multiprocessors
        39 => 2048,                       // max threads per multiprocessor
        75 => 9,                          // compute capability major
        76 => 0,                          // compute capability minor
        81 => SHARED_PER_SM as c_int,     // shared memory per multiprocessor
        82 => 65536,                      // registers per multiprocessor
        95 => 1,                          // cooperative launch
        97 => MAX_SHARED_OPTIN as c_int,  // shared memory per block, opt-in
        115 => 0,                         // memory pools: none (cudarc then allocates synchronously)
        _ => 0,
    };
    SUCCESS
}

fn primary_ctx() -> *mut c_void {
    static CTX: u64 = 0xC0C0;
    &CTX as *const u64 as *mut c_void
}

thread_local! {
    static CURRENT: std::cell::Cell<*mut c_void> = const { std::cell::Cell::new(std::ptr::null_mut()) };
}

#[no_mangle]
pub unsafe extern "C" fn cuDevicePrimaryCtxRetain(ctx: *mut *mut c_void, dev: c_int) -> CUresult {
    if ctx.is_null() {
        return INVALID_VALUE;
    }
    if dev != 0 {
        return INVALID_DEVICE;
    }
    lock().ctx_refs += 1;
    *ctx = primary_ctx();
    SUCCESS
}

#[no_mangle]
pub extern "C" fn cuDevicePrimaryCtxRelease_v2(_dev: c_int) -> CUresult {
    let mut s = lock();
    s.ctx_refs = s.ctx_refs.saturating_sub(1);
    if s.ctx_refs == 0 {
        // As a reset of the primary context: a sticky fault and the copies queued in it are
        // gone with it.
        s.sticky = None;
        drop(s);
        streams::clear();
    }
    SUCCESS
}

#[no_mangle]
pub extern "C" fn cuDevicePrimaryCtxReset_v2(_dev: c_int) -> CUresult {
    lock().sticky = None;
    streams::clear();
    SUCCESS
}

#[no_mangle]
pub extern "C" fn cuCtxSetCurrent(ctx: *mut c_void) -> CUresult {
    CURRENT.with(|c| c.set(ctx));
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetCurrent(ctx: *mut *mut c_void) -> CUresult {
    if ctx.is_null() {
        return INVALID_VALUE;
    }
    *ctx = CURRENT.with(|c| c.get());
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuCtxGetDevice(dev: *mut c_int) -> CUresult {
    if dev.is_null() {
        return INVALID_VALUE;
    }
    *dev = 0;
    SUCCESS
}

#[no_mangle]
pub extern "C" fn cuCtxSynchronize() -> CUresult {
    if let Some(e) = graph::refuse(None, false, "cuCtxSynchronize") {
        return e;
    }
    or_sticky(streams::drain_all())
}

/// `r` if it is a failure, else the context's sticky fault, if any.
fn or_sticky(r: CUresult) -> CUresult {
    if r != SUCCESS {
        return r;
    }
    sticky().unwrap_or(SUCCESS)
}

// ---- streams and events -----------------------------------------------------------------------

#[no_mangle]
pub unsafe extern "C" fn cuStreamCreate(s: *mut *mut c_void, _flags: c_uint) -> CUresult {
    if s.is_null() {
        return INVALID_VALUE;
    }
    *s = Box::into_raw(Box::new(0u64)) as *mut c_void;
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamCreateWithPriority(s: *mut *mut c_void, flags: c_uint, _p: c_int) -> CUresult {
    cuStreamCreate(s, flags)
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamDestroy_v2(s: *mut c_void) -> CUresult {
    // Work queued on a destroyed stream still runs (CUDA's documented behaviour).
    let r = streams::drain(s as u64, None);
    if r != SUCCESS {
        return r;
    }
    if !s.is_null() {
        drop(Box::from_raw(s as *mut u64));
    }
    SUCCESS
}

#[no_mangle]
pub extern "C" fn cuStreamSynchronize(s: *mut c_void) -> CUresult {
    if let Some(e) = graph::refuse(Some(s as u64), false, "cuStreamSynchronize") {
        return e;
    }
    or_sticky(streams::drain(s as u64, None))
}

#[no_mangle]
pub extern "C" fn cuStreamQuery(s: *mut c_void) -> CUresult {
    if let Some(e) = graph::refuse(Some(s as u64), false, "cuStreamQuery") {
        return e;
    }
    // Not ready while a copy waits on it: the device gets to it only when something orders it.
    if streams::waiting(s as u64, None) {
        return sticky().unwrap_or(NOT_READY);
    }
    sticky().unwrap_or(SUCCESS)
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamWaitEvent(s: *mut c_void, e: *mut c_void, _flags: c_uint) -> CUresult {
    if e.is_null() {
        return INVALID_HANDLE;
    }
    let event = &*(e as *mut Event);
    // A stream waiting for its own event orders nothing new. Another's: later work on the
    // waiting stream runs at once, so what the event follows runs now.
    if event.recorded.is_some_and(|(stream, _)| stream == s as u64) {
        return sticky().unwrap_or(SUCCESS);
    }
    or_sticky(event_done(event))
}

struct Event {
    at: Option<Instant>,
    /// The stream it was last recorded on and its place there (`streams::position`).
    recorded: Option<(u64, u64)>,
}

/// Runs the copies an event follows.
fn event_done(e: &Event) -> CUresult {
    match e.recorded {
        Some((stream, at)) => streams::drain(stream, Some(at)),
        None => SUCCESS,
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuEventCreate(e: *mut *mut c_void, _flags: c_uint) -> CUresult {
    if e.is_null() {
        return INVALID_VALUE;
    }
    *e = Box::into_raw(Box::new(Event { at: None, recorded: None })) as *mut c_void;
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuEventRecord(e: *mut c_void, s: *mut c_void) -> CUresult {
    if e.is_null() {
        return INVALID_HANDLE;
    }
    if let Some(err) = graph::refuse(Some(s as u64), false, "cuEventRecord (event nodes are not emulated)") {
        return err;
    }
    let event = &mut *(e as *mut Event);
    event.at = Some(Instant::now());
    event.recorded = Some((s as u64, streams::position()));
    sticky().unwrap_or(SUCCESS)
}

#[no_mangle]
pub unsafe extern "C" fn cuEventRecordWithFlags(e: *mut c_void, s: *mut c_void, _flags: c_uint) -> CUresult {
    cuEventRecord(e, s)
}

#[no_mangle]
pub unsafe extern "C" fn cuEventSynchronize(e: *mut c_void) -> CUresult {
    if e.is_null() {
        return INVALID_HANDLE;
    }
    or_sticky(event_done(&*(e as *mut Event)))
}

#[no_mangle]
pub unsafe extern "C" fn cuEventQuery(e: *mut c_void) -> CUresult {
    if e.is_null() {
        return INVALID_HANDLE;
    }
    // As cuStreamQuery: not ready while a copy the event follows still waits.
    if let Some((stream, at)) = (*(e as *mut Event)).recorded {
        if streams::waiting(stream, Some(at)) {
            return sticky().unwrap_or(NOT_READY);
        }
    }
    sticky().unwrap_or(SUCCESS)
}

#[no_mangle]
pub unsafe extern "C" fn cuEventElapsedTime(ms: *mut f32, start: *mut c_void, end: *mut c_void) -> CUresult {
    if ms.is_null() || start.is_null() || end.is_null() {
        return INVALID_VALUE;
    }
    match ((*(start as *mut Event)).at, (*(end as *mut Event)).at) {
        (Some(a), Some(b)) => {
            *ms = b.saturating_duration_since(a).as_secs_f32() * 1000.0;
            SUCCESS
        }
        _ => INVALID_HANDLE,
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuEventElapsedTime_v2(ms: *mut f32, start: *mut c_void, end: *mut c_void) -> CUresult {
    cuEventElapsedTime(ms, start, end)
}

#[no_mangle]
pub unsafe extern "C" fn cuEventDestroy_v2(e: *mut c_void) -> CUresult {
    if !e.is_null() {
        drop(Box::from_raw(e as *mut Event));
    }
    SUCCESS
}

// ---- memory -------------------------------------------------------------------------------------

#[no_mangle]
pub unsafe extern "C" fn cuMemAlloc_v2(ptr: *mut u64, bytes: usize) -> CUresult {
    if ptr.is_null() {
        return INVALID_VALUE;
    }
    if let Some(c) = sticky() {
        return c;
    }
    if bytes == 0 {
        return INVALID_VALUE;
    }
    if let Some(e) = graph::refuse(None, true, "cuMemAlloc") {
        return e;
    }
    let mut s = lock();
    if s.used.saturating_add(bytes as u64) > total_memory() {
        return OUT_OF_MEMORY;
    }
    // 256-byte aligned, as cuMemAlloc guarantees.
    let Ok(layout) = Layout::from_size_align(bytes, 256) else { return OUT_OF_MEMORY };
    let p = std::alloc::alloc(layout);
    if p.is_null() {
        return OUT_OF_MEMORY;
    }
    // Fresh device memory is garbage on the GPU: NaN bytes here, so a read of an element
    // nobody wrote shows up.
    std::ptr::write_bytes(p, 0xff, bytes);
    s.allocs.insert(p as u64, (bytes as u64, layout));
    s.used += bytes as u64;
    s.snapshot = None;
    *ptr = p as u64;
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuMemFree_v2(ptr: u64) -> CUresult {
    if let Some(e) = graph::refuse(None, true, "cuMemFree") {
        return e;
    }
    // A free waits for the device, queued copies included.
    let r = streams::drain_all();
    if r != SUCCESS {
        return r;
    }
    let mut s = lock();
    match s.allocs.remove(&ptr) {
        Some((n, layout)) => {
            std::alloc::dealloc(ptr as *mut u8, layout);
            s.used -= n;
            s.snapshot = None;
            SUCCESS
        }
        None => {
            drop(s);
            fail(INVALID_VALUE, format!("cuMemFree: {ptr:#x} is not the start of a live allocation"))
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuMemGetInfo_v2(free: *mut usize, total: *mut usize) -> CUresult {
    if free.is_null() || total.is_null() {
        return INVALID_VALUE;
    }
    let used = lock().used;
    *total = total_memory() as usize;
    *free = total_memory().saturating_sub(used) as usize;
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuMemAllocHost_v2(p: *mut *mut c_void, bytes: usize) -> CUresult {
    if p.is_null() {
        return INVALID_VALUE;
    }
    let Ok(layout) = Layout::from_size_align(bytes.max(1) + 64, 64) else { return OUT_OF_MEMORY };
    let base = std::alloc::alloc(layout);
    if base.is_null() {
        return OUT_OF_MEMORY;
    }
    // The size rides in front of the block so cuMemFreeHost can rebuild the layout.
    *(base as *mut usize) = bytes.max(1) + 64;
    *p = base.add(64) as *mut c_void;
    pinned_blocks().insert(base.add(64) as u64, bytes);
    SUCCESS
}

/// Live pinned host blocks (`cuMemAllocHost`): start → bytes.
fn pinned_blocks() -> std::sync::MutexGuard<'static, BTreeMap<u64, usize>> {
    static P: OnceLock<Mutex<BTreeMap<u64, usize>>> = OnceLock::new();
    P.get_or_init(|| Mutex::new(BTreeMap::new())).lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether host bytes `[p, p + bytes)` lie inside one pinned block.
pub fn pinned(p: u64, bytes: usize) -> bool {
    pinned_blocks().range(..=p).next_back().is_some_and(|(&s, &n)| p + bytes as u64 <= s + n as u64)
}

#[no_mangle]
pub unsafe extern "C" fn cuMemHostAlloc(p: *mut *mut c_void, bytes: usize, _flags: c_uint) -> CUresult {
    cuMemAllocHost_v2(p, bytes)
}

#[no_mangle]
pub unsafe extern "C" fn cuMemFreeHost(p: *mut c_void) -> CUresult {
    if p.is_null() {
        return SUCCESS;
    }
    let r = streams::drain_all();
    if r != SUCCESS {
        return r;
    }
    pinned_blocks().remove(&(p as u64));
    let base = (p as *mut u8).sub(64);
    let size = *(base as *mut usize);
    match Layout::from_size_align(size, 64) {
        Ok(l) => {
            std::alloc::dealloc(base, l);
            SUCCESS
        }
        Err(_) => INVALID_VALUE,
    }
}

pub(crate) fn run_copy(dst: u64, src: u64, bytes: usize, what: &str, check_dst: bool, check_src: bool) -> CUresult {
    if let Some(c) = sticky() {
        return c;
    }
    if bytes == 0 {
        return SUCCESS;
    }
    if check_dst {
        if let Err(e) = check_range(dst, bytes as u64, &format!("{what} destination")) {
            return fail(INVALID_VALUE, e);
        }
    }
    if check_src {
        if let Err(e) = check_range(src, bytes as u64, &format!("{what} source")) {
            return fail(INVALID_VALUE, e);
        }
    }
    // SAFETY: device ranges were checked; host ranges are the caller's contract, as with CUDA.
    unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, bytes) };
    SUCCESS
}

#[no_mangle]
pub extern "C" fn cuMemcpyHtoD_v2(dst: u64, src: *const c_void, bytes: usize) -> CUresult {
    host_copy(None, dst, src as u64, bytes, "cuMemcpyHtoD", true, false)
}

#[no_mangle]
pub extern "C" fn cuMemcpyHtoDAsync_v2(dst: u64, src: *const c_void, bytes: usize, s: *mut c_void) -> CUresult {
    if let Some(e) = graph::refuse(Some(s as u64), false, "cuMemcpyHtoDAsync") {
        return e;
    }
    queue_copy(s as u64, dst, src as u64, bytes, false, "cuMemcpyHtoDAsync")
}

#[no_mangle]
pub extern "C" fn cuMemcpyDtoH_v2(dst: *mut c_void, src: u64, bytes: usize) -> CUresult {
    host_copy(None, dst as u64, src, bytes, "cuMemcpyDtoH", false, true)
}

#[no_mangle]
pub extern "C" fn cuMemcpyDtoHAsync_v2(dst: *mut c_void, src: u64, bytes: usize, s: *mut c_void) -> CUresult {
    if graph::status(s as u64) == 0 {
        let reads = [streams::Access::new(src, bytes as u64, false)];
        if let Some(e) = streams::before(s as u64, &reads, "cuMemcpyDtoHAsync") {
            return e;
        }
    }
    host_copy(Some(s as u64), dst as u64, src, bytes, "cuMemcpyDtoHAsync", false, true)
}

#[no_mangle]
pub extern "C" fn cuMemcpyDtoD_v2(dst: u64, src: u64, bytes: usize) -> CUresult {
    if let Some(e) = graph::refuse(None, true, "cuMemcpyDtoD (synchronous)") {
        return e;
    }
    let touched = [streams::Access::new(dst, bytes as u64, true), streams::Access::new(src, bytes as u64, false)];
    if let Some(e) = streams::before(0, &touched, "cuMemcpyDtoD") {
        return e;
    }
    run_copy(dst, src, bytes, "cuMemcpyDtoD", true, true)
}

#[no_mangle]
pub extern "C" fn cuMemcpyDtoDAsync_v2(dst: u64, src: u64, bytes: usize, s: *mut c_void) -> CUresult {
    if let Some(c) = sticky() {
        return c;
    }
    if graph::status(s as u64) != 0 {
        return submit(s as u64, graph::Node::Copy { dst, src, bytes });
    }
    queue_copy(s as u64, dst, src, bytes, true, "cuMemcpyDtoDAsync")
}

/// Checks a copy's device ranges now (as the driver checks its arguments) and queues it on
/// `stream` (`streams.rs`).
fn queue_copy(stream: u64, dst: u64, src: u64, bytes: usize, src_on_device: bool, what: &'static str) -> CUresult {
    if let Some(c) = sticky() {
        return c;
    }
    if bytes == 0 {
        return SUCCESS;
    }
    if let Err(e) = check_range(dst, bytes as u64, &format!("{what} destination")) {
        return fail(INVALID_VALUE, e);
    }
    if src_on_device {
        if let Err(e) = check_range(src, bytes as u64, &format!("{what} source")) {
            return fail(INVALID_VALUE, e);
        }
    }
    // SAFETY: the caller's host source holds `bytes` now (CUDA's contract) and, if pinned,
    // until the copy has run (as on a GPU).
    unsafe { streams::enqueue(stream, dst, src, bytes, src_on_device, what) };
    SUCCESS
}

/// A copy between host and device: never captured (the graph would keep the host pointer).
fn host_copy(
    stream: Option<u64>,
    dst: u64,
    src: u64,
    bytes: usize,
    what: &str,
    check_dst: bool,
    check_src: bool,
) -> CUresult {
    let refused = match stream {
        Some(s) => graph::refuse(Some(s), false, what),
        None => graph::refuse(None, true, what),
    };
    if let Some(e) = refused {
        return e;
    }
    if stream.is_none() {
        // A synchronous copy goes on the legacy stream, which orders it after that stream's
        // work only (every stream here is non-blocking, as cudarc makes them).
        let mut touched = Vec::new();
        if check_dst {
            touched.push(streams::Access::new(dst, bytes as u64, true));
        }
        if check_src {
            touched.push(streams::Access::new(src, bytes as u64, false));
        }
        if let Some(e) = streams::before(0, &touched, what) {
            return e;
        }
    }
    run_copy(dst, src, bytes, what, check_dst, check_src)
}

/// Puts recorded-or-run work on `stream`: captured if it captures, else run now.
fn submit(stream: u64, node: graph::Node) -> CUresult {
    match graph::record(stream, node) {
        None => SUCCESS,
        Some(n) => match streams::before(stream, &n.accesses(), n.what()) {
            Some(e) => e,
            None => n.run(),
        },
    }
}

pub(crate) fn run_memset(dst: u64, value: u32, width: usize, n: usize, what: &str) -> CUresult {
    if let Some(c) = sticky() {
        return c;
    }
    if n == 0 {
        return SUCCESS;
    }
    if let Err(e) = check_range(dst, (n * width) as u64, what) {
        return fail(INVALID_VALUE, e);
    }
    if !dst.is_multiple_of(width as u64) {
        return fail(INVALID_VALUE, format!("{what}: {dst:#x} is not {width}-byte aligned"));
    }
    // SAFETY: the range was checked against the live allocations.
    unsafe {
        match width {
            1 => std::ptr::write_bytes(dst as *mut u8, value as u8, n),
            2 => std::slice::from_raw_parts_mut(dst as *mut u16, n).fill(value as u16),
            _ => std::slice::from_raw_parts_mut(dst as *mut u32, n).fill(value),
        }
    }
    SUCCESS
}

/// A memset on a stream (captured when it captures), or a synchronous one.
fn memset(stream: Option<u64>, dst: u64, value: u32, width: usize, n: usize, what: &str) -> CUresult {
    if let Some(c) = sticky() {
        return c;
    }
    match stream {
        Some(s) => submit(s, graph::Node::Memset { dst, value, width, n }),
        None => match graph::refuse(None, true, what) {
            Some(e) => e,
            None => match streams::before(0, &[streams::Access::new(dst, (n * width) as u64, true)], what) {
                Some(e) => e,
                None => run_memset(dst, value, width, n, what),
            },
        },
    }
}

#[no_mangle]
pub extern "C" fn cuMemsetD8_v2(dst: u64, v: u8, n: usize) -> CUresult {
    memset(None, dst, v as u32, 1, n, "cuMemsetD8")
}
#[no_mangle]
pub extern "C" fn cuMemsetD8Async(dst: u64, v: u8, n: usize, s: *mut c_void) -> CUresult {
    memset(Some(s as u64), dst, v as u32, 1, n, "cuMemsetD8Async")
}
#[no_mangle]
pub extern "C" fn cuMemsetD16_v2(dst: u64, v: u16, n: usize) -> CUresult {
    memset(None, dst, v as u32, 2, n, "cuMemsetD16")
}
#[no_mangle]
pub extern "C" fn cuMemsetD16Async(dst: u64, v: u16, n: usize, s: *mut c_void) -> CUresult {
    memset(Some(s as u64), dst, v as u32, 2, n, "cuMemsetD16Async")
}
#[no_mangle]
pub extern "C" fn cuMemsetD32_v2(dst: u64, v: u32, n: usize) -> CUresult {
    memset(None, dst, v, 4, n, "cuMemsetD32")
}
#[no_mangle]
pub extern "C" fn cuMemsetD32Async(dst: u64, v: u32, n: usize, s: *mut c_void) -> CUresult {
    memset(Some(s as u64), dst, v, 4, n, "cuMemsetD32Async")
}

// ---- modules and launches -----------------------------------------------------------------------

struct Function {
    kernel: Arc<ptx::Kernel>,
    max_dynamic_shared: AtomicU32,
}

struct Module {
    functions: HashMap<String, Box<Function>>,
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleLoadData(module: *mut *mut c_void, image: *const c_void) -> CUresult {
    if module.is_null() || image.is_null() {
        return INVALID_VALUE;
    }
    // The image's length is not passed: a fatbin says it in its header, PTX ends with a NUL.
    let head = std::slice::from_raw_parts(image as *const u8, 16);
    let len = if u32::from_le_bytes([head[0], head[1], head[2], head[3]]) == 0xBA55_ED50 {
        16 + u64::from_le_bytes(head[8..16].try_into().unwrap_or([0; 8])) as usize
    } else {
        CStr::from_ptr(image as *const c_char).to_bytes().len()
    };
    let bytes = std::slice::from_raw_parts(image as *const u8, len);
    guard(|| {
        let text = match ptx::ptx_of_image(bytes) {
            Ok(t) => t,
            Err(e) => return fail(INVALID_IMAGE, format!("cuModuleLoadData: {e}")),
        };
        let m = match ptx::parse_module(&text) {
            Ok(m) => m,
            Err(e) => return fail(INVALID_IMAGE, format!("cuModuleLoadData: {e}")),
        };
        let functions = m
            .kernels
            .into_iter()
            .map(|(n, k)| {
                (n, Box::new(Function { kernel: k, max_dynamic_shared: AtomicU32::new(MAX_SHARED_DEFAULT as u32) }))
            })
            .collect();
        *module = Box::into_raw(Box::new(Module { functions })) as *mut c_void;
        SUCCESS
    })
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleUnload(module: *mut c_void) -> CUresult {
    if !module.is_null() {
        drop(Box::from_raw(module as *mut Module));
    }
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuModuleGetFunction(
    f: *mut *mut c_void,
    module: *mut c_void,
    name: *const c_char,
) -> CUresult {
    if f.is_null() || module.is_null() || name.is_null() {
        return INVALID_VALUE;
    }
    let m = &*(module as *const Module);
    let n = CStr::from_ptr(name).to_string_lossy();
    match m.functions.get(n.as_ref()) {
        Some(func) => {
            *f = &**func as *const Function as *mut c_void;
            SUCCESS
        }
        None => fail(NOT_FOUND, format!("cuModuleGetFunction: no kernel `{n}` in the module")),
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuFuncSetAttribute(f: *mut c_void, attr: c_int, value: c_int) -> CUresult {
    if f.is_null() {
        return INVALID_HANDLE;
    }
    let func = &*(f as *const Function);
    match attr {
        // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        8 => {
            let limit = MAX_SHARED_OPTIN.saturating_sub(func.kernel.static_shared);
            if value < 0 || value as u64 > limit {
                return fail(
                    INVALID_VALUE,
                    format!(
                        "cuFuncSetAttribute({}): {value} bytes of dynamic shared memory exceed the {limit} left of {MAX_SHARED_OPTIN} after {} static",
                        func.kernel.name, func.kernel.static_shared
                    ),
                );
            }
            func.max_dynamic_shared.store(value as u32, Ordering::Relaxed);
            SUCCESS
        }
        _ => SUCCESS,
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuFuncGetAttribute(v: *mut c_int, attr: c_int, f: *mut c_void) -> CUresult {
    if v.is_null() || f.is_null() {
        return INVALID_VALUE;
    }
    let func = &*(f as *const Function);
    let k = &func.kernel;
    *v = match attr {
        0 => k.maxntid.map(|(x, y, z)| (x * y * z) as c_int).unwrap_or(1024),
        1 => k.static_shared as c_int,
        4 => 32,
        8 => func.max_dynamic_shared.load(Ordering::Relaxed) as c_int,
        _ => 0,
    };
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuLaunchKernel(
    f: *mut c_void,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    shared: c_uint,
    stream: *mut c_void,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
) -> CUresult {
    launch(f, [gx, gy, gz], [bx, by, bz], shared, stream as u64, params, extra, false)
}

/// A launch whose blocks must all be resident at once (a grid-wide barrier inside): the
/// driver refuses a grid larger than the device holds, and the emulator runs every block on
/// its own host thread.
#[no_mangle]
pub unsafe extern "C" fn cuLaunchCooperativeKernel(
    f: *mut c_void,
    gx: c_uint,
    gy: c_uint,
    gz: c_uint,
    bx: c_uint,
    by: c_uint,
    bz: c_uint,
    shared: c_uint,
    stream: *mut c_void,
    params: *mut *mut c_void,
) -> CUresult {
    launch(f, [gx, gy, gz], [bx, by, bz], shared, stream as u64, params, std::ptr::null_mut(), true)
}

#[allow(clippy::too_many_arguments)]
unsafe fn launch(
    f: *mut c_void,
    [gx, gy, gz]: [c_uint; 3],
    [bx, by, bz]: [c_uint; 3],
    shared: c_uint,
    stream: u64,
    params: *mut *mut c_void,
    extra: *mut *mut c_void,
    cooperative: bool,
) -> CUresult {
    if f.is_null() {
        return INVALID_HANDLE;
    }
    if let Some(c) = sticky() {
        return c;
    }
    let func = &*(f as *const Function);
    let k = func.kernel.clone();
    let name = &k.name;
    let cfg = format!("grid ({gx},{gy},{gz}) block ({bx},{by},{bz}) shared {shared}");
    // The hardware's launch limits, checked as the driver does.
    if gx == 0 || gy == 0 || gz == 0 || bx == 0 || by == 0 || bz == 0 {
        return fail(INVALID_VALUE, format!("cuLaunchKernel({name}): {cfg}: a zero dimension"));
    }
    if gy > 65535 || gz > 65535 || gx > i32::MAX as c_uint {
        return fail(
            INVALID_VALUE,
            format!("cuLaunchKernel({name}): {cfg}: grid y and z are at most 65535, x at most 2^31-1"),
        );
    }
    if bx > 1024 || by > 1024 || bz > 64 || bx as u64 * by as u64 * bz as u64 > 1024 {
        return fail(
            INVALID_VALUE,
            format!("cuLaunchKernel({name}): {cfg}: at most 1024 threads per block (z at most 64)"),
        );
    }
    let threads = bx * by * bz;
    if let Some((x, y, z)) = k.maxntid {
        if threads > x * y * z {
            return fail(
                LAUNCH_OUT_OF_RESOURCES,
                format!(
                    "cuLaunchKernel({name}): {cfg}: {threads} threads exceed the kernel's __launch_bounds__ of {}",
                    x * y * z
                ),
            );
        }
    }
    if let Some((x, y, z)) = k.reqntid {
        if (bx, by, bz) != (x, y, z) {
            return fail(
                INVALID_VALUE,
                format!("cuLaunchKernel({name}): {cfg}: the kernel requires a block of ({x},{y},{z})"),
            );
        }
    }
    let limit = func.max_dynamic_shared.load(Ordering::Relaxed) as u64;
    if shared as u64 > limit {
        return fail(
            INVALID_VALUE,
            format!(
                "cuLaunchKernel({name}): {cfg}: {shared} bytes of dynamic shared memory exceed the {limit} allowed (raise CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, at most {MAX_SHARED_OPTIN})"
            ),
        );
    }
    if k.dynamic_offset + shared as u64 > MAX_SHARED_OPTIN {
        return fail(
            INVALID_VALUE,
            format!("cuLaunchKernel({name}): {cfg}: static + dynamic shared memory exceed {MAX_SHARED_OPTIN} bytes"),
        );
    }
    if !extra.is_null() {
        return fail(NOT_SUPPORTED, format!("cuLaunchKernel({name}): the `extra` parameter form is not emulated"));
    }
    if cooperative {
        // Blocks one multiprocessor holds at once, by threads (whole warps), shared memory
        // and the block limit; registers are not modelled.
        let warps = threads.div_ceil(32) as u64;
        let smem = (k.dynamic_offset + shared as u64).max(k.static_shared).max(1);
        let per_sm = (2048 / 32 / warps).min(SHARED_PER_SM / smem).min(32);
        let blocks = gx as u64 * gy as u64 * gz as u64;
        if blocks > MULTIPROCESSORS * per_sm {
            return fail(
                COOPERATIVE_LAUNCH_TOO_LARGE,
                format!(
                    "cuLaunchCooperativeKernel({name}): {cfg}: {blocks} blocks, but {MULTIPROCESSORS} multiprocessors hold {per_sm} each at once"
                ),
            );
        }
    }
    if params.is_null() && !k.params.is_empty() {
        return fail(
            INVALID_VALUE,
            format!("cuLaunchKernel({name}): no kernelParams for {} parameters", k.params.len()),
        );
    }
    let mut buf = vec![0u8; k.param_bytes as usize];
    for (i, p) in k.params.iter().enumerate() {
        let src = *params.add(i);
        if src.is_null() {
            return fail(
                INVALID_VALUE,
                format!("cuLaunchKernel({name}): parameter {i} ({}) is a null pointer", p.name),
            );
        }
        std::ptr::copy_nonoverlapping(src as *const u8, buf.as_mut_ptr().add(p.offset as usize), p.bytes as usize);
    }
    let node =
        graph::Node::Kernel { kernel: k, grid: [gx, gy, gz], block: [bx, by, bz], shared, params: buf, cooperative };
    submit(stream, node)
}

/// Runs one validated launch now (from `cuLaunchKernel`, or a graph's kernel node).
pub(crate) fn run_kernel(
    k: Arc<ptx::Kernel>,
    grid: [c_uint; 3],
    block: [c_uint; 3],
    shared: c_uint,
    params: &[u8],
    cooperative: bool,
) -> CUresult {
    if let Some(c) = sticky() {
        return c;
    }
    let allocs = allocations();
    guard(move || {
        let launch = exec::Launch {
            grid,
            block,
            dynamic_shared: shared as u64,
            params,
            allocs: &allocs,
            co_resident: cooperative,
        };
        match exec::launch(&k, &launch) {
            Ok(()) => SUCCESS,
            Err(e) => {
                let code = if e.contains("misaligned") {
                    MISALIGNED_ADDRESS
                } else if e.contains("race") || e.contains("deadlock") || e.contains("mask") || e.contains("endless") {
                    LAUNCH_FAILED
                } else {
                    ILLEGAL_ADDRESS
                };
                fault(code, e)
            }
        }
    })
}

// ---- stream capture and graphs (graph.rs) -------------------------------------------------------

#[no_mangle]
pub extern "C" fn cuStreamBeginCapture_v2(s: *mut c_void, mode: c_int) -> CUresult {
    if let Some(c) = sticky() {
        return c;
    }
    graph::begin(s as u64, mode)
}

#[no_mangle]
pub extern "C" fn cuStreamBeginCapture(s: *mut c_void, mode: c_int) -> CUresult {
    cuStreamBeginCapture_v2(s, mode)
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamEndCapture(s: *mut c_void, out: *mut *mut c_void) -> CUresult {
    if out.is_null() {
        return INVALID_VALUE;
    }
    *out = std::ptr::null_mut();
    match graph::end(s as u64) {
        Ok(g) => {
            *out = Box::into_raw(Box::new(g)) as *mut c_void;
            sticky().unwrap_or(SUCCESS)
        }
        Err(e) => e,
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuStreamIsCapturing(s: *mut c_void, status: *mut c_int) -> CUresult {
    if status.is_null() {
        return INVALID_VALUE;
    }
    *status = graph::status(s as u64);
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuGraphInstantiateWithFlags(exec: *mut *mut c_void, g: *mut c_void, _flags: u64) -> CUresult {
    if exec.is_null() || g.is_null() {
        return INVALID_VALUE;
    }
    let nodes = (*(g as *mut graph::Graph)).nodes.clone();
    *exec = Box::into_raw(Box::new(graph::Graph { nodes })) as *mut c_void;
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuGraphLaunch(exec: *mut c_void, s: *mut c_void) -> CUresult {
    if exec.is_null() {
        return INVALID_HANDLE;
    }
    if let Some(c) = sticky() {
        return c;
    }
    graph::launch(&*(exec as *mut graph::Graph), s as u64)
}

#[no_mangle]
pub extern "C" fn cuGraphUpload(exec: *mut c_void, _s: *mut c_void) -> CUresult {
    if exec.is_null() {
        return INVALID_HANDLE;
    }
    sticky().unwrap_or(SUCCESS)
}

#[no_mangle]
pub unsafe extern "C" fn cuGraphExecDestroy(exec: *mut c_void) -> CUresult {
    if !exec.is_null() {
        drop(Box::from_raw(exec as *mut graph::Graph));
    }
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuGraphDestroy(g: *mut c_void) -> CUresult {
    if !g.is_null() {
        drop(Box::from_raw(g as *mut graph::Graph));
    }
    SUCCESS
}

// ---- errors ---------------------------------------------------------------------------------------

fn error_name(code: CUresult) -> &'static CStr {
    match code {
        SUCCESS => c"CUDA_SUCCESS",
        INVALID_VALUE => c"CUDA_ERROR_INVALID_VALUE",
        OUT_OF_MEMORY => c"CUDA_ERROR_OUT_OF_MEMORY",
        NOT_INITIALIZED => c"CUDA_ERROR_NOT_INITIALIZED",
        INVALID_DEVICE => c"CUDA_ERROR_INVALID_DEVICE",
        INVALID_IMAGE => c"CUDA_ERROR_INVALID_IMAGE",
        INVALID_HANDLE => c"CUDA_ERROR_INVALID_HANDLE",
        NOT_FOUND => c"CUDA_ERROR_NOT_FOUND",
        ILLEGAL_ADDRESS => c"CUDA_ERROR_ILLEGAL_ADDRESS",
        LAUNCH_OUT_OF_RESOURCES => c"CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES",
        MISALIGNED_ADDRESS => c"CUDA_ERROR_MISALIGNED_ADDRESS",
        LAUNCH_FAILED => c"CUDA_ERROR_LAUNCH_FAILED",
        NOT_READY => c"CUDA_ERROR_NOT_READY",
        NOT_SUPPORTED => c"CUDA_ERROR_NOT_SUPPORTED",
        COOPERATIVE_LAUNCH_TOO_LARGE => c"CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE",
        graph::ILLEGAL_STATE => c"CUDA_ERROR_ILLEGAL_STATE",
        graph::CAPTURE_UNSUPPORTED => c"CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED",
        graph::CAPTURE_INVALIDATED => c"CUDA_ERROR_STREAM_CAPTURE_INVALIDATED",
        _ => c"CUDA_ERROR_UNKNOWN",
    }
}

#[no_mangle]
pub unsafe extern "C" fn cuGetErrorName(code: CUresult, out: *mut *const c_char) -> CUresult {
    if out.is_null() {
        return INVALID_VALUE;
    }
    *out = error_name(code).as_ptr();
    SUCCESS
}

#[no_mangle]
pub unsafe extern "C" fn cuGetErrorString(code: CUresult, out: *mut *const c_char) -> CUresult {
    if out.is_null() {
        return INVALID_VALUE;
    }
    let detailed = messages().lock().ok().and_then(|m| m.get(&code).copied());
    *out = match detailed {
        Some(m) => m.as_ptr(),
        None => c"emulated device error".as_ptr(),
    };
    SUCCESS
}

// ---- for the cuBLAS stand-in ----------------------------------------------------------------------

/// Called by `libcublas.so` (the stand-in): fails like a kernel fault, sticky.
#[no_mangle]
pub unsafe extern "C" fn semshare_emu_fault(msg: *const c_char) -> CUresult {
    let m = if msg.is_null() { "cuBLAS fault".into() } else { CStr::from_ptr(msg).to_string_lossy().into_owned() };
    fault(ILLEGAL_ADDRESS, m)
}

/// Called by `libcublas.so`: whether the context is sticky-failed (0 if not).
#[no_mangle]
pub extern "C" fn semshare_emu_sticky() -> CUresult {
    sticky().unwrap_or(SUCCESS)
}

/// Called by `libcublas.so`: column-major strided-batched SGEMM with range checks.
/// Returns 0, or writes a message to `err` (a buffer of `err_len` bytes) and returns 1.
#[no_mangle]
pub unsafe extern "C" fn semshare_emu_sgemm(g: *const gemm::Sgemm, err: *mut c_char, err_len: usize) -> c_int {
    if g.is_null() {
        return 1;
    }
    let g = &*g;
    let Some(node) = graph::record(g.stream, graph::Node::Sgemm(*g)) else {
        return 0;
    };
    let result = match streams::before(g.stream, &node.accesses(), node.what()) {
        Some(_) => Err(lock().sticky.as_ref().map(|(_, m)| m.clone()).unwrap_or_default()),
        None => std::panic::catch_unwind(|| gemm::run(g))
            .unwrap_or_else(|_| Err("internal emulator error in sgemm".into())),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            if !err.is_null() && err_len > 0 {
                let b = e.as_bytes();
                let n = b.len().min(err_len - 1);
                std::ptr::copy_nonoverlapping(b.as_ptr() as *const c_char, err, n);
                *err.add(n) = 0;
            }
            1
        }
    }
}
