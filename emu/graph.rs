//! Stream capture and CUDA graphs on the emulated device.
//!
//! While a stream captures, the work put on it (kernels, memsets, device copies, cuBLAS GEMMs)
//! is recorded as the nodes of a graph instead of run; `cuGraphLaunch` runs the nodes in order
//! (a captured single stream is a chain), each checked against the allocations live at replay,
//! so a graph that outlives a buffer it uses faults as it would on the hardware.
//!
//! What the driver refuses during a capture is refused here too, and the capture is then
//! invalidated (`cuStreamEndCapture` fails): waiting for the capturing stream or the whole
//! context, copies between host and device on it (a graph would keep the host pointer and read
//! whatever lies there at replay), and, in the global and thread-local modes, allocating or
//! freeing device memory. cuBLAS GEMMs are captured only with a workspace set
//! (`cublasSetWorkspace`), as real cuBLAS would otherwise allocate during the capture.
//!
//! `SEMSHARE_EMU_CAPTURE` makes captures fail as a driver might refuse one, so that the
//! caller's fallback can be tested: `refuse-begin` (every `cuStreamBeginCapture` is
//! `CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED`) or `invalidate` (every capture ends invalidated).
//! Read at each call.

use std::collections::HashMap;
use std::ffi::c_int;
use std::sync::{Arc, Mutex, OnceLock};

use crate::streams::{self, Access};
use crate::{fail, CUresult, SUCCESS};

pub const CAPTURE_UNSUPPORTED: CUresult = 900;
pub const CAPTURE_INVALIDATED: CUresult = 901;
pub const ILLEGAL_STATE: CUresult = 401;

/// `CUstreamCaptureMode`.
pub const MODE_GLOBAL: c_int = 0;
pub const MODE_RELAXED: c_int = 2;

/// One unit of recorded work.
pub enum Node {
    Kernel {
        kernel: Arc<crate::ptx::Kernel>,
        grid: [u32; 3],
        block: [u32; 3],
        shared: u32,
        params: Vec<u8>,
        cooperative: bool,
    },
    Memset {
        dst: u64,
        value: u32,
        width: usize,
        n: usize,
    },
    Copy {
        dst: u64,
        src: u64,
        bytes: usize,
    },
    Sgemm(crate::gemm::Sgemm),
}

impl Node {
    /// The memory it may read or write, for the check against other streams (`streams.rs`).
    pub fn accesses(&self) -> Vec<Access> {
        match self {
            Node::Kernel { params, .. } => streams::kernel_accesses(params),
            Node::Memset { dst, width, n, .. } => vec![Access::new(*dst, (width * n) as u64, true)],
            Node::Copy { dst, src, bytes } => {
                vec![Access::new(*dst, *bytes as u64, true), Access::new(*src, *bytes as u64, false)]
            }
            Node::Sgemm(g) => [(g.a, false), (g.b, false), (g.c, true), (g.bias, false)]
                .into_iter()
                .filter(|&(p, _)| p != 0)
                .filter_map(|(p, writes)| streams::allocation_of(p, writes))
                .collect(),
        }
    }

    /// What it is, for messages.
    pub fn what(&self) -> &'static str {
        match self {
            Node::Kernel { .. } => "a kernel",
            Node::Memset { .. } => "a memset",
            Node::Copy { .. } => "a device copy",
            Node::Sgemm(_) => "a cuBLAS GEMM",
        }
    }

    pub fn run(&self) -> CUresult {
        match self {
            Node::Kernel { kernel, grid, block, shared, params, cooperative } => {
                crate::run_kernel(kernel.clone(), *grid, *block, *shared, params, *cooperative)
            }
            Node::Memset { dst, value, width, n } => crate::run_memset(*dst, *value, *width, *n, "memset node"),
            Node::Copy { dst, src, bytes } => crate::run_copy(*dst, *src, *bytes, "device copy node", true, true),
            Node::Sgemm(g) => match crate::gemm::run(g) {
                Ok(()) => SUCCESS,
                Err(e) => crate::fault(crate::ILLEGAL_ADDRESS, format!("cuBLAS sgemm node: {e}")),
            },
        }
    }
}

struct Capture {
    mode: c_int,
    nodes: Vec<Node>,
    /// Why the capture was invalidated, if it was.
    broken: Option<String>,
}

fn captures() -> std::sync::MutexGuard<'static, HashMap<u64, Capture>> {
    static C: OnceLock<Mutex<HashMap<u64, Capture>>> = OnceLock::new();
    C.get_or_init(|| Mutex::new(HashMap::new())).lock().unwrap_or_else(|p| p.into_inner())
}

