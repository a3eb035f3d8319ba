//! The CUDA backend: our kernels (`kernels/*.cu`, one embedded fatbin) and cuBLAS GEMMs behind
//! the same `Backend` trait as the CPU twin.
//!
//! # For kernel authors: launching a kernel
//! ```ignore
//! use crate::backend::cuda::{Arg, Cuda, blocks};
//! // inside an op of `impl Backend for Cuda` (or a helper taking `&mut Cuda`):
//! let y = self.alloc_tensor(x.shape())?;                   // from the caching pool
//! self.launch("gelu_fwd_f32", (blocks(n, 256), 1, 1), (256, 1, 1), 0,
//!             &[Arg::tensor(x)?, Arg::tensor(&y)?, Arg::U64(n as u64)])?;
//! ```
//! - Entry points are `extern "C"` named `<op>_<fwd|bwd>_<dtype>` and looked up by name once
//!   (cached). An unknown name or a failed launch is an `Error::Device` naming the kernel.
//! - `Arg` is the kernel's parameter list in order: `Arg::tensor(&t)`, `Arg::view(v)`,
//!   `Arg::view_mut(v)`, `Arg::ids(&ids)` give device pointers (`T*`), then `I32` (`int`),
//!   `U32`, `U64` (`size_t`, `uint64_t`), `F32` (`float`). The kernel's C signature must match.
//! - Everything runs on one stream (`self.stream`), so launches and copies are ordered and no
//!   event bookkeeping is needed; `download` synchronises.
//! - Scratch: `self.scratch(elems)` is a pooled `Tensor` returned to the pool when dropped.
//! - cuBLAS: `self.gemm_strided_batched(..)` is the row-major strided-batched GEMM (e.g.
//!   attention scores per (item, head)); `self.blas_handle()` for anything else.
//!
//! # Design
//! - Loading: `cudarc` with dynamic loading; `is_culib_present()` is checked before the first
//!   driver call (cudarc panics when libcuda is missing; we return an error).
//! - Memory: the caching allocator (`Pool`) and the buffers a tensor holds live on the tensor's
//!   floor, in `crate::tensor::device`; this backend allocates from one `Pool` per context.
//! - Precision (`Cuda::set_precision`, `--precision`): the layers' GEMMs are IEEE f32 by
//!   default, so the GPU matches the CPU reference to 1e-4 over a whole training step. `tf32`
//!   and `bf16` run them on tensor cores with fp32 storage and accumulation: cuBLAS rounds the
//!   operands as it loads them (`CUBLAS_COMPUTE_32F_FAST_TF32` / `_FAST_16BF`), so no
//!   conversion pass and no second copy of a tensor exists. Every other GEMM (top-k's scores)
//!   stays IEEE.
//! - Timing: `Cuda::event()` / `elapsed_ms` wrap CUDA events on the one stream.

pub mod attention;
mod graph;
pub mod gru;
mod lt;
mod norm;
mod ops;
mod positions;
mod step;
pub mod topk;
mod typed;
mod upload;

use std::collections::HashMap;
use std::ffi::{CString, c_void};
use std::sync::Arc;

use cudarc::cublas::sys as cublas_sys;
use cudarc::driver::sys as cu;
use cudarc::driver::{CudaContext, CudaEvent, CudaStream, result};

use crate::backend::{Counters, Gemm, Precision};
pub use crate::tensor::device::{DevBuf, DevIds, DevView, DevViewMut, Pool};
pub(crate) use crate::tensor::device::{describe, dev_err};
use crate::tensor::{DType, Ids, Storage, Tensor, View, ViewMut};
use crate::{Error, Result};

/// The kernels, compiled by build.rs (SASS sm_80 + sm_90, PTX compute_90).
static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/semshare_kernels.fatbin"));

/// Rows per block in stage 1 of the deterministic column reductions (kernels/common.cuh).
pub(crate) const COLSUM_ROWS: usize = 64;
/// Shared memory a block gets without opting in.
pub(crate) const DEFAULT_SHARED: usize = 48 * 1024;

/// The hardware's limit on grid y and z (grid x goes to 2^31 - 1).
pub(crate) const MAX_GRID_Y: usize = 65_535;

/// cuBLAS's workspace (`Cuda::new`).
const BLAS_WORKSPACE_BYTES: usize = 32 << 20;

