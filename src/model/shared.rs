//! The shared model: L post-LN transformer blocks used by BOTH modalities with the same
//! weights, then z = mean of the final hidden states over the item's segments. With
//! `Trunk::Fc` the blocks have no attention (Table 1's `wo-t`).

use crate::Result;
use crate::backend::{Backend, Segments};
use crate::nn::block::BlockCache;
use crate::nn::{Dropout, EncoderBlock, ParamStore};
use crate::tensor::Tensor;

use super::config::{ModelConfig, Trunk};

#[derive(Clone, Debug)]
pub struct SharedEncoder {
    pub blocks: Vec<EncoderBlock>,
}

pub struct SharedCache {
    blocks: Vec<BlockCache>,
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
        let mut x = e;
        let mut blocks = Vec::with_capacity(self.blocks.len());
        for (i, block) in self.blocks.iter().enumerate() {
            let (y, c) = block.forward(dev, w, x, seg, drop.site(100 + i as u64))?;
            blocks.push(c);
            x = y;
        }
        Ok((x, SharedCache { blocks }))
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
        let mut d = dh;
        for (block, cache) in self.blocks.iter().zip(c.blocks).rev() {
            d = block.backward(dev, w, g, seg, cache, &d)?;
        }
        Ok(d)
    }
}
