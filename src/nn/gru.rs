//! Bidirectional GRU over packed variable-length sequences, with backprop through time.
//! Per direction: one GEMM for the input projections of all timesteps, then per step one
//! recurrent GEMM and one fused gate op; backward mirrors it and computes the recurrent
//! weight gradient as ONE GEMM over all steps. Names follow torch.nn.GRU (`weight_ih_l0`,
//! `weight_hh_l0_reverse`, ...), gate order (r, z, n).

use super::linear::Linear;
use super::params::{Init, ParamStore};
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
    /// Per step: (r, z, n, W_hn h + b_hn), [items, 4H].
    gates: Vec<Tensor>,
    /// Per step: h before the step, [items, H].
    h_prev: Vec<Tensor>,
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
        let items = seg.items();
        let xproj = self.input.forward(dev, w, x)?;
        let mut h = dev.zeros(&[items, hidden])?;
        let mut cache =
            DirectionCache { gates: Vec::with_capacity(seg.max_len), h_prev: Vec::with_capacity(seg.max_len) };
        for s in 0..seg.max_len {
            let hproj = self.hidden.forward(dev, w, &h)?;
            let mut gates = dev.zeros(&[items, 4 * hidden])?;
            cache.h_prev.push(h.clone());
            dev.gru_step_fwd(self.step(s, hidden), seg, &xproj, &hproj, &mut h, out, &mut gates)?;
            cache.gates.push(gates);
        }
        Ok(cache)
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
        // All steps' dhproj and h_prev side by side, for one weight-gradient GEMM at the end.
        let mut dhproj_all = dev.zeros(&[steps * items, 3 * hidden])?;
        let mut h_prev_all = dev.zeros(&[steps * items, hidden])?;
        let mut dhproj = dev.zeros(&[items, 3 * hidden])?;
        let w_hh = self.hidden.weight.of(w);
        for s in (0..steps).rev() {
            dev.gru_step_bwd(
                self.step(s, hidden),
                seg,
                &c.gates[s],
                &c.h_prev[s],
                dout,
                &mut dh,
                &mut dxproj,
                &mut dhproj,
            )?;
            // dh_{s-1} += dhproj · W_hh
            let gh = Gemm { m: items, n: hidden, k: 3 * hidden, trans_a: false, trans_b: false, alpha: 1.0, beta: 1.0 };
            dev.gemm(gh, dhproj.view(), w_hh, dh.view_mut())?;
            dev.copy(dhproj.view(), dhproj_all.sub_mut(s * items * 3 * hidden, items * 3 * hidden))?;
            dev.copy(c.h_prev[s].view(), h_prev_all.sub_mut(s * items * hidden, items * hidden))?;
        }
        self.hidden.backward_params(dev, g, &h_prev_all, &dhproj_all)?;
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