/// Grid y for `n` rows of a kernel that strides over grid y: capped at the hardware's limit.
pub fn grid_y(n: usize) -> u32 {
    n.clamp(1, MAX_GRID_Y) as u32
}

/// Blocks of `threads` covering `n` elements, capped for grid-stride kernels (a few waves on
/// any current GPU; more blocks only add scheduling).
pub fn blocks(n: usize, threads: usize) -> u32 {
    n.div_ceil(threads).clamp(1, 65_535) as u32
}

fn blas_err(what: impl std::fmt::Display) -> impl FnOnce(cudarc::cublas::result::CublasError) -> Error {
    move |e| Error::Device { what: format!("cuBLAS: {what}: {:?}", e.0) }
}

/// Whether `SEMSHARE_GPU=emulated` asks for the emulated device instead of a GPU.
pub fn emulated() -> bool {
    matches!(emulation_requested(), Ok(true))
}

/// `SEMSHARE_GPU`: unset or empty for a GPU, `emulated` for the emulated device; any other
/// value is an error naming it, so that a typo never runs on the card (or the CPU) unnoticed.
pub fn emulation_requested() -> Result<bool> {
    match std::env::var_os("SEMSHARE_GPU") {
        None => Ok(false),
        Some(v) if v.is_empty() => Ok(false),
        Some(v) if v == "emulated" => Ok(true),
        Some(v) => Err(Error::config(format!(
            "SEMSHARE_GPU = `{}` (expected `emulated`, or unset for a GPU)",
            v.to_string_lossy()
        ))),
    }
}

/// With `SEMSHARE_GPU=emulated`: opens the emulated device's `libcuda.so`, `libcublas.so` and
/// `libcublasLt.so` (`emu/`, built by build.rs) by path, once, before cudarc's first driver
/// call. cudarc's own
/// `dlopen("libcuda.so")` then finds them by their soname, so everything below, cudarc
/// included, runs exactly as on a GPU.
fn load_emulator_if_asked() -> Result<()> {
    static LOADED: std::sync::OnceLock<std::result::Result<(), String>> = std::sync::OnceLock::new();
    if !emulation_requested()? {
        return Ok(());
    }
    let loaded = LOADED.get_or_init(|| {
        let dir = std::path::Path::new(env!("SEMSHARE_EMU_DIR"));
        for lib in ["libcuda.so", "libcublas.so", "libcublasLt.so"] {
            let path = dir.join(lib);
            // SAFETY: our own library (emu/), whose loading runs no initialisers.
            let l = unsafe { libloading::Library::new(&path) }
                .map_err(|e| format!("SEMSHARE_GPU=emulated: cannot load {}: {e}", path.display()))?;
            std::mem::forget(l); // loaded for the life of the process, as a driver is
        }
        Ok(())
    });
    loaded.clone().map_err(|what| Error::Device { what })
}

/// Whether this process can use a GPU: libcuda loads and reports at least one device.
pub fn available() -> bool {
    if load_emulator_if_asked().is_err() {
        return false;
    }
    // SAFETY: only probes for the shared library; no driver call is made if it is absent.
    if !unsafe { cu::is_culib_present() } {
        return false;
    }
    CudaContext::device_count().map(|n| n > 0).unwrap_or(false)
}

// ---- kernel arguments --------------------------------------------------------------------

/// One kernel parameter, in the order of the kernel's C signature.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    /// A device pointer (`T*`): f32 data, index data, or scratch.
    Ptr(u64),
    /// A pointer to bf16 elements (`__nv_bfloat16*`), from a bf16 tensor or view: only a
    /// kernel whose name ends in `_bf16` takes one, so that a bf16 tensor handed to an op that
    /// reads f32 is an error naming the kernel, never 2-byte values read as 4.
    Bf16(u64),
    I32(i32),
    U32(u32),
    U64(u64),
    F32(f32),
}

fn device_only(what: &str) -> Error {
    Error::Device { what: format!("{what} is not on the CUDA device (tensors from another backend?)") }
}

/// The device address of a CUDA tensor (an error for a tensor of another backend).
pub fn tensor_ptr(t: &Tensor) -> Result<u64> {
    match &t.storage {
        Storage::Cuda(b) => Ok(b.ptr()),
        #[allow(unreachable_patterns)]
        _ => Err(device_only("a tensor")),
    }
}

