//! Bidirectional GRU over packed variable-length sequences, with backprop through time.
//! Per direction: one GEMM for the input projections of all timesteps, then the recurrence,
//! both directions in one backend call (`Backend::gru_fwd`: per step one recurrent GEMM and
//! one fused gate op, which adds b_hh and writes h_{s+1} beside h_s; the CPU runs the two
//! directions at once); backward mirrors it (`Backend::gru_bwd`) and computes the recurrent
//! weight gradient as ONE GEMM over all steps. Names follow torch.nn.GRU (`weight_ih_l0`,
//! `weight_hh_l0_reverse`, ...), gate order (r, z, n).

use super::linear::Linear;
use super::params::{Init, Param, ParamStore};
use crate::Result;
use crate::backend::{Backend, GruRunBwd, GruRunFwd, Segments};
use crate::tensor::Tensor;

#[derive(Clone, Debug)]
pub struct GruDirection {
    /// x → (r, z, n) pre-activations: weight_ih `[3H, In]`, bias_ih `[3H]`.
    pub input: Linear,
    /// h → (r, z, n): weight_hh `[3H, H]`, bias_hh `[3H]`.
    pub hidden: Linear,
    pub reverse: bool,
}

#[derive(Clone, Debug)]
pub struct BiGru {
    pub dirs: [GruDirection; 2],
    pub hidden: usize,
}

struct DirectionCache {
    /// (r, z, n, W_hn h + b_hn) of every step: [steps·items, 4H].
    gates: Tensor,
    /// h_0 = 0, h_1 … h_steps: [(steps + 1)·items, H].
    hs: Tensor,
}

pub struct BiGruCache {
    x: Tensor,
    dirs: [DirectionCache; 2],
}

impl GruDirection {
    fn new(store: &mut ParamStore, name: &str, inputs: usize, hidden: usize, reverse: bool) -> Self {
        // torch.nn.GRU's initialisation: U(±1/√H) for every weight and bias.
        let a = 1.0 / (hidden as f32).sqrt();
        let sfx = if reverse { "_reverse" } else { "" };
        let mut lin = |kind: &str, inp: usize| {
            let weight = store.add(format!("{name}.weight_{kind}_l0{sfx}"), &[3 * hidden, inp], Init::Uniform(a), true);
            Linear { weight, bias: None, inputs: inp, outputs: 3 * hidden }
        };
        let mut input = lin("ih", inputs);
        let mut hid = lin("hh", hidden);
        input.bias = Some(store.add(format!("{name}.bias_ih_l0{sfx}"), &[3 * hidden], Init::Uniform(a), false));
        hid.bias = Some(store.add(format!("{name}.bias_hh_l0{sfx}"), &[3 * hidden], Init::Uniform(a), false));
        GruDirection { input, hidden: hid, reverse }
    }

    /// b_hh, which the gate kernel adds (every GRU built by `new` has it).
    fn bias_hh(&self) -> Result<Param> {
        self.hidden.bias.ok_or_else(|| crate::Error::config("a GRU direction without its hidden bias b_hh"))
    }

    /// The input projections of every step (x·W_ihᵀ + b_ih) and the buffers its recurrence
    /// writes: hs with h_0 = 0, the gates.
    fn prepare(&self, dev: &mut dyn Backend, w: &Tensor, x: &Tensor, seg: &Segments, hidden: usize) -> Result<Pending> {
        let (items, steps) = (seg.items(), seg.max_len);
        let xproj = self.input.forward(dev, w, x)?;
        let mut hs = dev.alloc(&[(steps + 1) * items, hidden])?;
        dev.fill(hs.sub_mut(0, items * hidden), 0.0)?;
        let gates = dev.alloc(&[steps * items, 4 * hidden])?;
        Ok(Pending { xproj, cache: DirectionCache { gates, hs } })
    }

    fn run_fwd<'a>(&self, w: &'a Tensor, p: &'a mut Pending) -> Result<GruRunFwd<'a>> {
        Ok(GruRunFwd {
            reverse: self.reverse,
            xproj: &p.xproj,
            w_hh: self.hidden.weight.of(w),
            bias_hh: self.bias_hh()?.of(w),
            hs: &mut p.cache.hs,
            gates: &mut p.cache.gates,
        })
    }

