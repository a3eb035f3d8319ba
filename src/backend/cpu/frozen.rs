//! GEMM operands of frozen parameters (`Backend::freeze`), packed once. A loaded model's
//! layers multiply by the same weights on every call; packing B (a transpose of Wᵀ into
//! slivers, in bf16 also the conversion) is then work done once per weight instead of once per
//! GEMM. An operand is recognised by its address inside a frozen buffer, and each buffer's
//! packed operands are kept only while the buffer lives (a `Weak` to it), so memory freed and
//! reused for another tensor is never mistaken for the weights it held. The bf16 copy of a run
//! of a frozen buffer (bf16 activations multiply the trunk's weights in bf16) is made once too,
//! frozen and registered like the buffer itself, and kept while the buffer lives.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use super::dispatch::Kernels;
use super::gemm::{Input, Kernel, PackedB};
use crate::backend::{Gemm, Precision};
use crate::tensor::{DType, Tensor};

/// The frozen buffers a CPU backend has seen and the packed operands taken from each.
#[derive(Debug, Default)]
pub struct FrozenOperands {
    buffers: Vec<Frozen>,
    bf16_copies: Vec<Bf16Run>,
}

/// The bf16 copy of a run of a frozen buffer.
#[derive(Debug)]
struct Bf16Run {
    source: Weak<[f32]>,
    /// (element offset, length) in the buffer.
    run: (usize, usize),
    copy: Tensor,
}

#[derive(Debug)]
struct Frozen {
    memory: Weak<[f32]>,
    /// The buffer's address range, compared while `memory` is alive.
    start: usize,
    end: usize,
    /// By (element offset, shape, transpose, kernel); None: packing was refused (no memory),
    /// not tried again.
    packed: HashMap<OperandKey, Option<Arc<PackedB>>>,
}

/// An operand of a frozen buffer: (byte offset, k, n, transposed, kernel).
type OperandKey = (usize, usize, usize, bool, Kernel);

impl FrozenOperands {
    /// Remembers `memory` (a frozen tensor's, [`crate::tensor::Tensor::frozen`]).
    pub fn register(&mut self, memory: &Arc<[f32]>) {
        self.buffers.retain(|f| f.memory.strong_count() > 0);
        self.bf16_copies.retain(|c| c.source.strong_count() > 0);
        let start = memory.as_ptr() as usize;
        if self.buffers.iter().any(|f| f.start == start) {
            return;
        }
        let end = start + memory.len() * size_of::<f32>();
        self.buffers.push(Frozen { memory: Arc::downgrade(memory), start, end, packed: HashMap::new() });
    }

    /// `b` packed for `g` at `precision` when it lies inside a frozen buffer that still lives,
    /// packed now if this is its first use; None for any other operand.
    pub fn packed_b(&mut self, kernels: Kernels, precision: Precision, g: Gemm, b: Input) -> Option<Arc<PackedB>> {
        if self.buffers.is_empty() {
            return None;
        }
        let (from, to) = b.address_range();
        let i = self.buffers.iter().position(|f| f.start <= from && to <= f.end)?;
        // The memory is alive while `b` (borrowed from it) is; a dead entry at this address
        // is an old buffer's, whose operands would be wrong here.
        if self.buffers[i].memory.strong_count() == 0 {
            self.buffers.swap_remove(i);
            return None;
        }
        let frozen = &mut self.buffers[i];
        let kernel = Kernel::of(kernels, precision);
        let key = (from - frozen.start, g.k, g.n, g.trans_b, kernel);
        frozen.packed.entry(key).or_insert_with(|| PackedB::new(kernels, precision, g, b).map(Arc::new)).clone()
    }

    /// The frozen bf16 copy of `values` when they lie inside a frozen buffer that still lives,
    /// made and registered on first use; None for any other values.
    pub fn bf16_copy(&mut self, values: &[f32]) -> Option<Tensor> {
        let (from, to) = (values.as_ptr() as usize, values.as_ptr() as usize + size_of_val(values));
        let frozen = self.buffers.iter().find(|f| f.start <= from && to <= f.end)?;
        // Alive while `values` (borrowed from it) is; a dead entry at this address is an old
        // buffer's, and so would be its copies.
        let source = frozen.memory.upgrade()?;
        let key = ((from - frozen.start) / size_of::<f32>(), values.len());
        self.bf16_copies.retain(|c| c.source.strong_count() > 0);
        let hit =
            self.bf16_copies.iter().find(|c| std::ptr::eq(c.source.as_ptr(), Arc::as_ptr(&source)) && c.run == key);
        if let Some(hit) = hit {
            return Some(hit.copy.clone());
        }
        let copy = Tensor::from_cpu_as(values.to_vec(), &[values.len()], DType::Bf16).freeze();
        if let Some(memory) = copy.frozen() {
            self.register(memory);
        }
        self.bf16_copies.push(Bf16Run { source: Arc::downgrade(&source), run: key, copy: copy.clone() });
        Some(copy)
    }

    /// Bytes of packed operands of buffers still alive, the bf16 copies of buffers dropped
    /// since let go first (a dead buffer's operands are dropped at the next freeze or the
    /// next GEMM that reads its old addresses).
    pub fn bytes(&mut self) -> usize {
        self.bf16_copies.retain(|c| c.source.strong_count() > 0);
        let live = self.buffers.iter().filter(|f| f.memory.strong_count() > 0);
        live.flat_map(|f| f.packed.values().flatten()).map(|p| p.bytes()).sum()
    }
}
