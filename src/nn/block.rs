//! One post-LN transformer encoder block:
//!   x₁ = LN₁(x + Drop(MHA(x)))
//!   y  = LN₂(x₁ + Drop(W₂ Drop(GELU(W₁ x₁))))
//! Without its attention sublayer (x₁ = x) it is the FC block of Table 1's `wo-t` and `wo-r`.

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
    /// The attention sublayer and its norm; `None` in an FC block.
    pub attention: Option<(MultiHeadAttention, LayerNorm)>,
    pub fc1: Linear,
    pub fc2: Linear,
    pub norm2: LayerNorm,
}

pub struct BlockCache {
    attention: Option<(Tensor, AttentionCache, LayerNormCache)>,
    x1: Tensor,
    pre_gelu: Tensor,
    hidden: Tensor,
    norm2: LayerNormCache,
    drop: Dropout,
}

impl EncoderBlock {
    /// `heads: None` builds the FC block.
    pub fn new(store: &mut ParamStore, name: &str, dim: usize, heads: Option<usize>, ffn: usize) -> Self {
        EncoderBlock {
            attention: heads.map(|heads| {
                let attn = MultiHeadAttention::new(store, &format!("{name}.attn"), dim, heads);
                (attn, LayerNorm::new(store, &format!("{name}.norm1"), dim))
            }),
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
        let (x1, attention) = match &self.attention {
            Some((attn, norm1)) => {
                let (mut a, attn_cache) = attn.forward(dev, w, &x, seg)?;
                drop.site(0).forward(dev, &mut a)?;
                dev.add_assign(&mut a, &x)?;
                let (x1, norm1_cache) = norm1.forward(dev, w, a)?;
                (x1, Some((x, attn_cache, norm1_cache)))
            }
            None => (x, None),
        };
        let pre_gelu = self.fc1.forward(dev, w, &x1)?;
        let mut hidden = dev.gelu_fwd(&pre_gelu)?;
        drop.site(1).forward(dev, &mut hidden)?;
        let mut f = self.fc2.forward(dev, w, &hidden)?;
        drop.site(2).forward(dev, &mut f)?;
        dev.add_assign(&mut f, &x1)?;
        let (y, norm2) = self.norm2.forward(dev, w, f)?;
        Ok((y, BlockCache { attention, x1, pre_gelu, hidden, norm2, drop }))
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
        let (Some((attn, norm1)), Some((x, attn_cache, norm1_cache))) = (&self.attention, c.attention) else {
            return Ok(dx1);
        };
        let mut dx = norm1.backward(dev, w, g, norm1_cache, &dx1)?;
        let mut da = dx.clone();
        c.drop.site(0).backward(dev, &mut da)?;
        let dx_attn = attn.backward(dev, w, g, &x, seg, attn_cache, &da)?;
        dev.add_assign(&mut dx, &dx_attn)?;
        Ok(dx)
    }
}
