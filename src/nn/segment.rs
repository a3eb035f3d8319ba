//! Eq. 3: e_t = φ(ψ1(x̂_t) + ψ2(l_t)), φ = GELU(LayerNorm(·)).
//! ψ1 reads the segment's content, ψ2 its location (a box, or a position encoding).

use super::layernorm::{LayerNorm, LayerNormCache};
use super::linear::Linear;
use super::params::ParamStore;
use crate::Result;
use crate::backend::Backend;
use crate::tensor::Tensor;

#[derive(Clone, Debug)]
pub struct SegmentEmbed {
    pub psi1: Linear,
    pub psi2: Linear,
    pub norm: LayerNorm,
}

pub struct SegmentEmbedCache {
    x: Tensor,
    loc: Tensor,
    norm: LayerNormCache,
    normed: Tensor,
}

impl SegmentEmbed {
    pub fn new(store: &mut ParamStore, name: &str, content: usize, location: usize, dim: usize) -> Self {
        SegmentEmbed {
            psi1: Linear::new(store, &format!("{name}.psi1"), content, dim, true),
            psi2: Linear::new(store, &format!("{name}.psi2"), location, dim, true),
            norm: LayerNorm::new(store, &format!("{name}.norm"), dim),
        }
    }

    pub fn forward(
        &self,
        dev: &mut dyn Backend,
        w: &Tensor,
        x: Tensor,
        loc: Tensor,
    ) -> Result<(Tensor, SegmentEmbedCache)> {
        let mut s = self.psi1.forward(dev, w, &x)?;
        self.psi2.forward_into(dev, w, &loc, &mut s)?;
        let (normed, norm) = self.norm.forward(dev, w, s)?;
        let e = dev.gelu_fwd(&normed)?;
        Ok((e, SegmentEmbedCache { x, loc, norm, normed }))
    }

    /// The parameters' gradients, and with `content_grad` dx, the content's (None without:
    /// features that are data need none, and its GEMM is not run). The location is data and
    /// gets none.
    pub fn backward(
        &self,
        dev: &mut dyn Backend,
        w: &Tensor,
        g: &mut Tensor,
        c: SegmentEmbedCache,
        de: &Tensor,
        content_grad: bool,
    ) -> Result<Option<Tensor>> {
        let dnormed = dev.gelu_bwd(&c.normed, de)?;
        let ds = self.norm.backward(dev, w, g, c.norm, &dnormed)?;
        self.psi2.backward_params(dev, g, c.loc.view(), &ds)?;
        if !content_grad {
            return self.psi1.backward_params(dev, g, c.x.view(), &ds).map(|()| None);
        }
        self.psi1.backward(dev, w, g, &c.x, &ds).map(Some)
    }
}
