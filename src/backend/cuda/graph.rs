//! Capture and replay of a step as a CUDA graph (`Backend::begin_capture`, `backend/graph.rs`).
//!
//! Before the capture, one device buffer is taken for the step's host inputs and the dropout
//! salt (`Capture::staging`); the capture opens with one device copy per input, from that
//! buffer to where the step reads it, so a launch is one upload and one graph launch. The
//! stream is captured in relaxed mode, so that a block the caching pool has to fetch from the
//! driver during the capture may be; every block the capture takes or frees goes to the
//! graph's arena (`tensor::device::Arena`) and stays out of the pool while the graph lives.

use std::sync::Arc;

use cudarc::driver::sys as cu;
use cudarc::driver::{CudaGraph, result};

use super::{Capture, Cuda, Slot, dev_err, dev_ids, tensor_ptr, view_ptr};
use crate::backend::{Graph, GraphInput, Precision};
use crate::tensor::Tensor;
use crate::tensor::device::Arena;
use crate::{Error, Result};

/// What `Graph::inner` holds on this backend.
struct Captured {
    graph: CudaGraph,
    /// The blocks the graph uses (kept, not handed out, while it lives).
    _arena: Arc<Arena>,
    staging: Tensor,
    inputs: usize,
    stream: cu::CUstream,
    /// The layers' GEMM precision when captured (the graph keeps the kernels cuBLAS chose then).
    precision: Precision,
}

// SAFETY: CUDA's graphs are not internally synchronised: calls on one graph must not run
// concurrently from several threads (so `Captured` is not `Sync`), but one owner may use it
// from any thread, the driver API being thread-safe otherwise; the stream handle is only
// compared, and the arena and staging tensor are `Send`. A graph moves with the trainer that
// holds it when a step runs on a thread of the CPU pool (`Backend::run_pooled`), which on a
// CUDA device is the caller's own.
unsafe impl Send for Captured {}

fn no_graph(what: &str) -> Error {
    Error::Device { what: format!("CUDA graph: {what}") }
}

pub(super) fn begin(cuda: &mut Cuda, inputs: &[GraphInput]) -> Result<()> {
    if cuda.capture.is_some() {
        return Err(no_graph("a capture is already under way"));
    }
    let mut slots = Vec::with_capacity(inputs.len());
    for input in inputs {
        let (ptr, kept) = match input {
            GraphInput::Values(v) => (view_ptr(*v)?, false),
            GraphInput::Kept(v) => (view_ptr(*v)?, true),
            GraphInput::Ids(ids) => (dev_ids(ids)?.ptr(), false),
        };
        slots.push(Slot { ptr, len: input.len(), kept });
    }
    let words: usize = slots.iter().map(|s| s.len).sum();
    // The inputs, then the salt's two words (8-byte aligned: the kernels read a u64).
    let salt_at = words.next_multiple_of(2);
    let staging = cuda.alloc_tensor(&[salt_at + 2])?;
    let base = tensor_ptr(&staging)?;
    let salt = cuda.salt_ptr()?;
    cuda.bind()?;
    let counts = cuda.counts;
    cuda.stream
        .begin_capture(cu::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
        .map_err(dev_err("begin a graph capture"))?;
    cuda.pool.begin_capture()?;
    let clones = cuda.pool.clones();
    cuda.capture = Some(Capture { staging, slots: slots.clone(), counts, clones });
    let mut at = 0u64;
    let copies = slots.iter().map(|s| {
        let c = (s.ptr, base + 4 * at, s.len * 4);
        at += s.len as u64;
        c
    });
    for (dst, src, bytes) in copies.chain([(salt, base + 4 * salt_at as u64, 8)]) {
        if bytes == 0 {
            continue;
        }
        // SAFETY: both ranges are live device buffers of at least `bytes` (the inputs' own
        // lengths; the staging buffer was sized from them); recorded, not run, until launch.
        if let Err(e) = unsafe { result::memcpy_dtod_async(dst, src, bytes, cuda.stream.cu_stream()) } {
            let _ = end(cuda);
            return Err(dev_err("record an input copy")(e));
        }
    }
    Ok(())
}

pub(super) fn end(cuda: &mut Cuda) -> Result<Graph> {
    let cap = cuda.capture.take().ok_or_else(|| no_graph("no capture is under way"))?;
    let arena = cuda.pool.end_capture().ok_or_else(|| no_graph("the pool was not capturing"))?;
    cuda.counts = cap.counts;
    cuda.recorded_clones += cuda.pool.clones() - cap.clones;
    cuda.bind()?;
    let graph = cuda
        .stream
        .end_capture(cu::CUgraphInstantiate_flags(0))
        .map_err(dev_err("end the graph capture"))?
        .ok_or_else(|| no_graph("the capture recorded nothing"))?;
    // Each input's memory must now be the graph's: a buffer still held outside would be
    // handed out again while replays keep writing it.
    for &Slot { ptr, len, kept } in &cap.slots {
        if !kept && !arena.holds(ptr, len * 4) {
            return Err(no_graph(&format!(
                "an input ({len} words at {ptr:#x}) outlived the capture: the captured work must consume its inputs"
            )));
        }
    }
    let inputs = cap.slots.iter().map(|s| s.len).sum();
    let bytes = arena.bytes() + cap.staging.len() * 4;
    let stream = cuda.stream.cu_stream();
    let precision = cuda.precision();
    let captured = Captured { graph, _arena: arena, staging: cap.staging, inputs, stream, precision };
    Ok(Graph { inner: Box::new(captured), inputs, bytes })
}

pub(super) fn launch(cuda: &mut Cuda, graph: &Graph, inputs: &[&[f32]], salt: u64) -> Result<()> {
    let g = graph.inner.downcast_ref::<Captured>().ok_or_else(|| no_graph("captured by another backend"))?;
    if g.stream != cuda.stream.cu_stream() {
        return Err(no_graph("captured on another device's stream"));
    }
    if cuda.capture.is_some() {
        return Err(no_graph("a graph cannot be launched inside a capture"));
    }
    if g.precision != cuda.precision() {
        return Err(no_graph(&format!(
            "captured with {} GEMMs, the device computes {} now: capture again",
            g.precision.name(),
            cuda.precision().name()
        )));
    }
    let words: usize = inputs.iter().map(|p| p.len()).sum();
    if words != g.inputs {
        return Err(Error::shape("launch_graph", format!("{words} input words for a graph of {}", g.inputs)));
    }
    // One upload: the inputs, a zero word to even them, the salt's bits (little-endian u64:
    // the two words the kernels read), gathered straight into the pinned upload ring.
    let pad: &[u8] = if g.inputs % 2 == 1 { &[0; 4] } else { &[] };
    let salt = salt.to_le_bytes();
    let mut parts: Vec<&[u8]> = inputs.iter().map(|p| bytemuck::cast_slice(p)).collect();
    parts.extend([pad, &salt[..]]);
    cuda.htod_parts(tensor_ptr(&g.staging)?, &parts, "a graph's inputs")?;
    g.graph.launch().map_err(dev_err("launch a graph"))?;
    cuda.counts.graphs += 1;
    Ok(())
}

impl Cuda {
    /// A buffer the backend keeps for its lifetime may not be made inside a capture: its
    /// initialisation would be recorded, not run, and its memory would be the graph's.
    pub(crate) fn check_not_capturing(&self, what: &str) -> Result<()> {
        match self.capture {
            Some(_) => Err(no_graph(&format!(
                "{what} was first needed inside a capture: run the step once without capturing first"
            ))),
            None => Ok(()),
        }
    }
}
