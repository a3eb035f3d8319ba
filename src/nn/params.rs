//! Parameters: ranges of one flat buffer, addressed by stable PyTorch-like names.
//!
//! Layers register their parameters with a `ParamStore` when built; the store hands back a
//! `Param` (offset and length in the flat buffer). Values, gradients and both AdamW moments
//! are four flat buffers with the same layout, so the optimizer is one fused pass and a
//! checkpoint is a list of (name, shape, range).

use std::ops::Range;

use crate::Result;
use crate::backend::Backend;
use crate::rng::Rng;
use crate::tensor::{DType, Tensor, View, ViewMut};

/// What a layer reads its parameters from: the f32 values, and, for a pass whose activations
/// are bf16, a bf16 copy of the trunk's run of them, which a GEMM then multiplies (its
/// operands share one type) and whose biases it adds (the bias has the output's type, as
/// PyTorch's autocast rounds a linear layer's bias). Norms and every gradient stay f32.
#[derive(Clone, Copy, Debug)]
pub struct Weights<'a> {
    pub values: &'a Tensor,
    pub bf16: Option<&'a Bf16Copy>,
}

/// A bf16 copy of the flat parameters' run `offset..offset + values.len()`, made once for
/// every pass that multiplies by it (a training step's, a loaded model's).
#[derive(Debug)]
pub struct Bf16Copy {
    pub values: Tensor,
    pub offset: usize,
}

impl Bf16Copy {
    /// The bf16 copy of `w`'s run `range`.
    pub fn of(dev: &mut dyn Backend, w: &Tensor, range: Range<usize>) -> Result<Bf16Copy> {
        let values = dev.convert(w.sub(range.start, range.len()), DType::Bf16)?;
        Ok(Bf16Copy { values, offset: range.start })
    }

    /// The copy of `w`'s run `range` that a pass on `dev` multiplies and `w` does not hold
    /// (None: `dev` runs f32 activations, or `w`'s copy covers the run).
    pub fn missing(dev: &mut dyn Backend, w: Weights, range: Range<usize>) -> Result<Option<Bf16Copy>> {
        match (dev.activations(), w.bf16) {
            (DType::Bf16, Some(copy)) if copy.covers(&range) => Ok(None),
            (DType::Bf16, _) => Bf16Copy::of(dev, w.values, range).map(Some),
            (DType::F32, _) => Ok(None),
        }
    }

    /// Whether the copy holds every element of `range`.
    pub fn covers(&self, range: &Range<usize>) -> bool {
        self.offset <= range.start && range.end <= self.offset + self.values.len()
    }
}

impl<'a> From<&'a Tensor> for Weights<'a> {
    fn from(values: &'a Tensor) -> Self {
        Weights { values, bf16: None }
    }
}

impl<'a> Weights<'a> {
    /// Parameter `p` as a linear layer on activations of type `x` reads it (its weight, its
    /// bias): the f32 values, or their bf16 copy.
    pub fn read(&self, p: Param, x: DType) -> Result<View<'a>> {
        match (x, self.bf16) {
            (DType::F32, _) => Ok(p.of(self.values)),
            (DType::Bf16, Some(copy)) if copy.covers(&(p.offset..p.offset + p.len)) => {
                Ok(copy.values.sub(p.offset - copy.offset, p.len))
            }
            (DType::Bf16, Some(_)) => Err(crate::Error::dtype(
                "linear",
                "bf16 activations, and a parameter outside the bf16 copy of the weights",
            )),
            (DType::Bf16, None) => Err(crate::Error::dtype(
                "linear",
                "bf16 activations, and no bf16 copy of the weights to multiply them by",
            )),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Param {
    pub offset: usize,
    pub len: usize,
}

#[derive(Clone, Copy, Debug)]
pub enum Init {
    Zeros,
    Ones,
    /// Uniform in ±a.
    Uniform(f32),
    /// Normal with this standard deviation.
    Normal(f32),
}

#[derive(Clone, Debug)]
pub struct ParamInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub param: Param,
    pub init: Init,
    /// Whether AdamW's weight decay applies (matrices yes; biases, norms, vectors no).
    pub decay: bool,
}

#[derive(Clone, Debug, Default)]
pub struct ParamStore {
    pub infos: Vec<ParamInfo>,
    pub total: usize,
}

impl ParamStore {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, name: impl Into<String>, shape: &[usize], init: Init, decay: bool) -> Param {
        let len = shape.iter().product();
        let param = Param { offset: self.total, len };
        self.total += len;
        self.infos.push(ParamInfo { name: name.into(), shape: shape.to_vec(), param, init, decay });
        param
    }

