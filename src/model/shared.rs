//! The shared model: L post-LN transformer blocks used by BOTH modalities with the same
//! weights, then z = mean of the final hidden states over the item's segments. With
//! `Trunk::Fc` the blocks have no attention (Table 1's `wo-t`).
//!
//! At `--precision bf16` the blocks run on bf16 activations (`Backend::activations`): the
//! input is rounded once as it enters, every block's GEMMs multiply it by a bf16 copy of the
//! weights made once per pass, its norms, GELU and attention store bf16, and the output and
//! the input's gradient leave as f32. Parameters and their gradients stay f32.

use crate::Result;
use crate::backend::{Backend, Segments};
use crate::nn::block::BlockCache;
use crate::nn::{Dropout, EncoderBlock, ParamStore, Weights};
use crate::tensor::{DType, Tensor};

use super::config::{ModelConfig, Trunk};

#[derive(Clone, Debug)]
pub struct SharedEncoder {
    pub blocks: Vec<EncoderBlock>,
}

pub struct SharedCache {
    blocks: Vec<BlockCache>,
    /// The weights' bf16 copy the forward multiplied (bf16 activations), for the backward.
    bf16: Option<Tensor>,
}

/// `x` as `dtype` stores it (itself when it already is).
fn stored_as(dev: &mut dyn Backend, x: Tensor, dtype: DType) -> Result<Tensor> {
    if x.dtype() == dtype { Ok(x) } else { dev.convert(&x, dtype) }
}

impl SharedEncoder {
    pub fn new(store: &mut ParamStore, name: &str, cfg: &ModelConfig) -> Self {
        let heads = (cfg.trunk == Trunk::Transformer).then_some(cfg.heads);
        let blocks = (0..cfg.layers)
            .map(|i| EncoderBlock::new(store, &format!("{name}.layers.{i}"), cfg.dim, heads, cfg.ffn))
            .collect();
        SharedEncoder { blocks }
    }

    /// e [tokens, d] → final hidden states h [tokens, d].
    pub fn forward(
        &self,
        dev: &mut dyn Backend,
        w: &Tensor,
        e: Tensor,
        seg: &Segments,
        drop: Dropout,
    ) -> Result<(Tensor, SharedCache)> {
        let act = dev.activations();
        let bf16 = if act == DType::Bf16 { Some(dev.convert(w, DType::Bf16)?) } else { None };
        let weights = Weights { values: w, bf16: bf16.as_ref() };
        let mut x = stored_as(dev, e, act)?;
        let mut blocks = Vec::with_capacity(self.blocks.len());
        for (i, block) in self.blocks.iter().enumerate() {
            let (y, c) = block.forward(dev, weights, x, seg, drop.site(100 + i as u64))?;
            blocks.push(c);
            x = y;
        }
        Ok((stored_as(dev, x, DType::F32)?, SharedCache { blocks, bf16 }))
    }

    pub fn backward(
        &self,
        dev: &mut dyn Backend,
        w: &Tensor,
        g: &mut Tensor,
        seg: &Segments,
        c: SharedCache,
        dh: Tensor,
    ) -> Result<Tensor> {
        let weights = Weights { values: w, bf16: c.bf16.as_ref() };
        let act = if c.bf16.is_some() { DType::Bf16 } else { DType::F32 };
        let mut d = stored_as(dev, dh, act)?;
        for (block, cache) in self.blocks.iter().zip(c.blocks).rev() {
            d = block.backward(dev, weights, g, seg, cache, &d)?;
        }
        stored_as(dev, d, DType::F32)
    }
}