pub fn view_ptr(v: View) -> Result<u64> {
    match v {
        View::Cuda(d) => Ok(d.ptr()),
        #[allow(unreachable_patterns)]
        _ => Err(device_only("a view")),
    }
}

pub fn view_mut_ptr(v: &ViewMut) -> Result<u64> {
    match v {
        ViewMut::Cuda(d) => Ok(d.ptr()),
        #[allow(unreachable_patterns)]
        _ => Err(device_only("a mutable view")),
    }
}

impl Arg {
    fn typed(ptr: u64, dtype: DType) -> Arg {
        match dtype {
            DType::F32 => Arg::Ptr(ptr),
            DType::Bf16 => Arg::Bf16(ptr),
        }
    }
    pub fn tensor(t: &Tensor) -> Result<Arg> {
        tensor_ptr(t).map(|p| Arg::typed(p, t.dtype()))
    }
    pub fn view(v: View) -> Result<Arg> {
        view_ptr(v).map(|p| Arg::typed(p, v.dtype()))
    }
    pub fn view_mut(v: &ViewMut) -> Result<Arg> {
        view_mut_ptr(v).map(|p| Arg::typed(p, v.dtype()))
    }
    pub fn ids(i: &Ids) -> Result<Arg> {
        Ok(Arg::Ptr(dev_ids(i)?.ptr()))
    }
    /// A non-negative count as a C `int`, or a shape error naming the kernel.
    pub fn int(kernel: &'static str, n: usize) -> Result<Arg> {
        i32::try_from(n).map(Arg::I32).map_err(|_| Error::shape(kernel, format!("{n} exceeds a 32-bit int")))
    }
}

pub(crate) fn dev_ids(i: &Ids) -> Result<&DevIds> {
    match &i.storage {
        crate::tensor::IdStorage::Cuda(d) => Ok(d),
        #[allow(unreachable_patterns)]
        _ => Err(device_only("index data")),
    }
}

// ---- the backend -----------------------------------------------------------------------------

struct Module(cu::CUmodule);

/// Which recurrence a Bi-GRU pass runs (`Cuda::set_gru_path`; `gru.rs`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GruPath {
    /// The persistent kernel where every item fits one chunk (each step one pass over the
    /// block's W_hh slice), else step by step. Its time grows with the chunks it stages one
    /// after another: on an H200 (2026-12-04; B 128, H 512, four chunks) it took 3.42 ms
    /// forward and 8.16 ms backward, the step-by-step path 1.13 and 1.19 ms.
    #[default]
    Auto,
    /// The persistent kernel wherever it fits the device.
    Persistent,
    /// Per step one cuBLAS GEMM for both directions and each direction's gate kernel.
    BySteps,
}

pub struct Cuda {
    /// Pinned memory every upload is copied through (`upload.rs`). First: fields drop in
    /// order, and its memory goes back while the context still lives.
    uploads: upload::UploadRing,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    pool: Arc<Pool>,
    module: Module,
    functions: HashMap<&'static str, cu::CUfunction>,
    blas: cudarc::cublas::CudaBlas,
    /// cuBLASLt, for the GEMMs whose epilogue adds a bias (`lt.rs`).
    lt: lt::Lt,
    /// The arithmetic of the layers' GEMMs (`Backend::gemm`).
    precision: Precision,
    /// Which recurrence the Bi-GRU runs (`gru.rs`).
    pub(crate) gru_path: GruPath,
    device_name: String,
    /// Counted here, in the host code (`Backend::counters`); allocations and clones by the pool.
    pub(crate) counts: Counters,
    /// The position-encoding table on the device: (dim, rows, `[rows, dim]`), grown on demand.
    positions: Option<(usize, usize, Tensor)>,
    /// Input normalisations on the device (`Backend::widen_features`): each `[mean; inv_std]`
    /// as the host gave it and its `[2, dim]` copy, uploaded on first use (a few: one per
    /// modality and model).
    input_norms: Vec<(Vec<f32>, Tensor)>,
    /// Two u32 words for the grid-wide barrier of cooperative kernels (zeroed once; every
    /// barrier leaves its count at zero again).
    grid_barrier: Option<Tensor>,
    /// One u32 per column strip for the one-launch column sums (zero between launches: each
    /// strip's last block resets its word), grown on demand.
    strip_counters: Option<Tensor>,
    /// The dropout salt (`Backend::set_dropout_salt`): a u64 every dropping kernel XORs into
    /// its seed, read on the device so that a captured step draws new masks at each replay.
    dropout_salt: Option<Tensor>,
    /// cuBLAS's workspace, set once so that a captured GEMM allocates nothing; cuBLASLt's
    /// calls take it too (both run on the one stream, one at a time).
    blas_workspace: Option<Tensor>,
    /// A graph capture under way (`graph.rs`).
    capture: Option<Capture>,
    /// Tensor clones made inside captures: recorded into a graph, not run then.
    recorded_clones: u64,
}