    fn run_bwd<'a>(&self, w: &'a Tensor, c: &'a DirectionCache, grads: &'a mut [Tensor; 3]) -> GruRunBwd<'a> {
        let [dh, dxproj, dhproj] = grads;
        GruRunBwd {
            reverse: self.reverse,
            w_hh: self.hidden.weight.of(w),
            gates: &c.gates,
            hs: &c.hs,
            dh,
            dxproj,
            dhproj,
        }
    }

    /// The gradients a backward recurrence writes, zero: dh, dxproj; and dhproj.
    fn grads(&self, dev: &mut dyn Backend, seg: &Segments, hidden: usize) -> Result<[Tensor; 3]> {
        let (items, steps) = (seg.items(), seg.max_len);
        // Every step's dhproj at its own rows, beside the forward's h_s: the weight gradient
        // of W_hh is then one GEMM over all steps, with nothing copied per step.
        Ok([
            dev.zeros(&[items, hidden])?,
            dev.zeros(&[seg.tokens(), 3 * hidden])?,
            dev.alloc(&[steps * items, 3 * hidden])?,
        ])
    }

    /// W_hh's and b_hh's gradients from this direction's recurrence.
    fn recurrent_params(
        &self,
        dev: &mut dyn Backend,
        g: &mut Tensor,
        seg: &Segments,
        hs: &Tensor,
        dhproj: &Tensor,
        hidden: usize,
    ) -> Result<()> {
        let rows = seg.max_len * seg.items() * hidden;
        // dW_hh += Σ_s dhproj_sᵀ h_s (rows 0..steps of hs), db_hh += Σ dhproj.
        self.hidden.backward_params(dev, g, hs.sub(0, rows), dhproj)
    }
}

/// A direction's input projections and buffers, before its recurrence runs.
struct Pending {
    xproj: Tensor,
    cache: DirectionCache,
}

impl BiGru {
    pub fn new(store: &mut ParamStore, name: &str, inputs: usize, hidden: usize) -> Self {
        BiGru {
            dirs: [
                GruDirection::new(store, name, inputs, hidden, false),
                GruDirection::new(store, name, inputs, hidden, true),
            ],
            hidden,
        }
    }

    /// x [tokens, In] → [tokens, 2H] = [h→_t ; h←_t]. Both directions' recurrences in one
    /// backend call (`Backend::gru_fwd`), so a device may run them at once.
    pub fn forward(
        &self,
        dev: &mut dyn Backend,
        w: &Tensor,
        x: Tensor,
        seg: &Segments,
    ) -> Result<(Tensor, BiGruCache)> {
        let mut out = dev.zeros(&[seg.tokens(), 2 * self.hidden])?;
        let mut fwd = self.dirs[0].prepare(dev, w, &x, seg, self.hidden)?;
        let mut rev = self.dirs[1].prepare(dev, w, &x, seg, self.hidden)?;
        let runs = [self.dirs[0].run_fwd(w, &mut fwd)?, self.dirs[1].run_fwd(w, &mut rev)?];
        dev.gru_fwd(seg, self.hidden, runs, &mut out)?;
        Ok((out, BiGruCache { x, dirs: [fwd.cache, rev.cache] }))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        dev: &mut dyn Backend,
        w: &Tensor,
        g: &mut Tensor,
        seg: &Segments,
        c: BiGruCache,
        dout: &Tensor,
    ) -> Result<Tensor> {
        let [fwd, rev] = &c.dirs;
        let mut grads = [self.dirs[0].grads(dev, seg, self.hidden)?, self.dirs[1].grads(dev, seg, self.hidden)?];
        {
            let [g0, g1] = &mut grads;
            let runs = [self.dirs[0].run_bwd(w, fwd, g0), self.dirs[1].run_bwd(w, rev, g1)];
            dev.gru_bwd(seg, self.hidden, runs, dout)?;
        }
        let [[_, dxproj0, dhproj0], [_, dxproj1, dhproj1]] = &grads;
        let [d0, d1] = &self.dirs;
        d0.recurrent_params(dev, g, seg, &fwd.hs, dhproj0, self.hidden)?;
        d1.recurrent_params(dev, g, seg, &rev.hs, dhproj1, self.hidden)?;
        // dx = dxproj→ W_ih→ + dxproj← W_ih←, the second added in its GEMM.
        let mut dx = d0.input.backward(dev, w, g, &c.x, dxproj0)?;
        d1.input.backward_into(dev, w, g, &c.x, dxproj1, &mut dx)?;
        Ok(dx)
    }
}
