// kernels/optim.cu — AdamW over the flat parameter buffer, and Σx² for gradient-norm clipping.
// CPU twin: src/backend/cpu/optim.rs. Test: tests/gpu_ops.rs.
// Why one launch over the whole flat buffer: 71 M parameters, four streams (p, g, m, v),
// purely bandwidth-bound; per-tensor launches would add ~200 launches per step for nothing.
// The bias corrections and decay factor are computed on the host (in f64, as the CPU does)
// and passed in, so the per-element arithmetic is the CPU's expression for expression.
// Parameters, moments and gradients stay f32 whatever the activation storage type.
#include "common.cuh"

namespace optim {
using common::to_f32;

__device__ void adamw(float* p, const float* g, float* m, float* v, size_t n, float beta1, float beta2, float eps,
                      float step_size, float inv_sqrt_bc2, float decay, float grad_scale) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    const float gi = g[i] * grad_scale;
    const float mi = beta1 * m[i] + (1.0f - beta1) * gi;
    const float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] = p[i] * decay - step_size * mi / (sqrtf(vi) * inv_sqrt_bc2 + eps);
  }
}

// partial[block] = Σ x² over this block's grid-stride share (f32); the host adds in f64.
template <typename T> __device__ void sum_squares(const T* x, size_t n, float* partial) {
  __shared__ float scratch[32];
  float s = 0.0f;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    const float v = to_f32(x[i]);
    s += v * v;
  }
  s = common::block_sum(s, scratch);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}
}  // namespace optim

extern "C" __global__ void adamw_fwd_f32(float* p, const float* g, float* m, float* v, size_t n, float beta1,
                                         float beta2, float eps, float step_size, float inv_sqrt_bc2, float decay,
                                         float grad_scale) {
  optim::adamw(p, g, m, v, n, beta1, beta2, eps, step_size, inv_sqrt_bc2, decay, grad_scale);
}
extern "C" __global__ void sum_squares_fwd_f32(const float* x, size_t n, float* partial) {
  optim::sum_squares<float>(x, n, partial);
}
extern "C" __global__ void sum_squares_fwd_bf16(const __nv_bfloat16* x, size_t n, float* partial) {
  optim::sum_squares<__nv_bfloat16>(x, n, partial);
}
