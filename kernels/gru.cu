// kernels/gru.cu — fused GRU gates for one timestep of a packed batch, forward and backward
// (PyTorch equations, gate order r, z, n; written once in gru.cuh):
//   r = σ(x_r + h_r),  z = σ(x_z + h_z),  n = tanh(x_n + r ⊙ h_n),  h' = (1 − z) ⊙ n + z ⊙ h
// x_* = W_i* x_t + b_i* (xproj [tokens, 3H], one GEMM for every step), h_* = W_h* h + b_h*
// (hproj [items, 3H] = W_h* h from one cuBLAS GEMM per step; the bias b_hh is added here, which
// saves a launch per step). Item b at step s reads packed row offsets[b] + s (forward) or
// offsets[b] + len_b − 1 − s (reverse); items with len_b <= s are idle: h carried over, no output
// row, saved gates zero (fwd) / dhproj zero and dh passed through (bwd).
// The run's buffers are indexed by the step, so nothing is cloned, cleared or copied per step:
// hs [(steps + 1)·items, H] holds h_s at rows s·items (step s reads h_s, writes h_{s+1}), gates
// [steps·items, 4H] = (r, z, n, h_n) and dhproj [steps·items, 3H] their rows s·items.
// Launch: one thread per (item, unit), flat index over items · H, grid-stride; any block size.
// CPU twin: src/backend/cpu/gru.rs::{step_fwd, step_bwd}. Test: tests/gpu_gru.rs.
// Why scalar loads: each thread touches 7 (fwd) / 8 (bwd) values in 5–6 arrays with unit-stride
// lanes, so every access is already a full coalesced line; a step moves 3.4 MB at B 128, H 512
// (1.1 µs at 3 TB/s) and the launch itself costs about as much: hence b_hh and the state rows
// here, which took three more launches per step (bias add, h clone, gates clear) and two
// copies per backward step before.
//
// ptxas (nvcc 13.0.88, -O3; no spills, no stack frame):
//   sm_90 gru_step_fwd_f32: 40 registers (32 before b_hh and the state rows were its own work);
//         gru_step_bwd_f32: 32 registers; no shared memory
//   sm_80 gru_step_fwd_f32: 40 registers; gru_step_bwd_f32: 32 registers
//
// These kernels are the step-by-step path: the CPU twin's shape, and the CUDA backend's
// fallback where the persistent recurrence (gru_persistent.cu: the whole run in one cooperative
// launch per pass, W_hh slices in shared memory) does not fit the device.
#include "common.cuh"
#include "gru.cuh"

namespace gru {
using common::from_f32;
using common::to_f32;

template <typename T>
__device__ void step_fwd(const T* __restrict__ xproj, const T* __restrict__ hproj, const T* __restrict__ bias_hh,
                         T* __restrict__ hs, T* __restrict__ out, T* __restrict__ gates,
                         const uint32_t* __restrict__ offsets, int items, int H, int s, int reverse, int out_cols,
                         int out_col) {
  const size_t n = (size_t)items * H;
  const T* h = hs + (size_t)s * n;
  T* h_next = hs + (size_t)(s + 1) * n;
  gates += (size_t)s * items * 4 * H;
  for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < n; e += (size_t)gridDim.x * blockDim.x) {
    const int b = (int)(e / H), i = (int)(e - (size_t)b * H);
    T* g = gates + (size_t)b * 4 * H;
    const long long row = step_row(offsets, b, s, reverse);
    if (row < 0) {
      g[i] = g[H + i] = g[2 * H + i] = g[3 * H + i] = from_f32<T>(0.0f);
      h_next[e] = h[e];
      continue;
    }
    const T* x = xproj + (size_t)row * 3 * H;
    const T* hp = hproj + (size_t)b * 3 * H;
    const Gates o = gates_fwd(to_f32(x[i]), to_f32(x[H + i]), to_f32(x[2 * H + i]), to_f32(hp[i]), to_f32(hp[H + i]),
                              to_f32(hp[2 * H + i]), to_f32(bias_hh[i]), to_f32(bias_hh[H + i]),
                              to_f32(bias_hh[2 * H + i]), to_f32(h[e]));
    h_next[e] = from_f32<T>(o.h_next);
    out[(size_t)row * out_cols + out_col + i] = from_f32<T>(o.h_next);
    g[i] = from_f32<T>(o.r);
    g[H + i] = from_f32<T>(o.z);
    g[2 * H + i] = from_f32<T>(o.n);
    g[3 * H + i] = from_f32<T>(o.h_n);
  }
}

