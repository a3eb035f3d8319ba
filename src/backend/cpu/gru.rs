//! GRU gates for one timestep of a packed batch, forward and backward (PyTorch equations):
//!   r = σ(x_r + h_r),  z = σ(x_z + h_z),  n = tanh(x_n + r ⊙ h_n),  h' = (1 − z) ⊙ n + z ⊙ h
//! where x_* = W_i* x_t + b_i* (precomputed for all steps by one GEMM) and h_* = W_h* h + b_h*
//! (one GEMM per step). Idle items (shorter than the step) keep h unchanged.
//! Saved per step: gates [items, 4H] = (r, z, n, h_n).

use super::elementwise::sigmoid;
use crate::backend::GruStep;

#[allow(clippy::too_many_arguments)]
pub fn step_fwd(
    step: GruStep,
    offsets: &[usize],
    xproj: &[f32],
    hproj: &[f32],
    h: &mut [f32],
    out: &mut [f32],
    out_cols: usize,
    gates: &mut [f32],
) {
    let hd = step.hidden;
    for b in 0..offsets.len() - 1 {
        let g = &mut gates[b * 4 * hd..(b + 1) * 4 * hd];
        let Some(row) = step.row(offsets, b) else {
            g.fill(0.0);
            continue;
        };
        let x = &xproj[row * 3 * hd..(row + 1) * 3 * hd];
        let hp = &hproj[b * 3 * hd..(b + 1) * 3 * hd];
        let hb = &mut h[b * hd..(b + 1) * hd];
        let o = &mut out[row * out_cols + step.out_col..row * out_cols + step.out_col + hd];
        for i in 0..hd {
            let r = sigmoid(x[i] + hp[i]);
            let z = sigmoid(x[hd + i] + hp[hd + i]);
            let n = (x[2 * hd + i] + r * hp[2 * hd + i]).tanh();
            let hn = (1.0 - z) * n + z * hb[i];
            hb[i] = hn;
            o[i] = hn;
            g[i] = r;
            g[hd + i] = z;
            g[2 * hd + i] = n;
            g[3 * hd + i] = hp[2 * hd + i];
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub fn step_bwd(
    step: GruStep,
    offsets: &[usize],
    gates: &[f32],
    h_prev: &[f32],
    dout: &[f32],
    out_cols: usize,
    dh: &mut [f32],
    dxproj: &mut [f32],
    dhproj: &mut [f32],
) {
    let hd = step.hidden;
    for b in 0..offsets.len() - 1 {
        let dhp = &mut dhproj[b * 3 * hd..(b + 1) * 3 * hd];
        let Some(row) = step.row(offsets, b) else {
            dhp.fill(0.0); // idle: dh passes through to the previous step untouched
            continue;
        };
        let g = &gates[b * 4 * hd..(b + 1) * 4 * hd];
        let hp = &h_prev[b * hd..(b + 1) * hd];
        let dob = &dout[row * out_cols + step.out_col..row * out_cols + step.out_col + hd];
        let dx = &mut dxproj[row * 3 * hd..(row + 1) * 3 * hd];
        let dhb = &mut dh[b * hd..(b + 1) * hd];
        for i in 0..hd {
            let (r, z, n, h_n) = (g[i], g[hd + i], g[2 * hd + i], g[3 * hd + i]);
            let d = dhb[i] + dob[i];
            let dn = d * (1.0 - z);
            let dz = d * (hp[i] - n);
            let da_n = dn * (1.0 - n * n);
            let dr = da_n * h_n;
            let da_r = dr * r * (1.0 - r);
            let da_z = dz * z * (1.0 - z);
            dx[i] = da_r;
            dx[hd + i] = da_z;
            dx[2 * hd + i] = da_n;
            dhp[i] = da_r;
            dhp[hd + i] = da_z;
            dhp[2 * hd + i] = da_n * r;
            dhb[i] = d * z;
        }
    }
}
