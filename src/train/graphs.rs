//! The training step captured once per shape and replayed (CUDA graphs, `backend/graph.rs`).
//!
//! A step's device work is fixed by its shapes: the items' lengths and the masked-segment
//! counts of each forward pass (everything else it reads, the batch's values, the dropout salt
//! and the optimizer's scalars, comes in through the graph's inputs). A shape is captured the
//! second time it comes, so that one-off shapes run eagerly and cost no capture; at most
//! [`MAX_GRAPHS`] are kept, each holding its own activations' memory.

use std::collections::{HashMap, HashSet};

use crate::backend::Graph;
use crate::model::{HostInputs, LossWeights, MaskPlan};
use crate::nn::Dropout;

/// Graphs kept at once; a shape past them runs eagerly.
pub const MAX_GRAPHS: usize = 16;
/// Shapes remembered (seen once, not captured) before the memory of them is cleared.
const MAX_SEEN: usize = 4096;

/// One forward pass of a step: a modality's batch with a mask plan, its dropout and loss
/// weights, and where its losses go (`record` slots `slot`, `slot + 1`; only L2 for the
/// masked second pass of `ContextPass::Separate`).
pub(crate) struct Pass {
    pub text: bool,
    pub plan: MaskPlan,
    pub drop: Dropout,
    pub weights: LossWeights,
    pub slot: usize,
    pub context_only: bool,
}

/// How a trainer takes its steps on a device that captures graphs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepMode {
    /// Each step run as it comes (the CPU's only mode).
    Eager,
    /// Eagerly, but shaped as a captured step is (masked rows padded to their bucket): the
    /// reference a replay is checked against, bit for bit.
    Shaped,
    /// Captured once per shape and replayed (the default where the device can).
    Captured,
}

pub(crate) struct StepGraphs {
    pub mode: StepMode,
    graphs: HashMap<Vec<u64>, Graph>,
    seen: HashSet<Vec<u64>>,
    /// Why a capture failed, after which none is tried again.
    pub refused: Option<String>,
}

impl StepGraphs {
    pub fn new(mode: StepMode) -> StepGraphs {
        StepGraphs { mode, graphs: HashMap::new(), seen: HashSet::new(), refused: None }
    }

    /// What fixes a step's device work: per pass, its modality and kind, its segment
    /// offsets (the items' lengths) and the kind and length of every input part.
    pub fn key(passes: &[Pass], hosts: &[HostInputs]) -> Vec<u64> {
        let mut key = Vec::new();
        for (p, h) in passes.iter().zip(hosts) {
            key.extend([p.text as u64, p.context_only as u64, h.parts.len() as u64]);
            key.extend(h.parts.iter().flat_map(|part| [part.kind(), part.len() as u64]));
            key.extend(h.offsets().iter().map(|&o| o as u64));
        }
        key
    }

    pub fn get(&self, key: &[u64]) -> Option<&Graph> {
        self.graphs.get(key)
    }

    /// Whether `key` came before, so that it is worth capturing, and there is room for one
    /// more graph: fewer than [`MAX_GRAPHS`], and (where the device says) twice the largest
    /// graph's memory free. Notes `key` as seen.
    pub fn second_sighting(&mut self, key: &[u64], free: Option<u64>) -> bool {
        let largest = self.graphs.values().map(|g| g.bytes as u64).max().unwrap_or(0);
        if self.graphs.len() >= MAX_GRAPHS || free.is_some_and(|f| f < 2 * largest) {
            return false;
        }
        if self.seen.remove(key) {
            return true;
        }
        if self.seen.len() >= MAX_SEEN {
            self.seen.clear();
        }
        self.seen.insert(key.to_vec());
        false
    }

    pub fn insert(&mut self, key: Vec<u64>, graph: Graph) {
        self.graphs.insert(key, graph);
    }

    /// Graphs kept, and the device bytes they hold.
    pub fn held(&self) -> (usize, usize) {
        (self.graphs.len(), self.graphs.values().map(|g| g.bytes).sum())
    }

    /// Turns capturing off for good after a capture failed, saying why.
    pub fn refuse(&mut self, why: String) {
        self.clear();
        self.mode = StepMode::Eager;
        self.refused = Some(why);
    }

    /// Drops every graph (their memory goes back to the device's pool).
    pub fn clear(&mut self) {
        self.graphs.clear();
        self.seen.clear();
    }
}