/// A finished capture (`CUgraph`) or its instance (`CUgraphExec`): the nodes in stream order.
pub struct Graph {
    pub nodes: Arc<Vec<Node>>,
}

pub fn begin(stream: u64, mode: c_int) -> CUresult {
    if stream == 0 {
        return fail(CAPTURE_UNSUPPORTED, "cuStreamBeginCapture: the legacy default stream cannot be captured".into());
    }
    if !(0..=2).contains(&mode) {
        return fail(crate::INVALID_VALUE, format!("cuStreamBeginCapture: unknown capture mode {mode}"));
    }
    let forced = forced();
    if forced == "refuse-begin" {
        return fail(CAPTURE_UNSUPPORTED, "cuStreamBeginCapture: refused (SEMSHARE_EMU_CAPTURE=refuse-begin)".into());
    }
    let mut c = captures();
    if c.contains_key(&stream) {
        return fail(ILLEGAL_STATE, format!("cuStreamBeginCapture: stream {stream:#x} is already capturing"));
    }
    let broken = (forced == "invalidate").then(|| "SEMSHARE_EMU_CAPTURE=invalidate".to_string());
    c.insert(stream, Capture { mode, nodes: Vec::new(), broken });
    SUCCESS
}

/// `SEMSHARE_EMU_CAPTURE`, or "" (the module's header).
fn forced() -> String {
    std::env::var("SEMSHARE_EMU_CAPTURE").unwrap_or_default()
}

/// Ends the capture of `stream`: its graph, or why there is none.
pub fn end(stream: u64) -> Result<Graph, CUresult> {
    let Some(cap) = captures().remove(&stream) else {
        return Err(fail(ILLEGAL_STATE, format!("cuStreamEndCapture: stream {stream:#x} is not capturing")));
    };
    match cap.broken {
        Some(why) => Err(fail(CAPTURE_INVALIDATED, format!("cuStreamEndCapture: the capture was invalidated: {why}"))),
        None => Ok(Graph { nodes: Arc::new(cap.nodes) }),
    }
}

/// 0: not capturing, 1: capturing, 2: capturing but invalidated (`CUstreamCaptureStatus`).
pub fn status(stream: u64) -> c_int {
    match captures().get(&stream) {
        None => 0,
        Some(c) if c.broken.is_some() => 2,
        Some(_) => 1,
    }
}

/// Records `node` if `stream` is capturing (then `None`); else gives it back to be run now.
pub fn record(stream: u64, node: Node) -> Option<Node> {
    let mut c = captures();
    match c.get_mut(&stream) {
        Some(cap) => {
            if cap.broken.is_none() {
                cap.nodes.push(node);
            }
            None
        }
        None => Some(node),
    }
}

/// An operation the driver refuses while `stream` captures (`Some(stream)`), or while any
/// stream captures in a mode that forbids it (`None`: context-wide calls; `relaxed_ok` for
/// those the relaxed mode allows). Invalidates the capture and returns the error to give.
pub fn refuse(stream: Option<u64>, relaxed_ok: bool, what: &str) -> Option<CUresult> {
    let mut c = captures();
    let hit: Vec<u64> = c
        .iter()
        .filter(|(&s, cap)| match stream {
            Some(x) => x == s,
            None => !(relaxed_ok && cap.mode == MODE_RELAXED),
        })
        .map(|(&s, _)| s)
        .collect();
    if hit.is_empty() {
        return None;
    }
    let why = format!("{what} is not permitted while stream {:#x} captures", hit[0]);
    for s in hit {
        if let Some(cap) = c.get_mut(&s) {
            cap.broken.get_or_insert_with(|| why.clone());
        }
    }
    drop(c);
    Some(fail(CAPTURE_UNSUPPORTED, why))
}

/// Runs a graph's nodes in order on `stream` (which must not be capturing: no child graphs).
pub fn launch(graph: &Graph, stream: u64) -> CUresult {
    if status(stream) != 0 {
        return fail(crate::NOT_SUPPORTED, "cuGraphLaunch into a capturing stream is not emulated".into());
    }
    for node in graph.nodes.iter() {
        if let Some(e) = streams::before(stream, &node.accesses(), node.what()) {
            return e;
        }
        let r = node.run();
        if r != SUCCESS {
            return r;
        }
    }
    SUCCESS
}
