//! y = x Wᵀ + b, W stored [out, in] as in PyTorch.

use super::params::{Init, Param, ParamStore, Weights};
use crate::Result;
use crate::backend::{Backend, Gemm};
use crate::tensor::{Tensor, View};

#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Param,
    pub bias: Option<Param>,
    pub inputs: usize,
    pub outputs: usize,
}

impl Linear {
    /// Xavier-uniform weight, zero bias; registered as `{name}.weight` and `{name}.bias`.
    pub fn new(store: &mut ParamStore, name: &str, inputs: usize, outputs: usize, bias: bool) -> Self {
        let a = (6.0 / (inputs + outputs) as f32).sqrt();
        Self::with_init(store, name, inputs, outputs, bias, Init::Uniform(a))
    }

    pub fn with_init(
        store: &mut ParamStore,
        name: &str,
        inputs: usize,
        outputs: usize,
        bias: bool,
        init: Init,
    ) -> Self {
        let weight = store.add(format!("{name}.weight"), &[outputs, inputs], init, true);
        let bias = bias.then(|| store.add(format!("{name}.bias"), &[outputs], Init::Zeros, false));
        Linear { weight, bias, inputs, outputs }
    }

    /// `y = x Wᵀ + b`, stored as x is (bf16 activations multiply `w`'s bf16 copy).
    pub fn forward<'w>(&self, dev: &mut dyn Backend, w: impl Into<Weights<'w>>, x: &Tensor) -> Result<Tensor> {
        let mut y = dev.alloc_as(&[x.rows(), self.outputs], x.dtype())?;
        self.product(dev, w.into(), x, &mut y, 0.0)?;
        Ok(y)
    }

    /// `y += x Wᵀ + b`: a sum of linear maps without a separate add (the GEMM's beta).
    pub fn forward_into(&self, dev: &mut dyn Backend, w: &Tensor, x: &Tensor, y: &mut Tensor) -> Result<()> {
        self.product(dev, w.into(), x, y, 1.0)
    }

    /// `GELU(x Wᵀ + b)` at inference (the feed-forward's first layer, `Backend::gemm_bias_gelu`):
    /// the pre-activation a backward would read is not kept. The values of `forward` then
    /// `bias_gelu_dropout_fwd` without dropout.
    pub fn forward_gelu<'w>(&self, dev: &mut dyn Backend, w: impl Into<Weights<'w>>, x: &Tensor) -> Result<Tensor> {
        let w = w.into();
        let mut y = dev.alloc_as(&[x.rows(), self.outputs], x.dtype())?;
        let g = self.gemm_of(x, 0.0)?;
        let weight = w.read(self.weight, x.dtype())?;
        match self.bias {
            Some(b) => dev.gemm_bias_gelu(g, x.view(), weight, w.read(b, y.dtype())?, &mut y)?,
            None => {
                dev.gemm(g, x.view(), weight, y.view_mut())?;
                y = dev.bias_gelu_dropout_fwd(&mut y, None, 0.0, 0)?;
            }
        }
        Ok(y)
    }

    /// `y = x Wᵀ + b + beta · y`.
    fn product(&self, dev: &mut dyn Backend, w: Weights, x: &Tensor, y: &mut Tensor, beta: f32) -> Result<()> {
        let g = self.gemm_of(x, beta)?;
        let weight = w.read(self.weight, x.dtype())?;
        match self.bias {
            Some(b) => dev.gemm_bias(g, x.view(), weight, w.read(b, y.dtype())?, y),
            None => dev.gemm(g, x.view(), weight, y.view_mut()),
        }
    }

    /// The layer's GEMM on x (`x Wᵀ`, then `+ beta · y`), or why x does not fit the layer.
    fn gemm_of(&self, x: &Tensor, beta: f32) -> Result<Gemm> {
        if x.cols() != self.inputs {
            return Err(crate::Error::shape(
                "linear",
                format!("input has {} columns, layer takes {}", x.cols(), self.inputs),
            ));
        }
        Ok(Gemm { m: x.rows(), n: self.outputs, k: self.inputs, trans_a: false, trans_b: true, alpha: 1.0, beta })
    }

    /// Parameter gradients only (the input needs none, e.g. the first layer on data). `x` is
    /// a view (the GRU's states are rows of a larger buffer) with `dy`'s rows.
    pub fn backward_params(&self, dev: &mut dyn Backend, g: &mut Tensor, x: View, dy: &Tensor) -> Result<()> {
        let rows = dy.rows();
        let gw =
            Gemm { m: self.outputs, n: self.inputs, k: rows, trans_a: true, trans_b: false, alpha: 1.0, beta: 1.0 };
        dev.gemm(gw, dy.view(), x, self.weight.of_mut(g))?;
        if let Some(b) = self.bias {
            dev.bias_bwd(dy, b.of_mut(g))?;
        }
        Ok(())
    }

    /// Accumulates dW += dyᵀ x, db += Σ dy; returns dx = dy W, stored as dy is.
    pub fn backward<'w>(
        &self,
        dev: &mut dyn Backend,
        w: impl Into<Weights<'w>>,
        g: &mut Tensor,
        x: &Tensor,
        dy: &Tensor,
    ) -> Result<Tensor> {
        let mut dx = dev.alloc_as(&[x.rows(), self.inputs], dy.dtype())?;
        self.backward_with(dev, w.into(), g, x, dy, &mut dx, 0.0)?;
        Ok(dx)
    }

    /// As `backward`, adding dy W to `dx` (a residual's or another branch's gradient) in the
    /// GEMM instead of a separate add.
    pub fn backward_into<'w>(
        &self,
        dev: &mut dyn Backend,
        w: impl Into<Weights<'w>>,
        g: &mut Tensor,
        x: &Tensor,
        dy: &Tensor,
        dx: &mut Tensor,
    ) -> Result<()> {
        self.backward_with(dev, w.into(), g, x, dy, dx, 1.0)
    }

    #[allow(clippy::too_many_arguments)]
    fn backward_with(
        &self,
        dev: &mut dyn Backend,
        w: Weights,
        g: &mut Tensor,
        x: &Tensor,
        dy: &Tensor,
        dx: &mut Tensor,
        beta: f32,
    ) -> Result<()> {
        self.backward_params(dev, g, x.view(), dy)?;
        let gx =
            Gemm { m: x.rows(), n: self.inputs, k: self.outputs, trans_a: false, trans_b: false, alpha: 1.0, beta };
        dev.gemm(gx, dy.view(), w.read(self.weight, dy.dtype())?, dx.view_mut())
    }
}
