//! LayerNorm over the last dimension with affine γ, β.

use super::params::{Init, Param, ParamStore};
use crate::Result;
use crate::backend::Backend;
use crate::tensor::Tensor;

pub const EPS: f32 = 1e-5;

#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub weight: Param,
    pub bias: Param,
}

pub struct LayerNormCache {
    pub x: Tensor,
    pub stats: Tensor,
}

impl LayerNorm {
    pub fn new(store: &mut ParamStore, name: &str, dim: usize) -> Self {
        LayerNorm {
            weight: store.add(format!("{name}.weight"), &[dim], Init::Ones, false),
            bias: store.add(format!("{name}.bias"), &[dim], Init::Zeros, false),
        }
    }

    /// Takes x by value: it is what backward needs.
    pub fn forward(&self, dev: &mut dyn Backend, w: &Tensor, x: Tensor) -> Result<(Tensor, LayerNormCache)> {
        let (y, stats) = dev.layernorm_fwd(&x, self.weight.of(w), self.bias.of(w), EPS)?;
        Ok((y, LayerNormCache { x, stats }))
    }

    pub fn backward(
        &self,
        dev: &mut dyn Backend,
        w: &Tensor,
        g: &mut Tensor,
        c: LayerNormCache,
        dy: &Tensor,
    ) -> Result<Tensor> {
        let (dg, db) = self.weight.with_mut(self.bias, g);
        dev.layernorm_bwd(&c.x, &c.stats, self.weight.of(w), dy, dg, db)
    }
}
