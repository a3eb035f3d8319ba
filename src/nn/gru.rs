//! Bidirectional GRU over packed variable-length sequences, with backprop through time.
//! Per direction: one GEMM for the input projections of all timesteps, then per step one
//! recurrent GEMM and one fused gate op (which adds b_hh and writes h_{s+1} beside h_s);
//! backward mirrors it, two launches per step, and computes the recurrent weight gradient as
//! ONE GEMM over all steps. Names follow torch.nn.GRU (`weight_ih_l0`,
//! `weight_hh_l0_reverse`, ...), gate order (r, z, n).

use super::linear::Linear;
use super::params::{Init, Param, ParamStore};
use crate::Result;
use crate::backend::{Backend, Gemm, GruStep, Segments};
use crate::tensor::Tensor;

#[derive(Clone, Debug)]
pub struct GruDirection {
    /// x → (r, z, n) pre-activations: weight_ih [3H, In], bias_ih [3H].
    pub input: Linear,
    /// h → (r, z, n): weight_hh [3H, H], bias_hh [3H].
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

    fn step(&self, s: usize, hidden: usize) -> GruStep {
        GruStep { s, reverse: self.reverse, hidden, out_col: if self.reverse { hidden } else { 0 } }
    }

    fn forward(
        &self,
        dev: &mut dyn Backend,
        w: &Tensor,
        x: &Tensor,
        seg: &Segments,
        out: &mut Tensor,
        hidden: usize,
    ) -> Result<DirectionCache> {
        let (items, steps) = (seg.items(), seg.max_len);
        let xproj = self.input.forward(dev, w, x)?;
        // Per step: one GEMM (W_hh h_s, its bias added by the gate kernel) and the gate kernel,
        // which writes h_{s+1} beside h_s: no state is cloned, no buffer cleared per step.
        let mut hs = dev.alloc(&[(steps + 1) * items, hidden])?;
        dev.fill(hs.sub_mut(0, items * hidden), 0.0)?;
        let mut gates = dev.alloc(&[steps * items, 4 * hidden])?;
        let mut hproj = dev.alloc(&[items, 3 * hidden])?;
        let bias_hh = self.bias_hh()?.of(w);
        let gh = Gemm { m: items, n: 3 * hidden, k: hidden, trans_a: false, trans_b: true, alpha: 1.0, beta: 0.0 };
        for s in 0..steps {
            dev.gemm(gh, hs.sub(s * items * hidden, items * hidden), self.hidden.weight.of(w), hproj.view_mut())?;
            dev.gru_step_fwd(self.step(s, hidden), seg, &xproj, &hproj, bias_hh, &mut hs, out, &mut gates)?;
        }
        Ok(DirectionCache { gates, hs })
    }

    /// Returns dx of this direction.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        dev: &mut dyn Backend,
        w: &Tensor,
        g: &mut Tensor,
        x: &Tensor,
        seg: &Segments,
        c: DirectionCache,
        dout: &Tensor,
        hidden: usize,
    ) -> Result<Tensor> {
        let (items, steps) = (seg.items(), seg.max_len);
        let mut dh = dev.zeros(&[items, hidden])?;
        let mut dxproj = dev.zeros(&[seg.tokens(), 3 * hidden])?;
        // Every step's dhproj at its own rows, beside the forward's h_s: the weight gradient
        // of W_hh is then one GEMM over all steps, with nothing copied per step.
        let mut dhproj = dev.alloc(&[steps * items, 3 * hidden])?;
        let w_hh = self.hidden.weight.of(w);
        // dh_s += dhproj_s · W_hh
        let gh = Gemm { m: items, n: hidden, k: 3 * hidden, trans_a: false, trans_b: false, alpha: 1.0, beta: 1.0 };
        for s in (0..steps).rev() {
            dev.gru_step_bwd(self.step(s, hidden), seg, &c.gates, &c.hs, dout, &mut dh, &mut dxproj, &mut dhproj)?;
            dev.gemm(gh, dhproj.sub(s * items * 3 * hidden, items * 3 * hidden), w_hh, dh.view_mut())?;
        }
        // dW_hh += Σ_s dhproj_sᵀ h_s (rows 0..steps of hs), db_hh += Σ dhproj.
        self.hidden.backward_params(dev, g, c.hs.sub(0, steps * items * hidden), &dhproj)?;
        self.input.backward(dev, w, g, x, &dxproj)
    }
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

    /// x [tokens, In] → [tokens, 2H] = [h→_t ; h←_t].
    pub fn forward(
        &self,
        dev: &mut dyn Backend,
        w: &Tensor,
        x: Tensor,
        seg: &Segments,
    ) -> Result<(Tensor, BiGruCache)> {
        let mut out = dev.zeros(&[seg.tokens(), 2 * self.hidden])?;
        let fwd = self.dirs[0].forward(dev, w, &x, seg, &mut out, self.hidden)?;
        let rev = self.dirs[1].forward(dev, w, &x, seg, &mut out, self.hidden)?;
        Ok((out, BiGruCache { x, dirs: [fwd, rev] }))
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
        let [fwd, rev] = c.dirs;
        let mut dx = self.dirs[0].backward(dev, w, g, &c.x, seg, fwd, dout, self.hidden)?;
        let dx_rev = self.dirs[1].backward(dev, w, g, &c.x, seg, rev, dout, self.hidden)?;
        dev.add_assign(&mut dx, &dx_rev)?;
        Ok(dx)
    }
}
