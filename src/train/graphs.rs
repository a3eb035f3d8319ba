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
pub const MAX_GRAPHS: usize = 8;
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

pub(crate) struct StepGraphs {
    /// Whether steps are captured (the device can, and nobody turned it off).
    pub on: bool,
    graphs: HashMap<Vec<u64>, Graph>,
    seen: HashSet<Vec<u64>>,
}

impl StepGraphs {
    pub fn new(on: bool) -> StepGraphs {
        StepGraphs { on, graphs: HashMap::new(), seen: HashSet::new() }
    }

    /// What fixes a step's device work: per pass, its modality and kind, its segment
    /// offsets (the items' lengths) and the length of every input part.
    pub fn key(passes: &[Pass], hosts: &[HostInputs]) -> Vec<u64> {
        let mut key = Vec::new();
        for (p, h) in passes.iter().zip(hosts) {
            key.extend([p.text as u64, p.context_only as u64, h.parts.len() as u64]);
            key.extend(h.parts.iter().map(|part| part.len() as u64));
            key.extend(h.offsets().iter().map(|&o| o as u64));
        }
        key
    }

    pub fn get(&self, key: &[u64]) -> Option<&Graph> {
        self.graphs.get(key)
    }

    /// Whether `key` came before (then it is worth capturing, if there is room): notes it.
    pub fn second_sighting(&mut self, key: &[u64]) -> bool {
        if self.graphs.len() >= MAX_GRAPHS {
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

    /// Drops every graph (their memory goes back to the device's pool).
    pub fn clear(&mut self) {
        self.graphs.clear();
        self.seen.clear();
    }
}
