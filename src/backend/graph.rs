//! A training step captured once and replayed (CUDA graphs): what the backends share of it.
//!
//! `Backend::begin_capture` records the device's work until `Backend::end_capture` instead of
//! running it; `Backend::launch_graph` runs the recording again with new host values for the
//! step's inputs, which the host lists as [`GraphInput`]s at the start (the staged batch, the
//! optimizer's scalars) and refills, all of them in one upload, before each replay, with the
//! dropout salt. Nothing else may come from the host inside a capture: a download, an upload
//! or a host-side value that changes between steps would be frozen into the graph, so the
//! device refuses the first two and the step keeps the third on the device.

use crate::tensor::{Ids, View};

/// Device memory a captured step reads from the host: refilled before each replay from the
/// step's host values, in order.
pub enum GraphInput<'a> {
    /// Values the captured work consumes: their buffer must be dropped inside the capture,
    /// so that its memory is the graph's.
    Values(View<'a>),
    /// Indices, the same.
    Ids(&'a Ids),
    /// Memory the caller keeps for as long as the graph lives (the step's record, say).
    Kept(View<'a>),
}

impl GraphInput<'_> {
    /// Its length in 4-byte words.
    pub fn len(&self) -> usize {
        match self {
            GraphInput::Values(v) | GraphInput::Kept(v) => v.len(),
            GraphInput::Ids(i) => i.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A captured graph, owned by the caller and launched on the backend that captured it.
pub struct Graph {
    /// The backend's own state of the graph (its recording, its memory, its input buffer).
    /// Only a CUDA build has a backend that captures, hence reads it.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) inner: Box<dyn std::any::Any + Send>,
    /// Words of host values each launch takes (the inputs' lengths summed).
    pub inputs: usize,
    /// Device bytes the graph keeps for its own use while it lives.
    pub bytes: usize,
}
