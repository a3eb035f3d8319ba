//! Token embedding: a row lookup forward, a scatter-add backward.

use super::params::{Init, Param, ParamStore};
use crate::Result;
use crate::backend::Backend;
use crate::tensor::{Ids, Tensor};

#[derive(Clone, Debug)]
pub struct Embedding {
    pub weight: Param,
    pub vocab: usize,
    pub dim: usize,
}

impl Embedding {
    pub fn new(store: &mut ParamStore, name: &str, vocab: usize, dim: usize) -> Self {
        let weight = store.add(format!("{name}.weight"), &[vocab, dim], Init::Normal(1.0 / (dim as f32).sqrt()), true);
        Embedding { weight, vocab, dim }
    }

    pub fn forward(&self, dev: &mut dyn Backend, w: &Tensor, ids: &Ids) -> Result<Tensor> {
        dev.gather_rows(self.weight.of(w), self.dim, ids)
    }

    pub fn backward(&self, dev: &mut dyn Backend, g: &mut Tensor, ids: &Ids, dy: &Tensor) -> Result<()> {
        dev.scatter_add_rows(dy, ids, self.weight.of_mut(g))
    }
}
