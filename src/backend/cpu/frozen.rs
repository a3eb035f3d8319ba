//! GEMM operands of frozen parameters (`Backend::freeze`), packed once. A loaded model's
//! layers multiply by the same weights on every call; packing B (a transpose of Wᵀ into
//! slivers, in bf16 also the conversion) is then work done once per weight instead of once per
//! GEMM. An operand is recognised by its address inside a frozen buffer, and each buffer's
//! packed operands are kept only while the buffer lives (a `Weak` to it), so memory freed and
//! reused for another tensor is never mistaken for the weights it held. A frozen buffer's bf16
//! copy (bf16 activations multiply bf16 weights) is made once too, frozen and registered like
//! the buffer itself, and kept while the buffer lives.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use super::dispatch::Kernels;
use super::gemm::{Kernel, PackedB};
use crate::backend::{Gemm, Precision};
use crate::tensor::{DType, Tensor};

/// The frozen buffers a CPU backend has seen and the packed operands taken from each.
#[derive(Debug, Default)]
pub struct FrozenOperands {
    buffers: Vec<Frozen>,
    /// bf16 copies of frozen buffers, by the buffer they copy.
    bf16_copies: Vec<(Weak<[f32]>, Tensor)>,
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

/// An operand of a frozen buffer: (element offset, k, n, transposed, kernel).
type OperandKey = (usize, usize, usize, bool, Kernel);

impl FrozenOperands {
    /// Remembers `memory` (a frozen tensor's, [`crate::tensor::Tensor::frozen`]).
    pub fn register(&mut self, memory: &Arc<[f32]>) {
        self.buffers.retain(|f| f.memory.strong_count() > 0);
        self.bf16_copies.retain(|(source, _)| source.strong_count() > 0);
        let start = memory.as_ptr() as usize;
        if self.buffers.iter().any(|f| f.start == start) {
            return;
        }
        let end = start + memory.len() * size_of::<f32>();
        self.buffers.push(Frozen { memory: Arc::downgrade(memory), start, end, packed: HashMap::new() });
    }

    /// `b` packed for `g` at `precision` when it lies inside a frozen buffer that still lives,
    /// packed now if this is its first use; None for any other operand.
    pub fn packed_b(&mut self, kernels: Kernels, precision: Precision, g: Gemm, b: &[f32]) -> Option<Arc<PackedB>> {
        if self.buffers.is_empty() {
            return None;
        }
        let (from, to) = (b.as_ptr() as usize, b.as_ptr() as usize + std::mem::size_of_val(b));
        let i = self.buffers.iter().position(|f| f.start <= from && to <= f.end)?;
        // The memory is alive while `b` (borrowed from it) is; a dead entry at this address
        // is an old buffer's, whose operands would be wrong here.
        if self.buffers[i].memory.strong_count() == 0 {
            self.buffers.swap_remove(i);
            return None;
        }
        let frozen = &mut self.buffers[i];
        let kernel = Kernel::of(kernels, precision);
        let key = ((from - frozen.start) / size_of::<f32>(), g.k, g.n, g.trans_b, kernel);
        frozen.packed.entry(key).or_insert_with(|| PackedB::new(kernels, precision, g, b).map(Arc::new)).clone()
    }

    /// The frozen bf16 copy of frozen `source` (of `shape`), made and registered on first use.
    pub fn bf16_copy(&mut self, source: &Arc<[f32]>, shape: &[usize]) -> Tensor {
        let hit = self.bf16_copies.iter().find(|(s, _)| std::ptr::eq(s.as_ptr(), Arc::as_ptr(source)));
        if let Some((_, copy)) = hit {
            return copy.clone();
        }
        let copy = Tensor::from_cpu_as(source.to_vec(), shape, DType::Bf16).freeze();
        if let Some(memory) = copy.frozen() {
            self.register(memory);
        }
        self.bf16_copies.push((Arc::downgrade(source), copy.clone()));
        copy
    }

    /// Bytes of packed operands of buffers still alive, the bf16 copies of buffers dropped
    /// since let go first (a dead buffer's operands are dropped at the next freeze or the
    /// next GEMM that reads its old addresses).
    pub fn bytes(&mut self) -> usize {
        self.bf16_copies.retain(|(source, _)| source.strong_count() > 0);
        let live = self.buffers.iter().filter(|f| f.memory.strong_count() > 0);
        live.flat_map(|f| f.packed.values().flatten()).map(|p| p.bytes()).sum()
    }
}