// dh holds dL/dh_t from later steps on entry and the part of dL/dh_{t-1} that bypasses W_hh on
// return (the caller adds dhproj · W_hh with a GEMM).
template <typename T>
__device__ void step_bwd(const T* __restrict__ gates, const T* __restrict__ hs, const T* __restrict__ dout,
                         T* __restrict__ dh, T* __restrict__ dxproj, T* __restrict__ dhproj,
                         const uint32_t* __restrict__ offsets, int items, int H, int s, int reverse, int out_cols,
                         int out_col) {
  const size_t n = (size_t)items * H;
  const T* h_prev = hs + (size_t)s * n;
  gates += (size_t)s * items * 4 * H;
  dhproj += (size_t)s * items * 3 * H;
  for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < n; e += (size_t)gridDim.x * blockDim.x) {
    const int b = (int)(e / H), i = (int)(e - (size_t)b * H);
    T* dhp = dhproj + (size_t)b * 3 * H;
    const long long row = step_row(offsets, b, s, reverse);
    if (row < 0) {
      dhp[i] = dhp[H + i] = dhp[2 * H + i] = from_f32<T>(0.0f);
      continue;
    }
    const T* g = gates + (size_t)b * 4 * H;
    const float d = to_f32(dh[e]) + to_f32(dout[(size_t)row * out_cols + out_col + i]);
    const GateGrads o = gates_bwd(d, to_f32(g[i]), to_f32(g[H + i]), to_f32(g[2 * H + i]), to_f32(g[3 * H + i]),
                                  to_f32(h_prev[e]));
    T* dx = dxproj + (size_t)row * 3 * H;
    dx[i] = from_f32<T>(o.da_r);
    dx[H + i] = from_f32<T>(o.da_z);
    dx[2 * H + i] = from_f32<T>(o.da_n);
    dhp[i] = from_f32<T>(o.da_r);
    dhp[H + i] = from_f32<T>(o.da_z);
    dhp[2 * H + i] = from_f32<T>(o.dh_n);
    dh[e] = from_f32<T>(o.dh_bypass);
  }
}

}  // namespace gru

// One forward timestep: h_{s+1} into hs from h_s, out [tokens, out_cols] at columns
// out_col..out_col + H of each active item's row, this step's rows of gates.
extern "C" __global__ void gru_step_fwd_f32(const float* xproj, const float* hproj, const float* bias_hh, float* hs,
                                            float* out, float* gates, const uint32_t* offsets, int items, int H, int s,
                                            int reverse, int out_cols, int out_col) {
  gru::step_fwd<float>(xproj, hproj, bias_hh, hs, out, gates, offsets, items, H, s, reverse, out_cols, out_col);
}

// One backward timestep: dh in place, this step's rows of dxproj [tokens, 3H] and dhproj.
extern "C" __global__ void gru_step_bwd_f32(const float* gates, const float* hs, const float* dout, float* dh,
                                            float* dxproj, float* dhproj, const uint32_t* offsets, int items, int H,
                                            int s, int reverse, int out_cols, int out_col) {
  gru::step_bwd<float>(gates, hs, dout, dh, dxproj, dhproj, offsets, items, H, s, reverse, out_cols, out_col);
}
