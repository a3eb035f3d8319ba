//! One post-LN transformer encoder block:
//!   x₁ = LN₁(x + Drop(MHA(x)))
//!   y  = LN₂(x₁ + Drop(W₂ Drop(GELU(W₁ x₁))))
//! Without its attention sublayer (x₁ = x) it is the FC block of Table 1's `wo-t` and `wo-r`.
//! Each `LN(x + Drop(·))` join is one fused op forward and one backward (no clone).

use super::Dropout;
use super::attention::{AttentionCache, MultiHeadAttention};
use super::layernorm::{LayerNorm, LayerNormCache};
use super::linear::Linear;
use super::params::{ParamStore, Weights};
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

    /// The block on x, with bf16 activations when x is bf16 (then `w` holds the weights'
    /// bf16 copy).
    pub fn forward<'w>(
        &self,
        dev: &mut dyn Backend,
        w: impl Into<Weights<'w>>,
        x: Tensor,
        seg: &Segments,
        drop: Dropout,
    ) -> Result<(Tensor, BlockCache)> {
        let w = w.into();
        let (x1, attention) = match &self.attention {
            Some((attn, norm1)) => {
                let (a, attn_cache) = attn.forward(dev, w, &x, seg)?;
                let (x1, norm1_cache) = norm1.forward_residual(dev, w.values, a, &x, drop.site(0))?;
                (x1, Some((x, attn_cache, norm1_cache)))
            }
            None => (x, None),
        };
        // The feed-forward: u = x1 W1ᵀ + b1 (the bias added where the GEMM stores u), then
        // GELU and dropout in one pass that reads u and writes the hidden activation.
        let mut pre_gelu = self.fc1.forward(dev, w, &x1)?;
        let d1 = drop.site(1);
        let hidden = dev.bias_gelu_dropout_fwd(&mut pre_gelu, None, d1.p, d1.seed)?;
        let f = self.fc2.forward(dev, w, &hidden)?;
        let (y, norm2) = self.norm2.forward_residual(dev, w.values, f, &x1, drop.site(2))?;
        Ok((y, BlockCache { attention, x1, pre_gelu, hidden, norm2, drop }))
    }

    /// The block at inference: [`EncoderBlock::forward`]'s values with no dropout and nothing
    /// kept for a backward, so each activation goes back to the pool once the next op has read
    /// it; GELU in the memory fc1's GEMM wrote (`Linear::forward_gelu`), and each join in the
    /// sublayer's (`LayerNorm::infer_residual`).
    pub fn infer<'w>(
        &self,
        dev: &mut dyn Backend,
        w: impl Into<Weights<'w>>,
        x: Tensor,
        seg: &Segments,
    ) -> Result<Tensor> {
        let w = w.into();
        let x1 = match &self.attention {
            Some((attn, norm1)) => {
                let a = attn.infer(dev, w, &x, seg)?;
                norm1.infer_residual(dev, w.values, a, &x)?
            }
            None => x,
        };
        let f = {
            let hidden = self.fc1.forward_gelu(dev, w, &x1)?;
            self.fc2.forward(dev, w, &hidden)?
        };
        self.norm2.infer_residual(dev, w.values, f, &x1)
    }

    pub fn backward<'w>(
        &self,
        dev: &mut dyn Backend,
        w: impl Into<Weights<'w>>,
        g: &mut Tensor,
        seg: &Segments,
        c: BlockCache,
        dy: &Tensor,
    ) -> Result<Tensor> {
        let w = w.into();
        // fc2's bias gradient is summed by the join's backward as it writes df.
        let (mut dx1, df) =
            self.norm2.backward_residual(dev, w.values, g, c.norm2, dy, c.drop.site(2), self.fc2.bias)?;
        let dhidden = Linear { bias: None, ..self.fc2.clone() }.backward(dev, w, g, &c.hidden, &df)?;
        let d1 = c.drop.site(1);
        // fc1's bias gradient is summed by the activation's backward as it writes dpre.
        let dpre = match self.fc1.bias {
            Some(b) => dev.gelu_dropout_bias_bwd(&c.pre_gelu, dhidden, d1.p, d1.seed, b.of_mut(g))?,
            None => dev.gelu_dropout_bwd(&c.pre_gelu, dhidden, d1.p, d1.seed)?,
        };
        Linear { bias: None, ..self.fc1.clone() }.backward_into(dev, w, g, &c.x1, &dpre, &mut dx1)?;
        let (Some((attn, norm1)), Some((x, attn_cache, norm1_cache))) = (&self.attention, c.attention) else {
            return Ok(dx1);
        };
        // The out-projection's bias gradient likewise, as it writes da.
        let (mut dx, da) =
            norm1.backward_residual(dev, w.values, g, norm1_cache, &dx1, c.drop.site(0), attn.out.bias)?;
        attn.backward_into(dev, w, g, &x, seg, attn_cache, &da, &mut dx)?;
        Ok(dx)
    }
}
