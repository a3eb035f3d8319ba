//! y = x Wᵀ + b, W stored [out, in] as in PyTorch.

use super::params::{Init, Param, ParamStore};
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

    pub fn forward(&self, dev: &mut dyn Backend, w: &Tensor, x: &Tensor) -> Result<Tensor> {
        let rows = x.rows();
        if x.cols() != self.inputs {
            return Err(crate::Error::shape(
                "linear",
                format!("input has {} columns, layer takes {}", x.cols(), self.inputs),
            ));
        }
        let mut y = dev.alloc(&[rows, self.outputs])?;
        let g = Gemm { m: rows, n: self.outputs, k: self.inputs, trans_a: false, trans_b: true, alpha: 1.0, beta: 0.0 };
        match self.bias {
            Some(b) => dev.gemm_bias(g, x.view(), self.weight.of(w), b.of(w), &mut y)?,
            None => dev.gemm(g, x.view(), self.weight.of(w), y.view_mut())?,
        }
        Ok(y)
    }

    /// x Wᵀ without the bias, for an op that adds it in its own pass
    /// (`Backend::bias_gelu_dropout_fwd`); the bias is `bias_of(w)`.
    pub fn forward_unbiased(&self, dev: &mut dyn Backend, w: &Tensor, x: &Tensor) -> Result<Tensor> {
        Linear { bias: None, ..self.clone() }.forward(dev, w, x)
    }

    pub fn bias_of<'a>(&self, w: &'a Tensor) -> Option<View<'a>> {
        self.bias.map(|b| b.of(w))
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

    /// Accumulates dW += dyᵀ x, db += Σ dy; returns dx = dy W.
    pub fn backward(
        &self,
        dev: &mut dyn Backend,
        w: &Tensor,
        g: &mut Tensor,
        x: &Tensor,
        dy: &Tensor,
    ) -> Result<Tensor> {
        self.backward_params(dev, g, x.view(), dy)?;
        let rows = x.rows();
        let mut dx = dev.alloc(&[rows, self.inputs])?;
        let gx =
            Gemm { m: rows, n: self.inputs, k: self.outputs, trans_a: false, trans_b: false, alpha: 1.0, beta: 0.0 };
        dev.gemm(gx, dy.view(), self.weight.of(w), dx.view_mut())?;
        Ok(dx)
    }
}