    pub fn find(&self, name: &str) -> Option<&ParamInfo> {
        self.infos.iter().find(|i| i.name == name)
    }

    /// Initial values, drawn in registration order from one seeded stream.
    pub fn init_values(&self, seed: u64) -> Vec<f32> {
        let mut rng = Rng::new(seed);
        let mut v = vec![0.0f32; self.total];
        for info in &self.infos {
            let dst = &mut v[info.param.offset..info.param.offset + info.param.len];
            match info.init {
                Init::Zeros => {}
                Init::Ones => dst.fill(1.0),
                Init::Uniform(a) => dst.iter_mut().for_each(|x| *x = ((rng.uniform() * 2.0 - 1.0) * a as f64) as f32),
                Init::Normal(s) => dst.iter_mut().for_each(|x| *x = (rng.normal() * s as f64) as f32),
            }
        }
        v
    }

    /// Maximal runs of consecutive parameters with the same decay flag: (offset, len, decay).
    pub fn decay_runs(&self) -> Vec<(usize, usize, bool)> {
        let mut runs: Vec<(usize, usize, bool)> = Vec::new();
        for info in &self.infos {
            match runs.last_mut() {
                Some(last) if last.2 == info.decay && last.0 + last.1 == info.param.offset => last.1 += info.param.len,
                _ => runs.push((info.param.offset, info.param.len, info.decay)),
            }
        }
        runs
    }

    pub fn upload(&self, b: &mut dyn Backend, values: &[f32]) -> Result<Tensor> {
        b.upload(values, &[self.total])
    }
}

impl Param {
    pub fn of(self, t: &Tensor) -> View<'_> {
        t.sub(self.offset, self.len)
    }
    pub fn of_mut(self, t: &mut Tensor) -> ViewMut<'_> {
        t.sub_mut(self.offset, self.len)
    }
    /// This parameter's and another's gradient views at once.
    pub fn with_mut(self, other: Param, t: &mut Tensor) -> (ViewMut<'_>, ViewMut<'_>) {
        t.sub_pair_mut((self.offset, self.len), (other.offset, other.len))
    }
    /// This parameter's and two others' gradient views at once.
    pub fn with_two_mut(self, b: Param, c: Param, t: &mut Tensor) -> [ViewMut<'_>; 3] {
        t.subs_mut([(self.offset, self.len), (b.offset, b.len), (c.offset, c.len)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Precision, open_at};

    #[test]
    fn a_bf16_copy_of_a_run_serves_its_weights_and_refuses_the_others() {
        let mut dev = open_at("cpu", Precision::Bf16).unwrap();
        let values: Vec<f32> = (0..10).map(|i| 1.0 + i as f32 / 3.0).collect();
        let w = dev.upload(&values, &[10]).unwrap();
        let copy = Bf16Copy::of(dev.as_mut(), &w, 3..8).unwrap();
        let weights = Weights { values: &w, bf16: Some(&copy) };
        let inside = Param { offset: 4, len: 4 };
        let got = dev.download(weights.read(inside, DType::Bf16).unwrap()).unwrap();
        let want: Vec<f32> = values[4..8].iter().map(|&x| DType::Bf16.round(x)).collect();
        assert_eq!(got, want);
        // f32 activations read the values themselves, inside the run or not.
        assert_eq!(dev.download(weights.read(inside, DType::F32).unwrap()).unwrap(), values[4..8]);
        for outside in [Param { offset: 2, len: 3 }, Param { offset: 6, len: 3 }] {
            let e = weights.read(outside, DType::Bf16).unwrap_err().to_string();
            assert!(e.contains("outside the bf16 copy"), "{e}");
        }
        let e = Weights::from(&w).read(inside, DType::Bf16).unwrap_err().to_string();
        assert!(e.contains("no bf16 copy"), "{e}");
    }
}
