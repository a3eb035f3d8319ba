//! One post-LN transformer encoder block:
//!   x₁ = LN₁(x + Drop(MHA(x)))
//!   y  = LN₂(x₁ + Drop(W₂ Drop(GELU(W₁ x₁))))

use super::Dropout;
use super::attention::{AttentionCache, MultiHeadAttention};
use super::layernorm::{LayerNorm, LayerNormCache};
use super::linear::Linear;
use super::params::ParamStore;
use crate::Result;
use crate::backend::{Backend, Segments};
use crate::tensor::Tensor;

#[derive(Clone, Debug)]
pub struct EncoderBlock {
    pub attn: MultiHeadAttention,
    pub norm1: LayerNorm,
    pub fc1: Linear,
    pub fc2: Linear,
    pub norm2: LayerNorm,
}

pub struct BlockCache {
    x: Tensor,
    attn: AttentionCache,
    norm1: LayerNormCache,
    x1: Tensor,
    pre_gelu: Tensor,
    hidden: Tensor,
    norm2: LayerNormCache,
    drop: Dropout,
}

impl EncoderBlock {
    pub fn new(store: &mut ParamStore, name: &str, dim: usize, heads: usize, ffn: usize) -> Self {
        EncoderBlock {
            attn: MultiHeadAttention::new(store, &format!("{name}.attn"), dim, heads),
            norm1: LayerNorm::new(store, &format!("{name}.norm1"), dim),
            fc1: Linear::new(store, &format!("{name}.ffn.fc1"), dim, ffn, true),
            fc2: Linear::new(store, &format!("{name}.ffn.fc2"), ffn, dim, true),
            norm2: LayerNorm::new(store, &format!("{name}.norm2"), dim),
        }
    }

    pub fn forward(
        &self,
        dev: &mut dyn Backend,
        w: &Tensor,
        x: Tensor,
        seg: &Segments,
        drop: Dropout,
    ) -> Result<(Tensor, BlockCache)> {
        let (mut a, attn) = self.attn.forward(dev, w, &x, seg)?;
        drop.site(0).forward(dev, &mut a)?;
        dev.add_assign(&mut a, &x)?;
        let (x1, norm1) = self.norm1.forward(dev, w, a)?;
        let pre_gelu = self.fc1.forward(dev, w, &x1)?;
        let mut hidden = dev.gelu_fwd(&pre_gelu)?;
        drop.site(1).forward(dev, &mut hidden)?;
        let mut f = self.fc2.forward(dev, w, &hidden)?;
        drop.site(2).forward(dev, &mut f)?;
        dev.add_assign(&mut f, &x1)?;
        let (y, norm2) = self.norm2.forward(dev, w, f)?;
        Ok((y, BlockCache { x, attn, norm1, x1, pre_gelu, hidden, norm2, drop }))
    }

    pub fn backward(
        &self,
        dev: &mut dyn Backend,
        w: &Tensor,
        g: &mut Tensor,
        seg: &Segments,
        c: BlockCache,
        dy: &Tensor,
    ) -> Result<Tensor> {
        let mut dx1 = self.norm2.backward(dev, w, g, c.norm2, dy)?;
        let mut df = dx1.clone();
        c.drop.site(2).backward(dev, &mut df)?;
        let mut dhidden = self.fc2.backward(dev, w, g, &c.hidden, &df)?;
        c.drop.site(1).backward(dev, &mut dhidden)?;
        let dpre = dev.gelu_bwd(&c.pre_gelu, &dhidden)?;
        let dx1_ffn = self.fc1.backward(dev, w, g, &c.x1, &dpre)?;
        dev.add_assign(&mut dx1, &dx1_ffn)?;
        let mut dx = self.norm1.backward(dev, w, g, c.norm1, &dx1)?;
        let mut da = dx.clone();
        c.drop.site(0).backward(dev, &mut da)?;
        let dx_attn = self.attn.backward(dev, w, g, &c.x, seg, c.attn, &da)?;
        dev.add_assign(&mut dx, &dx_attn)?;
        Ok(dx)
    }
}
