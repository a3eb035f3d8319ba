//! Multi-head self-attention: qkv = x W_qkvᵀ, per-head softmax(q kᵀ/√dh) v, out projection.

use super::linear::Linear;
use super::params::{ParamStore, Weights};
use crate::Result;
use crate::backend::{Backend, Segments};
use crate::tensor::Tensor;

#[derive(Clone, Debug)]
pub struct MultiHeadAttention {
    pub qkv: Linear,
    pub out: Linear,
    pub heads: usize,
}

pub struct AttentionCache {
    qkv: Tensor,
    probs: Tensor,
    context: Tensor,
}

impl MultiHeadAttention {
    pub fn new(store: &mut ParamStore, name: &str, dim: usize, heads: usize) -> Self {
        assert!(dim.is_multiple_of(heads), "model width {dim} is not divisible by {heads} heads");
        MultiHeadAttention {
            qkv: Linear::new(store, &format!("{name}.qkv"), dim, 3 * dim, true),
            out: Linear::new(store, &format!("{name}.out"), dim, dim, true),
            heads,
        }
    }

    /// The input x is not cached here: the block keeps it (it is also the residual).
    pub fn forward<'w>(
        &self,
        dev: &mut dyn Backend,
        w: impl Into<Weights<'w>>,
        x: &Tensor,
        seg: &Segments,
    ) -> Result<(Tensor, AttentionCache)> {
        let w = w.into();
        let qkv = self.qkv.forward(dev, w, x)?;
        let (context, probs) = dev.attention_fwd(&qkv, seg, self.heads)?;
        let y = self.out.forward(dev, w, &context)?;
        Ok((y, AttentionCache { qkv, probs, context }))
    }

    /// [`MultiHeadAttention::forward`] at inference: y alone, nothing kept for a backward.
    pub fn infer<'w>(
        &self,
        dev: &mut dyn Backend,
        w: impl Into<Weights<'w>>,
        x: &Tensor,
        seg: &Segments,
    ) -> Result<Tensor> {
        let w = w.into();
        let qkv = self.qkv.forward(dev, w, x)?;
        let context = dev.attention(&qkv, seg, self.heads)?;
        self.out.forward(dev, w, &context)
    }

    /// Adds the block input's gradient through attention to `dx` (the residual's gradient),
    /// and accumulates every parameter's gradient but the out-projection's bias: that one is
    /// Σ_rows dy, which the block's join sums as it writes dy (`LayerNorm::backward_residual`;
    /// alone, `Backend::bias_bwd` of dy). The qkv bias's, Σ_rows dqkv, is summed by the
    /// attention backward as it writes dqkv.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_into<'w>(
        &self,
        dev: &mut dyn Backend,
        w: impl Into<Weights<'w>>,
        g: &mut Tensor,
        x: &Tensor,
        seg: &Segments,
        c: AttentionCache,
        dy: &Tensor,
        dx: &mut Tensor,
    ) -> Result<()> {
        let w = w.into();
        let dcontext = Linear { bias: None, ..self.out.clone() }.backward(dev, w, g, &c.context, dy)?;
        let dbias = self.qkv.bias.map(|b| b.of_mut(g));
        let dqkv = dev.attention_bwd(&c.qkv, &c.probs, seg, self.heads, &dcontext, dbias)?;
        Linear { bias: None, ..self.qkv.clone() }.backward_into(dev, w, g, x, &dqkv, dx)
    }
}