/// A graph capture under way (`graph.rs`).
pub(crate) struct Capture {
    pub(crate) staging: Tensor,
    pub(crate) slots: Vec<Slot>,
    /// The counts when it began (and the pool's clones): recording runs nothing, so they
    /// are restored at its end.
    pub(crate) counts: Counters,
    pub(crate) clones: u64,
}

/// One input: its device address, its length in 4-byte words, whether the caller keeps it.
#[derive(Clone, Copy)]
pub(crate) struct Slot {
    pub(crate) ptr: u64,
    pub(crate) len: usize,
    pub(crate) kept: bool,
}

impl Drop for Cuda {
    fn drop(&mut self) {
        let _ = self.stream.synchronize();
        let _ = self.ctx.bind_to_thread();
        // SAFETY: the module was loaded in this context; no launch can follow the drop.
        let _ = unsafe { result::module::unload(self.module.0) };
    }
}

impl Cuda {
    /// Opens GPU `ordinal`: context, one stream, the kernels, cuBLAS. Every failure (no
    /// libcuda, no device, a driver too old for the fatbin) is an `Error::Device`.
    pub fn new(ordinal: usize) -> Result<Cuda> {
        load_emulator_if_asked()?;
        // SAFETY: only probes for the shared libraries; cudarc would panic on first use without.
        if !unsafe { cu::is_culib_present() } {
            return Err(Error::Device {
                what: "no CUDA driver: libcuda.so could not be loaded (is an NVIDIA GPU and driver present?)".into(),
            });
        }
        // SAFETY: as above.
        if !unsafe { cublas_sys::is_culib_present() } {
            return Err(Error::Device {
                what: "libcublas.so (CUDA 13) could not be loaded: add it to LD_LIBRARY_PATH".into(),
            });
        }
        let count = CudaContext::device_count().map_err(dev_err("count devices"))?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::Device { what: format!("no CUDA device {ordinal} ({count} present)") });
        }
        let ctx = CudaContext::new(ordinal).map_err(dev_err(format!("open device {ordinal}")))?;
        // SAFETY: one stream orders every launch and copy, and buffers are raw pool blocks that
        // cudarc never sees, so its per-buffer event tracking has nothing to track.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(dev_err("create stream"))?;
        let device_name = ctx.name().unwrap_or_else(|_| "CUDA device".into());
        // cuModuleLoadData wants an aligned image; include_bytes! guarantees alignment 1.
        let mut image = vec![0u64; FATBIN.len().div_ceil(8)];
        // SAFETY: image has at least FATBIN.len() bytes; u64 -> u8 reinterpretation is valid.
        unsafe { std::ptr::copy_nonoverlapping(FATBIN.as_ptr(), image.as_mut_ptr() as *mut u8, FATBIN.len()) };
        ctx.bind_to_thread().map_err(dev_err("bind context"))?;
        // SAFETY: image is a complete fatbin produced by build.rs and outlives the call.
        let module = unsafe { result::module::load_data(image.as_ptr() as *const c_void) }.map_err(|e| {
            Error::Device {
                what: format!(
                    "CUDA: cannot load the kernels on {device_name}: {} (the fatbin has sm_80/sm_90 code and compute_90 PTX; the driver must support CUDA 13.0)",
                    describe(e)
                ),
            }
        })?;
        // The handle keeps cuBLAS's default math mode (IEEE f32): each GEMM names its arithmetic
        // in its compute type (`gemm_strided_batched`).
        let blas = cudarc::cublas::CudaBlas::new(stream.clone()).map_err(blas_err("create handle"))?;
        let lt = lt::Lt::new()?;
        let pool = Arc::new(Pool::new(ctx.clone(), stream.clone()));
        let mut cuda = Cuda {
            uploads: upload::UploadRing::default(),
            ctx,
            stream,
            pool,
            module: Module(module),
            functions: HashMap::new(),
            blas,
            lt,
            precision: Precision::F32,
            gru_path: GruPath::Auto,
            device_name,
            counts: Counters::default(),
            positions: None,
            input_norms: Vec::new(),
            grid_barrier: None,
            strip_counters: None,
            dropout_salt: None,
            blas_workspace: None,
            capture: None,
            recorded_clones: 0,
        };
        let salt = crate::backend::Backend::zeros(&mut cuda, &[2])?;
        cuda.dropout_salt = Some(salt);
        // 32 MiB: NVIDIA's advice for Hopper; cuBLAS otherwise allocates on first use, which a
        // graph capture must not do.
        let workspace = cuda.alloc_tensor(&[BLAS_WORKSPACE_BYTES / 4])?;
        let handle = *cuda.blas.handle();
        // SAFETY: a live device buffer of BLAS_WORKSPACE_BYTES, kept as long as the handle.
        unsafe {
            cublas_sys::cublasSetWorkspace_v2(handle, tensor_ptr(&workspace)? as *mut c_void, BLAS_WORKSPACE_BYTES)
        }
        .result()
        .map_err(blas_err("set the workspace"))?;
        cuda.blas_workspace = Some(workspace);
        Ok(cuda)
    }

    /// The dropout salt's device address (`Backend::set_dropout_salt`).
    pub(crate) fn salt_ptr(&self) -> Result<u64> {
        tensor_ptr(self.dropout_salt.as_ref().ok_or_else(|| Error::Device { what: "no dropout salt".into() })?)
    }

    /// The dropout salt, the argument after each dropping kernel's seed.
    pub(crate) fn salt(&self) -> Result<Arg> {
        Ok(Arg::Ptr(self.salt_ptr()?))
    }

    /// Copies host data to device memory at `dst`, in the stream's order, through the upload
    /// rings and the copy stream (`upload.rs`): the host does not wait for the stream unless it
    /// is two rings ahead.
    /// Counted as an upload, and as a sync each time the host had to wait.
    pub(crate) fn htod<T: cudarc::driver::DeviceRepr>(&mut self, dst: u64, data: &[T], what: &str) -> Result<()> {
        // SAFETY: DeviceRepr types are plain data: their bytes are their value.
        let raw = unsafe { std::slice::from_raw_parts(data.as_ptr() as *const u8, std::mem::size_of_val(data)) };
        self.htod_parts(dst, &[raw], what)
    }

    /// As `htod`, for `parts` uploaded end to end as one.
    pub(crate) fn htod_parts(&mut self, dst: u64, parts: &[&[u8]], what: &str) -> Result<()> {
        let bytes: usize = parts.iter().map(|p| p.len()).sum();
        if bytes == 0 {
            return Ok(());
        }
        if self.capture.is_some() {
            // The copy would run now and its move into place at every replay, from a region
            // long since reused: a graph's inputs go through its staging (`launch_graph`).
            return Err(Error::Device { what: format!("an upload of {what} inside a graph capture") });
        }
        self.bind()?;
        self.counts.upload_bytes += bytes as u64;
        self.counts.syncs += self.uploads.copy(&self.stream, dst, parts, what)?;
        // Each piece is moved into place by a device copy on the stream (`upload.rs`).
        self.counts.copies += bytes.div_ceil(upload::PIECE_BYTES) as u64;
        Ok(())
    }

    pub fn device_name(&self) -> &str {
        &self.device_name
    }

    /// The arithmetic of the layers' GEMMs from now on: IEEE f32 (the default), or tensor
    /// cores on operands rounded to TF32 (~1e-3 relative) or bf16 (~4e-3), summed in fp32.
    pub fn set_precision(&mut self, precision: Precision) {
        self.precision = precision;
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The Bi-GRU's recurrence from now on: the benchmark and the tests pick one to compare
    /// the two; a model runs `GruPath::Auto`.
    pub fn set_gru_path(&mut self, path: GruPath) {
        self.gru_path = path;
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn blas_handle(&self) -> cublas_sys::cublasHandle_t {
        *self.blas.handle()
    }

    /// Waits for every launch so far.
    pub fn synchronize(&mut self) -> Result<()> {
        self.counts.syncs += 1;
        self.stream.synchronize().map_err(dev_err("synchronize"))
    }

    /// The counts so far (`Backend::counters`).
    pub fn counts(&self) -> Counters {
        let mut c = self.counts;
        c.allocs = self.pool.misses();
        c.copies += self.pool.clones() - self.recorded_clones;
        c
    }

    /// An event recorded now on the stream; `a.elapsed_ms(&b)` after `b.synchronize()`.
    pub fn event(&self) -> Result<CudaEvent> {
        // cudarc's default (None) creates events with timing disabled.
        self.stream.record_event(Some(cu::CUevent_flags::CU_EVENT_DEFAULT)).map_err(dev_err("record event"))
    }

    fn function(&mut self, name: &'static str) -> Result<cu::CUfunction> {
        if let Some(&f) = self.functions.get(name) {
            return Ok(f);
        }
        let cname = CString::new(name).map_err(|_| Error::Device { what: format!("bad kernel name {name:?}") })?;
        // SAFETY: the module is loaded and alive for as long as self.
        let f = unsafe { result::module::get_function(self.module.0, cname) }
            .map_err(dev_err(format!("kernel `{name}` is not in the fatbin")))?;
        self.functions.insert(name, f);
        Ok(f)
    }

    /// Makes this backend's context current on the calling thread (raw driver calls need it;
    /// a `Cuda` may move between threads). Cheap when already current.
    pub fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(dev_err("bind context"))
    }

    /// Launches kernel `name` on the stream. Errors name the kernel and the configuration.
    pub fn launch(
        &mut self,
        name: &'static str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_bytes: u32,
        args: &[Arg],
    ) -> Result<()> {
        self.launch_with(name, grid, block, shared_bytes, args, false)
    }

    /// `launch`, or with `cooperative` a launch whose blocks wait for each other (a grid-wide
    /// barrier): every block resident at once, which the driver checks (an error, never a hang).
    pub fn launch_with(
        &mut self,
        name: &'static str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_bytes: u32,
        args: &[Arg],
        cooperative: bool,
    ) -> Result<()> {
        if !name.ends_with("_bf16")
            && let Some(i) = args.iter().position(|a| matches!(a, Arg::Bf16(_)))
        {
            return Err(Error::dtype(name, format!("argument {i} is a bf16 tensor; this kernel reads and writes f32")));
        }
        self.bind()?;
        let f = self.function(name)?;
        // cuLaunchKernel wants a pointer to each argument's value.
        let mut values: Vec<[u8; 8]> = args
            .iter()
            .map(|a| {
                let mut v = [0u8; 8];
                match *a {
                    Arg::Ptr(p) | Arg::Bf16(p) | Arg::U64(p) => v.copy_from_slice(&p.to_ne_bytes()),
                    Arg::I32(x) => v[..4].copy_from_slice(&x.to_ne_bytes()),
                    Arg::U32(x) => v[..4].copy_from_slice(&x.to_ne_bytes()),
                    Arg::F32(x) => v[..4].copy_from_slice(&x.to_ne_bytes()),
                }
                v
            })
            .collect();
        let mut params: Vec<*mut c_void> = values.iter_mut().map(|v| v.as_mut_ptr() as *mut c_void).collect();
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(()); // nothing to do (an empty tensor)
        }
        self.counts.kernels += 1;
        // SAFETY: f is a kernel of our module; params point to values that outlive the call and
        // match the kernel's signature (the `Arg` contract above); every pointer argument is a
        // live pool block or a view into one, kept alive by the caller's borrows until the
        // stream runs the kernel (blocks return to the pool only on drop, and reuse is
        // stream-ordered).
        let stream = self.stream.cu_stream();
        unsafe {
            if cooperative {
                result::launch_cooperative_kernel(f, grid, block, shared_bytes, stream, &mut params)
            } else {
                result::launch_kernel(f, grid, block, shared_bytes, stream, &mut params)
            }
        }
        .map_err(dev_err(format!("launch {name} grid {grid:?} block {block:?} smem {shared_bytes}")))
    }

    /// A device attribute (multiprocessors, shared memory, cooperative launch).
    pub(crate) fn attribute(&mut self, what: cu::CUdevice_attribute) -> Result<usize> {
        self.bind()?;
        let v = self.ctx.attribute(what).map_err(dev_err(format!("query {what:?}")))?;
        Ok(v.max(0) as usize)
    }

    /// Dynamic shared memory kernel `name` may still ask for per block: the device's opt-in
    /// limit less the kernel's static shared memory.
    pub(crate) fn shared_limit(&mut self, name: &'static str) -> Result<usize> {
        let limit = self.attribute(cu::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?;
        let f = self.function(name)?;
        // SAFETY: f is a kernel of our loaded module.
        let fixed = unsafe {
            result::function::get_function_attribute(f, cu::CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)
        }
        .map_err(dev_err(format!("query the static shared memory of {name}")))?;
        Ok(limit.saturating_sub(fixed.max(0) as usize))
    }

    /// Lets kernel `name` launch with `bytes` of dynamic shared memory (past the 48 KiB a block
    /// gets without asking); `bytes` within `shared_limit`.
    pub(crate) fn allow_shared(&mut self, name: &'static str, bytes: usize) -> Result<()> {
        if bytes <= DEFAULT_SHARED {
            return Ok(());
        }
        let f = self.function(name)?;
        // SAFETY: as above; the caller keeps static + dynamic within the opt-in limit.
        unsafe {
            result::function::set_function_attribute(
                f,
                cu::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
        }
        .map_err(dev_err(format!("allow {bytes} bytes of shared memory for {name}")))
    }

    /// At least `strips` zero counters for a column sum (`column_sum`), kept between calls.
    pub(crate) fn strip_counters(&mut self, strips: usize) -> Result<Arg> {
        if self.strip_counters.as_ref().is_none_or(|t| t.len() < strips) {
            self.check_not_capturing("the column sums' strip counters")?;
            let t = crate::backend::Backend::zeros(self, &[strips.next_power_of_two().max(64)])?;
            self.strip_counters = Some(t);
        }
        Arg::tensor(self.strip_counters.as_ref().expect("set above"))
    }

    /// The grid barrier's two words (allocated and zeroed on first use, then kept).
    pub(crate) fn grid_barrier(&mut self) -> Result<Arg> {
        if self.grid_barrier.is_none() {
            self.check_not_capturing("the grid barrier")?;
            let t = crate::backend::Backend::zeros(self, &[2])?;
            self.grid_barrier = Some(t);
        }
        Arg::tensor(self.grid_barrier.as_ref().expect("set above"))
    }

    /// The device copy of an input normalisation, uploaded the first time it is seen.
    pub(crate) fn input_norm(&mut self, mean: &[f32], inv_std: &[f32]) -> Result<u64> {
        let same =
            |key: &[f32]| key.len() == 2 * mean.len() && key[..mean.len()] == *mean && key[mean.len()..] == *inv_std;
        let at = match self.input_norms.iter().position(|(key, _)| same(key)) {
            Some(at) => at,
            None => {
                self.check_not_capturing("an input normalisation")?;
                if self.input_norms.len() == 4 {
                    self.input_norms.remove(0);
                }
                let key = [mean, inv_std].concat();
                let t = crate::backend::Backend::upload(self, &key, &[2, mean.len()])?;
                self.input_norms.push((key, t));
                self.input_norms.len() - 1
            }
        };
        tensor_ptr(&self.input_norms[at].1)
    }

    /// A pooled f32 tensor whose contents are unspecified.
    pub fn alloc_tensor(&mut self, shape: &[usize]) -> Result<Tensor> {
        self.alloc_typed(shape, DType::F32)
    }

    /// A pooled tensor of `dtype` whose contents are unspecified.
    pub fn alloc_typed(&mut self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let n = shape.iter().product();
        Ok(Tensor::from_storage(Storage::Cuda(DevBuf::new(&self.pool, n, dtype)?), shape))
    }

    /// Pooled scratch space of `elems` f32 (returned to the pool on drop).
    pub fn scratch(&mut self, elems: usize) -> Result<Tensor> {
        self.alloc_tensor(&[elems])
    }

    /// Row-major strided-batched GEMM over `batch` independent products:
    /// `C_i = alpha · op(A_i) · op(B_i) + beta · C_i`, `op(A_i)` `[m, k]`, `op(B_i)` `[k, n]`,
    /// pointers advancing by `stride_*` elements per batch; `lda/ldb/ldc` are row strides.
    /// `(ab, c)` are the storage types of A and B (one type) and of C. With f32 A and B,
    /// `precision` is the arithmetic (the compute type: operands rounded to TF32 or bf16 as
    /// cuBLAS loads them, fp32 sums); bf16 A and B are multiplied exactly and summed in fp32
    /// (`CUBLAS_COMPUTE_32F`) at any precision, and a bf16 C is rounded once, as it is stored.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_strided_batched(
        &mut self,
        precision: Precision,
        (ab, c_type): (DType, DType),
        (m, n, k): (usize, usize, usize),
        (trans_a, trans_b): (bool, bool),
        alpha: f32,
        (a, lda, stride_a): (u64, usize, usize),
        (b, ldb, stride_b): (u64, usize, usize),
        beta: f32,
        (c, ldc, stride_c): (u64, usize, usize),
        batch: usize,
    ) -> Result<()> {
        use cublas_sys::cublasComputeType_t as Compute;
        if m == 0 || n == 0 || batch == 0 {
            return Ok(());
        }
        let int = |v: usize| i32::try_from(v).map_err(|_| Error::shape("gemm", format!("{v} exceeds a 32-bit int")));
        // Row-major C = A·B is column-major Cᵀ = Bᵀ·Aᵀ: swap operands, m and n.
        let op = |t: bool| {
            if t { cublas_sys::cublasOperation_t::CUBLAS_OP_T } else { cublas_sys::cublasOperation_t::CUBLAS_OP_N }
        };
        let compute = match (ab, precision) {
            (DType::Bf16, _) | (_, Precision::F32) => Compute::CUBLAS_COMPUTE_32F,
            (_, Precision::Tf32) => Compute::CUBLAS_COMPUTE_32F_FAST_TF32,
            (_, Precision::Bf16) => Compute::CUBLAS_COMPUTE_32F_FAST_16BF,
        };
        let ty = |d: DType| match d {
            DType::F32 => cublas_sys::cudaDataType::CUDA_R_32F,
            DType::Bf16 => cublas_sys::cudaDataType::CUDA_R_16BF,
        };
        self.bind()?;
        self.counts.blas_calls += 1;
        // SAFETY: the caller's pointers are live device ranges of f32 covering every batch at
        // these strides and leading dimensions (checked by the ops that call this); alpha/beta
        // are host f32 scalars (the handle's pointer mode is host) read during the call.
        unsafe {
            cudarc::cublas::result::gemm_strided_batched_ex(
                *self.blas.handle(),
                op(trans_b),
                op(trans_a),
                int(n)?,
                int(m)?,
                int(k)?,
                (&alpha) as *const f32 as *const c_void,
                b as *const c_void,
                ty(ab),
                int(ldb)?,
                stride_b as i64,
                a as *const c_void,
                ty(ab),
                int(lda)?,
                stride_a as i64,
                (&beta) as *const f32 as *const c_void,
                c as *mut c_void,
                ty(c_type),
                int(ldc)?,
                stride_c as i64,
                int(batch)?,
                compute,
                cublas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(blas_err(format!(
            "gemm ({}, {} operands, {} output) m={m} n={n} k={k} batch={batch}",
            precision.name(),
            ab.name(),
            c_type.name()
        )))
    }

    /// Row-major `c[m, n] = alpha·op(a)·op(b) + beta·c + bias` in one cuBLASLt matmul
    /// (`lt.rs`), at `precision`, A and B stored as `types.0`, C as `types.1`, the bias f32;
    /// device pointers as the caller checked them.
    pub(crate) fn gemm_bias_lt(
        &mut self,
        precision: Precision,
        types: (DType, DType),
        g: Gemm,
        ptrs: (u64, u64, u64, u64),
    ) -> Result<()> {
        let workspace = (tensor_ptr(self.blas_workspace.as_ref().expect("set in Cuda::new"))?, BLAS_WORKSPACE_BYTES);
        self.bind()?;
        self.counts.blas_calls += 1;
        let stream = self.stream.cu_stream();
        // SAFETY: the caller checked the operands' shapes and that they live on this device;
        // the stream and workspace are this context's.
        unsafe { self.lt.gemm_bias(stream, workspace, precision, types, g, ptrs) }
    }
}
