//! The shared model: L post-LN transformer blocks used by BOTH modalities with the same
//! weights, then z = mean of the final hidden states over the item's segments. With
//! `Trunk::Fc` the blocks have no attention (Table 1's `wo-t`).
//!
//! At `--precision bf16` the blocks run on bf16 activations (`Backend::activations`): the
//! input is rounded once as it enters, every block's GEMMs multiply it by a bf16 copy of the
//! trunk's weights (the caller's, made once per training step or loaded model, else its own,
//! made once per pass), its norms, GELU and attention store bf16, and the output and the
//! input's gradient leave as f32. Parameters and their gradients stay f32.

use std::ops::Range;

use crate::Result;
use crate::backend::{Backend, Segments};
use crate::nn::block::BlockCache;
use crate::nn::{Bf16Copy, Dropout, EncoderBlock, ParamStore, Weights};
use crate::tensor::{DType, Tensor};

use super::config::{ModelConfig, Trunk};

#[derive(Clone, Debug)]
pub struct SharedEncoder {
    pub blocks: Vec<EncoderBlock>,
    /// The run of the flat parameters the blocks own: what a bf16 pass copies.
    pub params: Range<usize>,
}

pub struct SharedCache {
    blocks: Vec<BlockCache>,
    /// The activations' type.
    act: DType,
    /// The bf16 copy of the weights the forward made itself, for the backward.
    own: Option<Bf16Copy>,
}

impl SharedEncoder {
    pub fn new(store: &mut ParamStore, name: &str, cfg: &ModelConfig) -> Self {
        let heads = (cfg.trunk == Trunk::Transformer).then_some(cfg.heads);
        let start = store.total;
        let blocks = (0..cfg.layers)
            .map(|i| EncoderBlock::new(store, &format!("{name}.layers.{i}"), cfg.dim, heads, cfg.ffn))
            .collect();
        SharedEncoder { blocks, params: start..store.total }
    }

    /// e [tokens, d] → final hidden states h [tokens, d].
    pub fn forward(
        &self,
        dev: &mut dyn Backend,
        w: Weights,
        e: Tensor,
        seg: &Segments,
        drop: Dropout,
    ) -> Result<(Tensor, SharedCache)> {
        let act = dev.activations();
        let own = Bf16Copy::missing(dev, w, self.params.clone())?;
        let weights = Weights { values: w.values, bf16: own.as_ref().or(w.bf16) };
        let mut x = dev.convert_owned(e, act)?;
        let mut blocks = Vec::with_capacity(self.blocks.len());
        for (i, block) in self.blocks.iter().enumerate() {
            let (y, c) = block.forward(dev, weights, x, seg, drop.site(100 + i as u64))?;
            blocks.push(c);
            x = y;
        }
        Ok((dev.convert_owned(x, DType::F32)?, SharedCache { blocks, act, own }))
    }

    /// [`SharedEncoder::forward`] at inference: the same values, each block's `infer` keeping
    /// nothing for a backward, so an activation's memory is reused once the next op has read it.
    pub fn infer(&self, dev: &mut dyn Backend, w: Weights, e: Tensor, seg: &Segments) -> Result<Tensor> {
        let act = dev.activations();
        let own = Bf16Copy::missing(dev, w, self.params.clone())?;
        let weights = Weights { values: w.values, bf16: own.as_ref().or(w.bf16) };
        let mut x = dev.convert_owned(e, act)?;
        for block in &self.blocks {
            x = block.infer(dev, weights, x, seg)?;
        }
        dev.convert_owned(x, DType::F32)
    }

    pub fn backward(
        &self,
        dev: &mut dyn Backend,
        w: Weights,
        g: &mut Tensor,
        seg: &Segments,
        c: SharedCache,
        dh: Tensor,
    ) -> Result<Tensor> {
        let weights = Weights { values: w.values, bf16: c.own.as_ref().or(w.bf16) };
        let mut d = dev.convert_owned(dh, c.act)?;
        for (block, cache) in self.blocks.iter().zip(c.blocks).rev() {
            d = block.backward(dev, weights, g, seg, cache, &d)?;
        }
        dev.convert_owned(d, DType::F32)
    }
}
