//! LayerNorm over the last dimension with affine γ, β.

use super::Dropout;
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

    /// The post-LN join `LN(x + drop(a))` in one op (`Backend::residual_layernorm_fwd`):
    /// `a` becomes the norm's input and the cache keeps it.
    pub fn forward_residual(
        &self,
        dev: &mut dyn Backend,
        w: &Tensor,
        mut a: Tensor,
        x: &Tensor,
        drop: Dropout,
    ) -> Result<(Tensor, LayerNormCache)> {
        let (y, stats) =
            dev.residual_layernorm_fwd(&mut a, x, self.weight.of(w), self.bias.of(w), EPS, drop.p, drop.seed)?;
        Ok((y, LayerNormCache { x: a, stats }))
    }

    /// [`LayerNorm::forward_residual`] at inference: `LN(x + a)` in a's memory, no dropout,
    /// nothing kept (`Backend::residual_layernorm`).
    pub fn infer_residual(&self, dev: &mut dyn Backend, w: &Tensor, a: Tensor, x: &Tensor) -> Result<Tensor> {
        dev.residual_layernorm(a, x, self.weight.of(w), self.bias.of(w), EPS)
    }

    /// Backward of [`LayerNorm::forward_residual`]: `(d x, d a)`, the residual's gradient and
    /// the sublayer's (through the same dropout mask). With `sublayer_bias` (the bias of the
    /// linear map that made `a`), its gradient Σ_rows d a is summed in the same pass; the
    /// caller then runs that linear's backward without it.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_residual(
        &self,
        dev: &mut dyn Backend,
        w: &Tensor,
        g: &mut Tensor,
        c: LayerNormCache,
        dy: &Tensor,
        drop: Dropout,
        sublayer_bias: Option<Param>,
    ) -> Result<(Tensor, Tensor)> {
        let gamma = self.weight.of(w);
        let (dg, db, dbias) = match sublayer_bias {
            Some(bias) => {
                let [dg, db, dbias] = self.weight.with_two_mut(self.bias, bias, g);
                (dg, db, Some(dbias))
            }
            None => {
                let (dg, db) = self.weight.with_mut(self.bias, g);
                (dg, db, None)
            }
        };
        dev.residual_layernorm_bwd(&c.x, &c.stats, gamma, dy, dg, db, dbias, drop.p, drop.seed)
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
