// kernels/residual_norm.cu — the post-LN sublayer join fused: s = x + dropout(a), y = LN(s)
// forward; backward dx = LN'(dy) with the sublayer's gradient da = dropout(dx) in the same pass.
// Layout: a, x, s, y, dy, dx, da [rows, d] row-major; stats [rows, 2] (mean, rstd).
// Launch: one warp per row, 8 rows per 256-thread block (as kernels/layernorm.cu, whose row
// code it runs); dgamma/dbeta by layernorm_params_bwd (one launch, deterministic).
// CPU twin: the composition dropout → add → layernorm of src/backend/cpu (Backend::
// residual_layernorm_fwd / _bwd). Test: tests/gpu_residual_norm.rs.
// Why: unfused, the join is dropout (read+write a), add (read a, x, write a), LN (read s,
// write y) forward, and LN backward, a clone and dropout backward (read+write) after it: 4 and
// 3 launches, 7 and 6 passes over the activation. Fused: 1 launch, 4 passes (read a, x, write
// s, y) forward; 1 row launch, 4 passes (read s, dy, write dx, da) backward, no clone. Each
// lane re-reads only the elements it wrote itself, so no barrier is needed between the parts.
// The mask is dropout_fwd's (common::dropout_value of the flat index) and the product is
// rounded before the add (__fmul_rn: no FMA), so the fused and unfused paths give the same bits.
#include "common.cuh"

namespace residual_norm {
using common::from_f32;
using common::to_f32;

template <typename T>
__device__ void fwd(T* a, const T* x, const T* gamma, const T* beta, float eps, float p, float scale, uint64_t seed,
                    int rows, int d, T* y, float* stats) {
  const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x & 31;
  if (row >= rows) return;
  const size_t base = (size_t)row * d;
  for (int i = lane; i < d; i += 32) {
    const float kept = common::dropout_value(to_f32(a[base + i]), p, scale, seed, base + i);
    a[base + i] = from_f32<T>(kept + to_f32(x[base + i]));
  }
  layernorm::fwd<T>(a, gamma, beta, eps, rows, d, y, stats);
}

template <typename T>
__device__ void bwd(const T* s, const float* stats, const T* gamma, const T* dy, float p, float scale, uint64_t seed,
                    int rows, int d, T* dx, T* da) {
  const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x & 31;
  if (row >= rows) return;
  layernorm::bwd<T>(s, stats, gamma, dy, rows, d, dx);
  const size_t base = (size_t)row * d;
  for (int i = lane; i < d; i += 32)
    da[base + i] = from_f32<T>(common::dropout_value(to_f32(dx[base + i]), p, scale, seed, base + i));
}
}  // namespace residual_norm

#define RESIDUAL_NORM_ENTRY(T, SUF)                                                                                \
  extern "C" __global__ void residual_layernorm_fwd_##SUF(T* a, const T* x, const T* gamma, const T* beta,         \
                                                          float eps, float p, float scale, uint64_t seed,            \
                                                          const uint64_t* salt, int rows, int d, T* y, float* stats) { \
    residual_norm::fwd<T>(a, x, gamma, beta, eps, p, scale, seed ^ *salt, rows, d, y, stats);                              \
  }                                                                                                                \
  extern "C" __global__ void residual_layernorm_bwd_##SUF(const T* s, const float* stats, const T* gamma,          \
                                                          const T* dy, float p, float scale, uint64_t seed,         \
                                                          const uint64_t* salt, int rows, int d, T* dx, T* da) {    \
    residual_norm::bwd<T>(s, stats, gamma, dy, p, scale, seed ^ *salt, rows, d, dx, da);                                   \
  }

RESIDUAL_NORM_ENTRY(float, f32)
RESIDUAL_NORM_ENTRY(__nv_bfloat16, bf16)
