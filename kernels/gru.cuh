// kernels/gru.cuh — the GRU's gate equations for one (item, unit), shared by the per-step
// kernels (gru.cu) and the persistent recurrence (gru_persistent.cu), so the two cannot drift.
// PyTorch's equations, gate order r, z, n; a_* are pre-activations without b_hh, hp_* = W_h* h:
//   r = σ(x_r + hp_r + b_hr),  z = σ(x_z + hp_z + b_hz),  h_n = hp_n + b_hn,
//   n = tanh(x_n + r ⊙ h_n),   h' = (1 − z) ⊙ n + z ⊙ h
// CPU twin: src/backend/cpu/gru.rs::{step_fwd, step_bwd}.
#pragma once
#include <stdint.h>

namespace gru {

// The CPU twin's sigmoid: the branch keeps exp from overflowing for large |x|.
__device__ __forceinline__ float sigmoid(float x) {
  if (x >= 0.0f) return 1.0f / (1.0f + expf(-x));
  const float e = expf(x);
  return e / (1.0f + e);
}

// The packed row item b reads at step s, or -1 when the item is idle.
__device__ __forceinline__ long long step_row(const uint32_t* offsets, int b, int s, int reverse) {
  const int start = offsets[b], len = offsets[b + 1] - start;
  if (s >= len) return -1;
  return (long long)start + (reverse ? len - 1 - s : s);
}

// What the forward saves per (item, unit) and the new state.
struct Gates {
  float r, z, n, h_n, h_next;
};

__device__ __forceinline__ Gates gates_fwd(float x_r, float x_z, float x_n, float hp_r, float hp_z, float hp_n,
                                           float b_r, float b_z, float b_n, float h) {
  Gates g;
  g.h_n = hp_n + b_n;
  g.r = sigmoid(x_r + hp_r + b_r);
  g.z = sigmoid(x_z + hp_z + b_z);
  g.n = tanhf(x_n + g.r * g.h_n);
  g.h_next = (1.0f - g.z) * g.n + g.z * h;
  return g;
}

// Gradients of one (item, unit) from d = dL/dh' (later steps' dh plus this step's output
// gradient): the pre-activations' (dxproj's; dhproj's but for h_n's, da_n · r) and what
// bypasses W_hh into dL/dh.
struct GateGrads {
  float da_r, da_z, da_n, dh_n, dh_bypass;
};

__device__ __forceinline__ GateGrads gates_bwd(float d, float r, float z, float n, float h_n, float h_prev) {
  GateGrads g;
  const float dn = d * (1.0f - z);
  const float dz = d * (h_prev - n);
  g.da_n = dn * (1.0f - n * n);
  const float dr = g.da_n * h_n;
  g.da_r = dr * r * (1.0f - r);
  g.da_z = dz * z * (1.0f - z);
  g.dh_n = g.da_n * r;
  g.dh_bypass = d * z;
  return g;
}

}  // namespace gru
